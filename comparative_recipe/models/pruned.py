"""The builder of a pruned model: any torchtune decoder cut to per-layer sizes.

``tune-cmp prune`` writes a torchtune config whose model section is::

    model:
      _component_: comparative_recipe.models.pruned.pruned_model
      base: {_component_: torchtune.models.llama3_2.llama3_2_1b}   # the unpruned builder
      ffn_hidden: [6144, 6144, ...]      # FFN hidden units per layer (null: as the base)
      attn_heads: [24, 24, ...]          # query heads per layer (null: as the base)
      attn_kv_heads: [8, 8, ...]         # kv heads per layer (null: as the base)

torchtune's own component builders derive ``head_dim`` from ``embed_dim // num_heads`` and take
one FFN size for every layer, so they cannot express removed heads or per-layer sizes; this
builder builds the base (full size: on the meta device when the recipe shards it) and cuts every
layer with ``comparative_recipe.pruning.structure``, keeping the leading units, in which order
the pruned checkpoint stores its kept ones.
"""

from typing import Any, Optional, Sequence

from omegaconf import OmegaConf
from torch import nn
from torchtune import config

from comparative_recipe.pruning.structure import compacted_keep, shrink_model


def pruned_model(
    base: Any,
    ffn_hidden: Optional[Sequence[int]] = None,
    attn_heads: Optional[Sequence[int]] = None,
    attn_kv_heads: Optional[Sequence[int]] = None,
) -> nn.Module:
    """``base`` (a model config with ``_component_``, or the model torchtune's instantiate
    already built from it) cut to the given per-layer sizes."""
    model = base if isinstance(base, nn.Module) else config.instantiate(OmegaConf.create(base))
    sizes = {"ffn_hidden": ffn_hidden, "attn_heads": attn_heads, "attn_kv_heads": attn_kv_heads}
    shrink_model(model, compacted_keep(model, {k: v for k, v in sizes.items() if v is not None}))
    return model
