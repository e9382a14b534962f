"""classification_dataset: layout, label words, the protected template, max_seq_len."""

import pytest

from comparative_recipe.data import (
    ChunkingConfig,
    classification_dataset,
    ComparativeDataset,
    comparative_collate,
)
from tests.data.helpers import IGN, write_csv


# ----------------------------------------------------------------------------------------------
# classification


def test_classification_from_csv(tok, tmp_path):
    rows = [["The lamp of Mira is green and bright.", "yes"], ["The boat of Tom is red.", "no"],
            ["Ana keeps the cup in the attic.", "yes"]]
    path = write_csv(tmp_path / "cls.csv", rows)
    ds = classification_dataset(tok, source="csv", data_files=path, text_column="sentence",
                                label_words=["no", "yes"], template="Text: {text}\nLabel:")
    ids = ds.label_token_ids
    assert len(ids) == 2 and len(set(ids)) == 2
    assert ids == [tok.encode(w, add_bos=False, add_eos=False)[0] for w in ["no", "yes"]]
    for i, (text, word) in enumerate(rows):
        item = ds[i]
        assert item["class_id"] == ["no", "yes"].index(word)
        tokens, labels = item["tokens"], item["labels"]
        labelled = [j for j, label in enumerate(labels) if label != IGN]
        assert len(labelled) == 1 and labels[labelled[0]] == ids[item["class_id"]]
        assert tokens[labelled[0]] == ids[item["class_id"]]
        assert tokens[0] == tok.bos_id and tok.eos_id not in tokens
        assert tok.decode(tokens[labelled[0]:]) == word
        assert text in tok.decode(tokens[: labelled[0]])
        # default crop: window over the text, template prefix and suffix protected
        chunk_ids = item["chunk_ids"]
        assert chunk_ids[: ds.prefix_len] == [-1] * ds.prefix_len
        assert chunk_ids[labelled[0] - ds.suffix_len :] == [-1] * (len(tokens) - labelled[0] + ds.suffix_len)
    batch = comparative_collate([ds[0], ds[1]], padding_idx=tok.pad_id)
    assert batch["class_id"].tolist() == [1, 0]

    # int labels index label_words; re-chunking keeps label_token_ids reachable
    path = write_csv(tmp_path / "cls_int.csv", [[r[0], ["no", "yes"].index(r[1])] for r in rows])
    ds_int = classification_dataset(tok, source="csv", data_files=path, text_column="sentence",
                                    label_words=["no", "yes"], template="Text: {text}\nLabel:")
    assert [ds_int[i]["tokens"] for i in range(3)] == [ds[i]["tokens"] for i in range(3)]
    windowed = ComparativeDataset(ds_int, tok, ChunkingConfig(mode="window", window=2))
    assert windowed.label_token_ids == ids

    # max_seq_len cuts the text, never the template or the label word
    limit = min(len(ds[i]["tokens"]) for i in range(3)) - 2
    short = classification_dataset(tok, source="csv", data_files=path, text_column="sentence",
                                   label_words=["no", "yes"], template="Text: {text}\nLabel:",
                                   max_seq_len=limit)
    for i in range(3):
        item, full = short[i], ds[i]
        assert len(item["tokens"]) == limit
        cut = len(full["tokens"]) - limit
        text_end = full["labels"].index(ids[full["class_id"]]) - ds.suffix_len
        assert item["tokens"] == full["tokens"][: text_end - cut] + full["tokens"][text_end:]
        assert item["labels"] == full["labels"][: text_end - cut] + full["labels"][text_end:]
    with pytest.raises(ValueError, match="no room for the text"):
        classification_dataset(tok, source="csv", data_files=path, text_column="sentence",
                               label_words=["no", "yes"], template="Text: {text}\nLabel:",
                               max_seq_len=ds.prefix_len + ds.suffix_len)


def test_classification_errors(tok, tmp_path):
    path = write_csv(tmp_path / "cls.csv", [["a red lamp", "red"], ["a red boat", "red car"]])
    with pytest.raises(ValueError, match="share their first token"):
        classification_dataset(tok, source="csv", data_files=path, text_column="sentence",
                               label_words=["red", "red car"])
    with pytest.raises(ValueError, match="sample 1: label 'red car' is not in label_words"):
        classification_dataset(tok, source="csv", data_files=path, text_column="sentence",
                               label_words=["red", "blue"])
    path = write_csv(tmp_path / "cls_int.csv", [["a red lamp", 0], ["a red boat", 2]])
    with pytest.raises(ValueError, match="out of range"):
        classification_dataset(tok, source="csv", data_files=path, text_column="sentence",
                               label_words=["red", "blue"])
    with pytest.raises(ValueError, match="text_column"):
        classification_dataset(tok, source="csv", data_files=path, label_words=["red", "blue"])


