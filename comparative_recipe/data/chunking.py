"""Dataset-time chunking: which tokens of a sample an input crop may drop, and in which units.

Every sample gets ``chunk_ids`` [S], one int per token:

- ``PROTECTED_CHUNK`` (-1): never dropped. Always: labelled tokens (label != -100), the token
  right before each labelled token (it predicts it), tokens after the last labelled token
  (dropping them changes no loss), special tokens, the item's ``protected_spans``; plus what the
  config adds (``protect_leading``, ``protect_trailing``) and, with mode ``spans``, required
  chunks and tokens outside every span.
- k >= 0: droppable chunk k, numbered 0..n-1 in order of position. A crop removes whole chunks.
- ``PAD_CHUNK`` (-2): padding; only the collate writes it.

Modes (``ChunkingConfig.mode``): ``window`` (fixed runs of tokens), ``sentence``, ``paragraph``
and ``pattern`` (boundaries found in the TEXT, so they do not depend on how the tokenizer merges
"word." or normalises "\\n"), ``spans`` (chunks given by the dataset, e.g. passages).

The chunkers work on ONE unpadded sample (1-D tensors, as the dataset emits it).
"""

import functools
import re
from dataclasses import dataclass, fields
from typing import Any, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX

from comparative_recipe import checks

#: ``chunk_ids`` of padding (written by the collate)
PAD_CHUNK = -2
#: ``chunk_ids`` of a token that is never dropped
PROTECTED_CHUNK = -1

MODES = ("window", "sentence", "paragraph", "pattern", "spans")
#: modes whose boundaries are found in the text
TEXT_MODES = ("sentence", "paragraph", "pattern")
DEFAULT_WINDOW = 64

# A run of whitespace that holds a line break (and the whitespace around it).
_LINE_BREAKS = r"[^\S\n]*\n\s*"
# Sentence end: terminal punctuation (and closing quotes/brackets) followed by whitespace, with
# the line breaks that follow it; ideographic stops need no whitespace; a line break alone ends
# a sentence too (headings, list items). Abbreviations ("e.g. x") count as ends.
_SENTENCE_END = (
    r"(?:[.!?]+[\"'\u201d\u2019)\]]*(?=\s)|[\u3002\uff01\uff1f]+[\u300d\u300f\uff09]*)"
    rf"(?:{_LINE_BREAKS})?|{_LINE_BREAKS}"
)
_BOUNDARIES = {"sentence": _SENTENCE_END, "paragraph": _LINE_BREAKS}

#: where the settings that the old ``crop`` section mixed together now live
CROP_MOVED = (
    "the crop rate is set in ablation.crop.rate and chunking in dataset.chunking "
    "(mode, window, pattern, protect_leading, protect_trailing)"
)


# ----------------------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)
class ChunkingConfig:
    """How a dataset splits each sample's context into droppable chunks (``dataset.chunking``).

    mode: one of ``MODES``. ``window``: runs of ``window`` droppable tokens. ``sentence``: one
    chunk per sentence (ends at . ! ? followed by whitespace, at 。！？, and at line breaks).
    ``paragraph``: one chunk per line (ends at each run of line breaks). ``pattern``: the text is
    cut right after each match of the regex ``pattern`` (the match belongs to the chunk it ends).
    ``spans``: the item's ``chunk_spans`` (and ``chunk_required``).
    In text modes the whitespace after a boundary goes with the chunk it ends when it holds a
    line break, else with the next chunk; a chunk of whitespace only joins a neighbour.
    window: tokens per window, mode ``window`` only (None = 64). pattern: mode ``pattern`` only.
    protect_leading: first tokens never dropped (e.g. a system prompt). protect_trailing: tokens
    right before each labelled run never dropped (the question); see ``protected_mask``.
    Setting a key that the mode does not read is an error.
    """

    mode: str = "window"
    window: Optional[int] = None
    pattern: Optional[str] = None
    protect_leading: int = 0
    protect_trailing: int = 0

    def __post_init__(self) -> None:
        if self.mode == "separator":
            raise ValueError(
                "dataset.chunking.mode 'separator' is gone (token-id matching missed separators "
                "that the tokenizer merges with their neighbours): boundaries are found in the "
                "text now. Use mode: paragraph (line breaks), sentence, or pattern: <regex>"
            )
        checks.choice(self.mode, MODES, "dataset.chunking.mode")
        if self.window is not None:
            checks.positive_int(self.window, "dataset.chunking.window")
            if self.mode != "window":
                raise ValueError(
                    f"dataset.chunking.window is only read by mode 'window', not {self.mode!r}"
                )
        if self.mode == "pattern":
            if not isinstance(self.pattern, str) or not self.pattern:
                raise ValueError(
                    f"dataset.chunking.mode 'pattern' needs a non-empty regex in "
                    f"dataset.chunking.pattern, got {self.pattern!r}"
                )
            _compile(self.pattern)
        elif self.pattern is not None:
            raise ValueError(
                f"dataset.chunking.pattern is only read by mode 'pattern', not {self.mode!r}"
            )
        checks.non_negative_int(self.protect_leading, "dataset.chunking.protect_leading")
        checks.non_negative_int(self.protect_trailing, "dataset.chunking.protect_trailing")

    @property
    def window_size(self) -> int:
        return DEFAULT_WINDOW if self.window is None else self.window

    @property
    def boundary(self) -> Optional["re.Pattern[str]"]:
        """The regex whose matches end a chunk in the text (text modes), else None."""
        if self.mode == "pattern":
            return _compile(self.pattern)
        if self.mode in _BOUNDARIES:
            return _compile(_BOUNDARIES[self.mode])
        return None

    @property
    def text_rule(self) -> Optional[str]:
        """A key naming the text boundaries (equal keys cut text identically), None if none."""
        if self.mode == "pattern":
            return f"pattern:{self.pattern}"
        return self.mode if self.mode in TEXT_MODES else None


