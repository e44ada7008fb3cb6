"""The label signals, each against its definition computed directly."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from lightning_entk.signals import (
    ROUND_OFF_RTOL,
    debiased_alignment,
    kernel_regression_accuracy,
    kernel_target_alignment,
    kernel_velocity,
)


def test_kernel_regression_is_equation_one_on_a_full_rank_kernel():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(40, 60, generator=generator, dtype=torch.float64)
    kernel = features @ features.T
    labels = torch.randint(0, 3, (40,), generator=generator)
    targets = F.one_hot(labels).double()
    heldout = torch.arange(40) % 4 == 0
    train = ~heldout
    predictions = kernel[heldout][:, train] @ torch.linalg.solve(
        kernel[train][:, train], targets[train]
    )
    expected = (predictions.argmax(1) == labels[heldout]).double().mean().item()
    assert 0 < expected < 1  # labels at random: some right, some wrong
    actual = kernel_regression_accuracy(
        kernel, targets, heldout, rtol=ROUND_OFF_RTOL[torch.float64]
    )
    assert actual == expected


def test_kernel_regression_ignores_round_off_of_a_low_rank_float32_kernel():
    """32 features of 400 points (a layer narrower than the probe set): the kernel has rank 32.
    Formed in float32, its other 368 eigenvalues are round-off, which an inverse (or a ridge far
    below round-off) turns into noise: this accuracy was 0.135 with a ridge of 1e-8.
    Without those directions it is that of the same kernel formed in float64."""
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(400, 32, generator=generator)
    labels = (features.double() @ torch.randn(32, 10, generator=generator).double()).argmax(1)
    targets = F.one_hot(labels).double()
    heldout = torch.arange(400) % 2 == 0
    exact = kernel_regression_accuracy(
        features.double() @ features.double().T,
        targets,
        heldout,
        rtol=ROUND_OFF_RTOL[torch.float64],
    )
    float32 = (features @ features.T).double()  # formed in float32, handed over in float64
    assert exact > 0.5  # chance: about 0.1
    assert kernel_regression_accuracy(float32, targets, heldout) == exact


def test_kernel_velocity_ignores_scale_and_measures_direction():
    kernel = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    assert kernel_velocity(kernel, 7.0 * kernel) == pytest.approx(0.0, abs=1e-15)
    first, second = torch.diag(torch.tensor([1.0, 0.0])), torch.diag(torch.tensor([0.0, 1.0]))
    assert kernel_velocity(first, second) == pytest.approx(math.sqrt(2))


def _hsic_u_statistic(k: torch.Tensor, ell: torch.Tensor) -> float:
    """Unbiased HSIC by its definition: the mean over ordered 4-tuples of distinct points of
    ``k_ij l_ij + k_ij l_qr - 2 k_ij l_iq`` (Song et al. 2012, section 2.2)."""
    n = k.shape[0]
    total = sum(
        k[i, j] * ell[i, j] + k[i, j] * ell[q, r] - 2 * k[i, j] * ell[i, q]
        for i, j, q, r in itertools.permutations(range(n), 4)
    )
    return float(total) / math.perm(n, 4)


def test_debiased_alignment_matches_the_u_statistic_by_brute_force():
    generator = torch.Generator().manual_seed(3)
    targets = F.one_hot(torch.randint(0, 3, (9,), generator=generator), 3).double()
    features = torch.randn(9, 4, generator=generator, dtype=torch.float64)
    kernel = features @ features.T + targets @ targets.T
    ideal = targets @ targets.T
    expected = _hsic_u_statistic(kernel, ideal) / math.sqrt(
        _hsic_u_statistic(kernel, kernel) * _hsic_u_statistic(ideal, ideal)
    )
    assert debiased_alignment(kernel, targets) == pytest.approx(expected, rel=1e-12)
    assert debiased_alignment(ideal, targets) == pytest.approx(1.0, rel=1e-12)
    assert debiased_alignment(kernel.float(), targets.float()) == pytest.approx(expected, rel=1e-5)


def test_debiased_alignment_of_an_unrelated_kernel_is_near_zero_at_any_size():
    """The biased alignment of random features falls like 1/N; the debiased one stays near 0."""
    generator = torch.Generator().manual_seed(4)
    biased, debiased = [], []
    for n in (64, 512):
        targets = F.one_hot(torch.randint(0, 10, (n,), generator=generator), 10).double()
        features = torch.randn(n, 8, generator=generator, dtype=torch.float64)
        biased.append(kernel_target_alignment(features @ features.T, targets))
        debiased.append(debiased_alignment(features @ features.T, targets))
    assert biased[0] > 4 * biased[1] > 0  # the bias: ~8x from 64 to 512 points
    assert max(abs(a) for a in debiased) < biased[1] < 0.05


def test_debiased_alignment_needs_four_points():
    with pytest.raises(ValueError, match="needs >= 4 points, got 3"):
        debiased_alignment(torch.eye(3), torch.eye(3))


def test_kernel_target_alignment_is_the_centred_cosine_with_the_ideal_kernel():
    generator = torch.Generator().manual_seed(2)
    targets = F.one_hot(torch.randint(0, 5, (300,), generator=generator)).double()
    features = torch.randn(300, 50, generator=generator, dtype=torch.float64)
    kernel = features @ features.T + 3 * targets @ targets.T
    centring = torch.eye(300, dtype=torch.float64) - 1 / 300
    a, b = centring @ kernel @ centring, centring @ targets @ targets.T @ centring
    expected = (a * b).sum() / (a.norm() * b.norm())
    assert kernel_target_alignment(kernel, targets) == pytest.approx(expected.item(), rel=1e-12)
    assert kernel_target_alignment(targets @ targets.T, targets) == pytest.approx(1.0, rel=1e-12)
