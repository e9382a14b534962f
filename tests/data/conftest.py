"""Fixtures of the data tests."""

import pytest

from comparative_recipe.data import demo_tokenizer


@pytest.fixture(scope="session")
def tok(tmp_path_factory):
    """The demo SentencePiece tokenizer (byte fallback, newlines kept), trained once."""
    return demo_tokenizer(str(tmp_path_factory.mktemp("tok") / "demo.model"), vocab_size=512)
