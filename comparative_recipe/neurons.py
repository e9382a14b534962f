"""The neuron sites of a torchtune ``TransformerDecoder``, defined once.

The units that the comparative loss masks are the units that attribution scores, pruning removes
and analysis plots. A site is an activation of every transformer layer whose last dimension holds
``units * group`` channels, ``group`` consecutive channels per unit:

- ``ffn_hidden``: the FFN hidden channels, the input of the down projection ``mlp.w2``; units =
  w2's input features, group 1.
- ``attn_heads``: the query heads, the input of ``attn.output_proj``; units = ``attn.num_heads``,
  group = ``attn.head_dim``.
- ``attn_out``: the attention branch added to the residual, the output of ``sa_scale`` (or
  ``ca_scale``) when that is a real module (gemma2's post-attention norm), else of ``attn``;
  units = output_proj's output features (the residual width), group 1.
- ``ffn_out``: the FFN branch added to the residual, the output of ``mlp_scale`` when real, else
  of ``mlp``; units = the residual width, group 1.

Query heads are grouped by key/value head: ``heads_per_kv = num_heads // num_kv_heads``
consecutive query heads share one kv head (head ``h`` reads kv head ``h // heads_per_kv``, as
torchtune's ``MultiHeadAttention`` expands k and v).

Layers are the modules with direct children ``attn`` and ``mlp`` (``TransformerSelfAttentionLayer``
and ``TransformerCrossAttentionLayer``), in module order; activation-checkpoint wrappers, FSDP2 and
``torch.compile`` keep them as (possibly wrapped) submodules, so they are found through those.

Masking: ``mask_units(x, mask, group)`` multiplies [R, S, units * group] by [R, 1 | S, units].
Reading: ``register_site_hook`` and ``capture_site_activations`` hand the activation as
[R, S, units, group]. ``attach`` is the primitive both (and the hidden-unit ablation) use.
"""

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from comparative_recipe import checks

# The position of a site in this tuple is a key of its hidden masks: append new sites only.
SITES = ("ffn_hidden", "attn_heads", "attn_out", "ffn_out")
INPUT, OUTPUT = "input", "output"


@dataclass(frozen=True, eq=False)
class SiteLayout:
    """One site on one layer.

    Args:
        site: one of ``SITES``. layer_index: the layer's position in ``find_layers`` order.
        layer: the transformer layer. module: the module whose input (``side`` "input") or output
            ("output") is the site's activation, of width ``units * group``.
        units: units of the site on this layer. group: channels per unit (head_dim for
            "attn_heads", else 1).
        num_kv_heads: "attn_heads" only: the number of key/value heads.
    """

    site: str
    layer_index: int
    layer: nn.Module
    module: nn.Module
    side: str
    units: int
    group: int = 1
    num_kv_heads: Optional[int] = None

    @property
    def width(self) -> int:
        """Channels of the activation: ``units * group``."""
        return self.units * self.group

    @property
    def heads_per_kv(self) -> Optional[int]:
        """"attn_heads" only: query heads sharing one kv head (``num_heads // num_kv_heads``)."""
        if self.num_kv_heads is None:
            return None
        return self.units // self.num_kv_heads

    def kv_head_index(self) -> torch.Tensor:
        """"attn_heads" only: LongTensor [units], the kv head each query head reads."""
        if self.num_kv_heads is None:
            raise ValueError(f"site {self.site!r} has no kv heads (only 'attn_heads' has)")
        return torch.arange(self.units) // self.heads_per_kv


def find_layers(model: nn.Module) -> List[nn.Module]:
    """Transformer layers of ``model`` in module order: modules with direct children ``attn``
    and ``mlp`` (found through activation-checkpoint wrappers, FSDP2 and torch.compile)."""
    return [m for m in model.modules() if "attn" in m._modules and "mlp" in m._modules]


def _linear_dims(module: nn.Module) -> Optional[Tuple[int, int]]:
    """(input, output) features of a linear layer: ``nn.Linear`` (and its quantised
    subclasses) or torchtune's LoRA/DoRA linears; None for anything else."""
    for names in (("in_features", "out_features"), ("in_dim", "out_dim")):
        dims = tuple(getattr(module, n, None) for n in names)
        if all(isinstance(d, int) for d in dims):
            return dims
    return None


