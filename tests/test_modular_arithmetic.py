import math

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn
from trainers import quick_trainer

from example_modules.modular_arithmetic import (
    FAMILIES,
    ModularArithmeticDataModule,
    ModularArithmeticMLP,
    fourier_features,
    grid_pairs,
)
from lightning_entk import empirical_ntk


def reference_fourier(p, family):
    """cos/sin columns built pair by pair with numpy, pair (a, b) at row a * p + b."""
    a, b = np.divmod(np.arange(p * p), p)
    v = {"a": a, "b": b, "sum": a + b, "diff": a - b}[family]
    return np.stack(
        [f(2 * np.pi * k * v / p) for k in range(1, p // 2 + 1) for f in (np.cos, np.sin)], axis=1
    )


def all_families(p):
    return torch.cat([fourier_features(p, f) for f in FAMILIES], dim=1)


def test_datamodule_grid_ordering():
    p = 5
    x, y = ModularArithmeticDataModule(p=p).grid()
    assert x.shape == (p * p, 2 * p) and x.dtype == torch.float32
    assert y.shape == (p * p,) and y.dtype == torch.int64
    for a in range(p):
        for b in range(p):
            expected = torch.zeros(2 * p)
            expected[a] = expected[p + b] = 1
            torch.testing.assert_close(x[a * p + b], expected)
            assert y[a * p + b] == (a + b) % p


def test_datamodule_split_disjoint_and_covering():
    p = 7
    data = ModularArithmeticDataModule(p=p, train_fraction=0.7, seed=3)
    train, val = set(data.train_indices.tolist()), set(data.val_indices.tolist())
    assert not train & val
    assert train | val == set(range(p * p))
    assert len(train) == round(0.7 * p * p)
    assert data.train_indices.tolist() == sorted(train)


def test_datamodule_split_depends_on_seed_only():
    torch.manual_seed(123)
    first = ModularArithmeticDataModule(p=7, seed=1)
    torch.manual_seed(456)
    again = ModularArithmeticDataModule(p=7, seed=1)
    other = ModularArithmeticDataModule(p=7, seed=2)
    assert torch.equal(first.train_indices, again.train_indices)
    assert not torch.equal(first.train_indices, other.train_indices)


def test_datamodule_datasets_are_grid_rows():
    data = ModularArithmeticDataModule(p=6, train_fraction=0.5)
    x, y = data.grid()
    for dataset, indices in (
        (data.train_set, data.train_indices),
        (data.val_set, data.val_indices),
    ):
        xs, ys = dataset.tensors
        torch.testing.assert_close(xs, x[indices])
        torch.testing.assert_close(ys, y[indices])


def test_datamodule_loaders_full_batch_by_default():
    data = ModularArithmeticDataModule(p=7, train_fraction=0.7)
    (train_batch,) = list(data.train_dataloader())
    (val_batch,) = list(data.val_dataloader())
    assert train_batch[0].shape == (len(data.train_indices), 14)
    assert val_batch[0].shape == (len(data.val_indices), 14)


def test_datamodule_loaders_honour_batch_size():
    data = ModularArithmeticDataModule(p=7, batch_size=8)
    sizes = [len(batch[1]) for batch in data.train_dataloader()]
    assert sizes[0] == 8 and sum(sizes) == len(data.train_indices)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"p": 1}, "`p` must be an int >= 2, got 1"),
        ({"p": 5.0}, "`p` must be an int >= 2, got 5.0"),
        ({"train_fraction": 0.0}, r"`train_fraction` must be a number in \(0, 1\), got 0.0"),
        ({"train_fraction": 1.5}, r"`train_fraction` must be a number in \(0, 1\), got 1.5"),
        ({"p": 2, "train_fraction": 0.1}, "`train_fraction` must leave at least one"),
        ({"seed": -1}, "`seed` must be an int >= 0, got -1"),
        ({"batch_size": 0}, "`batch_size` must be an int >= 1, got 0"),
    ],
)
def test_datamodule_invalid_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ModularArithmeticDataModule(**kwargs)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("p", [5, 6])
def test_fourier_features_match_reference(p, family):
    features = fourier_features(p, family)
    assert features.shape == (p * p, 2 * (p // 2)) and features.dtype == torch.float64
    torch.testing.assert_close(features, torch.from_numpy(reference_fourier(p, family)))


@pytest.mark.parametrize("p", [5, 29])
def test_fourier_features_all_families_orthogonal_for_odd_p(p):
    features = all_families(p)
    assert features.shape[1] == 4 * 2 * (p // 2)
    gram = features.T @ features
    torch.testing.assert_close(gram, torch.eye(len(gram), dtype=torch.float64) * p * p / 2)


def test_fourier_features_even_p_degenerate_only_at_nyquist():
    p = 6
    k = p // 2
    cos_col, sin_col = 2 * (k - 1), 2 * (k - 1) + 1
    families = {f: fourier_features(p, f) for f in FAMILIES}
    for features in families.values():
        torch.testing.assert_close(features[:, sin_col], torch.zeros(p * p, dtype=torch.float64))
    torch.testing.assert_close(families["sum"][:, cos_col], families["diff"][:, cos_col])
    # Apart from those, every column is orthogonal to every other, norm^2 p^2 / 2 (p^2 for the
    # Nyquist cosine, which is +-1 everywhere).
    kept = [f[:, [c for c in range(f.shape[1]) if c != sin_col]] for f in families.values()]
    kept[3] = kept[3][:, :-1]  # the diff Nyquist cosine, a copy of the sum one
    columns = torch.cat(kept, dim=1)
    gram = columns.T @ columns
    expected = torch.full((len(gram),), p * p / 2, dtype=torch.float64)
    nyquist = [(i + 1) * (2 * k - 1) - 1 for i in range(3)]
    expected[nyquist] = p * p
    torch.testing.assert_close(gram, torch.diag(expected))


def test_fourier_features_invalid_arguments_raise():
    with pytest.raises(ValueError, match=r"`family` must be one of \('a', 'b', 'sum', 'diff'\)"):
        fourier_features(5, "product")
    with pytest.raises(ValueError, match="`p` must be an int >= 2, got 1"):
        fourier_features(1, "a")


def test_mlp_forward_matches_formula():
    p, n = 5, 16
    model = ModularArithmeticMLP(p=p, hidden=n).double()
    x, _ = ModularArithmeticDataModule(p=p).grid()
    x = x.double()
    w1, w2 = model.layer1.weight, model.layer2.weight
    expected = ((x @ w1.T / math.sqrt(2 * p)) ** 2) @ w2.T / n
    out = model(x)
    assert out.shape == (p * p, p)
    torch.testing.assert_close(out, expected)


def test_mlp_layers_bias_free_standard_normal():
    model = ModularArithmeticMLP()
    assert isinstance(model.layer1, nn.Linear) and isinstance(model.layer2, nn.Linear)
    assert model.layer1.bias is None and model.layer2.bias is None
    assert model.layer1.weight.shape == (512, 58) and model.layer2.weight.shape == (29, 512)
    for weight in (model.layer1.weight, model.layer2.weight):
        assert abs(weight.mean().item()) < 0.02
        assert weight.std().item() == pytest.approx(1.0, abs=0.02)


def test_mlp_structured_kernel_matches_jacobian():
    model = ModularArithmeticMLP(p=5, hidden=8).double()
    x, _ = ModularArithmeticDataModule(p=5).grid()
    structured = empirical_ntk(model, x.double(), method="structured")
    reference = empirical_ntk(model, x.double(), method="jacobian")
    torch.testing.assert_close(structured, reference)


def test_mlp_ground_truth_trace_matches_fourier_features():
    p = 7
    model = ModularArithmeticMLP(p=p, hidden=8)
    x, _ = ModularArithmeticDataModule(p=p).grid()
    rows = torch.tensor([40, 3, 17, 0])
    truth = model.entk_ground_truth(x.double()[rows], "trace")
    assert set(truth) == set(FAMILIES)
    assert model.entk_feature_pairs is True
    for family, features in truth.items():
        torch.testing.assert_close(features, fourier_features(p, family)[rows])


def test_mlp_ground_truth_follows_input_dtype():
    model = ModularArithmeticMLP(p=5, hidden=8)
    x, _ = ModularArithmeticDataModule(p=5).grid()
    assert all(f.dtype == torch.float32 for f in model.entk_ground_truth(x, "trace").values())


def test_mlp_ground_truth_other_modes_empty_and_shape_checked():
    model = ModularArithmeticMLP(p=5, hidden=8)
    x, _ = ModularArithmeticDataModule(p=5).grid()
    assert model.entk_ground_truth(x, "flatten") == {}
    with pytest.raises(ValueError, match=r"`x` must be one-hot pairs of shape \(N, 10\)"):
        model.entk_ground_truth(x[:, :7], "trace")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"p": 0}, "`p` must be an int >= 2, got 0"),
        ({"hidden": 0}, "`hidden` must be an int >= 1, got 0"),
        ({"lr": 0.0}, "`lr` must be a finite number > 0, got 0.0"),
        ({"lr": float("nan")}, "`lr` must be a finite number > 0, got nan"),
        ({"weight_decay": -0.1}, "`weight_decay` must be a finite number >= 0, got -0.1"),
    ],
)
def test_mlp_invalid_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ModularArithmeticMLP(**kwargs)


