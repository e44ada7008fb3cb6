"""A live forecast of the epoch at which the network generalises: not only "it is coming" but
"about when", with an interval, from the sentinel's readings alone.

What it rests on, measured on development runs of both bundled models (docs/early_warning.md):
in the stretch before the network's accuracy jumps, the readout's held-out alignment ``h`` (the
sentinel's ``entk/sentinel/heldout_alignment``) grows above the lowest level it has taken
either exponentially in the epoch (the modular transformer) or as a power of it (the modular
MLP, about ``t^2.2``), and the accuracy reaches 0.5 when ``h`` is about ``TARGET`` (0.17-0.28 on
the development runs of both models, whatever their learning rate, weight decay or amount of
data). So at epoch ``t``:

    excess(s) = h(s) - floor,       floor = the lowest h so far (less FLOOR_MARGIN)
    for the last quarter and the last half of the epochs so far, least squares of log excess
    against s (exponential growth) and against log s (a power law); per window the better fit
    (the smaller residual) says when excess reaches TARGET - floor
    forecast  = the mean over the windows
    interval  = the earliest and latest of the same with the band's ends (``BAND``)

Assumptions, and what it does when they fail:

* The readout's held-out alignment tracks generalisation (it does on the bundled models,
  trained with weight decay, without a final LayerNorm; on a model where the held-out
  alignment stays low while accuracy rises, the forecast is late or absent).
* Growth goes on as it went in the recent past (exponentially or as a power, whichever fits
  better). When ``h`` has not risen above its floor by ``MIN_RISE``, or it is not growing, or
  it would take more than ``HORIZON`` times the epochs so far, there is no forecast: nothing
  is coming
  (control runs that memorise without generalising stay here or fall back here when their
  alignment levels off).
* The accuracy's level is 0.5 (the summary's and the benchmark's); other levels are not
  calibrated.

It knows nothing of the model, its optimiser or the bundled demos' epochs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

TARGET = 0.22  # the held-out alignment at which the accuracy reaches 0.5 (development runs)
BAND = (0.15, 0.30)  # its spread on the development runs, widened a little, for the interval
WINDOWS = (0.25, 0.5)  # the last quarter and the last half of the epochs so far
MIN_RISE = 0.03  # above the floor before the growth says anything
MIN_READINGS = 3  # in a window, for a slope
FLOOR_MARGIN = 1e-3  # below the lowest reading, so that its logarithm is finite
HORIZON = 10  # no forecast beyond this many times the epochs so far: too slow to say


@dataclass(frozen=True)
class Forecast:
    """The forecast made at epoch ``made_at``: the ``epoch`` at which the watched metric
    reaches 0.5 and the interval ``[low, high]``; all three ``None`` when nothing is coming.
    ``basis``: the numbers it rests on."""

    made_at: int
    epoch: float | None
    low: float | None
    high: float | None
    basis: str = ""

    def describe(self) -> str:
        if self.epoch is None:
            return f"at epoch {self.made_at}: nothing coming ({self.basis})"
        return (
            f"at epoch {self.made_at}: epoch {self.epoch:.0f} "
            f"(interval {self.low:.0f}-{self.high:.0f}; {self.basis})"
        )


def forecast(epochs: Sequence[float], alignment: Sequence[float], now: int) -> Forecast:
    """The forecast at epoch ``now`` from the sentinel's held-out alignment ``alignment`` read
    at ``epochs`` (those after ``now`` ignored); see the module docstring.

    Example:
        >>> epochs = list(range(0, 101, 5))  # 0.001 above the floor, growing 4% an epoch
        >>> alignment = [0.001 * math.exp(e / 25) - 0.03 for e in epochs]
        >>> f = forecast(epochs, alignment, now=100)  # reaches 0.22 at 25 log(250) = 138
        >>> round(f.epoch), f.low < f.epoch < f.high
        (138, True)
    """
    t = np.asarray(epochs, dtype=float)
    h = np.asarray(alignment, dtype=float)
    keep = (t <= now) & np.isfinite(h)
    t, h = t[keep], h[keep]
    if len(t) < MIN_READINGS:
        return Forecast(now, None, None, None, "too few readings")
    floor = float(h.min()) - FLOOR_MARGIN
    rise = float(h[-1]) - floor
    if h[-1] >= TARGET:
        return Forecast(now, float(now), float(now), float(now), f"alignment {h[-1]:.3f}")
    if rise < MIN_RISE:
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
    central = float(np.mean([r(TARGET) for r in reach]))
    if not central <= HORIZON * now:
        basis = f"alignment {h[-1]:.3f}, rising too slowly to reach {TARGET}"
        return Forecast(now, None, None, None, basis)
    low = min(r(max(BAND[0], float(h[-1]))) for r in reach)
    high = min(max(r(BAND[1]) for r in reach), HORIZON * now)
    basis = f"alignment {h[-1]:.3f} rising"
    return Forecast(now, central, min(low, central), max(high, central), basis)


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
