"""The probe kernel from shares computed by several ranks."""

import pytest
import torch
from torch import nn

from lightning_entk.distributed import assemble_row_blocks, combine_shares, kernel_share
from lightning_entk.kernel import KernelOptions, empirical_ntk


@pytest.mark.parametrize("mode", ["trace", "flatten"])
def test_row_blocks_of_equal_shares_assemble_the_kernel(mode):
    """7 points over 3 ranks: shares of 3, the last padded; class-major rows for flatten."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x = torch.randn(7, 6, dtype=torch.float64)
    share = 3
    blocks = []
    for rank in range(3):
        rows = torch.arange(rank * share, (rank + 1) * share)
        rows = torch.where(rows < len(x), rows, 0)
        blocks.append(empirical_ntk(model, x[rows], x, mode=mode))
    outputs = 3 if mode == "flatten" else 1
    kernel = assemble_row_blocks(torch.stack(blocks), n=len(x), outputs=outputs)
    torch.testing.assert_close(kernel, empirical_ntk(model, x, mode=mode), rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    ("mode", "projections"), [("trace", None), ("trace", 2), ("flatten", None)]
)
def test_kernel_shares_of_three_ranks_combine_to_the_kernel(mode, projections):
    """Each rank's share (a third of the outputs or projections, or of the points) adds up to
    the kernel of one process, the same projections drawn on every rank."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x = torch.randn(7, 6, dtype=torch.float64)
    options = KernelOptions(output_projections=projections)
    shares = torch.stack(
        [kernel_share(model, x, 3, rank, mode=mode, options=options) for rank in range(3)]
    )
    rows = 3 if mode == "flatten" else 1
    expected = empirical_ntk(model, x, mode=mode, options=options)
    torch.testing.assert_close(combine_shares(shares, mode, 7, rows), expected)
