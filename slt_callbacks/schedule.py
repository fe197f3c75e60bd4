"""When a monitor runs: a pure, overridable policy over training steps.

Estimating a local learning coefficient costs hundreds of SGLD steps, so a monitor cannot run
at every training step. Development is front-loaded (Hoogland et al. 2024, "The developmental
landscape of in-context learning"): most stage transitions happen early, and stage analyses
smooth the LLC curve in log(step). The default schedule is therefore *log-spaced*: dense at
the start of training and sparse later, a constant number of measurements per decade of
steps.

A :class:`Schedule` is the union of up to three rules, all anchored at ``start`` and confined
to the window ``[start, stop)``:

- ``every=n``: ``start, start + n, start + 2n, ...``;
- ``log_per_decade=d``: ``start`` plus ``start + round(10 ** (k / d))`` for ``k = 0, 1, 2, ...``;
- ``steps=[...]``: explicit (absolute) steps.

It only answers questions about step numbers; it knows nothing of Lightning. A callback asks
:meth:`Schedule.should_run` in its hook, and :meth:`Schedule.steps_until` in ``setup`` to
check that the schedule fires at all before ``trainer.max_steps``.

Example:
    >>> Schedule.log_spaced(per_decade=4).steps_until(100)
    [0, 1, 2, 3, 6, 10, 18, 32, 56, 100]
    >>> Schedule(every=25, steps=[3]).steps_until(60)
    [0, 3, 25, 50]
    >>> Schedule.every_n(1000) | Schedule.at([5, 50])
    Schedule(every=1000, steps=[5, 50])
"""

from __future__ import annotations

import bisect
import math
import numbers
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ._checks import check_int

__all__ = ["Schedule", "coerce", "fire"]

DEFAULT_LOG_PER_DECADE = 8
"""Measurements per decade of ``Schedule()``: steps 0, 1, 2, 3, 4, 6, 7, 10, 13, 18, 24, 32, ..."""


# --------------------------------------------------------------------------------------------
# Rules: the building blocks a Schedule is a union of. Each answers three questions in O(1) or
# O(log) time, so that `should_run` can be called at every training step for free.
# --------------------------------------------------------------------------------------------


class _Rule(Protocol):
    def contains(self, step: int) -> bool: ...

    def first_at_or_after(self, step: int) -> int | None: ...

    def until(self, end: int) -> Iterable[int]:
        """The rule's steps below ``end`` (exclusive)."""
        ...


def _in_window(step: int, start: int, stop: int | None) -> bool:
    return start <= step and (stop is None or step < stop)


