"""The SGLD config an LLC monitor estimates with, over a whole run and across resumes.

``config=SGLDConfig(...)`` (or None: ``SGLDConfig()``) is fixed for the run. ``config="auto"``
starts without one: until :class:`~slt_callbacks.callbacks._calibration.RunCalibration`
freezes a calibrated config, each step uses the provisional config it returns (and the
metrics say so, ``<prefix>calibration/provisional``). The config in use and the calibration
policy's state travel in the monitor's checkpoint state, under the keys ``"config"`` and
``"autocal"``; a resumed fixed-config run whose checkpoint was made with another config
warns that λ̂ before and after the resume are not comparable.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal

from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from slt_callbacks.core.calibrate import Calibration
from slt_callbacks.core.config import SGLDConfig
from slt_callbacks.sinks import MetricSink

from ._calibration import RunCalibration
from ._distributed import check_chain_split

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = ["RunConfig"]


class RunConfig:
    """The config of each estimate: ``config`` as given, or chosen at run time.

    Args:
        config: an :class:`SGLDConfig`, ``"auto"`` or None (``SGLDConfig()``).
        calibration: keyword arguments of ``calibrate`` (``config="auto"`` only).
        owner: the monitor's name and prefix, for messages.
    """

    def __init__(
        self,
        config: SGLDConfig | Literal["auto"] | None,
        calibration: Mapping[str, Any],
        owner: str,
    ) -> None:
        self.requested = config
        self.calibration = dict(calibration)
        self.owner = owner
        #: The config in use: ``config``, or the calibrated one once ``"auto"`` froze it.
        self.active: SGLDConfig | None = None
        #: With ``config="auto"``: when to calibrate, the provisional config until then.
        self.auto: RunCalibration | None = None
        self.reset()

    def reset(self) -> None:
        """A fresh run: a fixed config stays, ``"auto"`` calibrates again on its own model."""
        auto = self.requested == "auto"
        self.active = None if auto else (self.requested or SGLDConfig())  # type: ignore[assignment]
        self.auto = RunCalibration(self.calibration) if auto else None

    @property
    def base(self) -> SGLDConfig:
        """The config known before any calibration (what the checks at train start use)."""
        return self.active or self.calibration.get("base") or SGLDConfig()

    @property
    def num_batches(self) -> int | None:
        """``num_batches`` of the known config (None: the monitor's default)."""
        config = self.active or self.calibration.get("base")
        return None if config is None else config.num_batches

    @property
    def last_calibration(self) -> Calibration | None:
        return None if self.auto is None else self.auto.last

    def run_config_entry(self) -> Any:
        """What goes into the logger's run config under ``<prefix>sgld`` at setup."""
        return "auto" if self.active is None else self.active.to_dict()

    def check_split(self, world_size: int) -> None:
        if self.active is not None:
            check_chain_split(self.active, world_size, self.owner)

    def resolve(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        *,
        step: int,
        last_status: str | None,
        sink: MetricSink,
        key: Callable[[str], str],
        **calibrate_on: Any,
    ) -> SGLDConfig:
        """The config of the estimate at ``step``. With ``"auto"``: the provisional config
        until a calibration is frozen (see :class:`~slt_callbacks.core.autocal.AutoCalibration`);
        ``calibrate_on`` holds ``loss_fn``, ``batches`` and ``seed`` of the calibration."""
        if self.active is not None:
            return self.active
        assert self.auto is not None
        chosen, frozen = self.auto.config_for(
            trainer, pl_module, step=step, last_status=last_status, sink=sink, key=key,
            owner=self.owner, **calibrate_on,
        )
        check_chain_split(chosen, trainer.world_size, self.owner)
        if frozen:
            self.active = chosen
        return chosen

    def metrics(self, key: Callable[[str], str]) -> dict[str, float]:
        """``config="auto"``: ``calibration/provisional`` 1 while estimates use the
        provisional config; nothing otherwise."""
        if self.auto is None or self.auto.status is None:
            return {}
        return {key("calibration/provisional"): float(self.auto.provisional)}

    # -- checkpoints --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"config": None if self.active is None else self.active.to_dict()}
        if self.auto is not None:
            state["autocal"] = self.auto.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self.auto is not None and state.get("autocal") is not None:
            self.auto.load_state_dict(state["autocal"])
        saved = state.get("config")
        if saved is None:
            return
        saved_config = SGLDConfig.from_dict(saved)
        if self.requested == "auto":
            self.active = saved_config  # keep what calibration chose before the resume
        elif saved_config != self.active:
            rank_zero_warn(
                f"{self.owner}: the checkpoint's SGLD config {saved_config} differs from this "
                f"monitor's {self.active}; λ̂ before and after the resume are not comparable."
            )
