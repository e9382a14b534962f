"""multi_passage_qa_dataset / context_qa_dataset on multi-passage data: HotpotQA's distractor
format in its two layouts, one chunk per passage, supporting passages protected, the answer as
the only labelled tokens."""

import json
from pathlib import Path

import pytest

from comparative_recipe.data import (
    comparative_collate,
    context_qa_dataset,
    DEFAULT_QA_INSTRUCTION,
    join_sentences,
    multi_passage_qa_dataset,
    read_passages,
    supporting_titles,
)
from tests.data.helpers import CharTokenizer, enc, IGN, write_jsonl

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "hotpot_qa"
ORIGINAL = FIXTURES / "distractor_original.json"  # context [[title, [sentence, ...]], ...]
HF = FIXTURES / "distractor_hf.jsonl"  # context {title: [...], sentences: [[...], ...]}
ROWS = json.loads(ORIGINAL.read_text())


def rendered(title, sentences):
    return f"{title}: {''.join(sentences)}"  # HotpotQA's sentences carry their leading space


def expected_layout(row):
    """tokens, labels, chunk_ids, chunk_required of a row, character tokenizer."""
    sep = enc("\n\n")
    supporting = {title for title, _ in row["supporting_facts"]}
    tokens = [1] + enc(DEFAULT_QA_INSTRUCTION) + sep
    chunk_ids = [-1] * len(tokens)
    required, k = [], 0
    for title, sentences in row["context"]:
        ids = enc(rendered(title, sentences)) + sep
        tokens += ids
        required.append(title in supporting)
        chunk_ids += [-1 if required[-1] else k] * len(ids)
        k += not required[-1]
    prompt = enc(f"Question: {row['question']}\nAnswer:")
    tokens += prompt
    chunk_ids += [-1] * len(prompt)
    answer = enc(row["answer"]) + [2]
    labels = [IGN] * len(tokens) + answer
    return tokens + answer, labels, chunk_ids + [-1] * len(answer), required


@pytest.mark.parametrize("path", [ORIGINAL, HF], ids=["original-json", "hf-jsonl"])
def test_hotpot_distractor_layouts_give_the_exact_layout(path):
    ds = multi_passage_qa_dataset(CharTokenizer(), source="json", data_files=str(path))
    assert len(ds) == len(ROWS)
    for i, row in enumerate(ROWS):
        item = ds[i]
        tokens, labels, chunk_ids, required = expected_layout(row)
        assert item["tokens"] == tokens
        assert item["labels"] == labels
        assert item["chunk_ids"] == chunk_ids
        assert item["chunk_required"] == required
        assert len(item["chunk_spans"]) == len(row["context"])  # each passage one chunk
        # what generation needs: the prompt is every token before the first labelled one,
        # the answer (and eos) the labelled tokens
        first = next(j for j, label in enumerate(labels) if label != IGN)
        assert all(label == IGN for label in item["labels"][:first])
        assert CharTokenizer().decode(item["tokens"][first:-1]) == row["answer"]
        assert CharTokenizer().decode(item["tokens"][:first]).endswith("\nAnswer:")
    batch = comparative_collate([ds[0], ds[1]], padding_idx=0)
    assert set(batch) == {"tokens", "labels", "sample_ids", "chunk_ids"}


def test_both_layouts_in_both_formats_agree(tok, tmp_path):
    hf_rows = [json.loads(line) for line in HF.read_text().splitlines()]
    original_jsonl = write_jsonl(tmp_path / "original.jsonl", ROWS)
    hf_json = tmp_path / "hf.json"
    hf_json.write_text(json.dumps(hf_rows))
    datasets = [multi_passage_qa_dataset(tok, source="json", data_files=str(p))
                for p in (ORIGINAL, HF, original_jsonl, hf_json)]
    for i, row in enumerate(ROWS):
        items = [ds[i] for ds in datasets]
        for other in items[1:]:
            for key in ("tokens", "labels", "chunk_ids", "chunk_spans", "chunk_required"):
                assert other[key] == items[0][key]
        # with the SentencePiece tokenizer too, each chunk decodes to one rendered passage
        item = items[0]
        for (start, end), (title, sentences) in zip(item["chunk_spans"], row["context"]):
            assert tok.decode(item["tokens"][start:end]).strip() == rendered(title, sentences)


