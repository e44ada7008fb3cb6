"""Figures of eNTK spectra, their cliffs and their evolution, for files and TensorBoard.

Every function returns a ``matplotlib.figure.Figure`` built without ``pyplot``, so no global
figure state is created or leaked (safe in training loops and worker processes); render it with
:func:`figure_to_array` for ``SummaryWriter.add_image(tag, array, step, dataformats="HWC")`` or
save it with ``fig.savefig(path)``.

Cliffs are duck-typed: anything with ``.rank`` (eigenvalues above the cliff, so the cliff sits
between eigenvalues ``rank`` and ``rank + 1``, 1-based) and ``.drop`` (the fall in log10 units)
will do, e.g. :class:`lightning_entk.cliffs.Cliff`. Transitions need ``.epoch`` and ``.kind``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
from matplotlib import colormaps, patheffects
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter, NullLocator
from matplotlib.transforms import blended_transform_factory

from lightning_entk import keys
from lightning_entk.alignment import feature_alignment
from lightning_entk.checks import check_int

FIGSIZE = (8.0, 5.0)  # inches; at DPI a 800 x 500 image, legible in TensorBoard's image panel
DPI = 100
CLIFF_COLOR = "tab:red"
COLOR_PERCENTILES = (1, 99)  # of the log10 eigenvalues shown: the evolution's colour range
LOG_INDEX_FROM = 300  # more eigenvalues than this: a log index axis, so the top ones stay apart
CELL_SHARE = 0.01  # an evaluation's column spans at most this share of the epochs each side
_OUTLINE = [patheffects.withStroke(linewidth=2.5, foreground="white")]
_TRANSITION_STYLES = ("--", "-.", ":", (0, (5, 1, 1, 1)))


def figure_to_array(fig: Figure) -> np.ndarray:
    """Render ``fig`` to an ``(H, W, 3)`` uint8 RGB array (Agg), H x W = its size in pixels.

    Example:
        >>> figure_to_array(Figure(figsize=(2, 1), dpi=50)).shape
        (50, 100, 3)
    """
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.array(canvas.buffer_rgba())[..., :3]


def _fixed_layout_figure(bottom: float = 0.11, right: float = 0.97) -> Figure:
    """A figure of ``FIGSIZE`` with margins set once for one axes and its labels: a figure drawn
    at every evaluation skips the layout engine, which costs more than the drawing itself."""
    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    fig.subplots_adjust(left=0.1, right=right, top=0.92, bottom=bottom)
    return fig


def _as_float_array(name: str, value, ndim: int) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().to("cpu", torch.float64).numpy()
    try:
        array = np.array(value, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"`{name}` must be numeric, got {type(value).__name__}.") from err
    if array.ndim != ndim:
        raise ValueError(f"`{name}` must be {ndim}-D, got shape {array.shape}.")
    return array


def _check_max_index(max_index: int | None) -> None:
    check_int("max_index", max_index, optional=True, words="a positive int")


def _fall_label(cliff) -> str:
    factor = 10 ** float(cliff.drop)
    return f"rank {int(cliff.rank)} (×{factor:.{1 if factor < 100 else 0}f})"


def plot_spectrum(
    eigenvalues,
    cliffs: Iterable = (),
    *,
    title: str | None = None,
    max_index: int | None = None,
) -> Figure:
    """Eigenvalues against their 1-based index on a log scale, cliffs marked.

    Each cliff is a dashed vertical line between eigenvalues ``rank`` and ``rank + 1``, labelled
    ``"rank 57 (×2.1)"`` with the fall factor ``10 ** drop``. The index axis turns logarithmic
    above ``LOG_INDEX_FROM`` eigenvalues. Eigenvalues that are not positive (round-off of a
    singular kernel) or NaN cannot sit on a log axis and are left out.

    Args:
        eigenvalues: ``(k,)`` descending.
        cliffs: objects with ``.rank`` and ``.drop``.
        title: the axes title; ``"eNTK spectrum"`` when ``None``.
        max_index: show eigenvalues ``1..max_index`` only (and the cliffs among them).

    Raises:
        ValueError: if ``eigenvalues`` is not 1-D with a positive entry, or ``max_index`` is not
            a positive int.
    """
    values = _as_float_array("eigenvalues", eigenvalues, 1)
    _check_max_index(max_index)
    values = values[:max_index]
    index = np.arange(1, len(values) + 1)
    positive = np.isfinite(values) & (values > 0)
    if not positive.any():
        raise ValueError(
            f"`eigenvalues` must hold at least one positive value to plot on a log scale, got "
            f"{len(values)} values, none positive."
        )
    fig = _fixed_layout_figure()
    ax = fig.add_subplot()
    ax.plot(
        index[positive],
        values[positive],
        color="tab:blue",
        marker=".",
        markersize=3,
        linewidth=1.2,
        label="eigenvalue",
    )
    ax.set_yscale("log")
    if len(values) > LOG_INDEX_FROM:
        ax.set_xscale("log")
        ax.set_xlim(0.8, len(values) * 1.25)
    else:
        ax.set_xlim(0.5, len(values) + 0.5)
    ax.set_xlabel("eigenvalue index" + (" (log scale)" if len(values) > LOG_INDEX_FROM else ""))
    ax.set_ylabel("eigenvalue (log scale)")
    ax.set_title("eNTK spectrum" if title is None else title)
    ax.grid(True, which="major", alpha=0.3)
    ax.minorticks_off()  # a tick per decade reads well; dozens more cost most of the drawing

    ax.set_ylim(*ax.get_ylim())  # freeze the autoscaled limits: labels are placed against them
    on_axis = sorted(
        (c for c in cliffs if 1 <= int(c.rank) < len(values)), key=lambda c: int(c.rank)
    )
    for i, cliff in enumerate(on_axis):
        x = int(cliff.rank) + 0.5
        ax.axvline(
            x,
            color=CLIFF_COLOR,
            linestyle="--",
            linewidth=1.2,
            label="cliff (fall factor)" if i == 0 else None,
        )
        _label_cliff(ax, x, values[int(cliff.rank) - 1], values[int(cliff.rank)], cliff)
    ax.legend(loc="best")
    return fig


def _label_cliff(ax: Axes, x: float, before: float, after: float, cliff) -> None:
    """Write the cliff's label along its line where a descending curve leaves room: above the
    eigenvalue before the cliff on the right of the line, or below the one after it on the
    left, whichever is the longer stretch of empty axes. A label longer than that stretch is
    pushed back inside the axes rather than into the title or the axis labels."""
    label, fontsize = _fall_label(cliff), 10
    low, high = np.log10(ax.get_ylim())
    # The label's length as a fraction of the axes height (~0.6 em per character, axes ~80%
    # of the figure's height).
    length = 0.6 * fontsize * len(label) / (0.8 * ax.figure.get_figheight() * 72) + 0.02

    def fraction(value: float) -> float | None:
        if not np.isfinite(value) or value <= 0:
            return None
        return float(np.clip((np.log10(value) - low) / (high - low), 0.0, 1.0))

    above, below = fraction(before), fraction(after)
    room_above = 1.0 - above if above is not None else 0.0
    room_below = below if below is not None else 1.0
    if room_above > room_below:
        y, offset, ha, va = min(above + 0.02, 1.0 - length), 3, "left", "bottom"
    else:
        y, offset, ha, va = max(room_below - 0.02, length), -3, "right", "top"
    ax.annotate(
        label,
        xy=(x, y),
        xycoords=blended_transform_factory(ax.transData, ax.transAxes),
        xytext=(offset, 0),
        textcoords="offset points",
        rotation=90,
        ha=ha,
        va=va,
        color=CLIFF_COLOR,
        fontsize=fontsize,
        path_effects=_OUTLINE,
    )


def _cells(centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each evaluation's column at its true epoch: edges around each centre, at most
    ``CELL_SHARE`` of the span on each side (and never past the midpoint to a neighbour), with
    empty columns between cells that do not touch. Returns the edges (M + 1,) of M columns and,
    per column, the evaluation it draws (-1: empty)."""
    if len(centres) == 1:
        return np.array([centres[0] - 0.5, centres[0] + 0.5]), np.array([0])
    half = max(CELL_SHARE * (centres[-1] - centres[0]), 0.5)
    gaps = np.diff(centres) / 2
    left = np.minimum(np.concatenate([[half], gaps]), half)
    right = np.minimum(np.concatenate([gaps, [half]]), half)
    edges, owner = [centres[0] - left[0]], []
    for t, centre in enumerate(centres):
        if centre - left[t] > edges[-1] + 1e-9:  # a gap before this cell
            edges.append(centre - left[t])
            owner.append(-1)
        edges.append(centre + right[t])
        owner.append(t)
    return np.array(edges), np.array(owner)


