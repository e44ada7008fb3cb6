"""The empirical neural tangent kernel of a ``torch.nn.Module``.

For a network ``f`` with parameters ``W`` and probe points ``x``, ``x'``

    K_ij(x, x') = sum_mu  d f_i(x) / d W_mu  *  d f_j(x') / d W_mu  =  J(x) J(x')^T

Symbols, used in every shape of this package:

    N   probe points (N1, N2 for a cross kernel)
    C   model outputs
    P   parameters counted
    T   uses of one layer per example: sequence positions, spatial positions, repeated calls
    k   eigenpairs

Modes (DESIGN.md section 2):

    ``full``      (N1, N2, C, C)   K[n, m, i, j]
    ``trace``     (N1, N2)         sum_c K[n, m, c, c]   -- a *sum* over outputs, not a mean
    ``diagonal``  (N1, N2, C)      K[n, m, c, c]
    ``flatten``   (C*N1, C*N2)     class-major: row c*N1 + n, column d*N2 + m is K[n, m, c, d]

Two implementations sit behind :func:`empirical_ntk`, chosen by :class:`NTKMethod`:
``structured`` (the default) never forms a per-example Jacobian for ``nn.Linear``,
``nn.Conv1d``, ``nn.Conv2d`` and ``nn.Embedding``; ``jacobian`` forms all of them with
``torch.func`` and contracts, and is the reference the other is tested against.

Both cost one backward pass per output, so the ``trace`` kernel of a model with thousands of
outputs can instead be *estimated* from ``s`` random projections of the outputs
(``output_projections=s``): ``s`` backward passes whatever C is, unbiased, with the variance
given in :func:`empirical_ntk`.
"""

from __future__ import annotations

import contextlib
import enum
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

MODES = ("full", "trace", "diagonal", "flatten")

ParamSelection = Iterable[str] | Callable[[str, nn.Parameter], bool] | None
OutputFn = Callable[[object], Tensor] | None


class NTKMethod(str, enum.Enum):
    """How the kernel is computed. Every method gives the same kernel up to float round-off.

    ``STRUCTURED``: for a layer ``y = W a`` the layer's share of the kernel is
    ``(a a'^T) * (g g'^T)`` with ``g`` the gradient of each output with respect to ``y``
    (Novak et al. 2022, "Fast Finite Width Neural Tangent Kernel", arXiv:2206.08720, section 4).
    Costs ``N C`` backward passes plus Gram products of layer widths, and memory ``N C sum_l d``;
    no Jacobian of size ``N C P`` is ever stored. Parameters of other layers go through the
    generic path of ``JACOBIAN``. Fast whenever most parameters sit in supported layers.

    ``JACOBIAN``: ``vmap(jacrev)`` per-example Jacobians, then ``J J'^T``. Costs ``N C`` forward
    passes plus ``N^2 C^2 P`` and memory ``N C P``. The reference implementation (the
    ``torch.func`` tutorial's), slow for wide layers.

    ``AUTO``: ``STRUCTURED``, since it is exact for every model and never slower by more than
    its bookkeeping.
    """

    AUTO = "auto"
    STRUCTURED = "structured"
    JACOBIAN = "jacobian"


