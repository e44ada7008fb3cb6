"""Speed of the default eNTK method against ``torch.func`` as users write it, model by model.

One row per model: the default method (``method="auto"``, which recognises every parameter by
the operations that use it) and the baseline, the empirical NTK by ``torch.func`` as users write
it (``vmap(jacrev(functional_call))`` over the points, a loop of ``jacrev`` where ``vmap``
cannot run the model, then ``J J^T``; ``_harness.torch_func``, the baseline of
``hf_models.py`` too), measured in the same run, each in a fresh process, with the ratio of
their times (baseline over default), the relative Frobenius difference of their kernels and
the peak memory each added above the model and data. The package's own ``method="jacobian"``
(``torch.func`` per-example Jacobians within a memory budget) stands beside them, labelled as
such; no ratio is taken against it. Where the baseline's Jacobians of all points would pass
``--jacobian-gib`` (default 3 GiB) they are formed in chunks and only the diagonal blocks
contracted: its time is then a lower bound (marked ``>=``, the ratio too). All models are
float32, all kernels trace mode ``(N, N)``.

Rows and their goals, ratios against the baseline (printed beside the measured ratios, not
asserted):

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

Three patterns of downloaded models, in plain torch (the sizes of the small Hugging Face
configurations they stand for), each: ratio >= 10x.

6. A mask built from the token ids by data-dependent code (``tests/user_models.PaddedEncoder``,
   BERT/RoBERTa-style: mask from ``input_ids != pad``, a padding check that leaves the mask out
   when nothing is padded, ``torch.where``, position ids from the mask's cumulative sum), 2
   layers, hidden 128, 4 heads, feed-forward 512, 5 labels, vocabulary 97; 64 sequences of 8
   tokens given as ``{"input_ids", "attention_mask"}`` with lengths 3-8, and the same
   sequences unpadded as ids alone (no mask at all).
7. A tied embedding and unembedding (``Conv1DModel`` as in row 5 at GPT-2's small
   configuration: d_model 128, 4 heads, vocabulary 97, logits ``h @ wte.weight.T`` at the last
   position), 32 sequences of 8 tokens.
8. Sequence-first attention (``tests/user_models.SeqFirstEncoder``: (T, N, E) through 2 x
   ``nn.TransformerEncoderLayer(batch_first=False)``, d_model 64, 4 heads, feed-forward 256,
   with a key padding mask), 64 padded sequences of 8 tokens.

At the end: the route of every parameter of the transformer of row 3 (``ntk_plan``), any
parameter of any row that takes the ``generic`` (``torch.func``) route, and any row whose points
are not captured in batched passes (with the reason).

The load average is printed before and after: timings beside another job are unreliable. With
``--interleave`` the three run in one process, alternately (after a warm-up call of each), so
that a load on the machine slows them alike; peak memory is then not measured.

    python benchmarks/entk_speed.py [--interleave] [--jacobian-gib 3]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
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
from lightning_entk.kernel.points import num_points

from _harness import JACOBIAN_GIB, measure, relative_error, torch_func

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from user_models import Conv1DModel, PaddedEncoder, RawTransformer, SeqFirstEncoder

P, HIDDEN = 29, 512
D_MODEL, N_HEADS, D_HEAD, D_MLP = 128, 4, 32, 512
TRANSFORMER_SUBSET = 128
SEQUENCES, SEQ_LEN = 64, 8
ENC_VOCAB, ENC_D, ENC_HEADS, ENC_FF, ENC_LAYERS, ENC_CLASSES = 20, 64, 4, 256, 2, 10
GPT_VOCAB, GPT_D, GPT_HEADS, GPT_INNER = 50, 64, 4, 256
# The small Hugging Face configurations of the three patterns (BERT, GPT-2).
HF_VOCAB, HF_D, HF_HEADS, HF_FF, HF_LAYERS, HF_LABELS, HF_MIN_LEN = 97, 128, 4, 512, 2, 5, 3
TIED_SEQUENCES = 32


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


def _padded_encoder() -> PaddedEncoder:
    torch.manual_seed(0)
    return PaddedEncoder(
        vocab=HF_VOCAB, d_model=HF_D, n_heads=HF_HEADS, d_ff=HF_FF, n_layers=HF_LAYERS,
        max_len=SEQ_LEN, num_classes=HF_LABELS,
    )  # fmt: skip


def _padded_batch() -> dict[str, Tensor]:
    """Token ids in [1, vocab) with lengths 3-8, the rest the pad id 0, and their mask."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1, HF_VOCAB, (SEQUENCES, SEQ_LEN), generator=generator)
    lengths = torch.randint(HF_MIN_LEN, SEQ_LEN + 1, (SEQUENCES,), generator=generator)
    mask = (torch.arange(SEQ_LEN)[None] < lengths[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask}


def setup_padded_mask():
    return _padded_encoder(), _padded_batch()


def setup_padded_no_mask():
    ids = torch.randint(
        1, HF_VOCAB, (SEQUENCES, SEQ_LEN), generator=torch.Generator().manual_seed(0)
    )
    return _padded_encoder(), ids


def setup_tied_lm():
    torch.manual_seed(0)
    model = Conv1DModel(
        vocab=HF_VOCAB, n_embd=HF_D, n_head=HF_HEADS, n_positions=SEQ_LEN, n_inner=4 * HF_D,
        dropout=0.0, initializer_range=0.02,
    )  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    return model, torch.randint(HF_VOCAB, (TIED_SEQUENCES, SEQ_LEN), generator=generator)


def setup_seq_first():
    torch.manual_seed(0)
    model = SeqFirstEncoder(
        vocab=ENC_VOCAB, d_model=ENC_D, nhead=ENC_HEADS, dim_feedforward=ENC_FF,
        num_layers=ENC_LAYERS, max_len=SEQ_LEN, num_classes=ENC_CLASSES,
    )  # fmt: skip
    batch = _padded_batch()["input_ids"] % ENC_VOCAB  # pads stay 0, the pad id
    return model, batch


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


def baseline(model, x) -> tuple[Tensor, bool]:
    """The kernel by ``torch.func`` as users write it, and whether it is only the diagonal
    blocks (the Jacobians did not fit; see ``_harness.torch_func``)."""
    return torch_func(model, x)


INTERLEAVED_REPEATS = 3


def interleaved(model, x) -> dict:
    """The three in this one process, alternately, after one warm-up call of each: median
    seconds of each, and their results."""
    calls = {"default": default, "torch.func": baseline, "jacobian": jacobian}
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    kernels = {name: call(model, x) for name, call in calls.items()}  # warm-up
    for _ in range(INTERLEAVED_REPEATS):
        for name, call in calls.items():
            start = time.perf_counter()
            kernels[name] = call(model, x)
            seconds[name].append(time.perf_counter() - start)
    return {name: (statistics.median(seconds[name]), kernels[name]) for name in calls}


# ---------------------------------------------------------------------------------- table


@dataclass(frozen=True)
class Row:
    name: str
    setup: Callable
    min_ratio: float | None = None  # goal: torch.func time / default time at least this
    max_peak_mib: float | None = None  # goal: peak memory of the default method below this
    reference: bool = True  # measure torch.func and method="jacobian" too
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
        note="all grid points; torch.func and jacobian not run (N*C*P floats: ~20 GB)",
    ),
    Row("nn.TransformerEncoder x2", setup_encoder, min_ratio=10),
    Row("GPT-2 Conv1D block", setup_gpt, min_ratio=10, repeats=1),
    Row("mask from ids, padded", setup_padded_mask, min_ratio=10, note="dict batch, lengths 3-8"),
    Row("mask from ids, no pads", setup_padded_no_mask, min_ratio=10, note="input_ids only"),
    Row("tied embedding+unembed", setup_tied_lm, min_ratio=10, note="C = vocabulary 97"),
    Row("(T, N, E) attention x2", setup_seq_first, min_ratio=10, note="key padding mask"),
]

