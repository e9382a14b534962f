"""Hidden-unit ablation ("CmpDrop") for torchtune decoders, with nested per-row masks.

The sites (``ffn_hidden``, ``attn_heads``, ``attn_out``, ``ffn_out``: where they are and how many
units each layer has) are those of ``comparative_recipe.neurons``. Masks are applied by forward
(pre-)hooks, so the model's modules and state_dict keys are untouched.

Every mask value is a pure function of (seed, step, sample id, site, layer, unit[, token key]): a
32-bit hash word h, read as the uniform u = (h + 2**31) / 2**32; a row of drop power ``i`` keeps a
unit iff u >= p_i = 1 - (1 - p)^i. Masks are therefore nested across powers (the same u against a
growing threshold), and a sample gets the same mask in any batch row, on any rank. The words are
built from small factors: per (sample, step) in ``MaskKeys.row_keys``, per (seed, site, layer) and
per unit in buffers the install puts on each hooked module, per token key; only the last cheap
round (``keys.pair_mix32``) runs over every element of the mask, in int32, and in eager mode in
chunks of ``ELEMENT_CHUNK`` elements: an element mask takes memory and time proportional to the
mask itself (a few int32 passes over cache-sized chunks; under torch.compile, one fused kernel).

The keys of the rows of a forward are made current with
``with hidden_ablation_keys(MaskKeys(...)):``; with no keys (or all powers 0) the hooks do nothing.
Everything the hooks read is a tensor (the keys, the modules' buffers) or the same for every
layer, so under ``torch.compile`` all layers and steps share compiled code.

Explicit, not silent: ``check_hidden_ablation(model)`` (cheap, for every step) raises when the
ablation is not installed or activation checkpointing cannot carry the masks, and a
``hidden_ablation_keys`` block with drop power > 0 in which no hook ran raises on exit.

Activation checkpointing recomputes a layer's forward during backward, possibly after the current
keys changed (several passes run forward before one backward) and possibly on another thread, so
the hooks would read the wrong keys and silently produce a wrong gradient. This module's
``set_activation_checkpointing`` therefore gives the checkpoint a ``context_fn`` that captures the
keys current at forward time and re-installs exactly those keys around the recompute; any other
checkpoint's recompute makes the hooks raise (in eager mode).
"""

import functools
import threading
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    CheckpointWrapper,
    checkpoint_wrapper,
)
from torchtune import training as tt_training

from comparative_recipe import checks, neurons
from comparative_recipe.ablation import keys as _keys

SITES = neurons.SITES
GRANULARITIES = ("unit", "element")
find_layers = neurons.find_layers
apply_unit_mask = neurons.mask_units

# Second key of every hidden-mask hash (crop orders use stream 2).
HIDDEN_MASK_STREAM = 1

# Elements per chunk of an eager element mask: int32 temporaries of 1 MiB stay in cache on CPU.
# On other devices chunks only bound the temporaries.
ELEMENT_CHUNK = {"cpu": 1 << 18}
_DEFAULT_ELEMENT_CHUNK = 1 << 24


