"""The monitor's core in a hand-written training loop (no Lightning), end to end: the bundled
example trains the modular MLP, the sentinel warns before val_acc reaches 0.5, and the
TensorBoard files on disk hold the monitor's scalars beside the summary figure."""

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from example_modules.plain_loop import main


@pytest.mark.slow
def test_plain_loop_example_warns_ahead_of_grokking(tmp_path, capsys):
    monitor = main(["--epochs", "120", "--log-dir", str(tmp_path)])
    crossed = monitor.first_epoch_reaching(0.5)
    assert crossed is not None and 70 <= crossed <= 100
    (alarm,) = [t for t in monitor.transitions if t.kind == "alignment_ratio"]
    assert alarm.group == "layer2" and alarm.epoch < crossed
    printed = capsys.readouterr().out
    assert "eNTK monitor summary" in printed and ": an early warning" in printed

    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert {"entk/num_cliffs", "entk/sentinel/heldout_alignment", "entk/transitions"} <= set(
        scalars
    )
    readings = events.Scalars("entk/sentinel/heldout_alignment")
    assert len(readings) == len(monitor.readings) >= 20
    assert len(events.Scalars("entk/num_cliffs")) == len(monitor.history) >= 2
    assert "entk/spectrum_evolution" in events.Tags()["images"]  # the summary figure, always
    assert (tmp_path / "entk_summary.png").stat().st_size > 20_000
    assert monitor.summary_path == tmp_path / "entk_summary.png"
