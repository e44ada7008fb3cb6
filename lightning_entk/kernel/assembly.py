"""The Jacobian's blocks, assembled from the factors a capture returns.

A capture gives, per operation, the output gradients ``g`` and, per use, its data factor. Here
they become each use's factors in the normal form of :mod:`~lightning_entk.kernel.rules`
(:func:`use_factors`), and the factors of all uses become blocks (:func:`assemble`), by
:func:`block_route`:

* uses of a parameter with one injective layout: a
  :class:`~lightning_entk.kernel.factors.FactorBlock` (positions where ``g`` is zero for every
  point and output dropped); a weight and its bias on the same output share one;
* uses through a layout ``V`` and its transpose (a tied embedding and unembedding): a
  :class:`~lightning_entk.kernel.factors.TiedBlock`;
* any other set of layouts: a :class:`~lightning_entk.kernel.factors.ColumnBlock` of
  Jacobian columns formed from the factors.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_entk.kernel.budget import MemoryBudget
from lightning_entk.kernel.factors import ColumnBlock, FactorBlock, TiedBlock
from lightning_entk.kernel.rules import Use


def block_route(uses: list[Use]) -> str:
    """How the uses of one parameter become a block of the Jacobian: ``"structured"`` (one
    layout, no entry twice: a :class:`~lightning_entk.kernel.factors.FactorBlock`), ``"tied"``
    (such a layout ``V`` and its transpose ``V^T``: a
    :class:`~lightning_entk.kernel.factors.TiedBlock`) or ``"columns"`` (any other set of
    layouts: Jacobian columns formed from the factors)."""
    if torch.bincount(uses[0].layout.reshape(-1)).max() > 1:  # an entry used twice in a view
        return "columns"
    flipped = transposed_uses(uses)
    if flipped is None:
        return "columns"
    return "tied" if any(flipped) else "structured"


def transposed_uses(uses: list[Use]) -> list[bool] | None:
    """Per use, whether its layout is the first use's ``V`` (False) or ``V^T`` per head (True);
    ``None`` when some use has another layout."""
    first = uses[0].layout
    flipped = []
    for use in uses:
        for candidate, is_flipped in ((first, False), (first.transpose(1, 2), True)):
            if use.layout.shape == candidate.shape and torch.equal(use.layout, candidate):
                flipped.append(is_flipped)
                break
        else:
            return None
    return flipped


def use_factors(uses: list[Use], grads: list[Tensor], factors: list[Tensor]):
    """Per use, ``g`` (n, T, C, H, B) scaled by the use's number, and its factor: ``a``
    (n, T, H, A), token ids (n, T), or None for a shift."""
    out = []
    factors = iter(factors)
    made: dict[tuple, Tensor] = {}  # uses reading one output the same way share one ``g``
    for use in uses:
        key = (use.z, use.out_shape, use.out_perm, use.position_dims, use.heads, use.scale)
        if key not in made:
            g = grads[use.z]
            n, c = g.shape[:2]
            g = g.reshape(n, c, *use.out_shape)
            p = use.position_dims
            order = [2 + d for d in use.out_perm]
            g = g.permute(0, *order[:p], 1, *order[p:])
            g = g.reshape(n, use.positions, c, use.heads, use.outputs)
            made[key] = g if use.scale == 1 else g * use.scale
        a = None if use.kind == "ones" else next(factors)
        out.append((made[key], a))
    return out


def use_gradient(use: Use, g: Tensor, a: Tensor | None, v: Tensor) -> Tensor:
    """``sum_n v[n, c] J_use[n, c]`` in the use's (H, B, A) layout."""
    return torch.einsum("ntchb,nc,ntha->hba", g, v, _dense_factor(use, g, a))


