"""Setup shared by the kernel and the spectrum, and the structured engine's driver.

:func:`ntk_context` validates the arguments, puts the model in its evaluation state and yields
an :class:`NTKContext`, whose :meth:`~NTKContext.jacobian` returns the Jacobian of a set of
points as blocks (:mod:`~lightning_entk.kernel.factors`):

1. *Discover* (once): one forward pass of one point under
   :class:`~lightning_entk.kernel.capture.Capture` lists every use of every selected parameter;
   parameters entering an operation no rule covers are set aside for the generic path, and the
   pass is repeated until the set is stable.
2. *Capture* (per chunk of points): ``vmap`` over points of ``jacrev`` with respect to the
   uses' zero perturbations gives the output gradients ``g``; the same pass returns the data
   factors. A model that ``vmap`` cannot batch (data-dependent control flow) is run one point
   at a time.
3. *Check* (first chunk): for a random combination of outputs, the parameter gradient rebuilt
   from the factors must equal autograd's, parameter by parameter; a parameter that fails
   (a use the capture did not see) moves to the generic path.
4. *Assemble*: uses of a parameter with one injective layout become a
   :class:`~lightning_entk.kernel.factors.FactorBlock` (positions where ``g`` is zero for every
   point and output are dropped); a parameter with several layouts (a tied embedding and
   unembedding) becomes a column block formed from its factors; generic parameters a column
   block formed by ``torch.func``.
"""

from __future__ import annotations

import contextlib
import enum
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap
from torch.utils._pytree import tree_map

from lightning_entk.kernel.capture import Capture, element_indices
from lightning_entk.kernel.factors import ColumnBlock, FactorBlock, Jacobian
from lightning_entk.kernel.generic import generic_columns
from lightning_entk.kernel.points import (
    ForwardFn,
    OutputFn,
    Points,
    as_output_matrix,
    call_model,
    check_points,
    num_points,
    quiet_batching_fallback,
    take,
    to_compute,
)
from lightning_entk.kernel.rules import Use

ParamSelection = Iterable[str] | Callable[[str, nn.Parameter], bool] | None
DEFAULT_MEMORY_BUDGET = 2 * 2**30


class NTKMethod(str, enum.Enum):
    """How the kernel is computed. Every method gives the same kernel up to float round-off.

    ``STRUCTURED``: each parameter is recognised by the operations that use it (matmul,
    ``F.linear``, ``addmm``, ``einsum``, convolution, embedding lookup, elementwise scale and
    shift, the affine part of normalisations; through any views), whatever module holds it.
    For a use ``y = V x`` the share of the kernel is ``(a a'^T) * (g g'^T)`` with ``g`` the
    gradient of each output with respect to ``y`` (Novak et al. 2022, "Fast Finite Width
    Neural Tangent Kernel", arXiv:2206.08720, section 4; "structured derivatives"), summed
    over all pairs of positions and uses. Costs ``N C`` backward passes (batched) plus Gram
    products of layer widths; no Jacobian of size ``N C P`` is stored. A parameter that no rule
    covers, and only that parameter, goes through the generic path of ``JACOBIAN``.

    ``JACOBIAN``: ``vmap(jacrev)`` per-example Jacobians, contracted range of parameters by
    range of parameters within the memory budget. Costs ``N C`` backward passes plus
    ``N^2 C^2 P``. The reference implementation (the ``torch.func`` tutorial's), slow for wide
    layers.

    ``AUTO``: ``STRUCTURED``, since it is exact for every model and never slower by more than
    its bookkeeping.
    """

    AUTO = "auto"
    STRUCTURED = "structured"
    JACOBIAN = "jacobian"


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


Groups = str | Mapping[str, Iterable[str] | Callable[[str], bool]] | Callable[[str], str] | None


