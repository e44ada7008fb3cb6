"""Models the fast routes do not fit at first sight, against the brute-force float64
reference: float32 islands in a float64 model, a parameter that fails the check while the rest
stays structured, a shared relative-position bias that cannot take a points dim, an
``autograd.Function`` that ``torch.func`` refuses, and a forward that cannot be differentiated
(a clear error naming the fix). ``ntk_plan`` predicts the routes the kernel then takes."""

import pytest
import torch
from test_kernel import assert_relative_close
from test_kernel_ops import float_points, tokens
from torch import nn
from user_models import (
    CachedRecurrent,
    DroppedRelativeEmbeddings,
    ExpertParameters,
    Float32NormMLP,
    KeywordConv,
    OldStyleFunctionMLP,
    RelativeBiasAttention,
    TokenRouting,
)

from lightning_entk import empirical_ntk, ntk_plan
from lightning_entk.kernel import NotDifferentiableError
from lightning_entk.kernel.context import NTKContext

from reference import brute_force_ntk

EXACT = 1e-10  # float64 throughout: round-off only
ISLAND = 1e-5  # the float32 island's round-off, in both the kernel and the reference

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")

CASES = {
    "float32_norm": (Float32NormMLP, lambda: float_points(6, d=5), ISLAND),
    "float32_layer": (
        lambda: Float32NormMLP(cast_hidden=True),
        lambda: float_points(6, d=5),
        ISLAND,
    ),
    "gemma_norm": (
        lambda: Float32NormMLP(gemma=True),
        lambda: float_points(6, d=5),
        ISLAND,
    ),
    "keyword_conv": (KeywordConv, lambda: tokens(5), EXACT),
    "swin_relative_bias": (RelativeBiasAttention, lambda: tokens(5), EXACT),
    "t5_relative_bias": (
        lambda: RelativeBiasAttention(lookup="embedding"),
        lambda: tokens(5),
        EXACT,
    ),
    "t5_relative_bias_sdpa": (
        lambda: RelativeBiasAttention(lookup="embedding", sdpa=True),
        lambda: tokens(5),
        EXACT,
    ),
    "t5_relative_bias_causal_sdpa": (
        lambda: RelativeBiasAttention(lookup="embedding", sdpa=True, causal=True),
        lambda: tokens(5),
        EXACT,
    ),
    "dropped_relative_embeddings": (DroppedRelativeEmbeddings, lambda: tokens(5), EXACT),
    "old_style_function": (OldStyleFunctionMLP, lambda: float_points(5, d=5), EXACT),
    "token_routing": (TokenRouting, lambda: tokens(5, t=5), EXACT),
    "expert_parameters": (ExpertParameters, lambda: tokens(5, t=5), EXACT),
}


def build(name):
    make_model, make_x, tol = CASES[name]
    torch.manual_seed(0)
    return make_model().double(), make_x(), tol


def summary(plan):
    return plan.routes(), plan.capture


@pytest.mark.parametrize("method", ["auto", "jacobian"])
@pytest.mark.parametrize("name", list(CASES))
def test_empirical_ntk_matches_brute_force_where_fast_routes_do_not_fit(name, method):
    model, x, tol = build(name)
    kernel = empirical_ntk(model, x, mode="full", method=method)
    assert_relative_close(kernel, brute_force_ntk(model, x, mode="full"), tol)


@pytest.mark.parametrize("name", list(CASES))
def test_ntk_plan_predicts_the_routes_and_capture_the_kernel_takes(name):
    model, x, _ = build(name)
    before = summary(ntk_plan(model, x))
    empirical_ntk(model, x)
    assert summary(ntk_plan(model, x)) == before


@pytest.mark.parametrize(
    "name",
    ["float32_norm", "float32_layer", "gemma_norm", "keyword_conv", "dropped_relative_embeddings"],
)
def test_ntk_plan_keeps_every_parameter_structured_in_batched_passes(name):
    """The check's tolerance follows the float32 an island computes in, not float64's;
    Gemma's ``1 + weight`` is a view of the weight; keyword convolutions take the defaults;
    dropout outside training is the identity on a parameter."""
    model, x, _ = build(name)
    plan = ntk_plan(model, x)
    assert set(plan.routes().values()) == {"structured"}
    assert plan.capture == "batched"


