"""When ``config="auto"`` calibrates, and what the estimates before that are: a pure policy.

A calibration is only meaningful where w* is a local minimum: at a saddle (every plateau of
a run that is still learning, and the random initialisation) the small-γ chains escape and
:func:`~slt_callbacks.core.calibrate.calibrate` can only return a large γ that restrains
them, which would then bias every later estimate at a true minimum low. So the policy is:

1. **Never at step 0**, the initialisation, which is no minimum of the trained objective.
2. Until a config is frozen, estimates run with the **provisional** config (the
   calibration's ``base``, default :class:`~slt_callbacks.core.config.SGLDConfig()`), and are
   marked provisional: they are comparable with each other, not with the calibrated ones.
3. **Calibrate at a scheduled step where the chains look healthy**: the previous
   (provisional) estimate was ``healthy``, or there was none yet (a schedule that starts
   late, e.g. fine-tuning a trained model), or it failed for a reason of the step size
   (``diverged``, ``all_diverged``, ``low_acceptance``: the provisional config does not
   suit this model, and a calibration is the fix). A ``not_a_minimum`` estimate (a saddle)
   or a ``not_converged`` one defers. Attempts back off: the 1st, 2nd, 4th, 8th, …
   triggering estimate, at most ``max_attempts`` calibrations in a run.
4. **Freeze** the calibrated config when the calibration is verified (stationary pilot
   chains at the chosen length, and halving ε moved λ̂ by less than the estimate's standard
   error; see :func:`~slt_callbacks.core.calibrate.settle`) and w* looked like a minimum: no
   grid point at a smaller γ than the chosen one read ``not_a_minimum`` (the chains did not
   have to be held back from escaping). The frozen config is the calibration's in full:
   ε, γ *and* the chain length it chose (``num_burnin_steps``, ``num_draws``), so every
   later estimate runs chains as long as the ones that were shown to mix.
5. Otherwise stay provisional and try again later; a verified calibration at a saddle
   becomes the new provisional config (its step size suits the model; its γ holds the
   chains at saddles, so later provisional estimates are sane numbers, still flagged).
   After the last attempt the run keeps the provisional config for good (``status =
   "fallback"``), never silently: the decision says so, and the monitor warns and writes
   it into the run config.

**Budget.** Inside a training run the chain-length phase gets a smaller budget than
:func:`~slt_callbacks.core.calibrate.calibrate`'s default: pilot chains of at most
:data:`AUTO_MAX_STEPS_FACTOR` × the provisional chain length (``num_burnin_steps +
num_draws``), at least twice the screening length; pass ``calibration={"max_steps": ...}``
to change it (:func:`calibration_options`). A model that needs longer chains gets an
unverified calibration, and the policy says so instead of freezing it.

:class:`AutoCalibration` holds the state (attempts, the frozen config) and is saved in
checkpoints; :meth:`AutoCalibration.decide` is the decision, a function of the calibration's
table only, tested on synthetic tables.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from .._checks import check_int
from .calibrate import Calibration
from .config import SGLDConfig
from .diagnostics import Status

__all__ = ["AUTO_MAX_STEPS_FACTOR", "AutoCalibration", "AutoDecision", "calibration_options",
           "escaped_below"]

AutoStatus = Literal["calibrated", "provisional", "fallback"]

AUTO_MAX_STEPS_FACTOR = 32
"""Longest pilot chain of a calibration inside a run, in units of the provisional length."""


def calibration_options(options: Mapping[str, Any], provisional: SGLDConfig) -> dict[str, Any]:
    """The keyword arguments of ``calibrate`` inside a run: ``options`` as given, plus the
    run's budget for the chain-length phase when ``max_steps`` is not set (see the module
    docstring), never below twice the screening chains' length.

    Example:
        >>> calibration_options({}, SGLDConfig())["max_steps"]   # 32 × (100 + 200)
        9600
        >>> calibration_options({"max_steps": None}, SGLDConfig())["max_steps"] is None
        True
    """
    out = dict(options)
    if "max_steps" not in out:
        screen = 2 * (out.get("num_burnin_steps", 500) + out.get("num_draws", 500))
        out["max_steps"] = max(AUTO_MAX_STEPS_FACTOR * provisional.num_steps, screen)
    return out


@dataclass(frozen=True)
class AutoDecision:
    """What to estimate with at one scheduled step.

    Attributes:
        config: the SGLD config of this step's estimate.
        status: ``"calibrated"`` (frozen from a verified calibration at a minimum),
            ``"provisional"`` (not calibrated yet; later estimates may use another config) or
            ``"fallback"`` (no calibration succeeded; the provisional config is kept for good).
        frozen: whether ``config`` is now fixed for the rest of the run.
        reason: a sentence for the log and the run config.
    """

    config: SGLDConfig
    status: AutoStatus
    frozen: bool
    reason: str

    @property
    def provisional(self) -> bool:
        """Whether estimates with this decision are not at the run's final config."""
        return self.status == "provisional"


