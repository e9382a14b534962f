"""What the datasets need from a torchtune tokenizer (``encode(text, add_bos, add_eos)``,
``decode(ids)``, ``bos_id``, ...): special ids, the vocab check, piecewise encoding with exact
token spans, and the text of each token as it reads in running text."""

from typing import Any, Dict, List, Mapping, Sequence, Tuple


def special_token_ids(tokenizer: Any) -> List[int]:
    """Ids a crop never removes: bos, eos, pad and ``tokenizer.special_tokens`` values, if present.

    Negative or missing ids are skipped. Note that torchtune's llama2 tokenizer sets pad_id = 0,
    which is the ``<unk>`` piece of a SentencePiece model, so ``<unk>`` tokens are protected too.
    """
    ids = set()
    for name in ("bos_id", "eos_id", "pad_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int) and value >= 0:
            ids.add(value)
    special = getattr(tokenizer, "special_tokens", None)
    if isinstance(special, Mapping):
        ids.update(int(v) for v in special.values() if int(v) >= 0)
    return sorted(ids)


def validate_vocab(tokenizer: Any, vocab_size: int) -> int:
    """Checks that every id the tokenizer can produce fits the model's embedding.

    The largest id is ``tokenizer.vocab_size - 1`` or the largest special id (bos, eos, pad,
    ``special_tokens``), whichever is larger. Returns it.

    Raises:
        ValueError: when that id is >= ``vocab_size`` (names both numbers), or when the tokenizer
            exposes neither a vocab size nor special ids.
    """
    candidates = list(special_token_ids(tokenizer))
    tokenizer_vocab = getattr(tokenizer, "vocab_size", None)
    if isinstance(tokenizer_vocab, int):
        candidates.append(tokenizer_vocab - 1)
    if not candidates:
        raise ValueError(
            f"cannot tell which ids {type(tokenizer).__name__} produces: it has no vocab_size, "
            "bos_id, eos_id, pad_id or special_tokens"
        )
    max_id = max(candidates)
    if max_id >= vocab_size:
        raise ValueError(
            f"the tokenizer can produce token id {max_id} (tokenizer vocab_size "
            f"{tokenizer_vocab}) but the model's vocab_size is {vocab_size}: ids must be < "
            f"{vocab_size}. Use a model with vocab_size >= {max_id + 1} or a matching tokenizer."
        )
    return max_id


def encode_text(tokenizer: Any, text: str) -> List[int]:
    """``tokenizer.encode(text, add_bos=False, add_eos=False)`` as a list."""
    return list(tokenizer.encode(text, add_bos=False, add_eos=False))


def separator_token_ids(tokenizer: Any, separator: str) -> List[int]:
    """The ids the builders write for ``separator`` between pieces of a prompt.

    ``encode_text(separator)``, except that a first id which decodes to the empty string is
    removed when more ids follow: that is the word-boundary piece SentencePiece puts in front of
    any text encoded on its own ("\\n\\n" -> ["▁", "\\n\\n"]), which running text does not have
    before a separator ("green.\\n\\n" -> ["▁green", ".", "\\n\\n"]).
    """
    ids = encode_text(tokenizer, separator)
    if len(ids) > 1 and tokenizer.decode(ids[:1]) == "":
        ids = ids[1:]
    if not ids:
        raise ValueError(f"separator {separator!r} encodes to no tokens")
    return ids


def adds_word_prefix(tokenizer: Any) -> bool:
    """Whether the tokenizer reads text encoded on its own as starting after a space.

    True for SentencePiece models with a dummy prefix (llama2): encode("a b") is encode("a") +
    encode("b"). False for byte-level BPE (llama3, qwen2.5), where the space belongs to " b".
    """
    apart = encode_text(tokenizer, "a") + encode_text(tokenizer, "b")
    return encode_text(tokenizer, "a b") == apart


def encode_pieces(
    tokenizer: Any, pieces: Sequence[str], *, word_prefix: bool
) -> Tuple[List[int], List[Tuple[int, int]]]:
    """Encodes each piece on its own and concatenates: ids, and the exact token span (start,
    end exclusive) of each piece. Pieces that encode to no token get no span.

    With ``word_prefix`` (``adds_word_prefix``) one leading space of every piece but the first is
    dropped, since the tokenizer supplies it: a text cut before " It" then encodes as it does
    whole, with either kind of tokenizer.
    """
    ids: List[int] = []
    spans: List[Tuple[int, int]] = []
    for i, piece in enumerate(pieces):
        if word_prefix and i > 0 and piece.startswith(" "):
            piece = piece[1:]
        piece_ids = encode_text(tokenizer, piece) if piece else []
        if piece_ids:
            spans.append((len(ids), len(ids) + len(piece_ids)))
            ids.extend(piece_ids)
    return ids, spans


class TokenTexts:
    """The text of each token as it reads inside running text, decoded once per id and cached.

    ``TokenTexts(tokenizer)(ids)`` -> one string per id; joined, they give the decoded text, with
    the spaces that a lone decode drops (SentencePiece decodes "▁It" alone as "It"): each id is
    decoded after a fixed anchor token and the anchor's text removed. Tokens that are only part
    of a character (byte fallback, byte-level BPE) decode to U+FFFD alone; up to 4 of them are
    decoded together, the text given to the first and "" to the others.
    """

    _MAX_BYTES = 4

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._anchor = encode_text(tokenizer, "a")[-1:]
        self._anchor_text = tokenizer.decode(self._anchor) if self._anchor else ""
        self._cache: Dict[int, str] = {}

    def _decode_in_text(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        if self._anchor:
            text = self._tokenizer.decode(self._anchor + ids)
            if text.startswith(self._anchor_text):
                return text[len(self._anchor_text) :]
        return self._tokenizer.decode(ids)

    def text_of(self, token_id: int) -> str:
        token_id = int(token_id)
        text = self._cache.get(token_id)
        if text is None:
            text = self._cache[token_id] = self._decode_in_text([token_id])
        return text

    def __call__(self, ids: Sequence[int]) -> List[str]:
        ids = [int(i) for i in ids]
        texts = [self.text_of(i) for i in ids]
        i = 0
        while i < len(texts):
            step = 1
            if "\ufffd" in texts[i]:
                for j in range(i + 2, min(i + self._MAX_BYTES, len(ids)) + 1):
                    joined = self._decode_in_text(ids[i:j])
                    if "\ufffd" not in joined:
                        texts[i : j] = [joined] + [""] * (j - i - 1)
                        step = j - i
                        break
            i += step
        return texts
