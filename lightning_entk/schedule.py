"""When the monitor makes a full evaluation: a fixed cadence, or a time budget spent where the
sentinel and the kernel move. Both behind one interface, :class:`Schedule`, read against one
:class:`Clock`.

The monitor's core asks the schedule at each candidate point (the end of a training batch, the
end of an epoch) whether a full evaluation is :meth:`~Schedule.due` (a pure function of the
step, the same on every process) and, if so, whether the budget :meth:`~Schedule.allows` it
(rank 0 decides; the decision and the schedule's state are shared). It tells the schedule what
each sentinel reading found (:meth:`~Schedule.observe`) and what each full evaluation found
and cost (:meth:`~Schedule.record`). The first evaluation (at initialization) and the last (at
the end of training) are the core's and always happen.

:class:`TimeBudget` (the default) keeps the monitor's wall time, sentinel readings included,
near ``max_overhead`` times the training's, measured as the run goes, and spends what the
sentinel leaves where the signals move. After each full evaluation it sets the gap to the
next, in optimizer steps, like the step size of an adaptive ODE solver: the largest change
seen since the last evaluation (the kernel's velocity, or the change of kernel regression
accuracy or kernel-target alignment, of the whole kernel or of a parameter group's) against
``tolerance``:

    gap <- max(steps since the last evaluation * min(tolerance / change, 2), 1)

so the gap shrinks at once where the kernel moves by more than ``tolerance`` per evaluation
and doubles on quiet stretches, up to ``QUIET_PACE`` times the even pace the budget affords.
Between full evaluations the sentinel watches: when its readout alignment has moved by more
than ``tolerance`` since the last full evaluation, the next full evaluation is due at once.
When an evaluation falls due, it is made if the budget allows it:

    spent + cost + cost <= max_overhead * trained + burst * cost

``spent``: the monitor's seconds so far (the sentinel's, the first evaluation's, images);
``trained``: training seconds so far (wall time outside the monitor); ``cost``: the median of
the last three evaluations, counted twice: this one, and the one at the end of training, which
is always made and so is set aside from the start. While the signals move, ``burst``
evaluations may be spent ahead of the budget, to be paid back on quiet stretches. When the
budget does not allow it, the evaluation waits for the step at which, at the training speed
measured so far, it will.

**The transition window.** The monitor tells the schedule what it sees coming
(:meth:`~Schedule.expect`): the epoch of the first phase-transition alarm, the high end of the
latest forecast of the watched metric's rise, and the watched metric now. From the first alarm
the schedule is in the *window*, until the evaluation that follows the watched metric's arrival
at ``WINDOW_CLOSES_AT`` (without a watched metric: until the forecast's high end). Its
milestones are the alarm; each ``1 / WINDOW_STAGES`` of the way the watched metric comes from
its value at the alarm to ``WINDOW_CLOSES_AT``; its arrival there; and ``WINDOW_GAP`` of the
epochs after the arrival (the kernel lags the accuracy: the modular MLP's grokking cliff can
appear after val_acc 0.95). A full evaluation falls due at each, and the window's first
``burst`` are made whatever the budget (a transition seen only afterwards is what the monitor
is for). So the evaluations follow the rise where it is, however wrong the forecast of when it
comes. Between milestones they come every

    gap = max(WINDOW_GAP * epochs so far, cost / (WINDOW_SHARE * seconds per epoch))

epochs when the budget allows (``cost``: the median of the last three evaluations made in the
window, which skip the parts nobody reads there; see
:func:`~lightning_entk.evaluation.evaluate`); without a watched metric these are the window's
evaluations, its first ``burst`` made whatever the budget. The window is paid back on the
quiet stretches after.
A fixed cadence has no window: it replaces the placement.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Protocol

from lightning_entk import keys
from lightning_entk.checks import check_int, check_number

DEFAULT_MAX_OVERHEAD = 0.1  # the monitor's seconds, sentinel included, over training's
# The signals whose change sets the gap: the key itself or ``entk/<group>/<signal>``.
MOVING_SIGNALS = (keys.KERNEL_REGRESSION_ACC, keys.KERNEL_TARGET_ALIGNMENT, keys.KERNEL_VELOCITY)
QUIET_PACE = 2  # on quiet stretches, gaps up to this many times the budget's even pace
WINDOW_GAP = 0.25  # in the transition window, evaluations this share of the epochs so far apart
WINDOW_SHARE = 0.5  # in the window, evaluations at least their cost over this share apart
WINDOW_CLOSES_AT = 0.95  # the watched metric's level that closes the window
WINDOW_STAGES = 2  # an evaluation each time the watched metric comes this fraction of its way


class Clock:
    """The monitor's one clock: wall time since training started, split into the monitor's
    seconds (by kind: ``sentinel``, ``evaluation``, ``images``, ...) and training's.

    Example:
        >>> ticks = iter([0.0, 2.0, 2.5, 10.0])
        >>> clock = Clock(lambda: next(ticks))
        >>> clock.start()
        >>> with clock.charge("sentinel"):
        ...     pass
        >>> clock.training_seconds(), clock.monitor_seconds
        (9.5, 0.5)
    """

    def __init__(self, now: Callable[[], float] = time.perf_counter) -> None:
        self.now = now
        self.started: float | None = None
        self.stopped: float | None = None  # the training seconds when training ended
        self.spent: dict[str, float] = {}
        self.first_step = self.first_epoch = 0  # where this clock started counting

    def start(self, step: int = 0, epoch: int = 0) -> None:
        """Training starts now, at ``step`` and ``epoch`` (only the first call counts)."""
        if self.started is None:
            self.started = self.now()
            self.first_step, self.first_epoch = step, epoch

    @contextlib.contextmanager
    def charge(self, kind: str) -> Iterator[None]:
        """Count the seconds inside as the monitor's, of ``kind``."""
        began = self.now()
        try:
            yield
        finally:
            self.spent[kind] = self.spent.get(kind, 0.0) + self.now() - began

    @property
    def monitor_seconds(self) -> float:
        return sum(self.spent.values())

    def training_seconds(self) -> float:
        """Wall time since the start outside the monitor (until :meth:`stop`)."""
        if self.stopped is not None:
            return self.stopped
        if self.started is None:
            return 0.0
        return max(self.now() - self.started - self.monitor_seconds, 0.0)

    def seconds_per_step(self, step: int) -> float:
        """Training seconds per step over the steps this clock has seen (0 before any)."""
        steps = step - self.first_step
        return self.training_seconds() / steps if steps > 0 else 0.0

    def seconds_per_epoch(self, epoch: int) -> float:
        """Training seconds per epoch over the epochs this clock has seen (0 before any)."""
        epochs = epoch - self.first_epoch
        return self.training_seconds() / epochs if epochs > 0 else 0.0

    def stop(self) -> None:
        """Training ended: its seconds are fixed; the monitor's may still grow."""
        self.stopped = self.training_seconds()

    def restart(self) -> None:
        """Count afresh (after a resume in another process: its clock is not this one's)."""
        self.started, self.stopped, self.spent = None, None, {}
        self.first_step = self.first_epoch = 0


