"""Schedule: checked against brute-force oracles built from the definitions."""

from __future__ import annotations

import itertools
import pickle

import pytest

from slt_callbacks.schedule import DEFAULT_LOG_PER_DECADE, Schedule, coerce, fire


def log_points(per_decade: int, end: int, start: int = 0) -> set[int]:
    """The definition, enumerated: start + {0} ∪ {round(10**(k/d)) : k ≥ 0}, below end."""
    points = {start}
    for k in itertools.count():
        step = start + round(10 ** (k / per_decade))
        if step >= end:
            return points
        points.add(step)


def brute_force(schedule: Schedule, end: int) -> list[int]:
    return [step for step in range(end) if schedule.should_run(step)]


# -- the default: log-spaced, dense early -------------------------------------------------------


def test_default_is_log_spaced_and_starts_dense():
    schedule = Schedule()
    assert schedule == Schedule.log_spaced() == Schedule(log_per_decade=DEFAULT_LOG_PER_DECADE)
    assert schedule.steps_until(100) == [0, 1, 2, 3, 4, 6, 7, 10, 13, 18, 24, 32, 42, 56, 75, 100]
    assert schedule.steps_until(100) == sorted(log_points(8, 101))


@pytest.mark.parametrize("per_decade", [1, 2, 3, 8, 16, 50])
def test_log_spaced_density_per_decade(per_decade):
    steps = Schedule.log_spaced(per_decade).steps_until(10**7)
    assert steps == sorted(set(steps)), "distinct and sorted"
    assert steps == sorted(log_points(per_decade, 10**7 + 1))
    for decade in range(7):
        low, high = 10**decade, 10 ** (decade + 1)
        count = sum(low <= step < high for step in steps)
        assert count <= per_decade
        # Beyond the integer-collision regime (consecutive points more than 2 apart), exactly
        # `per_decade` points fall in each decade.
        if low * (10 ** (1 / per_decade) - 1) > 2:
            assert count == per_decade, (decade, count)


def test_log_spaced_membership_is_cheap_at_huge_steps():
    # A list-building implementation would need 10**15 work here; this must be instant.
    schedule = Schedule.log_spaced(8)
    far = round(10 ** (120 / 8))  # 10**15
    assert schedule.should_run(far)
    assert not schedule.should_run(far + 1)
    assert schedule.next_step(far) == round(10 ** (121 / 8))


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"log_per_decade": 1},
        {"log_per_decade": 5, "start": 37},
        {"log_per_decade": 30, "stop": 900},
        {"every": 7},
        {"every": 50, "start": 3, "stop": 400},
        {"steps": [0, 9, 333, 1999]},
        {"every": 100, "log_per_decade": 4, "steps": [5, 55, 555]},
        {"every": 13, "log_per_decade": 3, "steps": [200], "start": 20, "stop": 1500},
    ],
)
def test_should_run_next_step_and_steps_until_agree_with_the_definition(kwargs):
    schedule = Schedule(**kwargs)
    end = 2000
    start, stop = kwargs.get("start", 0), kwargs.get("stop")
    window_end = end if stop is None else min(end, stop)
    expected: set[int] = set(kwargs.get("steps", []))
    if "every" in kwargs:
        expected |= set(range(start, window_end, kwargs["every"]))
    rules = ("every", "log_per_decade", "steps")
    per_decade = kwargs.get("log_per_decade", None if any(r in kwargs for r in rules) else 8)
    if per_decade is not None:
        expected |= log_points(per_decade, window_end, start)
    expected_list = sorted(expected)

    assert brute_force(schedule, end) == expected_list
    assert schedule.steps_until(end - 1) == expected_list
    for after in range(-1, end - 1):
        following = [s for s in expected_list if s > after]
        if following:  # beyond the last expected step within `end`, the oracle knows nothing
            assert schedule.next_step(after) == following[0], after


# -- every, explicit steps, windows --------------------------------------------------------------


