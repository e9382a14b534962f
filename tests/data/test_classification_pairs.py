"""classification_dataset with a text pair (NLI premise / hypothesis): the layout, each text
its own chunk, CSV and parquet input, truncation and the errors that say how to fix a config."""

import csv
from pathlib import Path

import pytest

from comparative_recipe.data import classification_dataset, comparative_collate
from tests.data.helpers import CharTokenizer, enc, IGN, write_csv

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "classification" / "nli_pairs.csv"
ROWS = list(csv.DictReader(FIXTURE.open()))
WORDS = ["yes", "no", "maybe"]
LABEL_MAP = {"entailment": "yes", "contradiction": "no", "neutral": "maybe"}
TEMPLATE = "Premise: {text}\nHypothesis: {text_pair}\nAnswer:"


def pairs(path, source="csv", tokenizer=None, **kwargs):
    kwargs.setdefault("label_map", LABEL_MAP)
    kwargs.setdefault("template", TEMPLATE)
    return classification_dataset(tokenizer or CharTokenizer(), source=source, data_files=str(path),
                                  text_column="premise", text_pair_column="hypothesis",
                                  label_words=WORDS, **kwargs)


def test_pair_layout_labels_and_chunks_from_csv():
    ds = pairs(FIXTURE)
    assert ds.label_token_ids == [enc(w)[0] for w in WORDS]
    assert ds.text_fields == ["text", "text_pair"]
    for i, row in enumerate(ROWS):
        item = ds[i]
        word = LABEL_MAP[row["label"]]
        prefix, middle, suffix = [1] + enc("Premise: "), enc("\nHypothesis: "), enc("\nAnswer:")
        premise, hypothesis = enc(row["premise"]), enc(row["hypothesis"])
        tokens = prefix + premise + middle + hypothesis + suffix + enc(word)
        assert item["tokens"] == tokens
        label_at = len(tokens) - len(word)
        assert item["labels"] == [IGN] * label_at + [enc(word)[0]] + [IGN] * (len(word) - 1)
        assert item["class_id"] == WORDS.index(word)
        # default chunking for a pair: each text one chunk; template and label word protected
        assert item["chunk_ids"] == ([-1] * len(prefix) + [0] * len(premise) + [-1] * len(middle)
                                     + [1] * len(hypothesis) + [-1] * (len(suffix) + len(word)))
        start = len(prefix)
        assert item["chunk_spans"] == [(start, start + len(premise)),
                                       (start + len(premise) + len(middle),
                                        start + len(premise) + len(middle) + len(hypothesis))]
    batch = comparative_collate([ds[0], ds[1]])
    assert batch["class_id"].tolist() == [0, 1]


def test_parquet_with_index_labels_gives_the_same_items(tmp_path):
    from datasets import Dataset

    path = tmp_path / "nli.parquet"
    index = {"entailment": 0, "contradiction": 1, "neutral": 2}
    Dataset.from_list([dict(r, label=index[r["label"]]) for r in ROWS]).to_parquet(str(path))
    from_parquet = pairs(path, source="parquet", label_map=None)
    from_csv = pairs(FIXTURE)
    for i in range(len(ROWS)):
        assert from_parquet[i] == from_csv[i]
    # labels written as the words, with stray whitespace
    words = tmp_path / "words.parquet"
    Dataset.from_list([dict(r, label=f" {LABEL_MAP[r['label']]} ") for r in ROWS]).to_parquet(
        str(words))
    from_words = pairs(words, source="parquet", label_map=None)
    assert [from_words[i]["class_id"] for i in range(len(ROWS))] == [0, 1, 2, 0]


@pytest.mark.parametrize("chunking", [{"mode": "window", "window": 4}, {"mode": "sentence"},
                                      {"mode": "pattern", "pattern": " "}])
def test_no_chunk_crosses_the_two_texts(tok, chunking):
    ds = pairs(FIXTURE, tokenizer=tok, chunking=chunking)
    for i in range(len(ROWS)):
        item = ds[i]
        (a0, a1), (b0, b1) = item["chunk_spans"]
        first = {c for c in item["chunk_ids"][a0:a1]}
        second = {c for c in item["chunk_ids"][b0:b1]}
        assert min(first) >= 0 and min(second) >= 0 and not first & second
        outside = [c for j, c in enumerate(item["chunk_ids"]) if not (a0 <= j < a1 or b0 <= j < b1)]
        assert set(outside) == {-1}
    # sentence mode: the two-sentence premises give two chunks
    if chunking["mode"] == "sentence":
        assert max(ds[0]["chunk_ids"]) + 1 == 3 and max(ds[1]["chunk_ids"]) + 1 == 2


def test_template_order_and_longest_first_truncation(tmp_path):
    path = write_csv(tmp_path / "p.csv", [["a" * 10, "b" * 4, "yes"], ["a" * 3, "b" * 9, "no"]],
                     header=("premise", "hypothesis", "label"))
    ds = pairs(path, label_map=None, template="{text_pair}|{text}:")
    assert ds.text_fields == ["text_pair", "text"]
    assert ds[0]["tokens"] == [1] + enc("b" * 4 + "|" + "a" * 10 + ":yes")
    fixed = 1 + 2 + 3  # bos, "|" and ":", and the label word "yes"
    short = pairs(path, label_map=None, template="{text_pair}|{text}:", max_seq_len=fixed + 8)
    # the longer text is cut first, down to the other's length, then both
    assert short[0]["tokens"] == [1] + enc("b" * 4 + "|" + "a" * 4 + ":yes")
    assert short[1]["tokens"] == [1] + enc("b" * 6 + "|" + "a" * 3 + ":no")  # "no" is 2 tokens
    tight = pairs(path, label_map=None, template="{text_pair}|{text}:", max_seq_len=fixed + 5)
    assert tight[0]["tokens"] == [1] + enc("b" * 2 + "|" + "a" * 3 + ":yes")


def test_pair_errors_name_the_fix(tmp_path):
    with pytest.raises(ValueError) as err:
        classification_dataset(CharTokenizer(), source="csv", data_files=str(FIXTURE),
                               text_column="premise", text_pair_column="hypotesis",
                               label_words=WORDS, label_map=LABEL_MAP, template=TEMPLATE)
    assert "'hypotesis' not found" in str(err.value) and "text_pair_column=" in str(err.value)
    assert "['premise', 'hypothesis', 'label']" in str(err.value)
    with pytest.raises(ValueError,
                       match=r"'\{text_pair\}' exactly once when text_pair_column is set"):
        pairs(FIXTURE, template="Premise: {text}\nAnswer:")
    with pytest.raises(ValueError, match=r"'\{text_pair\}' but text_pair_column is not set: set "
                                         "text_pair_column"):
        classification_dataset(CharTokenizer(), source="csv", data_files=str(FIXTURE),
                               text_column="premise", label_words=WORDS, label_map=LABEL_MAP,
                               template=TEMPLATE)
    with pytest.raises(ValueError, match=r"'\{text\}' exactly once"):
        pairs(FIXTURE, template="{text_pair}\nAnswer:")
    # the default template of a pair holds both texts
    ds = pairs(FIXTURE, template=None)
    assert ds.template == "{text}\n{text_pair}\nLabel:"
    assert ds[1]["tokens"] == [1] + enc(ROWS[1]["premise"] + "\n" + ROWS[1]["hypothesis"]
                                        + "\nLabel:no")
