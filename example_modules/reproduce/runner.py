"""The runner of the reproduction: train the two bundled models, record what they do, and
measure it.

Modular addition (the paper's setup, docs/design.md, section 'The bundled experiments': p=29,
hidden 512, AdamW lr 0.05 / weight decay 0.01, full batch, train fraction 0.7, 500 epochs) is
trained with a plain Lightning ``Trainer`` and :class:`~lightning_entk.ENTKMonitor`, whose probe
is the full ``p^2`` grid (trace mode, every second epoch); :class:`TrainingRecord` keeps the
validation accuracy of every epoch and copies of the weights every few epochs.
:func:`run_modular` turns these into a :class:`ModularResult`: the cliffs of every evaluation,
the epochs of grokking and of the second cliff, and the subspace overlap of each cliff's
eigenvectors with the Fourier features at every copy.

Toy Models of Superposition (:func:`run_tms`): one model per ``(m, S)``, its features
reconstructed, and for every importance rescaling ``beta`` the cliffs of the flattened eNTK and
the overlap of the eigenvectors above each with the ground-truth features.

The configurations (:class:`ModularConfig`, :class:`TMSConfig`, :class:`ReproductionConfig`)
default to the paper's sizes; the results are plain dataclasses.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import lightning as L
import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor

from example_modules.modular_arithmetic import (
    ModularArithmeticDataModule,
    ModularArithmeticMLP,
    fourier_features,
)
from example_modules.reproduce.paper import (
    GROKKED_ACCURACY,
    HALF_ACCURACY,
    SEGMENT_FAMILIES,
    TOP_MODES,
    Check,
    expected_cliff_ranks,
)
from example_modules.toy_superposition import SuperpositionDataModule, ToyModelOfSuperposition
from lightning_entk import (
    Cliff,
    ENTKMonitor,
    KernelOptions,
    PhaseTransition,
    feature_alignment,
    find_cliffs,
    ntk_spectrum,
    subspace_overlap,
)
from lightning_entk.checks import check_int
from lightning_entk.milestones import first_epoch_reaching, nearest_rank
from lightning_entk.probe import ProbeSet

# --------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class ModularConfig:
    """The modular-addition run. Defaults are the paper's (docs/design.md, section 'The
    bundled experiments').

    Attributes:
        p, hidden, lr, weight_decay: of :class:`ModularArithmeticMLP`.
        train_fraction: of :class:`ModularArithmeticDataModule`.
        epochs: full-batch training epochs.
        seed: seeds the weights and the split.
        monitor_every: epochs between eNTK evaluations of the monitor (the resolution of the
            second-cliff epoch; accuracy is recorded every epoch). Every second epoch keeps the
            paper-size run within a few minutes on two cores.
        overlap_every: epochs between copies of the weights whose eigenvectors are compared
            with the Fourier features.
    """

    p: int = 29
    hidden: int = 512
    lr: float = 0.05
    weight_decay: float = 0.01
    train_fraction: float = 0.7
    epochs: int = 500
    seed: int = 0
    monitor_every: int = 2
    overlap_every: int = 4

    def __post_init__(self) -> None:
        for name in ("monitor_every", "overlap_every"):
            value = getattr(self, name)
            check_int(name, value, words="a positive int")
        if self.overlap_every % self.monitor_every:
            raise ValueError(
                f"`overlap_every` must be a multiple of `monitor_every` ({self.monitor_every}) so "
                f"that every overlap has the monitor's cliffs beside it, got {self.overlap_every}."
            )

    @property
    def paper_size(self) -> bool:
        """Whether the run is the paper's (so that its epochs and overlaps compare)."""
        paper = ModularConfig()
        keys = ("p", "hidden", "lr", "weight_decay", "train_fraction", "epochs")
        return all(getattr(self, k) == getattr(paper, k) for k in keys)


