import contextlib
import dataclasses
import io
import math
import os

import lightning as L
import numpy as np
import pytest
import torch

from example_modules.modular_arithmetic import (
    ModularArithmeticDataModule,
    ModularArithmeticMLP,
    fourier_features,
)
from example_modules.reproduce import (
    RESULTS_FILENAME,
    ModularConfig,
    ModularResult,
    OverlapPoint,
    ReproductionConfig,
    ReproductionResults,
    TMSConfig,
    TMSResult,
    TMSSpectrum,
    check_claims,
    cliff_appearance,
    cliff_segments,
    expected_cliff_ranks,
    main,
    paper_tms_agreement,
    render_results_markdown,
)
from lightning_entk import Cliff, empirical_ntk, find_cliffs, subspace_overlap
from lightning_entk.milestones import first_epoch_reaching as first_epoch_at_least

MODULAR_FIGURES = {
    "modular_spectrum_init.png",
    "modular_spectrum_end.png",
    "modular_spectrum_evolution.png",
    "modular_overlaps.png",
    "modular_alignment_init.png",
    "modular_alignment_end.png",
}


def table_rows(markdown, first_cell):
    """Cells of the Markdown table rows whose first cell starts with ``first_cell``."""
    rows = []
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0].startswith(first_cell):
            rows.append(cells)
    return rows


def ranks(cliffs):
    return ", ".join(str(c.rank) for c in cliffs) or "none"


# --------------------------------------------------------------------------------------------
# Pure helpers


def test_expected_cliff_ranks_count_top_mode_and_fourier_pairs():
    assert expected_cliff_ranks(29) == (57, 113)
    assert expected_cliff_ranks(11) == (21, 41)
    assert expected_cliff_ranks(10) == (21, 41)  # floor(p / 2) frequencies


def test_cliff_segments_follow_detected_ranks_and_skip_top_mode():
    first, second = cliff_segments([57, 111, 400], (57, 113), tolerance=2)
    assert (first.first, first.last, first.detected) == (2, 57, True)
    assert (second.first, second.last, second.detected) == (58, 111, True)


def test_cliff_segments_fall_back_to_expected_ranks():
    first, second = cliff_segments([57, 100], (57, 113), tolerance=2)
    assert (second.first, second.last, second.detected) == (58, 113, False)
    first, _ = cliff_segments([], (57, 113), tolerance=2, top_modes=0)
    assert (first.first, first.last, first.detected) == (1, 57, False)


def test_first_epoch_at_least_ignores_nan_and_reports_none():
    epochs = np.arange(5)
    values = np.array([np.nan, 0.2, 0.6, 0.4, 0.97])
    assert first_epoch_at_least(epochs, values, 0.5) == 2
    assert first_epoch_at_least(epochs, values, 0.95) == 4
    assert first_epoch_at_least(epochs, values, 0.99) is None


def test_cliff_appearance_first_and_stable_epochs():
    top = Cliff(57, 0.3)
    found = [[top], [top, Cliff(114, 0.05)], [top], [top, Cliff(113, 0.1)], [top, Cliff(112, 0.1)]]
    epochs = np.array([0, 10, 20, 30, 40])
    assert cliff_appearance(epochs, found, 113, tolerance=2) == (10, 30)
    assert cliff_appearance(epochs, found, 113, tolerance=0) == (30, None)
    assert cliff_appearance(epochs[:1], found[:1], 113, tolerance=2) == (None, None)


def test_paper_tms_agreement_names_missing_and_extra_cliffs():
    assert paper_tms_agreement([10, 50], (10, 50)) == "agrees"
    assert paper_tms_agreement([26, 50], (28, 50)) == "agrees"  # ~28 read off a figure
    assert paper_tms_agreement([11, 50], (10, 50)) == "differs: no cliff near 10; extra cliff at 11"


def test_modular_config_rejects_overlaps_between_evaluations():
    with pytest.raises(ValueError, match="multiple of `monitor_every`"):
        ModularConfig(monitor_every=2, overlap_every=5)
    with pytest.raises(ValueError, match="`monitor_every` must be a positive int"):
        ModularConfig(monitor_every=0)


# --------------------------------------------------------------------------------------------
# Claims and Markdown on results built by hand


