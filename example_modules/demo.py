"""The demo driver the examples share: train a model with ENTKMonitor and a TensorBoard logger
from the command line, then print a one-screen summary. Each example module calls it with its
own classes (``example_modules.modular_arithmetic.main``, ``example_modules.modular_transformer
.main``); this module imports none of them.

    python -m example_modules.modular_arithmetic                      # the paper's setup
    python -m example_modules.modular_arithmetic --help               # every argument
    python -m example_modules.modular_arithmetic --trainer.max_epochs 150 --monitor.max_overhead 0.5

Model (``--model.*``), data (``--data.*``), trainer (``--trainer.*``) and monitor
(``--monitor.*``) arguments are those of their classes (LightningCLI). At the end it prints where
the logs and the summary figure are, and the monitor's one-screen summary: what it cost, when
the network grokked, when the monitor warned, and the cliffs at the start and the end.
"""

from __future__ import annotations

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

from lightning_entk.callback import ENTKMonitor

DEFAULT_LOG_DIR = "entk_runs"


class DemoCLI(LightningCLI):
    def __init__(self, *args, extra_defaults: dict | None = None, **kwargs) -> None:
        self.extra_defaults = dict(extra_defaults or {})
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
    ``{"data.seed": 3}``). The monitor has no arguments of its own unless given on the command
    line: what ``ENTKMonitor()`` does is what the demo shows.
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
    """The monitor's one-screen summary, with where the TensorBoard logs are."""
    lines = monitor.summary().splitlines()
    if trainer.logger is not None:
        lines[-1:-1] = [
            f"TensorBoard logs: {trainer.logger.log_dir}",
            f"open them with:   tensorboard --logdir {trainer.logger.save_dir}",
        ]
    return "\n".join(lines)
