"""The early warning and the forecast on grokking setups of several kinds, side by side with the
signals users already have: the development suite (``_suite.py``: five setups, each with a
control that never generalises) and the two bundled models.

Three steps:

``record``
    Development series: each run trained with a plain ``Trainer`` and, at every epoch's end, the
    sentinel's own reading (``Sentinel.read``: the readout's debiased alignment on held-out and
    training probe points, on the monitor's default probe) beside what the baselines read: the
    validation loss, ILDR of the readout's input on the validation points, the parameters'
    norm. One JSON file per run in ``--out``.
``choose``
    Candidate rules scored on the recorded series, each with one setup held out at a time
    (leave-one-setup-out): per held-out setup, the candidate's level chosen on the others.
``score``
    Held-out runs with the monitor itself, ``ENTKMonitor()`` with no arguments, and the three
    baselines read at every epoch of the same runs: per setup and seed the alarm, the epoch of
    generalisation (val_acc 0.5; 0.75 for the two-class parity), the lead as a share of the way,
    the baselines' leads, the forecast standing at 50% and 75% of the way with its interval;
    and the controls.

    python benchmarks/grokking_suite.py record --seeds 0-2 --control-seeds 0 --out DIR
    python benchmarks/grokking_suite.py choose --out DIR
    python benchmarks/grokking_suite.py score --seeds 3-6 --control-seeds 1 --out DIR

The digits setup needs scikit-learn (``pip install -e .[bench]``).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import multiprocessing
import statistics
import tempfile
import time
from pathlib import Path

import _suite
from _runs import CONTROLS

BUNDLED = ("mlp", "transformer")
MAX_EPOCHS = {
    "modsub": 700,
    "s4": 1000,
    "digits": 1600,
    "parity": 700,
    "mul_ln": 600,
    "mlp": 300,
    "transformer": 2000,
}
PAST = 1.1  # a grokking run stops at this many times the epoch of generalisation
ILDR_FACTOR = 2.5  # of its early baseline (arXiv:2604.20923)
EARLY = 5  # readings (epochs 1-5) whose median is a baseline's early level
VAL_POINTS = 512  # validation points ILDR reads, at most
POINTS = (0.5, 0.75)
GOAL_LEAD = 0.2  # of the way to generalisation, at which the forecast is scored


def level(setup: str) -> float:
    return 0.5 if setup in BUNDLED else _suite.level(setup)


def _build(setup: str, seed: int, control: str | None):
    """Network and data of one run: ``control`` names the bundled models' control kind, or is
    ``"control"`` for a suite setup's own."""
    import lightning as L

    if setup in BUNDLED:
        if setup == "mlp":
            from example_modules.modular_arithmetic import ModularArithmeticDataModule as Data
            from example_modules.modular_arithmetic import ModularArithmeticMLP as Model
        else:
            from example_modules.modular_transformer import ModularTransformer as Model
            from example_modules.modular_transformer import ModularTransformerDataModule as Data
        data_args, model_args = CONTROLS[setup][control] if control else ({}, {})
        L.seed_everything(seed, verbose=False)
        model = Model(**model_args)
        data = Data(seed=seed, **data_args)
        data.setup("fit")
        return model, data
    L.seed_everything(seed, verbose=False)
    return _suite.build(setup, seed, control is not None)


def _readout_input(model, group: str, x):
    """The input of the readout module ``group`` on ``x``, flattened per point."""
    import torch

    captured = {}
    module = dict(model.named_modules())[group]
    handle = module.register_forward_hook(lambda m, i, o: captured.update(a=i[0]))
    was = model.training
    model.eval()
    with torch.no_grad():
        model(x)
    model.train(was)
    handle.remove()
    return captured["a"].reshape(len(x), -1).double()


