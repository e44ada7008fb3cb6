"""Capture: which operations of a forward pass use which parameters, and how.

A ``TorchFunctionMode`` watches the forward pass of one example (a batch of one, so that every
position of every activation belongs to that example, whatever reshapes and transposes the
model does). Views of a parameter are followed by replaying each view operation on a tensor of
the parameter's element indices; a view scaled by a number keeps the number. When a view enters
an operation linear in it, the rule of :mod:`~lightning_entk.kernel.rules` records a
:class:`~lightning_entk.kernel.rules.Use`, the operation's data operand as a factor, and adds a
zero perturbation ``z`` to the operation's output: the gradient of each model output with
respect to ``z`` is the factor ``g``. A parameter that enters any other operation is *opaque*
and takes the generic path.

A mixture of experts that keeps its experts in one parameter ``W`` (E, O, I) and applies
expert ``e`` as ``F.linear(x, W[e])`` (``e`` a 0-d tensor, as ``transformers``' experts do)
runs one such operation per expert its tokens chose, which differ from point to point. All
of them are one operation here, an *expert* operation per parameter: its output is the rows of
every expert's output in the order they come (one per token and chosen expert, a number the
same for every point), its factor each row's input placed at its expert's slot (so that, as
for any use, ``y[t, o] = sum_(e, i) x[t, e, i] W[e, o, i]``), and each expert's operation
reads its own rows of the one perturbation.

A lookup whose ids do not depend on the points (T5's and Swin's relative-position bias,
``table[index]`` with an index made from positions alone) may be taken as a *view* of the
table instead (``fixed_lookups``): its output then enters the operation where it meets the
points (the attention scores it is added to) as a view of the parameter, with the entries of
the table repeated where the ids repeat.

``nn.MultiheadAttention`` calls ``F.multi_head_attention_forward``, a Python function that
hands itself whole to the mode; the mode runs its body with the mode still active, so that the
projections inside are seen one by one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from lightning_entk.kernel.rules import (
    Unsupported,
    Use,
    broadcast_letters,
    conv_use,
    einsum_use,
    matmul_letters,
    parse_einsum,
    squeezed,
)

T = Tensor

# Operations that rearrange a tensor's elements without changing them: replayed on indices.
_VIEWS = {
    T.T.__get__, T.mT.__get__, T.t, torch.t, T.transpose, torch.transpose, T.permute,
    torch.permute, T.reshape, torch.reshape, T.view, T.flatten, torch.flatten, T.unflatten,
    torch.unflatten, T.squeeze, torch.squeeze, T.unsqueeze, torch.unsqueeze, T.expand,
    T.expand_as, T.narrow, torch.narrow, T.select, torch.select, T.chunk, torch.chunk, T.split,
    torch.split, T.unbind, torch.unbind, T.contiguous, T.clone, torch.clone, T.movedim,
    torch.movedim, T.swapaxes, torch.swapaxes, T.view_as, T.reshape_as, T.diagonal,
    torch.diagonal, T.repeat, T.__getitem__,
}  # fmt: skip
# Value casts: the indices stay as they are.
_CASTS = {T.to, T.float, T.double, T.type_as, T.type}
# Scaling by a number.
_SCALES = {T.__mul__: 1, T.__rmul__: 1, torch.mul: 1, T.mul: 1, T.__truediv__: -1, T.div: -1}
_NEGATIONS = {T.__neg__, torch.neg, T.neg}
# Adding a number: every rule's derivative is the view's, whatever the offset (Gemma's
# ``x * (1 + weight)``); the sign of the view is kept.
_OFFSETS = {T.__add__: 1, T.__radd__: 1, torch.add: 1, T.add: 1, T.__sub__: 1, T.sub: 1,
            torch.sub: 1, T.__rsub__: -1, torch.rsub: -1}  # fmt: skip

_MATMULS = {torch.matmul, T.matmul, T.__matmul__, torch.mm, T.mm, torch.bmm, T.bmm}
_ADDMMS = {torch.addmm, T.addmm, torch.baddbmm, T.baddbmm}
_MULS = {torch.mul, T.mul, T.__mul__, T.__rmul__, T.mul_, T.__imul__}
_ADDS = {torch.add, T.add, T.__add__, T.__radd__, T.add_, T.__iadd__}
_SUBS = {torch.sub, T.sub, T.__sub__, T.sub_, T.__isub__}
_INPLACE = {T.mul_, T.__imul__, T.add_, T.__iadd__, T.sub_, T.__isub__}
# Python functions that pass themselves whole to the mode: their bodies are watched instead.
_DESCEND = {F.multi_head_attention_forward}


class ShapeChanged(RuntimeError):
    """A pass whose operations differ from discovery's in number or shape."""


