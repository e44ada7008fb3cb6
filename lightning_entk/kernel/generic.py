"""The generic path: per-example Jacobian columns by ``torch.func``, within a memory budget.

For parameters no rule covers. The parameters of the path are laid end to end as one vector
of ``P_g`` entries; :func:`generic_columns` returns the function that forms columns
``lo:hi`` of the per-example Jacobian ``(N, C, hi - lo)``: the columns enter the forward pass as
a zero offset ``delta`` on those entries, and ``vmap(jacrev)`` differentiates with respect to
``delta`` alone, points in chunks and outputs in chunks sized so that the backward passes'
gradients (``C P_touched`` numbers per point) stay within ``budget`` bytes.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
from torch import Tensor
from torch.func import jacrev, vmap

from lightning_entk.kernel.points import (
    NotDifferentiableError,
    Points,
    num_points,
    quiet_batching_fallback,
    take,
)


def generic_columns(
    names: list[str],
    params: dict[str, Tensor],
    forward_one: Callable[[dict[str, Tensor], Points], Tensor],
    points: Points,
    num_outputs: int,
    budget: int,
) -> tuple[Callable[[int, int], Tensor], int]:
    """``(columns, P_g)``: ``columns(lo, hi)`` forms Jacobian columns ``lo:hi`` of the
    parameters ``names`` on every point. ``forward_one(params, point)`` is one point's outputs
    ``(C,)`` (``point`` without its batch dim)."""
    sizes = [params[n].numel() for n in names]
    offsets = [0, *itertools.accumulate(sizes)]
    total = offsets[-1]
    n = num_points(points)

    def columns(lo: int, hi: int) -> Tensor:
        touched = [
            (name, max(lo, start) - start, min(hi, start + size) - start, max(lo, start) - lo)
            for name, start, size in zip(names, offsets, sizes, strict=False)
            if start < hi and start + size > lo
        ]

        def outputs(delta: Tensor, point: Points) -> Tensor:
            moved = dict(params)
            for name, a, b, d in touched:
                flat = params[name].reshape(-1)
                piece = flat[a:b] + delta[d : d + b - a]
                moved[name] = torch.cat([flat[:a], piece, flat[b:]]).view_as(params[name])
            return forward_one(moved, point)

        any_param = params[names[0]]
        delta = any_param.new_zeros(hi - lo)
        itemsize = any_param.element_size()
        per_output = 3 * itemsize * sum(params[name].numel() for name, *_ in touched)
        chunk_outputs = max(1, min(num_outputs, budget // max(per_output, 1)))
        per_point = per_output * chunk_outputs
        step = max(1, min(n, budget // max(per_point, 1)))
        differentiate = jacrev(outputs, chunk_size=chunk_outputs)
        out = any_param.new_empty(n, num_outputs, hi - lo)
        for start in range(0, n, step):
            chunk = take(points, slice(start, start + step))
            try:
                with quiet_batching_fallback():
                    batched = vmap(differentiate, in_dims=(None, 0))
                    out[start : start + step] = batched(delta, chunk)
            except RuntimeError:  # an operation vmap cannot batch: one point at a time
                for i in range(num_points(chunk)):
                    out[start + i] = _one_point(outputs, delta, take(chunk, i))
        return out

    return columns, total


def _one_point(outputs: Callable[[Tensor, Points], Tensor], delta: Tensor, point: Points):
    """``(C, len(delta))``: the Jacobian of one point's outputs by plain autograd, so that
    operations ``torch.func`` refuses (an ``autograd.Function`` without ``setup_context``)
    are differentiated too."""
    delta = delta.detach().requires_grad_()
    try:
        with torch.enable_grad():
            return output_gradients(outputs(delta, point)[None], [delta])[0]
    except RuntimeError as err:
        raise NotDifferentiableError.of(err) from err


# Outputs whose backward passes run together (batched): large enough for efficient matrix
# products, small enough that the batched intermediates stay near the size of the factors.
_OUTPUTS_PER_BACKWARD = 32


def output_gradients(out: Tensor, zs: list[Tensor]) -> list[Tensor]:
    """Gradients of each output column of ``out`` (N, C) with respect to each of ``zs``:
    one tensor (C, *z.shape) per z. Backward passes are batched over outputs; a model whose
    backward cannot be batched takes one pass per output."""
    n, c = out.shape
    eye = torch.eye(c, dtype=out.dtype, device=out.device)
    parts = []
    for lo in range(0, c, _OUTPUTS_PER_BACKWARD):
        seeds = eye[lo : lo + _OUTPUTS_PER_BACKWARD, None, :].expand(-1, n, c)
        try:
            grads = torch.autograd.grad(
                out, zs, grad_outputs=seeds, retain_graph=True, is_grads_batched=True,
                materialize_grads=True,  # zeros for an operation that does not reach `out`
            )  # fmt: skip
        except RuntimeError:  # an operation without a batching rule for its backward
            per_output = [
                torch.autograd.grad(out, zs, seed, retain_graph=True, materialize_grads=True)
                for seed in seeds
            ]
            grads = [torch.stack(gs) for gs in zip(*per_output, strict=True)]
        rows = len(seeds)
        grads = [
            g if g.dim() > z.dim() else g.expand(rows, *z.shape)
            for g, z in zip(grads, zs, strict=True)
        ]
        parts.append(grads)
    if len(parts) == 1:
        return list(parts[0])
    return [torch.cat(gs) for gs in zip(*parts, strict=True)]
