"""How early, and how reliably, the monitor warns of grokking.

Runs a demo for several seeds, and control runs with a smaller train fraction that are not
expected to reach val_acc 0.5 within the same epochs. Per run it prints the first alarm (epoch
and kind), the epoch at which val_acc first reaches 0.5, the lead (how many epochs the alarm
came before that), and every alarm of a run whose val_acc never reached 0.5 (a false alarm when
it is a control). Each run is a fresh process; TensorBoard images are off to save time.

``--model mlp``: the modular-arithmetic MLP of DESIGN.md section 5 (p=29, every default of
``python -m example_modules.modular_arithmetic``), controls at train fraction 0.3.
``--model transformer``: the one-layer transformer (``python -m
example_modules.modular_transformer``, every default but the seed), controls at train fraction
0.3; it also prints when the accuracy on held-out pairs whose swap ``(b, a)`` is not trained on
(``val_acc_swap_unseen``, which commutativity cannot give) first reaches 0.5.

    python benchmarks/early_warning.py                 # 5 grokking seeds + 3 controls, ~12 min
    python benchmarks/early_warning.py --seeds 2 --controls 1
    python benchmarks/early_warning.py --model transformer --seeds 4 --controls 1 \
        --max-epochs 3000                              # ~20 min
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
GROKKING_TRAIN_FRACTION = {"mlp": 0.7, "transformer": 0.5}
SWAP_UNSEEN = "val_acc_swap_unseen"


def run_demo(
    model: str,
    seed: int,
    train_fraction: float,
    log_dir: str,
    max_epochs: int | None,
    monitor_args: tuple[str, ...] = (),
) -> dict:
    """One demo run; returns its alarms, when val_acc (logged every epoch) crossed 0.5, and
    what the monitor cost."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if model == "mlp":
        from example_modules.modular_arithmetic import main
    else:
        from example_modules.modular_transformer import main

    args = [
        f"--seed_everything={seed}",
        f"--data.seed={seed}",
        f"--data.train_fraction={train_fraction}",
        "--monitor.log_images=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.logger.init_args.save_dir={log_dir}",
        f"--trainer.logger.init_args.version=seed{seed}_fraction{train_fraction}",
    ]
    if max_epochs is not None:
        args.append(f"--trainer.max_epochs={max_epochs}")
    args += list(monitor_args)
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # the demo's own summary
        monitor = main(args)
    seconds = time.perf_counter() - start
    events = EventAccumulator(str(monitor.summary_path.parent), size_guidance={"scalars": 0})
    events.Reload()
    # logged once per epoch; ``step`` is the global step, ``epoch`` from the epoch series
    epochs = {e.step: e.value for e in events.Scalars("epoch")}

    def first_epoch(tag: str) -> int | None:
        if tag not in events.Tags()["scalars"]:
            return None
        return next((int(epochs[e.step]) + 1 for e in events.Scalars(tag) if e.value >= 0.5), None)

    return {
        "alarms": [(t.epoch, t.kind) for t in monitor.transitions],
        "crossed": first_epoch(monitor.accuracy_key),
        "unseen_crossed": first_epoch(SWAP_UNSEEN),
        "final_acc": events.Scalars(monitor.accuracy_key)[-1].value,
        "seconds": seconds,
        "evaluations": len(monitor.history),
        "monitor_share": monitor.monitor_seconds / monitor.training_seconds,
    }


def run_in_fresh_process(*args) -> dict:
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(run_demo, *args).result()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["mlp", "transformer"], default="mlp")
    parser.add_argument("--seeds", type=int, default=5, help="grokking runs (paper's fraction)")
    parser.add_argument("--controls", type=int, default=3, help="control runs (fraction 0.3)")
    parser.add_argument("--max-epochs", type=int, default=None, help="default: the demo's")
    parser.add_argument(
        "--monitor",
        action="append",
        default=[],
        help="a monitor argument for every run, e.g. --monitor=--monitor.max_overhead=0.5",
    )
    args = parser.parse_args()

    fraction = GROKKING_TRAIN_FRACTION[args.model]
    runs = [("grok", seed, fraction) for seed in range(args.seeds)]
    runs += [("control", seed, CONTROL_TRAIN_FRACTION) for seed in range(args.controls)]
    header = (
        f"{'run':<8}{'seed':>5}{'train frac':>11}{'alarm':>7}  {'kind':<24}"
        f"{'val_acc>=0.5':>13}{'lead':>6}{'final acc':>10}{'time (s)':>9}{'evals':>6}"
        f"{'monitor':>8}  verdict"
    )
    if args.model == "transformer":
        header += f"  ({SWAP_UNSEEN} >= 0.5)"
    print(header)
    print("-" * len(header))
    hits = false_alarms = grokking = 0
    with tempfile.TemporaryDirectory() as log_dir:
        for label, seed, fraction in runs:
            result = run_in_fresh_process(
                args.model, seed, fraction, log_dir, args.max_epochs, tuple(args.monitor)
            )
            alarm_epoch, kind = result["alarms"][0] if result["alarms"] else (None, "-")
            crossed = result["crossed"]
            lead = None if alarm_epoch is None or crossed is None else crossed - alarm_epoch
            if crossed is not None:
                grokking += 1
                good = lead is not None and lead >= GOAL_LEAD
                hits += good
                verdict = "warned in time" if good else "late or no alarm"
            elif label == "grok":
                verdict = "val_acc 0.5 not reached within the epochs run"
            else:
                false_alarms += len(result["alarms"])
                verdict = "false alarm" if result["alarms"] else "quiet (correct)"
            unseen = result["unseen_crossed"]
            print(
                f"{label:<8}{seed:>5}{fraction:>11.1f}{_show(alarm_epoch):>7}  {kind:<24}"
                f"{_show(crossed):>13}{_show(lead):>6}{result['final_acc']:>10.2f}"
                f"{result['seconds']:>9.0f}{result['evaluations']:>6}"
                f"{result['monitor_share']:>8.0%}  {verdict}"
                + (f"  ({_show(unseen)})" if args.model == "transformer" else "")
            )
            if len(result["alarms"]) > 1:
                others = ", ".join(f"{k} at {e}" for e, k in result["alarms"][1:])
                print(f"{'':<8}later alarms: {others}")
    print("-" * len(header))
    print(
        f"grokking runs warned >= {GOAL_LEAD} epochs ahead: {hits}/{grokking}; "
        f"alarms in control runs that never reached val_acc 0.5: {false_alarms}"
    )


def _show(value) -> str:
    return "-" if value is None else str(value)


if __name__ == "__main__":
    main()