HEADER = (
    f"{'model':<26}{'N':>5} {'mode':<6}{'P':>8}{'default s':>11}{'torch.func s':>14}"
    f"{'ratio':>8}  {'goal':<14}{'met':<5}{'rel err':>9}{'def MiB':>9}{'tf MiB':>9}"
    f"{'method=jacobian s':>19}  note"
)


def _row(row: Row, interleave: bool) -> tuple[str, list[str], str]:
    """The printed row, the parameters the default method sends to the generic route, and
    how its points are captured when not in batched passes (with the reason)."""
    model, x = row.setup()
    params = sum(p.numel() for p in model.parameters())
    plan = ntk_plan(model, x, mode="trace")
    generic = [name for name, route in plan.routes().items() if route == "generic"]
    capture = "" if plan.capture == "batched" else f"{plan.capture} ({plan.capture_reason})"
    ratio = err = base_s = base_mib = fast_mib = own_s = "-"
    if interleave and row.reference:
        both = measure(row.setup, interleaved, repeats=1, warmup=0)["result"]
        (fast_s, fast_k), (base_seconds, (base_k, bound)) = both["default"], both["torch.func"]
        own_s = f"{both['jacobian'][0]:.2f}"
    else:
        fast = measure(row.setup, default, repeats=row.repeats, warmup=1)
        fast_s, fast_k, fast_mib = fast["seconds"], fast["result"], f"{fast['peak_mib']:.0f}"
        if row.reference:
            base = measure(row.setup, baseline, repeats=1, warmup=0)
            base_seconds, (base_k, bound) = base["seconds"], base["result"]
            base_mib = f"{base['peak_mib']:.0f}"
            own_s = f"{measure(row.setup, jacobian, repeats=1, warmup=0)['seconds']:.2f}"
    if row.reference:
        mark = ">=" if bound else ""
        if bound:  # only the diagonal blocks were formed: compare those
            fast_k = torch.where(base_k != 0, fast_k, 0)
        speedup = base_seconds / fast_s
        ratio, base_s = f"{mark}{speedup:.0f}x", f"{mark}{base_seconds:.2f}"
        err = f"{relative_error(fast_k, base_k):.1e}"
    if row.min_ratio is not None:
        goal = f"ratio >= {row.min_ratio:g}x"
        met = row.reference and speedup >= row.min_ratio
    else:
        goal = f"peak < {row.max_peak_mib / 1024:g} GB"
        met = fast_mib != "-" and float(fast_mib) < row.max_peak_mib
    line = (
        f"{row.name:<26}{num_points(x):>5} {'trace':<6}{params:>8}{fast_s:>11.3f}{base_s:>14}"
        f"{ratio:>8}  {goal:<14}{'yes' if met else 'NO':<5}{err:>9}{fast_mib:>9}"
        f"{base_mib:>9}{own_s:>19}  {row.note}"
    )
    return line, generic, capture