def test_every_n_starts_at_start_and_respects_the_window():
    assert Schedule.every_n(10).steps_until(35) == [0, 10, 20, 30]
    assert Schedule(every=10, start=5, stop=30).steps_until(100) == [5, 15, 25]
    assert Schedule(every=10, stop=30).next_step(20) is None


def test_explicit_steps_are_sorted_and_deduplicated():
    schedule = Schedule.at([50, 5, 5, 17])
    assert schedule.steps_until(100) == [5, 17, 50]
    assert schedule.steps_until(17) == [5, 17]  # max_step is included
    assert (schedule.next_step(-1), schedule.next_step(5), schedule.next_step(50)) == (5, 17, None)
    assert schedule == Schedule(steps=(5, 17, 50))


def test_steps_until_includes_max_step_and_handles_zero():
    assert Schedule.every_n(10).steps_until(20) == [0, 10, 20]
    assert Schedule().steps_until(0) == [0]
    assert Schedule(every=10, start=5).steps_until(4) == []  # lets `setup` say "never runs"


def test_next_step_of_the_default():
    schedule = Schedule()
    assert [schedule.next_step(s) for s in (-1, 0, 1, 7, 8, 99)] == [0, 1, 2, 10, 10, 100]


# -- union ----------------------------------------------------------------------------------


def test_union_merges_compatible_rules():
    union = Schedule.every_n(1000) | Schedule.at([5, 50]) | Schedule.at([7])
    assert union == Schedule(every=1000, steps=[5, 7, 50])
    assert repr(union) == "Schedule(every=1000, steps=[5, 7, 50])"
    assert Schedule.union(Schedule(), Schedule.every_n(100)) == Schedule(
        every=100, log_per_decade=8
    )
    assert Schedule.every_n(10) | Schedule.every_n(10) == Schedule.every_n(10)


def test_union_of_incompatible_rules_runs_whenever_any_part_runs():
    parts = [Schedule.every_n(30), Schedule(every=100, start=50), Schedule.log_spaced(2)]
    union = Schedule.union(*parts)
    expected = sorted(set().union(*(p.steps_until(1000) for p in parts)))
    assert union.steps_until(1000) == expected == brute_force(union, 1001)
    assert union.next_step(30) == min(p.next_step(30) for p in parts)
    assert eval(repr(union)) == union  # repr: Schedule.union(Schedule(...), ...)
    assert union == Schedule.union(*reversed(parts))  # order does not matter


def test_union_rejects_what_is_not_a_schedule():
    with pytest.raises(ValueError, match="`schedules`"):
        Schedule.union()
    with pytest.raises(ValueError, match="`schedules` to hold only Schedules but got 5"):
        Schedule.union(Schedule(), 5)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Schedule() | 5  # type: ignore[operator]


# -- subclasses override the policy --------------------------------------------------------------


class SkipWarmup(Schedule):
    """Run as usual, but never during the first 100 steps."""

    def should_run(self, step: int) -> bool:
        return step >= 100 and super().should_run(step)


class AlsoEverySeventh(Schedule):
    """Adds steps the built-in rules know nothing of."""

    scan_limit = 50

    def should_run(self, step: int) -> bool:
        return step % 7 == 0 or super().should_run(step)


def test_a_subclass_overriding_should_run_is_honoured():
    skip = SkipWarmup(every=50)
    assert skip.steps_until(300) == [100, 150, 200, 250, 300]
    assert skip.next_step(0) == 100

    extra = AlsoEverySeventh(steps=[100])
    assert extra.steps_until(30) == [0, 7, 14, 21, 28]
    assert extra.next_step(98) == 100


def test_a_subclass_keeps_its_policy_inside_a_union():
    union = Schedule.union(SkipWarmup(every=50), Schedule.at([7]))
    assert union.steps_until(200) == [7, 100, 150, 200] == brute_force(union, 201)
    assert union.next_step(7) == 100
    assert repr(union) == "Schedule.union(SkipWarmup(every=50), Schedule(steps=[7]))"


