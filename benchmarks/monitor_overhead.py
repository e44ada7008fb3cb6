"""What the monitor costs: the demo's training without ENTKMonitor, with the monitor's default
time budget (``ENTKMonitor()``: ``max_overhead=0.2``, 20% of training), and at the demo's fixed
cadence (every 2 epochs), with the whole kernel only (``groups=None``) and with the default
per-group figures (``groups="auto"``: ``layer1``, ``layer2``).

The modular-arithmetic MLP of DESIGN.md section 5 (p=29, hidden 512, 300 full-batch epochs,
TensorBoard logger, 841 probe points), each run in a fresh process. Per run: wall time of
``trainer.fit``, overhead over plain training, evaluations made, the first early-warning alarm
and its lead over the epoch at which val_acc (read every epoch) first reaches 0.5. Then where
one evaluation's time goes (medians over the dense run's evaluations): kernel, spectrum,
signals, logging, and the whole evaluation against its kernel alone.

    python benchmarks/monitor_overhead.py
"""

from __future__ import annotations

import statistics
import tempfile

import torch

from _harness import measure

EPOCHS = 300
DENSE_EVERY_N_EPOCHS = 2


def setup_plain():
    return (None,)


def setup_default():
    return ({},)


def setup_dense_whole_kernel():
    return ({"every_n_epochs": DENSE_EVERY_N_EPOCHS, "groups": None},)


def setup_dense():
    return ({"every_n_epochs": DENSE_EVERY_N_EPOCHS},)


RUNS = {  # the dense run with every default last: its evaluations are broken down
    "without monitor": setup_plain,
    "ENTKMonitor() (budget 20%)": setup_default,
    f"every_n_epochs={DENSE_EVERY_N_EPOCHS}, groups=None": setup_dense_whole_kernel,
    f"every_n_epochs={DENSE_EVERY_N_EPOCHS}": setup_dense,
}


def train(options: dict | None) -> dict:
    import lightning as L
    from lightning.pytorch import Callback
    from lightning.pytorch.loggers import TensorBoardLogger

    from example_modules.modular_arithmetic import ModularArithmeticDataModule, ModularArithmeticMLP
    from lightning_entk import ENTKMonitor

    class FirstEpochAtHalf(Callback):
        epoch = None

        def on_validation_epoch_end(self, trainer, pl_module):
            accuracy = trainer.callback_metrics.get("val_acc")
            if self.epoch is None and accuracy is not None and accuracy >= 0.5:
                self.epoch = trainer.current_epoch + 1  # completed epochs, as the monitor counts

    L.seed_everything(0, verbose=False)
    crossing = FirstEpochAtHalf()
    monitor = None if options is None else ENTKMonitor(**options)
    with tempfile.TemporaryDirectory() as log_dir:
        trainer = L.Trainer(
            max_epochs=EPOCHS,
            callbacks=[crossing] + ([monitor] if monitor else []),
            logger=TensorBoardLogger(log_dir),
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            log_every_n_steps=1,
        )
        trainer.fit(ModularArithmeticMLP(), datamodule=ModularArithmeticDataModule())
    result = {"crossing": crossing.epoch, "evaluations": 0, "alarm": None}
    if monitor is not None:
        parts = ("", "/kernel", "/spectrum", "/signals")
        result.update(
            evaluations=len(monitor.history),
            monitor_seconds=monitor.monitor_seconds,
            alarm=monitor.transitions[0] if monitor.transitions else None,
            parts={
                p: statistics.median(r.metrics[f"entk/seconds{p}"] for r in monitor.history)
                for p in parts
            },
        )
    return result


def main() -> None:
    print(
        f"modular MLP p=29 hidden=512, {EPOCHS} full-batch epochs, 841 probe points; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    results = {label: measure(setup, train, repeats=1, warmup=0) for label, setup in RUNS.items()}
    plain = results["without monitor"]["seconds"]
    print(
        f"{'run':<34}{'wall (s)':>9}{'overhead':>10}{'evaluations':>12}{'monitor (s)':>12}"
        f"  {'first alarm':<28}{'val_acc>=0.5':>13}{'lead':>6}"
    )
    for label, measured in results.items():
        r = measured["result"]
        alarm = r["alarm"]
        lead = None if alarm is None or r["crossing"] is None else r["crossing"] - alarm.epoch
        overhead = (measured["seconds"] - plain) / plain
        print(
            f"{label:<34}{measured['seconds']:>9.1f}{overhead:>10.0%}{r['evaluations']:>12}"
            f"{r.get('monitor_seconds', 0.0):>12.1f}"
            f"  {_alarm(alarm):<28}{_show(r['crossing']):>13}{_show(lead):>6}"
        )
    dense = results[list(RUNS)[-1]]["result"]
    parts = dense["parts"]
    whole = dense["monitor_seconds"] / dense["evaluations"]
    print(
        "one evaluation (medians of the dense run): kernel {:.3f} s, spectrum {:.3f} s, "
        "signals {:.3f} s; inside evaluate {:.3f} s = {:.1f}x the kernel; with logging and "
        "images (mean) {:.3f} s = {:.1f}x".format(
            parts["/kernel"],
            parts["/spectrum"],
            parts["/signals"],
            parts[""],
            parts[""] / parts["/kernel"],
            whole,
            whole / parts["/kernel"],
        )
    )


def _alarm(alarm) -> str:
    return "-" if alarm is None else f"epoch {alarm.epoch} ({alarm.kind})"


def _show(value) -> str:
    return "-" if value is None else str(value)


if __name__ == "__main__":
    main()
