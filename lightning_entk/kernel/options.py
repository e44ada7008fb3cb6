"""How a kernel is computed: :class:`KernelOptions`, the one object that carries every choice
besides the points and the mode, and the checks and parameter groupings it implies.

:func:`~lightning_entk.empirical_ntk`, :func:`~lightning_entk.ntk_spectrum`,
:func:`~lightning_entk.ntk_plan`, the monitor's core and the Lightning callback all take a
:class:`KernelOptions` (or its fields as keyword arguments) and pass it down unchanged; its
arguments are checked once, here, when it is made.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_entk.checks import check_int
from lightning_entk.kernel.budget import DEFAULT_MEMORY_BUDGET
from lightning_entk.kernel.points import ForwardFn, OutputFn

ParamSelection = Iterable[str] | Callable[[str, nn.Parameter], bool] | None
Groups = str | Mapping[str, Iterable[str] | Callable[[str], bool]] | Callable[[str], str] | None


class NTKMethod(str, enum.Enum):
    """How the kernel is computed. Every method gives the same kernel up to float round-off.

    ``STRUCTURED``: each parameter is recognised by the operations that use it (matmul,
    ``F.linear``, ``addmm``, ``einsum``, convolution, embedding lookup, elementwise scale and
    shift, the affine part of normalisations; through any views), whatever module holds it.
    For a use ``y = V x`` the share of the kernel is ``(a a'^T) * (g g'^T)`` with ``g`` the
    gradient of each output with respect to ``y`` (Novak et al. 2022, "Fast Finite Width
    Neural Tangent Kernel", arXiv:2206.08720, section 4; "structured derivatives"), summed
    over all pairs of positions and uses (for a tied embedding and unembedding, ``W`` and
    ``W.T``, the cross terms pair one use's output gradients with the other's inputs). Costs
    ``N C`` backward passes (batched over the points, whatever data-dependent code builds the
    model's masks) plus Gram products of layer widths; no Jacobian of size ``N C P`` is
    stored. A parameter that no rule covers, and only that parameter, goes through the generic
    path of ``JACOBIAN``.

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


@dataclass(frozen=True, eq=False)
class KernelOptions:
    """Every choice of how the eNTK is computed, besides the points and the mode.

    Attributes:
        params: which parameters count: ``None`` for all with ``requires_grad``, an iterable
            of names from ``model.named_parameters()``, or a predicate ``(name, param) -> bool``.
        output_fn: maps the model's raw output to ``(N, C)``; by default a tensor is taken as
            it is, a tuple's first element, a dict's ``"logits"`` or an object's ``.logits``.
            A sequence output ``(N, T, V)`` needs one, e.g. ``lambda out: out[:, -1]``.
        output_weights: ``(C,)``; output ``c`` is multiplied by ``w_c`` before the kernel is
            formed, so ``K[n, m, i, j]`` becomes ``w_i w_j K[n, m, i, j]``.
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
        forward_fn: ``(model, points) -> (N, C)``, for what no default covers (several
            arguments, extra keyword arguments); replaces the call and ``output_fn``.
        method: ``"auto"``, ``"structured"`` or ``"jacobian"`` (see :class:`NTKMethod`).
        groups: ``None`` for the whole kernel; else the kernel of each parameter group, in
            one pass (the kernel is a sum over parameters, so the groups' kernels sum to the
            whole): ``"modules"`` (the model's top-level children), ``"auto"`` (a few groups
            that follow the model's parts: embeddings, blocks, head; see
            :func:`automatic_groups`), a callable ``name -> group``, or a mapping
            ``group -> parameter names`` (or predicate), the parameters no group claims in
            ``"other"``.
        batch_size: points per forward pass.
        memory_budget: bytes that the computation's own arrays may take, shared as
            :class:`~lightning_entk.kernel.budget.MemoryBudget` says (capture passes, Jacobian
            columns of the generic path, blocks of Gram rows). Work is split into more, smaller
            pieces to stay within it.

    Raises:
        ValueError: for a value of the wrong kind or out of range, naming the field.

    Example:
        >>> options = KernelOptions(params=["0.weight"], groups="modules")
        >>> options.replace(groups=None).params
        ['0.weight']
    """

    params: ParamSelection = None
    output_fn: OutputFn = None
    output_weights: Tensor | None = None
    output_projections: int | Tensor | None = None
    projection_seed: int = 0
    forward_fn: ForwardFn = None
    method: str | NTKMethod = "auto"
    groups: Groups = None
    batch_size: int = 256
    memory_budget: int = DEFAULT_MEMORY_BUDGET

    def __post_init__(self) -> None:
        check_choice("method", str(getattr(self.method, "value", self.method)),
                      [m.value for m in NTKMethod])  # fmt: skip
        for name in ("output_fn", "forward_fn"):
            value = getattr(self, name)
            if value is not None and not callable(value):
                raise ValueError(f"`{name}` must be callable or None, got {value!r}.")
        _check_groups(self.groups)
        _check_projections(self.output_projections, self.projection_seed)
        for name in ("batch_size", "memory_budget"):
            check_int(name, getattr(self, name), words="a positive int")
        weights = None if self.output_weights is None else torch.as_tensor(self.output_weights)
        if weights is not None and weights.ndim != 1:
            raise ValueError(f"`output_weights` must have shape (C,), got {tuple(weights.shape)}.")

    @classmethod
    def of(cls, options: KernelOptions | None = None, **fields: object) -> KernelOptions:
        """``options`` (default: all defaults) with ``fields`` replaced.

        Raises:
            ValueError: for a name that is not a field, or a value :class:`KernelOptions`
                rejects.
        """
        unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            names = ", ".join(f.name for f in dataclasses.fields(cls))
            raise ValueError(f"Unknown kernel option(s) {unknown}; the options are: {names}.")
        options = cls() if options is None else options
        if not isinstance(options, KernelOptions):
            raise ValueError(f"`options` must be a KernelOptions, got {type(options).__name__}.")
        return dataclasses.replace(options, **fields) if fields else options

    def replace(self, **fields: object) -> KernelOptions:
        """A copy with ``fields`` replaced (checked again)."""
        return KernelOptions.of(self, **fields)

    @property
    def kernel_method(self) -> NTKMethod:
        return NTKMethod(getattr(self.method, "value", self.method))


def check_choice(name: str, value: object, allowed: Iterable[str]) -> None:
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
    check_int("projection_seed", projection_seed, None)


def _check_groups(groups: Groups) -> None:
    if groups is not None and not (
        groups in ("modules", "auto") or callable(groups) or isinstance(groups, Mapping)
    ):
        raise ValueError(
            "`groups` must be None, 'modules', 'auto', a callable name -> group, or a mapping "
            f"group -> parameter names (or predicate), got {groups!r}."
        )


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
    _check_groups(groups)
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