def _fit(setup: str, seed: int, control: str | None, monitored: bool, out: str | None) -> dict:
    """One run; per epoch the baselines' inputs (and, unmonitored, the sentinel's reading)."""
    import lightning as L
    import torch
    from lightning.pytorch import Callback

    from lightning_entk import ENTKMonitor, keys
    from lightning_entk.kernel import KernelOptions
    from lightning_entk.monitor.sentinel import Sentinel
    from lightning_entk.probe import draw_probe_set

    torch.set_num_threads(1)
    path = _path(out, setup, seed, control) if out else None
    if path is not None and path.exists():  # recorded already (by another process)
        return json.loads(path.read_text())
    model, data = _build(setup, seed, control)
    goal = level(setup)
    sentinel = None
    if not monitored:
        sentinel = Sentinel()
        probe = draw_probe_set(data.train_set, data.val_set, 1024)
        reason = sentinel.setup(model, probe, KernelOptions(groups="auto"))
        if reason:
            raise RuntimeError(reason)
        group = sentinel.group
    else:
        from lightning_entk.kernel.options import automatic_groups

        names = [n for n, _ in model.named_parameters()]
        group = keys.readout_group(automatic_groups(model, names))
    x_val, y_val = data.val_set[: min(VAL_POINTS, len(data.val_set))][:2]
    series: list[dict] = []

    class Recorder(Callback):
        crossed = None

        def row(self, epoch, metrics):
            row = {"epoch": epoch, **metrics}
            h = _readout_input(model, group, x_val)
            row["ildr"] = _suite.ildr(h, y_val)
            row["norm"] = math.sqrt(
                sum(float(p.detach().double().pow(2).sum()) for p in model.parameters())
            )
            if sentinel is not None:
                values = sentinel.read(model)
                row["h"] = values[keys.SENTINEL_ALIGNMENT]
                row["g"] = values[keys.SENTINEL_TRAIN_ALIGNMENT]
            series.append(row)

        def on_train_start(self, trainer, pl_module):
            if sentinel is not None:
                self.row(0, {})

        def on_train_epoch_end(self, trainer, pl_module):
            names = ("val_acc", "val_loss", "train_acc", "train_loss")
            got = trainer.callback_metrics
            metrics = {k: float(got[k]) for k in names if k in got}
            epoch = trainer.current_epoch + 1
            self.row(epoch, metrics)
            if self.crossed is None and metrics.get("val_acc", 0) >= goal:
                self.crossed = epoch
            if self.crossed is not None and epoch >= PAST * self.crossed:
                trainer.should_stop = True

    recorder = Recorder()
    callbacks = [recorder]
    watcher = ENTKMonitor() if monitored else None
    if watcher is not None:
        callbacks.append(watcher)
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as log_dir:
        trainer = L.Trainer(
            max_epochs=MAX_EPOCHS[setup],
            callbacks=callbacks,
            logger=L.pytorch.loggers.TensorBoardLogger(log_dir) if monitored else False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            log_every_n_steps=1,
        )
        trainer.fit(model, datamodule=data)
    result = {
        "setup": setup,
        "seed": seed,
        "control": control,
        "level": goal,
        "crossed": recorder.crossed,
        "seconds": time.perf_counter() - began,
        "readout": group,
        "series": series,
    }
    if watcher is not None:
        result["alarms"] = [(t.epoch, t.kind, t.evidence) for t in watcher.transitions]
        result["forecasts"] = [vars(f) for f in watcher.forecasts]
        result["readings"] = len(watcher.readings)
        result["spent"] = dict(watcher.clock.spent)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result))
    return result


def _path(out: str, setup: str, seed: int, control: str | None) -> Path:
    tag = "grok" if control is None else control.replace(" ", "_")
    return Path(out) / f"{setup}_{tag}_{seed}.json"


def _kept(out: str, setup: str, seed: int, control: str | None) -> dict | None:
    """A run recorded already in ``out``, or ``None``."""
    path = _path(out, setup, seed, control)
    return json.loads(path.read_text()) if path.exists() else None


def _fresh(*args) -> dict:
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(_fit, *args).result()


def _seeds(text: str) -> list[int]:
    if not text:
        return []
    lo, _, hi = text.partition("-")
    return list(range(int(lo), int(hi or lo) + 1))


def _controls(setup: str) -> list[str]:
    return list(CONTROLS[setup]) if setup in BUNDLED else ["control"]


def runs_of(setups, seeds, control_seeds) -> list[tuple[str, int, str | None]]:
    runs = [(s, seed, None) for s in setups for seed in seeds]
    runs += [(s, seed, c) for s in setups for c in _controls(s) for seed in control_seeds]
    return runs


# ---------------------------------------------------------------------------------------------
# Rules, on a run's per-epoch series (the same functions score the development series and the
# baselines of the held-out runs).


def val_loss_rule(rows: list[dict], share: float) -> int | None:
    """The first epoch at which the validation loss has fallen ``share`` below its running
    maximum."""
    top = -math.inf
    for r in rows:
        if "val_loss" in r:
            if r["val_loss"] <= (1 - share) * top:
                return r["epoch"]
            top = max(top, r["val_loss"])
    return None


