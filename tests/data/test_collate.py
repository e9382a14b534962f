"""comparative_collate: shapes, padding values, errors."""

import pytest
import torch

from comparative_recipe.data import collate_padding_idx, comparative_collate


def test_shapes_and_padding_values():
    batch = [
        {"tokens": [5, 6, 7], "labels": [-100, 6, 7], "sample_id": 11, "chunk_ids": [-1, -1, -1]},
        {"tokens": [8], "labels": [8], "sample_id": 3, "chunk_ids": [-1]},
        {"tokens": [9, 10, 11, 12, 13], "labels": [-100, -100, -100, 12, 13], "sample_id": 0,
         "chunk_ids": [-1, 0, 1, -1, -1]},
    ]
    out = comparative_collate(batch, padding_idx=4, ignore_idx=-100)
    assert set(out) == {"tokens", "labels", "sample_ids", "chunk_ids"}
    assert all(t.dtype == torch.long for t in out.values())
    assert out["tokens"].tolist() == [
        [5, 6, 7, 4, 4],
        [8, 4, 4, 4, 4],
        [9, 10, 11, 12, 13],
    ]
    assert out["labels"].tolist() == [
        [-100, 6, 7, -100, -100],
        [8, -100, -100, -100, -100],
        [-100, -100, -100, 12, 13],
    ]
    assert out["chunk_ids"].tolist() == [
        [-1, -1, -1, -2, -2],
        [-1, -2, -2, -2, -2],
        [-1, 0, 1, -1, -1],
    ]
    assert out["sample_ids"].tolist() == [11, 3, 0]


def test_missing_chunk_ids_are_protected_and_class_id_collated():
    batch = [
        {"tokens": torch.tensor([1, 2]), "labels": [-100, 2], "sample_id": 0, "class_id": 1},
        {"tokens": [1, 2, 3], "labels": [-100, -100, 3], "sample_id": 1, "class_id": 0,
         "chunk_ids": [-1, 0, -1], "extra": "ignored"},
    ]
    out = comparative_collate(batch, padding_idx=0, ignore_idx=-7)
    assert out["chunk_ids"].tolist() == [[-1, -1, -2], [-1, 0, -1]]
    assert out["labels"].tolist() == [[-100, 2, -7], [-100, -100, 3]]
    assert out["class_id"].tolist() == [1, 0]
    assert out["class_id"].dtype == torch.long and out["class_id"].shape == (2,)
    assert "extra" not in out


def test_errors():
    with pytest.raises(ValueError, match="ComparativeDataset"):
        comparative_collate([{"tokens": [1], "labels": [1]}])
    with pytest.raises(ValueError, match="lengths"):
        comparative_collate([{"tokens": [1, 2], "labels": [1], "sample_id": 0}])
    with pytest.raises(ValueError, match="padding_idx"):
        comparative_collate([{"tokens": [1], "labels": [1], "sample_id": 0}], padding_idx=-1)
    with pytest.raises(ValueError, match="class_id"):
        comparative_collate(
            [
                {"tokens": [1], "labels": [1], "sample_id": 0, "class_id": 0},
                {"tokens": [1], "labels": [1], "sample_id": 1},
            ]
        )


def test_collate_padding_idx():
    class Tok:
        pad_id = -1

    assert collate_padding_idx(Tok()) == 0
    Tok.pad_id = 7
    assert collate_padding_idx(Tok()) == 7
    assert collate_padding_idx(object()) == 0
