"""The forecast of the epoch of generalisation, on series whose answer is known."""

import math

import numpy as np
import pytest

from lightning_entk.forecast import TARGET, forecast


def test_forecast_of_exponential_growth_is_where_it_reaches_the_target():
    epochs = np.arange(0, 501, 5)
    alignment = -0.011 + 0.002 * np.exp(epochs / 150)  # the floor -0.009 at epoch 0
    made = forecast(epochs, alignment, now=450)
    floor = alignment[0] - 1e-3
    # excess(t) = 0.001 + 0.002 (exp(t / 150) - 1); solved for excess = TARGET - floor
    truth = 150 * math.log(((TARGET - floor) - 0.001) / 0.002 + 1)
    assert made.epoch == pytest.approx(truth, rel=0.05)
    assert made.low <= made.epoch <= made.high


def test_forecast_of_power_law_growth_takes_the_power_law():
    epochs = np.arange(1, 101)
    alignment = -0.04 + 2e-5 * epochs**2.2  # the modular MLP's shape
    made = forecast(epochs, alignment, now=60)
    truth = ((TARGET + 0.04) / 2e-5) ** (1 / 2.2)
    assert made.epoch == pytest.approx(truth, rel=0.05)


def test_forecast_says_nothing_is_coming_on_a_plateau_or_without_a_rise():
    epochs = np.arange(0, 301)
    rise_then_plateau = np.minimum(-0.04 + 0.0015 * epochs, 0.08)  # a control's alignment
    assert forecast(epochs, rise_then_plateau, now=60).epoch is not None  # rising: coming
    later = forecast(epochs, rise_then_plateau, now=300)
    assert later.epoch is None and "not growing" in later.basis
    flat = forecast(epochs, np.full(301, -0.01), now=200)
    assert flat.epoch is None and flat.low is None


def test_forecast_needs_readings_and_is_now_once_the_target_is_reached():
    assert forecast([0, 1], [0.0, 0.1], now=1).epoch is None
    reached = forecast([0, 1, 2, 3], [0.0, 0.1, 0.2, 0.25], now=3)
    assert (reached.epoch, reached.low, reached.high) == (3, 3, 3)


def test_forecast_ignores_readings_after_now():
    epochs = np.arange(0, 101)
    alignment = -0.01 + 0.001 * np.exp(epochs / 20)
    assert forecast(epochs, alignment, now=50) == forecast(epochs[:51], alignment[:51], now=50)
