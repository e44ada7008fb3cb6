"""How early, and how reliably, the monitor warns of grokking, on both bundled models.

Per model it runs the demo (every default but the seed) for several seeds, and control runs of
three kinds that are not expected to generalise within the same epochs:

=================  ==========================================  ===============================
control            modular MLP (``modular_arithmetic``)        transformer (``modular_transformer``)
=================  ==========================================  ===============================
``little data``    train fraction 0.3                          train fraction 0.1
``shuffled``       training labels permuted                    training labels permuted
``no decay``       weight decay 0 and train fraction 0.5 (at   weight decay 0
                   the default 0.7 the MLP groks without it)
=================  ==========================================  ===============================

Every run gets the same monitor arguments (``--monitor``, none by default: ``ENTKMonitor()``
with the demo's cadence) and the same detector. Per run it prints the first alarm (epoch,
signal, parameter group), the epoch at which val_acc (logged every epoch) first reaches 0.5,
the lead (epochs, and as a fraction of the epochs to val_acc 0.5), the highest and final
val_acc, and what the monitor cost. A control's alarm is false when its val_acc never reached
0.5. For the transformer it also prints when the held-out pairs whose swap ``(b, a)`` was not
trained (``val_acc_swap_unseen``, which commutativity cannot answer) reach 0.5. Each run is a
fresh process; TensorBoard images are off to save time.

    python benchmarks/early_warning.py                              # both models, ~1 hour
    python benchmarks/early_warning.py --model mlp                  # ~15-25 min on 2 cores
    python benchmarks/early_warning.py --model transformer --jobs 2 # ~32 min on 2 cores
    python benchmarks/early_warning.py --seeds 2 --control-seeds 1 \\
        --monitor=--monitor.max_overhead=0.2       # the time budget instead of a cadence
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import io
import multiprocessing
import os
import tempfile
import time

GOAL_LEAD = 0.2  # of the epochs to val_acc 0.5
SWAP_UNSEEN = "val_acc_swap_unseen"
CONTROLS = {
    "mlp": {
        "little data": ("--data.train_fraction=0.3",),
        "shuffled": ("--data.shuffle_labels=true",),
        "no decay": ("--model.weight_decay=0", "--data.train_fraction=0.5"),
    },
    "transformer": {
        "little data": ("--data.train_fraction=0.1",),
        "shuffled": ("--data.shuffle_labels=true",),
        "no decay": ("--model.weight_decay=0",),
    },
}


def run_demo(
    model: str, label: str, seed: int, run_args: tuple[str, ...], log_dir: str, threads: int
) -> dict:
    """One demo run; returns its alarms, when val_acc crossed 0.5, and what the monitor
    cost."""
    import torch
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    torch.set_num_threads(threads)
    if model == "mlp":
        from example_modules.modular_arithmetic import main
    else:
        from example_modules.modular_transformer import main

    args = [
        f"--seed_everything={seed}",
        f"--data.seed={seed}",
        "--monitor.log_images=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.logger.init_args.save_dir={log_dir}",
        f"--trainer.logger.init_args.version={model}_{label.replace(' ', '_')}_{seed}",
        *run_args,
    ]
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

    accuracy = [e.value for e in events.Scalars(monitor.accuracy_key)]
    return {
        "alarms": [(t.epoch, t.kind, t.group) for t in monitor.transitions],
        "crossed": first_epoch(monitor.accuracy_key),
        "unseen_crossed": first_epoch(SWAP_UNSEEN),
        "final_acc": accuracy[-1],
        "max_acc": max(accuracy),
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
    parser.add_argument("--model", choices=["mlp", "transformer", "both"], default="both")
    parser.add_argument("--seeds", type=int, default=5, help="grokking runs")
    parser.add_argument("--control-seeds", type=int, default=2, help="runs per control kind")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (threads shared)")
    parser.add_argument(
        "--monitor",
        action="append",
        default=[],
        help="an argument for every run, e.g. --monitor=--monitor.max_overhead=0.5",
    )
    args = parser.parse_args()
    for model in list(CONTROLS) if args.model == "both" else [args.model]:
        run_model(model, args.seeds, args.control_seeds, args.jobs, tuple(args.monitor))


def run_model(
    model: str, seeds: int, control_seeds: int, jobs: int, monitor_args: tuple[str, ...]
) -> None:
    """The grokking runs and the controls of one model, then its table."""
    runs = [("grok", seed, ()) for seed in range(seeds)]
    runs += [
        (kind, seed, extra)
        for kind, extra in CONTROLS[model].items()
        for seed in range(control_seeds)
    ]
    threads = max(1, (os.cpu_count() or 1) // jobs)
    print(f"model: {model}; arguments of every run: {' '.join(monitor_args) or 'none'}")
    with tempfile.TemporaryDirectory() as log_dir:
        with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
            futures = [
                pool.submit(
                    run_in_fresh_process,
                    model,
                    label,
                    seed,
                    (*extra, *monitor_args),
                    log_dir,
                    threads,
                )
                for label, seed, extra in runs
            ]
            results = [f.result() for f in futures]
    print_table(model, runs, results)


def print_table(model: str, runs: list[tuple], results: list[dict]) -> None:
    header = (
        f"{'run':<12}{'seed':>5}{'alarm':>7}  {'signal (group)':<32}{'val>=0.5':>9}"
        f"{'lead':>6}{'share':>7}{'max val':>8}{'final':>7}{'time':>6}{'evals':>6}"
        f"{'monitor':>8}  verdict"
    )
    if model == "transformer":
        header += "  (swap-unseen >= 0.5)"
    print(header)
    print("-" * len(header))
    warned = grokked = false_alarms = 0
    for (label, seed, _), result in zip(runs, results, strict=True):
        epoch, kind, group = result["alarms"][0] if result["alarms"] else (None, "-", None)
        signal = kind + (f" ({group})" if group else "")
        crossed = result["crossed"]
        lead = None if epoch is None or crossed is None else crossed - epoch
        share = None if lead is None else lead / crossed
        if crossed is not None:
            grokked += 1
            good = share is not None and share >= GOAL_LEAD
            warned += good
            verdict = "warned in time" if good else "late or no alarm"
        elif label == "grok":
            verdict = "val_acc 0.5 not reached"
        else:
            false_alarms += len(result["alarms"])
            verdict = "false alarm" if result["alarms"] else "quiet (correct)"
        print(
            f"{label:<12}{seed:>5}{_show(epoch):>7}  {signal:<32}{_show(crossed):>9}"
            f"{_show(lead):>6}{'-' if share is None else f'{share:.2f}':>7}"
            f"{result['max_acc']:>8.3f}{result['final_acc']:>7.3f}{result['seconds']:>6.0f}"
            f"{result['evaluations']:>6}{result['monitor_share']:>8.0%}  {verdict}"
            + (f"  ({_show(result['unseen_crossed'])})" if model == "transformer" else "")
        )
        if len(result["alarms"]) > 1:
            others = ", ".join(
                f"{k}{f' ({g})' if g else ''} at {e}" for e, k, g in result["alarms"][1:]
            )
            print(f"{'':<12}later alarms: {others}")
    print("-" * len(header))
    print(
        f"grokking runs warned >= {GOAL_LEAD:.0%} of the way ahead: {warned}/{grokked}; "
        f"alarms in control runs that never reached val_acc 0.5: {false_alarms}"
    )


def _show(value) -> str:
    return "-" if value is None else str(value)


if __name__ == "__main__":
    main()
