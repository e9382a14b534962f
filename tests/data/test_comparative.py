"""ComparativeDataset on hand-made items and on torchtune datasets; comparative_dataset."""

import json

import numpy as np
import pytest

from comparative_recipe.data import (
    ChunkingConfig,
    comparative_collate,
    comparative_dataset,
    ComparativeDataset,
)
from tests.data.helpers import CharTokenizer, enc, IGN, write_jsonl


def sep_sample():
    # [bos] a b \n \n c d \n \n e f | Z [eos]; trained on Z and eos
    tokens = [1] + enc("ab\n\ncd\n\nef") + enc("Z") + [2]
    labels = [IGN] * 11 + tokens[11:]
    return {"tokens": tokens, "labels": labels}


def test_window_chunks():
    tokens = [1] + enc("abcdefg") + enc("Z") + [2]
    labels = [IGN] * 8 + tokens[8:]
    ds = ComparativeDataset([{"tokens": tokens, "labels": labels}], CharTokenizer(),
                            ChunkingConfig(mode="window", window=3))
    item = ds[0]
    assert item["sample_id"] == 0
    # bos is special, "g" predicts the answer, Z and eos are labelled
    assert item["chunk_ids"] == [-1, 0, 0, 0, 1, 1, 1, -1, -1, -1]
    ds = ComparativeDataset([{"tokens": tokens, "labels": labels}], CharTokenizer(),
                            {"mode": "window", "window": 3, "protect_leading": 2,
                             "protect_trailing": 1})
    assert ds[0]["chunk_ids"] == [-1, -1, 0, 0, 0, 1, 1, -1, -1, -1]


def test_tokens_after_last_label_are_protected():
    # [bos] a b c | Z | x y : x y come after the answer, dropping them cannot change the loss
    tokens = [1] + enc("abc") + enc("Z") + enc("xy")
    labels = [IGN] * 4 + [tokens[4]] + [IGN, IGN]
    ds = ComparativeDataset([{"tokens": tokens, "labels": labels}], CharTokenizer(),
                            ChunkingConfig(mode="window", window=2))
    assert ds[0]["chunk_ids"] == [-1, 0, 0, -1, -1, -1, -1]


def test_token_before_the_answer_is_protected_without_bos():
    """Regression: with no BOS and no protected span, every token before the answer was
    droppable, so a crop could leave the first answer token unscored at position 0."""

    class NoBos(CharTokenizer):
        bos_id = None

    tokens = enc("abcd") + enc("Z")
    labels = [IGN] * 4 + [tokens[4]]
    ds = ComparativeDataset([{"tokens": tokens, "labels": labels}], NoBos(),
                            ChunkingConfig(mode="window", window=1))
    assert ds[0]["chunk_ids"] == [0, 1, 2, -1, -1]


def test_paragraph_chunks_on_character_tokens():
    ds = ComparativeDataset([sep_sample()], CharTokenizer(), ChunkingConfig(mode="paragraph"))
    # "ab\n\n" | "cd\n\n" | "e" ("f" predicts the answer)
    assert ds[0]["chunk_ids"] == [-1, 0, 0, 0, 0, 1, 1, 1, 1, 2, -1, -1, -1]
    ds = ComparativeDataset([sep_sample()], CharTokenizer(),
                            {"mode": "pattern", "pattern": "c|e"})
    assert ds[0]["chunk_ids"] == [-1, 0, 0, 0, 0, 0, 1, 1, 1, 1, -1, -1, -1]


def test_text_mode_without_boundaries_in_the_data_fails_and_suggests_window():
    with pytest.raises(ValueError, match="mode: window") as err:
        ComparativeDataset([sep_sample()], CharTokenizer(),
                           ChunkingConfig(mode="pattern", pattern=r"\|\|"))
    message = str(err.value)
    assert "'pattern'" in message and "no pattern boundary" in message
    assert "1.0 chunks per sample found, 1.0 expected" in message


def test_span_chunks():
    item = dict(sep_sample(), chunk_spans=[(1, 5), (5, 9), (9, 11)],
                chunk_required=[False, True, False])
    ds = ComparativeDataset([item], CharTokenizer(), ChunkingConfig(mode="spans"))
    assert ds[0]["chunk_ids"] == [-1, 0, 0, 0, 0, -1, -1, -1, -1, 1, -1, -1, -1]
    # without chunk_required every span is droppable
    item = dict(sep_sample(), chunk_spans=[[9, 11], [1, 5]])
    ds = ComparativeDataset([item], CharTokenizer(), ChunkingConfig(mode="spans"))
    assert ds[0]["chunk_ids"] == [-1, 0, 0, 0, 0, -1, -1, -1, -1, 1, -1, -1, -1]


