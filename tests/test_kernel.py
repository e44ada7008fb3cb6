import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_entk import empirical_ntk
from lightning_entk.kernel.context import num_outputs

from reference import brute_force_ntk

MODES = ["trace", "full", "diagonal", "flatten"]
METHODS = ["structured", "jacobian"]
RTOL = 1e-10  # float64 throughout: agreement to round-off, far inside the 1e-6 contract


def assert_relative_close(actual, expected, rtol=RTOL):
    err = torch.linalg.vector_norm(actual - expected) / torch.linalg.vector_norm(expected)
    assert actual.shape == expected.shape
    assert err < rtol, f"relative error {err:.2e}"


class MLP(nn.Module):
    def __init__(self, act=nn.Tanh):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 7), act(), nn.Linear(7, 6), nn.GELU())
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.body(x))


class WithLayerNormAndFreeParameter(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 8)
        self.norm = nn.LayerNorm(8)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 3))
        self.out = nn.Linear(8, 3, bias=False)

    def forward(self, x):
        return self.out(torch.tanh(self.norm(self.lin(x)))) * self.scale


class Conv2dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, kernel_size=3, padding=1, stride=2)
        self.conv2 = nn.Conv2d(3, 2, kernel_size=(2, 3), dilation=(1, 2), bias=False)
        self.head = nn.Linear(2 * 3 * 1, 4)

    def forward(self, x):
        h = torch.tanh(self.conv(x))
        return self.head(torch.tanh(self.conv2(h)).flatten(1))


class Conv1dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 4, kernel_size=3, padding=2, dilation=2)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x)).mean(-1))


class TokenModel(nn.Module):
    """Embedding on tokens, a Linear over the sequence, and an output head tied to the
    embedding (``head.weight is embed.weight``)."""

    def __init__(self, vocab=11, dim=6, tied=True, padding_idx=None):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=padding_idx)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        if tied:
            self.head.weight = self.embed.weight

    def forward(self, tokens):
        h = torch.tanh(self.mix(self.embed(tokens)))  # (N, T, dim): Linear over a sequence
        return self.head(h.mean(1))


class UsedTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 6)
        self.shared = nn.Linear(6, 6)
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        h = torch.tanh(self.shared(torch.tanh(self.inp(x))))
        return self.out(torch.tanh(self.shared(h)))