def synthetic_results(end_overlap=0.912, init_overlap=0.071, end_ranks=(57, 113)):
    config = ReproductionConfig()
    epochs = np.array([0, 250, 500])
    spectrum = np.geomspace(1.0, 1e-3, 841)
    modular = ModularResult(
        config=config.modular,
        expected_ranks=(57, 113),
        rank_tolerance=2,
        segments=cliff_segments(end_ranks, (57, 113), tolerance=2),
        epochs=epochs,
        eigenvalues=np.stack([spectrum] * 3),
        cliffs=[[Cliff(57, 0.6)], [Cliff(57, 0.3)], [Cliff(r, 0.2) for r in end_ranks]],
        val_acc=np.concatenate([[math.nan], np.linspace(0.0, 1.0, 500)]),
        regression_acc=np.array([0.1, 0.9, 1.0]),
        transitions=[],
        half_epoch=250,
        grokked_epoch=476,
        second_cliff_epoch=377,
        second_cliff_stable_epoch=388,
        overlaps=[
            OverlapPoint(0, (0.981, init_overlap)),
            OverlapPoint(250, (0.934, 0.5)),
            OverlapPoint(500, (0.977, end_overlap)),
        ],
        alignment={"init": np.zeros((141, 56)), "end": np.zeros((141, 56))},
        alignment_labels=[f"a {k}" for k in range(56)],
        seconds=123.0,
    )
    tms = [
        TMSResult(
            n_hidden=m,
            sparsity=s,
            reconstructed=count,
            spectra=[
                TMSSpectrum(beta, spectrum[:200], [Cliff(17, 0.3), Cliff(50, 1.0)], [0.612, 0.444])
                for beta in (0.0, 0.3, 1.0)
            ],
            seconds=5.0,
        )
        for (m, s), count in (((10, 0.3), 11), ((10, 0.9), 23), ((40, 0.9), 42))
    ]
    return ReproductionResults(config, modular, tms, check_claims(modular), 654.0, ["x.png"])


def test_check_claims_pass_on_paper_like_results():
    checks = check_claims(synthetic_results().modular)
    assert len(checks) == 4 and all(check.passed for check in checks)


def test_check_claims_fail_where_results_differ():
    checks = check_claims(
        synthetic_results(end_overlap=0.6, init_overlap=0.5, end_ranks=(57,)).modular
    )
    assert [check.passed for check in checks] == [False, True, False, False]
    assert "found 57" in checks[0].detail and "0.600" in checks[2].detail


def test_render_results_markdown_takes_every_number_from_results():
    markdown = render_results_markdown(synthetic_results())
    assert table_rows(markdown, "grokking")[0][1:] == [
        "476",
        "91-200 (81% at epoch 90, 100% by 200)",
        "differs: paper: epoch 91-200",
    ]
    assert table_rows(markdown, "second cliff (rank 113 ± 2) first detected")[0][1] == "377"
    assert table_rows(
        markdown, "overlap of cliff 2 (eigenvectors 58..113) with (sum, diff) at epoch 500"
    )[0][1:] == ["0.912", "~0.9", "agrees: +0.012 from the paper's"]
    overlap_rows = {row[0]: row for row in table_rows(markdown, "") if row[0].isdigit()}
    assert overlap_rows["250"][1:] == ["0.499", "57", "0.934", "0.500"]
    assert table_rows(markdown, "(10, 0.9)")[0][1:] == ["23", "21", "differs: +2"]
    assert table_rows(markdown, "(40, 0.9)")[0][1:] == ["42", "42", "agrees"]
    tms_first = table_rows(markdown, "(40, 0.9)")[1]
    assert tms_first[1:] == [
        "0",
        "17, 50",
        "17: 0.612, 50: 0.444",
        "0.612",
        "~8, 50",
        "differs: no cliff near 8; extra cliff at 17",
    ]
    assert "wall time 654 s" in markdown
    assert "- PASS: cliffs at ranks 57 and 113 after training (found 57, 113)" in markdown


def test_render_results_markdown_reports_unreached_epochs():
    results = synthetic_results()
    results.modular = dataclasses.replace(
        results.modular, grokked_epoch=None, second_cliff_epoch=None
    )
    markdown = render_results_markdown(results)
    assert table_rows(markdown, "grokking")[0][1] == "not reached"
    assert table_rows(markdown, "second cliff (rank 113 ± 2) first detected")[0][1] == "not reached"


