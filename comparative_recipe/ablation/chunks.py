"""Input-neuron ablation ("CmpCrop") for decoder LMs: chunk the context, then crop it, nested.

A sample's context is split into chunks, the unit of input ablation (a paragraph in the reference).
``chunk_ids`` [S] marks each token: -2 padding, -1 protected (never dropped), k >= 0 droppable
chunk k (0..n-1 in order of position). Crop level i drops the first n_i chunks of one random
permutation of the sample's chunks, keyed by (seed, step, sample id), with n_0 = 0 < n_1 < n_2 ...
while chunks remain, so every level drops a superset of the previous level's chunks. Dropped tokens
are physically removed: the cropped pass is shorter, like the reference's re-tokenised crops.

The chunkers below work on ONE unpadded sample (1-D tensors, as the dataset emits it); the collate
pads chunk_ids with -2.
"""

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Optional, Sequence

import torch

from comparative_recipe.ablation import keys

IGNORE_INDEX = -100
PAD_CHUNK = -2
PROTECTED_CHUNK = -1
CROP_ORDER_STREAM = 2  # second key of every crop-order draw (see docs/CONTRACT.md, Randomness)

CHUNKINGS = ("window", "separator", "spans")


# ----------------------------------------------------------------------------------------------
# argument checks


def _check_nonnegative_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")


def _check_rate(rate) -> None:
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
        raise ValueError(f"rate must be a number in [0, 1), got {rate!r}")


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


# ----------------------------------------------------------------------------------------------
# protection and chunking of one sample


def _shift_right(mask: torch.Tensor) -> torch.Tensor:
    """mask[i-1] at position i, False at position 0.  [S] -> [S]"""
    return torch.cat([mask.new_zeros(min(1, mask.numel())), mask[:-1]])


def _run_starts(mask: torch.Tensor) -> torch.Tensor:
    """True at the first position of each maximal run of True.  [S] bool -> [S] bool"""
    return mask & ~_shift_right(mask)


