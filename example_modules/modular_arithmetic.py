"""Modular addition with a two-layer quadratic MLP that groks (docs/design.md).

The setup of Lin, "Feature Identification via the Empirical NTK" (arXiv:2510.00468, section 4),
after Gromov, "Grokking modular arithmetic" (arXiv:2301.02679): inputs
``concat(onehot(a), onehot(b))`` of size ``2p``, target ``(a + b) mod p``,

    f(x) = (1/n) W2 ((W1 x / sqrt(2p))^2),     W1 (n, 2p), W2 (p, n), no biases, W ~ N(0, 1)

trained with MSE on one-hot targets and full-batch AdamW on 70% of the ``p^2`` pairs. With the
defaults (p=29, n=512, lr 0.05, weight decay 0.01) validation accuracy jumps from chance to 100%
between about epoch 70 and 200.

Grid layout: all ``p^2`` pairs, pair ``(a, b)`` at row ``a * p + b`` (:meth:`grid`).

Fourier features (:func:`fourier_features`): for a family ``"a"``, ``"b"``, ``"sum"`` (a + b) or
``"diff"`` (a - b) with value ``v``, the ``2 * floor(p / 2)`` columns

    column 2(k-1)     cos(2 pi k v / p)
    column 2(k-1)+1   sin(2 pi k v / p)          k = 1 .. floor(p / 2)

so consecutive columns ``(2j, 2j+1)`` are the cos/sin pair of frequency ``j + 1``. The constant
(k = 0) is left out. For odd ``p`` all ``4 * 2 * floor(p / 2)`` columns are mutually orthogonal
on the grid, each of squared norm ``p^2 / 2``; in the paper, the eNTK's first cliff is aligned
with families ``a`` and ``b``, the cliff that appears at grokking with ``sum`` and ``diff``. For
even ``p`` the sine of frequency ``p / 2`` vanishes and the cosines of frequency ``p / 2`` of
``sum`` and ``diff`` coincide (both are ``(-1)^(a+b)``).

Ground-truth protocol, read by :class:`~lightning_entk.callback.ENTKMonitor`:

    ``model.entk_ground_truth(x, mode) -> dict[str, Tensor]``
        for probe points ``x`` ``(N, 2p)`` and ``mode="trace"``, one ``(N, F)`` matrix per
        family (``F = 2 * floor(p / 2)``), row ``n`` the family's features at point ``n``;
        ``{}`` for other modes.
    ``model.entk_feature_pairs = True``
        consecutive feature columns ``(2j, 2j+1)`` are the cos/sin pair of one frequency.

Run the demo (training with the monitor and TensorBoard logs, see ``example_modules.demo``)::

    python -m example_modules.modular_arithmetic
"""

from __future__ import annotations

import math

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from example_modules import demo
from lightning_entk.callback import ENTKMonitor
from lightning_entk.checks import check_int, check_number

FAMILIES = ("a", "b", "sum", "diff")


