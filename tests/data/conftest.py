"""Fixtures of the data tests."""

import pytest

from comparative_recipe.data import demo_tokenizer


@pytest.fixture(scope="session")
def tok(tmp_path_factory):
    """The demo SentencePiece tokenizer (byte fallback, newlines kept), trained once."""
    return demo_tokenizer(str(tmp_path_factory.mktemp("tok") / "demo.model"), vocab_size=512)


@pytest.fixture(scope="session")
def qwen_tok(tmp_path_factory):
    """torchtune's Qwen2.5 tokenizer on a byte-level vocab (one token per byte, plus "\\n\\n"),
    with the real chat format: <|im_start|>role\\n ... <|im_end|>\\n, special ids >= 151643."""
    from tests.data.helpers import byte_level_qwen_tokenizer

    return byte_level_qwen_tokenizer(tmp_path_factory.mktemp("qwen_tok"))
