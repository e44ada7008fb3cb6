"""One evaluation of the monitor: the eNTK on the probe set, its spectrum, its cliffs, and the
scalars logged under ``entk/``. Pure functions of a model and a probe set; no Lightning here.

The scalars are those of a full evaluation in :mod:`lightning_entk.keys`.

The spectrum, kernel regression and alignment are solved in the dtype the kernel was computed
in (float32 for a float32 model), not in float64: the kernel's own round-off is as large as
what float32 solvers add. Measured on the demo's MLP through grokking
(``python benchmarks/float32_linalg.py``, 16 kernels from epoch 0 to 150): eigenvalues within
1.1e-6 of the largest, the same cliffs and the same kernel regression accuracy at every one,
kernel-target alignment within 4e-5; 1.7x faster than float64.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from lightning_entk import keys
from lightning_entk.alignment import orthonormal_basis, orthonormal_overlap
from lightning_entk.cliffs import Cliff, find_cliffs
from lightning_entk.kernel import KernelOptions, NTKPlan, empirical_ntk
from lightning_entk.kernel.budget import MemoryBudget
from lightning_entk.kernel.options import compute_dtype
from lightning_entk.probe import ProbeSet
from lightning_entk.signals import (
    MIN_DEBIASED_POINTS,
    ROUND_OFF_RTOL,
    debiased_alignment,
    kernel_regression_accuracy,
    kernel_target_alignment,
    kernel_velocity,
)
from lightning_entk.spectrum import Spectrum

TOP_EIGENVALUES = 5


@dataclass
class Evaluation:
    """What one evaluation found.

    Attributes:
        eigenvalues: ``(k,)`` float64, descending.
        cliffs: cliffs of ``eigenvalues``, by rank.
        metrics: the ``entk/`` scalars (see the module docstring).
        overlaps: family -> overlap of each cliff segment (eigenvectors between consecutive
            cliffs) with that family's features.
        eigenvectors: ``(R, k_v)`` top eigenvectors in data space, ``None`` when not needed.
        kernel: the kernel, kept to measure the next evaluation's velocity.
    """

    eigenvalues: np.ndarray
    cliffs: list[Cliff]
    metrics: dict[str, float]
    overlaps: dict[str, list[float]] = field(default_factory=dict)
    eigenvectors: Tensor | None = None
    kernel: Tensor | None = None


def points_within_budget(plan: NTKPlan, memory_budget: int, rows_per_point: int = 1) -> int:
    """The most probe points (at most the plan's) whose evaluation is predicted to fit
    ``memory_budget``: the kernel's own work (:meth:`NTKPlan.peak_bytes`, planned with the
    engine's share of the budget) plus its dense eigendecomposition and the kernels of the
    plan's parameter groups (:meth:`~lightning_entk.kernel.budget.MemoryBudget.dense_kernel_bytes`).

    Example:
        >>> import torch
        >>> from lightning_entk.kernel import ntk_plan
        >>> plan = ntk_plan(torch.nn.Linear(3, 2), torch.randn(100, 3))
        >>> points_within_budget(plan, 2**30)
        100
        >>> points_within_budget(plan, 100_000) < 100
        True
    """

    def need(n: int) -> int:
        dense = MemoryBudget.dense_kernel_bytes(n * rows_per_point, plan.num_groups)
        return plan.peak_bytes(n) + dense

    lo, hi = 0, plan.num_points
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if need(mid) <= memory_budget else (lo, mid - 1)
    return lo


def probe_within_budget(
    probe: ProbeSet, plan: NTKPlan, memory_budget: int, rows_per_point: int = 1
) -> tuple[ProbeSet, str | None]:
    """``probe``, or its largest seeded subset whose evaluation is predicted to fit
    ``memory_budget`` (:func:`points_within_budget`) with a warning that says so.

    Raises:
        ValueError: if not even two points fit.
    """
    fits = points_within_budget(plan, memory_budget, rows_per_point)
    if fits >= len(probe):
        return probe, None
    mib = memory_budget / 2**20
    if fits < 2:
        raise ValueError(
            f"ENTKMonitor: not even 2 probe points fit `memory_budget` = {mib:.0f} MiB "
            f"({plan.num_outputs} outputs, {rows_per_point} kernel rows per point); raise "
            "`memory_budget`, use mode='trace', or set `output_projections` or `params` to "
            "count fewer outputs or parameters."
        )
    warning = (
        f"ENTKMonitor: an evaluation on all {len(probe)} probe points would need more than "
        f"`memory_budget` = {mib:.0f} MiB; it uses {fits} of them (a fixed seeded subset). "
        "Raise `memory_budget`, or pass fewer points, `output_projections` or `params`, to "
        "choose otherwise."
    )
    return probe.subset(fits), warning


def evaluate(
    model: nn.Module,
    probe: ProbeSet,
    *,
    mode: str = "trace",
    options: KernelOptions | None = None,
    previous_kernel: Tensor | None = None,
    features: Mapping[str, Tensor] | None = None,
    cliff_options: Mapping[str, object] | None = None,
    keep_eigenvectors: bool = False,
    kernel: Tensor | None = None,
    detail: bool = True,
) -> Evaluation:
    """Compute the eNTK of ``model`` on ``probe`` and everything the monitor logs about it.

    ``options``: how the kernel is computed (:class:`~lightning_entk.kernel.KernelOptions`);
    its parameter groups' kernels, from the same pass, get their own spectrum, cliffs and label
    signals under ``entk/<group>/...``. ``kernel``: the eNTK of the probe set in ``mode`` when
    the caller has it already (e.g. assembled from row blocks computed by several processes;
    then without groups); computed here when ``None``. Without ``detail`` only the whole
    kernel's figures: no groups, and no eigenvectors nor feature overlaps unless
    ``keep_eigenvectors`` (eigenvalues alone cost a fraction of the eigenpairs, and the groups'
    spectra and signals as much again as the whole kernel's each).

    Raises:
        FloatingPointError: if the kernel is not finite (the caller skips the evaluation).
    """
    start = time.perf_counter()
    options = options or KernelOptions()
    parts: dict[str, Tensor] = {}
    if not detail:
        options, features = options.replace(groups=None), None
    if kernel is None:
        kernel = empirical_ntk(model, probe.x, mode=mode, options=options)
        if options.groups is not None:
            parts, kernel = kernel, sum(kernel.values())
            if len(parts) == 1:  # the whole kernel again
                parts = {}
    if not torch.isfinite(kernel).all():
        raise FloatingPointError("the eNTK has NaN or inf entries (diverging weights?)")
    dtype = compute_dtype(model)  # float32 or float64
    kernel = kernel.to(dtype)
    need_vectors = bool(features) or keep_eigenvectors
    rtol = ROUND_OFF_RTOL[dtype]
    kernel_done = time.perf_counter()
    spectrum, cliffs, metrics = spectrum_and_cliffs(kernel, cliff_options, need_vectors)
    spectrum_done = time.perf_counter()
    metrics.update(label_metrics(kernel, probe, mode, rtol))
    eigenvalues = spectrum.eigenvalues.to(torch.float64).cpu().numpy()
    for group, part in parts.items():
        _, _, group_metrics = kernel_metrics(part.to(dtype), probe, mode, cliff_options, rtol)
        metrics.update({keys.of_group(group, k): v for k, v in group_metrics.items()})
    if previous_kernel is not None:
        metrics[keys.KERNEL_VELOCITY] = kernel_velocity(previous_kernel, kernel)
    overlaps = {}
    if features:
        overlaps = segment_overlaps(spectrum.eigenvectors, cliffs, features)
        for family, values in overlaps.items():
            metrics[keys.overlap(family)] = max(values)
    done = time.perf_counter()
    metrics[keys.SECONDS] = done - start
    metrics[keys.SECONDS_KERNEL] = kernel_done - start
    metrics[keys.SECONDS_SPECTRUM] = spectrum_done - kernel_done
    metrics[keys.SECONDS_SIGNALS] = done - spectrum_done
    return Evaluation(
        eigenvalues=eigenvalues,
        cliffs=cliffs,
        metrics=metrics,
        overlaps=overlaps,
        eigenvectors=spectrum.eigenvectors if need_vectors else None,
        kernel=kernel,
    )


def kernel_metrics(
    kernel: Tensor,
    probe: ProbeSet,
    mode: str,
    cliff_options: Mapping[str, object] | None,
    rtol: float,
    eigenvectors: bool = False,
) -> tuple[Spectrum, list[Cliff], dict[str, float]]:
    """A kernel's spectrum, cliffs and scalars: those of :func:`spectrum_metrics` and
    of :func:`label_metrics`."""
    spectrum, cliffs, metrics = spectrum_and_cliffs(kernel, cliff_options, eigenvectors)
    metrics.update(label_metrics(kernel, probe, mode, rtol))
    return spectrum, cliffs, metrics


def spectrum_and_cliffs(
    kernel: Tensor, cliff_options: Mapping[str, object] | None, eigenvectors: bool = False
) -> tuple[Spectrum, list[Cliff], dict[str, float]]:
    """A kernel's spectrum (in its dtype), its cliffs and :func:`spectrum_metrics`."""
    spectrum = Spectrum.from_kernel(kernel, eigenvectors=eigenvectors, dtype=kernel.dtype)
    values = spectrum.eigenvalues.to(torch.float64).cpu().numpy()
    cliffs = find_cliffs(values, **(cliff_options or {}))
    return spectrum, cliffs, spectrum_metrics(spectrum, cliffs)


def label_metrics(kernel: Tensor, probe: ProbeSet, mode: str, rtol: float) -> dict[str, float]:
    """With labels (trace mode), the kernel-target alignment and, with held-out points, the
    accuracy of kernel regression and the alignment on the held-out points alone; nothing
    otherwise."""
    metrics = {}
    if probe.y is not None and mode == "trace":
        targets = torch.nn.functional.one_hot(probe.y.to(kernel.device).long()).to(kernel.dtype)
        metrics[keys.KERNEL_TARGET_ALIGNMENT] = kernel_target_alignment(kernel, targets)
        if probe.heldout is not None:
            heldout = probe.heldout.to(kernel.device)
            metrics[keys.KERNEL_REGRESSION_ACC] = kernel_regression_accuracy(
                kernel, targets, heldout, rtol=rtol
            )
            if int(heldout.sum()) >= MIN_DEBIASED_POINTS:
                metrics[keys.HELDOUT_ALIGNMENT] = debiased_alignment(
                    kernel[heldout][:, heldout], targets[heldout]
                )
    return metrics


def spectrum_metrics(spectrum: Spectrum, cliffs: list[Cliff]) -> dict[str, float]:
    """Scalars of a spectrum and its cliffs (keys of the module docstring)."""
    values = spectrum.eigenvalues
    metrics = {
        keys.NUM_CLIFFS: float(len(cliffs)),
        keys.EFFECTIVE_RANK: spectrum.effective_rank(),
        keys.TRACE: float(values.clamp(min=0).sum()),
    }
    for j in range(min(TOP_EIGENVALUES, len(values))):
        metrics[keys.eigenvalue_top(j + 1)] = float(values[j])
    for i, cliff in enumerate(cliffs, start=1):
        metrics[keys.cliff_rank(i)] = float(cliff.rank)
        metrics[keys.cliff_drop(i)] = float(cliff.drop)
    return metrics


def segment_overlaps(
    eigenvectors: Tensor, cliffs: list[Cliff], features: Mapping[str, Tensor]
) -> dict[str, list[float]]:
    """Subspace overlap (:func:`~lightning_entk.subspace_overlap`) of each cliff segment
    (eigenvectors ``rank_{i-1}+1 .. rank_i``, with ``rank_0 = 0``, orthonormal already) with each
    family of features (R, F), whose basis is computed once."""
    edges = [0, *[c.rank for c in cliffs]]
    vectors = eigenvectors.to(torch.float64).cpu().numpy()
    overlaps = {}
    for family, values in features.items():
        basis = orthonormal_basis(values.to(torch.float64).cpu().numpy())
        overlaps[family] = [
            orthonormal_overlap(vectors[:, lo:hi], basis) for lo, hi in itertools.pairwise(edges)
        ] or [0.0]
    return overlaps
