"""When the monitor evaluates: the fixed cadence and the time budget, on a simulated clock."""

import itertools
import math
import statistics

import pytest

from lightning_entk.schedule import (
    WINDOW_GAP,
    WINDOW_SHARE,
    WINDOW_STAGES,
    Clock,
    FixedCadence,
    TimeBudget,
    moving_signals,
    signal_change,
)


class SimulatedTime:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def run(budget, steps, step_seconds, evaluation_seconds, signal, sentinel=None, outlook=None):
    """Train ``steps`` steps of ``step_seconds`` each on a simulated clock, evaluating when the
    budget says so; ``evaluation_seconds(i)`` is the i-th evaluation's cost and
    ``signal(step)`` its kernel regression accuracy; ``sentinel(step)``, if given, a sentinel
    reading's alignment at every step (free); ``outlook(step)``, if given, the monitor's
    ``(alarm, high, watched)`` told to the schedule at every step (one step per epoch). Returns
    the evaluated steps and the clock's split into training and monitor seconds after each
    evaluation."""
    time = SimulatedTime()
    clock = Clock(time)
    clock.start()
    evaluated, ledger = [], []

    def evaluate(step):
        with clock.charge("evaluation"):
            time.now += evaluation_seconds(len(evaluated))
        cost = evaluation_seconds(len(evaluated))
        metrics = {"entk/kernel_regression_acc": signal(step)}
        if sentinel is not None:
            metrics["entk/sentinel/heldout_alignment"] = sentinel(step)
        budget.record(step, cost, metrics, clock)
        evaluated.append(step)
        ledger.append((clock.training_seconds(), clock.monitor_seconds))

    evaluate(0)
    for step in range(1, steps + 1):
        time.now += step_seconds
        if sentinel is not None:
            budget.observe(step, {"entk/sentinel/heldout_alignment": sentinel(step)})
        if outlook is not None:
            budget.expect(step, step, *outlook(step))
        if budget.due(step, step, True) and budget.allows(step, clock):
            evaluate(step)
    return evaluated, ledger


def test_time_budget_is_dense_where_the_signal_moves_and_sparse_where_it_is_quiet():
    """Evaluations of 0.05 s beside steps of 0.01 s at a 20% budget: one per 25 steps on
    average. A signal flat but for a rise over steps 400-500: the quiet stretches wait up to
    2 x 25 steps, and what they save buys dense evaluations in the rise."""

    def signal(step):
        return min(max((step - 400) / 100, 0.0), 1.0)

    budget = TimeBudget(max_overhead=0.2, tolerance=0.02)
    evaluated, _ = run(budget, 1000, 0.01, lambda i: 0.05, signal)
    rising = [s for s in evaluated if 400 < s <= 500]
    quiet = [s for s in evaluated if 600 <= s <= 1000]
    assert len(rising) >= 8, evaluated
    assert len(quiet) <= 400 // 25 + 1, evaluated  # the budget's pace or slower
    assert len(rising) / 100 >= 2 * len(quiet) / 400, evaluated
    # The first gap pays for the evaluation at initialization and sets the one at the end of
    # fit aside (3 x 25 steps); then quiet with money left: 2 x 25 steps at most.
    assert evaluated[1] <= 3 * 25 + 1, evaluated
    before = [b - a for a, b in itertools.pairwise(evaluated[1:]) if b <= 400]
    assert max(before) <= 2 * 25 + 1, evaluated


def test_time_budget_is_denser_on_a_moving_kernel_than_on_a_frozen_one():
    moving, frozen = TimeBudget(max_overhead=0.2), TimeBudget(max_overhead=0.2)
    evaluated_moving, _ = run(moving, 2000, 0.01, lambda i: 0.05, lambda step: step / 500 % 1)
    evaluated_frozen, _ = run(frozen, 2000, 0.01, lambda i: 0.05, lambda step: 0.5)
    assert len(evaluated_moving) >= 2 * len(evaluated_frozen)


