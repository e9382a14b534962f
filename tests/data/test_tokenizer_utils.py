"""Tokenizer helpers: the vocab check, separator ids, piecewise encoding, token texts."""

import pytest

from comparative_recipe.data import separator_token_ids, TokenTexts, validate_vocab
from comparative_recipe.data.tokenizer_utils import adds_word_prefix, encode_pieces
from tests.data.helpers import CharTokenizer, enc


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


def test_separator_ids_drop_sentencepiece_word_boundary_piece(tok):
    # SentencePiece encodes "\n\n" alone with a leading word-boundary piece "▁" that running
    # text ("green.\n\nThe") does not have
    alone = tok.encode("\n\n", add_bos=False, add_eos=False)
    assert len(alone) >= 2 and tok.decode(alone[:1]) == ""
    assert separator_token_ids(tok, "\n\n") == alone[1:]
    assert separator_token_ids(CharTokenizer(), "\n\n") == enc("\n\n")


TEXTS = [
    "The lamp of Mira is green.\n\nThe boat of Tom is red.",
    "  leading spaces, a word. and\ttabs\n",
    "Zoë paid 42 € for 你好。 Ok!",
]


@pytest.mark.parametrize("text", TEXTS)
def test_token_texts_join_to_the_decoded_text(tok, text):
    ids = tok.encode(text, add_bos=True, add_eos=True)
    texts = TokenTexts(tok)(ids)
    assert len(texts) == len(ids)
    # sentencepiece drops the leading space of a decoded sequence; nothing else differs
    assert "".join(texts).lstrip(" ") == tok.decode(ids).lstrip(" ")
    assert "\ufffd" not in "".join(texts)


def test_token_texts_keep_the_space_a_lone_decode_drops(tok):
    ids = tok.encode("green. It", add_bos=False, add_eos=False)
    assert tok.decode(ids[-1:]) == "It"
    assert TokenTexts(tok)(ids)[-1] == " It"


def test_adds_word_prefix(tok):
    assert adds_word_prefix(tok)
    assert not adds_word_prefix(CharTokenizer())


def test_encode_pieces_gives_exact_spans_and_the_whole_text_encoding(tok):
    pieces = ["The lamp of Mira is green.", " It was a gift.", " Leo keeps it."]
    ids, spans = encode_pieces(tok, pieces, word_prefix=True)
    assert ids == tok.encode("".join(pieces), add_bos=False, add_eos=False)
    assert [tok.decode(ids[a:b]) for a, b in spans] == [p.strip() for p in pieces]
    chars, spans = encode_pieces(CharTokenizer(), ["ab", " c", ""], word_prefix=False)
    assert chars == enc("ab c") and spans == [(0, 2), (2, 4)]