def empirical_ntk(
    model: nn.Module,
    x1: Tensor,
    x2: Tensor | None = None,
    *,
    mode: str = "trace",
    params: ParamSelection = None,
    output_fn: OutputFn = None,
    output_weights: Tensor | None = None,
    method: str | NTKMethod = "auto",
    batch_size: int = 256,
    output_projections: int | Tensor | None = None,
    projection_seed: int = 0,
) -> Tensor:
    """Empirical NTK ``J(x1) J(x2)^T`` of ``model`` between two sets of points.

    The model is evaluated in eval mode (dropout off, BatchNorm on running statistics) and
    without autocast; its train/eval mode, ``requires_grad`` flags and ``.grad`` fields are
    left exactly as they were. The kernel is float32, or float64 for a float64 model
    (half-precision models are computed in float32).

    Args:
        model: maps a batch ``x`` of shape ``(N, ...)`` to outputs ``(N, C)``.
        x1: points ``(N1, ...)``: float features or integer tokens.
        x2: points ``(N2, ...)`` of the same per-example shape; ``None`` means ``x1``.
        mode: ``"trace"`` ``(N1, N2)``, the *sum* over outputs of the diagonal blocks;
            ``"full"`` ``(N1, N2, C, C)``; ``"diagonal"`` ``(N1, N2, C)``;
            ``"flatten"`` ``(C*N1, C*N2)``, class-major.
        params: which parameters count: ``None`` for all with ``requires_grad``, an iterable
            of names from ``model.named_parameters()``, or a predicate ``(name, param) -> bool``.
        output_fn: maps the model's raw output (a tensor, dict, tuple, ...) to ``(N, C)``.
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

    Returns:
        The kernel, in the shape given by ``mode``.

    Raises:
        ValueError: for an unknown mode or method, points of different shapes, non-finite
            points, a selection that matches no parameter, an output that is not ``(N, C)``,
            or ``output_projections`` that is not a positive int or a ``(C, s)`` tensor, or
            is given with a mode other than ``"trace"``.

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
    ) as ctx:
        j1 = ctx.jacobian(ctx.x1)
        j2 = j1 if ctx.x2 is None else ctx.jacobian(ctx.x2)
        return j1.kernel(j2, mode)


# --------------------------------------------------------------------------------------------
# Setup shared by the kernel and the spectrum: validation, eval mode, dtype, parameter choice.


def _check_choice(name: str, value: object, allowed: Iterable[str]) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"`{name}` must be one of {allowed}, got {value!r}.")


def check_projection_mode(output_projections: int | Tensor | None, mode: str) -> None:
    """Output projections estimate the trace kernel only: reject them with any other mode."""
    if output_projections is not None and mode != "trace":
        raise ValueError(
            f"`output_projections` estimates the trace kernel and needs mode='trace', got "
            f"mode={mode!r}; pass output_projections=None for the exact {mode!r} kernel."
        )


def _check_projections(output_projections: object, projection_seed: object) -> None:
    if output_projections is None:
        return
    if isinstance(output_projections, Tensor):
        if output_projections.ndim != 2 or not output_projections.is_floating_point():
            raise ValueError(
                "`output_projections` as a tensor must be float (C, s) with the projections as "
                f"columns, got {output_projections.dtype} {tuple(output_projections.shape)}."
            )
    elif (
        not isinstance(output_projections, int)
        or isinstance(output_projections, bool)
        or output_projections < 1
    ):
        raise ValueError(
            "`output_projections` must be None, a positive int (the number of random "
            f"projections) or a (C, s) tensor, got {output_projections!r}."
        )
    if not isinstance(projection_seed, int) or isinstance(projection_seed, bool):
        raise ValueError(f"`projection_seed` must be an int, got {projection_seed!r}.")


def projection_matrix(
    num_outputs: int,
    output_projections: int | Tensor | None,
    projection_seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """The projections ``(C, s)`` that :func:`empirical_ntk` applies to the outputs, as
    columns: the identity for ``None`` (the exact kernel, ``s = C``), the Rademacher columns
    drawn from ``projection_seed`` for an int ``s``, or the given tensor. Splitting the columns
    splits the trace kernel into parts that sum to it.

    Raises:
        ValueError: if a given tensor does not have ``num_outputs`` rows.
    """
    if output_projections is None:
        return torch.eye(num_outputs, dtype=dtype, device=device)
    if isinstance(output_projections, Tensor):
        if output_projections.shape[0] != num_outputs:
            raise ValueError(
                f"`output_projections` has {output_projections.shape[0]} rows but the model has "
                f"C = {num_outputs} outputs; pass a (C, s) tensor."
            )
        return output_projections.to(device=device, dtype=dtype)
    s = output_projections
    generator = torch.Generator().manual_seed(projection_seed)
    signs = torch.randint(0, 2, (num_outputs, s), generator=generator).to(dtype) * 2 - 1
    return (signs / math.sqrt(s)).to(device)


def _check_points(name: str, x: Tensor) -> None:
    if not isinstance(x, Tensor):
        raise ValueError(f"`{name}` must be a tensor of points (N, ...), got {type(x).__name__}.")
    if x.ndim == 0 or x.shape[0] == 0:
        raise ValueError(
            f"`{name}` must hold at least one point along dim 0, got {tuple(x.shape)}."
        )
    if x.is_floating_point() or x.is_complex():
        bad = ~torch.isfinite(x).reshape(len(x), -1).all(dim=1)
        if bad.any():
            rows = bad.nonzero().flatten()[:5].tolist()
            raise ValueError(
                f"`{name}` has NaN or inf in {int(bad.sum())} point(s) (rows {rows}...); "
                "drop or impute those points before computing the kernel."
            )


def select_parameters(model: nn.Module, params: ParamSelection) -> list[str]:
    """Names of the parameters that count, in ``model.named_parameters()`` order.

    Raises:
        ValueError: if the selection matches nothing, or names a parameter the model lacks.
    """
    named = dict(model.named_parameters())
    if params is None:
        chosen = [n for n, p in named.items() if p.requires_grad]
        hint = "every parameter has requires_grad=False; pass `params` to choose some"
    elif callable(params):
        chosen = [n for n, p in named.items() if params(n, p)]
        hint = "the `params` predicate returned False for every parameter"
    else:
        wanted = [params] if isinstance(params, str) else list(params)
        unknown = [n for n in wanted if n not in named]
        if unknown:
            raise ValueError(
                f"`params` names {unknown} which the model does not have; "
                f"its parameters are {list(named)[:8]}{'...' if len(named) > 8 else ''}."
            )
        chosen = [n for n in named if n in set(wanted)]
        hint = "`params` is empty"
    if not chosen:
        raise ValueError(
            f"`params` selects no parameter ({hint}). "
            f"The model's parameters are {list(named)[:8]}{'...' if len(named) > 8 else ''}."
        )
    return chosen


def compute_dtype(model: nn.Module) -> torch.dtype:
    """float64 for a float64 model, float32 otherwise (half precision is never used)."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    return torch.float64 if torch.float64 in dtypes else torch.float32