def test_next_step_of_a_subclass_gives_up_after_scan_limit():
    class Never(Schedule):
        scan_limit = 1000

        def should_run(self, step: int) -> bool:
            return False

    assert Never().next_step(0) is None
    assert Never().steps_until(100) == []


# -- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"every": 0}, r"`every` to be a positive int but got 0"),
        ({"every": -5}, r"`every` to be a positive int but got -5"),
        ({"every": 2.5}, r"`every` to be a positive int but got 2.5"),
        ({"every": True}, r"`every` to be a positive int but got True"),
        ({"log_per_decade": 0}, r"`log_per_decade` to be a positive int but got 0"),
        ({"steps": []}, r"`steps` to list at least one step but got \[\]"),
        ({"steps": "123"}, r"`steps` to be a list of ints but got '123'"),
        ({"steps": 12}, r"`steps` to be a list of ints but got 12"),
        ({"steps": [3, -1]}, r"`steps` to contain only non-negative ints but got -1"),
        ({"steps": [1.5]}, r"`steps` to contain only non-negative ints but got 1.5"),
        ({"steps": [5], "start": 10}, r"`steps` to lie in \[start, stop\) = \[10, None\)"),
        ({"steps": [50], "stop": 50}, r"`steps` to lie in \[start, stop\) = \[0, 50\) but got 50"),
        ({"start": -1}, r"`start` to be a non-negative int but got -1"),
        ({"start": 10, "stop": 5}, r"`stop` to be None or an int greater than `start` \(10\)"),
        ({"start": 10, "stop": 10}, r"`stop` .* but got 10"),
        ({"stop": 0}, r"`stop` .* but got 0"),
        ({"stop": "100"}, r"`stop` .* but got '100'"),
    ],
)
def test_invalid_arguments_are_named_in_the_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Schedule(**kwargs)


def test_constructor_is_keyword_only():
    with pytest.raises(TypeError):
        Schedule(10)  # type: ignore[misc]


def test_steps_until_rejects_a_negative_max_step():
    # `trainer.max_steps == -1` means "no limit": the caller must not ask for steps until -1.
    with pytest.raises(ValueError, match="`max_step` to be a non-negative int but got -1"):
        Schedule().steps_until(-1)


# -- value semantics --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "schedule",
    [
        Schedule(),
        Schedule.log_spaced(3),
        Schedule(every=100, log_per_decade=8),
        Schedule(every=10, steps=[3, 4], start=2, stop=500),
        Schedule.at([0, 10]),
        Schedule.every_n(5) | Schedule(every=7, start=1),
    ],
)
def test_repr_round_trips_and_pickling_preserves_equality(schedule):
    assert eval(repr(schedule)) == schedule
    restored = pickle.loads(pickle.dumps(schedule))
    assert restored == schedule
    assert hash(restored) == hash(schedule)
    assert restored.steps_until(1000) == schedule.steps_until(1000)


def test_repr_shows_only_what_was_given():
    assert repr(Schedule()) == "Schedule()"
    assert repr(Schedule.every_n(50)) == "Schedule(every=50)"
    assert repr(Schedule(log_per_decade=8, steps=[3])) == "Schedule(log_per_decade=8, steps=[3])"
    assert repr(Schedule(every=10, start=5, stop=95)) == "Schedule(every=10, start=5, stop=95)"


def test_equality():
    assert Schedule.every_n(10) == Schedule(every=10)
    assert Schedule.every_n(10) != Schedule.every_n(20)
    assert Schedule.every_n(10) != Schedule(every=10, start=1)
    assert Schedule() != SkipWarmup()  # a subclass is a different policy
    assert Schedule() != "Schedule()"
    assert len({Schedule(), Schedule.log_spaced(8), Schedule.every_n(3)}) == 2


# -- coerce: the shorthands a callback's `schedule` argument accepts ----------------------------