def test_mlp_trainer_logs_metrics():
    model = ModularArithmeticMLP(p=7, hidden=32)
    trainer = quick_trainer(max_epochs=2)
    trainer.fit(model, datamodule=ModularArithmeticDataModule(p=7))
    for key in ("train_loss", "train_acc", "val_loss", "val_acc"):
        assert key in trainer.callback_metrics
    assert 0 <= trainer.callback_metrics["val_acc"] <= 1
    assert model.hparams.p == 7 and model.hparams.weight_decay == 0.01


@pytest.mark.slow
def test_mlp_groks_with_paper_setup():
    """docs/design.md: 100% test accuracy by epoch 200 (here ~1.0 by epoch 110)."""
    L.seed_everything(0, verbose=False)
    trainer = quick_trainer(max_epochs=300)
    trainer.fit(ModularArithmeticMLP(), datamodule=ModularArithmeticDataModule())
    assert trainer.callback_metrics["val_acc"] >= 0.95


@pytest.mark.parametrize("p", [5, 8])
def test_datamodule_group_swaps_keeps_each_pair_with_its_swap(p):
    data = ModularArithmeticDataModule(p=p, train_fraction=0.4, seed=3, group_swaps=True)
    a, b = grid_pairs(p)
    trained = torch.zeros(p * p, dtype=torch.bool)
    trained[data.train_indices] = True
    assert torch.equal(trained, trained[b * p + a])  # (a, b) and (b, a) on one side
    assert torch.equal(
        torch.cat([data.train_indices, data.val_indices]).sort().values, torch.arange(p * p)
    )
    assert round(0.4 * p * p) - 1 <= len(data.train_indices) <= round(0.4 * p * p)
    other = ModularArithmeticDataModule(p=p, train_fraction=0.4, seed=4, group_swaps=True)
    assert not torch.equal(other.train_indices, data.train_indices)  # seeded


def test_datamodule_shuffle_labels_permutes_training_labels_only():
    data = ModularArithmeticDataModule(p=11, seed=2, shuffle_labels=True)
    plain = ModularArithmeticDataModule(p=11, seed=2)
    assert torch.equal(data.train_indices, plain.train_indices)  # the same split
    assert torch.equal(data.train_set.tensors[0], plain.train_set.tensors[0])
    shuffled, true = data.train_set.tensors[1], plain.train_set.tensors[1]
    assert torch.equal(shuffled.sort().values, true.sort().values)  # the same labels
    assert (shuffled != true).double().mean() > 0.8  # mostly moved
    assert torch.equal(data.val_set.tensors[1], plain.val_set.tensors[1])  # true labels
    again = ModularArithmeticDataModule(p=11, seed=2, shuffle_labels=True)
    assert torch.equal(again.train_set.tensors[1], shuffled)  # seeded
