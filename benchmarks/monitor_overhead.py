"""What the monitor costs: the demo's training with and without ENTKMonitor, and one evaluation.

The modular-arithmetic MLP of DESIGN.md section 5 (p=29, hidden 512, 300 full-batch epochs,
TensorBoard logger), trained twice in fresh processes: plain, and with
``ENTKMonitor(every_n_epochs=5)`` (841 probe points, trace eNTK, spectrum, cliffs, kernel
regression, images every 5th evaluation). Also the time of one evaluation
(:func:`lightning_entk.evaluation.evaluate`) and of its parts, on the model at initialization.

    python benchmarks/monitor_overhead.py
"""

from __future__ import annotations

import tempfile

import torch

from _harness import measure

EPOCHS = 300
EVERY_N_EPOCHS = 5


def setup_plain():
    return (False,)


def setup_monitored():
    return (True,)


def train(monitored: bool) -> dict:
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger

    from example_modules.modular_arithmetic import ModularArithmeticDataModule, ModularArithmeticMLP
    from lightning_entk import ENTKMonitor

    L.seed_everything(0, verbose=False)
    callbacks = [ENTKMonitor(every_n_epochs=EVERY_N_EPOCHS)] if monitored else []
    with tempfile.TemporaryDirectory() as log_dir:
        trainer = L.Trainer(
            max_epochs=EPOCHS,
            callbacks=callbacks,
            logger=TensorBoardLogger(log_dir),
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            log_every_n_steps=1,
        )
        trainer.fit(ModularArithmeticMLP(), datamodule=ModularArithmeticDataModule())
    if not monitored:
        return {"evaluations": 0}
    seconds = [r.metrics["entk/seconds"] for r in callbacks[0].history]
    return {"evaluations": len(seconds), "evaluation_seconds": sum(seconds)}


def setup_evaluation():
    from example_modules.modular_arithmetic import ModularArithmeticDataModule, ModularArithmeticMLP
    from lightning_entk.probe import DEFAULT_MAX_PROBE_POINTS, draw_probe_set

    torch.manual_seed(0)
    data = ModularArithmeticDataModule()
    data.setup("fit")
    train, val = data.train_dataloader().dataset, data.val_dataloader().dataset
    probe = draw_probe_set(train, val, DEFAULT_MAX_PROBE_POINTS)
    return ModularArithmeticMLP(), probe


def evaluate_once(model, probe):
    from lightning_entk.evaluation import evaluate

    return evaluate(model, probe).metrics["entk/seconds"]


def main() -> None:
    print(
        f"modular MLP p=29 hidden=512, {EPOCHS} full-batch epochs; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    plain = measure(setup_plain, train, repeats=1, warmup=0)
    watched = measure(setup_monitored, train, repeats=1, warmup=0)
    one = measure(setup_evaluation, evaluate_once, repeats=5, warmup=1)
    extra = watched["seconds"] - plain["seconds"]
    n = watched["result"]["evaluations"]
    print(f"{'run':<34}{'wall time (s)':>14}{'peak (MiB)':>12}")
    print(f"{'without monitor':<34}{plain['seconds']:>14.1f}{plain['peak_mib']:>12.0f}")
    label = f"with ENTKMonitor(every_n_epochs={EVERY_N_EPOCHS})"
    print(f"{label:<34}{watched['seconds']:>14.1f}{watched['peak_mib']:>12.0f}")
    print(
        f"overhead: +{extra:.1f} s (+{100 * extra / plain['seconds']:.0f}%) for {n} evaluations "
        f"({extra / n:.2f} s each, images and logging included)"
    )
    print(
        f"one evaluation (841 probe points: kernel, spectrum, cliffs, kernel regression): "
        f"{one['result']:.3f} s inside evaluate, {one['seconds']:.3f} s wall, "
        f"peak +{one['peak_mib']:.0f} MiB"
    )


if __name__ == "__main__":
    main()
