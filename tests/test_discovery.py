"""What the engine learns about a model is kept across calls while the model is unchanged: a
second call pays no discovery and stays exact; a change of code, parameters, points' shapes or
options is noticed and discovered afresh. Points the model cannot take are named."""

import pytest
import torch
from torch import nn

from lightning_entk import empirical_ntk, ntk_plan
from lightning_entk.kernel import context

from reference import brute_force_ntk, double


@pytest.fixture
def discoveries(monkeypatch):
    """Counts the discoveries (first forward passes under a capture) the engine makes."""
    made = []
    original = context.NTKContext._choose_capture

    def counted(self, found, sample):
        made.append(self.names)
        return original(self, found, sample)

    monkeypatch.setattr(context.NTKContext, "_choose_capture", counted)
    return made


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return double(nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3)))


def test_empirical_ntk_second_call_reuses_discovery_and_stays_exact(discoveries):
    model = mlp()
    x = torch.randn(7, 5, dtype=torch.float64)
    for points in (x, x[:4] * 2, torch.randn(9, 5, dtype=torch.float64)):
        torch.testing.assert_close(
            empirical_ntk(model, points), brute_force_ntk(model, points), rtol=1e-10, atol=0
        )
    assert len(discoveries) == 1
    with torch.no_grad():  # training changes values, not operations: still known
        model[0].weight.mul_(1.5)
    torch.testing.assert_close(
        empirical_ntk(model, x), brute_force_ntk(model, x), rtol=1e-10, atol=0
    )
    assert len(discoveries) == 1
    empirical_ntk(model, x, params=["2.weight"])  # another selection: its own discovery
    empirical_ntk(model, x, params=["2.weight"])
    assert len(discoveries) == 2


def test_empirical_ntk_discovers_again_when_the_model_changes(discoveries):
    model = mlp()
    x = torch.randn(6, 5, dtype=torch.float64)
    empirical_ntk(model, x)
    model[1] = nn.ReLU()  # new code
    torch.testing.assert_close(
        empirical_ntk(model, x), brute_force_ntk(model, x), rtol=1e-10, atol=0
    )
    model[0].bias.requires_grad_(False)  # another parameter set
    torch.testing.assert_close(
        empirical_ntk(model, x), brute_force_ntk(model, x), rtol=1e-10, atol=0
    )
    handle = model[0].register_forward_hook(lambda m, i, out: out * 2)  # a hook changes outputs
    torch.testing.assert_close(
        empirical_ntk(model, x), brute_force_ntk(model, x), rtol=1e-10, atol=0
    )
    handle.remove()
    model[2] = double(nn.Linear(16, 4))  # new shapes
    torch.testing.assert_close(
        empirical_ntk(model, x), brute_force_ntk(model, x), rtol=1e-10, atol=0
    )
    assert len(discoveries) == 5


class MeanOfEmbeddings(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, tokens):
        return self.head(self.embed(tokens).mean(1))


def test_empirical_ntk_discovers_again_for_points_of_another_shape(discoveries):
    torch.manual_seed(0)
    model = double(MeanOfEmbeddings())
    short, long = torch.randint(0, 10, (5, 2)), torch.randint(0, 10, (4, 3))
    for tokens in (short, short.flip(1), long, short):
        torch.testing.assert_close(
            empirical_ntk(model, tokens), brute_force_ntk(model, tokens), rtol=1e-10, atol=0
        )
    assert len(discoveries) == 2  # two token lengths
    assert ntk_plan(model, long).capture == "batched"  # the plan reads what was learned
    assert len(discoveries) == 2


@pytest.mark.parametrize(
    ("points", "described"),
    [
        (torch.randn(5, 9), r"a tensor \(5, 9\) float32"),
        (torch.ones(5, 5, dtype=torch.long), r"a tensor \(5, 5\) int64"),
    ],
    ids=["wrong feature size", "integer dtype"],
)
def test_empirical_ntk_points_the_model_cannot_take_are_named(points, described):
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    with pytest.raises(ValueError, match=f"could not be called on the points \\({described}\\)"):
        empirical_ntk(model, points)


def test_a_readouts_kernel_takes_its_shared_output_gradients(monkeypatch):
    """A linear readout's output gradients are the same at every point: its kernel is a
    multiple of its inputs' Gram, exact, without a Gram of the output gradients."""
    from lightning_entk.kernel import factors

    shared = []
    original = factors._shared_output_gram
    monkeypatch.setattr(
        factors, "_shared_output_gram", lambda g1, g2: shared.append(original(g1, g2)) or shared[-1]
    )
    model = mlp()
    x = torch.randn(9, 5, dtype=torch.float64)
    torch.testing.assert_close(
        empirical_ntk(model, x, params=["2.weight", "2.bias"]),
        brute_force_ntk(model, x, names=["2.weight", "2.bias"]),
        rtol=1e-12,
        atol=0,
    )
    assert shared and all(s is not None for s in shared)
    shared.clear()
    empirical_ntk(model, x, params=["0.weight"])  # behind the tanh: a gradient per point
    assert shared and all(s is None for s in shared)
