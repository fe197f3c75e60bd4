"""``config="auto"`` at run time: calibrate where it makes sense, and show why.

The rule that chooses the step size and localization is
:func:`~slt_callbacks.core.calibrate.calibrate` and the rule that decides *when* is
:class:`~slt_callbacks.core.autocal.AutoCalibration` (both torch only); this module runs them
inside a training run: on every DDP rank (rank zero's choice
wins, so that all ranks sample with one config), through the failure guard (a calibration
that raises fails that step, not the run), and publishes the sweep behind the choice: the
run config, a W&B table and image with a ``WandbLogger``, else a PNG next to the logs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from slt_callbacks.core.autocal import AutoCalibration, calibration_options
from slt_callbacks.core.calibrate import Calibration, calibrate
from slt_callbacks.core.config import SGLDConfig
from slt_callbacks.plots import plot_calibration
from slt_callbacks.seeds import derive_seed
from slt_callbacks.sinks import MetricSink

from ._distributed import gather
from ._guard import attempt, raise_if_any_failed

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = ["RunCalibration", "check_config", "publish_sweep"]


class RunCalibration:
    """``config="auto"`` inside a run: when to calibrate and which config to use until then.

    The decisions are :class:`~slt_callbacks.core.autocal.AutoCalibration`'s (never at step 0,
    a provisional config until a verified calibration at a minimum, never a silent
    fallback); this class runs them inside Lightning and keeps their state for checkpoints.
    """

    def __init__(self, options: Mapping[str, Any]) -> None:
        self.options = dict(options)
        self.policy = AutoCalibration(self.options.get("base") or SGLDConfig())
        #: ``"provisional"``, ``"calibrated"``, ``"fallback"``, ... (None before the first step).
        self.status: str | None = None
        #: The latest calibration sweep, if any.
        self.last: Calibration | None = None

    @property
    def provisional(self) -> bool:
        return self.status == "provisional"

    def config_for(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        *,
        loss_fn: Any,
        batches: list[Any],
        seed: int,
        step: int,
        last_status: str | None,
        sink: MetricSink,
        key: Callable[[str], str],
        owner: str,
    ) -> tuple[SGLDConfig, bool]:
        """The config of this step's estimate and whether it is frozen for the run."""
        outcome = None
        if self.policy.should_calibrate(step, last_status):
            outcome = _calibrate(trainer, pl_module, loss_fn, batches, self.options, seed, step)
            rank_zero_info(f"{owner} calibration at step {step}:\n{outcome.to_markdown()}")
            self.last = outcome
            publish_sweep(sink, trainer, outcome, step, key=key, owner=owner)
        decision = self.policy.decide(outcome, step)
        # Every rank must sample with the same config; rank zero's choice wins.
        chosen = gather(decision.config, trainer)[0]
        if decision.status != self.status or outcome is not None:
            if decision.status != "calibrated":
                rank_zero_warn(f"{owner} (config='auto'): {decision.reason}")
            sink.update_config({
                key("sgld"): chosen.to_dict(),
                key("calibration/status"): decision.status,
                key("calibration/step"): step,
                key("calibration/verified"): outcome is not None and outcome.verified,
                key("calibration/reason"): decision.reason,
            })  # fmt: skip
        self.status = decision.status
        return chosen, decision.frozen

    def state_dict(self) -> dict[str, Any]:
        return {"policy": self.policy.state_dict(), "status": self.status}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.policy.load_state_dict(state["policy"])
        self.status = state.get("status")


def _calibrate(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    loss_fn: Any,
    batches: list[Any],
    options: Mapping[str, Any],
    seed: int,
    step: int,
) -> Calibration:
    options = calibration_options({"on_failure": "ignore", **options},
                                  options.get("base") or SGLDConfig())
    options.setdefault("seed", derive_seed(seed, step, 0, "calibrate"))
    # Through `attempt` and the gather: a failure on one rank fails the step on all.
    attempted = attempt(calibrate, pl_module, loss_fn, batches, **options,
                        rank=trainer.global_rank)  # fmt: skip
    raise_if_any_failed(gather(attempted, trainer) if trainer.world_size > 1 else [attempted])
    assert isinstance(attempted, Calibration)
    return attempted


def publish_sweep(
    sink: MetricSink,
    trainer: pl.Trainer,
    outcome: Calibration,
    step: int,
    *,
    key: Callable[[str], str],
    owner: str,
) -> None:
    """The calibration sweep as a table and a picture (W&B, else a PNG next to the logs)."""
    rows = [point.to_dict() for point in outcome.table]
    columns = list(rows[0]) if rows else []
    sink.log_table(key("calibration/table"), columns,
                   [[_cell(r[c]) for c in columns] for r in rows], step)
    if not trainer.is_global_zero:
        return
    try:
        figure = plot_calibration(outcome)  # needs the optional matplotlib
    except ImportError as missing:
        rank_zero_info(f"{owner}: no calibration plot ({missing}).")
        return
    if sink.has_wandb:
        sink.log_image(key("calibration/plot"), figure, step)
        return
    folder = Path(trainer.log_dir or trainer.default_root_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{key('').strip('/').replace('/', '_')}_calibration.png"
    figure.savefig(path, dpi=120)
    rank_zero_info(f"{owner}: calibration plot written to {path}")


def check_config(config: Any, calibration: Any) -> None:
    """``config`` is an SGLDConfig, ``"auto"`` or None; ``calibration`` only with ``"auto"``."""
    if config is not None and config != "auto" and not isinstance(config, SGLDConfig):
        raise ValueError(
            "Expected argument `config` to be an SGLDConfig, 'auto' or None but got "
            f"{config!r}."
        )
    if calibration is not None:
        if not isinstance(calibration, Mapping):
            raise ValueError(
                "Expected argument `calibration` to be a mapping of keyword arguments for "
                f"`calibrate` but got {type(calibration).__name__}."
            )
        if config != "auto":
            raise ValueError(
                "Argument `calibration` only applies with config='auto' but config is "
                f"{config!r}."
            )


def _cell(value: Any) -> Any:
    """A table cell W&B can show: containers (per-chain lists, reasons) as text."""
    return value if isinstance(value, (str, int, float, bool)) or value is None else str(value)
