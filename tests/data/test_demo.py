"""The embedded demo: records, tokenizer, the needle-QA dataset end to end."""

import os
import re

import pytest
import torch

from comparative_recipe.ablation.crops import crop_views
from comparative_recipe.data import (
    collate_padding_idx,
    comparative_collate,
    DEMO_PAD_ID,
    demo_tokenizer,
    needle_qa_dataset,
    needle_qa_records,
    validate_vocab,
)
from comparative_recipe.data.demo import ATTRIBUTES
from tests.data.helpers import IGN

QUESTION = re.compile(r"What is (?:the color of )?(\w+)'s (\w+)(?: made of)?\?")


def test_records_deterministic_and_answerable():
    records = needle_qa_records(300, seed=3, n_paragraphs=5)
    assert records == needle_qa_records(300, seed=3, n_paragraphs=5)
    assert records != needle_qa_records(300, seed=4, n_paragraphs=5)
    validation = needle_qa_records(300, seed=3, n_paragraphs=5, split="validation")
    assert not {str(r) for r in records} & {str(r) for r in validation}
    for r in records:
        assert set(r) == {"context", "question", "answer", "gold"}
        assert len(r["context"]) == 5
        name, obj = QUESTION.fullmatch(r["question"]).groups()
        subject = f"The {obj} of {name} is"
        # exactly the gold paragraph is about the asked (person, object), and states the answer
        about = [i for i, p in enumerate(r["context"]) if p.startswith(subject)]
        assert about == [r["gold"]]
        assert re.match(rf"{subject} (made of )?{r['answer']}\.", r["context"][r["gold"]])
        # distractors mention the same person or the same object
        others = [p for i, p in enumerate(r["context"]) if i != r["gold"]]
        assert any(p.startswith(f"The {obj} of ") for p in others)
        assert any(f" of {name} is" in p for p in others)
        # ... and state the other kind of attribute: the answer's kind appears only in the gold
        asked = ATTRIBUTES["material" if "made of" in r["question"] else "color"]
        assert not any(re.search(rf"\b({'|'.join(asked)})\.", p) for p in others)
    # the answer is not guessable from the question type: many values per type
    for kind in ("color", "made of"):
        answers = {r["answer"] for r in records if kind in r["question"]}
        assert len(answers) >= 6
    # the gold paragraph moves around
    assert len({r["gold"] for r in records}) == 5


def test_demo_tokenizer_deterministic_roundtrip(tmp_path):
    a = demo_tokenizer(str(tmp_path / "a" / "demo.model"))
    b = demo_tokenizer(str(tmp_path / "b" / "demo.model"))
    assert os.listdir(tmp_path / "a") == ["demo.model"]  # no temp files left behind
    texts = [r["context"][0] for r in needle_qa_records(50, seed=9)]
    texts += ["What is the color of Mira's lamp?\nAnswer: green", "Zoë paid 42 € [x] {y}\t\n"]
    for text in texts:
        ids = a.encode(text, add_bos=False, add_eos=False)
        assert ids == b.encode(text, add_bos=False, add_eos=False)
        assert a.decode(ids) == text
        assert max(ids) < 512
    assert a.vocab_size <= 512
    assert (a.bos_id, a.eos_id) == (1, 2)
    assert a.pad_id == DEMO_PAD_ID == collate_padding_idx(a) == 0
    validate_vocab(a, 512)
    # cached: a second call loads the file instead of retraining
    mtime = os.path.getmtime(tmp_path / "a" / "demo.model")
    demo_tokenizer(str(tmp_path / "a" / "demo.model"))
    assert os.path.getmtime(tmp_path / "a" / "demo.model") == mtime
    with pytest.raises(ValueError, match="vocab_size=400"):
        demo_tokenizer(str(tmp_path / "a" / "demo.model"), vocab_size=400)


def test_needle_dataset_end_to_end(tok):
    ds = needle_qa_dataset(tok, n_samples=64, seed=1)
    val = needle_qa_dataset(tok, n_samples=64, seed=1, split="validation")
    assert len(ds) == len(val) == 64
    assert ds[0]["tokens"] != val[0]["tokens"]
    records = needle_qa_records(64, seed=1)
    for i in (0, 17, 63):
        item = ds[i]
        assert item["sample_id"] == i
        assert len(item["chunk_spans"]) == 4 and item["chunk_required"] == [False] * 4
        labelled = [t for t, label in zip(item["tokens"], item["labels"]) if label != IGN]
        assert tok.decode(labelled[:-1]) == records[i]["answer"] and labelled[-1] == tok.eos_id
        assert max(item["chunk_ids"]) == 3
    required = needle_qa_dataset(tok, n_samples=64, seed=1, gold_required=True)
    for i in (0, 17, 63):
        item = required[i]
        gold = records[i]["gold"]
        assert item["chunk_required"] == [j == gold for j in range(4)]
        start, end = item["chunk_spans"][gold]
        assert set(item["chunk_ids"][start:end]) == {-1}
        assert max(item["chunk_ids"]) == 2

    batch = comparative_collate([ds[i] for i in range(8)], padding_idx=tok.pad_id)
    views = crop_views(batch["tokens"], batch["labels"], batch["chunk_ids"], batch["sample_ids"],
                       [0, 1, 2], rate=0.5, seed=0, step=0, pad_id=tok.pad_id)
    lengths = [v.lengths for v in views]
    assert (lengths[0] > lengths[1]).all() and (lengths[1] > lengths[2]).all()
    for v in views:  # every view keeps every answer token
        assert torch.equal((v.labels != IGN).sum(1), (batch["labels"] != IGN).sum(1))


def test_needle_dataset_chunking_modes(tok):
    sentences = needle_qa_dataset(tok, n_samples=8, seed=1, chunking={"mode": "sentence"})
    for i in range(8):
        assert max(sentences[i]["chunk_ids"]) == 7  # two sentences in each of 4 paragraphs
    with pytest.raises(ValueError, match="ablation.crop.rate"):
        needle_qa_dataset(tok, n_samples=8, crop={"chunking": "spans"})
    with pytest.raises(TypeError, match="n_sample"):
        needle_qa_dataset(tok, n_sample=8)
