"""``ComparativeDataset``: any tokenized dataset, with the sample ids and chunk ids that the
comparative step needs; ``comparative_dataset``: the same for any torchtune builder, from a config.

.. code-block:: yaml

    dataset:
      _component_: comparative_recipe.data.comparative_dataset
      builder: torchtune.datasets.alpaca_cleaned_dataset
      chunking: {mode: sentence, protect_trailing: 8}
      packed: False          # every other key goes to the builder

For message datasets (``chat_dataset``, ``instruct_dataset``, ...) only the content of system and
user messages is droppable (``chunk_roles``); see ``comparative_recipe.data.messages``.
"""

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import Dataset

from torchtune.data import CROSS_ENTROPY_IGNORE_IDX
from torchtune.utils import get_logger

from comparative_recipe._torchtune_compat import component
from comparative_recipe.data.chunking import (
    ChunkingConfig,
    ChunkingLike,
    chunking_config,
    reject_crop_argument,
    sample_chunk_ids,
    text_piece_count,
    TEXT_MODES,
)
from comparative_recipe.data.messages import CHUNK_ROLES, check_roles, MessageSpansTokenizer
from comparative_recipe.data.tokenizer_utils import special_token_ids, TokenTexts

log = get_logger("INFO")

# A text mode must find at least this share of the chunks the decoded text has, and must not
# leave most samples' text in one chunk: below these means per sample it is an error.
_MIN_BOUNDARY_SHARE = 0.5
_MIN_CHUNKS, _MIN_BOUNDARIES = 1.5, 0.5
_UNITS = {"sentence": "sentence", "paragraph": "line-break", "pattern": "pattern"}


