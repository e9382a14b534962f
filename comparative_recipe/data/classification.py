"""Text classification as next-token prediction of a label word, chunked for input crops.

.. code-block:: yaml

    dataset:
      _component_: comparative_recipe.data.classification_dataset
      source: csv
      data_files: data/train.csv
      label_words: [" negative", " positive"]
      template: "Review: {text}\\nSentiment:"

Each piece of the prompt is encoded on its own (see ``comparative_recipe.data.context_qa``).
"""

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from datasets import load_dataset
from torch.utils.data import Dataset

from torchtune.data import CROSS_ENTROPY_IGNORE_IDX

from comparative_recipe.data._rows import check_columns, text_field
from comparative_recipe.data.chunking import (
    ChunkingConfig,
    ChunkingLike,
    chunking_config,
    reject_crop_argument,
    split_text,
)
from comparative_recipe.data.comparative import ComparativeDataset
from comparative_recipe.data.tokenizer_utils import adds_word_prefix, encode_pieces, encode_text


class ClassificationDataset(Dataset):
    """Tokenized text classification as next-token prediction of a label word.

    The template holds ``{text}`` exactly once; it is split there into a prefix and a suffix.
    Layout (each piece encoded on its own)::

        [bos] prefix text suffix label_word

    with no eos. Labels are -100 except on the label word's first token, whose id is
    ``label_token_ids[class_id]``; the model predicts it from the prompt, and a classifier
    compares the logits of ``label_token_ids`` at that position. If ``max_seq_len`` is set, the
    text's tokens are cut from the end so that the sample fits (prefix, suffix and label word
    are kept whole); a ``max_seq_len`` that leaves no room for any text raises a ValueError.
    With a text-mode ``chunking`` (sentence, paragraph, pattern) the text is cut at that mode's
    boundaries and the pieces encoded on their own, so their token spans are exact.

    The label column holds an int index into ``label_words``, a label word itself, or the word
    without its surrounding whitespace (``negative`` for the word ``" negative"``); with
    ``label_map`` (data value -> label word, e.g. ``{0: " negative", 1: " positive"}`` or
    ``{neg: " negative"}``) it holds the map's keys instead. Every value is checked when the
    dataset is built.

    Item fields: ``tokens``, ``labels`` (List[int], length S), ``class_id`` (int),
    ``protected_spans`` (everything but the text: the template and the label word are never
    dropped, whatever the chunking), ``text_spans`` (text modes only: the text pieces).

    Attributes:
        label_token_ids (List[int]): first token of each label word, encoded as a piece of its
            own (as it is after the prompt); pairwise distinct.
        prefix_len (int): tokens before the text (bos included).
        suffix_len (int): tokens between the text and the label word.
        text_split (Optional[str]): ``chunking.text_rule``: which boundaries ``text_spans`` follow.
    """

    def __init__(
        self,
        tokenizer: Any,
        data: Any,
        *,
        label_words: Sequence[str],
        text_column: str = "text",
        label_column: str = "label",
        template: str = "{text}\nLabel:",
        max_seq_len: Optional[int] = None,
        chunking: Optional[ChunkingConfig] = None,
        label_map: Optional[Mapping[Any, str]] = None,
        source: str = "classification_dataset",
    ) -> None:
        check_columns(data, {"text_column": text_column, "label_column": label_column}, source)
        if template.count("{text}") != 1:
            raise ValueError(f"template must contain '{{text}}' exactly once, got {template!r}")
        label_words = [str(w) for w in label_words]
        if len(label_words) < 2:
            raise ValueError(f"label_words needs at least two words, got {label_words}")
        self._data = data
        self._tokenizer = tokenizer
        self._text_column = text_column
        self.label_words = label_words
        self.template = template
        self.text_split = chunking.text_rule if chunking is not None else None
        self._boundary = chunking.boundary if chunking is not None else None
        self._word_prefix = adds_word_prefix(tokenizer)

        self._label_word_ids = []
        for word in label_words:
            ids = encode_text(tokenizer, word)
            if not ids:
                raise ValueError(f"label word {word!r} encodes to no tokens")
            self._label_word_ids.append(ids)
        self.label_token_ids = [ids[0] for ids in self._label_word_ids]
        first_word = {}
        for word, token in zip(label_words, self.label_token_ids):
            if token in first_word:
                raise ValueError(
                    f"label words {first_word[token]!r} and {word!r} share their first token "
                    f"{token} ({tokenizer.decode([token])!r}); the label is read from the first "
                    "token only, so choose words that start differently"
                )
            first_word[token] = word

        prefix, suffix = template.split("{text}")
        bos = getattr(tokenizer, "bos_id", None)
        self._prefix_ids = ([bos] if isinstance(bos, int) and bos >= 0 else []) + (
            encode_text(tokenizer, prefix) if prefix else []
        )
        self._suffix_ids = encode_text(tokenizer, suffix) if suffix else []
        self.prefix_len = len(self._prefix_ids)
        self.suffix_len = len(self._suffix_ids)
        if max_seq_len is None:
            max_seq_len = getattr(tokenizer, "max_seq_len", None)
        self.max_seq_len = max_seq_len
        if max_seq_len is not None:
            longest = self.prefix_len + self.suffix_len + max(len(ids) for ids in self._label_word_ids)
            if longest > max_seq_len:
                raise ValueError(
                    f"max_seq_len={max_seq_len} leaves no room for the text: the template and "
                    f"the longest label word take {longest} tokens"
                )

        self._label_map = None
        if label_map is not None:
            self._label_map = {}
            for key, word in dict(label_map).items():
                if word not in label_words:
                    raise ValueError(
                        f"label_map maps {key!r} to {word!r}, which is not one of label_words "
                        f"{label_words}"
                    )
                self._label_map[str(key)] = label_words.index(word)
        self._class_ids = [
            self._class_id(value, index) for index, value in enumerate(data[label_column])
        ]

    def _class_id(self, value: Any, index: int) -> int:
        if self._label_map is not None:
            class_id = self._label_map.get(str(value))
            if class_id is None:
                raise ValueError(
                    f"sample {index}: label {value!r} is not a key of label_map "
                    f"{sorted(self._label_map)}"
                )
            return class_id
        if isinstance(value, int) and not isinstance(value, bool):
            if 0 <= value < len(self.label_words):
                return value
            raise ValueError(
                f"sample {index}: label index {value} is out of range for label_words "
                f"{self.label_words}"
            )
        if isinstance(value, str):
            if value in self.label_words:
                return self.label_words.index(value)
            stripped = [i for i, w in enumerate(self.label_words) if w.strip() == value.strip()]
            if len(stripped) == 1:
                return stripped[0]
        raise ValueError(
            f"sample {index}: label {value!r} is not in label_words {self.label_words} "
            "(labels must be one of the words, with or without their surrounding whitespace, or "
            "an int index into them; map other values to words with label_map)"
        )

    def __len__(self) -> int:
        return len(self._data)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        text = text_field(self._data[index][self._text_column], "the text", index)
        class_id = self._class_ids[index]
        word_ids = self._label_word_ids[class_id]
        text_ids, pieces = encode_pieces(
            self._tokenizer, split_text(text, self._boundary), word_prefix=self._word_prefix
        )
        if self.max_seq_len is not None:
            room = self.max_seq_len - self.prefix_len - self.suffix_len - len(word_ids)
            text_ids = text_ids[:room]
            pieces = [(a, min(b, room)) for a, b in pieces if a < room]
        start, end = self.prefix_len, self.prefix_len + len(text_ids)
        tokens = self._prefix_ids + text_ids + self._suffix_ids + word_ids
        labels = [CROSS_ENTROPY_IGNORE_IDX] * len(tokens)
        labels[end + self.suffix_len] = word_ids[0]
        protected: List[Tuple[int, int]] = [(0, start)] if start > 0 else []
        protected.append((end, len(tokens)))
        item = {
            "tokens": tokens,
            "labels": labels,
            "class_id": class_id,
            "protected_spans": protected,
        }
        if self.text_split is not None:
            item["text_spans"] = [(start + a, start + b) for a, b in pieces]
        return item


