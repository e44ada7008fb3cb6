"""The demo driver the examples share: train a model with ENTKMonitor and a TensorBoard logger
from the command line, then print a one-screen summary. Each example module calls it with its
own classes (``example_modules.modular_arithmetic.main``, ``example_modules.modular_transformer
.main``); this module imports none of them.

    python -m example_modules.modular_arithmetic                      # the paper's setup
    python -m example_modules.modular_arithmetic --help               # every argument
    python -m example_modules.modular_arithmetic --trainer.max_epochs 150 --monitor.every_n_epochs 5

Model (``--model.*``), data (``--data.*``), trainer (``--trainer.*``) and monitor
(``--monitor.*``) arguments are those of their classes (LightningCLI). At the end it prints where
the logs and the summary figure are, and a one-screen summary: when the network grokked, when
the monitor warned, and the cliffs at the start and the end.
"""

from __future__ import annotations

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

from lightning_entk.callback import ENTKMonitor

DEFAULT_LOG_DIR = "entk_runs"


class DemoCLI(LightningCLI):
    def __init__(self, *args, extra_defaults: dict | None = None, **kwargs) -> None:
        self.extra_defaults = {"monitor.every_n_epochs": 2, **(extra_defaults or {})}
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(ENTKMonitor, "monitor")
        parser.set_defaults(self.extra_defaults)


def main(
    args: list[str] | None,
    model_class: type[LightningModule],
    datamodule_class: type[LightningDataModule],
    *,
    name: str,
    max_epochs: int,
    seed: int = 0,
    defaults: dict | None = None,
) -> ENTKMonitor:
    """Run the demo; ``args`` as on the command line (``None``: ``sys.argv``).

    ``model_class`` and ``datamodule_class`` choose the experiment; ``name`` is the run's
    directory under the log dir; ``defaults`` overrides parser defaults by dotted key (e.g.
    ``{"monitor.every_n_epochs": 20, "data.seed": 3}``).
    """
    cli = DemoCLI(
        model_class,
        datamodule_class,
        run=False,
        seed_everything_default=seed,
        save_config_callback=None,
        extra_defaults=defaults,
        trainer_defaults={
            "max_epochs": max_epochs,
            "enable_checkpointing": False,
            "log_every_n_steps": 1,
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": DEFAULT_LOG_DIR, "name": name},
            },
        },
        args=args,
    )
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    monitor = next(c for c in cli.trainer.callbacks if isinstance(c, ENTKMonitor))
    print(summary(monitor, cli.trainer))
    return monitor


def summary(monitor: ENTKMonitor, trainer) -> str:
    """A one-screen text summary of a monitored run: what the monitor cost beside training,
    when the accuracy crossed 0.5 and 0.95, each phase-transition signal of the monitor with
    how many epochs before or after the 0.5 crossing it came, and the cliffs at the start and
    the end."""
    history = monitor.history
    lines = ["", "=" * 72, "eNTK monitor summary", "=" * 72]
    if monitor.training_seconds:
        share = monitor.monitor_seconds / monitor.training_seconds
        lines.append(
            f"training {monitor.training_seconds:.1f} s; monitor {monitor.monitor_seconds:.1f} s "
            f"more ({share:.0%}) for {len(history)} evaluations"
        )
    key = monitor.accuracy_key
    crossed = {level: monitor.first_epoch_reaching(level) for level in (0.5, 0.95)}
    for level, epoch in crossed.items():
        seen = f"epoch {epoch}" if epoch is not None else "not reached"
        lines.append(f"{key} >= {level:<5} first seen at evaluation of {seen}")
    lines.append(f"phase-transition signals: {len(monitor.transitions) or 'none raised'}")
    for transition in monitor.transitions:
        lines.append(f"    {transition.describe()}")
        lead = None if crossed[0.5] is None else crossed[0.5] - transition.epoch
        if lead is not None and lead > 0:
            lines.append(f"        {lead} epochs before {key} >= 0.5: an early warning")
        elif lead is not None:
            lines.append(f"        {-lead} epochs after {key} >= 0.5: not ahead of it")
    if history:
        for label, record in (("start", history[0]), ("end", history[-1])):
            ranks = ", ".join(f"{c.rank} (x{10**c.drop:.2f})" for c in record.cliffs) or "none"
            lines.append(f"cliffs at {label:<5} (epoch {record.epoch:>3}): ranks {ranks}")
    lines += ["", f"summary figure:   {monitor.summary_path or 'not written'}"]
    if trainer.logger is not None:
        lines += [
            f"TensorBoard logs: {trainer.logger.log_dir}",
            f"open them with:   tensorboard --logdir {trainer.logger.save_dir}",
        ]
    lines.append("=" * 72)
    return "\n".join(lines)
