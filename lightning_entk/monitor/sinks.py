"""Where the monitor writes: scalars, texts, figures, histograms and a chart layout.

A sink is any object with the methods of :class:`Sink`. :func:`as_sink` makes one of what a
training loop has at hand:

    ``None`` or a ``dict``           :class:`DictSink`: scalars kept in memory (in the dict)
    a ``SummaryWriter``              :class:`TensorBoardSink`: everything, images included
    a logger with ``log_metrics``    :class:`LoggerSink`: scalars; with a TensorBoard
    (or a list of them)              ``experiment`` (Lightning's ``TensorBoardLogger``),
                                     images and texts too

No Lightning import here: loggers are recognised by what they do.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Protocol

import numpy as np
from matplotlib.figure import Figure

from lightning_entk import keys
from lightning_entk.plots import figure_to_array


class Sink(Protocol):
    """What the monitor writes to. ``images``: whether figures are wanted (drawing them takes
    time); ``log_dir``: where the end-of-fit summary figure is saved (``None``: not saved).
    ``scalars(..., local=True)``: values that only this process holds (rank 0's timings), not
    every process of a run."""

    images: bool
    log_dir: str | None

    def scalars(self, values: Mapping[str, float], step: int, local: bool = False) -> None: ...

    def text(self, tag: str, text: str, step: int) -> None: ...

    def figures(self, figures: Mapping[str, Figure | np.ndarray], step: int) -> None:
        """Figures, or images already drawn (``(H, W, 3)`` uint8), by tag."""

    def histogram(self, tag: str, values: np.ndarray, step: int) -> None: ...

    def layout(self, layout: dict) -> None: ...


class DictSink:
    """Scalars and texts in memory: ``target[key]`` is a list of ``(step, value)``.

    Example:
        >>> sink = DictSink()
        >>> sink.scalars({"entk/num_cliffs": 2.0}, step=10)
        >>> sink.target
        {'entk/num_cliffs': [(10, 2.0)]}
    """

    images = False
    log_dir = None

    def __init__(self, target: dict | None = None) -> None:
        self.target = {} if target is None else target

    def scalars(self, values: Mapping[str, float], step: int, local: bool = False) -> None:
        for key, value in values.items():
            self.target.setdefault(key, []).append((step, float(value)))

    def text(self, tag: str, text: str, step: int) -> None:
        self.target.setdefault(tag, []).append((step, text))

    def figures(self, figures: Mapping[str, Figure], step: int) -> None:
        pass

    def histogram(self, tag: str, values: np.ndarray, step: int) -> None:
        pass

    def layout(self, layout: dict) -> None:
        pass


class TensorBoardSink:
    """Everything to a TensorBoard ``SummaryWriter`` (``torch.utils.tensorboard``, or the
    ``experiment`` of Lightning's ``TensorBoardLogger``)."""

    def __init__(self, writer, images: bool = True) -> None:
        self.writer = writer
        self.images = images
        self.log_dir = getattr(writer, "log_dir", None) or getattr(writer, "logdir", None)

    def scalars(self, values: Mapping[str, float], step: int, local: bool = False) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def text(self, tag: str, text: str, step: int) -> None:
        self.writer.add_text(tag, text, step)

    def figures(self, figures: Mapping[str, Figure | np.ndarray], step: int) -> None:
        for tag, figure in figures.items():
            image = figure if isinstance(figure, np.ndarray) else figure_to_array(figure)
            self.writer.add_image(tag, image, step, dataformats="HWC")

    def histogram(self, tag: str, values: np.ndarray, step: int) -> None:
        self.writer.add_histogram(tag, values, step)

    def layout(self, layout: dict) -> None:
        self.writer.add_custom_scalars(layout)


class LoggerSink:
    """Scalars to loggers with ``log_metrics(metrics, step)`` (Lightning's loggers: one or a
    list); the rest to the first whose ``experiment`` is a TensorBoard writer."""

    def __init__(self, loggers, images: bool = True) -> None:
        self.loggers = list(loggers) if isinstance(loggers, list | tuple) else [loggers]
        board = next((lg for lg in self.loggers if _is_tensorboard_logger(lg)), None)
        writer = None if board is None else getattr(board, "experiment", None)
        self.tensorboard = None if writer is None else TensorBoardSink(writer, images)
        self.images = self.tensorboard is not None and images
        directories = (getattr(logger, "log_dir", None) for logger in self.loggers)
        self.log_dir = next((d for d in directories if d), None)

    def scalars(self, values: Mapping[str, float], step: int, local: bool = False) -> None:
        for logger in self.loggers:
            logger.log_metrics(dict(values), step=step)

    def text(self, tag: str, text: str, step: int) -> None:
        if self.tensorboard is not None:
            self.tensorboard.text(tag, text, step)

    def figures(self, figures: Mapping[str, Figure], step: int) -> None:
        if self.tensorboard is not None:
            self.tensorboard.figures(figures, step)

    def histogram(self, tag: str, values: np.ndarray, step: int) -> None:
        if self.tensorboard is not None:
            self.tensorboard.histogram(tag, values, step)

    def layout(self, layout: dict) -> None:
        if self.tensorboard is not None:
            self.tensorboard.layout(layout)


def _is_tensorboard_logger(logger) -> bool:
    return any(cls.__name__ == "TensorBoardLogger" for cls in type(logger).__mro__)


def as_sink(target: object = None, images: bool = True) -> Sink:
    """A sink for ``target``: ``None`` or a dict (:class:`DictSink`), a ``SummaryWriter``
    (:class:`TensorBoardSink`), loggers with ``log_metrics`` (:class:`LoggerSink`), or a
    sink already.

    Raises:
        ValueError: for anything else.
    """
    if target is None or isinstance(target, dict):
        return DictSink(target)
    if hasattr(target, "add_scalar") and hasattr(target, "add_image"):
        return TensorBoardSink(target, images)
    if hasattr(target, "log_metrics") or (
        isinstance(target, list | tuple) and all(hasattr(t, "log_metrics") for t in target)
    ):
        return LoggerSink(target, images)
    if all(hasattr(target, name) for name in ("scalars", "text", "figures", "histogram")):
        return target
    raise ValueError(
        "`sink` must be None, a dict, a torch.utils.tensorboard SummaryWriter, a logger with "
        f"`log_metrics` or an object with the methods of Sink, got {type(target).__name__}."
    )


def tensorboard_layout(accuracy_key: str | None, per_group: bool = False) -> dict:
    """TensorBoard's Custom Scalars layout of the monitor's charts: the network's accuracy
    (``accuracy_key``), eNTK kernel regression and the readout's held-out alignment in one
    chart, then the cliffs, the top eigenvalues, and alignment and velocity; with
    ``per_group``, the same signals of every parameter group, one line per group. Tags are
    regular expressions (matched from the start of a tag, as TensorBoard does)."""

    def exact(key: str) -> str:
        return f"{re.escape(key)}$"

    def each_group(key: str) -> str:
        return rf"entk/[^/]+/{re.escape(key.removeprefix(keys.PREFIX))}$"

    accuracy = [exact(accuracy_key)] if accuracy_key else []
    groups = {
        "eNTK per parameter group": {
            "accuracy: network and each group's kernel regression": [
                "Multiline",
                [*accuracy, each_group(keys.KERNEL_REGRESSION_ACC)],
            ],
            "kernel-target alignment of each group, on all and on held-out probe points": [
                "Multiline",
                [each_group(keys.KERNEL_TARGET_ALIGNMENT), each_group(keys.HELDOUT_ALIGNMENT)],
            ],
            "top eigenvalue of each group": ["Multiline", [each_group(keys.eigenvalue_top(1))]],
            "cliffs found in each group": ["Multiline", [each_group(keys.NUM_CLIFFS)]],
        }
    }
    return {
        "eNTK monitor": {
            "accuracy: network, eNTK kernel regression, readout's held-out alignment": [
                "Multiline",
                [*accuracy, exact(keys.KERNEL_REGRESSION_ACC), exact(keys.SENTINEL_ALIGNMENT)],
            ],
            "cliffs found and phase-transition signals so far": [
                "Multiline",
                [exact(keys.NUM_CLIFFS), exact(keys.TRANSITIONS)],
            ],
            "cliff ranks (eigenvalues above each cliff)": ["Multiline", [r"entk/cliff_rank/\d+$"]],
            "top eigenvalues": ["Multiline", [r"entk/eigenvalue/top\d+$"]],
            "kernel-target alignment (all and held-out probe points) and kernel velocity": [
                "Multiline",
                [
                    exact(keys.KERNEL_TARGET_ALIGNMENT),
                    exact(keys.HELDOUT_ALIGNMENT),
                    exact(keys.KERNEL_VELOCITY),
                ],
            ],
            "monitor's seconds: sentinel readings and full evaluations": [
                "Multiline",
                [exact(keys.SENTINEL_SECONDS), exact(keys.SECONDS)],
            ],
        },
        **(groups if per_group else {}),
    }
