"""Question answering over a context made of chunks (paragraphs, passages), chunked for crops.

.. code-block:: yaml

    dataset:
      _component_: comparative_recipe.data.context_qa_dataset
      source: json
      data_files: data/train.jsonl
      max_seq_len: 1024

Every piece of text is encoded on its own with ``tokenizer.encode(text, add_bos=False,
add_eos=False)`` and the ids are concatenated, so the token span of each piece is exact. A
SentencePiece tokenizer (llama2) starts every piece with a word-boundary piece, as if it were
preceded by a space; a tiktoken tokenizer (llama3) joins pieces without one. Either way a model
sees the same layout in training and at inference as long as the prompt is built by these
functions.
"""

import re
from typing import Any, Dict, List, Optional, Tuple

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
from comparative_recipe.data.tokenizer_utils import (
    adds_word_prefix,
    encode_pieces,
    encode_text,
    separator_token_ids,
)

DEFAULT_QA_INSTRUCTION = "Answer the question using the context."


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

    Rows of ``data`` (a Hugging Face ``datasets.Dataset``) hold a context, a question and an
    answer. The context is a string, split at ``separator`` into chunks (pieces that are empty
    after stripping are skipped, the others stripped), or a list of strings, one chunk each. The
    required column, if given, holds the indices of chunks that a crop must never drop (gold
    evidence): an int, a list of ints, or a string like "0, 2"; missing = none.

    Layout (each piece encoded on its own, see the module docstring)::

        [bos] instruction sep  chunk_0 sep  chunk_1 sep ... "Question: {q}\\nAnswer:"  answer [eos]

    ``sep`` is ``separator_token_ids(tokenizer, separator)`` and belongs to the chunk before it.
    Labels are -100 except the answer tokens and eos. With a text-mode ``chunking`` (sentence,
    paragraph, pattern) each chunk's text is also cut at that mode's boundaries and the pieces
    encoded on their own (``encode_pieces``), so their token spans are exact.

    Item fields:

    - ``tokens`` (List[int]) and ``labels`` (List[int]), length S.
    - ``chunk_spans`` (List[Tuple[int, int]]): token span (start, end exclusive) of each kept
      chunk, including its trailing separator tokens, in order.
    - ``chunk_required`` (List[bool]): per kept chunk, True if it is required.
    - ``protected_spans`` (List[Tuple[int, int]]): never dropped: bos and instruction, the
      required chunks, the question prompt.
    - ``text_spans`` (List[Tuple[int, int]]), with a text-mode ``chunking`` only: token span of
      each text piece (the last piece of a chunk includes its separator).

    If ``max_seq_len`` is set and a sample is longer, non-required chunks are dropped from the
    end of the context until it fits. Required chunks are never dropped: if the sample does not
    fit with all of them, ``__getitem__`` raises a ValueError naming the sample index.

    Attributes:
        text_split (Optional[str]): ``chunking.text_rule``: which boundaries ``text_spans`` follow.
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
        chunking: Optional[ChunkingConfig] = None,
        source: str = "context_qa_dataset",
    ) -> None:
        check_columns(
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
        self.text_split = chunking.text_rule if chunking is not None else None
        self._boundary = chunking.boundary if chunking is not None else None
        self._word_prefix = adds_word_prefix(tokenizer)
        self._separator_ids = separator_token_ids(tokenizer, separator)
        self._instruction_ids = (
            encode_text(tokenizer, instruction) + self._separator_ids if instruction else []
        )
        bos = getattr(tokenizer, "bos_id", None)
        self._bos_ids = [bos] if isinstance(bos, int) and bos >= 0 else []
        self._eos_id = tokenizer.eos_id

    def __len__(self) -> int:
        return len(self._data)

    def _chunks(self, context: Any, index: int) -> List[str]:
        if isinstance(context, str):
            return [c.strip() for c in context.split(self.separator) if c.strip()]
        if isinstance(context, (list, tuple)):
            return [text_field(c, "each context chunk", index) for c in context]
        raise ValueError(
            f"sample {index}: context must be a string or a list of strings, "
            f"got {type(context).__name__}"
        )

    def _encode_chunk(self, text: str) -> Tuple[List[int], List[Tuple[int, int]]]:
        """ids of a chunk and its separator, and the spans of its text pieces (the separator
        joins the last one)."""
        pieces = split_text(text, self._boundary)
        ids, spans = encode_pieces(self._tokenizer, pieces, word_prefix=self._word_prefix)
        ids = ids + self._separator_ids
        spans = spans[:-1] + [(spans[-1][0], len(ids))] if spans else [(0, len(ids))]
        return ids, spans

    def __getitem__(self, index: int) -> Dict[str, Any]:
        row = self._data[index]
        chunks = self._chunks(row[self._context_column], index)
        question = text_field(row[self._question_column], "the question", index)
        answer = text_field(row[self._answer_column], "the answer", index)
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

        encoded = [self._encode_chunk(c) for c in chunks]
        prompt_end = encode_text(self._tokenizer, f"Question: {question}\nAnswer:")
        answer_ids = encode_text(self._tokenizer, answer) + [self._eos_id]
        fixed = len(self._bos_ids) + len(self._instruction_ids) + len(prompt_end) + len(answer_ids)

        kept = list(range(len(chunks)))
        total = fixed + sum(len(ids) for ids, _ in encoded)
        if self.max_seq_len is not None and total > self.max_seq_len:
            for j in reversed(range(len(chunks))):
                if total <= self.max_seq_len:
                    break
                if not required[j]:
                    kept.remove(j)
                    total -= len(encoded[j][0])
            if total > self.max_seq_len:
                raise ValueError(
                    f"sample {index} does not fit max_seq_len={self.max_seq_len}: the "
                    f"instruction, question, answer and required chunks alone take {total} "
                    "tokens"
                )

        tokens = self._bos_ids + self._instruction_ids
        protected = [(0, len(tokens))] if tokens else []
        spans: List[Tuple[int, int]] = []
        text_spans: List[Tuple[int, int]] = []
        for j in kept:
            ids, pieces = encoded[j]
            start = len(tokens)
            spans.append((start, start + len(ids)))
            text_spans.extend((start + a, start + b) for a, b in pieces)
            if required[j]:
                protected.append(spans[-1])
            tokens = tokens + ids
        protected.append((len(tokens), len(tokens) + len(prompt_end)))
        tokens = tokens + prompt_end
        labels = [CROSS_ENTROPY_IGNORE_IDX] * len(tokens) + answer_ids
        tokens = tokens + answer_ids
        item = {
            "tokens": tokens,
            "labels": labels,
            "chunk_spans": spans,
            "chunk_required": [required[j] for j in kept],
            "protected_spans": protected,
        }
        if self.text_split is not None:
            item["text_spans"] = text_spans
        return item


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
    chunking: ChunkingLike = None,
    **load_dataset_kwargs: Any,
) -> ComparativeDataset:
    """Question answering over a chunked context, one droppable chunk per context chunk.

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
        chunking (ChunkingConfig | Mapping | None): None = mode "spans", one chunk per context
            chunk; other modes work too (sentence: one chunk per sentence of the context).
        **load_dataset_kwargs: passed to ``load_dataset``.

    Returns:
        ComparativeDataset: items ``tokens``, ``labels``, ``chunk_spans``, ``chunk_required``,
        ``protected_spans`` (``text_spans`` in text modes), ``sample_id``, ``chunk_ids``.

    Raises:
        ValueError: a missing column (lists the dataset's columns and the argument to set), or a
            sample that cannot fit ``max_seq_len``.
    """
    reject_crop_argument(load_dataset_kwargs)
    data = load_dataset(source, data_files=data_files, split=split, **load_dataset_kwargs)
    return context_qa_from_data(
        tokenizer,
        data,
        context_column=context_column,
        question_column=question_column,
        answer_column=answer_column,
        required_column=required_column,
        separator=separator,
        max_seq_len=max_seq_len,
        instruction=instruction,
        chunking=chunking,
        source=f"context_qa_dataset(source={source!r})",
    )


def context_qa_from_data(
    tokenizer: Any, data: Any, *, chunking: ChunkingLike = None, **kwargs: Any
) -> ComparativeDataset:
    """``ContextQADataset(tokenizer, data, **kwargs)`` chunked for comparative training (mode
    "spans" unless ``chunking`` says otherwise), for data already in memory (an HF Dataset)."""
    config = chunking_config(chunking, ChunkingConfig(mode="spans"))
    qa = ContextQADataset(tokenizer, data, chunking=config, **kwargs)
    return ComparativeDataset(qa, tokenizer, config)
