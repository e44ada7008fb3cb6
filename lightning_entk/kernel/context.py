"""The structured engine's driver: what the kernel, the spectrum and the plan share.

:func:`ntk_context` validates the arguments, puts the model in its evaluation state and yields
an :class:`NTKContext`, whose :meth:`~NTKContext.jacobian` returns the Jacobian of a set of
points as blocks (:mod:`~lightning_entk.kernel.factors`):

1. *Discover* (once per model): one forward pass of one point under
   :class:`~lightning_entk.kernel.capture.Capture` lists every use of every selected parameter;
   parameters entering an operation no rule covers are set aside for the generic path, and the
   pass is repeated until the set is stable. What it finds (with the capture route and the
   check of step 3) is kept for later calls on the same model while :func:`discovery_key` is
   unchanged: the modules' code, the parameters' names, shapes and dtypes, the points'
   per-point shapes and the options that change the forward pass. The first call pays for
   discovery; later calls (the monitor's repeated evaluations) do not.
2. *Capture* (per chunk of points): one batched forward pass with a zero perturbation added
   to each use's output, and backward passes batched over the outputs, give the output
   gradients ``g``; the same pass returns the data factors. Each operation's output holds the
   points along one dim (:class:`~lightning_entk.kernel.layout.PointsDim`, read back per point
   by :mod:`~lightning_entk.kernel.layout`), found on a trial of a few points: the dim whose
   size grows with the points, and, where it merges them with positions (``x.view(-1, d)``,
   or ``nn.MultiheadAttention``'s (T, N, E) merged as ``view(T * N, E)``), the order read
   from which entries each point's outputs reach. Whatever data-dependent code the model
   runs (masks built from token ids, padding checks) runs on the batch as the model's author
   wrote it. A model whose operations do not hold the points so (the route's reason is kept
   and :func:`~lightning_entk.kernel.plan.ntk_plan` shows it) is captured by ``vmap`` over
   points of ``jacrev``, and one that ``vmap`` cannot batch (data-dependent control flow)
   one point at a time.
3. *Check* (first chunk): for a random combination of outputs, the parameter gradient rebuilt
   from the factors must equal autograd's, parameter by parameter, on single points; a
   batched capture that fails falls back to ``vmap``, and a parameter that fails (a use the
   capture did not see) moves to the generic path.
4. *Assemble* (:func:`~lightning_entk.kernel.assembly.assemble`): the structured
   parameters' factors become blocks (a
   :class:`~lightning_entk.kernel.factors.FactorBlock` per layout, a
   :class:`~lightning_entk.kernel.factors.TiedBlock` for a tied embedding and unembedding,
   columns formed from the factors otherwise); generic parameters a column block formed by
   ``torch.func``.
"""

from __future__ import annotations

import contextlib
import enum
import math
import time
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap
from torch.utils._pytree import tree_flatten, tree_map

from lightning_entk.kernel.assembly import assemble, column_block, use_factors, use_gradient
from lightning_entk.kernel.budget import MemoryBudget
from lightning_entk.kernel.capture import Capture, element_indices
from lightning_entk.kernel.factors import FactorBlock, Jacobian, TiedBlock
from lightning_entk.kernel.generic import generic_columns, output_gradients
from lightning_entk.kernel.layout import (
    PointsDim,
    batched_shape,
    candidate_dims,
    factors_per_point,
    reads_points,
    split_points,
)
from lightning_entk.kernel.options import (
    KernelOptions,
    NTKMethod,
    compute_dtype,
    parameter_groups,
    projection_matrix,
    select_parameters,
)
from lightning_entk.kernel.points import (
    ForwardFn,
    NotDifferentiableError,
    OutputFn,
    Points,
    as_output_matrix,
    call_model,
    check_points,
    describe_points,
    num_points,
    quiet_batching_fallback,
    take,
    to_compute,
)
from lightning_entk.kernel.rules import Use


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
    model: nn.Module, x1: Points, x2: Points | None, options: KernelOptions
) -> Iterator[NTKContext]:
    """Check the points against the model and ``options``, put the model in its evaluation
    state and yield a context that computes Jacobian blocks (of the projected outputs when
    ``options.output_projections`` is given, see :class:`KernelOptions`). What discovery
    learns about the model is kept for later calls (:func:`discovery_key`)."""
    check_points("x1", x1)
    if x2 is not None:
        check_points("x2", x2, like=x1)
    names = select_parameters(model, options.params)
    group_of = None if options.groups is None else parameter_groups(model, names, options.groups)
    dtype = compute_dtype(model)
    device = next(model.parameters()).device
    key = discovery_key(model, names, x1, options)
    known = _DISCOVERIES.setdefault(model, {})
    discovery = known.pop(key, None) or Discovery()
    with _evaluation_state(model):
        yield NTKContext(
            model=model,
            names=names,
            dtype=dtype,
            x1=to_compute(x1, device, dtype),
            x2=None if x2 is None else to_compute(x2, device, dtype),
            options=options,
            group_of=group_of,
            discovery=discovery,
        )
    if discovery.structure is not None and discovery.index_bytes() <= options_budget(options).piece:
        known[key] = discovery  # most recent last
        while len(known) > MAX_DISCOVERIES:
            known.pop(next(iter(known)))


