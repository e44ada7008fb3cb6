"""The Toy Model of Superposition (Elhage et al. 2022) on a fixed dataset (docs/design.md).

The setup of Lin, "Feature Identification via the Empirical NTK" (arXiv:2510.00468, section 3):
``n`` sparse features squeezed through ``m < n`` hidden dimensions and read back,

    y = ReLU(W^T W x + b),     W (m, n) xavier-normal, b (n,) = 0

with loss ``mean_i I^i (x_i - y_i)^2`` (also averaged over samples), importance ``I = 0.8``, and
5000 full-batch Adam steps at lr 1e-3 on ``N = 500`` fixed samples. Each feature is 0 with
probability ``S`` (the sparsity) and uniform in ``[0, 1]`` otherwise; each sample is then
L2-normalised. Feature ``i`` counts as reconstructed when ``(W^T W)_ii >= 0.75``; the paper reports
10, 21 and 42 features for ``(m, S) = (10, 0.3), (10, 0.9), (40, 0.9)``.

The eNTK outputs are the ``C = n`` reconstructed features; the paper also rescales output ``c``
by ``I^(beta c / 2)`` (:meth:`ToyModelOfSuperposition.importance_weights`, to be passed as
``output_weights``), with beta in {0, 0.3, 1}.

Ground-truth protocol, read by :class:`~lightning_entk.callback.ENTKMonitor`:

    ``model.entk_ground_truth(x, mode) -> dict[str, Tensor]``
        ``{"features": ...}`` for probe points ``x`` ``(N, n)``: for ``mode="flatten"`` the
        ``(C*N, n)`` matrix whose column ``i`` holds ``x[:, i]`` in class block ``i`` (rows
        ``i*N .. i*N + N - 1``, the class-major layout of the flattened kernel) and zeros
        elsewhere: feature ``i`` as it appears in output ``i``; for ``mode="trace"`` the
        ``(N, n)`` matrix ``x`` itself; ``{}`` for other modes.
    ``model.entk_feature_pairs = False``
        each column is a feature of its own.
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_entk.checks import check_int, check_number

RECONSTRUCTED_THRESHOLD = 0.75
"""``(W^T W)_ii`` at or above which feature ``i`` counts as reconstructed (arXiv:2510.00468)."""


class SuperpositionDataModule(L.LightningDataModule):
    """``n_samples`` fixed sparse samples ``(N, n)``, served as one full batch for training.

    Each feature is 0 with probability ``sparsity`` and uniform in ``[0, 1]`` otherwise; each
    sample is then scaled to unit L2 norm (a sample with no feature present stays zero). The
    samples are drawn at construction from ``seed`` (independent of the global RNG) and exposed
    as :attr:`x`. There is no validation loader: the paper measures the model on its weights
    (:meth:`ToyModelOfSuperposition.reconstructed_features`) and takes the eNTK on the training
    set, which is what :class:`~lightning_entk.callback.ENTKMonitor` then draws its probe from.

    Args:
        n_features: number of features ``n``. The paper's 50.
        sparsity: probability ``S`` that a feature is 0, in ``[0, 1)``. The paper's 0.3 or 0.9.
        n_samples: number of samples ``N``. The paper's 500.
        seed: seed of the samples.

    Raises:
        ValueError: for an argument out of range.

    Example:
        >>> data = SuperpositionDataModule(n_features=5, sparsity=0.5, n_samples=4)
        >>> data.x.shape
        torch.Size([4, 5])
    """

    def __init__(
        self, n_features: int = 50, sparsity: float = 0.9, n_samples: int = 500, seed: int = 0
    ) -> None:
        super().__init__()
        check_int("n_features", n_features)
        check_number("sparsity", sparsity, 0, 1, "[)")
        check_int("n_samples", n_samples)
        check_int("seed", seed, 0)
        self.save_hyperparameters()
        generator = torch.Generator().manual_seed(seed)
        values = torch.rand(n_samples, n_features, generator=generator)
        present = torch.rand(n_samples, n_features, generator=generator) >= sparsity
        x = values * present
        self.x: Tensor = x / x.norm(dim=1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x), batch_size=len(self.x))


class ToyModelOfSuperposition(L.LightningModule):
    """``y = ReLU(W^T W x + b)`` trained to reconstruct its input under an importance-weighted
    MSE (Elhage et al. 2022; Lin 2025, arXiv:2510.00468).

    ``W`` ``(m, n)`` is xavier-normal and ``b`` ``(n,)`` zero, both plain parameters (``W`` is
    used twice per forward pass). Logs ``train_loss`` and ``n_reconstructed`` (see
    :meth:`reconstructed_features`) per epoch, one full-batch step each with
    :class:`SuperpositionDataModule`. Exposes the ground truth of the module docstring:
    :meth:`entk_ground_truth` and ``entk_feature_pairs = False``.

    Args:
        n_features: number of features ``n`` (inputs and outputs, ``C = n``). The paper's 50.
        n_hidden: hidden dimension ``m``. The paper's 10 or 40.
        importance: ``I`` in ``(0, 1]``; feature ``i`` weighs ``I^i`` in the loss. The paper's 0.8.
        lr: Adam learning rate. The paper's 1e-3.

    Raises:
        ValueError: for an argument out of range.

    Example:
        >>> model = ToyModelOfSuperposition(n_features=5, n_hidden=2)
        >>> model(torch.rand(3, 5)).shape
        torch.Size([3, 5])
        >>> model.importance_weights(1.0)
        tensor([1.0000, 0.8944, 0.8000, 0.7155, 0.6400])
    """

    entk_feature_pairs = False

    def __init__(
        self, n_features: int = 50, n_hidden: int = 10, importance: float = 0.8, lr: float = 1e-3
    ) -> None:
        super().__init__()
        check_int("n_features", n_features)
        check_int("n_hidden", n_hidden)
        check_number("importance", importance, 0, 1, "(]")
        check_number("lr", lr, words="a number in (0, inf)")
        self.save_hyperparameters()
        self.W = nn.Parameter(nn.init.xavier_normal_(torch.empty(n_hidden, n_features)))
        self.b = nn.Parameter(torch.zeros(n_features))
        self.register_buffer(
            "loss_weights", importance ** torch.arange(n_features).float(), persistent=False
        )

    def forward(self, x: Tensor) -> Tensor:
        """``(N, n)`` samples to ``(N, n)`` reconstructions."""
        return F.relu(x @ self.W.T @ self.W + self.b)

    def importance_weights(self, beta: float) -> Tensor:
        """``(n,)`` weights ``I^(beta i / 2)``, ``i = 0 .. n-1``: the paper's importance rescaling
        of the eNTK outputs (pass as ``output_weights``), on ``W``'s device and dtype."""
        return self.loss_weights.to(self.W.dtype) ** (beta / 2)

    def _reconstructed(self) -> Tensor:
        return (self.W.detach().square().sum(dim=0) >= RECONSTRUCTED_THRESHOLD).sum()

    def reconstructed_features(self) -> int:
        """Number of features ``i`` with ``(W^T W)_ii >= 0.75``."""
        return int(self._reconstructed())

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        (x,) = batch
        loss = (self.loss_weights * (x - self(x)).square()).mean()
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        # A tensor, not an int: no device synchronisation on every step.
        self.log("n_reconstructed", self._reconstructed().float(), on_step=False, on_epoch=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)

    def entk_ground_truth(self, x: Tensor, mode: str) -> dict[str, Tensor]:
        """The features at probe points ``x`` ``(N, n)``, in the layout of the kernel's rows.

        Returns:
            ``{"features": (C*N, n)}`` for ``mode="flatten"`` (column ``i`` is ``x[:, i]`` in
            rows ``i*N .. i*N + N - 1``, zero elsewhere), ``{"features": x}`` ``(N, n)`` for
            ``mode="trace"``, ``{}`` for other modes.

        Raises:
            ValueError: if ``x`` is not ``(N, n)``.
        """
        n = self.hparams.n_features
        if x.ndim != 2 or x.shape[1] != n:
            raise ValueError(f"`x` must be samples of shape (N, {n}), got {tuple(x.shape)}.")
        if mode == "trace":
            return {"features": x}
        if mode == "flatten":
            eye = torch.eye(n, dtype=x.dtype, device=x.device)
            return {"features": (x.T[:, :, None] * eye[:, None, :]).reshape(n * len(x), n)}
        return {}
