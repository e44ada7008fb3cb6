"""Where a batched pass holds each point: an operation's output and its factors, read back
per point.

In a batched capture (:class:`~lightning_entk.kernel.context.CaptureRoute`) one forward pass
runs a chunk of ``n`` points, and each operation's output holds them along one dim
(:class:`PointsDim`): alone (the points along dim 0), merged with positions after them
(``x.view(-1, d)``) or before them (``nn.MultiheadAttention``'s (T, N, E) merged as
``view(T * N, E)``), or not at all (a positional table looked up without a batch dim, shared
by every point). The functions here give a perturbation's shape for ``n`` points and read the
output gradients and the data factors of such a pass back as one slice per point, in the order
of one point's own pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_entk.kernel.rules import Use


@dataclass(frozen=True)
class PointsDim:
    """Where an operation's output holds the points in a batched pass: dim ``dim`` of one
    point's output, of size ``k``, has ``k n`` entries for ``n`` points, laid out as
    ``(before, n, k // before)``. ``before = 1`` is point-major (the points along dim 0, or
    merged with the positions as ``x.view(-1, d)`` does); ``before = k`` point-minor, as in
    ``nn.MultiheadAttention``'s (T, N, E) layout merged by ``view(T * N, E)``."""

    dim: int
    before: int = 1

    def batched_shape(self, shape: tuple[int, ...], n: int) -> tuple[int, ...]:
        d = self.dim
        return (*shape[:d], shape[d] * n, *shape[d + 1 :])

    def split(self, t: Tensor, shape: tuple[int, ...], n: int) -> Tensor:
        """``t`` (R, *batched shape) as (n, R, prod(shape)): each point's entries, in the
        order of one point's output."""
        d = self.dim
        parts = t.unflatten(1 + d, (self.before, n, shape[d] // self.before))
        return parts.movedim(2 + d, 0).reshape(n, t.shape[0], -1)


def candidate_dims(one: tuple[int, ...], many: tuple[int, ...], n: int) -> list | None:
    """The readings of an operation whose output has shape ``one`` for one point and ``many``
    for ``n`` points: ``[None]`` for an output shared by all points, the :class:`PointsDim`
    that fit the grown dim, or ``None`` when the points are mixed with other dims."""
    if many == one:
        return [None]
    same_rank = len(one) == len(many)
    grown = [d for d in range(len(one)) if one[d] != many[d]] if same_rank else []
    if len(grown) != 1 or many[grown[0]] != n * one[grown[0]]:
        return None
    k = one[grown[0]]
    befores = dict.fromkeys([1, k, *(b for b in range(2, k) if k % b == 0)])
    return [PointsDim(grown[0], b) for b in befores]


def batched_shape(shape: tuple[int, ...], points: PointsDim | None, n: int) -> tuple[int, ...]:
    """The shape of an operation's perturbation for ``n`` points in one batched pass: as
    ``points`` says, or, for an output shared by all points, a points dim in place of a
    leading 1 (or in front), as broadcasting would put it."""
    if points is not None:
        return points.batched_shape(shape, n)
    return (n, *shape[1:]) if shape[:1] == (1,) else (n, *shape)


def split_points(t: Tensor, shape: tuple[int, ...], points: PointsDim | None, n: int) -> Tensor:
    """``t`` (R, *batched shape) as (n, R, prod(shape)) (see :meth:`PointsDim.split`)."""
    if points is None:
        return t.reshape(t.shape[0], n, -1).transpose(0, 1)
    return points.split(t, shape, n)


def reads_points(points: PointsDim, grad: Tensor, shape: tuple[int, ...]) -> bool:
    """Whether, read with ``points``, the gradients ``grad`` (n, *batched shape) of each
    point's outputs fall on that point's own entries only (up to round-off). Gradients that
    are zero everywhere say nothing, and any reading fits them."""
    n = grad.shape[0]
    by_point = points.split(grad.abs(), shape, n).sum(dim=2)  # (entries' point, output's point)
    total = by_point.sum()
    return bool(total - by_point.diagonal().sum() <= 64 * torch.finfo(grad.dtype).eps * total)


def factors_per_point(
    uses: list[Use],
    batched_uses: list[Use],
    factors: list[Tensor],
    points: list[PointsDim | None],
    z_shapes: list[tuple[int, ...]],
    n: int,
) -> list[Tensor]:
    """The data factors of a batched pass (one per use but shifts, as ``batched_uses`` saw
    them) as (n, ...) arrays, each point's positions in the order of one point's ``uses``."""
    factors = iter(factors)
    per_point = []
    for one, many in zip(uses, batched_uses, strict=True):
        if one.kind == "ones":
            continue
        factor = next(factors).detach()
        where, shape = points[one.z], z_shapes[one.z]
        if where is None:  # a shared output: the same factor for every point
            per_point.append(factor.expand(n, *factor.shape))
        elif _point_major(one, where, shape):
            per_point.append(factor.reshape(n, -1, *factor.shape[1:]))
        else:
            per_point.append(factor[_position_order(one, many, shape, where, n)])
    return per_point


def _point_major(use: Use, points: PointsDim, shape: tuple[int, ...]) -> bool:
    """Whether the use's positions in a batched pass are its points', one after the other:
    the points lead their dim and no position dim comes before it."""
    if points.before != 1:
        return False
    if points.dim == 0:
        return True
    positions = use.out_perm[: use.position_dims]
    return use.out_shape == shape and all(d > points.dim for d in positions if d != points.dim)


def _position_order(
    one: Use, many: Use, shape: tuple[int, ...], points: PointsDim, n: int
) -> Tensor:
    """(n, T): for each point, the index of each of its positions (in the order of one point's
    use ``one``, whose operation's output has ``shape``) among the positions of the batched
    pass's use ``many``."""
    size = math.prod(many.out_shape)
    entries = torch.arange(size, device=many.layout.device)
    batched = entries.reshape(1, *points.batched_shape(shape, n))
    mine = points.split(batched, shape, n)[:, 0]  # (n, one point's entries)
    mine = _first_entry_of_positions(mine.reshape(n, *one.out_shape), one)
    theirs = _first_entry_of_positions(entries.reshape(1, *many.out_shape), many)[0]
    where = torch.full((size,), -1, dtype=torch.long, device=entries.device)
    where[theirs] = torch.arange(len(theirs), device=entries.device)
    order = where[mine]
    if (order < 0).any():
        raise RuntimeError("a use's positions do not follow its output's points")
    return order


def _first_entry_of_positions(entries: Tensor, use: Use) -> Tensor:
    """(n, T): of ``entries`` (n, *out_shape), the entry at each position's first head and
    output, positions in the use's order."""
    order = [1 + d for d in use.out_perm]
    return entries.permute(0, *order).reshape(entries.shape[0], use.positions, -1)[:, :, 0]
