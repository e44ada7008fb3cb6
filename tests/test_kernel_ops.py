"""The eNTK of models written in plain torch the way they are commonly written (raw parameters
and ``einsum``, ``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer``, GPT-2's ``Conv1D``,
hand-written norms, keyword inputs and output objects), against the brute-force float64
reference; the reference itself against an independent ``torch.func`` oracle."""

import inspect

import pytest
import torch
from test_kernel import assert_relative_close
from torch import Tensor
from torch.func import functional_call, jacrev, vmap
from torch.utils._pytree import tree_map
from user_models import (
    Conv1DModel,
    DictArgumentClassifier,
    EncoderClassifier,
    HFStyleClassifier,
    MHAClassifier,
    PaddedEncoder,
    RawMLP,
    RawTransformer,
    RMSNormMLP,
    SeqFirstEncoder,
    SharedElementwise,
    TiedHeads,
)

from lightning_entk import empirical_ntk
from lightning_entk.kernel import factors
from lightning_entk.kernel.factors import separable

from reference import (
    brute_force_jacobian,
    brute_force_ntk,
    call_model,
    default_output,
    num_points,
)

MODES = ["trace", "full", "diagonal", "flatten"]
RTOL = 1e-6  # the package's contract in float64
EXACT = 1e-10  # two exact float64 computations of the same kernel: round-off only

# vmap over scaled_dot_product_attention falls back to a loop on CPU, with a UserWarning.
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")


