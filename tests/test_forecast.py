"""The forecast of the epoch of generalisation, on series whose answer is known, and its
abstentions: where the readings cannot say, it says nothing rather than something wrong."""

import math

import numpy as np
import pytest

from lightning_entk.forecast import FLOOR_MARGIN, MIN_TRAIN, SPREAD, TARGET_SHARE, forecast

TRAINED = 0.3  # a training alignment held fixed: the level is TARGET_SHARE * TRAINED


def flat(n, value=TRAINED):
    return np.full(n, value)


def test_forecast_of_exponential_growth_is_where_it_reaches_its_share_of_the_training_level():
    epochs = np.arange(0, 501, 5)
    alignment = -0.011 + 0.002 * np.exp(epochs / 150)  # the floor -0.009 at epoch 0
    made = forecast(epochs, alignment, flat(len(epochs)), now=450)
    floor = alignment[0] - FLOOR_MARGIN
    # excess(t) = 0.001 + 0.002 (exp(t / 150) - 1); solved for excess = target - floor
    target = TARGET_SHARE * TRAINED
    truth = 150 * math.log(((target - floor) - 0.001) / 0.002 + 1)
    assert made.epoch == pytest.approx(truth, rel=0.05)
    assert 450 < made.low < made.epoch < made.high


def test_forecast_level_follows_the_run_s_own_training_alignment():
    """The same held-out growth reaches a lower level sooner: the level is a share of the
    training alignment, not a fixed alignment."""
    epochs = np.arange(1, 101)
    alignment = -0.04 + 2e-5 * epochs**2.2  # the modular MLP's shape
    high = forecast(epochs, alignment, flat(100, 0.6), now=60)
    low = forecast(epochs, alignment, flat(100, 0.3), now=60)
    for trained, made in ((0.6, high), (0.3, low)):
        truth = ((TARGET_SHARE * trained + 0.04) / 2e-5) ** (1 / 2.2)
        assert made.epoch == pytest.approx(truth, rel=0.05)
    assert low.epoch < high.epoch


def test_forecast_interval_widens_with_the_length_of_the_extrapolation():
    epochs = np.arange(0, 301)
    alignment = -0.01 + 0.001 * np.exp(epochs / 60)
    near = forecast(epochs, alignment, flat(301), now=280)
    far = forecast(epochs, alignment, flat(301), now=240)
    for made in (near, far):
        ahead = made.epoch - made.made_at
        assert made.low <= made.made_at + ahead / SPREAD
        assert made.high >= made.made_at + ahead * SPREAD
    assert far.high - far.low > near.high - near.low > 0


def test_forecast_abstains_on_a_plateau_or_without_a_rise():
    epochs = np.arange(0, 301)
    rise_then_plateau = np.minimum(-0.04 + 0.0015 * epochs, 0.08)  # a control's alignment
    assert forecast(epochs, rise_then_plateau, flat(301), now=60).epoch is not None
    later = forecast(epochs, rise_then_plateau, flat(301), now=300)
    assert later.epoch is None and later.low is None and later.high is None
    constant = forecast(epochs, np.full(301, -0.01), flat(301), now=200)
    assert constant.epoch is None and constant.low is None and constant.high is None


def test_forecast_abstains_from_a_signal_past_its_level_at_the_start():
    """Features aligned with the labels from the first reading (natural data from a large
    initialization): the readings cannot say when the network catches up."""
    epochs = np.arange(0, 200)
    aligned = 0.45 + 0.0005 * epochs  # above TARGET_SHARE * TRAINED throughout, and rising
    made = forecast(epochs, aligned, flat(200), now=150)
    assert made.epoch is None and "at the start" in made.basis


def test_forecast_never_names_an_epoch_at_or_before_now():
    epochs = np.arange(0, 101)
    reached = -0.05 + 0.003 * epochs
    crossing = (TARGET_SHARE * TRAINED + 0.05) / 0.003  # where it reaches its level
    for now in (math.ceil(crossing), 100):
        made = forecast(epochs, reached, flat(101), now=now)
        assert made.epoch is None and "already" in made.basis
    made = [forecast(epochs, reached, flat(101), now=now) for now in range(20, int(crossing))]
    assert sum(m.epoch is not None for m in made) > 10
    for m in made:
        if m.epoch is not None:
            assert m.made_at < m.low < m.epoch < m.high


def test_forecast_needs_readings_and_a_training_alignment():
    assert forecast([0, 1], [0.0, 0.1], [0.3, 0.3], now=1).epoch is None
    epochs = np.arange(0, 50)
    rising = -0.01 + 0.0001 * epochs**2
    below = forecast(epochs, rising, flat(50, MIN_TRAIN / 2), now=49)
    assert below.epoch is None and "no level" in below.basis


def test_forecast_ignores_readings_after_now():
    epochs = np.arange(0, 101)
    alignment = -0.01 + 0.001 * np.exp(epochs / 20)
    trained = flat(101)
    assert forecast(epochs, alignment, trained, now=50) == forecast(
        epochs[:51], alignment[:51], trained[:51], now=50
    )