ROWS = [["The lamp of Mira is green and bright.", "yes"],
        ["The boat of Tom is red. It sank.\nNobody cried.", "no"],
        ["Ana keeps the cup in the attic.", "yes"]]


@pytest.mark.parametrize("chunking", [
    {"mode": "window", "window": 2},
    {"mode": "window", "window": 1, "protect_leading": 0, "protect_trailing": 0},
    {"mode": "sentence"},
    {"mode": "pattern", "pattern": " "},
])
def test_template_is_never_droppable_with_an_explicit_chunking(tok, tmp_path, chunking):
    """Regression: an explicit chunking replaced the default that protected the template's
    prefix and suffix, so crops could cut into the prompt."""
    path = write_csv(tmp_path / "cls.csv", ROWS)
    template = "Review text: {text}\nThe label is:"
    ds = classification_dataset(tok, source="csv", data_files=path, text_column="sentence",
                                label_words=["no", "yes"], template=template, chunking=chunking)
    prefix = [tok.bos_id] + tok.encode("Review text: ", add_bos=False, add_eos=False)
    suffix = tok.encode("\nThe label is:", add_bos=False, add_eos=False)
    for i in range(len(ROWS)):
        item = ds[i]
        tokens, chunk_ids = item["tokens"], item["chunk_ids"]
        label_at = next(j for j, label in enumerate(item["labels"]) if label != IGN)
        assert tokens[: len(prefix)] == prefix
        assert tokens[label_at - len(suffix) : label_at] == suffix
        fixed = [*range(len(prefix)), *range(label_at - len(suffix), len(tokens))]
        assert all(chunk_ids[j] == -1 for j in fixed), chunk_ids
        # the text in between is what crops remove
        text = range(len(prefix), label_at - len(suffix))
        assert all(chunk_ids[j] >= 0 for j in text)


def test_classification_rejects_the_old_crop_argument(tok, tmp_path):
    path = write_csv(tmp_path / "cls.csv", ROWS)
    with pytest.raises(ValueError, match="ablation.crop.rate"):
        classification_dataset(tok, source="csv", data_files=path, text_column="sentence",
                               label_words=["no", "yes"], crop={"protect_leading": 5})


def test_labels_written_without_the_words_leading_space_are_read(tok, tmp_path):
    """Regression: a label column holding `negative` failed against label words like the
    shipped config's `" negative"`."""
    # (this SentencePiece tokenizer splits a leading space off, so the words carry a trailing one)
    rows = [["dull and cold", "no"], ["bright and warm", "yes"], ["flat", "no "]]
    path = write_csv(tmp_path / "cls.csv", rows)
    ds = classification_dataset(tok, source="csv", data_files=path, text_column="sentence",
                                label_words=["no ", "yes "])
    assert [ds[i]["class_id"] for i in range(3)] == [0, 1, 0]


def test_label_map_maps_data_values_to_label_words(tok, tmp_path):
    rows = [["dull and cold", "0"], ["bright and warm", "1"], ["flat", "0"]]
    path = write_csv(tmp_path / "cls.csv", rows)
    ds = classification_dataset(tok, source="csv", data_files=path, text_column="sentence",
                                label_words=["no", "yes"], label_map={1: "yes", 0: "no"})
    assert [ds[i]["class_id"] for i in range(3)] == [0, 1, 0]
    labelled = [t for t, lab in zip(ds[1]["tokens"], ds[1]["labels"]) if lab != IGN]
    assert labelled == [ds.label_token_ids[1]]
    with pytest.raises(ValueError, match="not one of label_words"):
        classification_dataset(tok, source="csv", data_files=path, text_column="sentence",
                               label_words=["no", "yes"], label_map={0: "no", 1: "maybe"})
    with pytest.raises(ValueError, match="sample 1: label 1 is not a key of label_map"):
        classification_dataset(tok, source="csv", data_files=path, text_column="sentence",
                               label_words=["no", "yes"], label_map={0: "no"})
