"""Datasets for comparative training.

``ComparativeDataset`` wraps any map-style dataset of tokenized samples (``tokens``, ``labels``,
as torchtune's SFT datasets emit them) and adds what the comparative step needs: ``sample_id``
and ``chunk_ids``, the droppable chunks of the sample's context (see ``docs/CONTRACT.md``).

The builders follow torchtune's dataset builders: plain functions, usable as ``_component_`` in a
config, with the tokenizer passed in by the recipe::

    dataset:
      _component_: comparative_recipe.data.context_qa_dataset
      source: json
      data_files: data/train.jsonl
      max_seq_len: 1024

Prompt layout of the builders. Every piece of text is encoded on its own with
``tokenizer.encode(text, add_bos=False, add_eos=False)`` and the ids are concatenated, so the
token span of each piece is exact. A SentencePiece tokenizer (llama2) starts every piece with a
word-boundary piece, as if it were preceded by a space; a tiktoken tokenizer (llama3) joins pieces
without one. Either way a model sees the same layout in training and at inference as long as the
prompt is built by these functions.
"""

import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from datasets import load_dataset
from torch.utils.data import Dataset

from torchtune.config._utils import _get_component_from_path
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX
from torchtune.utils import get_logger

from comparative_recipe.ablation.chunks import CropConfig, sample_chunk_ids

log = get_logger("INFO")

CropLike = Union[CropConfig, Mapping[str, Any], None]

DEFAULT_QA_INSTRUCTION = "Answer the question using the context."


# ----------------------------------------------------------------------------------------------
# helpers


def _crop_config(crop: CropLike, default: CropConfig) -> CropConfig:
    """A CropConfig from a CropConfig, a mapping of its fields (e.g. a config node), or None."""
    if crop is None:
        return default
    if isinstance(crop, CropConfig):
        return crop
    if isinstance(crop, Mapping):
        return CropConfig(**{str(k): v for k, v in crop.items()})
    raise TypeError(f"crop must be a CropConfig, a mapping of its fields or None, got {type(crop).__name__}")


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


def separator_token_ids(tokenizer: Any, separator: str) -> List[int]:
    """The token ids that separator chunking matches for ``separator``.

    ``tokenizer.encode(separator, add_bos=False, add_eos=False)``, except that a first id which
    decodes to the empty string is removed when more ids follow: that is the word-boundary piece
    SentencePiece puts in front of any text encoded on its own ("\\n\\n" -> ["▁", "\\n\\n"]), which
    running text does not have before a separator ("green.\\n\\n" -> ["▁green", ".", "\\n\\n"]).
    """
    ids = list(tokenizer.encode(separator, add_bos=False, add_eos=False))
    if len(ids) > 1 and tokenizer.decode(ids[:1]) == "":
        ids = ids[1:]
    if not ids:
        raise ValueError(f"separator {separator!r} encodes to no tokens")
    return ids


def _occurs(tokens: Sequence[int], pattern: Sequence[int]) -> bool:
    width = len(pattern)
    pattern = list(pattern)
    return any(list(tokens[i : i + width]) == pattern for i in range(len(tokens) - width + 1))


def _check_columns(data: Any, wanted: Mapping[str, Optional[str]], source: str) -> None:
    """ValueError naming the argument to set when a column is missing.  wanted: arg -> column."""
    columns = list(data.column_names)
    for argument, column in wanted.items():
        if column is not None and column not in columns:
            raise ValueError(
                f"{source}: column {column!r} not found; the dataset has columns {columns}. "
                f"Set {argument}=<one of them>."
            )


def _text_field(value: Any, what: str, index: int) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise ValueError(f"sample {index}: {what} must be a string, got {type(value).__name__}: {value!r}")


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


# ----------------------------------------------------------------------------------------------
# the wrapper


