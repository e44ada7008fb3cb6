"""Eigenpairs of the empirical NTK, by the cheapest exact route.

The kernel of ``mode="trace"`` (N x N) or ``mode="flatten"`` (C*N x C*N) is ``K = J J^T`` with
``J`` the Jacobian arranged by rows: R = N rows of C*P entries (trace) or R = C*N rows of P
entries (flatten). Three routes give the same top eigenpairs:

    ``kernel``       form K (R x R) through the structured engine, ``eigh`` in float64.
                     Time ~ R^2 P + R^3, memory ~ 16 R^2 bytes (float32 model).
    ``parameter``    form ``J^T J`` (P x P, P the columns of J) and map its eigenvectors ``v``
                     to data space, ``u = J v / sqrt(lambda)``. Pays off when P < R: Toy Models
                     of Superposition have R = 25000 rows but P = 2050. Rows of J that are
                     exactly zero (outputs behind an inactive ReLU) are dropped first.
                     Time ~ R P^2 + P^3, memory P^2 + R P.
    ``matrix_free``  Lanczos (ARPACK ``eigsh``) on ``v -> J (J^T v)`` with J held as structured
                     factors: K is never formed, nor any R x R or R x P array. For k << R
                     eigenpairs. Time ~ iterations x R P, memory R k + P + the factors.

``ntk_spectrum`` estimates the cost of each from these formulas and takes the cheapest whose
arrays fit ``memory_budget`` (:func:`choose_route`); ``route=`` overrides. The structured
factors themselves (``N C sum_l d``, see :mod:`lightning_entk.kernel`) are common to all routes
and not counted. Eigenvalues are float64, descending; eigenvectors are unit-norm float64 columns
in data space (class-major rows for ``flatten``), each with its largest-magnitude entry positive.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg
import torch
from scipy.sparse.linalg import LinearOperator, eigsh
from torch import Tensor, nn

from lightning_entk.kernel import KernelOptions
from lightning_entk.kernel.context import ntk_context
from lightning_entk.kernel.factors import Jacobian
from lightning_entk.kernel.options import check_choice, check_projection_mode
from lightning_entk.kernel.points import Points

SPECTRUM_MODES = ("trace", "flatten")
ROUTES = ("auto", "kernel", "parameter", "matrix_free")


@dataclass(frozen=True)
class Spectrum:
    """Top eigenpairs of a kernel.

    Attributes:
        eigenvalues: ``(k,)`` float64 (or the dtype :meth:`from_kernel` was asked for),
            descending.
        eigenvectors: ``(R, k)`` unit-norm columns of the same dtype in data space, or ``None``
            when not asked for. R = N for ``trace``, C*N (class-major) for ``flatten``.
        route: how they were computed: ``kernel``, ``parameter`` or ``matrix_free``.
    """

    eigenvalues: Tensor
    eigenvectors: Tensor | None = None
    route: str = "kernel"

    @classmethod
    def from_kernel(
        cls,
        kernel: Tensor,
        k: int | None = None,
        eigenvectors: bool = True,
        dtype: torch.dtype = torch.float64,
    ) -> Spectrum:
        """Eigenpairs of a symmetric kernel matrix ``(R, R)``, symmetrised and solved in
        ``dtype`` (float64 by default; float32 serves a kernel computed in float32, whose own
        round-off is as large: see :mod:`lightning_entk.evaluation`).

        Args:
            kernel: ``(R, R)``, e.g. ``empirical_ntk(..., mode="trace")``.
            k: how many of the largest eigenpairs to keep; ``None`` keeps all R.
            eigenvectors: whether to compute eigenvectors.
            dtype: the dtype of the solver.

        Raises:
            ValueError: if the kernel is not square or not finite, or ``k`` is out of range.

        Example:
            >>> import torch
            >>> Spectrum.from_kernel(torch.diag(torch.tensor([1.0, 3.0, 2.0])), k=2).eigenvalues
            tensor([3., 2.], dtype=torch.float64)
        """
        if kernel.ndim != 2 or kernel.shape[0] != kernel.shape[1]:
            raise ValueError(
                f"`kernel` must be square (R, R), got {tuple(kernel.shape)}; use mode='trace' "
                "or mode='flatten'."
            )
        rows = kernel.shape[0]
        k = _check_k(k, rows)
        if not torch.isfinite(kernel).all():
            raise ValueError("`kernel` has NaN or inf entries; its spectrum is undefined.")
        values, vectors = _top_eigh(_symmetrized(kernel, dtype), k, eigenvectors)
        return cls(values, vectors)

    @property
    def num_eigenpairs(self) -> int:
        return self.eigenvalues.shape[0]

    def effective_rank(self) -> float:
        """Entropy effective rank ``exp(-sum p_i log p_i)``, ``p = lambda / sum(lambda)`` over the
        kept eigenvalues clipped at zero (Roy & Vetterli 2007). Between 1 and k."""
        values = self.eigenvalues.clamp(min=0)
        p = values / values.sum()
        p = p[p > 0]
        return float(torch.exp(-(p * p.log()).sum()))


def ntk_spectrum(
    model: nn.Module,
    x: Points,
    *,
    mode: str = "trace",
    k: int | None = None,
    route: str = "auto",
    eigenvectors: bool = True,
    options: KernelOptions | None = None,
    **kernel_options: object,
) -> Spectrum | dict[str, Spectrum]:
    """Top-``k`` eigenpairs of the empirical NTK of ``model`` on points ``x``.

    Args:
        model, x: as in :func:`~lightning_entk.empirical_ntk`.
        mode: ``"trace"`` (N x N, the *sum* over outputs) or ``"flatten"`` (C*N x C*N).
        k: eigenpairs wanted; ``None`` for every one that can be nonzero, ``min(R, P)``.
        route: ``"auto"`` (cheapest by the cost model in the module docstring), ``"kernel"``,
            ``"parameter"`` or ``"matrix_free"``.
        eigenvectors: whether to return eigenvectors.
        options, **kernel_options: how the kernel is computed, as in
            :func:`~lightning_entk.empirical_ntk`. Its ``memory_budget`` also bounds the
            route's own arrays (the structured factors, common to every route, are not
            counted): when the R x R kernel does not fit, ``"auto"`` takes the parameter side
            or the matrix-free route, whose memory is ``O(R k + P)``; for many points ask for
            ``k`` well below R. With ``output_projections`` (``mode="trace"``), the spectrum
            of the random-projection estimate of the kernel. With ``groups``, the spectrum of
            each parameter group's kernel (a dict), the kernels from one pass, each solved on
            the kernel route (all groups' R x R kernels are held at once).

    Returns:
        A :class:`Spectrum`, or with ``groups`` a dict group -> :class:`Spectrum`.

    Raises:
        ValueError: for a mode without a square kernel, ``k`` out of range, an unknown route,
            no route within ``memory_budget``, ``output_projections`` with ``mode="flatten"``,
            and every input error of :func:`~lightning_entk.empirical_ntk`.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 2))
        >>> s = ntk_spectrum(model, torch.randn(10, 3), k=4)
        >>> s.eigenvalues.shape, s.eigenvectors.shape
        (torch.Size([4]), torch.Size([10, 4]))
    """
    check_choice("mode", mode, SPECTRUM_MODES)
    check_choice("route", route, ROUTES)
    options = KernelOptions.of(options, **kernel_options)
    check_projection_mode(options.output_projections, mode)
    with ntk_context(model, x, None, options) as ctx:
        jac = ctx.jacobian(ctx.x1)
    rows = jac.num_points * (jac.num_outputs if mode == "flatten" else 1)
    if options.groups is not None:  # each group's kernel, from one pass, solved on its own
        k = _check_k(k, rows)
        kernels = jac.group_kernels(jac, mode)
        return {g: Spectrum.from_kernel(kernel, k, eigenvectors) for g, kernel in kernels.items()}
    columns = jac.num_parameters * (jac.num_outputs if mode == "trace" else 1)
    k = _check_k(k, rows, limit=min(rows, columns))
    if route == "matrix_free" and k >= rows:
        raise ValueError(f"route='matrix_free' needs `k` < {rows} (the kernel's rows), got {k}.")
    if route == "auto":
        itemsize = torch.empty((), dtype=jac.dtype).element_size()
        route = choose_route(
            rows, columns, k, itemsize, options.memory_budget, parameters=jac.num_parameters
        )
    solve = {
        "kernel": _kernel_route,
        "parameter": _parameter_route,
        "matrix_free": _matrix_free_route,
    }
    return solve[route](jac, mode, k, eigenvectors)


def choose_route(
    rows: int,
    columns: int,
    k: int,
    itemsize: int,
    memory_budget: int,
    parameters: int | None = None,
) -> str:
    """The cheapest route whose arrays fit ``memory_budget``, by the flop estimates of the
    module docstring.

    Args:
        rows, columns: of J arranged as in the module docstring (R, and P or C*P).
        k: eigenpairs wanted.
        itemsize: bytes per entry of the kernel's compute dtype.
        memory_budget: bytes.
        parameters: P, the parameters (``columns`` when ``None``); the matrix-free route holds
            about P numbers per product.
    """
    parameters = columns if parameters is None else parameters
    vectors = 8 * rows * k  # the float64 eigenvectors every route returns
    costs = {
        # The kernel summed block by block (running sum, a block's Gram and its input Gram,
        # the flatten reordering), then one float64 copy that eigh works in.
        "kernel": (rows**2 * columns + 4 * rows**3, max(4 * itemsize, itemsize + 8) * rows**2),
        # J (R x columns), J^T J in the compute dtype and in float64.
        "parameter": (
            rows * columns**2 + 4 * columns**3,
            itemsize * rows * columns + (2 * itemsize + 8) * columns**2,
        ),
        # Lanczos: ~10 (2k + 20) products, each a memory-bound pass over J (x20 a GEMM flop);
        # ARPACK keeps 2k + 1 (at least 20) float64 vectors of R entries.
        "matrix_free": (
            20 * 10 * (2 * k + 20) * 2 * rows * columns,
            8 * rows * (2 * k + 21) + 2 * itemsize * parameters,
        ),
    }
    costs = {route: (flops, memory + vectors) for route, (flops, memory) in costs.items()}
    if k > rows // 2:
        del costs["matrix_free"]  # Lanczos needs k well below R
    fitting = {r: flops for r, (flops, memory) in costs.items() if memory <= memory_budget}
    if not fitting:
        need = min(memory for _, memory in costs.values())
        raise ValueError(
            f"Every route to the spectrum needs more than `memory_budget` = {memory_budget} bytes "
            f"(least: {need}); raise the budget, ask for fewer eigenpairs `k`, or use fewer points."
        )
    return min(fitting, key=fitting.get)


def _check_k(k: int | None, rows: int, limit: int | None = None) -> int:
    limit = rows if limit is None else limit
    if k is None:
        return limit
    if not isinstance(k, int) or not 1 <= k <= rows:
        raise ValueError(f"`k` must be an int in [1, {rows}] (the kernel's rows), got {k!r}.")
    return k


# Rows per block of the in-place symmetrisation and of the row-chunked products.
_BLOCK_ROWS = 1024


def _symmetrized(matrix: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    """``(M + M^T) / 2`` in ``dtype``, made in one new array (blocks of it at a time) rather
    than the three that the expression would allocate. ``matrix`` is left untouched."""
    sym = matrix.to(dtype, copy=True)
    rows = sym.shape[0]
    for lo in range(0, rows, _BLOCK_ROWS):
        hi = lo + _BLOCK_ROWS
        for left in range(0, lo, _BLOCK_ROWS):
            right = left + _BLOCK_ROWS
            mean = (sym[lo:hi, left:right] + sym[left:right, lo:hi].T) / 2
            sym[lo:hi, left:right] = mean
            sym[left:right, lo:hi] = mean.T
        diagonal = sym[lo:hi, lo:hi]
        diagonal.copy_((diagonal + diagonal.T) / 2)
    return sym


def _top_eigh(sym: Tensor, k: int, eigenvectors: bool) -> tuple[Tensor, Tensor | None]:
    """The k largest eigenpairs of a symmetric matrix, descending; ``sym`` is
    overwritten. On the CPU, LAPACK works in ``sym`` itself (no copy) and computes only the
    wanted eigenpairs (``syevr`` on an index subset): ~3x faster for k << R."""
    rows = sym.shape[0]
    if k < rows and sym.device.type == "cpu":
        # The transpose is the same symmetric matrix, in the column-major order LAPACK needs.
        lapack = {
            "overwrite_a": True,
            "check_finite": False,
            "subset_by_index": [rows - k, rows - 1],
        }
        if eigenvectors:
            values, vectors = scipy.linalg.eigh(sym.numpy().T, driver="evr", **lapack)
            vectors = torch.from_numpy(vectors[:, ::-1].copy())
        else:
            values = scipy.linalg.eigh(sym.numpy().T, eigvals_only=True, **lapack)
            vectors = None
        values = torch.from_numpy(values[::-1].copy())
    elif eigenvectors:
        values, vectors = torch.linalg.eigh(sym)
        values, vectors = values.flip(0)[:k], vectors.flip(1)[:, :k]
    else:
        values, vectors = torch.linalg.eigvalsh(sym).flip(0)[:k], None
    return values, None if vectors is None else _fix_signs(vectors)


def _fix_signs(vectors: Tensor) -> Tensor:
    """Flip each column so that its largest-magnitude entry is positive."""
    pivot = vectors.abs().argmax(dim=0)
    signs = torch.sign(vectors[pivot, torch.arange(vectors.shape[1], device=vectors.device)])
    return vectors * torch.where(signs == 0, 1.0, signs)


def _kernel_route(jac: Jacobian, mode: str, k: int, eigenvectors: bool) -> Spectrum:
    # The kernel in its compute dtype is dropped as soon as its float64 copy exists.
    sym = _symmetrized(jac.kernel(jac, mode))
    values, vectors = _top_eigh(sym, k, eigenvectors)
    return Spectrum(values, vectors, route="kernel")


def _parameter_route(jac: Jacobian, mode: str, k: int, eigenvectors: bool) -> Spectrum:
    full = jac.materialized()  # (N, C, P)
    n, c, _ = full.shape
    # Rows of J in point-major order (J^T J does not depend on the order); trace: (N, C*P).
    rows = full.reshape(n, -1) if mode == "trace" else full.reshape(n * c, -1)
    # J^T J over chunks of rows, skipping rows that are exactly zero (outputs behind an
    # inactive ReLU): formed in the kernel's own dtype, like K, with copies of one chunk only.
    width = rows.shape[1]
    step = max(width, _BLOCK_ROWS)
    gram = rows.new_zeros(width, width)
    for lo in range(0, rows.shape[0], step):
        chunk = rows[lo : lo + step]
        live = chunk[(chunk != 0).any(dim=1)]
        gram.addmm_(live.T, live)
    sym = _symmetrized(gram)
    del gram
    values, vectors = _top_eigh(sym, k, eigenvectors=True)
    if not eigenvectors:
        return Spectrum(values, route="parameter")
    # u = J v in the Jacobian's dtype (the precision K itself would have), normalised in float64.
    data = vectors.new_empty(rows.shape[0], k)
    in_rows_dtype = vectors.to(rows.dtype)
    for lo in range(0, rows.shape[0], step):
        data[lo : lo + step] = rows[lo : lo + step] @ in_rows_dtype
    if mode == "flatten":  # point-major (n, c) rows to the class-major layout (c, n)
        data = data.reshape(n, c, k).transpose(0, 1).reshape(c * n, k)
    data = data / torch.linalg.vector_norm(data, dim=0).clamp(min=torch.finfo(data.dtype).tiny)
    return Spectrum(values, _fix_signs(data), route="parameter")


def _matrix_free_route(jac: Jacobian, mode: str, k: int, eigenvectors: bool) -> Spectrum:
    rows = jac.num_points * (jac.num_outputs if mode == "flatten" else 1)
    dtype = jac.dtype
    device = jac.device

    def matvec(v: np.ndarray) -> np.ndarray:
        v = torch.as_tensor(np.ascontiguousarray(v).reshape(-1), dtype=dtype, device=device)
        return jac.kernel_matvec(v, mode).to(torch.float64).cpu().numpy()

    operator = LinearOperator((rows, rows), matvec=matvec, dtype=np.float64)
    tol = 0.0 if dtype == torch.float64 else 1e-6
    start = np.ones(rows) / np.sqrt(rows)  # deterministic, and not orthogonal to a top mode
    values, vectors = eigsh(operator, k=k, which="LA", tol=tol, v0=start, return_eigenvectors=True)
    order = np.argsort(values)[::-1]
    values = torch.from_numpy(values[order].copy())
    if not eigenvectors:
        return Spectrum(values, route="matrix_free")
    return Spectrum(
        values, _fix_signs(torch.from_numpy(vectors[:, order].copy())), route="matrix_free"
    )