# What discovery learned, per model and per :func:`discovery_key`; an entry lives as long as
# its model. Element indices are kept with the layouts, so an entry costs 8 bytes per counted
# parameter: only those within a budget piece are kept.
_DISCOVERIES: weakref.WeakKeyDictionary[nn.Module, dict[tuple, Discovery]] = (
    weakref.WeakKeyDictionary()
)
MAX_DISCOVERIES = 4  # per model: e.g. the monitor's whole kernel, its readout, a plan


def options_budget(options: KernelOptions) -> MemoryBudget:
    return MemoryBudget(options.memory_budget)


def discovery_key(model: nn.Module, names: list[str], x: Points, options: KernelOptions) -> tuple:
    """What discovery's findings depend on, cheap to compute at every call: the code of every
    module (its class, ``forward``'s code, an instance's own ``forward``, its hooks), the
    parameters and buffers (names, shapes, dtypes, devices, which count), the points' structure
    and per-point shapes and dtypes, and the options that change the forward pass. Parameter
    values do not count: training changes them, not the model's operations."""
    modules = tuple(
        (
            type(m),
            getattr(type(m).forward, "__code__", None),
            m.__dict__.get("forward"),
            tuple(m._forward_hooks.values()),
            tuple(m._forward_pre_hooks.values()),
        )
        for m in model.modules()
    )
    tensors = tuple(
        (n, tuple(t.shape), t.dtype, t.device)
        for n, t in (*model.named_parameters(), *model.named_buffers())
    )
    flat, spec = tree_flatten(x)
    points = (str(spec), tuple((tuple(t.shape[1:]), t.dtype) for t in flat))
    projections = options.output_projections
    if isinstance(projections, Tensor):
        projections = tuple(projections.shape)
    return (
        modules,
        tensors,
        tuple(names),
        points,
        options.kernel_method,
        options.output_fn,
        options.forward_fn,
        None if options.output_weights is None else tuple(options.output_weights.shape),
        projections,
    )


@dataclass
class Discovery:
    """What the engine learned about a model on its first call: the structure (uses, capture
    route, checks passed), the parameters' element indices, the number of outputs."""

    structure: Structure | None = None
    indices: dict[str, Tensor] = field(default_factory=dict)
    num_outputs: int | None = None

    def index_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.indices.values())


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


class CaptureRoute(str, enum.Enum):
    """How the output gradients of a chunk of points are captured (:meth:`NTKContext.structure`
    picks one; a later failure falls back to the next, with the reason kept)."""

    BATCHED = "batched"  # one batched pass over the chunk, positions in each point's slice
    VMAP = "vmap"  # vmap over points of jacrev
    PER_POINT = "per point"  # one point at a time


