"""The monitor's core: a model, a probe set, two tiers of evaluation, an early warning, a sink.

:class:`Monitor` knows no training framework. A training loop tells it where training is
(:meth:`~Monitor.start`, then :meth:`~Monitor.step` with the optimizer step, the completed
epochs and the metrics it has, then :meth:`~Monitor.end`), and it decides the rest:

* the **sentinel** (:mod:`~lightning_entk.monitor.sentinel`), the readout's kernel on the
  held-out probe points, read at every epoch's end as its share of the time allows;
* **full evaluations** (:func:`~lightning_entk.evaluation.evaluate`: the whole kernel, its
  spectrum and cliffs, every group's figures, images) when the schedule says so
  (:mod:`~lightning_entk.schedule`: a time budget spent where the sentinel and the kernel move,
  or a fixed cadence), and always at the start and the end of training;
* the **early warning** (:class:`~lightning_entk.EarlyWarning`) from both;
* what it logs, to any sink (:mod:`~lightning_entk.monitor.sinks`: a dict, a TensorBoard
  ``SummaryWriter``, a logger), and its resumable state (:meth:`~Monitor.state_dict`).

Under several processes a :class:`Collective` (the Lightning callback passes one over its
strategy) shares the kernel's work and rank 0's decisions, so that every rank evaluates at the
same steps and holds the same history.

A plain training loop::

    monitor = Monitor(model, probe, sink=SummaryWriter("runs/entk"))
    monitor.start()
    for epoch in range(1, epochs + 1):
        ...  # train one epoch, measure val_acc
        monitor.step(step=epoch, epoch=epoch, metrics={"val_acc": val_acc})
    monitor.end(step=epochs, epoch=epochs)
    print(monitor.summary())
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import Tensor, nn

from lightning_entk import keys, plots
from lightning_entk.checks import check_int
from lightning_entk.distributed import combine_shares, failed_share, kernel_share
from lightning_entk.early_warning import EarlyWarning, EvaluationRecord, PhaseTransition
from lightning_entk.evaluation import Evaluation, evaluate, probe_within_budget
from lightning_entk.forecast import Forecast, forecast
from lightning_entk.kernel import KernelOptions, ntk_plan
from lightning_entk.kernel.budget import MemoryBudget
from lightning_entk.kernel.options import check_projection_mode
from lightning_entk.kernel.points import num_points, to_device
from lightning_entk.milestones import RANK_TOLERANCE, first_epoch_reaching, new_ranks_first_seen
from lightning_entk.monitor import report
from lightning_entk.monitor.sentinel import Reading, Sentinel
from lightning_entk.monitor.sinks import Sink, as_sink, tensorboard_layout
from lightning_entk.probe import (
    DEFAULT_MAX_PROBE_POINTS,
    ProbeSet,
    as_probe_set,
    draw_probe_set,
)
from lightning_entk.schedule import (
    DEFAULT_MAX_OVERHEAD,
    Clock,
    FixedCadence,
    Schedule,
    TimeBudget,
)

log = logging.getLogger("lightning_entk")

# What a schedule does: the methods of the protocol, read off it so that the two cannot drift.
SCHEDULE_METHODS = tuple(n for n, v in vars(Schedule).items() if callable(v) and n[0] != "_")


class Collective(Protocol):
    """Collective operations among the processes of a run (one process: :class:`Alone`)."""

    rank: int
    world_size: int

    def broadcast(self, obj: object, src: int = 0) -> object: ...

    def all_gather(self, tensor: Tensor) -> Tensor: ...


class Alone:
    """A single process: broadcasting returns the object, gathering stacks one tensor."""

    rank = 0
    world_size = 1

    def broadcast(self, obj: object, src: int = 0) -> object:
        return obj

    def all_gather(self, tensor: Tensor) -> Tensor:
        return tensor[None]


class Monitor:
    """The empirical NTK of a model on a fixed probe set, watched while it trains (see the
    module docstring).

    Configured here, bound to a model by :meth:`bind` (at once when ``model`` is given), then
    driven by :meth:`start`, :meth:`step` and :meth:`end`. Invalid arguments fail here; any
    failure after (binding included: a model the engine cannot differentiate, a probe it
    cannot take) is a warning that says why, the monitor turns itself off and training goes on.

    Args:
        model: the model being trained (read, never changed); ``None`` to :meth:`bind` one
            later.
        probe: the probe set: a :class:`~lightning_entk.ProbeSet`, points, ``(points, y)``, a
            ``Dataset`` or a ``DataLoader`` (see :func:`~lightning_entk.probe.as_probe_set`).
            With labels and held-out points (validation points, not trained on) the monitor
            logs kernel regression and alignment, and the sentinel reads the readout. ``None``:
            drawn at :meth:`bind` from the training and validation data (validation points
            held out), once, fixed for the whole run.
        every_n_epochs: full evaluations at the end of every n-th epoch instead of within the
            time budget.
        every_n_train_steps: full evaluations after every n-th optimizer step instead of
            within the time budget.
        mode: ``"trace"`` (N x N, the *sum* over outputs) or ``"flatten"`` (C*N x C*N).
        max_overhead: the time budget: the monitor's wall time, sentinel included, as a share
            of the training's (``None``: 0.1 unless a fixed cadence is set).
        schedule: when full evaluations are made, instead of the three arguments above: a
            :class:`~lightning_entk.TimeBudget` (with its ``tolerance`` and ``burst``) or a
            :class:`~lightning_entk.FixedCadence` (:mod:`~lightning_entk.schedule`).
        max_probe_points: cap on the points read from a ``Dataset`` or ``DataLoader`` or drawn
            from the data.
        kernel: how the kernel is computed (:class:`~lightning_entk.kernel.KernelOptions`:
            parameters, output maps, projections, groups, memory budget, ...; default
            ``KernelOptions(groups="auto")``, the whole kernel and a few parameter groups). Its
            ``memory_budget`` is what one full evaluation may allocate in all: the engine gets
            half, the dense kernel work the rest; a probe set that would not fit is cut to the
            largest seeded subset that does, with a warning.
        accuracy_key: the network's own metric, among those passed to :meth:`step`, that the
            early warning and the summary measure leads against.
        sentinel: the readout's reading at every epoch (:class:`Sentinel`, ``True`` for the
            default one, ``False`` for none).
        early_warning: the detector (``True``: ``EarlyWarning(accuracy_key)``; ``False``: none).
        on_transition: called with each :class:`~lightning_entk.PhaseTransition` raised.
        cliff_options: keyword arguments for :func:`~lightning_entk.find_cliffs`.
        image_every_n_evaluations: images at every n-th full evaluation (when the budget
            affords them) and of the last one; 0 for none.
        sink: where to write (:func:`~lightning_entk.monitor.sinks.as_sink`: ``None`` or a
            dict, a ``SummaryWriter``, a logger, a sink).
        collective: the run's processes (default: one).
        clock: the monitor's clock (default: a new :class:`~lightning_entk.schedule.Clock`).

    Raises:
        ValueError: for invalid arguments (each named, with what it must be).
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        probe: object = None,
        *,
        every_n_epochs: int | None = None,
        every_n_train_steps: int | None = None,
        mode: str = "trace",
        max_overhead: float | None = None,
        schedule: Schedule | None = None,
        max_probe_points: int = DEFAULT_MAX_PROBE_POINTS,
        kernel: KernelOptions | None = None,
        accuracy_key: str | None = "val_acc",
        sentinel: Sentinel | bool = True,
        early_warning: EarlyWarning | bool = True,
        on_transition: Callable[[PhaseTransition], None] | None = None,
        cliff_options: Mapping[str, object] | None = None,
        image_every_n_evaluations: int = 25,
        sink: object = None,
        collective: Collective | None = None,
        clock: Clock | None = None,
    ) -> None:
        check_monitor_options(mode, kernel, sentinel, early_warning, on_transition,
                              image_every_n_evaluations, max_probe_points)  # fmt: skip
        self.schedule = make_schedule(schedule, every_n_epochs, every_n_train_steps, max_overhead)
        self.mode = mode
        self.kernel_options = KernelOptions(groups="auto") if kernel is None else kernel
        self.max_probe_points = max_probe_points
        self.probe = None if probe is None else as_probe_set(probe, max_probe_points)
        self.sentinel = _resolve(sentinel, Sentinel)
        self.early_warning = _resolve(early_warning, lambda: EarlyWarning(accuracy_key))
        self.accuracy_key = accuracy_key
        self.on_transition = on_transition
        self.cliff_options = dict(cliff_options or {})
        self.image_every_n_evaluations = image_every_n_evaluations
        self.sink: Sink = as_sink(sink)
        self.collective = collective or Alone()
        self.clock = clock or Clock()

        self.model: nn.Module | None = None
        self.off_reason: str | None = "not bound to a model"
        self.history: list[EvaluationRecord] = []  # full evaluations
        self.readings: list[Reading] = []  # sentinel readings
        self.watched: dict[int, float] = {}  # completed epochs -> the watched metric
        self.transitions: list[PhaseTransition] = []
        self.forecasts: list[Forecast] = []  # each that said something, and each that stopped
        self.summary_path: Path | None = None
        self._resumed: dict | None = None  # a state loaded before binding, applied at binding
        self._previous_kernel: Tensor | None = None
        self._last_result: Evaluation | None = None
        self._image_seconds = 0.0
        self._warned_missing_metric = False
        self._summary = None
        self._rows_per_point = 1
        self._features: dict[str, Tensor] = {}
        self._feature_pairs = False
        if model is not None:
            self.bind(model)

    def bind(
        self,
        model: nn.Module,
        probe: object = None,
        *,
        data: tuple[object, object] | None = None,
        sink: object = None,
        collective: Collective | None = None,
    ) -> bool:
        """Bind the monitor to ``model`` before training: the probe is tried on it (its plan
        logged), cut to the memory budget, and the sentinel chooses the readout.

        ``probe`` replaces the constructor's; with neither, one is drawn from ``data``, the
        training and validation datasets (:func:`~lightning_entk.probe.draw_probe_set`).
        ``sink`` and ``collective`` replace the constructor's. A failure is a warning that
        says why and what to pass; the monitor is then off (:attr:`off_reason`) and every
        later call does nothing. A state loaded before (:meth:`load_state_dict`) is applied.

        Returns:
            Whether the monitor is on.
        """
        self.model = model
        self.sink = self.sink if sink is None else as_sink(sink)
        self.collective = collective or self.collective
        try:
            if probe is not None:
                self.probe = as_probe_set(probe, self.max_probe_points)
            elif self.probe is None:
                with preserved_rng():
                    self.probe = draw_probe_set(*(data or (None, None)), self.max_probe_points)
            self._prepare()
        except Exception as err:  # monitoring never ends the user's run
            self.off_reason = f"{type(err).__name__}: {err}"
            self._warn(setup_failure(err))
            return False
        self.off_reason = None
        if self._resumed is not None:
            self.load_state_dict(self._resumed)
        return True

    @property
    def on(self) -> bool:
        """Whether the monitor is bound to a model and working."""
        return self.off_reason is None

    def _prepare(self) -> None:
        """What binding computes: the options under several processes, the budget, the probe
        that fits it, the ground truth and the sentinel."""
        if self.collective.world_size > 1 and self.kernel_options.groups is not None:
            log.info("ENTKMonitor: under several processes only the whole kernel is logged.")
            self.kernel_options = self.kernel_options.replace(groups=None)
        self.budget = MemoryBudget(self.kernel_options.memory_budget)
        self.engine = self.kernel_options.replace(memory_budget=self.budget.engine_share().total)
        self.probe = self._fit_probe(self.probe)
        self._features, self._feature_pairs = self._ground_truth()
        if self.sentinel is not None:
            reason = self.sentinel.setup(self.model, self.probe, self.engine)
            if reason:
                log.info(f"ENTKMonitor: the sentinel is off: {reason}.")
            elif self.early_warning is not None:
                self.early_warning.readout_group = self.sentinel.group

    # ----------------------------------------------------------------------------------------
    # What a training loop calls

    def start(self, step: int = 0, epoch: int = 0) -> None:
        """Training starts: the clock runs; the kernel at initialization (unless resumed)."""
        if not self.on:
            return
        if self.collective.rank == 0:
            grouped = self.kernel_options.groups is not None
            self.sink.layout(tensorboard_layout(self.accuracy_key, grouped))
        self.clock.start(step, epoch)
        if not self.history:
            self._read_sentinel(step, epoch)
            self._full_evaluation(step, epoch, final=False)

    def step(
        self,
        step: int,
        epoch: int,
        metrics: Mapping[str, float] | None = None,
        *,
        epoch_end: bool = True,
    ) -> list[PhaseTransition]:
        """Training reached optimizer ``step`` with ``epoch`` completed epochs (at an epoch's
        end when ``epoch_end``, else after a training batch); ``metrics``: the network's own,
        as measured now (e.g. ``{"val_acc": 0.4}``). Reads the sentinel and makes a full
        evaluation when due; returns the phase transitions raised."""
        if not self.on:
            return []
        raised = len(self.transitions)
        if epoch_end and metrics:
            self._watch(epoch, metrics)
        if self.sentinel is not None:
            if epoch_end:
                self.sentinel.epoch_ended(step)
            if self.sentinel.due(step):
                self._read_sentinel(step, epoch)
        self.schedule.expect(step, epoch, *self._outlook())
        if self._last_step() != step and self.schedule.due(step, epoch, epoch_end):
            if self._decide(lambda: self.schedule.allows(step, self.clock)):
                self._full_evaluation(step, epoch, final=False)
        return self.transitions[raised:]

    def end(self, step: int, epoch: int, metrics: Mapping[str, float] | None = None) -> None:
        """Training ended: the kernel at the end (unless just evaluated), its images when the
        budget affords them, and the summary figure (always: in the sink's directory as
        ``entk_summary.png`` and as the sink's last image of the spectrum's evolution)."""
        if not self.on:
            return
        self.clock.stop()
        if metrics:
            self._watch(epoch, metrics)
        if self._last_step() != step:
            self._full_evaluation(step, epoch, final=True)
        if self.collective.rank == 0 and self.history:
            with self.clock.charge("images"):
                self._write_summary_figure(step)

    # ----------------------------------------------------------------------------------------
    # Results

    @property
    def monitor_seconds(self) -> float:
        return self.clock.monitor_seconds

    @property
    def training_seconds(self) -> float:
        return self.clock.training_seconds()

    def first_epoch_reaching(self, level: float) -> int | None:
        """The first completed epoch at which the watched metric (``accuracy_key``, as passed
        to :meth:`step`) was at least ``level``; ``None`` if it never was."""
        epochs = sorted(self.watched)
        return first_epoch_reaching(epochs, [self.watched[e] for e in epochs], level)

    def new_cliffs(self) -> dict[int, int]:
        """Each cliff rank that the first full evaluation did not have, with the epoch of the
        first full evaluation that logged it."""
        return new_ranks_first_seen(
            [r.epoch for r in self.history], [[c.rank for c in r.cliffs] for r in self.history],
            RANK_TOLERANCE,
        )  # fmt: skip

    def summary(self) -> str:
        """A one-screen text summary: what the monitor cost beside training, when the watched
        metric crossed 0.5 and 0.95, each phase-transition signal with its lead, and the cliffs
        at the start and the end."""
        return report.summary_text(self)

    def summary_figure(self):
        """The spectrum's evolution over the full evaluations, cliffs marked; below, the
        watched metric at every epoch, the sentinel's readout alignment at every reading and
        kernel regression at every full evaluation, alarms as verticals."""
        drawn_for = (
            len(self.history),
            len(self.readings),
            len(self.watched),
            len(self.transitions),
        )
        if self._summary is None or self._summary[0] != drawn_for:
            self._summary = (drawn_for, report.history_figure(self))
        return self._summary[1]

    def state_dict(self) -> dict:
        """What a resumed run continues from; a state loaded but not applied yet (before
        binding, or with the monitor off) is kept as it was; ``{}`` when there is nothing."""
        if not self.on:
            return self._resumed or {}
        return {
            "history": [r.to_state() for r in self.history],
            "readings": [r.to_state() for r in self.readings],
            "watched": dict(self.watched),
            "transitions": [vars(t) for t in self.transitions],
            "forecasts": [vars(f) for f in self.forecasts],
            "early_warning": None
            if self.early_warning is None
            else self.early_warning.state_dict(),
            "schedule": self.schedule.state_dict(),
            "sentinel": None if self.sentinel is None else self.sentinel.state_dict(),
            "probe": vars(self.probe),
            "previous_kernel": self._previous_kernel,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state`` (of :meth:`state_dict`); the clock counts afresh (another
        process's seconds are not this one's). Before binding, kept and applied at
        :meth:`bind`."""
        if not state:
            return
        self._resumed = state
        if not self.on:
            return
        self.history = [EvaluationRecord.from_state(r) for r in state["history"]]
        self.readings = [Reading.from_state(r) for r in state.get("readings", [])]
        self.watched = dict(state.get("watched", {}))
        self.transitions = [PhaseTransition(**t) for t in state["transitions"]]
        self.forecasts = [Forecast(**f) for f in state.get("forecasts", [])]
        if self.early_warning is not None and state.get("early_warning") is not None:
            self.early_warning.load_state_dict(state["early_warning"])
        self.schedule.load_state_dict(state.get("schedule", {}))
        if self.sentinel is not None and state.get("sentinel") is not None:
            self.sentinel.load_state_dict(state["sentinel"])
        self._previous_kernel = state.get("previous_kernel")
        self.clock.restart()

    # ----------------------------------------------------------------------------------------
    # The sentinel

    def _read_sentinel(self, step: int, epoch: int) -> None:
        if self.sentinel is None or not self.sentinel.ready:
            return
        with self.clock.charge("sentinel"):
            began = self.clock.now()
            values = None
            if self.collective.rank == 0:
                values = self._safely("its sentinel reading", step, self.sentinel.read)
                cost = self.clock.now() - began
                self.sentinel.schedule_next(step, cost, self.clock)
                if values is not None:
                    values[keys.SENTINEL_SECONDS] = cost
            values, state = self.collective.broadcast((values, self.sentinel.state_dict()))
            self.sentinel.load_state_dict(state)
            if values is None:
                return
            reading = Reading(epoch, step, values)
            self.readings.append(reading)
            self.schedule.observe(step, values)
            self._detect(reading)
            self.sink.scalars({**values, **self._forecast(epoch)}, step)

    def _forecast(self, epoch: int) -> dict[str, float]:
        """The forecast from the readings so far (kept when it says something, or when it
        stops saying something), until the watched metric has reached the level; its
        scalars."""
        if self.first_epoch_reaching(report.LEVELS[0]) is not None:
            return {}
        pair = (keys.SENTINEL_ALIGNMENT, keys.SENTINEL_TRAIN_ALIGNMENT)
        readings = [r for r in self.readings if all(k in r.metrics for k in pair)]
        try:
            made = forecast(
                [r.epoch for r in readings],
                [r.metrics[pair[0]] for r in readings],
                [r.metrics[pair[1]] for r in readings],
                epoch,
            )
        except Exception as err:  # monitoring never ends the user's run
            self._warn(f"ENTKMonitor skipped its forecast at epoch {epoch}: {err!r}")
            return {}
        if made.epoch is not None or (self.forecasts and self.forecasts[-1].epoch is not None):
            self.forecasts.append(made)
        if made.epoch is None:
            return {}
        return {
            keys.FORECAST: made.epoch,
            keys.FORECAST_LOW: made.low,
            keys.FORECAST_HIGH: made.high,
        }

    def _outlook(self) -> tuple[int | None, float | None, float | None]:
        """For the schedule: the epoch of the first alarm, the latest forecast's high end and the
        watched metric's latest value (each ``None`` when there is none)."""
        alarm = self.transitions[0].epoch if self.transitions else None
        high = next((f.high for f in reversed(self.forecasts) if f.high is not None), None)
        watched = self.watched[max(self.watched)] if self.watched else None
        return alarm, high, watched

    # ----------------------------------------------------------------------------------------
    # Full evaluations

    def _full_evaluation(self, step: int, epoch: int, final: bool) -> None:
        # Under the time budget, at the start and in the transition window the whole kernel's
        # spectrum, cliffs and signals only (the groups, eigenvectors and feature overlaps are
        # more than half an evaluation's cost, and at initialization nobody reads them);
        # everywhere else, at the end, with images and on a fixed cadence everything
        # (evaluation.evaluate).
        budgeted = isinstance(self.schedule, TimeBudget)
        light = self.schedule.in_window() or (budgeted and not self.history)
        detail = final or self._images_due(final) or not light
        with self.clock.charge("evaluation"):
            began = self.clock.now()
            kernel = self._shared_kernel() if self.collective.world_size > 1 else None
            result = None
            if self.collective.rank == 0:
                result = self._safely(
                    "its evaluation", step, lambda m: self._evaluate(m, kernel, detail)
                )
            if result is not None:
                result.metrics[keys.SECONDS] = self.clock.now() - began
            payload = (
                None if result is None else (result.eigenvalues, result.cliffs, result.metrics)
            )
            payload = self.collective.broadcast(payload)
            if payload is not None:
                logged = self.clock.now()
                self._record(step, epoch, *payload)
                if result is not None:
                    self.sink.scalars(
                        {keys.SECONDS_LOGGING: self.clock.now() - logged}, step, local=True
                    )
            cost = self.clock.now() - began
        if result is not None:
            self._extras(result, step, final)
        if self.collective.rank == 0:
            metrics = {} if payload is None else dict(payload[2])
            if self.readings:
                metrics.update(self.readings[-1].metrics)
            self.schedule.record(step, cost, metrics, self.clock)
        self.schedule.load_state_dict(self.collective.broadcast(self.schedule.state_dict()))

    def _evaluate(self, model: nn.Module, kernel: Tensor | None, detail: bool) -> Evaluation:
        result = evaluate(
            model,
            self.probe,
            mode=self.mode,
            options=self.engine,
            previous_kernel=self._previous_kernel,
            features=self._features,
            cliff_options=self.cliff_options,
            kernel=kernel,
            detail=detail,
        )
        self._previous_kernel = result.kernel.to(torch.float32)
        return result

    def _record(self, step: int, epoch: int, eigenvalues, cliffs, metrics: dict) -> None:
        """Append to the history, run the detector and log the scalars (on every rank)."""
        watched = self.watched.get(epoch)
        if watched is not None:
            metrics[self.accuracy_key] = watched
        record = EvaluationRecord(epoch, step, eigenvalues, cliffs, metrics)
        self.history.append(record)
        self._detect(record)
        scalars = {k: v for k, v in metrics.items() if k.startswith(keys.PREFIX)}
        scalars[keys.TRANSITIONS] = float(len(self.transitions))
        self.sink.scalars(scalars, step)

    def _shared_kernel(self) -> Tensor | None:
        """Under several processes, each computes a share of the probe kernel
        (:mod:`~lightning_entk.distributed`) and rank 0 receives it whole (the others
        ``None``). A rank that fails sends NaN, so that none waits forever."""
        world, rank = self.collective.world_size, self.collective.rank
        device = next(self.model.parameters()).device
        x = to_device(self.probe.x, device)
        n = num_points(x)
        try:
            with preserved_rng():
                share = kernel_share(
                    self.model, x, world, rank, mode=self.mode, options=self.engine
                )
        except Exception as err:
            warnings.warn(f"ENTKMonitor: kernel part failed on rank {rank}: {err!r}", stacklevel=2)
            share = failed_share(n, world, self.mode, self._rows_per_point, device)
        shares = self.collective.all_gather(share)
        if rank != 0:
            return None
        return combine_shares(shares, self.mode, n, self._rows_per_point)

    # ----------------------------------------------------------------------------------------
    # The detector, images, logging

    def _detect(self, record) -> None:
        if self.early_warning is None:
            return
        try:
            raised = self.early_warning.update(record)
        except Exception as err:  # monitoring never ends the user's run
            self._warn(f"ENTKMonitor's early warning skipped a record: {err!r}")
            return
        for transition in raised:
            self.transitions.append(transition)
            self._announce(transition)

    def _announce(self, transition: PhaseTransition) -> None:
        if self.collective.rank == 0:
            log.info(f"ENTKMonitor: phase transition ahead? {transition.describe()}")
            self.sink.text(keys.TRANSITIONS_TEXT, transition.describe(), transition.step)
        if self.on_transition is not None:
            try:
                self.on_transition(transition)
            except Exception as err:
                self._warn(f"ENTKMonitor: the `on_transition` hook raised {err!r}; continuing.")

    def _images(self) -> bool:
        return self.image_every_n_evaluations > 0 and self.sink.images

    def _extras(self, result: Evaluation, step: int, final: bool) -> None:
        """Rank 0: the histogram; the images at every n-th evaluation and at the end when the
        budget affords them, and always at the evaluation that first logs a new cliff (the
        picture of the transition)."""
        self._last_result = result
        if not self._images():
            return
        with self.clock.charge("images"):
            began = self.clock.now()
            positive = result.eigenvalues[result.eigenvalues > 0]
            if positive.size:
                self.sink.histogram(keys.EIGENVALUE_HISTOGRAM, np.log10(positive), step)
            due = self._images_due(final, made=True)
            new_cliff = len(self.history) > 1 and self.history[-1].epoch in set(
                self.new_cliffs().values()
            )
            if new_cliff or (due and self.schedule.affords(self._image_seconds, self.clock)):
                self._draw_images(result, step)
            self.sink.scalars({keys.SECONDS_IMAGES: self.clock.now() - began}, step, local=True)

    def _images_due(self, final: bool, made: bool = False) -> bool:
        """Whether the images are due at the evaluation being made (``made``: just recorded):
        at every n-th since initialization and at the end."""
        if not self._images():
            return False
        count = len(self.history) - (1 if made else 0)  # evaluations since initialization
        return final or (count > 0 and count % self.image_every_n_evaluations == 0)

    def _draw_images(self, result: Evaluation, step: int) -> None:
        """One evaluation's figures: its spectrum with cliffs and, with ground truth, the
        alignment of its eigenvectors with each family of features."""
        began = time.perf_counter()
        try:
            figures = plots.plot_evaluation(
                result.eigenvalues,
                result.cliffs,
                self.history[-1].epoch,
                result.eigenvectors,
                self._features,
                self._feature_pairs,
            )
            self.sink.figures(figures, step)
        except Exception as err:
            self._warn(f"ENTKMonitor could not draw its images: {err!r}")
        self._image_seconds = time.perf_counter() - began

    def _write_summary_figure(self, step: int) -> None:
        """The summary figure, drawn once: to the sink and, where it has a directory, as
        ``entk_summary.png`` there. A figure never fails the run."""
        try:
            image = plots.figure_to_array(self.summary_figure())
            if self.sink.images:
                self.sink.figures({keys.EVOLUTION_IMAGE: image}, step)
            if self.sink.log_dir is not None:
                self.summary_path = report.save_image(image, self.sink.log_dir)
                log.info(f"ENTKMonitor: summary figure saved to {self.summary_path}")
        except Exception as err:
            self._warn(f"ENTKMonitor could not draw its summary figure: {err!r}")

    # ----------------------------------------------------------------------------------------
    # Helpers

    def _watch(self, epoch: int, metrics: Mapping[str, float]) -> None:
        """Keep the watched metric of ``epoch``; warn once if it is not among ``metrics``."""
        if self.accuracy_key is None:
            return
        if self.accuracy_key in metrics:
            self.watched[epoch] = float(metrics[self.accuracy_key])
        elif not self.watched and not self._warned_missing_metric:
            self._warned_missing_metric = True
            self._warn(
                f"ENTKMonitor: the watched metric `accuracy_key`={self.accuracy_key!r} is not "
                f"among the metrics ({sorted(metrics)[:8]}); the early warning's lead cannot be "
                "measured. Pass the name of the network's validation accuracy as "
                "`accuracy_key`, or accuracy_key=None."
            )

    def _decide(self, decision: Callable[[], bool]) -> bool:
        """Rank 0's ``decision`` (and the schedule's state after it), on every rank."""
        if self.collective.world_size == 1:
            return decision()
        made = decision() if self.collective.rank == 0 else None
        made, state = self.collective.broadcast((made, self.schedule.state_dict()))
        self.schedule.load_state_dict(state)
        return made

    def _safely(self, what: str, step: int, compute: Callable[[nn.Module], object]):
        """``compute(model)`` with the RNG states preserved, or a warning and ``None`` if it
        fails: monitoring never ends the user's run."""
        try:
            with preserved_rng():
                return compute(self.model)
        except Exception as err:
            self._warn(f"ENTKMonitor skipped {what} at step {step}: {type(err).__name__}: {err}")
            return None

    def _warn(self, message: str) -> None:
        if self.collective.rank == 0:
            warnings.warn(message, UserWarning, stacklevel=3)

    def _last_step(self) -> int | None:
        return self.history[-1].step if self.history else None

    def _fit_probe(self, probe: ProbeSet) -> ProbeSet:
        """``probe``, or the largest seeded subset of it that fits the memory budget (with a
        warning); tries the probe on the model and logs each parameter's route."""
        device = next(self.model.parameters()).device
        with preserved_rng():
            plan = ntk_plan(
                self.model,
                to_device(probe.x, device),
                mode="full" if self.mode == "flatten" else "trace",
                options=self.engine,
            )
        self._rows_per_point = plan.num_outputs if self.mode == "flatten" else 1
        if self.collective.rank == 0:
            log.info(f"ENTKMonitor: {plan}")
        probe, warning = probe_within_budget(probe, plan, self.budget.total, self._rows_per_point)
        if warning:
            self._warn(warning)
        return probe

    def _ground_truth(self) -> tuple[dict[str, Tensor], bool]:
        """The model's ground-truth features on the probe (``entk_ground_truth``), if any."""
        ground_truth = getattr(self.model, "entk_ground_truth", None)
        if not callable(ground_truth):
            return {}, False
        device = next(self.model.parameters()).device
        features = dict(ground_truth(to_device(self.probe.x, device), self.mode))
        return features, bool(getattr(self.model, "entk_feature_pairs", False))


def check_monitor_options(
    mode, kernel, sentinel, early_warning, on_transition, image_every_n_evaluations,
    max_probe_points,
) -> None:  # fmt: skip
    """Raise ``ValueError`` for a monitor argument of the wrong kind or out of range."""
    if mode not in ("trace", "flatten"):
        raise ValueError(f"`mode` must be 'trace' or 'flatten' (a square kernel), got {mode!r}.")
    if kernel is not None and not isinstance(kernel, KernelOptions):
        raise ValueError(f"`kernel` must be a KernelOptions or None, got {type(kernel).__name__}.")
    if kernel is not None:
        check_projection_mode(kernel.output_projections, mode)
    for name, value, kind in (
        ("sentinel", sentinel, Sentinel),
        ("early_warning", early_warning, EarlyWarning),
    ):
        if not (isinstance(value, bool) or isinstance(value, kind)):
            raise ValueError(
                f"`{name}` must be True, False or a {kind.__name__}, got {type(value).__name__}."
            )
    if on_transition is not None and not callable(on_transition):
        raise ValueError(f"`on_transition` must be callable, got {type(on_transition).__name__}.")
    check_int("image_every_n_evaluations", image_every_n_evaluations, 0)
    check_int("max_probe_points", max_probe_points, words="a positive int")


def make_schedule(
    schedule: Schedule | None,
    every_n_epochs: int | None,
    every_n_train_steps: int | None,
    max_overhead: float | None,
) -> Schedule:
    """``schedule``, else a fixed cadence when one is set, else the time budget; one of the
    three ways only."""
    cadence = FixedCadence(every_n_epochs, every_n_train_steps)
    fixed = every_n_epochs is not None or every_n_train_steps is not None
    if schedule is not None:
        if fixed or max_overhead is not None:
            raise ValueError(
                "Pass either `schedule` or `every_n_epochs`, `every_n_train_steps`, "
                "`max_overhead`, not both."
            )
        if not all(callable(getattr(schedule, name, None)) for name in SCHEDULE_METHODS):
            raise ValueError(
                "`schedule` must be a TimeBudget, a FixedCadence or another Schedule, got "
                f"{type(schedule).__name__}."
            )
        return schedule
    if not fixed:
        return TimeBudget(DEFAULT_MAX_OVERHEAD if max_overhead is None else max_overhead)
    if max_overhead is not None:
        raise ValueError(
            "Set either a fixed cadence (`every_n_epochs`, `every_n_train_steps`) or a time "
            f"budget (`max_overhead`), not both; got max_overhead={max_overhead!r}."
        )
    return cadence


def setup_failure(err: Exception) -> str:
    """The warning for a monitor that could not bind itself to its model: why, and what to
    pass."""
    return (
        f"ENTKMonitor is off for this run: it could not compute the eNTK of this model on the "
        f"probe set ({type(err).__name__}: {err}). If the model's forward in eval mode cannot be "
        "differentiated (e.g. it writes a cache or state in place), pass a forward that does "
        "not, as in `kernel=KernelOptions(forward_fn=lambda model, x: model(x, "
        "use_cache=False).logits[:, -1])`; if it cannot take the probe, pass `probe=`. "
        "Training goes on without the monitor."
    )


def _resolve(value, default: Callable[[], object]):
    """``True``: ``default()``; ``False``: ``None``; an instance: itself."""
    if value is True:
        return default()
    return None if value is False else value


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Restore torch (CPU and CUDA), numpy and Python RNG states on exit."""
    numpy_state, python_state = np.random.get_state(), random.getstate()  # noqa: NPY002
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            np.random.set_state(numpy_state)  # noqa: NPY002
            random.setstate(python_state)
