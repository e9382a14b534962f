"""Chat and instruction data (torchtune messages) through comparative_dataset: only the content
of system and user messages is droppable, chunked at paragraph breaks; role headers, templates,
special tokens and the assistant's answers are protected."""

import json
from pathlib import Path

import pytest

from comparative_recipe.data import comparative_dataset, MessageSpansTokenizer
from tests.data.helpers import byte_level_qwen_tokenizer, IGN, write_jsonl

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "chat"

SYSTEM = "You are a careful assistant."
USER_PIECES = ["Here is a note about the lamp.\n", "It stands in the attic.\n\n",
               "The boat is red and old.\n\n", "Which object is in the attic?"]
ANSWER = "The lamp."


def chat(tok, style, **kwargs):
    column = {"openai": "messages", "sharegpt": "conversations"}[style]
    name = style
    return comparative_dataset(
        tok, builder="torchtune.datasets.chat_dataset", source="json",
        data_files=str(FIXTURES / f"{name}.jsonl"), conversation_column=column,
        conversation_style=style, split="train", chunking={"mode": "paragraph"}, **kwargs)


class Layout:
    """Expected tokens and chunk ids, built piece by piece."""

    def __init__(self, tok):
        self.tok, self.tokens, self.chunks, self.labelled = tok, [], [], []

    def add(self, ids, chunk=-1, labelled=False):
        ids = ids if isinstance(ids, list) else self.tok.encode(ids, add_bos=False, add_eos=False)
        self.tokens += ids
        self.chunks += [chunk] * len(ids)
        self.labelled += [labelled] * len(ids)

    def message(self, role, pieces, first_chunk=None, labelled=False, footer=True):
        t = self.tok
        self.add([t.special_tokens["<|im_start|>"]], labelled=labelled)
        self.add(f"{role}\n", labelled=labelled)
        for k, piece in enumerate(pieces):
            self.add(piece, -1 if first_chunk is None else first_chunk + k, labelled)
        if footer:
            self.add([t.special_tokens["<|im_end|>"]], labelled=labelled)
            self.add("\n", labelled=labelled)


def check(item, layout):
    assert item["tokens"] == layout.tokens
    labels = [t if lab else IGN for t, lab in zip(layout.tokens, layout.labelled)]
    assert [int(x) for x in item["labels"]] == labels
    assert item["chunk_ids"] == layout.chunks


@pytest.mark.parametrize("style", ["openai", "sharegpt"])
def test_chat_dataset_chunks_user_and_system_content_at_paragraph_breaks(qwen_tok, style):
    ds = chat(qwen_tok, style)
    first = Layout(qwen_tok)
    first.message("system", [SYSTEM], first_chunk=0)
    first.message("user", USER_PIECES, first_chunk=1)
    first.message("assistant", [ANSWER], labelled=True, footer=False)
    first.add([qwen_tok.eos_id], labelled=True)  # <|im_end|> as eos
    check(ds[0], first)

    # two turns: both user turns chunked, the first answer labelled, every header protected
    second = Layout(qwen_tok)
    second.message("user", ["Name a color.\n\n", "Keep it short."], first_chunk=0)
    second.message("assistant", ["Red."], labelled=True)
    second.message("user", ["Another one.\n", "Not red."], first_chunk=2)
    second.message("assistant", ["Blue."], labelled=True, footer=False)
    second.add([qwen_tok.eos_id], labelled=True)
    check(ds[1], second)


def test_openai_and_sharegpt_give_the_same_items(qwen_tok):
    openai, sharegpt = chat(qwen_tok, "openai"), chat(qwen_tok, "sharegpt")
    for i in range(2):
        assert openai[i]["tokens"] == sharegpt[i]["tokens"]
        assert openai[i]["chunk_ids"] == sharegpt[i]["chunk_ids"]


def test_instruct_dataset_chunks_the_instruction(qwen_tok):
    ds = comparative_dataset(
        qwen_tok, builder="torchtune.datasets.instruct_dataset", source="json",
        data_files=str(FIXTURES / "instruct.jsonl"), split="train",
        column_map={"input": "instruction", "output": "response"},
        new_system_prompt="Answer briefly.", chunking={"mode": "paragraph"})
    layout = Layout(qwen_tok)
    layout.message("system", ["Answer briefly."], first_chunk=0)
    layout.message("user", USER_PIECES, first_chunk=1)
    layout.message("assistant", [ANSWER], labelled=True, footer=False)
    layout.add([qwen_tok.eos_id], labelled=True)
    check(ds[0], layout)


