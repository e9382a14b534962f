"""Text classification as next-token prediction of a label word, chunked for input crops.

.. code-block:: yaml

    dataset:
      _component_: comparative_recipe.data.classification_dataset
      source: csv
      data_files: data/train.csv
      label_words: [" negative", " positive"]
      template: "Review: {text}\\nSentiment:"

A text pair (NLI premise / hypothesis, paraphrase pairs) takes a second column and a template
with both placeholders:

.. code-block:: yaml

    dataset:
      _component_: comparative_recipe.data.classification_dataset
      source: parquet
      data_files: data/nli_train.parquet
      text_column: premise
      text_pair_column: hypothesis
      label_words: [" yes", " maybe", " no"]
      label_map: {0: " yes", 1: " maybe", 2: " no"}
      template: "Premise: {text}\\nHypothesis: {text_pair}\\nEntailment:"

Each piece of the prompt is encoded on its own (see ``comparative_recipe.data.context_qa``).
"""

import re
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


TEXT, TEXT_PAIR = "{text}", "{text_pair}"
#: templates used when ``template`` is None
DEFAULT_TEMPLATE = "{text}\nLabel:"
DEFAULT_PAIR_TEMPLATE = "{text}\n{text_pair}\nLabel:"
_PAIR_EXAMPLE = "'Premise: {text}\\nHypothesis: {text_pair}\\nLabel:'"


def _template_parts(template: str, pair: bool) -> Tuple[List[str], List[str]]:
    """The template cut at its placeholders: literals (one more than fields) and the fields
    ("text", "text_pair") in the order they appear. ValueError saying how to fix a template
    that does not match ``pair`` (whether a text_pair_column is set)."""
    if not isinstance(template, str):
        raise ValueError(f"template must be a string, got {type(template).__name__}")
    if template.count(TEXT) != 1:
        raise ValueError(
            f"template must contain '{TEXT}' exactly once (where the text goes), got {template!r}"
        )
    n_pair = template.count(TEXT_PAIR)
    if pair and n_pair != 1:
        raise ValueError(
            f"template must contain '{TEXT_PAIR}' exactly once when text_pair_column is set "
            f"(where the second text goes), got {template!r}; e.g. {_PAIR_EXAMPLE}"
        )
    if not pair and n_pair:
        raise ValueError(
            f"template {template!r} has '{TEXT_PAIR}' but text_pair_column is not set: set "
            "text_pair_column to the column that holds the second text, or remove "
            f"'{TEXT_PAIR}' from the template"
        )
    placeholders = re.compile("|".join(re.escape(p) for p in (TEXT, TEXT_PAIR)))
    fields = [m.group(0)[1:-1] for m in placeholders.finditer(template)]
    return placeholders.split(template), fields


