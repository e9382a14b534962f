"""The SmolLM2 tokenizer component, on the tokenizer.json that the GGUF converter writes."""

import pytest
from torchtune.data import Message

from comparative_recipe.models.smollm2 import DEFAULT_SYSTEM_PROMPT, smollm2_tokenizer

gguf = pytest.importorskip("gguf")
jinja2 = pytest.importorskip("jinja2")

from comparative_recipe.models.gguf import gguf_to_hf  # noqa: E402
from tests.models.test_gguf import TOKENS, _hf_weights, _write_gguf  # noqa: E402

# SmolLM2-Instruct's chat template (its tokenizer_config.json), rendered as transformers does.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
ID = {tok: i for i, tok in enumerate(TOKENS)}


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("smol")
    out = gguf_to_hf(_write_gguf(tmp / "tiny.gguf", _hf_weights(True, False)), tmp / "hf")
    return str(out / "tokenizer.json")


def render(messages, add_generation_prompt=False):
    return jinja2.Template(CHAT_TEMPLATE).render(
        messages=[{"role": m.role, "content": m.text_content} for m in messages],
        add_generation_prompt=add_generation_prompt,
    )


def test_encode_applies_byte_level_bpe_with_single_digits(tokenizer_json):
    tok = smollm2_tokenizer(tokenizer_json)
    # "hello": h e l l o -> (h e) (l l) -> (he ll) o; " world": (Ġ w) o r l d; " 42": Ġ 4 2
    expected = [ID[t] for t in ["hell", "o", "Ġw", "o", "r", "l", "d", "Ġ", "4", "2"]]
    assert tok.encode("hello world 42", add_bos=True, add_eos=False) == expected
    assert tok.encode("hello", add_eos=True) == [ID["hell"], ID["o"], ID["<|im_end|>"]]
    assert tok.decode(expected) == "hello world 42"
    assert tok.encode("<|im_start|>", add_eos=False) == [ID["<|im_start|>"]]
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (None, ID["<|im_end|>"], ID["<|endoftext|>"])
    assert tok.vocab_size == len(TOKENS)
    assert set(tok.special_tokens) == {"<|endoftext|>", "<|im_start|>", "<|im_end|>"}


@pytest.mark.parametrize("with_system", [False, True])
def test_messages_follow_the_chat_template(tokenizer_json, with_system):
    tok = smollm2_tokenizer(tokenizer_json)
    messages = [
        Message(role="user", content="hello world", masked=True),
        Message(role="assistant", content="hello 42"),
    ]
    if with_system:
        messages.insert(0, Message(role="system", content="be brief", masked=True))
    ids, mask = tok.tokenize_messages(messages)
    # training: the chat template's text, the last assistant turn ending in <|im_end|> (eos)
    text = render(messages)
    assert text.endswith("<|im_end|>\n")
    assert ids == tok.encode(text[: -len("\n")], add_eos=False)
    # the assistant message (its header too, as in torchtune's ChatML tokenizers) is trained on
    answer = tok.encode("<|im_start|>assistant\nhello 42", add_eos=True)
    assert mask == [True] * (len(ids) - len(answer)) + [False] * len(answer)
    assert ids[-len(answer):] == answer

    # inference: an empty assistant turn leaves the generation prompt
    prompt = messages[:-1] + [Message(role="assistant", content="")]
    sample = tok({"messages": prompt}, inference=True)
    assert sample["tokens"] == tok.encode(render(messages[:-1], add_generation_prompt=True), add_eos=False)


def test_no_default_system_prompt_and_truncation(tokenizer_json):
    tok = smollm2_tokenizer(tokenizer_json, system_prompt=None, max_seq_len=6)
    ids, mask = tok.tokenize_messages([Message(role="user", content="hello world 42 42 42")])
    assert len(ids) == len(mask) == 6
    assert ids[0] == ID["<|im_start|>"] and ids[-1] == tok.eos_id


def test_prompt_template_dict(tokenizer_json):
    tok = smollm2_tokenizer(tokenizer_json, system_prompt=None,
                            prompt_template={"user": ["hello ", ""]})
    ids, _ = tok.tokenize_messages([Message(role="user", content="world")], add_eos=False)
    # the template's tags are content items of their own, encoded apart from the text
    enc = lambda text: tok.encode(text, add_eos=False)  # noqa: E731
    assert ids == [ID["<|im_start|>"], *enc("user\n"), *enc("hello "), *enc("world"),
                   ID["<|im_end|>"], *enc("\n")]


def test_not_a_smollm2_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models

    path = tmp_path / "tokenizer.json"
    Tokenizer(models.BPE(vocab={"a": 0}, merges=[])).save(str(path))
    with pytest.raises(ValueError, match="not a SmolLM2 tokenizer.json"):
        smollm2_tokenizer(str(path))


def test_classification_dataset_with_the_chat_template(tokenizer_json, tmp_path):
    """The shipped SmolLM2 classification config's template: special-token strings in it become
    their ids, and the label is the first token of the answer."""
    from comparative_recipe.data import classification_dataset

    csv = tmp_path / "d.csv"
    csv.write_text("text,label\nhello world,fresh\nworld,rotten\n")
    tok = smollm2_tokenizer(tokenizer_json)
    ds = classification_dataset(
        tok, source="csv", data_files=str(csv), split="train", label_words=["hell", "world"],
        label_map={"fresh": "hell", "rotten": "world"},
        template="<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n",
    )
    item = ds[0]
    assert item["tokens"][0] == ID["<|im_start|>"] and ID["<|im_end|>"] in item["tokens"]
    scored = [(t, lab) for t, lab in zip(item["tokens"], item["labels"]) if lab != -100]
    assert scored == [(ID["hell"], ID["hell"])]
    assert ds.label_token_ids == [ID["hell"], ID["w"]]
    assert [lab for lab in ds[1]["labels"] if lab != -100] == [ID["w"]]