@dataclass(frozen=True)
class TMSConfig:
    """The Toy Models of Superposition runs. Defaults are the paper's (docs/design.md, section
    'The bundled experiments').

    Attributes:
        n_features, importance, lr: of :class:`ToyModelOfSuperposition`.
        n_samples: fixed training samples ``N``, also the eNTK's probe points.
        steps: full-batch Adam steps.
        configs: ``(m, S)`` pairs: hidden dimension and sparsity.
        betas: importance rescalings of the eNTK outputs, ``w_c = I^(beta c / 2)``.
        eigenpairs: top eigenpairs of each flattened eNTK (at most ``P = m n + n``).
        seed: seeds the weights and the samples.
    """

    n_features: int = 50
    n_samples: int = 500
    importance: float = 0.8
    lr: float = 1e-3
    steps: int = 5000
    configs: tuple[tuple[int, float], ...] = ((10, 0.3), (10, 0.9), (40, 0.9))
    betas: tuple[float, ...] = (0.0, 0.3, 1.0)
    eigenpairs: int = 200
    seed: int = 0

    @property
    def paper_size(self) -> bool:
        """Whether the runs are the paper's (so that its counts and cliffs compare)."""
        paper = TMSConfig()
        keys = ("n_features", "n_samples", "importance", "lr", "steps", "configs")
        return all(getattr(self, k) == getattr(paper, k) for k in keys)


@dataclass(frozen=True)
class ReproductionConfig:
    """Both experiments. :meth:`small` is a reduced run for tests (~20 s)."""

    modular: ModularConfig = field(default_factory=ModularConfig)
    tms: TMSConfig = field(default_factory=TMSConfig)

    @classmethod
    def small(cls) -> ReproductionConfig:
        return cls(
            modular=ModularConfig(p=11, hidden=128, epochs=60, monitor_every=1),
            tms=TMSConfig(
                n_features=20, n_samples=100, steps=300, configs=((4, 0.3), (4, 0.9), (16, 0.9))
            ),
        )


# --------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class Segment:
    """Eigenvectors ``first..last`` (1-based, inclusive) between two cliffs.

    Attributes:
        first, last: the eigenvector indices.
        detected: whether ``last`` is a cliff found after training (else the expected rank).
    """

    first: int
    last: int
    detected: bool

    def columns(self, eigenvectors: Tensor) -> Tensor:
        """The segment's columns of ``(R, k)`` eigenvectors."""
        return eigenvectors[:, self.first - 1 : self.last]

    def __str__(self) -> str:
        return f"{self.first}..{self.last}"


@dataclass(frozen=True)
class OverlapPoint:
    """Subspace overlaps of the cliff segments with their Fourier families at one epoch.

    Attributes:
        epoch: completed training epochs (0: initialization).
        overlaps: one value per segment, in the order of ``SEGMENT_FAMILIES``.
    """

    epoch: int
    overlaps: tuple[float, ...]


@dataclass
class ModularResult:
    """What the modular-addition run found.

    Attributes:
        config: the run's configuration.
        expected_ranks: the paper's cliff ranks for this ``p``, see :func:`expected_cliff_ranks`.
        rank_tolerance: detected ranks this close to an expected one count as that cliff.
        segments: the eigenvectors of each cliff, see :func:`cliff_segments`.
        epochs: ``(T,)`` epochs of the monitor's evaluations.
        eigenvalues: ``(T, N)`` the eNTK spectrum at each evaluation, descending.
        cliffs: T lists of cliffs found by :func:`~lightning_entk.find_cliffs`.
        val_acc: ``(epochs + 1,)`` validation accuracy after each epoch, indexed by completed
            epochs (NaN at 0, initialization).
        regression_acc: ``(T,)`` eNTK kernel-regression accuracy on the validation pairs.
        transitions: the monitor's early warnings.
        half_epoch, grokked_epoch: first epochs with ``val_acc >= 0.5`` and ``>= 0.95``.
        second_cliff_epoch: first epoch with a cliff near the second expected rank.
        second_cliff_stable_epoch: the epoch from which every evaluation has that cliff.
        overlaps: the segments' overlaps at each copy of the weights.
        alignment: ``{"init", "end"}`` to ``(k, F)`` |cos| of the top eigenvectors
            with the Fourier pairs of :attr:`alignment_labels`.
        alignment_labels: ``F`` labels such as ``"sum 3"`` (family and frequency).
        seconds: wall time of the run.
    """

    config: ModularConfig
    expected_ranks: tuple[int, int]
    rank_tolerance: int
    segments: tuple[Segment, ...]
    epochs: np.ndarray
    eigenvalues: np.ndarray
    cliffs: list[list[Cliff]]
    val_acc: np.ndarray
    regression_acc: np.ndarray
    transitions: list[PhaseTransition]
    half_epoch: int | None
    grokked_epoch: int | None
    second_cliff_epoch: int | None
    second_cliff_stable_epoch: int | None
    overlaps: list[OverlapPoint]
    alignment: dict[str, np.ndarray]
    alignment_labels: list[str]
    seconds: float

    @property
    def ranks_init(self) -> list[int]:
        return [c.rank for c in self.cliffs[0]]

    @property
    def ranks_end(self) -> list[int]:
        return [c.rank for c in self.cliffs[-1]]

    def cliffs_at(self, epoch: int) -> list[int] | None:
        """Cliff ranks of the evaluation at ``epoch``, ``None`` if there was none."""
        hits = np.flatnonzero(self.epochs == epoch)
        return [c.rank for c in self.cliffs[hits[-1]]] if hits.size else None


