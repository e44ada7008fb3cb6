from dataclasses import dataclass

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib.collections import LineCollection, QuadMesh
from matplotlib.figure import Figure

from lightning_entk.plots import (
    figure_to_array,
    plot_alignment,
    plot_spectrum,
    plot_spectrum_evolution,
)


@dataclass(frozen=True)
class Cliff:
    rank: int
    drop: float


@dataclass(frozen=True)
class Transition:
    epoch: int
    kind: str


def modular_spectrum(second_cliff=True, seed=0):
    """Like the modular MLP's 841 eigenvalues: one top mode, 56 at ~1e2, a 2x fall, 56 at ~50,
    then (a 1.5x fall and) a smooth decay."""
    rng = np.random.default_rng(seed)
    top, first, second = [5e3], 100 * (1 + 0.02 * rng.random(56)), 50 * (1 + 0.02 * rng.random(56))
    tail = (30 if second_cliff else 49) * np.exp(-np.arange(728) / 80)
    return np.sort(np.concatenate([top, first, second, tail]))[::-1].copy()


CLIFFS = [Cliff(57, np.log10(2.0)), Cliff(113, np.log10(1.5))]


def texts_of(fig):
    found = [t.get_text() for t in fig.texts]
    for ax in fig.axes:
        found += [t.get_text() for t in ax.texts]
        legend = ax.get_legend()
        found += [t.get_text() for t in legend.get_texts()] if legend else []
    for legend in fig.legends:
        found += [t.get_text() for t in legend.get_texts()]
    return found


def assert_renders(fig):
    assert isinstance(fig, Figure)
    image = figure_to_array(fig)
    assert image.shape == (500, 800, 3)
    assert image.dtype == np.uint8
    assert image.var() > 0


def evolution_data(n_evals=50, k=841):
    epochs = 5 * np.arange(n_evals)
    values = np.full((n_evals, k), np.nan)
    cliffs = []
    for t in range(n_evals):
        spectrum = modular_spectrum(second_cliff=t >= 20, seed=t)
        size = k if t >= 5 else min(k, 600)  # early evaluations kept fewer eigenvalues: NaN padding
        values[t, :size] = spectrum[:size]
        cliffs.append(CLIFFS if t >= 20 else CLIFFS[:1])
    accuracy = 1 / (1 + np.exp(-(np.arange(n_evals) - 20) / 1.5))
    return epochs, values, cliffs, accuracy


def test_figure_to_array_is_rgb_uint8_of_figure_size():
    fig = Figure(figsize=(3, 2), dpi=40)
    fig.add_subplot().plot([0, 1], [1, 0])
    image = figure_to_array(fig)
    assert image.shape == (80, 120, 3)
    assert image.dtype == np.uint8


def test_plot_spectrum_renders_with_cliff_annotations():
    fig = plot_spectrum(modular_spectrum(), CLIFFS, title="epoch 250")
    assert_renders(fig)
    texts = texts_of(fig)
    assert "rank 57 (×2.0)" in texts
    assert "rank 113 (×1.5)" in texts
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    assert ax.get_xscale() == "log"  # 841 eigenvalues
    assert ax.get_xlabel().startswith("eigenvalue index")
    assert ax.get_ylabel() == "eigenvalue (log scale)"
    assert ax.get_title() == "epoch 250"
    cliff_x = sorted(line.get_xdata()[0] for line in ax.lines if line.get_linestyle() == "--")
    assert cliff_x == [57.5, 113.5]


def test_plot_spectrum_max_index_drops_later_values_and_cliffs():
    fig = plot_spectrum(torch.from_numpy(modular_spectrum()), CLIFFS, max_index=100)
    assert_renders(fig)
    ax = fig.axes[0]
    assert ax.get_xscale() == "linear"
    assert len(ax.lines[0].get_xdata()) == 100
    texts = texts_of(fig)
    assert any("rank 57" in t for t in texts)
    assert not any("rank 113" in t for t in texts)


def test_plot_spectrum_leaves_out_non_positive_values():
    fig = plot_spectrum(np.array([3.0, 2.0, 1.0, 0.0, -1e-12, np.nan]), [Cliff(1, 0.2)])
    assert_renders(fig)
    np.testing.assert_array_equal(fig.axes[0].lines[0].get_xdata(), [1, 2, 3])


