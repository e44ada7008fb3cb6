"""ENTKMonitor: the empirical NTK of a LightningModule, watched while it trains.

The hooks only decide *when* (cadence, rank, sanity checking) and hand the work to the pure
core: :func:`~lightning_entk.evaluation.evaluate`, :class:`~lightning_entk.EarlyWarning` and
:mod:`~lightning_entk.plots`.
"""

from __future__ import annotations

import contextlib
import math
import random
import re
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
from lightning_entk.alignment import feature_alignment
from lightning_entk.early_warning import EarlyWarning, EvaluationRecord, PhaseTransition
from lightning_entk.evaluation import Evaluation, evaluate, points_within_budget
from lightning_entk.kernel import (
    Groups,
    OutputFn,
    ParamSelection,
    check_kernel_options,
    check_projection_mode,
    compute_dtype,
    empirical_ntk,
    ntk_plan,
    num_outputs,
    projection_matrix,
)
from lightning_entk.kernel.points import ForwardFn, num_points, take, to_device
from lightning_entk.probe import (
    DEFAULT_MAX_PROBE_POINTS,
    ProbeSet,
    as_probe_set,
    draw_probe_set,
)

DEFAULT_MEMORY_BUDGET = 2 * 2**30  # bytes for everything one evaluation allocates
SUMMARY_FILENAME = "entk_summary.png"
PROGRESS_BAR_KEYS = ("entk/num_cliffs", "entk/kernel_regression_acc")


