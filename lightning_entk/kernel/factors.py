"""The Jacobian held as blocks, and the kernel contracted from them.

A :class:`FactorBlock` holds the uses of one parameter that share a layout (see
:mod:`~lightning_entk.kernel.rules`) as factors: inputs ``a`` (N, T, H, A), or token ids
(N, T), and output gradients ``g`` (N, T, C, H, B), with per-example Jacobian

    J[n, c, h] = sum_t g[n, t, c, h] (x) a[n, t, h]        (a B x A matrix per head)

Its share of the kernel is, per pair of points, a sum over all pairs of positions (and so over
all pairs of uses) of the product of two Grams::

    K[n, m, i, j] = sum_{h, t, s} (a[n, t, h] . a'[m, s, h]) (g[n, t, i, h] . g'[m, s, j, h])

or, when that is cheaper, the per-example Jacobians are formed and contracted. A
:class:`TiedBlock` holds a parameter used through a layout and through its transpose (a tied
embedding and unembedding) as two factor blocks, its kernel their own plus cross terms of the
same form. A :class:`ColumnBlock` is a parameter whose Jacobian is formed column range by
column range (from the factors of uses with other sets of layouts, or by ``torch.func`` for a
parameter no rule covers), so that its memory stays within a budget whatever N, C and P are.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

# Rows per block of a symmetric Gram product: large enough for efficient matrix products.
_GRAM_ROWS = 256


def gram(x: Tensor, y: Tensor, symmetric: bool) -> Tensor:
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


def gram_flops(
    n1: int, n2: int, t1: int, t2: int, heads: int, inputs: int, outputs: int, c: int, mode: str
) -> float:
    """Flops of a factor block's share by Gram products: an input Gram and an output Gram
    per head over all pairs of positions (outputs paired in ``full`` mode)."""
    paired = c * c if mode in ("full", "flatten") else c
    return 2.0 * n1 * n2 * heads * t1 * t2 * (inputs + paired * outputs)


def dense_flops(n1: int, n2: int, t1: int, t2: int, size: int, c: int, mode: str) -> float:
    """Flops of a block's share by per-example Jacobians: forming them, then contracting."""
    paired = c * c if mode in ("full", "flatten") else c
    return 2.0 * n1 * n2 * paired * size + 2.0 * (n1 * t1 + n2 * t2) * c * size


