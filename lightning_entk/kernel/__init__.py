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

Modes (DESIGN.md section 2):

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
    ``context``   argument checks, evaluation state, and the driver that ties these together
    ``plan``      the route of each parameter and the predicted cost, before running

:func:`empirical_ntk` is the one entry point. Its cost is one backward pass per output, so the
``trace`` kernel of a model with thousands of outputs can instead be *estimated* from ``s``
random projections of the outputs (``output_projections=s``).
"""

from __future__ import annotations

from torch import Tensor, nn

from lightning_entk.kernel.context import (
    DEFAULT_MEMORY_BUDGET,
    Groups,
    NTKContext,
    NTKMethod,
    ParamSelection,
    _check_choice,
    check_kernel_options,
    check_projection_mode,
    compute_dtype,
    ntk_context,
    num_outputs,
    projection_matrix,
    select_parameters,
)
from lightning_entk.kernel.factors import Jacobian
from lightning_entk.kernel.plan import NTKPlan, ntk_plan
from lightning_entk.kernel.points import ForwardFn, OutputFn, Points

MODES = ("full", "trace", "diagonal", "flatten")

__all__ = [
    "DEFAULT_MEMORY_BUDGET",
    "MODES",
    "Groups",
    "Jacobian",
    "NTKContext",
    "NTKMethod",
    "NTKPlan",
    "OutputFn",
    "ParamSelection",
    "Points",
    "check_kernel_options",
    "check_projection_mode",
    "compute_dtype",
    "empirical_ntk",
    "ntk_context",
    "ntk_plan",
    "num_outputs",
    "projection_matrix",
    "select_parameters",
]


def empirical_ntk(
    model: nn.Module,
    x1: Points,
    x2: Points | None = None,
    *,
    mode: str = "trace",
    params: ParamSelection = None,
    output_fn: OutputFn = None,
    output_weights: Tensor | None = None,
    method: str | NTKMethod = "auto",
    batch_size: int = 256,
    output_projections: int | Tensor | None = None,
    projection_seed: int = 0,
    forward_fn: ForwardFn = None,
    memory_budget: int | None = None,
    groups: Groups = None,
) -> Tensor | dict[str, Tensor]:
    """Empirical NTK ``J(x1) J(x2)^T`` of ``model`` between two sets of points.

    Every parameter is recognised by the operations that use it (see :class:`NTKMethod` and
    :func:`ntk_plan`), whatever module holds it. The model is evaluated in eval mode (dropout
    off, BatchNorm on running statistics) and without autocast; its train/eval mode,
    ``requires_grad`` flags and ``.grad`` fields are left exactly as they were. The kernel is
    float32, or float64 for a float64 model
    (half-precision models are computed in float32).

    Args:
        model: maps a batch of points to outputs ``(N, C)`` (or to a tuple, a dict or an
            object with ``.logits`` holding them; see ``output_fn``).
        x1: points ``(N1, ...)``: float features or integer tokens; or a tuple of such tensors
            (the model is called as ``model(*x1)``) or a dict (``model(**x1)``, with the keys
            ``forward`` takes), every tensor with the points along dim 0.
        x2: points ``(N2, ...)`` of the same structure and per-point shapes; ``None`` means
            ``x1``.
        mode: ``"trace"`` ``(N1, N2)``, the *sum* over outputs of the diagonal blocks;
            ``"full"`` ``(N1, N2, C, C)``; ``"diagonal"`` ``(N1, N2, C)``;
            ``"flatten"`` ``(C*N1, C*N2)``, class-major.
        params: which parameters count: ``None`` for all with ``requires_grad``, an iterable
            of names from ``model.named_parameters()``, or a predicate ``(name, param) -> bool``.
        output_fn: maps the model's raw output to ``(N, C)``; by default a tensor is taken as
            it is, a tuple's first element, a dict's ``"logits"`` or an object's ``.logits``.
            A sequence output ``(N, T, V)`` needs one, e.g. ``lambda out: out[:, -1]``.
        output_weights: ``(C,)``; output ``c`` is multiplied by ``w_c`` before the kernel is
            formed, so ``K[n, m, i, j]`` becomes ``w_i w_j K[n, m, i, j]``.
        method: ``"auto"``, ``"structured"`` or ``"jacobian"`` (see :class:`NTKMethod`).
        batch_size: points per forward pass.
        output_projections: ``None`` for the exact kernel. An int ``s`` (``mode="trace"``
            only) *estimates* the trace kernel from ``s`` random projections of the outputs,
            for models with many outputs: ``s`` backward passes per point instead of ``C``.
            With ``v_1 .. v_s`` drawn once, shared by all points, each of ``C`` independent
            Rademacher (+-1) entries scaled by ``1/sqrt(s)``,

                ``K_hat(x, x') = sum_r (sum_c v_rc J_c(x)) . (sum_c v_rc J_c(x'))``

            is a Gram matrix (positive semi-definite) with ``E[K_hat] = K``, since
            ``sum_r E[v_r v_r^T] = I``. Writing ``K_cd = J_c(x) . J_d(x')`` (the ``full``
            kernel), each entry has variance

                ``Var[K_hat(x, x')] = (1/s) sum_{c != d} (K_cd^2 + K_cd K_dc)``

            (in one projection only the products ``z_c z_d``, ``c != d``, of the signs are
            random; two of them are correlated only when they pair the same two outputs, and
            the s projections are independent), i.e. ``(2/s) sum_{c != d} K_cd^2`` on the
            diagonal ``x = x'``. The estimate is accurate when the kernel is dominated by its
            class-diagonal ``K_cc``; its error falls as ``1/sqrt(s)``. A tensor ``(C, s)``
            gives the projections ``v_r`` as its columns instead (``torch.eye(C)``, or any
            orthogonal matrix, gives the exact kernel).
        projection_seed: seed of the random projections (an int ``output_projections``
            only): the same seed gives the same estimate; average over seeds to reduce the
            error. The global RNG is not used.
        forward_fn: ``(model, points) -> (N, C)``, for what no default covers (several
            arguments, extra keyword arguments); replaces the call and ``output_fn``.
        memory_budget: bytes that the evaluation's own arrays may take (Jacobian columns of
            the generic path, output gradients of one pass); ``None`` for 2 GiB. Work is
            split into more, smaller pieces to stay within it.
        groups: ``None`` for the whole kernel; else the kernel of each parameter group, as a
            dict, in one pass (the kernel is a sum over parameters, so the groups' kernels sum
            to the whole): ``"modules"`` (the model's top-level children), ``"auto"`` (a few
            groups that follow the model's parts: embeddings, blocks, head; see
            :func:`~lightning_entk.kernel.context.automatic_groups`), a callable
            ``name -> group``, or a mapping ``group -> parameter names`` (or predicate), the
            parameters no group claims in ``"other"``.

    Returns:
        The kernel, in the shape given by ``mode``; with ``groups``, a dict group -> kernel.

    Raises:
        ValueError: for an unknown mode or method, points of different structures or shapes,
            non-finite points, a selection that matches no parameter, an output that is not
            ``(N, C)``, or ``output_projections`` that is not a positive int or a ``(C, s)``
            tensor, or is given with a mode other than ``"trace"``.

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
    _check_choice("mode", mode, MODES)
    check_projection_mode(output_projections, mode)
    with ntk_context(
        model,
        x1,
        x2,
        params,
        output_fn,
        output_weights,
        method,
        batch_size,
        output_projections=output_projections,
        projection_seed=projection_seed,
        forward_fn=forward_fn,
        memory_budget=memory_budget,
        groups=groups,
    ) as ctx:
        j1 = ctx.jacobian(ctx.x1)
        j2 = j1 if ctx.x2 is None else ctx.jacobian(ctx.x2)
        return j1.kernel(j2, mode) if groups is None else j1.group_kernels(j2, mode)
