"""ENTKMonitor: the monitor's core (:class:`~lightning_entk.monitor.Monitor`) as a Lightning
callback.

Each hook translates Lightning's state for the core and does nothing else: the probe is drawn
from the trainer's data, scalars go through ``pl_module.log`` (so every logger, the progress
bar and ``trainer.callback_metrics`` see them) or straight to the loggers where Lightning
allows no ``self.log``, images to a ``TensorBoardLogger``, and the strategy's collectives
share the work and the decisions among processes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info

from lightning_entk import keys
from lightning_entk.early_warning import EarlyWarning, PhaseTransition
from lightning_entk.kernel import KernelOptions
from lightning_entk.monitor.core import Monitor, check_monitor_options, preserved_rng
from lightning_entk.monitor.sentinel import Sentinel
from lightning_entk.monitor.sinks import TensorBoardSink
from lightning_entk.probe import DEFAULT_MAX_PROBE_POINTS, as_probe_set, draw_probe_set
from lightning_entk.schedule import DEFAULT_MAX_OVERHEAD, FixedCadence, TimeBudget


class ENTKMonitor(Callback):
    """Compute the empirical NTK on a fixed probe set during training, find its spectral cliffs,
    log them beside accuracy, and warn of coming phase transitions.

    Two tiers: a *sentinel* reads the readout's kernel on the held-out probe points at every
    epoch (its debiased alignment with the labels is the early warning's signal), and *full
    evaluations* (the whole kernel, its spectrum and cliffs, parameter groups, images) are
    placed within a time budget, dense where the sentinel moves (or at a fixed cadence, when
    one is set); the kernel at initialization and at the end of training is always evaluated.
    See :class:`~lightning_entk.monitor.Monitor` for what is logged and
    :mod:`~lightning_entk.keys` for the keys. With a ``TensorBoardLogger`` the monitor
    adds a Custom Scalars layout, histograms and images, and at the end of fit saves the
    summary figure as ``entk_summary.png`` in the logger's directory.

    The training run is never changed: the kernel is computed on detached copies of the
    parameters in eval mode without autocast, RNG states are restored, and an evaluation that
    fails becomes a warning and is skipped.

    Args:
        probe: the probe set: a tensor of points, ``(x, y)`` with integer labels, a
            :class:`~lightning_entk.ProbeSet`, a ``Dataset`` or a ``DataLoader``. ``None``
            draws up to ``max_probe_points`` from the training and validation data (validation
            points held out), once, fixed for the whole run.
        every_n_epochs: full evaluations at the end of every n-th epoch instead of within the
            time budget.
        every_n_train_steps: full evaluations after every n-th optimizer step instead of
            within the time budget.
        mode: ``"trace"`` (N x N, the *sum* over outputs) or ``"flatten"`` (C*N x C*N).
        max_overhead: the time budget: the monitor's wall time, sentinel included, as a share
            of the training's (``None``: 0.1 unless a fixed cadence is set).
        max_probe_points: cap on the points drawn when ``probe`` is ``None``.
        kernel: how the kernel is computed (:class:`~lightning_entk.kernel.KernelOptions`:
            parameters, output maps, projections, groups, memory budget, ...); ``None`` for
            ``KernelOptions(groups="auto")``.
        accuracy_key: the network's own metric (in ``trainer.callback_metrics``) that leads
            are measured against; read at every epoch.
        sentinel: the per-epoch readout reading (:class:`~lightning_entk.monitor.Sentinel`),
            ``True`` for the default, ``False`` for none.
        early_warning: the detector (:class:`~lightning_entk.EarlyWarning`), ``True`` for the
            default, ``False`` for none.
        on_transition: called with each :class:`~lightning_entk.PhaseTransition` raised.
        cliff_options: keyword arguments for :func:`~lightning_entk.find_cliffs`.
        image_every_n_evaluations: images at every n-th full evaluation (when the budget
            affords them) and of the last one; 0 for none.

    Raises:
        ValueError: for invalid arguments, here, or (for the probe set) at setup.

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
        *,
        max_overhead: float | None = None,
        max_probe_points: int = DEFAULT_MAX_PROBE_POINTS,
        kernel: KernelOptions | None = None,
        accuracy_key: str | None = "val_acc",
        sentinel: Sentinel | bool = True,
        early_warning: EarlyWarning | bool = True,
        on_transition: Callable[[PhaseTransition], None] | None = None,
        cliff_options: Mapping[str, object] | None = None,
        image_every_n_evaluations: int = 25,
    ) -> None:
        self.schedule = _schedule(every_n_epochs, every_n_train_steps, max_overhead)
        if isinstance(max_probe_points, bool) or not isinstance(max_probe_points, int):
            raise ValueError(
                f"`max_probe_points` must be a positive int, got {max_probe_points!r}."
            )
        if max_probe_points < 1:
            raise ValueError(
                f"`max_probe_points` must be a positive int, got {max_probe_points!r}."
            )
        self.options = {
            "mode": mode,
            "kernel": kernel,
            "sentinel": sentinel,
            "early_warning": early_warning,
            "on_transition": on_transition,
            "image_every_n_evaluations": image_every_n_evaluations,
        }
        check_monitor_options(**self.options)
        self.options.update(accuracy_key=accuracy_key, cliff_options=cliff_options)
        self.accuracy_key = accuracy_key
        self.max_probe_points = max_probe_points
        self._probe = None if probe is None else as_probe_set(probe, max_probe_points)
        self.core: Monitor | None = None
        self._resumed: dict | None = None
        self._validated = False

    # ----------------------------------------------------------------------------------------
    # Lightning hooks

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit" and self._probe is not None:  # an explicit probe is tried at once
            self.core = self._monitor(trainer, pl_module, self._probe)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.core is None:
            with preserved_rng():
                probe = draw_probe_set(*_datasets(trainer), self.max_probe_points)
            self.core = self._monitor(trainer, pl_module, probe)
        if self._resumed is not None:
            self.core.load_state_dict(self._resumed)
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

    def state_dict(self) -> dict:
        if self.core is None:
            return self._resumed or {}
        return self.core.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self._resumed = state_dict
        if self.core is not None:
            self.core.load_state_dict(state_dict)

    # ----------------------------------------------------------------------------------------
    # The core's results

    @property
    def history(self) -> list:
        return [] if self.core is None else self.core.history

    @property
    def readings(self) -> list:
        return [] if self.core is None else self.core.readings

    @property
    def transitions(self) -> list[PhaseTransition]:
        return [] if self.core is None else self.core.transitions

    @property
    def early_warning(self) -> EarlyWarning | None:
        if self.core is not None:
            return self.core.early_warning
        if isinstance(self.options["early_warning"], bool):  # made with the core
            self.options["early_warning"] = (
                EarlyWarning(self.accuracy_key) if self.options["early_warning"] else False
            )
        return self.options["early_warning"] or None

    @property
    def monitor_seconds(self) -> float:
        return 0.0 if self.core is None else self.core.monitor_seconds

    @property
    def training_seconds(self) -> float:
        return 0.0 if self.core is None else self.core.clock.training_seconds()

    @property
    def probe(self):
        return self._probe if self.core is None else self.core.probe

    @property
    def summary_path(self) -> Path | None:
        return None if self.core is None else self.core.summary_path

    def first_epoch_reaching(self, level: float) -> int | None:
        return None if self.core is None else self.core.first_epoch_reaching(level)

    def summary(self) -> str:
        return "" if self.core is None else self.core.summary()

    def summary_figure(self):
        return self.core.summary_figure()

    # ----------------------------------------------------------------------------------------

    def _monitor(self, trainer: Trainer, pl_module: LightningModule, probe) -> Monitor:
        sink = LightningSink(trainer, pl_module, self.options["image_every_n_evaluations"] > 0)
        if trainer.loggers and not sink.images and self.options["image_every_n_evaluations"]:
            rank_zero_info(
                "ENTKMonitor: images and histograms need a TensorBoardLogger; "
                "the other loggers get the entk/ scalars only."
            )
        return Monitor(
            pl_module,
            probe,
            schedule=self.schedule,
            sink=sink,
            collective=StrategyCollective(trainer),
            **self.options,
        )

    def _in(self, hook: str) -> Monitor:
        """The core, its sink told which hook it writes from."""
        self.core.sink.hook = hook
        return self.core