class ComparativeDataset(Dataset):
    """Adds ``sample_id`` and ``chunk_ids`` to the samples of a tokenized dataset.

    Wraps any map-style dataset whose items are dicts with ``tokens`` and ``labels`` (lists of
    ints of one length ``S``; labels unshifted, -100 where not trained on), e.g. torchtune's
    ``alpaca_dataset`` / ``instruct_dataset`` / ``chat_dataset`` or this package's builders.
    A ``ComparativeDataset`` given as ``dataset`` is unwrapped, so a builder's output can be
    re-chunked with another ``chunking``. Attributes the wrapper does not have (e.g.
    ``label_token_ids``) are looked up on the wrapped dataset.

    Item = the wrapped item plus ``sample_id`` (int, the index) and ``chunk_ids`` (List[int],
    length S; see ``comparative_recipe.data.chunking``). Optional fields of the wrapped item that
    are honoured: ``protected_spans`` (list of (start, end), end exclusive: never dropped, in
    every mode, e.g. a prompt template), ``chunk_spans`` / ``chunk_required`` (mode ``spans``),
    ``text_spans`` (text modes: the token spans of text pieces that the builder cut at this
    mode's boundaries before encoding, used when the wrapped dataset's ``text_split`` equals the
    mode's ``ChunkingConfig.text_rule``; otherwise boundaries are found by decoding the tokens,
    see ``TokenTexts``).

    A torchtune message dataset (``chat_dataset``, ``instruct_dataset``) built with the plain
    tokenizer has no ``protected_spans``: its role headers, if the chat format writes them as
    text, are droppable. Build it through ``comparative_dataset``, or give the builder
    ``MessageSpansTokenizer(tokenizer)``, to protect everything but the system and user content.

    Items are computed lazily. The configuration is checked against the data in ``__init__`` on
    the first ``validate_samples`` samples, so bad input fails before training starts.

    Args:
        dataset (Dataset): map-style dataset of dicts with ``tokens`` and ``labels``.
        tokenizer (Any): the model's tokenizer (``encode``, ``decode``, ``bos_id``, ...).
        chunking (ChunkingConfig | Mapping | None): a mapping is read by ``chunking_config``;
            None = ``ChunkingConfig()`` (windows of 64 tokens).
        validate_samples (int): how many leading samples to check eagerly. Default 32.

    Raises:
        ValueError: empty dataset; an item without ``tokens``/``labels`` or with different
            lengths; mode "spans" on items without ``chunk_spans`` or with invalid spans; a text
            mode that finds no boundary in the checked samples' droppable text, or far fewer
            chunks than that text has boundaries; no labelled token in any checked sample.
    """

    def __init__(
        self,
        dataset: Dataset,
        tokenizer: Any,
        chunking: ChunkingLike = None,
        *,
        validate_samples: int = 32,
    ) -> None:
        if isinstance(dataset, ComparativeDataset):
            dataset = dataset.dataset
        self.dataset = dataset
        self.tokenizer = tokenizer
        self.chunking = chunking_config(chunking, ChunkingConfig())
        self.special_ids = special_token_ids(tokenizer)
        text_mode = self.chunking.mode in TEXT_MODES
        self._token_texts = TokenTexts(tokenizer) if text_mode else None
        self._builder_text_spans = text_mode and (
            getattr(dataset, "text_split", None) == self.chunking.text_rule
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
        spans = required = text_spans = token_texts = None
        if self.chunking.mode == "spans":
            if item.get("chunk_spans") is None:
                raise ValueError(
                    f"sample {index} has no 'chunk_spans' but dataset.chunking.mode is 'spans'. "
                    "Use a builder that emits spans (context_qa_dataset, needle_qa_dataset), or "
                    "set mode: window (or sentence, paragraph)."
                )
            spans = [(int(s), int(e)) for s, e in item["chunk_spans"]]
            if item.get("chunk_required") is not None:
                required = [bool(r) for r in item["chunk_required"]]
        elif self._token_texts is not None:
            if self._builder_text_spans and item.get("text_spans") is not None:
                text_spans = [(int(s), int(e)) for s, e in item["text_spans"]]
            else:
                token_texts = self._token_texts(tokens.tolist())
        try:
            chunk_ids = sample_chunk_ids(
                tokens,
                labels,
                self.chunking,
                special_ids=self.special_ids,
                protected_spans=item.get("protected_spans"),
                token_texts=token_texts,
                text_spans=text_spans,
                spans=spans,
                required=required,
            )
        except ValueError as e:
            raise ValueError(f"sample {index}: {e}") from e
        out = dict(item)
        out["sample_id"] = index
        out["chunk_ids"] = chunk_ids.tolist()
        return out

    def _validate(self, n_samples: int) -> None:
        if len(self.dataset) == 0:
            raise ValueError("the dataset is empty")
        n = min(len(self.dataset), max(1, n_samples))
        labelled = chunked = found = expected = runs = 0
        boundary = self.chunking.boundary
        for index in range(n):
            item = self[index]
            chunk_ids = item["chunk_ids"]
            labelled += any(label != CROSS_ENTROPY_IGNORE_IDX for label in item["labels"])
            chunked += any(c >= 0 for c in chunk_ids)
            if boundary is not None:
                found += max(chunk_ids, default=-1) + 1
                for start, end in _droppable_runs(chunk_ids):
                    text = self.tokenizer.decode([int(t) for t in item["tokens"][start:end]])
                    pieces = text_piece_count(text, boundary)
                    expected += pieces
                    runs += pieces > 0
        if labelled == 0:
            raise ValueError(
                f"none of the first {n} samples has a labelled token (label != "
                f"{CROSS_ENTROPY_IGNORE_IDX}): there is nothing to train on. Check the dataset's "
                "masking (e.g. train_on_input / the answer column)."
            )
        if runs > 0:
            self._check_boundaries(n, found, expected, runs)
        if chunked == 0:
            log.warning(
                f"none of the first {n} samples has a droppable chunk with chunking mode "
                f"{self.chunking.mode!r}: input crops will not change them"
            )

    def _check_boundaries(self, n: int, found: int, expected: int, runs: int) -> None:
        """A text mode must find the boundaries that the decoded droppable text has (``expected``
        pieces in ``runs`` droppable runs), and must split the text at all."""
        mode, unit = self.chunking.mode, _UNITS[self.chunking.mode]
        counts = (
            f"{found / n:.1f} chunks per sample found, {expected / n:.1f} expected from the "
            f"decoded text of the first {n} samples"
        )
        instead = (
            "Set dataset.chunking.mode: window (fixed-size token windows, works with any text)"
        )
        if found < _MIN_CHUNKS * n and expected - runs < _MIN_BOUNDARIES * n:
            raise ValueError(
                f"dataset.chunking.mode {mode!r} finds (almost) no {unit} boundary in the "
                f"droppable text ({counts}): most samples' text would be a single chunk. "
                f"{instead}, or mode: pattern with a regex that matches this data's boundaries."
            )
        if found < _MIN_BOUNDARY_SHARE * expected:
            raise ValueError(
                f"dataset.chunking.mode {mode!r} finds far fewer chunks than the text has "
                f"{unit} boundaries ({counts}): the tokens do not map back to the text's "
                f"boundaries with this tokenizer. {instead}, or use a builder that sees the "
                "text (context_qa_dataset, classification_dataset)."
            )


def _droppable_runs(chunk_ids: List[int]) -> List[Tuple[int, int]]:
    """(start, end) of each maximal run of droppable tokens (chunk id >= 0)."""
    runs, start = [], None
    for i, c in enumerate([*chunk_ids, -1]):
        if c >= 0 and start is None:
            start = i
        elif c < 0 and start is not None:
            runs.append((start, i))
            start = None
    return runs


def comparative_dataset(
    tokenizer: Any,
    *,
    builder: str,
    chunking: ChunkingLike = None,
    chunk_roles: Optional[Sequence[str]] = None,
    **builder_kwargs: Any,
) -> ComparativeDataset:
    """Any torchtune dataset builder, chunked for input crops: the config form of the wrapper.

    The builder gets the tokenizer wrapped in ``MessageSpansTokenizer``: a builder that
    tokenizes torchtune messages through it (``chat_dataset``, ``instruct_dataset``,
    ``alpaca_dataset``, any ``SFTDataset``) gets items whose droppable tokens are the content of
    the ``chunk_roles`` messages only (role headers, templates, special tokens and the other
    messages protected, a chunk never crossing two messages); any other builder sees the
    tokenizer itself.

    Args:
        tokenizer (Any): passed to the builder and used for special ids and decoding.
        builder (str): dotted path of a torchtune-style builder ``builder(tokenizer, **kwargs)``.
        chunking (ChunkingConfig | Mapping | None): see ``ComparativeDataset``.
        chunk_roles (Optional[Sequence[str]]): message roles whose content crops may drop.
            None = system and user.
        **builder_kwargs: passed to the builder.
    """
    reject_crop_argument(builder_kwargs)
    if builder_kwargs.get("packed", False):
        raise ValueError(
            "packed datasets are not supported: a comparative pass needs each sample as its own "
            "row (crops and masks are per sample). Set packed: False"
        )
    build = component(builder)
    roles = CHUNK_ROLES if chunk_roles is None else check_roles(chunk_roles, "dataset.chunk_roles")
    dataset = build(MessageSpansTokenizer(tokenizer, roles), **builder_kwargs)
    return ComparativeDataset(dataset, tokenizer, chunking)