def test_time_budget_respects_its_budget_when_one_evaluation_is_slow():
    """Evaluations of 0.05 s beside steps of 0.01 s, a 20% budget, one evaluation taking 2 s:
    after it no evaluation comes until training has paid for it, and at every evaluation the
    monitor's time stays within the budget, plus at most the evaluation the budget's estimate
    let through."""

    def cost(i):
        return 2.0 if i == 5 else 0.05

    budget = TimeBudget(max_overhead=0.2, burst=0)
    evaluated, ledger = run(budget, 3000, 0.01, cost, lambda step: step / 3000)
    for trained, spent in ledger[1:]:
        assert spent <= 0.2 * trained + 2.0 + 1e-9
    assert ledger[0][1] == pytest.approx(0.05)  # the first evaluation is charged too
    slow_at = evaluated[5]
    trained_then, spent_then = ledger[5]
    next_at = evaluated[6]
    assert spent_then + 0.05 <= 0.2 * (trained_then + (next_at - slow_at) * 0.01) + 1e-9
    typical = statistics.median(b - a for a, b in itertools.pairwise(evaluated[:6]))
    assert next_at - slow_at >= 10 * typical  # paying it back
    trained, spent = ledger[-1]
    assert spent <= 0.2 * trained + 0.05 + 1e-9  # paid back by the end


def test_time_budget_affords_extra_work_within_the_budget_only():
    time = SimulatedTime()
    clock, budget = Clock(time), TimeBudget(max_overhead=0.2)
    clock.start()
    for step, began in ((0, 0.0), (10, 6.0)):  # 5.5 s trained, 1 s spent
        time.now = began
        with clock.charge("evaluation"):
            time.now += 0.5
        budget.record(step, 0.5, {}, clock)
    assert clock.training_seconds() == pytest.approx(5.5)
    assert budget.affords(0.1, clock) and not budget.affords(0.2, clock)


def test_time_budget_evaluates_at_once_where_the_sentinel_moves():
    """Full evaluations of 0.05 s, steps of 0.01 s, a kernel whose own signals never move, and
    a sentinel whose alignment climbs over steps 600-700: the budget keeps a quiet pace until
    the sentinel has moved by ``tolerance`` since the last evaluation, then evaluates at once."""

    def sentinel(step):
        return min(max((step - 600) / 100, 0.0), 1.0) * 0.3

    budget = TimeBudget(max_overhead=0.2, tolerance=0.02)
    evaluated, _ = run(budget, 1000, 0.01, lambda i: 0.05, lambda s: 0.5, sentinel)
    quiet = TimeBudget(max_overhead=0.2, tolerance=0.02)
    without, _ = run(quiet, 1000, 0.01, lambda i: 0.05, lambda s: 0.5, lambda s: 0.0)
    rising = [s for s in evaluated if 600 < s <= 700]
    assert len(rising) >= 6 and len([s for s in without if 600 < s <= 700]) <= 2
    first = rising[0]
    assert sentinel(first) - sentinel(evaluated[evaluated.index(first) - 1]) >= 0.02
    assert first <= 600 + 0.02 / 0.003 + 1  # as soon as it moved by the tolerance


def test_time_budget_state_round_trip_continues_the_same_schedule():
    a = TimeBudget()
    run(a, 50, 0.01, lambda i: 0.002, lambda step: step / 50)
    b = TimeBudget()
    b.load_state_dict(a.state_dict())
    assert b.next_step == a.next_step and b.state_dict() == a.state_dict()


def test_clock_splits_training_and_monitor_seconds_and_restarts():
    time = SimulatedTime()
    clock = Clock(time)
    assert clock.training_seconds() == 0.0  # not started
    clock.start()
    time.now = 2.0
    with clock.charge("sentinel"):
        time.now = 2.5
    with clock.charge("evaluation"):
        time.now = 3.5
    time.now = 10.0
    assert clock.spent == {"sentinel": 0.5, "evaluation": 1.0}
    assert clock.training_seconds() == pytest.approx(8.5)
    clock.stop()  # training ended: its seconds stay, the monitor's may grow
    with clock.charge("images"):
        time.now = 12.0
    assert clock.training_seconds() == pytest.approx(8.5) and clock.spent["images"] == 2.0
    clock.restart()  # resumed in a new process: the account starts afresh
    assert clock.monitor_seconds == 0.0 and clock.training_seconds() == 0.0