@dataclass
class Structure:
    """What discovery found: the uses of the structured parameters, the perturbation shapes
    (one per operation), why each other parameter takes the generic path, and how points are
    captured (and, for a fallback, why)."""

    uses: list[Use] = field(default_factory=list)
    z_shapes: list[tuple[int, ...]] = field(default_factory=list)
    generic: dict[str, str] = field(default_factory=dict)
    capture: CaptureRoute = CaptureRoute.BATCHED
    capture_reason: str = ""
    points: list[PointsDim | None] = field(default_factory=list)  # per operation, None: shared
    checked: bool = False  # the capture passed :meth:`NTKContext._check` already
    fixed_lookups: frozenset = frozenset()  # lookups taken as views (a shared bias's table)
    precision: torch.dtype | None = None  # the least precise dtype the forward computes in
    trial_points: int = 0  # points of the trial that chose the capture route
    trial_seconds: float = 0.0  # the trial's capture by that route

    @property
    def structured(self) -> list[str]:
        return list(dict.fromkeys(u.param for u in self.uses))

    def drop(self, names: dict[str, str]) -> None:
        """Move the parameters ``names`` (name -> why) to the generic path. A capture that no
        longer watches them commits no perturbation to an operation that used only them, so
        the remaining operations are numbered again, in the order of the forward pass."""
        self.generic.update(names)
        self.uses = [u for u in self.uses if u.param not in names]
        live = sorted({u.z for u in self.uses})
        renumbered = {old: new for new, old in enumerate(live)}
        for use in self.uses:
            use.z = renumbered[use.z]
        self.z_shapes = [self.z_shapes[z] for z in live]
        if self.points:
            self.points = [self.points[z] for z in live]

    def fall_back(self, route: CaptureRoute, reason: str) -> None:
        """Capture by ``route`` from now on, because of ``reason`` (kept after the reasons of
        earlier fallbacks)."""
        self.capture = route
        self.capture_reason = "; ".join(r for r in (self.capture_reason, reason) if r)


