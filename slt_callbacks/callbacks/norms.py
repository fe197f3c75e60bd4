"""WeightNormMonitor: the L2 norm of the weights, in total and per component."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from slt_callbacks.core.norms import weight_norms
from slt_callbacks.core.restrict import Resolved, Selector, resolve_components

from ._base import ScheduleLike, _ScheduledMonitor
from ._guard import OnFailure

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = ["WeightNormMonitor"]


class WeightNormMonitor(_ScheduledMonitor):
    r"""Log :math:`\lVert w \rVert_2` of the trainable weights, and of each component.

    Weight norm is the usual stand-in for "simplicity", and it is not the LLC: a model can move
    to a lower-λ̂ (more degenerate) solution while its norm grows. Logged at the same steps as
    :class:`~slt_callbacks.LLCMonitor` (both default to the log-spaced schedule), the two
    curves show when they disagree. No data, no randomness; cheap enough for any schedule.

    Metrics (keys with the default ``prefix="slt/"``), at ``trainer.global_step``:

    - ``slt/weight_norm``: L2 norm of all trainable parameters (all parameters with
      ``trainable_only=False``); tied parameters count once.
    - ``slt/weight_norm/<component>``: L2 norm of the coordinates a component selects (the
      same selectors as ``LLCMonitor(components=...)``: globs, lists of globs, masks).

    :attr:`history` holds ``{"step", "weight_norm", "weight_norm/<component>", ...}``.

    Args:
        schedule: when to measure; default log-spaced (8 per decade).
        components: ``{name: selector}``, resolved against the trainable parameters; a glob
            that matches nothing is an error in ``setup``.
        trainable_only: count only parameters with ``requires_grad=True`` (the coordinates an
            LLC is defined over).
        prefix: start of every metric key; distinct per instance.
        on_failure: ``"warn"`` (default), ``"ignore"`` or ``"raise"``: what an error while
            measuring does (logged as a failed step, ``slt/failures/weight_norm``, and training
            goes on; or re-raised). Norms of NaN weights are NaN, logged as measured.

    Example:
        >>> monitor = WeightNormMonitor(components={"encoder": "encoder.*"}, schedule=100)
    """

    uses_data = False
    failure_tag = "weight_norm"

    def __init__(
        self,
        *,
        schedule: ScheduleLike = None,
        components: Mapping[str, Selector] | None = None,
        trainable_only: bool = True,
        prefix: str = "slt/",
        on_failure: OnFailure = "warn",
    ) -> None:
        super().__init__(schedule=schedule, seed=0, prefix=prefix, on_failure=on_failure)
        if components is not None and not isinstance(components, Mapping):
            raise ValueError(
                "Expected argument `components` to be None or a mapping from name to selector "
                f"but got {type(components).__name__}."
            )
        if not isinstance(trainable_only, bool):
            raise ValueError(
                f"Expected argument `trainable_only` to be a bool but got {trainable_only!r}."
            )
        self.components = dict(components) if components else None
        self.trainable_only = trainable_only
        self._resolved: dict[str, Resolved] = {}

    def _setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if any(p.requires_grad for p in pl_module.parameters()):
            # Otherwise the model is built in `configure_model`; checked at train start.
            resolve_components(pl_module, self.components)

    def _prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Resolved once the model is on its device and frozen parameters are settled.
        self._resolved = resolve_components(pl_module, self.components)

    def _measure(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int
    ) -> tuple[dict[str, Any], dict[str, float]]:
        norms = weight_norms(pl_module, self._resolved, trainable_only=self.trainable_only)
        values = {"weight_norm": norms.pop("total")}
        values.update({f"weight_norm/{name}": value for name, value in norms.items()})
        return values, {self._key(k): v for k, v in values.items()}
