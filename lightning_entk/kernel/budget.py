"""The memory budget of one evaluation, and the one place where it is divided.

:class:`MemoryBudget` says how many bytes each part of the work may take. The engine
(:func:`~lightning_entk.empirical_ntk`) holds the Jacobian factors of all points (they grow
with N; :func:`~lightning_entk.ntk_plan` counts them) and the kernel, and does the rest in
*pieces*, one at a time, each freed before the next:

    ``piece``          a quarter: one capture pass (output gradients of a chunk of points),
                       one block of generic Jacobian columns, one block of Gram rows over
                       all pairs of positions
    ``column_piece``   an eighth: the Jacobian of a parameter with several layouts (other
                       than a view and its transpose), formed from its factors a chunk of
                       points at a time

The monitor gives the engine half of its budget (:meth:`engine_share`) and keeps the other
half for an evaluation's dense kernel work (:meth:`dense_kernel_bytes`): the kernel in its
own dtype, a float64 copy, the eigenvectors, the previous kernel kept for the velocity, and
one kernel per parameter group. :func:`~lightning_entk.ntk_plan` predicts with the same
numbers that the engine spends.
"""

from __future__ import annotations

from dataclasses import dataclass

from lightning_entk.checks import check_int

DEFAULT_MEMORY_BUDGET = 2 * 2**30  # bytes for everything one evaluation allocates


@dataclass(frozen=True)
class MemoryBudget:
    """Bytes for one computation, and their shares.

    Example:
        >>> budget = MemoryBudget(2**30)
        >>> budget.piece == 2**28, budget.engine_share().total == 2**29
        (True, True)
        >>> MemoryBudget.dense_kernel_bytes(rows=1000, num_groups=2)
        48000000
    """

    total: int = DEFAULT_MEMORY_BUDGET

    def __post_init__(self) -> None:
        check_int("memory_budget", self.total, words="a positive int of bytes")

    @property
    def piece(self) -> int:
        """Bytes of one piece of work: a capture pass, a block of generic columns or of Gram
        rows."""
        return self.total // 4

    @property
    def column_piece(self) -> int:
        """Bytes of one chunk of a several-layout parameter's Jacobian formed from factors."""
        return self.total // 8

    def engine_share(self) -> MemoryBudget:
        """What a monitor's evaluation gives the engine: half; the other half is for the dense
        kernel work (:meth:`dense_kernel_bytes`)."""
        return MemoryBudget(self.total // 2)

    @staticmethod
    def dense_kernel_bytes(rows: int, num_groups: int = 0) -> int:
        """Memory of one evaluation's dense kernel work on ``rows`` kernel rows: the kernel, a
        float64 copy, eigenvectors and the previous kernel, and the kernels of ``num_groups``
        parameter groups: ``4 + num_groups`` float64 ``rows x rows`` arrays."""
        return (4 + num_groups) * 8 * rows**2
