import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from example_modules.modular_arithmetic import ModularArithmeticDataModule, ModularArithmeticMLP
from lightning_entk.cliffs import Cliff, find_cliffs
from lightning_entk.kernel import empirical_ntk


def plateaus(sizes, falls, sigma, seed):
    """Descending plateaus of ``sizes`` eigenvalues, each ``falls[j]`` times below the one before,
    times independent log-normal noise of ``sigma`` (natural-log units)."""
    levels = np.cumprod([1.0, *(1 / f for f in falls)])
    rng = np.random.default_rng(seed)
    return np.sort(np.repeat(levels, sizes) * rng.lognormal(0.0, sigma, sum(sizes)))[::-1].copy()


def ranks(values, **options):
    return [c.rank for c in find_cliffs(values, **options)]


def modular_spectrum(model, x):
    kernel = empirical_ntk(model, x, mode="trace").double()
    return np.linalg.eigvalsh(((kernel + kernel.T) / 2).numpy())[::-1]


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("falls", [(1.5, 2.0, 10.0), (10.0, 1.5, 2.0), (1.3, 1.3, 1.3)])
def test_find_cliffs_finds_planted_cliffs_at_their_ranks(falls, seed):
    values = plateaus([40, 60, 100, 400], falls, sigma=0.02, seed=seed)
    assert ranks(values) == [40, 100, 200]


def test_find_cliffs_reports_fall_and_evidence():
    values = plateaus([30, 50, 200], [2.0, 1.5], sigma=0.01, seed=0)
    first, second = find_cliffs(values)
    for cliff, fall in ((first, 2.0), (second, 1.5)):
        assert cliff.above == values[cliff.rank - 1] and cliff.below == values[cliff.rank]
        assert cliff.drop == pytest.approx(math.log10(cliff.above / cliff.below))
        # The fall between the plateaus, less the spread of their noisy edges.
        assert cliff.drop == pytest.approx(math.log10(fall), abs=0.03)
        assert cliff.score >= 8.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.rank = 3
    assert Cliff(**dataclasses.asdict(first)) == first


def test_find_cliffs_noise_free_plateaus_and_their_cliffs():
    values = np.repeat([1.0, 0.5, 0.25], [10, 10, 10])
    assert ranks(values) == [10, 20]
    assert ranks(np.ones(50)) == []


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("sigma", [0.0, 0.01, 0.05, 0.1])
@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 4.0])
def test_find_cliffs_none_in_smooth_power_laws(alpha, sigma, seed):
    rng = np.random.default_rng(seed)
    index = np.arange(1, 1001, dtype=float)
    values = np.sort(index**-alpha * rng.lognormal(0.0, sigma, index.size))[::-1]
    assert ranks(values) == []


@pytest.mark.parametrize("seed", range(3))
def test_find_cliffs_none_in_smooth_decays_and_random_matrices(seed):
    rng = np.random.default_rng(seed)
    index = np.arange(1000, dtype=float)
    assert ranks(np.sort(np.exp(-index / 100) * rng.lognormal(0.0, 0.05, 1000))[::-1]) == []
    x = rng.standard_normal((500, 750))
    assert ranks(np.linalg.eigvalsh(x @ x.T)[::-1]) == []  # Marchenko-Pastur


@pytest.mark.parametrize("tail", [1e-16, 1e-8])
@pytest.mark.parametrize("signed", [True, False])
def test_find_cliffs_ignores_the_numerical_rank_edge(tail, signed):
    """Eigenvalues past the rank are round-off of float64 (1e-16 of the top) or float32 (1e-8),
    scattered about zero or clipped at it; the fall into them is no cliff, while a real cliff
    just before the edge still is."""
    rng = np.random.default_rng(0)
    values = plateaus([60, 60], [3.0], sigma=0.02, seed=1)
    noise = tail * values[0] * rng.standard_normal(400)
    noise = noise if signed else np.abs(noise)
    assert ranks(np.sort(np.concatenate([values, noise]))[::-1]) == [60]
    smooth = np.arange(1, 121, dtype=float) ** -1.0
    assert ranks(np.sort(np.concatenate([smooth, noise]))[::-1]) == []


