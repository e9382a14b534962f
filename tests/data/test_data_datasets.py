import csv
import json

import numpy as np
import pytest

from comparative_recipe.ablation.chunks import CropConfig
from comparative_recipe.data import (
    classification_dataset,
    ComparativeDataset,
    comparative_collate,
    context_qa_dataset,
    demo_tokenizer,
    separator_token_ids,
    validate_vocab,
)

IGN = -100


class CharTokenizer:
    """One token per character (id = ord + 3); bos 1, eos 2, pad 0."""

    bos_id, eos_id, pad_id = 1, 2, 0
    vocab_size = 200

    def encode(self, text, add_bos=True, add_eos=True):
        return [self.bos_id] * add_bos + [ord(c) + 3 for c in text] + [self.eos_id] * add_eos

    def decode(self, ids):
        return "".join(chr(i - 3) for i in ids if i > 2)


def enc(text):
    return CharTokenizer().encode(text, add_bos=False, add_eos=False)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return demo_tokenizer(str(tmp_path_factory.mktemp("tok") / "demo.model"))


# ----------------------------------------------------------------------------------------------
# ComparativeDataset on hand-made items


def sep_sample():
    # [bos] a b \n \n c d \n \n e f | Z [eos]; trained on Z and eos
    tokens = [1] + enc("ab\n\ncd\n\nef") + enc("Z") + [2]
    labels = [IGN] * 11 + tokens[11:]
    return {"tokens": tokens, "labels": labels}


def test_window_chunks():
    tokens = [1] + enc("abcdefg") + enc("Z") + [2]
    labels = [IGN] * 8 + tokens[8:]
    ds = ComparativeDataset([{"tokens": tokens, "labels": labels}], CharTokenizer(),
                            CropConfig(chunking="window", window=3))
    item = ds[0]
    assert item["sample_id"] == 0
    assert item["chunk_ids"] == [-1, 0, 0, 0, 1, 1, 1, 2, -1, -1]
    ds = ComparativeDataset([{"tokens": tokens, "labels": labels}], CharTokenizer(),
                            {"chunking": "window", "window": 3, "protect_leading": 2,
                             "protect_trailing": 1})
    assert ds[0]["chunk_ids"] == [-1, -1, 0, 0, 0, 1, 1, -1, -1, -1]


def test_tokens_after_last_label_are_protected():
    # [bos] a b c | Z | x y : x y come after the answer, dropping them cannot change the loss
    tokens = [1] + enc("abc") + enc("Z") + enc("xy")
    labels = [IGN] * 4 + [tokens[4]] + [IGN, IGN]
    ds = ComparativeDataset([{"tokens": tokens, "labels": labels}], CharTokenizer(),
                            CropConfig(chunking="window", window=2))
    assert ds[0]["chunk_ids"] == [-1, 0, 0, 1, -1, -1, -1]


def test_separator_chunks():
    ds = ComparativeDataset([sep_sample()], CharTokenizer(),
                            CropConfig(chunking="separator", separator="\n\n"))
    assert ds.separator_ids == enc("\n\n")
    assert ds[0]["chunk_ids"] == [-1, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, -1, -1]


def test_separator_not_found_suggests_window():
    with pytest.raises(ValueError, match="chunking: window") as err:
        ComparativeDataset([sep_sample()], CharTokenizer(),
                           CropConfig(chunking="separator", separator="||"))
    assert "'||'" in str(err.value) and "none of the first 1 samples" in str(err.value)


def test_span_chunks():
    item = dict(sep_sample(), chunk_spans=[(1, 5), (5, 9), (9, 11)],
                chunk_required=[False, True, False])
    ds = ComparativeDataset([item], CharTokenizer(), CropConfig(chunking="spans"))
    assert ds[0]["chunk_ids"] == [-1, 0, 0, 0, 0, -1, -1, -1, -1, 1, 1, -1, -1]
    # without chunk_required every span is droppable
    item = dict(sep_sample(), chunk_spans=[[9, 11], [1, 5]])
    ds = ComparativeDataset([item], CharTokenizer(), CropConfig(chunking="spans"))
    assert ds[0]["chunk_ids"] == [-1, 0, 0, 0, 0, -1, -1, -1, -1, 1, 1, -1, -1]


