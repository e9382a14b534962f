"""Which units to keep, from per-unit scores: pure functions of tensors and counts.

Two rankings (``RANKINGS``):

- ``uniform``: every layer loses ``round(sparsity * units)`` units, its lowest-scoring ones, so
  the pruned model is a standard architecture (one FFN size, one head count for all layers).
- ``global``: the ``round(sparsity * total)`` lowest-scoring units of the site over all layers
  go, so layers lose different numbers (saved with per-layer sizes).

Attention heads are removed the same number from every kv group (the lowest-scoring heads of
each group), so the grouped-query layout stays: with ``num_heads`` H and ``num_kv_heads`` KV
(``H // KV`` query heads per kv head), a layer loses a multiple of KV heads; in multi-head
attention (KV = H) any number, each removed head taking its kv head along. A uniform count that
is not such a multiple is an error naming the sparsities that are (``head_sparsities``); a global
ranking rounds each layer's count down to one. Ties are broken by unit index (the lower goes
first), so a selection is deterministic.
"""

from typing import List, Optional, Sequence

import torch

RANKINGS = ("uniform", "global")


def head_step(num_heads: int, num_kv_heads: int) -> int:
    """Heads a layer loses at a time: one per kv group (``num_kv_heads``), or 1 for MHA."""
    return 1 if num_heads == num_kv_heads else num_kv_heads


def head_sparsities(num_heads: int, num_kv_heads: int) -> List[float]:
    """The head sparsities a uniform ranking accepts (above 0, below 1), rounded to 4 places."""
    step = head_step(num_heads, num_kv_heads)
    return [round(k / num_heads, 4) for k in range(step, num_heads, step)]


def removal_count(units: int, sparsity: float, site: str, num_kv_heads: Optional[int] = None,
                  layer_index: int = 0) -> int:
    """Units a layer of ``units`` loses at ``sparsity`` under the uniform ranking.

    Raises:
        ValueError: it would remove every unit, or (heads) it breaks the grouped-query layout.
    """
    count = int(round(sparsity * units))
    if count >= units:
        raise ValueError(
            f"sparsity {sparsity} removes all {units} {site} units of layer {layer_index}: "
            "choose a lower sparsity"
        )
    if site == "attn_heads" and num_kv_heads is not None:
        step = head_step(units, num_kv_heads)
        if count % step:
            raise ValueError(
                f"sparsity {sparsity} removes {count} of {units} attention heads per layer, which "
                f"breaks the grouped-query layout ({num_kv_heads} kv heads of "
                f"{units // num_kv_heads} query heads each: remove a multiple of {step}); use "
                f"an attn_heads sparsity in {head_sparsities(units, num_kv_heads)}, e.g. "
                "prune.sparsity={ffn_hidden: <s>, attn_heads: <s_heads>}, or prune only "
                "ffn_hidden (prune.sites=[ffn_hidden])"
            )
    return count


def _lowest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the ``count`` lowest scores (ties: lower index first)."""
    order = torch.sort(scores.double(), stable=True).indices
    return order[:count]


def keep_from_removed(units: int, removed: torch.Tensor) -> torch.Tensor:
    """Sorted LongTensor of the units not in ``removed``."""
    kept = torch.ones(units, dtype=torch.bool)
    kept[removed] = False
    return kept.nonzero().squeeze(1)


def keep_lowest_removed(scores: torch.Tensor, count: int,
                        num_kv_heads: Optional[int] = None) -> torch.Tensor:
    """The kept units of one layer when its ``count`` lowest-scoring units go.

    Args:
        scores: [U] per-unit scores. num_kv_heads: heads only: remove ``count / num_kv_heads``
            from each kv group (``count`` a multiple of it), or any ``count`` when U equals it.
    """
    units = scores.numel()
    if num_kv_heads is None or head_step(units, num_kv_heads) == 1:
        return keep_from_removed(units, _lowest(scores, count))
    per_kv, per_group = units // num_kv_heads, count // num_kv_heads
    removed = [g * per_kv + _lowest(scores[g * per_kv:(g + 1) * per_kv], per_group)
               for g in range(num_kv_heads)]
    return keep_from_removed(units, torch.cat(removed))


def select_units(
    scores: Sequence[torch.Tensor],
    sparsity: float,
    site: str,
    ranking: str = "uniform",
    num_kv_heads: Optional[Sequence[int]] = None,
) -> List[torch.Tensor]:
    """The kept units of every layer of one site.

    Args:
        scores: per layer, [U_l] scores (higher: more useful).
        sparsity: the fraction of the site's units to remove, in [0, 1).
        ranking: "uniform" or "global" (see the module doc).
        num_kv_heads: "attn_heads": per layer, its kv heads.

    Returns:
        Per layer, the sorted LongTensor of kept unit indices.
    """
    if ranking not in RANKINGS:
        raise ValueError(f"prune.ranking must be one of {list(RANKINGS)}, got {ranking!r}")
    kv = list(num_kv_heads) if num_kv_heads is not None else [None] * len(scores)
    if ranking == "uniform":
        return [keep_lowest_removed(s, removal_count(s.numel(), sparsity, site, g, i), g)
                for i, (s, g) in enumerate(zip(scores, kv))]
    flat = torch.cat([s.double().flatten() for s in scores])
    total = int(round(sparsity * flat.numel()))
    removed = torch.zeros(flat.numel(), dtype=torch.bool)
    removed[_lowest(flat, total)] = True
    out, at = [], 0
    for i, (s, g) in enumerate(zip(scores, kv)):
        n = s.numel()
        count = int(removed[at:at + n].sum())
        at += n
        if g is not None:
            count -= count % head_step(n, g)
        if count >= n:
            raise ValueError(
                f"the global ranking at sparsity {sparsity} removes all {n} {site} units of "
                f"layer {i}: choose a lower sparsity or prune.ranking=uniform"
            )
        out.append(keep_lowest_removed(s, count, g))
    return out


def achieved_sparsity(kept: Sequence[torch.Tensor], units: Sequence[int]) -> float:
    """The fraction of a site's units removed over all layers."""
    return 1.0 - sum(k.numel() for k in kept) / sum(units)