def _real_module(layer: nn.Module, names: Sequence[str]) -> Optional[nn.Module]:
    for name in names:
        mod = layer._modules.get(name)
        if mod is not None and not isinstance(mod, nn.Identity):
            return mod
    return None


def _missing(site: str, layer_index: int, what: str, owner: nn.Module) -> ValueError:
    return ValueError(
        f"site {site!r} needs {what}; layer {layer_index}'s "
        f"{type(owner).__name__} does not have it"
    )


def _residual_width(layer: nn.Module, site: str, layer_index: int) -> int:
    proj = getattr(layer.attn, "output_proj", None)
    dims = _linear_dims(proj) if isinstance(proj, nn.Module) else None
    if dims is None:
        raise _missing(site, layer_index, "layer.attn.output_proj (a linear layer)", layer.attn)
    return dims[1]


def site_layout(layer: nn.Module, site: str, layer_index: int = 0) -> SiteLayout:
    """Where ``site`` is on ``layer`` and how many units it has there.

    Raises:
        ValueError: unknown site, or the layer lacks the module the site needs (e.g. an mlp
            without ``w2``); the message names what is missing.
    """
    checks.choice(site, SITES, "neuron site")
    if "attn" not in layer._modules or "mlp" not in layer._modules:
        raise ValueError(
            f"layer {layer_index} ({type(layer).__name__}) is not a transformer layer: it has no "
            "direct children attn and mlp"
        )
    attn, mlp = layer.attn, layer.mlp
    if site == "ffn_hidden":
        w2 = getattr(mlp, "w2", None)
        dims = _linear_dims(w2) if isinstance(w2, nn.Module) else None
        if dims is None:
            raise _missing(site, layer_index, "layer.mlp.w2 (the down projection)", mlp)
        return SiteLayout(site, layer_index, layer, w2, INPUT, dims[0])
    if site == "attn_heads":
        proj = getattr(attn, "output_proj", None)
        heads, kv = getattr(attn, "num_heads", None), getattr(attn, "num_kv_heads", None)
        head_dim = getattr(attn, "head_dim", None)
        dims = _linear_dims(proj) if isinstance(proj, nn.Module) else None
        if dims is None or not all(isinstance(v, int) for v in (heads, kv, head_dim)):
            raise _missing(
                site, layer_index,
                "layer.attn.output_proj (a linear layer) and .num_heads, .num_kv_heads, .head_dim",
                attn,
            )
        if dims[0] != heads * head_dim or heads % kv != 0:
            raise ValueError(
                f"site 'attn_heads' on layer {layer_index}: output_proj takes {dims[0]} features "
                f"but num_heads * head_dim = {heads} * {head_dim}, num_kv_heads = {kv}"
            )
        return SiteLayout(site, layer_index, layer, proj, INPUT, heads, head_dim, kv)
    width = _residual_width(layer, site, layer_index)
    if site == "attn_out":
        module = _real_module(layer, ("sa_scale", "ca_scale")) or attn
    else:
        module = _real_module(layer, ("mlp_scale",)) or mlp
    return SiteLayout(site, layer_index, layer, module, OUTPUT, width)


def site_layouts(model: nn.Module, site: str) -> List[SiteLayout]:
    """``site_layout`` of every layer of ``model`` (``find_layers`` order)."""
    layers = find_layers(model)
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no transformer layers (modules with .attn and .mlp)"
        )
    return [site_layout(layer, site, i) for i, layer in enumerate(layers)]


def unit_counts(model: nn.Module, sites: Sequence[str] = SITES) -> Dict[str, List[int]]:
    """Units per layer of each site: ``{site: [units of layer 0, layer 1, ...]}``."""
    return {site: [lay.units for lay in site_layouts(model, site)] for site in sites}


def mask_units(x: torch.Tensor, mask: torch.Tensor, group: int = 1) -> torch.Tensor:
    """Multiplies ``x`` [R, S, U * group] by ``mask`` [R, 1 or S, U]; ``group`` consecutive
    channels (a head's head_dim) share one unit's mask value. Returns x's shape."""
    if group == 1:
        return x * mask
    return (x.unflatten(-1, (-1, group)) * mask[..., None]).flatten(-2)