def check_kernel_options(
    method: str | NTKMethod = "auto", forward_fn: ForwardFn = None, groups: Groups = None
) -> None:
    """Raise ``ValueError`` for an unknown ``method``, a ``forward_fn`` that is not callable,
    or ``groups`` of another kind than :func:`parameter_groups` takes."""
    _check_choice("method", str(getattr(method, "value", method)), [m.value for m in NTKMethod])
    if forward_fn is not None and not callable(forward_fn):
        raise ValueError(
            f"`forward_fn` must be callable (model, points) -> (N, C), got {forward_fn!r}."
        )
    if groups is not None and not (
        groups in ("modules", "auto") or callable(groups) or isinstance(groups, Mapping)
    ):
        raise ValueError(
            "`groups` must be None, 'modules', 'auto', a callable name -> group, or a mapping "
            "group -> "
            f"parameter names (or predicate), got {groups!r}."
        )


def parameter_groups(model: nn.Module, names: list[str], groups: Groups) -> dict[str, str]:
    """Parameter name -> group name for every counted parameter (``names``).

    ``groups`` is ``"modules"`` (the model's top-level children, a parameter of the model itself
    its own group), ``"auto"`` (a few groups at the level that separates the model's parts:
    :func:`automatic_groups`), a callable ``name -> group``, or a mapping ``group -> parameter
    names`` (or ``group -> predicate(name)``); a parameter no group of a mapping claims is in
    ``"other"``.

    Raises:
        ValueError: for another kind of ``groups``, a name the model does not have, or a
            parameter claimed by two groups.
    """
    check_kernel_options(groups=groups)
    if groups == "modules":
        return {n: n.split(".", 1)[0] for n in names}
    if groups == "auto":
        return automatic_groups(model, names)
    if callable(groups):
        return {n: str(groups(n)) for n in names}
    found: dict[str, str] = {}
    known = dict(model.named_parameters())
    for group, members in groups.items():
        chosen = (
            [n for n in names if members(n)]
            if callable(members)
            else [members] if isinstance(members, str) else list(members)
        )  # fmt: skip
        unknown = [m for m in chosen if m not in known]
        if unknown:
            raise ValueError(f"`groups[{group!r}]` names {unknown}, which the model does not have.")
        for m in chosen:
            if m in found and found[m] != group:
                raise ValueError(f"Parameter {m!r} is in two groups, {found[m]!r} and {group!r}.")
            found[m] = group
    return {n: found.get(n, "other") for n in names}


MAX_AUTOMATIC_GROUPS = 6


def automatic_groups(
    model: nn.Module, names: list[str], max_groups: int = MAX_AUTOMATIC_GROUPS
) -> dict[str, str]:
    """A few parameter groups that follow the model's parts: parameter name -> group.

    From the top-level modules, the one holding most parameters is split into its children
    (when it has no parameters of its own) as long as there are at most ``max_groups`` groups:
    a wrapper, or a backbone beside a head, gives way to its parts (embeddings, blocks, head).
    When the top level alone has more, its first and last modules keep their own groups (in a
    language model: the embedding and the unembedding) and those between are ``"body"``.
    Parameters of the model itself, outside its children, are the group ``"(model)"``.

    Example:
        >>> mlp = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> wrapped = nn.ModuleDict({"net": mlp})
        >>> groups = automatic_groups(wrapped, [n for n, _ in wrapped.named_parameters()])
        >>> sorted(set(groups.values()))
        ['net.0', 'net.2']
    """
    counted = set(names)

    def size(prefix: str) -> int:
        return sum(1 for n in counted if n == prefix or n.startswith(prefix + "."))

    def parts(prefix: str, module: nn.Module) -> list[str]:
        """The module's children that hold counted parameters, and itself for its own."""
        dot = prefix + "." if prefix else ""
        found = [dot + name for name, _ in module.named_children() if size(dot + name)]
        if any(dot + n in counted for n, _ in module.named_parameters(recurse=False)):
            found.append(prefix or "(model)")
        return found

    modules = dict(model.named_modules())
    groups = parts("", model)
    while True:
        largest = max(groups, key=size, default=None)
        split = parts(largest, modules[largest]) if largest in modules and largest else []
        if len(split) < 2 or largest in split or len(groups) - 1 + len(split) > max_groups:
            break
        index = groups.index(largest)
        groups[index : index + 1] = split
    if len(groups) > max_groups:
        groups = [groups[0], "body", groups[-1]]

    def group_of(name: str) -> str:
        owners = [g for g in groups if name.startswith(g + ".")]
        if owners:
            return max(owners, key=len)
        return name.rsplit(".", 1)[0] if "." in name else "(model)"

    assigned = {n: group_of(n) for n in names}
    if "body" in groups:
        edges = {groups[0], groups[-1]}
        assigned = {n: g if g in edges else "body" for n, g in assigned.items()}
    return assigned