def _fit_lengths(lengths: Mapping[str, int], room: int) -> Dict[str, int]:
    """Token counts per text that fit ``room``, cutting the longest text first (on a tie the
    second text, as Hugging Face's ``longest_first`` truncation does)."""
    out = dict(lengths)
    if sum(out.values()) <= room:
        return out
    if len(out) == 1:
        return {field: max(0, room) for field in out}
    a, b = out["text"], out["text_pair"]
    if 2 * min(a, b) <= room:
        return {"text": a, "text_pair": room - a} if a <= b else {"text": room - b, "text_pair": b}
    return {"text": room - room // 2, "text_pair": room // 2}


class ClassificationDataset(Dataset):
    """Tokenized text classification as next-token prediction of a label word.

    The template holds ``{text}`` exactly once, and with ``text_pair_column`` also
    ``{text_pair}`` exactly once (in either order); it is cut at the placeholders into literal
    pieces. Layout (each piece encoded on its own)::

        [bos] prefix text suffix label_word                       (one text)
        [bos] prefix text middle text_pair suffix label_word      (a pair; template order)

    with no eos. Labels are -100 except on the label word's first token, whose id is
    ``label_token_ids[class_id]``; the model predicts it from the prompt, and a classifier
    compares the logits of ``label_token_ids`` at that position. If ``max_seq_len`` is set, text
    tokens are cut from the end so that the sample fits, the longer text of a pair first (the
    literal pieces and the label word are kept whole); a ``max_seq_len`` that leaves no room
    for any text raises a ValueError. With a text-mode ``chunking`` (sentence, paragraph,
    pattern) each text is cut at that mode's boundaries and the pieces encoded on their own, so
    their token spans are exact.

    The label column holds an int index into ``label_words``, a label word itself, or the word
    without its surrounding whitespace (``negative`` for the word ``" negative"``); with
    ``label_map`` (data value -> label word, e.g. ``{0: " negative", 1: " positive"}`` or
    ``{neg: " negative"}``) it holds the map's keys instead. Every value is checked when the
    dataset is built.

    Item fields: ``tokens``, ``labels`` (List[int], length S), ``class_id`` (int),
    ``protected_spans`` (everything but the texts: the template and the label word are never
    dropped, whatever the chunking), ``chunk_spans`` (the token span of each text, in order of
    position: chunking mode ``spans`` makes each text one chunk), ``text_spans`` (text modes
    only: the text pieces). A chunk never spans both texts of a pair.

    Attributes:
        label_token_ids (List[int]): first token of each label word, encoded as a piece of its
            own (as it is after the prompt); pairwise distinct.
        prefix_len (int): tokens before the first text (bos included).
        suffix_len (int): tokens between the last text and the label word.
        text_fields (List[str]): "text" (and "text_pair") in template order.
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
        template: Optional[str] = None,
        max_seq_len: Optional[int] = None,
        chunking: Optional[ChunkingConfig] = None,
        label_map: Optional[Mapping[Any, str]] = None,
        text_pair_column: Optional[str] = None,
        source: str = "classification_dataset",
    ) -> None:
        check_columns(
            data,
            {
                "text_column": text_column,
                "text_pair_column": text_pair_column,
                "label_column": label_column,
            },
            source,
        )
        if template is None:
            template = DEFAULT_PAIR_TEMPLATE if text_pair_column is not None else DEFAULT_TEMPLATE
        literals, self.text_fields = _template_parts(template, text_pair_column is not None)
        label_words = [str(w) for w in label_words]
        if len(label_words) < 2:
            raise ValueError(f"label_words needs at least two words, got {label_words}")
        self._data = data
        self._tokenizer = tokenizer
        self._columns = {"text": text_column}
        if text_pair_column is not None:
            self._columns["text_pair"] = text_pair_column
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

        bos = getattr(tokenizer, "bos_id", None)
        self._literal_ids = [encode_text(tokenizer, piece) if piece else [] for piece in literals]
        self._literal_ids[0] = ([bos] if isinstance(bos, int) and bos >= 0 else []) + (
            self._literal_ids[0]
        )
        self.prefix_len = len(self._literal_ids[0])
        self.suffix_len = len(self._literal_ids[-1])
        self._fixed_len = sum(len(ids) for ids in self._literal_ids)
        if max_seq_len is None:
            max_seq_len = getattr(tokenizer, "max_seq_len", None)
        self.max_seq_len = max_seq_len
        if max_seq_len is not None:
            longest = self._fixed_len + max(len(ids) for ids in self._label_word_ids)
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
        row = self._data[index]
        class_id = self._class_ids[index]
        word_ids = self._label_word_ids[class_id]
        encoded = {}
        for field, column in self._columns.items():
            what = "the text" if field == "text" else "the second text (text_pair_column)"
            text = text_field(row[column], what, index)
            encoded[field] = encode_pieces(
                self._tokenizer, split_text(text, self._boundary), word_prefix=self._word_prefix
            )
        lengths = {field: len(ids) for field, (ids, _) in encoded.items()}
        if self.max_seq_len is not None:
            lengths = _fit_lengths(lengths, self.max_seq_len - self._fixed_len - len(word_ids))

        tokens = list(self._literal_ids[0])
        chunk_spans: List[Tuple[int, int]] = []
        text_spans: List[Tuple[int, int]] = []
        for k, field in enumerate(self.text_fields):
            ids, pieces = encoded[field]
            n = lengths[field]
            start = len(tokens)
            if n > 0:
                chunk_spans.append((start, start + n))
                text_spans.extend((start + a, start + min(b, n)) for a, b in pieces if a < n)
            tokens = tokens + ids[:n] + self._literal_ids[k + 1]
        labels = [CROSS_ENTROPY_IGNORE_IDX] * len(tokens) + [word_ids[0]]
        labels += [CROSS_ENTROPY_IGNORE_IDX] * (len(word_ids) - 1)
        tokens = tokens + word_ids
        protected, previous = [], 0
        for start, end in [*chunk_spans, (len(tokens), len(tokens))]:
            if start > previous:
                protected.append((previous, start))
            previous = end
        item = {
            "tokens": tokens,
            "labels": labels,
            "class_id": class_id,
            "protected_spans": protected,
            "chunk_spans": chunk_spans,
        }
        if self.text_split is not None:
            item["text_spans"] = text_spans
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
    template: Optional[str] = None,
    max_seq_len: Optional[int] = None,
    chunking: ChunkingLike = None,
    label_map: Optional[Mapping[Any, str]] = None,
    text_pair_column: Optional[str] = None,
    **load_dataset_kwargs: Any,
) -> ComparativeDataset:
    """Text (or text pair) classification by the first token of a label word (see
    ``ClassificationDataset``; ``label_map`` maps the data's label values to label words).

    Loads ``datasets.load_dataset(source, data_files=data_files, split=split,
    **load_dataset_kwargs)``: a hub name, or "csv" / "json" / "parquet" with local
    ``data_files``. Crops remove parts of the text(s) only: the template and the label word are
    protected in every chunking mode.

    Args:
        tokenizer (Any): the model's tokenizer.
        source (str): dataset name or file type.
        label_words (List[str]): one word per class, in class order, as it follows the prompt
            (e.g. ``[" negative", " positive"]`` for a byte-level BPE tokenizer).
        data_files, split: passed to ``load_dataset``. Default split "train".
        text_column (str): the text. Default "text".
        label_column (str): the label (word, word without whitespace, index, or a
            ``label_map`` key). Default "label".
        template (Optional[str]): the prompt, with ``{text}`` (and ``{text_pair}``) once each;
            None = ``"{text}\\nLabel:"`` (``"{text}\\n{text_pair}\\nLabel:"`` for a pair).
        max_seq_len (Optional[int]): longest sample; None = ``tokenizer.max_seq_len``. Long
            texts are cut from the end, the longer text of a pair first.
        chunking (ChunkingConfig | Mapping | None): None = mode "window" (64 tokens) for one
            text, mode "spans" (each text one chunk) for a pair. In any mode a chunk lies
            within one text.
        label_map (Optional[Mapping]): data value -> label word.
        text_pair_column (Optional[str]): the second text of a pair (NLI hypothesis,
            paraphrase); the template must then hold ``{text_pair}``.
        **load_dataset_kwargs: passed to ``load_dataset``.

    Returns:
        ComparativeDataset: items ``tokens``, ``labels``, ``class_id``, ``protected_spans``,
        ``chunk_spans`` (``text_spans`` in text modes), ``sample_id``, ``chunk_ids``; attribute
        ``label_token_ids`` (List[int], one per label word).

    Raises:
        ValueError: a missing column, a template without its placeholders (or with
            ``{text_pair}`` but no ``text_pair_column``), two label words with the same first
            token, or a label value that is not in ``label_words``.
    """
    reject_crop_argument(load_dataset_kwargs)
    default = ChunkingConfig(mode="spans" if text_pair_column is not None else "window")
    config = chunking_config(chunking, default)
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
        text_pair_column=text_pair_column,
        source=f"classification_dataset(source={source!r})",
    )
    return ComparativeDataset(classification, tokenizer, config)
