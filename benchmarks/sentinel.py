"""What one sentinel reading costs, against one training epoch, on three models.

The sentinel (``lightning_entk.monitor.sentinel``) reads the readout's kernel on the held-out
probe points at every epoch. Per model, in a fresh process: the median time of a reading (after
the first, which pays for the engine's discovery), the first reading, the median time of one
training epoch of the model's own loop, and their ratio: the sentinel's share of training if it
read at every epoch.

* the modular MLP (p=29, hidden 512, full batch of 589 pairs; 252 held-out probe points);
* the modular transformer (p=59, d_model 128, full batch of 1,044 pairs; 512 held-out points);
* a GPT-2-style sequence classifier (two blocks of GPT-2's ``Conv1D`` layout, n_embd 64, 4 heads,
  16 tokens, a bias-free ``score`` head on the last position, 5 labels; 2,048 training
  sequences in batches of 64, so 32 steps an epoch; 512 held-out probe points).

    python benchmarks/sentinel.py
"""

from __future__ import annotations

import functools
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from _harness import measure

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from user_models import Conv1D

READINGS = 20
EPOCHS = 3


class GPT2Classifier(nn.Module):
    """GPT-2's layout (``Conv1D`` via ``addmm``, pre-LayerNorm, causal SDPA, GELU MLP) with a
    sequence-classification head on the last position, as ``GPT2ForSequenceClassification``."""

    def __init__(self, vocab=97, n_embd=64, n_head=4, n_layer=2, n_positions=16, labels=5):
        super().__init__()
        self.n_head = n_head
        self.wte = nn.Embedding(vocab, n_embd)
        self.wpe = nn.Embedding(n_positions, n_embd)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                {
                    "ln_1": nn.LayerNorm(n_embd),
                    "c_attn": Conv1D(3 * n_embd, n_embd),
                    "c_proj": Conv1D(n_embd, n_embd),
                    "ln_2": nn.LayerNorm(n_embd),
                    "c_fc": Conv1D(4 * n_embd, n_embd),
                    "c_out": Conv1D(n_embd, 4 * n_embd),
                }
            )
            for _ in range(n_layer)
        )
        self.ln_f = nn.LayerNorm(n_embd)
        self.score = nn.Linear(n_embd, labels, bias=False)

    def forward(self, input_ids):
        b, t = input_ids.shape
        h = self.wte(input_ids) + self.wpe(torch.arange(t, device=input_ids.device))
        for block in self.blocks:
            q, k, v = block["c_attn"](block["ln_1"](h)).split(h.shape[-1], dim=2)
            q, k, v = (z.view(b, t, self.n_head, -1).transpose(1, 2) for z in (q, k, v))
            attention = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            h = h + block["c_proj"](attention.transpose(1, 2).reshape(b, t, -1))
            h = h + block["c_out"](F.gelu(block["c_fc"](block["ln_2"](h)), approximate="tanh"))
        return self.score(self.ln_f(h)[:, -1])


def setup(name: str):
    import lightning as L
    from torch.utils.data import TensorDataset

    from example_modules.modular_arithmetic import ModularArithmeticDataModule, ModularArithmeticMLP
    from example_modules.modular_transformer import (
        ModularTransformer,
        ModularTransformerDataModule,
    )
    from lightning_entk import KernelOptions, Monitor, draw_probe_set

    L.seed_everything(0, verbose=False)
    if name == "modular MLP":
        model, data = ModularArithmeticMLP(), ModularArithmeticDataModule()
        train, val = data.train_set, data.val_set
        optimizer, loss, batch = model.configure_optimizers(), model.loss, len(train)
    elif name == "modular transformer":
        model, data = ModularTransformer(), ModularTransformerDataModule()
        train, val = data.train_set, data.val_set
        optimizer, loss, batch = model.configure_optimizers(), model.loss, len(train)
    else:
        model = GPT2Classifier()
        tokens = torch.randint(0, 97, (2560, 16))
        labels = tokens[:, :4].sum(1) % 5
        train = TensorDataset(tokens[:2048], labels[:2048])
        val = TensorDataset(tokens[2048:], labels[2048:])
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        loss, batch = F.cross_entropy, 64
    probe = draw_probe_set(train, val, 1024)
    monitor = Monitor(model, probe, kernel=KernelOptions(groups=None))
    return name, model, train, optimizer, loss, batch, monitor


def run(name, model, train, optimizer, loss, batch, monitor) -> dict:
    x, y = train.tensors[:2]

    def epoch() -> float:
        began = time.perf_counter()
        model.train()
        for lo in range(0, len(x), batch):
            optimizer.zero_grad()
            loss(model(x[lo : lo + batch]), y[lo : lo + batch]).backward()
            optimizer.step()
        return time.perf_counter() - began

    def reading() -> float:
        began = time.perf_counter()
        monitor.sentinel.read(model)
        return time.perf_counter() - began

    first = reading()
    epochs = [epoch() for _ in range(EPOCHS)]
    readings = [reading() for _ in range(READINGS)]
    return {
        "name": name,
        "readout": monitor.sentinel.group,
        "points": monitor.sentinel.num_points,
        "first": first,
        "reading": statistics.median(readings),
        "epoch": statistics.median(epochs),
        "steps": -(-len(x) // batch),
    }


def main() -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(
        f"{'model':<24}{'readout':<10}{'points':>7}{'first (s)':>11}{'reading (ms)':>14}"
        f"{'epoch (ms)':>12}{'steps':>7}{'share':>8}"
    )
    for name in ("modular MLP", "modular transformer", "GPT-2-style classifier"):
        r = measure(functools.partial(setup, name), run, repeats=1, warmup=0)["result"]
        print(
            f"{r['name']:<24}{r['readout']:<10}{r['points']:>7}{r['first']:>11.3f}"
            f"{1e3 * r['reading']:>14.1f}{1e3 * r['epoch']:>12.1f}{r['steps']:>7}"
            f"{r['reading'] / r['epoch']:>8.1%}"
        )


if __name__ == "__main__":
    main()
