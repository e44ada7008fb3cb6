"""The scalars of one evaluation, each against its definition computed directly."""

import math

import torch

from lightning_entk.evaluation import evaluate
from lightning_entk.probe import ProbeSet


def test_evaluate_splits_its_time_into_kernel_spectrum_and_signals():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    probe = ProbeSet(torch.randn(30, 4), torch.randint(0, 3, (30,)), torch.arange(30) % 3 == 0)
    metrics = evaluate(model, probe).metrics
    parts = [metrics[f"entk/seconds/{part}"] for part in ("kernel", "spectrum", "signals")]
    assert all(part > 0 for part in parts)
    assert math.isclose(sum(parts), metrics["entk/seconds"], rel_tol=1e-9)