def separable(g: Tensor) -> tuple[Tensor, Tensor] | None:
    """``g`` ``(R, C, K)`` as ``d[r, k] * A[c, k]`` when every column ``g[:, :, k]`` is rank
    one to round-off (``|g - d A| <= 32 eps |g|``): ``(d (R, K), A (C, K))``, else ``None``.

    Output gradients have this form where a use's outputs reach the model's outputs through
    an elementwise map and then a fixed linear one (the last hidden layer of an MLP, the
    unembedding): the trace Gram ``sum_c g[n, c, k] g[m, c, k]`` is then
    ``d[n, k] d[m, k] |A[:, k]|^2``, C times fewer flops.
    """
    rows, c, width = g.shape
    columns = torch.arange(width, device=g.device)
    # Along a fixed generic direction of the outputs, a rank-one column is d[:, k] times a
    # number (nonzero but by accident, when the check below fails): its largest row there is
    # a row where the column is nonzero, and that row's largest output an output where it is.
    generic = torch.cos(torch.arange(c, dtype=g.dtype, device=g.device) * 1.618 + 0.5)
    pivots = (generic @ g).abs().argmax(0)
    a = g[pivots, :, columns].T  # (C, K)
    top = a.abs().argmax(0)
    scale = a[top, columns]
    a = a / torch.where(scale != 0, scale, 1)
    d = torch.gather(g, 1, top.expand(rows, 1, width)).squeeze(1)  # (R, K)
    bound = (32 * torch.finfo(g.dtype).eps * torch.linalg.vector_norm(g)) ** 2
    squared = g.new_zeros(())
    step = max(1, 2**20 // (c * width))
    for lo in range(0, rows, step):  # row blocks: no temporary of g's size
        residual = torch.addcmul(g[lo : lo + step], d[lo : lo + step, None], a, value=-1)
        squared += torch.linalg.vecdot(residual.reshape(-1), residual.reshape(-1))
        if squared > bound:  # already past it: the rest can only add
            return None
    return d, a


def _shared_output_gram(g1: Tensor, g2: Tensor) -> Tensor | None:
    """``(H,)``: ``sum_{c, b} g1[r, c, h, b] g2[s, c, h, b]`` when both ``(R, C, H, B)`` are the
    same at every row (point and position), as at a linear readout, whose output gradients are
    the model's own output map whatever the point; ``None`` otherwise. One comparison pass
    over each, instead of a Gram of ``R1 R2 C B`` products."""
    if not (torch.equal(g1, g1[:1].expand_as(g1)) and torch.equal(g2, g2[:1].expand_as(g2))):
        return None
    return torch.einsum("chb,chb->h", g1[0], g2[0])


def contract(j1: Tensor, j2: Tensor, mode: str, symmetric: bool) -> Tensor:
    """The kernel of per-example Jacobians ``(N1, C, P)`` and ``(N2, C, P)`` in ``full``,
    ``trace`` or ``diagonal`` layout."""
    n1, c, p = j1.shape
    n2 = j2.shape[0]
    if mode == "trace":
        return gram(j1.reshape(n1, c * p), j2.reshape(n2, c * p), symmetric)
    if mode == "diagonal":
        return torch.bmm(j1.transpose(0, 1), j2.permute(1, 2, 0)).permute(1, 2, 0)
    k = gram(j1.reshape(n1 * c, p), j2.reshape(n2 * c, p), symmetric)
    return k.reshape(n1, c, n2, c).transpose(1, 2)


def in_row_blocks(block, other, mode: str, per_point: int) -> Tensor:
    """``block._kernel(other, mode)``, formed for blocks of ``block``'s points at a time when
    all at once would pass ``block.scratch_bytes`` (``per_point`` bytes per point); against the
    points from the block's own on, mirrored, when ``other`` is ``block``."""
    n1, n2 = block.num_points, other.num_points
    rows = n1 if block.scratch_bytes is None else max(1, block.scratch_bytes // max(per_point, 1))
    if rows >= n1:
        return block._kernel(other, mode)
    symmetric = other is block
    out = None
    for lo in range(0, n1, rows):
        hi = min(lo + rows, n1)
        part = block.points(lo, hi)._kernel(block.points(lo, n1) if symmetric else other, mode)
        if out is None:
            out = part.new_empty(n1, n2, *part.shape[2:])
        if symmetric:  # K[m, n] = K[n, m], the outputs' pair swapped in full mode
            mirrored = part[:, hi - lo :].transpose(0, 1)
            out[lo:hi, lo:] = part
            out[hi:, lo:hi] = mirrored.transpose(-1, -2) if mode == "full" else mirrored
        else:
            out[lo:hi] = part
    return out


@dataclass
class FactorBlock:
    """Uses of one parameter with one layout, as factors (see the module docstring)."""

    g: Tensor  # (N, T, C, H, B)
    a: Tensor | None = None  # (N, T, H, A); None with tokens, or for a shift (A = 1)
    tokens: Tensor | None = None  # (N, T) ids, one-hot over A; negative ids contribute nothing
    inputs: int = 1  # A
    scratch_bytes: int | None = None  # bound on the temporaries of :meth:`kernel`

    @property
    def size(self) -> int:
        """Parameters in the block, H B A."""
        return self.g.shape[3] * self.g.shape[4] * self.inputs

    @property
    def num_points(self) -> int:
        return self.g.shape[0]

    def _a(self) -> Tensor:
        """``a`` as a dense (N, T, H, A) array (ones for a shift, one-hot for tokens)."""
        if self.a is not None:
            return self.a
        n, t, _, h, _ = self.g.shape
        if self.tokens is None:
            return self.g.new_ones(n, t, h, 1)
        onehot = self.g.new_zeros(n, t, self.inputs + 1)
        onehot.scatter_(2, torch.where(self.tokens < 0, self.inputs, self.tokens)[..., None], 1)
        return onehot[..., None, : self.inputs]

    def inputs_against(self, rows: Tensor) -> Tensor:
        """(H, R, N T): ``rows`` (H, R, A) dotted with the inputs at every point and position
        (a gather for tokens)."""
        n, t, _, h, _ = self.g.shape
        if self.tokens is not None:
            index = torch.where(self.tokens < 0, self.inputs, self.tokens).reshape(-1)
            padded = torch.cat([rows, rows.new_zeros(*rows.shape[:2], 1)], dim=2)
            return padded.index_select(2, index)
        if self.a is None:
            return rows.expand(-1, -1, n * t)
        return torch.bmm(rows, self.a.reshape(n * t, h, -1).permute(1, 2, 0))

    def _input_gram(self, other: FactorBlock) -> Tensor:
        """(H, N1 T1, N2 T2) Gram of the inputs, per head."""
        n1, t1, _, h, _ = self.g.shape
        n2, t2 = other.g.shape[:2]
        if self.tokens is not None and other.tokens is not None:
            u, v = self.tokens.reshape(-1), other.tokens.reshape(-1)
            return ((u[:, None] == v[None, :]) & (u[:, None] >= 0)).to(self.g.dtype)[None]
        if self.a is None and self.tokens is None:
            return self.g.new_ones(1, 1, 1).expand(h, n1 * t1, n2 * t2)
        a1 = self._a().reshape(n1 * t1, h, -1)
        a2 = other._a().reshape(n2 * t2, h, -1)
        if h == 1:
            return gram(a1[:, 0], a2[:, 0], symmetric=other is self)[None]
        return torch.bmm(a1.transpose(0, 1), a2.permute(1, 2, 0))

    def _materialize_cheaper(self, other: FactorBlock, mode: str) -> bool:
        """Whether forming per-example Jacobians beats the Grams of the factors (and fits
        beside them: at most 2^27 entries)."""
        n1, t1, c, h, b = self.g.shape
        n2, t2 = other.g.shape[:2]
        if t1 * t2 * h == 1 and self.tokens is None:
            return False
        inputs = 1 if self.tokens is not None else self.inputs
        grams = gram_flops(n1, n2, t1, t2, h, inputs, b, c, mode)
        dense = dense_flops(n1, n2, t1, t2, self.size, c, mode)
        fits = (n1 + n2) * c * self.size <= 2**27
        return fits and dense < grams

    def materialized(self) -> Tensor:
        """Per-example Jacobians (N, C, P_b), in the (H, B, A) order of the layout."""
        n, _, c = self.g.shape[:3]
        out = self.g.new_zeros(n, c, self.size)
        self.add_into(out)
        return out

    def add_into(self, out: Tensor, transposed: bool = False) -> None:
        """Add the per-example Jacobians to ``out`` (N, C, P_b), a view whose last dim is
        contiguous, in the (H, B, A) order of the layout, or in (H, A, B) order when
        ``transposed``."""
        n, t, c, h, b = self.g.shape
        out = out.unflatten(2, (h, self.inputs, b) if transposed else (h, b, self.inputs))
        out = out.transpose(-1, -2) if transposed else out  # (N, C, H, B, A) either way
        if self.tokens is not None:
            jac = self.g.new_zeros(n, self.inputs + 1, c, h, b)
            index = torch.where(self.tokens < 0, self.inputs, self.tokens)
            jac.scatter_add_(1, index[..., None, None, None].expand_as(self.g), self.g)
            out.add_(jac[:, : self.inputs].permute(0, 2, 3, 4, 1))
        elif t == 1:  # an outer product per point and output: no temporary
            out.addcmul_(self.g[:, 0, ..., None], self._a()[:, 0, None, :, None, :])
        else:
            out.add_(torch.einsum("ntchb,ntha->nchba", self.g, self._a()))

    def points(self, lo: int, hi: int) -> FactorBlock:
        """The block restricted to points ``lo:hi`` (views, no copy)."""
        a, tokens = self.a, self.tokens
        return FactorBlock(
            self.g[lo:hi], None if a is None else a[lo:hi],
            None if tokens is None else tokens[lo:hi], self.inputs,
        )  # fmt: skip

    def kernel(self, other: FactorBlock, mode: str) -> Tensor:
        """This block's share of the kernel, in ``full`` (N1, N2, C, C), ``trace`` (N1, N2)
        or ``diagonal`` (N1, N2, C) layout. When the Grams over all pairs of positions would
        pass ``scratch_bytes``, they are formed for blocks of this block's points at a time
        (against the points from the block's own on, mirrored, when ``other`` is ``self``)."""
        if self._materialize_cheaper(other, mode):
            return self._kernel(other, mode)
        return in_row_blocks(self, other, mode, self._scratch_per_point(other, mode))

    def _scratch_per_point(self, other: FactorBlock, mode: str) -> int:
        """Bytes of the Grams of :meth:`_kernel` per point of this block."""
        _, t1, c, h, _ = self.g.shape
        n2, t2 = other.g.shape[:2]
        paired = {"trace": 1, "diagonal": c}.get(mode, c * c)
        return h * t1 * n2 * t2 * (2 + paired) * self.g.element_size()

    def _kernel(self, other: FactorBlock, mode: str) -> Tensor:
        symmetric = other is self
        if self._materialize_cheaper(other, mode):
            mine = self.materialized()
            return contract(mine, mine if symmetric else other.materialized(), mode, symmetric)
        n1, t1, c, h, b = self.g.shape
        n2, t2 = other.g.shape[:2]
        k_in = self._input_gram(other)  # (H, N1 T1, N2 T2)
        g1 = self.g.reshape(n1 * t1, c, h, b)
        g2 = other.g.reshape(n2 * t2, c, h, b)
        if mode == "trace":
            shared = _shared_output_gram(g1, g2)
            if shared is not None:  # the same output gradients at every point (a readout)
                k = (shared[:, None, None] * k_in).sum(0) if h > 1 else k_in[0] * shared[0]
                return k if t1 == t2 == 1 else k.reshape(n1, t1, n2, t2).sum(dim=(1, 3))
            k_out = self._separable_output_gram(other) if c > 1 else None
            if k_out is None and h == 1:
                k_out = gram(g1.reshape(n1 * t1, -1), g2.reshape(n2 * t2, -1), symmetric)[None]
            elif k_out is None:
                k_out = torch.bmm(
                    g1.permute(2, 0, 1, 3).reshape(h, n1 * t1, c * b),
                    g2.permute(2, 1, 3, 0).reshape(h, c * b, n2 * t2),
                )
            if h > 1:
                k = (k_out * k_in).sum(0)
            elif self.a is not None or self.tokens is not None:
                k = k_out[0].mul_(k_in[0])
            else:
                k = k_out[0]
            return k if t1 == t2 == 1 else k.reshape(n1, t1, n2, t2).sum(dim=(1, 3))
        k_in = k_in.reshape(h, n1, t1, n2, t2)
        if mode == "diagonal":
            k_out = torch.bmm(
                g1.permute(1, 2, 0, 3).reshape(c * h, n1 * t1, b),
                g2.permute(1, 2, 3, 0).reshape(c * h, b, n2 * t2),
            ).reshape(c, h, n1, t1, n2, t2)
            return torch.einsum("hntms,chntms->nmc", k_in, k_out)
        k_out = torch.bmm(
            g1.permute(2, 0, 1, 3).reshape(h, n1 * t1 * c, b),
            g2.permute(2, 3, 0, 1).reshape(h, b, n2 * t2 * c),
        ).reshape(h, n1, t1, c, n2, t2, c)
        return torch.einsum("hntms,hntimsj->nmij", k_in, k_out)

    def _separable_output_gram(self, other: FactorBlock) -> Tensor | None:
        """(H, N1 T1, N2 T2) ``sum_c`` Gram of the output gradients per head when both
        blocks' are :func:`separable` (else ``None``)."""
        n1, t1, c, h, b = self.g.shape
        n2, t2 = other.g.shape[:2]
        mine = separable(self.g.reshape(n1 * t1, c, h * b))
        theirs = (
            mine if other is self or mine is None else separable(other.g.reshape(n2 * t2, c, h * b))
        )
        if theirs is None:
            return None
        weights = (mine[1] * theirs[1]).sum(0)  # (H B,)
        d1 = (mine[0] * weights).reshape(n1 * t1, h, b).transpose(0, 1)
        d2 = theirs[0].reshape(n2 * t2, h, b).transpose(0, 1)
        if h == 1:
            return gram(d1[0], d2[0], symmetric=False)[None]
        return torch.bmm(d1, d2.transpose(1, 2))

    def output_slice(self, lo: int, hi: int) -> FactorBlock:
        """The block restricted to outputs ``lo:hi`` (views, no copy)."""
        return FactorBlock(self.g[:, :, lo:hi], self.a, self.tokens, self.inputs)

    def vjp(self, v: Tensor, per_output: bool) -> Tensor:
        """``sum_n v[n, c] J[n, c]``: shape (P_b,), or (C, P_b) kept per output."""
        out = "c" if per_output else ""
        res = torch.einsum(f"ntchb,nc,ntha->{out}hba", self.g, v, self._a())
        return res.reshape(*res.shape[: 1 if per_output else 0], -1)

    def jvp(self, u: Tensor, per_output: bool) -> Tensor:
        """``J[n, c] . u`` (or ``. u[c]`` when ``per_output``): shape (N, C)."""
        h, b = self.g.shape[3:]
        out = "c" if per_output else ""
        u = u.reshape(*u.shape[:-1], h, b, self.inputs)
        return torch.einsum(f"ntchb,{out}hba,ntha->nc", self.g, u, self._a())


@dataclass
class ColumnBlock:
    """A parameter group whose per-example Jacobian ``(N, C, P_b)`` is formed a range of
    columns at a time by ``columns(lo, hi)``, each range within ``column_bytes``."""

    columns: Callable[[int, int], Tensor]
    size: int
    num_points: int
    num_outputs: int
    itemsize: int
    column_bytes: int
    output_range: tuple[int, int] | None = None

    def _ranges(self, other_points: int = 0, itemsize: int | None = None) -> list[tuple[int, int]]:
        itemsize = itemsize or self.itemsize
        per_column = (self.num_points + other_points) * self.num_outputs * itemsize
        width = max(1, self.column_bytes // max(per_column, 1))
        return [(lo, min(lo + width, self.size)) for lo in range(0, self.size, width)]

    def _part(self, lo: int, hi: int) -> Tensor:
        cols = self.columns(lo, hi)
        if self.output_range is not None:
            cols = cols[:, self.output_range[0] : self.output_range[1]]
        return cols

    def kernel(self, other: ColumnBlock, mode: str) -> Tensor:
        """Contracted in float64 whatever the columns' dtype: one float32 dot product over
        C P terms loses digits that the structured routes' short Grams keep (~1e-4 relative
        against ~1e-7 at a million parameters); the columns' forming dominates the cost."""
        symmetric = other is self
        total, dtype = None, None
        for lo, hi in self._ranges(0 if symmetric else other.num_points, itemsize=8):
            mine = self._part(lo, hi)
            dtype = mine.dtype
            mine = mine.double()
            theirs = mine if symmetric else other._part(lo, hi).double()
            part = contract(mine, theirs, mode, symmetric)
            total = part if total is None else total.add_(part)
        return total.to(dtype)

    def materialized(self) -> Tensor:
        return self._part(0, self.size)

    def add_into(self, out: Tensor) -> None:
        for lo, hi in self._ranges():
            out[:, :, lo:hi] += self._part(lo, hi)

    def output_slice(self, lo: int, hi: int) -> ColumnBlock:
        start = 0 if self.output_range is None else self.output_range[0]
        return ColumnBlock(
            self.columns, self.size, self.num_points, hi - lo, self.itemsize,
            self.column_bytes, (start + lo, start + hi),
        )  # fmt: skip

    def vjp(self, v: Tensor, per_output: bool) -> Tensor:
        parts = [
            torch.einsum("ncp,nc->cp" if per_output else "ncp,nc->p", self._part(lo, hi), v)
            for lo, hi in self._ranges()
        ]
        return torch.cat(parts, dim=-1)

    def jvp(self, u: Tensor, per_output: bool) -> Tensor:
        total = 0
        for lo, hi in self._ranges():
            spec = "ncp,cp->nc" if per_output else "ncp,p->nc"
            total = total + torch.einsum(spec, self._part(lo, hi), u[..., lo:hi])
        return total


def tied_flops(
    n1: int,
    n2: int,
    t1: tuple[int, int],
    t2: tuple[int, int],
    heads: int,
    across: tuple[int, int],
    size: int,
    c: int,
    mode: str,
) -> tuple[float, float]:
    """Flops of a :class:`TiedBlock`'s share from factors, and from per-example Jacobians.

    ``t1``, ``t2``: positions of the uses of ``V`` and of ``V^T`` on each side; ``across``: the
    lengths that dot products run over along ``V``'s outputs B and inputs A (1 for one-hot
    tokens, a gather). From factors: each kind of use's own Grams, and two cross terms, each
    a Gram of output gradients against inputs on both sides of the transpose and their product
    summed over all pairs of positions.
    """
    b, a = across
    paired = c * c if mode in ("full", "flatten") else c
    own = gram_flops(n1, n2, t1[0], t2[0], heads, a, b, c, mode)
    own += gram_flops(n1, n2, t1[1], t2[1], heads, b, a, c, mode)
    pairs = t1[0] * t2[1] + t1[1] * t2[0]
    cross = 2.0 * n1 * n2 * heads * pairs * (c * (a + b) + paired)
    return own + cross, dense_flops(n1, n2, sum(t1), sum(t2), size, c, mode)


@dataclass
class TiedBlock:
    """Uses of one parameter through a view ``V`` (H, B, A) and through its transpose
    (H, A, B): a tied embedding ``W[ids]`` and unembedding ``h @ W.T``, or ``W`` and ``W.T`` in
    Toy Models of Superposition. ``straight`` holds the uses of ``V`` and ``transposed`` those of
    ``V^T``, each in its own orientation, so that in ``V``'s order

        J[n, c, h] = sum_t g[n, t, c, h] (x) a[n, t, h]  +  (sum_s g~[n, s, c, h] (x) a~[n, s, h])^T

    and the kernel is the two blocks' own kernels plus the cross terms, per pair of points
    a sum over all pairs of positions of a product of two Grams, each of one side's output
    gradients against the other side's inputs::

        K~[n, m, i, j] = sum_{h, t, s} (g[n, t, i, h] . a~'[m, s, h]) (a[n, t, h] . g~'[m, s, j, h])

    (and the same with the sides swapped). No Jacobian of size ``N C P`` is formed unless that
    is cheaper (small parameters, many positions).
    """

    straight: FactorBlock
    transposed: FactorBlock
    scratch_bytes: int | None = None  # bound on the temporaries of :meth:`kernel`

    @property
    def size(self) -> int:
        return self.straight.size

    @property
    def num_points(self) -> int:
        return self.straight.num_points

    def _shape(self) -> tuple[int, int, int]:
        """(H, B, A) of ``V``."""
        h, b = self.straight.g.shape[3:]
        return h, b, self.straight.inputs

    def _flops(self, other: TiedBlock, mode: str) -> tuple[float, float]:
        """Flops of the kernel from factors, and from per-example Jacobians."""
        (n1, t1, c, h, b), a = self.straight.g.shape, self.straight.inputs
        n2, t2 = other.straight.g.shape[:2]
        u1, u2 = self.transposed.g.shape[1], other.transposed.g.shape[1]
        across = (1 if self.transposed.tokens is not None else b,
                  1 if self.straight.tokens is not None else a)  # fmt: skip
        return tied_flops(n1, n2, (t1, u1), (t2, u2), h, across, self.size, c, mode)

    def _materialize_cheaper(self, other: TiedBlock, mode: str) -> bool:
        factors, dense = self._flops(other, mode)
        c = self.straight.g.shape[2]
        fits = (self.num_points + other.num_points) * c * self.size <= 2**27
        return fits and dense < factors

    def kernel(self, other: TiedBlock, mode: str) -> Tensor:
        """This block's share of the kernel, in ``full``, ``trace`` or ``diagonal`` layout (see
        :meth:`FactorBlock.kernel`, whose bound on temporaries it keeps)."""
        if self._materialize_cheaper(other, mode):
            return self._kernel(other, mode)
        (_, t1, c, h, _), u1 = self.straight.g.shape, self.transposed.g.shape[1]
        n2, t2 = other.straight.g.shape[:2]
        u2 = other.transposed.g.shape[1]
        paired = {"trace": 1, "diagonal": c}.get(mode, c * c)
        positions = max(t1 * t2, u1 * u2, t1 * u2, u1 * t2)
        per_point = h * positions * n2 * (3 * c + paired) * self.straight.g.element_size()
        return in_row_blocks(self, other, mode, per_point)

    def _kernel(self, other: TiedBlock, mode: str) -> Tensor:
        symmetric = other is self
        if self._materialize_cheaper(other, mode):
            mine = self.materialized()
            return contract(mine, mine if symmetric else other.materialized(), mode, symmetric)
        k = self.straight._kernel(other.straight, mode)
        k += self.transposed._kernel(other.transposed, mode)
        cross = _cross_term(self.straight, other.transposed, mode)
        if symmetric:  # the mirror term is this one with the points (and outputs) swapped
            mirrored = cross.transpose(0, 1)
            k += cross + (mirrored.transpose(-1, -2) if mode == "full" else mirrored)
        else:
            k += cross + _cross_term(self.transposed, other.straight, mode)
        return k

    def points(self, lo: int, hi: int) -> TiedBlock:
        return TiedBlock(self.straight.points(lo, hi), self.transposed.points(lo, hi))

    def output_slice(self, lo: int, hi: int) -> TiedBlock:
        return TiedBlock(self.straight.output_slice(lo, hi), self.transposed.output_slice(lo, hi))

    def _to_straight(self, t: Tensor) -> Tensor:
        """Entries in the transposed uses' (H, A, B) order, last dim, put in ``V``'s order."""
        h, b, a = self._shape()
        return t.unflatten(-1, (h, a, b)).transpose(-1, -2).flatten(-3)

    def _to_transposed(self, t: Tensor) -> Tensor:
        h, b, a = self._shape()
        return t.unflatten(-1, (h, b, a)).transpose(-1, -2).flatten(-3)

    def materialized(self) -> Tensor:
        """Per-example Jacobians (N, C, H B A), in the (H, B, A) order of ``V``."""
        c = self.straight.g.shape[2]
        out = self.straight.g.new_zeros(self.num_points, c, self.size)
        self.add_into(out)
        return out

    def add_into(self, out: Tensor) -> None:
        """Add the per-example Jacobians to ``out`` (N, C, H B A), a view whose last dim is
        contiguous."""
        self.straight.add_into(out)
        self.transposed.add_into(out, transposed=True)

    def vjp(self, v: Tensor, per_output: bool) -> Tensor:
        mine = self.straight.vjp(v, per_output)
        return mine + self._to_straight(self.transposed.vjp(v, per_output))

    def jvp(self, u: Tensor, per_output: bool) -> Tensor:
        mine = self.straight.jvp(u, per_output)
        return mine + self.transposed.jvp(self._to_transposed(u), per_output)


def _cross_term(p: FactorBlock, q: FactorBlock, mode: str) -> Tensor:
    """``sum_{h, t, s} (p.g[n, t, i] . q.a[m, s]) (p.a[n, t] . q.g[m, s, j])`` in the layout of
    ``mode``: the inner product of the Jacobians of two blocks whose layouts are each other's
    transposes (see :class:`TiedBlock`)."""
    n1, t1, c, h, _ = p.g.shape
    n2, t2 = q.g.shape[:2]
    # (H, N1 T1 C, N2 T2): p's output gradients against q's inputs, and the same the other way
    left = q.inputs_against(p.g.permute(3, 0, 1, 2, 4).reshape(h, n1 * t1 * c, -1))
    right = p.inputs_against(q.g.permute(3, 0, 1, 2, 4).reshape(h, n2 * t2 * c, -1))
    left = left.reshape(h, n1, t1, c, n2, t2)
    right = right.reshape(h, n2, t2, c, n1, t1).permute(0, 4, 5, 3, 1, 2)  # as ``left``
    if mode == "full":
        return torch.einsum("hntims,hntjms->nmij", left, right)
    both = (left * right).sum(dim=(0, 2, 5))  # (N1, C, N2)
    return both.sum(1) if mode == "trace" else both.transpose(1, 2)


Block = FactorBlock | ColumnBlock | TiedBlock


@dataclass
class Jacobian:
    """The Jacobian of a model on N points, held as blocks; never an N C P array unless a
    caller asks for :meth:`materialized`."""

    blocks: list[Block]
    num_points: int
    num_outputs: int
    dtype: torch.dtype
    device: torch.device
    groups: list[str] | None = None  # the parameter group of each block, when asked for

    @property
    def num_parameters(self) -> int:
        return sum(b.size for b in self.blocks)

    def kernel(self, other: Jacobian, mode: str) -> Tensor:
        """``J J'^T`` in the layout of ``mode`` (see the package docstring). With ``other``
        this same Jacobian, only half of each symmetric Gram product is computed."""
        return self._kernels(other, mode, [None] * len(self.blocks))[None]

    def group_kernels(self, other: Jacobian, mode: str) -> dict[str, Tensor]:
        """The kernel of each parameter group (:attr:`groups`), in one pass over the blocks:
        they sum to :meth:`kernel`."""
        return self._kernels(other, mode, self.groups)

    def _kernels(self, other: Jacobian, mode: str, keys: list) -> dict:
        reduced = "full" if mode == "flatten" else mode
        n1, n2, c = self.num_points, other.num_points, self.num_outputs
        shape = {"trace": (n1, n2), "diagonal": (n1, n2, c)}.get(reduced, (n1, n2, c, c))
        sums: dict = {}
        for key in dict.fromkeys(keys):
            sums[key] = None
        for key, b1, b2 in zip(keys, self.blocks, other.blocks, strict=True):
            part = b1.kernel(b2, reduced)
            sums[key] = part if sums[key] is None else sums[key].add_(part)
        out = {}
        for key, k in sums.items():
            k = torch.zeros(shape, dtype=self.dtype, device=self.device) if k is None else k
            out[key] = k if mode != "flatten" else k.permute(2, 0, 3, 1).reshape(c * n1, c * n2)
        return out if out else {None: torch.zeros(shape, dtype=self.dtype, device=self.device)}

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
            step = max(1, self.num_parameters // max(block.size, 1))
            for lo in range(0, c, step):
                part = block.output_slice(lo, min(lo + step, c))
                width = min(lo + step, c) - lo
                vc = v[:, None].expand(n, width)
                out += part.jvp(part.vjp(vc, per_output=True), per_output=True).sum(dim=1)
        return out

    def materialized(self) -> Tensor:
        """All per-example Jacobians, (N, C, P), written block by block into one array."""
        full = torch.zeros(
            self.num_points, self.num_outputs, self.num_parameters, dtype=self.dtype,
            device=self.device,
        )  # fmt: skip
        start = 0
        for block in self.blocks:
            block.add_into(full[:, :, start : start + block.size])
            start += block.size
        return full

    def vjp(self, v: Tensor, per_output: bool) -> list[Tensor]:
        """``J^T v`` for ``v`` of shape (N, C), block by block."""
        return [b.vjp(v, per_output) for b in self.blocks]

    def jvp(self, u: list[Tensor], per_output: bool) -> Tensor:
        """``J u`` for ``u`` as returned by :meth:`vjp`: shape (N, C)."""
        return sum(b.jvp(ub, per_output) for b, ub in zip(self.blocks, u, strict=True))
