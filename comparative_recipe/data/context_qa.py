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

import json
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
from comparative_recipe.data.tokenizer_utils import (
    adds_word_prefix,
    encode_pieces,
    encode_text,
    separator_token_ids,
)

DEFAULT_QA_INSTRUCTION = "Answer the question using the context."

#: how a titled passage is rendered by default (``passage_template``)
DEFAULT_PASSAGE_TEMPLATE = "{title}: {text}"
# keys of a passage's text in a {title, ...} mapping, and of the column layout
# {"title": [...], "sentences": [[...], ...]} (Hugging Face's hotpot_qa)
_TEXT_KEYS = ("sentences", "text", "content")
_CONTEXT_FORMS = (
    "a string (split at the separator), a list of passages (strings, [title, text] pairs or "
    "{title, text} mappings; a text may be a list of sentences), or the column layout "
    "{title: [...], sentences: [[...], ...]}"
)


def join_sentences(sentences: Sequence[str]) -> str:
    """Sentences joined into one paragraph: as they are where one side already has whitespace
    at the join (HotpotQA's sentences carry their leading space), else with one space."""
    out = ""
    for sentence in sentences:
        if out and sentence and not out[-1].isspace() and not sentence[0].isspace():
            out += " "
        out += sentence
    return out


def _passage_text(value: Any, index: int) -> str:
    if isinstance(value, (list, tuple)):
        return join_sentences([text_field(v, "each sentence of a passage", index) for v in value])
    return text_field(value, "a passage's text", index)


def _text_key(mapping: Mapping[str, Any]) -> Optional[str]:
    return next((key for key in _TEXT_KEYS if key in mapping), None)


def _passage(value: Any, index: int) -> Tuple[Optional[str], str]:
    """(title or None, text) of one context entry."""
    if not isinstance(value, (Mapping, list, tuple)):
        return None, text_field(value, "each context chunk", index)
    if isinstance(value, Mapping):
        key = _text_key(value)
        if key is not None:
            title = value.get("title")
            return (None if title is None else text_field(title, "a passage title", index),
                    _passage_text(value[key], index))
    if isinstance(value, (list, tuple)) and len(value) == 2 and isinstance(value[0], str):
        return value[0], _passage_text(value[1], index)
    raise ValueError(
        f"sample {index}: cannot read a passage from {value!r}; the context must be "
        f"{_CONTEXT_FORMS}"
    )


def read_passages(
    context: Any, index: int, separator: str
) -> List[Tuple[Optional[str], str]]:
    """The passages of a context value as (title or None, text); see ``_CONTEXT_FORMS``.
    Passages of a string context are stripped, and empty ones skipped."""
    if isinstance(context, str):
        return [(None, c.strip()) for c in context.split(separator) if c.strip()]
    if isinstance(context, Mapping) and "title" in context and _text_key(context) is not None:
        titles, texts = context["title"], context[_text_key(context)]
        if not isinstance(titles, (list, tuple)) or not isinstance(texts, (list, tuple)) or len(
            titles
        ) != len(texts):
            raise ValueError(
                f"sample {index}: the context's 'title' and '{_text_key(context)}' must be "
                f"lists of one length, got {titles!r} and {texts!r}"
            )
        return [(text_field(t, "a passage title", index), _passage_text(x, index))
                for t, x in zip(titles, texts)]
    if isinstance(context, (list, tuple)):
        return [_passage(c, index) for c in context]
    raise ValueError(
        f"sample {index}: the context must be {_CONTEXT_FORMS}, got {type(context).__name__}"
    )


