"""context_qa_dataset: layout, spans, required chunks, protection, max_seq_len."""

import csv
import json

import pytest

from comparative_recipe.data import (
    ComparativeDataset,
    context_qa_dataset,
    DEFAULT_QA_INSTRUCTION,
    separator_token_ids,
)
from tests.data.helpers import IGN, write_jsonl


# ----------------------------------------------------------------------------------------------
# context QA


QA_ROWS = [
    {"context": ["The lamp of Mira is green.", "The boat of Tom is red.", "Ana has a blue cup."],
     "question": "What is the color of Mira's lamp?", "answer": "green", "gold": [0]},
    {"context": ["Leo keeps the kite in the shed.", "The kite of Leo is made of silk."],
     "question": "What is Leo's kite made of?", "answer": "silk", "gold": [1]},
]


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
    for chunking in ({"mode": "window", "window": 3}, {"mode": "sentence"}):
        other = ComparativeDataset(ds, tok, chunking)
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


def test_template_and_required_chunks_stay_protected_in_any_mode(tok, tmp_path):
    """The instruction and the question prompt are never dropped, nor required chunks, whatever
    the chunking (before, a window chunking could crop into the question)."""
    path = write_jsonl(tmp_path / "qa.jsonl", QA_ROWS)
    instruction = tok.encode(DEFAULT_QA_INSTRUCTION, add_bos=False, add_eos=False)
    for chunking in (None, {"mode": "window", "window": 2}, {"mode": "sentence"}):
        ds = context_qa_dataset(tok, source="json", data_files=path, required_column="gold",
                                chunking=chunking)
        for i, row in enumerate(QA_ROWS):
            item = ds[i]
            tokens, chunk_ids = item["tokens"], item["chunk_ids"]
            assert tokens[1 : 1 + len(instruction)] == instruction
            assert set(chunk_ids[: 1 + len(instruction)]) == {-1}
            question = tok.encode(f"Question: {row['question']}\nAnswer:", add_bos=False,
                                  add_eos=False)
            answer_start = next(j for j, label in enumerate(item["labels"]) if label != IGN)
            assert tokens[answer_start - len(question) : answer_start] == question
            assert set(chunk_ids[answer_start - len(question) :]) == {-1}
            for (start, end), required in zip(item["chunk_spans"], item["chunk_required"]):
                if required:
                    assert set(chunk_ids[start:end]) == {-1}
                else:
                    assert min(chunk_ids[start:end]) >= 0


def test_context_qa_rejects_the_old_crop_argument(tok, tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", QA_ROWS)
    with pytest.raises(ValueError, match="ablation.crop.rate"):
        context_qa_dataset(tok, source="json", data_files=path, crop={"chunking": "spans"})
