"""The report of the reproduction: ``results.md`` and the PNG figures.

:func:`check_claims` checks the paper's claims against a run; :func:`render_results_markdown`
writes every number of a :class:`~example_modules.reproduce.runner.ReproductionResults` beside
the paper's (:mod:`example_modules.reproduce.paper`) with whether they agree; :func:`headline`
is the part printed at the end of a run; :func:`write_figures` saves the spectra, the alignment
heatmaps and the overlaps over training (:func:`plot_overlaps`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.figure import Figure

from example_modules.reproduce.paper import (
    CLIFF1_OVERLAP_MIN,
    CLIFF2_OVERLAP_END_MIN,
    CLIFF2_OVERLAP_INIT_MAX,
    GROKKED_ACCURACY,
    HALF_ACCURACY,
    PAPER_CLIFF2_OVERLAP_END,
    PAPER_GROKKED_EPOCHS,
    PAPER_HALF_EPOCHS,
    PAPER_TMS_CLIFFS,
    PAPER_TMS_RANK_TOLERANCE,
    PAPER_TMS_RECONSTRUCTED,
    SEGMENT_FAMILIES,
    TOP_MODES,
    Check,
    format_ranks,
)
from lightning_entk import plots
from lightning_entk.milestones import nearest_rank

if TYPE_CHECKING:
    from example_modules.reproduce.runner import ModularResult, ReproductionResults

RESULTS_FILENAME = "results.md"
OVERLAP_TABLE_FRACTIONS = (0.0, 0.1, 0.15, 0.2, 0.3, 0.4, 0.6, 1.0)
"""Epochs of the overlap table, as fractions of the run: dense around the paper's grokking."""


# --------------------------------------------------------------------------------------------
# Claims


def check_claims(modular: ModularResult) -> list[Check]:
    """The paper's claims about the modular MLP, checked against a run."""
    r1, r2 = modular.expected_ranks
    seg1, seg2 = modular.segments
    first, last = modular.overlaps[0], modular.overlaps[-1]
    worst = min(modular.overlaps, key=lambda o: o.overlaps[0])
    return [
        Check(
            f"cliffs at ranks {r1} and {r2} after training",
            {r1, r2} <= set(modular.ranks_end),
            f"found {format_ranks(modular.ranks_end)}",
        ),
        Check(
            f"cliff 1 (eigenvectors {seg1}) overlaps (a, b) >= {CLIFF1_OVERLAP_MIN} throughout",
            worst.overlaps[0] >= CLIFF1_OVERLAP_MIN,
            f"lowest {worst.overlaps[0]:.3f}, at epoch {worst.epoch}",
        ),
        Check(
            f"cliff 2 (eigenvectors {seg2}) overlaps (sum, diff) >= {CLIFF2_OVERLAP_END_MIN} at "
            "the end",
            last.overlaps[1] >= CLIFF2_OVERLAP_END_MIN,
            f"{last.overlaps[1]:.3f} at epoch {last.epoch}",
        ),
        Check(
            f"cliff 2 (eigenvectors {seg2}) overlaps (sum, diff) < {CLIFF2_OVERLAP_INIT_MAX} at "
            "initialization",
            first.overlaps[1] < CLIFF2_OVERLAP_INIT_MAX,
            f"{first.overlaps[1]:.3f} at epoch {first.epoch}",
        ),
    ]


# --------------------------------------------------------------------------------------------
# Tables


def table_epochs(
    available: Sequence[int], total: int, extra: Sequence[int | None] = ()
) -> list[int]:
    """Epochs for the overlap table: those of ``available`` nearest to the fractions
    ``OVERLAP_TABLE_FRACTIONS`` of ``total``, plus the ones nearest to each of ``extra``.

    Example:
        >>> table_epochs(range(0, 101, 5), 100, extra=[87])
        [0, 10, 15, 20, 30, 40, 60, 85, 100]
    """
    available = np.asarray(list(available))
    wanted = [f * total for f in OVERLAP_TABLE_FRACTIONS] + [e for e in extra if e is not None]
    return sorted({int(available[np.abs(available - w).argmin()]) for w in wanted})


def _format_epoch(epoch: int | None) -> str:
    return "not reached" if epoch is None else str(epoch)


# --------------------------------------------------------------------------------------------
# Markdown


