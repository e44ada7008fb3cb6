import copy
import json
import multiprocessing.util
import re
import warnings

import lightning as L
import pytest
import torch
import torchmetrics
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_entk import ENTKMonitor, FixedCadence, KernelOptions, Monitor, PhaseTransition
from lightning_entk.kernel.budget import MemoryBudget
from lightning_entk.probe import ProbeSet


class Blobs(L.LightningDataModule):
    """Four Gaussian blobs in 6 dimensions; shuffled training batches."""

    def __init__(self, n=96, batch_size=16):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        centres = torch.randn(4, 6, generator=g) * 2
        y = torch.arange(n) % 4
        x = centres[y] + torch.randn(n, 6, generator=g)
        self.train_set = TensorDataset(x[: n * 3 // 4], y[: n * 3 // 4])
        self.val_set = TensorDataset(x[n * 3 // 4 :], y[n * 3 // 4 :])
        self.batch_size = batch_size

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=64)


class Classifier(L.LightningModule):
    def __init__(self, lr=0.1, batchnorm=True):
        super().__init__()
        norm = nn.BatchNorm1d(32) if batchnorm else nn.Identity()
        self.net = nn.Sequential(
            nn.Linear(6, 32), nn.ReLU(), nn.Dropout(0.3), norm, nn.Linear(32, 4)
        )
        self.lr = lr
        self.val_acc = torchmetrics.Accuracy(task="multiclass", num_classes=4)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, _):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, _):
        x, y = batch
        self.val_acc(self(x), y)
        self.log("val_acc", self.val_acc, prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def fit(tmp_path, callbacks=(), max_epochs=3, logger=False, model=None, ckpt_path=None, **kwargs):
    L.seed_everything(0, verbose=False)
    model, data = model or Classifier(), Blobs()
    kwargs.setdefault("enable_checkpointing", False)
    trainer = L.Trainer(
        max_epochs=max_epochs,
        callbacks=list(callbacks),
        logger=logger,
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        accelerator="cpu",
        **kwargs,
    )
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    return trainer, model


@pytest.mark.parametrize(
    "options",
    [{"every_n_epochs": 1, "every_n_train_steps": 2}, {"max_overhead": 10.0}],
    ids=["cadence", "budget"],
)
def test_monitor_does_not_change_training(tmp_path, options):
    _, plain = fit(tmp_path / "plain")
    monitor = ENTKMonitor(**options)
    _, watched = fit(tmp_path / "watched", callbacks=[monitor])
    assert len(monitor.history) > 3
    for (name, a), b in zip(plain.state_dict().items(), watched.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert watched.training  # left in train mode after fit's last evaluation
    assert all(p.requires_grad for p in watched.parameters())


def test_monitor_logs_scalars_to_callback_metrics_and_history(tmp_path):
    monitor = ENTKMonitor(every_n_epochs=1)
    trainer, _ = fit(tmp_path, callbacks=[monitor])
    metrics = trainer.callback_metrics
    for key in (
        "entk/num_cliffs",
        "entk/effective_rank",
        "entk/eigenvalue/top1",
        "entk/kernel_velocity",
        "entk/kernel_target_alignment",
        "entk/kernel_regression_acc",
    ):
        assert key in metrics, key
    assert [r.epoch for r in monitor.history] == [0, 1, 2, 3]
    assert monitor.probe is not None and len(monitor.probe) == 96
    assert int(monitor.probe.heldout.sum()) == 24  # the validation points
    assert "val_acc" in monitor.history[-1].metrics
    accuracy = [r.metrics.get("val_acc") for r in monitor.history]
    assert accuracy[0] is None  # before training, no val_acc yet
    reached = [r.epoch for r in monitor.history[1:] if r.metrics["val_acc"] >= accuracy[-1]]
    assert monitor.first_epoch_reaching(accuracy[-1]) == reached[0]
    assert monitor.first_epoch_reaching(1.01) is None


def test_monitor_uses_an_explicit_probe_set(tmp_path):
    x = torch.randn(20, 6)
    y = torch.arange(20) % 4
    heldout = torch.arange(20) >= 15
    monitor = ENTKMonitor(probe=ProbeSet(x, y, heldout), every_n_epochs=2)
    fit(tmp_path, callbacks=[monitor], max_epochs=4)
    assert torch.equal(monitor.probe.x, x)
    assert [r.epoch for r in monitor.history] == [0, 2, 4]
    assert all(len(r.eigenvalues) == 20 for r in monitor.history)


def test_monitor_failure_is_a_warning_and_training_goes_on(tmp_path):
    epoch = {}

    class EpochEnd(L.Callback):  # runs before the monitor's hook: marks the first epoch's end
        def on_train_epoch_end(self, trainer, pl_module):
            epoch["ended"] = trainer.current_epoch

    def flaky(out):
        if epoch.get("ended") == 0:  # every call of the evaluation after the first epoch
            raise RuntimeError("boom")
        return out

    monitor = ENTKMonitor(every_n_epochs=1, kernel=KernelOptions(output_fn=flaky))
    with pytest.warns(UserWarning, match="skipped its evaluation.*boom"):
        trainer, _ = fit(tmp_path, callbacks=[EpochEnd(), monitor])
    assert trainer.current_epoch == 3
    assert len(monitor.history) == 3  # one of four evaluations skipped


def test_monitor_non_finite_kernel_is_skipped(tmp_path):
    nan = KernelOptions(output_fn=lambda out: out * float("nan"))
    monitor = ENTKMonitor(every_n_epochs=1, kernel=nan, sentinel=False)
    with pytest.warns(UserWarning, match="NaN or inf"):
        trainer, _ = fit(tmp_path, callbacks=[monitor], max_epochs=1)
    assert trainer.current_epoch == 1 and monitor.history == []


def test_monitor_invalid_arguments_fail_at_construction():
    with pytest.raises(ValueError, match="`every_n_epochs` must be a positive int"):
        ENTKMonitor(every_n_epochs=0)
    with pytest.raises(ValueError, match="`groups` must be None, 'modules'"):
        ENTKMonitor(kernel=KernelOptions(groups="layers"))
    with pytest.raises(ValueError, match="`method` must be one of"):
        ENTKMonitor(kernel=KernelOptions(method="fast"))
    with pytest.raises(ValueError, match="`kernel` must be a KernelOptions"):
        ENTKMonitor(kernel={"groups": None})
    with pytest.raises(ValueError, match="`max_overhead` must be a positive number"):
        ENTKMonitor(max_overhead=0)
    with pytest.raises(ValueError, match=r"either a fixed cadence .* or a time budget"):
        ENTKMonitor(every_n_epochs=2, max_overhead=0.2)
    with pytest.raises(ValueError, match="`mode` must be"):
        ENTKMonitor(mode="full")
    with pytest.raises(ValueError, match="`probe` must be"):
        ENTKMonitor(probe="data.csv")
    with pytest.raises(ValueError, match="`memory_budget` must be"):
        ENTKMonitor(kernel=KernelOptions(memory_budget=-1))
    with pytest.raises(ValueError, match="`early_warning` must be True, False or"):
        ENTKMonitor(early_warning=None)
    with pytest.raises(ValueError, match="`on_transition` must be callable"):
        ENTKMonitor(on_transition=3)


def test_monitor_probe_over_budget_evaluates_what_fits(tmp_path):
    budget = 2**20
    monitor = ENTKMonitor(
        probe=torch.randn(600, 6), every_n_epochs=1, kernel=KernelOptions(memory_budget=budget)
    )
    with pytest.warns(UserWarning, match=r"all 600 probe points would need more than"):
        fit(tmp_path, callbacks=[monitor], max_epochs=1)
    kept = len(monitor.probe)
    assert 2 <= kept < 600 and len(monitor.history) == 2
    # The kept points fit the budget with the engine's own arrays, and twice as many would not.
    assert (
        MemoryBudget.dense_kernel_bytes(kept) < budget < MemoryBudget.dense_kernel_bytes(2 * kept)
    )


def test_monitor_budget_below_two_points_is_a_warning_at_setup_and_training_goes_on(tmp_path):
    monitor = ENTKMonitor(probe=torch.randn(50, 6), kernel=KernelOptions(memory_budget=100))
    with pytest.warns(UserWarning, match=r"not even 2 probe points fit `memory_budget`"):
        trainer, _ = fit(tmp_path, callbacks=[monitor])
    assert trainer.current_epoch == 3 and not monitor.on and monitor.history == []


def test_monitor_state_survives_checkpoint_resume(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = ENTKMonitor(every_n_epochs=1)
    fit(tmp_path, callbacks=[first, checkpoint], max_epochs=2, enable_checkpointing=True)
    resumed = ENTKMonitor(every_n_epochs=1)
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(
        max_epochs=4,
        callbacks=[resumed],
        logger=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
        accelerator="cpu",
    )
    trainer.fit(Classifier(), datamodule=Blobs(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert [r.epoch for r in resumed.history] == [0, 1, 2, 3, 4]
    assert torch.equal(resumed.probe.x, first.probe.x)
    assert resumed.history[1].metrics == first.history[1].metrics
    assert "entk/kernel_velocity" in resumed.history[3].metrics  # previous kernel restored


class Interrupt(Callback):
    """Ends the run with an error as the given epoch starts, as a crash or a kill would."""

    def __init__(self, epoch):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            raise RuntimeError("interrupted")


@pytest.mark.parametrize(
    "options",
    [
        {"every_n_epochs": 2},
        {
            "every_n_epochs": 2,
            "probe": ProbeSet(torch.randn(40, 6), torch.arange(40) % 4, torch.arange(40) >= 28),
        },
        {"every_n_train_steps": 4},
        {"max_overhead": 10.0},
    ],
    ids=["epochs", "epochs-explicit-probe", "steps", "budget"],
)
def test_monitor_resumed_after_an_interruption_keeps_its_history_and_goes_on(tmp_path, options):
    ckpt = tmp_path / "ckpt" / "last.ckpt"
    first = ENTKMonitor(**options)
    with pytest.raises(RuntimeError, match="interrupted"):
        fit(
            tmp_path,
            [first, Interrupt(3), ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)],
            max_epochs=6,
            enable_checkpointing=True,
        )
    held = torch.load(ckpt, weights_only=False)["callbacks"]["ENTKMonitor"]
    assert held["history"] and held["readings"]
    resumed = ENTKMonitor(**options)
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(
        max_epochs=6, callbacks=[resumed], logger=False, enable_progress_bar=False,
        default_root_dir=tmp_path, accelerator="cpu",
    )  # fmt: skip
    trainer.fit(Classifier(), datamodule=Blobs(), ckpt_path=str(ckpt))
    restored = len(held["history"])
    assert [r.to_state() for r in resumed.history[:restored]] == held["history"]
    assert [r.to_state() for r in resumed.readings[: len(held["readings"])]] == held["readings"]
    after = [r.epoch for r in resumed.history[restored:]]
    assert after and min(after) > 2 and after[-1] == 6  # evaluations go on, to the end
    # Readings go on to the last epoch or the one before: a reading of this model is about 40%
    # of a step's time, so at the sentinel's ceiling (a quarter of the training time) they come
    # every few steps.
    assert max(r.epoch for r in resumed.readings) >= 5


def test_monitor_without_logger_and_with_csv_logger(tmp_path, caplog):
    fit(tmp_path / "none", callbacks=[ENTKMonitor()], logger=False)
    assert not list(tmp_path.rglob("*.png"))  # no logger, no log directory: no file written
    logger = CSVLogger(tmp_path / "csv")
    with caplog.at_level("INFO"):
        fit(tmp_path / "csv", callbacks=[ENTKMonitor()], logger=logger)
    assert sum("need a TensorBoardLogger" in r.message for r in caplog.records) == 1
    header = (
        (tmp_path / "csv" / "lightning_logs" / "version_0" / "metrics.csv")
        .read_text()
        .splitlines()[0]
    )
    assert "entk/num_cliffs" in header


def test_monitor_transition_hook_and_events(tmp_path):
    seen = []
    detector_raises = ENTKMonitor(every_n_epochs=1, on_transition=seen.append)
    detector_raises.early_warning.lead_rise = 1e-9  # any rise of kernel regression counts
    detector_raises.early_warning.lead_margin = 1e-9
    detector_raises.early_warning.accuracy_key = None
    fit(tmp_path, callbacks=[detector_raises])
    assert seen == detector_raises.transitions
    assert all(isinstance(t, PhaseTransition) for t in seen)


def test_monitor_tensorboard_events_and_summary(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="run")
    monitor = ENTKMonitor(every_n_epochs=1, image_every_n_evaluations=2)
    fit(tmp_path, callbacks=[monitor], logger=logger)
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert "entk/num_cliffs" in scalars and "val_acc" in scalars
    assert {"entk/spectrum", "entk/spectrum_evolution"} <= set(events.Tags()["images"])
    assert "entk/log10_eigenvalues" in events.Tags()["histograms"]
    assert (tmp_path / "run" / "version_0" / "entk_summary.png").stat().st_size > 10_000
    assert len(events.Scalars("entk/num_cliffs")) == 4  # initialization + 3 epochs

    # The Custom Scalars layout: every chart draws logged tags; accuracy beside kernel regression
    config = EventAccumulator(logger.log_dir, size_guidance={"tensors": 0})
    config.Reload()
    (written,) = config.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(written.tensor_proto.string_val[0])
    charts = {chart.title: chart.multiline.tag for chart in layout.category[0].chart}
    cliff_ranks = "cliff ranks (eigenvalues above each cliff)"
    for title, patterns in charts.items():
        if title == cliff_ranks and not any(r.cliffs for r in monitor.history):
            continue  # no cliff in this run, so no cliff_rank tag
        for pattern in patterns:
            assert any(re.match(pattern, tag) for tag in scalars), (title, pattern)
    (rank_pattern,) = charts[cliff_ranks]
    assert re.match(rank_pattern, "entk/cliff_rank/12") and not re.match(
        rank_pattern, "entk/cliff_drop/1"
    )
    accuracy_chart = charts[
        "accuracy: network, eNTK kernel regression, readout's held-out alignment"
    ]
    drawn = {tag for tag in scalars if any(re.match(p, tag) for p in accuracy_chart)}
    assert drawn == {"val_acc", "entk/kernel_regression_acc", "entk/sentinel/heldout_alignment"}
    # The sentinel read the readout at initialization and then as its share of time allowed.
    readings = [e.step for e in events.Scalars("entk/sentinel/heldout_alignment")]
    assert len(readings) == len(monitor.readings) >= 2 and readings[0] == 0


def test_monitor_logs_each_parameter_group_beside_the_whole_model(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="run")
    groups = {"hidden": ["net.0.weight", "net.0.bias"], "head": lambda n: n.startswith("net.4")}
    monitor = ENTKMonitor(
        every_n_epochs=1, kernel=KernelOptions(groups=groups), image_every_n_evaluations=0
    )
    fit(tmp_path, callbacks=[monitor], logger=logger)
    events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    for group in ("hidden", "head", "other"):  # "other": the BatchNorm parameters
        for key in (
            "kernel_regression_acc",
            "kernel_target_alignment",
            "heldout_alignment",
            "eigenvalue/top1",
            "num_cliffs",
        ):
            assert f"entk/{group}/{key}" in scalars
    assert "entk/kernel_regression_acc" in scalars  # the whole model's, where it always was
    for record in monitor.history:  # the groups' kernels sum to the whole kernel
        parts = sum(record.metrics[f"entk/{g}/trace"] for g in ("hidden", "head", "other"))
        assert parts == pytest.approx(record.metrics["entk/trace"], rel=1e-5)

    (written,) = events.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(written.tensor_proto.string_val[0])
    (per_group,) = [c for c in layout.category if c.title == "eNTK per parameter group"]
    for chart in per_group.chart:
        drawn = {t for t in scalars if any(re.match(p, t) for p in chart.multiline.tag)}
        assert {f"entk/{g}/" for g in ("hidden", "head", "other")} <= {
            t[: t.index("/", 5) + 1] for t in drawn if t.count("/") >= 2
        }, chart.title
        if chart.title.startswith("accuracy"):
            assert "val_acc" in drawn and "entk/kernel_regression_acc" not in drawn


def test_monitor_default_groups_follow_the_model_and_a_single_group_is_the_whole(tmp_path):
    """``groups="auto"`` by default: the classifier's layers get their own figures, with the
    output layer last (the readout the early warning watches); a model of one group logs the
    whole kernel's figures only."""
    monitor = ENTKMonitor(every_n_epochs=1, image_every_n_evaluations=0)
    fit(tmp_path, callbacks=[monitor], max_epochs=1)
    metrics = monitor.history[-1].metrics
    groups = [k.split("/")[1] for k in metrics if re.fullmatch("entk/[^/]+/heldout_alignment", k)]
    assert groups == ["net.0", "net.3", "net.4"]

    linear = Classifier()
    linear.net = nn.Sequential(nn.Linear(6, 4))
    monitor = ENTKMonitor(every_n_epochs=1, image_every_n_evaluations=0)
    fit(tmp_path, callbacks=[monitor], max_epochs=1, model=linear)
    assert not [k for k in monitor.history[-1].metrics if k.count("/") >= 2 and "/net" in k]
    assert "entk/heldout_alignment" in monitor.history[-1].metrics


def test_monitor_state_dict_round_trip():
    """The core's state (full evaluations, sentinel readings, the watched metric, the detector,
    the schedule) survives a copy, and the copy goes on where the original left off."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))
    probe = ProbeSet(torch.randn(40, 6), torch.arange(40) % 4, torch.arange(40) >= 30)
    monitor = Monitor(model, probe, schedule=FixedCadence(every_n_epochs=1))
    monitor.start()
    monitor.step(1, 1, {"val_acc": 0.25})
    clone = Monitor(model, probe, schedule=FixedCadence(every_n_epochs=1))
    clone.load_state_dict(copy.deepcopy(monitor.state_dict()))
    assert [r.to_state() for r in clone.history] == [r.to_state() for r in monitor.history]
    assert clone.readings == monitor.readings and clone.transitions == monitor.transitions
    assert clone.watched == {1: 0.25}
    assert ENTKMonitor().state_dict() == {}  # nothing to keep before training
    for copy_ in (monitor, clone):
        copy_.step(2, 2, {"val_acc": 0.5})

    def values(m):
        return {k: v for k, v in m.history[-1].metrics.items() if "seconds" not in k}

    assert values(clone) == values(monitor) and "entk/kernel_velocity" in values(clone)


class ReleaseProcessGroupAtExit(Callback):
    """ddp_spawn workers leave through ``os._exit``, skipping the ``atexit`` teardown Lightning
    registers; a gloo process group still alive then can abort the worker at exit ("terminate
    called without an active exception") after its work is done. Destroy the group in the
    worker's multiprocessing finalizers, which do run."""

    def setup(self, trainer, pl_module, stage):
        if torch.distributed.is_initialized():
            multiprocessing.util.Finalize(
                None, torch.distributed.destroy_process_group, exitpriority=100
            )


@pytest.mark.slow
@pytest.mark.parametrize(
    "options",
    [
        {"mode": "trace"},
        {"mode": "trace", "kernel": KernelOptions(groups="auto", output_projections=3)},
        # rank 1 has no projection: adds zero
        {"mode": "trace", "kernel": KernelOptions(groups="auto", output_projections=1)},
        {"mode": "flatten"},
    ],
)
def test_monitor_ddp_spawn_matches_single_process(tmp_path, options):
    """Two CPU processes, each computing half of the trace kernel's output projections (half of
    the flattened kernel's rows): one evaluation per epoch, logged once, no deadlock, and the
    values of a single process (the weights are frozen by lr=0 so that both runs see the same
    model)."""

    def frozen_model():
        torch.manual_seed(0)
        return Classifier(lr=0.0, batchnorm=False)

    single, _ = fit(
        tmp_path / "one",
        [ENTKMonitor(every_n_epochs=1, **options)],
        max_epochs=2,
        model=frozen_model(),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        multi, _ = fit(
            tmp_path / "two",
            [ENTKMonitor(every_n_epochs=1, **options), ReleaseProcessGroupAtExit()],
            max_epochs=2,
            model=frozen_model(),
            strategy="ddp_spawn",
            devices=2,
            logger=TensorBoardLogger(tmp_path / "two", name="run"),
        )
    events = EventAccumulator(str(tmp_path / "two" / "run" / "version_0"))
    events.Reload()
    assert len(events.Scalars("entk/num_cliffs")) == 3  # initialization + 2 epochs, once each
    keys = [k for k in single.callback_metrics if k.startswith("entk/")]
    keys = [k for k in keys if not k.startswith("entk/seconds")]
    keys = [k for k in keys if k != "entk/sentinel/seconds"]  # wall times differ
    assert "entk/eigenvalue/top1" in keys
    groups = [k for k in keys if re.match(r"entk/net\.\d/", k)]  # one process logs groups
    assert groups and not [k for k in multi.callback_metrics if re.match(r"entk/net\.\d/", k)]
    for key in set(keys) - set(groups):
        torch.testing.assert_close(
            multi.callback_metrics[key], single.callback_metrics[key], msg=key
        )


class SaveEvaluatedSteps(Callback):
    """Each rank writes the steps its monitor evaluated at to ``rank<r>.json``."""

    def __init__(self, directory):
        self.directory = directory

    def on_fit_end(self, trainer, pl_module):
        monitor = next(c for c in trainer.callbacks if isinstance(c, ENTKMonitor))
        steps = [r.step for r in monitor.history]
        (self.directory / f"rank{trainer.global_rank}.json").write_text(json.dumps(steps))


def fit_on_two_ranks(tmp_path, run_dir, monitor, **trainer_args) -> list[list[int]]:
    """Four epochs under ``ddp_spawn`` on two processes; the steps each rank evaluated at."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit(
            run_dir,
            [monitor, SaveEvaluatedSteps(tmp_path), ReleaseProcessGroupAtExit()],
            max_epochs=4,
            strategy="ddp_spawn",
            devices=2,
            **trainer_args,
        )
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.slow
def test_monitor_time_budget_evaluates_at_the_same_steps_on_every_ddp_rank(tmp_path):
    """Rank 0 measures and decides; every rank evaluates at the steps it decided."""
    steps = fit_on_two_ranks(tmp_path, tmp_path, ENTKMonitor(max_overhead=5.0))
    assert steps[0] == steps[1]
    assert len(steps[0]) >= 3 and steps[0][0] == 0  # initialization, some, the end


@pytest.mark.slow
def test_monitor_resumed_under_ddp_keeps_its_history_on_every_rank(tmp_path):
    """A checkpoint of one process, resumed on two: both ranks start from its history and
    evaluate at the same steps after it."""
    ckpt = tmp_path / "ckpt" / "last.ckpt"
    checkpoint = ModelCheckpoint(dirpath=ckpt.parent, save_last=True)
    fit(tmp_path / "one", [ENTKMonitor(every_n_epochs=1), checkpoint], max_epochs=2,
        enable_checkpointing=True)  # fmt: skip
    held = [
        r["step"]
        for r in torch.load(ckpt, weights_only=False)["callbacks"]["ENTKMonitor"]["history"]
    ]
    steps = fit_on_two_ranks(
        tmp_path, tmp_path / "two", ENTKMonitor(every_n_epochs=1), ckpt_path=str(ckpt)
    )
    assert steps[0] == steps[1]
    assert steps[0][: len(held)] == held and len(steps[0]) > len(held)


def test_monitor_with_output_projections_estimates_the_trace_kernel(tmp_path):
    exact, estimated = ENTKMonitor(), ENTKMonitor(kernel=KernelOptions(output_projections=2))
    fit(tmp_path / "exact", callbacks=[exact], max_epochs=1)
    fit(tmp_path / "estimated", callbacks=[estimated], max_epochs=1)
    a, b = exact.history[0].metrics, estimated.history[0].metrics
    assert a["entk/trace"] != b["entk/trace"]  # an estimate of 4 outputs from 2 projections
    assert b["entk/trace"] == pytest.approx(a["entk/trace"], rel=0.5)  # unbiased: same scale
    with pytest.raises(ValueError, match="mode='trace'"):
        ENTKMonitor(mode="flatten", kernel=KernelOptions(output_projections=2))
    with pytest.raises(ValueError, match="positive int"):
        KernelOptions(output_projections=0)


def test_monitor_without_early_warning_raises_nothing(tmp_path):
    """``early_warning=False`` turns the detector off (the sentinel still reads)."""
    monitor = ENTKMonitor(every_n_epochs=1, early_warning=False)
    monitor_on = ENTKMonitor(every_n_epochs=1)
    detector = monitor_on.early_warning  # any rise of kernel regression is an alarm
    detector.lead_rise = detector.lead_margin = 1e-9
    detector.accuracy_key = None
    fit(tmp_path / "on", callbacks=[monitor_on])
    fit(tmp_path / "off", callbacks=[monitor])
    assert monitor_on.transitions and monitor.early_warning is None
    assert monitor.transitions == [] and monitor.readings


def test_monitor_probe_the_model_cannot_take_is_a_warning_with_its_shapes(tmp_path):
    monitor = ENTKMonitor(probe=(torch.randn(20, 9), torch.arange(20) % 4))
    with pytest.warns(UserWarning, match=r"could not be called on the points \(a tensor \(20, 9\)"):
        trainer, _ = fit(tmp_path, callbacks=[monitor])
    assert trainer.current_epoch == 3 and not monitor.on and monitor.history == []


class StatefulClassifier(Classifier):
    """In eval mode the forward decays its hidden state in place after using it (as a recurrent
    language model's cache, ``use_cache=True``): it cannot be differentiated."""

    def __init__(self):
        super().__init__(batchnorm=False)

    def forward(self, x):
        hidden = self.net[:4](x)  # ReLU keeps its output for the backward pass
        out = self.net[4](hidden)
        if not self.training:
            hidden.mul_(0.5)  # the cache for the next step, in place
        return out


def test_monitor_on_a_model_it_cannot_differentiate_warns_turns_off_and_training_goes_on(
    tmp_path,
):
    monitor = ENTKMonitor()
    with pytest.warns(UserWarning, match=r"ENTKMonitor is off for this run.*forward_fn"):
        trainer, _ = fit(tmp_path, callbacks=[monitor], model=StatefulClassifier())
    assert trainer.current_epoch == 3  # trained to the end
    assert not monitor.on and re.search("in.?place", monitor.off_reason)
    assert monitor.history == [] and monitor.readings == [] and monitor.state_dict() == {}


def test_monitor_warns_once_when_the_watched_metric_is_never_logged(tmp_path):
    monitor = ENTKMonitor(accuracy_key="val_accuracy")
    with pytest.warns(UserWarning, match="`accuracy_key`='val_accuracy' is not among") as record:
        fit(tmp_path, callbacks=[monitor])
    assert sum("val_accuracy" in str(w.message) for w in record) == 1


def test_monitor_forecast_or_detector_failure_is_a_warning_and_training_goes_on(
    tmp_path, monkeypatch
):
    from lightning_entk.monitor import core

    def broken(*args, **kwargs):
        raise OverflowError("numerical result out of range")

    monkeypatch.setattr(core, "forecast", broken)
    monitor = ENTKMonitor(every_n_epochs=1)
    monkeypatch.setattr(monitor.early_warning, "update", broken)
    with pytest.warns(UserWarning, match="skipped its forecast.*OverflowError"):
        trainer, _ = fit(tmp_path, callbacks=[monitor])
    assert trainer.current_epoch == 3 and len(monitor.history) == 4 and monitor.readings
