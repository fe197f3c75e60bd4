"""What monitors hand to each other: one plain record per estimate.

:class:`~slt_callbacks.LLCMonitor` builds an :class:`LLCRecord` after every estimate and
calls ``on_llc_record(trainer, pl_module, record)`` on every other callback of the trainer
that defines it (the stage detector is one). Records hold plain Python values only, so they
can be kept in a callback's ``state_dict`` and reloaded with ``weights_only=True``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class LLCRecord:
    """One LLC estimate at one training step.

    Attributes:
        step: ``trainer.global_step`` of the snapshot.
        llc: mean λ̂ over healthy chains (nan if none).
        llc_std: standard deviation across chains.
        status: the :class:`~slt_callbacks.Status` value (``"healthy"``, ``"diverged"``, ...).
        loss: the training loss around this step (an exponential moving average of the
            losses ``training_step`` returned), or None if unknown.
        components: ``{name: (llc, llc_std, status)}`` for weight-restricted estimates.
        datasets: ``{name: (llc, llc_std, status)}`` for data-restricted estimates.
        seconds: wall time of the estimate.
        num_chains: chains behind ``llc`` (``llc_std / sqrt(num_chains)`` is its standard
            error), or None if unknown.
        source: the metric prefix of the monitor that made it, to tell two monitors apart.
        sampler: the sampling settings behind ``llc`` that set its scale (step size, nβ,
            localization, chain length, noise level), as one string, or None if unknown.
            Estimates made with different settings are not comparable (SGLD's bias depends
            on them): the stage tracker lists where it changes, e.g. when ``config="auto"``
            freezes its calibration, and flags events there.
    """

    step: int
    llc: float
    llc_std: float
    status: str
    loss: float | None = None
    components: dict[str, tuple[float, float, str]] = field(default_factory=dict)
    datasets: dict[str, tuple[float, float, str]] = field(default_factory=dict)
    seconds: float = float("nan")
    num_chains: int | None = None
    source: str = "slt/"
    sampler: str | None = None

    @property
    def healthy(self) -> bool:
        return self.status == "healthy"

    def to_dict(self) -> dict[str, Any]:
        """Plain values (tuples become lists) for a checkpoint."""
        out = asdict(self)
        out["components"] = {k: list(v) for k, v in self.components.items()}
        out["datasets"] = {k: list(v) for k, v in self.datasets.items()}
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> LLCRecord:
        values = dict(values)
        values["components"] = {k: tuple(v) for k, v in values.get("components", {}).items()}
        values["datasets"] = {k: tuple(v) for k, v in values.get("datasets", {}).items()}
        return cls(**values)