def _agreement(ok: bool | None, detail: str = "") -> str:
    if ok is None:
        return "not comparable (reduced size)" if not detail else detail
    return ("agrees" if ok else "differs") + (f": {detail}" if detail else "")


def _within(value: int | None, bounds: tuple[int, int]) -> bool:
    return value is not None and bounds[0] <= value <= bounds[1]


def modular_headline_rows(results: ReproductionResults) -> list[tuple[str, str, str, str]]:
    """``(quantity, this run, paper, agreement)`` rows of the modular headline table."""
    mod = results.modular
    paper = mod.config.paper_size
    r1, r2 = mod.expected_ranks
    seg1, seg2 = mod.segments
    first, last = mod.overlaps[0], mod.overlaps[-1]
    lowest = min(o.overlaps[0] for o in mod.overlaps)
    end_epoch = int(mod.epochs[-1])

    def same_ranks(found: list[int], wanted: list[int]) -> str:
        return _agreement(
            found == wanted, "" if found == wanted else f"paper: {format_ranks(wanted)}"
        )

    def epoch_row(epoch: int | None, bounds: tuple[int, int]) -> str:
        if not paper:
            return _agreement(None)
        return _agreement(_within(epoch, bounds), f"paper: epoch {bounds[0]}-{bounds[1]}")

    if mod.second_cliff_epoch is None or mod.grokked_epoch is None:
        relation = "-"
    else:
        lag = mod.second_cliff_epoch - mod.grokked_epoch
        relation = f"{abs(lag)} epochs {'after' if lag >= 0 else 'before'} val_acc >= 0.95"
    lead = next((t for t in mod.transitions if t.kind == "kernel_regression_lead"), None)
    cliff2_end = last.overlaps[1]
    return [
        (
            "cliff ranks at initialization",
            format_ranks(mod.ranks_init),
            str(r1),
            same_ranks(mod.ranks_init, [r1]),
        ),
        (
            f"cliff ranks after training (epoch {end_epoch})",
            format_ranks(mod.ranks_end),
            f"{r1}, {r2}",
            same_ranks(mod.ranks_end, [r1, r2]),
        ),
        (
            f"first epoch with val_acc >= {HALF_ACCURACY}",
            _format_epoch(mod.half_epoch),
            "81-90 (40% at epoch 80, 81% at 90)",
            epoch_row(mod.half_epoch, PAPER_HALF_EPOCHS),
        ),
        (
            f"grokking: first epoch with val_acc >= {GROKKED_ACCURACY}",
            _format_epoch(mod.grokked_epoch),
            "91-200 (81% at epoch 90, 100% by 200)",
            epoch_row(mod.grokked_epoch, PAPER_GROKKED_EPOCHS),
        ),
        (
            f"second cliff (rank {r2} ± {mod.rank_tolerance}) first detected",
            _format_epoch(mod.second_cliff_epoch),
            "appears at grokking",
            relation,
        ),
        (
            "second cliff detected at every evaluation from",
            _format_epoch(mod.second_cliff_stable_epoch),
            "-",
            "-",
        ),
        (
            "kernel-regression early warning (monitor)",
            "not raised" if lead is None else f"epoch {lead.epoch}",
            "-",
            "-",
        ),
        (
            f"overlap of cliff 1 (eigenvectors {seg1}) with (a, b), lowest over training",
            f"{lowest:.3f}",
            "aligned throughout",
            _agreement(lowest >= CLIFF1_OVERLAP_MIN, f"claim >= {CLIFF1_OVERLAP_MIN}"),
        ),
        (
            f"overlap of cliff 2 (eigenvectors {seg2}) with (sum, diff) at initialization",
            f"{first.overlaps[1]:.3f}",
            "~0 (not aligned)",
            _agreement(
                first.overlaps[1] < CLIFF2_OVERLAP_INIT_MAX, f"claim < {CLIFF2_OVERLAP_INIT_MAX}"
            ),
        ),
        (
            f"overlap of cliff 2 (eigenvectors {seg2}) with (sum, diff) at epoch {last.epoch}",
            f"{cliff2_end:.3f}",
            f"~{PAPER_CLIFF2_OVERLAP_END}",
            _agreement(
                abs(cliff2_end - PAPER_CLIFF2_OVERLAP_END) <= 0.05 if paper else None,
                f"{cliff2_end - PAPER_CLIFF2_OVERLAP_END:+.3f} from the paper's" if paper else "",
            ),
        ),
    ]


