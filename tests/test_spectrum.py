import numpy as np
import pytest
import torch
from reference import brute_force_ntk
from test_kernel import MLP, TiedTransposed, TokenModel, float_points, tokens

from lightning_entk import Spectrum, ntk_spectrum
from lightning_entk.spectrum import choose_route

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