def norm_rule(rows: list[dict], share: float) -> int | None:
    """... the parameters' norm has fallen ``share`` below its running maximum."""
    top = -math.inf
    for r in rows:
        if r["epoch"] > 0:
            if r["norm"] <= (1 - share) * top:
                return r["epoch"]
            top = max(top, r["norm"])
    return None


def ildr_rule(rows: list[dict], factor: float = ILDR_FACTOR) -> int | None:
    """... ILDR is ``factor`` times its early baseline (the median of its first readings)."""
    values = [r for r in rows if r["epoch"] > 0 and math.isfinite(r["ildr"])]
    if len(values) <= EARLY:
        return None
    baseline = statistics.median(r["ildr"] for r in values[:EARLY])
    return next((r["epoch"] for r in values[EARLY:] if r["ildr"] >= factor * baseline), None)


def ratio_rule(rows: list[dict], ratio: float, floor: float) -> int | None:
    """... (the package's former rule) the held-out alignment reaches ``ratio`` of the training
    alignment, once that is at least ``floor``, from below."""
    below = False
    for r in rows:
        on = r["g"] >= floor and r["h"] >= ratio * r["g"]
        if on and below:
            return r["epoch"]
        below = below or not on
    return None


def gain_rule(rows: list[dict], ratio: float, floor: float) -> int | None:
    """... the held-out alignment's gain over its lowest level so far reaches ``ratio`` of the
    training alignment's gain over its own lowest level, once that is at least ``floor``."""
    h_low = g_low = math.inf
    for r in rows:
        h_low, g_low = min(h_low, r["h"]), min(g_low, r["g"])
        gained = r["g"] - g_low
        if gained >= floor and r["h"] - h_low >= ratio * gained:
            return r["epoch"]
    return None


# Candidates compared by ``choose``: name -> (alarm epoch from a run's rows and the parameters,
# the parameters' grid).
CANDIDATES = {
    "val loss below its running max": (
        val_loss_rule,
        [(s,) for s in (0.02, 0.05, 0.1, 0.2, 0.3, 0.5)],
    ),
    "norm below its running max": (norm_rule, [(s,) for s in (0.02, 0.05, 0.1, 0.2, 0.3)]),
    "ILDR 2.5x its early level": (ildr_rule, [(ILDR_FACTOR,)]),
    "ratio h/g, from below": (
        ratio_rule,
        [(r, f) for r in (0.15, 0.2, 0.25, 0.3, 0.4, 0.5) for f in (0.02, 0.05, 0.1)],
    ),
    "gain ratio": (
        gain_rule,
        [(r, f) for r in (0.2, 0.3, 0.4, 0.5, 0.6) for f in (0.02, 0.05, 0.1, 0.2)],
    ),
}


def _score(runs: list[dict], rule, params) -> tuple[int, int, float]:
    """(grokking runs warned >= 20% ahead, control alarms, the median lead)."""
    warned, alarms, leads = 0, 0, []
    for r in runs:
        alarm = rule(r["series"], *params)
        if r["control"] is not None:
            alarms += alarm is not None
        elif r["crossed"] is not None:
            share = lead(alarm, r["crossed"])
            leads.append(-1.0 if share is None else share)
            warned += share is not None and share >= GOAL_LEAD
    return warned, alarms, statistics.median(leads) if leads else math.nan


def choose_params(runs: list[dict], rule, grid):
    """The parameters with no control alarm that warn the most runs >= 20% ahead, of those
    the most cautious (the largest: furthest from the controls); ``None`` when every one
    raises a control alarm."""
    best = None
    for params in grid:
        warned, alarms, _ = _score(runs, rule, params)
        if alarms == 0 and (best is None or (warned, params) > best[0]):
            best = ((warned, params), params)
    return None if best is None else best[1]


