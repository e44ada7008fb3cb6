"""The probe set: the fixed points on which the monitor computes the eNTK.

A probe is given explicitly (a tensor of points, a pair ``(x, y)``, a ``Dataset``, a
``DataLoader`` or a :class:`ProbeSet`), or drawn from the training and validation data. Drawing
takes items from the loaders' datasets by index, with its own seeded generator: the global RNG
is never touched, and every process of a distributed run draws the same points.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, default_collate

DEFAULT_MAX_PROBE_POINTS = 1024  # a 1024 x 1024 float64 kernel is 8 MiB; eigh takes ~0.1 s


@dataclass(frozen=True)
class ProbeSet:
    """Probe points, with optional labels and a held-out mask.

    Attributes:
        x: points ``(N, ...)``.
        y: integer class labels ``(N,)``, or ``None``. With labels the monitor logs
            kernel-target alignment and the accuracy of eNTK kernel regression.
        heldout: ``(N,)`` bool, the points that kernel regression predicts from the others
            (validation points when drawn by default), or ``None``.
    """

    x: Tensor
    y: Tensor | None = None
    heldout: Tensor | None = None

    def __post_init__(self) -> None:
        n = len(self.x)
        for name in ("y", "heldout"):
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != (n,):
                raise ValueError(
                    f"`{name}` must have shape ({n},) to match x, got {tuple(value.shape)}."
                )
        if self.y is not None and self.y.is_floating_point():
            raise ValueError("`y` must hold integer class labels (N,), got a float tensor.")

    def __len__(self) -> int:
        return len(self.x)


def as_probe_set(probe: object, max_points: int = DEFAULT_MAX_PROBE_POINTS) -> ProbeSet:
    """An explicit probe as a :class:`ProbeSet` (a Dataset or DataLoader is read up to
    ``max_points`` points; tensors are kept whole).

    Raises:
        ValueError: for a probe of an unsupported kind or empty.
    """
    if isinstance(probe, ProbeSet):
        return probe
    if isinstance(probe, Tensor):
        return ProbeSet(probe)
    if isinstance(probe, (tuple, list)) and len(probe) == 2 and isinstance(probe[0], Tensor):
        return ProbeSet(probe[0], None if probe[1] is None else torch.as_tensor(probe[1]))
    if isinstance(probe, DataLoader):
        return _from_dataset(probe.dataset, max_points, seed=0)
    if isinstance(probe, Dataset):
        return _from_dataset(probe, max_points, seed=0)
    raise ValueError(
        "`probe` must be a tensor of points, a pair (x, y), a Dataset, a DataLoader, a ProbeSet "
        f"or None (draw from the training data), got {type(probe).__name__}."
    )


def draw_probe_set(
    train: Dataset | None, val: Dataset | None, max_points: int, seed: int = 0
) -> ProbeSet:
    """Up to ``max_points`` points from the training and validation datasets, validation points
    marked held out. Validation takes at most half; training fills the rest.

    Raises:
        ValueError: if there is no data to draw from.
    """
    if train is None and val is None:
        raise ValueError(
            "ENTKMonitor found no training or validation data to draw a probe set from; pass "
            "`probe=` (points, (x, y), a Dataset or a DataLoader)."
        )
    val_size = _length(val)
    n_val = min(val_size, max_points // 2 if train is not None else max_points)
    n_train = min(_length(train), max_points - n_val)
    parts = [
        p for p in (_from_dataset(train, n_train, seed), _from_dataset(val, n_val, seed + 1)) if p
    ]
    x = torch.cat([p.x for p in parts])
    labels = [p.y for p in parts]
    y = torch.cat(labels) if all(label is not None for label in labels) else None
    heldout = torch.cat(
        [torch.full((len(p),), i == 1 or train is None) for i, p in enumerate(parts)]
    )
    return ProbeSet(x, y, heldout if heldout.any() and not heldout.all() else None)


def _length(dataset: Dataset | None) -> int:
    if dataset is None:
        return 0
    try:
        return len(dataset)
    except TypeError as err:
        raise ValueError(
            f"ENTKMonitor cannot draw probe points from a {type(dataset).__name__} without a "
            "length (an iterable dataset); pass `probe=` explicitly."
        ) from err


def _from_dataset(dataset: Dataset | None, count: int, seed: int) -> ProbeSet | None:
    """``count`` items of a map-style dataset: all in order when it has no more, else a seeded
    random subset in index order."""
    size = _length(dataset)
    count = min(count, size)
    if count == 0:
        return None
    if count == size:
        indices = range(size)
    else:
        generator = torch.Generator().manual_seed(seed)
        indices = torch.randperm(size, generator=generator)[:count].sort().values.tolist()
    batch = default_collate([dataset[i] for i in indices])
    return _split_batch(batch)


def _split_batch(batch: object) -> ProbeSet:
    if isinstance(batch, Tensor):
        return ProbeSet(batch)
    if isinstance(batch, Sequence) and len(batch) >= 1 and isinstance(batch[0], Tensor):
        y = batch[1] if len(batch) > 1 and isinstance(batch[1], Tensor) else None
        if y is not None and (y.is_floating_point() or y.ndim != 1):
            y = None  # regression targets or one-hot rows: no class labels for the probe
        return ProbeSet(batch[0], y)
    raise ValueError(
        f"ENTKMonitor reads dataset items as x or (x, y, ...), got {type(batch).__name__}; "
        "pass `probe=` explicitly."
    )


def kernel_memory_bytes(rows: int) -> int:
    """Memory of one evaluation's dense kernel work: the kernel in its own dtype, a float64 copy,
    eigenvectors and the previous kernel kept for velocity: about 4 R^2 float64 entries."""
    return 4 * 8 * rows**2


def max_rows_within(memory_budget: int) -> int:
    """Largest R with :func:`kernel_memory_bytes` (R) within ``memory_budget``."""
    return math.isqrt(memory_budget // 32)