def assemble(
    uses: list[Use],
    parts: list[tuple[Tensor, Tensor | None]],
    n: int,
    c: int,
    sizes: dict[str, int],
    budget: MemoryBudget,
    group_of: dict[str, str] | None = None,
) -> tuple[list, list[str]]:
    """Blocks, and the first parameter of each, by :func:`block_route`, from each use's
    factors ``parts`` (:func:`use_factors`) on ``n`` points with ``c`` outputs. Parameters
    (of ``sizes`` elements) used once each in one operation with the same outputs (a weight
    and its bias), in the same group of ``group_of``, share one block: one output Gram."""
    by_param: dict[str, list[int]] = {}
    for i, use in enumerate(uses):
        by_param.setdefault(use.param, []).append(i)
    route = {name: block_route([uses[i] for i in idx]) for name, idx in by_param.items()}
    group = group_of or {}
    sharing: dict[tuple, list[str]] = {}
    for name, idx in by_param.items():
        use = uses[idx[0]]
        if len(idx) == 1 and use.kind != "tokens" and route[name] == "structured":
            key = (use.z, use.out_perm, use.heads, use.outputs, use.scale, group.get(name))
            sharing.setdefault(key, []).append(name)
    shared_with = {name: names for names in sharing.values() for name in names}
    blocks, owners, done = [], [], set()
    for name, idx in by_param.items():
        if name in done:
            continue
        owners.append(name)
        names = shared_with.get(name, [name])
        mine, factors = [uses[i] for i in idx], [parts[i] for i in idx]
        if len(names) > 1:
            chosen = [by_param[m][0] for m in names]
            blocks.append(_factor_block([uses[i] for i in chosen], [parts[i] for i in chosen]))
            done.update(names)
        elif route[name] == "structured":
            blocks.append(_factor_block(mine, factors))
        elif route[name] == "tied":
            flipped = transposed_uses(mine)
            straight, transposed = (
                _factor_block(
                    [u for u, f in zip(mine, flipped, strict=True) if f == side],
                    [p for p, f in zip(factors, flipped, strict=True) if f == side],
                )
                for side in (False, True)
            )
            blocks.append(TiedBlock(straight, transposed))
        else:
            columns = _columns_from_factors(mine, factors, n, c, budget.column_piece)
            dtype = factors[0][0].dtype
            blocks.append(column_block(columns, sizes[name], n, c, dtype, budget))
    return blocks, owners


def column_block(
    columns, size: int, n: int, c: int, dtype: torch.dtype, budget: MemoryBudget
) -> ColumnBlock:
    """A block of ``size`` Jacobian columns given by ``columns(lo, hi)``, formed a budget
    piece at a time."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return ColumnBlock(columns, size, n, c, itemsize, budget.piece)


def _dense_factor(use: Use, g: Tensor, a: Tensor | None) -> Tensor:
    """The factor ``a`` of a use as a dense (n, T, H, A) array."""
    return FactorBlock(g, a if use.kind == "dense" else None,
                       a if use.kind == "tokens" else None, use.inputs)._a()  # fmt: skip


def _factor_block(uses: list[Use], parts: list[tuple[Tensor, Tensor | None]]) -> FactorBlock:
    """Uses as one block, positions where ``g`` is zero for every point and output dropped:
    uses of one parameter with one layout, their positions concatenated; or uses of several
    parameters on the same output (a weight and its bias), their inputs concatenated."""

    def dense() -> list[Tensor]:
        return [_dense_factor(u, gp, ap) for u, (gp, ap) in zip(uses, parts, strict=True)]

    if len({u.param for u in uses}) > 1:
        a = torch.cat(dense(), dim=-1)
        return _live_positions(FactorBlock(parts[0][0], a=a, inputs=a.shape[-1]))
    kinds = {u.kind for u in uses}
    g = parts[0][0] if len(parts) == 1 else torch.cat([g for g, _ in parts], dim=1)
    if kinds == {"ones"}:
        block = FactorBlock(g, inputs=1)
    elif kinds == {"tokens"}:
        tokens = torch.cat([a for _, a in parts], dim=1)
        block = FactorBlock(g, tokens=tokens, inputs=uses[0].inputs)
    else:
        block = FactorBlock(g, a=torch.cat(dense(), dim=1), inputs=uses[0].inputs)
    return _live_positions(block)


def _live_positions(block: FactorBlock) -> FactorBlock:
    """The block without the positions where ``g`` is zero for every point and output."""
    g = block.g
    if g.shape[1] == 1:  # one position: nothing to drop
        return block
    live = g.reshape(g.shape[0], g.shape[1], -1).ne(0).any(dim=2).any(dim=0)
    if live.all() or not live.any():
        return block
    return FactorBlock(
        g[:, live],
        None if block.a is None else block.a[:, live],
        None if block.tokens is None else block.tokens[:, live],
        block.inputs,
    )


def _columns_from_factors(uses: list[Use], parts, n: int, c: int, budget: int):
    """``columns(lo, hi)`` of a parameter's per-example Jacobian, summed over its uses: each
    use's Jacobian is formed from its factors for a chunk of points at a time (at most
    ``budget`` bytes), and its entries that fall in ``lo:hi`` are added in."""

    def columns(lo: int, hi: int) -> Tensor:
        out = parts[0][0].new_zeros(n, c, hi - lo)
        for use, (g, a) in zip(uses, parts, strict=True):
            flat = use.layout.reshape(-1)
            keep = ((flat >= lo) & (flat < hi)).nonzero().flatten()
            if keep.numel() == 0:
                continue
            step = max(1, budget // max(c * flat.numel() * g.element_size(), 1))
            for start in range(0, n, step):
                part = slice(start, start + step)
                block = FactorBlock(
                    g[part], a[part] if use.kind == "dense" else None,
                    a[part] if use.kind == "tokens" else None, use.inputs,
                )  # fmt: skip
                out[part].index_add_(2, flat[keep] - lo, block.materialized()[:, :, keep])
        return out

    return columns