class Schedule(Protocol):
    """When full evaluations are made (see the module docstring)."""

    def due(self, step: int, epoch: int, epoch_end: bool) -> bool: ...

    def allows(self, step: int, clock: Clock) -> bool: ...

    def observe(self, step: int, signals: Mapping[str, float]) -> None: ...

    def expect(
        self, step: int, epoch: int, alarm: int | None, high: float | None, watched: float | None
    ) -> None: ...

    def in_window(self) -> bool: ...

    def record(self, step: int, cost: float, metrics: Mapping[str, float], clock: Clock): ...

    def affords(self, seconds: float, clock: Clock) -> bool: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class FixedCadence:
    """Full evaluations at the end of every n-th epoch and/or after every n-th optimizer step,
    whatever they cost.

    Example:
        >>> cadence = FixedCadence(every_n_epochs=5)
        >>> cadence.due(step=10, epoch=5, epoch_end=True), cadence.due(10, 4, True)
        (True, False)
    """

    def __init__(self, every_n_epochs: int | None = None, every_n_train_steps: int | None = None):
        for name, value in (
            ("every_n_epochs", every_n_epochs),
            ("every_n_train_steps", every_n_train_steps),
        ):
            check_int(name, value, optional=True, words="a positive int")
        self.every_n_epochs = every_n_epochs
        self.every_n_train_steps = every_n_train_steps

    def due(self, step: int, epoch: int, epoch_end: bool) -> bool:
        """At ``step`` optimizer steps and ``epoch`` completed epochs (at an epoch's end when
        ``epoch_end``, else after a training batch)."""
        by_steps = bool(self.every_n_train_steps) and step % self.every_n_train_steps == 0
        if epoch_end:
            return by_steps or (bool(self.every_n_epochs) and epoch % self.every_n_epochs == 0)
        return by_steps

    def allows(self, step: int, clock: Clock) -> bool:
        return True

    def observe(self, step: int, signals: Mapping[str, float]) -> None:
        pass

    def expect(
        self, step: int, epoch: int, alarm: int | None, high: float | None, watched: float | None
    ) -> None:
        pass

    def in_window(self) -> bool:
        return False

    def record(self, step: int, cost: float, metrics: Mapping[str, float], clock: Clock):
        pass

    def affords(self, seconds: float, clock: Clock) -> bool:
        return True

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class TimeBudget:
    """Full evaluations paced by a share of the training time and placed where the sentinel
    and the kernel move (see the module docstring).

    Args:
        max_overhead: the monitor's wall time (sentinel readings included) as a share of
            training's, e.g. 0.1: at most 10% on top of training (over a run; ``burst``
            evaluations may come early).
        tolerance: the change of a signal per evaluation that keeps the gap as it is; a
            sentinel reading that moved this far since the last full evaluation makes the
            next one due.
        burst: evaluations that may be spent ahead of the budget while the signals move by
            more than ``tolerance`` per evaluation; and those made in the transition window
            whatever the budget.

    Raises:
        ValueError: for arguments out of range.

    Example:
        >>> now = [0.0]
        >>> clock, budget = Clock(lambda: now[0]), TimeBudget(max_overhead=0.2)
        >>> clock.start()
        >>> with clock.charge("evaluation"):  # at initialization: one second
        ...     now[0] = 1.0
        >>> budget.record(step=0, cost=1.0, metrics={}, clock=clock)
        >>> budget.next_step
        1
        >>> now[0] = 6.0  # 5 s trained: 20% of it pays no three evaluations
        >>> budget.allows(step=1, clock=clock)
        False
        >>> now[0] = 16.0  # 15 s: the first, this one, the one at the end
        >>> budget.allows(step=50, clock=clock)
        True
    """

    def __init__(
        self, max_overhead: float = DEFAULT_MAX_OVERHEAD, tolerance: float = 0.02, burst: int = 4
    ):
        for name, value in (("max_overhead", max_overhead), ("tolerance", tolerance)):
            check_number(name, value, words="a positive number")
        check_int("burst", burst, 0, words="a non-negative int")
        self.max_overhead = float(max_overhead)
        self.tolerance = float(tolerance)
        self.burst = burst
        self._state = self._fresh_state()

    @staticmethod
    def _fresh_state() -> dict:
        return {
            "costs": [],  # seconds of each full evaluation
            "window_costs": [],  # and of each made in the transition window
            "gap": 1.0,  # steps to the next evaluation, before the budget
            "next_step": 1,
            "last_step": None,
            "signals": {},  # the previous evaluation's moving signals
            "sentinel": {},  # the sentinel's signals at the previous evaluation
            "moving": False,  # whether they changed by more than ``tolerance`` last time
            "epoch": 0,  # completed epochs at the latest outlook
            "steps_per_epoch": None,
            "alarm": None,  # the epoch of the first alarm: the window opens
            "high": None,  # the latest forecast's high end (epochs)
            "watched": None,  # the watched metric at the latest outlook
            "alarm_watched": None,  # at the first alarm
            "watched_evaluated": None,  # at the last full evaluation
            "milestone": False,  # an evaluation is due at a milestone of the window
            "phase": "rising",  # of the window: "arrived" at WINDOW_CLOSES_AT, "settling", "closed"
            "arrived": None,  # the epoch the watched metric reached WINDOW_CLOSES_AT
            "window_made": 0,  # evaluations made in the window
        }

    @property
    def next_step(self) -> int:
        """The step from which the next evaluation is due."""
        return self._state["next_step"]

    def due(self, step: int, epoch: int, epoch_end: bool) -> bool:
        return step >= self._state["next_step"]

    def allows(self, step: int, clock: Clock) -> bool:
        """Whether the budget allows an evaluation at ``step``; if not, the next evaluation is
        put off to the step at which it will (at the speed trained so far)."""
        state = self._state
        if not state["costs"] or (self._free() and state["window_made"] < self.burst):
            return True
        cost = self._cost()
        trained = clock.training_seconds()
        burst = self.burst if state["moving"] else 0
        reserve = cost  # for the evaluation at the end of training
        short = clock.monitor_seconds + cost + reserve - self.max_overhead * trained - burst * cost
        if short <= 0:
            return True
        per_step = clock.seconds_per_step(step)
        wait = math.ceil(short / (self.max_overhead * per_step)) if per_step > 0 else 1
        # Asked again before then: the first steps' speed is no good estimate of the rest.
        state["next_step"] = step + max(min(wait, step // 4), 1)
        return False

    def affords(self, seconds: float, clock: Clock) -> bool:
        """Whether ``seconds`` more of monitor work (drawing images) fit the budget."""
        return clock.monitor_seconds + seconds <= self.max_overhead * clock.training_seconds()

    def observe(self, step: int, signals: Mapping[str, float]) -> None:
        """A sentinel reading at ``step`` found ``signals``: when one has moved by more than
        ``tolerance`` since the last full evaluation, the next is due now (outside the window,
        whose pace is its own)."""
        state = self._state
        change = signal_change(state["sentinel"], signals, differences_only=True)
        if state["last_step"] is None or not state["sentinel"]:
            state["sentinel"] = dict(signals)
        elif change is not None and change > self.tolerance and not self.in_window():
            state["next_step"] = min(state["next_step"], step)

    def expect(
        self, step: int, epoch: int, alarm: int | None, high: float | None, watched: float | None
    ) -> None:
        """The monitor's outlook at ``step`` (``epoch`` completed epochs): the epoch of its first
        alarm (``None``: none yet), the high end of its latest forecast (``None``: none) and the
        watched metric now (``None``: not measured). The first alarm opens the window (see the
        module docstring): an evaluation is due at once."""
        state = self._state
        state["epoch"] = epoch
        if epoch > 0 and step > 0:
            state["steps_per_epoch"] = step / epoch
        if watched is not None and math.isfinite(watched):
            state["watched"] = float(watched)
        if high is not None and math.isfinite(high):
            state["high"] = float(high)
        if alarm is not None and state["alarm"] is None:
            state["alarm"] = alarm
            state["alarm_watched"] = state["watched"]
            self._milestone(step)
        elif state["alarm"] is not None and state["watched"] is not None:
            phase = state["phase"]
            if phase == "rising" and state["watched"] >= WINDOW_CLOSES_AT:
                state["phase"], state["arrived"] = "arrived", epoch
                self._milestone(step)
            elif phase == "rising" and (
                self._stage(state["watched"]) > self._stage(state["watched_evaluated"])
            ):
                self._milestone(step)
            elif phase == "settling" and epoch >= (1 + WINDOW_GAP) * state["arrived"]:
                self._milestone(step)

    def _milestone(self, step: int) -> None:
        """The window opens, the watched metric passed a stage of its rise, or it closes: an
        evaluation is due now (made whatever the budget, the window's first ``burst``)."""
        self._state["milestone"] = True
        self._state["next_step"] = min(self._state["next_step"], step)

    def _stage(self, watched: float | None) -> int:
        """How many ``1 / WINDOW_STAGES`` of the way from the watched metric at the alarm to
        ``WINDOW_CLOSES_AT`` it has come."""
        state = self._state
        start = state["alarm_watched"] if state["alarm_watched"] is not None else 0.0
        if watched is None or WINDOW_CLOSES_AT <= start:
            return 0
        return math.floor(WINDOW_STAGES * (watched - start) / (WINDOW_CLOSES_AT - start))

    def _free(self) -> bool:
        """Whether the evaluation due now is one the window makes whatever the budget: at a
        milestone, or on the window's own pace when there is no watched metric to follow."""
        state = self._state
        return state["milestone"] or (self.in_window() and state["watched"] is None)

    def in_window(self) -> bool:
        """Whether training is in the transition window: after the first alarm, until the
        evaluation that follows the watched metric's arrival at ``WINDOW_CLOSES_AT`` (without
        one, until the forecast's high end)."""
        state = self._state
        if state["alarm"] is None or state["phase"] == "closed":
            return False
        if state["watched"] is not None:
            return True
        return state["high"] is not None and state["epoch"] < state["high"]

    def _window_gap(self, clock: Clock) -> float | None:
        """Steps to the next evaluation in the window (module docstring), ``None`` outside."""
        state = self._state
        per_epoch = state["steps_per_epoch"]
        if not self.in_window() or not per_epoch:
            return None
        epoch = state["epoch"]
        per_epoch_seconds = clock.seconds_per_epoch(epoch)
        least = 1.0
        if per_epoch_seconds > 0:
            least = self._cost(window=True) / (WINDOW_SHARE * per_epoch_seconds)
        return max(WINDOW_GAP * epoch, least, 1.0) * per_epoch

    def record(self, step: int, cost: float, metrics: Mapping[str, float], clock: Clock):
        """A full evaluation at ``step`` cost ``cost`` seconds (already on the ``clock``) and
        found ``metrics`` (its ``entk/`` scalars, and the latest sentinel's): set the next
        evaluation's step."""
        state = self._state
        first = state["last_step"] is None
        state["costs"].append(max(cost, 0.0))
        if self.in_window():
            state["window_costs"] = [*state["window_costs"][-2:], max(cost, 0.0)]
        signals = moving_signals(metrics)
        sentinel = {k: v for k, v in signals.items() if k == keys.SENTINEL_ALIGNMENT}
        change = signal_change(state["signals"], signals)
        state["moving"] = not first and change is not None and change > self.tolerance
        if not first and change is not None:
            factor = 2.0 if change == 0 else min(self.tolerance / change, 2.0)
            state["gap"] = max((step - state["last_step"]) * factor, 1.0)
        per_step = clock.seconds_per_step(step)
        if not first and per_step > 0:
            # The even pace the budget affords; quiet stretches wait at most QUIET_PACE times
            # as long (saving for where the signals move), so no transition is slept through.
            pace = self._cost() / (self.max_overhead * per_step)
            state["gap"] = min(state["gap"], max(QUIET_PACE * pace, 1.0))
        if state["milestone"] and state["phase"] in ("arrived", "settling"):
            state["phase"] = {"arrived": "settling", "settling": "closed"}[state["phase"]]
        state["window_made"] += self._free()
        state["milestone"] = False
        window = self._window_gap(clock)
        state["watched_evaluated"] = state["watched"]
        state["signals"] = signals
        state["sentinel"] = sentinel or state["sentinel"]
        state["last_step"] = step
        # In the window the evaluations come at its pace; the adaptive gap is kept for after it.
        state["next_step"] = step + max(round(state["gap"] if window is None else window), 1)

    def _cost(self, window: bool = False) -> float:
        """The next evaluation's expected seconds: the median of the last three (``window``:
        of those made in the window, when there are any)."""
        costs = (window and self._state["window_costs"]) or self._state["costs"]
        return statistics.median(costs[-3:])

    def state_dict(self) -> dict:
        state = self._state
        return {**state, "costs": list(state["costs"]), "window_costs": list(state["window_costs"])}

    def load_state_dict(self, state: dict) -> None:
        self._state = {**self._fresh_state(), **state}


def moving_signals(metrics: Mapping[str, float]) -> dict[str, float]:
    """The scalars whose change sets :class:`TimeBudget`'s gap, of the whole kernel, of each
    parameter group and of the sentinel."""
    found = {
        k: float(v)
        for k, v in metrics.items()
        if k.startswith(keys.PREFIX) and keys.ungrouped(k) in MOVING_SIGNALS and math.isfinite(v)
    }
    value = metrics.get(keys.SENTINEL_ALIGNMENT)
    if value is not None and math.isfinite(value):
        found[keys.SENTINEL_ALIGNMENT] = float(value)
    return found


def signal_change(
    previous: Mapping[str, float], current: Mapping[str, float], differences_only: bool = False
) -> float | None:
    """The largest change from ``previous`` to ``current``: a velocity is a change already
    (unless ``differences_only``), the others are differenced. ``None`` when nothing can be
    compared.

    Example:
        >>> signal_change({"entk/kernel_regression_acc": 0.25},
        ...               {"entk/kernel_regression_acc": 0.5, "entk/kernel_velocity": 0.125})
        0.25
    """
    velocity = {k for k in current if keys.ungrouped(k) == keys.KERNEL_VELOCITY}
    changes = [
        v if k in velocity else abs(v - previous[k])
        for k, v in current.items()
        if (k in velocity and not differences_only) or k in previous
    ]
    return max(changes) if changes else None
