"""Reproduce the findings of Lin, "Feature Identification via the Empirical NTK"
(arXiv:2510.00468) on the two bundled models, and say where the numbers differ from the paper's.

    python -m example_modules.reproduce                      # the paper's sizes, minutes
    python -m example_modules.reproduce --small --out DIR    # a reduced run, seconds

Modular addition (docs/design.md, section 'The bundled experiments': p=29, hidden 512, AdamW lr
0.05 / weight decay 0.01, full batch, train fraction 0.7, 500 epochs) is trained with a plain
Lightning ``Trainer`` and :class:`~lightning_entk.ENTKMonitor`, whose probe is the full ``p^2``
grid (trace mode, every second epoch). From the monitor's history: the cliffs at initialization
and after training and the epoch at which the second cliff first shows; from the validation
accuracy of every epoch, the epoch of grokking; from copies of the weights every few epochs, the
subspace overlap of each cliff's eigenvectors with the Fourier features the paper names, cliff 1
with families ``a`` and ``b``, cliff 2 with ``sum`` and ``diff``.

Toy Models of Superposition (n=50 features, N=500 samples, 5000 Adam steps, (m, S) in
{(10, 0.3), (10, 0.9), (40, 0.9)}): the features reconstructed, and for importance rescalings
beta in {0, 0.3, 1} the cliffs of the flattened eNTK and the overlap of the eigenvectors above
each cliff with the ground-truth features.

Everything lands in one folder (default ``entk_reproduction/``): ``results.md`` (tables, each
number beside the paper's, and the claims checked) and PNG figures. Nothing is tuned towards
the paper's numbers; the claims are checked and reported as PASS or FAIL, never raised.

The modules:

    runner   configurations, training and recording: run_modular, run_tms -> dataclasses
    paper    the paper's constants and expected_cliff_ranks
    report   check_claims; results.md (render_results_markdown, headline); the figures
             (write_figures)
    cli      reproduce (all of the above, into a folder) and main, the command line

Every public name of these modules is re-exported here.
"""

from example_modules.reproduce.cli import DEFAULT_OUT, main, reproduce
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
    expected_cliff_ranks,
    format_ranks,
)
from example_modules.reproduce.report import (
    OVERLAP_TABLE_FRACTIONS,
    RESULTS_FILENAME,
    check_claims,
    headline,
    modular_headline_rows,
    paper_tms_agreement,
    plot_overlaps,
    render_results_markdown,
    table_epochs,
    tms_reconstructed_rows,
    tms_spectrum_rows,
    write_figures,
)
from example_modules.reproduce.runner import (
    ModularConfig,
    ModularResult,
    OverlapPoint,
    ReproductionConfig,
    ReproductionResults,
    Segment,
    TMSConfig,
    TMSResult,
    TMSSpectrum,
    TrainingRecord,
    cliff_appearance,
    cliff_segments,
    run_modular,
    run_tms,
    tms_spectrum,
)

__all__ = [
    "CLIFF1_OVERLAP_MIN",
    "CLIFF2_OVERLAP_END_MIN",
    "CLIFF2_OVERLAP_INIT_MAX",
    "DEFAULT_OUT",
    "GROKKED_ACCURACY",
    "HALF_ACCURACY",
    "OVERLAP_TABLE_FRACTIONS",
    "PAPER_CLIFF2_OVERLAP_END",
    "PAPER_GROKKED_EPOCHS",
    "PAPER_HALF_EPOCHS",
    "PAPER_TMS_CLIFFS",
    "PAPER_TMS_RANK_TOLERANCE",
    "PAPER_TMS_RECONSTRUCTED",
    "RESULTS_FILENAME",
    "SEGMENT_FAMILIES",
    "TOP_MODES",
    "Check",
    "ModularConfig",
    "ModularResult",
    "OverlapPoint",
    "ReproductionConfig",
    "ReproductionResults",
    "Segment",
    "TMSConfig",
    "TMSResult",
    "TMSSpectrum",
    "TrainingRecord",
    "check_claims",
    "cliff_appearance",
    "cliff_segments",
    "expected_cliff_ranks",
    "format_ranks",
    "headline",
    "main",
    "modular_headline_rows",
    "paper_tms_agreement",
    "plot_overlaps",
    "render_results_markdown",
    "reproduce",
    "run_modular",
    "run_tms",
    "table_epochs",
    "tms_reconstructed_rows",
    "tms_spectrum",
    "tms_spectrum_rows",
    "write_figures",
]