def test_find_cliffs_negative_eigenvalues_raise_the_round_off_floor():
    """A tail at 1e-4 of the top is above ``rtol``; its negative half shows it is round-off."""
    rng = np.random.default_rng(0)
    noise = 1e-4 * rng.standard_normal(200)
    values = np.sort(np.concatenate([plateaus([50], [], sigma=0.02, seed=0), noise]))[::-1]
    assert ranks(values) == []
    assert ranks(np.clip(values, 0, None)) == [50]  # without the negatives, nothing to tell
    assert ranks(values, rtol=1e-3) == []


def test_find_cliffs_top_eigenvalue_alone_is_not_a_cliff():
    values = np.concatenate([[20.0], plateaus([56, 200], [2.0], sigma=0.01, seed=0)])
    assert ranks(values) == [57]
    assert ranks(values, min_plateau=1) == [1, 57]


def test_find_cliffs_options_set_the_bar():
    values = np.repeat([1.0, 1 / 1.05, 1 / 1.05**2], 20)
    assert ranks(values) == []  # a 1.05x fall is below the default min_drop (1.1x)
    assert ranks(values, min_drop=0.01) == [20, 40]
    values = plateaus([40, 40], [1.5], sigma=0.05, seed=0)
    score = find_cliffs(values)[0].score
    assert ranks(values, significance=score * 1.01) == []
    assert ranks(values, min_plateau=41) == []


def test_find_cliffs_one_cliff_per_fall():
    """A fall in two steps, 3x then 1.5x, is reported once, where it is steepest."""
    values = np.concatenate([np.ones(30), [1 / 3], np.full(30, 1 / 4.5)])
    assert ranks(values) == [30]
    assert ranks(values, min_plateau=1) == [30, 31]


def test_find_cliffs_accepts_tensors_lists_and_round_off_disorder():
    values = plateaus([20, 20], [2.0], sigma=0.01, seed=0)
    tensor = torch.tensor(values, dtype=torch.float32, requires_grad=True)
    assert ranks(tensor) == ranks(list(values)) == [20]
    jittered = values.copy()
    jittered[26] = jittered[25] + 1e-9  # out of order by far less than the round-off floor
    assert ranks(jittered) == [20]


@pytest.mark.parametrize("values", [[], [0.0] * 10, [1.0, 0.5, 0.25], [1.0] * 7])
def test_find_cliffs_empty_zero_or_short_spectra(values):
    assert find_cliffs(values) == []


@pytest.mark.parametrize(
    ("values", "options", "match"),
    [
        (np.eye(3), {}, r"`eigenvalues` must be 1-D .* got shape \(3, 3\)"),
        ([3.0, np.nan, 1.0], {}, r"`eigenvalues` must be finite, got nan at index 1"),
        ([np.inf, 1.0], {}, r"`eigenvalues` must be finite"),
        (np.array([2.0, 1.0j]), {}, r"`eigenvalues` must be real"),
        (["a", "b"], {}, r"`eigenvalues` must be real"),
        ([1.0, 2.0, 3.0], {}, r"descending order.*index 0.*values\[::-1\]"),
        ([1.0], {"significance": 1.0}, r"`significance` must be a number > 1, got 1.0"),
        ([1.0], {"significance": math.nan}, r"`significance` must be a number > 1, got nan"),
        ([1.0], {"significance": "8"}, r"`significance` must be a number > 1, got '8'"),
        ([1.0], {"min_drop": -0.1}, r"`min_drop` must be a number >= 0, got -0.1"),
        ([1.0], {"window": 0}, r"`window` must be an int >= 1, got 0"),
        ([1.0], {"window": 2.5}, r"`window` must be an int >= 1, got 2.5"),
        ([1.0], {"min_plateau": True}, r"`min_plateau` must be an int >= 1, got True"),
        ([1.0], {"rtol": 1.0}, r"`rtol` must be a number in \[0, 1\), got 1.0"),
        ([1.0], {"rtol": -1e-6}, r"`rtol` must be a number in \[0, 1\), got -1e-06"),
    ],
)
def test_find_cliffs_rejects_invalid_input(values, options, match):
    with pytest.raises(ValueError, match=match):
        find_cliffs(values, **options)


