"""Per-group kernels: one pass, summing to the whole kernel, each equal to the kernel of its
parameters alone, in every mode, on the structured, column and generic routes."""

import pytest
import torch
from test_kernel import MODES, assert_relative_close
from torch import nn
from user_models import MHAClassifier, RawTransformer

from example_modules.modular_arithmetic import ModularArithmeticMLP
from example_modules.modular_transformer import ModularTransformer
from lightning_entk import empirical_ntk, ntk_spectrum
from lightning_entk.kernel.options import automatic_groups


class WithOpaque(nn.Module):
    """Structured layers around two parameters no rule covers (``tanh(W)``, ``exp(s)``)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 6)
        self.W = nn.Parameter(torch.randn(6, 6) / 3)
        self.s = nn.Parameter(torch.zeros(6))
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x)) @ torch.tanh(self.W)
        return self.out(torch.sin(h * torch.exp(self.s)))


def cases():
    torch.manual_seed(0)
    transformer = RawTransformer(tied=True).double()
    tokens = torch.randint(0, 13, (5, 4))
    groups = {"embed": ["W_E", "W_pos"], "attention": lambda n: n in ("W_Q", "W_K", "W_V")}
    opaque = WithOpaque().double()
    x = torch.randn(5, 4, dtype=torch.float64)
    return {
        "transformer": (transformer, tokens, groups),
        "opaque_by_module": (opaque, x, "modules"),
        "opaque_by_callable": (opaque, x, lambda n: "free" if n in ("W", "s") else "layers"),
        "opaque_automatic": (opaque, x, "auto"),
    }


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "case", ["transformer", "opaque_by_module", "opaque_by_callable", "opaque_automatic"]
)
def test_group_kernels_sum_to_the_kernel_and_equal_their_parameters_alone(case, mode):
    model, x, groups = cases()[case]
    x2 = x[:3]
    parts = empirical_ntk(model, x, x2, mode=mode, groups=groups)
    whole = empirical_ntk(model, x, x2, mode=mode)
    assert_relative_close(sum(parts.values()), whole)
    names = [n for n, _ in model.named_parameters()]
    for group, kernel in parts.items():
        members = [n for n in names if _group(groups, n) == group]
        assert_relative_close(kernel, empirical_ntk(model, x, x2, mode=mode, params=members))


def _group(groups, name):
    if groups == "auto":
        return {"inp.weight": "inp", "inp.bias": "inp", "W": "(model)", "s": "(model)"}.get(
            name, "out"
        )
    if groups == "modules":
        return name.split(".", 1)[0]
    if callable(groups):
        return groups(name)
    for group, members in groups.items():
        if members(name) if callable(members) else name in members:
            return group
    return "other"


def test_group_kernels_invalid_groups():
    model, x, _ = cases()["opaque_by_module"]
    with pytest.raises(ValueError, match="`groups` must be None, 'modules'"):
        empirical_ntk(model, x, groups=3)
    with pytest.raises(ValueError, match="which the model does not have"):
        empirical_ntk(model, x, groups={"a": ["nope"]})
    with pytest.raises(ValueError, match="is in two groups"):
        empirical_ntk(model, x, groups={"a": ["W"], "b": ["W", "s"]})


def test_group_spectra_are_the_spectra_of_the_group_kernels():
    model, x, groups = cases()["transformer"]
    spectra = ntk_spectrum(model, x, k=3, groups=groups)
    kernels = empirical_ntk(model, x, groups=groups)
    assert sorted(spectra) == sorted(kernels) == ["attention", "embed", "other"]
    for group, kernel in kernels.items():
        expected = torch.linalg.eigvalsh(kernel).flip(0)[:3]
        torch.testing.assert_close(spectra[group].eigenvalues, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        (ModularArithmeticMLP(), ["layer1", "layer2"]),
        (ModularTransformer(), ["body", "embed", "unembed"]),  # 9 top-level modules
        (MHAClassifier(), ["attn", "embed", "head"]),  # attention's own weights stay whole
        (
            nn.ModuleDict({"net": nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 2))}),
            ["net.0", "net.1"],
        ),
    ],
    ids=["mlp", "transformer", "attention", "wrapper"],
)
def test_automatic_groups_follow_the_model_parts_and_stay_few(model, expected):
    names = [n for n, _ in model.named_parameters()]
    groups = automatic_groups(model, names)
    assert sorted(set(groups.values())) == expected
    assert set(groups) == set(names)
