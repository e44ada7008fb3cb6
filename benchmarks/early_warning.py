"""How early, and how reliably, the monitor warns of grokking.

Runs the demo (the modular-arithmetic MLP of DESIGN.md section 5, p=29, every default of
``python -m example_modules.modular_arithmetic``) for several seeds, and control runs with train
fraction 0.3 that are not expected to grok within the same epochs. Per run it prints the first
alarm (epoch and kind), the epoch at which val_acc first reaches 0.5, the lead (how many epochs
the alarm came before that), and every alarm of a run whose val_acc never reached 0.5 (a false
alarm). Each run is a fresh process; TensorBoard images are off to save time.

    python benchmarks/early_warning.py                 # 5 grokking seeds + 3 controls, ~12 min
    python benchmarks/early_warning.py --seeds 2 --controls 1
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import io
import multiprocessing
import tempfile
import time

GOAL_LEAD = 10  # epochs before val_acc reaches 0.5
CONTROL_TRAIN_FRACTION = 0.3


def run_demo(seed: int, train_fraction: float, log_dir: str) -> dict:
    """One demo run; returns its alarms and when val_acc crossed 0.5."""
    from example_modules.demo import main

    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # the demo's own summary
        monitor = main(
            [
                f"--seed_everything={seed}",
                f"--data.seed={seed}",
                f"--data.train_fraction={train_fraction}",
                "--monitor.log_images=false",
                "--trainer.enable_progress_bar=false",
                "--trainer.enable_model_summary=false",
                f"--trainer.logger.init_args.save_dir={log_dir}",
            ]
        )
    crossed = next(
        (r.epoch for r in monitor.history if r.metrics.get(monitor.accuracy_key, 0.0) >= 0.5),
        None,
    )
    return {
        "alarms": [(t.epoch, t.kind) for t in monitor.transitions],
        "crossed": crossed,
        "final_acc": monitor.history[-1].metrics.get(monitor.accuracy_key),
        "seconds": time.perf_counter() - start,
    }


def run_in_fresh_process(*args) -> dict:
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(run_demo, *args).result()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5, help="grokking runs (train fraction 0.7)")
    parser.add_argument("--controls", type=int, default=3, help="control runs (fraction 0.3)")
    args = parser.parse_args()

    runs = [("grok", seed, 0.7) for seed in range(args.seeds)]
    runs += [("control", seed, CONTROL_TRAIN_FRACTION) for seed in range(args.controls)]
    header = (
        f"{'run':<8}{'seed':>5}{'train frac':>11}{'alarm':>7}  {'kind':<24}"
        f"{'val_acc>=0.5':>13}{'lead':>6}{'final acc':>10}{'time (s)':>9}  verdict"
    )
    print(header)
    print("-" * len(header))
    hits = false_alarms = grokking = 0
    with tempfile.TemporaryDirectory() as log_dir:
        for label, seed, fraction in runs:
            result = run_in_fresh_process(seed, fraction, log_dir)
            alarm_epoch, kind = result["alarms"][0] if result["alarms"] else (None, "-")
            crossed = result["crossed"]
            lead = None if alarm_epoch is None or crossed is None else crossed - alarm_epoch
            if crossed is not None:
                grokking += 1
                good = lead is not None and lead >= GOAL_LEAD
                hits += good
                verdict = "warned in time" if good else "late or no alarm"
            else:
                false_alarms += len(result["alarms"])
                verdict = "false alarm" if result["alarms"] else "quiet (correct)"
            print(
                f"{label:<8}{seed:>5}{fraction:>11.1f}{_show(alarm_epoch):>7}  {kind:<24}"
                f"{_show(crossed):>13}{_show(lead):>6}{result['final_acc']:>10.2f}"
                f"{result['seconds']:>9.0f}  {verdict}"
            )
            if len(result["alarms"]) > 1:
                others = ", ".join(f"{k} at {e}" for e, k in result["alarms"][1:])
                print(f"{'':<8}later alarms: {others}")
    print("-" * len(header))
    print(
        f"grokking runs warned >= {GOAL_LEAD} epochs ahead: {hits}/{grokking}; "
        f"alarms in runs that never reached val_acc 0.5: {false_alarms}"
    )


def _show(value) -> str:
    return "-" if value is None else str(value)


if __name__ == "__main__":
    main()
