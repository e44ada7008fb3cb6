"""The demo end to end: the modular-arithmetic MLP groks under a real Trainer with
``ENTKMonitor()`` and no arguments and a real TensorBoardLogger; the event files on disk show the
sentinel, the full evaluations and the early warning beside accuracy."""

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from example_modules.modular_arithmetic import main


@pytest.mark.slow
def test_demo_warns_before_grokking_and_logs_a_new_cliff(tmp_path, capsys):
    monitor = main(
        [
            "--trainer.max_epochs=140",
            "--trainer.enable_progress_bar=false",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
        ]
    )
    log_dir = tmp_path / "modular_arithmetic" / "version_0"
    events = EventAccumulator(str(log_dir), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    scalars = ("val_acc", "entk/num_cliffs", "entk/sentinel/heldout_alignment", "entk/transitions")
    for key in scalars:
        assert key in tags["scalars"], key
    assert "entk/spectrum_evolution" in tags["images"]  # the summary figure, always

    crossed = monitor.first_epoch_reaching(0.5)
    alarms = {t.kind: t for t in monitor.transitions}
    assert crossed is not None and alarms["alignment_ratio"].epoch < crossed
    assert alarms["alignment_ratio"].group == "layer2"
    assert [c.rank for c in monitor.history[0].cliffs] == [57]
    assert [c.rank for c in monitor.history[-1].cliffs] == [57, 113]  # the new cliff
    cliffs = events.Scalars("entk/num_cliffs")
    assert len(cliffs) == len(monitor.history) >= 2

    # Placed in the transition window: an evaluation at the first alarm, and the new cliff
    # logged at one of the window's, before the end of fit (140 epochs), in TensorBoard too.
    first_alarm = monitor.transitions[0]
    assert first_alarm.epoch in [r.epoch for r in monitor.history]
    new = monitor.new_cliffs()
    assert list(new) == [113] and first_alarm.epoch < new[113] < monitor.history[-1].epoch
    assert [event.value for event in cliffs] == [len(r.cliffs) for r in monitor.history]

    assert (log_dir / "entk_summary.png").stat().st_size > 20_000
    assert monitor.summary_path == log_dir / "entk_summary.png"
    printed = capsys.readouterr().out
    assert "eNTK monitor summary" in printed and f"tensorboard --logdir {tmp_path}" in printed
    assert "alignment_ratio of group 'layer2'" in printed and ": an early warning" in printed
    assert f"{len(monitor.readings)} sentinel readings" in printed
    assert f"new cliff at rank 113: first logged at epoch {new[113]}" in printed
    assert 0 < monitor.monitor_seconds and 0 < monitor.training_seconds
