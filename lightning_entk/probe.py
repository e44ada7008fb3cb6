"""The probe set: the fixed points on which the monitor computes the eNTK.

A probe is given explicitly (a tensor of points, a dict of tensors, a pair ``(x, y)``, a
``Dataset``, a ``DataLoader`` or a :class:`ProbeSet`), or drawn from the training and validation
data. Drawing takes items from the loaders' datasets by index, with its own seeded generator: the
global RNG is never touched, and every process of a distributed run draws the same points.

Dataset items may be ``x``, ``(x, y, ...)`` or a dict of tensors (as Hugging Face datasets
give): the label is read from the first of :data:`LABEL_KEYS` present, the other tensor entries
are the points, passed to the model as keyword arguments.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, default_collate

from lightning_entk.kernel.points import Points, leaves, num_points, take

DEFAULT_MAX_PROBE_POINTS = 1024  # a 1024 x 1024 float64 kernel is 8 MiB; eigh takes ~0.1 s

LABEL_KEYS = ("labels", "label", "y", "target", "targets")
"""Keys of a dict item holding its label, in order of preference."""

INPUT_KEYS = ("x", "input", "inputs", "features")
"""Keys of a dict item whose tensor, alone beside the labels, is the model's whole input."""

_ITEM_KINDS = (
    "x, (x, y, ...) or a dict of tensors (the label under one of "
    + ", ".join(f"'{k}'" for k in LABEL_KEYS)
    + ")"
)


@dataclass(frozen=True)
class ProbeSet:
    """Probe points, with optional labels and a held-out mask.

    Attributes:
        x: points: a tensor ``(N, ...)``, a tuple or list of tensors (the model is called as
            ``model(*x)``) or a dict of tensors (``model(**x)``), every tensor ``(N, ...)``.
        y: integer class labels ``(N,)``, or ``None``. With labels the monitor logs
            kernel-target alignment and the accuracy of eNTK kernel regression.
        heldout: ``(N,)`` bool, the points that kernel regression predicts from the others
            (validation points when drawn by default), or ``None``.

    Raises:
        ValueError: for points that are not tensors with one shared leading dim N, or labels or
            a mask not ``(N,)``, or float labels.
    """

    x: Points
    y: Tensor | None = None
    heldout: Tensor | None = None

    def __post_init__(self) -> None:
        _check_structure(self.x)
        n = num_points(self.x)
        for name in ("y", "heldout"):
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != (n,):
                raise ValueError(
                    f"`{name}` must have shape ({n},) to match x, got {tuple(value.shape)}."
                )
        if self.y is not None and self.y.is_floating_point():
            raise ValueError("`y` must hold integer class labels (N,), got a float tensor.")

    def __len__(self) -> int:
        return num_points(self.x)

    def subset(self, count: int, seed: int = 0) -> ProbeSet:
        """``count`` of the points (itself if it has no more): a seeded random choice, kept in
        index order. With a held-out mask, held-out and other points keep their proportions,
        at least one of each, so kernel regression still has points to predict and to fit.

        Raises:
            ValueError: for ``count`` < 1.
        """
        n = len(self)
        if count >= n:
            return self
        if count < 1:
            raise ValueError(f"A probe subset needs at least one point, got count={count}.")
        generator = torch.Generator().manual_seed(seed)
        if self.heldout is None:
            index = torch.randperm(n, generator=generator)[:count]
        else:
            held = self.heldout.cpu().nonzero().flatten()
            rest = (~self.heldout.cpu()).nonzero().flatten()
            n_held = round(count * len(held) / n)
            if len(held) and len(rest) and count >= 2:
                n_held = min(max(n_held, 1), count - 1)
            index = torch.cat(
                [
                    held[torch.randperm(len(held), generator=generator)[:n_held]],
                    rest[torch.randperm(len(rest), generator=generator)[: count - n_held]],
                ]
            )
        index = index.sort().values
        y = None if self.y is None else self.y[index.to(self.y.device)]
        heldout = None if self.heldout is None else self.heldout[index.to(self.heldout.device)]
        if heldout is not None and (heldout.all() or not heldout.any()):
            heldout = None  # nothing left to predict, or nothing to predict from
        return ProbeSet(take(self.x, index), y, heldout)


