"""Grokking setups beyond the bundled models, each a small LightningModule on its own data, with
a control that never generalises: the development suite on which the early warning and the
forecast are chosen and scored (docs/early_warning.md). Not part of the package.

Every setup trains full-batch with AdamW and cross-entropy; the network's last module is its
readout (``readout``, a linear layer), whose input is the penultimate representation that ILDR
reads. Each logs ``train_acc`` and ``val_acc``, ``val_loss``.

=================  ======================================================  ==================
setup              task, network (after)                                   control
=================  ======================================================  ==================
``modsub``         (a - b) mod 47, embeddings + GELU MLP (Power et al.     shuffled labels
                   2022, arXiv:2201.02177; Nanda et al. 2023)
``s4``             composition in S_4, embeddings + ReLU MLP (Chughtai     shuffled labels
                   et al. 2023, arXiv:2302.03025)
``digits``         scikit-learn's 8x8 digits, 3-layer MLP initialised      shuffled labels
                   8x larger (Omnigrok, arXiv:2210.01117)
``parity``         (3, 24) sparse parity, 2-class ReLU MLP (Barak et al.   too little data
                   2022, arXiv:2207.08799)
``mul_ln``         (a b) mod 31, 3-layer MLP with LayerNorm     shuffled labels
=================  ======================================================  ==================

``parity`` has two classes, so chance is 0.5: its generalisation level is val_acc 0.75 (half
way from chance to 1); every other setup's is 0.5 (:data:`LEVEL`).
"""

from __future__ import annotations

import itertools
import math

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

SETUPS = ("modsub", "s4", "digits", "parity", "mul_ln")
LEVEL = {"parity": 0.75}  # val_acc that counts as generalised; 0.5 elsewhere
CONTROL = {
    "modsub": "shuffled",
    "s4": "shuffled",
    "digits": "shuffled",
    "parity": "little data",
    "mul_ln": "shuffled",
}


# Per setup: learning rate, weight decay, training share (points for digits and parity).
SETTINGS = {
    "modsub": {"lr": 1e-2, "weight_decay": 1.0, "train": 0.5},
    "s4": {"lr": 1e-2, "weight_decay": 1.0, "train": 0.7},
    "digits": {"lr": 1e-3, "weight_decay": 0.5, "train": 300, "scale": 8.0, "mse": True},
    "parity": {"lr": 3e-3, "weight_decay": 1.0, "train": 1000, "control_train": 200, "bits": 24},
    "mul_ln": {"lr": 3e-3, "weight_decay": 1.0, "train": 0.7},
}


def level(setup: str) -> float:
    return LEVEL.get(setup, 0.5)


class SuiteModule(L.LightningModule):
    """Cross-entropy, full-batch AdamW; ``net`` maps inputs to the penultimate features and
    ``readout`` to the logits."""

    def __init__(
        self, net: nn.Module, width: int, classes: int, lr: float, weight_decay: float,
        mse: bool = False,
    ):  # fmt: skip
        super().__init__()
        self.net = net
        self.mse = mse
        self.readout = nn.Linear(width, classes)
        self.lr, self.weight_decay = lr, weight_decay

    def forward(self, x):
        return self.readout(self.net(x))

    def _step(self, batch, prefix: str):
        x, y = batch
        logits = self(x)
        loss = self.loss(logits, y)
        acc = (logits.argmax(-1) == y).float().mean()
        self.log(f"{prefix}_loss", loss, on_epoch=True, on_step=False)
        self.log(f"{prefix}_acc", acc, on_epoch=True, on_step=False, prog_bar=prefix == "val")
        return loss

    def loss(self, logits, y):
        if self.mse:  # Omnigrok's loss on one-hot targets
            return F.mse_loss(logits, F.one_hot(y, logits.shape[-1]).to(logits.dtype))
        return F.cross_entropy(logits, y)

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def configure_optimizers(self):
        return torch.optim.AdamW(
            self.parameters(), lr=self.lr, weight_decay=self.weight_decay, betas=(0.9, 0.98)
        )


class PairEmbedding(nn.Module):
    """Two tokens ``(N, 2)`` -> their embeddings side by side ``(N, 2 d)``."""

    def __init__(self, tokens: int, dim: int):
        super().__init__()
        self.embed = nn.Embedding(tokens, dim)

    def forward(self, x):
        return self.embed(x).flatten(1)


class FullBatchData(L.LightningDataModule):
    def __init__(self, x, y, train_index, val_index):
        super().__init__()
        self.train_set = TensorDataset(x[train_index], y[train_index])
        self.val_set = TensorDataset(x[val_index], y[val_index])

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=len(self.train_set), shuffle=False)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=len(self.val_set), shuffle=False)


def _split(n: int, train: int, generator) -> tuple:
    order = torch.randperm(n, generator=generator)
    return order[:train], order[train:]


