"""Argument validation shared by every module: one message format, one notion of a number.

Errors name the argument, the constraint and the value received. ``bool`` is never a number
here (``num_chains=True`` is a mistake, not one chain); numpy scalars are accepted and come
back as plain Python numbers, which checkpoints loaded with ``weights_only=True`` require.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Set
from typing import Any


def _int_kind(minimum: int) -> str:
    if minimum == 1:
        return "a positive int"
    if minimum == 0:
        return "a non-negative int"
    return f"an int >= {minimum}"


def _int_error(name: str, value: Any, minimum: int, *, optional: bool = False) -> ValueError:
    kind = ("None or " if optional else "") + _int_kind(minimum)
    return ValueError(
        f"Expected argument `{name}` to be {kind} but got {value!r}; it must be an integer "
        f">= {minimum}."
    )


def check_int(name: str, value: Any, *, minimum: int = 1) -> int:
    """``value`` as an ``int`` if it is an integer >= ``minimum``, else ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise _int_error(name, value, minimum)
    return int(value)


def check_optional_int(name: str, value: Any, *, minimum: int = 1) -> int | None:
    """None, or :func:`check_int`."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise _int_error(name, value, minimum, optional=True)
    return int(value)


def check_number(name: str, value: Any, *, minimum: float = 0.0, strict: bool = False) -> float:
    """``value`` as a ``float`` if it is a finite real > ``minimum`` (``strict``) or >= it."""
    ok = (
        not isinstance(value, bool)
        and isinstance(value, numbers.Real)
        and math.isfinite(value)
        and (value > minimum if strict else value >= minimum)
    )
    if not ok:
        bound = f"{'>' if strict else '>='} {float(minimum)}"
        kind = ("a positive" if strict else "a non-negative") if minimum == 0 else "a"
        raise ValueError(
            f"Expected argument `{name}` to be {kind} finite number but got {value!r}; it must "
            f"be a finite number {bound}."
        )
    return float(value)


def check_state(owner: str, state: Mapping[str, Any], expected: Set[str], version: int) -> None:
    """A checkpointed state has exactly the ``expected`` keys and this ``version``."""
    missing, unknown = expected - set(state), set(state) - expected
    if missing or unknown:
        raise ValueError(
            f"Expected a {owner} state with keys {sorted(expected)}; "
            f"missing {sorted(missing)}, unknown {sorted(unknown)}."
        )
    if state["version"] != version:
        raise ValueError(f"Expected {owner} state version {version} but got {state['version']!r}.")