@pytest.mark.parametrize("seed", range(3))
def test_find_cliffs_modular_mlp_at_initialization(seed):
    """One top mode, 56 Fourier modes of a and b, then the cliff (docs/design.md)."""
    torch.manual_seed(seed)
    model = ModularArithmeticMLP(p=29, hidden=512)
    x, _ = ModularArithmeticDataModule(p=29).grid()
    assert ranks(modular_spectrum(model, x)) == [57]


class TinySuperposition(nn.Module):
    def __init__(self, n: int, m: int):
        super().__init__()
        self.W = nn.Parameter(nn.init.xavier_normal_(torch.empty(m, n)))
        self.b = nn.Parameter(torch.zeros(n))

    def forward(self, x):
        return F.relu(x @ self.W.T @ self.W + self.b)


def test_find_cliffs_flattened_kernel_in_float32_has_no_cliff_at_its_rank():
    """The flattened eNTK of ``y = ReLU(W^T W x + b)`` has rank <= P = m n + n = 120 of its 1000
    rows; computed in float32, the rest is round-off at ~1e-8 of the top."""
    torch.manual_seed(0)
    n, m = 20, 5
    model = TinySuperposition(n, m)
    x = torch.rand(50, n) * (torch.rand(50, n) > 0.3)
    x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        optimizer.zero_grad()
        ((model(x) - x).square() * 0.8 ** torch.arange(n)).mean().backward()
        optimizer.step()
    kernel = empirical_ntk(model, x, mode="flatten").double()
    values = np.linalg.eigvalsh(((kernel + kernel.T) / 2).numpy())[::-1]
    rank = int(np.count_nonzero(values > 1e-6 * values[0]))
    assert rank <= m * n + n
    assert values[rank] < 1e-7 * values[0]  # the edge is a fall of several decades
    assert all(c.rank < rank - 3 for c in find_cliffs(values))
    assert ranks(values, min_plateau=1, rtol=1e-12) == ranks(values, min_plateau=1)


@pytest.mark.slow
def test_find_cliffs_modular_mlp_second_cliff_appears_with_grokking():
    """Trained as in docs/design.md, the model groks; the cliff at 113 (families a+b, a-b)
    joins the one at 57 once validation accuracy has jumped, and stays."""
    torch.manual_seed(0)
    p = 29
    data = ModularArithmeticDataModule(p=p, train_fraction=0.7, seed=0)
    model = ModularArithmeticMLP(p=p, hidden=512)
    x, y = data.grid()
    train, val = data.train_indices, data.val_indices
    targets = F.one_hot(y, p).float()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.01)
    history = []  # (epoch, validation accuracy, cliff ranks)
    for epoch in range(301):
        if epoch % 10 == 0:
            with torch.no_grad():
                accuracy = (model(x[val]).argmax(dim=1) == y[val]).float().mean().item()
            history.append((epoch, accuracy, ranks(modular_spectrum(model, x))))
        optimizer.zero_grad()
        F.mse_loss(model(x[train]), targets[train]).backward()
        optimizer.step()
    assert history[-1][1] > 0.95
    assert all(found in ([57], [57, 113]) for _, _, found in history)
    assert all(found == [57] for _, accuracy, found in history if accuracy < 0.5)
    first = next(epoch for epoch, _, found in history if found == [57, 113])
    assert first <= 150
    assert all(found == [57, 113] for epoch, _, found in history if epoch >= first)
