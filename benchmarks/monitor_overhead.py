"""What the monitor costs with no arguments, on both demos, and where its full evaluations fall
beside its alarm and the network's accuracy.

Per model and seed (the demos' runs by default: the modular MLP, seed 0, 300 epochs; the
modular transformer, seed 4, 1,600 epochs; each run in a fresh process, one after the other):

* plain training, no monitor;
* ``ENTKMonitor()``: the sentinel at every epoch its share allows, full evaluations within the
  default time budget, placed in the transition window;
* with ``--dense``, a dense cadence of full evaluations (``every_n_epochs`` 1 for the MLP, 10
  for the transformer), the sentinel beside it.

Per run: wall time of ``trainer.fit`` and its overhead over the plain run; the monitor's own
clock (its seconds over the training seconds it measured); sentinel readings and full
evaluations with the seconds of each tier; the first alarm; the epochs of the full
evaluations; the epochs at which val_acc (read at every epoch) first reaches 0.5 and 0.95; and
each new cliff (a rank the first evaluation did not have) with the first epoch it was logged.

    python benchmarks/monitor_overhead.py                        # both demos, ~6 min
    python benchmarks/monitor_overhead.py --model mlp --seeds 0 5 6
    python benchmarks/monitor_overhead.py --model mlp --epochs 150
"""

from __future__ import annotations

import argparse

import torch
from _runs import DEMO_EPOCHS, DEMO_SEED, MODELS, run_in_fresh_process, show

DENSE = {"mlp": 1, "transformer": 10}


def row(label: str, r: dict, plain: float) -> str:
    m = r["monitor"]
    if m is None:
        cells = [label, f"{r['seconds']:.1f}", "", "", "", "", "", "", ""]
    else:
        spent = m["spent"]
        clock = sum(spent.values()) / m["training_seconds"]
        alarm = m["alarms"][0] if m["alarms"] else None
        cliffs = ", ".join(f"{rank} at {epoch}" for rank, epoch in m["new_cliffs"].items())
        cells = [
            label,
            f"{r['seconds']:.1f}",
            f"{(r['seconds'] - plain) / plain:+.0%}",
            f"{clock:.0%}",
            f"{m['readings']} ({spent.get('sentinel', 0.0):.1f})",
            f"{m['evaluations']} ({spent.get('evaluation', 0.0):.1f})",
            f"{spent.get('images', 0.0):.1f}",
            "-" if alarm is None else f"{alarm[0]} {alarm[1]}",
            ", ".join(str(e) for e in m["evaluation_epochs"]),
        ]
        cells.append(cliffs or "none")
    if m is None:
        cells.append("")
    cells += [show(r["crossed"]), show(r["crossed_high"])]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=[*MODELS, "both"], default="both")
    parser.add_argument("--seeds", type=int, nargs="+", help="default: the demo's")
    parser.add_argument("--epochs", type=int, help="default: the demo's")
    parser.add_argument("--dense", action="store_true", help="also a dense fixed cadence")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print(
        "| run | wall (s) | wall overhead | monitor's clock | sentinel readings (s) "
        "| full evaluations (s) | images (s) | first alarm | full evaluations at epochs "
        "| new cliffs: first logged | val_acc >= 0.5 | >= 0.95 |"
    )
    print("|---" * 12 + "|")
    for model in MODELS if args.model == "both" else (args.model,):
        epochs = args.epochs or DEMO_EPOCHS[model]
        for seed in args.seeds or [DEMO_SEED[model]]:
            runs = {"no monitor": None, "`ENTKMonitor()`": {}}
            if args.dense:
                runs[f"`every_n_epochs={DENSE[model]}`"] = {"every_n_epochs": DENSE[model]}
            results = {
                label: run_in_fresh_process(model, seed, options, epochs=epochs)
                for label, options in runs.items()
            }
            plain = results["no monitor"]["seconds"]
            for label, r in results.items():
                print(row(f"{model}, seed {seed}, {epochs} epochs, {label}", r, plain), flush=True)


if __name__ == "__main__":
    main()
