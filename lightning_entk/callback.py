"""ENTKMonitor: the monitor's core (:class:`~lightning_entk.monitor.Monitor`) as a Lightning
callback, in the way of Lightning's own ``SpikeDetection``: it takes the core's arguments and
has its attributes, and each hook translates Lightning's state for the core and does nothing
else: the probe is drawn from the trainer's data, scalars go through ``pl_module.log`` (so
every logger, the progress bar and ``trainer.callback_metrics`` see them) or straight to the
loggers where Lightning allows no ``self.log``, images to a ``TensorBoardLogger``, and the
strategy's collectives share the work and the decisions among processes.
"""

from __future__ import annotations

from collections.abc import Mapping

from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from lightning_entk import keys
from lightning_entk.monitor.core import Monitor
from lightning_entk.monitor.sinks import LoggerSink


class ENTKMonitor(Monitor, Callback):
    """Compute the empirical NTK on a fixed probe set during training, find its spectral cliffs,
    log them beside accuracy, and warn of coming phase transitions: the monitor's core
    (:class:`~lightning_entk.monitor.Monitor`, whose arguments it takes and whose attributes
    it has) as a Lightning callback.

    Two tiers: a *sentinel* reads the readout's kernel on the held-out probe points at every
    epoch (its debiased alignment with the labels is the early warning's signal), and *full
    evaluations* (the whole kernel, its spectrum and cliffs, parameter groups, images) are
    placed within a time budget, dense where the sentinel moves (or at a fixed cadence, when
    one is set); the kernel at initialization and at the end of training is always evaluated.
    See :class:`~lightning_entk.monitor.Monitor` for the arguments and what is logged and
    :mod:`~lightning_entk.keys` for the keys. The trainer gives the rest: the probe (when
    ``probe`` is ``None``) is drawn from its training and validation data; scalars go through
    ``pl_module.log``, images to a ``TensorBoardLogger`` (with a Custom Scalars layout and
    histograms), and at the end of fit the summary figure is saved as ``entk_summary.png`` in
    the logger's directory; the strategy's processes share the work.

    The training run is never changed: the kernel is computed on detached copies of the
    parameters in eval mode without autocast, RNG states are restored, and whatever fails
    after construction becomes a warning (the monitor turns itself off when it cannot bind to
    the model).

    Raises:
        ValueError: for invalid arguments.

    Example:
        >>> import lightning as L
        >>> monitor = ENTKMonitor()
        >>> trainer = L.Trainer(callbacks=[monitor], max_epochs=1, logger=False)
    """

    def __init__(
        self,
        probe: object = None,
        every_n_epochs: int | None = None,
        every_n_train_steps: int | None = None,
        mode: str = "trace",
        **options: object,
    ) -> None:
        for name in ("model", "sink", "collective"):
            if options.get(name) is not None:
                raise ValueError(
                    f"`{name}` is the trainer's for ENTKMonitor (its module, its loggers, its "
                    "processes); pass it to Monitor in a plain training loop."
                )
        super().__init__(
            None, probe, every_n_epochs=every_n_epochs, every_n_train_steps=every_n_train_steps,
            mode=mode, **options,
        )  # fmt: skip
        self._explicit_probe = probe is not None
        self._trainer: Trainer | None = None  # the trainer the monitor is bound for
        self._validated = False

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit" and self._explicit_probe:  # an explicit probe is tried at once
            self._bind(trainer, pl_module)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._trainer is not trainer:
            self._bind(trainer, pl_module)
        self._in("start").start(trainer.global_step, trainer.current_epoch)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args) -> None:
        if not trainer.is_last_batch:  # the epoch's end decides for its last batch
            self._in("batch").step(trainer.global_step, trainer.current_epoch, epoch_end=False)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._validated = self._validated or not trainer.sanity_checking

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        metrics = _metrics(trainer) if self._validated or not trainer.val_dataloaders else None
        self._validated = False  # metrics are passed once per validation
        self._in("epoch").step(trainer.global_step, trainer.current_epoch + 1, metrics)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._in("end").end(trainer.global_step, trainer.current_epoch)

    def _bind(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Bind the core to the module, with this trainer's data, loggers and processes."""
        self._trainer = trainer
        sink = LightningSink(trainer, pl_module, self.image_every_n_evaluations > 0)
        if trainer.loggers and not sink.images and self.image_every_n_evaluations:
            rank_zero_info(
                "ENTKMonitor: images and histograms need a TensorBoardLogger; "
                "the other loggers get the entk/ scalars only."
            )
        data = None if self._explicit_probe else _datasets(trainer)
        self.bind(pl_module, data=data, sink=sink, collective=StrategyCollective(trainer))

    def _in(self, hook: str) -> Monitor:
        """The core, its sink told which hook it writes from."""
        self.sink.hook = hook
        return self


class LightningSink(LoggerSink):
    """The trainer's loggers (:class:`~lightning_entk.monitor.sinks.LoggerSink`), but that
    scalars at an epoch's end go through ``pl_module.log``, so that
    ``trainer.callback_metrics`` and the progress bar have them. Elsewhere (at the start and
    the end of training, where Lightning allows no ``self.log``; within an epoch, where
    ``log_every_n_steps`` would drop them) and for values only rank 0 holds they go straight to
    the loggers."""

    def __init__(self, trainer: Trainer, pl_module: LightningModule, images: bool) -> None:
        super().__init__(trainer.loggers, images)
        self.pl_module = pl_module
        self.hook = "start"

    def scalars(self, values: Mapping[str, float], step: int, local: bool = False) -> None:
        if local or self.hook != "epoch":  # every value at its step, whatever the logging rate
            super().scalars(values, step)
            return
        for key, value in values.items():
            # Every rank holds the broadcast value: a max over ranks returns it exactly.
            self.pl_module.log(
                key, value, on_step=False, on_epoch=True, prog_bar=key in keys.PROGRESS_BAR,
                batch_size=1, sync_dist=True, reduce_fx="max",
            )  # fmt: skip


class StrategyCollective:
    """The trainer's processes, through its strategy's collectives."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer

    @property
    def rank(self) -> int:
        return self.trainer.global_rank

    @property
    def world_size(self) -> int:
        return self.trainer.world_size

    def broadcast(self, obj: object, src: int = 0) -> object:
        return self.trainer.strategy.broadcast(obj, src)

    def all_gather(self, tensor):
        return self.trainer.strategy.all_gather(tensor)


def _metrics(trainer: Trainer) -> dict[str, float]:
    """The scalar metrics the module logged, as floats."""
    return {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}


def _datasets(trainer: Trainer):
    """The training and validation datasets of the run (None where absent)."""
    module = trainer.datamodule
    train = module.train_dataloader() if module is not None else trainer.train_dataloader
    val = None
    if module is not None and _overrides(module, "val_dataloader"):
        val = module.val_dataloader()
    elif module is None:
        val = trainer.val_dataloaders
    return _dataset_of(train), _dataset_of(val)


def _overrides(module: LightningDataModule, name: str) -> bool:
    return getattr(type(module), name) is not getattr(LightningDataModule, name)


def _dataset_of(loaders):
    if loaders is None:
        return None
    if isinstance(loaders, (list, tuple)):
        loaders = loaders[0] if loaders else None
    elif isinstance(loaders, dict):
        loaders = next(iter(loaders.values()), None)
    return getattr(loaders, "dataset", None)