def test_plot_spectrum_invalid_inputs():
    with pytest.raises(ValueError, match="`eigenvalues` must be 1-D"):
        plot_spectrum(np.ones((3, 3)))
    with pytest.raises(ValueError, match="`eigenvalues` must hold at least one positive"):
        plot_spectrum(np.zeros(4))
    with pytest.raises(ValueError, match="`max_index` must be a positive int"):
        plot_spectrum(np.ones(4), max_index=0)


def test_plot_spectrum_evolution_renders_cliffs_accuracy_and_transitions():
    epochs, values, cliffs, accuracy = evolution_data()
    fig = plot_spectrum_evolution(
        epochs,
        values,
        cliffs,
        accuracy={"val_acc": accuracy, "entk/kernel_regression_acc": accuracy**0.5},
        transitions=[Transition(80, "kernel_regression_lead"), Transition(100, "new_cliff")],
    )
    assert_renders(fig)
    heatmap, bottom = fig.axes[0], fig.axes[2]  # the colorbar is axes 1
    assert heatmap.get_ylim() == (841.5, 0.5)  # index 1 at the top
    assert fig.axes[1].get_ylabel() == "log10 (eigenvalue / largest)"
    segments = [c for c in heatmap.collections if isinstance(c, LineCollection)]
    assert len(segments) == 1
    heights = {round(s[0][1], 1) for s in segments[0].get_segments()}
    assert heights == {57.5, 113.5}
    assert len(segments[0].get_segments()) == 50 + 30  # cliff 1 throughout, cliff 2 from t=20
    assert [line.get_label() for line in bottom.lines[:2]] == [
        "val_acc",
        "entk/kernel_regression_acc",
    ]
    assert bottom.get_ylim() == pytest.approx((-0.03, 1.03))
    assert bottom.get_xlabel() == "epoch"
    texts = texts_of(fig)
    assert "kernel_regression_lead (epoch 80)" in texts
    assert "new_cliff (epoch 100)" in texts


def test_plot_spectrum_evolution_shows_each_spectrum_relative_to_its_largest():
    """A kernel that grows by decades over training keeps the colours of its shape."""
    epochs, values, cliffs, _ = evolution_data(n_evals=6, k=100)
    values[3:] = values[0] * 1e4
    values[:3] = values[0]
    fig = plot_spectrum_evolution(epochs, values, cliffs)
    colours = evaluation_columns(fig, 100)
    assert colours.shape == (100, 6)
    np.testing.assert_allclose(colours[:, 3:], colours[:, :3], atol=1e-12)
    np.testing.assert_allclose(colours[0], 0.0, atol=1e-12)


def evaluation_columns(fig, k):
    """The heatmap's columns that draw an evaluation (the others: empty epochs between)."""
    mesh = next(c for c in fig.axes[0].collections if isinstance(c, QuadMesh))
    array = np.ma.asarray(mesh.get_array()).reshape(k, -1)
    return array[:, ~np.ma.getmaskarray(array).all(axis=0)]


def test_plot_spectrum_evolution_draws_each_evaluation_at_its_epoch():
    """Evaluations at 0, 10, 95, 100 and 300: each a narrow column centred on its epoch (at most
    1% of the 300 epochs on each side, never past the midpoint to a neighbour), empty between;
    a new cliff's first epoch is marked."""
    epochs = np.array([0, 10, 95, 100, 300])
    _, values, _, _ = evolution_data(n_evals=5, k=200)
    cliffs = [CLIFFS[:1]] * 3 + [CLIFFS] * 2
    fig = plot_spectrum_evolution(epochs, values, cliffs, first_seen={113: 100})
    mesh = next(c for c in fig.axes[0].collections if isinstance(c, QuadMesh))
    edges = np.unique(mesh.get_coordinates()[0, :, 0])
    array = np.ma.asarray(mesh.get_array()).reshape(200, -1)
    drawn = ~np.ma.getmaskarray(array).all(axis=0)
    cells = [(lo, hi) for lo, hi, d in zip(edges[:-1], edges[1:], drawn, strict=True) if d]
    assert len(cells) == 5
    for (lo, hi), epoch in zip(cells, epochs, strict=True):
        assert lo < epoch < hi and hi - lo <= 6 + 1e-9
    assert cells[2][1] <= 97.5 + 1e-9 and cells[3][0] >= 97.5 - 1e-9  # midpoint 95 | 100
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert any("rank 113" in t and "epoch 100" in t for t in texts), texts
    assert_renders(fig)