@dataclass(frozen=True)
class TMSSpectrum:
    """The flattened eNTK of one trained Toy Model of Superposition at one rescaling.

    Attributes:
        beta: the importance rescaling, output ``c`` weighted by ``I^(beta c / 2)``.
        eigenvalues: ``(k,)`` descending.
        cliffs: cliffs of ``eigenvalues``.
        overlaps: per cliff, the subspace overlap of the eigenvectors above it (``1..rank``)
            with the ground-truth features.
    """

    beta: float
    eigenvalues: np.ndarray
    cliffs: list[Cliff]
    overlaps: list[float]

    @property
    def best_overlap(self) -> float | None:
        return max(self.overlaps, default=None)


@dataclass(frozen=True)
class TMSResult:
    """One ``(m, S)`` configuration: features reconstructed and the spectra."""

    n_hidden: int
    sparsity: float
    reconstructed: int
    spectra: list[TMSSpectrum]
    seconds: float


@dataclass
class ReproductionResults:
    """Everything :func:`~example_modules.reproduce.cli.reproduce` found; rendered by
    :func:`~example_modules.reproduce.report.render_results_markdown`."""

    config: ReproductionConfig
    modular: ModularResult
    tms: list[TMSResult]
    checks: list[Check]
    seconds: float
    figures: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Cliffs against the expected ranks


def cliff_segments(
    ranks: Sequence[int], expected: Sequence[int], tolerance: int, top_modes: int = TOP_MODES
) -> tuple[Segment, ...]:
    """The eigenvectors of each expected cliff, bounded by the cliffs actually detected.

    Segment ``i`` runs from just below the previous boundary to boundary ``i``: the detected
    rank nearest to ``expected[i]`` (within ``tolerance``), or ``expected[i]`` itself when no
    cliff was detected there. The first segment starts below the ``top_modes`` top eigenvectors,
    which belong to no feature family.

    Example:
        >>> [str(s) for s in cliff_segments([57, 113, 300], (57, 113), tolerance=2)]
        ['2..57', '58..113']
        >>> cliff_segments([56], (57, 113), tolerance=2)[1]
        Segment(first=57, last=113, detected=False)
    """
    segments, start = [], top_modes + 1
    for target in expected:
        found = nearest_rank(ranks, target, tolerance)
        last = target if found is None else found
        segments.append(Segment(start, last, found is not None))
        start = last + 1
    return tuple(segments)


def cliff_appearance(
    epochs: np.ndarray, cliffs: Sequence[Sequence[Cliff]], target: int, tolerance: int
) -> tuple[int | None, int | None]:
    """When a cliff near ``target`` first shows, and from when on it shows at every evaluation.

    Returns:
        ``(first, stable)`` epochs, each ``None`` if there is none (``stable`` is ``None`` when
        the last evaluation lacks the cliff).

    Example:
        >>> found = [[Cliff(57, 0.3)], [Cliff(57, 0.3), Cliff(112, 0.05)], [Cliff(57, 0.3)],
        ...          [Cliff(57, 0.3), Cliff(113, 0.1)]]
        >>> cliff_appearance(np.arange(4), found, 113, tolerance=2)
        (1, 3)
    """
    present = [
        nearest_rank([c.rank for c in found], target, tolerance) is not None for found in cliffs
    ]
    first = next((int(e) for e, seen in zip(epochs, present, strict=True) if seen), None)
    stable = None
    for e, seen in zip(reversed(epochs), reversed(present), strict=True):
        if not seen:
            break
        stable = int(e)
    return first, stable


# --------------------------------------------------------------------------------------------
# Modular addition


