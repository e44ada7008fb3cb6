import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_entk import empirical_ntk
from lightning_entk.probe import (
    INPUT_KEYS,
    LABEL_KEYS,
    ProbeSet,
    as_probe_set,
    concat_points,
    draw_probe_set,
)


class DictItems(Dataset):
    """Items as dicts of per-item values, as a Hugging Face dataset in torch format gives."""

    def __init__(self, columns: dict):
        self.columns = columns
        self.size = len(next(iter(columns.values())))

    def __len__(self):
        return self.size

    def __getitem__(self, i):
        return {key: column[i] for key, column in self.columns.items()}


class Strings(Dataset):
    def __len__(self):
        return 3

    def __getitem__(self, i):
        return f"sentence {i}"


class TokenClassifier(nn.Module):
    """Takes keyword inputs like a Hugging Face model; `idx` is not one of them."""

    def __init__(self, vocab=11, classes=3):
        super().__init__()
        self.embed = nn.Embedding(vocab, 8)
        self.head = nn.Linear(8, classes)

    def forward(self, input_ids, attention_mask):
        mask = attention_mask[..., None].float()
        pooled = (self.embed(input_ids) * mask).sum(1) / mask.sum(1).clamp_min(1)
        return self.head(pooled)


def tokens(n, length=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(0, 11, (n, length), generator=g),
        "attention_mask": torch.ones(n, length, dtype=torch.long),
    }


@pytest.mark.parametrize("label_key", LABEL_KEYS)
def test_draw_probe_set_reads_the_label_of_dict_items_under_each_key(label_key):
    points = tokens(6)
    labels = torch.arange(6) % 3
    probe = draw_probe_set(DictItems({**points, label_key: labels}), None, max_points=10)
    assert set(probe.x) == {"input_ids", "attention_mask"}
    assert torch.equal(probe.x["input_ids"], points["input_ids"])
    assert torch.equal(probe.y, labels)
    assert probe.heldout is None


def test_draw_probe_set_reads_the_first_label_key_and_keeps_all_out_of_the_points():
    points = tokens(4)
    columns = {**points, "target": torch.tensor([0, 1, 0, 1]), "label": torch.tensor([2] * 4)}
    probe = draw_probe_set(DictItems(columns), None, max_points=10)
    assert torch.equal(probe.y, torch.tensor([2] * 4))  # `label` comes before `target`
    assert set(probe.x) == {"input_ids", "attention_mask"}


@pytest.mark.parametrize(
    "labels",
    [torch.linspace(0, 1, 5), torch.eye(5)[:, :3]],
    ids=["regression-targets", "one-hot-rows"],
)
def test_draw_probe_set_drops_dict_labels_that_are_not_integer_classes(labels):
    probe = draw_probe_set(DictItems({**tokens(5), "labels": labels}), None, max_points=10)
    assert probe.y is None
    assert set(probe.x) == {"input_ids", "attention_mask"}


def test_draw_probe_set_drops_non_tensor_entries_of_dict_items():
    columns = {
        **tokens(4),
        "text": [f"sentence {i}" for i in range(4)],
        "idx": list(range(4)),  # plain ints collate to a tensor: kept, a model may ignore it
        "label": torch.tensor([0, 1, 2, 0]),
    }
    probe = draw_probe_set(DictItems(columns), None, max_points=10)
    assert set(probe.x) == {"input_ids", "attention_mask", "idx"}
    assert torch.equal(probe.x["idx"], torch.arange(4))
    assert len(probe) == 4


@pytest.mark.parametrize("input_key", INPUT_KEYS)
def test_draw_probe_set_takes_a_lone_input_entry_as_the_tensor_of_points(input_key):
    x = torch.randn(6, 3)
    columns = {input_key: x, "y": torch.arange(6) % 2, "name": [str(i) for i in range(6)]}
    probe = draw_probe_set(DictItems(columns), None, max_points=10)
    assert isinstance(probe.x, torch.Tensor) and torch.equal(probe.x, x)
    assert torch.equal(probe.y, torch.arange(6) % 2)


