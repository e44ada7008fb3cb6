"""The sentinel: the readout's kernel on held-out and training probe points, exact against the
brute-force float64 reference, read as often as its share of the time allows."""

import itertools

import pytest
import torch
from torch import nn

from lightning_entk import KernelOptions, ProbeSet, Sentinel
from lightning_entk.schedule import Clock
from lightning_entk.signals import debiased_alignment

from reference import brute_force_ntk, double


class Tied(nn.Module):
    """A tied embedding and unembedding: the readout is not a linear layer of its own."""

    def __init__(self, vocab=7, d=6):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.mix = nn.Linear(d, d)

    def forward(self, tokens):
        h = torch.tanh(self.mix(self.embed(tokens).mean(1)))
        return h @ self.embed.weight.T


def probe_of(x, classes, held=12):
    n = len(x)
    return ProbeSet(x, torch.arange(n) % classes, torch.arange(n) >= n - held)


def test_sentinel_reads_the_last_groups_kernel_exactly():
    model = double(nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 4)))
    x = torch.randn(30, 5, dtype=torch.float64)
    probe = probe_of(x, 4)
    sentinel = Sentinel()
    assert sentinel.setup(model, probe, KernelOptions()) is None
    assert sentinel.group == "2" and sentinel.num_points == 12
    values = sentinel.read(model)
    names = ["2.weight", "2.bias"]
    held, trained = probe.heldout, ~probe.heldout
    labels = torch.nn.functional.one_hot(probe.y)
    expected_held = debiased_alignment(brute_force_ntk(model, x[held], names=names), labels[held])
    # The training points read: a seeded subset as large as the held-out one.
    assert sentinel.num_points == 12
    train_points = sentinel._points[sentinel.num_points :]
    chosen = [int((x[trained] == p).all(1).nonzero()) for p in train_points]
    train_labels = labels[trained][chosen]
    expected_trained = debiased_alignment(
        brute_force_ntk(model, train_points, names=names), train_labels
    )
    assert values["entk/sentinel/heldout_alignment"] == pytest.approx(expected_held, rel=1e-10)
    assert values["entk/sentinel/train_alignment"] == pytest.approx(expected_trained, rel=1e-10)


def test_sentinel_reads_a_tied_readout_through_the_engine():
    torch.manual_seed(0)
    model = double(Tied())
    tokens = torch.randint(0, 7, (24, 3))
    probe = probe_of(tokens, 7, held=10)
    sentinel = Sentinel(readout=["embed.weight"])
    sentinel.setup(model, probe, KernelOptions())
    values = sentinel.read(model)
    held = probe.heldout
    kernel = brute_force_ntk(model, tokens[held], names=["embed.weight"])
    expected = debiased_alignment(kernel, torch.nn.functional.one_hot(probe.y[held]))
    assert values["entk/sentinel/heldout_alignment"] == pytest.approx(expected, rel=1e-10)
    assert sentinel.group == "embed"


def test_sentinel_is_off_without_labels_or_held_out_points():
    model = nn.Linear(3, 2)
    assert "no labels" in Sentinel().setup(model, ProbeSet(torch.randn(8, 3)), KernelOptions())
    few = ProbeSet(torch.randn(8, 3), torch.arange(8) % 2, torch.arange(8) >= 6)
    assert "fewer than 4 held-out" in Sentinel().setup(model, few, KernelOptions())


def test_sentinel_reads_every_epoch_while_within_its_share_and_less_often_beyond():
    now = [0.0]
    clock = Clock(lambda: now[0])
    clock.start()
    sentinel = Sentinel(share=0.1)
    sentinel.off_reason = None  # the schedule alone
    steps = []
    for step in range(1, 200):
        now[0] += 1.0  # a step, and an epoch, of one second
        if sentinel.due(step):
            steps.append(step)
            cost = 0.05 if step < 100 else 0.3  # 5% of an epoch, then 30%
            with clock.charge("sentinel"):
                now[0] += cost
            sentinel.epoch_ended(step)
            sentinel.schedule_next(step, cost, clock)
    early = [s for s in steps if s < 100]
    late = [s for s in steps if s > 110]
    assert early == list(range(1, 100))  # every epoch
    gaps = {b - a for a, b in itertools.pairwise(late)}
    assert gaps == {3}  # 0.3 s over 10% of a second


def steps_read_when_a_reading_costs(cost: float, steps: int) -> tuple[list[int], Clock]:
    """The steps a default sentinel reads at when a reading costs ``cost`` steps of 0.01 s."""
    now = [0.0]
    clock = Clock(lambda: now[0])
    clock.start()
    sentinel = Sentinel()
    sentinel.off_reason = None
    read = []
    for step in range(1, steps + 1):
        now[0] += 0.01  # one step, one epoch
        if sentinel.due(step):
            read.append(step)
            with clock.charge("sentinel"):
                now[0] += cost * 0.01
            sentinel.epoch_ended(step)
            sentinel.schedule_next(step, cost * 0.01, clock)
    return read, clock


def test_sentinel_reads_about_eleven_times_each_time_the_run_doubles():
    """A reading dear against a step (here 5 steps' worth at a 5% share: a gap of 100 steps by
    the share alone) still comes within a sixteenth of the steps so far."""
    steps, _ = steps_read_when_a_reading_costs(5, 800)
    for a, b in itertools.pairwise(steps):
        assert b - a <= max(a // 16, 21)  # 20-21: 5 steps over the ceiling's 25%, as floats round
    assert [b - a for a, b in itertools.pairwise(steps) if a >= 352] == [
        max(1, a // 16) for a in steps[:-1] if a >= 352
    ]
    assert steps[-1] > 750
    assert 10 <= len([s for s in steps if 400 < s <= 800]) <= 12  # 16 ln 2 a doubling


def test_sentinel_never_takes_more_than_a_quarter_of_the_training_time():
    """A reading of 50 steps' worth (a tied unembedding's kernel, a backward pass through the
    whole network) would be 3 times the training under the sixteenth's bound alone."""
    steps, clock = steps_read_when_a_reading_costs(50, 2000)
    gaps = {b - a for a, b in itertools.pairwise(steps[1:])}
    assert gaps <= {200, 201}  # 0.5 s over 25% of 0.01 s, as floats round
    assert clock.spent["sentinel"] <= 0.25 * clock.training_seconds() + 0.5


def test_sentinel_long_epochs_read_a_few_times_an_epoch():
    now = [0.0]
    clock = Clock(lambda: now[0])
    clock.start()
    sentinel = Sentinel(share=0.1)
    sentinel.off_reason = None
    steps = []
    for step in range(1, 1001):
        now[0] += 0.1
        if step % 100 == 0:  # 100 steps an epoch
            sentinel.epoch_ended(step)
        if sentinel.due(step):
            steps.append(step)
            sentinel.schedule_next(step, 0.001, clock)
    late = [s for s in steps if s > 300]
    assert max(b - a for a, b in itertools.pairwise(late)) <= 10
    assert len(late) <= 10 * 7 + 7


def test_sentinel_share_out_of_range():
    with pytest.raises(ValueError, match="`share` must be"):
        Sentinel(share=0.0)
