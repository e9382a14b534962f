"""Step-time input crops ("CmpCrop"): nested removal of whole chunks from a batch.

chunk_ids [B, S] as the collate emits them: -2 padding, -1 protected (never dropped), k >= 0
droppable chunk k of that row's sample, numbered 0..n-1 (see ``comparative_recipe.data.chunking``).
Crop level i drops the first n_i chunks of one random permutation of the sample's chunks, keyed by
(seed, step, sample id), with n_0 = 0 < n_1 < n_2 ... while chunks remain, so every level drops a
superset of the previous level's chunks. Dropped tokens are physically removed: the cropped pass
is shorter, like the reference's re-tokenised crops.
"""

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Sequence

import torch
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX

from comparative_recipe import checks
from comparative_recipe.ablation import keys
from comparative_recipe.data.chunking import PAD_CHUNK, PROTECTED_CHUNK

# Second key of every crop-order draw; the hidden-mask stream is 1 (ablation/hidden.py).
CROP_ORDER_STREAM = 2


def _shape(t) -> str:
    return f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


def nested_drop_counts(n_chunks: torch.Tensor, max_level: int, rate: float) -> torch.Tensor:
    """How many chunks each crop level drops.  n_chunks [B] -> counts [B, max_level + 1] long.

    counts[:, 0] = 0 and n_i = min(n, max(floor(q_i * n), n_{i-1} + 1)) with q_i = 1 - (1 - q)**i:
    the reference's nested fraction, but at least one more chunk per level while any remain.
    Computed with exact rationals on the rate as written in decimal (0.1 is 1/10, not the nearest
    double), so counts are identical on every device and never off by one from float rounding.
    """
    if not isinstance(n_chunks, torch.Tensor) or n_chunks.dim() != 1:
        raise ValueError(f"n_chunks must be a 1-D tensor, got {_shape(n_chunks)}")
    checks.non_negative_int(max_level, "max_level")
    checks.rate(rate, "rate")
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
    label_pad = torch.full_like(columns, CROSS_ENTROPY_IGNORE_IDX)
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
    so it drops a superset of level i-1's chunks. The token right before each labelled token is
    kept whatever chunk_ids say, so every view scores exactly the targets the full view scores
    (a labelled token never lands at position 0, and keeps the token that predicts it). Kept
    tokens are moved together and re-padded, so the model numbers their positions 0..len-1.
    """
    if not (tokens.dim() == 2 and tokens.shape == labels.shape == chunk_ids.shape):
        raise ValueError(
            "tokens, labels and chunk_ids must be [B, S] tensors of one shape, got "
            f"{tuple(tokens.shape)}, {tuple(labels.shape)}, {tuple(chunk_ids.shape)}"
        )
    levels = list(levels)
    for level in levels:
        checks.non_negative_int(level, "crop level")
    checks.rate(rate, "rate")
    if ((labels != CROSS_ENTROPY_IGNORE_IDX) & (chunk_ids != PROTECTED_CHUNK)).any():
        raise ValueError(
            "chunk_ids must mark every labelled token (label != -100) as protected (-1)"
        )
    if not levels:
        return []

    n_chunks = chunk_counts(chunk_ids)
    counts = nested_drop_counts(n_chunks, max(levels), rate)  # [B, L+1]
    ranks = chunk_drop_ranks(chunk_ids, sample_ids, seed=seed, step=step)
    predicts_label = torch.zeros_like(chunk_ids, dtype=torch.bool)
    predicts_label[:, :-1] = labels[:, 1:] != CROSS_ENTROPY_IGNORE_IDX
    predicts_label &= chunk_ids != PAD_CHUNK
    views = []
    for level in levels:
        n_drop = counts[:, level]
        keep = crop_keep_mask(chunk_ids, ranks, n_drop) | predicts_label
        view_tokens, view_labels, token_keys, lengths = compact_rows(tokens, labels, keep, pad_id)
        if level == 0:
            exhausted = torch.zeros_like(n_chunks, dtype=torch.bool)
        else:
            exhausted = counts[:, level - 1] >= n_chunks
        views.append(
            CropView(level, view_tokens, view_labels, token_keys, lengths, n_drop, exhausted)
        )
    return views