class ComparativeDataset(Dataset):
    """Adds ``sample_id`` and ``chunk_ids`` to the samples of a tokenized dataset.

    Wraps any map-style dataset whose items are dicts with ``tokens`` and ``labels`` (lists of
    ints of one length ``S``; labels unshifted, -100 where not trained on), e.g. torchtune's
    ``alpaca_dataset`` / ``instruct_dataset`` / ``chat_dataset`` or the builders of this module.
    A ``ComparativeDataset`` given as ``dataset`` is unwrapped, so a builder's output can be
    re-chunked with another ``crop``. Attributes the wrapper does not have (e.g.
    ``label_token_ids``) are looked up on the wrapped dataset.

    Item = the wrapped item plus

    - ``sample_id`` (int): the index.
    - ``chunk_ids`` (List[int], length S): -1 protected, k >= 0 droppable chunk k (0..n-1 in
      order of position), computed with ``crop.chunking``:

      - ``window``: runs of ``crop.window`` droppable tokens.
      - ``separator``: cut after each occurrence of ``crop.separator`` (token ids from
        ``separator_token_ids``).
      - ``spans``: the item's ``chunk_spans`` (list of (start, end), end exclusive) and optional
        ``chunk_required`` (list of bool; True = never dropped).

      Protected in every mode: labelled tokens, ``crop.protect_leading`` first tokens,
      ``crop.protect_trailing`` tokens before each labelled run, the tokenizer's special ids
      (``special_token_ids``), and every token after the last labelled token (removing those
      could not change any loss, so a crop of them would not ablate anything).

    Items are computed lazily. The configuration is checked against the data in ``__init__`` on
    the first ``validate_samples`` samples, so bad input fails before training starts.

    Args:
        dataset (Dataset): map-style dataset of dicts with ``tokens`` and ``labels``.
        tokenizer (Any): the model's tokenizer (``encode``, ``decode``, ``bos_id``, ...).
        crop (CropConfig | Mapping | None): chunking settings; a mapping is passed to
            ``CropConfig(**crop)``; None = ``CropConfig()`` (window chunking).
        validate_samples (int): how many leading samples to check eagerly. Default 32.

    Raises:
        ValueError: empty dataset; an item without ``tokens``/``labels`` or with different
            lengths; chunking "spans" on items without ``chunk_spans`` or with invalid spans;
            chunking "separator" whose separator occurs in none of the checked samples; no
            labelled token in any checked sample.
    """

    def __init__(
        self,
        dataset: Dataset,
        tokenizer: Any,
        crop: CropLike = None,
        *,
        validate_samples: int = 32,
    ) -> None:
        if isinstance(dataset, ComparativeDataset):
            dataset = dataset.dataset
        self.dataset = dataset
        self.tokenizer = tokenizer
        self.crop = _crop_config(crop, CropConfig())
        self.special_ids = special_token_ids(tokenizer)
        self.separator_ids = (
            separator_token_ids(tokenizer, self.crop.separator)
            if self.crop.chunking == "separator"
            else None
        )
        self._validate(validate_samples)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str) -> Any:
        # only called for attributes not found normally; guard against recursion while unpickling
        if name == "dataset" or "dataset" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["dataset"], name)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        if index < 0:
            index += len(self)
        item = self.dataset[index]
        for field in ("tokens", "labels"):
            if field not in item:
                raise ValueError(
                    f"sample {index} has no {field!r} (fields: {sorted(item.keys())}); "
                    "ComparativeDataset needs tokenized items with 'tokens' and 'labels'"
                )
        tokens = torch.as_tensor(item["tokens"], dtype=torch.long)
        labels = torch.as_tensor(item["labels"], dtype=torch.long)
        if tokens.shape != labels.shape:
            raise ValueError(
                f"sample {index}: tokens and labels have lengths {len(tokens)} and {len(labels)}"
            )
        spans = required = None
        if self.crop.chunking == "spans":
            if item.get("chunk_spans") is None:
                raise ValueError(
                    f"sample {index} has no 'chunk_spans' but crop.chunking is 'spans'. Use a "
                    "builder that emits spans (context_qa_dataset, needle_qa_dataset), or set "
                    "chunking: window (or separator)."
                )
            spans = [(int(s), int(e)) for s, e in item["chunk_spans"]]
            if item.get("chunk_required") is not None:
                required = [bool(r) for r in item["chunk_required"]]
        try:
            chunk_ids = sample_chunk_ids(
                tokens,
                labels,
                self.crop,
                special_ids=self.special_ids,
                separator_ids=self.separator_ids,
                spans=spans,
                required=required,
            )
        except ValueError as e:
            raise ValueError(f"sample {index}: {e}") from e
        labelled = (labels != CROSS_ENTROPY_IGNORE_IDX).nonzero()
        if labelled.numel() > 0:
            chunk_ids[int(labelled[-1]) + 1 :] = -1
        out = dict(item)
        out["sample_id"] = index
        out["chunk_ids"] = chunk_ids.tolist()
        return out

    def _validate(self, n_samples: int) -> None:
        if len(self.dataset) == 0:
            raise ValueError("the dataset is empty")
        n = min(len(self.dataset), max(1, n_samples))
        labelled = separator_seen = chunked = 0
        for index in range(n):
            item = self[index]
            labelled += any(label != CROSS_ENTROPY_IGNORE_IDX for label in item["labels"])
            chunked += any(c >= 0 for c in item["chunk_ids"])
            if self.separator_ids is not None:
                separator_seen += _occurs(list(item["tokens"]), self.separator_ids)
        if self.separator_ids is not None and separator_seen == 0:
            raise ValueError(
                f"crop.separator {self.crop.separator!r} (token ids {self.separator_ids}) occurs "
                f"in none of the first {n} samples: this tokenizer encodes it differently inside "
                "running text, or the data does not use it. Set chunking: window (fixed-size "
                "chunks, works with any data), or choose another separator."
            )
        if labelled == 0:
            raise ValueError(
                f"none of the first {n} samples has a labelled token (label != "
                f"{CROSS_ENTROPY_IGNORE_IDX}): there is nothing to train on. Check the dataset's "
                "masking (e.g. train_on_input / the answer column)."
            )
        if chunked == 0:
            log.warning(
                f"none of the first {n} samples has a droppable chunk with chunking "
                f"{self.crop.chunking!r}: input crops will not change them"
            )