def test_plot_spectrum_evolution_handles_nan_padding():
    epochs, values, cliffs, _ = evolution_data(n_evals=8, k=200)
    values[:3, 150:] = np.nan
    values[3, -1] = 0.0  # a zero eigenvalue has no log either
    fig = plot_spectrum_evolution(torch.from_numpy(epochs), values, cliffs)
    assert_renders(fig)
    mesh = next(c for c in fig.axes[0].collections if isinstance(c, QuadMesh))
    assert np.ma.count_masked(evaluation_columns(fig, 200)) == 3 * 50 + 1
    assert np.isfinite(mesh.get_clim()).all()


def test_plot_spectrum_evolution_single_evaluation_and_max_index():
    _, values, cliffs, accuracy = evolution_data(n_evals=1)
    fig = plot_spectrum_evolution(
        [0], values, cliffs, accuracy=accuracy, accuracy_label="val_acc", max_index=150
    )
    assert_renders(fig)
    assert fig.axes[0].get_ylim() == (150.5, 0.5)
    assert fig.axes[0].get_yscale() == "linear"
    assert "val_acc" in texts_of(fig)


def test_plot_spectrum_evolution_invalid_shapes():
    epochs, values, cliffs, accuracy = evolution_data(n_evals=4, k=10)
    with pytest.raises(ValueError, match="`eigenvalues` must be 2-D"):
        plot_spectrum_evolution(epochs, values[0], cliffs)
    with pytest.raises(ValueError, match="`eigenvalues` must be \\(T, k\\) with T = len\\(epochs"):
        plot_spectrum_evolution(epochs[:3], values, cliffs)
    with pytest.raises(ValueError, match="`cliffs_per_eval` must hold one list"):
        plot_spectrum_evolution(epochs, values, cliffs[:3])
    with pytest.raises(ValueError, match="`accuracy\\['val_acc'\\]` must have one value"):
        plot_spectrum_evolution(epochs, values, cliffs, accuracy=accuracy[:2])
    with pytest.raises(ValueError, match="`epochs` must be finite and non-decreasing"):
        plot_spectrum_evolution(epochs[::-1], values, cliffs)


def test_plot_alignment_renders_fixed_colour_scale_and_cliffs():
    matrix = np.random.default_rng(0).random((120, 28))
    labels = [f"a k={k}" for k in range(1, 15)] + [f"b k={k}" for k in range(1, 15)]
    fig = plot_alignment(matrix, col_labels=labels, cliffs=CLIFFS, title="Fourier features")
    assert_renders(fig)
    ax = fig.axes[0]
    assert ax.images[0].get_clim() == (0.0, 1.0)
    assert fig.axes[1].get_ylabel() == "|cos|"
    assert ax.get_ylabel() == "eigenvector index"
    assert [t.get_text() for t in ax.get_xticklabels()] == labels
    texts = texts_of(fig)
    assert "rank 57" in texts
    assert "rank 113" in texts
    cliff_y = sorted(line.get_ydata()[0] for line in ax.lines)
    assert cliff_y == [57.5, 113.5]


def test_plot_alignment_invalid_inputs():
    with pytest.raises(ValueError, match="`matrix` must be 2-D"):
        plot_alignment(np.ones(4))
    with pytest.raises(ValueError, match="`matrix` must hold \\|cos\\| values in \\[0, 1\\]"):
        plot_alignment(np.full((3, 3), -0.5))
    with pytest.raises(ValueError, match="`col_labels` must name each of the 3 columns"):
        plot_alignment(np.zeros((4, 3)), col_labels=["a", "b"])


def test_plots_leave_no_pyplot_figures():
    before = plt.get_fignums()
    epochs, values, cliffs, accuracy = evolution_data(n_evals=3, k=20)
    for fig in (
        plot_spectrum(values[-1], cliffs[-1]),
        plot_spectrum_evolution(epochs, values, cliffs, accuracy=accuracy),
        plot_alignment(np.zeros((5, 4))),
    ):
        figure_to_array(fig)
    assert plt.get_fignums() == before