def test_protected_spans_hold_in_every_mode():
    item = dict(sep_sample(), protected_spans=[(1, 3), (5, 6)],
                chunk_spans=[(1, 5), (5, 9)])
    for chunking, expected in [
        ({"mode": "window", "window": 2}, [-1, -1, -1, 0, 0, -1, 1, 1, 2, 2, -1, -1, -1]),
        ({"mode": "paragraph"}, [-1, -1, -1, 0, 0, -1, 1, 1, 1, 2, -1, -1, -1]),
        ({"mode": "spans"}, [-1, -1, -1, 0, 0, -1, 1, 1, 1, -1, -1, -1, -1]),
    ]:
        assert ComparativeDataset([item], CharTokenizer(), chunking)[0]["chunk_ids"] == expected


def test_validation_errors_are_eager():
    with pytest.raises(ValueError, match="chunk_spans"):
        ComparativeDataset([sep_sample()], CharTokenizer(), ChunkingConfig(mode="spans"))
    with pytest.raises(ValueError, match="sample 0:.*out of bounds"):
        ComparativeDataset([dict(sep_sample(), chunk_spans=[(5, 40)])], CharTokenizer(),
                           ChunkingConfig(mode="spans"))
    unlabelled = {"tokens": [1, 5, 6], "labels": [IGN] * 3}
    with pytest.raises(ValueError, match="labelled token"):
        ComparativeDataset([unlabelled] * 3, CharTokenizer())
    with pytest.raises(ValueError, match="'labels'"):
        ComparativeDataset([{"tokens": [1, 2]}], CharTokenizer())
    with pytest.raises(ValueError, match="empty"):
        ComparativeDataset([], CharTokenizer())
    with pytest.raises(ValueError, match="ablation.crop.rate"):
        ComparativeDataset([sep_sample()], CharTokenizer(), {"mode": "window", "rate": 0.5})


def test_special_ids_protected():
    class Tok(CharTokenizer):
        special_tokens = {"<|x|>": 150}

    tokens = [1] + enc("ab") + [150] + enc("cd") + enc("Z") + [2]
    labels = [IGN] * 6 + tokens[6:]
    ds = ComparativeDataset([{"tokens": tokens, "labels": labels}], Tok(),
                            ChunkingConfig(mode="window", window=8))
    assert ds[0]["chunk_ids"] == [-1, 0, 0, -1, 1, -1, -1, -1]


def test_torchtune_instruct_dataset_is_accepted(tok, tmp_path):
    from torchtune.datasets import instruct_dataset

    rows = [{"input": f"Tell me about the {w} lamp of Mira.", "output": f"It is {w}."}
            for w in ["red", "green", "blue"]]
    path = write_jsonl(tmp_path / "instruct.jsonl", rows)
    base = instruct_dataset(tok, source="json", data_files=path, split="train")
    ds = ComparativeDataset(base, tok, ChunkingConfig(mode="window", window=4))
    items = [ds[i] for i in range(len(ds))]
    for i, item in enumerate(items):
        labels = np.asarray(item["labels"])
        chunk_ids = np.asarray(item["chunk_ids"])
        assert item["sample_id"] == i
        assert (chunk_ids[labels != IGN] == -1).all()
        assert chunk_ids.max() >= 1
    batch = comparative_collate(items, padding_idx=tok.pad_id)
    assert batch["tokens"].shape == batch["chunk_ids"].shape == batch["labels"].shape


def test_comparative_dataset_builds_any_builder_and_rejects_the_old_crop_key(tok, tmp_path):
    """Regression: `crop:` (and its rate) in a dataset section was accepted and ignored."""
    path = write_jsonl(tmp_path / "instruct.jsonl",
                       [{"input": "One. Two. Three.", "output": "ok"}] * 2)
    kwargs = dict(builder="torchtune.datasets.instruct_dataset", source="json",
                  data_files=path, split="train")
    ds = comparative_dataset(tok, chunking={"mode": "sentence"}, **kwargs)
    assert isinstance(ds, ComparativeDataset) and ds.chunking == ChunkingConfig(mode="sentence")
    for bad in ({"crop": {"chunking": "window", "rate": 0.3}},
                {"chunking": {"mode": "window", "rate": 0.3}}):
        with pytest.raises(ValueError) as err:
            comparative_dataset(tok, **kwargs, **bad)
        assert "ablation.crop.rate" in str(err.value) and "dataset.chunking" in str(err.value)
    with pytest.raises(ValueError, match="packed"):
        comparative_dataset(tok, packed=True, **kwargs)


def test_items_pickle_and_rechunk(tmp_path):
    import pickle

    ds = ComparativeDataset([sep_sample()], CharTokenizer(), ChunkingConfig(mode="paragraph"))
    again = pickle.loads(pickle.dumps(ds))
    assert again[0] == ds[0]
    windowed = ComparativeDataset(ds, CharTokenizer(), ChunkingConfig(window=100))
    assert windowed.dataset is ds.dataset
    assert windowed[0]["chunk_ids"] == [-1] + [0] * 9 + [-1] * 3
    assert json.dumps(windowed[0])  # plain python values
