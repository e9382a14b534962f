"""Removing neuron units from a torchtune decoder: the model gets physically smaller.

The units are those of ``comparative_recipe.neurons`` that can leave a standard architecture:

- ``ffn_hidden`` unit j: row j of ``mlp.w1`` and ``mlp.w3`` (the gate and up projections) and
  column j of ``mlp.w2`` (the down projection);
- ``attn_heads`` unit h: rows ``h * head_dim ... (h + 1) * head_dim`` of ``attn.q_proj`` (and its
  bias) and the same columns of ``attn.output_proj``. Query heads are grouped by kv head
  (``neurons.SiteLayout.kv_head_index``); every kv group that keeps a head must keep the same
  number (``num_heads // num_kv_heads`` stays an integer, torchtune's and HF's layout), and a
  group that keeps none loses its kv head too (its rows of ``k_proj`` and ``v_proj``).

Removing a unit is exactly masking it to zero (its contribution to the residual stream is the
masked channel times its down / output projection column): ``shrink_layer`` changes the model's
size, not its function on the kept units. Only plain ``nn.Linear`` projections are cut: a LoRA
or NF4 model is pruned from its merged full-precision weights.
"""

from typing import Dict, Mapping, Sequence

import torch
from torch import nn

from comparative_recipe import neurons

PRUNABLE_SITES = ("ffn_hidden", "attn_heads")


def _plain_linear(module: nn.Module, what: str, layer_index: int) -> nn.Linear:
    if type(module) is not nn.Linear:
        raise ValueError(
            f"layer {layer_index}: {what} is a {type(module).__name__}, not a plain nn.Linear: "
            "prune a full-precision model (for a LoRA run, its merged weights: "
            "checkpointer.checkpoint_dir=<run>/best/merged with the base model's config)"
        )
    return module


