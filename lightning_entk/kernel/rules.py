"""Rules: the structured share of the Jacobian for each kind of operation linear in a parameter.

Every supported operation is brought to one normal form, an einsum of a data operand ``x``
(an activation, or token ids) with a view ``V`` of the parameter::

    y[t, h, b] = sum_a  x[t, h, a] V[h, b, a]

Letters of ``V`` that also index ``x`` and ``y`` are heads ``h`` (per-head weights, or the
elements of an elementwise scale); letters contracted against ``x`` are inputs ``a``; letters
only in ``V`` and ``y`` are outputs ``b``; letters of ``x`` and ``y`` not in ``V`` are positions
``t`` (sequence, spatial, broadcast dims). The per-example gradient of one output ``c`` is then

    dy_c / dV[h, b, a] = sum_t  g[t, c, h, b] x[t, h, a]          (g = d out_c / d y)

so a use is held as the *factors* ``x`` (T, H, A) and ``g`` (T, C, H, B), and ``layout`` (H, B, A)
says which element of the flat parameter each entry of ``V`` is. Two uses with the same layout
are summed by concatenating their positions; their share of the kernel is a product of Grams
summed over all pairs of positions (see :mod:`lightning_entk.kernel.factors`). Uses through a
layout and its transpose (a tied embedding ``W[ids]`` and unembedding ``h @ W.T``) add cross
terms of the same form, each Gram pairing one use's output gradients with the other's inputs.

Covered (the parameter may enter through any chain of views: transpose, permute, reshape,
slice, select, chunk, split, expand, casts, dropout outside training, scaling by a number,
and adding a number, as in Gemma's ``x * (1 + weight)``: the derivative is the view's
whatever the offset):

    ``F.linear``, ``@``/``matmul``/``mm``/``bmm``, ``addmm``/``baddbmm`` (weight on either side,
    any broadcast of batch dims), ``einsum`` with two operands, ``F.embedding`` and ``W[ids]``,
    ``conv1d``/``conv2d`` (any stride, padding, dilation, groups, given by keyword or left
    out; ``padding="valid"``), elementwise ``*`` and
    ``+``/``-`` with broadcasting (gains, biases, positional parameters), and the affine parts
    of ``layer_norm``, ``rms_norm``, ``group_norm`` and ``batch_norm``; ``F.linear(x, W[e])``
    with ``W`` (E, O, I) a parameter of experts and ``e`` a 0-d tensor (see
    :mod:`~lightning_entk.kernel.capture`); ``torch.where(mask, V, other)`` (a scale by the
    mask); a view as the additive ``attn_mask`` of ``scaled_dot_product_attention`` (added
    to zeros of the scores' shape first).

Not covered, so the parameter takes the generic path: a parameter entering any other
operation (``exp``, a division by it, ``F.prelu``, ``max_norm`` embeddings, string padding of
convolutions other than ``"valid"``, einsums of three operands ...).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor


class Unsupported(Exception):
    """The operation is linear in the parameter, but in a form no rule covers."""


@dataclass
class Use:
    """One use of a parameter in one operation of the forward pass.

    ``layout`` (H, B, A): index of each entry of the parameter's view in the flat parameter.
    ``kind``: ``"dense"`` (``x`` is an activation (T, H, A)), ``"tokens"`` (``x`` is token ids
    (T,), one-hot over A) or ``"ones"`` (a shift: ``x`` is 1, A = 1).
    ``out_shape``, ``out_perm``: reshape the operation's output ``y`` to ``out_shape``, then
    permute it to (positions..., heads..., outputs...) to read ``g`` as (T, H, B).
    ``z``: which perturbation (one per operation) reads this use's output gradient.
    """

    param: str
    layout: Tensor
    kind: str
    out_shape: tuple[int, ...]
    out_perm: tuple[int, ...]
    positions: int
    position_dims: int
    scale: float = 1.0
    z: int = -1

    @property
    def heads(self) -> int:
        return self.layout.shape[0]

    @property
    def outputs(self) -> int:
        return self.layout.shape[1]

    @property
    def inputs(self) -> int:
        return self.layout.shape[2]


def einsum_use(
    x: Tensor | None,
    x_letters: str,
    index: Tensor,
    v_letters: str,
    y_shape: Sequence[int],
    y_letters: str,
) -> tuple[Tensor | None, Tensor, tuple[int, ...], int, int]:
    """The normal form of ``y = einsum(x, V)``: the factor ``x`` as (T, H, A), the layout
    (H, B, A), the permutation of ``y``, T and the number of position dims. ``x=None`` is a
    shift (``x_letters`` empty)."""
    for letters in (x_letters, v_letters, y_letters):
        if len(set(letters)) != len(letters):
            raise Unsupported(f"repeated index in {letters!r}")
    if any(ch not in x_letters and ch not in y_letters for ch in v_letters):
        raise Unsupported("a parameter index summed on its own")
    heads = [ch for ch in v_letters if ch in x_letters and ch in y_letters]
    inputs = [ch for ch in v_letters if ch in x_letters and ch not in y_letters]
    outputs = [ch for ch in v_letters if ch not in x_letters and ch in y_letters]
    positions = [ch for ch in y_letters if ch not in v_letters]
    if x is not None and any(ch not in x_letters for ch in positions):
        raise Unsupported("an output index of neither operand")
    sizes = dict(zip(y_letters, y_shape, strict=True))
    sizes.update(zip(v_letters, index.shape, strict=True))
    if x is not None:
        for ch, size in zip(x_letters, x.shape, strict=True):
            if sizes.setdefault(ch, size) != size:
                raise Unsupported(f"index {ch!r} broadcast between operands")

    def prod(letters: list[str]) -> int:
        return math.prod(sizes[ch] for ch in letters)

    t, h, b, a = prod(positions), prod(heads), prod(outputs), prod(inputs)
    layout = index.permute([v_letters.index(ch) for ch in heads + outputs + inputs])
    layout = layout.reshape(h, b, a)
    perm = tuple(y_letters.index(ch) for ch in positions + heads + outputs)
    if x is None:
        return None, layout, perm, t, len(positions)
    summed = [i for i, ch in enumerate(x_letters) if ch not in v_letters and ch not in y_letters]
    kept = [ch for ch in x_letters if ch in v_letters or ch in y_letters]
    if summed:
        x = x.sum(dim=summed)
    factor = x.permute([kept.index(ch) for ch in positions + heads + inputs]).reshape(t, h, a)
    return factor, layout, perm, t, len(positions)


# --------------------------------------------------------------------------------------------
# Letters for the operations, in the normal form above.

_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def broadcast_letters(
    x_shape: Sequence[int], v_shape: Sequence[int], start: int = 0
) -> tuple[str, str, str, list[int], list[int]]:
    """Letters for elementwise broadcasting of ``x`` with ``V``, right-aligned: a dim of both
    is a head, one of ``x`` alone (``V`` broadcast) a position, one of ``V`` alone an output.
    Returns the letters of x, V and y and the dims of ``x`` and ``V`` to squeeze (size 1
    broadcast against a larger size)."""
    ndim = max(len(x_shape), len(v_shape))
    xs = [1] * (ndim - len(x_shape)) + list(x_shape)
    vs = [1] * (ndim - len(v_shape)) + list(v_shape)
    x_l, v_l, y_l, x_sq, v_sq = "", "", "", [], []
    for i in range(ndim):
        ch = _LETTERS[start + i]
        xi, vi = i - (ndim - len(x_shape)), i - (ndim - len(v_shape))
        if xs[i] == vs[i]:
            x_l += ch if xi >= 0 else ""
            v_l += ch if vi >= 0 else ""
            y_l += ch
        elif vs[i] == 1:
            x_l, y_l = x_l + ch, y_l + ch
            if vi >= 0:
                v_sq.append(vi)
        elif xs[i] == 1:
            v_l, y_l = v_l + ch, y_l + ch
            if xi >= 0:
                x_sq.append(xi)
        else:
            raise Unsupported("shapes that do not broadcast")
    return x_l, v_l, y_l, x_sq, v_sq


def matmul_letters(
    left_shape: Sequence[int], right_shape: Sequence[int]
) -> tuple[str, str, str, list[int], list[int]]:
    """Letters of ``left @ right`` (torch.matmul semantics, 1-D operands and broadcast batch
    dims included), with the batch dims of each operand to squeeze."""
    lb = list(left_shape[:-2]) if len(left_shape) > 1 else []
    rb = list(right_shape[:-2]) if len(right_shape) > 1 else []
    lb_l, rb_l, yb_l, l_sq, r_sq = broadcast_letters(lb, rb, start=3)
    left = lb_l + ("mk" if len(left_shape) > 1 else "k")
    right = rb_l + ("kn" if len(right_shape) > 1 else "k")
    out = yb_l + ("m" if len(left_shape) > 1 else "") + ("n" if len(right_shape) > 1 else "")
    return left, right, out, l_sq, r_sq


def parse_einsum(equation: str, shapes: Sequence[Sequence[int]]) -> tuple[list[str], str]:
    """Operand and output letters of a torch.einsum equation, ellipses spelt out."""
    equation = equation.replace(" ", "")
    lhs, arrow, rhs = equation.partition("->")
    specs = lhs.split(",")
    if len(specs) != len(shapes):
        raise Unsupported("operand count")
    used = set(equation) - set(".,->")
    spare = [ch for ch in _LETTERS if ch not in used]
    ell = max(
        (len(s) - len(spec) + 3 for spec, s in zip(specs, shapes, strict=True) if "..." in spec),
        default=0,
    )
    ell_letters = "".join(spare[:ell])
    spelt = []
    for spec, shape in zip(specs, shapes, strict=True):
        if "..." in spec:
            n = len(shape) - (len(spec) - 3)
            spec = spec.replace("...", ell_letters[ell - n :])
        spelt.append(spec)
    if arrow:
        out = rhs.replace("...", ell_letters)
    else:
        counts = {ch: lhs.count(ch) for ch in set(lhs) - set(".,")}
        out = ell_letters + "".join(sorted(ch for ch, k in counts.items() if k == 1))
    return spelt, out


def squeezed(t: Tensor, dims: list[int]) -> Tensor:
    for d in sorted(dims, reverse=True):
        t = t.squeeze(d)
    return t


def conv_use(x: Tensor, index: Tensor, y: Tensor, stride, padding, dilation, groups: int):
    """The normal form of ``conv1d``/``conv2d(x, V)``: unfolded input patches as positions."""
    if isinstance(padding, str):
        raise Unsupported("string padding")
    one_d = index.ndim == 3
    if one_d:
        x, index = x.unsqueeze(-2), index.unsqueeze(-2)
        stride, padding, dilation = ((1, _first(v)) for v in (stride, padding, dilation))
        padding = (0, padding[1])
    patches = F.unfold(x, index.shape[-2:], dilation=dilation, padding=padding, stride=stride)
    n, _, length = patches.shape
    o = index.shape[0]
    patches = patches.reshape(n, groups, -1, length)  # (n, G, Cin/G * kh * kw, L)
    index = index.reshape(groups, o // groups, -1)
    y = y.reshape(n, groups, o // groups, -1)
    return einsum_use(patches, "ghkl", index, "hok", y.shape, "ghol")


def _first(v) -> int:
    return v[0] if isinstance(v, tuple | list) else v
