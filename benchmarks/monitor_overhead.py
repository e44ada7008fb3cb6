"""What the monitor costs with no arguments, on both demos, and how early it warns beside a dense
schedule of full evaluations.

Per model (the demos' runs: the modular MLP, seed 0, 300 epochs; the modular transformer, seed
4, 1,600 epochs; each run in a fresh process, one after the other, nothing else running):

* plain training, no monitor;
* ``ENTKMonitor()``: the sentinel at every epoch its share allows, full evaluations within the
  default time budget;
* a dense cadence of full evaluations (``every_n_epochs`` 1 for the MLP, 10 for the
  transformer), the sentinel beside it: as early as any schedule can warn.

Per run: wall time of ``trainer.fit``, overhead over plain training, sentinel readings and full
evaluations with the seconds of each tier, the first alarm, the epoch at which val_acc (read at
every epoch) first reaches 0.5, and the lead. Then the default's alarm against the dense run's.

    python benchmarks/monitor_overhead.py                    # both demos, ~25 min
    python benchmarks/monitor_overhead.py --model mlp        # ~3 min
"""

from __future__ import annotations

import argparse

import torch
from _runs import DEMO_EPOCHS, DEMO_SEED, MODELS, lead, run_in_fresh_process, show

DENSE = {"mlp": 1, "transformer": 10}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=[*MODELS, "both"], default="both")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for model in MODELS if args.model == "both" else (args.model,):
        runs = {
            "without monitor": None,
            "ENTKMonitor()": {},
            f"every_n_epochs={DENSE[model]}": {"every_n_epochs": DENSE[model]},
        }
        seed, epochs = DEMO_SEED[model], DEMO_EPOCHS[model]
        print(f"\n{model}, seed {seed}, {epochs} epochs")
        header = (
            f"{'run':<20}{'wall (s)':>9}{'overhead':>9}{'readings':>9}{'sentinel (s)':>13}"
            f"{'full evals':>11}{'evals (s)':>10}{'images (s)':>11}  {'first alarm':<32}"
            f"{'val>=0.5':>9}{'lead':>12}"
        )
        print(header)
        print("-" * len(header))
        results = {
            label: run_in_fresh_process(model, seed, options) for label, options in runs.items()
        }
        plain = results["without monitor"]["seconds"]
        alarms = {}
        for label, r in results.items():
            m = r["monitor"]
            alarm = m["alarms"][0] if m and m["alarms"] else None
            alarms[label] = alarm
            epochs_ahead, share = lead(alarm and alarm[0], r["crossed"])
            spent = m["spent"] if m else {}
            print(
                f"{label:<20}{r['seconds']:>9.1f}"
                f"{'' if m is None else format((r['seconds'] - plain) / plain, '.0%'):>9}"
                f"{show(m and m['readings']):>9}{spent.get('sentinel', 0.0):>13.1f}"
                f"{show(m and m['evaluations']):>11}{spent.get('evaluation', 0.0):>10.1f}"
                f"{spent.get('images', 0.0):>11.1f}  "
                f"{'-' if alarm is None else f'epoch {alarm[0]} {alarm[1]}':<32}"
                f"{show(r['crossed']):>9}"
                f"{'-' if share is None else f'{epochs_ahead} ({share:.0%})':>12}"
            )
        default, dense = alarms["ENTKMonitor()"], alarms[list(runs)[-1]]
        if default and dense:
            print(f"default's first alarm {default[0] - dense[0]:+d} epochs from the dense run's")


if __name__ == "__main__":
    main()
