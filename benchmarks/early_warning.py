"""How early, and how reliably, ``ENTKMonitor()`` with no arguments warns of grokking, on both
bundled models, and what it costs against plain training of the same seed.

Per model: grokking runs (the demo's setup, one per seed) and control runs of three kinds that
do not generalise within the demo's epochs:

=================  ==========================================  ===============================
control            modular MLP                                 transformer
=================  ==========================================  ===============================
``little data``    train fraction 0.3                          train fraction 0.1
``shuffled``       training labels permuted                    training labels permuted
``no decay``       weight decay 0 and train fraction 0.5 (at   weight decay 0
                   the default 0.7 the MLP groks without it)
=================  ==========================================  ===============================

Every run trains twice, in fresh processes one after the other: without the monitor and with
``ENTKMonitor()``. Per run: the first alarm (epoch, signal, parameter group), the epoch at which
val_acc (read every epoch) first reaches 0.5, the lead (epochs, and as a share of the epochs to
val_acc 0.5), the highest val_acc, and the monitor's overhead over the plain run. A control's
alarm is false when its val_acc never reached 0.5.

    python benchmarks/early_warning.py                                   # both, ~80 min
    python benchmarks/early_warning.py --model mlp                       # ~6 min
    python benchmarks/early_warning.py --seeds 5-9 --control-seeds 2-3   # held-out seeds
"""

from __future__ import annotations

import argparse

from _runs import CONTROLS, MODELS, lead, run_in_fresh_process, show

GOAL_LEAD = 0.2  # of the epochs to val_acc 0.5


def seeds(text: str) -> list[int]:
    lo, _, hi = text.partition("-")
    return list(range(int(lo), int(hi or lo) + 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=[*MODELS, "both"], default="both")
    parser.add_argument("--seeds", default="0-4", help="grokking runs, e.g. 0-4")
    parser.add_argument("--control-seeds", default="0-1", help="runs per control kind")
    args = parser.parse_args()
    for model in MODELS if args.model == "both" else (args.model,):
        runs = [("grok", s, {}, {}) for s in seeds(args.seeds)]
        runs += [
            (kind, s, data, network)
            for kind, (data, network) in CONTROLS[model].items()
            for s in seeds(args.control_seeds)
        ]
        print_header(model)
        warned = grokked = false_alarms = 0
        for kind, seed, data, network in runs:
            kwargs = {"data_args": data, "model_args": network}
            plain = run_in_fresh_process(model, seed, None, **kwargs)
            watched = run_in_fresh_process(model, seed, {}, **kwargs)
            ok = print_row(kind, seed, plain, watched)
            if watched["crossed"] is not None:
                grokked += 1
                warned += ok
            elif kind != "grok":
                false_alarms += len(watched["monitor"]["alarms"])
        print(
            f"grokking runs warned >= {GOAL_LEAD:.0%} of the way ahead: {warned}/{grokked}; "
            f"alarms in control runs that never reached val_acc 0.5: {false_alarms}\n"
        )


def print_header(model: str) -> None:
    header = (
        f"{'run':<12}{'seed':>5}{'alarm':>7}  {'signal (group)':<30}{'val>=0.5':>9}{'lead':>6}"
        f"{'share':>7}{'max val':>8}{'plain (s)':>10}{'monitored (s)':>14}{'overhead':>9}"
        f"{'readings':>9}{'evals':>6}  verdict"
    )
    print(f"model: {model}; every run ENTKMonitor() with no arguments")
    print(header)
    print("-" * len(header))


def print_row(kind: str, seed: int, plain: dict, watched: dict) -> bool:
    """One run's line; whether it was warned at least ``GOAL_LEAD`` ahead."""
    m = watched["monitor"]
    epoch, signal, group = m["alarms"][0] if m["alarms"] else (None, "-", None)
    crossed = watched["crossed"]
    ahead, share = lead(epoch, crossed)
    good = share is not None and share >= GOAL_LEAD
    if crossed is not None:
        verdict = "warned in time" if good else "late or no alarm"
    elif kind == "grok":
        verdict = "val_acc 0.5 not reached"
    else:
        verdict = "false alarm" if m["alarms"] else "quiet (correct)"
    overhead = (watched["seconds"] - plain["seconds"]) / plain["seconds"]
    print(
        f"{kind:<12}{seed:>5}{show(epoch):>7}  {signal + (f' ({group})' if group else ''):<30}"
        f"{show(crossed):>9}{show(ahead):>6}{show(share, '.2f'):>7}"
        f"{max(watched['val_acc'].values()):>8.3f}{plain['seconds']:>10.1f}"
        f"{watched['seconds']:>14.1f}{overhead:>9.0%}{m['readings']:>9}{m['evaluations']:>6}"
        f"  {verdict}"
    )
    if plain["crossed"] != crossed:
        print(f"{'':<12}(val_acc 0.5 at {show(plain['crossed'])} without the monitor)")
    for e, s, g in m["alarms"][1:]:
        print(f"{'':<12}later alarm: {s}{f' ({g})' if g else ''} at {e}")
    return good


if __name__ == "__main__":
    main()