class TrainingRecord(Callback):
    """Validation accuracy after every epoch, in :attr:`val_acc` (completed epochs -> value),
    and copies of the weights before training and after every ``every_n_epochs``-th epoch and
    the last one, in :attr:`snapshots` (completed epochs -> ``state_dict``)."""

    def __init__(self, every_n_epochs: int, accuracy_key: str = "val_acc") -> None:
        check_int("every_n_epochs", every_n_epochs, words="a positive int")
        self.every_n_epochs = every_n_epochs
        self.accuracy_key = accuracy_key
        self.val_acc: dict[int, float] = {}
        self.snapshots: dict[int, dict[str, Tensor]] = {}

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._take(0, pl_module)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        epoch = trainer.current_epoch + 1  # validation of this epoch has run already
        if self.accuracy_key in trainer.callback_metrics:
            self.val_acc[epoch] = float(trainer.callback_metrics[self.accuracy_key])
        if epoch % self.every_n_epochs == 0 or epoch == trainer.max_epochs:
            self._take(epoch, pl_module)

    def _take(self, epoch: int, pl_module: LightningModule) -> None:
        self.snapshots[epoch] = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


def _fit(
    module: LightningModule,
    data: L.LightningDataModule,
    callbacks: Sequence[Callback] = (),
    **trainer_options,
) -> None:
    """Train with a plain ``Trainer``: no logger, checkpoints or progress bar, and a throw-away
    root directory, so that nothing (e.g. the monitor's summary figure) lands in the cwd."""
    with tempfile.TemporaryDirectory() as root:
        trainer = Trainer(
            accelerator="cpu",
            default_root_dir=root,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            callbacks=list(callbacks),
            **trainer_options,
        )
        trainer.fit(module, datamodule=data)


def run_modular(config: ModularConfig) -> ModularResult:
    """Train the modular-addition MLP with :class:`~lightning_entk.ENTKMonitor` on the full grid
    and measure cliffs, grokking and the cliff segments' Fourier overlaps.

    Segments come from the cliffs detected after training (:func:`cliff_segments`, ranks within
    the monitor's early-warning ``rank_tolerance`` of the expected ones) and are then compared
    with the features at every copy of the weights, initialization included.
    """
    start = time.perf_counter()
    L.seed_everything(config.seed, verbose=False)
    data = ModularArithmeticDataModule(
        p=config.p, train_fraction=config.train_fraction, seed=config.seed
    )
    model = ModularArithmeticMLP(
        p=config.p, hidden=config.hidden, lr=config.lr, weight_decay=config.weight_decay
    )
    x, y = data.grid()
    heldout = torch.zeros(len(x), dtype=torch.bool)
    heldout[data.val_indices] = True
    monitor = ENTKMonitor(
        probe=ProbeSet(x, y, heldout),
        every_n_epochs=config.monitor_every,
        mode="trace",
        kernel=KernelOptions(),  # no groups: the paper's figures are of the whole kernel
        image_every_n_evaluations=0,
    )
    record = TrainingRecord(config.overlap_every)
    _fit(model, data, [monitor, record], max_epochs=config.epochs)

    history = monitor.history
    epochs = np.array([r.epoch for r in history])
    cliffs = [list(r.cliffs) for r in history]
    val_acc = np.array([record.val_acc.get(e, math.nan) for e in range(config.epochs + 1)])
    expected = expected_cliff_ranks(config.p)
    tolerance = monitor.early_warning.rank_tolerance
    segments = cliff_segments([c.rank for c in cliffs[-1]], expected, tolerance)
    second_first, second_stable = cliff_appearance(epochs, cliffs, expected[1], tolerance)
    fresh = ModularArithmeticMLP(p=config.p, hidden=config.hidden)  # to load the copies into
    overlaps, alignment, labels = _fourier_overlaps(fresh, record.snapshots, x, segments)
    return ModularResult(
        config=config,
        expected_ranks=expected,
        rank_tolerance=tolerance,
        segments=segments,
        epochs=epochs,
        eigenvalues=np.stack([np.asarray(r.eigenvalues) for r in history]),
        cliffs=cliffs,
        val_acc=val_acc,
        regression_acc=np.array(
            [r.metrics.get("entk/kernel_regression_acc", math.nan) for r in history]
        ),
        transitions=list(monitor.transitions),
        half_epoch=first_epoch_reaching(np.arange(len(val_acc)), val_acc, HALF_ACCURACY),
        grokked_epoch=first_epoch_reaching(np.arange(len(val_acc)), val_acc, GROKKED_ACCURACY),
        second_cliff_epoch=second_first,
        second_cliff_stable_epoch=second_stable,
        overlaps=overlaps,
        alignment=alignment,
        alignment_labels=labels,
        seconds=time.perf_counter() - start,
    )


