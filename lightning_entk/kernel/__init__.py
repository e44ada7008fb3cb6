"""The empirical neural tangent kernel of a ``torch.nn.Module``.

For a network ``f`` with parameters ``W`` and probe points ``x``, ``x'``

    K_ij(x, x') = sum_mu  d f_i(x) / d W_mu  *  d f_j(x') / d W_mu  =  J(x) J(x')^T

Symbols, used in every shape of this package:

    N   probe points (N1, N2 for a cross kernel)
    C   model outputs
    P   parameters counted
    T   positions of one use of a parameter per example: sequence and spatial positions,
        broadcast dims; repeated uses add theirs
    H   heads: dims of a parameter shared with its operation's input and output
    k   eigenpairs

Modes (the conventions of docs/design.md):

    ``full``      (N1, N2, C, C)   K[n, m, i, j]
    ``trace``     (N1, N2)         sum_c K[n, m, c, c]   -- a *sum* over outputs, not a mean
    ``diagonal``  (N1, N2, C)      K[n, m, c, c]
    ``flatten``   (C*N1, C*N2)     class-major: row c*N1 + n, column d*N2 + m is K[n, m, c, d]

The engine, by part:

    ``points``    probe points as pytrees (tensor, tuple, dict), the model's outputs as (N, C)
    ``capture``   which operations use which parameters, through which views, in a forward pass
    ``rules``     the normal form of each kind of operation linear in a parameter
    ``factors``   the Jacobian as blocks of factors, and the kernel contracted from them
    ``generic``   ``torch.func`` Jacobian columns for what no rule covers, within a budget
    ``options``   :class:`KernelOptions`, every choice besides points and mode, its checks,
                  parameter selection and groups
    ``budget``    :class:`MemoryBudget`, the one place where the memory budget is divided
    ``layout``    where a batched pass holds each point, read back per point
    ``assembly``  each use's factors, and the blocks of the Jacobian made from them
    ``context``   the driver that ties these together (discovery, the capture route, the
                  check), and what it keeps across calls
    ``plan``      the route of each parameter and the predicted cost, before running

:func:`empirical_ntk` is the one entry point. Its cost is one backward pass per output, so the
``trace`` kernel of a model with thousands of outputs can instead be *estimated* from ``s``
random projections of the outputs (``output_projections=s``).
"""

from __future__ import annotations

from torch import Tensor, nn

from lightning_entk.kernel.budget import DEFAULT_MEMORY_BUDGET
from lightning_entk.kernel.context import ntk_context
from lightning_entk.kernel.options import (
    Groups,
    KernelOptions,
    NTKMethod,
    ParamSelection,
    check_choice,
    check_projection_mode,
)
from lightning_entk.kernel.plan import NTKPlan, ntk_plan
from lightning_entk.kernel.points import ForwardFn, NotDifferentiableError, OutputFn, Points

MODES = ("full", "trace", "diagonal", "flatten")

# The public API; the package's own modules import what else they need from where it is
# defined.
__all__ = [
    "DEFAULT_MEMORY_BUDGET",
    "MODES",
    "ForwardFn",
    "Groups",
    "KernelOptions",
    "NTKMethod",
    "NTKPlan",
    "NotDifferentiableError",
    "OutputFn",
    "ParamSelection",
    "Points",
    "empirical_ntk",
    "ntk_plan",
]


def empirical_ntk(
    model: nn.Module,
    x1: Points,
    x2: Points | None = None,
    *,
    mode: str = "trace",
    options: KernelOptions | None = None,
    **kernel_options: object,
) -> Tensor | dict[str, Tensor]:
    """Empirical NTK ``J(x1) J(x2)^T`` of ``model`` between two sets of points.

    Every parameter is recognised by the operations that use it (see :class:`NTKMethod` and
    :func:`ntk_plan`), whatever module holds it. The model is evaluated in eval mode (dropout
    off, BatchNorm on running statistics) and without autocast; its train/eval mode,
    ``requires_grad`` flags and ``.grad`` fields are left exactly as they were. The kernel is
    float32, or float64 for a float64 model (half-precision models are computed in float32).
    What the first call learns about the model's operations is kept for later calls on the
    same model (see :mod:`~lightning_entk.kernel.context`).

    Args:
        model: maps a batch of points to outputs ``(N, C)`` (or to a tuple, a dict or an
            object with ``.logits`` holding them; see ``output_fn``).
        x1: points ``(N1, ...)``: float features or integer tokens; or a tuple of such tensors
            (the model is called as ``model(*x1)``) or a dict (``model(**x1)``, with the keys
            ``forward`` takes; ``model(x1)`` when it takes none of them), every tensor with
            the points along dim 0.
        x2: points ``(N2, ...)`` of the same structure and per-point shapes; ``None`` means
            ``x1``.
        mode: ``"trace"`` ``(N1, N2)``, the *sum* over outputs of the diagonal blocks;
            ``"full"`` ``(N1, N2, C, C)``; ``"diagonal"`` ``(N1, N2, C)``;
            ``"flatten"`` ``(C*N1, C*N2)``, class-major.
        options: how the kernel is computed (:class:`KernelOptions`: which parameters, output
            maps and weights, random output projections, method, parameter groups, batch size,
            memory budget); ``None`` for the defaults.
        **kernel_options: fields of :class:`KernelOptions` to set (on top of ``options``),
            e.g. ``params=["layer2.weight"]`` or ``groups="auto"``.

    Returns:
        The kernel, in the shape given by ``mode``; with ``groups``, a dict group -> kernel.

    Raises:
        ValueError: for an unknown mode or option, points of different structures or shapes,
            non-finite points, points the model cannot take (named with their shapes and
            dtypes), a selection that matches no parameter, an output that is not ``(N, C)``,
            or ``output_projections`` with a mode other than ``"trace"``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).double()
        >>> x = torch.randn(5, 3, dtype=torch.float64)
        >>> empirical_ntk(model, x).shape
        torch.Size([5, 5])
        >>> empirical_ntk(model, x, x[:2], mode="full").shape
        torch.Size([5, 2, 2, 2])
        >>> exact = empirical_ntk(model, x)
        >>> estimate = empirical_ntk(model, x, output_projections=torch.eye(2, dtype=x.dtype))
        >>> torch.allclose(estimate, exact)
        True
        >>> parts = empirical_ntk(model, x, groups="modules")  # children "0" and "2"
        >>> sorted(parts), torch.allclose(parts["0"] + parts["2"], exact)
        (['0', '2'], True)
    """
    check_choice("mode", mode, MODES)
    options = KernelOptions.of(options, **kernel_options)
    check_projection_mode(options.output_projections, mode)
    with ntk_context(model, x1, x2, options) as ctx:
        j1 = ctx.jacobian(ctx.x1)
        j2 = j1 if ctx.x2 is None else ctx.jacobian(ctx.x2)
        return j1.kernel(j2, mode) if options.groups is None else j1.group_kernels(j2, mode)