def test_validation_errors_are_eager():
    with pytest.raises(ValueError, match="chunk_spans"):
        ComparativeDataset([sep_sample()], CharTokenizer(), CropConfig(chunking="spans"))
    with pytest.raises(ValueError, match="sample 0:.*out of bounds"):
        ComparativeDataset([dict(sep_sample(), chunk_spans=[(5, 40)])], CharTokenizer(),
                           CropConfig(chunking="spans"))
    unlabelled = {"tokens": [1, 5, 6], "labels": [IGN] * 3}
    with pytest.raises(ValueError, match="labelled token"):
        ComparativeDataset([unlabelled] * 3, CharTokenizer())
    with pytest.raises(ValueError, match="'labels'"):
        ComparativeDataset([{"tokens": [1, 2]}], CharTokenizer())
    with pytest.raises(ValueError, match="empty"):
        ComparativeDataset([], CharTokenizer())


def test_special_ids_protected():
    class Tok(CharTokenizer):
        special_tokens = {"<|x|>": 150}

    tokens = [1] + enc("ab") + [150] + enc("cd") + enc("Z") + [2]
    labels = [IGN] * 6 + tokens[6:]
    ds = ComparativeDataset([{"tokens": tokens, "labels": labels}], Tok(),
                            CropConfig(chunking="window", window=8))
    assert ds[0]["chunk_ids"] == [-1, 0, 0, -1, 1, 1, -1, -1]


