"""Speed of the structured eNTK engine against the Jacobian-contraction reference.

The modular-arithmetic MLP of DESIGN.md section 5 (p=29, hidden 512, 841 grid points, trace
mode): both methods in one run, each in a fresh process, with the largest relative difference
between their kernels and the peak memory each added.

    python benchmarks/entk_speed.py
"""

from __future__ import annotations

import torch

from example_modules.modular_arithmetic import ModularArithmeticDataModule, ModularArithmeticMLP
from lightning_entk import empirical_ntk

from _harness import measure, relative_error

P, HIDDEN = 29, 512


def setup():
    torch.manual_seed(0)
    model = ModularArithmeticMLP(p=P, hidden=HIDDEN)
    x, _ = ModularArithmeticDataModule(p=P).grid()
    return model, x


def structured(model, x):
    return empirical_ntk(model, x, mode="trace", method="structured")


def jacobian(model, x):
    return empirical_ntk(model, x, mode="trace", method="jacobian")


def main() -> None:
    print(f"modular MLP p={P} hidden={HIDDEN}: trace eNTK on all {P * P} grid points, float32")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    fast = measure(setup, structured, repeats=5)
    slow = measure(setup, jacobian, repeats=1, warmup=0)
    err = relative_error(fast["result"], slow["result"])
    print(f"{'method':<12}{'time (s)':>12}{'peak (MiB)':>14}")
    for name, r in (("structured", fast), ("jacobian", slow)):
        print(f"{name:<12}{r['seconds']:>12.3f}{r['peak_mib']:>14.0f}")
    print(f"speed-up structured vs jacobian: {slow['seconds'] / fast['seconds']:.0f}x")
    print(f"relative difference of the kernels (Frobenius): {err:.1e}")


if __name__ == "__main__":
    main()
