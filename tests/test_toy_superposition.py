import lightning as L
import pytest
import torch
from trainers import quick_trainer

from example_modules.toy_superposition import SuperpositionDataModule, ToyModelOfSuperposition
from lightning_entk import empirical_ntk


def test_superposition_data_rows_unit_or_zero():
    data = SuperpositionDataModule(n_features=3, sparsity=0.9, n_samples=200)
    norms = data.x.norm(dim=1)
    zero = norms == 0
    assert zero.any() and not zero.all()  # P(all three absent) = 0.729
    torch.testing.assert_close(norms[~zero], torch.ones(int((~zero).sum())))
    assert torch.isfinite(data.x).all() and (data.x >= 0).all()


def test_superposition_data_sparsity_and_shape():
    data = SuperpositionDataModule(n_features=50, sparsity=0.9, n_samples=500)
    assert data.x.shape == (500, 50) and data.x.dtype == torch.float32
    # 25000 Bernoulli(0.9) draws: standard deviation of the share ~0.002.
    assert (data.x == 0).float().mean().item() == pytest.approx(0.9, abs=0.01)
    assert (SuperpositionDataModule(sparsity=0.0).x > 0).all()


def test_superposition_data_depends_on_seed_only():
    torch.manual_seed(1)
    first = SuperpositionDataModule(n_features=10, n_samples=20, seed=4)
    torch.manual_seed(2)
    again = SuperpositionDataModule(n_features=10, n_samples=20, seed=4)
    other = SuperpositionDataModule(n_features=10, n_samples=20, seed=5)
    assert torch.equal(first.x, again.x) and not torch.equal(first.x, other.x)


def test_superposition_loader_full_batch():
    data = SuperpositionDataModule(n_features=6, n_samples=30)
    (batch,) = list(data.train_dataloader())
    torch.testing.assert_close(batch[0], data.x)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_features": 0}, "`n_features` must be an int >= 1, got 0"),
        ({"sparsity": 1.0}, r"`sparsity` must be a number in \[0, 1\), got 1.0"),
        ({"sparsity": -0.1}, r"`sparsity` must be a number in \[0, 1\), got -0.1"),
        ({"n_samples": 2.5}, "`n_samples` must be an int >= 1, got 2.5"),
        ({"seed": -3}, "`seed` must be an int >= 0, got -3"),
    ],
)
def test_superposition_data_invalid_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SuperpositionDataModule(**kwargs)


def test_tms_init_and_forward_matches_formula():
    model = ToyModelOfSuperposition(n_features=7, n_hidden=3).double()
    assert model.W.shape == (3, 7)
    torch.testing.assert_close(model.b, torch.zeros(7, dtype=torch.float64))
    with torch.no_grad():
        model.b.normal_()
    x = torch.rand(4, 7, dtype=torch.float64)
    expected = torch.relu((model.W.T @ model.W @ x.T).T + model.b)
    out = model(x)
    assert out.shape == (4, 7)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_tms_importance_weights_values(beta):
    model = ToyModelOfSuperposition(n_features=5, importance=0.8)
    expected = torch.tensor([0.8 ** (beta * i / 2) for i in range(5)])
    weights = model.importance_weights(beta)
    assert weights.shape == (5,)
    torch.testing.assert_close(weights, expected)


@pytest.mark.filterwarnings("ignore:You are trying to `self.log")
def test_tms_loss_is_importance_weighted_mse():
    model = ToyModelOfSuperposition(n_features=4, n_hidden=2, importance=0.5)
    x = torch.rand(6, 4)
    expected = (torch.tensor([1.0, 0.5, 0.25, 0.125]) * (x - model(x)) ** 2).mean()
    torch.testing.assert_close(model.training_step([x], 0), expected)


def test_tms_reconstructed_features_counts_columns():
    model = ToyModelOfSuperposition(n_features=6, n_hidden=3)
    columns = torch.tensor(
        [
            [0.5, 0.5, 0.5],  # norm^2 0.75 exactly: counts
            [1.0, 0.0, 0.0],
            [0.3, -0.9, 0.1],  # 0.91
            [0.5, 0.5, 0.49],  # 0.7401
            [0.0, 0.0, 0.0],
            [0.6, 0.0, 0.6],  # 0.72
        ]
    )
    with torch.no_grad():
        model.W.copy_(columns.T)
    assert model.reconstructed_features() == 3


def test_tms_ground_truth_flatten_is_class_major():
    n, N = 4, 5
    model = ToyModelOfSuperposition(n_features=n, n_hidden=2)
    x = torch.rand(N, n)
    (features,) = model.entk_ground_truth(x, "flatten").values()
    expected = torch.zeros(n * N, n)
    for i in range(n):
        for row in range(N):
            expected[i * N + row, i] = x[row, i]
    torch.testing.assert_close(features, expected)
    kernel = empirical_ntk(model, x, mode="flatten")
    assert features.shape[0] == kernel.shape[0]


def test_tms_ground_truth_trace_other_modes_and_shape():
    model = ToyModelOfSuperposition(n_features=4, n_hidden=2)
    x = torch.rand(5, 4)
    assert model.entk_feature_pairs is False
    torch.testing.assert_close(model.entk_ground_truth(x, "trace")["features"], x)
    assert model.entk_ground_truth(x, "full") == {}
    with pytest.raises(ValueError, match=r"`x` must be samples of shape \(N, 4\), got \(5, 3\)"):
        model.entk_ground_truth(x[:, :3], "trace")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_features": -1}, "`n_features` must be an int >= 1, got -1"),
        ({"n_hidden": 0}, "`n_hidden` must be an int >= 1, got 0"),
        ({"importance": 0.0}, r"`importance` must be a number in \(0, 1\], got 0.0"),
        ({"importance": 1.2}, r"`importance` must be a number in \(0, 1\], got 1.2"),
        ({"lr": -1e-3}, r"`lr` must be a number in \(0, inf\), got -0.001"),
    ],
)
def test_tms_invalid_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ToyModelOfSuperposition(**kwargs)


def test_tms_trainer_logs_metrics():
    model = ToyModelOfSuperposition(n_features=8, n_hidden=3)
    trainer = quick_trainer(max_steps=3)
    trainer.fit(model, datamodule=SuperpositionDataModule(n_features=8, n_samples=32))
    assert trainer.global_step == 3
    assert "train_loss" in trainer.callback_metrics
    assert trainer.callback_metrics["n_reconstructed"] == model.reconstructed_features()
    assert model.hparams.n_hidden == 3


@pytest.mark.slow
def test_tms_reconstructs_one_feature_per_dimension_at_low_sparsity():
    """docs/design.md: (m, S) = (10, 0.3) reconstructs 10 features after 5000 steps."""
    L.seed_everything(0, verbose=False)
    model = ToyModelOfSuperposition(n_hidden=10)
    quick_trainer(max_steps=5000).fit(model, datamodule=SuperpositionDataModule(sparsity=0.3))
    assert model.reconstructed_features() == 10