def test_fixed_cadence_by_epochs_and_by_steps():
    by_epoch, by_step = FixedCadence(every_n_epochs=3), FixedCadence(every_n_train_steps=4)
    assert [e for e in range(1, 10) if by_epoch.due(100, e, epoch_end=True)] == [3, 6, 9]
    assert not by_epoch.due(3, 3, epoch_end=False)
    assert [s for s in range(1, 13) if by_step.due(s, 0, epoch_end=False)] == [4, 8, 12]
    assert by_step.due(8, 1, epoch_end=True)  # an epoch's last batch, asked at its end


def test_moving_signals_and_their_change():
    metrics = {
        "entk/kernel_regression_acc": 0.5,
        "entk/head/kernel_target_alignment": 0.25,
        "entk/kernel_velocity": 0.125,
        "entk/num_cliffs": 2.0,
        "val_acc": 0.9,
    }
    signals = moving_signals(metrics)
    assert set(signals) == {
        "entk/kernel_regression_acc",
        "entk/head/kernel_target_alignment",
        "entk/kernel_velocity",
    }
    previous = {"entk/kernel_regression_acc": 0.25, "entk/head/kernel_target_alignment": 0.0}
    assert signal_change(previous, signals) == 0.25
    assert signal_change({}, {"entk/kernel_regression_acc": 0.5}) is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_overhead": 0}, "`max_overhead` must be a positive number"),
        ({"tolerance": -1.0}, "`tolerance` must be a positive number"),
        ({"burst": -1}, "`burst` must be a non-negative int"),
    ],
)
def test_time_budget_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TimeBudget(**kwargs)


def transition(alarm=300, high=500, rise=(450, 550)):
    """The monitor's outlook on a run whose watched metric rises linearly from 0 to 1 over
    ``rise`` (epochs = steps): an alarm at ``alarm`` with a forecast whose high end is ``high``."""

    def outlook(step):
        watched = min(max((step - rise[0]) / (rise[1] - rise[0]), 0.0), 1.0)
        return (alarm if step >= alarm else None, high if step >= alarm else None, watched)

    return outlook


def test_time_budget_places_evaluations_in_the_transition_window():
    """Evaluations as dear as 50 steps each, a 10% budget, a flat kernel: without an outlook
    they come about every 500 steps; with an alarm at 300 (a forecast up to 500, too early)
    and the watched metric rising over 450-550, one comes at the alarm, one halfway to 0.95,
    one as it gets there (545) and one a quarter of the epochs after (682), and after the
    window the budget pays them back."""
    step_seconds, cost = 0.01, 0.5
    plain, _ = run(TimeBudget(), 3000, step_seconds, lambda i: cost, lambda s: 0.5)
    placed, ledger = run(
        TimeBudget(), 3000, step_seconds, lambda i: cost, lambda s: 0.5, outlook=transition()
    )
    assert len([s for s in plain if 300 <= s <= 545]) <= 1, plain
    stages = [450 + math.ceil(100 * 0.95 * k / WINDOW_STAGES) for k in range(1, WINDOW_STAGES)]
    settled = math.ceil(545 * (1 + WINDOW_GAP))
    assert [s for s in placed if 300 <= s <= settled] == [300, *stages, 545, settled], placed
    assert [s for s in placed if 0 < s < 300] == [s for s in plain if 0 < s < 300]  # sparse
    after = [s for s in placed if s > 700]
    assert len(after) < len([s for s in plain if s > 700]), (placed, plain)  # paid back
    # Paid back: with the one at the end of training, the run's 10%.
    assert ledger[-1][1] + cost <= 0.1 * 3000 * step_seconds + 1e-9