@functools.lru_cache(maxsize=None)
def _compile(pattern: str) -> "re.Pattern[str]":
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"dataset.chunking.pattern {pattern!r} is not a valid regex: {e}") from e


ChunkingLike = Union[ChunkingConfig, Mapping[str, Any], None]


def chunking_config(value: ChunkingLike, default: ChunkingConfig) -> ChunkingConfig:
    """A ChunkingConfig from a ChunkingConfig, a mapping of its fields (a config node), or None
    (``default``). A key ChunkingConfig does not have is an error (it would be ignored)."""
    if value is None:
        return default
    if isinstance(value, ChunkingConfig):
        return value
    if not isinstance(value, Mapping):
        raise TypeError(
            "dataset.chunking must be a ChunkingConfig, a mapping of its fields or None, got "
            f"{type(value).__name__}"
        )
    value = {str(k): v for k, v in value.items()}
    if "rate" in value:
        raise ValueError(f"dataset.chunking.rate is not a chunking setting: {CROP_MOVED}")
    hint = "The mode key is `mode` (it was `chunking` in the old crop section)" if (
        "chunking" in value
    ) else ""
    checks.known_keys(value, [f.name for f in fields(ChunkingConfig)], "dataset.chunking", hint)
    return ChunkingConfig(**value)


def reject_crop_argument(kwargs: Mapping[str, Any]) -> None:
    """Raises when a dataset builder is given the old ``crop`` argument (it would be ignored)."""
    if "crop" in kwargs:
        raise ValueError(f"dataset.crop is not read: {CROP_MOVED}")


# ----------------------------------------------------------------------------------------------
# argument checks


def _check_sample(**tensors: torch.Tensor) -> None:
    """All 1-D and of one length."""
    lengths = set()
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor) or t.dim() != 1:
            raise ValueError(f"{name} must be a 1-D tensor (one unpadded sample), got {_shape(t)}")
        lengths.add(t.numel())
    if len(lengths) > 1:
        shapes = ", ".join(f"{n} {tuple(t.shape)}" for n, t in tensors.items())
        raise ValueError(f"sample tensors must have one length, got {shapes}")


def _shape(t) -> str:
    return f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


def _check_spans(spans: Sequence[Tuple[int, int]], length: int) -> List[Tuple[int, int]]:
    """(start, end) pairs as ints, each with 0 <= start < end <= length, non-overlapping."""
    spans = [(int(s), int(e)) for s, e in spans]
    for start, end in spans:
        if not 0 <= start < end <= length:
            raise ValueError(
                f"span ({start}, {end}) is out of bounds or empty: "
                f"need 0 <= start < end <= {length}"
            )
    ordered = sorted(spans)
    for previous, current in zip(ordered, ordered[1:]):
        if current[0] < previous[1]:
            raise ValueError(f"spans {previous} and {current} overlap")
    return spans


# ----------------------------------------------------------------------------------------------
# protection