def comparative_dataset(
    tokenizer: Any, *, builder: str, crop: CropLike = None, **builder_kwargs: Any
) -> ComparativeDataset:
    """Any torchtune dataset builder, chunked for input crops: the config form of the wrapper.

    .. code-block:: yaml

        dataset:
          _component_: comparative_recipe.data.datasets.comparative_dataset
          builder: torchtune.datasets.alpaca_cleaned_dataset
          crop: {chunking: window, window: 32, protect_trailing: 8}
          packed: False          # every other key goes to the builder

    Args:
        tokenizer (Any): passed to the builder and used for special ids and separators.
        builder (str): dotted path of a torchtune-style builder ``builder(tokenizer, **kwargs)``.
        crop (CropConfig | Mapping | None): chunking settings (see ``ComparativeDataset``).
    """
    if builder_kwargs.get("packed", False):
        raise ValueError(
            "packed datasets are not supported: a comparative pass needs each sample as its own "
            "row (crops and masks are per sample). Set packed: False"
        )
    build = _get_component_from_path(builder)
    return ComparativeDataset(build(tokenizer, **builder_kwargs), tokenizer, crop)


# ----------------------------------------------------------------------------------------------
# context QA


def _parse_required(value: Any, index: int) -> List[int]:
    """Chunk indices from a required-column value: None, an int, a list of ints, or a string
    such as "2" / "0, 3" / "[0, 3]" (CSV)."""
    if value is None:
        return []
    if isinstance(value, bool):
        raise ValueError(f"sample {index}: required chunk indices must be ints, got {value!r}")
    if isinstance(value, int):
        return [value]
    if isinstance(value, str):
        parts = [p for p in re.split(r"[\s,;\[\]]+", value) if p]
        try:
            return [int(p) for p in parts]
        except ValueError:
            raise ValueError(
                f"sample {index}: cannot read required chunk indices from {value!r}"
            ) from None
    if isinstance(value, (list, tuple)):
        if any(isinstance(v, bool) or not isinstance(v, int) for v in value):
            raise ValueError(f"sample {index}: required chunk indices must be ints, got {value!r}")
        return list(value)
    raise ValueError(f"sample {index}: cannot read required chunk indices from {value!r}")