def _fourier_overlaps(
    model: ModularArithmeticMLP,
    snapshots: dict[int, dict[str, Tensor]],
    x: Tensor,
    segments: Sequence[Segment],
) -> tuple[list[OverlapPoint], dict[str, np.ndarray], list[str]]:
    """Overlaps of each segment with its families at every snapshot (loaded into ``model``),
    and the |cos| matrices of the top eigenvectors with every Fourier pair at the first and
    last snapshots."""
    p = model.p
    family_features = {f: fourier_features(p, f) for group in SEGMENT_FAMILIES for f in group}
    grouped = [torch.cat([family_features[f] for f in group], dim=1) for group in SEGMENT_FAMILIES]
    every_pair = torch.cat(list(family_features.values()), dim=1)
    labels = [f"{f} {k}" for f in family_features for k in range(1, p // 2 + 1)]
    # Rows of the heatmaps: the expected cliffs and half a segment more below them.
    rows = min(len(x), segments[-1].last + (segments[-1].last - segments[-1].first + 1) // 2)

    overlaps, alignment = [], {}
    ordered = sorted(snapshots)
    for epoch in ordered:
        model.load_state_dict(snapshots[epoch])
        vectors = ntk_spectrum(model, x, mode="trace", k=rows).eigenvectors
        values = tuple(
            subspace_overlap(segment.columns(vectors), features)
            for segment, features in zip(segments, grouped, strict=True)
        )
        overlaps.append(OverlapPoint(epoch, values))
        if epoch in (ordered[0], ordered[-1]):
            stage = "init" if epoch == ordered[0] else "end"
            alignment[stage] = feature_alignment(vectors, every_pair, pairs=True)
    return overlaps, alignment, labels


# --------------------------------------------------------------------------------------------
# Toy Models of Superposition


def run_tms(config: TMSConfig) -> list[TMSResult]:
    """Train one Toy Model of Superposition per ``(m, S)`` and take its flattened eNTK at every
    ``beta`` (output weights :meth:`ToyModelOfSuperposition.importance_weights`)."""
    results = []
    for n_hidden, sparsity in config.configs:
        start = time.perf_counter()
        L.seed_everything(config.seed, verbose=False)
        data = SuperpositionDataModule(
            n_features=config.n_features,
            sparsity=sparsity,
            n_samples=config.n_samples,
            seed=config.seed,
        )
        model = ToyModelOfSuperposition(
            n_features=config.n_features,
            n_hidden=n_hidden,
            importance=config.importance,
            lr=config.lr,
        )
        _fit(model, data, max_steps=config.steps, limit_val_batches=0)
        features = model.entk_ground_truth(data.x, "flatten")["features"]
        parameters = sum(p.numel() for p in model.parameters())
        k = min(config.eigenpairs, parameters, len(features))
        spectra = [tms_spectrum(model, data.x, beta, features, k) for beta in config.betas]
        results.append(
            TMSResult(
                n_hidden=n_hidden,
                sparsity=sparsity,
                reconstructed=model.reconstructed_features(),
                spectra=spectra,
                seconds=time.perf_counter() - start,
            )
        )
    return results


def tms_spectrum(
    model: ToyModelOfSuperposition, x: Tensor, beta: float, features: Tensor, k: int
) -> TMSSpectrum:
    """Top-``k`` eigenpairs of the flattened eNTK ``(C*N, C*N)`` with importance rescaling
    ``beta``, its cliffs, and the overlap of the eigenvectors above each cliff with the
    ``(C*N, n)`` ground-truth ``features``."""
    spectrum = ntk_spectrum(
        model, x, mode="flatten", k=k, output_weights=model.importance_weights(beta)
    )
    eigenvalues = spectrum.eigenvalues.numpy()
    cliffs = find_cliffs(eigenvalues)
    overlaps = [subspace_overlap(spectrum.eigenvectors[:, : c.rank], features) for c in cliffs]
    return TMSSpectrum(beta, eigenvalues, cliffs, overlaps)