def _shift_right(mask: torch.Tensor) -> torch.Tensor:
    """mask[i-1] at position i, False at position 0.  [S] -> [S]"""
    return torch.cat([mask.new_zeros(min(1, mask.numel())), mask[:-1]])


def _shift_left(mask: torch.Tensor) -> torch.Tensor:
    """mask[i+1] at position i, False at the last position.  [S] -> [S]"""
    return torch.cat([mask[1:], mask.new_zeros(min(1, mask.numel()))])


def _run_starts(mask: torch.Tensor) -> torch.Tensor:
    """True at the first position of each maximal run of True.  [S] bool -> [S] bool"""
    return mask & ~_shift_right(mask)


def _droppable(labels: torch.Tensor, protected: torch.Tensor) -> torch.Tensor:
    """Context tokens (label -100) that are not protected.  [S] -> [S] bool"""
    return (labels == CROSS_ENTROPY_IGNORE_IDX) & ~protected.bool()


def _number_chunks(droppable: torch.Tensor, chunk_starts: torch.Tensor) -> torch.Tensor:
    """Chunk k >= 0 for droppable tokens (k counts chunk starts so far), -1 elsewhere.  [S] long"""
    ids = torch.cumsum(chunk_starts.long(), 0) - 1
    return torch.where(droppable, ids, torch.full_like(ids, PROTECTED_CHUNK))


def protected_mask(
    tokens: torch.Tensor,
    labels: torch.Tensor,
    *,
    protect_leading: int = 0,
    protect_trailing: int = 0,
    special_ids: Sequence[int] = (),
) -> torch.Tensor:
    """Tokens a crop must never remove, for one sample.  tokens, labels [S] -> [S] bool.

    True for: labelled tokens (label != -100) and the token right before each of them (it
    predicts the labelled token: without it a crop could leave that token at position 0, where
    nothing scores it, so the cropped pass would average over fewer tokens than the full one);
    the first ``protect_leading`` tokens (e.g. a system prompt); the ``protect_trailing``
    positions immediately before EACH maximal run of labelled tokens (the question right before
    each answer; in a multi-turn sample every turn's question is kept). A sample with no labelled
    token protects its last ``protect_trailing`` tokens. Also True for any token whose id is in
    ``special_ids`` (BOS, headers, EOT, ...).
    """
    _check_sample(tokens=tokens, labels=labels)
    checks.non_negative_int(protect_leading, "protect_leading")
    checks.non_negative_int(protect_trailing, "protect_trailing")
    length = tokens.numel()
    position = torch.arange(length, device=tokens.device)
    labelled = labels != CROSS_ENTROPY_IGNORE_IDX

    protected = labelled | _shift_left(labelled) | (position < protect_leading)
    if len(special_ids) > 0:
        specials = torch.tensor(sorted(int(i) for i in special_ids), device=tokens.device)
        protected |= torch.isin(tokens, specials)
    if protect_trailing > 0:
        if labelled.any():
            # next_start[p] = first labelled-run start strictly after p (length if none)
            starts = torch.where(_run_starts(labelled), position, torch.full_like(position, length))
            from_here = torch.flip(torch.cummin(torch.flip(starts, [0]), 0).values, [0])
            next_start = torch.cat([from_here[1:], from_here.new_full((1,), length)])
            protected |= (next_start < length) & (next_start - position <= protect_trailing)
        else:
            protected |= position >= length - protect_trailing
    return protected


def spans_mask(length: int, spans: Sequence[Tuple[int, int]]) -> torch.Tensor:
    """True inside any of ``spans`` ((start, end), end exclusive; they may overlap).
    -> [length] bool"""
    mask = torch.zeros(length, dtype=torch.bool)
    for start, end in spans:
        start, end = int(start), int(end)
        if not 0 <= start <= end <= length:
            raise ValueError(
                f"span ({start}, {end}) is out of bounds: need 0 <= start <= end <= {length}"
            )
        mask[start:end] = True
    return mask


# ----------------------------------------------------------------------------------------------
# chunkers


