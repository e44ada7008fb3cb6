"""lightning_entk: the empirical neural tangent kernel of a model, watched while it trains.

The functional core (kernel, spectrum, cliffs, alignment) and the monitor's core
(:class:`Monitor`, for a plain training loop) need only torch, numpy, scipy and matplotlib;
``ENTKMonitor`` (the Lightning callback) is imported on first use.
"""

import logging

from lightning_entk.alignment import feature_alignment, subspace_overlap, symmetry_rotation
from lightning_entk.cliffs import Cliff, find_cliffs
from lightning_entk.early_warning import EarlyWarning, PhaseTransition
from lightning_entk.kernel import (
    KernelOptions,
    NotDifferentiableError,
    NTKMethod,
    empirical_ntk,
    ntk_plan,
)
from lightning_entk.monitor.core import Monitor
from lightning_entk.monitor.sentinel import Sentinel
from lightning_entk.probe import ProbeSet, draw_probe_set
from lightning_entk.schedule import FixedCadence, TimeBudget
from lightning_entk.spectrum import Spectrum, ntk_spectrum

__all__ = [
    "Cliff",
    "ENTKMonitor",
    "EarlyWarning",
    "FixedCadence",
    "KernelOptions",
    "Monitor",
    "NTKMethod",
    "NotDifferentiableError",
    "PhaseTransition",
    "ProbeSet",
    "Sentinel",
    "Spectrum",
    "TimeBudget",
    "draw_probe_set",
    "empirical_ntk",
    "feature_alignment",
    "find_cliffs",
    "ntk_plan",
    "ntk_spectrum",
    "subspace_overlap",
    "symmetry_rotation",
]

# The monitor's messages (its plan, its alarms) shown as Lightning shows its own: at INFO, on
# the console, unless the application configured logging itself.
_log = logging.getLogger(__name__)
_log.setLevel(logging.INFO)
if not logging.getLogger().hasHandlers():
    _log.addHandler(logging.StreamHandler())
    _log.propagate = False


def __getattr__(name: str):
    if name == "ENTKMonitor":
        from lightning_entk.callback import ENTKMonitor

        return ENTKMonitor
    raise AttributeError(f"module 'lightning_entk' has no attribute {name!r}")
