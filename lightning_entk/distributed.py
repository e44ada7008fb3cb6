"""The probe kernel shared among processes: each rank computes a share, rank 0 assembles it.

``trace``: each rank takes an equal share of the output projections (the identity's columns
for the exact kernel), so that its backward passes and Gram products are ``1/world`` of the
work, and the shares are summed. ``flatten``: each rank computes the kernel rows of an equal
share of the probe points, which rank 0 puts in order. A rank whose share fails sends NaN
(:func:`failed_share`) so that every rank still reaches the collective: a failure cannot
deadlock the run, and rank 0 skips the evaluation.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lightning_entk.kernel import KernelOptions, empirical_ntk
from lightning_entk.kernel.context import num_outputs
from lightning_entk.kernel.options import compute_dtype, projection_matrix
from lightning_entk.kernel.points import Points, num_points, take


def kernel_share(
    model: nn.Module, x: Points, world: int, rank: int, *, mode: str, options: KernelOptions
) -> Tensor:
    """Rank ``rank``'s share of the probe kernel of ``x`` (the whole kernel, without groups),
    float64: ``trace`` ``(N, N)``; ``flatten`` ``(C * ceil(N / world), C * N)`` (the last share
    padded with copies of point 0)."""
    n = num_points(x)
    options = options.replace(groups=None)
    if mode == "flatten":
        share = math.ceil(n / world)
        rows = torch.arange(rank * share, (rank + 1) * share)
        rows = torch.where(rows < n, rows, 0)  # equal shares for the gather
        return empirical_ntk(model, take(x, rows), x, mode=mode, options=options).double()
    outputs = num_outputs(model, x, options.output_fn, options.forward_fn)
    columns = projection_matrix(
        outputs, options.output_projections, options.projection_seed,
        dtype=compute_dtype(model), device=_device(model),
    ).tensor_split(world, dim=1)[rank]  # fmt: skip
    if columns.shape[1] == 0:  # more ranks than projections
        return torch.zeros(n, n, dtype=torch.float64, device=_device(model))
    share = options.replace(output_projections=columns)
    return empirical_ntk(model, x, mode="trace", options=share).to(torch.float64)


def failed_share(n: int, world: int, mode: str, rows_per_point: int, device) -> Tensor:
    """A share of NaN, of the shape :func:`kernel_share` would have returned."""
    rows = n if mode == "trace" else rows_per_point * math.ceil(n / world)
    return torch.full((rows, rows_per_point * n), torch.nan, dtype=torch.float64, device=device)


def combine_shares(shares: Tensor, mode: str, n: int, rows_per_point: int) -> Tensor:
    """The kernel from the ``(world, ...)`` stack of every rank's :func:`kernel_share`."""
    if mode == "trace":
        return shares.sum(0)
    return assemble_row_blocks(shares, n, rows_per_point)


def assemble_row_blocks(blocks: Tensor, n: int, outputs: int) -> Tensor:
    """The kernel of ``n`` probe points from the row blocks of equal shares of them.

    Args:
        blocks: ``(world, outputs * share, outputs * n)``: block ``r`` holds the kernel rows of
            points ``r * share .. (r + 1) * share - 1`` (class-major when ``outputs`` > 1,
            padded past ``n``) against all ``n`` points.
        n: probe points.
        outputs: kernel rows per point: 1 for ``trace``, C for ``flatten``.

    Example:
        >>> k = torch.arange(16.0).reshape(4, 4)
        >>> blocks = torch.stack([k[:2], k[2:]])
        >>> torch.equal(assemble_row_blocks(blocks, n=4, outputs=1), k)
        True
    """
    world, columns = blocks.shape[0], blocks.shape[2]
    share = blocks.shape[1] // outputs
    by_class = blocks.reshape(world, outputs, share, columns).transpose(0, 1)
    return by_class.reshape(outputs, world * share, columns)[:, :n].reshape(outputs * n, columns)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