class ContextQADataset(Dataset):
    """Tokenized question answering over a context made of chunks (paragraphs, passages).

    Rows of ``data`` (a Hugging Face ``datasets.Dataset``) hold a context, a
    question and an answer. The context is a string, split at ``separator`` into chunks (pieces
    that are empty after stripping are skipped, the others stripped), or a list of strings, one
    chunk each. The required column, if given, holds the indices of chunks that a crop must never
    drop (gold evidence): an int, a list of ints, or a string like "0, 2"; missing = none.

    Layout (each piece encoded on its own, see the module docstring)::

        [bos] instruction sep  chunk_0 sep  chunk_1 sep ... "Question: {q}\\nAnswer:"  answer [eos]

    ``sep`` is ``separator_token_ids(tokenizer, separator)`` (the ids that separator chunking
    matches too) and belongs to the chunk before it. Labels are -100 except the answer tokens and
    eos.

    Item fields:

    - ``tokens`` (List[int]) and ``labels`` (List[int]), length S.
    - ``chunk_spans`` (List[Tuple[int, int]]): token span (start, end exclusive) of each kept
      chunk, including its trailing separator tokens, in order.
    - ``chunk_required`` (List[bool]): per kept chunk, True if it is required.

    If ``max_seq_len`` is set and a sample is longer, non-required chunks are dropped from the
    end of the context until it fits. Required chunks are never dropped: if the sample does not
    fit with all of them, ``__getitem__`` raises a ValueError naming the sample index.
    """

    def __init__(
        self,
        tokenizer: Any,
        data: Any,
        *,
        context_column: str = "context",
        question_column: str = "question",
        answer_column: str = "answer",
        required_column: Optional[str] = None,
        separator: str = "\n\n",
        max_seq_len: Optional[int] = None,
        instruction: Optional[str] = DEFAULT_QA_INSTRUCTION,
        source: str = "context_qa_dataset",
    ) -> None:
        _check_columns(
            data,
            {
                "context_column": context_column,
                "question_column": question_column,
                "answer_column": answer_column,
                "required_column": required_column,
            },
            source,
        )
        if not separator:
            raise ValueError("separator must be a non-empty string")
        if max_seq_len is None:
            max_seq_len = getattr(tokenizer, "max_seq_len", None)
        self._data = data
        self._tokenizer = tokenizer
        self._context_column = context_column
        self._question_column = question_column
        self._answer_column = answer_column
        self._required_column = required_column
        self.separator = separator
        self.max_seq_len = max_seq_len
        self.instruction = instruction
        self._separator_ids = separator_token_ids(tokenizer, separator)
        self._instruction_ids = self._encode(instruction) + self._separator_ids if instruction else []
        bos = getattr(tokenizer, "bos_id", None)
        self._bos_ids = [bos] if isinstance(bos, int) and bos >= 0 else []
        self._eos_id = tokenizer.eos_id

    def _encode(self, text: str) -> List[int]:
        return list(self._tokenizer.encode(text, add_bos=False, add_eos=False))

    def __len__(self) -> int:
        return len(self._data)

    def _chunks(self, context: Any, index: int) -> List[str]:
        if isinstance(context, str):
            return [c.strip() for c in context.split(self.separator) if c.strip()]
        if isinstance(context, (list, tuple)):
            return [_text_field(c, "each context chunk", index) for c in context]
        raise ValueError(
            f"sample {index}: context must be a string or a list of strings, "
            f"got {type(context).__name__}"
        )

    def __getitem__(self, index: int) -> Dict[str, Any]:
        row = self._data[index]
        chunks = self._chunks(row[self._context_column], index)
        question = _text_field(row[self._question_column], "the question", index)
        answer = _text_field(row[self._answer_column], "the answer", index)
        required_idx = (
            _parse_required(row[self._required_column], index) if self._required_column else []
        )
        for j in required_idx:
            if not 0 <= j < len(chunks):
                raise ValueError(
                    f"sample {index}: required chunk index {j} is out of range; the context "
                    f"has {len(chunks)} chunks"
                )
        required = [j in required_idx for j in range(len(chunks))]

        chunk_ids = [self._encode(c) + self._separator_ids for c in chunks]
        prompt_end = self._encode(f"Question: {question}\nAnswer:")
        answer_ids = self._encode(answer) + [self._eos_id]
        fixed = len(self._bos_ids) + len(self._instruction_ids) + len(prompt_end) + len(answer_ids)

        kept = list(range(len(chunks)))
        total = fixed + sum(len(ids) for ids in chunk_ids)
        if self.max_seq_len is not None and total > self.max_seq_len:
            for j in reversed(range(len(chunks))):
                if total <= self.max_seq_len:
                    break
                if not required[j]:
                    kept.remove(j)
                    total -= len(chunk_ids[j])
            if total > self.max_seq_len:
                raise ValueError(
                    f"sample {index} does not fit max_seq_len={self.max_seq_len}: the "
                    f"instruction, question, answer and required chunks alone take {total} "
                    "tokens"
                )

        tokens = self._bos_ids + self._instruction_ids
        spans: List[Tuple[int, int]] = []
        for j in kept:
            spans.append((len(tokens), len(tokens) + len(chunk_ids[j])))
            tokens = tokens + chunk_ids[j]
        tokens = tokens + prompt_end
        labels = [CROSS_ENTROPY_IGNORE_IDX] * len(tokens) + answer_ids
        tokens = tokens + answer_ids
        return {
            "tokens": tokens,
            "labels": labels,
            "chunk_spans": spans,
            "chunk_required": [required[j] for j in kept],
        }