def _check_structure(x: object) -> None:
    """Raise ``ValueError`` unless ``x`` is a tensor, or a tuple, list or dict of tensors, all
    with at least one dim and the same length along dim 0."""
    flat = leaves(x) if isinstance(x, (Tensor, tuple, list, dict)) else [x]
    if not flat or not all(isinstance(t, Tensor) for t in flat):
        raise ValueError(
            "Probe points `x` must be a tensor (N, ...), or a tuple, list or dict of such "
            f"tensors, got {_describe(x)}."
        )
    if any(t.ndim == 0 for t in flat) or len({t.shape[0] for t in flat}) != 1:
        raise ValueError(
            "Every tensor of the probe points `x` must have the points along dim 0, the same "
            f"number in each, got shapes {[tuple(t.shape) for t in flat]}."
        )


def _describe(x: object) -> str:
    if isinstance(x, dict):
        return "a dict of " + ", ".join(f"{k!r}: {type(v).__name__}" for k, v in x.items())
    if isinstance(x, (tuple, list)):
        return f"a {type(x).__name__} of " + ", ".join(type(v).__name__ for v in x)
    return type(x).__name__


def as_probe_set(probe: object, max_points: int = DEFAULT_MAX_PROBE_POINTS) -> ProbeSet:
    """An explicit probe as a :class:`ProbeSet` (a Dataset or DataLoader is read up to
    ``max_points`` points; tensors are kept whole).

    A tensor or a dict of tensors is taken as points without labels (a dict is passed to the
    model as keyword arguments, none of its keys read as labels); ``(points, y)`` adds labels.

    Raises:
        ValueError: for a probe of an unsupported kind or empty.
    """
    if isinstance(probe, ProbeSet):
        return probe
    if isinstance(probe, (Tensor, dict)):
        return ProbeSet(probe)
    if (
        isinstance(probe, (tuple, list))
        and len(probe) == 2
        and isinstance(probe[0], (Tensor, dict))
    ):
        return ProbeSet(probe[0], None if probe[1] is None else torch.as_tensor(probe[1]))
    if isinstance(probe, (DataLoader, Dataset)):
        dataset = probe.dataset if isinstance(probe, DataLoader) else probe
        drawn = _from_dataset(dataset, max_points, seed=0)
        if drawn is None:
            raise ValueError(
                f"`probe` must hold at least one point, got an empty {type(probe).__name__}."
            )
        return drawn
    raise ValueError(
        "`probe` must be a tensor of points, a dict of tensors, a pair (points, y), a Dataset, a "
        f"DataLoader, a ProbeSet or None (draw from the training data), got "
        f"{type(probe).__name__}."
    )


def draw_probe_set(
    train: Dataset | None, val: Dataset | None, max_points: int, seed: int = 0
) -> ProbeSet:
    """Up to ``max_points`` points from the training and validation datasets, validation points
    marked held out. Validation takes at most half; training fills the rest.

    Raises:
        ValueError: if there is no data to draw from, or the training and validation points
            differ in structure or per-point shape.
    """
    if train is None and val is None:
        raise ValueError(
            "ENTKMonitor found no training or validation data to draw a probe set from; pass "
            "`probe=` (points, a dict of tensors, (x, y), a Dataset or a DataLoader)."
        )
    val_size = _length(val)
    n_val = min(val_size, max_points // 2 if train is not None else max_points)
    n_train = min(_length(train), max_points - n_val)
    parts = [
        p for p in (_from_dataset(train, n_train, seed), _from_dataset(val, n_val, seed + 1)) if p
    ]
    if not parts:
        raise ValueError(
            "ENTKMonitor found only empty training and validation datasets to draw a probe set "
            "from; pass `probe=` explicitly."
        )
    x = concat_points([p.x for p in parts])
    labels = [p.y for p in parts]
    y = torch.cat(labels) if all(label is not None for label in labels) else None
    heldout = torch.cat(
        [torch.full((len(p),), i == 1 or train is None) for i, p in enumerate(parts)]
    )
    return ProbeSet(x, y, heldout if heldout.any() and not heldout.all() else None)


def concat_points(parts: Sequence[Points]) -> Points:
    """Points of one structure joined along dim 0, leaf by leaf: tensors, tuples or lists of
    the same length, dicts with the same keys (in the first part's order).

    Raises:
        ValueError: for parts of different structures or keys, or of different per-point
            shapes.
    """
    first = parts[0]
    if isinstance(first, Tensor):
        if not all(isinstance(p, Tensor) for p in parts):
            raise ValueError(_mismatch(parts))
        try:
            return torch.cat(list(parts))
        except RuntimeError as err:
            raise ValueError(
                "Probe points to join must have the same per-point shape, got "
                f"{[tuple(p.shape[1:]) for p in parts]}; pad them alike or pass `probe=`."
            ) from err
    if isinstance(first, dict):
        if not all(isinstance(p, dict) and p.keys() == first.keys() for p in parts):
            raise ValueError(_mismatch(parts))
        return {key: concat_points([p[key] for p in parts]) for key in first}
    if isinstance(first, (tuple, list)):
        if not all(type(p) is type(first) and len(p) == len(first) for p in parts):
            raise ValueError(_mismatch(parts))
        return type(first)(concat_points([p[i] for p in parts]) for i in range(len(first)))
    raise ValueError(_mismatch(parts))


def _mismatch(parts: Sequence[Points]) -> str:
    return (
        "Probe points to join (training and validation) must have the same structure and keys, "
        f"got {'; '.join(_describe(p) for p in parts)}; pass `probe=` explicitly."
    )


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


def seeded_choice(n: int, count: int, seed: int = 0) -> Tensor:
    """``count`` of the indices ``0 .. n-1`` (all when ``count >= n``): a seeded random choice,
    in increasing order."""
    if count >= n:
        return torch.arange(n)
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=generator)[:count].sort().values