def tms_reconstructed_rows(results: ReproductionResults) -> list[tuple[str, str, str, str]]:
    """``((m, S), this run, paper, agreement)`` rows of the features reconstructed."""
    paper = results.config.tms.paper_size
    rows = []
    for run in results.tms:
        expected = PAPER_TMS_RECONSTRUCTED.get((run.n_hidden, run.sparsity)) if paper else None
        rows.append(
            (
                f"({run.n_hidden}, {run.sparsity})",
                str(run.reconstructed),
                "-" if expected is None else str(expected),
                _agreement(None)
                if expected is None
                else _agreement(
                    run.reconstructed == expected,
                    "" if run.reconstructed == expected else f"{run.reconstructed - expected:+d}",
                ),
            )
        )
    return rows


def paper_tms_agreement(found: Sequence[int], paper: Sequence[int]) -> str:
    """How detected cliff ranks compare with the paper's (``PAPER_TMS_RANK_TOLERANCE``).

    Example:
        >>> paper_tms_agreement([30, 50], (28, 50)), paper_tms_agreement([50], (8, 50))
        ('agrees', 'differs: no cliff near 8')
    """
    missing = [
        r for r in paper if nearest_rank(found, r, PAPER_TMS_RANK_TOLERANCE.get(r, 0)) is None
    ]
    extra = [
        r
        for r in found
        if all(nearest_rank([r], q, PAPER_TMS_RANK_TOLERANCE.get(q, 0)) is None for q in paper)
    ]
    notes = [f"no cliff near {r}" for r in missing] + [f"extra cliff at {r}" for r in extra]
    return _agreement(not notes, "; ".join(notes))


