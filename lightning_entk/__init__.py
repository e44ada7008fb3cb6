"""lightning_entk: the empirical neural tangent kernel of a model, watched while it trains.

The functional core (kernel, spectrum, cliffs, alignment) needs only torch, numpy and scipy;
``ENTKMonitor`` (the Lightning callback) is imported on first use.
"""

from lightning_entk.alignment import feature_alignment, subspace_overlap, symmetry_rotation
from lightning_entk.cliffs import Cliff, find_cliffs
from lightning_entk.early_warning import EarlyWarning, PhaseTransition
from lightning_entk.kernel import NTKMethod, empirical_ntk, ntk_plan
from lightning_entk.probe import ProbeSet
from lightning_entk.schedule import FixedCadence, TimeBudget
from lightning_entk.spectrum import Spectrum, ntk_spectrum

__all__ = [
    "Cliff",
    "ENTKMonitor",
    "EarlyWarning",
    "FixedCadence",
    "NTKMethod",
    "PhaseTransition",
    "ProbeSet",
    "Spectrum",
    "TimeBudget",
    "empirical_ntk",
    "feature_alignment",
    "find_cliffs",
    "ntk_plan",
    "ntk_spectrum",
    "subspace_overlap",
    "symmetry_rotation",
]


def __getattr__(name: str):
    if name == "ENTKMonitor":
        from lightning_entk.callback import ENTKMonitor

        return ENTKMonitor
    raise AttributeError(f"module 'lightning_entk' has no attribute {name!r}")
