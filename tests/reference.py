"""Brute-force float64 eNTK: one autograd call per point and output. The oracle for every
fast path of the package.

Points are a tensor ``(N, ...)`` (the model is called as ``model(x)``), a tuple of tensors
(``model(*x)``) or a dict of tensors (``model(**x)``), every tensor with the points along dim 0;
point ``i`` is taken as a batch of one, ``t[i:i+1]`` of every tensor (other leaves, e.g.
``None``, are passed as they are). The model's output is a tensor ``(1, C)``, a tuple or list
(element 0 is taken), a dict (key ``"logits"``) or an object with a ``.logits`` attribute;
``output_fn(raw)`` maps any other output to ``(1, C)``, and ``forward_fn(model, point)``
replaces both the call of the model and the output handling.
"""

import inspect
from collections.abc import Mapping

import torch
from torch import Tensor, nn


def _leaves(points) -> list[Tensor]:
    if isinstance(points, Tensor):
        return [points]
    if isinstance(points, Mapping):
        return [leaf for value in points.values() for leaf in _leaves(value)]
    if isinstance(points, tuple | list):
        return [leaf for value in points for leaf in _leaves(value)]
    return []


def num_points(points) -> int:
    """N, the points along dim 0 of every tensor in ``points``."""
    sizes = {leaf.shape[0] for leaf in _leaves(points)}
    if len(sizes) != 1:
        raise ValueError(
            f"Every tensor of the points needs the same N along dim 0, got sizes {sorted(sizes)}."
        )
    return sizes.pop()


def point(points, i: int):
    """Point ``i`` of ``points`` as a batch of one: ``t[i:i+1]`` of every tensor."""
    if isinstance(points, Tensor):
        return points[i : i + 1]
    if isinstance(points, Mapping):
        return {k: point(v, i) for k, v in points.items()}
    if isinstance(points, tuple | list):
        return type(points)(point(v, i) for v in points)
    return points


def call_model(model: nn.Module, points):
    """``model(x)``, ``model(*x)`` or ``model(**x)`` for a tensor, tuple or dict of points; a
    dict goes whole to a ``forward(self, batch)`` that names none of its keys."""
    if isinstance(points, Mapping):
        named = inspect.signature(model.forward).parameters
        if set(points).isdisjoint(named) and not any(
            p.kind is inspect.Parameter.VAR_KEYWORD for p in named.values()
        ):
            return model(points)
        return model(**points)
    if isinstance(points, tuple | list):
        return model(*points)
    return model(points)


def default_output(raw) -> Tensor:
    """The logits of a raw output: the tensor itself, element 0 of a tuple or list, key
    ``"logits"`` of a dict, or the ``.logits`` attribute of an object."""
    if isinstance(raw, Tensor):
        return raw
    if isinstance(raw, tuple | list):
        return raw[0]
    if isinstance(raw, Mapping):
        if "logits" not in raw:
            raise ValueError(
                f"A dict output needs a 'logits' key, got {list(raw)}; pass `output_fn`."
            )
        return raw["logits"]
    if hasattr(raw, "logits"):
        return raw.logits
    raise ValueError(f"Cannot read logits from a {type(raw).__name__}; pass `output_fn`.")


def _outputs(model, xi, output_fn, forward_fn) -> Tensor:
    if forward_fn is not None:
        out = forward_fn(model, xi)
    else:
        raw = call_model(model, xi)
        out = default_output(raw) if output_fn is None else output_fn(raw)
    if not isinstance(out, Tensor) or out.ndim != 2 or out.shape[0] != 1:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(
            f"The output of one point must be (1, C), got {got}; pass `output_fn` (or "
            "`forward_fn`) to map it there, e.g. `output_fn=lambda out: out[:, -1]`."
        )
    return out[0]


def brute_force_jacobian(
    model, x, names=None, output_fn=None, output_weights=None, forward_fn=None
) -> Tensor:
    """Per-example Jacobians (N, C, P) by one ``torch.autograd.grad`` call per point and output,
    in eval mode (every submodule's mode restored after)."""
    if forward_fn is not None and output_fn is not None:
        raise ValueError("Pass `output_fn` or `forward_fn`, not both.")
    named = dict(model.named_parameters())
    names = names or [n for n, p in named.items() if p.requires_grad]
    params = [named[n] for n in names]
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    rows = []
    try:
        for i in range(num_points(x)):
            out = _outputs(model, point(x, i), output_fn, forward_fn)
            if output_weights is not None:
                out = out * output_weights
            per_output = []
            for c in range(out.shape[0]):
                grads = torch.autograd.grad(out[c], params, retain_graph=True, allow_unused=True)
                per_output.append(
                    torch.cat(
                        [
                            (torch.zeros_like(p) if g is None else g).reshape(-1)
                            for g, p in zip(grads, params, strict=True)
                        ]
                    )
                )
            rows.append(torch.stack(per_output))
    finally:
        for m, training in modes:
            m.training = training
    return torch.stack(rows).detach()


def ntk_from_jacobians(j1: Tensor, j2: Tensor, mode: str = "trace") -> Tensor:
    """The kernel of ``mode`` from Jacobians (N1, C, P) and (N2, C, P)."""
    full = torch.einsum("nip,mjp->nmij", j1, j2)
    if mode == "full":
        return full
    if mode == "trace":
        return torch.einsum("nmcc->nm", full)
    if mode == "diagonal":
        return torch.einsum("nmcc->nmc", full)
    if mode != "flatten":
        raise ValueError(f"Unknown mode {mode!r}.")
    n1, n2, c, _ = full.shape
    return full.permute(2, 0, 3, 1).reshape(c * n1, c * n2)


def brute_force_ntk(model, x1, x2=None, mode="trace", **kwargs) -> Tensor:
    """The kernel of ``mode`` from brute-force Jacobians; ``kwargs`` go to
    :func:`brute_force_jacobian` (``names``, ``output_fn``, ``output_weights``, ``forward_fn``)."""
    j1 = brute_force_jacobian(model, x1, **kwargs)
    j2 = j1 if x2 is None else brute_force_jacobian(model, x2, **kwargs)
    return ntk_from_jacobians(j1, j2, mode)


def double(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return model.double()