def tms_spectrum_rows(results: ReproductionResults) -> list[tuple[str, ...]]:
    """``((m, S), beta, cliff ranks, overlap per cliff, best overlap, paper, agreement)`` rows;
    the paper's cliffs are known for beta = 0 only."""
    paper_size = results.config.tms.paper_size
    rows = []
    for run in results.tms:
        for spectrum in run.spectra:
            ranks = [c.rank for c in spectrum.cliffs]
            paper = PAPER_TMS_CLIFFS.get((run.n_hidden, run.sparsity)) if paper_size else None
            if paper is not None and spectrum.beta == 0:
                reference = ", ".join(
                    f"~{r}" if r in PAPER_TMS_RANK_TOLERANCE else str(r) for r in paper
                )
                agreement = paper_tms_agreement(ranks, paper)
            else:
                reference, agreement = "-", "-"
            best = spectrum.best_overlap
            rows.append(
                (
                    f"({run.n_hidden}, {run.sparsity})",
                    f"{spectrum.beta:g}",
                    format_ranks(ranks),
                    ", ".join(
                        f"{c.rank}: {o:.3f}"
                        for c, o in zip(spectrum.cliffs, spectrum.overlaps, strict=True)
                    )
                    or "-",
                    "-" if best is None else f"{best:.3f}",
                    reference,
                    agreement,
                )
            )
    return rows


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def render_results_markdown(results: ReproductionResults) -> str:
    """``results.md``: the headline tables, the overlaps over training, the TMS tables, the
    claims checked and the figures, every number taken from ``results``."""
    mod, m, t = results.modular, results.config.modular, results.config.tms
    seg1, seg2 = mod.segments
    size = "the paper's sizes" if m.paper_size and t.paper_size else "REDUCED sizes (--small)"
    lines = [
        '# Reproduction of "Feature Identification via the Empirical NTK" (arXiv:2510.00468)',
        "",
        f"Run at {size}; wall time {results.seconds:.0f} s (modular {mod.seconds:.0f} s, "
        f"TMS {sum(r.seconds for r in results.tms):.0f} s); seed {m.seed}. Cliffs are found by "
        "`find_cliffs` with its defaults; nothing is tuned towards the paper's numbers.",
        "",
        "## Modular addition",
        "",
        f"p = {m.p}, hidden {m.hidden}, AdamW lr {m.lr} / weight decay {m.weight_decay}, full "
        f"batch, train fraction {m.train_fraction}, {m.epochs} epochs. Probe: all {m.p**2} pairs, "
        f"trace-mode eNTK (sum over outputs), evaluated by `ENTKMonitor` every "
        f"{m.monitor_every} epoch(s); overlaps every {m.overlap_every} epochs.",
        "",
        *_table(("quantity", "this run", "paper", "agreement"), modular_headline_rows(results)),
        "",
        "Cliff segments: the top eigenvector is left out (an isolated outlier close to the "
        "constant function, in no Fourier family); segment 1 runs from eigenvector "
        f"{TOP_MODES + 1} to the first cliff, segment 2 from there to the second. The cliffs are "
        "those detected after training nearest to the expected ranks "
        f"({mod.expected_ranks[0]}, {mod.expected_ranks[1]}), else the expected ranks: here "
        f"{seg1} ({'detected' if seg1.detected else 'not detected, expected'}) and {seg2} "
        f"({'detected' if seg2.detected else 'not detected, expected'}), the same eigenvector "
        "indices at every epoch. Overlap: `subspace_overlap`, the mean squared cosine of the "
        "principal angles (1: one span contains the other).",
        "",
        "### Subspace overlaps over training",
        "",
    ]
    epochs = table_epochs(
        [o.epoch for o in mod.overlaps],
        m.epochs,
        extra=[mod.half_epoch, mod.grokked_epoch, mod.second_cliff_epoch],
    )
    by_epoch = {o.epoch: o for o in mod.overlaps}
    rows = [
        (
            str(e),
            "-" if math.isnan(mod.val_acc[e]) else f"{mod.val_acc[e]:.3f}",
            format_ranks(mod.cliffs_at(e)),
            f"{by_epoch[e].overlaps[0]:.3f}",
            f"{by_epoch[e].overlaps[1]:.3f}",
        )
        for e in epochs
    ]
    lines += _table(
        (
            "epoch",
            "val_acc",
            "cliffs detected",
            f"cliff 1 ({seg1}) with (a, b)",
            f"cliff 2 ({seg2}) with (sum, diff)",
        ),
        rows,
    )
    lines += [
        "",
        "## Toy Models of Superposition",
        "",
        f"n = {t.n_features} features, N = {t.n_samples} samples, importance {t.importance}, "
        f"Adam lr {t.lr}, {t.steps} full-batch steps. Flattened eNTK on the training samples "
        f"({t.n_features * t.n_samples} rows), top {t.eigenpairs} eigenpairs (at most P = m n + "
        "n), outputs weighted by `importance_weights(beta)`.",
        "",
        *_table(
            ("(m, S)", "features reconstructed", "paper", "agreement"),
            tms_reconstructed_rows(results),
        ),
        "",
        *_table(
            (
                "(m, S)",
                "beta",
                "cliff ranks",
                "overlap of eigenvectors above each cliff with the features",
                "best overlap",
                "paper's cliffs (beta = 0, read off its figure)",
                "agreement",
            ),
            tms_spectrum_rows(results),
        ),
        "",
        "Overlap: of eigenvectors 1..rank with the module's ground truth, the n columns "
        "`entk_ground_truth(x, 'flatten')` (feature i's values in output block i). The paper "
        "gives cliff ranks for the rescaled spectra (beta > 0) only in words: they track the "
        "number of reconstructed features and n, and no overlap number for TMS.",
        "",
        "## Claims",
        "",
        *[f"- {check}" for check in results.checks],
        "",
        "## Figures",
        "",
        *[f"- `{name}`" for name in results.figures],
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Figures


def plot_overlaps(modular: ModularResult) -> Figure:
    """Overlap of each cliff segment with its Fourier families against the epoch, with
    validation accuracy, the grokking epoch and the paper's end value of cliff 2."""
    fig = Figure(figsize=plots.FIGSIZE, dpi=plots.DPI, layout="constrained")
    ax = fig.add_subplot()
    epochs = np.array([o.epoch for o in modular.overlaps])
    for i, (segment, families) in enumerate(zip(modular.segments, SEGMENT_FAMILIES, strict=True)):
        ax.plot(
            epochs,
            [o.overlaps[i] for o in modular.overlaps],
            marker=".",
            markersize=5,
            linewidth=1.5,
            label=f"cliff {i + 1} (eigenvectors {segment}) with ({', '.join(families)})",
        )
    finite = np.isfinite(modular.val_acc)
    ax.plot(
        np.flatnonzero(finite),
        modular.val_acc[finite],
        color="0.45",
        linewidth=1.0,
        linestyle="--",
        label="validation accuracy",
    )
    if modular.grokked_epoch is not None:
        ax.axvline(
            modular.grokked_epoch,
            color="black",
            linestyle=":",
            linewidth=1.2,
            label=f"val_acc >= {GROKKED_ACCURACY} (epoch {modular.grokked_epoch})",
        )
    if modular.second_cliff_epoch is not None:
        ax.axvline(
            modular.second_cliff_epoch,
            color=plots.CLIFF_COLOR,
            linestyle=":",
            linewidth=1.2,
            label=f"cliff {modular.expected_ranks[1]} first detected "
            f"(epoch {modular.second_cliff_epoch})",
        )
    if modular.config.paper_size:
        ax.plot(
            epochs[-1],
            PAPER_CLIFF2_OVERLAP_END,
            marker="*",
            markersize=12,
            color="tab:orange",
            markeredgecolor="black",
            linestyle="none",
            label=f"paper: cliff 2 ~{PAPER_CLIFF2_OVERLAP_END} at the end",
        )
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("epoch")
    ax.set_ylabel("subspace overlap / accuracy (0 to 1)")
    ax.set_title(f"Cliff eigenvectors vs Fourier features, modular addition p={modular.config.p}")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=9, framealpha=0.9)
    return fig


