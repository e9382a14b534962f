"""Per-unit scores of the pruning baselines (attribution is ``comparative_recipe.attribution``).

Every function returns float32 [U] for one site on one layer; a higher score is a more useful
unit. The weights of a unit are those ``structure.shrink_layer`` removes with it.

- ``random``: uniform in [0, 1), from a generator seeded by (seed, site, layer).
- ``magnitude``: the summed |W| of the unit's weights: FFN unit j, row j of w1 and w3 and column
  j of w2; head h, its head_dim rows of q_proj and columns of output_proj (k and v are shared
  by the kv group, so they do not tell its query heads apart).
- ``wanda``: Wanda's |W_ij| * ||X_j|| (Sun et al. 2023: a weight times the norm of the input
  channel it reads, over the data's tokens) summed over the unit's outgoing weights, the
  column(s) of w2 / output_proj that read the unit's channels; ``||X_j||`` is the norm of the
  site activation (``neurons``): ``sum_c ||X_c|| * sum_i |W_ic|`` over the unit's channels c.
  No gradients.
"""

import torch
from torch import nn

from comparative_recipe import neurons

METHODS = ("attribution", "random", "magnitude", "wanda")
# the methods that read data (the others score the weights alone)
DATA_METHODS = ("attribution", "wanda")


def _weight(module: nn.Module) -> torch.Tensor:
    w = module.weight.detach()
    if hasattr(w, "full_tensor"):  # a DTensor shard
        w = w.full_tensor()
    return w.float().abs()


def random_scores(units: int, seed: int, site: str, layer_index: int) -> torch.Tensor:
    """[U] uniform scores, the same for the same (seed, site, layer) on every run and rank."""
    g = torch.Generator().manual_seed(
        (int(seed) * 1_000_003 + neurons.SITES.index(site) * 10_007 + int(layer_index)) % 2**63
    )
    return torch.rand(units, generator=g)


def magnitude_scores(lay: neurons.SiteLayout) -> torch.Tensor:
    """[U] summed |W| of each unit's weights (see the module doc)."""
    if lay.site == "ffn_hidden":
        mlp = lay.layer.mlp
        return _weight(mlp.w1).sum(1) + _weight(mlp.w3).sum(1) + _weight(mlp.w2).sum(0)
    if lay.site == "attn_heads":
        attn = lay.layer.attn
        q = _weight(attn.q_proj).unflatten(0, (lay.units, lay.group)).sum((1, 2))
        out = _weight(attn.output_proj).unflatten(1, (lay.units, lay.group)).sum((0, 2))
        return q + out
    raise ValueError(f"magnitude scores are defined for ffn_hidden and attn_heads, not {lay.site!r}")


def wanda_scores(lay: neurons.SiteLayout, sq_norms: torch.Tensor) -> torch.Tensor:
    """[U] Wanda scores from ``sq_norms`` [U * G], the summed squares of each channel of the
    site activation over the data's tokens."""
    if lay.site not in ("ffn_hidden", "attn_heads"):
        raise ValueError(f"wanda scores are defined for ffn_hidden and attn_heads, not {lay.site!r}")
    if sq_norms.shape != (lay.width,):
        raise ValueError(f"wanda_scores: {lay.site} of layer {lay.layer_index} needs "
                         f"[{lay.width}] squared norms, got {tuple(sq_norms.shape)}")
    per_channel = _weight(lay.module).sum(0) * sq_norms.float().clamp(min=0).sqrt()  # [U * G]
    return per_channel.unflatten(0, (lay.units, lay.group)).sum(1)