class _View:
    """A view of a parameter: its name, the flat indices of its entries, a scale; for one
    expert's slice ``W[e]`` of a parameter of experts, ``expert`` is ``e`` and ``index`` the
    indices of all of ``W`` (E, ...)."""

    __slots__ = ("expert", "index", "param", "scale", "tensor")

    def __init__(
        self, param: str, index: Tensor, scale: float, tensor: Tensor, expert: int | None = None
    ) -> None:
        self.param, self.index, self.scale = param, index, scale
        self.tensor = tensor  # kept alive so that its id is not reused
        self.expert = expert


class Capture(TorchFunctionMode):
    """Records the parameter uses of one forward pass (see the module docstring).

    Args:
        params: name -> the tensor the forward pass uses for that parameter.
        perturbations: ``None`` on a first pass (shapes only); after it, one tensor per
            operation, in the order of :attr:`z_shapes`, added to that operation's output.
        indices: name -> :func:`element_indices` of the parameter, when already made.
        same_shapes: each operation's output must have its perturbation's shape (a pass over
            one point, as discovery's): else :class:`ShapeChanged` (data-dependent shapes),
            not a perturbation broadcast over a different output.
        fixed_lookups: the lookups (parameter, how many lookups of it came before) to take
            as views (see the module docstring); :attr:`lookups` lists the others.
    """

    def __init__(
        self,
        params: dict[str, Tensor],
        perturbations: tuple | None = None,
        indices: dict[str, Tensor] | None = None,
        same_shapes: bool = False,
        fixed_lookups: frozenset[tuple[str, int]] = frozenset(),
    ) -> None:
        super().__init__()
        self.fixed_lookups = fixed_lookups
        self.lookups: list[tuple[tuple[str, int], int]] = []  # (lookup, its operation)
        self._lookups_of: dict[str, int] = {}  # lookups of each parameter so far
        indices = indices or {}
        self.views = {
            id(p): _View(name, indices[name] if name in indices else element_indices(p), 1.0, p)
            for name, p in params.items()
        }
        self.perturbations = perturbations
        self.same_shapes = same_shapes
        self.dtype = next(iter(params.values())).dtype if params else None
        self.uses: list[Use] = []
        self.factors: list[Tensor] = []  # one per use of kind "dense" or "tokens", in order
        self.z_shapes: list[tuple[int, ...]] = []
        self.opaque: set[str] = set()
        # Expert operations (see the module docstring): (param, layout shape, scale) -> the
        # operation's use and where its factor is in :attr:`factors`.
        self._experts: dict[tuple, tuple[Use, int]] = {}
        # The least precise floating dtype any operation computed in: a float64 model with a
        # float32 island (a norm computed in float32) is only as precise as the island.
        self.precision: torch.dtype | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = self._handle(func, args, kwargs or {})
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, Tensor) and t.is_floating_point():
                if self.precision is None or _eps(t.dtype) > _eps(self.precision):
                    self.precision = t.dtype
        return out

    def _handle(self, func, args, kwargs):
        if func in _DESCEND:
            return self._descend(func, args, kwargs)
        views = [self.views[id(t)] for t in _tensors((args, kwargs)) if id(t) in self.views]
        if not views:
            return func(*args, **kwargs)
        if any(v.expert is not None for v in views) and func is not F.linear:
            return self._opaque(func, args, kwargs, views)
        if (
            func in _VIEWS
            or func in _CASTS
            or func in _SCALES
            or func in _NEGATIONS
            or (func in _OFFSETS and _is_number(args[1] if len(args) > 1 else None))
            or _is_identity(func, args, kwargs)
        ):
            tracked = self._follow_view(func, args, kwargs)
            if tracked is not None:
                return tracked
        try:
            out = self._apply_rule(func, args, kwargs)
        except Unsupported:
            out = NotImplemented
        if out is NotImplemented:
            return self._opaque(func, args, kwargs, views)
        return out

    def _opaque(self, func, args, kwargs, views):
        """``func`` run as it is; the parameters of ``views`` take the generic path."""
        out = func(*args, **kwargs)
        if _tensors(out):
            self.opaque.update(v.param for v in views)
        return out

    # ---------------------------------------------------------------------------------------
    # Views.

    def _follow_view(self, func, args, kwargs):
        source = args[0] if args and isinstance(args[0], Tensor) else None
        view = self.views.get(id(source))
        if view is None or any(id(t) in self.views for t in _tensors((args[1:], kwargs))):
            return None
        if func is T.__getitem__ and _tensors(args[1]):
            return None  # indexing by a tensor is a lookup, not a view
        if func in _SCALES and not isinstance(args[1] if len(args) > 1 else None, int | float):
            return None
        out = func(*args, **kwargs)
        if func in _SCALES:
            number = args[1] if len(args) > 1 else None
            if not isinstance(number, int | float) or isinstance(number, bool):
                return None
            scale = view.scale * (number if _SCALES[func] == 1 else 1 / number)
            self._track(out, view.param, view.index, scale)
        elif func in _NEGATIONS:
            self._track(out, view.param, view.index, -view.scale)
        elif func in _OFFSETS:
            self._track(out, view.param, view.index, view.scale * _OFFSETS[func])
        elif func in _CASTS or _is_identity(func, args, kwargs):
            self._track(out, view.param, view.index, view.scale)
        else:
            index = func(view.index, *args[1:], **kwargs)
            for o, i in zip(_as_tuple(out), _as_tuple(index), strict=True):
                self._track(o, view.param, i, view.scale)
        return out

    def _track(self, out: Tensor, param: str, index: Tensor, scale: float) -> None:
        if isinstance(out, Tensor):
            self.views[id(out)] = _View(param, index, scale, out)

    # ---------------------------------------------------------------------------------------
    # Linear operations.

    def _apply_rule(self, func, args, kwargs):
        if func is F.linear:
            return self._linear(*_bind(args, kwargs, ("input", "weight", "bias")))
        if func in _MATMULS:
            return self._matmul(func, args[0], args[1])
        if func in _ADDMMS:
            names = ("input", "batch1", "batch2") if "bmm" in func.__name__ else (
                "input", "mat1", "mat2",
            )  # fmt: skip
            bias, left, right = _bind(args, kwargs, names)
            beta, alpha = kwargs.get("beta", 1), kwargs.get("alpha", 1)
            if not isinstance(beta, int | float) or not isinstance(alpha, int | float):
                raise Unsupported("tensor beta/alpha")
            return self._matmul(torch.matmul, left, right, scale=alpha, bias=bias, beta=beta)
        if func is torch.einsum:
            operands = list(args[1]) if isinstance(args[1], list | tuple) else args[1:]
            return self._einsum(args[0], operands)
        if func is F.embedding:
            ids, weight, padding_idx, max_norm = _bind(
                args, kwargs, ("input", "weight", "padding_idx", "max_norm")
            )
            if max_norm is not None or kwargs.get("scale_grad_by_freq"):
                raise Unsupported("max_norm or scale_grad_by_freq")
            return self._lookup(weight, ids, padding_idx)
        if (
            func is T.__getitem__
            and isinstance(args[1], Tensor)
            and not args[1].is_floating_point()
        ):
            if args[1].dtype == torch.bool:
                raise Unsupported("boolean mask")
            if args[1].ndim == 0 and args[0].ndim >= 3:
                return self._expert(args[0], args[1])
            return self._lookup(args[0], args[1], None)
        if func in (F.conv1d, F.conv2d):
            x, w, b, stride, padding, dilation, groups = _bind(
                args, kwargs, ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
            )
            stride, padding, dilation, groups = (  # keywords left out take their defaults
                d if v is None else v
                for v, d in zip((stride, padding, dilation, groups), (1, 0, 1, 1), strict=True)
            )
            if padding == "valid":
                padding = 0
            return self._conv(func, x, w, b, stride, padding, dilation, groups)
        if func is torch.where and len(args) + len(kwargs) == 3:
            return self._where(*_bind(args, kwargs, ("condition", "input", "other")))
        if func is F.scaled_dot_product_attention:
            return self._attention_mask(args, kwargs)
        if func in _MULS:
            return self._mul(func, args[0], args[1])
        if func in _ADDS or func in _SUBS:
            alpha = kwargs.get("alpha", 1)
            if not isinstance(alpha, int | float):
                raise Unsupported("tensor alpha")
            sign = -1 if func in _SUBS else 1
            if func in _INPLACE:
                return self._add(args[0], args[1], scale=sign * alpha, inplace=func)
            return self._add(args[0], args[1], scale=sign * alpha)
        if func is F.layer_norm:
            x, shape, weight, bias, eps = _bind(
                args, kwargs, ("input", "normalized_shape", "weight", "bias", "eps")
            )
            y = F.layer_norm(x, shape, None, None, 1e-5 if eps is None else eps)
            return self._affine(y, weight, bias)
        if func is getattr(F, "rms_norm", None):
            x, shape, weight, eps = _bind(
                args, kwargs, ("input", "normalized_shape", "weight", "eps")
            )
            return self._affine(F.rms_norm(x, shape, None, eps), weight, None)
        if func is F.group_norm:
            x, groups, weight, bias, eps = _bind(
                args, kwargs, ("input", "num_groups", "weight", "bias", "eps")
            )
            y = F.group_norm(x, groups, None, None, 1e-5 if eps is None else eps)
            return self._affine(y, weight, bias, channel_dim=True)
        if func is F.batch_norm:
            x, mean, var, weight, bias, training, _, eps = _bind(
                args,
                kwargs,
                ("input", "running_mean", "running_var", "weight", "bias", "training",
                 "momentum", "eps"),
            )  # fmt: skip
            if training or mean is None:
                raise Unsupported("batch statistics")
            y = F.batch_norm(x, mean, var, None, None, False, 0.0, 1e-5 if eps is None else eps)
            return self._affine(y, weight, bias, channel_dim=True)
        return NotImplemented

    def _linear(self, x, weight, bias):
        view = self.views.get(id(weight))
        if view is not None and view.expert is not None:
            return self._expert_linear(x, weight, bias)
        return self._matmul(torch.matmul, x, self._transposed(weight), bias=bias)

    def _expert(self, weight, expert):
        """``W[e]``, expert ``e``'s slice of a parameter of experts (see the module docstring)."""
        view = self.views.get(id(weight))
        if view is None or id(expert) in self.views:
            raise Unsupported("expert")
        out = weight[expert]
        self.views[id(out)] = _View(view.param, view.index, view.scale, out, int(expert))
        return out

    def _expert_linear(self, x, weight, bias):
        """``F.linear(x, W[e], bias)`` as rows of the parameter's expert operation."""
        view = self.views[id(weight)]
        if weight.ndim != 2 or id(x) in self.views or id(bias) in self.views:
            raise Unsupported("expert weight in another form")
        y = F.linear(x, weight, bias)
        rows = x.reshape(-1, x.shape[-1])
        spread = rows.new_zeros(rows.shape[0], view.index.shape[0], rows.shape[1])
        spread[:, view.expert] = rows
        shape = (rows.shape[0], weight.shape[0])
        factor, layout, perm, t, dims = einsum_use(spread, "tei", view.index, "eoi", shape, "to")
        use = Use(view.param, layout, "dense", shape, perm, t, dims, view.scale)
        key = (view.param, tuple(layout.shape), view.scale)
        if key not in self._experts:  # the first expert: the operation, as any other
            self._experts[key] = (use, len(self.factors))
            return self._commit(y, [(use, factor)], expert_rows=t)
        # A later expert: its rows added to the operation's, its factor to the use's.
        held, i = self._experts[key]
        start = held.positions
        held.positions += t
        held.out_shape = (held.positions, *held.out_shape[1:])
        self.z_shapes[held.z] = held.out_shape
        self.factors[i] = torch.cat([self.factors[i], factor.to(self.factors[i].dtype)])
        return self._perturbed(y, held.z, slice(start, start + t))

    def _transposed(self, weight: Tensor) -> Tensor:
        view = self.views.get(id(weight))
        out = weight.transpose(-1, -2) if weight.ndim > 1 else weight
        if view is not None:
            index = view.index.transpose(-1, -2) if weight.ndim > 1 else view.index
            self._track(out, view.param, index, view.scale)
        return out

    def _matmul(self, func, left, right, scale=1.0, bias=None, beta=1.0):
        """``scale * (left @ right) + beta * bias``, the weight's and the bias's uses sharing
        one perturbation (so that their blocks can share one output Gram)."""
        left_l, right_l, out_l, l_sq, r_sq = matmul_letters(left.shape, right.shape)
        records = []
        for v_t, v_l, v_sq, x_t, x_l, x_sq in (
            (right, right_l, r_sq, left, left_l, l_sq),
            (left, left_l, l_sq, right, right_l, r_sq),
        ):
            view = self.views.get(id(v_t))
            if view is not None:
                index = squeezed(view.index, v_sq)
                records.append((view, "dense", squeezed(x_t, x_sq), x_l, index, v_l, out_l, scale))
        y = func(left, right)
        y = y if scale == 1 else y * scale
        if bias is None:
            return self._record(y, records)
        shifted = torch.add(y, bias, alpha=beta)
        if shifted.shape != y.shape:  # a bias that broadcasts the product: its own operation
            return self._add(self._record(y, records), bias, scale=beta)
        return self._record(shifted, records + self._shift_records(bias, y.shape, beta))

    def _shift_records(self, bias, y_shape, scale) -> list:
        view = self.views.get(id(bias)) if isinstance(bias, Tensor) else None
        if view is None:
            return []
        _, v_l, y_l, _, v_sq = broadcast_letters(y_shape, bias.shape)
        return [(view, "ones", None, "", squeezed(view.index, v_sq), v_l, y_l, scale)]

    def _einsum(self, equation, operands):
        if len(operands) != 2:
            raise Unsupported("einsum of other than two operands")
        specs, out_l = parse_einsum(equation, [o.shape for o in operands])
        records = []
        for i in (0, 1):
            view = self.views.get(id(operands[i]))
            if view is not None:
                other = operands[1 - i]
                records.append((view, "dense", other, specs[1 - i], view.index, specs[i], out_l, 1))
        return self._record(torch.einsum(equation, *operands), records)

    def _lookup(self, weight, ids, padding_idx):
        view = self.views.get(id(weight))
        if view is None or weight.ndim != 2 or id(ids) in self.views:
            raise Unsupported("lookup")
        key = (view.param, self._lookups_of.get(view.param, 0))
        self._lookups_of[view.param] = key[1] + 1
        y = F.embedding(ids, weight, padding_idx)
        if key in self.fixed_lookups and (padding_idx is None or not (ids == padding_idx).any()):
            self._track(y, view.param, view.index[ids], view.scale)
            return y
        self.lookups.append((key, len(self.z_shapes)))
        tokens = ids.reshape(-1)
        if padding_idx is not None:
            tokens = tokens.masked_fill(tokens == padding_idx % weight.shape[0], -1)
        layout = view.index.T.reshape(1, weight.shape[1], weight.shape[0])
        shape = (tokens.numel(), weight.shape[1])
        use = Use(view.param, layout, "tokens", shape, (0, 1), tokens.numel(), 1, view.scale)
        return self._commit(y, [(use, tokens)])

    def _conv(self, func, x, w, b, stride, padding, dilation, groups):
        view = self.views.get(id(w))
        if id(x) in self.views or (view is None and (b is None or id(b) not in self.views)):
            raise Unsupported("convolution")
        y = func(x, w, b, stride, padding, dilation, groups)
        records = []
        if b is not None and id(b) in self.views:
            bias = self._channel_view(b, y.ndim)
            records = self._normal_forms(y.shape, self._shift_records(bias, y.shape, 1.0))
        if view is not None:
            groups = groups or 1
            factor, layout, perm, t, dims = conv_use(
                x, view.index, y, stride, padding, dilation, groups
            )
            out_shape = tuple(y.reshape(y.shape[0], groups, w.shape[0] // groups, -1).shape)
            use = Use(view.param, layout, "dense", out_shape, perm, t, dims, view.scale)
            records.append((use, factor))
        return self._commit(y, records)

    def _channel_view(self, v: Tensor, ndim: int) -> Tensor:
        return self.__torch_function__(T.reshape, (), (v, (-1,) + (1,) * (ndim - 2)))

    def _mul(self, func, a, b):
        if not isinstance(a, Tensor) or not isinstance(b, Tensor):
            raise Unsupported("scaling of a non-view by a number")
        inplace = func in _INPLACE
        if inplace and id(a) in self.views:
            raise Unsupported("in-place update of a parameter")
        records = []
        for v_t, x_t in ((b, a), (a, b)):
            view = self.views.get(id(v_t))
            if view is not None:
                x_l, v_l, y_l, x_sq, v_sq = broadcast_letters(x_t.shape, v_t.shape)
                x = squeezed(x_t, x_sq)
                records.append((view, "dense", x, x_l, squeezed(view.index, v_sq), v_l, y_l, 1))
        forms = self._normal_forms(torch.broadcast_shapes(a.shape, b.shape), records)
        if inplace:
            forms = [(use, factor.clone()) for use, factor in forms]
        return self._commit(func(a, b), forms, inplace=inplace)

    def _where(self, condition, a, b):
        """``torch.where(condition, a, b)`` with a view on one side: the view times the
        condition (or its negation), as an elementwise scale by a mask, plus a constant."""
        if not isinstance(condition, Tensor) or id(condition) in self.views:
            raise Unsupported("where on a parameter")
        tensors = [t for t in (a, b) if isinstance(t, Tensor)]
        viewed = [t for t in tensors if id(t) in self.views]
        if len(viewed) != 1:
            raise Unsupported("where between two views")
        v_t = viewed[0]
        mask = (condition if v_t is a else ~condition).to(v_t.dtype)
        y = torch.where(condition, a, b)
        if y.shape != torch.broadcast_shapes(mask.shape, v_t.shape):
            raise Unsupported("where broadcast by its other operand")
        view = self.views[id(v_t)]
        x_l, v_l, y_l, x_sq, v_sq = broadcast_letters(mask.shape, v_t.shape)
        index = squeezed(view.index, v_sq)
        return self._record(y, [(view, "dense", squeezed(mask, x_sq), x_l, index, v_l, y_l, 1)])

    def _attention_mask(self, args, kwargs):
        """``F.scaled_dot_product_attention`` with a view as its additive ``attn_mask``: the
        mask added to zeros of the scores' shape first, as the attention adds it to them (an
        operation that holds the points, as the scores do), then the attention as it is."""
        names = ("query", "key", "value", "attn_mask")
        query, key, value, mask = _bind(args, kwargs, names)
        if any(id(t) in self.views for t in (query, key, value)) or mask.dtype == torch.bool:
            raise Unsupported("attention on a parameter")
        try:
            scores = torch.broadcast_shapes(mask.shape, (*query.shape[:-1], key.shape[-2]))
        except RuntimeError as err:
            raise Unsupported("a mask that does not broadcast to the scores") from err
        mask = self._add(mask.new_zeros(scores), mask)
        rest = {k: v for k, v in kwargs.items() if k not in names}
        return F.scaled_dot_product_attention(query, key, value, mask, *args[4:], **rest)

    def _add(self, a, b, scale=1.0, inplace=None):
        if b is None:
            return a
        if inplace is not None and id(a) in self.views:
            raise Unsupported("in-place update of a parameter")
        shape = torch.broadcast_shapes(a.shape, b.shape if isinstance(b, Tensor) else ())
        records = self._shift_records(a, shape, 1.0) + self._shift_records(b, shape, scale)
        forms = self._normal_forms(shape, records)
        y = a.add_(b, alpha=scale) if inplace is not None else torch.add(a, b, alpha=scale)
        return self._commit(y, forms, inplace=inplace is not None)

    def _affine(self, y, weight, bias, channel_dim=False):
        if weight is not None:
            w = self._channel_view(weight, y.ndim) if channel_dim else weight
            y = self.__torch_function__(torch.mul, (), (y, w)) if id(w) in self.views else y * w
        if bias is not None:
            b = self._channel_view(bias, y.ndim) if channel_dim else bias
            y = self.__torch_function__(torch.add, (), (y, b)) if id(b) in self.views else y + b
        return y

    # ---------------------------------------------------------------------------------------
    # Recording.

    def _record(self, y, records):
        return self._commit(y, self._normal_forms(y.shape, records))

    def _normal_forms(self, y_shape, records) -> list[tuple[Use, Tensor | None]]:
        """Normal forms of the uses in ``records`` (view, kind, x, x letters, index, V letters,
        y letters, scale) of one operation with output shape ``y_shape``."""
        forms = []
        for view, kind, x, x_l, index, v_l, y_l, scale in records:
            factor, layout, perm, t, dims = einsum_use(x, x_l, index, v_l, y_shape, y_l)
            use = Use(view.param, layout, kind, tuple(y_shape), perm, t, dims, view.scale * scale)
            forms.append((use, factor))
        return forms

    def _commit(self, y, committed, inplace=False, expert_rows=None):
        if not committed:
            return y
        z = len(self.z_shapes)
        self.z_shapes.append(tuple(y.shape) if expert_rows is None else committed[0][0].out_shape)
        for use, factor in committed:
            use.z = z
            self.uses.append(use)
            if factor is not None:  # a float32 island's factor in the parameters' dtype
                self.factors.append(factor.to(self.dtype) if factor.is_floating_point() else factor)
        if expert_rows is not None:
            return self._perturbed(y, z, slice(0, expert_rows))
        if self.perturbations is None:
            return y
        if z >= len(self.perturbations) or (
            self.same_shapes and self.perturbations[z].shape != y.shape
        ):
            raise ShapeChanged("an operation's output differs from discovery's")
        z = self.perturbations[z].to(y.dtype)  # the operation computes in its own dtype
        return y.add_(z) if inplace else y + z

    def _perturbed(self, y, z: int, rows: slice):
        """``y``, one expert's output, plus its ``rows`` of the expert operation ``z``'s
        perturbation."""
        if self.perturbations is None:
            return y
        if z >= len(self.perturbations) or self.perturbations[z].shape[0] < rows.stop:
            raise ShapeChanged("an expert operation's rows differ from discovery's")
        return y + self.perturbations[z][rows].to(y.dtype).reshape(y.shape)

    def _descend(self, func, args, kwargs):
        """Run ``func``'s body with this mode active (see the module docstring)."""
        with _torch_function_checks_off(), self:
            return func(*args, **kwargs)


@contextlib.contextmanager
def _torch_function_checks_off() -> Iterator[None]:
    original = F.has_torch_function
    F.has_torch_function = lambda *_: False
    try:
        yield
    finally:
        F.has_torch_function = original


def _is_identity(func, args, kwargs) -> bool:
    """Whether ``func`` returns its input's values: dropout outside training (eval mode)."""
    return func is F.dropout and _bind(args, kwargs, ("input", "p", "training"))[2] is False


def _is_number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def element_indices(p: Tensor) -> Tensor:
    """The flat index of each element of ``p``, in its shape."""
    return torch.arange(p.numel(), device=p.device).view(p.shape)


def _tensors(tree: object) -> list[Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, Tensor)]


def _as_tuple(x: object) -> tuple:
    return tuple(x) if isinstance(x, tuple | list) else (x,)


def _bind(args: tuple, kwargs: dict, names: tuple[str, ...]) -> list:
    """Positional and keyword arguments of a call, in the order of ``names``."""
    values = list(args) + [None] * (len(names) - len(args))
    for i, name in enumerate(names):
        if name in kwargs:
            values[i] = kwargs[name]
    return values[: len(names)]