def choose(out: str) -> None:
    runs = [json.loads(p.read_text()) for p in sorted(Path(out).glob("*.json"))]
    setups = sorted({r["setup"] for r in runs})
    print(f"development series: {len(runs)} runs in {out}; setups {', '.join(setups)}")
    print("per candidate, one setup held out at a time: the parameters chosen on the others,")
    print("the held-out setup's leads (share of the way; - none) and its controls' alarms\n")
    for name, (rule, grid) in CANDIDATES.items():
        print(f"{name}")
        for held in setups:
            params = choose_params([r for r in runs if r["setup"] != held], rule, grid)
            mine = [r for r in runs if r["setup"] == held]
            if params is None:
                print(f"  {held:<12}no parameters without a control alarm on the others")
                continue
            leads = [
                _pct(lead(rule(r["series"], *params), r["crossed"]))
                for r in mine
                if r["control"] is None
            ]
            false = sum(rule(r["series"], *params) is not None for r in mine if r["control"])
            print(f"  {held:<12}{params!s:<14}leads {', '.join(leads):<24}control alarms {false}")
        params = choose_params(runs, rule, grid)
        if params is not None:
            warned, alarms, median = _score(runs, rule, params)
            grok = sum(r["control"] is None for r in runs)
            print(
                f"  {'all':<12}{params!s:<14}{warned}/{grok} warned >= 20% ahead, median lead "
                f"{_pct(median)}, control alarms {alarms}"
            )
        print()
    print("forecast: (level as a share of the training alignment, spread of the interval)")
    for held in setups:
        params = choose_forecast([r for r in runs if r["setup"] != held])
        mine = [r for r in runs if r["setup"] == held]
        print(f"  {held:<12}{params!s:<14}{_describe_forecasts(_forecast_scores(mine, *params))}")
    params = choose_forecast(runs)
    print(f"  {'all':<12}{params!s:<14}{_describe_forecasts(_forecast_scores(runs, *params))}")


# The baselines' settings, chosen on the development series by ``choose`` (leave-one-setup-out
# and on all setups; docs/early_warning.md).
BASELINES = {
    "val loss": (val_loss_rule, (0.5,)),
    "ILDR": (ildr_rule, (ILDR_FACTOR,)),
    "norm": (norm_rule, (0.3,)),  # false alarms on the development controls at every share
}


def standing(forecasts: list[dict], epoch: int) -> dict | None:
    """The forecast standing at ``epoch``: the last made at or before it (``None`` if none was
    made, or the last one made abstained)."""
    made = [f for f in forecasts if f["made_at"] <= epoch]
    return made[-1] if made and made[-1]["epoch"] is not None else None


def score(setups, seeds, control_seeds, jobs: int, out: str) -> None:
    """The held-out runs; each kept in ``out`` (a run found there is not run again)."""
    runs = runs_of(setups, seeds, control_seeds)
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        list(pool.map(lambda r: _kept(out, *r) or _fresh(*r, True, out), runs))
    table(out)


def table(out: str) -> None:
    """The held-out table, from the runs kept in ``out``."""
    results = [json.loads(p.read_text()) for p in sorted(Path(out).glob("*.json"))]
    results.sort(key=lambda r: (r["setup"], r["control"] is not None, r["seed"]))
    print(
        "held-out runs, ENTKMonitor() with no arguments; leads as a share of the way to "
        "generalisation (val_acc 0.5; parity 0.75); forecasts standing at 50% and 75% of it"
    )
    header = (
        f"{'setup':<12}{'run':<12}{'seed':>4}{'alarm':>7}{'T':>6}{'lead':>6}"
        + "".join(f"{name:>10}" for name in BASELINES)
        + f"  {'forecast at 50%':<24}{'forecast at 75%':<24}{'max val':>8}"
    )
    print(header)
    print("-" * len(header))
    tally = {}
    for r in results:
        alarm = r["alarms"][0][0] if r["alarms"] else None
        crossed = r["crossed"]
        cells = []
        for rule, params in BASELINES.values():
            epoch = rule(r["series"], *params)
            cells.append(_pct(lead(epoch, crossed)) if crossed else ("alarm" if epoch else "-"))
        fc = []
        for point in POINTS:
            f = standing(r["forecasts"], round(point * crossed)) if crossed else None
            if f is None:
                fc.append("none")
            else:
                error = (f["epoch"] - crossed) / crossed
                fc.append(f"{f['epoch']:.0f} [{f['low']:.0f}, {f['high']:.0f}] {100 * error:+.0f}%")
        if not crossed:
            last = r["forecasts"][-1] if r["forecasts"] else None
            fc = [
                "-",
                "last: none" if not last or last["epoch"] is None else f"last: {last['epoch']:.0f}",
            ]
        max_val = max((row.get("val_acc", 0.0) for row in r["series"]), default=0.0)
        share = lead(alarm, crossed)
        print(
            f"{r['setup']:<12}{r['control'] or 'grok':<12}{r['seed']:>4}"
            f"{'-' if alarm is None else alarm:>7}{crossed or '-':>6}"
            f"{_pct(share) if crossed else ('alarm' if alarm else '-'):>6}"
            + "".join(f"{c:>10}" for c in cells)
            + f"  {fc[0]:<24}{fc[1]:<24}{max_val:>8.3f}"
        )
        t = tally.setdefault(r["setup"], {"warned": 0, "grok": 0, "false": 0})
        if r["control"] is None and crossed:
            t["grok"] += 1
            t["warned"] += share is not None and share >= GOAL_LEAD
        elif r["control"] is not None:
            t["false"] += alarm is not None
    for setup, t in tally.items():
        print(
            f"{setup}: warned >= 20% ahead {t['warned']}/{t['grok']}, control alarms {t['false']}"
        )


