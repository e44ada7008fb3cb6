import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import EarlyStopping
from torch import nn
from trainers import quick_trainer

from example_modules.modular_arithmetic import (
    FAMILIES,
    ModularArithmeticDataModule,
    fourier_features,
)
from example_modules.modular_transformer import ModularTransformer, ModularTransformerDataModule
from lightning_entk import empirical_ntk
from lightning_entk.callback import ENTKMonitor
from lightning_entk.kernel import KernelOptions
from lightning_entk.kernel.context import ntk_context

from reference import brute_force_ntk

RTOL = 1e-10  # float64 throughout: agreement to round-off, far inside the 1e-6 contract
TINY = {"p": 5, "d_model": 8, "d_mlp": 16, "n_heads": 2}


def assert_relative_close(actual, expected, rtol=RTOL):
    err = torch.linalg.vector_norm(actual - expected) / torch.linalg.vector_norm(expected)
    assert actual.shape == expected.shape
    assert err < rtol, f"relative error {err:.2e}"


def tiny_transformer(seed=0):
    torch.manual_seed(seed)
    return ModularTransformer(**TINY).double()


def paper_forward(model, tokens):
    """The paper's formulation: every position computed, a causal mask, logits at position 2.
    Per-head weights ``(H, d_head, d_model)`` as in its notebook."""
    h = model.hparams.n_heads
    d = model.hparams.d_model
    w_q, w_k, w_v = (m.weight.reshape(h, d // h, d) for m in (model.query, model.key, model.value))
    x = model.embed.weight[tokens] + model.pos_embed.weight
    q, k, v = (torch.einsum("nhm,bsm->bsnh", w, x) for w in (w_q, w_k, w_v))
    scores = torch.einsum("bqnh,bknh->bnqk", q, k) / math.sqrt(d // h)
    causal = torch.triu(torch.ones(3, 3, dtype=torch.bool), diagonal=1)
    pattern = scores.masked_fill(causal, float("-inf")).softmax(dim=-1)
    z = torch.einsum("bnqk,bknh->bqnh", pattern, v).flatten(2)
    x = x + z @ model.attn_out.weight.T
    x = x + F.relu(x @ model.mlp_in.weight.T) @ model.mlp_out.weight.T
    return (x @ model.unembed.weight.T)[:, 2]


# ---------------------------------------------------------------------------------------------
# Data


def test_datamodule_grid_ordering():
    p = 5
    x, y = ModularTransformerDataModule(p=p).grid()
    assert x.shape == (p * p, 3) and x.dtype == torch.int64
    assert y.shape == (p * p,) and y.dtype == torch.int64
    for a in range(p):
        for b in range(p):
            assert x[a * p + b].tolist() == [a, b, p]
            assert y[a * p + b] == (a + b) % p


def test_datamodule_split_shared_with_arithmetic_datamodule():
    data = ModularTransformerDataModule(p=7, train_fraction=0.5, seed=3)
    mlp_data = ModularArithmeticDataModule(p=7, train_fraction=0.5, seed=3)
    assert torch.equal(data.train_indices, mlp_data.train_indices)
    assert torch.equal(data.val_indices, mlp_data.val_indices)
    assert len(data.train_indices) == round(0.5 * 49)
    x, y = data.grid()
    for dataset, indices in (
        (data.train_set, data.train_indices),
        (data.val_set, data.val_indices),
    ):
        xs, ys = dataset.tensors[:2]
        assert torch.equal(xs, x[indices]) and torch.equal(ys, y[indices])


def test_datamodule_defaults_are_the_full_batch_grokking_setup():
    data = ModularTransformerDataModule()
    assert (data.p, data.batch_size) == (59, None)
    assert len(data.train_indices) == 1044 and len(data.val_indices) == 2437
    assert data.hparams.train_fraction == 0.3
    (batch,) = list(data.train_dataloader())
    assert len(batch[0]) == 1044
    # at train fraction 0.3 memorised swaps can answer about 30% of the held-out pairs
    assert data.val_set.tensors[2].double().mean() == pytest.approx(0.3, abs=0.02)


def test_datamodule_loaders_shuffled_minibatches_and_full_validation():
    data = ModularTransformerDataModule(p=11, batch_size=16)
    torch.manual_seed(0)
    first = list(data.train_dataloader())
    second = list(data.train_dataloader())
    assert [len(y) for _, y in first[:-1]] == [16] * (len(first) - 1)
    order = torch.cat([x for x, _ in first])
    assert not torch.equal(order, torch.cat([x for x, _ in second]))
    rows = data.train_set.tensors[0]
    assert len(order) == len(rows) and set(map(tuple, order.tolist())) == set(
        map(tuple, rows.tolist())
    )
    (val_batch,) = list(data.val_dataloader())
    assert torch.equal(val_batch[0], data.val_set.tensors[0])


def test_datamodule_flags_held_out_pairs_whose_swap_is_trained():
    data = ModularTransformerDataModule(p=11, seed=4)
    trained = {tuple(t[:2].tolist()) for t in data.train_set.tensors[0]}
    tokens, _, swap_trained = data.val_set.tensors
    expected = [(b, a) in trained for a, b, _ in tokens.tolist()]
    assert swap_trained.tolist() == expected
    assert 0 < swap_trained.sum() < len(swap_trained)


def test_datamodule_group_swaps_leaves_no_held_out_pair_with_a_trained_swap():
    data = ModularTransformerDataModule(p=11, seed=4, train_fraction=0.3, group_swaps=True)
    assert not data.val_set.tensors[2].any()


def test_datamodule_full_batch_training():
    data = ModularTransformerDataModule(p=7, batch_size=None)
    (batch,) = list(data.train_dataloader())
    assert batch[0].shape == (len(data.train_indices), 3)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"p": 1}, "`p` must be an int >= 2, got 1"),
        ({"train_fraction": 1.0}, r"`train_fraction` must be a number in \(0, 1\), got 1.0"),
        ({"batch_size": 0}, "`batch_size` must be an int >= 1, got 0"),
        ({"seed": -2}, "`seed` must be an int >= 0, got -2"),
    ],
)
def test_datamodule_invalid_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ModularTransformerDataModule(**kwargs)


