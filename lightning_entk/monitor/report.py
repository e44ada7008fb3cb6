"""The monitor's report: its one-screen summary and its figure of the whole run, drawn from a
:class:`~lightning_entk.monitor.Monitor`'s results (read, never changed).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.image
import numpy as np
from matplotlib.figure import Figure

from lightning_entk import plots
from lightning_entk.schedule import WINDOW_CLOSES_AT

SUMMARY_FILENAME = "entk_summary.png"
LEVELS = (0.5, WINDOW_CLOSES_AT)  # of the watched metric, in the summary


def summary_text(monitor) -> str:
    """The monitor's one-screen summary (:meth:`~lightning_entk.monitor.Monitor.summary`)."""
    lines = ["", "=" * 72, "eNTK monitor summary", "=" * 72]
    trained, spent = monitor.training_seconds, monitor.clock.spent
    if trained > 0:
        share = monitor.monitor_seconds / trained
        lines.append(
            f"training {trained:.1f} s; monitor {monitor.monitor_seconds:.1f} s more "
            f"({share:.0%}): {len(monitor.readings)} sentinel readings "
            f"{spent.get('sentinel', 0.0):.1f} s, {len(monitor.history)} full evaluations "
            f"{spent.get('evaluation', 0.0):.1f} s, images and figures "
            f"{spent.get('images', 0.0):.1f} s"
        )
    key = monitor.accuracy_key
    crossed = {level: monitor.first_epoch_reaching(level) for level in LEVELS}
    for level, epoch in crossed.items():
        seen = f"epoch {epoch}" if epoch is not None else "not reached"
        lines.append(f"{key} >= {level:<5} first at {seen} (read at every epoch it was passed)")
    lines.append(f"phase-transition signals: {len(monitor.transitions) or 'none raised'}")
    for transition in monitor.transitions:
        lines.append(f"    {transition.describe()}")
        lines.append(f"        {describe_lead(transition.epoch, crossed[LEVELS[0]], key)}")
    lines += describe_forecasts(monitor.forecasts, monitor.transitions, crossed[LEVELS[0]], key)
    for label, record in (("start", monitor.history[:1]), ("end", monitor.history[-1:])):
        for r in record:
            ranks = ", ".join(f"{c.rank} (x{10**c.drop:.2f})" for c in r.cliffs) or "none"
            lines.append(f"cliffs at {label:<5} (epoch {r.epoch:>4}): ranks {ranks}")
    lines.append(f"full evaluations at epochs {', '.join(str(r.epoch) for r in monitor.history)}")
    for rank, epoch in monitor.new_cliffs().items():
        before = max((r.epoch for r in monitor.history if r.epoch < epoch), default=None)
        value = monitor.watched.get(epoch)
        at = "" if value is None else f", {key} {value:.2f}"
        lines.append(
            f"new cliff at rank {rank}: first logged at epoch {epoch}{at} (absent at the "
            f"evaluation before, epoch {before}); {key} >= {LEVELS[0]} at "
            f"{show_epoch(crossed[LEVELS[0]])}, >= {LEVELS[1]} at {show_epoch(crossed[LEVELS[1]])}"
        )
    lines += ["", f"summary figure:   {monitor.summary_path or 'not written'}", "=" * 72]
    return "\n".join(lines)


def history_figure(monitor) -> Figure:
    """The figure of :meth:`~lightning_entk.monitor.Monitor.summary_figure`."""
    detector = monitor.early_warning
    return plots.plot_history(
        monitor.history, monitor.accuracy_key, monitor.transitions, monitor.readings,
        monitor.watched,
        ratio_level=None if detector is None else detector.alignment_ratio,
        min_train_alignment=0.0 if detector is None else detector.min_train_alignment,
        forecasts=monitor.forecasts, actual=monitor.first_epoch_reaching(LEVELS[0]),
        first_seen=monitor.new_cliffs(),
    )  # fmt: skip


def save_image(image: np.ndarray, directory: str | Path) -> Path:
    """``image`` ``(H, W, 3)`` saved as ``entk_summary.png`` in ``directory``; its path."""
    path = Path(directory) / SUMMARY_FILENAME
    path.parent.mkdir(parents=True, exist_ok=True)
    matplotlib.image.imsave(path, image)
    return path


def describe_forecasts(forecasts, transitions, crossed: int | None, key: str | None) -> list[str]:
    """How the forecast of the epoch of ``key`` >= 0.5 moved: the first, at the first alarm,
    and the last, each with its error against ``crossed`` when known."""
    if not forecasts:
        return [f"forecast of {key} >= 0.5: none made (nothing seen coming)"]
    alarm = transitions[0].epoch if transitions else None
    chosen = {"first": forecasts[0], "last": forecasts[-1]}
    if alarm is not None:
        at_alarm = [f for f in forecasts if f.made_at <= alarm]
        if at_alarm:
            chosen["at the first alarm"] = at_alarm[-1]
    lines = [f"forecast of {key} >= 0.5 (actual: {'not reached' if crossed is None else crossed}):"]
    for label in ("first", "at the first alarm", "last"):
        if label in chosen:
            f = chosen[label]
            error = ""
            if crossed is not None and f.epoch is not None:
                error = f", {100 * (f.epoch - crossed) / crossed:+.0f}%"
            lines.append(f"    {label:<19}{f.describe()}{error}")
    return lines


def show_epoch(epoch: int | None) -> str:
    return "never" if epoch is None else f"epoch {epoch}"


def describe_lead(alarm_epoch: int, crossed: int | None, key: str | None) -> str:
    """How far ahead of the watched metric's crossing an alarm came.

    Example:
        >>> describe_lead(63, 85, "val_acc")
        '22 epochs before val_acc >= 0.5 (26% of the 85 epochs to it): an early warning'
    """
    if crossed is None:
        return f"{key} never reached 0.5 (so far)"
    lead = crossed - alarm_epoch
    if lead > 0:
        return (
            f"{lead} epochs before {key} >= 0.5 ({lead / crossed:.0%} of the {crossed} epochs "
            "to it): an early warning"
        )
    return f"{-lead} epochs after {key} >= 0.5: not ahead of it"