def test_time_budget_window_follows_the_rise_however_wrong_the_forecast():
    """The forecast's high end (320) passes long before the watched metric rises (400-700, 0.95
    at 685): the window stays open and its milestones fall in the rise; once the metric is at
    0.95 and a quarter of the epochs after, the window is closed and the budget pays it
    back."""
    budget = TimeBudget()
    placed, _ = run(
        budget, 1500, 0.01, lambda i: 0.2, lambda s: 0.5,
        outlook=transition(alarm=300, high=320, rise=(400, 700)),
    )  # fmt: skip
    stages = [400 + math.ceil(300 * 0.95 * k / WINDOW_STAGES) for k in range(1, WINDOW_STAGES)]
    settled = math.ceil(685 * (1 + WINDOW_GAP))
    assert [s for s in placed if 300 <= s <= settled] == [300, *stages, 685, settled], placed
    assert not budget.in_window()
    assert len([s for s in placed if settled < s <= 1500]) <= 2, placed


def test_time_budget_window_is_sampled_at_a_quarter_of_the_epochs_when_the_budget_allows():
    """Evaluations cheap enough for the budget: between milestones the window's evaluations
    come at most a quarter of the epochs so far apart, no closer than its least gap."""
    cost, step_seconds = 0.02, 0.01
    placed, _ = run(
        TimeBudget(max_overhead=0.5), 1500, step_seconds, lambda i: cost, lambda s: 0.5,
        outlook=transition(alarm=300, high=320, rise=(1000, 1100)),
    )  # fmt: skip
    window = [s for s in placed if 300 <= s <= 1000]
    least = cost / (WINDOW_SHARE * step_seconds)
    assert window[0] == 300 and len(window) >= 5, placed
    for a, b in itertools.pairwise(window):
        assert least - 1 <= b - a <= max(WINDOW_GAP * a, least) + 1, placed


@pytest.mark.parametrize(("steps", "open_"), [(599, True), (601, False)])
def test_time_budget_window_without_a_watched_metric_ends_at_the_forecast(steps, open_):
    budget = TimeBudget(burst=8)
    placed, _ = run(
        budget, steps, 0.01, lambda i: 0.05, lambda s: 0.5,
        outlook=lambda s: (300 if s >= 300 else None, 600 if s >= 300 else None, None),
    )  # fmt: skip
    assert budget.in_window() is open_
    window = [s for s in placed if 300 <= s < 600]
    assert window[0] == 300 and len(window) >= 3, placed


def test_time_budget_window_opens_once_and_round_trips():
    budget = TimeBudget()
    run(budget, 400, 0.01, lambda i: 0.05, lambda s: 0.5, outlook=transition())
    assert budget.in_window()
    clone = TimeBudget()
    clone.load_state_dict(budget.state_dict())
    assert clone.in_window() and clone.state_dict() == budget.state_dict()
    budget.expect(400, 400, alarm=380, high=None, watched=None)  # a later alarm changes nothing
    assert budget.state_dict()["alarm"] == 300


def test_fixed_cadence_ignores_the_outlook():
    cadence = FixedCadence(every_n_epochs=10)
    cadence.expect(5, 5, alarm=5, high=50.0, watched=0.3)
    assert [e for e in range(1, 31) if cadence.due(e, e, epoch_end=True)] == [10, 20, 30]


def test_clock_after_a_resume_counts_the_steps_it_has_seen():
    """A resumed run's clock starts afresh at the resumed step: its speed per step and per
    epoch is over the steps since, not since step 0 (which would make a step look 1/100 as
    long, and every gap set from it 100 times too long)."""
    time = SimulatedTime()
    clock = Clock(time)
    clock.restart()
    clock.start(step=990, epoch=99)
    time.now += 20.0  # 10 steps, 1 epoch
    assert clock.seconds_per_step(1000) == pytest.approx(2.0)
    assert clock.seconds_per_epoch(100) == pytest.approx(20.0)
    assert clock.seconds_per_step(990) == 0.0  # none seen yet