def test_torchtune_instruct_dataset_is_accepted(tok, tmp_path):
    from torchtune.datasets import instruct_dataset

    path = tmp_path / "instruct.jsonl"
    rows = [{"input": f"Tell me about the {w} lamp of Mira.", "output": f"It is {w}."}
            for w in ["red", "green", "blue"]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = instruct_dataset(tok, source="json", data_files=str(path), split="train")
    ds = ComparativeDataset(base, tok, CropConfig(chunking="window", window=4))
    items = [ds[i] for i in range(len(ds))]
    for i, item in enumerate(items):
        labels = np.asarray(item["labels"])
        chunk_ids = np.asarray(item["chunk_ids"])
        assert item["sample_id"] == i
        assert (chunk_ids[labels != IGN] == -1).all()
        assert chunk_ids.max() >= 1
    batch = comparative_collate(items, padding_idx=tok.pad_id)
    assert batch["tokens"].shape == batch["chunk_ids"].shape == batch["labels"].shape


# ----------------------------------------------------------------------------------------------
# context QA


QA_ROWS = [
    {"context": ["The lamp of Mira is green.", "The boat of Tom is red.", "Ana has a blue cup."],
     "question": "What is the color of Mira's lamp?", "answer": "green", "gold": [0]},
    {"context": ["Leo keeps the kite in the shed.", "The kite of Leo is made of silk."],
     "question": "What is Leo's kite made of?", "answer": "silk", "gold": [1]},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def check_qa_item(item, paragraphs, answer, required, tok):
    sep = separator_token_ids(tok, "\n\n")
    tokens, labels, chunk_ids = item["tokens"], item["labels"], item["chunk_ids"]
    assert len(tokens) == len(labels) == len(chunk_ids)
    assert tokens[0] == tok.bos_id and tokens[-1] == tok.eos_id
    assert len(item["chunk_spans"]) == len(paragraphs)
    for (start, end), paragraph in zip(item["chunk_spans"], paragraphs):
        assert tokens[end - len(sep) : end] == sep
        assert tok.decode(tokens[start : end - len(sep)]) == paragraph
    labelled = [i for i, label in enumerate(labels) if label != IGN]
    assert labelled == list(range(labelled[0], len(tokens)))
    assert [labels[i] for i in labelled] == tokens[labelled[0]:]
    assert tok.decode(tokens[labelled[0] : -1]) == answer
    assert item["chunk_required"] == required
    expected, k = [-1] * len(tokens), 0
    for (start, end), req in zip(item["chunk_spans"], required):
        if not req:
            expected[start:end] = [k] * (end - start)
            k += 1
    assert chunk_ids == expected


def test_context_qa_from_jsonl(tok, tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", QA_ROWS)
    ds = context_qa_dataset(tok, source="json", data_files=path, required_column="gold")
    assert isinstance(ds, ComparativeDataset) and len(ds) == 2
    check_qa_item(ds[0], QA_ROWS[0]["context"], "green", [True, False, False], tok)
    check_qa_item(ds[1], QA_ROWS[1]["context"], "silk", [False, True], tok)
    ds = context_qa_dataset(tok, source="json", data_files=path)
    check_qa_item(ds[0], QA_ROWS[0]["context"], "green", [False, False, False], tok)
    # the same data re-chunked with another mode
    for crop in ({"chunking": "window", "window": 3}, {"chunking": "separator"}):
        other = ComparativeDataset(ds, tok, crop)
        assert other.dataset is ds.dataset
        assert max(other[0]["chunk_ids"]) >= 2


def test_context_qa_from_csv_string_context(tok, tmp_path):
    path = tmp_path / "qa.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["passage", "q", "a", "needed"])
        for row in QA_ROWS:
            writer.writerow(["\n\n".join(row["context"]) + "\n\n", row["question"], row["answer"],
                             json.dumps(row["gold"])])
    ds = context_qa_dataset(tok, source="csv", data_files=str(path), context_column="passage",
                            question_column="q", answer_column="a", required_column="needed")
    check_qa_item(ds[0], QA_ROWS[0]["context"], "green", [True, False, False], tok)
    check_qa_item(ds[1], QA_ROWS[1]["context"], "silk", [False, True], tok)


def test_context_qa_missing_column(tok, tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", QA_ROWS)
    with pytest.raises(ValueError, match="context_column") as err:
        context_qa_dataset(tok, source="json", data_files=path, context_column="passages")
    assert "'passages'" in str(err.value)
    assert "['context', 'question', 'answer', 'gold']" in str(err.value)
    with pytest.raises(ValueError, match="required_column"):
        context_qa_dataset(tok, source="json", data_files=path, required_column="support")


def test_context_qa_max_seq_len(tok, tmp_path):
    row = {"context": ["The lamp of Mira is green.", "The boat of Tom is red.",
                       "Ana has a blue cup.", "Leo has a kite."],
           "question": "What is the color of Tom's boat?", "answer": "red", "gold": 1}
    path = write_jsonl(tmp_path / "qa.jsonl", [row])
    full = context_qa_dataset(tok, source="json", data_files=path)[0]
    spans = full["chunk_spans"]
    lengths = [e - s for s, e in spans]
    # room for all but the last two chunks: the non-required tail goes first
    limit = len(full["tokens"]) - lengths[3] - lengths[2]
    item = context_qa_dataset(tok, source="json", data_files=path, max_seq_len=limit)[0]
    assert len(item["tokens"]) == limit
    check_qa_item(item, row["context"][:2], "red", [False, False], tok)
    # gold (chunk 1) required: chunks 3, 2 and 0 go, chunk 1 stays
    limit = len(full["tokens"]) - lengths[3] - lengths[2] - lengths[0]
    item = context_qa_dataset(tok, source="json", data_files=path, max_seq_len=limit,
                              required_column="gold")[0]
    check_qa_item(item, [row["context"][1]], "red", [True], tok)
    with pytest.raises(ValueError, match="sample 0 does not fit max_seq_len"):
        context_qa_dataset(tok, source="json", data_files=path, max_seq_len=limit - 1,
                           required_column="gold")


# ----------------------------------------------------------------------------------------------
# classification


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["sentence", "label"])
        writer.writerows(rows)
    return str(path)


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
    windowed = ComparativeDataset(ds_int, tok, CropConfig(chunking="window", window=2))
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


# ----------------------------------------------------------------------------------------------
# vocab


def test_validate_vocab(tok):
    assert validate_vocab(tok, 512) == tok.vocab_size - 1
    with pytest.raises(ValueError) as err:
        validate_vocab(tok, 256)
    assert "511" in str(err.value) and "256" in str(err.value)

    class Tok(CharTokenizer):
        special_tokens = {"<|x|>": 300}

    with pytest.raises(ValueError, match="300"):
        validate_vocab(Tok(), 256)
    assert validate_vocab(Tok(), 301) == 300


def test_separator_found_in_running_sentencepiece_text(tok, tmp_path):
    # SentencePiece encodes "\n\n" alone with a leading word-boundary piece "▁" that running
    # text ("green.\n\nThe") does not have: it is dropped so the separator matches there
    alone = tok.encode("\n\n", add_bos=False, add_eos=False)
    assert len(alone) >= 2 and tok.decode(alone[:1]) == ""
    assert separator_token_ids(tok, "\n\n") == alone[1:]
    from torchtune.datasets import instruct_dataset

    text = "The lamp of Mira is green.\n\nThe boat of Tom is red.\n\nAna has a cup."
    path = write_jsonl(tmp_path / "instruct.jsonl", [{"input": text, "output": "green"}])
    base = instruct_dataset(tok, source="json", data_files=path, split="train")
    ds = ComparativeDataset(base, tok, CropConfig(chunking="separator"))
    item = ds[0]
    assert max(item["chunk_ids"]) == 2
    first = [t for t, c in zip(item["tokens"], item["chunk_ids"]) if c == 0]
    assert tok.decode(first) == "The lamp of Mira is green.\n\n"
