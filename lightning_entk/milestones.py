"""Milestones in a run's history: when a metric first reaches a level, and which detected cliff
rank stands for an expected one.

Pure functions of plain sequences (numpy only), shared by the early-warning rules and the
bundled reproduction of arXiv:2510.00468.

The one rule for matching cliff ranks: two ranks ``a`` and ``b`` are the same cliff when
``abs(a - b) <= tolerance``. :func:`nearest_rank` applies it; a rank ``r`` is new with respect
to ``ranks`` exactly when ``nearest_rank(ranks, r, tolerance)`` is ``None``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

RANK_TOLERANCE = 2  # cliff ranks this close are one cliff


def first_epoch_reaching(
    epochs: Sequence[int] | np.ndarray, values: Sequence[float] | np.ndarray, level: float
) -> int | None:
    """The first epoch at which a series reaches ``level``.

    ``values[i]`` is the series at ``epochs[i]``; it reaches ``level`` when ``values[i] >=
    level``. NaN never reaches any level (e.g. an accuracy not measured at initialization), and
    a NaN ``level`` is reached by nothing. Of several epochs that reach it the smallest wins,
    whatever the order of ``epochs``.

    Args:
        epochs: ``(T,)`` epochs, one per value (usually ascending).
        values: ``(T,)`` the series, one value per epoch.
        level: the level to reach (inclusive).

    Returns:
        The smallest epoch whose value is at least ``level``, as an ``int``; ``None`` when no
        value reaches it (also when the series is empty).

    Raises:
        ValueError: if ``epochs`` and ``values`` are not 1-D of the same length.

    Example:
        >>> first_epoch_reaching([0, 1, 2, 3], [float("nan"), 0.4, 0.6, 0.9], 0.5)
        2
        >>> first_epoch_reaching([0, 1], [0.1, 0.2], 0.5) is None
        True
    """
    epochs = np.asarray(epochs)
    values = np.asarray(values, dtype=np.float64)
    if epochs.ndim != 1 or values.ndim != 1 or len(epochs) != len(values):
        raise ValueError(
            "`epochs` and `values` must be 1-D of the same length, got shapes "
            f"{epochs.shape} and {values.shape}."
        )
    reached = values >= level  # False for NaN, on either side
    return int(epochs[reached].min()) if reached.any() else None


def nearest_rank(ranks: Iterable[int], target: int, tolerance: int) -> int | None:
    """The rank in ``ranks`` closest to ``target``, if it is the same cliff.

    A rank is the same cliff as ``target`` when ``abs(rank - target) <= tolerance`` (the module's
    one matching rule). Of two ranks equally close, on either side of ``target``, the lower
    wins, whatever the order of ``ranks``.

    Args:
        ranks: cliff ranks, e.g. those of :func:`~lightning_entk.find_cliffs`, in any order.
        target: the rank looked for.
        tolerance: the largest distance at which a rank still counts as ``target`` (``0``:
            only ``target`` itself).

    Returns:
        The closest rank within ``tolerance`` of ``target``, as an ``int``; ``None`` when there
        is none (also when ``ranks`` is empty).

    Raises:
        ValueError: if ``tolerance`` is negative.

    Example:
        >>> nearest_rank([57, 111], 113, tolerance=2), nearest_rank([57], 113, tolerance=2)
        (111, None)
        >>> nearest_rank([115, 111], 113, tolerance=2)  # a tie: the lower rank wins
        111
    """
    if tolerance < 0:
        raise ValueError(f"`tolerance` must be non-negative, got {tolerance!r}.")
    near = [int(r) for r in ranks if abs(r - target) <= tolerance]
    return min(near, key=lambda r: (abs(r - target), r)) if near else None


def new_ranks_first_seen(
    epochs: Sequence[int], ranks: Sequence[Iterable[int]], tolerance: int
) -> dict[int, int]:
    """Each cliff rank absent from the first evaluation, with the first epoch it was seen.

    ``ranks[i]``: the cliff ranks found at ``epochs[i]`` (ascending). A rank is new when
    :func:`nearest_rank` finds no first-evaluation rank within ``tolerance``; a new rank seen
    again within ``tolerance`` of one already listed is the same cliff (listed under the rank
    it had when first seen).

    Example:
        >>> new_ranks_first_seen([0, 90, 100, 110], [[57], [57], [57, 113], [57, 112]], 2)
        {113: 100}
    """
    if len(epochs) != len(ranks):
        raise ValueError(f"one list of ranks per epoch: {len(epochs)} epochs, {len(ranks)} lists.")
    if not len(epochs):
        return {}
    baseline = [int(r) for r in ranks[0]]
    seen: dict[int, int] = {}
    for epoch, found in zip(epochs[1:], ranks[1:], strict=True):
        for r in found:
            if nearest_rank(baseline, int(r), tolerance) is None:
                if nearest_rank(seen, int(r), tolerance) is None:
                    seen[int(r)] = int(epoch)
    return seen