class _InputHook:
    def __init__(self, fn: Callable) -> None:
        self.fn = fn

    def __call__(self, module: nn.Module, args: tuple):
        out = self.fn(module, args[0])
        return None if out is None else (out,) + tuple(args[1:])


class _OutputHook:
    def __init__(self, fn: Callable) -> None:
        self.fn = fn

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor):
        return self.fn(module, output)


def attach(
    layouts: Sequence[SiteLayout], fn: Callable, *, prepend: bool = False
) -> List[RemovableHandle]:
    """Registers ``fn(module, x)`` at every layout (all of one site): ``x`` is the site's
    activation [..., units * group], the module's first input or its output; a tensor returned
    replaces it, None leaves it. One hook object serves every layout, so torch.compile traces
    it once for all layers (per-layer data belong in the module's buffers). ``prepend`` runs it
    before the module's other hooks of that side."""
    sides = {lay.side for lay in layouts}
    if len(sides) > 1:
        raise ValueError(f"attach takes layouts of one site, got sides {sorted(sides)}")
    if not layouts:
        return []
    if sides == {INPUT}:
        hook = _InputHook(fn)
        return [lay.module.register_forward_pre_hook(hook, prepend=prepend) for lay in layouts]
    hook = _OutputHook(fn)
    return [lay.module.register_forward_hook(hook, prepend=prepend) for lay in layouts]


class SiteHookHandle:
    """Returned by ``register_site_hook``; ``remove()`` takes its hooks off."""

    def __init__(self, handles: List[RemovableHandle], layouts: List[SiteLayout]) -> None:
        self._handles = handles
        self.layouts = layouts

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def register_site_hook(
    model: nn.Module,
    site: str,
    fn: Callable[[SiteLayout, torch.Tensor], Optional[torch.Tensor]],
    *,
    prepend: bool = False,
) -> SiteHookHandle:
    """Calls ``fn(layout, acts)`` whenever a layer computes ``site``; ``acts`` is the activation
    viewed per unit, [R, S, units, group] (a view: detach or clone it to keep it). A tensor of
    that shape returned replaces the activation.

    The hook runs after the module's hooks registered earlier (e.g. the hidden-unit ablation's
    masks, so ``acts`` is masked); ``prepend=True`` runs it first (the unmasked activation).
    Meant for eager analysis; under torch.compile ``fn`` is traced once per layer.
    """
    layouts = site_layouts(model, site)
    by_module = {id(lay.module): lay for lay in layouts}
    if len(by_module) != len(layouts):
        raise ValueError(f"site {site!r}: one module serves several layers")

    def call(module: nn.Module, x: torch.Tensor) -> Optional[torch.Tensor]:
        lay = by_module[id(module)]
        if x.shape[-1] != lay.width:
            raise ValueError(
                f"site {site!r} on layer {lay.layer_index}: activation of shape "
                f"{tuple(x.shape)}, expected last dimension units * group = {lay.width}"
            )
        out = fn(lay, x.unflatten(-1, (lay.units, lay.group)))
        if out is None:
            return None
        if out.shape[-2:] != (lay.units, lay.group):
            raise ValueError(
                f"register_site_hook: fn returned shape {tuple(out.shape)} for site {site!r}, "
                f"expected [..., {lay.units}, {lay.group}]"
            )
        return out.flatten(-2)

    return SiteHookHandle(attach(layouts, call, prepend=prepend), layouts)


@contextmanager
def capture_site_activations(
    model: nn.Module, site: str, *, prepend: bool = False
) -> Iterator[Dict[int, List[torch.Tensor]]]:
    """``with capture_site_activations(model, site) as acts: model(tokens)`` records, for every
    layer index, one detached tensor [R, S, units, group] per forward (see
    ``register_site_hook`` for ``prepend``). Hooks are removed on exit."""
    acts: Dict[int, List[torch.Tensor]] = {}

    def record(lay: SiteLayout, x: torch.Tensor) -> None:
        acts.setdefault(lay.layer_index, []).append(x.detach().clone())

    handle = register_site_hook(model, site, record, prepend=prepend)
    try:
        yield acts
    finally:
        handle.remove()
