"""Sentence and paragraph chunking on real tokenized text: chunk counts match the text.

Regression for separator chunking that matched token ids: a separator merged with its neighbour
by the tokenizer was not found, and the data check passed as soon as one sample contained it.
"""

import random
import re

import pytest

from comparative_recipe.data import (
    ChunkingConfig,
    classification_dataset,
    ComparativeDataset,
    context_qa_dataset,
)
from tests.data.helpers import CharTokenizer, IGN, write_csv, write_jsonl

WORDS = ["lamp", "word", "green", "boat", "Mira", "kite", "attic", "red", "gift"]


def random_text(rng):
    """Sentences of 3-6 words ending in . ! ?, often in "word."; paragraphs joined by one or
    two line breaks. Returns (text, sentences, paragraphs) as built."""
    paragraphs, n_sentences = [], 0
    for _ in range(rng.randint(1, 3)):
        sentences = []
        for _ in range(rng.randint(1, 4)):
            words = [rng.choice(WORDS) for _ in range(rng.randint(3, 6))]
            if rng.random() < 0.5:
                words[-1] = "word"
            sentences.append(" ".join(words).capitalize() + rng.choice([".", ".", "!", "?"]))
        n_sentences += len(sentences)
        paragraphs.append(" ".join(sentences))
    return rng.choice(["\n", "\n\n"]).join(paragraphs), n_sentences, len(paragraphs)


def counted(text):
    """Sentences and paragraphs of ``text``, counted with plain string operations."""
    sentences = len(re.findall(r"[.!?](?=\s|$)", text))
    paragraphs = len([line for line in text.split("\n") if line.strip()])
    return sentences, paragraphs


def texts(n, seed=0):
    rng = random.Random(seed)
    out = [random_text(rng) for _ in range(n)]
    for text, sentences, paragraphs in out:
        assert counted(text) == (sentences, paragraphs)
    assert any("word." in t for t, _, _ in out) and any("\n" in t for t, _, _ in out)
    return out


def n_chunks(item):
    return max(item["chunk_ids"]) + 1


@pytest.mark.parametrize("mode, which", [("sentence", 1), ("paragraph", 2)])
def test_wrapped_torchtune_dataset_gets_one_chunk_per_unit(tok, tmp_path, mode, which):
    from torchtune.datasets import instruct_dataset

    data = texts(24)
    path = write_jsonl(tmp_path / "instruct.jsonl", [{"input": t[0], "output": "ok"} for t in data])
    base = instruct_dataset(tok, source="json", data_files=path, split="train")
    ds = ComparativeDataset(base, tok, {"mode": mode})
    for i, sample in enumerate(data):
        assert n_chunks(ds[i]) == sample[which], sample[0]


@pytest.mark.parametrize("mode, which", [("sentence", 1), ("paragraph", 2)])
def test_classification_cuts_the_text_before_encoding(tok, tmp_path, mode, which):
    data = texts(16, seed=1)
    path = write_csv(tmp_path / "cls.csv", [[t[0], "yes"] for t in data])
    ds = classification_dataset(tok, source="csv", data_files=path, text_column="sentence",
                                label_words=["no", "yes"], template="Text: {text}\nLabel:",
                                chunking={"mode": mode})
    assert ds.dataset.text_split == mode
    for i, sample in enumerate(data):
        item = ds[i]
        assert n_chunks(item) == sample[which]
        # each chunk decodes to one sentence / paragraph of the text
        pieces = [tok.decode([t for t, c in zip(item["tokens"], item["chunk_ids"]) if c == k])
                  for k in range(n_chunks(item))]
        assert " ".join(p.strip() for p in pieces).split() == sample[0].split()


def test_context_qa_sentence_chunks(tok, tmp_path):
    data = texts(12, seed=2)
    rows = [{"context": [t[0].replace("\n", " ") for t in data[i : i + 3]],
             "question": "What is red?", "answer": "the boat", "gold": 1} for i in range(0, 12, 3)]
    path = write_jsonl(tmp_path / "qa.jsonl", rows)
    ds = context_qa_dataset(tok, source="json", data_files=path, required_column="gold",
                            chunking={"mode": "sentence"})
    for i, row in enumerate(rows):
        droppable = [counted(c)[0] for j, c in enumerate(row["context"]) if j != row["gold"]]
        assert n_chunks(ds[i]) == sum(droppable)
    # the same data wrapped again with paragraph chunking: one chunk per context chunk
    paragraphs = ComparativeDataset(ds, tok, {"mode": "paragraph"})
    assert not paragraphs._builder_text_spans  # boundaries found by decoding the tokens
    assert all(n_chunks(paragraphs[i]) == 2 for i in range(len(rows)))


