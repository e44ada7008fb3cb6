"""The eNTK at scale: a ~10M-parameter MLP on 2048 probe points, and a model with thousands of
outputs.

Part 1. MLP 784-2048-2048-2048-10 (ReLU, 10.0M parameters, float32), 2048 Gaussian probe points:
``ntk_spectrum(model, x, k=64)`` (the full 2048 x 2048 trace eNTK, then its top 64 eigenpairs)
with its phases timed separately; then the structured engine against ``torch.func`` as users
write it (``vmap(jacrev(functional_call))`` over the points, then ``J J^T``:
``_harness.torch_func``) in the same run on a subset of the points, the package's own
``method="jacobian"`` beside them (labelled; no ratio is taken against it). The subset is
small because the baseline holds every per-example Jacobian, N C P floats: 3.2 GB for 8
points, 0.8 TB for all 2048.

Part 2. MLP 784-512-512-C with C = 500 and 2000 outputs, 128 points: the exact trace kernel
(in groups of 250 outputs, to bound memory) against the estimate from ``output_projections=64``
random projections of the outputs, with its relative Frobenius error.

Each measurement runs in a fresh process (median wall time, peak resident memory added above
the model and data).

    python benchmarks/scale.py
"""

from __future__ import annotations

import functools
import itertools
import time

import torch
from torch import nn

from lightning_entk import Spectrum, empirical_ntk, ntk_spectrum
from lightning_entk.kernel import KernelOptions
from lightning_entk.kernel.context import ntk_context

from _harness import measure, relative_error, torch_func

WIDTH, DEPTH, INPUTS, OUTPUTS, POINTS, K = 2048, 3, 784, 10, 2048, 64
SUBSET = 8
LARGE_C, LARGE_C_POINTS, LARGE_C_WIDTH, PROJECTIONS, GROUP = (500, 2000), 128, 512, 64, 250


def mlp(width: int, depth: int, outputs: int) -> nn.Sequential:
    layers, fan_in = [], INPUTS
    for _ in range(depth):
        layers += [nn.Linear(fan_in, width), nn.ReLU()]
        fan_in = width
    return nn.Sequential(*layers, nn.Linear(fan_in, outputs))


def setup(points: int = POINTS):
    torch.manual_seed(0)
    model = mlp(WIDTH, DEPTH, OUTPUTS)
    x = torch.randn(points, INPUTS, generator=torch.Generator().manual_seed(1))
    return model, x


def spectrum(model, x):
    return ntk_spectrum(model, x, k=K)


def phases(model, x):
    """The same work as ``spectrum``, timed step by step."""
    times = {"start": time.perf_counter()}
    with ntk_context(model, x, None, KernelOptions()) as ctx:
        jac = ctx.jacobian(ctx.x1)
    times["Jacobian factors (C = 10 backward passes)"] = time.perf_counter()
    kernel = jac.kernel(jac, "trace")
    times["kernel (Gram products of the factors)"] = time.perf_counter()
    Spectrum.from_kernel(kernel, K)
    times[f"top-{K} eigh (float64)"] = time.perf_counter()
    names = list(times)
    return {b: times[b] - times[a] for a, b in itertools.pairwise(names)}


def structured(model, x):
    return empirical_ntk(model, x, method="structured")


def jacobian(model, x):
    return empirical_ntk(model, x, method="jacobian", batch_size=2)


def baseline(model, x):
    """``torch.func`` as users write it; with the diagonal blocks only if the Jacobians did
    not fit (see ``_harness.torch_func``)."""
    return torch_func(model, x)


def structured_float64(model, x):
    return empirical_ntk(model.double(), x.double(), method="structured")


def setup_large_c(outputs: int):
    torch.manual_seed(0)
    model = mlp(LARGE_C_WIDTH, 2, outputs)
    x = torch.randn(LARGE_C_POINTS, INPUTS, generator=torch.Generator().manual_seed(1))
    return model, x


def exact_trace(model, x):
    outputs = model[-1].out_features
    kernel = 0
    for lo in range(0, outputs, GROUP):
        kernel = kernel + empirical_ntk(
            model, x, output_fn=lambda out, lo=lo: out[:, lo : lo + GROUP]
        )
    return kernel


