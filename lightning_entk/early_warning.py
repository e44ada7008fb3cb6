"""Early warning of phase transitions, from the history of monitor evaluations.

Four signals, each raised once per run as a :class:`PhaseTransition`:

``kernel_regression_lead``
    eNTK kernel regression (arXiv:2510.00468 eq. 1) on held-out probe points starts to predict
    the labels while the network itself does not yet: its accuracy has risen by ``lead_rise``
    over its starting level and leads the network's own validation accuracy by ``lead_margin``.
    On the modular-arithmetic MLP this rises 20-25 epochs before val_acc crosses 0.5
    (docs/early_warning.md).
``alignment_ratio``
    The readout's features carry over to new points: the debiased alignment of the readout's
    kernel with the labels on held-out probe points (:func:`~lightning_entk.evaluation.
    debiased_alignment`: 0 expected by chance, whatever the number of points) reaches
    ``alignment_ratio`` of its alignment on training probe points, once that stands at least
    ``min_train_alignment`` above 0; both read by the sentinel at every epoch
    (:mod:`~lightning_entk.monitor.sentinel`). Raised when the ratio crosses the level from
    below, so that a model whose features carry over from the start (a pretrained one, or
    natural data from a large initialization) raises nothing. Chosen on development runs of
    seven grokking setups with one setup held out at a time, and scored on held-out runs
    (docs/early_warning.md): the ratio passes 0.25 20-70% of the way to generalisation on
    modular arithmetic (MLPs, a transformer), permutation composition and sparse parity, stays
    below it in every run that does not generalise, and the training alignment floor is low
    (0.02) because with cross-entropy over many classes, or with two classes, the training
    alignment stays under 0.1 until the network generalises. An absolute level of the held-out
    alignment cannot serve: where the accuracy jumps it is 0.015 on sparse parity and 0.34 on
    a network with LayerNorm.
``new_cliff``
    A cliff at a rank that the first evaluation did not have appears and is still there at
    every evaluation ``persistence`` epochs later (ranks within ``rank_tolerance`` count as one).
``kernel_velocity`` (off unless ``velocity_factor`` is set)
    The distance between successive normalised kernels, per optimizer step between them, jumps
    above ``velocity_factor`` times its running median, once ``warmup`` rates are known. The
    kernel does jump, but not reliably ahead of generalisation: at 5x, on the modular MLP this
    never fired; on the transformer (seeds 0-4) it fired 13-311 epochs after val_acc 0.5 on
    three seeds, 214 epochs before it on one and never on the fifth, and also in a run with
    train fraction 0.1 that never generalises.

Every rule is stated in epochs and steps, not in evaluations, so that it means the same under a
fixed cadence and under the uneven spacing of a time budget. The detector takes full
evaluations (:class:`EvaluationRecord`, with cliffs) and sentinel readings (with ``cliffs``
``None``) in the order they were made; each rule reads the keys it needs
(:mod:`~lightning_entk.keys`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from lightning_entk import keys
from lightning_entk.checks import check_int, check_number
from lightning_entk.cliffs import Cliff
from lightning_entk.milestones import RANK_TOLERANCE


@dataclass
class EvaluationRecord:
    """One entry of the monitor's history.

    Attributes:
        epoch: completed training epochs (0: before training).
        step: optimizer steps so far.
        eigenvalues: ``(k,)`` float64, descending.
        cliffs: cliffs found in ``eigenvalues``.
        metrics: the ``entk/`` scalars of the evaluation, and the network's own watched metric
            (e.g. ``val_acc``) when the trainer had it.
    """

    epoch: int
    step: int
    eigenvalues: np.ndarray
    cliffs: list[Cliff]
    metrics: dict[str, float] = field(default_factory=dict)

    def to_state(self) -> dict:
        return {
            "epoch": self.epoch,
            "step": self.step,
            "eigenvalues": np.asarray(self.eigenvalues, dtype=np.float64).tolist(),
            "cliffs": [asdict(c) for c in self.cliffs],
            "metrics": dict(self.metrics),
        }

    @classmethod
    def from_state(cls, state: dict) -> EvaluationRecord:
        return cls(
            epoch=state["epoch"],
            step=state["step"],
            eigenvalues=np.asarray(state["eigenvalues"], dtype=np.float64),
            cliffs=[Cliff(**c) for c in state["cliffs"]],
            metrics=dict(state["metrics"]),
        )


@dataclass(frozen=True)
class PhaseTransition:
    """An early-warning event.

    Attributes:
        epoch: completed epochs at the evaluation that raised it.
        step: optimizer steps at that evaluation.
        kind: ``kernel_regression_lead``, ``alignment_ratio``, ``new_cliff`` or
            ``kernel_velocity``.
        evidence: the numbers behind it.
        group: the parameter group whose kernel raised it; ``None`` for the whole kernel.
    """

    epoch: int
    step: int
    kind: str
    evidence: dict[str, float]
    group: str | None = None

    def describe(self) -> str:
        numbers = ", ".join(f"{k}={v:.4g}" for k, v in self.evidence.items())
        source = "" if self.group is None else f" of group '{self.group}'"
        return f"epoch {self.epoch} (step {self.step}): {self.kind}{source} ({numbers})"


class EarlyWarning:
    """Raises :class:`PhaseTransition` events from successive :class:`EvaluationRecord`.

    Args:
        accuracy_key: the network's own metric that the kernel-regression lead is judged
            against (``None``: the lead is judged against nothing, only the rise counts).
        lead_rise: rise of kernel-regression accuracy over its level at the first evaluation.
        lead_margin: how far kernel-regression accuracy must lead ``accuracy_key``.
        alignment_ratio: the readout's held-out alignment over its training alignment that
            raises ``alignment_ratio``.
        min_train_alignment: the training alignment from which the ratio counts.
        persistence: epochs for which a new cliff must be seen (at every evaluation, at least
            two).
        rank_tolerance: ranks this close count as the same cliff.
        velocity_factor: kernel velocity per step above this many times its running median is
            a jump (``None``: the signal is off; 5.0 watches for jumps).
        warmup: velocities (per step) measured before jumps are judged.

    Raises:
        ValueError: for arguments out of range.
    """

    def __init__(
        self,
        accuracy_key: str | None = "val_acc",
        lead_rise: float = 0.2,
        lead_margin: float = 0.2,
        alignment_ratio: float = 0.25,
        min_train_alignment: float = 0.02,
        persistence: int = 4,
        rank_tolerance: int = RANK_TOLERANCE,
        velocity_factor: float | None = None,
        warmup: int = 5,
    ) -> None:
        for name, value in (
            ("lead_rise", lead_rise),
            ("lead_margin", lead_margin),
            ("alignment_ratio", alignment_ratio),
            ("min_train_alignment", min_train_alignment),
        ):
            check_number(name, value, 0, 1, "(]")
        for name, value in (("persistence", persistence), ("warmup", warmup)):
            check_int(name, value, words="a positive int")
        check_int("rank_tolerance", rank_tolerance, 0, words="a non-negative int")
        if velocity_factor is not None and velocity_factor <= 1:
            raise ValueError(f"`velocity_factor` must be > 1, got {velocity_factor!r}.")
        self.accuracy_key = accuracy_key
        self.lead_rise = lead_rise
        self.lead_margin = lead_margin
        self.alignment_ratio = alignment_ratio
        self.min_train_alignment = min_train_alignment
        self.persistence = persistence
        self.rank_tolerance = rank_tolerance
        self.velocity_factor = velocity_factor
        self.warmup = warmup
        self.readout_group: str | None = None  # named by the monitor: the sentinel's readout
        self._state = self._fresh_state()

    @staticmethod
    def _fresh_state() -> dict:
        return {
            "baseline_ranks": None,
            "regression_start": None,
            "ratio_below": False,
            "streaks": {},
            "velocities": [],
            "last_step": None,
            "raised": [],
        }

    def update(self, record: EvaluationRecord) -> list[PhaseTransition]:
        """Take one full evaluation or sentinel reading (an object with ``epoch``, ``step``,
        ``metrics`` and, for a full evaluation, ``cliffs``); return the transitions it raises
        (each kind at most once)."""
        state = self._state
        found = []
        for kind, evidence, source in (
            ("kernel_regression_lead", self._regression_lead(record), None),
            ("alignment_ratio", self._alignment_ratio(record), self.readout_group),
            ("new_cliff", self._new_cliff(record), None),
            ("kernel_velocity", self._velocity_jump(record), None),
        ):
            if evidence is not None and kind not in state["raised"]:
                state["raised"].append(kind)
                found.append(PhaseTransition(record.epoch, record.step, kind, evidence, source))
        return found

    def _alignment_ratio(self, record: EvaluationRecord) -> dict | None:
        """The evidence, when the readout's held-out alignment has reached ``alignment_ratio``
        of its training alignment from below."""
        held = record.metrics.get(keys.SENTINEL_ALIGNMENT)
        trained = record.metrics.get(keys.SENTINEL_TRAIN_ALIGNMENT)
        if held is None or trained is None:
            return None
        if trained < self.min_train_alignment or held < self.alignment_ratio * trained:
            self._state["ratio_below"] = True
            return None
        if not self._state["ratio_below"]:  # above from the first reading: nothing changed
            return None
        return {"heldout_alignment": held, "train_alignment": trained, "ratio": held / trained}

    def _regression_lead(self, record: EvaluationRecord) -> dict[str, float] | None:
        acc = record.metrics.get(keys.KERNEL_REGRESSION_ACC)
        if acc is None:
            return None
        if self._state["regression_start"] is None:
            self._state["regression_start"] = acc
            return None
        own = record.metrics.get(self.accuracy_key) if self.accuracy_key else None
        rise = acc - self._state["regression_start"]
        if rise < self.lead_rise or (own is not None and acc - own < self.lead_margin):
            return None
        evidence = {"kernel_regression_acc": acc, "rise": rise}
        if own is not None:
            evidence[self.accuracy_key] = own
        return evidence

    def _new_cliff(self, record: EvaluationRecord) -> dict[str, float] | None:
        if getattr(record, "cliffs", None) is None:  # a sentinel reading
            return None
        ranks = [c.rank for c in record.cliffs]
        state = self._state
        if state["baseline_ranks"] is None:
            state["baseline_ranks"] = ranks
            return None
        fresh = [
            r
            for r in ranks
            if all(abs(r - b) > self.rank_tolerance for b in state["baseline_ranks"])
        ]
        streaks = {}  # rank -> [epoch first seen, evaluations seen since, without a gap]
        for r in fresh:
            previous = [s for s in state["streaks"] if abs(int(s) - r) <= self.rank_tolerance]
            first, count = state["streaks"][previous[0]] if previous else (record.epoch, 0)
            streaks[str(r)] = [first, count + 1]
        state["streaks"] = streaks
        persistent = [
            int(r)
            for r, (first, count) in streaks.items()
            if count >= 2 and record.epoch - first >= self.persistence
        ]
        if not persistent:
            return None
        rank = min(persistent)
        first, count = streaks[str(rank)]
        drop = next(c.drop for c in record.cliffs if c.rank == rank)
        return {
            "rank": float(rank),
            "drop": float(drop),
            "epochs": float(record.epoch - first),
            "evaluations": float(count),
        }

    def _velocity_jump(self, record: EvaluationRecord) -> dict[str, float] | None:
        if getattr(record, "cliffs", None) is None:  # a sentinel reading
            return None
        velocity = record.metrics.get(keys.KERNEL_VELOCITY)
        last_step, self._state["last_step"] = self._state["last_step"], record.step
        if self.velocity_factor is None:
            return None
        if velocity is None or last_step is None or record.step <= last_step:
            return None
        rate = velocity / (record.step - last_step)
        history = self._state["velocities"]
        history.append(rate)
        if len(history) <= self.warmup:
            return None
        median = float(np.median(history[:-1]))
        if median <= 0 or rate < self.velocity_factor * median:
            return None
        return {"kernel_velocity": velocity, "per_step": rate, "running_median": median}

    def state_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, list) else v) for k, v in self._state.items()}

    def load_state_dict(self, state: dict) -> None:
        self._state = {**self._fresh_state(), **state}