def write_figures(results: ReproductionResults, out: Path) -> list[Path]:
    """Save every figure of ``results`` as a PNG in ``out``; return the paths."""
    mod = results.modular
    p = mod.config.p
    deepest = max(mod.expected_ranks[1], max((c.rank for c in mod.cliffs[-1]), default=0))
    evolution = plots.plot_spectrum_evolution(
        mod.epochs,
        mod.eigenvalues,
        mod.cliffs,
        accuracy={
            "validation accuracy": mod.val_acc[mod.epochs],
            "eNTK kernel regression (validation pairs)": mod.regression_acc,
        },
        transitions=mod.transitions,
        max_index=min(mod.eigenvalues.shape[1], 2 * deepest),
    )
    evolution.axes[0].set_title(
        f"Modular addition p={p}: eNTK spectrum over training ({p * p}-pair grid, trace mode)"
    )
    figures = {
        "modular_spectrum_evolution.png": evolution,
        "modular_overlaps.png": plot_overlaps(mod),
    }
    for stage, index in (("init", 0), ("end", -1)):
        epoch = int(mod.epochs[index])
        when = "at initialization" if stage == "init" else "after training"
        figures[f"modular_spectrum_{stage}.png"] = plots.plot_spectrum(
            mod.eigenvalues[index],
            mod.cliffs[index],
            title=f"Modular addition p={p}: eNTK spectrum {when} (epoch {epoch})",
        )
        figures[f"modular_alignment_{stage}.png"] = plots.plot_alignment(
            mod.alignment[stage],
            row_label="eigenvector index (1 = largest eigenvalue)",
            col_label="Fourier pair (cos, sin): family and frequency k",
            col_labels=mod.alignment_labels,
            title=f"Modular addition p={p}: |cos| of eNTK eigenvectors with Fourier pairs, "
            f"epoch {epoch}",
            cliffs=mod.cliffs[index],
        )
    for run in results.tms:
        for spectrum in run.spectra:
            name = f"tms_m{run.n_hidden}_S{run.sparsity:g}_beta{spectrum.beta:g}.png"
            figures[name] = plots.plot_spectrum(
                spectrum.eigenvalues,
                spectrum.cliffs,
                title=f"TMS m={run.n_hidden}, S={run.sparsity:g}: flattened eNTK, beta="
                f"{spectrum.beta:g} ({run.reconstructed} features reconstructed)",
            )
    paths = []
    for name in sorted(figures):
        path = out / name
        figures[name].savefig(path, dpi=plots.DPI)
        paths.append(path)
    return paths


def headline(results: ReproductionResults) -> str:
    """The text printed at the end of a run: the headline tables and the claims."""
    lines = [
        "",
        *_table(("quantity", "this run", "paper", "agreement"), modular_headline_rows(results)),
        "",
        *_table(
            ("TMS (m, S)", "features reconstructed", "paper", "agreement"),
            tms_reconstructed_rows(results),
        ),
        "",
        *[str(check) for check in results.checks],
        "",
        f"wall time {results.seconds:.0f} s",
    ]
    return "\n".join(lines)