def test_draw_probe_set_keeps_an_input_entry_beside_other_inputs_as_a_dict():
    columns = {"x": torch.randn(4, 3), "mask": torch.ones(4, 3), "y": torch.arange(4)}
    probe = draw_probe_set(DictItems(columns), None, max_points=10)
    assert set(probe.x) == {"x", "mask"}


def test_draw_probe_set_concatenates_dict_points_of_train_and_val_with_heldout_marks():
    train_points, val_points = tokens(8, seed=0), tokens(6, seed=1)
    train = DictItems({**train_points, "labels": torch.arange(8) % 3})
    # Another key order in validation: joined by key, in the training order.
    val = DictItems({"labels": torch.arange(6) % 3, **dict(reversed(val_points.items()))})
    probe = draw_probe_set(train, val, max_points=20)
    assert list(probe.x) == ["input_ids", "attention_mask"]
    for key in probe.x:
        assert torch.equal(probe.x[key], torch.cat([train_points[key], val_points[key]]))
    assert torch.equal(probe.y, torch.cat([torch.arange(8) % 3, torch.arange(6) % 3]))
    assert probe.heldout.tolist() == [False] * 8 + [True] * 6


def test_draw_probe_set_caps_dict_points_with_val_at_most_half():
    train = DictItems({**tokens(30, seed=0), "labels": torch.arange(30) % 3})
    val = DictItems({**tokens(30, seed=1), "labels": torch.arange(30) % 3})
    probe = draw_probe_set(train, val, max_points=10)
    assert len(probe) == 10 and probe.x["input_ids"].shape == (10, 5)
    assert int(probe.heldout.sum()) == 5
    assert draw_probe_set(train, val, max_points=10).x["input_ids"].equal(probe.x["input_ids"])


def test_draw_probe_set_dict_points_feed_the_kernel():
    columns = {**tokens(6), "idx": list(range(6)), "labels": torch.arange(6) % 3}
    probe = draw_probe_set(DictItems(columns), None, max_points=10)
    model = TokenClassifier()
    kernel = empirical_ntk(model, probe.x)
    inputs = {k: probe.x[k] for k in ("input_ids", "attention_mask")}
    assert torch.allclose(kernel, empirical_ntk(model, inputs))
    assert kernel.shape == (6, 6)


def test_draw_probe_set_rejects_train_and_val_dicts_with_other_keys():
    train = DictItems({**tokens(4), "labels": torch.arange(4)})
    val = DictItems({"input_ids": tokens(4)["input_ids"], "labels": torch.arange(4)})
    with pytest.raises(ValueError, match="same structure and keys"):
        draw_probe_set(train, val, max_points=8)


def test_draw_probe_set_rejects_train_and_val_of_other_per_point_shapes():
    train = DictItems({**tokens(4, length=5), "labels": torch.arange(4)})
    val = DictItems({**tokens(4, length=7), "labels": torch.arange(4)})
    with pytest.raises(ValueError, match="same per-point shape"):
        draw_probe_set(train, val, max_points=8)


def test_draw_probe_set_rejects_items_of_different_lengths_with_a_padding_hint():
    ragged = DictItems({"input_ids": [torch.arange(3), torch.arange(5)], "label": [0, 1]})
    with pytest.raises(ValueError, match="need padding"):
        draw_probe_set(ragged, None, max_points=4)


def test_draw_probe_set_rejects_an_unsupported_item_kind():
    with pytest.raises(ValueError, match=r"a dict of tensors .*pass `probe=`"):
        draw_probe_set(Strings(), None, max_points=4)


def test_draw_probe_set_rejects_dict_items_without_tensor_inputs():
    texts = DictItems({"text": ["a", "b", "c"], "label": [0, 1, 0]})
    with pytest.raises(ValueError, match=r"no tensor inputs.*\['text'\].*pass `probe=`"):
        draw_probe_set(texts, None, max_points=4)


def test_draw_probe_set_reads_tuple_items_as_before():
    x, y = torch.randn(6, 2), torch.arange(6) % 2
    probe = draw_probe_set(TensorDataset(x, y), TensorDataset(x[:2], y[:2]), max_points=8)
    assert torch.equal(probe.x, torch.cat([x, x[:2]]))
    assert torch.equal(probe.y, torch.cat([y, y[:2]]))
    assert probe.heldout.tolist() == [False] * 6 + [True] * 2


