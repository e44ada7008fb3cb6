"""Speed of the default eNTK method against the Jacobian-contraction reference, model by model.

One row per model: the default method (``method="auto"``, which recognises every parameter by
the operations that use it) and ``method="jacobian"`` (``torch.func`` per-example Jacobians,
contracted; memory N C P) measured in the same run, each in a fresh process, with the ratio of
their times, the relative Frobenius difference of their kernels and the peak memory each added
above the model and data. All models are float32, all kernels trace mode ``(N, N)``.

Rows and their goals (printed beside the measured ratios, not asserted):

1. ``ModularArithmeticMLP`` (p=29, hidden 512, bias-free ``nn.Linear``), all 841 grid points:
   ratio >= 100x.
2. The same MLP written with raw parameters (``x @ W1.T``, ``** 2``, ``@ W2.T``, same scales and
   the same weights, so the same kernel), 841 points: ratio >= 100x.
3. A one-layer TransformerLens-style transformer with raw parameters and ``einsum``
   (``tests/user_models.RawTransformer``) on the p=29 task: tokens ``(a, b, "=")`` over a
   vocabulary of p+1=30, d_model 128, 4 heads of 32, d_mlp 512, untied logits over the 29
   classes at the last position. On 128 grid points: ratio >= 20x. On all 841 points the
   default method only (the reference would hold 841 x 29 x 205k floats, about 20 GB): peak
   memory < 2 GB.
4. An ``nn.TransformerEncoder`` classifier (``nn.Embedding``, learned positions, 2 x
   ``nn.TransformerEncoderLayer(64, 4 heads, feed-forward 256, dropout 0, batch_first)``,
   mean pooling, ``nn.Linear`` head to 10 classes), 64 sequences of 8 tokens: ratio >= 10x.
5. A GPT-2 block in the Hugging Face layout (``tests/user_models.Conv1DModel``: ``Conv1D``
   layers applied with ``addmm``, d_model 64, 4 heads, vocabulary 50, tied logits at the last
   position), 64 sequences of 8 tokens: ratio >= 10x.

At the end: the route of every parameter of the transformer of row 3 (``ntk_plan``), and any
parameter of any row that takes the ``generic`` (``torch.func``) route.

    python benchmarks/entk_speed.py
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from example_modules.modular_arithmetic import (
    ModularArithmeticDataModule,
    ModularArithmeticMLP,
    grid_pairs,
)
from lightning_entk import empirical_ntk, ntk_plan

from _harness import measure, relative_error

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from user_models import Conv1DModel, RawTransformer

P, HIDDEN = 29, 512
D_MODEL, N_HEADS, D_HEAD, D_MLP = 128, 4, 32, 512
TRANSFORMER_SUBSET = 128
SEQUENCES, SEQ_LEN = 64, 8
ENC_VOCAB, ENC_D, ENC_HEADS, ENC_FF, ENC_LAYERS, ENC_CLASSES = 20, 64, 4, 256, 2, 10
GPT_VOCAB, GPT_D, GPT_HEADS, GPT_INNER = 50, 64, 4, 256


# ---------------------------------------------------------------------------------- models


class RawModularMLP(nn.Module):
    """``ModularArithmeticMLP`` written with raw parameters:
    ``(((x @ W1.T) / sqrt(2p)) ** 2) @ W2.T / n``."""

    def __init__(self, p: int, hidden: int):
        super().__init__()
        self.p, self.hidden = p, hidden
        self.W1 = nn.Parameter(torch.randn(hidden, 2 * p))
        self.W2 = nn.Parameter(torch.randn(p, hidden))

    def forward(self, x: Tensor) -> Tensor:
        h = x @ self.W1.T / math.sqrt(2 * self.p)
        return h**2 @ self.W2.T / self.hidden


class EncoderClassifier(nn.Module):
    """``nn.Embedding`` plus learned positions, an ``nn.TransformerEncoder`` of
    ``nn.TransformerEncoderLayer(batch_first=True)`` and an ``nn.Linear`` head on the mean over
    positions."""

    def __init__(self, vocab, d_model, nhead, dim_feedforward, num_layers, max_len, classes):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(torch.randn(1, max_len, d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(
            d_model, nhead, dim_feedforward, dropout=0.0, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, classes)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed(tokens) + self.pos[:, : tokens.shape[1]]
        return self.head(self.encoder(x).mean(dim=1))


# ---------------------------------------------------------------------------------- setups


def setup_mlp():
    torch.manual_seed(0)
    model = ModularArithmeticMLP(p=P, hidden=HIDDEN)
    x, _ = ModularArithmeticDataModule(p=P).grid()
    return model, x


def setup_raw_mlp():
    linear, x = setup_mlp()
    model = RawModularMLP(P, HIDDEN)
    with torch.no_grad():
        model.W1.copy_(linear.layer1.weight)
        model.W2.copy_(linear.layer2.weight)
    return model, x


def _transformer_tokens(points: int | None) -> Tensor:
    """``(a, b, "=")`` token triples of the grid (token p is "="), all of them or a fixed
    random subset."""
    a, b = grid_pairs(P)
    tokens = torch.stack([a, b, torch.full_like(a, P)], dim=1)
    if points is None:
        return tokens
    rows = torch.randperm(len(tokens), generator=torch.Generator().manual_seed(0))[:points]
    return tokens[rows.sort().values]


def _transformer() -> RawTransformer:
    torch.manual_seed(0)
    return RawTransformer(
        vocab=P + 1, d_model=D_MODEL, n_heads=N_HEADS, d_head=D_HEAD, d_mlp=D_MLP,
        max_len=3, vocab_out=P,
    )  # fmt: skip


def setup_transformer_subset():
    return _transformer(), _transformer_tokens(TRANSFORMER_SUBSET)


def setup_transformer_grid():
    return _transformer(), _transformer_tokens(None)


def _sequences(vocab: int) -> Tensor:
    return torch.randint(vocab, (SEQUENCES, SEQ_LEN), generator=torch.Generator().manual_seed(0))


def setup_encoder():
    torch.manual_seed(0)
    model = EncoderClassifier(ENC_VOCAB, ENC_D, ENC_HEADS, ENC_FF, ENC_LAYERS, SEQ_LEN, ENC_CLASSES)
    return model, _sequences(ENC_VOCAB)


def setup_gpt():
    torch.manual_seed(0)
    model = Conv1DModel(
        vocab=GPT_VOCAB, n_embd=GPT_D, n_head=GPT_HEADS, n_positions=SEQ_LEN,
        n_inner=GPT_INNER, dropout=0.0, initializer_range=0.02,
    )  # fmt: skip
    return model, _sequences(GPT_VOCAB)


# ---------------------------------------------------------------------------------- calls


def _kernel(model, x, method: str) -> Tensor:
    with warnings.catch_warnings():
        # torch.func's notice that an attention kernel has no batching rule (a fallback)
        warnings.filterwarnings("ignore", message="There is a performance drop")
        kernel = empirical_ntk(model, x, mode="trace", method=method)
    return kernel.detach()  # sent back to the parent process, which refuses autograd history


def default(model, x):
    return _kernel(model, x, "auto")


def jacobian(model, x):
    return _kernel(model, x, "jacobian")


# ---------------------------------------------------------------------------------- table


@dataclass(frozen=True)
class Row:
    name: str
    setup: Callable
    min_ratio: float | None = None  # goal: jacobian time / default time at least this
    max_peak_mib: float | None = None  # goal: peak memory of the default method below this
    reference: bool = True  # measure method="jacobian" too
    repeats: int = 3  # of the default method, after one warm-up call
    note: str = ""


ROWS = [
    Row("modular MLP (nn.Linear)", setup_mlp, min_ratio=100),
    Row("modular MLP (raw params)", setup_raw_mlp, min_ratio=100),
    Row(
        "raw transformer (einsum)",
        setup_transformer_subset,
        min_ratio=20,
        note=f"{TRANSFORMER_SUBSET} of the 841 grid points",
    ),
    Row(
        "raw transformer (einsum)",
        setup_transformer_grid,
        max_peak_mib=2048,
        reference=False,
        repeats=1,
        note="all grid points; jacobian not run (N*C*P floats: ~20 GB)",
    ),
    Row("nn.TransformerEncoder x2", setup_encoder, min_ratio=10),
    Row("GPT-2 Conv1D block", setup_gpt, min_ratio=10, repeats=1),
]

HEADER = (
    f"{'model':<26}{'N':>5} {'mode':<6}{'P':>8}{'default s':>11}{'jacobian s':>12}"
    f"{'ratio':>7}  {'goal':<14}{'met':<5}{'rel err':>9}{'def MiB':>9}{'jac MiB':>9}  note"
)


def _row(row: Row) -> tuple[str, list[str]]:
    """The printed row, and the parameters the default method sends to the generic route."""
    model, x = row.setup()
    params = sum(p.numel() for p in model.parameters())
    routes = ntk_plan(model, x, mode="trace").routes()
    generic = [name for name, route in routes.items() if route == "generic"]
    fast = measure(row.setup, default, repeats=row.repeats, warmup=1)
    ratio = err = slow_s = slow_mib = "-"
    if row.reference:
        slow = measure(row.setup, jacobian, repeats=1, warmup=0)
        speedup = slow["seconds"] / fast["seconds"]
        ratio, slow_s = f"{speedup:.0f}x", f"{slow['seconds']:.2f}"
        err = f"{relative_error(fast['result'], slow['result']):.1e}"
        slow_mib = f"{slow['peak_mib']:.0f}"
    if row.min_ratio is not None:
        goal = f"ratio >= {row.min_ratio:g}x"
        met = row.reference and speedup >= row.min_ratio
    else:
        goal = f"peak < {row.max_peak_mib / 1024:g} GB"
        met = fast["peak_mib"] < row.max_peak_mib
    line = (
        f"{row.name:<26}{len(x):>5} {'trace':<6}{params:>8}{fast['seconds']:>11.3f}{slow_s:>12}"
        f"{ratio:>7}  {goal:<14}{'yes' if met else 'NO':<5}{err:>9}{fast['peak_mib']:>9.0f}"
        f"{slow_mib:>9}  {row.note}"
    )
    return line, generic


def main() -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, trace eNTK")
    print(
        "default: method='auto', median of the calls after one warm-up; jacobian: "
        "method='jacobian' (torch.func reference), one call"
    )
    print("s: wall seconds; MiB: peak resident memory added above model and data")
    print("each measurement in a fresh process; rel err: |K_default - K_jac|_F / |K_jac|_F")
    print()
    print(HEADER)
    generic = {}
    for row in ROWS:
        line, names = _row(row)
        print(line, flush=True)
        if names:
            generic[row.name] = names
    print()
    print(f"parameters on the generic (torch.func) route: {'none' if not generic else ''}")
    for name, names in generic.items():
        print(f"  {name}: {', '.join(names)}")
    print()
    model, x = setup_transformer_subset()
    print(f"ntk_plan of the raw transformer on {len(x)} points:")
    print(ntk_plan(model, x, mode="trace"))


if __name__ == "__main__":
    main()
