"""ENTKMonitor: the empirical NTK of a LightningModule, watched while it trains.

The hooks only decide *when* (the schedule, rank, sanity checking) and hand the work to the pure
core: :func:`~lightning_entk.evaluation.evaluate`, :mod:`~lightning_entk.schedule`,
:class:`~lightning_entk.EarlyWarning`, :mod:`~lightning_entk.distributed` and
:mod:`~lightning_entk.plots`.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from lightning_entk import plots
from lightning_entk.distributed import combine_shares, failed_share, kernel_share
from lightning_entk.early_warning import EarlyWarning, EvaluationRecord, PhaseTransition
from lightning_entk.evaluation import (
    Evaluation,
    evaluate,
    probe_within_budget,
    tensorboard_layout,
)
from lightning_entk.kernel import (
    Groups,
    OutputFn,
    ParamSelection,
    check_kernel_options,
    check_projection_mode,
    ntk_plan,
)
from lightning_entk.kernel.context import parameter_groups
from lightning_entk.kernel.points import ForwardFn, num_points, to_device
from lightning_entk.probe import (
    DEFAULT_MAX_PROBE_POINTS,
    ProbeSet,
    as_probe_set,
    draw_probe_set,
)
from lightning_entk.schedule import FixedCadence, TimeBudget

DEFAULT_MEMORY_BUDGET = 2 * 2**30  # bytes for everything one evaluation allocates
DEFAULT_MAX_OVERHEAD = 0.2  # the time budget when no fixed cadence is set
SUMMARY_FILENAME = "entk_summary.png"
PROGRESS_BAR_KEYS = ("entk/num_cliffs", "entk/kernel_regression_acc")


class ENTKMonitor(Callback):
    """Compute the empirical NTK on a fixed probe set during training, find its spectral cliffs,
    log them beside accuracy, and warn of coming phase transitions.

    Scalars go through ``pl_module.log`` under ``entk/`` (so every logger, the progress bar and
    ``trainer.callback_metrics`` see them; see :mod:`lightning_entk.evaluation` for the keys).
    With a :class:`~lightning.pytorch.loggers.TensorBoardLogger` the monitor also adds a
    Custom Scalars layout (:func:`~lightning_entk.evaluation.tensorboard_layout`: accuracy
    beside kernel regression, and the cliffs), a histogram of log10 eigenvalues, images of the
    spectrum with its cliffs, of the spectrum's evolution beside accuracy, and of feature
    alignment when the LightningModule exposes ground truth (a method
    ``entk_ground_truth(x, mode) -> dict[str, Tensor]`` giving, per feature family, an
    ``(R, F)`` matrix over the probe's kernel rows; set ``entk_feature_pairs = True`` on the
    module when consecutive columns are cos/sin pairs of one frequency). At the end of fit the
    evolution figure is saved as ``entk_summary.png`` in the logger's directory (with no logger,
    draw it with :meth:`summary_figure`).

    When: by default within a time budget (``max_overhead``, 20%;
    :class:`~lightning_entk.schedule.TimeBudget`): the monitor's wall time stays near
    ``max_overhead`` times the training's, and evaluations come denser where the kernel and its
    signals move and sparser on quiet stretches. Or at a fixed cadence, when one is set
    (``every_n_epochs``, ``every_n_train_steps``). The kernel at initialization and at the end
    of fit are always evaluated. Each evaluation logs where its time went
    (``entk/seconds/...``).

    The training run is never changed: the kernel is computed on detached copies of the
    parameters in eval mode without autocast, RNG states are restored, and an evaluation that
    fails becomes a warning and is skipped.

    Args:
        probe: the probe set: a tensor of points, ``(x, y)`` with integer labels, a
            :class:`~lightning_entk.probe.ProbeSet`, a ``Dataset`` or a ``DataLoader``. ``None``
            draws up to ``max_probe_points`` from the training and validation data (validation
            points held out for kernel regression), once, fixed for the whole run.
        every_n_epochs: evaluate at the end of every n-th training epoch, instead of within
            the time budget (``None``: not by epochs).
        every_n_train_steps: evaluate after every n-th optimizer step, instead of within the
            time budget (``None``: not by steps).
        mode: ``"trace"`` (N x N, the *sum* over outputs) or ``"flatten"`` (C*N x C*N).
        max_overhead: the time budget: the monitor's wall time as a share of the training's
            (``None``: 0.2, about 20% on top of training, unless a fixed cadence is set),
            spent where the kernel moves. On a model whose training step is cheap beside one
            evaluation (the bundled modular MLP: one evaluation costs ~8 of its epochs), the
            budget affords few evaluations and the early warning comes late; set a cadence
            there (the demos do; see the README).
        max_probe_points: cap on the points drawn when ``probe`` is ``None``.
        params, output_fn, output_weights, forward_fn, method: as in
            :func:`~lightning_entk.empirical_ntk` (``forward_fn(model, points) -> (N, C)`` for
            a model no default call covers).
        output_projections: for many outputs (trace mode): estimate the kernel from this many
            random projections of the outputs instead of one backward pass per output (see
            :func:`~lightning_entk.empirical_ntk`; the same projections at every evaluation).
        groups: parameter groups whose own kernels (from the same pass) get their spectrum's
            top, cliffs, kernel-target alignment and kernel regression logged under
            ``entk/<group>/...``, beside the whole model's: ``"modules"`` (the top-level
            children), ``"auto"`` (a few groups that follow the model's parts), a callable
            ``name -> group`` or a mapping ``group -> parameter names`` (see
            :func:`~lightning_entk.empirical_ntk`). ``None``: the whole model only (each
            group's spectrum and kernel regression cost about as much again as the whole
            kernel's). The early warning's ``alignment_rise`` watches the last group, the
            readout (the whole kernel without groups). A model with one group logs the whole
            kernel only. Single-process runs only (under DDP the ranks share the whole kernel's
            work, and only the whole kernel is logged).
        accuracy_key: the network's own metric shown beside the spectrum and used by the early
            warning (looked up in ``trainer.callback_metrics``).
        early_warning: the detector, or ``None`` for none.
        on_transition: called with each :class:`~lightning_entk.PhaseTransition` raised.
        cliff_options: keyword arguments for :func:`~lightning_entk.find_cliffs`.
        log_images: whether to add images and histograms to a TensorBoard logger.
        image_every_n_evaluations: images at every n-th evaluation (when the time budget
            affords them) and of the last evaluation at the end of fit. Drawing them takes
            about as long as four evaluations of the demo's kernel.
        memory_budget: bytes that everything one evaluation allocates may take (the kernel's
            factors and blocks, output gradients, the kernel and its eigendecomposition). At
            setup the monitor predicts an evaluation's peak (:func:`~lightning_entk.ntk_plan`,
            logged with each parameter's route) and, when the probe set would not fit, keeps
            the largest seeded subset of its points that does, with a warning.

    Raises:
        ValueError: for invalid arguments, here or (for the probe set) at setup.

    Example:
        >>> import lightning as L
        >>> monitor = ENTKMonitor(every_n_epochs=5)
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
        params: ParamSelection = None,
        output_fn: OutputFn = None,
        output_weights: Tensor | None = None,
        output_projections: int | None = None,
        forward_fn: ForwardFn = None,
        method: str = "auto",
        groups: Groups = "auto",
        accuracy_key: str | None = "val_acc",
        early_warning: EarlyWarning | None = None,
        on_transition: Callable[[PhaseTransition], None] | None = None,
        cliff_options: Mapping[str, object] | None = None,
        log_images: bool = True,
        image_every_n_evaluations: int = 25,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
    ) -> None:
        for name, value in (
            ("every_n_epochs", every_n_epochs),
            ("every_n_train_steps", every_n_train_steps),
        ):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"`{name}` must be a positive int or None, got {value!r}.")
        if mode not in ("trace", "flatten"):
            raise ValueError(
                f"`mode` must be 'trace' or 'flatten' (a square kernel), got {mode!r}."
            )
        for name, value in (
            ("max_probe_points", max_probe_points),
            ("image_every_n_evaluations", image_every_n_evaluations),
            ("memory_budget", memory_budget),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
        check_projection_mode(output_projections, mode)
        if output_projections is not None and (
            not isinstance(output_projections, int) or output_projections < 1
        ):
            raise ValueError(
                f"`output_projections` must be a positive int or None, got {output_projections!r}."
            )
        check_kernel_options(method, forward_fn, groups)
        if on_transition is not None and not callable(on_transition):
            raise ValueError(
                f"`on_transition` must be callable, got {type(on_transition).__name__}."
            )
        cadence = every_n_epochs is not None or every_n_train_steps is not None
        if cadence and max_overhead is not None:
            raise ValueError(
                "Set either a fixed cadence (`every_n_epochs`, `every_n_train_steps`) or a time "
                f"budget (`max_overhead`), not both; got max_overhead={max_overhead!r}."
            )
        self.schedule = (
            FixedCadence(every_n_epochs, every_n_train_steps)
            if cadence
            else TimeBudget(DEFAULT_MAX_OVERHEAD if max_overhead is None else max_overhead)
        )
        self._probe_argument = None if probe is None else as_probe_set(probe, max_probe_points)
        self.mode = mode
        self.max_probe_points = max_probe_points
        self.params = params
        self.output_fn = output_fn
        self.output_weights = output_weights
        self.output_projections = output_projections
        self.forward_fn = forward_fn
        self.method = method
        self.groups = groups
        self.accuracy_key = accuracy_key
        self.early_warning = EarlyWarning(accuracy_key) if early_warning is None else early_warning
        self.on_transition = on_transition
        self.cliff_options = dict(cliff_options or {})
        self.log_images = log_images
        self.image_every_n_evaluations = image_every_n_evaluations
        self.memory_budget = memory_budget

        self.probe: ProbeSet | None = self._probe_argument
        self.history: list[EvaluationRecord] = []
        self.transitions: list[PhaseTransition] = []
        self._features: dict[str, Tensor] = {}
        self._feature_pairs = False
        self._previous_kernel: Tensor | None = None
        self._rows_per_point = 1  # kernel rows per probe point: C for ``flatten``
        self._image_seconds = 0.0  # what drawing the images took last time
        self._pictured_step: int | None = None  # the step of the last images
        self._last_result: Evaluation | None = None  # rank 0's last evaluation
        self._summary = None  # (history and transitions it shows, the summary figure)
        self._train_began: float | None = None
        self.monitor_seconds = 0.0  # wall time of the evaluations, images, logging and summary
        self.training_seconds: float | None = None  # of training alone, set at its end
        self.summary_path: Path | None = None

    # ----------------------------------------------------------------------------------------
    # Lightning hooks

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.groups is not None and trainer.world_size > 1:
            rank_zero_info(
                "ENTKMonitor: under several processes only the whole kernel is logged, not "
                "the kernels of parameter groups."
            )
        if stage == "fit" and self.probe is not None:
            self.probe = self._fit_to_budget(self.probe, pl_module)
        if self.log_images and trainer.loggers and not _tensorboard(trainer):
            rank_zero_info(
                "ENTKMonitor: images and histograms need a TensorBoardLogger; "
                "the other loggers get the entk/ scalars only."
            )

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.probe is None:
            with _preserved_rng():
                train, val = _datasets(trainer)
                self.probe = draw_probe_set(train, val, self.max_probe_points)
            self.probe = self._fit_to_budget(self.probe, pl_module)
        ground_truth = getattr(pl_module, "entk_ground_truth", None)
        if callable(ground_truth):
            self._features = dict(
                ground_truth(to_device(self.probe.x, pl_module.device), self.mode)
            )
            self._feature_pairs = bool(getattr(pl_module, "entk_feature_pairs", False))
        tensorboard = _tensorboard(trainer)
        if tensorboard is not None and trainer.is_global_zero:
            per_group = self.groups is not None and trainer.world_size == 1
            layout = tensorboard_layout(self.accuracy_key, per_group=per_group)
            tensorboard.experiment.add_custom_scalars(layout)
        self._train_began = time.perf_counter()
        if isinstance(self.schedule, TimeBudget):
            self.schedule.start(self._train_began)
        if not self.history:  # not resumed: the kernel at initialization
            self._run_evaluation(trainer, pl_module, when="start")

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args) -> None:
        if not trainer.is_last_batch:  # the epoch's end decides for its last batch
            self._evaluate_if_due(trainer, pl_module, epoch_end=False)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._evaluate_if_due(trainer, pl_module, epoch_end=True)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._train_began is not None:
            elapsed = time.perf_counter() - self._train_began
            self.training_seconds = elapsed - self.monitor_seconds
        if self._last_step() != trainer.global_step:  # the kernel at the end of fit
            self._run_evaluation(trainer, pl_module, when="end")
        elif self._pictured_step != trainer.global_step and self._last_result is not None:
            if self.log_images and _tensorboard(trainer) is not None:  # the last evaluation's
                began = time.perf_counter()
                self._draw_images(trainer, self._last_result)
                self.monitor_seconds += time.perf_counter() - began

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        log_dir = _log_dir(trainer)
        if not trainer.is_global_zero or not self.history or log_dir is None:
            return  # without a logger: `summary_figure()` draws it on demand
        began = time.perf_counter()
        try:
            path = Path(log_dir) / SUMMARY_FILENAME
            path.parent.mkdir(parents=True, exist_ok=True)
            self.summary_figure().savefig(path, dpi=100)
            self.summary_path = path
            rank_zero_info(f"ENTKMonitor: summary figure saved to {path}")
        except Exception as err:  # a figure must never fail the run
            rank_zero_warn(f"ENTKMonitor could not save its summary figure: {err!r}")
        self.monitor_seconds += time.perf_counter() - began

    def state_dict(self) -> dict:
        return {
            "history": [r.to_state() for r in self.history],
            "transitions": [vars(t) for t in self.transitions],
            "early_warning": self.early_warning.state_dict(),
            "schedule": self.schedule.state_dict(),
            "probe": None if self.probe is None else vars(self.probe),
            "previous_kernel": self._previous_kernel,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = [EvaluationRecord.from_state(r) for r in state_dict["history"]]
        self.transitions = [PhaseTransition(**t) for t in state_dict["transitions"]]
        self.early_warning.load_state_dict(state_dict["early_warning"])
        self.schedule.load_state_dict(state_dict.get("schedule", {}))
        if isinstance(self.schedule, TimeBudget):  # another process's clock: count afresh
            self.schedule.restart_clock()
        if state_dict["probe"] is not None:
            self.probe = ProbeSet(**state_dict["probe"])
        self._previous_kernel = state_dict["previous_kernel"]

    # ----------------------------------------------------------------------------------------
    # When

    def _evaluate_if_due(self, trainer: Trainer, pl_module: LightningModule, epoch_end: bool):
        step, epoch = trainer.global_step, trainer.current_epoch + epoch_end
        if trainer.sanity_checking or self.probe is None or self._last_step() == step:
            return
        if not self.schedule.due(step, epoch, epoch_end):
            return
        if isinstance(self.schedule, TimeBudget):
            allowed = trainer.is_global_zero and self.schedule.allows(step, time.perf_counter())
            if not self._shared_schedule(trainer, allowed):
                return
        self._run_evaluation(trainer, pl_module, when="epoch" if epoch_end else "step")

    def _shared_schedule(self, trainer: Trainer, decision: bool = True) -> bool:
        """Rank 0's ``decision`` and budget state, on every rank."""
        if trainer.world_size == 1 or not isinstance(self.schedule, TimeBudget):
            return decision
        decision, state = trainer.strategy.broadcast((decision, self.schedule.state_dict()), 0)
        self.schedule.load_state_dict(state)
        return decision

    # ----------------------------------------------------------------------------------------
    # One evaluation

    def _run_evaluation(self, trainer: Trainer, pl_module: LightningModule, when: str) -> None:
        """Evaluate on rank 0, share the result with every rank, record, warn and log.
        ``when``: ``start`` (before training), ``epoch`` (an epoch's end), ``step`` (after a
        training batch) or ``end`` (after training)."""
        if trainer.sanity_checking or self.probe is None:
            return
        began = time.perf_counter()
        kernel = self._shared_kernel(trainer, pl_module) if trainer.world_size > 1 else None
        result = None
        if trainer.is_global_zero:
            result = self._evaluate_safely(trainer, pl_module, kernel)
        if result is not None:
            result.metrics["entk/seconds"] = time.perf_counter() - began
        payload = None if result is None else (result.eigenvalues, result.cliffs, result.metrics)
        payload = trainer.strategy.broadcast(payload, src=0)
        if payload is not None:
            logged = time.perf_counter()
            self._record_and_log(trainer, pl_module, when, *payload)
            if trainer.is_global_zero and result is not None:
                self._log_extras(trainer, result, when, logging=time.perf_counter() - logged)
        ended = time.perf_counter()
        self.monitor_seconds += ended - began
        if trainer.is_global_zero and isinstance(self.schedule, TimeBudget):
            metrics = {} if payload is None else payload[2]
            self.schedule.record(trainer.global_step, began, ended, metrics)
        self._shared_schedule(trainer)

    def _record_and_log(self, trainer, pl_module, when: str, eigenvalues, cliffs, metrics):
        """Append to the history, run the detector and log the scalars (on every rank)."""
        epoch = trainer.current_epoch + (when == "epoch")  # completed epochs
        if self.accuracy_key and self.accuracy_key in trainer.callback_metrics:
            metrics[self.accuracy_key] = float(trainer.callback_metrics[self.accuracy_key])
        record = EvaluationRecord(epoch, trainer.global_step, eigenvalues, cliffs, metrics)
        self.history.append(record)
        raised = self.early_warning.update(record) if self.early_warning else []
        self.transitions.extend(raised)
        scalars = {k: v for k, v in metrics.items() if k.startswith("entk/")}
        scalars["entk/transitions"] = float(len(self.transitions))
        if when in ("start", "end"):  # Lightning allows no `self.log` here: to the loggers
            _to_loggers(trainer, scalars)
        else:
            for key, value in scalars.items():
                # Every rank holds the broadcast value: a max over ranks returns it exactly.
                pl_module.log(
                    key,
                    value,
                    on_step=when == "step",
                    on_epoch=when != "step",
                    prog_bar=key in PROGRESS_BAR_KEYS,
                    batch_size=1,
                    sync_dist=True,
                    reduce_fx="max",
                )
        for transition in raised:
            self._announce(trainer, transition)

    def _shared_kernel(self, trainer: Trainer, pl_module: LightningModule) -> Tensor | None:
        """Under several processes, each computes a share of the probe kernel
        (:mod:`~lightning_entk.distributed`) and rank 0 receives it whole (the others
        ``None``). A rank that fails sends NaN, so that none waits forever."""
        world, rank = trainer.world_size, trainer.global_rank
        x = to_device(self.probe.x, pl_module.device)
        n = num_points(x)
        try:
            with _preserved_rng():
                share = kernel_share(
                    pl_module,
                    x,
                    world,
                    rank,
                    mode=self.mode,
                    output_projections=self.output_projections,
                    options=self._kernel_options(),
                )
        except Exception as err:
            rank_zero_warn(f"ENTKMonitor: kernel part failed on rank {rank}: {err!r}")
            share = failed_share(n, world, self.mode, self._rows_per_point, pl_module.device)
        shares = trainer.strategy.all_gather(share)
        if not trainer.is_global_zero:
            return None
        return combine_shares(shares, self.mode, n, self._rows_per_point)

    def _evaluate_safely(
        self, trainer: Trainer, pl_module: LightningModule, kernel: Tensor | None = None
    ) -> Evaluation | None:
        """One evaluation (of ``kernel`` when given, e.g. from several processes), or a warning
        and ``None`` if it fails."""
        try:
            with _preserved_rng():
                result = evaluate(
                    pl_module,
                    self.probe,
                    mode=self.mode,
                    output_projections=self.output_projections,
                    groups=self.groups if kernel is None else None,
                    **self._kernel_options(),
                    previous_kernel=self._previous_kernel,
                    features=self._features,
                    cliff_options=self.cliff_options,
                    kernel=kernel,
                )
        except Exception as err:  # never let monitoring end the user's run
            rank_zero_warn(
                f"ENTKMonitor skipped its evaluation at epoch {trainer.current_epoch}, step "
                f"{trainer.global_step}: {type(err).__name__}: {err}"
            )
            return None
        self._previous_kernel = result.kernel.to(torch.float32)
        return result

    def _announce(self, trainer: Trainer, transition: PhaseTransition) -> None:
        rank_zero_info(f"ENTKMonitor: phase transition ahead? {transition.describe()}")
        tensorboard = _tensorboard(trainer)
        if tensorboard is not None and trainer.is_global_zero:
            tensorboard.experiment.add_text(
                "entk/transitions", transition.describe(), trainer.global_step
            )
        if self.on_transition is not None:
            try:
                self.on_transition(transition)
            except Exception as err:
                rank_zero_warn(f"ENTKMonitor: the `on_transition` hook raised {err!r}; continuing.")

    def _log_extras(self, trainer: Trainer, result: Evaluation, when: str, logging: float):
        """Rank 0: the histogram; the images at every n-th evaluation and at the end, when the
        time budget affords them; the time of the logging and of the images."""
        self._last_result = result
        tensorboard = _tensorboard(trainer)
        seconds = {"entk/seconds/logging": logging}
        if self.log_images and tensorboard is not None:
            began = time.perf_counter()
            plots.add_histogram(tensorboard.experiment, trainer.global_step, result.eigenvalues)
            count = len(self.history) - 1  # evaluations since initialization
            draw = when == "end" or (count > 0 and count % self.image_every_n_evaluations == 0)
            if draw and isinstance(self.schedule, TimeBudget):
                draw = self.schedule.affords(self._image_seconds, time.perf_counter())
            if draw:
                self._draw_images(trainer, result)
            seconds["entk/seconds/images"] = time.perf_counter() - began
        _to_loggers(trainer, seconds)

    def _draw_images(self, trainer: Trainer, result: Evaluation) -> None:
        """The evaluation's figures and the spectrum's evolution, as TensorBoard images."""
        began = time.perf_counter()
        try:
            plots.add_images(
                _tensorboard(trainer).experiment,
                trainer.global_step,
                result.eigenvalues,
                result.cliffs,
                epoch=self.history[-1].epoch,
                eigenvectors=result.eigenvectors,
                features=self._features,
                pairs=self._feature_pairs,
                evolution=self.summary_figure(),
            )
        except Exception as err:
            rank_zero_warn(f"ENTKMonitor could not draw its images: {err!r}")
        self._image_seconds = time.perf_counter() - began
        self._pictured_step = trainer.global_step

    # ----------------------------------------------------------------------------------------

    def first_epoch_reaching(self, level: float) -> int | None:
        """Completed epochs at the first evaluation at which the watched metric
        (``accuracy_key``) was at least ``level``; ``None`` if none was."""
        return next(
            (r.epoch for r in self.history if r.metrics.get(self.accuracy_key, -math.inf) >= level),
            None,
        )

    def summary_figure(self):
        """The spectrum's evolution over the evaluations so far, cliffs and accuracy alongside
        (drawn once for each state of the history)."""
        drawn_for = (len(self.history), len(self.transitions))
        if self._summary is None or self._summary[0] != drawn_for:
            figure = plots.plot_history(self.history, self.accuracy_key, self.transitions)
            self._summary = (drawn_for, figure)
        return self._summary[1]

    def _kernel_options(self) -> dict:
        """The arguments of every kernel this monitor computes; the engine gets half the
        budget, the rest is the kernel's own dense work."""
        return {
            "params": self.params,
            "output_fn": self.output_fn,
            "output_weights": self.output_weights,
            "forward_fn": self.forward_fn,
            "method": self.method,
            "memory_budget": self.memory_budget // 2,
        }

    def _fit_to_budget(self, probe: ProbeSet, pl_module: LightningModule) -> ProbeSet:
        """``probe``, or the largest seeded subset of it that fits ``memory_budget`` (with a
        warning); logs each parameter's route and the predicted cost."""
        with _preserved_rng():
            plan = ntk_plan(
                pl_module,
                to_device(probe.x, pl_module.device),
                mode="full" if self.mode == "flatten" else "trace",
                output_projections=self.output_projections,
                **self._kernel_options(),
            )
        self._rows_per_point = plan.num_outputs if self.mode == "flatten" else 1
        rank_zero_info(f"ENTKMonitor: {plan}")
        num_groups = 0
        if self.groups is not None:
            names = [n for n, p in pl_module.named_parameters() if p.requires_grad]
            num_groups = len(set(parameter_groups(pl_module, names, self.groups).values()))
        probe, warning = probe_within_budget(
            probe, plan, self.memory_budget, self._rows_per_point, num_groups
        )
        if warning:
            rank_zero_warn(warning)
        return probe

    def _last_step(self) -> int | None:
        return self.history[-1].step if self.history else None


def _to_loggers(trainer: Trainer, scalars: Mapping[str, float]) -> None:
    """Scalars straight to every logger at the current step (where ``self.log`` is not
    allowed, or after it)."""
    for logger in trainer.loggers:
        logger.log_metrics(dict(scalars), step=trainer.global_step)


def _tensorboard(trainer: Trainer) -> TensorBoardLogger | None:
    return next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)


def _log_dir(trainer: Trainer) -> str | None:
    """The first logger's directory, if any logger has one."""
    directories = (getattr(logger, "log_dir", None) for logger in trainer.loggers)
    return next((d for d in directories if d), None)


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


def _overrides(module, name: str) -> bool:
    from lightning.pytorch import LightningDataModule

    return getattr(type(module), name) is not getattr(LightningDataModule, name)


def _dataset_of(loaders):
    if loaders is None:
        return None
    if isinstance(loaders, (list, tuple)):
        loaders = loaders[0] if loaders else None
    elif isinstance(loaders, dict):
        loaders = next(iter(loaders.values()), None)
    return getattr(loaders, "dataset", None)


@contextlib.contextmanager
def _preserved_rng() -> Iterator[None]:
    """Restore torch (CPU and CUDA), numpy and Python RNG states on exit."""
    numpy_state, python_state = np.random.get_state(), random.getstate()  # noqa: NPY002
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            np.random.set_state(numpy_state)  # noqa: NPY002
            random.setstate(python_state)