def escaped_below(calibration: Calibration) -> tuple[float, ...]:
    """The localizations below the chosen one at which some grid point read
    ``not_a_minimum``: the chains had to be held back from escaping, so w* is a saddle (or
    not yet a minimum) and the chosen γ is larger than a minimum needs."""
    chosen = calibration.chosen
    if chosen is None:
        return ()
    return tuple(sorted({
        p.localization for p in calibration.table
        if p.localization < chosen.localization and p.status is Status.NOT_A_MINIMUM
    }))


class AutoCalibration:
    """The ``config="auto"`` policy of the module docstring, as a small state machine.

    Args:
        provisional: the config of the estimates before a calibration is frozen.
        max_attempts: calibrations at most per run (each costs a grid of short estimates).

    Example:
        >>> policy = AutoCalibration(SGLDConfig())
        >>> policy.should_calibrate(0, None)        # never at the initialisation
        False
        >>> policy.should_calibrate(10, "healthy")
        True
    """

    def __init__(self, provisional: SGLDConfig, *, max_attempts: int = 5) -> None:
        if not isinstance(provisional, SGLDConfig):
            raise ValueError(
                "Expected argument `provisional` to be an SGLDConfig but got "
                f"{type(provisional).__name__}."
            )
        self.provisional = provisional
        self.max_attempts = check_int("max_attempts", max_attempts, minimum=1)
        self.attempts = 0
        self.healthy_seen = 0
        self.frozen: SGLDConfig | None = None
        self.status: AutoStatus = "provisional"
        self.frozen_at: int | None = None

    def should_calibrate(self, step: int, last_status: Status | str | None) -> bool:
        """Whether to calibrate at ``step``, given the status of the previous estimate
        (None if there was none): see rules 1, 3 and 5 of the module docstring. Counts the
        triggering estimates (the backoff), so call it once per scheduled step."""
        if self.frozen is not None or step == 0 or self.attempts >= self.max_attempts:
            return False
        if last_status is None:
            return True
        if Status(last_status) in (Status.NOT_A_MINIMUM, Status.NOT_CONVERGED):
            return False
        self.healthy_seen += 1
        # Back off: calibrate on the 1st, 2nd, 4th, 8th, ... triggering estimate.
        return self.healthy_seen & (self.healthy_seen - 1) == 0

    def decide(self, calibration: Calibration | None, step: int) -> AutoDecision:
        """The config for ``step``: freeze a verified calibration at a minimum, else stay
        provisional (or, after the last attempt, fall back for good). ``calibration`` None
        means none ran at this step."""
        if self.frozen is not None:
            return AutoDecision(self.frozen, self.status, True, "already frozen")
        if calibration is None:
            return self._pending(step, "not calibrated yet (the previous estimate was not "
                                       "healthy, or this is the initialisation)")
        self.attempts += 1
        escaped = escaped_below(calibration)
        if calibration.verified and calibration.config is not None and not escaped:
            return self._freeze(calibration.config, "calibrated", step,
                                f"calibrated at step {step}: {calibration.reason}")
        if not calibration.verified:
            why = f"the calibration at step {step} is not verified ({calibration.reason})"
        else:
            assert calibration.config is not None
            self.provisional = calibration.config  # sane ε for this model, γ for saddles
            why = (f"at step {step} the chains escaped at γ = "
                   f"{', '.join(f'{g:g}' for g in escaped)} (not_a_minimum), so w* is no "
                   "minimum yet and the γ it needs would bias later estimates low")
        if self.attempts >= self.max_attempts:
            return self._freeze(self.provisional, "fallback", step, (
                f"gave up after {self.attempts} calibration(s): {why}. Every estimate of "
                f"this run uses the provisional config {self.provisional}. Pass config= "
                "explicitly, or calibrate() a trained checkpoint and pass its config."
            ))
        return self._pending(step, why)

    def _pending(self, step: int, why: str) -> AutoDecision:
        return AutoDecision(self.provisional, "provisional", False,
                            f"step {step} estimated with the provisional config: {why}.")

    def _freeze(self, config: SGLDConfig, status: AutoStatus, step: int,
                reason: str) -> AutoDecision:
        self.frozen, self.status, self.frozen_at = config, status, step
        return AutoDecision(config, status, True, reason)

    def state_dict(self) -> dict[str, Any]:
        """Plain values (loadable with ``weights_only=True``)."""
        return {
            "attempts": self.attempts,
            "healthy_seen": self.healthy_seen,
            "frozen": None if self.frozen is None else self.frozen.to_dict(),
            "status": self.status,
            "frozen_at": self.frozen_at,
            "provisional": self.provisional.to_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`state_dict`."""
        self.attempts = int(state.get("attempts", 0))
        self.healthy_seen = int(state.get("healthy_seen", 0))
        frozen = state.get("frozen")
        self.frozen = None if frozen is None else SGLDConfig.from_dict(frozen)
        self.status = state.get("status", "provisional")
        self.frozen_at = state.get("frozen_at")
        if state.get("provisional") is not None:
            self.provisional = SGLDConfig.from_dict(state["provisional"])