@dataclass
class HiddenAblationConfig:
    """How hidden units are ablated.

    Args:
        rate: base drop rate p in [0, 1); drop power i uses p_i = 1 - (1 - p)^i.
        sites: which of ``SITES`` to ablate, on every layer (a list from YAML is accepted).
        granularity: "unit" (one mask per sample and unit, the same at every token: a true
            sub-network) or "element" (per token and unit, like dropout).
        scale: multiply kept units by 1 / (1 - p_i) (inverted dropout scaling).
        seed: user seed, the first key of every mask value.
    """

    rate: float = 0.1
    sites: Tuple[str, ...] = ("ffn_hidden", "attn_heads")
    granularity: str = "unit"
    scale: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        self.rate = checks.rate(self.rate, "ablation.hidden.rate")
        sites = (self.sites,) if isinstance(self.sites, str) else tuple(self.sites)
        for s in sites:
            checks.choice(s, SITES, "ablation.hidden.sites")
        if len(set(sites)) != len(sites):
            raise ValueError(f"ablation.hidden.sites must not repeat, got {list(sites)}")
        self.sites = sites
        checks.choice(self.granularity, GRANULARITIES, "ablation.hidden.granularity")
        if not isinstance(self.scale, bool):
            raise ValueError(f"ablation.hidden.scale must be true or false, got {self.scale!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"ablation.seed must be an integer, got {self.seed!r}")


@dataclass(eq=False)
class MaskKeys:
    """The rows of one forward, as far as hidden masks are concerned. Treat as immutable.

    Args:
        sample_ids: LongTensor [R], the dataset index of each row's sample.
        powers: LongTensor [R], each row's drop power (0 = full model, no ablation).
        step: training step (a key of every mask value).
        token_keys: optional LongTensor [R, S], each token's original position in its sample, so
            that a token kept by an input crop gets the same element mask as before cropping.
            Only used by granularity "element"; None means ``arange(S)`` for every row.

    Derived on construction (on ``sample_ids``' device): ``row_keys`` int32 [R], the hash of
    (step, sample id); ``token_words`` int32 [R, S] or None; ``active``, whether any row is
    ablated (so that hooks never sync with the device).
    """

    sample_ids: torch.Tensor
    powers: torch.Tensor
    step: int
    token_keys: Optional[torch.Tensor] = None
    row_keys: torch.Tensor = field(init=False, repr=False)
    token_words: Optional[torch.Tensor] = field(init=False, repr=False)
    active: bool = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.sample_ids = torch.as_tensor(self.sample_ids, dtype=torch.long)
        device = self.sample_ids.device
        self.powers = torch.as_tensor(self.powers, dtype=torch.long, device=device)
        if self.sample_ids.dim() != 1 or self.powers.shape != self.sample_ids.shape:
            raise ValueError(
                "MaskKeys.sample_ids and .powers must both have shape [R], got "
                f"{tuple(self.sample_ids.shape)} and {tuple(self.powers.shape)}"
            )
        if bool((self.powers < 0).any()):
            raise ValueError(f"MaskKeys.powers must be >= 0, got {self.powers.tolist()}")
        self.token_words = None
        if self.token_keys is not None:
            self.token_keys = torch.as_tensor(self.token_keys, dtype=torch.long, device=device)
            if self.token_keys.dim() != 2 or self.token_keys.shape[0] != len(self.sample_ids):
                raise ValueError(
                    f"MaskKeys.token_keys must have shape [R={len(self.sample_ids)}, S], "
                    f"got {tuple(self.token_keys.shape)}"
                )
            self.token_words = _keys.to_int32(self.token_keys)
        if isinstance(self.step, bool) or not isinstance(self.step, (int, torch.Tensor)):
            raise ValueError(f"MaskKeys.step must be an integer, got {self.step!r}")
        self.step = int(self.step)
        self.row_keys = _keys.hash32(self.step, self.sample_ids, device=device)
        self.active = bool((self.powers != 0).any())

    def __len__(self) -> int:
        return len(self.sample_ids)


# ----------------------------------------------------------------------------------------------
# Pure mask math
# ----------------------------------------------------------------------------------------------


def nested_rate(
    p: float, power: Union[int, torch.Tensor], dtype: torch.dtype = torch.float32
) -> Union[float, torch.Tensor]:
    """Drop rate of drop power ``i``: p_i = 1 - (1 - p)^i (0 for i = 0).

    ``power`` is an int (returns a float) or an integer tensor of any shape (returns ``dtype``,
    float32 by default, of the same shape).
    """
    if isinstance(power, torch.Tensor):
        return 1.0 - torch.pow(1.0 - p, power.to(dtype))
    return 1.0 - (1.0 - p) ** power


def nested_unit_masks(u: torch.Tensor, rates: torch.Tensor, scale: bool = True) -> torch.Tensor:
    """Keep masks from uniforms: ``(u >= rate) * (1 / (1 - rate) if scale else 1)``.

    The rule the hooks apply (they compare the hash words with integer thresholds, which is
    the same comparison for u from ``site_uniforms`` and float64 rates).

    Args:
        u: uniforms in [0, 1), shape [R, ...].
        rates: drop rate of each row, shape [R], each in [0, 1].
        scale: apply the inverted-dropout scale.

    Returns:
        Mask of u's shape and dtype; a row with rate 0 is exactly all ones.
    """
    rates = rates.to(device=u.device, dtype=u.dtype).reshape((-1,) + (1,) * (u.dim() - 1))
    keep = u >= rates
    value = 1.0 / (1.0 - rates) if scale else torch.ones_like(rates)
    # where() rather than keep * value: a rate that rounds to 1.0 gives value inf and keep all
    # False, and 0 * inf would be NaN.
    return torch.where(keep, value, torch.zeros_like(value))


def layer_key(seed: int, site: str, layer_index: int) -> int:
    """The hash word of (seed, stream, site, layer): the first factor of a site's masks."""
    return int(_keys.hash32(seed, HIDDEN_MASK_STREAM, SITES.index(site), layer_index))


def unit_keys(key: int, units: int, device: Union[torch.device, str, None] = None) -> torch.Tensor:
    """int32 [units]: the per-unit factor of the masks of the layer and site with ``key``."""
    return _keys.hash32(key, torch.arange(units, device=device), device=device)


def _row_thresholds(
    cfg: HiddenAblationConfig, powers: torch.Tensor, dtype: torch.dtype
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(threshold int32 [R], kept value ``dtype`` [R]): keep iff word >= threshold.

    u >= p  <=>  h + 2**31 >= ceil(p * 2**32)  (h an integer), computed exactly in float64; a
    rate so close to 1 that no word passes gets value 0 (every unit dropped).
    """
    rates = nested_rate(cfg.rate, powers, dtype=torch.float64)
    thr = torch.ceil(rates * 2.0**32).to(torch.int64) - 2**31
    dead = thr > 2**31 - 1
    value = 1.0 / (1.0 - rates) if cfg.scale else torch.ones_like(rates)
    value = torch.where(dead, torch.zeros_like(value), value)
    return thr.clamp(max=2**31 - 1).to(torch.int32), value.to(dtype)


def _token_words(keys: MaskKeys, seq_len: int, device: torch.device) -> torch.Tensor:
    if keys.token_words is None:
        return torch.arange(seq_len, device=device, dtype=torch.int32).expand(len(keys), seq_len)
    if keys.token_words.shape[1] != seq_len:
        raise ValueError(
            f"MaskKeys.token_keys has {keys.token_words.shape[1]} columns but the activation "
            f"has sequence length {seq_len}"
        )
    return keys.token_words.to(device)


def _element_mask_chunked(
    a: torch.Tensor, b: torch.Tensor, thr: torch.Tensor, value: torch.Tensor
) -> torch.Tensor:
    """``where(pair_mix32(a[:, None], b) >= thr[:, None], value[:, None], 0)`` for a [N], b [U]
    (int32), thr [N], value [N], chunked along N: temporaries of ``ELEMENT_CHUNK`` elements."""
    n, units = a.shape[0], b.shape[0]
    out = torch.empty(n, units, dtype=value.dtype, device=a.device)
    chunk = ELEMENT_CHUNK.get(a.device.type, _DEFAULT_ELEMENT_CHUNK)
    rows = max(1, min(n, chunk // max(units, 1)))
    h_buf = torch.empty(rows, units, dtype=torch.int32, device=a.device)
    t_buf = torch.empty_like(h_buf)
    zero = torch.zeros((), dtype=value.dtype, device=a.device)
    # The operations of keys.pair_mix32, in place.
    for i in range(0, n, rows):
        j = min(n, i + rows)
        h = torch.bitwise_xor(a[i:j, None], b, out=h_buf[: j - i])
        h.mul_(_keys.MIX_M1)
        t = torch.bitwise_right_shift(h, 16, out=t_buf[: j - i]).bitwise_and_(0xFFFF)
        h.bitwise_xor_(t).mul_(_keys.MIX_M2)
        torch.where(h >= thr[i:j, None], value[i:j, None], zero, out=out[i:j])
    return out


def _mask_from_words(
    cfg: HiddenAblationConfig,
    keys: MaskKeys,
    key: torch.Tensor,
    ukeys: torch.Tensor,
    seq_len: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The mask of one site on one layer from its key words: ``key`` int32 0-d (``layer_key``)
    and ``ukeys`` int32 [U] (``unit_keys``). Returns [R, 1, U] or [R, seq_len, U] in ``dtype``."""
    device = ukeys.device
    thr, value = _row_thresholds(cfg, keys.powers.to(device), dtype)
    a = _keys.combine32(key, keys.row_keys.to(device))  # [R]
    if cfg.granularity == "unit":
        h = _keys.pair_mix32(a[:, None], ukeys[None, :])
        return torch.where(h >= thr[:, None], value[:, None], torch.zeros_like(value)[:, None])[
            :, None, :
        ]
    rows = len(keys)
    a = _keys.combine32(a[:, None], _token_words(keys, seq_len, device))  # [R, S]
    if torch.compiler.is_compiling():
        # compiled: one fused kernel, no temporaries
        h = _keys.pair_mix32(a[..., None], ukeys)
        zero = torch.zeros_like(value)
        return torch.where(h >= thr[:, None, None], value[:, None, None], zero[:, None, None])
    thr = thr[:, None].expand(rows, seq_len).reshape(-1)
    value = value[:, None].expand(rows, seq_len).reshape(-1)
    return _element_mask_chunked(a.reshape(-1), ukeys, thr, value).view(rows, seq_len, -1)


def site_words(
    seed: int,
    keys: MaskKeys,
    site: str,
    layer_index: int,
    units: int,
    seq_len: Optional[int] = None,
    device: Union[torch.device, str, None] = None,
) -> torch.Tensor:
    """The hash words behind one site's masks on one layer: int32 [R, 1, units] (seq_len None,
    unit granularity) or [R, seq_len, units] (element granularity)."""
    device = keys.sample_ids.device if device is None else torch.device(device)
    key = _keys.to_int32(layer_key(seed, site, layer_index), device)
    ukeys = unit_keys(int(key), units, device)
    a = _keys.combine32(key, keys.row_keys.to(device))
    if seq_len is None:
        return _keys.pair_mix32(a[:, None], ukeys)[:, None, :]
    a = _keys.combine32(a[:, None], _token_words(keys, seq_len, device))
    return _keys.pair_mix32(a[..., None], ukeys)


def site_uniforms(
    seed: int,
    keys: MaskKeys,
    site: str,
    layer_index: int,
    units: int,
    seq_len: Optional[int] = None,
    device: Union[torch.device, str, None] = None,
) -> torch.Tensor:
    """The uniforms u = (h + 2**31) / 2**32 of ``site_words`` (float64, exact), same shapes."""
    h = site_words(seed, keys, site, layer_index, units, seq_len, device)
    return (h.to(torch.float64) + 2.0**31) / 2.0**32


def site_mask(
    cfg: HiddenAblationConfig,
    keys: MaskKeys,
    site: str,
    layer_index: int,
    units: int,
    seq_len: int,
    device: Union[torch.device, str, None] = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The mask a hook multiplies into one site of one layer.

    Returns:
        [R, 1, units] for granularity "unit", [R, seq_len, units] for "element"; rows of drop
        power 0 are exactly ones. For "attn_heads" ``units`` is the number of heads.
    """
    checks.choice(site, SITES, "hidden ablation site")
    device = keys.sample_ids.device if device is None else torch.device(device)
    key = layer_key(cfg.seed, site, layer_index)
    ukeys = unit_keys(key, units, device)
    return _mask_from_words(cfg, keys, _keys.to_int32(key, device), ukeys, seq_len, dtype)


# ----------------------------------------------------------------------------------------------
# Current keys
# ----------------------------------------------------------------------------------------------


class _Current(threading.local):
    """Per-thread current scope. A thread-local (not a ContextVar): torch.compile traces its
    reads, so the hooks need no graph break."""

    scope: Optional["_KeysScope"] = None


_CURRENT = _Current()

_NO_HOOK_RAN = (
    "rows with hidden-unit drop power > 0 were current (hidden_ablation_keys), but no "
    "hidden-ablation hook ran inside the block: the model has no hidden ablation installed, so "
    "the pass computed the full model. Call "
    "comparative_recipe.ablation.hidden.install_hidden_ablation(model, cfg) on the model first, "
    "or run no pass with drop power > 0 (ablation.n_hidden: 0)"
)


class _KeysScope:
    """Context manager making ``keys`` current; re-enterable (a checkpoint may recompute twice).

    ``recompute``: installed by this module's checkpoint context around a recompute. Other
    scopes are strict: leaving one whose keys are active and that no hook read raises.
    """

    def __init__(self, keys: Optional[MaskKeys], recompute: bool = False) -> None:
        if keys is not None and not isinstance(keys, MaskKeys):
            raise TypeError(f"expected MaskKeys or None, got {type(keys).__name__}")
        self.keys = keys
        self.recompute = recompute
        self.used = False
        self._previous: List[Optional[_KeysScope]] = []

    def __enter__(self) -> Optional[MaskKeys]:
        self._previous.append(_CURRENT.scope)
        _CURRENT.scope = self
        return self.keys

    def __exit__(self, exc_type, *exc) -> None:
        _CURRENT.scope = self._previous.pop()
        if (
            exc_type is None
            and not self.recompute
            and self.keys is not None
            and self.keys.active
            and not self.used
        ):
            raise ValueError(_NO_HOOK_RAN)


def hidden_ablation_keys(keys: Optional[MaskKeys]) -> _KeysScope:
    """``with hidden_ablation_keys(keys):`` makes ``keys`` current for the forwards inside (None:
    no ablation); the previous keys are restored on exit.

    Raises (on exit): ValueError if a row has drop power > 0 and no hidden-ablation hook read
    the keys in the block (the model has no ablation installed: the forward was the full model).
    """
    return _KeysScope(keys)


def current_hidden_ablation_keys() -> Optional[MaskKeys]:
    """The keys the hooks would use now (None outside any ``hidden_ablation_keys``)."""
    scope = _CURRENT.scope
    return None if scope is None else scope.keys


# ----------------------------------------------------------------------------------------------
# Hooks
# ----------------------------------------------------------------------------------------------

_INSTALLED_ATTR = "_comparative_hidden_ablation"

_NOT_INSTALLED = (
    "hidden-unit ablation is not installed on this model, so a pass with drop power > 0 would "
    "silently compute the full model: call "
    "comparative_recipe.ablation.hidden.install_hidden_ablation(model, cfg) once the model is "
    "built (after activation checkpointing, sharding and loading the weights), or set "
    "ablation.n_hidden: 0 so that no pass masks hidden units"
)

_FOREIGN_RECOMPUTE = (
    "a hidden-ablation hook ran in an activation-checkpointing recompute during backward that "
    "does not carry the forward's mask keys, so the recompute would use other masks (a wrong "
    "gradient, or torch's 'A different number of tensors was saved' error). The model was "
    "checkpointed with another checkpoint context (e.g. torchtune.training."
    "set_activation_checkpointing): apply comparative_recipe.ablation.hidden."
    "set_activation_checkpointing(model, auto_wrap_policy) instead (before or after "
    "install_hidden_ablation)"
)


def _foreign_wrappers_message(names: List[str]) -> str:
    return (
        f"activation checkpointing was applied to this model in a way that cannot carry the "
        f"hidden-ablation masks: {', '.join(repr(n) for n in names[:4])}"
        f"{' and others' if len(names) > 4 else ''} "
        f"{'is a CheckpointWrapper' if len(names) == 1 else 'are CheckpointWrappers'} without "
        "this module's checkpoint context (e.g. from torchtune.training."
        "set_activation_checkpointing), so the recompute during backward would use other masks "
        "(a wrong gradient, or torch's 'A different number of tensors was saved' error). Apply "
        "comparative_recipe.ablation.hidden.set_activation_checkpointing(model, auto_wrap_policy) "
        "instead (before or after install_hidden_ablation)"
    )


def _key_buffer(site: str) -> str:
    return f"_hidden_ablation_{site}_key"


def _units_buffer(site: str) -> str:
    return f"_hidden_ablation_{site}_units"


class _SiteMasker:
    """The hook of one site, shared by every layer (``neurons.attach``): reads the current keys
    and the module's key buffers, returns the masked activation."""

    def __init__(self, cfg: HiddenAblationConfig, site: str) -> None:
        self.cfg = cfg
        self.site = site
        self.grouped = site == "attn_heads"
        self.key_name = _key_buffer(site)
        self.units_name = _units_buffer(site)

    def __call__(self, module: nn.Module, x: torch.Tensor) -> Optional[torch.Tensor]:
        scope = _CURRENT.scope
        if not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1:
            # a forward during backward: only this module's checkpoint recompute is expected
            if scope is None or not scope.recompute:
                raise ValueError(_FOREIGN_RECOMPUTE)
        if scope is None:
            return None
        keys = scope.keys
        if keys is None or not keys.active:
            return None
        scope.used = True
        if x.dim() != 3:
            raise ValueError(
                f"hidden ablation expects [batch, seq, features] activations at {self.site}, "
                f"got shape {tuple(x.shape)}"
            )
        if x.shape[0] != len(keys):
            raise ValueError(
                f"hidden ablation: the activation at {self.site} has batch size {x.shape[0]} "
                f"but the current MaskKeys describe {len(keys)} rows"
            )
        ukeys = getattr(module, self.units_name)
        units, width = ukeys.shape[0], x.shape[-1]
        if width % units != 0 or (not self.grouped and width != units):
            raise ValueError(
                f"hidden ablation: the activation at {self.site} has {width} features, which "
                f"does not fit the site's {units} units"
            )
        mask = _mask_from_words(
            self.cfg, keys, getattr(module, self.key_name), ukeys, x.shape[1], x.dtype
        )
        return neurons.mask_units(x, mask, width // units)


def _module_device(module: nn.Module, layer: nn.Module) -> torch.device:
    for source in (module, layer):
        for t in list(source.parameters()) + list(source.buffers()):
            return t.device
    return torch.device("cpu")


def _keys_aware(wrapper: CheckpointWrapper) -> bool:
    kw = getattr(wrapper.checkpoint_fn, "keywords", {}) or {}
    return kw.get("context_fn") is _checkpoint_context_fn


def _foreign_wrappers(model: nn.Module) -> List[str]:
    return [
        name or "<model>"
        for name, m in model.named_modules()
        if isinstance(m, CheckpointWrapper) and not _keys_aware(m)
    ]


def _links_to(model: nn.Module, targets: List[nn.Module]) -> Optional[List[tuple]]:
    """The (parent, child name, child) edges from ``model`` down to every target; None if a
    target is no longer inside ``model``."""
    parent: Dict[int, tuple] = {}
    for m in model.modules():
        for name, child in m._modules.items():
            if child is not None:
                parent.setdefault(id(child), (m, name, child))
    edges: Dict[Tuple[int, str], tuple] = {}
    for t in targets:
        node = t
        while node is not model:
            link = parent.get(id(node))
            if link is None:
                return None
            edges[(id(link[0]), link[1])] = link
            node = link[0]
    return list(edges.values())


class HiddenAblationHandle:
    """Returned by ``install_hidden_ablation``; ``remove()`` takes every hook (and key buffer)
    off again. ``layouts``: site -> the ``neurons.SiteLayout`` of every layer."""

    def __init__(
        self,
        model: nn.Module,
        cfg: HiddenAblationConfig,
        layers: List[nn.Module],
        layouts: Dict[str, List[neurons.SiteLayout]],
        hooks: list,
    ) -> None:
        self._model = model
        self.cfg = cfg
        self._layers = layers
        self.layouts = layouts
        self._hooks = hooks
        self.num_layers = len(layers)
        self._links = self._current_links()

    def _current_links(self) -> List[tuple]:
        modules = [lay.module for lays in self.layouts.values() for lay in lays]
        links = _links_to(self._model, modules)
        if links is None:
            raise ValueError(
                "a module that carries hidden-ablation hooks is no longer part of the model "
                "(its layers were replaced after install_hidden_ablation): call remove() on "
                "the handle and install_hidden_ablation again"
            )
        return links

    def verify(self) -> None:
        """Raises ValueError if the ablation can no longer work as installed: hooks removed,
        layers replaced, or an activation-checkpoint wrapper that cannot carry the masks.
        Cheap while the module tree above the hooked modules is unchanged."""
        if not self._hooks:
            raise ValueError(_NOT_INSTALLED)
        for h in self._hooks:
            hooks = h.hooks_dict_ref()
            if hooks is None or h.id not in hooks:
                raise ValueError(
                    "a hidden-ablation hook was removed from its module behind the handle's "
                    "back: call remove() on the handle and install_hidden_ablation again"
                )
        if all(p._modules.get(name) is child for p, name, child in self._links):
            return
        # the tree above the hooked modules changed (e.g. wrapped for checkpointing)
        foreign = _foreign_wrappers(self._model)
        if foreign:
            raise ValueError(_foreign_wrappers_message(foreign))
        layers = find_layers(self._model)
        same = len(layers) == len(self._layers) and all(
            a is b for a, b in zip(layers, self._layers)
        )
        if not same:
            raise ValueError(
                f"the model's transformer layers changed after install_hidden_ablation ("
                f"{len(self._layers)} hooked, {len(layers)} now): call remove() on the handle "
                "and install_hidden_ablation again"
            )
        self._links = self._current_links()

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        for lays in self.layouts.values():
            for lay in lays:
                for name in (_key_buffer(lay.site), _units_buffer(lay.site)):
                    lay.module._buffers.pop(name, None)
        if getattr(self._model, _INSTALLED_ATTR, None) is self:
            delattr(self._model, _INSTALLED_ATTR)


def install_hidden_ablation(
    model: nn.Module, cfg: HiddenAblationConfig, layers: Optional[Sequence[int]] = None
) -> HiddenAblationHandle:
    """Registers mask hooks at ``cfg.sites`` on every transformer layer of ``model``, or only on
    the layers whose indices ``layers`` lists (their masks are those of the all-layer ablation).

    Layers are numbered in ``neurons.find_layers`` order (the layer index is a mask key). Each
    hooked module gets two non-persistent buffers (its layer key and unit keys; not in the
    state_dict), on the device of its weights: install after the weights are materialised.
    Works before or after this module's ``set_activation_checkpointing``.

    Raises:
        ValueError: no layers found, a site's module is missing (e.g. an mlp without ``w2``),
            hooks already installed, weights on the meta device, or the model holds an
            activation-checkpoint wrapper that was not made by this module's
            ``set_activation_checkpointing`` (its recompute would use the wrong masks).
    """
    selected = layers
    if getattr(model, _INSTALLED_ATTR, None) is not None:
        raise ValueError("hidden ablation hooks are already installed on this model")
    foreign = _foreign_wrappers(model)
    if foreign:
        raise ValueError(_foreign_wrappers_message(foreign))
    layers = find_layers(model)
    if not layers:
        raise ValueError(
            "install_hidden_ablation found no transformer layers (modules with .attn and .mlp)"
        )
    if selected is not None:
        selected = sorted(set(selected))
        if not selected or any(not 0 <= i < len(layers) for i in selected):
            raise ValueError(
                f"install_hidden_ablation: layers must be indices in [0, {len(layers)}), got "
                f"{list(selected)}"
            )
    layouts: Dict[str, List[neurons.SiteLayout]] = {}
    hooks: list = []
    try:
        for site in cfg.sites:
            lays = [neurons.site_layout(layer, site, i) for i, layer in enumerate(layers)
                    if selected is None or i in selected]
            layouts[site] = lays
            for lay in lays:
                device = _module_device(lay.module, lay.layer)
                if device.type == "meta":
                    raise ValueError(
                        "install_hidden_ablation needs materialised weights (layer "
                        f"{lay.layer_index} is on the meta device): install after loading them"
                    )
                if _key_buffer(site) in lay.module._buffers:
                    raise ValueError(
                        f"site {site!r}: module {type(lay.module).__name__} serves several layers"
                    )
                key = layer_key(cfg.seed, site, lay.layer_index)
                lay.module.register_buffer(
                    _key_buffer(site), _keys.to_int32(key, device), persistent=False
                )
                lay.module.register_buffer(
                    _units_buffer(site), unit_keys(key, lay.units, device), persistent=False
                )
            hooks += neurons.attach(lays, _SiteMasker(cfg, site))
    except Exception:
        for h in hooks:
            h.remove()
        for lays in layouts.values():
            for lay in lays:
                for name in (_key_buffer(lay.site), _units_buffer(lay.site)):
                    lay.module._buffers.pop(name, None)
        raise
    handle = HiddenAblationHandle(model, cfg, layers, layouts, hooks)
    setattr(model, _INSTALLED_ATTR, handle)
    return handle


def check_hidden_ablation(model: nn.Module) -> HiddenAblationHandle:
    """The check before a step with drop power > 0: returns the model's ablation handle.

    Raises:
        ValueError: the ablation is not installed (every pass would silently be the full model;
            the message says to call ``install_hidden_ablation`` or set ``ablation.n_hidden: 0``),
            or activation checkpointing was applied so that it cannot carry the masks (e.g.
            torchtune's ``set_activation_checkpointing`` after ``install_hidden_ablation``),
            or the hooked layers changed. Costs a few identity checks per hooked module while
            the module tree is unchanged.
    """
    handle = getattr(model, _INSTALLED_ATTR, None)
    if handle is None:
        raise ValueError(_NOT_INSTALLED)
    handle.verify()
    return handle


# ----------------------------------------------------------------------------------------------
# Activation checkpointing
# ----------------------------------------------------------------------------------------------


def _checkpoint_context_fn():
    """Called by torch.utils.checkpoint at forward time: (forward ctx, recompute ctx)."""
    return nullcontext(), _KeysScope(current_hidden_ablation_keys(), recompute=True)


def set_activation_checkpointing(model: nn.Module, auto_wrap_policy) -> None:
    """torchtune's ``training.set_activation_checkpointing`` (non-reentrant), with a checkpoint
    context that re-installs the forward's hidden-ablation keys during the recompute.

    ``auto_wrap_policy`` is as for torchtune: a set of module types, or a callable policy.
    """
    tt_training.set_activation_checkpointing(
        model,
        auto_wrap_policy=auto_wrap_policy,
        checkpoint_wrapper_fn=functools.partial(
            checkpoint_wrapper,
            checkpoint_impl=CheckpointImpl.NO_REENTRANT,
            context_fn=_checkpoint_context_fn,
        ),
    )