def test_chunk_roles_and_window_chunks_stay_inside_a_message(qwen_tok):
    ds = chat(qwen_tok, "openai", chunk_roles=["user"])
    item = ds[0]
    system_ids = qwen_tok.encode(SYSTEM, add_bos=False, add_eos=False)
    start = item["tokens"].index(system_ids[0])
    assert set(item["chunk_ids"][: start + len(system_ids) + 2]) == {-1}
    assert max(item["chunk_ids"]) == len(USER_PIECES) - 1

    windows = comparative_dataset(
        qwen_tok, builder="torchtune.datasets.chat_dataset", source="json",
        data_files=str(FIXTURES / "openai.jsonl"), conversation_column="messages",
        conversation_style="openai", split="train", chunking={"mode": "window", "window": 5})
    for i in range(2):
        item, paragraphs = windows[i], chat(qwen_tok, "openai")[i]
        # droppable tokens are the same; each window lies inside one message's content
        assert [c >= 0 for c in item["chunk_ids"]] == [c >= 0 for c in paragraphs["chunk_ids"]]
        text = {k: qwen_tok.decode([t for t, c in zip(item["tokens"], item["chunk_ids"]) if c == k])
                for k in range(max(item["chunk_ids"]) + 1)}
        assert all("user" not in t and "assistant" not in t and "system" not in t
                   for t in text.values())
    with pytest.raises(ValueError, match="unknown roles"):
        chat(qwen_tok, "openai", chunk_roles=["human"])


def test_truncated_conversations_keep_headers_protected(tmp_path):
    tok = byte_level_qwen_tokenizer(tmp_path, max_seq_len=60)
    ds = chat(tok, "openai")
    item = ds[0]
    assert len(item["tokens"]) == 60
    full = Layout(tok)
    full.message("system", [SYSTEM], first_chunk=0)
    full.message("user", USER_PIECES, first_chunk=1)
    assert item["tokens"][:59] == full.tokens[:59]
    assert item["chunk_ids"][:59] == full.chunks[:59]


def test_llama2_chat_template_tags_are_protected(tmp_path):
    from torchtune.models.llama2 import llama2_tokenizer

    from comparative_recipe.data import demo_tokenizer

    path = tmp_path / "demo.model"
    demo_tokenizer(str(path))
    tok = llama2_tokenizer(str(path), prompt_template="torchtune.models.llama2.Llama2ChatTemplate")
    ds = chat(tok, "openai")
    for i in range(2):
        item = ds[i]
        droppable = tok.decode([t for t, c in zip(item["tokens"], item["chunk_ids"]) if c >= 0])
        protected = tok.decode([t for t, c, lab in zip(item["tokens"], item["chunk_ids"],
                                                       item["labels"]) if c < 0 and lab == IGN])
        assert "[INST]" in protected and "[INST]" not in droppable and "<<SYS>>" not in droppable
    item = ds[0]
    chunks = [tok.decode([t for t, c in zip(item["tokens"], item["chunk_ids"]) if c == k])
              for k in range(max(item["chunk_ids"]) + 1)]
    assert [c.strip() for c in chunks] == [SYSTEM] + [p.strip() for p in USER_PIECES]


def test_a_tokenizer_whose_tokens_differ_gets_no_spans(qwen_tok, tmp_path):
    """A model transform that is not tokenize_messages: the sample keeps the usual protections
    only (nothing is wrongly protected or exposed)."""

    class Shifted:
        def __init__(self, tok):
            self.tok = tok

        def tokenize_messages(self, messages):
            tokens, mask = self.tok.tokenize_messages(messages)
            return [t + 1 for t in tokens], mask

        def __call__(self, sample, inference=False):
            return self.tok(sample)

    wrapped = MessageSpansTokenizer(Shifted(qwen_tok))
    from torchtune.data import Message

    out = wrapped({"messages": [Message("user", "a\nb", masked=True), Message("assistant", "c")]})
    assert "protected_spans" not in out and out["tokens"]


def test_plain_builders_still_work_through_the_wrapper(tok, tmp_path):
    """A builder that only encodes text (this package's own) sees the tokenizer's attributes."""
    path = write_jsonl(tmp_path / "qa.jsonl", [{"context": ["A red lamp.", "A blue boat."],
                                               "question": "What is red?", "answer": "the lamp"}])
    ds = comparative_dataset(tok, builder="comparative_recipe.data.context_qa_dataset",
                             source="json", data_files=path, chunking={"mode": "spans"})
    assert max(ds[0]["chunk_ids"]) == 1
    assert json.dumps(ds[0])


def test_unchanged_where_the_format_has_no_role_text_and_pickles(tok, tmp_path):
    """The demo tokenizer (llama2, no template) writes no headers: the wrapper protects nothing
    more than before; the dataset (with the wrapped tokenizer inside) pickles for workers."""
    import pickle

    from torchtune.datasets import instruct_dataset

    from comparative_recipe.data import ComparativeDataset

    rows = [{"input": "One line.\nTwo line.\n\nThree.", "output": "ok"},
            {"input": "Just one.\nAnd two.", "output": "fine"}]
    path = write_jsonl(tmp_path / "instruct.jsonl", rows)
    for chunking in ({"mode": "paragraph"}, {"mode": "window", "window": 3}):
        plain = ComparativeDataset(instruct_dataset(tok, source="json", data_files=path,
                                                    split="train"), tok, chunking)
        wrapped = comparative_dataset(tok, builder="torchtune.datasets.instruct_dataset",
                                      source="json", data_files=path, split="train",
                                      chunking=chunking)
        for i in range(2):
            assert wrapped[i]["chunk_ids"] == plain[i]["chunk_ids"]
        assert max(wrapped[0]["chunk_ids"]) >= 2
    again = pickle.loads(pickle.dumps(wrapped))
    assert again[1] == wrapped[1]
