"""Per-epoch series of the signals an early warning or a forecast could use, on the bundled
models: the data from which the early-warning rule and the forecaster are chosen (on
development seeds) and then scored (on held-out seeds).

Each run trains a bundled model with a plain ``Trainer`` (``seed_everything(seed)``, the data
split seeded by the same ``seed``), and at every epoch's end records:

* the network's own ``val_acc``, ``train_acc``, ``train_loss``, ``val_loss`` (and, for the
  transformer, ``val_acc_swap_unseen``);
* on the monitor's default probe (``draw_probe_set``, up to 1,024 points, validation points held
  out), the readout's kernel (the last group of ``groups="auto"``; for these bias-free linear
  readouts ``a a'^T`` up to a constant, ``a`` the readout's input): its debiased held-out
  alignment, the same with held-out labels permuted (4 fixed permutations: the null spread),
  the alignment on training points, and the accuracy of kernel regression from the training
  points to the held-out ones;
* the parameters' squared norm, in all and per automatic group.

One JSON file per run in ``--out``. Runs are listed by ``--model``, ``--kind`` and ``--seeds``;
each is a fresh process; ``--jobs`` run at once, one thread each.

    python benchmarks/signal_series.py --model mlp --seeds 0-9 --out series
    python benchmarks/signal_series.py --model transformer --kind shuffled --seeds 0-3
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import time
from pathlib import Path

# Run kinds: data and model arguments on top of the bundled defaults.
KINDS = {
    "mlp": {
        "grok": ({}, {}),
        "little data": ({"train_fraction": 0.3}, {}),
        "shuffled": ({"shuffle_labels": True}, {}),
        "no decay": ({"train_fraction": 0.5}, {"weight_decay": 0.0}),
    },
    "transformer": {
        "grok": ({}, {}),
        "little data": ({"train_fraction": 0.1}, {}),
        "shuffled": ({"shuffle_labels": True}, {}),
        "no decay": ({}, {"weight_decay": 0.0}),
    },
}
MAX_EPOCHS = {"mlp": 300, "transformer": 2000}
CONTROL_EPOCHS = {"mlp": 300, "transformer": 1600}  # the demos' lengths
AFTER_GROKKING = {"mlp": 30, "transformer": 100}  # epochs recorded after val_acc 0.95
PERMUTATIONS = 4


def record_run(model_name: str, kind: str, seed: int, extra: dict, out: str) -> str:
    import lightning as L
    import torch
    from lightning.pytorch import Callback

    from lightning_entk.kernel.options import automatic_groups
    from lightning_entk.probe import draw_probe_set
    from lightning_entk.signals import debiased_alignment, kernel_regression_accuracy

    torch.set_num_threads(1)
    if model_name == "mlp":
        from example_modules.modular_arithmetic import (
            ModularArithmeticDataModule as Data,
        )
        from example_modules.modular_arithmetic import (
            ModularArithmeticMLP as Model,
        )
    else:
        from example_modules.modular_transformer import (
            ModularTransformer as Model,
        )
        from example_modules.modular_transformer import (
            ModularTransformerDataModule as Data,
        )
    data_args, model_args = KINDS[model_name][kind]
    data_args = {**data_args, **extra.get("data", {})}
    model_args = {**model_args, **extra.get("model", {})}
    L.seed_everything(seed, verbose=False)
    model = Model(**model_args)
    data = Data(seed=seed, **data_args)
    probe = draw_probe_set(data.train_set, data.val_set, 1024)
    names = [n for n, _ in model.named_parameters()]
    groups = automatic_groups(model, names)
    readout_group = groups[names[-1]]
    readout = dict(model.named_modules())[readout_group]
    held = probe.heldout
    targets = torch.nn.functional.one_hot(probe.y).double()
    generator = torch.Generator().manual_seed(1234)
    permutations = [torch.randperm(int(held.sum()), generator=generator) for _ in range(4)]
    grok_epochs = MAX_EPOCHS[model_name] if kind == "grok" else CONTROL_EPOCHS[model_name]
    grok_epochs = extra.get("max_epochs", grok_epochs)
    series: list[dict] = []

    def signals(epoch: int, metrics: dict) -> dict:
        captured = {}
        handle = readout.register_forward_hook(lambda m, i, o: captured.update(a=i[0]))
        was_training = model.training
        model.eval()
        with torch.no_grad():
            model(probe.x)
        model.train(was_training)
        handle.remove()
        a = captured["a"].reshape(len(probe), -1).double()
        kernel = a @ a.T
        k_held = kernel[held][:, held]
        y_held = targets[held]
        row = {
            "epoch": epoch,
            **{k: float(v) for k, v in metrics.items()},
            "alignment": debiased_alignment(k_held, y_held),
            "alignment_null": [debiased_alignment(k_held, y_held[p]) for p in permutations],
            "alignment_train": debiased_alignment(kernel[~held][:, ~held], targets[~held]),
            "regression": kernel_regression_accuracy(kernel, targets, held, rtol=1e-6),
            "norm2": float(sum(p.detach().double().pow(2).sum() for p in model.parameters())),
            "group_norm2": {},
        }
        for name, p in model.named_parameters():
            g = groups[name]
            row["group_norm2"][g] = row["group_norm2"].get(g, 0.0) + float(p.detach().pow(2).sum())
        return row

    class Recorder(Callback):
        grokked_at = None

        def on_train_start(self, trainer, pl_module):
            series.append(signals(0, {}))

        def on_train_epoch_end(self, trainer, pl_module):
            keys = ("val_acc", "train_acc", "train_loss", "val_loss", "val_acc_swap_unseen")
            metrics = {
                k: trainer.callback_metrics[k] for k in keys if k in trainer.callback_metrics
            }
            epoch = trainer.current_epoch + 1
            series.append(signals(epoch, metrics))
            if self.grokked_at is None and metrics.get("val_acc", 0) >= 0.95:
                self.grokked_at = epoch
            if (
                self.grokked_at is not None
                and epoch >= self.grokked_at + AFTER_GROKKING[model_name]
            ):
                trainer.should_stop = True

    start = time.perf_counter()
    trainer = L.Trainer(
        max_epochs=grok_epochs,
        callbacks=[Recorder()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=data)
    label = extra.get("label", kind.replace(" ", "_"))
    path = Path(out) / f"{model_name}_{label}_{seed}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps(
            {
                "model": model_name,
                "kind": kind,
                "label": label,
                "seed": seed,
                "data": data_args,
                "model_args": model_args,
                "readout": readout_group,
                "probe_points": len(probe),
                "heldout_points": int(held.sum()),
                "seconds": time.perf_counter() - start,
                "series": series,
            }
        )
    )
    return str(path)


def _run(*args) -> str:
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(record_run, *args).result()


def _seeds(text: str) -> list[int]:
    lo, _, hi = text.partition("-")
    return list(range(int(lo), int(hi or lo) + 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=list(KINDS), required=True)
    parser.add_argument("--kind", choices=["grok", "little data", "shuffled", "no decay"])
    parser.add_argument("--seeds", default="0-4", help="e.g. 0-4 or 7")
    parser.add_argument("--out", default="series")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--extra", default="{}", help="JSON: data, model, max_epochs, label")
    args = parser.parse_args()
    kinds = [args.kind] if args.kind else list(KINDS[args.model])
    extra = json.loads(args.extra)
    label = extra.get("label")
    runs = [
        (args.model, k, s, extra, args.out)
        for k in kinds
        for s in _seeds(args.seeds)
        if not (Path(args.out) / f"{args.model}_{label or k.replace(' ', '_')}_{s}.json").exists()
    ]
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        for path in pool.map(lambda r: _run(*r), runs):
            print(path, flush=True)


if __name__ == "__main__":
    main()
