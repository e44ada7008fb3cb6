import tracemalloc

import numpy as np
import pytest
import torch
from test_kernel import MLP, TiedTransposed, TokenModel, float_points, tokens
from torch import nn
from torch.profiler import ProfilerActivity, profile

from lightning_entk import Spectrum, ntk_spectrum
from lightning_entk.spectrum import choose_route

from reference import brute_force_ntk

ROUTES = ["kernel", "parameter", "matrix_free"]


def model_and_points(name):
    torch.manual_seed(0)
    if name == "tms":
        return TiedTransposed(n=8, m=3).double(), float_points(30, 8).abs()
    if name == "mlp":
        return MLP().double(), float_points(25, 5)
    return TokenModel().double(), tokens(20, 4)


def assert_same_eigenpairs(spectrum, reference, k):
    values = reference.eigenvalues[:k]
    torch.testing.assert_close(spectrum.eigenvalues, values, rtol=1e-10, atol=1e-12 * values[0])
    # Non-degenerate eigenvalues: each eigenvector agrees up to round-off (signs are fixed).
    torch.testing.assert_close(
        spectrum.eigenvectors, reference.eigenvectors[:, :k], rtol=0, atol=1e-8
    )


def test_spectrum_from_kernel_is_descending_float64_and_orthonormal():
    a = float_points(12, 12)
    kernel = (a @ a.T).float()
    spectrum = Spectrum.from_kernel(kernel)
    assert spectrum.eigenvalues.dtype == torch.float64
    assert torch.all(spectrum.eigenvalues[:-1] >= spectrum.eigenvalues[1:])
    vectors = spectrum.eigenvectors
    torch.testing.assert_close(
        vectors.T @ vectors, torch.eye(12, dtype=torch.float64), atol=1e-12, rtol=0
    )
    expected = np.linalg.eigvalsh(kernel.double().numpy())[::-1]
    np.testing.assert_allclose(spectrum.eigenvalues.numpy(), expected, rtol=1e-12, atol=1e-12)
    top = Spectrum.from_kernel(kernel, k=3)
    torch.testing.assert_close(top.eigenvalues, spectrum.eigenvalues[:3], rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(top.eigenvectors, spectrum.eigenvectors[:, :3], rtol=0, atol=1e-10)
    assert Spectrum.from_kernel(kernel, k=3, eigenvectors=False).eigenvectors is None


def test_spectrum_eigenvector_signs_are_fixed():
    a = float_points(8, 8)
    vectors = Spectrum.from_kernel(a @ a.T).eigenvectors
    pivots = vectors.abs().argmax(dim=0)
    assert torch.all(vectors[pivots, torch.arange(8)] > 0)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("mode", ["trace", "flatten"])
@pytest.mark.parametrize("name", ["tms", "mlp", "tokens"])
def test_ntk_spectrum_routes_match_brute_force(name, mode, route):
    model, x = model_and_points(name)
    reference = Spectrum.from_kernel(brute_force_ntk(model, x, mode=mode))
    k = 6
    spectrum = ntk_spectrum(model, x, mode=mode, k=k, route=route)
    assert spectrum.route == route
    assert_same_eigenpairs(spectrum, reference, k)


def test_ntk_spectrum_parameter_route_returns_every_nonzero_eigenvalue():
    model, x = model_and_points("tms")  # P = 3*8 + 8 = 32 parameters, 240 flattened rows
    reference = Spectrum.from_kernel(brute_force_ntk(model, x, mode="flatten"))
    spectrum = ntk_spectrum(model, x, mode="flatten", route="parameter")
    assert spectrum.num_eigenpairs == 32
    torch.testing.assert_close(
        spectrum.eigenvalues,
        reference.eigenvalues[:32],
        rtol=1e-9,
        atol=1e-12 * reference.eigenvalues[0],
    )


def test_ntk_spectrum_auto_route_prefers_parameter_side_when_p_is_small():
    model, x = model_and_points("tms")
    assert ntk_spectrum(model, x, mode="flatten").route == "parameter"
    assert ntk_spectrum(model, x, mode="trace").route == "kernel"


def test_ntk_spectrum_auto_route_is_matrix_free_when_the_kernel_exceeds_the_budget():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 64), nn.Tanh(), nn.Linear(64, 64), nn.Linear(64, 3))
    model = model.double()
    x = float_points(400, 5)
    # 1 MiB: the 400 x 400 float64 kernel (1.2 MiB, ~5 MiB with its working copies) does not
    # fit, nor J (400 x 3 P, P = 4675); Lanczos needs ~0.2 MiB.
    spectrum = ntk_spectrum(model, x, k=6, memory_budget=2**20)
    assert spectrum.route == "matrix_free"
    assert ntk_spectrum(model, x, k=6).route == "kernel"  # the default budget fits the kernel
    assert_same_eigenpairs(spectrum, ntk_spectrum(model, x, k=6, route="kernel"), 6)
    assert_same_eigenpairs(spectrum, Spectrum.from_kernel(brute_force_ntk(model, x)), 6)


