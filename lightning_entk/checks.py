"""Checks of scalar arguments: one test for each kind of value, one form of message.

Every module validates its int and number arguments here, so that an argument is refused the
same way everywhere, with a message that names it, says what is allowed and shows what was
passed: ``"`window` must be an int >= 1, got 0."``. ``words`` phrases what is allowed
otherwise (``"a positive int"``) where an argument's message is known by those words.
"""

from __future__ import annotations

import math

import numpy as np


def check_int(
    name: str,
    value: object,
    minimum: int | None = 1,
    *,
    optional: bool = False,
    words: str | None = None,
) -> None:
    """Refuse ``value`` unless it is an int (a numpy integer too, never a bool) of at least
    ``minimum`` (any int when ``minimum`` is None), or None when ``optional``.

    Raises:
        ValueError: naming ``name``, the ints allowed (``words``, by default ``"an int >=
            minimum"``) and ``value``.
    """
    if optional and value is None:
        return
    if (
        isinstance(value, bool)
        or not isinstance(value, int | np.integer)
        or (minimum is not None and value < minimum)
    ):
        allowed = words or ("an int" if minimum is None else f"an int >= {minimum}")
        none = " or None" if optional else ""
        raise ValueError(f"`{name}` must be {allowed}{none}, got {value!r}.")


def check_number(
    name: str,
    value: object,
    low: float = 0.0,
    high: float = math.inf,
    interval: str = "()",
    *,
    words: str | None = None,
) -> None:
    """Refuse ``value`` unless it is a finite real number (an int, a float or a numpy scalar,
    never a bool) between ``low`` and ``high``, each bound included where ``interval`` (one of
    ``"()"``, ``"[)"``, ``"(]"``, ``"[]"``) has a bracket. By default, a positive number.

    Raises:
        ValueError: naming ``name``, the numbers allowed (``words``, by default ``"a number >
            low"`` or ``"a number in (low, high]"``) and ``value``.
    """
    number = isinstance(value, int | float | np.integer | np.floating) and not isinstance(
        value, bool
    )
    ok = number and math.isfinite(value)
    if ok:
        above = value >= low if interval[0] == "[" else value > low
        below = value <= high if interval[1] == "]" else value < high
        ok = above and below
    if not ok:
        if words is None and high == math.inf:
            words = f"a number {'>' if interval[0] == '(' else '>='} {low:g}"
        allowed = words or f"a number in {interval[0]}{low:g}, {high:g}{interval[1]}"
        raise ValueError(f"`{name}` must be {allowed}, got {value!r}.")