# --------------------------------------------------------------------------------------------
# The whole pipeline at reduced size


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """The reduced run, from an empty working directory: ``(out, results, stdout, cwd)``."""
    out = tmp_path_factory.mktemp("reproduction")
    cwd = tmp_path_factory.mktemp("cwd")
    stdout, previous = io.StringIO(), os.getcwd()
    os.chdir(cwd)  # contextlib.chdir needs Python 3.11
    try:
        with contextlib.redirect_stdout(stdout):
            results = main(["--small", "--out", str(out)])
    finally:
        os.chdir(previous)
    return out, results, stdout.getvalue(), cwd


@pytest.mark.slow
def test_main_small_writes_every_figure(small_run):
    out, results, _, _ = small_run
    tms = {
        f"tms_m{m}_S{s:g}_beta{beta:g}.png"
        for m, s in ReproductionConfig.small().tms.configs
        for beta in TMSConfig().betas
    }
    assert set(results.figures) == MODULAR_FIGURES | tms
    for name in results.figures:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name


@pytest.mark.slow
def test_main_small_results_markdown_has_the_computed_numbers(small_run):
    out, results, _, _ = small_run
    markdown = (out / RESULTS_FILENAME).read_text()
    assert markdown == render_results_markdown(results)
    mod = results.modular
    r1, r2 = expected_cliff_ranks(ReproductionConfig.small().modular.p)
    # Cliffs recomputed from the recorded spectra.
    assert table_rows(markdown, "cliff ranks at initialization")[0][1:3] == [
        ranks(find_cliffs(mod.eigenvalues[0])),
        str(r1),
    ]
    end_row = table_rows(markdown, "cliff ranks after training")[0]
    assert end_row[1:3] == [ranks(find_cliffs(mod.eigenvalues[-1])), f"{r1}, {r2}"]
    overlap_rows = [row for row in table_rows(markdown, "") if row[0].isdigit()]
    assert overlap_rows[0][0] == "0" and overlap_rows[-1][0] == str(mod.config.epochs)
    by_epoch = {o.epoch: o for o in mod.overlaps}
    for row in overlap_rows:
        overlaps = by_epoch[int(row[0])].overlaps
        assert row[3:] == [f"{overlaps[0]:.3f}", f"{overlaps[1]:.3f}"]
    for run in results.tms:
        row = table_rows(markdown, f"({run.n_hidden}, {run.sparsity})")[0]
        assert row[1] == str(run.reconstructed)
        spectra = table_rows(markdown, f"({run.n_hidden}, {run.sparsity})")[1:]
        assert len(spectra) == len(run.spectra)
        for cells, spectrum in zip(spectra, run.spectra, strict=True):
            assert cells[1] == f"{spectrum.beta:g}"
            assert cells[2] == ranks(find_cliffs(spectrum.eigenvalues))


@pytest.mark.slow
def test_main_small_initial_overlaps_match_an_independent_computation(small_run):
    """The overlaps at epoch 0 from a kernel formed afresh and a float64 numpy ``eigh``."""
    _, results, _, _ = small_run
    config = ReproductionConfig.small().modular
    L.seed_everything(config.seed, verbose=False)
    data = ModularArithmeticDataModule(p=config.p, seed=config.seed)
    model = ModularArithmeticMLP(p=config.p, hidden=config.hidden)
    kernel = empirical_ntk(model.double(), data.grid()[0].double()).numpy()
    _, vectors = np.linalg.eigh(kernel)
    vectors = vectors[:, ::-1]
    first, second = results.modular.segments
    ab = torch.cat([fourier_features(config.p, f) for f in ("a", "b")], dim=1)
    sum_diff = torch.cat([fourier_features(config.p, f) for f in ("sum", "diff")], dim=1)
    expected = (
        subspace_overlap(vectors[:, first.first - 1 : first.last], ab),
        subspace_overlap(vectors[:, second.first - 1 : second.last], sum_diff),
    )
    assert results.modular.overlaps[0].epoch == 0
    np.testing.assert_allclose(results.modular.overlaps[0].overlaps, expected, atol=1e-3)


@pytest.mark.slow
def test_main_small_prints_headline_and_claims(small_run):
    _, results, stdout, _ = small_run
    assert "| cliff ranks at initialization |" in stdout
    claims = [line for line in stdout.splitlines() if line.startswith(("PASS", "FAIL"))]
    assert claims == [str(check) for check in results.checks]
    assert len(claims) == 4


@pytest.mark.slow
def test_main_small_writes_nothing_outside_its_folder(small_run):
    out, results, _, cwd = small_run
    assert list(cwd.iterdir()) == []
    assert {p.name for p in out.iterdir()} == {RESULTS_FILENAME, *results.figures}