def supporting_titles(value: Any, index: int) -> List[str]:
    """Titles of the supporting passages, from a supporting-facts value: HotpotQA's
    {"title": [...], "sent_id": [...]} or [[title, sent_id], ...], a list of titles, one title,
    or any of these as a JSON string (CSV). In order of first mention, without repeats."""
    if value is None:
        return []
    if isinstance(value, str) and value.strip()[:1] in ("[", "{"):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise ValueError(
                f"sample {index}: cannot read supporting facts from {value!r}"
            ) from None
    if isinstance(value, str):
        entries = [value]
    elif isinstance(value, Mapping) and "title" in value:
        titles = value["title"]
        entries = [titles] if isinstance(titles, str) else list(titles)
    elif isinstance(value, (list, tuple)):
        entries = []
        for fact in value:
            if isinstance(fact, (list, tuple)) and fact:
                fact = fact[0]
            elif isinstance(fact, Mapping) and "title" in fact:
                fact = fact["title"]
            entries.append(fact)
    else:
        raise ValueError(
            f"sample {index}: cannot read supporting facts from {value!r}; expected "
            "{title: [...], sent_id: [...]}, [[title, sent_id], ...] or a list of titles"
        )
    titles = [text_field(t, "a supporting fact's title", index) for t in entries]
    return list(dict.fromkeys(titles))


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
    answer. The context is one of (``read_passages``):

    - a string, split at ``separator`` into chunks (pieces that are empty after stripping are
      skipped, the others stripped);
    - a list of passages, one chunk each: strings, titled passages ``[title, text]`` or
      ``{"title": ..., "text": ...}`` (also ``"sentences"`` or ``"content"`` for the text), where a
      text may be a list of sentences (HotpotQA's original layout ``[[title, [sentence, ...]],
      ...]``);
    - the column layout ``{"title": [...], "sentences": [[...], ...]}`` (HotpotQA on the
      Hugging Face hub; ``"text"`` or ``"content"`` work in place of ``"sentences"``).

    Sentences are joined by ``join_sentences`` (as they are where a side has whitespace, as
    HotpotQA's do, else with one space); a titled passage is rendered with ``passage_template``
    (default ``"{title}: {text}"``), so its title is dropped with it.

    Required chunks, which a crop never drops (gold evidence), come from the required column
    (indices: an int, a list of ints, or a string like "0, 2"; missing = none) and from the
    supporting column (titles: HotpotQA's ``supporting_facts`` ``{"title": [...], "sent_id":
    [...]}`` or ``[[title, sent_id], ...]``, or a list of titles; see ``supporting_titles``):
    every passage with a supporting title is required. A supporting title that no passage of the
    context has is an error.

    Layout (each piece encoded on its own, see the module docstring)::

        [bos] instruction sep  chunk_0 sep  chunk_1 sep ... "Question: {q}\\nAnswer:"  answer [eos]

    ``sep`` is ``separator_token_ids(tokenizer, separator)`` and belongs to the chunk before it.
    Labels are -100 except the answer tokens and eos. With a text-mode ``chunking`` (sentence,
    paragraph, pattern) each chunk's text is also cut at that mode's boundaries and the pieces
    encoded on their own (``encode_pieces``), so their token spans are exact.

    Item fields:

    - ``tokens`` (List[int]) and ``labels`` (List[int]), length S. The prompt is
      ``tokens[:a]`` where ``a`` is the first position whose label is not -100
      (``CROSS_ENTROPY_IGNORE_IDX``); the answer is the labelled tokens ``tokens[a:]``, the
      answer text's tokens followed by eos. Greedy generation from the prompt up to eos is the
      model's answer (for exact match / token F1 against the decoded labelled tokens).
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
        supporting_column: Optional[str] = None,
        passage_template: str = DEFAULT_PASSAGE_TEMPLATE,
        source: str = "context_qa_dataset",
    ) -> None:
        check_columns(
            data,
            {
                "context_column": context_column,
                "question_column": question_column,
                "answer_column": answer_column,
                "required_column": required_column,
                "supporting_column": supporting_column,
            },
            source,
        )
        if not separator:
            raise ValueError("separator must be a non-empty string")
        if not isinstance(passage_template, str) or passage_template.count("{text}") != 1 or (
            passage_template.count("{title}") > 1
        ):
            raise ValueError(
                "passage_template must contain '{text}' exactly once and '{title}' at most once "
                f"(e.g. {DEFAULT_PASSAGE_TEMPLATE!r}), got {passage_template!r}"
            )
        if max_seq_len is None:
            max_seq_len = getattr(tokenizer, "max_seq_len", None)
        self._data = data
        self._tokenizer = tokenizer
        self._context_column = context_column
        self._question_column = question_column
        self._answer_column = answer_column
        self._required_column = required_column
        self._supporting_column = supporting_column
        self.passage_template = passage_template
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

    def _render(self, title: Optional[str], text: str) -> str:
        if title is None:
            return text
        return self.passage_template.replace("{title}", title).replace("{text}", text)

    def _required(
        self, row: Mapping[str, Any], titles: List[Optional[str]], index: int
    ) -> List[bool]:
        """Per passage: required by index (required column) or by title (supporting facts)."""
        required_idx = (
            _parse_required(row[self._required_column], index) if self._required_column else []
        )
        for j in required_idx:
            if not 0 <= j < len(titles):
                raise ValueError(
                    f"sample {index}: required chunk index {j} is out of range; the context "
                    f"has {len(titles)} chunks"
                )
        required = [j in required_idx for j in range(len(titles))]
        if self._supporting_column is None:
            return required
        wanted = supporting_titles(row[self._supporting_column], index)
        if wanted and all(t is None for t in titles):
            raise ValueError(
                f"sample {index}: supporting_column={self._supporting_column!r} names passages "
                "by title, but the context's passages have no titles; give titled passages "
                "([title, text] or {title, text}), or mark passages by index with "
                "required_column"
            )
        known = [t.strip() if t is not None else None for t in titles]
        for title in wanted:
            hits = [j for j, t in enumerate(known) if t == title.strip()]
            if not hits:
                raise ValueError(
                    f"sample {index}: supporting fact title {title!r} is not the title of any "
                    f"passage in the context (titles: {[t for t in titles if t is not None]}); "
                    f"check that {self._supporting_column!r} (supporting_column) belongs to "
                    f"{self._context_column!r} (context_column), or set supporting_column=null"
                )
            for j in hits:
                required[j] = True
        return required

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
        passages = read_passages(row[self._context_column], index, self.separator)
        chunks = [self._render(title, text) for title, text in passages]
        question = text_field(row[self._question_column], "the question", index)
        answer = text_field(row[self._answer_column], "the answer", index)
        required = self._required(row, [title for title, _ in passages], index)

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
    supporting_column: Optional[str] = None,
    passage_template: str = DEFAULT_PASSAGE_TEMPLATE,
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
        supporting_column (Optional[str]): column naming the supporting passages by title
            (HotpotQA's ``supporting_facts``); those passages are never dropped.
        passage_template (str): how a titled passage reads, with ``{text}`` (and ``{title}``).
            Default ``"{title}: {text}"``.
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
        ValueError: a missing column (lists the dataset's columns and the argument to set), a
            context that is not in one of the accepted forms, a supporting title that is not in
            the context, or a sample that cannot fit ``max_seq_len``.
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
        supporting_column=supporting_column,
        passage_template=passage_template,
        source=f"context_qa_dataset(source={source!r})",
    )


def multi_passage_qa_dataset(
    tokenizer: Any,
    *,
    source: str,
    supporting_column: Optional[str] = "supporting_facts",
    **kwargs: Any,
) -> ComparativeDataset:
    """Multi-passage question answering (HotpotQA and alike): ``context_qa_dataset`` with the
    supporting passages named by title in ``supporting_column`` (default "supporting_facts").

    A HotpotQA distractor file works as is: ``question``, ``answer``, ``context`` as
    ``{"title": [...], "sentences": [[...], ...]}`` (the Hugging Face layout) or as
    ``[[title, [sentence, ...]], ...]`` (the original JSON), and ``supporting_facts`` as
    ``{"title": [...], "sent_id": [...]}`` or ``[[title, sent_id], ...]``. Each passage is one
    chunk (mode "spans"), read as ``"{title}: {sentences joined}"``; the supporting passages are
    required (never dropped), the distractors are what crops remove. Other columns (``id``,
    ``type``, ``level``) are ignored.

    .. code-block:: yaml

        dataset:
          _component_: comparative_recipe.data.multi_passage_qa_dataset
          source: json
          data_files: hotpot_train_v1.1.json
          max_seq_len: 2048

    Every key of ``context_qa_dataset`` applies (``context_column``, ``question_column``,
    ``answer_column``, ``required_column``, ``passage_template``, ``separator``,
    ``max_seq_len``, ``instruction``, ``chunking``, and ``load_dataset`` keys such as ``name``);
    ``supporting_column: null`` for data without supporting facts. Items as in
    ``ContextQADataset``: the prompt is the tokens before the first labelled one, the answer
    (with eos) the labelled tokens.
    """
    return context_qa_dataset(
        tokenizer, source=source, supporting_column=supporting_column, **kwargs
    )


def context_qa_from_data(
    tokenizer: Any, data: Any, *, chunking: ChunkingLike = None, **kwargs: Any
) -> ComparativeDataset:
    """``ContextQADataset(tokenizer, data, **kwargs)`` chunked for comparative training (mode
    "spans" unless ``chunking`` says otherwise), for data already in memory (an HF Dataset)."""
    config = chunking_config(chunking, ChunkingConfig(mode="spans"))
    qa = ContextQADataset(tokenizer, data, chunking=config, **kwargs)
    return ComparativeDataset(qa, tokenizer, config)
