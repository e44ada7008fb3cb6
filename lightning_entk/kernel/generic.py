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

from lightning_entk.kernel.points import Points, num_points, quiet_batching_fallback, take


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
                    out[start + i] = differentiate(delta, take(chunk, i))
        return out

    return columns, total