def projected_trace(model, x):
    return empirical_ntk(model, x, output_projections=PROJECTIONS)


def main() -> None:
    model, _ = setup(1)
    parameters = sum(p.numel() for p in model.parameters())
    print(
        f"MLP {INPUTS}-{'-'.join([str(WIDTH)] * DEPTH)}-{OUTPUTS} (ReLU), {parameters / 1e6:.2f}M "
        f"parameters, float32; torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(f"\n1. Trace eNTK on {POINTS} points and its top {K} eigenpairs")
    full = measure(setup, spectrum, repeats=3, warmup=0)
    print(
        f"ntk_spectrum(model, x, k={K}): {full['seconds']:.1f} s, peak {full['peak_mib']:.0f} MiB "
        f"(route: {full['result'].route})"
    )
    steps = measure(setup, phases, repeats=1, warmup=0)["result"]
    for name, seconds in steps.items():
        print(f"  {name:<44}{seconds:>7.1f} s")

    print(f"\nAgainst torch.func as users write it, on the first {SUBSET} points")
    subset = functools.partial(setup, SUBSET)
    fast = measure(subset, structured, repeats=3, warmup=1)
    base = measure(subset, baseline, repeats=1, warmup=0)
    base_kernel, bound = base["result"]
    base["result"] = base_kernel
    own = measure(subset, jacobian, repeats=1, warmup=0)
    exact = measure(subset, structured_float64, repeats=1, warmup=0)["result"]
    mark = ">=" if bound else ""  # the baseline's diagonal blocks only: a lower bound
    print(f"{'method':<34}{'points':>8}{'time (s)':>10}{'peak (MiB)':>12}{'error':>10}")
    rows = (
        ("structured", fast),
        ("torch.func vmap(jacrev) (baseline)", base),
        ('method="jacobian" (package)', own),
    )
    for name, r in rows:
        error = "-" if bound and r is base else f"{relative_error(r['result'], exact):.1e}"
        print(f"{name:<34}{SUBSET:>8}{r['seconds']:>10.2f}{r['peak_mib']:>12.0f}{error:>10}")
    print(
        f"{'structured + top-64':<34}{POINTS:>8}{full['seconds']:>10.2f}{full['peak_mib']:>12.0f}"
    )
    print(
        f"speed-up on the subset against torch.func: {mark}{base['seconds'] / fast['seconds']:.1f}"
        "x. error: relative Frobenius distance to the kernel computed in float64. The float32 "
        f"Jacobian contraction sums C P = {OUTPUTS * parameters:.1e} products per entry, the "
        f"structured engine at most C d = {OUTPUTS * WIDTH}."
    )
    print(
        f"The baseline on all {POINTS} points would hold N C P = "
        f"{POINTS * OUTPUTS * parameters * 4 / 1e9:.0f} GB of Jacobians (float32)."
    )

    print(
        f"\n2. Many outputs: MLP {INPUTS}-{LARGE_C_WIDTH}-{LARGE_C_WIDTH}-C, "
        f"{LARGE_C_POINTS} points, trace eNTK"
    )
    print(
        f"{'C':>6}{'params':>9}{'exact (s)':>11}{'peak (MiB)':>12}"
        f"{f'{PROJECTIONS} proj. (s)':>15}{'peak (MiB)':>12}{'rel. error':>12}"
    )
    for outputs in LARGE_C:
        large = functools.partial(setup_large_c, outputs)
        size = sum(p.numel() for p in large()[0].parameters())
        exact = measure(large, exact_trace, repeats=1, warmup=0)
        estimate = measure(large, projected_trace, repeats=3, warmup=1)
        error = relative_error(estimate["result"], exact["result"])
        print(
            f"{outputs:>6}{size / 1e6:>8.2f}M{exact['seconds']:>11.1f}{exact['peak_mib']:>12.0f}"
            f"{estimate['seconds']:>15.2f}{estimate['peak_mib']:>12.0f}{error:>12.1e}"
        )
    print(
        f"exact: C backward passes per point; estimate: {PROJECTIONS}, whatever C (its time "
        "grows only with the model's size, the output layer being part of every pass)."
    )


if __name__ == "__main__":
    main()
