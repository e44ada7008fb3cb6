"""The sentinel: the cheap, frequent tier of the monitor.

A full evaluation (the whole kernel, its spectrum and cliffs, every group's figures, images)
costs many training epochs on a small model, so no schedule of full evaluations can be both
cheap and dense. The signal that warns of generalisation is cheap by nature: the kernel of the
*readout* (the last parameter group of ``groups="auto"``: the output layer, the unembedding).
For a linear readout ``y = W h + b`` its trace eNTK is ``C (h(x) . h(x') + 1)``: one forward
pass and one Gram matrix. The sentinel computes exactly that kernel, through the engine (so a
tied, transposed or non-linear readout is exact too, and discovery is paid once), on the
held-out probe points and on a few training probe points, and from each the debiased
alignment with the labels (:func:`~lightning_entk.signals.debiased_alignment`): how far the
features feeding the output line up with labels the network was not trained on, and with those
it was. Their ratio says how much of what the readout has learned carries over to new points.

It runs at every epoch's end (and every few steps of a long epoch), as often as its own share
of the training time allows (``share``, 5% by default): after each reading the gap to the
next is the reading's cost over ``share`` times the training seconds per step, at most a
sixteenth of the steps so far (so that a signal is never read later than 1/16 of the way past
the step at which it changed: about eleven readings (16 ln 2) each time the run doubles in length),
unless that would take the readings past a quarter of the training time (``MAX_SHARE``: on a
model whose readout is dear, a tied unembedding whose kernel needs a backward pass through the
whole network, the bound alone made them 4.5 times the training), at least one step, and at
least a tenth of an epoch's steps.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lightning_entk import keys
from lightning_entk.checks import check_number
from lightning_entk.kernel import KernelOptions, ParamSelection, empirical_ntk
from lightning_entk.kernel.context import num_outputs
from lightning_entk.kernel.options import automatic_groups, select_parameters
from lightning_entk.kernel.points import take, to_device
from lightning_entk.probe import ProbeSet, seeded_choice
from lightning_entk.schedule import Clock
from lightning_entk.signals import MIN_DEBIASED_POINTS, debiased_alignment

DEFAULT_SHARE = 0.05  # of the training time, at most: half the default time budget
READINGS_PER_EPOCH = 10  # at most, on long epochs
MAX_GAP_SHARE = 1 / 16  # of the steps so far: the longest gap between readings
MAX_SHARE = 0.25  # of the training time: the readings' ceiling, above the gap's bound
MAX_POINTS = 256  # held-out points read (a seeded subset of more)
TRAIN_POINTS = 128  # training points read: their alignment is large, so fewer do
MAX_OUTPUTS = 64  # more outputs (a language model's vocabulary): estimated from projections


@dataclass
class Reading:
    """One sentinel reading: completed ``epoch``, optimizer ``step``, and its ``entk/sentinel/``
    scalars (:mod:`~lightning_entk.keys`)."""

    epoch: int
    step: int
    metrics: dict[str, float] = field(default_factory=dict)

    def to_state(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "metrics": dict(self.metrics)}

    @classmethod
    def from_state(cls, state: dict) -> Reading:
        return cls(state["epoch"], state["step"], dict(state["metrics"]))


class Sentinel:
    """The readout's kernel on the held-out probe points, read often (see the module
    docstring).

    Args:
        readout: the readout's parameters: names or a predicate as in
            :class:`~lightning_entk.kernel.KernelOptions` ``params``; ``None`` for the last
            group of :func:`~lightning_entk.kernel.options.automatic_groups`.
        share: the sentinel's share of the training time, at most.

    Raises:
        ValueError: for a ``share`` outside (0, 1].
    """

    def __init__(self, readout: ParamSelection = None, share: float = DEFAULT_SHARE) -> None:
        check_number("share", share, 0, 1, "(]")
        self.readout = readout
        self.share = float(share)
        self.group: str | None = None  # the readout's name, once set up
        self.off_reason: str | None = "not set up"
        self._points: object = None  # the held-out points read, then the training points
        self._targets: Tensor | None = None  # their one-hot labels
        self._held = 0  # how many of them are held out
        self._options: KernelOptions | None = None
        self._state = {
            "next_step": 0, "count": 0, "costs": [], "epoch_step": None, "steps_per_epoch": None
        }  # fmt: skip

    def setup(self, model: nn.Module, probe: ProbeSet, options: KernelOptions) -> str | None:
        """Choose the readout and the points; ``None`` when ready, else why the sentinel is
        off (a probe without labels or held-out points)."""
        if probe.y is None or probe.heldout is None:
            self.off_reason = "the probe has no labels or no held-out points"
            return self.off_reason
        held = probe.heldout.nonzero().flatten()
        held = held[seeded_choice(len(held), MAX_POINTS).to(held.device)]
        if len(held) < MIN_DEBIASED_POINTS:
            self.off_reason = f"fewer than {MIN_DEBIASED_POINTS} held-out probe points"
            return self.off_reason
        trained = (~probe.heldout).nonzero().flatten()
        trained = trained[seeded_choice(len(trained), TRAIN_POINTS).to(trained.device)]
        if len(trained) < MIN_DEBIASED_POINTS:
            self.off_reason = f"fewer than {MIN_DEBIASED_POINTS} training probe points"
            return self.off_reason
        counted = select_parameters(model, options.params)
        if self.readout is None:
            group_of = automatic_groups(model, counted)
            self.group = keys.readout_group(group_of)
            names = [n for n in counted if group_of[n] == self.group]
        else:
            names = select_parameters(model, self.readout)
            self.group = _common_prefix(names)
        device = next(model.parameters()).device
        labels = probe.y.to(device).long()
        both = torch.cat([held, trained])
        self._points = to_device(take(probe.x, both), device)
        self._targets = torch.nn.functional.one_hot(labels[both.to(device)])  # equal labels
        self._held = len(held)
        self._options = options.replace(params=names, groups=None)
        outputs = num_outputs(model, self._points, options.output_fn, options.forward_fn)
        if outputs > MAX_OUTPUTS and options.output_projections is None:
            self._options = self._options.replace(output_projections=MAX_OUTPUTS)
        self.off_reason = None
        return None

    @property
    def ready(self) -> bool:
        return self.off_reason is None

    @property
    def num_points(self) -> int:
        """Held-out points read."""
        return self._held

    def due(self, step: int) -> bool:
        """Whether a reading is due at ``step`` (the same on every process)."""
        return self.ready and step >= self._state["next_step"]

    def read(self, model: nn.Module) -> dict[str, float]:
        """The reading's scalars: the readout's debiased alignment on the held-out points and on
        the training points, and their ratio (when the training points' is positive).

        Raises:
            FloatingPointError: if a kernel is not finite.
        """
        # One engine call on both sets (its fixed cost is most of a reading on a small model),
        # then each set's diagonal block.
        kernel = empirical_ntk(model, self._points, options=self._options)
        if not torch.isfinite(kernel).all():
            raise FloatingPointError("the readout's kernel has NaN or inf entries")
        held, trained = (
            debiased_alignment(kernel[part, part], self._targets[part])
            for part in (slice(None, self._held), slice(self._held, None))
        )
        values = {keys.SENTINEL_ALIGNMENT: held, keys.SENTINEL_TRAIN_ALIGNMENT: trained}
        if trained > 0:
            values[keys.SENTINEL_RATIO] = held / trained
        return values

    def epoch_ended(self, step: int) -> None:
        """An epoch ended at ``step``: the epoch's length, for the gap on long epochs."""
        state = self._state
        if state["epoch_step"] is not None and step > state["epoch_step"]:
            state["steps_per_epoch"] = step - state["epoch_step"]
        state["epoch_step"] = step

    def schedule_next(self, step: int, cost: float, clock: Clock) -> None:
        """Set the step of the next reading after one at ``step`` that took ``cost`` seconds."""
        state = self._state
        state["count"] += 1
        if state["count"] > 1:  # the first reading paid for the engine's discovery
            state["costs"] = [*state["costs"][-2:], cost]
        per_step = clock.seconds_per_step(step)
        gap = 1
        least = 1  # the gap at the ceiling
        if state["costs"] and per_step > 0:
            expected = statistics.median(state["costs"])
            gap = max(gap, math.ceil(expected / (self.share * per_step)))
            least = math.ceil(expected / (max(self.share, MAX_SHARE) * per_step))
        gap = max(min(gap, max(1, math.floor(MAX_GAP_SHARE * step))), least)
        if state["steps_per_epoch"]:
            gap = max(gap, math.ceil(state["steps_per_epoch"] / READINGS_PER_EPOCH))
        state["next_step"] = step + gap

    def state_dict(self) -> dict:
        return {**self._state, "costs": list(self._state["costs"])}

    def load_state_dict(self, state: dict) -> None:
        self._state.update(state)


def _common_prefix(names: list[str]) -> str:
    """A name for a set of parameters: their common module path, or the first's module."""
    parts = [n.split(".")[:-1] for n in names]
    common = []
    for level in zip(*parts, strict=False):
        if len(set(level)) > 1:
            break
        common.append(level[0])
    return ".".join(common) or names[0].rsplit(".", 1)[0] or names[0]