def _accuracy_series(
    accuracy, accuracy_label: str, epochs: np.ndarray
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each curve as ``(x, y)``: a ``(T,)`` array is at the evaluations' ``epochs``; a pair
    ``(x, y)`` has its own epochs (a metric read at every epoch)."""
    if accuracy is None:
        return {}
    series = accuracy if isinstance(accuracy, Mapping) else {accuracy_label: accuracy}
    result = {}
    for label, values in series.items():
        if isinstance(values, tuple) and len(values) == 2:
            x = _as_float_array(f"accuracy[{label!r}][0]", values[0], 1)
            y = _as_float_array(f"accuracy[{label!r}][1]", values[1], 1)
            if len(x) != len(y):
                raise ValueError(
                    f"`accuracy[{label!r}]` as (x, y) needs equal lengths, got {len(x)}, {len(y)}."
                )
        else:
            x, y = epochs, _as_float_array(f"accuracy[{label!r}]", values, 1)
            if len(y) != len(epochs):
                raise ValueError(
                    f"`accuracy[{label!r}]` must have one value per evaluation ({len(epochs)}), "
                    f"got {len(y)}."
                )
        result[str(label)] = (x, y)
    return result


def plot_spectrum_evolution(
    epochs,
    eigenvalues,
    cliffs_per_eval: Sequence[Iterable],
    *,
    accuracy=None,
    accuracy_label: str = "val_acc",
    transitions: Iterable = (),
    max_index: int | None = None,
    levels: Mapping[str, float] | None = None,
    forecasts: Sequence | None = None,
    actual: float | None = None,
    first_seen: Mapping[int, float] | None = None,
) -> Figure:
    """The spectrum over training as a heatmap, cliffs marked, accuracy and transitions below.

    Top: ``log10`` of eigenvalue ``i`` over the largest of its evaluation (index 1 at the top;
    a log index axis above ``LOG_INDEX_FROM``) in a column at each evaluation's true epoch (at
    most ``CELL_SHARE`` of the epochs wide on each side; light grey between evaluations); NaN
    padding and non-positive values show as grey. Each cliff is a segment across its column at
    ``rank + 0.5``, between the eigenvalues it separates; ``first_seen`` (rank -> epoch) marks
    where each new cliff was first seen.
    Bottom (when ``accuracy`` is given): accuracy curves on ``[0, 1]`` against the same epochs.
    Transitions (e.g. early warnings) are vertical lines across both panels, listed in a legend.

    Args:
        epochs: ``(T,)`` the epoch of each evaluation, non-decreasing.
        eigenvalues: ``(T, k)`` top-k eigenvalues per evaluation, descending, NaN-padded.
        cliffs_per_eval: T lists of objects with ``.rank`` (and ``.drop``).
        accuracy: ``(T,)`` values, or a dict ``label -> (T,)`` or ``label -> (x, y)`` (a
            series with its own epochs, e.g. read at every epoch); NaN where not measured.
        accuracy_label: the legend label of a single accuracy array.
        transitions: objects with ``.epoch`` and ``.kind``.
        max_index: show eigenvalues ``1..max_index`` only. About twice the deepest cliff's rank
            (e.g. 250 for the modular MLP's 841) gives a linear index axis on which the
            plateaus between cliffs are wide bands.
        levels: label -> value of horizontal reference lines below (a detector's level).
        forecasts: objects with ``.made_at``, ``.epoch``, ``.low``, ``.high`` (``None`` when
            nothing is forecast): a third panel of the forecast epoch against the epoch it was
            made at, with ``actual`` (the epoch it came true) when known.

    Raises:
        ValueError: if the shapes do not agree (``epochs`` (T,), ``eigenvalues`` (T, k),
            ``cliffs_per_eval`` and each accuracy series of length T), ``epochs`` decreases,
            or ``max_index`` is not a positive int.
    """
    epochs_ = _as_float_array("epochs", epochs, 1)
    values = _as_float_array("eigenvalues", eigenvalues, 2)
    n_evals, k = values.shape
    if len(epochs_) != n_evals or n_evals == 0 or k == 0:
        raise ValueError(
            f"`eigenvalues` must be (T, k) with T = len(epochs) = {len(epochs_)} >= 1 rows and "
            f"k >= 1, got shape {values.shape}."
        )
    if np.any(np.diff(epochs_) < 0) or not np.isfinite(epochs_).all():
        raise ValueError(f"`epochs` must be finite and non-decreasing, got {epochs_.tolist()}.")
    cliffs_per_eval = [list(cliffs) for cliffs in cliffs_per_eval]
    if len(cliffs_per_eval) != n_evals:
        raise ValueError(
            f"`cliffs_per_eval` must hold one list of cliffs per evaluation ({n_evals}), got "
            f"{len(cliffs_per_eval)}."
        )
    curves = _accuracy_series(accuracy, accuracy_label, epochs_)
    transitions = list(transitions)
    _check_max_index(max_index)
    values = values[:, :max_index]
    k = values.shape[1]

    heights = [2.4] + ([1.2] if curves else []) + ([1.0] if forecasts else [])
    fig = Figure(figsize=(FIGSIZE[0], FIGSIZE[1] + (1.6 if forecasts else 0)), dpi=DPI,
                 layout="constrained")  # fmt: skip
    grid = fig.add_gridspec(len(heights), 2, height_ratios=heights, width_ratios=[1, 0.025])
    ax = fig.add_subplot(grid[0, 0])
    log_values = np.full(values.shape, np.nan)
    positive = np.isfinite(values) & (values > 0)
    log_values[positive] = np.log10(values[positive])
    # Relative to each evaluation's largest: cliffs are ratios, and the kernel's overall scale
    # can grow by decades over training (the modular transformer's), which would otherwise take
    # the whole colour range.
    largest = np.max(np.where(np.isfinite(log_values), log_values, -np.inf), axis=1)
    log_values -= np.where(np.isfinite(largest), largest, 0.0)[:, None]
    # The colour range: percentiles, not extremes, of the eigenvalues down to twice the deepest
    # cliff. An outlying top mode or a long round-off tail would otherwise stretch the scale
    # until plateaus a factor 2 apart (the modular MLP's cliffs) share one colour.
    deepest = max((int(c.rank) for cliffs in cliffs_per_eval for c in cliffs), default=0)
    rows = slice(0, 2 * deepest) if 0 < 2 * deepest < k else slice(None)
    shown = log_values[:, rows][np.isfinite(log_values[:, rows])]
    vmin, vmax = np.percentile(shown, COLOR_PERCENTILES) if shown.size else (0.0, 1.0)
    edges, owner = _cells(epochs_)
    columns = np.full((k, len(owner)), np.nan)
    columns[:, owner >= 0] = log_values[owner[owner >= 0]].T
    mesh = ax.pcolormesh(
        edges,
        np.arange(k + 1) + 0.5,
        np.ma.masked_invalid(columns),
        cmap=colormaps["viridis"].with_extremes(bad="0.85"),
        vmin=vmin,
        vmax=max(vmax, vmin + 1e-6),
        shading="flat",
        rasterized=True,
    )
    if k > LOG_INDEX_FROM:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.yaxis.set_minor_locator(NullLocator())  # a tick per decade reads well, and is cheap
    ax.set_ylim(k + 0.5, 0.5)
    ax.set_ylabel("eigenvalue index" + (" (log scale)" if k > LOG_INDEX_FROM else ""))
    ax.set_title(
        f"eNTK spectrum at the {n_evals} full evaluations (columns at their epochs; grey: none)"
    )
    ax.set_facecolor("0.93")
    colorbar = fig.colorbar(mesh, cax=fig.add_subplot(grid[0, 1]), extend="both")
    colorbar.set_label("log10 (eigenvalue / largest)")

    # One segment per evaluation across its cell: a cliff that persists reads as a line.
    cell = {int(t): (edges[i], edges[i + 1]) for i, t in enumerate(owner) if t >= 0}
    segments = [
        (int(c.rank) + 0.5, *cell[t])
        for t, cliffs in enumerate(cliffs_per_eval)
        for c in cliffs
        if 1 <= int(c.rank) < k
    ]
    if segments:
        ax.hlines(
            *zip(*segments, strict=True),
            color=CLIFF_COLOR,
            linewidth=2.5,
            label="cliff (between rank and rank + 1)",
            zorder=3,
        )

    for rank, epoch in (first_seen or {}).items():
        if 1 <= int(rank) < k:
            ax.annotate(
                f"rank {rank}: new, first seen at epoch {epoch:g}",
                (float(epoch), int(rank) + 0.5),
                xytext=(6, 8),
                textcoords="offset points",
                color=CLIFF_COLOR,
                fontsize=9,
                path_effects=_OUTLINE,
                arrowprops={"arrowstyle": "->", "color": CLIFF_COLOR},
            )

    bottom = fig.add_subplot(grid[1, 0], sharex=ax) if curves else ax
    panels = [ax, *([bottom] if curves else [])]
    if forecasts:
        panels.append(_forecast_panel(fig.add_subplot(grid[len(heights) - 1, 0], sharex=ax),
                                      forecasts, actual))  # fmt: skip
    for panel in panels[:-1]:
        panel.tick_params(labelbottom=False)
    if curves:
        for label, (x, y) in curves.items():
            finite = np.isfinite(y) & np.isfinite(x)
            # A series read at every epoch is a line; one of a few full evaluations, markers
            # (a line between sparse points would draw a trend nobody measured).
            style = {"linestyle": "-"} if finite.sum() > 12 else {"linestyle": "", "marker": "o"}
            bottom.plot(x[finite], y[finite], markersize=4, label=label, **style)
        for label, level in (levels or {}).items():
            bottom.axhline(level, color="0.4", linestyle=":", linewidth=1.2, label=label)
        lows = [np.nanmin(y) for _, y in curves.values() if np.isfinite(y).any()]
        bottom.set_ylim(min([0.0, *lows]) - 0.03, 1.03)
        bottom.set_ylabel("accuracy, alignment")
        bottom.grid(True, alpha=0.3)
    panels[-1].set_xlabel("epoch")
    for i, transition in enumerate(transitions):
        style = _TRANSITION_STYLES[i % len(_TRANSITION_STYLES)]
        for axes in panels:
            axes.axvline(
                float(transition.epoch),
                color="black",
                linestyle=style,
                linewidth=1.3,
                label=f"{transition.kind} (epoch {transition.epoch:g})" if axes is ax else None,
            )
    # Above the heatmap, where it hides neither a cliff nor a band.
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        fig.legend(
            handles,
            labels,
            loc="outside upper center",
            ncols=math.ceil(len(handles) / math.ceil(len(handles) / 3)),  # balanced rows
            frameon=False,
            fontsize=9,
        )
    if curves:  # below the figure, where it hides no curve
        handles, labels = bottom.get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncols=3, frameon=False, fontsize=8)
    return fig


def plot_alignment(
    matrix,
    *,
    row_label: str = "eigenvector index",
    col_label: str = "feature index",
    col_labels: Sequence[str] | None = None,
    title: str | None = None,
    cliffs: Iterable = (),
) -> Figure:
    """Heatmap of an ``(k, F)`` |cosine| matrix (e.g. :func:`~lightning_entk.feature_alignment`).

    Rows are eigenvectors 1..k from the top, columns features; colours are fixed to ``[0, 1]``
    (viridis) so that figures of different epochs compare. Each cliff is a horizontal line
    between rows ``rank`` and ``rank + 1``, labelled ``"rank 57"``.

    Args:
        matrix: ``(k, F)`` values in [0, 1].
        row_label: the y-axis label.
        col_label: the x-axis label.
        col_labels: F feature names for the x ticks; 1-based feature numbers when ``None``.
        title: the axes title; ``"eigenvector-feature alignment"`` when ``None``.
        cliffs: objects with ``.rank``.

    Raises:
        ValueError: if ``matrix`` is not 2-D with values in [0, 1], or ``col_labels`` does not
            have F entries.
    """
    values = _as_float_array("matrix", matrix, 2)
    k, n_features = values.shape
    if values.size == 0:
        raise ValueError(f"`matrix` must not be empty, got shape {values.shape}.")
    finite = values[np.isfinite(values)]
    if finite.size and (finite.min() < -1e-9 or finite.max() > 1 + 1e-9):
        raise ValueError(
            f"`matrix` must hold |cos| values in [0, 1], got range [{finite.min():.3g}, "
            f"{finite.max():.3g}]; pass np.abs of signed cosines."
        )
    if col_labels is not None and len(col_labels) != n_features:
        raise ValueError(
            f"`col_labels` must name each of the {n_features} columns, got {len(col_labels)}."
        )
    fig = _fixed_layout_figure(bottom=0.17 if col_labels is not None else 0.11, right=0.94)
    ax = fig.add_subplot()
    image = ax.imshow(
        values,
        cmap="viridis",
        vmin=0.0,
        vmax=1.0,
        aspect="auto",
        interpolation="nearest",
        extent=(0.5, n_features + 0.5, k + 0.5, 0.5),
    )
    fig.colorbar(image, ax=ax, pad=0.1, fraction=0.05).set_label("|cos|")
    if col_labels is not None:
        step = max(1, int(np.ceil(n_features / 40)))
        ticks = np.arange(1, n_features + 1)[::step]
        ax.set_xticks(ticks, [str(col_labels[t - 1]) for t in ticks], rotation=90, fontsize=8)
    ax.set_xlabel(col_label)
    ax.set_ylabel(row_label)
    ax.set_title("eigenvector-feature alignment" if title is None else title)
    text_at = blended_transform_factory(ax.transAxes, ax.transData)
    for cliff in cliffs:
        if not 1 <= int(cliff.rank) < k:
            continue
        y = int(cliff.rank) + 0.5
        ax.axhline(y, color=CLIFF_COLOR, linestyle="--", linewidth=1.5)
        # In the margin: inside, the label would hide cells of the matrix.
        ax.text(
            1.01,
            y,
            f"rank {int(cliff.rank)}",
            transform=text_at,
            ha="left",
            va="center",
            color=CLIFF_COLOR,
            fontsize=9,
            clip_on=False,
        )
    return fig


def _forecast_panel(ax: Axes, forecasts: Sequence, actual: float | None) -> Axes:
    """The forecast epoch (with its interval) against the epoch each forecast was made at."""
    made = np.array([f.made_at for f in forecasts], dtype=float)
    epoch, low, high = (
        np.array([np.nan if getattr(f, k) is None else getattr(f, k) for f in forecasts], float)
        for k in ("epoch", "low", "high")
    )
    ax.fill_between(made, low, high, color="tab:purple", alpha=0.25, linewidth=0,
                    label="interval")  # fmt: skip
    ax.plot(made, epoch, color="tab:purple", marker=".", markersize=3, label="forecast")
    if actual is not None:
        ax.axhline(actual, color="black", linestyle="--", linewidth=1, label="actual")
    shown = np.concatenate([epoch[np.isfinite(epoch)], [actual] if actual is not None else []])
    if shown.size:
        ax.set_ylim(0, 1.15 * shown.max())
    ax.set_ylabel("forecast epoch of\nval >= 0.5", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=8, framealpha=0.85)
    return ax


def plot_history(
    history: Sequence,
    accuracy_key: str | None,
    transitions: Iterable = (),
    readings: Sequence = (),
    watched: Mapping[int, float] | None = None,
    ratio_level: float | None = None,
    min_train_alignment: float = 0.0,
    forecasts: Sequence = (),
    actual: float | None = None,
    first_seen: Mapping[int, float] | None = None,
) -> Figure:
    """:func:`plot_spectrum_evolution` of a monitor's full evaluations (records with
    ``.epoch``, ``.eigenvalues``, ``.cliffs`` and ``.metrics``); below, the network's
    ``accuracy_key`` (at every epoch of ``watched``, epoch -> value, else at the
    evaluations), the sentinel's readings (``readings``): the readout's held-out alignment and
    its ratio to the training alignment (where that is at least ``min_train_alignment``), with
    the detector's ``ratio_level``, and eNTK kernel regression at the full evaluations; with
    ``forecasts``, how the forecast of the epoch of val_acc 0.5 moved (``actual``: when it came);
    ``first_seen``: new cliff rank -> the epoch it was first seen, marked."""
    k = max(len(r.eigenvalues) for r in history)
    values = np.full((len(history), k), np.nan)
    for i, r in enumerate(history):
        values[i, : len(r.eigenvalues)] = r.eigenvalues
    curves = {}
    if accuracy_key and watched:
        epochs = sorted(watched)
        curves[accuracy_key] = (np.array(epochs, float), np.array([watched[e] for e in epochs]))
    held = [(r.epoch, r.metrics.get(keys.SENTINEL_ALIGNMENT, np.nan)) for r in readings]
    ratio = [
        (r.epoch, r.metrics.get(keys.SENTINEL_RATIO, np.nan))
        for r in readings
        if r.metrics.get(keys.SENTINEL_TRAIN_ALIGNMENT, -np.inf) >= min_train_alignment
    ]
    for label, series in (
        ("readout's held-out alignment (sentinel)", held),
        ("held-out / training alignment (sentinel)", ratio),
    ):
        if series:
            x, y = (np.array(v, dtype=float) for v in zip(*series, strict=True))
            curves[label] = (x, y)
    for key in (None if watched else accuracy_key, keys.KERNEL_REGRESSION_ACC):
        series = np.array([r.metrics.get(key, np.nan) for r in history], dtype=float)
        if key and not np.isnan(series).all():
            label = "eNTK kernel regression" if key == keys.KERNEL_REGRESSION_ACC else key
            curves[label] = series
    levels = {} if ratio_level is None or not ratio else {"alignment_ratio level": ratio_level}
    return plot_spectrum_evolution(
        [r.epoch for r in history],
        values,
        [r.cliffs for r in history],
        accuracy=curves or None,
        transitions=transitions,
        levels=levels,
        forecasts=forecasts or None,
        actual=actual,
        first_seen=first_seen,
    )


def plot_evaluation(
    eigenvalues,
    cliffs: Sequence,
    epoch: int,
    eigenvectors: torch.Tensor | None = None,
    features: Mapping[str, torch.Tensor] | None = None,
    pairs: bool = False,
) -> dict[str, Figure]:
    """One evaluation's figures by TensorBoard tag: its spectrum with cliffs, and with
    ``eigenvectors`` ``(R, k)`` and ground-truth ``features`` (family -> ``(R, F)``), the
    |cosine| of the top eigenvectors (twice the deepest cliff's rank, at least 16) with each
    family (cos/sin pairs of one frequency combined when ``pairs``)."""
    figures = {
        keys.SPECTRUM_IMAGE: plot_spectrum(
            eigenvalues, cliffs, title=f"eNTK spectrum, epoch {epoch}"
        )
    }
    if not features or eigenvectors is None:
        return figures
    k = min(eigenvectors.shape[1], max(2 * max([c.rank for c in cliffs], default=0), 16))
    for family, values in features.items():
        figures[keys.alignment_image(family)] = plot_alignment(
            feature_alignment(eigenvectors[:, :k], values, pairs=pairs),
            title=f"|cos| of eigenvectors with features '{family}'",
            col_label="frequency (cos and sin combined)" if pairs else "feature index",
            cliffs=cliffs,
        )
    return figures