def _cut(linear: nn.Linear, dim: int, index: torch.Tensor) -> nn.Linear:
    """A new linear keeping ``index`` of its output rows (``dim`` 0) or input columns (1)."""
    weight = linear.weight.detach().index_select(dim, index.to(linear.weight.device))
    out_f, in_f = weight.shape
    new = nn.Linear(in_f, out_f, bias=linear.bias is not None,
                    device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        if weight.device.type != "meta":
            new.weight.copy_(weight)
        if linear.bias is not None:
            bias = linear.bias.detach()
            bias = bias.index_select(0, index.to(bias.device)) if dim == 0 else bias
            if bias.device.type != "meta":
                new.bias.copy_(bias)
    new.weight.requires_grad_(linear.weight.requires_grad)
    return new


def _channels(units: torch.Tensor, group: int) -> torch.Tensor:
    """The channel indices of ``units`` of ``group`` consecutive channels each."""
    return (units[:, None] * group + torch.arange(group, device=units.device)[None, :]).flatten()


def check_head_grouping(keep: torch.Tensor, num_heads: int, num_kv_heads: int,
                        layer_index: int = 0) -> torch.Tensor:
    """The kv heads that keep query heads, after checking that each keeps the same number.

    Args:
        keep: [K] LongTensor, the query heads kept (sorted, distinct).

    Returns:
        [G'] LongTensor of the kv groups kept.
    """
    if keep.numel() == 0:
        raise ValueError(f"layer {layer_index}: every attention head would be removed")
    per_kv = num_heads // num_kv_heads
    counts = torch.bincount(keep.cpu() // per_kv, minlength=num_kv_heads)
    groups = counts.nonzero().squeeze(1)
    if bool((counts[groups] != counts[groups[0]]).any()):
        raise ValueError(
            f"layer {layer_index}: keeping query heads {keep.tolist()} breaks the grouped-query "
            f"layout: kv heads keep {counts.tolist()} query heads each ({per_kv} query heads "
            "per kv head before); every kv head kept must keep the same number"
        )
    return groups


def shrink_layer(layer: nn.Module, keep: Mapping[str, torch.Tensor], layer_index: int = 0) -> None:
    """Cuts ``layer`` down, in place, to the units in ``keep``.

    Args:
        layer: a transformer layer (``neurons.find_layers``), unwrapped or not.
        keep: ``{site: LongTensor [K]}`` for sites of ``PRUNABLE_SITES``: the sorted, distinct
            unit indices kept on this layer. A site absent is left as it is.
    """
    for site, units in keep.items():
        if site not in PRUNABLE_SITES:
            raise ValueError(f"site {site!r} cannot be pruned; prunable: {list(PRUNABLE_SITES)}")
        lay = neurons.site_layout(layer, site, layer_index)
        units = torch.as_tensor(units, dtype=torch.long, device="cpu")
        if units.numel() and (bool((units[1:] <= units[:-1]).any())
                              or units[0] < 0 or units[-1] >= lay.units):
            raise ValueError(
                f"layer {layer_index}, {site}: kept units must be sorted distinct indices in "
                f"[0, {lay.units}), got {units.tolist()}"
            )
        if site == "ffn_hidden":
            if units.numel() == 0:
                raise ValueError(f"layer {layer_index}: every FFN hidden unit would be removed")
            mlp = layer.mlp
            for name in ("w1", "w3"):
                setattr(mlp, name, _cut(_plain_linear(getattr(mlp, name), f"mlp.{name}",
                                                      layer_index), 0, units))
            mlp.w2 = _cut(_plain_linear(mlp.w2, "mlp.w2", layer_index), 1, units)
            continue
        attn = layer.attn
        groups = check_head_grouping(units, lay.units, lay.num_kv_heads, layer_index)
        rows = _channels(units, lay.group)
        attn.q_proj = _cut(_plain_linear(attn.q_proj, "attn.q_proj", layer_index), 0, rows)
        attn.output_proj = _cut(_plain_linear(attn.output_proj, "attn.output_proj", layer_index),
                                1, rows)
        if groups.numel() < lay.num_kv_heads:
            kv_rows = _channels(groups, lay.group)
            for name in ("k_proj", "v_proj"):
                setattr(attn, name, _cut(_plain_linear(getattr(attn, name), f"attn.{name}",
                                                       layer_index), 0, kv_rows))
        attn.num_heads, attn.num_kv_heads = int(units.numel()), int(groups.numel())


def shrink_model(model: nn.Module, keep: Mapping[str, Sequence[torch.Tensor]]) -> None:
    """``shrink_layer`` on every layer: ``keep[site][i]`` holds layer i's kept units."""
    layers = neurons.find_layers(model)
    for site, per_layer in keep.items():
        if len(per_layer) != len(layers):
            raise ValueError(
                f"keep[{site!r}] has {len(per_layer)} entries for a model of {len(layers)} layers"
            )
    for i, layer in enumerate(layers):
        shrink_layer(layer, {site: per_layer[i] for site, per_layer in keep.items()}, i)


def layer_sizes(model: nn.Module) -> Dict[str, list]:
    """Per-layer sizes: ``{"ffn_hidden": [...], "attn_heads": [...], "attn_kv_heads": [...]}``."""
    heads = neurons.site_layouts(model, "attn_heads")
    return {
        "ffn_hidden": [lay.units for lay in neurons.site_layouts(model, "ffn_hidden")],
        "attn_heads": [lay.units for lay in heads],
        "attn_kv_heads": [lay.num_kv_heads for lay in heads],
    }


def compacted_keep(model: nn.Module, sizes: Mapping[str, Sequence[int]]) -> Dict[str, list]:
    """The ``keep`` that cuts an unpruned ``model`` to the per-layer ``sizes`` of a pruned
    checkpoint (``layer_sizes``'s keys; ``attn_kv_heads`` goes with ``attn_heads``): per layer
    the first ``ffn_hidden[i]`` FFN units, and the first ``attn_heads[i] / attn_kv_heads[i]``
    query heads of each of the first ``attn_kv_heads[i]`` kv groups. Its weights then load the
    checkpoint, whose units were compacted in that order."""
    unknown = set(sizes) - {"ffn_hidden", "attn_heads", "attn_kv_heads"}
    if unknown:
        raise ValueError(f"unknown layer sizes {sorted(unknown)}; give ffn_hidden, attn_heads "
                         "and attn_kv_heads")
    keep: Dict[str, list] = {}
    if sizes.get("ffn_hidden") is not None:
        layouts = neurons.site_layouts(model, "ffn_hidden")
        keep["ffn_hidden"] = [torch.arange(k, device="cpu") for k in _per_layer(
            sizes["ffn_hidden"], [lay.units for lay in layouts], "ffn_hidden")]
    if sizes.get("attn_heads") is not None:
        layouts = neurons.site_layouts(model, "attn_heads")
        heads = _per_layer(sizes["attn_heads"], [lay.units for lay in layouts], "attn_heads")
        kv = sizes.get("attn_kv_heads") or [lay.num_kv_heads for lay in layouts]
        kv = _per_layer(kv, [lay.num_kv_heads for lay in layouts], "attn_kv_heads")
        keep["attn_heads"] = []
        for i, (lay, k, g) in enumerate(zip(layouts, heads, kv)):
            if k % g != 0 or k // g > lay.heads_per_kv:
                raise ValueError(
                    f"layer {i}: {k} query heads over {g} kv heads is not a grouped-query layout "
                    f"of the base model ({lay.units} heads, {lay.num_kv_heads} kv heads)"
                )
            keep["attn_heads"].append(torch.tensor(
                [q * lay.heads_per_kv + j for q in range(g) for j in range(k // g)],
                dtype=torch.long, device="cpu"))
    return keep


def _per_layer(sizes: Sequence[int], units: Sequence[int], site: str) -> list:
    sizes = list(sizes)
    if len(sizes) != len(units):
        raise ValueError(f"{site}: {len(sizes)} sizes for a model of {len(units)} layers")
    for i, (k, n) in enumerate(zip(sizes, units)):
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
            raise ValueError(f"{site} size of layer {i} must be an integer in [1, {n}], got {k!r}")
    return sizes