@pytest.mark.parametrize("mode", ["trace", "flatten"])
def test_ntk_spectrum_matrix_free_route_never_allocates_kernel_or_jacobian(mode):
    # R = 2000 (trace) or 6000 (flatten) rows, P = 419 parameters: the R x R kernel would be
    # 32 MB or more in one array, the Jacobian (N C P entries) 20 MB; the largest factor
    # (2000 points x 3 outputs x 16) is 0.77 MB. Every array that torch or numpy allocates
    # during the call, factors included, must stay under a quarter of the smaller (5 MB).
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)
    )
    model = model.double()
    x = float_points(2000, 5)
    rows = 2000 * (3 if mode == "flatten" else 1)
    jacobian_bytes = 8 * rows * 419 * (3 if mode == "trace" else 1)
    limit = min(jacobian_bytes, 8 * rows**2) // 4
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        tracemalloc.start()  # numpy's arrays (ARPACK's Lanczos vectors) are traced here
        try:
            spectrum = ntk_spectrum(model, x, mode=mode, k=4, route="matrix_free")
            _, numpy_peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    largest = max(event.self_cpu_memory_usage for event in prof.events())
    assert 0 < largest < limit, f"an array of {largest} bytes (limit {limit})"
    assert numpy_peak < limit, f"numpy peak {numpy_peak} bytes (limit {limit})"
    assert spectrum.eigenvectors.shape == (rows, 4)


def test_choose_route_follows_cost_and_memory():
    gib = 2**30
    # Toy Models of Superposition: 25000 rows, 2050 parameters. Never the 25000^2 kernel.
    assert choose_route(25_000, 2_050, 80, 4, 4 * gib) == "parameter"
    # Modular MLP: 841 points, trace over 29 outputs of 44544 parameters.
    assert choose_route(841, 29 * 44_544, 841, 4, 4 * gib) == "kernel"
    # Many points and many parameters, few eigenpairs: only Lanczos fits.
    assert choose_route(200_000, 10_000_000, 16, 4, 4 * gib) == "matrix_free"
    with pytest.raises(ValueError, match="memory_budget"):
        choose_route(200_000, 10_000_000, 16, 4, 2**20)
    # The kernel route counts its working copies: 4 float32 R x R arrays, or the float32
    # kernel beside its float64 copy, 16 R^2 bytes in all (+ 8 R k for the eigenvectors).
    rows, k = 10_000, 64
    need = 16 * rows**2 + 8 * rows * k
    assert choose_route(rows, 10**8, k, 4, need) == "kernel"
    assert choose_route(rows, 10**8, k, 4, need - 1) == "matrix_free"


def test_spectrum_effective_rank():
    flat = Spectrum(torch.ones(5, dtype=torch.float64))
    assert flat.effective_rank() == pytest.approx(5.0)
    single = Spectrum(torch.tensor([3.0, 0.0, -1e-12], dtype=torch.float64))
    assert single.effective_rank() == pytest.approx(1.0)


def test_spectrum_invalid_inputs():
    model, x = model_and_points("mlp")
    with pytest.raises(ValueError, match="square"):
        Spectrum.from_kernel(torch.ones(3, 4))
    with pytest.raises(ValueError, match="NaN or inf"):
        Spectrum.from_kernel(torch.full((2, 2), float("nan")))
    with pytest.raises(ValueError, match="`k` must be"):
        Spectrum.from_kernel(torch.eye(3), k=4)
    with pytest.raises(ValueError, match="`mode` must be one of"):
        ntk_spectrum(model, x, mode="full")
    with pytest.raises(ValueError, match="`route` must be one of"):
        ntk_spectrum(model, x, route="lanczos")
    with pytest.raises(ValueError, match="needs `k`"):
        ntk_spectrum(model, x, route="matrix_free")
    with pytest.raises(ValueError, match="memory_budget"):
        ntk_spectrum(model, x, memory_budget=0)