class FunctionalReuse(nn.Module):
    """``lin.weight`` is also used outside ``lin``'s forward: the hooks cannot see that use."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.lin(x))
        return self.out(torch.tanh(F.linear(h, self.lin.weight)))


class DictOutput(nn.Module):
    def __init__(self, key="logits"):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.key = key

    def forward(self, x):
        return {self.key: self.lin(x), "aux": x.sum()}


class TiedTransposed(nn.Module):
    """Toy Models of Superposition: y = ReLU(W^T W x + b)."""

    def __init__(self, n=6, m=3):
        super().__init__()
        self.W = nn.Parameter(torch.randn(m, n) / m**0.5)
        self.b = nn.Parameter(torch.randn(n) * 0.1)

    def forward(self, x):
        return torch.relu(x @ self.W.T @ self.W + self.b)


def float_points(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def tokens(n, t, vocab=11, seed=1):
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


CASES = {
    "mlp_tanh_gelu_bias": (
        lambda: MLP(),
        lambda: float_points(6, 5),
        lambda: float_points(4, 5, seed=2),
    ),
    "mlp_relu": (
        lambda: MLP(nn.ReLU),
        lambda: float_points(5, 5),
        lambda: float_points(3, 5, seed=2),
    ),
    "layernorm_free_parameter": (
        WithLayerNormAndFreeParameter,
        lambda: float_points(5, 5),
        lambda: float_points(3, 5, seed=2),
    ),
    "conv2d": (
        Conv2dNet,
        lambda: float_points(4, 2, 7, 9),
        lambda: float_points(3, 2, 7, 9, seed=2),
    ),
    "conv1d": (Conv1dNet, lambda: float_points(4, 2, 7), lambda: float_points(3, 2, 7, seed=2)),
    "embedding_tied": (TokenModel, lambda: tokens(5, 4), lambda: tokens(3, 4, seed=2)),
    "embedding_padding_untied": (
        lambda: TokenModel(tied=False, padding_idx=0),
        lambda: tokens(5, 4),
        lambda: tokens(3, 4, seed=2),
    ),
    "layer_used_twice": (UsedTwice, lambda: float_points(5, 4), lambda: float_points(3, 4, seed=2)),
    "functional_reuse": (
        FunctionalReuse,
        lambda: float_points(5, 4),
        lambda: float_points(3, 4, seed=2),
    ),
    "tms_tied_transposed": (
        TiedTransposed,
        lambda: float_points(5, 6).abs(),
        lambda: float_points(3, 6, seed=2).abs(),
    ),
}


@pytest.fixture(params=list(CASES), ids=list(CASES))
def case(request):
    make_model, make_x1, make_x2 = CASES[request.param]
    torch.manual_seed(0)
    return make_model().double(), make_x1(), make_x2()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("mode", MODES)
def test_empirical_ntk_matches_brute_force(case, mode, method):
    model, x1, x2 = case
    assert_relative_close(
        empirical_ntk(model, x1, mode=mode, method=method), brute_force_ntk(model, x1, mode=mode)
    )
    assert_relative_close(
        empirical_ntk(model, x1, x2, mode=mode, method=method),
        brute_force_ntk(model, x1, x2, mode=mode),
    )


def test_empirical_ntk_dict_output_with_output_fn():
    torch.manual_seed(0)
    model = DictOutput().double()
    x = float_points(4, 4)
    pick = lambda out: out["logits"]  # noqa: E731
    for method in METHODS:
        assert_relative_close(
            empirical_ntk(model, x, mode="full", output_fn=pick, method=method),
            brute_force_ntk(model, x, mode="full", output_fn=pick),
        )


@pytest.mark.parametrize("method", METHODS)
def test_empirical_ntk_output_weights_scale_each_output_pair(method):
    torch.manual_seed(0)
    model = MLP().double()
    x = float_points(4, 5)
    w = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)
    full = empirical_ntk(model, x, mode="full", output_weights=w, method=method)
    unweighted = brute_force_ntk(model, x, mode="full")
    assert_relative_close(full, unweighted * w[:, None] * w[None, :])
    assert_relative_close(
        empirical_ntk(model, x, mode="flatten", output_weights=w, method=method),
        brute_force_ntk(model, x, mode="flatten", output_weights=w),
    )


@pytest.mark.parametrize("method", METHODS)
def test_empirical_ntk_params_by_names_and_predicate(method):
    torch.manual_seed(0)
    model = MLP().double()
    x = float_points(4, 5)
    names = ["body.0.weight", "head.bias"]
    expected = brute_force_ntk(model, x, mode="full", names=names)
    assert_relative_close(
        empirical_ntk(model, x, mode="full", params=names, method=method), expected
    )
    by_predicate = empirical_ntk(
        model, x, mode="full", params=lambda n, p: n in names, method=method
    )
    assert_relative_close(by_predicate, expected)


def test_empirical_ntk_chunking_does_not_change_the_kernel():
    torch.manual_seed(0)
    model = TokenModel().double()
    x = tokens(9, 4)
    assert_relative_close(
        empirical_ntk(model, x, batch_size=2), empirical_ntk(model, x, batch_size=64)
    )


def test_empirical_ntk_trace_is_a_sum_over_outputs():
    torch.manual_seed(0)
    model = MLP().double()
    x = float_points(4, 5)
    diagonal = empirical_ntk(model, x, mode="diagonal")
    assert_relative_close(empirical_ntk(model, x, mode="trace"), diagonal.sum(-1))


def test_empirical_ntk_leaves_model_state_untouched():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Dropout(0.5), nn.BatchNorm1d(6), nn.Linear(6, 3))
    model.train()
    model[0].weight.requires_grad_(False)
    model[3].bias.grad = torch.ones(3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(8, 4)
    k1 = empirical_ntk(model, x, params=["0.weight", "3.weight"])
    k2 = empirical_ntk(model, x, params=["0.weight", "3.weight"])
    assert torch.equal(k1, k2)  # eval mode: no dropout noise
    assert model.training and all(m.training for m in model.modules())
    assert not model[0].weight.requires_grad and model[3].weight.requires_grad
    assert model[3].weight.grad is None and torch.equal(model[3].bias.grad, torch.ones(3))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_empirical_ntk_does_not_consume_global_rng():
    torch.manual_seed(0)
    model = MLP()
    x = torch.randn(4, 5)
    state = torch.get_rng_state()
    empirical_ntk(model, x)
    assert torch.equal(state, torch.get_rng_state())


def test_empirical_ntk_dtype_follows_model():
    torch.manual_seed(0)
    x = torch.randn(4, 5)
    assert empirical_ntk(MLP(), x).dtype == torch.float32
    assert empirical_ntk(MLP().double(), x.double()).dtype == torch.float64
    bf16 = MLP().to(torch.bfloat16)
    kernel = empirical_ntk(bf16, x)
    assert kernel.dtype == torch.float32
    assert torch.allclose(kernel, empirical_ntk(copy.deepcopy(bf16).float(), x), rtol=1e-6)


def test_empirical_ntk_invalid_inputs():
    torch.manual_seed(0)
    model = MLP()
    x = torch.randn(4, 5)
    with pytest.raises(ValueError, match="same per-point shape"):
        empirical_ntk(model, x, torch.randn(3, 6))
    with pytest.raises(ValueError, match="NaN or inf"):
        empirical_ntk(model, torch.tensor([[float("nan")] * 5, [0.0] * 5]))
    with pytest.raises(ValueError, match="output_fn"):
        empirical_ntk(nn.Linear(5, 3), torch.randn(4, 2, 5))
    with pytest.raises(ValueError, match="output_fn"):
        empirical_ntk(DictOutput(key="hidden"), torch.randn(4, 4))
    with pytest.raises(ValueError, match="selects no parameter"):
        empirical_ntk(model, x, params=lambda n, p: False)
    with pytest.raises(ValueError, match="does not have"):
        empirical_ntk(model, x, params=["nope.weight"])
    with pytest.raises(ValueError, match="`mode` must be one of"):
        empirical_ntk(model, x, mode="mean")
    with pytest.raises(ValueError, match="`method` must be one of"):
        empirical_ntk(model, x, method="fast")
    with pytest.raises(ValueError, match="output_weights"):
        empirical_ntk(model, x, output_weights=torch.ones(4))


class DetachedBranch(nn.Module):
    """A supported layer whose output reaches the outputs only through ``detach``: its
    parameters have zero Jacobian."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 3), nn.Linear(5, 3)

    def forward(self, x):
        return self.b(x) + self.a(x).detach().sum(-1, keepdim=True)


@pytest.mark.parametrize("method", ["structured", "jacobian"])
def test_layer_that_does_not_reach_the_outputs_contributes_zero(method):
    torch.manual_seed(0)
    model = DetachedBranch().double()
    x = torch.randn(4, 5, dtype=torch.float64)
    torch.testing.assert_close(
        empirical_ntk(model, x, mode="full", method=method),
        brute_force_ntk(model, x, mode="full"),
        rtol=1e-10,
        atol=0,
    )


def test_num_outputs_in_eval_mode_leaves_the_model_as_it_was():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 3)).train()
    statistics = model[1].running_mean.clone()
    assert num_outputs(model, float_points(5, 4).float()) == 3  # one point: BatchNorm in eval
    assert model.training and model[1].training
    assert torch.equal(model[1].running_mean, statistics)
    assert num_outputs(model, float_points(5, 4).float(), lambda out: out[:, :2]) == 2