def classification_dataset(
    tokenizer: Any,
    *,
    source: str,
    label_words: List[str],
    data_files: Optional[Any] = None,
    split: str = "train",
    text_column: str = "text",
    label_column: str = "label",
    template: str = "{text}\nLabel:",
    max_seq_len: Optional[int] = None,
    chunking: ChunkingLike = None,
    label_map: Optional[Mapping[Any, str]] = None,
    **load_dataset_kwargs: Any,
) -> ComparativeDataset:
    """Text classification by the first token of a label word (see ``ClassificationDataset``;
    ``label_map`` maps the data's label values to label words).

    Loads ``datasets.load_dataset(source, data_files=data_files, split=split,
    **load_dataset_kwargs)``. Crops remove parts of the text only: the template and the label
    word are protected in every chunking mode. ``chunking`` None = mode "window" (64 tokens).
    ``max_seq_len`` (None = ``tokenizer.max_seq_len``) cuts long texts from the end.

    Returns:
        ComparativeDataset: items ``tokens``, ``labels``, ``class_id``, ``protected_spans``
        (``text_spans`` in text modes), ``sample_id``, ``chunk_ids``; attribute
        ``label_token_ids`` (List[int], one per label word).

    Raises:
        ValueError: a missing column, two label words with the same first token, or a label
            value that is not in ``label_words``.
    """
    reject_crop_argument(load_dataset_kwargs)
    config = chunking_config(chunking, ChunkingConfig(mode="window"))
    data = load_dataset(source, data_files=data_files, split=split, **load_dataset_kwargs)
    classification = ClassificationDataset(
        tokenizer,
        data,
        label_words=label_words,
        text_column=text_column,
        label_column=label_column,
        template=template,
        max_seq_len=max_seq_len,
        chunking=config,
        label_map=label_map,
        source=f"classification_dataset(source={source!r})",
    )
    return ComparativeDataset(classification, tokenizer, config)