def window_chunk_ids(labels: torch.Tensor, protected: torch.Tensor, window: int) -> torch.Tensor:
    """Fixed-size chunks for one sample.  labels, protected [S] -> chunk_ids [S] long.

    Droppable tokens (label -100, not protected) form maximal contiguous runs; each run is cut into
    windows of ``window`` tokens from its start (the last window of a run may be shorter; windows
    never cross a protected token). Chunks are numbered 0, 1, ... in order across the sample.
    """
    _check_sample(labels=labels, protected=protected)
    checks.positive_int(window, "window")
    droppable = _droppable(labels, protected)
    position = torch.arange(labels.numel(), device=labels.device)
    run_start = torch.where(_run_starts(droppable), position, torch.full_like(position, -1))
    offset_in_run = position - torch.cummax(run_start, 0).values
    chunk_starts = droppable & (offset_in_run % window == 0)
    return _number_chunks(droppable, chunk_starts)


def _pieces_to_chunks(
    droppable: torch.Tensor, piece_starts: torch.Tensor, content: torch.Tensor
) -> torch.Tensor:
    """Chunk ids from pieces cut at boundaries.  [S] bool each -> chunk_ids [S] long.

    A piece begins at each droppable run start and at each droppable token where
    ``piece_starts`` is True. A piece without a ``content`` token (only separators or whitespace)
    is not a chunk of its own: it joins the previous chunk of its run, or the next one when it
    opens the run.
    """
    run_start = _run_starts(droppable)
    candidate = run_start | (droppable & piece_starts)
    piece_start_pos = candidate.nonzero().flatten()  # [P]
    n_pieces = piece_start_pos.numel()
    if n_pieces == 0:
        return _number_chunks(droppable, candidate)
    piece = (torch.cumsum(candidate.long(), 0) - 1)[droppable]
    has_content = torch.zeros(n_pieces, dtype=torch.long, device=droppable.device)
    has_content = has_content.index_add_(0, piece, (droppable & content)[droppable].long()) > 0

    # a piece opens a chunk iff it opens its run, or it has content and content precedes it in
    # its run
    opens_run = run_start[piece_start_pos]  # [P]
    content_before = torch.cumsum(has_content.long(), 0) - has_content.long()  # exclusive, [P]
    piece_index = torch.arange(n_pieces, device=droppable.device)
    first_piece_of_run = torch.cummax(
        torch.where(opens_run, piece_index, torch.full_like(piece_index, -1)), 0
    ).values
    content_before_in_run = content_before - content_before[first_piece_of_run]
    opens_chunk = opens_run | (has_content & (content_before_in_run > 0))

    chunk_starts = torch.zeros_like(droppable)
    chunk_starts[piece_start_pos[opens_chunk]] = True
    return _number_chunks(droppable, chunk_starts)


def text_cuts(text: str, boundary: "re.Pattern[str]") -> List[int]:
    """Offsets 0 < p < len(text) where ``text`` is cut into pieces: right after each match of
    ``boundary``, except where a cut would leave a piece of whitespace only (such a piece joins
    the next one, or the previous one at the end of the text)."""
    cuts, start = [], 0
    for match in boundary.finditer(text):
        point = match.end()
        if start < point < len(text) and text[start:point].strip():
            cuts.append(point)
            start = point
    if cuts and not text[cuts[-1] :].strip():
        cuts.pop()
    return cuts


def split_text(text: str, boundary: Optional["re.Pattern[str]"]) -> List[str]:
    """``text`` cut at ``text_cuts`` (the whole text if ``boundary`` is None); pieces join back
    to ``text``."""
    cuts = text_cuts(text, boundary) if boundary is not None else []
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


def text_piece_count(text: str, boundary: "re.Pattern[str]") -> int:
    """How many pieces with content ``text`` has at ``boundary`` (0 for blank text)."""
    return len(text_cuts(text, boundary)) + 1 if text.strip() else 0


def text_chunk_ids(
    labels: torch.Tensor,
    protected: torch.Tensor,
    token_texts: Sequence[str],
    boundary: "re.Pattern[str]",
) -> torch.Tensor:
    """Chunks cut where the text has a boundary, for one sample.  [S] each -> chunk_ids [S].

    token_texts: the text of each token as it reads in running text (``TokenTexts``), so their
    concatenation is the sample's text. The text is cut at ``text_cuts``; a token starts a new
    piece when a cut lies at or before its first non-whitespace character and after the previous
    token's (a whitespace-only token counts from its start, so it stays with the text before a
    cut that follows it). Pieces become chunks as in ``_pieces_to_chunks`` (pieces of whitespace
    only join a neighbour).
    """
    _check_sample(labels=labels, protected=protected)
    if len(token_texts) != labels.numel():
        raise ValueError(f"token_texts has {len(token_texts)} entries for {labels.numel()} tokens")
    anchors, content, offset = [], [], 0
    for piece in token_texts:
        stripped = piece.lstrip()
        anchors.append(offset + len(piece) - len(stripped) if stripped else offset)
        content.append(bool(stripped))
        offset += len(piece)
    device = labels.device
    cuts = torch.tensor(text_cuts("".join(token_texts), boundary), dtype=torch.long, device=device)
    anchors = torch.tensor(anchors, dtype=torch.long, device=device)
    piece_index = torch.searchsorted(cuts, anchors, right=True)  # cuts at or before the anchor
    piece_starts = piece_index > torch.cat([piece_index[:1], piece_index[:-1]])
    content = torch.tensor(content, dtype=torch.bool, device=device)
    return _pieces_to_chunks(_droppable(labels, protected), piece_starts, content)