@dataclass(frozen=True)
class _Every:
    n: int
    start: int
    stop: int | None

    def contains(self, step: int) -> bool:
        return _in_window(step, self.start, self.stop) and (step - self.start) % self.n == 0

    def first_at_or_after(self, step: int) -> int | None:
        offset = max(step - self.start, 0)
        candidate = self.start + -(-offset // self.n) * self.n  # ceil to a multiple of n
        return candidate if _in_window(candidate, self.start, self.stop) else None

    def until(self, end: int) -> Iterable[int]:
        return range(self.start, end if self.stop is None else min(end, self.stop), self.n)


def _log_point(k: int, per_decade: int) -> int:
    return round(10.0 ** (k / per_decade))


def _first_log_offset_at_or_after(offset: int, per_decade: int) -> int:
    """Smallest log-spaced offset (0 or ``round(10**(k/d))``) that is ``>= offset``."""
    if offset <= 0:
        return 0
    # round(10**(k/d)) >= offset  <=>  k >= d*log10(offset - 1/2), up to rounding: start a
    # little below that bound and walk up. The walk takes at most a few steps, so the cost is
    # O(1) whatever the step, and it evaluates the very formula that defines the points, so
    # membership tests and enumeration can never disagree through floating-point error.
    k = max(0, math.floor(per_decade * math.log10(offset - 0.5)) - 1)
    while _log_point(k, per_decade) < offset:
        k += 1
    return _log_point(k, per_decade)


@dataclass(frozen=True)
class _LogSpaced:
    per_decade: int
    start: int
    stop: int | None

    def contains(self, step: int) -> bool:
        if not _in_window(step, self.start, self.stop):
            return False
        offset = step - self.start
        return _first_log_offset_at_or_after(offset, self.per_decade) == offset

    def first_at_or_after(self, step: int) -> int | None:
        offset = _first_log_offset_at_or_after(step - self.start, self.per_decade)
        candidate = self.start + offset
        return candidate if _in_window(candidate, self.start, self.stop) else None

    def until(self, end: int) -> Iterable[int]:
        end = end if self.stop is None else min(end, self.stop)
        if end <= self.start:
            return []
        points = {self.start}
        k = 0
        while (step := self.start + _log_point(k, self.per_decade)) < end:
            points.add(step)
            k += 1
        return sorted(points)


@dataclass(frozen=True)
class _At:
    steps: tuple[int, ...]  # sorted, distinct

    def contains(self, step: int) -> bool:
        i = bisect.bisect_left(self.steps, step)
        return i < len(self.steps) and self.steps[i] == step

    def first_at_or_after(self, step: int) -> int | None:
        i = bisect.bisect_left(self.steps, step)
        return self.steps[i] if i < len(self.steps) else None

    def until(self, end: int) -> Iterable[int]:
        return self.steps[: bisect.bisect_left(self.steps, end)]


@dataclass(frozen=True)
class _Custom:
    """A schedule whose subclass overrides the policy; a union must keep asking it."""

    schedule: Schedule

    def contains(self, step: int) -> bool:
        return self.schedule.should_run(step)

    def first_at_or_after(self, step: int) -> int | None:
        return self.schedule.next_step(step - 1)

    def until(self, end: int) -> Iterable[int]:
        return self.schedule.steps_until(end - 1) if end > 0 else []


# --------------------------------------------------------------------------------------------
# Validation: errors name the argument, the constraint and the value received.
# --------------------------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    # bool is an int subclass, but `every=True` is a bug, not "every step".
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_steps(steps: Any, start: int, stop: int | None) -> tuple[int, ...]:
    if isinstance(steps, (str, bytes)) or not isinstance(steps, Iterable):
        raise ValueError(f"Expected argument `steps` to be a list of ints but got {steps!r}")
    steps = list(steps)
    if not steps:
        raise ValueError("Expected argument `steps` to list at least one step but got []")
    for step in steps:
        if not _is_int(step) or step < 0:
            raise ValueError(
                f"Expected argument `steps` to contain only non-negative ints but got {step!r}"
                f" in {steps!r}"
            )
        if not _in_window(step, start, stop):
            raise ValueError(
                f"Expected argument `steps` to lie in [start, stop) = [{start}, {stop}) but got"
                f" {step!r}"
            )
    return tuple(sorted({int(step) for step in steps}))


# --------------------------------------------------------------------------------------------
# The public policy object.
# --------------------------------------------------------------------------------------------


class Schedule:
    r"""The training steps at which a monitor runs.

    The union of the rules given; with no rule given, the default log-spaced schedule
    (``log_per_decade=8``). All rules are anchored at ``start`` and confined to
    ``[start, stop)``; explicit ``steps`` are absolute and must lie in that window.

    The log-spaced rule fires at ``start`` and at ``start + t`` for every distinct

    .. math::

        t_k = \operatorname{round}\left(10^{k/d}\right), \qquad k = 0, 1, 2, \dots

    with :math:`d` = ``log_per_decade``: every step while :math:`10^{k/d}` grows by less than
    one per ``k``, then at most :math:`d` steps per decade, evenly spaced in :math:`\log t`.
    This is the spacing the stage analyses of Hoogland et al. (2024) smooth over.

    A subclass can override :meth:`should_run` to change the policy (e.g. skip steps during a
    warm-up phase); :meth:`steps_until` and :meth:`next_step` then honour the override by
    asking it step by step (O(steps scanned)); override them too if that is too slow.

    Args:
        every: Run every ``every`` steps, starting at ``start``.
        log_per_decade: Run at ``log_per_decade`` log-spaced steps per decade after ``start``.
        steps: Run at these (absolute) steps.
        start: The first step at which the schedule may fire; the rules are anchored here.
        stop: The schedule never fires at ``stop`` or later (``None``: no end).

    Raises:
        ValueError: An argument has the wrong type or range (``every`` and ``log_per_decade``
            must be positive ints, ``start`` and ``steps`` non-negative ints with ``steps`` in
            ``[start, stop)``, ``stop`` larger than ``start``).

    Example:
        >>> schedule = Schedule(every=100, log_per_decade=2)
        >>> schedule.steps_until(350)
        [0, 1, 3, 10, 32, 100, 200, 300, 316]
        >>> schedule.should_run(316), schedule.next_step(316)
        (True, 400)
        >>> Schedule(every=10, start=5, stop=40).steps_until(100)
        [5, 15, 25, 35]
    """

    #: How far :meth:`next_step` scans for a subclass that overrides :meth:`should_run`.
    scan_limit: int = 1_000_000

    def __init__(
        self,
        *,
        every: int | None = None,
        log_per_decade: int | None = None,
        steps: Sequence[int] | None = None,
        start: int = 0,
        stop: int | None = None,
    ) -> None:
        start = check_int("start", start, minimum=0)
        if stop is not None and (not _is_int(stop) or stop <= start):
            raise ValueError(
                f"Expected argument `stop` to be None or an int greater than `start` ({start})"
                f" but got {stop!r}"
            )
        if every is None and log_per_decade is None and steps is None:
            log_per_decade = DEFAULT_LOG_PER_DECADE
        rules: list[_Rule] = []
        if every is not None:
            rules.append(_Every(check_int("every", every, minimum=1), start, stop))
        if log_per_decade is not None:
            per_decade = check_int("log_per_decade", log_per_decade, minimum=1)
            rules.append(_LogSpaced(per_decade, start, stop))
        if steps is not None:
            rules.append(_At(_check_steps(steps, start, stop)))
        self._rules: tuple[_Rule, ...] = tuple(rules)

    # -- readable constructors ------------------------------------------------------------

    @classmethod
    def every_n(cls, n: int, *, start: int = 0, stop: int | None = None) -> Schedule:
        """Run every ``n`` steps: ``start, start + n, ...``."""
        return cls(every=n, start=start, stop=stop)

    @classmethod
    def log_spaced(
        cls, per_decade: int = DEFAULT_LOG_PER_DECADE, *, start: int = 0, stop: int | None = None
    ) -> Schedule:
        """Run at ``per_decade`` log-spaced steps per decade (dense early, sparse late)."""
        return cls(log_per_decade=per_decade, start=start, stop=stop)

    @classmethod
    def at(cls, steps: Sequence[int]) -> Schedule:
        """Run exactly at ``steps``."""
        return cls(steps=steps)

    @classmethod
    def union(cls, *schedules: Schedule) -> Schedule:
        """A schedule that runs whenever any of ``schedules`` runs (also ``a | b``).

        Plain schedules merge into one; a subclass that overrides :meth:`should_run` keeps
        being asked, so its policy survives the union.

        Raises:
            ValueError: No schedule given, or one that is not a :class:`Schedule`.
        """
        if not schedules:
            raise ValueError("Expected argument `schedules` to hold at least one Schedule")
        rules: list[_Rule] = []
        for schedule in schedules:
            if not isinstance(schedule, Schedule):
                raise ValueError(
                    f"Expected argument `schedules` to hold only Schedules but got {schedule!r}"
                )
            rules.extend(schedule._rules if _is_plain(schedule) else [_Custom(schedule)])
        union = Schedule.__new__(Schedule)
        union._rules = _canonical(rules)
        return union

    def __or__(self, other: object) -> Schedule:
        if not isinstance(other, Schedule):
            return NotImplemented
        return Schedule.union(self, other)

    # -- the policy -----------------------------------------------------------------------

    def should_run(self, step: int) -> bool:
        """Whether the monitor runs at ``step``; the decision subclasses may override.

        O(1) per call for every rule (a bisection for explicit steps), so it can be asked at
        every training step.
        """
        return any(rule.contains(step) for rule in self._rules)

    def next_step(self, after: int) -> int | None:
        """The first step strictly after ``after`` at which the schedule runs.

        Args:
            after: A step; ``-1`` asks for the very first step.

        Returns:
            The step, or ``None`` when the schedule never runs again (it has a ``stop``, or a
            subclass's :meth:`should_run` declines all of the next :attr:`scan_limit` steps).
        """
        first = max(after + 1, 0)
        if not _is_plain(self):
            return next(
                (s for s in range(first, first + self.scan_limit) if self.should_run(s)),
                None,
            )
        candidates = [rule.first_at_or_after(first) for rule in self._rules]
        return min((c for c in candidates if c is not None), default=None)

    def steps_until(self, max_step: int) -> list[int]:
        """All steps up to and including ``max_step`` at which the schedule runs, sorted.

        Use it in ``setup`` to check that a monitor runs at all before ``trainer.max_steps``
        (or, cheaper when the list could be long, compare ``next_step(-1)`` with it).

        Raises:
            ValueError: ``max_step`` is not a non-negative int.
        """
        max_step = check_int("max_step", max_step, minimum=0)
        if not _is_plain(self):
            return [step for step in range(max_step + 1) if self.should_run(step)]
        steps: set[int] = set()
        for rule in self._rules:
            steps.update(rule.until(max_step + 1))
        return sorted(steps)

    # -- value semantics --------------------------------------------------------------------

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, Schedule)
        return set(_canonical(self._rules)) == set(_canonical(other._rules))

    def __hash__(self) -> int:
        return hash((type(self), frozenset(_canonical(self._rules))))

    def __repr__(self) -> str:
        name = type(self).__name__
        single = _as_constructor_args(self._rules)
        if single is not None:
            return f"{name}({_format_args(single)})"
        parts = ", ".join(_format_rule(rule) for rule in self._rules)
        return f"Schedule.union({parts})"