class LightningSink:
    """Scalars through ``pl_module.log`` at an epoch's end (so that
    ``trainer.callback_metrics`` and the progress bar have them), else straight to the loggers
    (at the start and the end of training, where Lightning allows no ``self.log``; within an
    epoch, where ``log_every_n_steps`` would drop them) and for values only rank 0 holds;
    figures, histograms and texts to a ``TensorBoardLogger``."""

    def __init__(self, trainer: Trainer, pl_module: LightningModule, images: bool) -> None:
        self.trainer, self.pl_module = trainer, pl_module
        self.hook = "start"
        tensorboard = next(
            (lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None
        )
        self.tensorboard = None if tensorboard is None else TensorBoardSink(tensorboard.experiment)
        self.images = images and self.tensorboard is not None
        directories = (getattr(logger, "log_dir", None) for logger in trainer.loggers)
        self.log_dir = next((d for d in directories if d), None)

    def scalars(self, values: Mapping[str, float], step: int, local: bool = False) -> None:
        if local or self.hook != "epoch":  # every value at its step, whatever the logging rate
            for logger in self.trainer.loggers:
                logger.log_metrics(dict(values), step=step)
            return
        for key, value in values.items():
            # Every rank holds the broadcast value: a max over ranks returns it exactly.
            self.pl_module.log(
                key, value, on_step=False, on_epoch=True, prog_bar=key in keys.PROGRESS_BAR,
                batch_size=1, sync_dist=True, reduce_fx="max",
            )  # fmt: skip

    def text(self, tag: str, text: str, step: int) -> None:
        if self.tensorboard is not None:
            self.tensorboard.text(tag, text, step)

    def figures(self, figures, step: int) -> None:
        if self.tensorboard is not None:
            self.tensorboard.figures(figures, step)

    def histogram(self, tag: str, values, step: int) -> None:
        if self.tensorboard is not None:
            self.tensorboard.histogram(tag, values, step)

    def layout(self, layout: dict) -> None:
        if self.tensorboard is not None:
            self.tensorboard.layout(layout)


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


def _schedule(every_n_epochs, every_n_train_steps, max_overhead):
    """A fixed cadence when one is set, else the time budget; not both."""
    cadence = FixedCadence(every_n_epochs, every_n_train_steps)
    if every_n_epochs is None and every_n_train_steps is None:
        return TimeBudget(DEFAULT_MAX_OVERHEAD if max_overhead is None else max_overhead)
    if max_overhead is not None:
        raise ValueError(
            "Set either a fixed cadence (`every_n_epochs`, `every_n_train_steps`) or a time "
            f"budget (`max_overhead`), not both; got max_overhead={max_overhead!r}."
        )
    return cadence


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
