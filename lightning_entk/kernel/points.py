"""Probe points as pytrees, and the model's outputs as an ``(N, C)`` matrix.

Points are a tensor ``(N, ...)``, a tuple or list of tensors (the model is called as
``model(*points)``) or a dict of tensors (``model(**points)``, keys the ``forward`` does not
take left out; a ``forward`` that takes none of its keys, ``forward(self, batch)``, gets the
dict whole), every leaf with the points along dim 0. A model's raw output may be a tensor,
a tuple or list (its first element), a dict (its ``"logits"``) or an object with ``.logits``; an
``output_fn`` maps anything else, and a ``forward_fn(model, points) -> (N, C)`` replaces the
call altogether (several arguments, extra keyword arguments).
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map

Points = Tensor | tuple | list | dict
OutputFn = Callable[[object], Tensor] | None
ForwardFn = Callable[[nn.Module, Points], Tensor] | None


@contextlib.contextmanager
def quiet_batching_fallback() -> Iterator[None]:
    """Silence torch.func's notice that an operation has no batching rule (it then loops over
    the batch): the engine chose ``vmap`` knowingly, and the user can do nothing about it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="There is a performance drop because we have")
        yield


class NotDifferentiableError(RuntimeError):
    """The model's forward pass cannot be differentiated with respect to its parameters (an
    eval-mode forward that writes a cache in place, a detached output), or not point by
    point; the message names the cause and what to pass instead."""

    @classmethod
    def of(cls, err: Exception) -> NotDifferentiableError:
        return cls(
            "The model's forward pass could not be differentiated with respect to its "
            f"parameters on one point ({type(err).__name__}: {err}). A forward that writes "
            "state in place in eval mode (a cache, e.g. `use_cache=True`) or detaches its "
            "output cannot be; pass `forward_fn(model, points) -> (N, C)` that turns it off, "
            "e.g. `forward_fn=lambda m, x: m(x, use_cache=False).logits[:, -1]`."
        )


def leaves(points: Points) -> list[Tensor]:
    """The tensors of ``points``, in pytree order."""
    return tree_flatten(points)[0]


def num_points(points: Points) -> int:
    """N, the length of dim 0 shared by every leaf."""
    return leaves(points)[0].shape[0]


def take(points: Points, index: slice | Tensor) -> Points:
    """The points ``index`` (a slice or an index tensor) of every leaf."""
    return tree_map(lambda t: t[index], points)


def to_compute(points: Points, device: torch.device, dtype: torch.dtype) -> Points:
    """Leaves on ``device``; floating leaves in ``dtype``, integer leaves (tokens) kept."""
    return tree_map(
        lambda t: t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype), points
    )


def to_device(points: Points, device: torch.device | str) -> Points:
    """Every leaf on ``device``, dtypes kept."""
    return tree_map(lambda t: t.to(device), points)


def check_points(name: str, points: Points, like: Points | None = None) -> None:
    """Raise ``ValueError`` unless ``points`` is a pytree of tensors with at least one point,
    the same N in every leaf, finite floats, and (with ``like``) the structure and per-point
    shapes of ``like``."""
    flat, spec = tree_flatten(points)
    if not flat or not all(isinstance(t, Tensor) for t in flat):
        raise ValueError(
            f"`{name}` must be a tensor (N, ...), a tuple or dict of such tensors, got "
            f"{type(points).__name__}."
        )
    sizes = {t.shape[0] if t.ndim else 0 for t in flat}
    if len(sizes) != 1 or 0 in sizes:
        raise ValueError(
            f"`{name}` must hold at least one point along dim 0 of every tensor, with the same "
            f"number in each, got shapes {[tuple(t.shape) for t in flat]}."
        )
    for t in flat:
        if t.is_floating_point() or t.is_complex():
            bad = ~torch.isfinite(t).reshape(len(t), -1).all(dim=1)
            if bad.any():
                rows = bad.nonzero().flatten()[:5].tolist()
                raise ValueError(
                    f"`{name}` has NaN or inf in {int(bad.sum())} point(s) (rows {rows}...); "
                    "drop or impute those points before computing the kernel."
                )
    if like is not None:
        other, other_spec = tree_flatten(like)
        if spec != other_spec or [t.shape[1:] for t in flat] != [t.shape[1:] for t in other]:
            raise ValueError(
                f"`x1` and `{name}` must have the same structure and the same per-point shapes, "
                f"got {[tuple(t.shape[1:]) for t in other]} and "
                f"{[tuple(t.shape[1:]) for t in flat]}; pass points of the same kind (dim 0 "
                "indexes points)."
            )


def describe_points(points: Points) -> str:
    """The structure, per-point shapes and dtypes of ``points``, for error messages.

    Example:
        >>> describe_points({"ids": torch.zeros(4, 8, dtype=torch.long)})
        "dict {'ids': (4, 8) int64}"
    """

    def one(t: Tensor) -> str:
        return f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}"

    if isinstance(points, Tensor):
        return f"a tensor {one(points)}"
    if isinstance(points, dict):
        return "dict {" + ", ".join(f"{k!r}: {one(v)}" for k, v in points.items()) + "}"
    return f"{type(points).__name__} (" + ", ".join(one(t) for t in leaves(points)) + ")"


def call_model(model: nn.Module, points: Points) -> object:
    """``model(x)``, ``model(*points)``, or for a dict ``model(**points)`` with the keys it
    accepts (``model(points)`` when its ``forward`` takes none of them)."""
    if isinstance(points, dict):
        keywords = accepted_keywords(model, points)
        return model(**keywords) if keywords else model(points)
    if isinstance(points, tuple | list):
        return model(*points)
    return model(points)


def accepted_keywords(model: nn.Module, points: dict) -> dict:
    """The entries of ``points`` that ``model.forward`` takes (all, if it takes ``**kwargs``)."""
    parameters = inspect.signature(model.forward).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return points
    names = {p.name for p in parameters}
    return {k: v for k, v in points.items() if k in names}


def as_output_matrix(raw: object, rows: int, output_fn: OutputFn) -> Tensor:
    """The model's raw output as ``(rows, C)``.

    Raises:
        ValueError: for an output that is not ``(rows, C)`` after the default unpacking, with
            the usual ``output_fn`` choices for a sequence output ``(N, T, V)``.
    """
    out = raw if output_fn is not None else _unpack(raw)
    out = out if output_fn is None else output_fn(out)
    if isinstance(out, Tensor) and out.ndim == 2 and out.shape[0] == rows:
        return out
    got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
    hint = (
        "For a sequence output (N, T, V) pass `output_fn`, e.g. `lambda out: out[:, -1]` (the "
        "last position), `lambda out: out.mean(1)` (the mean over positions) or "
        "`lambda out: out.flatten(1)` (every position); for a scalar output "
        "`lambda out: out[:, None]`."
    )
    raise ValueError(
        f"The model's output must be (N, C) = ({rows}, C), got {got}. Pass `output_fn` to map it "
        f"there, or `forward_fn(model, points) -> (N, C)`. {hint}"
    )


def _unpack(raw: object) -> object:
    if isinstance(raw, Tensor):
        return raw
    if isinstance(raw, dict) and "logits" in raw:
        return raw["logits"]
    if hasattr(raw, "logits"):
        return raw.logits
    if isinstance(raw, tuple | list) and raw and isinstance(raw[0], Tensor):
        return raw[0]
    return raw