def context_qa_dataset(
    tokenizer: Any,
    *,
    source: str,
    data_files: Optional[Any] = None,
    split: str = "train",
    context_column: str = "context",
    question_column: str = "question",
    answer_column: str = "answer",
    required_column: Optional[str] = None,
    separator: str = "\n\n",
    max_seq_len: Optional[int] = None,
    instruction: Optional[str] = DEFAULT_QA_INSTRUCTION,
    crop: CropLike = None,
    **load_dataset_kwargs: Any,
) -> ComparativeDataset:
    """Question answering over a chunked context, chunked along the context's paragraphs.

    Loads ``datasets.load_dataset(source, data_files=data_files, split=split,
    **load_dataset_kwargs)``: a hub name, or "json" / "csv" / "parquet" with local
    ``data_files``. See ``ContextQADataset`` for the columns, the prompt layout and the item
    fields; the returned dataset adds ``sample_id`` and ``chunk_ids`` (``ComparativeDataset``).

    Args:
        tokenizer (Any): the model's tokenizer.
        source (str): dataset name or file type.
        data_files (Optional[Any]): local or remote files.
        split (str): split to load. Default "train".
        context_column, question_column, answer_column (str): column names.
        required_column (Optional[str]): column with the indices of chunks never to drop.
        separator (str): splits string contexts into chunks, and is encoded after each chunk.
        max_seq_len (Optional[int]): longest sample; None = ``tokenizer.max_seq_len`` (None =
            no limit).
        instruction (Optional[str]): text before the context; None or "" = none.
        crop (CropConfig | Mapping | None): chunking; None = ``CropConfig(chunking="spans")``,
            one chunk per context chunk. Other modes work too.
        **load_dataset_kwargs: passed to ``load_dataset``.

    Returns:
        ComparativeDataset: items ``tokens``, ``labels``, ``chunk_spans``, ``chunk_required``,
        ``sample_id``, ``chunk_ids``.

    Raises:
        ValueError: a missing column (lists the dataset's columns and the argument to set), or a
            sample that cannot fit ``max_seq_len``.
    """
    data = load_dataset(source, data_files=data_files, split=split, **load_dataset_kwargs)
    return _context_qa(
        tokenizer,
        data,
        context_column=context_column,
        question_column=question_column,
        answer_column=answer_column,
        required_column=required_column,
        separator=separator,
        max_seq_len=max_seq_len,
        instruction=instruction,
        crop=crop,
        source=f"context_qa_dataset(source={source!r})",
    )


def _context_qa(tokenizer: Any, data: Any, *, crop: CropLike, **kwargs: Any) -> ComparativeDataset:
    """ContextQADataset wrapped for comparative training; shared by every QA builder."""
    qa = ContextQADataset(tokenizer, data, **kwargs)
    return ComparativeDataset(qa, tokenizer, _crop_config(crop, CropConfig(chunking="spans")))


# ----------------------------------------------------------------------------------------------
# classification


