"""How well the live forecast says *when* the network generalises, against baselines, on runs
whose time to generalise varies, development and held-out settings apart.

Every run trains a bundled model with ``ENTKMonitor()`` and no arguments (a fresh process each,
one after the other); the monitor forecasts, at every sentinel reading, the epoch at which
val_acc reaches 0.5 (``lightning_entk.forecast``). Scored: the forecast standing at 50% and at
75% of each run's true epoch T, as ``|predicted - T| / T``, and whether T is inside its interval.
A run without a standing forecast at that point scores an error of 1 (and no coverage).

Baselines, scored at the same points:

* ``constant``: the mean T of the development runs of the same model;
* ``twice``: twice the epoch at which the forecast is made (exact at 50% by construction);
* ``norm law``: the norm-separation law of arXiv:2603.13331, ``T = T_mem + (a + b log
  |theta_mem|^2) / (lr * weight_decay)``, with ``T_mem`` the first epoch of train_acc >= 0.99
  and ``|theta_mem|^2`` the parameters' squared norm then, ``a`` and ``b`` fitted by least
  squares on the development runs of the same model (available once T_mem has passed).

The method was set on development runs (docs/early_warning.md) before the held-out settings
were run. Control runs (that never reach val_acc 0.5) are listed with their last forecast.

    python benchmarks/forecast.py                       # ~70 min
    python benchmarks/forecast.py --model mlp           # ~10 min
"""

from __future__ import annotations

import argparse
import math
import statistics

import numpy as np
from _runs import CONTROLS, MODELS, run_in_fresh_process, show

# (label, data arguments, model arguments, seeds)
DEVELOPMENT = {
    "mlp": [
        ("default", {}, {}, (0, 1)),
        ("lr 0.03", {}, {"lr": 0.03}, (0,)),
        ("weight decay 0.02", {}, {"weight_decay": 0.02}, (0,)),
        ("train fraction 0.8", {"train_fraction": 0.8}, {}, (0,)),
    ],
    "transformer": [("default", {}, {}, (0, 1))],
}
HELD_OUT = {
    "mlp": [
        ("lr 0.02", {}, {"lr": 0.02}, (3, 4)),
        ("lr 0.08", {}, {"lr": 0.08}, (3, 4)),
        ("weight decay 0.005", {}, {"weight_decay": 0.005}, (3, 4)),
        ("train fraction 0.6", {"train_fraction": 0.6}, {}, (3, 4)),
    ],
    "transformer": [
        ("default", {}, {}, (5,)),
        ("lr 5e-3", {}, {"lr": 5e-3}, (5,)),
        ("weight decay 2", {}, {"weight_decay": 2.0}, (5,)),
        ("train fraction 0.4", {"train_fraction": 0.4}, {}, (5,)),
    ],
}
EPOCHS = {"mlp": 400, "transformer": 4000}  # long enough for the slowest setting
POINTS = (0.5, 0.75)
MEMORISED = 0.99


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=[*MODELS, "both"], default="both")
    args = parser.parse_args()
    for model in MODELS if args.model == "both" else (args.model,):
        runs = {}
        for split, settings in (("development", DEVELOPMENT), ("held-out", HELD_OUT)):
            for label, data, network, seeds in settings[model]:
                for seed in seeds:
                    runs[split, label, seed] = run_in_fresh_process(
                        model, seed, {}, epochs=EPOCHS[model], data_args=data,
                        model_args=network, stop_after_grokking=True,
                    )  # fmt: skip
        report(model, runs)
        controls(model)


def standing(forecasts: list[dict], epoch: float) -> dict | None:
    """The forecast standing at ``epoch``: the last made at or before it, if it says one."""
    made = [f for f in forecasts if f["made_at"] <= epoch]
    return made[-1] if made and made[-1]["epoch"] is not None else None


def memorised(run: dict) -> tuple[int | None, float | None]:
    """The first epoch of train_acc >= MEMORISED and the parameters' squared norm then."""
    epoch = next((e for e, v in sorted(run["train_acc"].items()) if v >= MEMORISED), None)
    return epoch, None if epoch is None else run["norm2"][epoch]