FORECAST_GRID = [(c, w) for c in (0.4, 0.45, 0.5, 0.6, 0.7) for w in (1.25, 1.5, 2.0)]


def _forecast_scores(runs: list[dict], share: float, spread: float) -> dict:
    """Per point of the way: forecasts made, their absolute errors, T inside the interval; the
    forecaster's level ``share`` of the training alignment and its ``spread``, on the recorded
    series (a reading at every epoch)."""
    from lightning_entk import forecast as fc

    saved = fc.TARGET_SHARE, fc.BAND, fc.SPREAD
    fc.TARGET_SHARE, fc.SPREAD = share, spread
    fc.BAND = (share * saved[1][0] / saved[0], share * saved[1][1] / saved[0])
    scores = {p: {"made": 0, "runs": 0, "errors": [], "inside": 0, "good": 0} for p in POINTS}
    try:
        for r in runs:
            if r["control"] is not None or r["crossed"] is None:
                continue
            rows, crossed = r["series"], r["crossed"]
            columns = [[row[k] for row in rows] for k in ("epoch", "h", "g")]
            for p in POINTS:
                made = fc.forecast(*columns, now=round(p * crossed))
                s = scores[p]
                s["runs"] += 1
                if made.epoch is not None:
                    s["made"] += 1
                    s["errors"].append(abs(made.epoch - crossed) / crossed)
                    inside = made.low <= crossed <= made.high
                    s["inside"] += inside
                    s["good"] += inside and abs(made.epoch - crossed) <= 0.15 * crossed
    finally:
        fc.TARGET_SHARE, fc.BAND, fc.SPREAD = saved
    return scores


def _describe_forecasts(scores: dict) -> str:
    parts = []
    for p, s in scores.items():
        median = _pct(statistics.median(s["errors"])) if s["errors"] else "-"
        parts.append(
            f"at {p:.0%}: made {s['made']}/{s['runs']}, median error {median}, "
            f"inside {s['inside']}/{s['made']}"
        )
    return "; ".join(parts)


def choose_forecast(runs: list[dict]):
    """The level and spread whose forecasts at 75% of the way are most often both within 15%
    of T and holding T inside the interval, then with the smallest median error."""
    best = None
    for share, spread in FORECAST_GRID:
        s = _forecast_scores(runs, share, spread)[POINTS[-1]]
        key = (s["good"], -(statistics.median(s["errors"]) if s["errors"] else 1.0))
        if best is None or key > best[0]:
            best = (key, (share, spread))
    return best[1]


def lead(alarm: int | None, crossed: int | None) -> float | None:
    if alarm is None or crossed is None:
        return None
    return (crossed - alarm) / crossed


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=["record", "choose", "score", "table"])
    parser.add_argument("--setups", default=",".join(_suite.SETUPS))
    parser.add_argument("--seeds", default="0-2")
    parser.add_argument("--control-seeds", default="0")
    parser.add_argument("--out", default="suite_series")
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    setups = args.setups.split(",")
    if args.step == "choose":
        choose(args.out)
        return
    if args.step == "table":
        table(args.out)
        return
    if args.step == "score":
        score(setups, _seeds(args.seeds), _seeds(args.control_seeds), args.jobs, args.out)
        return
    if args.step == "record":
        runs = runs_of(setups, _seeds(args.seeds), _seeds(args.control_seeds))
        todo = [r for r in runs if not _path(args.out, *r).exists()]
        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
            for r in pool.map(lambda r: _fresh(r[0], r[1], r[2], False, args.out), todo):
                print(
                    f"{r['setup']} {r['control'] or 'grok'} {r['seed']}: crossed {r['crossed']},"
                    f" {len(r['series'])} epochs, {r['seconds']:.0f} s",
                    flush=True,
                )


if __name__ == "__main__":
    main()
