"""lightning_entk: the empirical neural tangent kernel of a model, watched while it trains."""

from lightning_entk.kernel import NTKMethod, empirical_ntk
from lightning_entk.spectrum import Spectrum, ntk_spectrum

__all__ = ["NTKMethod", "Spectrum", "empirical_ntk", "ntk_spectrum"]
