"""The random-projection estimate of the trace kernel (``output_projections``): exact cases
against the brute-force reference, unbiasedness and variance against the docstring's formula."""

import itertools
import math

import pytest
import torch
from test_kernel import CASES, MLP, assert_relative_close, float_points
from torch import nn

from lightning_entk import Spectrum, empirical_ntk, ntk_spectrum
from lightning_entk.kernel.context import num_outputs
from lightning_entk.kernel.options import projection_matrix

from reference import brute_force_ntk

METHODS = ["structured", "jacobian"]


def model_and_points(name):
    make_model, make_x1, make_x2 = CASES[name]
    torch.manual_seed(0)
    return make_model().double(), make_x1(), make_x2()


def projection_variance(full):
    """Per-entry variance of the estimate from one Rademacher projection (s = 1), by the
    docstring's formula ``sum_{c != d} (K_cd^2 + K_cd K_dc)``, for a ``full`` kernel block
    (N1, N2, C, C)."""
    diagonal = torch.diagonal(full, dim1=-2, dim2=-1)
    squares = (full**2).sum(dim=(-2, -1)) - (diagonal**2).sum(dim=-1)
    crossed = (full * full.transpose(-2, -1)).sum(dim=(-2, -1)) - (diagonal**2).sum(dim=-1)
    return squares + crossed


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    "name", ["mlp_tanh_gelu_bias", "conv2d", "embedding_tied", "layernorm_free_parameter"]
)
def test_output_projections_orthogonal_basis_is_exact(name, method):
    # sum_r (q_r . J)(q_r . J')^T = trace(Q^T J J'^T Q) = trace(J J'^T) for orthogonal Q.
    model, x1, x2 = model_and_points(name)
    c = model(x1[:1]).shape[-1]
    rotation, _ = torch.linalg.qr(float_points(c, c, seed=3))
    for basis in (torch.eye(c, dtype=torch.float64), rotation):
        assert_relative_close(
            empirical_ntk(model, x1, output_projections=basis, method=method),
            brute_force_ntk(model, x1),
        )
        assert_relative_close(
            empirical_ntk(model, x1, x2, output_projections=basis, method=method),
            brute_force_ntk(model, x1, x2),
        )


@pytest.mark.parametrize("projections", [None, 5, "tensor"])
def test_projection_columns_split_the_trace_kernel_into_parts_that_sum_to_it(projections):
    """How several processes share the trace kernel: each takes some columns of
    ``projection_matrix`` (the identity's for the exact kernel), and the parts add up."""
    model, x1, _ = model_and_points("mlp_tanh_gelu_bias")
    c = num_outputs(model, x1)
    if projections == "tensor":
        projections = float_points(c, 4, seed=5)
    columns = projection_matrix(c, projections, dtype=torch.float64)
    whole = empirical_ntk(model, x1, output_projections=projections)
    if projections is None:
        assert torch.equal(columns, torch.eye(c, dtype=torch.float64))
        assert_relative_close(whole, brute_force_ntk(model, x1))
    else:  # the same projections as empirical_ntk draws or takes itself
        assert torch.equal(empirical_ntk(model, x1, output_projections=columns), whole)
    parts = [
        empirical_ntk(model, x1, output_projections=share)
        for share in columns.tensor_split(3, dim=1)
    ]
    assert_relative_close(sum(parts), whole, rtol=1e-13)


def test_projection_matrix_rejects_a_tensor_with_the_wrong_rows():
    with pytest.raises(ValueError, match="has 3 rows but the model has C = 4"):
        projection_matrix(4, torch.ones(3, 2))


@pytest.mark.parametrize("method", METHODS)
def test_output_projections_single_output_is_exact(method):
    # C = 1: every projection is +-1/sqrt(s), so the s squared projections sum to 1 exactly.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 1)).double()
    x = float_points(6, 5)
    for s in (1, 5):
        assert_relative_close(
            empirical_ntk(model, x, output_projections=s, method=method), brute_force_ntk(model, x)
        )


def all_sign_patterns(c):
    return torch.tensor(list(itertools.product([-1.0, 1.0], repeat=c)), dtype=torch.float64).T


@pytest.mark.parametrize("method", METHODS)
def test_output_projections_mean_over_every_sign_pattern_is_exact(method):
    # The average of the one-projection estimate over all 2^C equally likely Rademacher
    # vectors is its expectation, exactly: unbiasedness holds to round-off, not in the limit.
    model, x1, x2 = model_and_points("mlp_tanh_gelu_bias")
    signs = all_sign_patterns(3)  # (C, 2^C)
    averaged = signs / math.sqrt(signs.shape[1])  # sum over columns = mean of the estimates
    assert_relative_close(
        empirical_ntk(model, x1, x2, output_projections=averaged, method=method),
        brute_force_ntk(model, x1, x2),
    )


def test_output_projections_variance_formula_is_exact():
    # Var over the 2^C equally likely sign vectors, computed by enumeration, against the
    # docstring's formula evaluated on the brute-force full kernel.
    model, x1, x2 = model_and_points("mlp_tanh_gelu_bias")
    signs = all_sign_patterns(3)
    estimates = torch.stack(
        [empirical_ntk(model, x1, x2, output_projections=v[:, None]) for v in signs.T]
    )
    exact = brute_force_ntk(model, x1, x2)
    enumerated = ((estimates - exact) ** 2).mean(dim=0)
    assert_relative_close(enumerated, projection_variance(brute_force_ntk(model, x1, x2, "full")))


