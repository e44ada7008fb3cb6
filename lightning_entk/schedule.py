"""When the monitor evaluates: a fixed cadence, or a time budget spent where the kernel moves.

Both are pure objects of measured quantities (optimizer steps, completed epochs, wall-clock
seconds and the evaluations' ``entk/`` scalars); the callback asks one at each candidate point
(the end of a training batch, the end of an epoch) and tells it what each evaluation found and
cost. The first evaluation (at initialization) and the last (at the end of fit) are the
callback's and always happen.

:class:`TimeBudget` (the monitor's default) keeps the monitor's wall time near
``max_overhead`` times the training's, measured as the run goes, and spends it where the
signals move. After each evaluation it sets the gap to the next, in optimizer steps, like the
step size of an adaptive ODE solver: the largest change seen since the last evaluation (the
kernel's velocity, or the change of kernel regression accuracy or kernel-target alignment, of
the whole kernel or of a parameter group's) against ``tolerance``:

    gap <- max(steps since the last evaluation * min(tolerance / change, 2), 1)

so the gap shrinks at once where the kernel moves by more than ``tolerance`` per evaluation
and doubles on quiet stretches, up to ``QUIET_PACE`` times the even pace the budget affords
(an evaluation's cost over ``max_overhead`` times the training seconds per step): what a quiet
stretch leaves unspent pays for dense evaluations where the signals move, and no stretch is
slept through. When an evaluation falls due, it is made if the budget allows it:

    spent + cost + cost <= max_overhead * trained + burst * cost

``spent``: the monitor's seconds so far, the first evaluation's included; ``trained``: training
seconds so far (wall time outside the monitor); ``cost``: the median of the last three
evaluations, counted twice: this one, and the one at the end of fit, which is always made and
so is set aside from the start. While the last change exceeded ``tolerance``, ``burst``
evaluations may be spent ahead of the budget (none otherwise), to be paid back on quiet
stretches. When the budget does not allow it, the evaluation waits for the step at which, at
the training speed measured so far, it will (asking again before then: the first steps' speed
is a poor guide to the rest).
Under several processes, rank 0 decides and the decision is shared, so that every rank
evaluates at the same steps.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping

# The signals whose change sets the gap: the key itself or ``entk/<group>/<signal>``.
MOVING_SIGNALS = ("kernel_regression_acc", "kernel_target_alignment")
VELOCITY = "kernel_velocity"
QUIET_PACE = 2  # on quiet stretches, gaps up to this many times the budget's even pace


class FixedCadence:
    """Evaluate at the end of every n-th epoch and/or after every n-th optimizer step.

    Example:
        >>> cadence = FixedCadence(every_n_epochs=5)
        >>> cadence.due(step=10, epoch=5, epoch_end=True), cadence.due(10, 4, True)
        (True, False)
    """

    def __init__(self, every_n_epochs: int | None = None, every_n_train_steps: int | None = None):
        self.every_n_epochs = every_n_epochs
        self.every_n_train_steps = every_n_train_steps

    def due(self, step: int, epoch: int, epoch_end: bool) -> bool:
        """At ``step`` optimizer steps and ``epoch`` completed epochs (at an epoch's end when
        ``epoch_end``, else after a training batch; the callback asks about an epoch's last
        batch at the epoch's end)."""
        by_steps = bool(self.every_n_train_steps) and step % self.every_n_train_steps == 0
        if epoch_end:
            return by_steps or (bool(self.every_n_epochs) and epoch % self.every_n_epochs == 0)
        return by_steps

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class TimeBudget:
    """Evaluations paced by a share of the training time and placed where the kernel moves
    (see the module docstring).

    Args:
        max_overhead: the monitor's wall time as a share of training's, e.g. 0.2: at most 20%
            on top of training (over a run; ``burst`` evaluations may come early).
        tolerance: the change of a signal per evaluation that keeps the gap as it is.
        burst: evaluations that may be spent ahead of the budget while the signals move by
            more than ``tolerance`` per evaluation.

    Raises:
        ValueError: for arguments out of range.

    Example:
        >>> budget = TimeBudget(max_overhead=0.2)
        >>> budget.start(now=0.0)
        >>> budget.record(step=0, began=0.0, ended=1.0, metrics={})  # at initialization
        >>> budget.next_step
        1
        >>> budget.allows(step=1, now=6.0)  # 5 s trained: 20% of it pays no three evaluations
        False
        >>> budget.allows(step=50, now=16.0)  # 15 s: the first, this one, the one at the end
        True
    """

    def __init__(self, max_overhead: float = 0.2, tolerance: float = 0.02, burst: int = 4):
        for name, value in (("max_overhead", max_overhead), ("tolerance", tolerance)):
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ValueError(f"`{name}` must be a positive number, got {value!r}.")
        if isinstance(burst, bool) or not isinstance(burst, int) or burst < 0:
            raise ValueError(f"`burst` must be a non-negative int, got {burst!r}.")
        self.max_overhead = float(max_overhead)
        self.tolerance = float(tolerance)
        self.burst = burst
        self._state = self._fresh_state()

    @staticmethod
    def _fresh_state() -> dict:
        return {
            "started": None,  # clock at the start of training
            "spent": 0.0,  # the monitor's seconds, every evaluation's (images included)
            "costs": [],  # seconds of each evaluation
            "gap": 1.0,  # steps to the next evaluation, before the budget
            "next_step": 1,
            "last_step": None,
            "signals": {},  # the previous evaluation's moving signals
            "moving": False,  # whether they changed by more than ``tolerance`` last time
        }

    @property
    def next_step(self) -> int:
        """The step from which the next evaluation is due."""
        return self._state["next_step"]

    def start(self, now: float) -> None:
        """Training starts at clock ``now`` (seconds); only the first call counts."""
        if self._state["started"] is None:
            self._state["started"] = now

    def due(self, step: int, epoch: int, epoch_end: bool) -> bool:
        return step >= self._state["next_step"]

    def trained(self, now: float) -> float:
        """Training seconds by clock ``now``: wall time since the start outside the monitor."""
        started = self._state["started"]
        return 0.0 if started is None else max(now - started - self._state["spent"], 0.0)

    def allows(self, step: int, now: float) -> bool:
        """Whether the budget allows an evaluation at ``step`` and clock ``now``; if not, the
        next evaluation is put off to the step at which it will (at the speed trained so far)."""
        state = self._state
        if not state["costs"]:
            return True
        cost = self._cost()
        trained = self.trained(now)
        burst = self.burst if state["moving"] else 0
        reserve = cost  # for the evaluation at the end of fit
        short = state["spent"] + cost + reserve - self.max_overhead * trained - burst * cost
        if short <= 0:
            return True
        per_step = trained / max(step, 1)
        wait = math.ceil(short / (self.max_overhead * per_step)) if per_step > 0 else 1
        # Asked again before then: the first steps' speed is no good estimate of the rest.
        state["next_step"] = step + max(min(wait, step // 4), 1)
        return False

    def affords(self, seconds: float, now: float) -> bool:
        """Whether ``seconds`` more of monitor work (drawing images, part of the evaluation
        that pays for it) fit the budget, burst and reserve left aside."""
        spent = self._state["spent"] + seconds
        return spent <= self.max_overhead * self.trained(now)

    def record(self, step: int, began: float, ended: float, metrics: Mapping[str, float]):
        """An evaluation at ``step`` took clock ``began`` to ``ended`` and found ``metrics``
        (its ``entk/`` scalars): charge it and set the next evaluation's step."""
        state = self._state
        seconds = max(ended - began, 0.0)
        first = state["last_step"] is None
        state["spent"] += seconds
        state["costs"].append(seconds)
        signals = moving_signals(metrics)
        change = signal_change(state["signals"], signals)
        state["moving"] = not first and change is not None and change > self.tolerance
        if not first and change is not None:
            factor = 2.0 if change == 0 else min(self.tolerance / change, 2.0)
            state["gap"] = max((step - state["last_step"]) * factor, 1.0)
        trained = self.trained(ended)
        if not first and trained > 0 and step > 0:
            # The even pace the budget affords; quiet stretches wait at most QUIET_PACE times
            # as long (saving for where the signals move), so no transition is slept through.
            pace = self._cost() / (self.max_overhead * trained / step)
            state["gap"] = min(state["gap"], max(QUIET_PACE * pace, 1.0))
        state["signals"] = signals
        state["last_step"] = step
        state["next_step"] = step + round(state["gap"])

    def _cost(self) -> float:
        """The next evaluation's expected seconds: the median of the last three."""
        return statistics.median(self._state["costs"][-3:])

    def state_dict(self) -> dict:
        return {**self._state, "costs": list(self._state["costs"])}

    def load_state_dict(self, state: dict) -> None:
        self._state = {**self._fresh_state(), **state}

    def restart_clock(self) -> None:
        """Count seconds afresh (after a resume in a new process): the budget's account is
        closed, the gap, the costs and the next step are kept."""
        self._state.update(started=None, spent=0.0)


def moving_signals(metrics: Mapping[str, float]) -> dict[str, float]:
    """The scalars whose change sets :class:`TimeBudget`'s gap, of the whole kernel and of
    each parameter group."""
    names = (*MOVING_SIGNALS, VELOCITY)
    return {
        k: float(v)
        for k, v in metrics.items()
        if k.startswith("entk/") and k.rsplit("/", 1)[-1] in names and math.isfinite(v)
    }


def signal_change(previous: Mapping[str, float], current: Mapping[str, float]) -> float | None:
    """The largest change from ``previous`` to ``current``: a velocity is a change already,
    the others are differenced. ``None`` when nothing can be compared.

    Example:
        >>> signal_change({"entk/kernel_regression_acc": 0.25},
        ...               {"entk/kernel_regression_acc": 0.5, "entk/kernel_velocity": 0.125})
        0.25
    """
    changes = [
        v if k.endswith(VELOCITY) else abs(v - previous[k])
        for k, v in current.items()
        if k.endswith(VELOCITY) or k in previous
    ]
    return max(changes) if changes else None
