"""Training runs of the bundled models as the demos make them, with or without the monitor,
for the benchmarks that compare the monitor's alarms and cost with the network's own accuracy.

:func:`fit_bundled` trains one model under a plain Lightning ``Trainer`` (the demo's settings:
a TensorBoard logger, ``log_every_n_steps=1``, no checkpoints, no progress bar) and returns
what the benchmarks read: the wall time of ``trainer.fit``, the validation accuracy of every
epoch, the monitor (or ``None``) and the epoch at which val_acc first reached 0.5. Call it in a
fresh process (``run_in_fresh_process``) so that runs do not share caches or threads.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import tempfile
import time

MODELS = ("mlp", "transformer")
DEMO_EPOCHS = {"mlp": 300, "transformer": 1600}
DEMO_SEED = {"mlp": 0, "transformer": 4}
# Control runs that do not generalise within the demo's epochs: data and model arguments.
CONTROLS = {
    "mlp": {
        "little data": ({"train_fraction": 0.3}, {}),
        "shuffled": ({"shuffle_labels": True}, {}),
        "no decay": ({"train_fraction": 0.5}, {"weight_decay": 0.0}),
    },
    "transformer": {
        "little data": ({"train_fraction": 0.1}, {}),
        "shuffled": ({"shuffle_labels": True}, {}),
        "no decay": ({}, {"weight_decay": 0.0}),
    },
}


def fit_bundled(
    model: str,
    seed: int,
    monitor: dict | None,
    *,
    epochs: int | None = None,
    data_args: dict | None = None,
    model_args: dict | None = None,
    threads: int | None = None,
    stop_after_grokking: bool = False,
    history: bool = False,
) -> dict:
    """Train bundled ``model`` (``"mlp"`` or ``"transformer"``) for ``epochs`` (the demo's by
    default) with ``seed`` (``seed_everything`` and the data split), with
    ``ENTKMonitor(**monitor)`` or without a monitor (``None``); with ``stop_after_grokking``,
    stop at the first epoch of val_acc >= 0.5 (what a forecast of that epoch needs); with
    ``history``, each full evaluation's epoch, cliffs and effective rank."""
    import lightning as L
    import torch
    from lightning.pytorch import Callback
    from lightning.pytorch.loggers import TensorBoardLogger

    from lightning_entk import ENTKMonitor

    if threads is not None:
        torch.set_num_threads(threads)
    if model == "mlp":
        from example_modules.modular_arithmetic import ModularArithmeticDataModule as Data
        from example_modules.modular_arithmetic import ModularArithmeticMLP as Model
    else:
        from example_modules.modular_transformer import ModularTransformer as Model
        from example_modules.modular_transformer import ModularTransformerDataModule as Data

    class Accuracy(Callback):
        """val_acc, train_acc and the parameters' squared norm at every epoch's end."""

        def __init__(self):
            self.values, self.train, self.norm2 = {}, {}, {}

        def on_validation_epoch_end(self, trainer, pl_module):
            if not trainer.sanity_checking and "val_acc" in trainer.callback_metrics:
                epoch = trainer.current_epoch + 1  # completed epochs, as the monitor counts
                self.values[epoch] = float(trainer.callback_metrics["val_acc"])
                if stop_after_grokking and self.values[epoch] >= 0.5:
                    trainer.should_stop = True

        def on_train_epoch_end(self, trainer, pl_module):
            epoch = trainer.current_epoch + 1
            if "train_acc" in trainer.callback_metrics:
                self.train[epoch] = float(trainer.callback_metrics["train_acc"])
            self.norm2[epoch] = float(
                sum(p.detach().double().pow(2).sum() for p in pl_module.parameters())
            )

    L.seed_everything(seed, verbose=False)
    network = Model(**(model_args or {}))
    data = Data(seed=seed, **(data_args or {}))
    accuracy = Accuracy()
    watcher = None if monitor is None else ENTKMonitor(**monitor)
    with tempfile.TemporaryDirectory() as log_dir:
        trainer = L.Trainer(
            max_epochs=epochs or DEMO_EPOCHS[model],
            callbacks=[accuracy] + ([watcher] if watcher else []),
            logger=TensorBoardLogger(log_dir),
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            log_every_n_steps=1,
        )
        began = time.perf_counter()
        trainer.fit(network, datamodule=data)
        seconds = time.perf_counter() - began
    crossed = next((e for e, v in sorted(accuracy.values.items()) if v >= 0.5), None)
    high = next((e for e, v in sorted(accuracy.values.items()) if v >= 0.95), None)
    result = {
        "seconds": seconds,
        "val_acc": accuracy.values,
        "train_acc": accuracy.train,
        "norm2": accuracy.norm2,
        "crossed": crossed,
        "crossed_high": high,
        "hparams": {k: network.hparams[k] for k in ("lr", "weight_decay")},
        "monitor": None,
    }
    if watcher is not None:
        result["monitor"] = {
            "alarms": [(t.epoch, t.kind, t.group) for t in watcher.transitions],
            "readings": len(watcher.readings),
            "evaluations": len(watcher.history),
            "spent": dict(watcher.clock.spent),
            "evaluation_epochs": [r.epoch for r in watcher.history],
            "training_seconds": watcher.clock.training_seconds(),
            "new_cliffs": watcher.new_cliffs(),
            "forecasts": [vars(f) for f in watcher.forecasts],
            "summary": watcher.summary(),
        }
        if history:
            result["monitor"]["history"] = [
                {
                    "epoch": h.epoch,
                    "cliffs": [c.rank for c in h.cliffs],
                    "effective_rank": h.metrics.get("entk/effective_rank", float("nan")),
                }
                for h in watcher.history
            ]
    return result


def run_in_fresh_process(*args, **kwargs) -> dict:
    """:func:`fit_bundled` in a new process."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(fit_bundled, *args, **kwargs).result()


def lead(alarm_epoch: int | None, crossed: int | None) -> tuple[int | None, float | None]:
    """Epochs and share of the epochs to val_acc 0.5 by which an alarm came ahead."""
    if alarm_epoch is None or crossed is None:
        return None, None
    return crossed - alarm_epoch, (crossed - alarm_epoch) / crossed


def show(value, spec: str = "") -> str:
    return "-" if value is None else format(value, spec)