@dataclass
class NTKContext:
    model: nn.Module
    names: list[str]
    dtype: torch.dtype
    x1: Points
    x2: Points | None
    options: KernelOptions
    group_of: dict[str, str] | None = None  # parameter -> group, for per-group kernels
    discovery: Discovery = field(default_factory=lambda: Discovery())

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
        self.budget = MemoryBudget(self.options.memory_budget)
        self.forward_fn = self.options.forward_fn
        self.batch_size = self.options.batch_size
        weights = self.options.output_weights
        self.output_weights = (
            None if weights is None else torch.as_tensor(weights).to(self.device, self.dtype)
        )
        self._wrapper = _Forward(self.model, self.forward_fn)
        self.projection: Tensor | None = None  # (C, s), drawn once for all points

    # ---------------------------------------------------------------------------------------
    # Forward passes.

    def outputs(self, raw: object, rows: int, project: bool = True) -> Tensor:
        """The model's output as (N, C), weighted, and projected to (N, s) with projections."""
        out = as_output_matrix(raw, rows, None if self.forward_fn else self.options.output_fn)
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
        projections = self.options.output_projections
        if projections is None or self.projection is not None:
            return
        with torch.no_grad():
            raw = self._call_model(lambda: functional_call(
                self._wrapper, self._state(), (take(x, slice(0, 1)),)
            ), x)  # fmt: skip
            c = self.outputs(raw, 1, project=False).shape[1]
        self.projection = projection_matrix(
            c, projections, self.options.projection_seed, self.dtype, self.device
        )

    def _state(self) -> dict[str, Tensor]:
        return {f"model.{k}": v for k, v in {**self.params, **self.buffers}.items()}

    def _capture(
        self,
        names: Iterable[str],
        perturbations: tuple | None = None,
        same_shapes=False,
        fixed: frozenset = frozenset(),
    ) -> Capture:
        """A capture watching the parameters ``names``, the lookups ``fixed`` taken as views;
        their element indices made once."""
        indices = self.discovery.indices
        for name in names:
            if name not in indices:
                indices[name] = element_indices(self.params[name])
        watched = {name: self.params[name] for name in names}
        return Capture(watched, perturbations, indices, same_shapes, fixed)

    def _call_model(self, call, x: Points):
        """``call()``, a forward pass of points of ``x``; a failure of the model itself is a
        ``ValueError`` that names the points' shapes and dtypes beside the model's error."""
        try:
            return call()
        except Exception as err:
            raise ValueError(
                f"The model could not be called on the points ({describe_points(x)}): "
                f"{type(err).__name__}: {err}. Pass points the model takes (the shape and "
                "dtype of its training batches), or `forward_fn(model, points) -> (N, C)`."
            ) from err

    # ---------------------------------------------------------------------------------------
    # Discovery.

    def structure(self, x: Points) -> Structure:
        """The uses of every selected parameter, from forward passes of the first point."""
        if self.discovery.structure is not None:
            return self.discovery.structure
        found = Structure()
        if self.options.kernel_method == NTKMethod.JACOBIAN:
            found.generic = dict.fromkeys(self.names, "method='jacobian'")
            self.discovery.structure = found
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
                    self._call_model(lambda: self.forward(self.params, one), x)
                # A model the capture cannot run: everything generic.
                found.generic.update(dict.fromkeys(watched, f"capture failed: {err}"))
                found.uses, found.z_shapes = [], []
                break
            opaque = [n for n in watched if n in capture.opaque]
            found.precision = capture.precision
            if not opaque:
                found.uses, found.z_shapes = capture.uses, capture.z_shapes
                break
            found.generic.update(dict.fromkeys(opaque, "used in an operation no rule covers"))
            watched = [n for n in watched if n not in opaque]
        if found.uses:
            self._choose_capture(found, take(x, slice(0, min(3, num_points(x)))))
        used = {u.param for u in found.uses}
        for name in watched:
            if name not in used and name not in found.generic:
                found.generic[name] = "no use seen"
        self.discovery.structure = found
        return found

    def _choose_capture(self, found: Structure, sample: Points) -> None:
        """How points are captured, from a trial on a few points: batched when the model is
        batch-aligned (:meth:`_batch_aligned`) and a batched pass passes :meth:`_check`, else
        under ``vmap``, else (``vmap`` cannot batch the model) one point at a time. The trial
        is checked whatever the route, so that a parameter that fails the check (a use the
        capture did not see) moves to the generic path here, where :func:`ntk_plan` sees it,
        and the batched pass is tried again without it. A batched pass that fails on a shared
        lookup is tried again with it taken as a view (:meth:`_lookups_as_views`)."""
        found.trial_points = num_points(sample)
        aligned = self._batch_aligned(found, sample)
        if aligned is True:
            watched = {n: self.params[n] for n in found.structured}
            try:
                start = time.perf_counter()
                grads, factors = self._batched_chunk(found, watched, sample)
                found.trial_seconds = time.perf_counter() - start
                per_use = use_factors(found.uses, grads, factors)
                if not self._check(found, per_use, sample):
                    found.checked = True  # on the points the first chunk starts with
                    return
                aligned = "a batched pass did not match autograd on single points"
            except RuntimeError as err:  # a shared output that cannot take a point dim
                aligned = f"a batched pass failed: {_brief(err)}"
        if aligned.startswith("a batched pass failed") and self._lookups_as_views(found, sample):
            self._choose_capture(found, sample)
            return
        retry = found.capture == CaptureRoute.BATCHED and aligned.startswith("a batched pass")
        reason = found.capture_reason
        found.fall_back(CaptureRoute.VMAP, aligned)
        try:
            start = time.perf_counter()
            grads, factors = self._captured_chunk(found, sample)  # one by one if vmap cannot
            if found.capture != CaptureRoute.VMAP:  # timed again, by the route taken alone
                start = time.perf_counter()
                grads, factors = self._captured_chunk(found, sample)
        except PointMismatch as err:
            found.drop(dict.fromkeys(found.structured, f"operations differ by point: {err}"))
            return
        found.trial_seconds = time.perf_counter() - start
        failed = self._check(found, use_factors(found.uses, grads, factors), sample)
        found.checked = True
        if failed:
            found.drop(failed)
            if found.uses and retry:  # the batched pass may have failed on those alone
                found.capture, found.capture_reason = CaptureRoute.BATCHED, reason
                self._choose_capture(found, sample)

    def _lookups_as_views(self, found: Structure, sample: Points) -> bool:
        """Whether the structure was found again with the lookups whose output every point
        shares (ids made from positions alone: T5's and Swin's relative-position bias) taken
        as views of their tables, every parameter still structured. A shared output that the
        model reshapes into the heads cannot take a points dim; as a view, the table enters
        the operation where it meets the points (the scores it is added to), which holds them."""
        if found.fixed_lookups or len(found.points) != len(found.z_shapes):
            return False
        shared = {z for z, points in enumerate(found.points) if points is None}
        one = take(sample, slice(0, 1))
        try:
            capture = self._capture(found.structured)
            with torch.no_grad():
                self.forward(self.params, one, capture)
            fixed = frozenset(key for key, z in capture.lookups if z in shared)
            if not fixed:
                return False
            capture = self._capture(found.structured, fixed=fixed)
            with torch.no_grad():
                self.forward(self.params, one, capture)
        except Exception:  # the capture cannot run the model so: the shared outputs stay
            return False
        if capture.opaque or {u.param for u in capture.uses} != set(found.structured):
            return False
        found.uses, found.z_shapes, found.points = capture.uses, capture.z_shapes, []
        found.fixed_lookups = fixed
        return True

    def _batch_aligned(self, found: Structure, x: Points) -> bool | str:
        """Whether each operation's output holds the points along one dim (alone, or merged
        with positions, before or after them: :class:`PointsDim`) or is shared by all points
        (a positional table looked up without a batch dim), as in most models: then a chunk of
        points is captured in one batched pass, whatever data-dependent code (masks built
        from the tokens, padding checks) the model runs, each point's positions read from its
        own slice, a shared output perturbed per point by broadcasting (checked in
        :meth:`_check`; a model that fails it is captured under ``vmap``). Else, why not.

        The dim is the one whose size grows with the points; when it merges the points with
        other entries, their order is read from which entries each point's outputs depend on."""
        n = num_points(x)
        if n == 1:  # one point: any layout reads it
            found.points = [PointsDim(0)] * len(found.z_shapes)
            return True
        capture = self._capture(found.structured, fixed=found.fixed_lookups)
        try:
            with torch.no_grad():
                self.forward(self.params, x, capture)
        except Exception as err:
            return f"a pass over several points failed: {err}"
        if len(capture.z_shapes) != len(found.z_shapes):
            return "the operations on several points differ from those on one"
        candidates = [
            candidate_dims(one, many, n)
            for one, many in zip(found.z_shapes, capture.z_shapes, strict=True)
        ]
        if None in candidates:
            return "an operation mixes the points with other dims"
        found.points = [options[0] for options in candidates]
        ambiguous = [z for z, options in enumerate(candidates) if len(options) > 1]
        if ambiguous:
            try:
                support = self._point_support(found, x, ambiguous)
            except RuntimeError as err:  # a shared output that cannot take a points dim
                return f"a batched pass failed: {_brief(err)}"
            for z, grad in zip(ambiguous, support, strict=True):
                fits = [p for p in candidates[z] if reads_points(p, grad, found.z_shapes[z])]
                if not fits:
                    return "an operation mixes the points with other dims"
                found.points[z] = fits[0]
        return True

    def _point_support(self, found: Structure, x: Points, ops: list[int]) -> list[Tensor]:
        """For each operation of ``ops``, the gradient of a fixed random combination of each
        point's outputs with respect to the operation's output: (n, *batched shape)."""
        n = num_points(x)
        watched = {name: self.params[name] for name in found.structured}
        like = next(iter(watched.values()))
        zs = tuple(
            like.new_zeros(batched_shape(s, p, n)).requires_grad_()
            for s, p in zip(found.z_shapes, found.points, strict=True)
        )
        generator = torch.Generator(device="cpu").manual_seed(0)
        with torch.enable_grad():
            capture = self._capture(watched, zs, fixed=found.fixed_lookups)
            out = self.forward(self.params, x, capture)
            v = torch.randn(out.shape[1], generator=generator, dtype=out.dtype).to(out.device)
            return output_gradients((out @ v)[None], [zs[z] for z in ops])

    def _drop_from_structure(self, names: dict[str, str]) -> None:
        """Move parameters to the generic path after the check."""
        self.discovery.structure.drop(names)

    # ---------------------------------------------------------------------------------------
    # Capture.

    def _captured_chunk(self, structure: Structure, chunk: Points) -> tuple[list, list]:
        """Output gradients (n, C, *y) per operation and factors (n, ...) per use."""
        watched = {n: self.params[n] for n in structure.structured}
        n = num_points(chunk)
        like = self.params[structure.uses[0].param]
        if structure.capture == CaptureRoute.BATCHED and n > 1 and structure.trial_points < 2:
            # Discovered on one point, which cannot tell where the points go: a new trial.
            self._choose_capture(structure, take(chunk, slice(0, min(3, n))))
        if structure.capture == CaptureRoute.BATCHED:
            try:
                return self._batched_chunk(structure, watched, chunk)
            except RuntimeError as err:  # a shared output that cannot take a point dim
                structure.fall_back(CaptureRoute.VMAP, f"a batched pass failed: {_brief(err)}")

        def per_point(zs: tuple, point: Points) -> tuple[Tensor, tuple]:
            capture = self._capture(watched, zs, fixed=structure.fixed_lookups)
            out = self.forward(self.params, tree_map(lambda t: t.unsqueeze(0), point), capture)
            return out[0], tuple(capture.factors)

        if structure.capture == CaptureRoute.VMAP:
            zs = tuple(like.new_zeros(n, *s) for s in structure.z_shapes)
            try:
                with quiet_batching_fallback():
                    grads, factors = vmap(jacrev(per_point, has_aux=True))(zs, chunk)
                return list(grads), list(factors)
            except RuntimeError as err:  # data-dependent control flow, or an op vmap cannot batch
                structure.fall_back(
                    CaptureRoute.PER_POINT, f"vmap could not batch it: {_brief(err)}"
                )
        results = [self._one_point(structure, watched, take(chunk, slice(i, i + 1)))
                   for i in range(n)]  # fmt: skip
        grads = [torch.stack(g) for g in zip(*(r[0] for r in results), strict=True)]
        factors = [torch.stack(f) for f in zip(*(r[1] for r in results), strict=True)]
        return grads, factors

    def _one_point(self, structure: Structure, watched: dict, point: Points):
        """Output gradients (C, *y) per operation and factors per use of one point (a batch
        of one), by plain autograd: no ``torch.func`` transform, so that operations it
        refuses (an ``autograd.Function`` without ``setup_context``) are captured too.

        Raises:
            PointMismatch: the point runs other operations, or other shapes, than discovery's
                (data-dependent routing).
            NotDifferentiableError: the forward pass cannot be differentiated.
        """
        like = next(iter(watched.values()))
        zs = [like.new_zeros(*s).requires_grad_() for s in structure.z_shapes]
        capture = self._capture(watched, tuple(zs), True, structure.fixed_lookups)
        try:
            with torch.enable_grad():
                out = self.forward(self.params, point, capture)
        except RuntimeError as err:  # ShapeChanged included
            raise PointMismatch(_brief(err)) from err
        if len(capture.uses) != len(structure.uses) or capture.z_shapes != structure.z_shapes:
            raise PointMismatch("the operations differ from point to point")
        try:
            with torch.enable_grad():
                grads = output_gradients(out, zs)
        except RuntimeError as err:
            raise NotDifferentiableError.of(err) from err
        return list(grads), [f.detach() for f in capture.factors]

    def _batched_chunk(self, structure: Structure, watched: dict, chunk: Points):
        """One batched pass over the chunk (see :meth:`_batch_aligned`)."""
        n = num_points(chunk)
        like = next(iter(watched.values()))
        zs = tuple(
            like.new_zeros(*batched_shape(s, p, n)).requires_grad_()
            for s, p in zip(structure.z_shapes, structure.points, strict=True)
        )
        capture = self._capture(watched, zs, fixed=structure.fixed_lookups)
        with torch.enable_grad():
            out = self.forward(self.params, chunk, capture)
            grads = output_gradients(out, list(zs))
        if len(capture.uses) != len(structure.uses):
            raise RuntimeError("the operations of a batched pass differ from those of discovery")
        grads = [
            split_points(g, s, p, n)
            for g, s, p in zip(grads, structure.z_shapes, structure.points, strict=True)
        ]
        factors = factors_per_point(
            structure.uses, capture.uses, capture.factors, structure.points, structure.z_shapes, n
        )
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
        sizes = {name: self.params[name].numel() for name in structure.structured}
        blocks, owners = assemble(uses, parts, n, c, sizes, self.budget, self.group_of)
        for block in blocks:  # the capture's share of the budget, free again by now
            if isinstance(block, FactorBlock | TiedBlock):
                block.scratch_bytes = self.budget.piece
        group = self.group_of or dict.fromkeys(self.names, "")
        generic = [m for m in self.names if m in structure.generic]
        for key in dict.fromkeys(group[m] for m in generic):  # one block per group
            names = [m for m in generic if group[m] == key]
            columns, size = generic_columns(
                names, self.params, self.forward_one, x, c, self.budget.piece
            )
            blocks.append(column_block(columns, size, n, c, self.dtype, self.budget))
            owners.append(names[0])
        groups = [group[m] for m in owners] if self.group_of else None
        structure.checked = True  # the first chunk passed: later calls need not check again
        return Jacobian(blocks, n, c, self.dtype, self.device, groups)

    def num_outputs(self) -> int:
        """C, the (projected) outputs per point, from one forward pass made once."""
        if self.discovery.num_outputs is None:
            self._resolve_projection(self.x1)
            one = take(self.x1, slice(0, 1))
            with torch.no_grad():
                out = self._call_model(lambda: self.forward(self.params, one), one)
            self.discovery.num_outputs = out.shape[1]
        return self.discovery.num_outputs

    def _factor_parts(self, structure: Structure, x: Points):
        """Per use, its factors ``g`` (N, T, C, H, B) and ``a`` for all points, chunk by
        chunk; the first chunk is checked against autograd."""
        n = num_points(x)
        step = self._points_per_chunk(structure, n)
        joined: list[tuple[Tensor, Tensor | None]] = []
        for start in range(0, n, step):
            chunk = take(x, slice(start, start + step))
            try:
                grads, factors = self._captured_chunk(structure, chunk)
            except PointMismatch as err:  # a point unlike the trial's: everything generic
                self._drop_from_structure(
                    dict.fromkeys(structure.structured, f"operations differ by point: {err}")
                )
                return [], self.num_outputs()
            per_use = use_factors(structure.uses, grads, factors)
            if start == 0:
                failed = {} if structure.checked else self._check(structure, per_use, chunk)
                if failed and structure.capture == CaptureRoute.BATCHED:
                    reason = "a batched pass did not match autograd on single points"
                    structure.fall_back(CaptureRoute.VMAP, reason)
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
        return max(1, min(self.batch_size, n, self.budget.piece // max(per_point, 1)))

    def _check(self, structure: Structure, per_use, chunk: Points) -> dict[str, str]:
        """Parameters whose gradient, rebuilt from the factors for a random combination of
        outputs, differs from autograd's, on each of up to two points alone (a use the capture
        missed, or positions given to the wrong point)."""
        uses = structure.uses
        names = list(dict.fromkeys(u.param for u in uses))
        generator = torch.Generator(device="cpu").manual_seed(0)
        c = per_use[0][0].shape[2]
        # Round-off of the least precise dtype the forward computes in (a float64 model with
        # a float32 norm inside is as precise as float32); a missed use is an error of order 1.
        tol = math.sqrt(torch.finfo(structure.precision or self.dtype).eps)
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
                grad = use_gradient(use, g[i : i + 1], None if a is None else a[i : i + 1], v)
                rebuilt[use.param].index_add_(0, use.layout.reshape(-1), grad.reshape(-1))
            for name, t in zip(names, true, strict=True):
                t = torch.zeros_like(rebuilt[name]) if t is None else t.reshape(-1)
                err = torch.linalg.vector_norm(rebuilt[name] - t)
                if err > tol * (torch.linalg.vector_norm(t) + tol):
                    failed[name] = "a use the capture did not see"
        return failed


class PointMismatch(Exception):
    """A point whose operations differ from those discovery saw (data-dependent routing, as
    in a mixture of experts): its structured parameters take the generic path."""


def _brief(err: Exception) -> str:
    """An error's first sentence, for a fallback's reason."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return first.split(". ")[0]


def _empty_like(t: Tensor | None, n: int) -> Tensor | None:
    """An uninitialised array like ``t`` with ``n`` points along dim 0."""
    return None if t is None else t.new_empty(n, *t.shape[1:])
