"""The early-warning detector on hand-made evaluation histories: each signal fires exactly when its
rule says, once per run, and its state survives a round trip."""

import copy

import numpy as np
import pytest

from lightning_entk.cliffs import Cliff
from lightning_entk.early_warning import EarlyWarning, EvaluationRecord
from lightning_entk.monitor.sentinel import Reading


def record(epoch, cliffs=(), kr=None, velocity=None, **metrics):
    if kr is not None:
        metrics["entk/kernel_regression_acc"] = kr
    if velocity is not None:
        metrics["entk/kernel_velocity"] = velocity
    return EvaluationRecord(
        epoch=epoch,
        step=10 * epoch,
        eigenvalues=np.array([3.0, 2.0, 1.0]),
        cliffs=[Cliff(rank=r, drop=0.1) for r in cliffs],
        metrics=metrics,
    )


def kinds(detector, records):
    return [(t.epoch, t.kind) for r in records for t in detector.update(r)]


def test_regression_lead_needs_both_the_rise_and_the_lead():
    detector = EarlyWarning(lead_rise=0.2, lead_margin=0.2)
    history = [
        record(0, kr=0.05),  # the starting level
        record(1, kr=0.2, val_acc=0.0),  # risen by 0.15 only
        record(2, kr=0.4, val_acc=0.3),  # leads by 0.1 only
        record(3, kr=0.6, val_acc=0.3),  # both hold
        record(4, kr=0.9, val_acc=0.1),  # raised once only
    ]
    assert kinds(detector, history) == [(3, "kernel_regression_lead")]
    assert detector.update(record(5, kr=0.9)) == []


def test_regression_lead_is_judged_against_the_start_not_chance():
    """A kernel that predicts from initialization (the modular transformer's, which predicts
    (a, b) from its trained swap (b, a)) has not risen: no alarm however far it leads."""
    detector = EarlyWarning()
    history = [record(0, kr=0.51)] + [record(e, kr=0.51, val_acc=0.02) for e in (20, 40, 60)]
    assert kinds(detector, history) == []


def test_regression_lead_without_an_accuracy_key_judges_the_rise_only():
    detector = EarlyWarning(accuracy_key=None)
    history = [record(0, kr=0.0), record(1, kr=0.1), record(2, kr=0.25, val_acc=0.9)]
    (transition,) = [t for r in history for t in detector.update(r)]
    assert (transition.epoch, transition.evidence) == (
        2,
        {"kernel_regression_acc": 0.25, "rise": 0.25},
    )


def test_regression_lead_silent_without_kernel_regression():
    detector = EarlyWarning()
    assert kinds(detector, [record(e, val_acc=0.0) for e in range(5)]) == []


def reading(epoch, held, trained):
    """A sentinel reading: no cliffs, the readout's alignments."""
    metrics = {
        "entk/sentinel/heldout_alignment": held,
        "entk/sentinel/train_alignment": trained,
    }
    return Reading(epoch=epoch, step=10 * epoch, metrics=metrics)


def test_alignment_ratio_fires_when_held_out_alignment_reaches_a_quarter_of_the_trained():
    detector = EarlyWarning(alignment_ratio=0.25, min_train_alignment=0.1)
    detector.readout_group = "unembed"
    readings = [
        reading(0, -0.04, -0.04),  # initialization: nothing fitted
        reading(10, 0.02, 0.05),  # a ratio of 0.4, but the training alignment is below 0.1
        reading(20, 0.02, 0.2),  # 0.1
        reading(30, 0.049, 0.2),  # just below
        reading(40, 0.05, 0.2),  # a quarter
        reading(50, 0.2, 0.3),  # raised once only
    ]
    raised = [t for r in readings for t in detector.update(r)]
    assert [(t.epoch, t.kind, t.group) for t in raised] == [(40, "alignment_ratio", "unembed")]
    assert raised[0].evidence == {"heldout_alignment": 0.05, "train_alignment": 0.2, "ratio": 0.25}
    assert "alignment_ratio of group 'unembed'" in raised[0].describe()


def test_alignment_ratio_is_silent_for_features_that_carry_over_from_the_start():
    """A pretrained readout, its held-out alignment a large share of the trained one from the
    first reading, has nothing coming: no alarm unless the ratio first falls below the level."""
    detector = EarlyWarning()
    assert kinds(detector, [reading(e, 0.3, 0.4) for e in range(5)]) == []
    assert kinds(detector, [reading(5, 0.05, 0.4), reading(6, 0.3, 0.4)]) == [
        (6, "alignment_ratio")
    ]