@pytest.mark.parametrize(
    "name",
    [
        "swin_relative_bias",
        "t5_relative_bias",
        "t5_relative_bias_sdpa",
        "t5_relative_bias_causal_sdpa",
    ],
)
def test_ntk_plan_captures_a_shared_bias_reshaped_into_heads_in_batched_passes(name):
    """A relative-position bias looked up by positions alone (Swin's ``table[index]``, T5's
    ``nn.Embedding``) cannot take a points dim before it is reshaped into the heads; taken as
    a view of its table, it meets the points where it is added to the scores (by ``+``, or
    inside ``scaled_dot_product_attention``, after ``torch.where`` with a causal mask), and
    the pass is batched. Its entries repeat over pairs of positions: Jacobian columns."""
    model, x, _ = build(name)
    plan = ntk_plan(model, x)
    assert plan.capture == "batched"
    routes = plan.routes()
    assert routes.pop("table.weight") == "columns"
    assert set(routes.values()) == {"structured"}


def test_empirical_ntk_parameter_failing_the_check_goes_generic_and_the_rest_stays_exact(
    monkeypatch,
):
    """A parameter whose rebuilt gradient disagrees with autograd (a use the capture did not
    see) moves to the generic path alone; the other operations keep their perturbations."""
    check = NTKContext._check

    def fails_norm(self, structure, per_use, chunk):
        failed = check(self, structure, per_use, chunk)
        if any(u.param == "norm_weight" for u in structure.uses):
            failed["norm_weight"] = "a use the capture did not see"
        return failed

    monkeypatch.setattr(NTKContext, "_check", fails_norm)
    torch.manual_seed(0)
    model, x = Float32NormMLP().double(), float_points(6, d=5)
    routes = ntk_plan(model, x).routes()
    assert routes.pop("norm_weight") == "generic"
    assert set(routes.values()) == {"structured"}
    assert_relative_close(empirical_ntk(model, x), brute_force_ntk(model, x), ISLAND)


@pytest.mark.parametrize("method", ["auto", "jacobian"])
def test_empirical_ntk_forward_writing_state_in_place_raises_naming_forward_fn(method):
    torch.manual_seed(0)
    model, x = CachedRecurrent().double(), float_points(4, d=5)
    with pytest.raises(NotDifferentiableError, match=r"forward_fn.*use_cache=False"):
        empirical_ntk(model, x, method=method)
    assert issubclass(NotDifferentiableError, RuntimeError)


def test_empirical_ntk_forward_fn_without_the_cache_matches_brute_force():
    torch.manual_seed(0)
    model, x = CachedRecurrent().double(), float_points(4, d=5)

    def forward_fn(m, points):
        return m(points, use_cache=False)

    assert_relative_close(
        empirical_ntk(model, x, forward_fn=forward_fn),
        brute_force_ntk(model, x, forward_fn=forward_fn),
        EXACT,
    )


def test_generic_route_float32_kernel_is_as_accurate_as_the_structured_route():
    """The generic route's columns are contracted in float64: its float32 kernel is within
    the structured route's own round-off of the float64 kernel (one float32 dot product over
    C P terms was several times worse)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(32, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 10)
    )
    x = torch.randn(16, 32)
    generic = empirical_ntk(model, x, method="jacobian").double()
    structured = empirical_ntk(model, x).double()
    exact = empirical_ntk(model.double(), x.double())

    def error(k):
        return ((k - exact).norm() / exact.norm()).item()

    assert error(generic) <= 2 * error(structured)


def test_ntk_plan_sends_parameters_of_point_dependent_shapes_to_the_generic_route():
    """Routed tokens: each point's experts see another number of rows than discovery's point,
    so no perturbation fits them; the structured parameters go generic, the kernel exact."""
    model, x, _ = build("token_routing")
    routes = ntk_plan(model, x).routes()
    assert set(routes.values()) == {"generic"}


def test_ntk_plan_keeps_experts_indexed_in_one_parameter_structured():
    """Experts stored as one 3-D parameter and indexed by expert (Mixtral's
    ``gate_up_proj[e]``): every expert's rows are one operation, the same for every point, so
    the experts take the structured route, captured one point at a time."""
    model, x, _ = build("expert_parameters")
    plan = ntk_plan(model, x)
    assert set(plan.routes().values()) == {"structured"}
    assert plan.capture == "per point"