def _droppable(labels: torch.Tensor, protected: torch.Tensor) -> torch.Tensor:
    """Context tokens (label -100) that are not protected.  [S] -> [S] bool"""
    return (labels == IGNORE_INDEX) & ~protected.bool()


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

    True for: labelled tokens (label != -100); the first ``protect_leading`` tokens (e.g. a system
    prompt); the ``protect_trailing`` positions immediately before EACH maximal run of labelled
    tokens (the question right before each answer; in a single-turn sample that is the end of the
    prompt, in a multi-turn sample every turn's question is kept, not only the first one). These
    positions are context by construction, except when two labelled runs are closer than
    ``protect_trailing``, where the window reaches labelled tokens that are protected anyway. A
    sample with no labelled token protects its last ``protect_trailing`` tokens. Also True for any
    token whose id is in ``special_ids`` (BOS, headers, EOT, ...).
    """
    _check_sample(tokens=tokens, labels=labels)
    _check_nonnegative_int("protect_leading", protect_leading)
    _check_nonnegative_int("protect_trailing", protect_trailing)
    length = tokens.numel()
    position = torch.arange(length, device=tokens.device)
    labelled = labels != IGNORE_INDEX

    protected = labelled | (position < protect_leading)
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


def window_chunk_ids(labels: torch.Tensor, protected: torch.Tensor, window: int) -> torch.Tensor:
    """Fixed-size chunks for one sample.  labels, protected [S] -> chunk_ids [S] long.

    Droppable tokens (label -100, not protected) form maximal contiguous runs; each run is cut into
    windows of ``window`` tokens from its start (the last window of a run may be shorter; windows
    never cross a protected token). Chunks are numbered 0, 1, ... in order across the sample.
    """
    _check_sample(labels=labels, protected=protected)
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an int >= 1, got {window!r}")
    droppable = _droppable(labels, protected)
    position = torch.arange(labels.numel(), device=labels.device)
    run_start = torch.where(_run_starts(droppable), position, torch.full_like(position, -1))
    offset_in_run = position - torch.cummax(run_start, 0).values
    chunk_starts = droppable & (offset_in_run % window == 0)
    return _number_chunks(droppable, chunk_starts)


def _separator_occurrences(tokens: torch.Tensor, separator: list[int]):
    """Greedy left-to-right, non-overlapping matches of ``separator`` (like str.split).

    tokens [S] -> (covered [S] bool: token is in a match, ends [S] bool: last token of a match).
    """
    length, width = tokens.numel(), len(separator)
    covered = torch.zeros(length, dtype=torch.bool, device=tokens.device)
    ends = torch.zeros_like(covered)
    if length < width:
        return covered, ends
    pattern = torch.tensor(separator, dtype=tokens.dtype, device=tokens.device)
    starts = (tokens.unfold(0, width, 1) == pattern).all(1).nonzero().flatten()
    if width > 1 and starts.numel() > 1:
        kept, free_from = [], 0
        for s in starts.tolist():
            if s >= free_from:
                kept.append(s)
                free_from = s + width
        starts = torch.tensor(kept, dtype=torch.long, device=tokens.device)
    spans = starts[:, None] + torch.arange(width, device=tokens.device)
    covered[spans.flatten()] = True
    ends[starts + width - 1] = True
    return covered, ends


def separator_chunk_ids(
    tokens: torch.Tensor,
    labels: torch.Tensor,
    protected: torch.Tensor,
    separator_ids: Sequence[int],
) -> torch.Tensor:
    """Chunks cut at a separator token sequence, for one sample.  [S] each -> chunk_ids [S] long.

    Droppable runs (label -100, not protected) are cut right AFTER each occurrence of
    ``separator_ids``: a separator belongs to the chunk it ends, so dropping a paragraph also
    drops its trailing "\\n\\n" and the text left behind keeps one separator between paragraphs.
    A piece made only of separator tokens (a run that starts with a separator, or repeated
    separators) is not a chunk of its own: it joins the previous chunk of its run, or the next one
    when it opens the run. Matching is on token ids, so choose a separator that the tokenizer
    encodes the same way in running text (BPE may merge "\\n\\n" with a neighbour).
    """
    _check_sample(tokens=tokens, labels=labels, protected=protected)
    separator = [int(i) for i in separator_ids] if separator_ids is not None else []
    if len(separator) == 0:
        raise ValueError("separator_ids must be a non-empty sequence of token ids, got empty")
    droppable = _droppable(labels, protected)
    covered, ends = _separator_occurrences(tokens, separator)

    # candidate pieces: a new piece at each run start and after each separator inside a run
    run_start = _run_starts(droppable)
    candidate = run_start | (droppable & _shift_right(ends))
    piece_start_pos = candidate.nonzero().flatten()  # [P]
    n_pieces = piece_start_pos.numel()
    if n_pieces == 0:
        return _number_chunks(droppable, candidate)
    piece = (torch.cumsum(candidate.long(), 0) - 1)[droppable]
    content = (droppable & ~covered)[droppable].long()
    has_content = torch.zeros(n_pieces, dtype=torch.long, device=tokens.device)
    has_content = has_content.index_add_(0, piece, content) > 0  # [P]

    # a piece opens a chunk iff it opens its run, or it has content and content precedes it in
    # its run
    opens_run = run_start[piece_start_pos]  # [P]
    content_before = torch.cumsum(has_content.long(), 0) - has_content.long()  # exclusive, [P]
    piece_index = torch.arange(n_pieces, device=tokens.device)
    first_piece_of_run = torch.cummax(
        torch.where(opens_run, piece_index, torch.full_like(piece_index, -1)), 0
    ).values
    content_before_in_run = content_before - content_before[first_piece_of_run]
    opens_chunk = opens_run | (has_content & (content_before_in_run > 0))

    chunk_starts = torch.zeros_like(droppable)
    chunk_starts[piece_start_pos[opens_chunk]] = True
    return _number_chunks(droppable, chunk_starts)


def span_chunk_ids(
    length: int,
    spans: Sequence[tuple[int, int]],
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
    _check_nonnegative_int("length", length)
    if not isinstance(protected, torch.Tensor) or protected.shape != (length,):
        raise ValueError(
            f"protected must be a 1-D tensor of length {length}, got {_shape(protected)}"
        )
    spans = [(int(s), int(e)) for s, e in spans]
    if required is None:
        required = [False] * len(spans)
    if len(required) != len(spans):
        raise ValueError(f"required has {len(required)} entries but there are {len(spans)} spans")
    for start, end in spans:
        if not 0 <= start < end <= length:
            raise ValueError(
                f"span ({start}, {end}) is out of bounds or empty: "
                f"need 0 <= start < end <= {length}"
            )
    order = sorted(range(len(spans)), key=lambda j: spans[j])
    for previous, current in zip(order, order[1:]):
        if spans[current][0] < spans[previous][1]:
            raise ValueError(f"spans {spans[previous]} and {spans[current]} overlap")

    chunk_ids = torch.full((length,), PROTECTED_CHUNK, dtype=torch.long, device=protected.device)
    free = ~protected.bool()
    n_chunks = 0
    for j in order:
        start, end = spans[j]
        if required[j] or not free[start:end].any():
            continue
        chunk_ids[start:end] = torch.where(free[start:end], n_chunks, PROTECTED_CHUNK)
        n_chunks += 1
    return chunk_ids


# ----------------------------------------------------------------------------------------------
# nested crops of a batch


def nested_drop_counts(n_chunks: torch.Tensor, max_level: int, rate: float) -> torch.Tensor:
    """How many chunks each crop level drops.  n_chunks [B] -> counts [B, max_level + 1] long.

    counts[:, 0] = 0 and n_i = min(n, max(floor(q_i * n), n_{i-1} + 1)) with q_i = 1 - (1 - q)**i:
    the reference's nested fraction, but at least one more chunk per level while any remain.
    Computed with exact rationals on the rate as written in decimal (0.1 is 1/10, not the nearest
    double), so counts are identical on every device and never off by one from float rounding.
    """
    if not isinstance(n_chunks, torch.Tensor) or n_chunks.dim() != 1:
        raise ValueError(f"n_chunks must be a 1-D tensor, got {_shape(n_chunks)}")
    _check_nonnegative_int("max_level", max_level)
    _check_rate(rate)
    sizes = n_chunks.tolist()
    if any(n < 0 for n in sizes):
        raise ValueError(f"n_chunks must be non-negative, got {sizes}")
    keep = 1 - Fraction(repr(float(rate)))
    table = {}
    for n in set(sizes):
        counts = [0]
        for i in range(1, max_level + 1):
            proportional = math.floor(n * (1 - keep**i))
            counts.append(min(n, max(proportional, counts[-1] + 1)))
        table[n] = counts
    rows = [table[n] for n in sizes]
    counts = torch.tensor(rows, dtype=torch.long, device=n_chunks.device)
    return counts.reshape(len(sizes), max_level + 1)


def chunk_counts(chunk_ids: torch.Tensor) -> torch.Tensor:
    """Number of droppable chunks per row.  chunk_ids [B, S] -> [B] long.

    Checks that each row's chunks are numbered 0..n-1 without gaps (ValueError otherwise).
    """
    if not isinstance(chunk_ids, torch.Tensor) or chunk_ids.dim() != 2:
        raise ValueError(f"chunk_ids must be a [B, S] tensor, got {_shape(chunk_ids)}")
    if chunk_ids.numel() == 0:
        return chunk_ids.new_zeros(chunk_ids.shape[0])
    if (chunk_ids < PAD_CHUNK).any():
        raise ValueError(f"chunk_ids must be >= {PAD_CHUNK}, got min {int(chunk_ids.min())}")
    n = (chunk_ids.max(dim=1).values + 1).clamp(min=0)
    width = int(n.max()) + 1
    present = chunk_ids.new_zeros(chunk_ids.shape[0], width)
    present.scatter_(1, torch.where(chunk_ids >= 0, chunk_ids, width - 1), 1)
    if (present[:, : width - 1].sum(1) != n).any():
        raise ValueError("chunk_ids must number each row's droppable chunks 0..n-1 without gaps")
    return n


def chunk_drop_ranks(
    chunk_ids: torch.Tensor, sample_ids: torch.Tensor, *, seed: int, step: int
) -> torch.Tensor:
    """Drop order of each token's chunk.  chunk_ids [B, S], sample_ids [B] -> ranks [B, S] long.

    Chunk k of sample s gets u = keys.uniform(seed, 2, step, s, k); a sample's chunks sorted by u
    (ties by chunk index) give ranks 0..n-1, rank 0 dropped first. Every token of a droppable chunk
    carries its chunk's rank, other tokens -1. A pure function of (seed, step, sample id, chunk
    index): a sample gets the same order in any batch row, on any rank.
    """
    n = chunk_counts(chunk_ids)
    if sample_ids.shape != n.shape:
        raise ValueError(
            f"sample_ids must have shape {tuple(n.shape)}, got {tuple(sample_ids.shape)}"
        )
    width = int(n.max()) if n.numel() else 0
    if width == 0:
        return torch.full_like(chunk_ids, -1)
    chunk_index = torch.arange(width, device=chunk_ids.device)
    u = keys.uniform(seed, CROP_ORDER_STREAM, step, sample_ids[:, None], chunk_index[None, :])
    u = torch.where(chunk_index[None, :] < n[:, None], u, torch.full_like(u, 2.0))  # absent last
    by_rank = torch.argsort(u, dim=1, stable=True)  # [B, K]: chunk index of rank r
    rank_of_chunk = torch.empty_like(by_rank).scatter_(1, by_rank, chunk_index.expand_as(by_rank))
    ranks = rank_of_chunk.gather(1, chunk_ids.clamp(min=0))
    return torch.where(chunk_ids >= 0, ranks, torch.full_like(ranks, -1))


def crop_keep_mask(
    chunk_ids: torch.Tensor, ranks: torch.Tensor, n_drop: torch.Tensor
) -> torch.Tensor:
    """Tokens kept when each row drops its n_drop lowest-ranked chunks.

    chunk_ids, ranks [B, S], n_drop [B] -> keep [B, S] bool.

    Padding is never kept, protected tokens always are.
    """
    droppable_kept = (chunk_ids >= 0) & (ranks >= n_drop[:, None])
    return (chunk_ids == PROTECTED_CHUNK) | droppable_kept


def compact_rows(tokens: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor, pad_id: int):
    """Removes the tokens not kept, shifting the kept ones left in order.

    tokens, labels, keep [B, S] -> (tokens [B, S'], labels [B, S'], token_keys [B, S'], lengths [B])
    with S' the longest kept row; right padding is pad_id / -100 / -1. token_keys is the original
    column (= position in the sample) of each kept token.
    """
    lengths = keep.sum(1)
    new_width = int(lengths.max()) if lengths.numel() else 0
    # stable sort of "dropped" puts the kept columns first, in their original order
    columns = torch.argsort((~keep).to(torch.int64), dim=1, stable=True)[:, :new_width]
    valid = torch.arange(new_width, device=keep.device)[None, :] < lengths[:, None]
    kept_tokens = torch.where(valid, tokens.gather(1, columns), torch.full_like(columns, pad_id))
    label_pad = torch.full_like(columns, IGNORE_INDEX)
    kept_labels = torch.where(valid, labels.gather(1, columns), label_pad)
    token_keys = torch.where(valid, columns, torch.full_like(columns, -1))
    return kept_tokens, kept_labels, token_keys, lengths


@dataclass
class CropView:
    """The batch as seen by a pass at one crop level (right-padded to its own longest row).

    tokens [B, S_i], labels [B, S_i]: the kept tokens and their unshifted labels (every labelled
    token is kept). token_keys [B, S_i]: original position of each kept token, -1 on padding (keys
    per-token hidden masks, so a token keeps its mask whatever the crop). lengths [B]: kept tokens.
    dropped_chunks [B]: chunks dropped at this level. exhausted [B] bool: the sample had no chunk
    left to drop at this level, so its row repeats the previous level (always False at level 0).
    """

    level: int
    tokens: torch.Tensor
    labels: torch.Tensor
    token_keys: torch.Tensor
    lengths: torch.Tensor
    dropped_chunks: torch.Tensor
    exhausted: torch.Tensor


def crop_views(
    tokens: torch.Tensor,
    labels: torch.Tensor,
    chunk_ids: torch.Tensor,
    sample_ids: torch.Tensor,
    levels: Sequence[int],
    *,
    rate: float,
    seed: int,
    step: int,
    pad_id: int,
) -> list[CropView]:
    """One nested crop of the batch per requested level (0 = uncropped, padding removed).

    tokens, labels, chunk_ids [B, S], sample_ids [B] -> [CropView for each of levels]. Level i
    keeps the tokens whose chunk rank (``chunk_drop_ranks``) is >= n_i (``nested_drop_counts``),
    so it drops a superset of level i-1's chunks. Kept tokens are moved together and re-padded,
    so the model numbers their positions 0..len-1.
    """
    if not (tokens.dim() == 2 and tokens.shape == labels.shape == chunk_ids.shape):
        raise ValueError(
            "tokens, labels and chunk_ids must be [B, S] tensors of one shape, got "
            f"{tuple(tokens.shape)}, {tuple(labels.shape)}, {tuple(chunk_ids.shape)}"
        )
    levels = list(levels)
    for level in levels:
        _check_nonnegative_int("crop level", level)
    _check_rate(rate)
    if ((labels != IGNORE_INDEX) & (chunk_ids != PROTECTED_CHUNK)).any():
        raise ValueError(
            "chunk_ids must mark every labelled token (label != -100) as protected (-1)"
        )
    if not levels:
        return []

    n_chunks = chunk_counts(chunk_ids)
    counts = nested_drop_counts(n_chunks, max(levels), rate)  # [B, L+1]
    ranks = chunk_drop_ranks(chunk_ids, sample_ids, seed=seed, step=step)
    views = []
    for level in levels:
        n_drop = counts[:, level]
        keep = crop_keep_mask(chunk_ids, ranks, n_drop)
        view_tokens, view_labels, token_keys, lengths = compact_rows(tokens, labels, keep, pad_id)
        if level == 0:
            exhausted = torch.zeros_like(n_chunks, dtype=torch.bool)
        else:
            exhausted = counts[:, level - 1] >= n_chunks
        views.append(
            CropView(level, view_tokens, view_labels, token_keys, lengths, n_drop, exhausted)
        )
    return views


# ----------------------------------------------------------------------------------------------
# recipe configuration


@dataclass
class CropConfig:
    """Input-crop settings of the recipe.

    rate = 0.5: the reference keeps a uniformly random prefix of the shuffled distractors, i.e.
    drops about half of them on average at the first crop; q = 0.5 drops exactly that share
    (q_i = 0.5, 0.75, ... at later levels). chunking = "window" by default: it needs no dataset
    support and does not depend on how the tokenizer encodes a separator. "separator" cuts at
    ``separator`` (encoded by the caller with the model's tokenizer); "spans" uses spans from the
    dataset. protect_leading / protect_trailing: see ``protected_mask``.
    """

    rate: float = 0.5
    chunking: str = "window"  # one of CHUNKINGS
    window: int = 64
    separator: Optional[str] = "\n\n"
    protect_leading: int = 0
    protect_trailing: int = 0

    def __post_init__(self):
        _check_rate(self.rate)
        if self.chunking not in CHUNKINGS:
            raise ValueError(f"unknown chunking {self.chunking!r}; valid: {', '.join(CHUNKINGS)}")
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"window must be an int >= 1, got {self.window!r}")
        if self.chunking == "separator" and not self.separator:
            raise ValueError(
                f"chunking 'separator' needs a non-empty separator, got {self.separator!r}"
            )
        _check_nonnegative_int("protect_leading", self.protect_leading)
        _check_nonnegative_int("protect_trailing", self.protect_trailing)


def sample_chunk_ids(
    tokens: torch.Tensor,
    labels: torch.Tensor,
    config: CropConfig,
    *,
    special_ids: Sequence[int] = (),
    separator_ids: Optional[Sequence[int]] = None,
    spans: Optional[Sequence[tuple[int, int]]] = None,
    required: Optional[Sequence[bool]] = None,
) -> torch.Tensor:
    """chunk_ids [S] of one unpadded sample with the chunker ``config.chunking`` selects.

    separator_ids (config.separator encoded without BOS/EOS) is needed for "separator", spans
    (and optionally required) for "spans".
    """
    protected = protected_mask(
        tokens,
        labels,
        protect_leading=config.protect_leading,
        protect_trailing=config.protect_trailing,
        special_ids=special_ids,
    )
    if config.chunking == "window":
        return window_chunk_ids(labels, protected, config.window)
    if config.chunking == "separator":
        if separator_ids is None:
            raise ValueError("chunking 'separator' needs separator_ids (the encoded separator)")
        return separator_chunk_ids(tokens, labels, protected, separator_ids)
    if spans is None:
        raise ValueError("chunking 'spans' needs the sample's spans")
    return span_chunk_ids(tokens.numel(), spans, required, protected)