class ClassificationDataset(Dataset):
    """Tokenized text classification as next-token prediction of a label word.

    The template holds ``{text}`` exactly once; it is split there into a prefix and a suffix.
    Layout (each piece encoded on its own, see the module docstring)::

        [bos] prefix text suffix label_word

    with no eos. Labels are -100 except on the label word's first token, whose id is
    ``label_token_ids[class_id]``; the model predicts it from the prompt, and a classifier
    compares the logits of ``label_token_ids`` at that position. If ``max_seq_len`` is set, the
    text's tokens are cut from the end so that the sample fits (prefix, suffix and label word
    are kept whole); a ``max_seq_len`` that leaves no room for any text raises a ValueError.

    The label column holds an int index into ``label_words`` or the label word itself; every
    value is checked when the dataset is built.

    Item fields: ``tokens``, ``labels`` (List[int], length S), ``class_id`` (int).

    Attributes:
        label_token_ids (List[int]): first token of each label word, encoded as a piece of its
            own (as it is after the prompt); pairwise distinct.
        prefix_len (int): tokens before the text (bos included).
        suffix_len (int): tokens between the text and the label word.
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
        source: str = "classification_dataset",
    ) -> None:
        _check_columns(data, {"text_column": text_column, "label_column": label_column}, source)
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

        self._label_word_ids = []
        for word in label_words:
            ids = self._encode(word)
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
            self._encode(prefix) if prefix else []
        )
        self._suffix_ids = self._encode(suffix) if suffix else []
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

        self._class_ids = [
            self._class_id(value, index) for index, value in enumerate(data[label_column])
        ]

    def _encode(self, text: str) -> List[int]:
        return list(self._tokenizer.encode(text, add_bos=False, add_eos=False))

    def _class_id(self, value: Any, index: int) -> int:
        if isinstance(value, int) and not isinstance(value, bool):
            if 0 <= value < len(self.label_words):
                return value
            raise ValueError(
                f"sample {index}: label index {value} is out of range for label_words "
                f"{self.label_words}"
            )
        if isinstance(value, str) and value in self.label_words:
            return self.label_words.index(value)
        raise ValueError(
            f"sample {index}: label {value!r} is not in label_words {self.label_words} "
            "(labels must be one of the words or an int index into them)"
        )

    def __len__(self) -> int:
        return len(self._data)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        text = _text_field(self._data[index][self._text_column], "the text", index)
        class_id = self._class_ids[index]
        word_ids = self._label_word_ids[class_id]
        text_ids = self._encode(text)
        if self.max_seq_len is not None:
            room = self.max_seq_len - self.prefix_len - self.suffix_len - len(word_ids)
            text_ids = text_ids[:room]
        prompt = self._prefix_ids + text_ids + self._suffix_ids
        labels = [CROSS_ENTROPY_IGNORE_IDX] * len(prompt) + [word_ids[0]]
        labels += [CROSS_ENTROPY_IGNORE_IDX] * (len(word_ids) - 1)
        return {"tokens": prompt + word_ids, "labels": labels, "class_id": class_id}


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
    crop: CropLike = None,
    **load_dataset_kwargs: Any,
) -> ComparativeDataset:
    """Text classification by the first token of a label word (see ``ClassificationDataset``).

    Loads ``datasets.load_dataset(source, data_files=data_files, split=split,
    **load_dataset_kwargs)``. Crops remove parts of the text: chunking "window" or "separator"
    over the prompt. With ``crop=None`` the default is window chunking that protects the
    template's prefix and suffix (``CropConfig(chunking="window", protect_leading=prefix_len,
    protect_trailing=suffix_len)``); a crop given explicitly is used as is. ``max_seq_len``
    (None = ``tokenizer.max_seq_len``) cuts long texts from the end.

    Returns:
        ComparativeDataset: items ``tokens``, ``labels``, ``class_id``, ``sample_id``,
        ``chunk_ids``; attribute ``label_token_ids`` (List[int], one per label word).

    Raises:
        ValueError: a missing column, two label words with the same first token, or a label
            value that is not in ``label_words``.
    """
    data = load_dataset(source, data_files=data_files, split=split, **load_dataset_kwargs)
    classification = ClassificationDataset(
        tokenizer,
        data,
        label_words=label_words,
        text_column=text_column,
        label_column=label_column,
        template=template,
        max_seq_len=max_seq_len,
        source=f"classification_dataset(source={source!r})",
    )
    default = CropConfig(
        chunking="window",
        protect_leading=classification.prefix_len,
        protect_trailing=classification.suffix_len,
    )
    return ComparativeDataset(classification, tokenizer, _crop_config(crop, default))