class ENTKMonitor(Callback):
    """Compute the empirical NTK on a fixed probe set during training, find its spectral cliffs,
    log them beside accuracy, and warn of coming phase transitions.

    Scalars go through ``pl_module.log`` under ``entk/`` (so every logger, the progress bar and
    ``trainer.callback_metrics`` see them; see :mod:`lightning_entk.evaluation` for the keys).
    With a :class:`~lightning.pytorch.loggers.TensorBoardLogger` the monitor also adds a
    Custom Scalars layout (:func:`tensorboard_layout`: accuracy beside kernel regression, and
    the cliffs), a histogram of log10 eigenvalues, images of the spectrum with its cliffs, of
    the spectrum's evolution beside accuracy, and of feature alignment when the LightningModule
    exposes ground truth (a method ``entk_ground_truth(x, mode) -> dict[str, Tensor]`` giving,
    per feature family, an ``(R, F)`` matrix over the probe's kernel rows; set
    ``entk_feature_pairs = True`` on the module when consecutive columns are cos/sin pairs of
    one frequency). At the end of fit the
    evolution figure is saved as ``entk_summary.png`` in the logger's directory (with no logger,
    draw it with :meth:`summary_figure`).

    The training run is never changed: the kernel is computed on detached copies of the
    parameters in eval mode without autocast, RNG states are restored, and an evaluation that
    fails becomes a warning and is skipped.

    Args:
        probe: the probe set: a tensor of points, ``(x, y)`` with integer labels, a
            :class:`~lightning_entk.probe.ProbeSet`, a ``Dataset`` or a ``DataLoader``. ``None``
            draws up to ``max_probe_points`` from the training and validation data (validation
            points held out for kernel regression), once, fixed for the whole run.
        every_n_epochs: evaluate at the end of every n-th training epoch (``None``: never).
        every_n_train_steps: evaluate after every n-th optimizer step (``None``: never).
        mode: ``"trace"`` (N x N, the *sum* over outputs) or ``"flatten"`` (C*N x C*N).
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
            children), a callable ``name -> group`` or a mapping ``group -> parameter names``
            (see :func:`~lightning_entk.empirical_ntk`). ``None``: the whole model only.
            Single-process runs only (under DDP the ranks share the whole kernel's work).
        accuracy_key: the network's own metric shown beside the spectrum and used by the early
            warning (looked up in ``trainer.callback_metrics``).
        early_warning: the detector, or ``None`` for none.
        on_transition: called with each :class:`~lightning_entk.PhaseTransition` raised.
        cliff_options: keyword arguments for :func:`~lightning_entk.find_cliffs`.
        log_images: whether to add images and histograms to a TensorBoard logger.
        image_every_n_evaluations: images at every n-th evaluation (rendering takes ~0.3 s).
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
        every_n_epochs: int | None = 1,
        every_n_train_steps: int | None = None,
        mode: str = "trace",
        *,
        max_probe_points: int = DEFAULT_MAX_PROBE_POINTS,
        params: ParamSelection = None,
        output_fn: OutputFn = None,
        output_weights: Tensor | None = None,
        output_projections: int | None = None,
        forward_fn: ForwardFn = None,
        method: str = "auto",
        groups: Groups = None,
        accuracy_key: str | None = "val_acc",
        early_warning: EarlyWarning | None = None,
        on_transition: Callable[[PhaseTransition], None] | None = None,
        cliff_options: Mapping[str, object] | None = None,
        log_images: bool = True,
        image_every_n_evaluations: int = 5,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
    ) -> None:
        for name, value in (
            ("every_n_epochs", every_n_epochs),
            ("every_n_train_steps", every_n_train_steps),
        ):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"`{name}` must be a positive int or None, got {value!r}.")
        if every_n_epochs is None and every_n_train_steps is None:
            raise ValueError("Set `every_n_epochs` or `every_n_train_steps`; both are None.")
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
        self._probe_argument = None if probe is None else as_probe_set(probe, max_probe_points)
        self.every_n_epochs = every_n_epochs
        self.every_n_train_steps = every_n_train_steps
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
        self.summary_path: Path | None = None

    # ----------------------------------------------------------------------------------------
    # Lightning hooks

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
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
            layout = tensorboard_layout(self.accuracy_key, per_group=self.groups is not None)
            tensorboard.experiment.add_custom_scalars(layout)
        if not self.history:  # not resumed: the kernel at initialization
            self._run_evaluation(trainer, pl_module, when="start")

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._run_evaluation(trainer, pl_module, when="epoch")

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args) -> None:
        n = self.every_n_train_steps
        if n and trainer.global_step % n == 0 and self._last_step() != trainer.global_step:
            self._run_evaluation(trainer, pl_module, when="step")

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        log_dir = _log_dir(trainer)
        if not trainer.is_global_zero or not self.history or log_dir is None:
            return  # without a logger: `summary_figure()` draws it on demand
        try:
            figure = self.summary_figure()
            path = Path(log_dir) / SUMMARY_FILENAME
            path.parent.mkdir(parents=True, exist_ok=True)
            figure.savefig(path, dpi=100)
            self.summary_path = path
            rank_zero_info(f"ENTKMonitor: summary figure saved to {path}")
        except Exception as err:  # a figure must never fail the run
            rank_zero_warn(f"ENTKMonitor could not save its summary figure: {err!r}")

    def state_dict(self) -> dict:
        return {
            "history": [r.to_state() for r in self.history],
            "transitions": [vars(t) for t in self.transitions],
            "early_warning": self.early_warning.state_dict(),
            "probe": None if self.probe is None else vars(self.probe),
            "previous_kernel": self._previous_kernel,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = [EvaluationRecord.from_state(r) for r in state_dict["history"]]
        self.transitions = [PhaseTransition(**t) for t in state_dict["transitions"]]
        self.early_warning.load_state_dict(state_dict["early_warning"])
        if state_dict["probe"] is not None:
            self.probe = ProbeSet(**state_dict["probe"])
        self._previous_kernel = state_dict["previous_kernel"]

    # ----------------------------------------------------------------------------------------
    # One evaluation

    def _run_evaluation(self, trainer: Trainer, pl_module: LightningModule, when: str) -> None:
        """Evaluate on rank 0, share the result with every rank, record, warn and log.
        ``when``: ``start`` (before training), ``epoch`` (an epoch's end) or ``step``."""
        if trainer.sanity_checking or self.probe is None:
            return
        start = time.perf_counter()
        kernel = self._distributed_kernel(trainer, pl_module) if trainer.world_size > 1 else None
        result = None
        if trainer.is_global_zero:
            result = self._evaluate_safely(trainer, pl_module, kernel)
            if result is not None:
                result.metrics["entk/seconds"] = time.perf_counter() - start
        payload = (
            None
            if result is None
            else (result.eigenvalues, result.cliffs, result.metrics, result.overlaps)
        )
        payload = trainer.strategy.broadcast(payload, src=0)
        if payload is None:
            return
        eigenvalues, cliffs, metrics, _ = payload
        epoch = trainer.current_epoch + (when == "epoch")  # completed epochs
        if self.accuracy_key and self.accuracy_key in trainer.callback_metrics:
            metrics[self.accuracy_key] = float(trainer.callback_metrics[self.accuracy_key])
        record = EvaluationRecord(epoch, trainer.global_step, eigenvalues, cliffs, metrics)
        self.history.append(record)
        raised = self.early_warning.update(record) if self.early_warning else []
        self.transitions.extend(raised)
        scalars = {k: v for k, v in metrics.items() if k.startswith("entk/")}
        scalars["entk/transitions"] = float(len(self.transitions))
        if when == "start":  # Lightning allows no `self.log` here: straight to the loggers
            for logger in trainer.loggers:
                logger.log_metrics(scalars, step=trainer.global_step)
        else:
            on_step = when == "step"
            for key, value in scalars.items():
                # Every rank holds the broadcast value: a max over ranks returns it exactly.
                pl_module.log(
                    key,
                    value,
                    on_step=on_step,
                    on_epoch=not on_step,
                    prog_bar=key in PROGRESS_BAR_KEYS,
                    batch_size=1,
                    sync_dist=True,
                    reduce_fx="max",
                )
        for transition in raised:
            self._announce(trainer, transition)
        if trainer.is_global_zero and result is not None:
            self._log_images(trainer, result)

    def _distributed_kernel(self, trainer: Trainer, pl_module: LightningModule) -> Tensor | None:
        """Under several processes, each computes a share of the probe kernel and rank 0
        receives it whole (the others ``None``).

        ``trace``: each rank takes an equal share of the output projections (the identity's
        columns for the exact kernel), so its backward passes and Gram products are
        1/world_size of the work, and the parts are summed. ``flatten``: each rank computes the
        kernel rows of an equal share of the probe points, which rank 0 assembles. A rank that
        fails sends NaN (rank 0 then skips the evaluation): every rank always reaches the
        collective, so a failure cannot deadlock the run."""
        world, rank = trainer.world_size, trainer.global_rank
        x = to_device(self.probe.x, pl_module.device)
        n, outputs = num_points(x), self._rows_per_point
        options = self._kernel_options()
        try:
            with _preserved_rng():
                if self.mode == "trace":
                    part = self._trace_kernel_part(pl_module, x, world, rank, options)
                else:
                    share = math.ceil(n / world)
                    # Equal shares for the gather: the last is padded with copies of point 0.
                    rows = torch.arange(rank * share, (rank + 1) * share)
                    rows = torch.where(rows < n, rows, 0)
                    part = empirical_ntk(pl_module, take(x, rows), x, mode=self.mode, **options)
                part = part.to(torch.float64)
        except Exception as err:
            rank_zero_warn(f"ENTKMonitor: kernel part failed on rank {rank}: {err!r}")
            rows = n if self.mode == "trace" else outputs * math.ceil(n / world)
            device = pl_module.device
            part = torch.full((rows, outputs * n), torch.nan, dtype=torch.float64, device=device)
        parts = trainer.strategy.all_gather(part)
        if not trainer.is_global_zero:
            return None
        if self.mode == "trace":
            return parts.sum(0)
        return assemble_row_blocks(parts, n, outputs)

    def _trace_kernel_part(
        self, pl_module: LightningModule, x: Tensor, world: int, rank: int, options: dict
    ) -> Tensor:
        """This rank's part of the trace kernel: its share of the projection columns."""
        columns = projection_matrix(
            num_outputs(pl_module, x, self.output_fn, self.forward_fn),
            self.output_projections,
            dtype=compute_dtype(pl_module),
            device=pl_module.device,
        ).tensor_split(world, dim=1)[rank]
        if columns.shape[1] == 0:  # more ranks than projections
            n = num_points(x)
            return torch.zeros(n, n, dtype=torch.float64, device=pl_module.device)
        return empirical_ntk(pl_module, x, mode="trace", output_projections=columns, **options)

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

    def _log_images(self, trainer: Trainer, result: Evaluation) -> None:
        tensorboard = _tensorboard(trainer)
        if not self.log_images or tensorboard is None:
            return
        step = trainer.global_step
        writer = tensorboard.experiment
        positive = result.eigenvalues[result.eigenvalues > 0]
        if positive.size:
            writer.add_histogram("entk/log10_eigenvalues", np.log10(positive), step)
        if (len(self.history) - 1) % self.image_every_n_evaluations != 0:
            return
        try:
            figures = {
                "entk/spectrum": plots.plot_spectrum(
                    result.eigenvalues,
                    result.cliffs,
                    title=f"eNTK spectrum, epoch {self.history[-1].epoch}",
                ),
                "entk/spectrum_evolution": self.summary_figure(),
            }
            figures.update(self._alignment_figures(result))
            for tag, figure in figures.items():
                writer.add_image(tag, plots.figure_to_array(figure), step, dataformats="HWC")
        except Exception as err:
            rank_zero_warn(f"ENTKMonitor could not draw its images: {err!r}")

    def _alignment_figures(self, result: Evaluation) -> dict:
        if not self._features or result.eigenvectors is None:
            return {}
        top = max([c.rank for c in result.cliffs], default=0)
        k = min(result.eigenvectors.shape[1], max(2 * top, 16))
        figures = {}
        for family, features in self._features.items():
            matrix = feature_alignment(
                result.eigenvectors[:, :k], features, pairs=self._feature_pairs
            )
            figures[f"entk/alignment/{family}"] = plots.plot_alignment(
                matrix,
                title=f"|cos| of eigenvectors with features '{family}'",
                col_label=(
                    "frequency (cos and sin combined)" if self._feature_pairs else "feature index"
                ),
                cliffs=result.cliffs,
            )
        return figures

    # ----------------------------------------------------------------------------------------

    def first_epoch_reaching(self, level: float) -> int | None:
        """Completed epochs at the first evaluation at which the watched metric
        (``accuracy_key``) was at least ``level``; ``None`` if none was."""
        return next(
            (r.epoch for r in self.history if r.metrics.get(self.accuracy_key, -math.inf) >= level),
            None,
        )

    def summary_figure(self):
        """The spectrum's evolution over the evaluations so far, cliffs and accuracy alongside."""
        epochs = np.array([r.epoch for r in self.history])
        k = max(len(r.eigenvalues) for r in self.history)
        values = np.full((len(self.history), k), np.nan)
        for i, r in enumerate(self.history):
            values[i, : len(r.eigenvalues)] = r.eigenvalues
        accuracy = {}
        for key in (self.accuracy_key, "entk/kernel_regression_acc"):
            series = np.array([r.metrics.get(key, np.nan) for r in self.history], dtype=float)
            if key and not np.isnan(series).all():
                accuracy[key] = series
        return plots.plot_spectrum_evolution(
            epochs,
            values,
            [r.cliffs for r in self.history],
            accuracy=accuracy or None,
            transitions=self.transitions,
        )

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
        """``probe``, or its largest seeded subset whose evaluation fits ``memory_budget``
        (with a warning); logs each parameter's route and the predicted cost.

        Raises:
            ValueError: if not even two points fit.
        """
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
        fits = points_within_budget(plan, self.memory_budget, self._rows_per_point)
        if fits >= len(probe):
            return probe
        if fits < 2:
            raise ValueError(
                f"ENTKMonitor: not even 2 probe points fit `memory_budget` = "
                f"{self.memory_budget / 2**20:.0f} MiB ({plan.num_outputs} outputs, "
                f"mode={self.mode!r}); raise `memory_budget`, use mode='trace', or set "
                "`output_projections` or `params` to count fewer outputs or parameters."
            )
        rank_zero_warn(
            f"ENTKMonitor: an evaluation on all {len(probe)} probe points would need more than "
            f"`memory_budget` = {self.memory_budget / 2**20:.0f} MiB; it uses {fits} of them "
            "(a fixed seeded subset). Raise `memory_budget`, or pass fewer points, "
            "`output_projections` or `params`, to choose otherwise."
        )
        return probe.subset(fits)

    def _last_step(self) -> int | None:
        return self.history[-1].step if self.history else None


def assemble_row_blocks(blocks: Tensor, n: int, outputs: int) -> Tensor:
    """The kernel of ``n`` probe points from the row blocks of equal shares of them.

    Args:
        blocks: ``(world, outputs * share, outputs * n)``: block ``r`` holds the kernel rows of
            points ``r * share .. (r + 1) * share - 1`` (class-major when ``outputs`` > 1,
            padded past ``n``) against all ``n`` points.
        n: probe points.
        outputs: kernel rows per point: 1 for ``trace``, C for ``flatten``.

    Example:
        >>> k = torch.arange(16.0).reshape(4, 4)
        >>> blocks = torch.stack([k[:2], k[2:]])
        >>> torch.equal(assemble_row_blocks(blocks, n=4, outputs=1), k)
        True
    """
    world, columns = blocks.shape[0], blocks.shape[2]
    share = blocks.shape[1] // outputs
    by_class = blocks.reshape(world, outputs, share, columns).transpose(0, 1)
    return by_class.reshape(outputs, world * share, columns)[:, :n].reshape(outputs * n, columns)


def tensorboard_layout(accuracy_key: str | None, per_group: bool = False) -> dict:
    """TensorBoard's Custom Scalars layout of the monitor's charts: the network's accuracy
    (``accuracy_key``) and eNTK kernel regression in one chart, then the cliffs, the top
    eigenvalues, and alignment and velocity; with ``per_group``, the same signals of every
    parameter group, one line per group. Tags are regular expressions (matched from the start
    of a tag, as TensorBoard does)."""
    accuracy = [f"{re.escape(accuracy_key)}$"] if accuracy_key else []
    groups = {
        "eNTK per parameter group": {
            "accuracy: network and each group's kernel regression": [
                "Multiline",
                [*accuracy, r"entk/[^/]+/kernel_regression_acc$"],
            ],
            "kernel-target alignment of each group": [
                "Multiline",
                [r"entk/[^/]+/kernel_target_alignment$"],
            ],
            "top eigenvalue of each group": ["Multiline", [r"entk/[^/]+/eigenvalue/top1$"]],
            "cliffs found in each group": ["Multiline", [r"entk/[^/]+/num_cliffs$"]],
        }
    }
    return {
        "eNTK monitor": {
            "accuracy: network and eNTK kernel regression": [
                "Multiline",
                [*accuracy, r"entk/kernel_regression_acc$"],
            ],
            "cliffs found and phase-transition signals so far": [
                "Multiline",
                [r"entk/num_cliffs$", r"entk/transitions$"],
            ],
            "cliff ranks (eigenvalues above each cliff)": ["Multiline", [r"entk/cliff_rank/\d+$"]],
            "top eigenvalues": ["Multiline", [r"entk/eigenvalue/top\d+$"]],
            "kernel-target alignment and kernel velocity": [
                "Multiline",
                [r"entk/kernel_target_alignment$", r"entk/kernel_velocity$"],
            ],
        },
        **(groups if per_group else {}),
    }


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