def _is_plain(schedule: Schedule) -> bool:
    """Whether ``schedule`` uses the built-in policy, so that its rules can answer for it."""
    return type(schedule).should_run is Schedule.should_run


def _canonical(rules: Iterable[_Rule]) -> tuple[_Rule, ...]:
    """Merge explicit steps into one rule and drop duplicates, keeping first-seen order."""
    others: list[_Rule] = []
    explicit: set[int] = set()
    for rule in rules:
        if isinstance(rule, _At):
            explicit.update(rule.steps)
        elif rule not in others:
            others.append(rule)
    return (*others, _At(tuple(sorted(explicit)))) if explicit else tuple(others)


def _as_constructor_args(rules: Sequence[_Rule]) -> dict[str, Any] | None:
    """The keyword arguments of one ``Schedule(...)`` equal to ``rules``, if there is one."""
    every = [r for r in rules if isinstance(r, _Every)]
    logs = [r for r in rules if isinstance(r, _LogSpaced)]
    explicit = [r for r in rules if isinstance(r, _At)]
    if len(every) > 1 or len(logs) > 1 or len(explicit) > 1:
        return None
    if any(isinstance(r, _Custom) for r in rules):
        return None
    windows = {(r.start, r.stop) for r in [*every, *logs]}
    if len(windows) > 1:
        return None
    start, stop = windows.pop() if windows else (0, None)
    steps = explicit[0].steps if explicit else ()
    if not all(_in_window(s, start, stop) for s in steps):
        return None
    args: dict[str, Any] = {}
    if every:
        args["every"] = every[0].n
    # `log_per_decade` must be written out unless it is the only rule: `Schedule()` would
    # silently add the default log-spaced rule otherwise.
    if logs and (every or steps or logs[0].per_decade != DEFAULT_LOG_PER_DECADE):
        args["log_per_decade"] = logs[0].per_decade
    if steps:
        args["steps"] = list(steps)
    if start != 0:
        args["start"] = start
    if stop is not None:
        args["stop"] = stop
    return args