def test_a_supporting_title_missing_from_the_context_is_an_error(tmp_path):
    row = dict(ROWS[0], supporting_facts=[["Velna", 0], ["Velna river", 1]])
    path = write_jsonl(tmp_path / "bad.jsonl", [row])
    with pytest.raises(ValueError) as err:
        multi_passage_qa_dataset(CharTokenizer(), source="json", data_files=path)
    message = str(err.value)
    assert "sample 0: supporting fact title 'Velna river' is not the title of any" in message
    assert "'Lake Tarn', 'Velna', 'Brask', 'Orsk'" in message and "supporting_column" in message

    untitled = {"question": "q?", "answer": "a", "context": ["one", "two"],
                "supporting_facts": ["one"]}
    path = write_jsonl(tmp_path / "untitled.jsonl", [untitled])
    with pytest.raises(ValueError, match="have no titles.*required_column"):
        multi_passage_qa_dataset(CharTokenizer(), source="json", data_files=path)
    with pytest.raises(ValueError, match="supporting_column"):
        multi_passage_qa_dataset(CharTokenizer(), source="json", data_files=path,
                                 supporting_column="gold")
    # data without supporting facts: supporting_column=None
    ds = multi_passage_qa_dataset(CharTokenizer(), source="json", data_files=path,
                                  supporting_column=None)
    assert ds[0]["chunk_required"] == [False, False]


def test_titled_passages_as_pairs_and_mappings(tmp_path):
    rows = [
        {"question": "q?", "answer": "a", "gold": "B",
         "passages": [["A", "First text."], {"title": "B", "text": "Second text."}, "Plain."]},
    ]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    ds = context_qa_dataset(CharTokenizer(), source="json", data_files=path,
                            context_column="passages", supporting_column="gold",
                            passage_template="[{title}] {text}")
    item = ds[0]
    texts = [CharTokenizer().decode(item["tokens"][s:e]) for s, e in item["chunk_spans"]]
    assert texts == ["[A] First text.\n\n", "[B] Second text.\n\n", "Plain.\n\n"]
    assert item["chunk_required"] == [False, True, False]
    with pytest.raises(ValueError, match="passage_template must contain"):
        context_qa_dataset(CharTokenizer(), source="json", data_files=path,
                           context_column="passages", passage_template="{title}")


def test_max_seq_len_drops_distractors_and_sentence_chunking(tok, tmp_path):
    one = tmp_path / "one.jsonl"
    one.write_text(HF.read_text().splitlines()[0] + "\n")
    full = multi_passage_qa_dataset(tok, source="json", data_files=str(one))[0]
    (s0, e0), (s2, e2) = full["chunk_spans"][0], full["chunk_spans"][2]
    limit = len(full["tokens"]) - (e2 - s2)  # room for all but the last distractor
    item = multi_passage_qa_dataset(tok, source="json", data_files=str(one), max_seq_len=limit)[0]
    assert item["chunk_required"] == [False, True, True]  # Brask (index 2) went
    limit -= e0 - s0
    item = multi_passage_qa_dataset(tok, source="json", data_files=str(one), max_seq_len=limit)[0]
    assert item["chunk_required"] == [True, True]
    with pytest.raises(ValueError, match="sample 0 does not fit max_seq_len"):
        multi_passage_qa_dataset(tok, source="json", data_files=str(one), max_seq_len=limit - 1)

    # sentence chunking: each sentence of a distractor is a chunk; supporting ones stay whole
    sentences = multi_passage_qa_dataset(tok, source="json", data_files=str(HF),
                                         chunking={"mode": "sentence"})
    item = sentences[0]
    assert max(item["chunk_ids"]) + 1 == 4  # Lake Tarn and Brask, two sentences each
    for (start, end), required in zip(item["chunk_spans"], item["chunk_required"]):
        if required:
            assert set(item["chunk_ids"][start:end]) == {-1}


def test_passage_and_supporting_fact_readers():
    assert join_sentences(["One.", " Two.", "Three."]) == "One. Two. Three."
    columns = {"title": ["A"], "sentences": [["x.", " y."]]}
    assert read_passages(columns, 0, "\n\n") == [("A", "x. y.")]
    assert read_passages([["A", ["x."]], {"title": "B", "content": "y"}], 0, "\n\n") == [
        ("A", "x."), ("B", "y")]
    assert read_passages("p1\n\n\n\np2", 0, "\n\n") == [(None, "p1"), (None, "p2")]
    with pytest.raises(ValueError, match="cannot read a passage"):
        read_passages([{"body": "x"}], 3, "\n\n")
    assert supporting_titles({"title": ["A", "B", "A"], "sent_id": [0, 1, 2]}, 0) == ["A", "B"]
    assert supporting_titles([["B", 0], ["A", 1]], 0) == ["B", "A"]
    assert supporting_titles('[["A", 0]]', 0) == ["A"]
    assert supporting_titles("A", 0) == ["A"]
    assert supporting_titles(None, 0) == []
    with pytest.raises(ValueError, match="cannot read supporting facts"):
        supporting_titles(3, 0)