def num_outputs(model: nn.Module, x: Tensor, output_fn: OutputFn = None) -> int:
    """C, the outputs per point, from one forward pass of ``x[:1]`` in eval mode (the model's
    modes, BatchNorm statistics and gradients untouched)."""
    with torch.no_grad(), _evaluation_state(model):
        out = model(x[:1])
        out = out if output_fn is None else output_fn(out)
    return int(out.shape[-1])


@contextlib.contextmanager
def _evaluation_state(model: nn.Module) -> Iterator[None]:
    """Eval mode, no autocast and no TF32 inside; the model's own modes restored after."""
    modes = [(m, m.training) for m in model.modules()]
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    model.eval()
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        with contextlib.ExitStack() as stack:
            for device_type in {p.device.type for p in model.parameters()} | {"cpu"}:
                if device_type in ("cpu", "cuda"):
                    stack.enter_context(torch.autocast(device_type, enabled=False))
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        for m, training in modes:
            m.training = training


@contextlib.contextmanager
def ntk_context(
    model: nn.Module,
    x1: Tensor,
    x2: Tensor | None,
    params: ParamSelection,
    output_fn: OutputFn,
    output_weights: Tensor | None,
    method: str | NTKMethod,
    batch_size: int,
    *,
    output_projections: int | Tensor | None = None,
    projection_seed: int = 0,
) -> Iterator[_NTKContext]:
    """Validate the arguments and yield a context that computes Jacobian factors (of the
    projected outputs when ``output_projections`` is given, see :func:`empirical_ntk`)."""
    _check_choice("method", str(getattr(method, "value", method)), [m.value for m in NTKMethod])
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive int, got {batch_size!r}.")
    _check_projections(output_projections, projection_seed)
    _check_points("x1", x1)
    if x2 is not None:
        _check_points("x2", x2)
        if x2.shape[1:] != x1.shape[1:]:
            raise ValueError(
                f"`x1` and `x2` must have the same per-point shape, got {tuple(x1.shape[1:])} "
                f"and {tuple(x2.shape[1:])}; pass points of the same kind (dim 0 indexes points)."
            )
    names = select_parameters(model, params)
    dtype = compute_dtype(model)
    device = next(model.parameters()).device
    if output_weights is not None:
        output_weights = torch.as_tensor(output_weights).to(device=device, dtype=dtype)
        if output_weights.ndim != 1:
            raise ValueError(
                f"`output_weights` must have shape (C,), got {tuple(output_weights.shape)}."
            )

    def to_compute(x: Tensor) -> Tensor:
        return x.to(device=device, dtype=dtype if x.is_floating_point() else x.dtype)

    with _evaluation_state(model):
        yield _NTKContext(
            model=model,
            names=names,
            dtype=dtype,
            x1=to_compute(x1),
            x2=None if x2 is None else to_compute(x2),
            output_fn=output_fn,
            output_weights=output_weights,
            method=NTKMethod(getattr(method, "value", method)),
            batch_size=batch_size,
            output_projections=output_projections,
            projection_seed=projection_seed,
        )


# --------------------------------------------------------------------------------------------
# Jacobian factors.
#
# Every block of parameters is held as factors: inputs ``a`` of shape (N, T, D) and output
# gradients ``g`` of shape (N, T, C, O), with per-example Jacobian ``J[n, c] = sum_t g[n, t, c]
# (x) a[n, t]`` (an O x D matrix). A generic block is the case T = D = 1, a = 1, g = J.
# Embeddings hold token ids (N, T) in place of ``a``: their input Gram is token equality.


