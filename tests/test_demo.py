"""The demo end to end: the modular-arithmetic MLP groks under a real Trainer with ENTKMonitor and
a real TensorBoardLogger; the event files on disk show the eNTK beside accuracy."""

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from example_modules.modular_arithmetic import main


@pytest.mark.slow
def test_demo_logs_a_new_cliff_through_grokking(tmp_path, capsys):
    monitor = main(
        [
            "--trainer.max_epochs=140",
            "--monitor.every_n_epochs=5",
            "--trainer.enable_progress_bar=false",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
        ]
    )
    log_dir = tmp_path / "modular_arithmetic" / "version_0"
    events = EventAccumulator(str(log_dir), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    for key in ("val_acc", "entk/num_cliffs", "entk/cliff_rank/1", "entk/kernel_regression_acc"):
        assert key in tags["scalars"], key
    for key in ("entk/spectrum", "entk/spectrum_evolution", "entk/alignment/sum"):
        assert key in tags["images"], key

    cliffs = events.Scalars("entk/num_cliffs")
    val_acc = events.Scalars("val_acc")
    assert len(cliffs) == 1 + 140 // 5  # initialization, then every 5 epochs
    assert cliffs[0].value == 1 and cliffs[-1].value == 2  # the cliff at 113 appears
    assert [e.value for e in events.Scalars("entk/cliff_rank/2")][-1] == pytest.approx(113, abs=2)
    assert val_acc[0].value < 0.1 and val_acc[-1].value > 0.95  # ... through grokking

    assert (log_dir / "entk_summary.png").stat().st_size > 20_000
    assert monitor.summary_path == log_dir / "entk_summary.png"
    printed = capsys.readouterr().out
    assert "eNTK monitor summary" in printed and f"tensorboard --logdir {tmp_path}" in printed
    assert "kernel_regression_lead" in printed and ": an early warning" in printed
    assert f"for {len(monitor.history)} evaluations" in printed
    assert 0 < monitor.monitor_seconds and 0 < monitor.training_seconds