def test_coerce_accepts_the_shorthands():
    schedule = Schedule.every_n(3)
    assert coerce(schedule) is schedule
    assert coerce(None) == Schedule()
    assert coerce(250) == Schedule.every_n(250)
    assert coerce([10, 1]) == coerce((1, 10)) == Schedule.at([1, 10])


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ("every 100", r"`schedule` to be a Schedule, .* but got 'every 100'"),
        (2.5, r"`schedule` to be a Schedule, .* but got 2.5"),
        (True, r"`schedule` to be a Schedule, .* but got True"),
        ({"every": 3}, r"`schedule` to be a Schedule, .* but got \{'every': 3\}"),
        (-3, r"`schedule` = -3: Expected argument `every` to be a positive int"),
        ([], r"`schedule` = \[\]: Expected argument `steps` to list at least one step"),
    ],
)
def test_coerce_names_the_argument_and_what_arrived(value, match):
    with pytest.raises(ValueError, match=match):
        coerce(value)


def test_schedule_is_configurable_from_yaml():
    """LightningCLI builds a Schedule from plain YAML through jsonargparse."""
    jsonargparse = pytest.importorskip("jsonargparse")
    parser = jsonargparse.ArgumentParser()
    parser.add_argument("--schedule", type=Schedule)
    config = parser.parse_string(
        "schedule:\n"
        "  class_path: slt_callbacks.schedule.Schedule\n"
        "  init_args: {every: 500, log_per_decade: 4, steps: [7, 77], stop: 100000}\n"
    )
    # `instantiate` replaced `instantiate_classes` in jsonargparse 4.49.
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    schedule = instantiate(config).schedule
    assert schedule == Schedule(every=500, log_per_decade=4, steps=[7, 77], stop=100_000)


def test_documented_default_matches():
    # The docstring of DEFAULT_LOG_PER_DECADE lists the first steps; keep it honest.
    first = Schedule().steps_until(32)
    assert first == [0, 1, 2, 3, 4, 6, 7, 10, 13, 18, 24, 32]


# -- firing on the steps a monitor actually sees (issue #8) -------------------------------------


def served(schedule: Schedule, seen: list[int]) -> list[int]:
    """The seen steps at which a monitor runs, by :func:`fire` with its pointer."""
    due, out = schedule.next_step(-1), []
    for step in seen:
        run, due = fire(schedule, step, due)
        out += [step] if run else []
    return out


def test_fire_serves_every_scheduled_step_when_global_step_moves_by_two():
    # Manual optimization with two optimizers: global_step 0, 2, 4, ... Asking should_run of
    # each seen step measured nothing of [1, 3, 5] (and [0] only once).
    seen = list(range(0, 30, 2))
    assert [s for s in seen if Schedule.at([1, 3, 5]).should_run(s)] == []  # the old rule
    assert served(Schedule.at([1, 3, 5]), seen) == [2, 4, 6]
    # The default log schedule lost 7 of its first 24 steps the old way (the odd ones: 1, 3,
    # 7, 13, 75, 133, 237); now each is served by the first seen step at or after it, once.
    default = Schedule()
    first_24 = default.steps_until(1000)
    assert len(first_24) == 24 and sum(s % 2 for s in first_24) == 7
    assert len([s for s in range(0, 1001, 2) if default.should_run(s)]) == 17  # the old rule
    runs = served(default, list(range(0, 1001, 2)))
    # Every scheduled step is served at most one step late (1 and 2 share the run at 2).
    assert all(any(t <= r <= t + 1 for r in runs) for t in first_24) and len(runs) == 22
    expected = sorted({min(s for s in seen if s >= t) for t in default.steps_until(24)})
    assert served(default, seen) == expected == [0, 2, 4, 6, 8, 10, 14, 18, 24]


def test_fire_runs_once_per_scheduled_step_and_absorbs_jumps():
    schedule = Schedule(every=10)
    # A jump over several scheduled steps (a resume, a big accumulation) runs once, not a
    # burst of catch-up measurements.
    assert served(schedule, [0, 1, 2, 35, 36, 40, 41]) == [0, 35, 40]
    # Consecutive steps: exactly the schedule.
    assert served(schedule, list(range(50))) == schedule.steps_until(49)
    # An exhausted schedule never fires again.
    assert fire(Schedule.at([3]), 10, None) == (False, None)
