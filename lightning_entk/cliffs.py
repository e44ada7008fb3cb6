"""Spectral cliffs: falls in a descending eigenvalue spectrum that stand out from their neighbours.

Lin, "Feature Identification via the Empirical NTK" (arXiv:2510.00468, sections 3-4) finds that
the eNTK spectrum has *cliffs*: a group of eigenvalues, then a fall, then the next group. The
eigenvectors above a cliff align with the model's features. The paper marks cliffs by hand;
:func:`find_cliffs` finds them with no threshold to tune per model.

A cliff's ``rank`` is the number of eigenvalues above it: it sits between eigenvalue ``rank - 1``
and eigenvalue ``rank`` (0-based). Its ``drop`` is ``log10(lambda[rank - 1] / lambda[rank])``.

Algorithm. With ``y_i = log10(lambda_i)``, the fall at rank ``r`` is ``g_r = y_{r-1} - y_r``.

1. Round-off floor. Eigenvalues at or below

       floor = max(rtol * lambda_max, 10 * |lambda_min|)      (the second term if lambda_min < 0)

   are numerically zero and dropped, together with the fall into them, so the numerical-rank
   edge (e.g. at ``P`` for a flattened kernel of ``P`` parameters) is never a cliff. The eNTK
   is positive semi-definite, so a negative eigenvalue is pure round-off and measures its size:
   round-off eigenvalues scatter about zero with about that magnitude on either side.
2. Local spread. For each rank ``r`` with at least ``min_plateau`` eigenvalues above the floor
   on each side, the typical fall nearby is the upper quartile of ``g`` over a window on each
   side: ``max(window, r // 2)`` falls above and ``max(window, r)`` below, i.e. at least a
   factor of 2 in index each way. Spectra decay roughly like power laws of the index, so
   neighbourhoods of a fixed index *ratio* look alike. The reference is the larger of the two
   sides, so a fall must stand out from both plateaus: on a smooth decay, which is steeper on
   the left, no fall does, and a cliff within a steep decay must stand out from the steeper
   side (on ``lambda_i ~ i^-1`` a cliff at rank 30 is found from ~2x, at rank 120 from ~1.3x).
3. Test. ``score = g_r / reference``; ``r`` is a candidate if ``score >= significance`` and
   ``g_r >= min_drop``.
4. One cliff per fall. Candidates are accepted by decreasing ``drop``, skipping any closer than
   ``min_plateau`` to one already accepted (the eigenvalue just below a large cliff often
   stands a little apart from its plateau), and returned sorted by rank.

Why these defaults.

``significance=8``: in sorted noisy data (e.g. a power law times independent log-normal
noise) the falls are like the spacings of random points, roughly exponential with a heavy
upper tail, and the largest of ~1000 reaches ~10x their median by chance. Eigenvalues of a
kernel repel each other, so eNTK spectra are far more regular: in the modular-arithmetic MLP
the 90th percentile of the falls in a plateau is ~2x their median, against ~3.3x for
exponential spacings. Measured at the upper quartile rather than the median, the reference is
~1.4x the median fall of a regular plateau but 2x that of exponential spacings, so one threshold
is stricter on noise than on eNTK plateaus. Over 1,320 synthetic spectra of 1,000 eigenvalues
per noise level (power laws ``i^-alpha`` with ``alpha`` in 0.5-4, exponential and flat
spectra, Marchenko-Pastur spectra) times log-normal noise of sigma 0, 0.01, 0.02 or 0.05 in
natural-log units, none showed a cliff; with sigma 0.1 to 0.5, which scrambles the order of
neighbouring eigenvalues, 0.2-0.3% did. On the modular MLP (p=29, n=512; docs/design.md)
the cliff at rank 57 scores 85 or more at initialization (20 seeds) and 36 or more all through
training; the one at 113 first passes the test 10-20 epochs after validation accuracy reaches
50% (8 runs), as a fall of ~1.12x, and is then found at every later evaluation. On the paper's
Toy Models of Superposition (flattened kernel, no importance rescaling) the defaults find its
hand-marked cliffs: ranks 10 (1.19x) and 50 for (m, S) = (10, 0.3), 30 and 50 for (10, 0.9),
50 for (40, 0.9).

``min_drop=0.04`` (a fall of 1.1x): the modular MLP's second cliff is ~1.5x when fully grown
and ~1.1x when it first shows; in the paper's Toy Models of Superposition the smallest cliff
marked by hand is ~1.16x. Below 1.1x a fall is not called a cliff, whatever the local
statistics: exactly degenerate plateaus (zero spread) would otherwise turn any small split
into one.

On a steep decay a fall must stand out from the steeper side: on ``i^-1`` a cliff at rank 30
is found from ~2x, at rank 120 from ~1.3x.

``window=16``, ``min_plateau=4``: a cliff separates two groups of eigenvalues whose spread can be
measured, so each side needs a few eigenvalues. In particular the top eigenvalue alone is
never a cliff: the eNTK's largest eigenvalue is usually an outlier (in the modular MLP 15-30x
above the next) and it is not a feature group. Pass ``min_plateau=1`` to report such a fall
too; its reference then comes from the side below only.

``rtol=1e-6``: kernels are usually computed in the model's float32; their round-off
eigenvalues measured here lie below ``eps32 = 1.2e-7`` of the largest (2-6e-8 for kernels of
500-4000 rows, 1.4e-8 for a flattened Toy Model of Superposition kernel). For a kernel
computed in float64 a smaller ``rtol`` (e.g. 1e-13) looks deeper into the spectrum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from lightning_entk.checks import check_int, check_number

# The typical fall near a rank is this quantile of the falls in the windows (step 2 above).
_REFERENCE_QUANTILE = 75.0
# The floor is at least this many times the magnitude of the most negative eigenvalue.
_NEGATIVE_MARGIN = 10.0
# Eigenvalues of a float32 kernel below this share of the largest are round-off (``rtol`` above).
FLOAT32_ROUND_OFF = 1e-6


@dataclass(frozen=True)
class Cliff:
    """A fall in a descending spectrum that stands out from its neighbours.

    Attributes:
        rank: eigenvalues above the cliff; it sits between 0-based indices ``rank - 1`` and
            ``rank``. In the modular MLP, 57 and 113 (docs/design.md).
        drop: ``log10(above / below)``, the size of the fall in decades (0.3 for 2x).
        score: ``drop`` over the typical fall nearby (upper quartile of the neighbouring falls
            on the side where they are larger); at least ``significance``, ``inf`` when the
            neighbouring eigenvalues are exactly degenerate.
        above: the eigenvalue just above the cliff, ``lambda[rank - 1]``.
        below: the eigenvalue just below the cliff, ``lambda[rank]``.
    """

    rank: int
    drop: float
    score: float = math.nan
    above: float = math.nan
    below: float = math.nan


def find_cliffs(
    eigenvalues,
    *,
    significance: float = 8.0,
    min_drop: float = 0.04,
    window: int = 16,
    min_plateau: int = 4,
    rtol: float = FLOAT32_ROUND_OFF,
) -> list[Cliff]:
    """The cliffs of a descending eigenvalue spectrum, by rank (algorithm in the module docstring).

    Args:
        eigenvalues: ``(k,)`` real eigenvalues in descending order (a numpy array, a torch
            tensor on any device, or a sequence), e.g. ``Spectrum.eigenvalues``. Negative values
            are treated as round-off. Increases smaller than the round-off floor are tolerated
            (ties out of order); ranks count eigenvalues in the order given.
        significance: how many times the typical fall nearby a fall must be; > 1.
        min_drop: smallest fall reported, in decades (log10 units); >= 0. 0.04 is 1.1x.
        window: fewest falls on each side from which the typical fall is measured; >= 1.
        min_plateau: fewest eigenvalues above the round-off floor on each side of a cliff, and
            between two cliffs; >= 1. With the default 4 the top eigenvalue alone is never a
            cliff.
        rtol: eigenvalues at or below ``rtol * max(eigenvalues)`` are numerically zero; in
            ``[0, 1)``.

    Returns:
        The cliffs, sorted by rank; empty if there are none.

    Raises:
        ValueError: if ``eigenvalues`` is not 1-D, not real, has NaN or infinite entries, or is
            not in descending order; or an option is out of range.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> plateaus = np.repeat([4.0, 2.0, 1.0], [20, 30, 30]) * rng.lognormal(0.0, 0.01, 80)
        >>> [c.rank for c in find_cliffs(np.sort(plateaus)[::-1])]
        [20, 50]
    """
    check_number("significance", significance, 1)
    check_number("min_drop", min_drop, 0, interval="[)")
    check_int("window", window)
    check_int("min_plateau", min_plateau)
    check_number("rtol", rtol, 0, 1, "[)")
    values = _as_eigenvalues(eigenvalues)
    if values.size == 0 or values.max() <= 0:
        return []
    floor = max(rtol * values.max(), _NEGATIVE_MARGIN * max(0.0, -values.min()))
    _check_descending(values, floor)
    # Ties reordered by round-off are put back in order; a count above a fall is unchanged.
    values = np.sort(values)[::-1]
    count = int(np.count_nonzero(values > floor))
    if count < 2 * min_plateau:
        return []
    logs = np.log10(values[:count])
    falls = np.concatenate([[np.nan], logs[:-1] - logs[1:]])  # falls[r]: the fall at rank r

    candidates = []
    for rank in range(min_plateau, count - min_plateau + 1):
        drop = float(falls[rank])
        if drop < min_drop:
            continue
        above = falls[max(1, rank - max(window, rank // 2)) : rank]
        below = falls[rank + 1 : rank + 1 + max(window, rank)]
        reference = max(
            (np.percentile(side, _REFERENCE_QUANTILE) for side in (above, below) if side.size),
            default=0.0,
        )
        score = drop / reference if reference > 0 else math.inf
        if score >= significance:
            candidates.append(
                Cliff(
                    rank=rank,
                    drop=drop,
                    score=float(score),
                    above=float(values[rank - 1]),
                    below=float(values[rank]),
                )
            )

    accepted: list[Cliff] = []
    for cliff in sorted(candidates, key=lambda c: c.drop, reverse=True):
        if all(abs(cliff.rank - other.rank) >= min_plateau for other in accepted):
            accepted.append(cliff)
    return sorted(accepted, key=lambda c: c.rank)


def _as_eigenvalues(eigenvalues) -> np.ndarray:
    if hasattr(eigenvalues, "detach"):  # a torch tensor, possibly on an accelerator
        tensor = eigenvalues.detach().cpu()
        eigenvalues = (tensor.double() if tensor.is_floating_point() else tensor).numpy()
    values = np.asarray(eigenvalues)
    if values.ndim != 1:
        raise ValueError(
            f"`eigenvalues` must be 1-D (k,), got shape {values.shape}; pass the eigenvalues, "
            "not the kernel."
        )
    if values.dtype == bool or not (
        np.issubdtype(values.dtype, np.floating) or np.issubdtype(values.dtype, np.integer)
    ):
        raise ValueError(f"`eigenvalues` must be real numbers, got dtype {values.dtype}.")
    values = values.astype(np.float64)
    if not np.isfinite(values).all():
        bad = int(np.flatnonzero(~np.isfinite(values))[0])
        raise ValueError(
            f"`eigenvalues` must be finite, got {values[bad]} at index {bad}; the kernel or its "
            "eigendecomposition failed."
        )
    return values


def _check_descending(values: np.ndarray, tolerance: float) -> None:
    rises = np.flatnonzero(np.diff(values) > tolerance)
    if rises.size:
        i = int(rises[0])
        raise ValueError(
            "`eigenvalues` must be in descending order (ranks count the eigenvalues above a "
            f"cliff), got {values[i]:.6g} at index {i} then {values[i + 1]:.6g}; "
            "np.linalg.eigvalsh returns ascending order: pass values[::-1]."
        )
