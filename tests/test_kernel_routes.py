"""How points are captured and how each parameter's block is formed, against the brute-force
float64 reference: batched capture through data-dependent mask code and sequence-first
attention (points merged after the positions), tied parameters (a view ``V`` and its transpose)
from factors and their cross terms, and the fallbacks that ``ntk_plan`` names."""

import pytest
import torch
from test_kernel import TiedTransposed, TokenModel, assert_relative_close
from test_kernel_ops import CASES, build, per_parameter_jacobians, tokens
from torch import Tensor, nn

from lightning_entk import empirical_ntk, ntk_plan, ntk_spectrum
from lightning_entk.kernel import KernelOptions, factors
from lightning_entk.kernel.context import ntk_context
from lightning_entk.kernel.factors import TiedBlock
from lightning_entk.kernel.layout import PointsDim

from reference import brute_force_ntk

MODES = ["trace", "full", "diagonal", "flatten"]
RTOL = 1e-10  # float64 throughout: agreement to round-off

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")


def tms(n: int = 6, seed: int = 1) -> Tensor:
    return torch.rand(n, 6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# name: (model factory, tied parameter, x1 factory, x2 factory)
TIED = {
    "tms": (TiedTransposed, "W", lambda: tms(6), lambda: tms(4, seed=2)),
    "embedding_unembedding": (
        lambda: TokenModel(padding_idx=0),  # pad tokens: a lookup without a row
        "embed.weight",
        lambda: tokens(6, vocab=11),
        lambda: tokens(4, vocab=11, seed=2),
    ),
    "gpt2_tied_head": (*CASES["gpt2_conv1d"][:1], "wte.weight", *CASES["gpt2_conv1d"][1:]),
    "tied_per_head": (*CASES["tied_heads"][:1], "W", *CASES["tied_heads"][1:]),
}


def build_tied(name):
    make_model, param, make_x1, make_x2 = TIED[name]
    torch.manual_seed(0)
    return make_model().double(), param, make_x1(), make_x2()


def tied_kernel_reference(model, param, x1, x2) -> Tensor:
    """The tied parameter's own ``full`` kernel from brute-force Jacobians."""
    j1 = per_parameter_jacobians(model, x1)[param]
    j2 = j1 if x2 is None else per_parameter_jacobians(model, x2)[param]
    return torch.einsum("ncp,mdp->nmcd", j1, j2)


def as_mode(full: Tensor, mode: str) -> Tensor:
    if mode == "full":
        return full
    diagonal = torch.diagonal(full, dim1=-2, dim2=-1)
    if mode == "trace":
        return diagonal.sum(-1)
    if mode == "diagonal":
        return diagonal
    n1, n2, c, _ = full.shape
    return full.permute(2, 0, 3, 1).reshape(c * n1, c * n2)


# ---------------------------------------------------------------------------------------------
# Capture: batched passes whatever the mask code does


@pytest.mark.parametrize("name", list(CASES))
def test_ntk_plan_captures_every_user_model_in_batched_passes(name):
    """Masks built from token ids with padding checks and ``torch.where``, and the (T, N, E)
    layout of ``nn.MultiheadAttention``, included: no ``vmap``, no loop over points."""
    model, x1, _ = build(name)
    plan = ntk_plan(model, x1)
    assert (plan.capture, plan.capture_reason) == ("batched", "")


def test_batched_capture_reads_points_merged_after_positions():
    """``nn.MultiheadAttention`` merges its (T, N, E) output as ``view(T * N, E)`` before the
    output projection: the points of that operation sit after the positions, and the batched
    pass reads them there."""
    model, x1, x2 = build("seq_first_encoder")
    with ntk_context(model, x1, None, KernelOptions()) as ctx:
        layouts = ctx.structure(ctx.x1).points
    t = x1.shape[1]
    assert PointsDim(0, before=t) in layouts  # the output projection's input (T * N, E)
    assert PointsDim(1) in layouts  # the (T, N, 3E) input projection
    assert_relative_close(
        empirical_ntk(model, x1, x2, mode="full"), brute_force_ntk(model, x1, x2, "full"), RTOL
    )


def test_batched_capture_found_on_one_point_is_tried_again_on_several():
    """One point cannot tell where the points of (T * N, E) go: discovered on ``x1`` of one
    point, the layouts are found again on the first several points."""
    model, x1, x2 = build("seq_first_encoder")
    assert_relative_close(
        empirical_ntk(model, x1[:1], x2, mode="full"),
        brute_force_ntk(model, x1[:1], x2, "full"),
        RTOL,
    )
    plan = ntk_plan(model, x1)  # the discovery kept, its layouts now found on several points
    assert (plan.capture, plan.capture_reason) == ("batched", "")


def test_points_dim_split_reads_point_major_and_point_minor_layouts():
    n, t, e = 3, 4, 2
    per_point = torch.arange(n * t * e).reshape(n, t, e)  # point i's (T, E) entries
    major = per_point.reshape(n * t, e)  # x.view(-1, E)
    minor = per_point.transpose(0, 1).reshape(t * n, e)  # (T, N, E).view(T * N, E)
    for layout, batched in ((PointsDim(0), major), (PointsDim(0, before=t), minor)):
        assert layout.batched_shape((t, e), n) == tuple(batched.shape)
        split = layout.split(batched[None], (t, e), n)  # (n, 1, T E)
        torch.testing.assert_close(split[:, 0], per_point.reshape(n, -1))


class Squeezed(nn.Module):
    """``squeeze()`` drops the points dim of a single point (a common slip): one point's
    operations have other shapes than a batch's, so points go through ``vmap``; with a
    Python branch on the data as well (``branch=True``), one at a time."""

    def __init__(self, branch: bool = False):
        super().__init__()
        self.branch = branch
        self.embed = nn.Embedding(11, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, tokens: Tensor) -> Tensor:
        h = torch.tanh(self.embed(tokens).squeeze())
        if self.branch and bool((tokens == 0).any()):
            h = h * 2
        return self.head(h.mean(-2)).reshape(tokens.shape[0], -1)


@pytest.mark.parametrize(("branch", "route"), [(False, "vmap"), (True, "per point")])
def test_ntk_plan_names_a_capture_fallback_and_why(branch, route):
    torch.manual_seed(0)
    model = Squeezed(branch).double()
    x1, x2 = tokens(5), tokens(3, seed=2)
    plan = ntk_plan(model, x1)
    assert plan.capture == route
    assert "mixes the points" in plan.capture_reason
    assert (route == "per point") == ("vmap could not batch it" in plan.capture_reason)
    assert f"points captured {'under vmap' if route == 'vmap' else 'one at a time'}" in str(plan)
    assert_relative_close(
        empirical_ntk(model, x1, x2, mode="full"), brute_force_ntk(model, x1, x2, "full"), RTOL
    )


def test_ntk_plan_counts_the_capture_when_discovery_is_kept():
    """The capture's predicted time comes from the trial that chose its route, kept with what
    discovery learned: a plan made after a kernel (discovery kept) predicts the same."""
    torch.manual_seed(0)
    model, x1 = Squeezed(branch=True).double(), tokens(5)
    first = ntk_plan(model, x1)
    empirical_ntk(model, x1)
    assert ntk_plan(model, x1).predicted_seconds == pytest.approx(first.predicted_seconds)


# ---------------------------------------------------------------------------------------------
# Tied parameters: factors and cross terms


@pytest.mark.parametrize("name", list(TIED))
def test_ntk_plan_routes_tied_parameters_through_factors(name):
    model, param, x1, _ = build_tied(name)
    route = next(p for p in ntk_plan(model, x1).parameters if p.name == param)
    assert route.route == "tied" and "V^T" in route.detail


@pytest.mark.parametrize("from_jacobians", [False, True], ids=["factors", "jacobians"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(TIED))
def test_tied_block_kernel_matches_brute_force(name, mode, from_jacobians, monkeypatch):
    """Both ways of contracting a tied block (Gram products with cross terms, or per-example
    Jacobians when cheaper), forced in turn, on the block itself and against other points."""
    model, param, x1, x2 = build_tied(name)
    monkeypatch.setattr(TiedBlock, "_materialize_cheaper", lambda *_: from_jacobians)
    for second in (None, x2):
        expected = as_mode(tied_kernel_reference(model, param, x1, second), mode)
        actual = empirical_ntk(model, x1, second, mode=mode, params=[param])
        assert_relative_close(actual, expected, RTOL)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(TIED))
def test_tied_block_in_row_blocks_matches_brute_force(name, mode, monkeypatch):
    """Within a small budget the cross terms are formed a few points at a time."""
    model, param, x1, x2 = build_tied(name)
    monkeypatch.setattr(TiedBlock, "_materialize_cheaper", lambda *_: False)
    blocks = []
    restrict = TiedBlock.points

    def spy(block, lo, hi):
        blocks.append(hi - lo)
        return restrict(block, lo, hi)

    monkeypatch.setattr(TiedBlock, "points", spy)
    for second in (None, x2):
        expected = as_mode(tied_kernel_reference(model, param, x1, second), mode)
        actual = empirical_ntk(model, x1, second, mode=mode, params=[param], memory_budget=2**10)
        assert_relative_close(actual, expected, RTOL)
    assert blocks and min(blocks) < len(x1)


@pytest.mark.parametrize("route", ["kernel", "parameter", "matrix_free"])
@pytest.mark.parametrize("name", list(TIED))
def test_tied_block_spectrum_matches_brute_force(name, route):
    """The spectrum's routes read the tied block as materialised Jacobians (``parameter``) and
    as products ``J^T v``, ``J u`` (``matrix_free``)."""
    model, _, x1, _ = build_tied(name)
    kernel = brute_force_ntk(model, x1, mode="flatten")
    expected = torch.linalg.eigvalsh(kernel).flip(0)[:4]
    found = ntk_spectrum(model, x1, mode="flatten", k=4, route=route, eigenvectors=False)
    torch.testing.assert_close(found.eigenvalues, expected, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("name", list(TIED))
def test_tied_block_materialized_matches_brute_force_jacobian(name):
    """Columns in the order of the first use's view ``V`` (the lookup's (d, V) for a tied
    embedding), each the brute-force column of the entry ``V`` puts there."""
    model, param, x1, _ = build_tied(name)
    with ntk_context(model, x1, None, KernelOptions(params=[param])) as ctx:
        jac = ctx.jacobian(ctx.x1)
        order = ctx.structure(ctx.x1).uses[0].layout.reshape(-1)
    assert [type(b) for b in jac.blocks] == [factors.TiedBlock]
    expected = per_parameter_jacobians(model, x1)[param][:, :, order]
    torch.testing.assert_close(jac.materialized(), expected, rtol=1e-12, atol=1e-14)