def test_draw_probe_set_reads_a_dict_beside_labels_in_tuple_items():
    points = tokens(4)

    class Pairs(Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return {k: v[i] for k, v in points.items()}, i % 2

    probe = draw_probe_set(Pairs(), None, max_points=8)
    assert set(probe.x) == set(points) and torch.equal(probe.y, torch.arange(4) % 2)


def test_as_probe_set_takes_a_dict_of_tensors_as_points_without_labels():
    points = {**tokens(5), "label": torch.arange(5)}
    probe = as_probe_set(points)
    assert probe.x is points and probe.y is None and len(probe) == 5


def test_as_probe_set_takes_a_pair_of_dict_points_and_labels():
    points = tokens(5)
    probe = as_probe_set((points, [0, 1, 2, 0, 1]))
    assert probe.x is points
    assert torch.equal(probe.y, torch.tensor([0, 1, 2, 0, 1]))


def test_as_probe_set_reads_a_dataloader_of_dict_items():
    loader = DataLoader(DictItems({**tokens(12), "labels": torch.arange(12) % 3}), batch_size=4)
    probe = as_probe_set(loader, max_points=7)
    assert len(probe) == 7 and probe.y is not None and probe.heldout is None


def test_as_probe_set_rejects_a_dict_with_non_tensor_values():
    with pytest.raises(ValueError, match="dict of such tensors"):
        as_probe_set({"input_ids": torch.zeros(3, 2, dtype=torch.long), "text": "abc"})


def test_as_probe_set_rejects_an_empty_dataset():
    with pytest.raises(ValueError, match="at least one point"):
        as_probe_set(TensorDataset(torch.zeros(0, 3)))


def test_as_probe_set_rejects_an_unsupported_kind():
    with pytest.raises(ValueError, match=r"`probe` must be .*a dict of tensors"):
        as_probe_set("data.csv")


def test_probe_set_counts_points_of_a_tuple():
    probe = ProbeSet((torch.randn(4, 2), torch.randn(4)), torch.arange(4))
    assert len(probe) == 4


def test_probe_set_rejects_leaves_of_different_lengths():
    with pytest.raises(ValueError, match="same number in each"):
        ProbeSet({"a": torch.zeros(4, 2), "b": torch.zeros(3, 2)})


def test_probe_set_rejects_labels_not_matching_dict_points():
    with pytest.raises(ValueError, match=r"`y` must have shape \(5,\)"):
        ProbeSet(tokens(5), torch.arange(4))


def test_concat_points_joins_tuples_leaf_by_leaf():
    a, b = (torch.zeros(2, 3), torch.ones(2)), (torch.ones(1, 3), torch.zeros(1))
    joined = concat_points([a, b])
    assert isinstance(joined, tuple)
    assert torch.equal(joined[0], torch.cat([a[0], b[0]]))
    assert torch.equal(joined[1], torch.cat([a[1], b[1]]))


def test_probe_set_subset_is_seeded_in_index_order_and_keeps_heldout_proportions():
    x = {"a": torch.arange(20.0)[:, None], "b": torch.arange(20)}
    heldout = torch.arange(20) >= 15
    probe = ProbeSet(x, torch.arange(20) % 3, heldout)
    small = probe.subset(8)
    assert len(small) == 8 and int(small.heldout.sum()) == 2
    kept = small.x["b"]
    assert torch.equal(kept, kept.sort().values)
    assert torch.equal(small.x["a"][:, 0], kept.float()) and torch.equal(small.y, kept % 3)
    assert torch.equal(small.heldout, kept >= 15)
    assert torch.equal(probe.subset(8).x["b"], kept)
    assert probe.subset(20) is probe


def test_probe_set_subset_keeps_one_heldout_point_of_few():
    probe = ProbeSet(torch.randn(40, 2), heldout=torch.arange(40) == 0)
    assert probe.subset(4).heldout.tolist() == [True, False, False, False]


def test_probe_set_subset_rejects_no_points():
    with pytest.raises(ValueError, match="at least one point"):
        ProbeSet(torch.randn(4, 2)).subset(0)