def test_output_projections_same_seed_same_estimate_generic_and_structured_agree():
    model, x1, x2 = model_and_points("layernorm_free_parameter")  # generic + structured blocks
    structured = empirical_ntk(model, x1, x2, output_projections=2, projection_seed=7)
    generic = empirical_ntk(
        model, x1, x2, output_projections=2, projection_seed=7, method="jacobian"
    )
    assert_relative_close(generic, structured)
    again = empirical_ntk(model, x1, x2, output_projections=2, projection_seed=7)
    assert torch.equal(again, structured)
    other = empirical_ntk(model, x1, x2, output_projections=2, projection_seed=8)
    assert not torch.allclose(other, structured)


def test_output_projections_seed_average_converges_within_the_variance_bound():
    # The mean over M seeds of s projections each has error E = ||mean - K||_F^2 with
    # E[E] = sum_ij Var_ij / (M s) (docstring formula). The error matrix is a Rademacher chaos
    # of degree 2, so by hypercontractivity (Bonami: ||Z||_4 <= 3 ||Z||_2) E[E^2] <= 81 E[E]^2
    # and P(E > a E[E]) <= 81 / a^2: with a = 300, below 0.1% for a random choice of seeds.
    # Chunks of 2 points check that every chunk (and x1 and x2) shares the projections.
    model, x1, x2 = model_and_points("mlp_tanh_gelu_bias")
    seeds, s = 64, 16
    mean = (
        sum(
            empirical_ntk(model, x1, x2, output_projections=s, projection_seed=seed, batch_size=2)
            for seed in range(seeds)
        )
        / seeds
    )
    exact = brute_force_ntk(model, x1, x2)
    expected_error = projection_variance(brute_force_ntk(model, x1, x2, "full")).sum() / (seeds * s)
    error = ((mean - exact) ** 2).sum()
    assert error <= 300 * expected_error, f"{error:.3e} vs expected {expected_error:.3e}"
    # And the bound is informative: far below the kernel itself.
    assert 300 * expected_error < 0.05 * (exact**2).sum()


def test_output_projections_error_matches_the_variance_with_many_outputs():
    # 2000 outputs, 32 projections. Each estimate's squared relative Frobenius error has the
    # expectation predicted by the docstring's variance. Its entries are sums over ~C^2 sign
    # products, close to Gaussian, for which Var[error] <= 2 E[error]^2; the mean over
    # M = 64 seeds is then within 4 standard deviations, 4 sqrt(2 / 64) = 0.71 E[error], of
    # the prediction (a Gaussian 4-sigma event: 6e-5).
    torch.manual_seed(0)
    c, s, seeds = 2000, 32, 64
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, c)).double()
    x = float_points(3, 4)
    exact = empirical_ntk(model, x)  # the structured engine, tested against brute force above
    # The head adds delta_cd (h(x).h(x') + 1) to K_cd: nothing off the class diagonal, where
    # all the variance is, so the first layer's full kernel gives the variance (C x 16 factors
    # rather than C x C).
    first = ["0.weight", "0.bias"]
    variance = torch.cat(
        [
            projection_variance(empirical_ntk(model, x[i : i + 1], x, mode="full", params=first))
            for i in range(len(x))
        ]
    )
    squared_norm = (exact**2).sum()
    predicted = float(variance.sum() / s / squared_norm)
    errors = [
        float(
            ((empirical_ntk(model, x, output_projections=s, projection_seed=i) - exact) ** 2).sum()
        )
        / squared_norm
        for i in range(seeds)
    ]
    ratio = sum(errors) / seeds / predicted
    assert abs(ratio - 1) <= 4 * math.sqrt(2 / seeds), f"observed / predicted = {ratio:.2f}"
    assert predicted < 1e-3  # the estimate is useful here: ~3% relative error or less


def test_ntk_spectrum_with_output_projections_is_the_estimate_spectrum():
    torch.manual_seed(0)
    model = MLP().double()
    x = float_points(25, 5)
    estimate = empirical_ntk(model, x, output_projections=2, projection_seed=3)
    reference = Spectrum.from_kernel(estimate)
    for route in ("kernel", "matrix_free"):
        spectrum = ntk_spectrum(model, x, k=5, route=route, output_projections=2, projection_seed=3)
        torch.testing.assert_close(
            spectrum.eigenvalues,
            reference.eigenvalues[:5],
            rtol=1e-10,
            atol=1e-12 * reference.eigenvalues[0],
        )
        torch.testing.assert_close(
            spectrum.eigenvectors, reference.eigenvectors[:, :5], rtol=0, atol=1e-8
        )


def test_output_projections_do_not_consume_global_rng():
    torch.manual_seed(0)
    model = MLP()
    x = torch.randn(4, 5)
    state = torch.get_rng_state()
    empirical_ntk(model, x, output_projections=4)
    assert torch.equal(state, torch.get_rng_state())


def test_output_projections_invalid_inputs():
    torch.manual_seed(0)
    model = MLP()
    x = torch.randn(4, 5)
    with pytest.raises(ValueError, match="needs mode='trace'"):
        empirical_ntk(model, x, mode="full", output_projections=4)
    with pytest.raises(ValueError, match="needs mode='trace'"):
        ntk_spectrum(model, x, mode="flatten", output_projections=4)
    for bad in (0, -2, 2.5, True, "4"):
        with pytest.raises(ValueError, match="`output_projections` must be"):
            empirical_ntk(model, x, output_projections=bad)
    with pytest.raises(ValueError, match=r"must be float \(C, s\)"):
        empirical_ntk(model, x, output_projections=torch.ones(3))
    with pytest.raises(ValueError, match="C = 3 outputs"):
        empirical_ntk(model, x, output_projections=torch.ones(4, 2))
    with pytest.raises(ValueError, match="`projection_seed` must be an int"):
        empirical_ntk(model, x, output_projections=4, projection_seed=1.5)