# ---------------------------------------------------------------------------------------------
# Model


def test_transformer_forward_matches_paper_formulation():
    model = tiny_transformer()
    x, _ = ModularTransformerDataModule(p=5).grid()
    out = model(x)
    assert out.shape == (25, 5) and out.dtype == torch.float64
    torch.testing.assert_close(out, paper_forward(model, x))


def test_transformer_attention_depends_on_every_position():
    model = tiny_transformer()
    x, _ = ModularTransformerDataModule(p=5).grid()
    for column in (0, 1):
        changed = x.clone()
        changed[:, column] = (changed[:, column] + 1) % 5
        assert (model(changed) - model(x)).abs().amin(dim=1).gt(0).all()


def test_transformer_layers_bias_free_with_paper_initialisation():
    torch.manual_seed(0)
    model = ModularTransformer()  # p=59, d_model 128, d_mlp 512
    expected = {
        "embed": (60, 128, 128),
        "pos_embed": (3, 128, 128),
        "query": (128, 128, 128),
        "key": (128, 128, 128),
        "value": (128, 128, 128),
        "attn_out": (128, 128, 128),
        "mlp_in": (512, 128, 512),
        "mlp_out": (128, 512, 128),
        "unembed": (59, 128, 60),
    }
    params = dict(model.named_parameters())
    assert set(params) == {f"{name}.weight" for name in expected}
    for name, (rows, columns, fan) in expected.items():
        weight = params[f"{name}.weight"]
        assert weight.shape == (rows, columns)
        tolerance = 4 / math.sqrt(2 * weight.numel())  # ~4 standard errors of a sample std
        assert weight.std().item() * math.sqrt(fan) == pytest.approx(1.0, abs=tolerance)
    assert isinstance(model.pos_embed, nn.Embedding) and isinstance(model.query, nn.Linear)


def test_transformer_optimizer_is_full_batch_grokking_adamw():
    (group,) = ModularTransformer().configure_optimizers().param_groups
    assert (group["lr"], group["weight_decay"], group["betas"]) == (1e-2, 1.0, (0.9, 0.98))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"p": 1}, "`p` must be an int >= 2, got 1"),
        ({"d_model": 0}, "`d_model` must be an int >= 1, got 0"),
        ({"d_mlp": 2.5}, "`d_mlp` must be an int >= 1, got 2.5"),
        ({"n_heads": 3}, "`n_heads` must divide `d_model`, got n_heads=3 and d_model=128"),
        ({"lr": -1.0}, "`lr` must be a finite number > 0, got -1.0"),
        ({"weight_decay": float("inf")}, "`weight_decay` must be a finite number >= 0, got inf"),
        ({"betas": (0.9, 1.0)}, r"`betas` must be two numbers in \[0, 1\), got \(0.9, 1.0\)"),
        ({"betas": (0.9,)}, r"`betas` must be two numbers in \[0, 1\), got \(0.9,\)"),
    ],
)
def test_transformer_invalid_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ModularTransformer(**kwargs)


# ---------------------------------------------------------------------------------------------
# eNTK


@pytest.mark.parametrize("method", ["auto", "structured", "jacobian"])
@pytest.mark.parametrize("mode", ["trace", "full"])
def test_transformer_kernel_matches_brute_force(mode, method):
    model = tiny_transformer()
    x, _ = ModularTransformerDataModule(p=5).grid()
    x1, x2 = x[::2], x[1::3]
    assert_relative_close(
        empirical_ntk(model, x1, mode=mode, method=method), brute_force_ntk(model, x1, mode=mode)
    )
    assert_relative_close(
        empirical_ntk(model, x1, x2, mode=mode, method=method),
        brute_force_ntk(model, x1, x2, mode=mode),
    )