def fit_norm_law(development: list[dict]) -> tuple[float, float] | None:
    """``a, b`` of ``(T - T_mem) lr wd = a + b log |theta_mem|^2`` over the development runs."""
    rows = []
    for run in development:
        t_mem, norm2 = memorised(run)
        rate = run["hparams"]["lr"] * run["hparams"]["weight_decay"]
        if t_mem is not None and run["crossed"] is not None and rate > 0:
            rows.append((math.log(norm2), (run["crossed"] - t_mem) * rate))
    if len(rows) < 2:
        return None
    x, y = np.array(rows).T
    if np.ptp(x) == 0:
        return 0.0, float(y.mean())  # one norm: the mean delay
    b, a = np.polyfit(x, y, 1)
    return float(a), float(b)


def predictions(run: dict, at: float, constant: float, law) -> dict[str, dict | None]:
    """Each method's prediction (``epoch``, ``low``, ``high``) standing at epoch ``at``."""
    f = standing(run["monitor"]["forecasts"], at)
    found = {"forecast": f, "constant": {"epoch": constant}, "twice": {"epoch": 2 * at}}
    t_mem, norm2 = memorised(run)
    rate = run["hparams"]["lr"] * run["hparams"]["weight_decay"]
    if law is not None and t_mem is not None and t_mem <= at and rate > 0:
        found["norm law"] = {"epoch": t_mem + (law[0] + law[1] * math.log(norm2)) / rate}
    else:
        found["norm law"] = None
    return found


def report(model: str, runs: dict) -> None:
    development = [r for (split, _, _), r in runs.items() if split == "development"]
    constant = statistics.mean(r["crossed"] for r in development if r["crossed"] is not None)
    law = fit_norm_law(development)
    print(f"\n{model}: forecast of the epoch T of val_acc >= 0.5 (ENTKMonitor(), no arguments)")
    print(f"constant baseline {constant:.0f}; norm law a, b = {law}")
    header = f"{'split':<12}{'setting':<20}{'seed':>5}{'T':>6}"
    for p in POINTS:
        header += f"{f'at {p:.0%}: forecast [interval]':>32}{'error':>8}"
    print(header)
    print("-" * len(header))
    errors = {}  # (split, method, point) -> errors
    covered = {}  # (split, point) -> [bool]
    for (split, label, seed), run in runs.items():
        t = run["crossed"]
        line = f"{split:<12}{label:<20}{seed:>5}{show(t):>6}"
        if t is None:
            print(line + "  val_acc 0.5 not reached")
            continue
        for p in POINTS:
            at = round(p * t)
            found = predictions(run, at, constant, law)
            for method, pred in found.items():
                error = 1.0 if pred is None else abs(pred["epoch"] - t) / t
                errors.setdefault((split, method, p), []).append(error)
            f = found["forecast"]
            inside = f is not None and f["low"] <= t <= f["high"]
            covered.setdefault((split, p), []).append(inside)
            cell = "none" if f is None else f"{f['epoch']:.0f} [{f['low']:.0f}, {f['high']:.0f}]"
            line += f"{cell:>32}{errors[split, 'forecast', p][-1]:>8.1%}"
        print(line)
    print("-" * len(header))
    for split in ("development", "held-out"):
        for p in POINTS:
            if (split, p) not in covered:
                continue
            cells = [
                f"{m} {statistics.median(errors[split, m, p]):.1%} / "
                f"{statistics.mean(errors[split, m, p]):.1%}"
                for m in ("forecast", "constant", "twice", "norm law")
            ]
            coverage = sum(covered[split, p]) / len(covered[split, p])
            print(
                f"{split:<12} at {p:.0%}: median / mean error: {'; '.join(cells)}; "
                f"T inside the interval {coverage:.0%}"
            )


def controls(model: str) -> None:
    """One run of each control kind: its last forecast (none expected)."""
    print(f"{model} controls (val_acc never reaches 0.5):")
    for kind, (data, network) in CONTROLS[model].items():
        run = run_in_fresh_process(model, 0, {}, data_args=data, model_args=network)
        forecasts = run["monitor"]["forecasts"]
        said = [f for f in forecasts if f["epoch"] is not None]
        last = forecasts[-1] if forecasts else None
        state = "no forecast ever" if not said else (
            f"{len(said)} forecasts while its alignment rose; the last "
            + ("says nothing is coming" if last["epoch"] is None else f"says {last['epoch']:.0f}")
        )  # fmt: skip
        print(f"    {kind:<14} max val_acc {max(run['val_acc'].values()):.3f}: {state}")


if __name__ == "__main__":
    main()
