"""Whether the modular transformer's whole-kernel spectrum changes at its transition: a new
cliff, a cliff that moves, the effective rank.

Per development seed (0-4), the demo's run (1,600 epochs) with full evaluations of the whole
kernel (no groups) at a fixed cadence, each run in a fresh process; per evaluation the cliffs'
ranks and the effective rank beside val_acc. Printed: the cliffs and effective rank at the
start, just before val_acc reaches 0.5, just after it reaches 0.95, and at the end.

    python benchmarks/transformer_spectrum.py                  # seeds 0-4, ~20 min
    python benchmarks/transformer_spectrum.py --seeds 4 --every 50
"""

from __future__ import annotations

import argparse

import torch
from _runs import run_in_fresh_process


def describe(record: dict) -> str:
    ranks = ",".join(str(r) for r in record["cliffs"]) or "none"
    return f"{record['epoch']}: [{ranks}] r_eff {record['effective_rank']:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--every", type=int, default=50, help="epochs between evaluations")
    args = parser.parse_args()
    print(f"torch {torch.__version__}; whole kernel every {args.every} epochs")
    print()
    print("| seed | val_acc 0.5 | 0.95 | start | last before 0.5 | first after 0.95 | end |")
    print("|---|---|---|---|---|---|---|")
    from lightning_entk.kernel import KernelOptions

    for seed in args.seeds:
        r = run_in_fresh_process(
            "transformer",
            seed,
            {"every_n_epochs": args.every, "kernel": KernelOptions(), "sentinel": False},
            threads=1,
            history=True,
        )
        history = r["monitor"]["history"]
        values = r["val_acc"]
        half = next((e for e, v in sorted(values.items()) if v >= 0.5), None)
        high = next((e for e, v in sorted(values.items()) if v >= 0.95), None)
        before = [h for h in history if half is not None and h["epoch"] < half]
        after = [h for h in history if high is not None and h["epoch"] >= high]
        cells = [
            describe(history[0]),
            describe(before[-1]) if before else "-",
            describe(after[0]) if after else "-",
            describe(history[-1]),
        ]
        print(f"| {seed} | {half} | {high} | " + " | ".join(cells) + " |", flush=True)
        for h in history:
            value = values.get(h["epoch"], float("nan"))
            print(
                f"    seed {seed} epoch {h['epoch']:>5} val_acc {value:.3f} "
                f"cliffs {h['cliffs']} r_eff {h['effective_rank']:.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