def _data(x, y, train: int, seed: int, shuffle: bool) -> FullBatchData:
    g = torch.Generator().manual_seed(seed)
    train_index, val_index = _split(len(x), train, g)
    y = y.clone()
    if shuffle:  # the training labels permuted among the training points
        y[train_index] = y[train_index][torch.randperm(len(train_index), generator=g)]
    return FullBatchData(x, y, train_index, val_index)


def _pairs(p: int):
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    return torch.stack([a.flatten(), b.flatten()], 1)


def _permutations(n: int):
    perms = list(itertools.permutations(range(n)))
    index = {q: i for i, q in enumerate(perms)}
    pairs, labels = [], []
    for i, p in enumerate(perms):
        for j, q in enumerate(perms):
            pairs.append((i, j))
            labels.append(index[tuple(p[k] for k in q)])  # p after q
    return len(perms), torch.tensor(pairs), torch.tensor(labels)


def build(setup: str, seed: int, control: bool = False) -> tuple[L.LightningModule, FullBatchData]:
    """The network (seeded by ``seed``) and data (split by ``seed``) of ``setup``; ``control``:
    its control run instead."""
    torch.manual_seed(seed)
    s = SETTINGS[setup]
    shuffle = control and CONTROL[setup] == "shuffled"
    if setup == "modsub":
        p = 47
        x = _pairs(p)
        y = (x[:, 0] - x[:, 1]) % p
        net = nn.Sequential(PairEmbedding(p, 64), nn.Linear(128, 256), nn.GELU())
        model = SuiteModule(net, 256, p, s["lr"], s["weight_decay"])
        return model, _data(x, y, int(s["train"] * p * p), seed, shuffle)
    if setup == "s4":
        n, x, y = _permutations(4)
        net = nn.Sequential(PairEmbedding(n, 64), nn.Linear(128, 256), nn.ReLU())
        model = SuiteModule(net, 256, n, s["lr"], s["weight_decay"])
        return model, _data(x, y, int(s["train"] * n * n), seed, shuffle)
    if setup == "digits":
        try:
            from sklearn.datasets import load_digits
        except ImportError as err:
            raise SystemExit(
                "The digits setup needs scikit-learn (its bundled 8x8 digits): "
                "pip install scikit-learn"
            ) from err
        digits = load_digits()
        x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
        y = torch.tensor(digits.target)
        net = nn.Sequential(nn.Linear(64, 200), nn.ReLU(), nn.Linear(200, 200), nn.ReLU())
        model = SuiteModule(net, 200, 10, s["lr"], s["weight_decay"], mse=s["mse"])
        with torch.no_grad():  # Omnigrok's large initialisation
            for p_ in model.parameters():
                p_.mul_(s["scale"])
        return model, _data(x, y, s["train"], seed, shuffle)
    if setup == "parity":
        bits, k = s["bits"], 3
        g = torch.Generator().manual_seed(10_000 + seed)
        train = s["control_train"] if control else s["train"]
        x = torch.randint(0, 2, (train + 1000, bits), generator=g).float() * 2 - 1
        y = (x[:, :k].prod(1) < 0).long()
        net = nn.Sequential(nn.Linear(bits, 256), nn.ReLU())
        model = SuiteModule(net, 256, 2, s["lr"], s["weight_decay"])
        return model, _data(x, y, train, seed, False)
    if setup == "mul_ln":
        p = 31
        x = _pairs(p)
        y = (x[:, 0] * x[:, 1]) % p
        net = nn.Sequential(
            PairEmbedding(p, 64),
            nn.Linear(128, 256), nn.LayerNorm(256), nn.GELU(),
            nn.Linear(256, 256), nn.LayerNorm(256), nn.GELU(),
        )  # fmt: skip
        model = SuiteModule(net, 256, p, s["lr"], s["weight_decay"])
        return model, _data(x, y, int(s["train"] * p * p), seed, shuffle)
    raise ValueError(f"unknown setup {setup!r}; one of {SETUPS}")


def penultimate(model: SuiteModule, x) -> torch.Tensor:
    """The readout's input on ``x``, in eval mode, without gradients."""
    was = model.training
    model.eval()
    with torch.no_grad():
        h = model.net(x)
    model.train(was)
    return h


def ildr(features: torch.Tensor, labels: torch.Tensor) -> float:
    """ILDR (arXiv:2604.20923): the mean distance between class centroids over the mean
    distance of a point to its class's centroid."""
    classes = labels.unique()
    if len(classes) < 2:
        return math.nan
    centroids = torch.stack([features[labels == c].mean(0) for c in classes])
    intra = torch.cat(
        [(features[labels == c] - centroids[i]).norm(dim=1) for i, c in enumerate(classes)]
    ).mean()
    inter = torch.pdist(centroids).mean()
    return float(inter / intra.clamp_min(1e-12))
