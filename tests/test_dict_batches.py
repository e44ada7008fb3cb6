"""End to end: ``ENTKMonitor()`` with no arguments on a LightningModule fed dict batches, as a
Hugging Face model and dataset are, with a model that takes keyword inputs and returns an
object with ``.logits``."""

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torchmetrics.classification import MulticlassAccuracy
from trainers import quick_trainer
from user_models import HFStyleClassifier

from lightning_entk import ENTKMonitor

VOCAB, LENGTH, LABELS = 12, 6, 3


class TokenDataset(Dataset):
    """Items ``{"input_ids", "attention_mask", "labels", "text"}``: the label is the most
    common of the first three tokens modulo 3; some sequences are padded."""

    def __init__(self, size: int, seed: int):
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, VOCAB, (size, LENGTH), generator=generator)
        self.mask = torch.ones(size, LENGTH, dtype=torch.long)
        self.mask[::3, -2:] = 0
        self.ids[self.mask == 0] = 0
        self.labels = self.ids[:, :3].sum(1) % LABELS

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {
            "input_ids": self.ids[i],
            "attention_mask": self.mask[i],
            "labels": self.labels[i],
            "text": f"sequence {i}",  # a non-tensor column, as tokenised datasets keep
        }


class KeywordClassifier(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = HFStyleClassifier(vocab=VOCAB, hidden=16, num_labels=LABELS)
        self.val_acc = MulticlassAccuracy(LABELS, average="micro")

    def forward(self, input_ids, attention_mask=None):
        return self.model(input_ids=input_ids, attention_mask=attention_mask)

    def training_step(self, batch, batch_idx):
        out = self(batch["input_ids"], batch["attention_mask"])
        return F.cross_entropy(out.logits, batch["labels"])

    def validation_step(self, batch, batch_idx):
        out = self(batch["input_ids"], batch["attention_mask"])
        self.val_acc(out.logits, batch["labels"])
        self.log("val_acc", self.val_acc)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)

    def train_dataloader(self):
        return DataLoader(TokenDataset(96, seed=0), batch_size=32)

    def val_dataloader(self):
        return DataLoader(TokenDataset(48, seed=1), batch_size=48)


@pytest.mark.slow
def test_monitor_defaults_on_dict_batches_log_kernel_regression():
    L.seed_everything(0, verbose=False)
    monitor = ENTKMonitor()
    trainer = quick_trainer(max_epochs=3, callbacks=[monitor])
    trainer.fit(KeywordClassifier())
    assert set(monitor.probe.x) == {"input_ids", "attention_mask"}  # labels and text left out
    assert len(monitor.probe) == 96 + 48 and int(monitor.probe.heldout.sum()) == 48
    # The default time budget: initialization and the end of fit at least.
    assert monitor.history[0].epoch == 0 and monitor.history[-1].epoch == 3
    for record in monitor.history:
        assert 0.0 <= record.metrics["entk/kernel_regression_acc"] <= 1.0
        assert record.metrics["entk/eigenvalue/top1"] > 0


class BatchArgumentClassifier(KeywordClassifier):
    """``forward(self, batch)``: the dict batch passed whole, as many LightningModules do."""

    def forward(self, batch):
        return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch).logits, batch["labels"])

    def validation_step(self, batch, batch_idx):
        self.val_acc(self(batch).logits, batch["labels"])
        self.log("val_acc", self.val_acc)


@pytest.mark.slow
def test_monitor_defaults_on_a_forward_that_takes_the_dict_batch_whole():
    L.seed_everything(0, verbose=False)
    monitor = ENTKMonitor()
    quick_trainer(max_epochs=3, callbacks=[monitor]).fit(BatchArgumentClassifier())
    assert set(monitor.probe.x) == {"input_ids", "attention_mask"}
    assert monitor.history[0].epoch == 0 and monitor.history[-1].epoch == 3
    assert monitor.readings and all(
        -1.0 <= r.metrics["entk/sentinel/heldout_alignment"] <= 1.0 for r in monitor.readings
    )
