"""A live forecast of the epoch at which the network generalises: not only "it is coming" but
"about when", with an interval, from the sentinel's readings alone; and no forecast when the
readings cannot say.

What it rests on, measured on development runs of grokking setups of several kinds
(docs/early_warning.md): in the stretch before the network's accuracy jumps, the readout's
held-out alignment ``h`` (the sentinel's ``entk/sentinel/heldout_alignment``) grows above the
lowest level it has taken either exponentially in the epoch or as a power of it, and the
accuracy reaches its level when ``h`` is about ``TARGET_SHARE`` of the readout's alignment on
training points ``g`` (``entk/sentinel/train_alignment``): a level set by the run itself, not
a fixed alignment (which differs between setups by a factor of five). So at epoch ``t``:

    target    = TARGET_SHARE * g(t)
    excess(s) = h(s) - floor,       floor = the lowest h so far (less FLOOR_MARGIN)
    for the last quarter and the last half of the epochs so far, least squares of log excess
    against s (exponential growth) and against log s (a power law); per window the better fit
    (the smaller residual) says when excess reaches target - floor
    forecast  = the mean over the windows
    interval  = the earliest and latest of the same with the band's ends (``BAND`` times g),
                widened to at least (forecast - t) / SPREAD .. (forecast - t) * SPREAD ahead

so that the interval is never of zero width and grows with the length of the extrapolation.

When it abstains (a :class:`Forecast` with ``epoch`` ``None`` and the reason in ``basis``):

* too few readings, or a training alignment under ``MIN_TRAIN`` (no level to aim at);
* the held-out alignment was past its level at the first reading that had one (the readout's
  features carried over from the start, as on natural data from a large initialisation: the
  readings say nothing of when the network will catch up), or is past it now (no forecast of
  an epoch at or before now);
* ``h`` has not risen above its floor by ``MIN_RISE`` of ``g``, or it is not growing, or it
  would take more than ``HORIZON`` times the epochs so far: nothing is coming (control runs
  that memorise without generalising stay here or fall back here when their alignment levels
  off).

The accuracy's level is half way from chance to 1 on the development runs (0.5 with many
classes); other levels are not calibrated. It knows nothing of the model, its optimiser or the
bundled demos' epochs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

TARGET_SHARE = 0.6  # of the training alignment: where the forecast aims (development runs)
BAND = (0.42, 0.84)  # the same, for the interval's ends
SPREAD = 1.5  # the interval spans at least 1/SPREAD .. SPREAD times the way ahead
WINDOWS = (0.25, 0.5)  # the last quarter and the last half of the epochs so far
MIN_TRAIN = 0.02  # training alignment below which there is no level to aim at
MIN_RISE = 0.1  # of the training alignment: the rise above the floor before growth says anything
MIN_READINGS = 3  # in a window, for a slope
FLOOR_MARGIN = 1e-3  # below the lowest reading, so that its logarithm is finite
HORIZON = 10  # no forecast beyond this many times the epochs so far: too slow to say


@dataclass(frozen=True)
class Forecast:
    """The forecast made at epoch ``made_at``: the ``epoch`` at which the watched metric
    reaches its level and the interval ``[low, high]``, ``made_at < low < epoch < high``; all
    three ``None`` when it abstains. ``basis``: the numbers it rests on, or why it abstains."""

    made_at: int
    epoch: float | None
    low: float | None
    high: float | None
    basis: str = ""

    def describe(self) -> str:
        if self.epoch is None:
            return f"at epoch {self.made_at}: no forecast ({self.basis})"
        return (
            f"at epoch {self.made_at}: epoch {self.epoch:.0f} "
            f"(interval {self.low:.0f}-{self.high:.0f}; {self.basis})"
        )


def forecast(
    epochs: Sequence[float],
    alignment: Sequence[float],
    train_alignment: Sequence[float],
    now: int,
) -> Forecast:
    """The forecast at epoch ``now`` from the sentinel's held-out ``alignment`` and
    ``train_alignment`` read at ``epochs`` (those after ``now`` ignored); see the module
    docstring.

    Example:
        >>> epochs = list(range(0, 101, 5))  # 0.001 above the floor, growing 4% an epoch
        >>> held = [0.001 * math.exp(e / 25) - 0.03 for e in epochs]
        >>> trained = [0.22 / TARGET_SHARE] * len(epochs)  # the level: h = 0.22
        >>> f = forecast(epochs, held, trained, now=100)
        >>> round(f.epoch), 100 < f.low < f.epoch < f.high  # h reaches 0.22 at 25 log(250)
        (138, True)
    """
    t = np.asarray(epochs, dtype=float)
    h = np.asarray(alignment, dtype=float)
    g = np.asarray(train_alignment, dtype=float)
    keep = (t <= now) & np.isfinite(h) & np.isfinite(g)
    t, h, g = t[keep], h[keep], g[keep]
    if len(t) < MIN_READINGS:
        return Forecast(now, None, None, None, "too few readings")
    if g[-1] < MIN_TRAIN:
        return Forecast(now, None, None, None, f"training alignment {g[-1]:.3f}: no level yet")
    first = int(np.argmax(g >= MIN_TRAIN))
    if h[first] >= TARGET_SHARE * g[first]:
        basis = f"alignment {h[first]:.3f} past {TARGET_SHARE} of {g[first]:.3f} at the start"
        return Forecast(now, None, None, None, basis)
    target = TARGET_SHARE * float(g[-1])
    if h[-1] >= target:
        basis = f"alignment {h[-1]:.3f} past its level {target:.3f} already"
        return Forecast(now, None, None, None, basis)
    floor = float(h.min()) - FLOOR_MARGIN
    rise = float(h[-1]) - floor
    if rise < MIN_RISE * g[-1]:
        return Forecast(now, None, None, None, f"alignment {h[-1]:.3f}, {rise:.3f} over its floor")
    excess = h - floor
    reach = []  # per window: the epoch at which excess reaches a level, by the better model
    for share in WINDOWS:
        inside = (t >= now * (1 - share)) & (t > 0)
        if inside.sum() >= MIN_READINGS and np.ptp(t[inside]) > 0:
            model = _growth(t[inside], np.log(excess[inside]), now, float(h[-1]) - floor)
            if model is not None:
                reach.append(lambda level, m=model: m(level - floor))
    if not reach:
        return Forecast(now, None, None, None, f"alignment {h[-1]:.3f}, not growing")
    central = float(np.mean([r(target) for r in reach]))
    if not central <= HORIZON * now:
        basis = f"alignment {h[-1]:.3f}, rising too slowly to reach {target:.3f}"
        return Forecast(now, None, None, None, basis)
    ahead = central - now
    ends = [b * float(g[-1]) for b in BAND]
    low = min([now + ahead / SPREAD] + [r(ends[0]) for r in reach if ends[0] > h[-1]])
    high = max([now + ahead * SPREAD] + [min(r(ends[1]), HORIZON * now) for r in reach])
    low = max(low, now + ahead / SPREAD**2)  # never at or before now
    basis = f"alignment {h[-1]:.3f} rising to {target:.3f}"
    return Forecast(now, central, low, high, basis)


def _growth(t: np.ndarray, log_excess: np.ndarray, now: float, excess_now: float):
    """The epoch at which the excess reaches a level, ``level -> epoch`` (``inf`` beyond
    ``HORIZON`` times ``now``), by whichever of an exponential (``log excess`` linear in
    ``t``) and a power law (linear in ``log t``) fits ``log_excess`` better and grows; ``None``
    if neither grows."""
    fits = []
    for x, kind in ((t, "exponential"), (np.log(t), "power")):
        slope, intercept = np.polyfit(x, log_excess, 1)
        residual = float(np.sqrt(np.mean((log_excess - (slope * x + intercept)) ** 2)))
        if slope > 0:
            fits.append((residual, kind, float(slope)))
    if not fits:
        return None
    _, kind, slope = min(fits)

    def epoch(level: float) -> float:
        growth = math.log(level / excess_now) / slope  # in the model's own variable
        if kind == "exponential":
            return now + growth if growth <= (HORIZON - 1) * now else math.inf
        return now * math.exp(growth) if growth <= math.log(HORIZON) else math.inf

    return epoch