def _format_args(args: dict[str, Any]) -> str:
    return ", ".join(f"{key}={value!r}" for key, value in args.items())


def _format_rule(rule: _Rule) -> str:
    if isinstance(rule, _Custom):
        return repr(rule.schedule)
    args = _as_constructor_args([rule])
    assert args is not None, "a single plain rule is always one constructor call"
    return f"Schedule({_format_args(args)})"


def fire(schedule: Schedule, step: int, next_due: int | None) -> tuple[bool, int | None]:
    """Whether a monitor runs at ``step``, and its next due step afterwards.

    A monitor runs at the *first step it sees at or after* each scheduled step, once. The
    steps it sees need not be consecutive: ``trainer.global_step`` moves by two per batch
    under manual optimization with two optimizers (and by more after a resume from a
    checkpoint), so asking :meth:`Schedule.should_run` of each seen step would skip every
    scheduled step that falls in between. With the pointer ``next_due`` (the first scheduled
    step not yet served; ``schedule.next_step(-1)`` for a fresh run, None when the schedule
    is exhausted) the decision is ``step >= next_due``; after running, the pointer moves to
    the first scheduled step *after* ``step``, so the scheduled steps that were jumped over
    are served by this one run, not by a burst of catch-up runs.

    Args:
        schedule: the policy.
        step: the step seen now (call once per distinct step).
        next_due: the pointer before this step.

    Returns:
        ``(run, next_due)``: run now or not, and the pointer to keep.

    Example:
        >>> s = Schedule.at([0, 1, 3, 5])
        >>> due, seen = s.next_step(-1), []
        >>> for step in range(0, 8, 2):  # global_step under two optimizers
        ...     run, due = fire(s, step, due)
        ...     seen += [step] if run else []
        >>> seen
        [0, 2, 4, 6]
    """
    if next_due is None or step < next_due:
        return False, next_due
    return True, schedule.next_step(step)


def coerce(value: Schedule | Sequence[int] | int | None) -> Schedule:
    """Turn the shorthands a callback accepts for its ``schedule`` argument into a Schedule.

    Args:
        value: A :class:`Schedule` (returned as is); a list or tuple of steps
            (:meth:`Schedule.at`); an int ``n`` (:meth:`Schedule.every_n`); or ``None`` (the
            default log-spaced schedule).

    Returns:
        The schedule.

    Raises:
        ValueError: ``value`` is of none of these kinds, or is invalid for its kind.

    Example:
        >>> coerce(500)
        Schedule(every=500)
        >>> coerce(None) == Schedule.log_spaced()
        True
    """
    if isinstance(value, Schedule):
        return value
    try:
        if value is None:
            return Schedule()
        if _is_int(value):
            return Schedule.every_n(value)
        if isinstance(value, (list, tuple)):
            return Schedule.at(value)
    except ValueError as error:  # say which argument the user got wrong, then why
        raise ValueError(f"Invalid argument `schedule` = {value!r}: {error}") from error
    raise ValueError(
        "Expected argument `schedule` to be a Schedule, a list of steps, an int (run every n"
        f" steps) or None (log-spaced) but got {value!r}"
    )