def test_ideographic_sentences_with_byte_fallback_tokens(tok):
    text = "我们走了。你好吗？很好！"
    tokens = [tok.bos_id] + tok.encode(text, add_bos=False, add_eos=False) + [300]
    labels = [IGN] * (len(tokens) - 1) + [300]
    ds = ComparativeDataset([{"tokens": tokens, "labels": labels}], tok, {"mode": "sentence"})
    assert n_chunks(ds[0]) == 3


class MergingTokenizer(CharTokenizer):
    """Characters, except that ".\\n" and "\\n\\n" are single tokens (as in byte-level BPE), so
    a token-id separator "\\n" is missed wherever it follows a full stop."""

    MERGES = {".\n": 190, "\n\n": 191}

    def encode(self, text, add_bos=True, add_eos=True):
        ids, i = [], 0
        while i < len(text):
            if text[i : i + 2] in self.MERGES:
                ids.append(self.MERGES[text[i : i + 2]])
                i += 2
            else:
                ids.append(ord(text[i]) + 3)
                i += 1
        return [self.bos_id] * add_bos + ids + [self.eos_id] * add_eos

    def decode(self, ids):
        back = {v: k for k, v in self.MERGES.items()}
        return "".join(back.get(i, chr(i - 3)) for i in ids if i > 2)


def test_boundaries_inside_merged_tokens_are_found():
    tokenizer = MergingTokenizer()
    items = []
    for text, _, paragraphs in texts(10, seed=3):
        tokens = [1] + tokenizer.encode(text, add_bos=False, add_eos=False) + [150, 2]
        items.append(({"tokens": tokens, "labels": [IGN] * (len(tokens) - 2) + [150, 2]},
                      paragraphs))
    ds = ComparativeDataset([item for item, _ in items], tokenizer, {"mode": "paragraph"})
    for i, (_, paragraphs) in enumerate(items):
        assert n_chunks(ds[i]) == paragraphs


def test_boundary_mode_on_text_without_boundaries_fails(tok, tmp_path):
    from torchtune.datasets import instruct_dataset

    rows = [{"input": " ".join(random.Random(i).choices(WORDS, k=12)), "output": "ok"}
            for i in range(8)]
    path = write_jsonl(tmp_path / "plain.jsonl", rows)
    base = instruct_dataset(tok, source="json", data_files=path, split="train")
    with pytest.raises(ValueError) as err:
        ComparativeDataset(base, tok, ChunkingConfig(mode="sentence"))
    message = str(err.value)
    assert "'sentence'" in message and "no sentence boundary" in message
    assert "mode: window" in message and "1.0 chunks per sample found" in message
    ComparativeDataset(base, tok, ChunkingConfig(mode="window", window=4))  # fine


class DotPairTokenizer(CharTokenizer):
    """Characters, except that "." is two ids that decode to "." only together."""

    def encode(self, text, add_bos=True, add_eos=True):
        ids = [i for c in text for i in ([190, 191] if c == "." else [ord(c) + 3])]
        return [self.bos_id] * add_bos + ids + [self.eos_id] * add_eos

    def decode(self, ids):
        ids, out = list(ids), []
        for j, i in enumerate(ids):
            if i == 190 and j + 1 < len(ids) and ids[j + 1] == 191:
                out.append(".")
            elif 2 < i < 190:
                out.append(chr(i - 3))
        return "".join(out)


def test_chunks_far_short_of_the_text_boundaries_fail():
    tokenizer = DotPairTokenizer()
    text = "One two. Three four. Five six. Seven eight."
    tokens = [1] + tokenizer.encode(text, add_bos=False, add_eos=False) + [150]
    item = {"tokens": tokens, "labels": [IGN] * (len(tokens) - 1) + [150]}
    with pytest.raises(ValueError) as err:
        ComparativeDataset([item] * 4, tokenizer, {"mode": "sentence"})
    message = str(err.value)
    assert "far fewer chunks" in message and "'sentence'" in message
    assert "1.0 chunks per sample found, 4.0 expected" in message and "mode: window" in message
