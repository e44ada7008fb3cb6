"""Top eigenpairs of the flattened eNTK of a trained Toy Model of Superposition.

docs/design.md: n=50 features, m=40 hidden, sparsity S=0.9, N=500 points, trained 5000
full-batch Adam steps; the flattened kernel has C*N = 25000 rows but rank <= P = m n + n = 2050.
Output weights are the paper's importance rescaling I^(beta c / 2) with beta = 0.3.
``ntk_spectrum(k=80)`` picks its route itself; the reference is a float64 ``eigh`` of
``J^T J`` (P x P) from the same Jacobian, in the same run. Each in a fresh process; the load
average is printed before and after (timings beside another job are unreliable). Goal: a
speed-up of at least 3.3x. With ``--interleave`` both run in one process, alternately, so that
a load on the machine slows both alike (peak memory is then not measured).

    python benchmarks/tms_spectrum.py [--interleave]
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

import lightning as L
import torch

from example_modules.toy_superposition import SuperpositionDataModule, ToyModelOfSuperposition
from lightning_entk import ntk_spectrum
from lightning_entk.kernel import KernelOptions
from lightning_entk.kernel.context import ntk_context

from _harness import measure, relative_error

N_FEATURES, N_HIDDEN, SPARSITY, N_POINTS, STEPS, BETA, K = 50, 40, 0.9, 500, 5000, 0.3, 80
CHECKPOINT = f"{tempfile.gettempdir()}/tms_m{N_HIDDEN}_s{SPARSITY}.pt"


def train() -> None:
    L.seed_everything(0, verbose=False)
    data = SuperpositionDataModule(n_features=N_FEATURES, sparsity=SPARSITY, n_samples=N_POINTS)
    model = ToyModelOfSuperposition(n_features=N_FEATURES, n_hidden=N_HIDDEN)
    trainer = L.Trainer(
        max_steps=STEPS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(model, datamodule=data)
    torch.save({"state": model.state_dict(), "x": data.x}, CHECKPOINT)
    print(f"trained: {model.reconstructed_features()} features reconstructed (paper: 42)")


def setup():
    saved = torch.load(CHECKPOINT)
    model = ToyModelOfSuperposition(n_features=N_FEATURES, n_hidden=N_HIDDEN)
    model.load_state_dict(saved["state"])
    return model, saved["x"], model.importance_weights(BETA)


def top_k(model, x, weights):
    return ntk_spectrum(model, x, mode="flatten", k=K, output_weights=weights)


def reference(model, x, weights):
    options = KernelOptions(output_weights=weights, method="jacobian", batch_size=256)
    with ntk_context(model, x, None, options) as ctx:
        jac = ctx.jacobian(ctx.x1).materialized()  # (N, C, P)
    rows = jac.reshape(-1, jac.shape[-1]).to(torch.float64)
    values, _ = torch.linalg.eigh(rows.T @ rows)  # with eigenvectors, like ntk_spectrum
    return values.flip(0)[:K]


INTERLEAVED_REPEATS = 3


def interleaved(model, x, weights) -> dict:
    """Both in this one process, alternately, after one warm-up call of each: median seconds
    and the result of each."""
    calls = {"fast": top_k, "slow": reference}
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    results = {name: call(model, x, weights) for name, call in calls.items()}  # warm-up
    for _ in range(INTERLEAVED_REPEATS):
        for name, call in calls.items():
            start = time.perf_counter()
            results[name] = call(model, x, weights)
            seconds[name].append(time.perf_counter() - start)
    return {
        name: {"seconds": statistics.median(seconds[name]), "result": results[name]}
        for name in calls
    }


def main() -> None:
    interleave = "--interleave" in sys.argv[1:]
    train()
    print(f"load average (1, 5, 15 min) before: {os.getloadavg()}")
    print(f"flattened eNTK: {N_POINTS * N_FEATURES} rows, P = {N_HIDDEN * N_FEATURES + N_FEATURES}")
    if interleave:
        print(
            f"both in one process, alternately: medians of {INTERLEAVED_REPEATS} calls each after "
            "a warm-up call of each; peak memory not measured"
        )
        both = measure(setup, interleaved, repeats=1, warmup=0)["result"]
        fast, slow = both["fast"], both["slow"]
    else:
        print("each in a fresh process: median of 3 calls after a warm-up call")
        fast = measure(setup, top_k, repeats=3)
        slow = measure(setup, reference, repeats=3)
    spectrum = fast["result"]

    def peak(m: dict) -> str:
        return f"{m['peak_mib']:.0f}" if "peak_mib" in m else "-"

    row = "{:<40}{:>10.3f}{:>12}"
    print(f"{'method':<40}{'time (s)':>10}{'peak (MiB)':>12}")
    print(row.format(f"ntk_spectrum k={K}, route={spectrum.route}", fast["seconds"], peak(fast)))
    print(row.format("float64 eigh of J^T J (reference)", slow["seconds"], peak(slow)))
    print(f"speed-up: {slow['seconds'] / fast['seconds']:.1f}x")
    err = relative_error(spectrum.eigenvalues, slow["result"])
    print(f"relative difference of the top-{K} eigenvalues: {err:.1e}")
    print(f"load average (1, 5, 15 min) after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