def float_points(n, d=6, seed=1):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def tokens(n, t=4, vocab=11, seed=1, low=0):
    return torch.randint(low, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


def padding_mask(n, t=4):
    """(N, T) int64 attention mask, 1 for real tokens: row i has ``i % t`` trailing pads, so
    no row is all padding."""
    mask = torch.ones(n, t, dtype=torch.int64)
    for i in range(n):
        mask[i, t - i % t :] = 0
    return mask


def padded_tokens(n, t=4, vocab=11, seed=1, pad_idx=0):
    """Tokens in ``[1, vocab)`` with the trailing pads of :func:`padding_mask` set to
    ``pad_idx``."""
    x = tokens(n, t, vocab, seed, low=1)
    return x.masked_fill(padding_mask(n, t) == 0, pad_idx)


def hf_points(n, seed=1):
    return {"input_ids": tokens(n, seed=seed), "attention_mask": padding_mask(n)}


def padded_points(n, t=5, seed=1):
    """Hugging Face's batch of padded sequences: pad ids and the mask that marks them."""
    return {"input_ids": padded_tokens(n, t, seed=seed), "attention_mask": padding_mask(n, t)}


# name: (model factory, x1 factory, x2 factory); x1 and x2 have different N.
CASES = {
    "raw_mlp": (RawMLP, lambda: float_points(5), lambda: float_points(3, seed=2)),
    "raw_transformer": (
        RawTransformer,
        lambda: tokens(5, vocab=13),
        lambda: tokens(3, vocab=13, seed=2),
    ),
    "raw_transformer_causal": (
        lambda: RawTransformer(causal=True),
        lambda: tokens(5, vocab=13),
        lambda: tokens(3, vocab=13, seed=2),
    ),
    "raw_transformer_tied": (
        lambda: RawTransformer(tied=True),
        lambda: tokens(4, vocab=13),
        lambda: tokens(3, vocab=13, seed=2),
    ),
    "raw_transformer_causal_tied": (
        lambda: RawTransformer(causal=True, tied=True),
        lambda: tokens(4, vocab=13),
        lambda: tokens(3, vocab=13, seed=2),
    ),
    "mha": (MHAClassifier, lambda: tokens(5), lambda: tokens(3, seed=2)),
    "mha_padding_mask": (
        lambda: MHAClassifier(mask="padding"),
        lambda: padded_tokens(5),
        lambda: padded_tokens(3, seed=2),
    ),
    "mha_causal_mask": (
        lambda: MHAClassifier(mask="causal"),
        lambda: tokens(5),
        lambda: tokens(3, seed=2),
    ),
    "encoder_first": (EncoderClassifier, lambda: tokens(5), lambda: tokens(3, seed=2)),
    "encoder_mean": (
        lambda: EncoderClassifier(pool="mean"),
        lambda: tokens(5),
        lambda: tokens(3, seed=2),
    ),
    "gpt2_conv1d": (Conv1DModel, lambda: tokens(4, vocab=13), lambda: tokens(3, 4, 13, seed=2)),
    "shared_elementwise": (
        SharedElementwise,
        lambda: float_points(5),
        lambda: float_points(3, seed=2),
    ),
    "rmsnorm_mlp": (RMSNormMLP, lambda: float_points(6), lambda: float_points(4, seed=2)),
    "padded_encoder": (
        PaddedEncoder,
        lambda: padded_tokens(5, t=5),
        lambda: padded_tokens(3, t=5, seed=2),
    ),
    "padded_encoder_without_padding": (
        PaddedEncoder,
        lambda: tokens(5, t=5, low=1),
        lambda: tokens(3, t=5, seed=2, low=1),
    ),
    "seq_first_encoder": (
        SeqFirstEncoder,
        lambda: padded_tokens(5, t=5),
        lambda: padded_tokens(3, t=5, seed=2),
    ),
    "tied_heads": (TiedHeads, lambda: tokens(5), lambda: tokens(3, seed=2)),
    "hf_style_dict": (HFStyleClassifier, lambda: hf_points(5), lambda: hf_points(3, seed=2)),
    "hf_style_dict_argument": (
        DictArgumentClassifier,
        lambda: hf_points(5),
        lambda: hf_points(3, seed=2),
    ),
    "hf_style_padded_encoder": (
        PaddedEncoder,
        lambda: padded_points(5),
        lambda: padded_points(3, seed=2),
    ),
    "hf_style_tuple": (
        HFStyleClassifier,
        lambda: tuple(hf_points(5).values()),
        lambda: tuple(hf_points(3, seed=2).values()),
    ),
}

# Models whose points are one tensor and whose output is one (N, C) tensor: the current
# package's input contract.
TENSOR_CASES = [name for name in CASES if not name.startswith("hf_style")]


def build(name):
    make_model, make_x1, make_x2 = CASES[name]
    torch.manual_seed(0)
    return make_model().double(), make_x1(), make_x2()


def logits(raw):
    return raw.logits if hasattr(raw, "logits") else raw


def func_jacobian(model, points, output_fn=logits) -> Tensor:
    """Per-example Jacobians (N, C, P) with ``vmap(jacrev(functional_call))``: an oracle
    independent of the brute-force reference's autograd loop."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = dict(model.named_buffers())
    n = num_points(points)

    def f(params, xi):
        if isinstance(xi, dict) and set(xi).isdisjoint(inspect.signature(model.forward).parameters):
            args, kwargs = ({k: v[None] for k, v in xi.items()},), {}  # forward(self, batch)
        elif isinstance(xi, dict):
            args, kwargs = (), {k: v[None] for k, v in xi.items()}
        elif isinstance(xi, tuple):
            args, kwargs = tuple(v[None] for v in xi), {}
        else:
            args, kwargs = (xi[None],), {}
        raw = functional_call(model, (params, buffers), args, kwargs)
        return output_fn(raw)[0]

    was_training = model.training
    model.eval()
    try:
        jac = vmap(jacrev(f), in_dims=(None, 0))(params, points)
    except RuntimeError:  # data-dependent code (a padding check) that vmap cannot run
        per_point = [jacrev(f)(params, tree_map(lambda t, i=i: t[i], points)) for i in range(n)]
        jac = {name: torch.stack([j[name] for j in per_point]) for name in params}
    finally:
        model.train(was_training)
    return torch.cat([jac[n].flatten(2) for n in params], dim=-1)


def func_ntk(model, x1, x2=None, output_fn=logits) -> Tensor:
    """The ``full`` kernel (N1, N2, C, C) from :func:`func_jacobian`."""
    j1 = func_jacobian(model, x1, output_fn)
    j2 = j1 if x2 is None else func_jacobian(model, x2, output_fn)
    return torch.einsum("ncp,mdp->nmcd", j1, j2)


def per_parameter_jacobians(model, x) -> dict[str, Tensor]:
    """The brute-force Jacobian (N, C, P) split into the columns of each parameter."""
    jac = brute_force_jacobian(model, x)
    named = list(model.named_parameters())
    sizes = [p.numel() for _, p in named]
    return {n: j for (n, _), j in zip(named, jac.split(sizes, dim=-1), strict=True)}


# ---------------------------------------------------------------------------------------------
# The package against the brute-force reference


@pytest.mark.parametrize("method", [None, "jacobian"], ids=["default", "jacobian"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(CASES))
def test_empirical_ntk_matches_brute_force_on_user_models(name, mode, method):
    model, x1, x2 = build(name)
    options = {"mode": mode} if method is None else {"mode": mode, "method": method}
    assert_relative_close(
        empirical_ntk(model, x1, **options), brute_force_ntk(model, x1, mode=mode), RTOL
    )
    assert_relative_close(
        empirical_ntk(model, x1, x2, **options), brute_force_ntk(model, x1, x2, mode=mode), RTOL
    )


@pytest.mark.parametrize("name", list(CASES))
def test_empirical_ntk_each_parameter_matches_brute_force(name):
    """Each parameter's own kernel (``params=[name]``), so that a parameter whose share of the
    whole kernel is small is still checked on its own."""
    model, x1, x2 = build(name)
    j1, j2 = per_parameter_jacobians(model, x1), per_parameter_jacobians(model, x2)
    for pname in j1:
        expected = torch.einsum("ncp,mdp->nmcd", j1[pname], j2[pname])
        actual = empirical_ntk(model, x1, x2, mode="full", params=[pname])
        err = torch.linalg.vector_norm(actual - expected) / torch.linalg.vector_norm(expected)
        assert err < RTOL, f"{pname}: relative error {err:.2e}"


@pytest.mark.parametrize("mode", MODES)
def test_empirical_ntk_causal_mask_on_every_position_matches_brute_force(mode):
    """In one layer the last position attends to every key whatever the mask: the mean over
    positions of ``all_positions=True`` logits is where the causal mask changes the kernel."""
    x1, x2 = tokens(4, vocab=13), tokens(3, vocab=13, seed=2)
    mean = lambda out: out.mean(1)  # noqa: E731
    kernels = {}
    for causal in (False, True):
        torch.manual_seed(0)
        model = RawTransformer(causal=causal, all_positions=True).double()
        kernels[causal] = brute_force_ntk(model, x1, x2, mode=mode, output_fn=mean)
        assert_relative_close(
            empirical_ntk(model, x1, x2, mode=mode, output_fn=mean), kernels[causal], RTOL
        )
    difference = torch.linalg.vector_norm(kernels[True] - kernels[False])
    assert difference > 1e-3 * torch.linalg.vector_norm(kernels[False])


def test_empirical_ntk_sequence_output_without_output_fn_raises():
    torch.manual_seed(0)
    model = RawTransformer(all_positions=True).double()
    with pytest.raises(ValueError, match=r"output_fn"):
        empirical_ntk(model, tokens(4, vocab=13))


def test_empirical_ntk_sequence_output_with_output_fn_matches_last_position():
    torch.manual_seed(0)
    sequence = RawTransformer(all_positions=True).double()
    torch.manual_seed(0)
    last = RawTransformer().double()
    x1, x2 = tokens(4, vocab=13), tokens(3, vocab=13, seed=2)
    assert_relative_close(
        empirical_ntk(sequence, x1, x2, mode="full", output_fn=lambda out: out[:, -1]),
        brute_force_ntk(last, x1, x2, mode="full"),
        RTOL,
    )


# ---------------------------------------------------------------------------------------------
# The reference and the models themselves


@pytest.mark.parametrize("name", list(CASES))
def test_brute_force_ntk_matches_torch_func_oracle(name):
    model, x1, x2 = build(name)
    assert_relative_close(brute_force_ntk(model, x1, mode="full"), func_ntk(model, x1), EXACT)
    assert_relative_close(
        brute_force_ntk(model, x1, x2, mode="full"), func_ntk(model, x1, x2), EXACT
    )


@pytest.mark.parametrize("name", TENSOR_CASES)
def test_brute_force_ntk_matches_jacobian_method_on_tensor_models(name):
    """The package's ``torch.func`` path, which runs on every one-tensor model today."""
    model, x1, x2 = build(name)
    assert_relative_close(
        brute_force_ntk(model, x1, x2, mode="full"),
        empirical_ntk(model, x1, x2, mode="full", method="jacobian"),
        EXACT,
    )


def test_brute_force_ntk_modes_are_views_of_the_full_kernel():
    model, x1, x2 = build("raw_transformer_causal")
    full = brute_force_ntk(model, x1, x2, mode="full")
    n1, n2, c, _ = full.shape
    diagonal = torch.diagonal(full, dim1=-2, dim2=-1)
    torch.testing.assert_close(brute_force_ntk(model, x1, x2, mode="diagonal"), diagonal)
    torch.testing.assert_close(brute_force_ntk(model, x1, x2, mode="trace"), diagonal.sum(-1))
    flat = brute_force_ntk(model, x1, x2, mode="flatten")
    assert flat.shape == (c * n1, c * n2)
    torch.testing.assert_close(flat[2 * n1 + 1, 3 * n2 + 2], full[1, 2, 2, 3])


class OutputWrapper(torch.nn.Module):
    """``model`` with its output passed through ``wrap``."""

    def __init__(self, model, wrap):
        super().__init__()
        self.model, self.wrap = model, wrap

    def forward(self, *args, **kwargs):
        return self.wrap(self.model(*args, **kwargs))


def test_brute_force_ntk_reads_every_point_and_output_layout():
    """Dict, tuple and tensor points, object, dict, tuple and tensor outputs, ``output_fn``
    and ``forward_fn`` all give the kernel of the same function."""
    model, x1, x2 = build("hf_style_dict")
    expected = brute_force_ntk(model, x1, x2, mode="full")
    ids1, mask1 = x1["input_ids"], x1["attention_mask"]
    ids2, mask2 = x2["input_ids"], x2["attention_mask"]
    layouts = {
        "tuple points": lambda: brute_force_ntk(model, (ids1, mask1), (ids2, mask2), "full"),
        "output_fn": lambda: brute_force_ntk(
            model, x1, x2, "full", output_fn=lambda out: out.logits
        ),
        "forward_fn on tensor points": lambda: brute_force_ntk(
            model,
            torch.cat([ids1, mask1], dim=1),
            torch.cat([ids2, mask2], dim=1),
            "full",
            forward_fn=lambda m, x: m(x[:, :4], attention_mask=x[:, 4:]).logits,
        ),
    }
    outputs = {
        "dict": lambda out: {"logits": out.logits, "loss": None},
        "tuple": lambda out: (out.logits, out.hidden_states),
        "list": lambda out: [out.logits],
        "tensor": lambda out: out.logits,
    }
    for kind, wrap in outputs.items():
        layouts[f"{kind} output"] = lambda wrap=wrap: brute_force_ntk(
            OutputWrapper(model, wrap), x1, x2, "full"
        )
    for layout, kernel in layouts.items():
        err = torch.linalg.vector_norm(kernel() - expected) / torch.linalg.vector_norm(expected)
        assert err < EXACT, f"{layout}: relative error {err:.2e}"


def test_brute_force_ntk_sequence_output_without_output_fn_raises():
    torch.manual_seed(0)
    model = RawTransformer(all_positions=True).double()
    with pytest.raises(ValueError, match=r"output_fn"):
        brute_force_ntk(model, tokens(3, vocab=13))


def test_brute_force_ntk_restores_each_module_mode():
    model, x1, _ = build("gpt2_conv1d")
    model.train()
    model.drop.eval()
    brute_force_ntk(model, x1)
    assert model.training and model.c_attn.training and not model.drop.training


@pytest.mark.parametrize("name", list(CASES))
def test_user_models_are_deterministic_under_manual_seed(name):
    first, x1, _ = build(name)
    second, _, _ = build(name)
    for (n, p), (_, q) in zip(first.state_dict().items(), second.state_dict().items(), strict=True):
        assert torch.equal(p, q), n
    with torch.no_grad():
        out = default_output(call_model(first.eval(), x1))
    assert out.dtype == torch.float64 and out.shape[0] == num_points(x1) and out.ndim == 2
    assert torch.isfinite(out).all()


def test_separable_finds_rank_one_columns_and_refuses_others():
    torch.manual_seed(0)
    d, a = torch.randn(50, 7, dtype=torch.float64), torch.randn(4, 7, dtype=torch.float64)
    g = d[:, None] * a
    g[:, :, 3] = 0  # a column without gradient
    found = separable(g)
    assert found is not None
    torch.testing.assert_close(found[0][:, None] * found[1], g, rtol=1e-14, atol=0)
    g[3, 2, 5] += 1e-9 * g.abs().max()
    assert separable(g) is None


@pytest.mark.parametrize("mode", MODES)
def test_empirical_ntk_last_hidden_layer_through_separable_gram_matches_brute_force(
    mode, monkeypatch
):
    """Linear -> tanh -> Linear: the first layer's output gradients are rank one per unit,
    and its trace kernel is contracted without the outputs' sum."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 6)
    ).double()
    x1, x2 = torch.randn(9, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    found = []

    def spy(g):
        found.append(separable(g) is not None)
        return separable(g)

    monkeypatch.setattr(factors, "separable", spy)
    for second in (None, x2):
        expected = brute_force_ntk(model, x1, second, mode=mode)
        torch.testing.assert_close(empirical_ntk(model, x1, second, mode=mode), expected)
    assert (True in found) == (mode == "trace")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["gpt2_conv1d", "encoder_first", "hf_style_dict"])
def test_empirical_ntk_in_row_blocks_within_a_small_budget_matches_brute_force(
    name, mode, monkeypatch
):
    """Sequence models: the Grams over all pairs of positions, formed a few points at a time
    when they would pass the budget's scratch share, give the same kernel."""
    model, x1, x2 = build(name)
    blocks = []
    restrict = factors.FactorBlock.points

    def spy(block, lo, hi):
        blocks.append(hi - lo)
        return restrict(block, lo, hi)

    monkeypatch.setattr(factors.FactorBlock, "points", spy)
    for second in (None, x2):
        expected = brute_force_ntk(model, x1, second, mode=mode)
        actual = empirical_ntk(model, x1, second, mode=mode, memory_budget=2**14)
        assert_relative_close(actual, expected, RTOL)
    assert blocks and min(blocks) < num_points(x1)