def _load() -> str:
    return ", ".join(f"{v:.2f}" for v in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interleave", action="store_true")
    parser.add_argument("--jacobian-gib", type=float, default=3.0)
    args = parser.parse_args()
    interleave = args.interleave
    os.environ[JACOBIAN_GIB] = str(args.jacobian_gib)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, trace eNTK")
    print(f"load average (1, 5, 15 min) before: {_load()}")
    if interleave:
        print(
            "default (method='auto'), torch.func (vmap(jacrev), as users write it) and the "
            "package's method='jacobian' alternately in one process per row, medians of "
            f"{INTERLEAVED_REPEATS} calls each after one warm-up call of each; peak memory not "
            "measured"
        )
    else:
        print(
            "default: method='auto', median of the calls after one warm-up; torch.func: "
            "vmap(jacrev) as users write it, one call; method=jacobian: the package's own "
            "torch.func route, one call, beside them (no ratio taken against it)"
        )
        print("each measurement in a fresh process")
    print("ratio: torch.func seconds / default seconds (>=: torch.func's diagonal blocks only)")
    print("s: wall seconds; MiB: peak resident memory added above model and data (tf: torch.func)")
    print("rel err: |K_default - K_torch.func|_F / |K_torch.func|_F")
    print()
    print(HEADER)
    generic, captures = {}, {}
    for row in ROWS:
        line, names, capture = _row(row, interleave)
        print(line, flush=True)
        if names:
            generic[row.name] = names
        if capture:
            captures[row.name] = capture
    print()
    print(f"load average (1, 5, 15 min) after: {_load()}")
    print(f"parameters on the generic (torch.func) route: {'none' if not generic else ''}")
    for name, names in generic.items():
        print(f"  {name}: {', '.join(names)}")
    print(f"rows whose points are not captured in batched passes: {'none' if not captures else ''}")
    for name, capture in captures.items():
        print(f"  {name}: {capture}")
    print()
    model, x = setup_transformer_subset()
    print(f"ntk_plan of the raw transformer on {len(x)} points:")
    print(ntk_plan(model, x, mode="trace"))


if __name__ == "__main__":
    main()