@dataclass
class _Block:
    """One group of parameters of a Jacobian, held as factors (see the comment above)."""

    g: Tensor  # (N, T, C, O)
    a: Tensor | None = None  # (N, T, D) features; None with `tokens`, or for a generic block
    tokens: Tensor | None = None  # (N, T) token ids; negative ids contribute nothing
    vocab: int = 0

    @property
    def size(self) -> int:
        """Parameters in the block, P_b."""
        return self.g.shape[-1] * self._in_dim

    @property
    def _in_dim(self) -> int:
        if self.tokens is not None:
            return self.vocab
        return 1 if self.a is None else self.a.shape[-1]

    def _input_gram(self, other: _Block) -> Tensor:
        """(N1 T1, N2 T2) Gram of the inputs."""
        if self.tokens is not None:
            t1, t2 = self.tokens.reshape(-1), other.tokens.reshape(-1)
            return ((t1[:, None] == t2[None, :]) & (t1[:, None] >= 0)).to(self.g.dtype)
        if self.a is None:
            return self.g.new_ones(self.g.shape[0] * self.g.shape[1], 1).expand(
                -1, other.g.shape[0] * other.g.shape[1]
            )
        d = self.a.shape[-1]
        return _gram(self.a.reshape(-1, d), other.a.reshape(-1, d), symmetric=other is self)

    def _materialize_cheaper(self, other: _Block, classes_paired: int) -> bool:
        """Whether forming per-example Jacobians beats the T1 x T2 Gram of the factors."""
        t1, t2 = self.g.shape[1], other.g.shape[1]
        if t1 * t2 == 1 or (self.a is None and self.tokens is None):
            return False
        out = self.g.shape[-1]
        gram = t1 * t2 * (self._in_dim + classes_paired * out)
        dense = classes_paired * self.size + (t1 + t2) * self.size
        fits = self.g.shape[0] * self.g.shape[2] * self.size <= 2**28
        return fits and dense < gram

    @classmethod
    def empty_like(cls, chunk: _Block, n: int) -> _Block:
        """An uninitialised block of the same kind as ``chunk`` for ``n`` points, to
        :meth:`write` chunks into."""

        def empty(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.new_empty(n, *t.shape[1:])

        tokens = empty(chunk.tokens)
        return cls(g=empty(chunk.g), a=empty(chunk.a), tokens=tokens, vocab=chunk.vocab)

    def write(self, start: int, chunk: _Block) -> None:
        """Copy the factors of ``chunk``, computed on points ``start, start + 1, ...``, in."""
        for field in ("g", "a", "tokens"):
            part = getattr(chunk, field)
            if part is not None:
                getattr(self, field)[start : start + len(part)] = part

    def materialized(self) -> _Block:
        """The same block as a generic one: per-example Jacobians (N, 1, C, P_b)."""
        n, _, c, o = self.g.shape
        if self.a is None and self.tokens is None:
            return self
        if self.tokens is not None:
            jac = self.g.new_zeros(n, self.vocab, c, o)
            rows = torch.arange(n, device=self.g.device)[:, None].expand_as(self.tokens)
            keep = self.tokens >= 0
            jac.index_put_((rows[keep], self.tokens[keep]), self.g[keep], accumulate=True)
            jac = jac.permute(0, 2, 3, 1)
        else:
            jac = torch.einsum("ntco,ntd->ncod", self.g, self.a)
        return _Block(g=jac.reshape(n, 1, c, -1))

    def kernel(self, other: _Block, mode: str) -> Tensor:
        """This block's share of the kernel, in ``full`` (N1, N2, C, C), ``trace`` (N1, N2)
        or ``diagonal`` (N1, N2, C) layout (``flatten`` is made from ``full`` by the caller)."""
        paired = self.g.shape[2] if mode == "full" else 1
        if self._materialize_cheaper(other, paired):
            mine = self.materialized()
            return mine.kernel(mine if other is self else other.materialized(), mode)
        n1, t1, c, o = self.g.shape
        n2, t2 = other.g.shape[:2]
        symmetric = other is self
        if mode == "trace":
            k = _gram(self.g.reshape(n1 * t1, c * o), other.g.reshape(n2 * t2, c * o), symmetric)
            if self.a is not None or self.tokens is not None:
                k.mul_(self._input_gram(other))
            return k if t1 == t2 == 1 else k.reshape(n1, t1, n2, t2).sum(dim=(1, 3))
        k_in = self._input_gram(other).reshape(n1, t1, n2, t2)
        if mode == "diagonal":
            g1 = self.g.reshape(n1 * t1, c, o).transpose(0, 1)
            g2 = other.g.reshape(n2 * t2, c, o).transpose(0, 1)
            k_out = torch.bmm(g1, g2.transpose(1, 2)).reshape(c, n1, t1, n2, t2)
            return torch.einsum("ntms,cntms->nmc", k_in, k_out)
        k_out = _gram(self.g.reshape(n1 * t1 * c, o), other.g.reshape(n2 * t2 * c, o), symmetric)
        k_out = k_out.reshape(n1, t1, c, n2, t2, c)
        return torch.einsum("ntms,ntimsj->nmij", k_in, k_out)

    def output_slice(self, lo: int, hi: int) -> _Block:
        """The block restricted to outputs ``lo:hi`` (views, no copy)."""
        return _Block(g=self.g[:, :, lo:hi], a=self.a, tokens=self.tokens, vocab=self.vocab)

    def vjp(self, v: Tensor, per_output: bool) -> Tensor:
        """``sum_n v[n, c] J[n, c]``: shape (P_b,), or (C, P_b) kept per output."""
        out = "c" if per_output else ""
        if self.tokens is not None:
            gv = torch.einsum(f"ntco,nc->nt{out}o", self.g, v)
            keep = self.tokens >= 0
            res = gv.new_zeros(self.vocab, *gv.shape[2:])
            res.index_add_(0, self.tokens[keep], gv[keep])
            return res.movedim(0, -1).reshape(*gv.shape[2:-1], -1)
        a = self.a if self.a is not None else self.g.new_ones(*self.g.shape[:2], 1)
        res = torch.einsum(f"ntco,nc,ntd->{out}od", self.g, v, a)
        return res.reshape(*res.shape[: 1 if per_output else 0], -1)

    def jvp(self, u: Tensor, per_output: bool) -> Tensor:
        """``J[n, c] . u`` (or ``. u[c]`` when ``per_output``): shape (N, C)."""
        o = self.g.shape[-1]
        out = "c" if per_output else ""
        if self.tokens is not None:
            u = u.reshape(*u.shape[:-1], o, self.vocab)
            picked = u[..., self.tokens.clamp(min=0)]  # ([C,] O, N, T)
            picked = picked * (self.tokens >= 0)
            return torch.einsum(f"ntco,{out}ont->nc", self.g, picked)
        a = self.a if self.a is not None else self.g.new_ones(*self.g.shape[:2], 1)
        u = u.reshape(*u.shape[:-1], o, a.shape[-1])
        return torch.einsum(f"ntco,{out}od,ntd->nc", self.g, u, a)


@dataclass
class Jacobian:
    """The Jacobian of a model on N points, held as factor blocks; never an N C P array
    unless a block is generic."""

    blocks: list[_Block]
    num_outputs: int

    @property
    def num_points(self) -> int:
        return self.blocks[0].g.shape[0]

    @property
    def num_parameters(self) -> int:
        return sum(b.size for b in self.blocks)

    def kernel(self, other: Jacobian, mode: str) -> Tensor:
        """``J J'^T`` in the layout of ``mode`` (see the module docstring). With ``other`` this
        same Jacobian, only half of each symmetric Gram product is computed."""
        reduced = "full" if mode == "flatten" else mode
        k = None
        for b1, b2 in zip(self.blocks, other.blocks, strict=True):
            part = b1.kernel(b2, reduced)
            k = part if k is None else k.add_(part)
        if mode != "flatten":
            return k
        n1, n2, c, _ = k.shape
        return k.permute(2, 0, 3, 1).reshape(c * n1, c * n2)

    def kernel_matvec(self, v: Tensor, mode: str) -> Tensor:
        """``K v = J (J^T v)`` without forming K, for ``v`` in data space: (N,) for ``trace``,
        (C*N,) class-major for ``flatten``. Beyond the factors it holds about P numbers: in
        ``trace`` mode, where ``J^T v`` has C P entries, outputs are taken in groups of at
        most P entries."""
        n, c = self.num_points, self.num_outputs
        if mode == "flatten":
            vc = v.reshape(c, n).T
            return self.jvp(self.vjp(vc, per_output=False), per_output=False).T.reshape(-1)
        out = v.new_zeros(n)
        for block in self.blocks:
            step = max(1, self.num_parameters // block.size)
            for lo in range(0, c, step):
                part = block.output_slice(lo, lo + step)
                vc = v[:, None].expand(n, part.g.shape[2])
                out += part.jvp(part.vjp(vc, per_output=True), per_output=True).sum(dim=1)
        return out

    def materialized(self) -> Tensor:
        """All per-example Jacobians, (N, C, P), written block by block into one array."""
        if len(self.blocks) == 1:
            return self.blocks[0].materialized().g[:, 0]
        full = self.blocks[0].g.new_empty(self.num_points, self.num_outputs, self.num_parameters)
        start = 0
        for block in self.blocks:
            full[:, :, start : start + block.size] = block.materialized().g[:, 0]
            start += block.size
        return full

    def vjp(self, v: Tensor, per_output: bool) -> list[Tensor]:
        """``J^T v`` for ``v`` of shape (N, C), block by block."""
        return [b.vjp(v, per_output) for b in self.blocks]

    def jvp(self, u: list[Tensor], per_output: bool) -> Tensor:
        """``J u`` for ``u`` as returned by :meth:`vjp`: shape (N, C)."""
        return sum(b.jvp(ub, per_output) for b, ub in zip(self.blocks, u, strict=True))


# Rows per block of a symmetric Gram product: large enough for efficient matrix products.
_GRAM_ROWS = 256


def _gram(x: Tensor, y: Tensor, symmetric: bool) -> Tensor:
    """``x @ y.T``. With ``symmetric`` (``y`` holds the same rows as ``x``) and rows long
    enough that multiplying costs more than mirroring, only the blocks on and above the
    diagonal are multiplied and the rest mirrored: ~half the flops."""
    n, width = x.shape
    if not symmetric or n < 2 * _GRAM_ROWS or width < _GRAM_ROWS:
        return x @ y.T
    out = x.new_empty(n, n)
    for lo in range(0, n, _GRAM_ROWS):
        hi = lo + _GRAM_ROWS
        out[lo:hi, lo:] = x[lo:hi] @ x[lo:].T
        out[hi:, lo:hi] = out[lo:hi, hi:].T
    return out


# --------------------------------------------------------------------------------------------
# Computing the factors.

_STRUCTURED_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)


def _structured_layers(model: nn.Module, names: list[str]) -> dict[str, list[str]]:
    """Module name -> its selected parameter names (``weight`` first), for layers whose
    parameters can be handled by factors: standard types with their own forward, parameters
    not shared with another module, and settings the factor rules cover."""
    owners: dict[int, int] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    selected = set(names)
    layers = {}
    for mname, module in model.named_modules():
        kind = type(module)
        if kind not in _STRUCTURED_TYPES:
            continue
        if isinstance(module, nn.modules.conv._ConvNd) and (
            module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str)
        ):
            continue
        if isinstance(module, nn.Embedding) and (module.max_norm or module.scale_grad_by_freq):
            continue
        own = [
            (pname, p)
            for pname, p in (("weight", module.weight), ("bias", getattr(module, "bias", None)))
            if p is not None and f"{mname}.{pname}".lstrip(".") in selected
        ]
        if own and all(owners[id(p)] == 1 for _, p in own) and module._forward_hooks == {}:
            layers[mname] = [f"{mname}.{pname}".lstrip(".") for pname, _ in own]
    return layers