def span_chunk_ids(
    length: int,
    spans: Sequence[Tuple[int, int]],
    required: Optional[Sequence[bool]],
    protected: torch.Tensor,
) -> torch.Tensor:
    """Chunks given by the dataset (e.g. the passages of a multi-document QA sample).

    spans: (start, end) token offsets, end exclusive, non-overlapping, in any order; required[j]
    True marks span j as never dropped (a gold passage). protected [length] bool (usually from
    ``protected_mask``, which includes the labelled tokens). Returns chunk_ids [length] long:
    -1 for required spans, protected tokens and tokens outside every span; the other spans are
    chunks 0, 1, ... in order of position. A span whose tokens are all protected is not a chunk.
    """
    checks.non_negative_int(length, "length")
    if not isinstance(protected, torch.Tensor) or protected.shape != (length,):
        raise ValueError(
            f"protected must be a 1-D tensor of length {length}, got {_shape(protected)}"
        )
    spans = _check_spans(spans, length)
    if required is None:
        required = [False] * len(spans)
    if len(required) != len(spans):
        raise ValueError(f"required has {len(required)} entries but there are {len(spans)} spans")

    chunk_ids = torch.full((length,), PROTECTED_CHUNK, dtype=torch.long, device=protected.device)
    free = ~protected.bool()
    n_chunks = 0
    for j in sorted(range(len(spans)), key=lambda j: spans[j]):
        start, end = spans[j]
        if required[j] or not free[start:end].any():
            continue
        chunk_ids[start:end] = torch.where(free[start:end], n_chunks, PROTECTED_CHUNK)
        n_chunks += 1
    return chunk_ids


def sample_chunk_ids(
    tokens: torch.Tensor,
    labels: torch.Tensor,
    config: ChunkingConfig,
    *,
    special_ids: Sequence[int] = (),
    protected_spans: Optional[Sequence[Tuple[int, int]]] = None,
    token_texts: Optional[Sequence[str]] = None,
    text_spans: Optional[Sequence[Tuple[int, int]]] = None,
    spans: Optional[Sequence[Tuple[int, int]]] = None,
    required: Optional[Sequence[bool]] = None,
) -> torch.Tensor:
    """chunk_ids [S] of one unpadded sample (tokens, labels [S]) in ``config.mode``.

    Protects what ``protected_mask`` protects, the ``protected_spans`` and every token after the
    last labelled token. Text modes take either ``text_spans`` (token spans of the text pieces,
    found in the raw text by a builder: each is a chunk) or ``token_texts`` (the text of each
    token, cut with ``text_chunk_ids``); ``spans`` mode takes ``spans`` (and ``required``).
    """
    protected = protected_mask(
        tokens,
        labels,
        protect_leading=config.protect_leading,
        protect_trailing=config.protect_trailing,
        special_ids=special_ids,
    )
    if protected_spans:
        protected |= spans_mask(tokens.numel(), protected_spans).to(protected.device)
    labelled = (labels != CROSS_ENTROPY_IGNORE_IDX).nonzero()
    if labelled.numel() > 0:
        protected[int(labelled[-1]) + 1 :] = True

    if config.mode == "window":
        return window_chunk_ids(labels, protected, config.window_size)
    if config.mode == "spans":
        if spans is None:
            raise ValueError("chunking mode 'spans' needs the sample's spans")
        return span_chunk_ids(tokens.numel(), spans, required, protected)
    if text_spans is not None:
        return span_chunk_ids(tokens.numel(), text_spans, None, protected)
    if token_texts is None:
        raise ValueError(f"chunking mode {config.mode!r} needs text_spans or token_texts")
    return text_chunk_ids(labels, protected, token_texts, config.boundary)