def compute_dtype(model: nn.Module) -> torch.dtype:
    """float64 for a float64 model, float32 otherwise (half precision is never used)."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    return torch.float64 if torch.float64 in dtypes else torch.float32


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


def num_outputs(
    model: nn.Module, x: Points, output_fn: OutputFn = None, forward_fn: ForwardFn = None
) -> int:
    """C, the outputs per point, from one forward pass of the first point in eval mode (the
    model's modes, BatchNorm statistics and gradients untouched)."""
    one = take(x, slice(0, 1))
    with torch.no_grad(), _evaluation_state(model):
        raw = forward_fn(model, one) if forward_fn is not None else call_model(model, one)
        return int(as_output_matrix(raw, 1, None if forward_fn else output_fn).shape[1])


@contextlib.contextmanager
def ntk_context(
    model: nn.Module,
    x1: Points,
    x2: Points | None,
    params: ParamSelection,
    output_fn: OutputFn,
    output_weights: Tensor | None,
    method: str | NTKMethod,
    batch_size: int,
    *,
    output_projections: int | Tensor | None = None,
    projection_seed: int = 0,
    forward_fn: ForwardFn = None,
    memory_budget: int | None = None,
    groups: Groups = None,
) -> Iterator[NTKContext]:
    """Validate the arguments and yield a context that computes Jacobian blocks (of the
    projected outputs when ``output_projections`` is given, see
    :func:`~lightning_entk.empirical_ntk`)."""
    check_kernel_options(method, forward_fn, groups)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive int, got {batch_size!r}.")
    budget = DEFAULT_MEMORY_BUDGET if memory_budget is None else memory_budget
    if not isinstance(budget, int) or isinstance(budget, bool) or budget <= 0:
        raise ValueError(f"`memory_budget` must be a positive int of bytes, got {budget!r}.")
    _check_projections(output_projections, projection_seed)
    check_points("x1", x1)
    if x2 is not None:
        check_points("x2", x2, like=x1)
    names = select_parameters(model, params)
    group_of = None if groups is None else parameter_groups(model, names, groups)
    dtype = compute_dtype(model)
    device = next(model.parameters()).device
    if output_weights is not None:
        output_weights = torch.as_tensor(output_weights).to(device=device, dtype=dtype)
        if output_weights.ndim != 1:
            raise ValueError(
                f"`output_weights` must have shape (C,), got {tuple(output_weights.shape)}."
            )
    with _evaluation_state(model):
        yield NTKContext(
            model=model,
            names=names,
            dtype=dtype,
            x1=to_compute(x1, device, dtype),
            x2=None if x2 is None else to_compute(x2, device, dtype),
            output_fn=output_fn,
            output_weights=output_weights,
            method=NTKMethod(getattr(method, "value", method)),
            batch_size=batch_size,
            output_projections=output_projections,
            projection_seed=projection_seed,
            forward_fn=forward_fn,
            memory_budget=budget,
            group_of=group_of,
        )


class _Forward(nn.Module):
    """The model called on points (or through ``forward_fn``), under a capture when set."""

    def __init__(self, model: nn.Module, forward_fn: ForwardFn) -> None:
        super().__init__()
        self.model = model
        self.forward_fn = forward_fn
        self.capture: Capture | None = None

    def forward(self, points: Points) -> object:
        with self.capture if self.capture is not None else contextlib.nullcontext():
            if self.forward_fn is not None:
                return self.forward_fn(self.model, points)
            return call_model(self.model, points)


@dataclass
class Structure:
    """What discovery found: the uses of the structured parameters, the perturbation shapes
    (one per operation), and why each other parameter takes the generic path."""

    uses: list[Use] = field(default_factory=list)
    z_shapes: list[tuple[int, ...]] = field(default_factory=list)
    generic: dict[str, str] = field(default_factory=dict)
    capture: str = "batched"  # "batched", "vmap" or "per point" (see :meth:`NTKContext.structure`)
    shared: list[bool] = field(default_factory=list)  # per operation: output has no point dim
    checked: bool = False  # the capture passed :meth:`NTKContext._check` already

    @property
    def structured(self) -> list[str]:
        return list(dict.fromkeys(u.param for u in self.uses))


@dataclass
class NTKContext:
    model: nn.Module
    names: list[str]
    dtype: torch.dtype
    x1: Points
    x2: Points | None
    output_fn: OutputFn
    output_weights: Tensor | None
    method: NTKMethod
    batch_size: int
    output_projections: int | Tensor | None = None
    projection_seed: int = 0
    forward_fn: ForwardFn = None
    memory_budget: int = DEFAULT_MEMORY_BUDGET
    group_of: dict[str, str] | None = None  # parameter -> group, for per-group kernels

    def __post_init__(self) -> None:
        self.params = {
            n: p.detach().to(self.dtype).contiguous() if p.is_floating_point() else p.detach()
            for n, p in self.model.named_parameters()
        }
        self.buffers = {
            n: b.to(self.dtype) if b.is_floating_point() else b
            for n, b in self.model.named_buffers()
        }
        self.device = next(iter(self.params.values())).device
        self._wrapper = _Forward(self.model, self.forward_fn)
        self.projection: Tensor | None = None  # (C, s), drawn once for all points
        self._structure: Structure | None = None
        self._indices: dict[str, Tensor] = {}
        self._num_outputs: int | None = None

    # ---------------------------------------------------------------------------------------
    # Forward passes.

    def outputs(self, raw: object, rows: int, project: bool = True) -> Tensor:
        """The model's output as (N, C), weighted, and projected to (N, s) with projections."""
        out = as_output_matrix(raw, rows, None if self.forward_fn else self.output_fn)
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

    def forward(
        self, params: dict[str, Tensor], batch: Points, capture: Capture | None = None
    ) -> Tensor:
        """Outputs (N, C) of ``batch`` with the parameters ``params``, under ``capture``."""
        self._wrapper.capture = capture
        try:
            state = {f"model.{k}": v for k, v in {**params, **self.buffers}.items()}
            raw = functional_call(self._wrapper, state, (batch,))
        finally:
            self._wrapper.capture = None
        return self.outputs(raw, num_points(batch))

    def forward_one(self, params: dict[str, Tensor], point: Points) -> Tensor:
        """Outputs (C,) of one point given without its batch dim."""
        return self.forward(params, tree_map(lambda t: t.unsqueeze(0), point))[0]

    def _resolve_projection(self, x: Points) -> None:
        """Fix the projections ``(C, s)`` before the first Jacobian, so that every point (of
        ``x1`` and ``x2``, of every chunk) is projected on the same ``v_r``."""
        if self.output_projections is None or self.projection is not None:
            return
        with torch.no_grad():
            raw = functional_call(self._wrapper, self._state(), (take(x, slice(0, 1)),))
            c = self.outputs(raw, 1, project=False).shape[1]
        self.projection = projection_matrix(
            c, self.output_projections, self.projection_seed, self.dtype, self.device
        )

    def _state(self) -> dict[str, Tensor]:
        return {f"model.{k}": v for k, v in {**self.params, **self.buffers}.items()}

    def _capture(self, names: Iterable[str], perturbations: tuple | None = None) -> Capture:
        """A capture watching the parameters ``names``; their element indices made once."""
        for name in names:
            if name not in self._indices:
                self._indices[name] = element_indices(self.params[name])
        watched = {name: self.params[name] for name in names}
        return Capture(watched, perturbations, self._indices)

    # ---------------------------------------------------------------------------------------
    # Discovery.

    def structure(self, x: Points) -> Structure:
        """The uses of every selected parameter, from forward passes of the first point."""
        if self._structure is not None:
            return self._structure
        found = Structure()
        if self.method == NTKMethod.JACOBIAN:
            found.generic = dict.fromkeys(self.names, "method='jacobian'")
            self._structure = found
            return found
        watched = list(self.names)
        one = take(x, slice(0, 1))
        while True:
            capture = self._capture(watched)
            try:
                with torch.no_grad():
                    self.forward(self.params, one, capture)
            except Exception as err:
                with torch.no_grad():  # the model's own error is the caller's to see
                    self.forward(self.params, one)
                # A model the capture cannot run: everything generic.
                found.generic.update(dict.fromkeys(watched, f"capture failed: {err}"))
                found.uses, found.z_shapes = [], []
                break
            opaque = [n for n in watched if n in capture.opaque]
            if not opaque:
                found.uses, found.z_shapes = capture.uses, capture.z_shapes
                break
            found.generic.update(dict.fromkeys(opaque, "used in an operation no rule covers"))
            watched = [n for n in watched if n not in opaque]
        if found.uses:
            found.capture = self._choose_capture(found, take(x, slice(0, min(3, num_points(x)))))
        used = {u.param for u in found.uses}
        for name in watched:
            if name not in used and name not in found.generic:
                found.generic[name] = "no use seen"
        self._structure = found
        return found

    def _choose_capture(self, found: Structure, sample: Points) -> str:
        """How points are captured, from a trial on a few points: ``"batched"`` when the model
        is batch-aligned (:meth:`_batch_aligned`) and a batched pass passes :meth:`_check`,
        else ``"vmap"``, else (``vmap`` cannot batch the model) ``"per point"``."""
        if self._batch_aligned(found, sample):
            found.capture = "batched"
            watched = {n: self.params[n] for n in found.structured}
            try:
                grads, factors = self._batched_chunk(found, watched, sample)
                if not self._check(found.uses, _use_factors(found.uses, grads, factors), sample):
                    found.checked = True  # on the points the first chunk starts with
                    return "batched"
            except RuntimeError:  # a shared output that cannot take a point dim
                pass
        found.capture = "vmap"
        self._captured_chunk(found, sample)  # falls to "per point" if vmap cannot batch it
        return found.capture

    def _batch_aligned(self, found: Structure, x: Points) -> bool:
        """Whether every use's output has the points along dim 0 (alone, or merged point-major
        with positions, as ``x.view(-1, d)`` does) or is shared by all points (a positional
        table looked up without a batch dim), as in most models: then a chunk of points is
        captured in one batched pass, each point's positions in its own slice, a shared output
        perturbed per point by broadcasting (checked in :meth:`_check`; a model that fails
        it is captured under ``vmap``)."""
        n = num_points(x)
        if n == 1:
            found.shared = [False] * len(found.z_shapes)
            return True
        capture = self._capture(found.structured)
        try:
            with torch.no_grad():
                self.forward(self.params, x, capture)
        except Exception:
            return False
        if len(capture.z_shapes) != len(found.z_shapes):
            return False
        pairs = list(zip(found.z_shapes, capture.z_shapes, strict=True))
        found.shared = [many == one for one, many in pairs]
        return all(
            many == one or (len(one) > 0 and many == (n * one[0], *one[1:])) for one, many in pairs
        )

    def _drop_from_structure(self, names: dict[str, str]) -> None:
        """Move parameters to the generic path after the check."""
        s = self._structure
        s.generic.update(names)
        s.uses = [u for u in s.uses if u.param not in names]

    # ---------------------------------------------------------------------------------------
    # Capture.

    def _captured_chunk(self, structure: Structure, chunk: Points) -> tuple[list, list]:
        """Output gradients (n, C, *y) per operation and factors (n, ...) per use."""
        watched = {n: self.params[n] for n in structure.structured}
        n = num_points(chunk)
        like = self.params[structure.uses[0].param]
        if structure.capture == "batched":
            try:
                return self._batched_chunk(structure, watched, chunk)
            except RuntimeError:  # a shared output that cannot take a point dim
                structure.capture = "vmap"

        def per_point(zs: tuple, point: Points) -> tuple[Tensor, tuple]:
            capture = self._capture(watched, zs)
            out = self.forward(self.params, tree_map(lambda t: t.unsqueeze(0), point), capture)
            return out[0], tuple(capture.factors)

        differentiate = jacrev(per_point, has_aux=True)
        if structure.capture == "vmap":
            zs = tuple(like.new_zeros(n, *s) for s in structure.z_shapes)
            try:
                with quiet_batching_fallback():
                    grads, factors = vmap(differentiate)(zs, chunk)
                return list(grads), list(factors)
            except RuntimeError:  # data-dependent control flow, or an op vmap cannot batch
                structure.capture = "per point"
        zs = tuple(like.new_zeros(*s) for s in structure.z_shapes)
        results = [differentiate(zs, take(chunk, i)) for i in range(n)]
        grads = [torch.stack(g) for g in zip(*(r[0] for r in results), strict=True)]
        factors = [torch.stack(f) for f in zip(*(r[1] for r in results), strict=True)]
        return grads, factors

    def _batched_chunk(self, structure: Structure, watched: dict, chunk: Points):
        """One batched pass over the chunk (see :meth:`_batch_aligned`)."""
        n = num_points(chunk)
        like = next(iter(watched.values()))
        zs = tuple(
            like.new_zeros(*_batched_shape(s, shared, n)).requires_grad_()
            for s, shared in zip(structure.z_shapes, structure.shared, strict=True)
        )
        capture = self._capture(watched, zs)
        with torch.enable_grad():
            out = self.forward(self.params, chunk, capture)
            grads = output_gradients(out, list(zs))
        grads = [g.reshape(g.shape[0], n, -1).transpose(0, 1) for g in grads]
        shared = [structure.shared[u.z] for u in structure.uses if u.kind != "ones"]
        factors = [
            f.detach().expand(n, *f.shape) if s else f.detach().reshape(n, -1, *f.shape[1:])
            for f, s in zip(capture.factors, shared, strict=True)
        ]
        return grads, factors

    def jacobian(self, x: Points) -> Jacobian:
        """The Jacobian on all points ``x`` as blocks (see the module docstring)."""
        self._resolve_projection(x)
        structure = self.structure(x)
        n = num_points(x)
        uses: list[Use] = []
        parts: list[list[tuple[Tensor, Tensor | None]]] = []
        if structure.uses:
            parts, c = self._factor_parts(structure, x)
            uses = structure.uses
        else:
            c = self.num_outputs()
        blocks, owners = self._assemble(uses, parts, n, c)
        for block in blocks:  # the capture's share of the budget, free again by now
            if isinstance(block, FactorBlock):
                block.scratch_bytes = self.memory_budget // 4
        group = self.group_of or dict.fromkeys(self.names, "")
        generic = [m for m in self.names if m in structure.generic]
        for key in dict.fromkeys(group[m] for m in generic):  # one block per group
            names = [m for m in generic if group[m] == key]
            columns, size = generic_columns(
                names, self.params, self.forward_one, x, c, self.memory_budget // 4
            )
            blocks.append(self._column_block(columns, size, n, c))
            owners.append(names[0])
        groups = [group[m] for m in owners] if self.group_of else None
        return Jacobian(blocks, n, c, self.dtype, self.device, groups)

    def num_outputs(self) -> int:
        """C, the (projected) outputs per point, from one forward pass made once."""
        if self._num_outputs is None:
            self._resolve_projection(self.x1)
            with torch.no_grad():
                self._num_outputs = self.forward(self.params, take(self.x1, slice(0, 1))).shape[1]
        return self._num_outputs

    def _column_block(self, columns, size: int, n: int, c: int) -> ColumnBlock:
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return ColumnBlock(columns, size, n, c, itemsize, self.memory_budget // 4)

    def _factor_parts(self, structure: Structure, x: Points):
        """Per use, its factors ``g`` (N, T, C, H, B) and ``a`` for all points, chunk by
        chunk; the first chunk is checked against autograd."""
        n = num_points(x)
        step = self._points_per_chunk(structure, n)
        joined: list[tuple[Tensor, Tensor | None]] = []
        for start in range(0, n, step):
            chunk = take(x, slice(start, start + step))
            grads, factors = self._captured_chunk(structure, chunk)
            per_use = _use_factors(structure.uses, grads, factors)
            if start == 0:
                failed = {} if structure.checked else self._check(structure.uses, per_use, chunk)
                if failed and structure.capture == "batched":
                    structure.capture = "vmap"  # positions were not where the batch had them
                    return self._factor_parts(structure, x)
                if failed:
                    self._drop_from_structure(failed)
                    if not structure.uses:
                        return [], self.num_outputs()
                    return self._factor_parts(structure, x)
                if step >= n:
                    return per_use, per_use[0][0].shape[2]
                alike = {id(g): _empty_like(g, n) for g, _ in per_use}  # shared ``g`` once
                joined = [(alike[id(g)], _empty_like(a, n)) for g, a in per_use]
            written = set()
            for (g_all, a_all), (g, a) in zip(joined, per_use, strict=True):
                if id(g_all) not in written:
                    g_all[start : start + len(g)] = g
                    written.add(id(g_all))
                if a is not None:
                    a_all[start : start + len(a)] = a
        return joined, joined[0][0].shape[2]

    def _points_per_chunk(self, structure: Structure, n: int) -> int:
        """Points per capture pass: the batch size, fewer when the output gradients of one
        pass (C per point and operation, with the backward's own copies) would pass a quarter
        of the budget."""
        c = self.num_outputs()
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        per_point = 3 * c * itemsize * sum(math.prod(s) for s in structure.z_shapes)
        return max(1, min(self.batch_size, n, self.memory_budget // 4 // max(per_point, 1)))

    def _check(self, uses: list[Use], per_use, chunk: Points) -> dict[str, str]:
        """Parameters whose gradient, rebuilt from the factors for a random combination of
        outputs, differs from autograd's, on each of up to two points alone (a use the capture
        missed, or positions given to the wrong point)."""
        names = list(dict.fromkeys(u.param for u in uses))
        generator = torch.Generator(device="cpu").manual_seed(0)
        c = per_use[0][0].shape[2]
        tol = math.sqrt(torch.finfo(self.dtype).eps)
        failed = {}
        for i in range(min(2, num_points(chunk))):
            v = torch.randn(1, c, generator=generator, dtype=self.dtype).to(self.device)
            leaves = {
                k: p.detach().requires_grad_() if k in names else p for k, p in self.params.items()
            }
            with torch.enable_grad():
                out = self.forward(leaves, take(chunk, slice(i, i + 1)))
                true = torch.autograd.grad(out, [leaves[k] for k in names], v, allow_unused=True)
            rebuilt = {k: self.params[k].new_zeros(self.params[k].numel()) for k in names}
            for use, (g, a) in zip(uses, per_use, strict=True):
                grad = _use_gradient(use, g[i : i + 1], None if a is None else a[i : i + 1], v)
                rebuilt[use.param].index_add_(0, use.layout.reshape(-1), grad.reshape(-1))
            for name, t in zip(names, true, strict=True):
                t = torch.zeros_like(rebuilt[name]) if t is None else t.reshape(-1)
                err = torch.linalg.vector_norm(rebuilt[name] - t)
                if err > tol * (torch.linalg.vector_norm(t) + tol):
                    failed[name] = "a use the capture did not see"
        return failed

    # ---------------------------------------------------------------------------------------
    # Assembly.

    def _assemble(self, uses: list[Use], parts, n: int, c: int) -> tuple[list, list[str]]:
        """Blocks, and the first parameter of each. Parameters used once each in one operation
        with the same outputs (a weight and its bias) share one block: one output Gram."""
        by_param: dict[str, list[int]] = {}
        for i, use in enumerate(uses):
            by_param.setdefault(use.param, []).append(i)
        injective = {
            name: bool(torch.bincount(uses[idx[0]].layout.reshape(-1)).max() <= 1)
            for name, idx in by_param.items()
        }  # no entry twice
        group = self.group_of or {}
        sharing: dict[tuple, list[str]] = {}
        for name, idx in by_param.items():
            use = uses[idx[0]]
            if len(idx) == 1 and use.kind != "tokens" and injective[name]:
                key = (use.z, use.out_perm, use.heads, use.outputs, use.scale, group.get(name))
                sharing.setdefault(key, []).append(name)
        shared_with = {name: names for names in sharing.values() for name in names}
        blocks, owners, done = [], [], set()
        for name, idx in by_param.items():
            if name in done:
                continue
            owners.append(name)
            names = shared_with.get(name, [name])
            if len(names) > 1:
                chosen = [by_param[m][0] for m in names]
                blocks.append(_factor_block([uses[i] for i in chosen], [parts[i] for i in chosen]))
                done.update(names)
            elif _same_layout([uses[i] for i in idx]) and injective[name]:
                blocks.append(_factor_block([uses[i] for i in idx], [parts[i] for i in idx]))
            else:
                columns = _columns_from_factors(
                    [uses[i] for i in idx], [parts[i] for i in idx], n, c, self.memory_budget // 8
                )
                blocks.append(self._column_block(columns, self.params[name].numel(), n, c))
        return blocks, owners


def _batched_shape(shape: tuple[int, ...], shared: bool, n: int) -> tuple[int, ...]:
    """The shape of an operation's perturbation for ``n`` points in one batched pass: its
    points along dim 0, merged point-major with the first dim, or, for an output shared by all
    points, a points dim in place of a leading 1 (or in front), as broadcasting would put it."""
    if not shared:
        return (n * shape[0], *shape[1:])
    return (n, *shape[1:]) if shape[:1] == (1,) else (n, *shape)


def _empty_like(t: Tensor | None, n: int) -> Tensor | None:
    """An uninitialised array like ``t`` with ``n`` points along dim 0."""
    return None if t is None else t.new_empty(n, *t.shape[1:])


def _same_layout(uses: list[Use]) -> bool:
    first = uses[0].layout
    return all(u.layout.shape == first.shape and torch.equal(u.layout, first) for u in uses)


def _use_factors(uses: list[Use], grads: list[Tensor], factors: list[Tensor]):
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


def _dense_factor(use: Use, g: Tensor, a: Tensor | None) -> Tensor:
    """The factor ``a`` of a use as a dense (n, T, H, A) array."""
    return FactorBlock(g, a if use.kind == "dense" else None,
                       a if use.kind == "tokens" else None, use.inputs)._a()  # fmt: skip


def _use_gradient(use: Use, g: Tensor, a: Tensor | None, v: Tensor) -> Tensor:
    """``sum_n v[n, c] J_use[n, c]`` in the use's (H, B, A) layout."""
    return torch.einsum("ntchb,nc,ntha->hba", g, v, _dense_factor(use, g, a))


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


# Outputs whose backward passes run together (batched): large enough for efficient matrix
# products, small enough that the batched intermediates stay near the size of the factors.
_OUTPUTS_PER_BACKWARD = 32


def output_gradients(out: Tensor, zs: list[Tensor]) -> list[Tensor]:
    """Gradients of each output column of ``out`` (N, C) with respect to each of ``zs``:
    one tensor (C, *z.shape) per z. Backward passes are batched over outputs; a model whose
    backward cannot be batched takes one pass per output."""
    n, c = out.shape
    eye = torch.eye(c, dtype=out.dtype, device=out.device)
    parts = []
    for lo in range(0, c, _OUTPUTS_PER_BACKWARD):
        seeds = eye[lo : lo + _OUTPUTS_PER_BACKWARD, None, :].expand(-1, n, c)
        try:
            grads = torch.autograd.grad(
                out, zs, grad_outputs=seeds, retain_graph=True, is_grads_batched=True,
                materialize_grads=True,  # zeros for an operation that does not reach `out`
            )  # fmt: skip
        except RuntimeError:  # an operation without a batching rule for its backward
            per_output = [
                torch.autograd.grad(out, zs, seed, retain_graph=True, materialize_grads=True)
                for seed in seeds
            ]
            grads = [torch.stack(gs) for gs in zip(*per_output, strict=True)]
        rows = len(seeds)
        grads = [
            g if g.dim() > z.dim() else g.expand(rows, *z.shape)
            for g, z in zip(grads, zs, strict=True)
        ]
        parts.append(grads)
    if len(parts) == 1:
        return list(parts[0])
    return [torch.cat(gs) for gs in zip(*parts, strict=True)]