def _layer_inputs(module: nn.Module, x: Tensor, with_bias: bool, with_weight: bool) -> Tensor:
    """The factor ``a`` (N, T, D) of a Linear or Conv layer for its input ``x``."""
    n = x.shape[0]
    if isinstance(module, nn.Linear):
        a = x.reshape(n, -1, x.shape[-1])
    else:
        if isinstance(module, nn.Conv1d):
            x = x.unsqueeze(2)
            size, dil, pad, stride = [(1, v[0]) for v in (module.kernel_size, module.dilation)] + [
                (0, module.padding[0]),
                (1, module.stride[0]),
            ]
        else:
            size, dil, pad, stride = (
                module.kernel_size,
                module.dilation,
                module.padding,
                module.stride,
            )
        a = F.unfold(x, size, dilation=dil, padding=pad, stride=stride).transpose(1, 2)
    parts = ([a] if with_weight else []) + ([a.new_ones(*a.shape[:2], 1)] if with_bias else [])
    return torch.cat(parts, dim=-1)


# Outputs whose backward passes run together (vmapped): large enough for efficient matrix
# products, small enough that the batched intermediates stay near the size of the factors.
_OUTPUTS_PER_BACKWARD = 32


def _output_gradients(out: Tensor, zs: list[Tensor]) -> list[Tensor]:
    """Gradients of each output column of ``out`` (N, C) with respect to each of ``zs``:
    one tensor (C, *z.shape) per z. Backward passes are batched over outputs (``vmap``); a
    model whose backward cannot be batched takes one pass per output."""
    if not zs:
        return []
    n, c = out.shape
    eye = torch.eye(c, dtype=out.dtype, device=out.device)
    parts = []
    for lo in range(0, c, _OUTPUTS_PER_BACKWARD):
        seeds = eye[lo : lo + _OUTPUTS_PER_BACKWARD, None, :].expand(-1, n, c)
        try:
            grads = torch.autograd.grad(
                out,
                zs,
                grad_outputs=seeds,
                retain_graph=True,
                is_grads_batched=True,
                materialize_grads=True,  # zeros for a layer whose output does not reach `out`
            )
        except RuntimeError:  # an operation without a batching rule for its backward
            per_output = [
                torch.autograd.grad(out, zs, seed, retain_graph=True, materialize_grads=True)
                for seed in seeds
            ]
            grads = [torch.stack(gs) for gs in zip(*per_output, strict=True)]
        # A materialised zero gradient comes without the batch of outputs: add it.
        rows = len(seeds)
        grads = [
            g if g.dim() > z.dim() else g.expand(rows, *z.shape)
            for g, z in zip(grads, zs, strict=True)
        ]
        parts.append(grads)
    if len(parts) == 1:
        return list(parts[0])
    return [torch.cat(gs) for gs in zip(*parts, strict=True)]


