"""What solving the monitor's linear algebra in float32 changes: on the demo's MLP (float32
kernel, 841 probe points) trained for 150 full-batch epochs, every 10 epochs, the spectrum,
cliffs, kernel regression accuracy and kernel-target alignment of the same kernel solved in
float32 (the monitor's way for a float32 model) and in float64.

    python benchmarks/float32_linalg.py
"""

from __future__ import annotations

import time

import torch

EPOCHS = 150
EVERY = 10
ALIGNMENT = "entk/kernel_target_alignment"


def main() -> None:
    from example_modules.modular_arithmetic import ModularArithmeticDataModule, ModularArithmeticMLP
    from lightning_entk.evaluation import label_metrics, spectrum_and_cliffs
    from lightning_entk.kernel import empirical_ntk
    from lightning_entk.probe import DEFAULT_MAX_PROBE_POINTS, draw_probe_set
    from lightning_entk.signals import ROUND_OFF_RTOL

    torch.manual_seed(0)
    data = ModularArithmeticDataModule()
    data.setup("fit")
    train_set, val_set = data.train_dataloader().dataset, data.val_dataloader().dataset
    probe = draw_probe_set(train_set, val_set, DEFAULT_MAX_PROBE_POINTS)
    model = ModularArithmeticMLP()
    optimizer = model.configure_optimizers()
    x, y = train_set.tensors
    print(
        f"{'epoch':>5}{'max |dλ|/λ1':>13}{'cliffs f32':>16}{'cliffs f64':>16}"
        f"{'kreg f32':>9}{'kreg f64':>9}{'|d align|':>10}{'f32 (s)':>8}{'f64 (s)':>8}"
    )
    worst = 0.0
    for epoch in range(EPOCHS + 1):
        if epoch % EVERY == 0:
            kernel = empirical_ntk(model, probe.x)
            solved = {}
            for dtype in (torch.float32, torch.float64):
                start = time.perf_counter()
                spectrum, cliffs, _ = spectrum_and_cliffs(kernel.to(dtype), None)
                labels = label_metrics(
                    kernel.to(dtype), probe, "trace", ROUND_OFF_RTOL[torch.float32]
                )
                solved[dtype] = (
                    spectrum.eigenvalues.double(),
                    cliffs,
                    labels,
                    time.perf_counter() - start,
                )
            (v32, c32, l32, t32), (v64, c64, l64, t64) = solved.values()
            error = float((v32 - v64).abs().max() / v64[0])
            worst = max(worst, error)
            print(
                f"{epoch:>5}{error:>13.1e}{[c.rank for c in c32]!s:>16}"
                f"{[c.rank for c in c64]!s:>16}{l32['entk/kernel_regression_acc']:>9.3f}"
                f"{l64['entk/kernel_regression_acc']:>9.3f}"
                f"{abs(l32[ALIGNMENT] - l64[ALIGNMENT]):>10.1e}"
                f"{t32:>8.3f}{t64:>8.3f}"
            )
        model.train()
        optimizer.zero_grad()
        model.loss(model(x), y).backward()
        optimizer.step()
    print(f"largest eigenvalue error over the run: {worst:.1e} of the top eigenvalue")


if __name__ == "__main__":
    main()