def _fourier_columns(values: Tensor, p: int, dtype: torch.dtype) -> Tensor:
    """``(N, 2 * floor(p / 2))`` interleaved cos/sin columns of integer ``values`` ``(N,)``."""
    k = torch.arange(1, p // 2 + 1, device=values.device)
    # Reduce k * v mod p in integers first, so the angle is exact for any v (negative too).
    angle = (2 * math.pi / p) * torch.remainder(values[:, None] * k, p).to(dtype)
    return torch.stack([torch.cos(angle), torch.sin(angle)], dim=-1).flatten(1)


def _family_values(a: Tensor, b: Tensor, family: str) -> Tensor:
    if family not in FAMILIES:
        raise ValueError(f"`family` must be one of {FAMILIES}, got {family!r}.")
    return {"a": a, "b": b, "sum": a + b, "diff": a - b}[family]


def grid_pairs(p: int) -> tuple[Tensor, Tensor]:
    """``a`` and ``b`` ``(p^2,)`` of the grid, pair ``(a, b)`` at row ``a * p + b``."""
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    return a.flatten(), b.flatten()


def fourier_families(a: Tensor, b: Tensor, p: int, dtype: torch.dtype) -> dict[str, Tensor]:
    """The Fourier features of every family at pairs ``(a, b)`` (``(N,)`` integers each):
    ``{"a", "b", "sum", "diff"}`` to ``(N, 2 * floor(p / 2))`` matrices in ``dtype``, columns as
    in :func:`fourier_features`. The ground truth of both modular-addition examples."""
    return {f: _fourier_columns(_family_values(a, b, f), p, dtype) for f in FAMILIES}


def fourier_features(p: int, family: str) -> Tensor:
    """The Fourier features of one family on the full grid, ``(p^2, 2 * floor(p / 2))`` float64.

    Row ``a * p + b`` is the pair ``(a, b)``; columns ``2(k-1)`` and ``2(k-1)+1`` are
    ``cos(2 pi k v / p)`` and ``sin(2 pi k v / p)`` for ``k = 1 .. floor(p / 2)``, with ``v`` the
    family's value: ``a``, ``b``, ``a + b`` (``"sum"``) or ``a - b`` (``"diff"``).

    Args:
        p: the modulus, ``>= 2``.
        family: ``"a"``, ``"b"``, ``"sum"`` or ``"diff"``.

    Raises:
        ValueError: for ``p < 2`` or an unknown family.

    Example:
        >>> fourier_features(5, "sum").shape
        torch.Size([25, 4])
        >>> fourier_features(5, "a")[5:7, :2]  # rows (1, 0), (1, 1): cos, sin of 2 pi / 5
        tensor([[0.3090, 0.9511],
                [0.3090, 0.9511]], dtype=torch.float64)
    """
    check_int("p", p, 2)
    a, b = grid_pairs(p)
    return _fourier_columns(_family_values(a, b, family), p, torch.float64)


def _swap_grouped_split(p: int, n_train: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Sorted training and validation rows of :meth:`ModularArithmeticDataModule.grid` with
    ``(a, b)`` and ``(b, a)`` on the same side: the unordered pairs in a seeded order, training
    taking the first of them whose ordered pairs number at most ``n_train``."""
    a, b = grid_pairs(p)
    keys = torch.minimum(a, b) * p + torch.maximum(a, b)  # one per unordered pair
    unique = keys.unique()
    shuffled = unique[torch.randperm(len(unique), generator=generator)]
    sizes = torch.where(shuffled // p == shuffled % p, 1, 2)
    train = torch.isin(keys, shuffled[sizes.cumsum(0) <= n_train])
    return train.nonzero().flatten(), (~train).nonzero().flatten()


class ModularArithmeticDataModule(L.LightningDataModule):
    """All ``p^2`` pairs ``(a, b)`` with label ``(a + b) mod p``, split at random into training
    and held-out validation points; full-batch loaders by default.

    Points are ``concat(onehot(a), onehot(b))`` float32 ``(2p,)``, labels int64 class indices.
    The split is fixed at construction by ``seed`` (independent of the global RNG);
    :attr:`train_indices` and :attr:`val_indices` are sorted row indices into :meth:`grid`.

    Args:
        p: the modulus, ``>= 2``. The paper's 29.
        train_fraction: share of the pairs used for training, in ``(0, 1)``; both splits must
            keep at least one pair. The paper's 0.7.
        seed: seed of the random split.
        batch_size: points per batch; ``None`` (the paper's full batch) for the whole split.
        group_swaps: split unordered pairs, so that ``(a, b)`` and ``(b, a)`` fall on the same
            side: then no held-out pair can be answered from its trained swap by
            commutativity, and validation accuracy measures the addition itself. The training
            split is then the first unordered pairs, in the seeded order, that fit
            ``train_fraction`` of the ``p^2`` pairs.
        shuffle_labels: permute the training labels among the training pairs (seeded by
            ``seed``), for a control run that memorises but has nothing to generalise:
            validation keeps the true labels.

    Raises:
        ValueError: for an argument out of range.

    Example:
        >>> data = ModularArithmeticDataModule(p=5, train_fraction=0.6)
        >>> len(data.train_indices), len(data.val_indices)
        (15, 10)
        >>> x, y = data.grid()
        >>> x.shape, y[2 * 5 + 4].item()  # pair (2, 4)
        (torch.Size([25, 10]), 1)
    """

    def __init__(
        self,
        p: int = 29,
        train_fraction: float = 0.7,
        seed: int = 0,
        batch_size: int | None = None,
        group_swaps: bool = False,
        shuffle_labels: bool = False,
    ) -> None:
        super().__init__()
        check_int("p", p, 2)
        check_number("train_fraction", train_fraction, 0, 1)
        n_train = round(train_fraction * p * p)
        if not 0 < n_train < p * p:
            raise ValueError(
                f"`train_fraction` must leave at least one of the {p * p} pairs in each split, "
                f"got {train_fraction!r} ({n_train} training pairs)."
            )
        check_int("seed", seed, 0)
        if batch_size is not None:
            check_int("batch_size", batch_size)
        self.save_hyperparameters()
        self.p = p
        self.batch_size = batch_size
        generator = torch.Generator().manual_seed(seed)
        if group_swaps:
            self.train_indices, self.val_indices = _swap_grouped_split(p, n_train, generator)
            if len(self.train_indices) == 0:
                raise ValueError(
                    f"`train_fraction` must leave room for one unordered pair in training with "
                    f"`group_swaps`, got {train_fraction!r}."
                )
        else:
            order = torch.randperm(p * p, generator=generator)
            self.train_indices: Tensor = order[:n_train].sort().values
            self.val_indices: Tensor = order[n_train:].sort().values
        x, y = self.grid()
        train_labels = y[self.train_indices]
        if shuffle_labels:
            train_labels = train_labels[torch.randperm(len(train_labels), generator=generator)]
        self.train_set = TensorDataset(x[self.train_indices], train_labels)
        self.val_set = TensorDataset(x[self.val_indices], y[self.val_indices])

    def grid(self) -> tuple[Tensor, Tensor]:
        """All pairs: ``x`` ``(p^2, 2p)`` float32 and ``y`` ``(p^2,)`` int64, pair ``(a, b)`` at
        row ``a * p + b``."""
        p = self.p
        a, b = grid_pairs(p)
        x = torch.cat([F.one_hot(a, p), F.one_hot(b, p)], dim=1).float()
        return x, (a + b) % p

    def _loader(self, dataset: TensorDataset, shuffle: bool) -> DataLoader:
        if self.batch_size is None:
            return DataLoader(dataset, batch_size=len(dataset))
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)


class ModularClassifier(L.LightningModule):
    """Training and validation steps shared by the modular-addition examples: a subclass sets
    ``self.p`` and defines ``forward`` and ``loss(out, y)``; the steps log ``train_loss``,
    ``train_acc``, ``val_loss`` and ``val_acc`` per epoch (``val_acc`` on the progress bar)."""

    entk_feature_pairs = True

    def __init__(self, p: int) -> None:
        super().__init__()
        self.p = p
        self.train_acc = MulticlassAccuracy(num_classes=p, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=p, average="micro")

    def loss(self, out: Tensor, y: Tensor) -> Tensor:
        raise NotImplementedError

    def _step(
        self, batch: tuple[Tensor, Tensor], stage: str, accuracy: MulticlassAccuracy
    ) -> tuple[Tensor, Tensor]:
        """Log the loss and accuracy of a batch; return the loss and the outputs."""
        x, y = batch
        out = self(x)
        loss = self.loss(out, y)
        accuracy(out, y)
        self.log(f"{stage}_loss", loss, on_step=False, on_epoch=True)
        self.log(f"{stage}_acc", accuracy, on_step=False, on_epoch=True, prog_bar=stage == "val")
        return loss, out

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train", self.train_acc)[0]

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._step(batch, "val", self.val_acc)


class ModularArithmeticMLP(ModularClassifier):
    """``f(x) = (1/n) W2 ((W1 x / sqrt(2p))^2)`` for addition mod ``p``, trained with MSE on
    one-hot targets and AdamW (Gromov 2023, arXiv:2301.02679; Lin 2025, arXiv:2510.00468).

    ``W1`` and ``W2`` are bias-free ``nn.Linear`` layers (``layer1``, ``layer2``) with weights
    drawn from N(0, 1); the ``1/sqrt(2p)`` and ``1/n`` scales are applied in :meth:`forward` (a
    mean-field parametrization). Logs ``train_loss``, ``train_acc``, ``val_loss`` and ``val_acc``
    per epoch (``val_acc`` on the progress bar). Exposes the ground truth of the module
    docstring: :meth:`entk_ground_truth` and ``entk_feature_pairs = True``.

    Args:
        p: the modulus, ``>= 2``; inputs ``(N, 2p)``, outputs ``(N, p)``. The paper's 29.
        hidden: width ``n`` of the hidden layer. The paper's 512.
        lr: AdamW learning rate. The paper's 0.05.
        weight_decay: AdamW weight decay. The paper's 0.01.

    Raises:
        ValueError: for an argument out of range.

    Example:
        >>> model = ModularArithmeticMLP(p=5, hidden=16)
        >>> model(torch.zeros(3, 10)).shape
        torch.Size([3, 5])
    """

    def __init__(
        self, p: int = 29, hidden: int = 512, lr: float = 0.05, weight_decay: float = 0.01
    ) -> None:
        check_int("p", p, 2)
        super().__init__(p)
        check_int("hidden", hidden)
        check_number("lr", lr, words="a finite number > 0")
        check_number("weight_decay", weight_decay, 0, interval="[)", words="a finite number >= 0")
        self.save_hyperparameters()
        self.hidden = hidden
        self.layer1 = nn.Linear(2 * p, hidden, bias=False)
        self.layer2 = nn.Linear(hidden, p, bias=False)
        nn.init.normal_(self.layer1.weight)
        nn.init.normal_(self.layer2.weight)

    def forward(self, x: Tensor) -> Tensor:
        """``(N, 2p)`` points to ``(N, p)`` outputs."""
        h = self.layer1(x) / math.sqrt(2 * self.p)
        return self.layer2(h * h) / self.hidden

    def loss(self, out: Tensor, y: Tensor) -> Tensor:
        """MSE against one-hot targets."""
        return F.mse_loss(out, F.one_hot(y, self.p).to(out.dtype))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(
            self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay
        )

    def entk_ground_truth(self, x: Tensor, mode: str) -> dict[str, Tensor]:
        """The Fourier features of every family at probe points ``x`` ``(N, 2p)``.

        Returns:
            For ``mode="trace"``, ``{"a", "b", "sum", "diff"}`` to ``(N, 2 * floor(p / 2))``
            matrices (row ``n`` = point ``n``, columns as in :func:`fourier_features`), in
            ``x``'s floating dtype on ``x``'s device; ``{}`` for other modes, whose rows are
            not points.

        Raises:
            ValueError: if ``x`` is not ``(N, 2p)``.
        """
        if x.ndim != 2 or x.shape[1] != 2 * self.p:
            raise ValueError(
                f"`x` must be one-hot pairs of shape (N, {2 * self.p}), got {tuple(x.shape)}."
            )
        if mode != "trace":
            return {}
        a, b = x[:, : self.p].argmax(dim=1), x[:, self.p :].argmax(dim=1)
        dtype = x.dtype if x.is_floating_point() else torch.get_default_dtype()
        return fourier_families(a, b, self.p, dtype)


def main(args: list[str] | None = None) -> ENTKMonitor:
    """The demo: train :class:`ModularArithmeticMLP` (the paper's setup, 300 epochs) with
    :class:`~lightning_entk.callback.ENTKMonitor` and a TensorBoard logger, then print the
    summary; ``args`` as on the command line (``None``: ``sys.argv``). Returns the monitor."""
    return demo.main(
        args, ModularArithmeticMLP, ModularArithmeticDataModule, name="modular_arithmetic",
        max_epochs=300,
    )  # fmt: skip


if __name__ == "__main__":
    main()
