"""The scalar checks every module's arguments go through."""

import math

import numpy as np
import pytest

from lightning_entk.checks import check_int, check_number


def test_check_int_takes_ints_and_numpy_ints_at_or_above_the_minimum():
    check_int("n", 1)
    check_int("n", np.int64(3))
    check_int("n", 0, 0)
    check_int("seed", -5, None)
    check_int("n", None, optional=True)


@pytest.mark.parametrize(
    ("value", "minimum", "options", "message"),
    [
        (0, 1, {}, "`n` must be an int >= 1, got 0."),
        (True, 1, {}, "`n` must be an int >= 1, got True."),
        (2.0, 1, {}, "`n` must be an int >= 1, got 2.0."),
        (1, 2, {}, "`n` must be an int >= 2, got 1."),
        ("3", None, {}, "`n` must be an int, got '3'."),
        (None, 1, {}, "`n` must be an int >= 1, got None."),
        (0, 1, {"words": "a positive int"}, "`n` must be a positive int, got 0."),
        (0, 1, {"optional": True}, "`n` must be an int >= 1 or None, got 0."),
    ],
)
def test_check_int_names_the_argument_the_ints_allowed_and_the_value(
    value, minimum, options, message
):
    with pytest.raises(ValueError) as raised:
        check_int("n", value, minimum, **options)
    assert str(raised.value) == message


def test_check_number_takes_finite_numbers_within_the_interval():
    check_number("x", 0.5)
    check_number("x", np.float32(1.0), 0, 1, "(]")
    check_number("x", 0, 0, 1, "[)")
    check_number("x", 3, 1)


@pytest.mark.parametrize(
    ("value", "bounds", "options", "message"),
    [
        (0.0, (), {}, "`x` must be a number > 0, got 0.0."),
        (-1, (0, math.inf, "[)"), {}, "`x` must be a number >= 0, got -1."),
        (1.5, (0, 1, "(]"), {}, "`x` must be a number in (0, 1], got 1.5."),
        (1, (0, 1, "[)"), {}, "`x` must be a number in [0, 1), got 1."),
        (math.nan, (), {}, "`x` must be a number > 0, got nan."),
        (math.inf, (), {}, "`x` must be a number > 0, got inf."),
        (True, (), {}, "`x` must be a number > 0, got True."),
        ("1", (), {}, "`x` must be a number > 0, got '1'."),
        (0, (), {"words": "a positive number"}, "`x` must be a positive number, got 0."),
    ],
)
def test_check_number_names_the_argument_the_numbers_allowed_and_the_value(
    value, bounds, options, message
):
    with pytest.raises(ValueError) as raised:
        check_number("x", value, *bounds, **options)
    assert str(raised.value) == message