def test_alignment_ratio_counts_from_a_low_training_alignment_by_default():
    """With two classes, or cross-entropy over many, the training alignment stays under 0.1
    until the network generalises (docs/early_warning.md): the default floor lets the ratio
    count from 0.02, and not below it, where a ratio is noise."""
    detector = EarlyWarning()
    readings = [
        reading(0, -0.004, 0.007),  # under the floor: a ratio of -0.6 means nothing
        reading(50, -0.005, 0.03),  # below the level
        reading(100, 0.004, 0.028),  # 0.14
        reading(150, 0.008, 0.03),  # 0.27: raised
    ]
    assert kinds(detector, readings) == [(150, "alignment_ratio")]
    quiet = EarlyWarning()
    assert kinds(quiet, [reading(e, 0.009, 0.015) for e in range(0, 200, 50)]) == []


def test_alignment_ratio_reads_sentinel_readings_beside_full_evaluations():
    """Full evaluations (with cliffs, without the sentinel's keys) and readings interleave; the
    cliff and velocity rules read only the former, the ratio only the latter."""
    detector = EarlyWarning(persistence=1, velocity_factor=2.0, warmup=1)
    history = [
        record(0, (57,), velocity=None),
        reading(1, 0.0, 0.2),
        record(2, (57,), velocity=0.1),
        reading(3, 0.0, 0.2),
        record(4, (57,), velocity=0.1),
        reading(5, 0.1, 0.2),
    ]
    assert kinds(detector, history) == [(5, "alignment_ratio")]


def test_new_cliff_must_persist_and_be_new():
    detector = EarlyWarning(persistence=2, rank_tolerance=2)
    ranks = [(57,), (57,), (57, 113), (57, 112), (57,), (58, 113), (57, 114), (57, 113)]
    raised = [t for e, r in enumerate(ranks) for t in detector.update(record(e, r))]
    assert [(t.epoch, t.kind, t.evidence["rank"]) for t in raised] == [(7, "new_cliff", 113.0)]
    assert (raised[0].evidence["epochs"], raised[0].evidence["evaluations"]) == (2, 3)


def test_rules_are_in_epochs_and_steps_not_evaluations():
    """Under the uneven spacing of a time budget: a new cliff seen at two evaluations 20 epochs
    apart has persisted; velocities that grow with the gap between evaluations are no jump."""
    detector = EarlyWarning(persistence=4, warmup=2, velocity_factor=5.0)
    epochs = [0, 1, 2, 4, 24, 25, 65]
    velocity = {1: 0.01, 2: 0.01, 4: 0.02, 24: 0.2, 25: 0.01, 65: 0.4}
    history = [record(e, (57, 113) if e >= 4 else (57,), velocity=velocity.get(e)) for e in epochs]
    assert kinds(detector, history) == [(24, "new_cliff")]


def test_velocity_jump_after_warmup():
    detector = EarlyWarning(velocity_factor=5.0, warmup=3)
    velocities = [1.0, 9.0, 1.0, 1.2, 0.9, 1.1, 6.0, 50.0]  # the early 9 is within the warmup
    history = [record(e, velocity=v) for e, v in enumerate(velocities)]
    assert kinds(detector, history) == [(6, "kernel_velocity")]


def test_velocity_jump_is_off_by_default():
    velocities = [1.0] * 8 + [100.0]
    history = [record(e, velocity=v) for e, v in enumerate(velocities)]
    assert kinds(EarlyWarning(), history) == []


def test_state_round_trip_continues_where_it_left_off():
    detector = EarlyWarning(persistence=1)
    for e, ranks in enumerate([(57,), (57, 113)]):
        detector.update(record(e, ranks))
    resumed = EarlyWarning(persistence=1)
    resumed.load_state_dict(copy.deepcopy(detector.state_dict()))
    assert kinds(resumed, [record(2, (57, 113))]) == [(2, "new_cliff")]
    assert kinds(resumed, [record(3, (57, 113))]) == []  # once per run


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lead_rise": 0.0}, "lead_rise"),
        ({"lead_margin": 1.5}, "lead_margin"),
        ({"persistence": 0}, "persistence"),
        ({"warmup": 1.5}, "warmup"),
        ({"rank_tolerance": -1}, "rank_tolerance"),
        ({"velocity_factor": 1.0}, "velocity_factor"),
        ({"alignment_ratio": 0.0}, "alignment_ratio"),
        ({"min_train_alignment": 1.5}, "min_train_alignment"),
    ],
)
def test_invalid_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EarlyWarning(**kwargs)
