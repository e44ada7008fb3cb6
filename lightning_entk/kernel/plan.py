"""Planning: the route each parameter takes, and what an evaluation will cost, before running.

:func:`ntk_plan` runs discovery only (one forward pass of one point) and predicts, per
parameter, the arithmetic and the memory of its share; the totals add the capture passes and
the kernel itself. Times are predicted from one measured matrix product on the device (its
flop rate) and one measured forward pass, so they are estimates to within a small factor; the
memory is counted array by array.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from lightning_entk.kernel.assembly import block_route, transposed_uses
from lightning_entk.kernel.context import CaptureRoute, ntk_context
from lightning_entk.kernel.factors import dense_flops, gram_flops, tied_flops
from lightning_entk.kernel.options import KernelOptions
from lightning_entk.kernel.points import Points, num_points


@dataclass(frozen=True)
class ParameterRoute:
    """One parameter's route: ``structured`` (factors, Gram products), ``tied`` (used through
    a view ``V`` and its transpose, a tied embedding and unembedding: factors, Gram products
    and their cross terms), ``columns`` (other sets of layouts: Jacobian columns formed from
    factors) or ``generic`` (``torch.func``), with the operations that use it, its factor sizes
    T, H, B, A and its predicted cost."""

    name: str
    shape: tuple[int, ...]
    route: str
    uses: int
    detail: str
    flops: float
    bytes: int


@dataclass(frozen=True)
class NTKPlan:
    """What :func:`~lightning_entk.empirical_ntk` will do on these points, before it runs."""

    parameters: list[ParameterRoute]
    num_points: int
    num_outputs: int
    mode: str
    predicted_seconds: float
    predicted_peak_bytes: int
    capture: str
    factor_bytes: int = 0  # of the factors held for all points (grows with N)
    kernel_bytes: int = 0  # of the kernel and its running sum (grows with N^2)
    chunk_bytes: int = 0  # of one capture pass or generic block (bounded by the budget)
    capture_reason: str = ""  # why points are not captured in one batched pass
    num_groups: int = 0  # parameter groups whose kernels are formed besides the whole

    def peak_bytes(self, num_points: int | None = None) -> int:
        """Predicted peak of an evaluation on ``num_points`` points like these (default: the
        plan's own)."""
        scale = 1.0 if num_points is None else num_points / self.num_points
        return int(self.factor_bytes * scale + self.kernel_bytes * scale**2 + self.chunk_bytes)

    def routes(self) -> dict[str, str]:
        """Parameter name -> route."""
        return {p.name: p.route for p in self.parameters}

    def __str__(self) -> str:
        width = max([len(p.name) for p in self.parameters] + [9])
        note = {
            "batched": "; points captured in batched passes",
            "vmap": "; points captured under vmap",
            "per point": "; points captured one at a time",
        }[self.capture] + (f" ({self.capture_reason})" if self.capture_reason else "")
        if all(p.route == "generic" for p in self.parameters):
            note = ""
        peak = self.predicted_peak_bytes / 2**20
        lines = [
            f"eNTK plan: N={self.num_points}, C={self.num_outputs}, mode={self.mode!r}; predicted "
            f"{self.predicted_seconds:.2g} s, peak {peak:.0f} MiB{note}",
            f"{'parameter':<{width}}  {'shape':<16} {'route':<10} {'uses':>4}  detail",
        ]
        for p in self.parameters:
            shape = "x".join(map(str, p.shape)) or "scalar"
            lines.append(f"{p.name:<{width}}  {shape:<16} {p.route:<10} {p.uses:>4}  {p.detail}")
        return "\n".join(lines)


def ntk_plan(
    model: nn.Module,
    x1: Points,
    x2: Points | None = None,
    *,
    mode: str = "trace",
    options: KernelOptions | None = None,
    **kernel_options: object,
) -> NTKPlan:
    """The route of every counted parameter, how points are captured, and the predicted time
    and peak memory of :func:`~lightning_entk.empirical_ntk` with the same arguments (the
    groups' kernels included when ``groups`` is set).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
        >>> plan = ntk_plan(model, torch.randn(5, 3))
        >>> sorted(set(plan.routes().values())), plan.capture
        (['structured'], 'batched')
    """
    options = KernelOptions.of(options, **kernel_options)
    with ntk_context(model, x1, x2, options) as ctx:
        structure = ctx.structure(ctx.x1)
        c = ctx.num_outputs()
        n1 = num_points(ctx.x1)
        n2 = n1 if ctx.x2 is None else num_points(ctx.x2)
        groups = 0 if ctx.group_of is None else len(set(ctx.group_of.values()))
        return _predict(ctx, structure, mode, c, n1, n2, groups)


def _predict(ctx, structure, mode, c, n1, n2, groups) -> NTKPlan:
    itemsize = torch.empty((), dtype=ctx.dtype).element_size()
    n = n1 + (0 if ctx.x2 is None else n2)
    rows, flops_total, factor_bytes = [], 0.0, 0
    by_param: dict[str, list] = {}
    for use in structure.uses:
        by_param.setdefault(use.param, []).append(use)
    for name in ctx.names:
        shape = tuple(ctx.params[name].shape)
        size = ctx.params[name].numel()
        if name in structure.generic:
            flops = dense_flops(n1, n2, 1, 1, size, c, mode)
            rows.append(
                ParameterRoute(name, shape, "generic", 0, structure.generic[name], flops, 0)
            )
        else:
            uses = by_param[name]
            route = block_route(uses)
            h, b, a = uses[0].layout.shape
            flipped = transposed_uses(uses) if route == "tied" else [False] * len(uses)
            sides = [[u for u, f in zip(uses, flipped, strict=True) if f == side]
                     for side in (False, True)]  # fmt: skip
            t = (sum(u.positions for u in sides[0]), sum(u.positions for u in sides[1]))
            across = (_dot_length(sides[1], b), _dot_length(sides[0], a))
            if route == "tied":
                flops = min(tied_flops(n1, n2, t, t, h, across, size, c, mode))
            else:
                flops = min(
                    gram_flops(n1, n2, t[0], t[0], h, across[1], b, c, mode),
                    dense_flops(n1, n2, t[0], t[0], size, c, mode),
                )
            held = n * (t[0] * (c * h * b + h * a) + t[1] * (c * h * a + h * b)) * itemsize
            detail = (
                f"T={sum(t)} H={h} B={b} A={a}"
                + {
                    "structured": "",
                    "tied": f" (V at T={t[0]}, V^T at T={t[1]})",
                    "columns": " (several layouts)",
                }[route]
            )
            rows.append(ParameterRoute(name, shape, route, len(uses), detail, flops, held))
            factor_bytes += held
        flops_total += rows[-1].flops
    per_entry = {"trace": 1, "diagonal": c}.get(mode, c * c)
    # The kernel and one block's share; with groups, each group's kernel and the whole.
    kernel_bytes = (2 + groups) * n1 * n2 * per_entry * itemsize
    chunk = ctx.budget.piece if structure.uses or structure.generic else 0
    peak = factor_bytes + kernel_bytes + chunk
    # Discovery timed the chosen capture route on a few points: one point at a time costs that
    # per point; a batched pass over a chunk costs about as much as the trial (overhead-bound
    # for the small models where capture matters), vmap a little more per point.
    per_trial = {CaptureRoute.BATCHED: 1 / ctx.batch_size, CaptureRoute.VMAP: 1 / 64}.get(
        structure.capture, 1 / max(structure.trial_points, 1)
    )
    captures = max(1.0, n * per_trial) * structure.trial_seconds if structure.uses else 0.0
    seconds = flops_total / _flop_rate(ctx.dtype, ctx.device) + captures
    return NTKPlan(
        rows, n1, c, mode, seconds, int(peak), structure.capture.value, factor_bytes,
        kernel_bytes, chunk, structure.capture_reason, groups,
    )  # fmt: skip


def _dot_length(uses: list, inputs: int) -> int:
    """The length of a dot product with the inputs of ``uses``: 1 for token ids (a gather)."""
    return 1 if uses and all(u.kind == "tokens" for u in uses) else inputs


_RATES: dict[tuple, float] = {}


def _flop_rate(dtype: torch.dtype, device: torch.device) -> float:
    """Flops per second of a 512^3 matrix product on ``device``, measured once."""
    key = (dtype, str(device))
    if key not in _RATES:
        a = torch.randn(512, 512, dtype=dtype, device=device)
        a @ a
        best = math.inf
        for _ in range(5):  # the fastest of a few: other work on the machine only slows one
            start = time.perf_counter()
            a @ a
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
        _RATES[key] = 2 * 512**3 / max(best, 1e-9)
    return _RATES[key]