def test_transformer_kernel_structured_covers_every_parameter():
    model = tiny_transformer()
    x, _ = ModularTransformerDataModule(p=5).grid()
    with ntk_context(model, x, None, KernelOptions(method="structured")) as ctx:
        jacobian = ctx.jacobian(ctx.x1)
        structure = ctx.structure(ctx.x1)
        assert structure.generic == {}
        assert sorted(structure.structured) == sorted(n for n, _ in model.named_parameters())
    assert jacobian.num_parameters == sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# Ground truth


def test_transformer_ground_truth_trace_matches_fourier_features():
    p = 7
    model = ModularTransformer(p=p, d_model=8, d_mlp=8, n_heads=2)
    x, _ = ModularTransformerDataModule(p=p).grid()
    rows = torch.tensor([40, 3, 17, 0])
    truth = model.entk_ground_truth(x[rows], "trace")
    assert set(truth) == set(FAMILIES)
    assert model.entk_feature_pairs is True
    for family, features in truth.items():
        assert features.dtype == torch.get_default_dtype()
        torch.testing.assert_close(features, fourier_features(p, family)[rows].float())


def test_transformer_ground_truth_other_modes_empty_and_shape_checked():
    model = ModularTransformer(**TINY)
    x, _ = ModularTransformerDataModule(p=5).grid()
    assert model.entk_ground_truth(x, "flatten") == {}
    with pytest.raises(ValueError, match=r"`x` must be integer tokens \[a, b, 5\] of shape"):
        model.entk_ground_truth(x[:, :2], "trace")
    with pytest.raises(ValueError, match=r"`x` must be integer tokens"):
        model.entk_ground_truth(x.float(), "trace")


# ---------------------------------------------------------------------------------------------
# Training


def test_transformer_trainer_logs_metrics_and_learns():
    L.seed_everything(0, verbose=False)
    model = ModularTransformer(p=7, d_model=16, d_mlp=32, n_heads=2, lr=1e-2, weight_decay=0.0)
    trainer = quick_trainer(max_epochs=30)
    data = ModularTransformerDataModule(p=7, train_fraction=0.5, batch_size=8)
    trainer.fit(model, datamodule=data)
    for key in ("train_loss", "train_acc", "val_loss", "val_acc"):
        assert key in trainer.callback_metrics
    assert 0 <= trainer.callback_metrics["val_acc"] <= 1
    assert trainer.callback_metrics["train_acc"] >= 0.9  # 24 training pairs memorised
    assert model.hparams.p == 7 and model.hparams.weight_decay == 0.0


def test_transformer_validation_splits_accuracy_by_swap():
    L.seed_everything(0, verbose=False)
    data = ModularTransformerDataModule(p=7, train_fraction=0.5, batch_size=8)
    model = ModularTransformer(p=7, d_model=16, d_mlp=32, n_heads=2, lr=1e-2)
    trainer = quick_trainer(max_epochs=20)
    trainer.fit(model, datamodule=data)
    x, y, swap_trained = data.val_set.tensors
    with torch.no_grad():
        correct = (model(x).argmax(-1) == y).double()
    metrics = trainer.callback_metrics
    assert metrics["val_acc_swap_seen"].item() == pytest.approx(correct[swap_trained].mean())
    assert metrics["val_acc_swap_unseen"].item() == pytest.approx(correct[~swap_trained].mean())
    assert metrics["val_acc"].item() == pytest.approx(correct.mean())


def test_transformer_with_monitor_records_spectra_and_alignment(tmp_path):
    L.seed_everything(0, verbose=False)
    model = ModularTransformer(p=7, d_model=16, d_mlp=32, n_heads=2)
    monitor = ENTKMonitor(every_n_epochs=1, image_every_n_evaluations=0)
    trainer = quick_trainer(max_epochs=2, callbacks=[monitor], default_root_dir=tmp_path)
    data = ModularTransformerDataModule(p=7, train_fraction=0.5, batch_size=8)
    trainer.fit(model, datamodule=data)
    assert [r.epoch for r in monitor.history] == [0, 1, 2]
    assert len(monitor.probe) == 49 and monitor.probe.heldout.sum() == 25
    for record in monitor.history:
        assert len(record.eigenvalues) == 49 and record.eigenvalues[0] > 0
        assert {f"entk/overlap/{f}" for f in FAMILIES} <= set(record.metrics)
    assert "entk/kernel_regression_acc" in monitor.history[-1].metrics


@pytest.mark.slow
def test_transformer_groks_with_default_setup():
    """Seed 4 reaches val_acc 0.5 at epoch 876 (module docstring) and 0.95 soon after, where
    memorised swaps alone would score about 0.3."""
    L.seed_everything(4, verbose=False)
    stop = EarlyStopping("val_acc", mode="max", stopping_threshold=0.95, patience=10**6)
    trainer = quick_trainer(max_epochs=1100, callbacks=[stop])
    trainer.fit(ModularTransformer(), datamodule=ModularTransformerDataModule(seed=4))
    assert trainer.callback_metrics["val_acc"] >= 0.95
    assert trainer.callback_metrics["train_acc"] == 1.0
