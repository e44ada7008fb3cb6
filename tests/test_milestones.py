import math
import warnings

import numpy as np
import pytest

from lightning_entk.milestones import first_epoch_reaching, nearest_rank

# --------------------------------------------------------------------------------------------
# first_epoch_reaching


def test_first_epoch_reaching_returns_first_epoch_at_or_above_level():
    epochs = np.array([0, 2, 4, 6, 8])
    values = np.array([0.1, 0.3, 0.5, 0.4, 0.97])
    assert first_epoch_reaching(epochs, values, 0.5) == 4  # equal to the level counts
    assert first_epoch_reaching(epochs, values, 0.95) == 8
    assert first_epoch_reaching(epochs, values, 0.0) == 0


def test_first_epoch_reaching_returns_none_when_never_reached():
    assert first_epoch_reaching([0, 1, 2], [0.1, 0.2, 0.3], 0.31) is None


def test_first_epoch_reaching_empty_series_is_none():
    assert first_epoch_reaching([], [], 0.5) is None
    assert first_epoch_reaching(np.array([], dtype=int), np.array([]), -math.inf) is None


def test_first_epoch_reaching_nan_values_never_count():
    values = [math.nan, math.nan, 0.7]
    assert first_epoch_reaching([0, 1, 2], values, 0.5) == 2
    assert first_epoch_reaching([0, 1, 2], values, -math.inf) == 2
    assert first_epoch_reaching([0, 1], [math.nan, math.nan], -math.inf) is None


def test_first_epoch_reaching_nan_level_is_never_reached():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert first_epoch_reaching([0, 1], [0.5, math.inf], math.nan) is None


def test_first_epoch_reaching_tie_smallest_epoch_wins_whatever_the_order():
    assert first_epoch_reaching([10, 20, 30], [0.9, 0.9, 0.9], 0.5) == 10
    assert first_epoch_reaching([30, 10, 20], [0.9, 0.9, 0.1], 0.5) == 10
    assert first_epoch_reaching([5, 5], [0.2, 0.8], 0.5) == 5  # a repeated epoch


def test_first_epoch_reaching_returns_python_int():
    epoch = first_epoch_reaching(np.arange(3, dtype=np.int64), np.array([0.0, 1.0, 1.0]), 1.0)
    assert epoch == 1 and type(epoch) is int


def test_first_epoch_reaching_values_indexed_by_completed_epochs():
    """The reproduction's use: validation accuracy indexed by epoch, NaN at initialization."""
    val_acc = np.concatenate([[math.nan], np.linspace(0.0, 1.0, 11)])
    assert first_epoch_reaching(np.arange(len(val_acc)), val_acc, 0.5) == 6


def test_first_epoch_reaching_rejects_mismatched_or_nested_series():
    with pytest.raises(ValueError, match="same length"):
        first_epoch_reaching([0, 1, 2], [0.1, 0.2], 0.5)
    with pytest.raises(ValueError, match="1-D"):
        first_epoch_reaching([[0, 1]], [[0.1, 0.2]], 0.5)


# --------------------------------------------------------------------------------------------
# nearest_rank


def test_nearest_rank_returns_closest_rank_within_tolerance():
    assert nearest_rank([57, 111, 300], 113, tolerance=2) == 111
    assert nearest_rank([57, 110, 116, 300], 113, tolerance=5) == 110  # a tie, see below
    assert nearest_rank([57, 109, 114], 113, tolerance=5) == 114
    assert nearest_rank([110, 112], 113, tolerance=5) == 112


def test_nearest_rank_tolerance_is_inclusive():
    assert nearest_rank([115], 113, tolerance=2) == 115
    assert nearest_rank([116], 113, tolerance=2) is None
    assert nearest_rank([110], 113, tolerance=2) is None


def test_nearest_rank_zero_tolerance_matches_only_the_target():
    assert nearest_rank([112, 113, 114], 113, tolerance=0) == 113
    assert nearest_rank([112, 114], 113, tolerance=0) is None


def test_nearest_rank_none_when_empty_or_nothing_near():
    assert nearest_rank([], 113, tolerance=2) is None
    assert nearest_rank(np.array([], dtype=int), 57, tolerance=100) is None
    assert nearest_rank([57], 113, tolerance=2) is None


def test_nearest_rank_tie_lower_rank_wins_whatever_the_order():
    assert nearest_rank([111, 115], 113, tolerance=2) == 111
    assert nearest_rank([115, 111], 113, tolerance=2) == 111
    assert nearest_rank([115, 113, 111], 113, tolerance=2) == 113  # exact beats the tie


def test_nearest_rank_is_the_same_cliff_rule():
    """``nearest_rank([a], b, t)`` is not None exactly when ``abs(a - b) <= t``, both ways."""
    for a in range(0, 12):
        for b in range(0, 12):
            for t in range(0, 4):
                same = abs(a - b) <= t
                assert (nearest_rank([a], b, t) is not None) == same
                assert (nearest_rank([b], a, t) is not None) == same


def test_nearest_rank_accepts_numpy_ranks_and_returns_python_int():
    rank = nearest_rank(np.array([21, 40]), 41, tolerance=2)
    assert rank == 40 and type(rank) is int


def test_nearest_rank_rejects_negative_tolerance():
    with pytest.raises(ValueError, match="non-negative"):
        nearest_rank([57], 57, tolerance=-1)
