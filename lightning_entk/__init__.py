"""lightning_entk: the empirical neural tangent kernel of a model, watched while it trains."""

from lightning_entk.kernel import NTKMethod, empirical_ntk

__all__ = ["NTKMethod", "empirical_ntk"]