def _from_dataset(dataset: Dataset | None, count: int, seed: int) -> ProbeSet | None:
    """``count`` items of a map-style dataset: all in order when it has no more, else a seeded
    random subset in index order."""
    size = _length(dataset)
    count = min(count, size)
    if count == 0:
        return None
    indices = range(size) if count == size else seeded_choice(size, count, seed).tolist()
    items = [dataset[i] for i in indices]
    try:
        batch = default_collate(items)
    except (RuntimeError, TypeError) as err:
        raise ValueError(
            f"ENTKMonitor could not stack the items of {type(dataset).__name__} into probe "
            f"points ({err}); items of different shapes (e.g. unpadded token sequences) need "
            "padding to one length, or pass `probe=` explicitly."
        ) from err
    return _split_batch(batch)


def _split_batch(batch: object) -> ProbeSet:
    """Points and labels from collated dataset items: ``x``, ``(x, y, ...)`` or a dict of
    tensors. Labels other than integer ``(N,)`` (regression targets, one-hot rows) are
    dropped."""
    if isinstance(batch, Tensor):
        return ProbeSet(batch)
    if isinstance(batch, Mapping):
        return _split_dict(batch)
    if isinstance(batch, Sequence) and len(batch) >= 1:
        x = batch[0]
        if isinstance(x, Mapping):
            x = _tensor_entries(x, type(batch).__name__)
        if isinstance(x, (Tensor, dict)):
            y = batch[1] if len(batch) > 1 and isinstance(batch[1], Tensor) else None
            return ProbeSet(x, _class_labels(y))
    raise ValueError(
        f"ENTKMonitor reads dataset items as {_ITEM_KINDS}, got {_describe(batch)} after "
        "collation; pass `probe=` explicitly."
    )


def _split_dict(batch: Mapping) -> ProbeSet:
    label_key = next((k for k in LABEL_KEYS if k in batch), None)
    y = batch[label_key] if label_key is not None else None
    # Every label key is kept out of the points: a model taking `labels` (as Hugging Face models
    # do) would otherwise compute a loss on each kernel evaluation.
    x = _tensor_entries({k: v for k, v in batch.items() if k not in LABEL_KEYS}, "dict")
    # A dataset of {"x": ..., "y": ...} is made for a model taking one tensor: `model(x)`, not
    # `model(x=...)`, which a `forward(self, inputs)` would not accept.
    if len(x) == 1 and next(iter(x)) in INPUT_KEYS:
        x = next(iter(x.values()))
    return ProbeSet(x, _class_labels(y if isinstance(y, Tensor) else None))


def _tensor_entries(entries: Mapping, kind: str) -> dict[str, Tensor]:
    """The tensor entries of a collated dict item (strings, lists and nested values dropped).

    Raises:
        ValueError: if none is a tensor.
    """
    tensors = {k: v for k, v in entries.items() if isinstance(v, Tensor)}
    if not tensors:
        raise ValueError(
            f"ENTKMonitor found no tensor inputs in the dataset's {kind} items (keys "
            f"{list(entries)}, labels aside); return tensors (for a Hugging Face dataset, "
            "`dataset.set_format('torch')` after tokenizing with padding), or pass `probe=` "
            "explicitly."
        )
    return tensors


def _class_labels(y: Tensor | None) -> Tensor | None:
    """``y`` if it is integer class labels ``(N,)``, else ``None`` (regression targets or
    one-hot rows: no class labels for the probe)."""
    if y is None or y.is_floating_point() or y.is_complex() or y.ndim != 1:
        return None
    return y
