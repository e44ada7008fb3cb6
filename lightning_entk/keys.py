"""Every key the monitor logs, and which parameter group is the readout: named here once.

Scalars of a full evaluation (``R`` rows of the kernel: N for ``trace``, C*N for ``flatten``):

    entk/num_cliffs                  cliffs found by :func:`~lightning_entk.find_cliffs`
    entk/cliff_rank/<i>              rank of the i-th cliff (1-based, by rank): eigenvalues above it
    entk/cliff_drop/<i>              its fall, log10 units
    entk/eigenvalue/top<j>           the j-th largest eigenvalue, j = 1..5
    entk/effective_rank              entropy effective rank of the spectrum
    entk/trace                       sum of eigenvalues (the kernel's scale)
    entk/kernel_velocity             || K_t/|K_t| - K_s/|K_s| ||_F against the previous evaluation s
    entk/kernel_target_alignment     centred alignment of K with the labels' Y Y^T (trace mode)
    entk/kernel_regression_acc       accuracy of eNTK kernel regression on held-out probe points
    entk/heldout_alignment           alignment on the held-out probe points alone, debiased
    entk/overlap/<family>            subspace overlap of the best cliff segment with a family of
                                     ground-truth features
    entk/seconds                     wall time of the evaluation, split into
    entk/seconds/kernel              the kernel (capture, factors, Gram products)
    entk/seconds/spectrum            its eigendecomposition and cliffs
    entk/seconds/signals             labels' signals, velocity, groups' figures, overlaps
    entk/seconds/logging             writing the scalars
    entk/seconds/images              drawing and writing the images
    entk/<group>/...                 with parameter groups: each group's own figures
    entk/transitions                 early-warning signals raised so far

Scalars of a sentinel reading (:mod:`~lightning_entk.monitor.sentinel`):

    entk/sentinel/heldout_alignment  the readout's kernel's debiased alignment on held-out points
    entk/sentinel/train_alignment    the same on training points
    entk/sentinel/alignment_ratio    held-out over training (when the training one is positive)
    entk/sentinel/seconds            wall time of the reading
    entk/forecast/epoch              the forecast epoch at which the watched metric reaches 0.5
    entk/forecast/low, /high         its interval (:mod:`~lightning_entk.forecast`)
"""

from __future__ import annotations

from collections.abc import Mapping

PREFIX = "entk/"

NUM_CLIFFS = "entk/num_cliffs"
EFFECTIVE_RANK = "entk/effective_rank"
TRACE = "entk/trace"
KERNEL_VELOCITY = "entk/kernel_velocity"
KERNEL_TARGET_ALIGNMENT = "entk/kernel_target_alignment"
KERNEL_REGRESSION_ACC = "entk/kernel_regression_acc"
HELDOUT_ALIGNMENT = "entk/heldout_alignment"
TRANSITIONS = "entk/transitions"
SECONDS = "entk/seconds"
SECONDS_KERNEL = "entk/seconds/kernel"
SECONDS_SPECTRUM = "entk/seconds/spectrum"
SECONDS_SIGNALS = "entk/seconds/signals"
SECONDS_LOGGING = "entk/seconds/logging"
SECONDS_IMAGES = "entk/seconds/images"

SENTINEL_ALIGNMENT = "entk/sentinel/heldout_alignment"
SENTINEL_TRAIN_ALIGNMENT = "entk/sentinel/train_alignment"
SENTINEL_RATIO = "entk/sentinel/alignment_ratio"
SENTINEL_SECONDS = "entk/sentinel/seconds"
FORECAST = "entk/forecast/epoch"
FORECAST_LOW = "entk/forecast/low"
FORECAST_HIGH = "entk/forecast/high"

PROGRESS_BAR = (NUM_CLIFFS, SENTINEL_ALIGNMENT)

# Images, histograms and texts.
SPECTRUM_IMAGE = "entk/spectrum"
EVOLUTION_IMAGE = "entk/spectrum_evolution"
EIGENVALUE_HISTOGRAM = "entk/log10_eigenvalues"
TRANSITIONS_TEXT = "entk/transitions"


def cliff_rank(i: int) -> str:
    return f"entk/cliff_rank/{i}"


def cliff_drop(i: int) -> str:
    return f"entk/cliff_drop/{i}"


def eigenvalue_top(j: int) -> str:
    return f"entk/eigenvalue/top{j}"


def overlap(family: str) -> str:
    return f"entk/overlap/{family}"


def alignment_image(family: str) -> str:
    return f"entk/alignment/{family}"


def of_group(group: str, key: str) -> str:
    """``key`` of a parameter group's own kernel: ``entk/<group>/<rest of key>``.

    Example:
        >>> of_group("unembed", HELDOUT_ALIGNMENT)
        'entk/unembed/heldout_alignment'
    """
    return f"{PREFIX}{group}/{key.removeprefix(PREFIX)}"


def ungrouped(key: str) -> str:
    """``key`` without its parameter group: ``entk/<group>/<name>`` -> ``entk/<name>``.

    Example:
        >>> ungrouped(of_group("unembed", KERNEL_VELOCITY)) == ungrouped(KERNEL_VELOCITY)
        True
    """
    return PREFIX + key.rsplit("/", 1)[-1]


def readout_group(group_of: Mapping[str, str]) -> str:
    """The readout among parameter groups (parameter name -> group, in the model's parameter
    order): the group of the last parameter, the output layer or the unembedding in the
    models people write.

    Example:
        >>> readout_group({"layer1.weight": "layer1", "layer2.weight": "layer2"})
        'layer2'
    """
    return group_of[next(reversed(group_of))]
