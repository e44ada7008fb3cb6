"""The label signals: how a kernel lines up with the labels, and how far it moved. Pure
functions of kernels and targets, read by a full evaluation
(:mod:`~lightning_entk.evaluation`) and by the sentinel
(:mod:`~lightning_entk.monitor.sentinel`) alike.

    kernel_target_alignment     centred alignment with the labels' ``Y Y^T``
    debiased_alignment          the same from unbiased HSIC estimates: 0 by chance at any N
    kernel_regression_accuracy  eNTK kernel regression on held-out points (arXiv:2510.00468)
    kernel_velocity             how far a kernel's direction moved
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_entk.cliffs import FLOAT32_ROUND_OFF

MIN_DEBIASED_POINTS = 4  # the unbiased HSIC estimate divides by N (N - 3)
# Eigenvalues of a kernel computed in this dtype that are below this share of the largest are
# round-off (see cliffs.py): kernel regression ignores their directions.
ROUND_OFF_RTOL = {torch.float32: FLOAT32_ROUND_OFF, torch.float64: 1e-13}


def kernel_velocity(previous: Tensor, current: Tensor) -> float:
    """``|| K_t / ||K_t||_F - K_s / ||K_s||_F ||_F``: 0 for kernels equal up to scale, at most 2."""
    a = previous.to(current) / torch.linalg.matrix_norm(previous)
    b = current / torch.linalg.matrix_norm(current)
    return float(torch.linalg.matrix_norm(a - b))


def kernel_target_alignment(kernel: Tensor, targets: Tensor) -> float:
    """Centred kernel-target alignment (Cortes, Mohri & Rostamizadeh 2012, eq. 3) of an
    (N, N) kernel with one-hot targets (N, C): ``<HKH, HYY^TH>_F / (|HKH|_F |HYY^TH|_F)``."""
    centred_k = kernel - kernel.mean(0, keepdim=True) - kernel.mean(1, keepdim=True) + kernel.mean()
    y = targets - targets.mean(0, keepdim=True)
    ideal = y @ y.T
    return float(
        (centred_k * ideal).sum()
        / (torch.linalg.matrix_norm(centred_k) * torch.linalg.matrix_norm(ideal))
    )


def debiased_alignment(kernel: Tensor, targets: Tensor) -> float:
    """Kernel-target alignment from unbiased HSIC estimates (Song et al. 2012, JMLR 13, eq. 5;
    "debiased CKA"): ``HSIC1(K, L) / sqrt(HSIC1(K, K) HSIC1(L, L))`` with ``L = Y Y^T``.

    :func:`kernel_target_alignment` of a kernel unrelated to the labels is not 0 but about
    ``1/N`` times a constant, so its level, and any ratio to its level, depends on how many
    points there are. Here the numerator is an unbiased estimate, 0 in expectation for such a
    kernel at every ``N``; a kernel that separates the classes scores near 1, and the estimate
    can fall below 0 (a kernel that sets same-label points apart). Needs
    ``N >= MIN_DEBIASED_POINTS``; computed in float64.
    """
    n = kernel.shape[0]
    if n < MIN_DEBIASED_POINTS:
        raise ValueError(f"debiased alignment needs >= {MIN_DEBIASED_POINTS} points, got {n}.")
    k = kernel.to(torch.float64)
    ideal = _label_kernel(targets.to(torch.float64))

    def statistics(a: Tensor) -> tuple[Tensor, Tensor]:
        """The diagonal and the row sums off it."""
        diagonal = torch.diagonal(a)
        return diagonal, a.sum(1) - diagonal

    def hsic(a: Tensor, b: Tensor, a_stats, b_stats) -> Tensor:
        """The unbiased estimate from sums over the off-diagonal entries of ``a`` and ``b``
        (symmetric), without forming them: one pass over ``a * b``."""
        (a_diag, a_rows), (b_diag, b_rows) = a_stats, b_stats
        off_diagonal = torch.vdot(a.flatten(), b.flatten()) - a_diag @ b_diag
        return (
            off_diagonal
            + a_rows.sum() * b_rows.sum() / ((n - 1) * (n - 2))
            - 2 * (a_rows @ b_rows) / (n - 2)
        ) / (n * (n - 3))

    k_stats, ideal_stats = statistics(k), statistics(ideal)
    scale = torch.sqrt(hsic(k, k, k_stats, k_stats) * hsic(ideal, ideal, ideal_stats, ideal_stats))
    return float(hsic(k, ideal, k_stats, ideal_stats) / scale) if scale > 0 else 0.0


def _label_kernel(targets: Tensor) -> Tensor:
    """``Y Y^T`` of targets ``(N, C)``: for one-hot rows, whether two labels are equal (one
    comparison per pair instead of C products)."""
    one_hot = bool(((targets == 0) | (targets == 1)).all() and (targets.sum(1) == 1).all())
    if one_hot:
        labels = targets.argmax(1)
        return (labels[:, None] == labels[None, :]).to(targets.dtype)
    return targets @ targets.T


def kernel_regression_accuracy(
    kernel: Tensor, targets: Tensor, heldout: Tensor, rtol: float = ROUND_OFF_RTOL[torch.float32]
) -> float:
    """Accuracy on the held-out points of eNTK kernel regression from the others,
    ``f(x) = K(x, X) K(X, X)^+ Y`` (arXiv:2510.00468 eq. 1).

    ``K(X, X)^+`` is the pseudo-inverse without the eigen-directions below ``rtol`` times its
    largest eigenvalue: a kernel of rank below the number of points (a layer narrower than the
    probe set) has only round-off there, which an inverse would amplify into the prediction.
    ``rtol``: the round-off level of the dtype the kernel was computed in
    (:data:`ROUND_OFF_RTOL`), not of the dtype it is handed over in.
    """
    train = ~heldout
    k_tt = kernel[train][:, train]
    coefficients = torch.linalg.pinv(k_tt, rtol=rtol, hermitian=True) @ targets[train]
    predictions = kernel[heldout][:, train] @ coefficients
    return float((predictions.argmax(1) == targets[heldout].argmax(1)).to(torch.float64).mean())
