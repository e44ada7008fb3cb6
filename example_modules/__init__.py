"""The two experiments of Lin, "Feature Identification via the Empirical NTK" (arXiv:2510.00468),
as LightningModules and LightningDataModules with known ground-truth features.

    modular_arithmetic   a two-layer MLP that groks addition mod p (after Gromov 2023)
    toy_superposition    the Toy Model of Superposition (Elhage et al. 2022)

Both expose ``entk_ground_truth(x, mode) -> dict[str, Tensor]`` for
:class:`~lightning_entk.callback.ENTKMonitor`'s alignment heatmaps.
"""