def _output_gradient_layout(module: nn.Module, per_output: Tensor) -> Tensor:
    """Gradients of each output with respect to a layer's output, (C, N, ...), in the factor
    layout (N, T, C, O), contiguous for the Gram products."""
    c, n = per_output.shape[:2]
    if isinstance(module, nn.Conv1d | nn.Conv2d):
        per_output = per_output.reshape(c, n, per_output.shape[2], -1).transpose(2, 3)
    else:
        per_output = per_output.reshape(c, n, -1, per_output.shape[-1])
    return per_output.permute(1, 2, 0, 3).contiguous()


@dataclass
class _NTKContext:
    model: nn.Module
    names: list[str]
    dtype: torch.dtype
    x1: Tensor
    x2: Tensor | None
    output_fn: OutputFn
    output_weights: Tensor | None
    method: NTKMethod
    batch_size: int
    output_projections: int | Tensor | None = None
    projection_seed: int = 0

    def __post_init__(self) -> None:
        self.params = {
            n: p.detach().to(self.dtype) if p.is_floating_point() else p.detach()
            for n, p in self.model.named_parameters()
        }
        self.buffers = {
            n: b.to(self.dtype) if b.is_floating_point() else b
            for n, b in self.model.named_buffers()
        }
        self.layers = (
            {} if self.method == NTKMethod.JACOBIAN else _structured_layers(self.model, self.names)
        )
        self.projection: Tensor | None = None  # (C, s), drawn once for all points

    def _resolve_projection(self, x: Tensor) -> None:
        """Fix the projections ``(C, s)`` before the first Jacobian, so that every point (of
        ``x1`` and ``x2``, of every chunk) is projected on the same ``v_r``; C comes from one
        forward pass of one point."""
        if self.output_projections is None or self.projection is not None:
            return
        with torch.no_grad():
            raw = functional_call(self.model, (self.params, self.buffers), (x[:1],))
            c = self.outputs(raw, 1, project=False).shape[1]
        self.projection = projection_matrix(
            c, self.output_projections, self.projection_seed, self.dtype, x.device
        )

    @property
    def generic_names(self) -> list[str]:
        covered = {n for names in self.layers.values() for n in names}
        return [n for n in self.names if n not in covered]

    def outputs(self, raw: object, expected_rows: int, project: bool = True) -> Tensor:
        """The model's output as (N, C), weighted, and projected to (N, s) with projections."""
        out = raw if self.output_fn is None else self.output_fn(raw)
        if not isinstance(out, Tensor) or out.ndim != 2 or out.shape[0] != expected_rows:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(
                f"The model's output must be (N, C) = ({expected_rows}, C), got {got}. "
                "Pass `output_fn` to map it there, e.g. `output_fn=lambda out: out.logits[:, -1]` "
                "or `lambda out: out[:, None]` for a scalar output."
            )
        if self.output_weights is not None:
            if self.output_weights.shape[0] != out.shape[1]:
                raise ValueError(
                    f"`output_weights` has {self.output_weights.shape[0]} entries but the model "
                    f"has C = {out.shape[1]} outputs."
                )
            out = out * self.output_weights
        if project and self.projection is not None:
            out = out @ self.projection
        return out

    def jacobian(self, x: Tensor) -> Jacobian:
        """Factors of the Jacobian on all points ``x`` (N, ...), in chunks of ``batch_size``,
        each chunk written into blocks allocated once for all N points."""
        self._resolve_projection(x)
        n = len(x)
        while True:
            blocks, failed = [], set()
            for start in range(0, n, self.batch_size):
                part, failed = self._chunk_blocks(x[start : start + self.batch_size])
                if failed:
                    break
                if n <= self.batch_size:
                    blocks = part
                    break
                if not blocks:
                    blocks = [_Block.empty_like(b, n) for b in part]
                for block, b in zip(blocks, part, strict=True):
                    block.write(start, b)
            if not failed:
                break
            # A weight also used outside its module's forward: count it on the generic path.
            self.layers = {m: names for m, names in self.layers.items() if m not in failed}
        return Jacobian(blocks=blocks, num_outputs=blocks[0].g.shape[2])

    def _chunk_blocks(self, x: Tensor) -> tuple[list[_Block], set[str]]:
        blocks, failed = self._structured_blocks(x) if self.layers else ([], set())
        if failed:
            return [], failed
        generic = self.generic_names
        if generic:
            blocks.append(_Block(g=self._generic_jacobian(x, generic)[:, None]))
        return blocks, set()

    def _generic_jacobian(self, x: Tensor, names: list[str]) -> Tensor:
        """Per-example Jacobians (N, C, P_generic) with ``vmap(jacrev)``."""
        fixed = {n: p for n, p in self.params.items() if n not in names}
        free = {n: self.params[n] for n in names}

        def f(free: dict[str, Tensor], xi: Tensor) -> Tensor:
            raw = functional_call(self.model, ({**fixed, **free}, self.buffers), (xi[None],))
            return self.outputs(raw, 1)[0]

        jac = vmap(jacrev(f), in_dims=(None, 0))(free, x)
        return torch.cat([jac[n].reshape(len(x), jac[n].shape[1], -1) for n in names], dim=-1)

    def _structured_blocks(self, x: Tensor) -> tuple[list[_Block], set[str]]:
        """Factors of the structured layers on one chunk, and the layers that failed the check
        that their hooks saw every use of their weights."""
        modules = dict(self.model.named_modules())
        uses: dict[str, list[tuple[Tensor, Tensor]]] = {m: [] for m in self.layers}
        n = x.shape[0]

        def hook_for(mname: str):
            def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
                if args[0].shape[0] != n:  # not applied per example: leave to the check
                    return output
                z = torch.zeros_like(output, requires_grad=True)
                uses[mname].append((args[0].detach(), z))
                return output + z

            return hook

        checked = [name for names in self.layers.values() for name in names]
        params = {
            name: p.requires_grad_(True) if name in checked else p
            for name, p in ((k, v.clone()) for k, v in self.params.items())
        }
        handles = [modules[m].register_forward_hook(hook_for(m)) for m in self.layers]
        try:
            with torch.enable_grad():
                out = self.outputs(functional_call(self.model, (params, self.buffers), (x,)), n)
        finally:
            for h in handles:
                h.remove()
        zs = [z for m in self.layers for _, z in uses[m]]
        grads = _output_gradients(out, zs)
        probe = torch.randn(
            out.shape,
            generator=torch.Generator(device=out.device).manual_seed(0),
            dtype=out.dtype,
            device=out.device,
        )
        true = dict(
            zip(
                checked,
                torch.autograd.grad(out, [params[k] for k in checked], probe, allow_unused=True),
                strict=True,
            )
        )

        blocks, failed, i = [], set(), 0
        for mname, pnames in self.layers.items():
            module = modules[mname]
            layer_uses = uses[mname]
            gs = []
            for _ in layer_uses:
                gs.append(_output_gradient_layout(module, grads[i]))
                i += 1
            if not layer_uses:
                failed.add(mname)
                continue
            g = gs[0] if len(gs) == 1 else torch.cat(gs, dim=1)
            with_weight = pnames[0].endswith("weight")
            with_bias = pnames[-1].endswith("bias")
            if isinstance(module, nn.Embedding):
                toks = torch.cat([xi.reshape(n, -1) for xi, _ in layer_uses], dim=1)
                if module.padding_idx is not None:
                    toks = toks.masked_fill(toks == module.padding_idx, -1)
                block = _Block(g=g, tokens=toks, vocab=module.num_embeddings)
            else:
                a = torch.cat(
                    [_layer_inputs(module, xi, with_bias, with_weight) for xi, _ in layer_uses],
                    dim=1,
                )
                block = _Block(g=g, a=a)
            if not self._saw_every_use(block, probe, [true[p] for p in pnames], module, pnames):
                failed.add(mname)
            blocks.append(block)
        return blocks, failed

    @staticmethod
    def _saw_every_use(block, probe, true_grads, module, pnames) -> bool:
        rebuilt = block.vjp(probe, per_output=False)
        expected = _as_factor_layout(module, pnames, true_grads)
        if expected is None:
            return False
        tol = math.sqrt(torch.finfo(rebuilt.dtype).eps)
        return bool(
            torch.linalg.vector_norm(rebuilt - expected)
            <= tol * (torch.linalg.vector_norm(expected) + tol)
        )


def _as_factor_layout(
    module: nn.Module, pnames: list[str], grads: list[Tensor | None]
) -> Tensor | None:
    """A layer's parameter gradients in the flat order of its factor block's ``vjp``."""
    if any(gr is None for gr in grads):
        return None
    if isinstance(module, nn.Embedding):
        return grads[0].T.reshape(-1)  # (O, V)
    parts = []
    for name, gr in zip(pnames, grads, strict=True):
        parts.append(gr.reshape(gr.shape[0], -1) if name.endswith("weight") else gr[:, None])
    return torch.cat(parts, dim=1).reshape(-1)
