"""The monitor's core driven by hand, as a plain training loop would: a fake clock, a dict sink,
no Trainer."""

import copy

import pytest
import torch
from torch import nn

from lightning_entk import FixedCadence, Monitor, TimeBudget
from lightning_entk.probe import ProbeSet
from lightning_entk.schedule import Clock


class FakeTime:
    """A clock's time, moved only by the test: the monitor's own work takes no time."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def model_and_probe():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4))
    probe = ProbeSet(torch.randn(40, 6), torch.arange(40) % 4, torch.arange(40) >= 28)
    return model, probe


def train(monitor, time, epochs, seconds_per_epoch=1.0):
    monitor.start()
    for epoch in range(1, epochs + 1):
        time.now += seconds_per_epoch
        monitor.step(step=epoch, epoch=epoch, metrics={"val_acc": epoch / 10})
    monitor.end(step=epochs, epoch=epochs)


def test_monitor_fixed_cadence_evaluates_and_writes_to_a_dict():
    model, probe = model_and_probe()
    time, sink = FakeTime(), {}
    monitor = Monitor(model, probe, every_n_epochs=2, sink=sink, clock=Clock(time))
    train(monitor, time, epochs=5)
    assert [r.epoch for r in monitor.history] == [0, 2, 4, 5]  # the start, every 2nd, the end
    assert [step for step, _ in sink["entk/num_cliffs"]] == [0, 2, 4, 5]
    assert len(sink["entk/sentinel/heldout_alignment"]) == len(monitor.readings) >= 5
    assert monitor.watched == {e: e / 10 for e in range(1, 6)}
    assert monitor.training_seconds == 5.0 and monitor.monitor_seconds == 0.0


def test_monitor_takes_a_schedule_and_refuses_two():
    model, probe = model_and_probe()
    budget = TimeBudget(max_overhead=0.5, tolerance=0.1, burst=1)
    assert Monitor(model, probe, schedule=budget).schedule is budget
    with pytest.raises(ValueError, match="either `schedule` or"):
        Monitor(probe=probe, schedule=budget, every_n_epochs=2)
    with pytest.raises(ValueError, match="`schedule` must be a TimeBudget, a FixedCadence"):
        Monitor(probe=probe, schedule="every epoch")
    with pytest.raises(ValueError, match="`max_probe_points` must be a positive int"):
        Monitor(max_probe_points=0)


def test_monitor_bound_later_applies_a_state_loaded_before():
    model, probe = model_and_probe()
    time = FakeTime()
    first = Monitor(model, probe, schedule=FixedCadence(every_n_epochs=1), clock=Clock(time))
    train(first, time, epochs=2)
    later = Monitor(probe=probe, every_n_epochs=1)
    assert not later.on and later.state_dict() == {}
    later.load_state_dict(copy.deepcopy(first.state_dict()))
    assert later.history == [] and later.state_dict()["history"]  # kept until bound
    assert later.bind(model)
    assert [r.to_state() for r in later.history] == [r.to_state() for r in first.history]
    assert later.watched == first.watched and later.readings == first.readings


class StatefulNet(nn.Module):
    """In eval mode the forward decays its hidden state in place after using it (a recurrent
    model's cache, ``use_cache=True``): it cannot be differentiated."""

    def __init__(self):
        super().__init__()
        self.layer1, self.layer2 = nn.Linear(6, 16), nn.Linear(16, 4)

    def forward(self, x):
        hidden = torch.tanh(self.layer1(x))  # tanh keeps its output for the backward pass
        out = self.layer2(hidden)
        if not self.training:
            hidden.mul_(0.5)  # the cache for the next step, in place
        return out


def test_monitor_that_cannot_bind_warns_and_does_nothing_after():
    _, probe = model_and_probe()
    with pytest.warns(UserWarning, match=r"off for this run.*in.?place.*forward_fn"):
        monitor = Monitor(StatefulNet(), probe, sink={})
    assert not monitor.on
    assert monitor.step(1, 1, {"val_acc": 0.5}) == []
    monitor.start()
    monitor.end(1, 1)
    assert monitor.history == [] and monitor.readings == [] and monitor.sink.target == {}


class Gains(nn.Module):
    """``x * gain``: its kernel is the inputs' Gram weighted by the gains."""

    def __init__(self, width):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(width))

    def forward(self, x):
        return x * self.gain


def test_monitor_draws_the_spectrum_where_a_new_cliff_is_first_seen(tmp_path):
    """Eight gains raised tenfold after epoch 2 part the spectrum at rank 8: the evaluation at
    epoch 4 logs the new cliff, and its spectrum is drawn there, though the budget affords no
    images (a fast loop)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    torch.manual_seed(0)
    model = nn.Sequential(Gains(32), nn.Linear(32, 4))
    probe = ProbeSet(torch.randn(120, 32), torch.arange(120) % 4, torch.arange(120) >= 80)
    writer = SummaryWriter(tmp_path)
    monitor = Monitor(model, probe, every_n_epochs=2, sink=writer)
    monitor.start()
    for epoch in range(1, 7):
        if epoch == 3:
            with torch.no_grad():
                model[0].gain[:8] = 10.0
        monitor.step(step=epoch, epoch=epoch, metrics={"val_acc": epoch / 10})
    monitor.end(step=6, epoch=6)
    writer.close()
    assert [[c.rank for c in r.cliffs] for r in monitor.history] == [[], [], [8], [8]]
    assert monitor.new_cliffs() == {8: 4}
    events = EventAccumulator(str(tmp_path), size_guidance={"images": 0})
    events.Reload()
    assert [image.step for image in events.Images("entk/spectrum")] == [4]
