"""Hidden-unit ablation ("CmpDrop") for torchtune decoders, with nested per-row masks.

Sites (per transformer layer):
- ``ffn_hidden``: input of the FFN down projection ``mlp.w2``; one unit per hidden channel.
- ``attn_heads``: input of the attention output projection ``attn.output_proj``; one unit per query
  head (the head's ``head_dim`` channels share its mask).
- ``attn_out``: the attention branch added to the residual (output of ``attn``, or of ``sa_scale``
  when the layer has a real one, e.g. gemma2's post-attention norm); units = embed dim.
- ``ffn_out``: the FFN branch added to the residual (output of ``mlp`` or of a real ``mlp_scale``).

Masks are applied by forward (pre-)hooks, so the model's modules and state_dict keys are untouched.
Every mask value is a pure function of (seed, step, sample id, site, layer, unit[, token key]) via
the counter-based hash in ``keys.py``; a row of drop power ``i`` keeps a unit iff its uniform
``u >= p_i = 1 - (1 - p)^i``, so masks are nested across powers and a sample gets the same mask in
any batch row, on any rank. The keys of the rows of a forward are made current with
``with hidden_ablation_keys(MaskKeys(...)):``; with no keys (or all powers 0) the hooks do nothing.

Activation checkpointing recomputes a layer's forward during backward, possibly after the current
keys changed (several passes run forward before one backward) and possibly on another thread, so
the hooks would read the wrong keys and silently produce a wrong gradient. This module's
``set_activation_checkpointing`` therefore gives the checkpoint a ``context_fn`` that captures the
keys current at forward time and re-installs exactly those keys around the recompute.
"""

import contextvars
import functools
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    CheckpointWrapper,
    checkpoint_wrapper,
)
from torchtune import training as tt_training

from comparative_recipe.ablation import keys as _keys

SITES = ("ffn_hidden", "attn_heads", "attn_out", "ffn_out")
GRANULARITIES = ("unit", "element")

# Second key of every hidden-mask uniform (see docs/CONTRACT.md, "Randomness").
HIDDEN_MASK_STREAM = 1


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
        if isinstance(self.rate, bool) or not isinstance(self.rate, (int, float)):
            raise ValueError(f"hidden ablation rate must be a number in [0, 1), got {self.rate!r}")
        self.rate = float(self.rate)
        if not 0.0 <= self.rate < 1.0:
            raise ValueError(f"hidden ablation rate must be in [0, 1), got {self.rate}")
        sites = (self.sites,) if isinstance(self.sites, str) else tuple(self.sites)
        unknown = [s for s in sites if s not in SITES]
        if unknown:
            raise ValueError(f"unknown hidden ablation site(s) {unknown}; valid sites: {SITES}")
        if len(set(sites)) != len(sites):
            raise ValueError(f"hidden ablation sites must not repeat, got {sites}")
        self.sites = sites
        if self.granularity not in GRANULARITIES:
            raise ValueError(
                f"unknown hidden ablation granularity {self.granularity!r}; "
                f"valid: {GRANULARITIES}"
            )
        self.scale = bool(self.scale)
        self.seed = int(self.seed)


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
    """

    sample_ids: torch.Tensor
    powers: torch.Tensor
    step: int
    token_keys: Optional[torch.Tensor] = None
    # Whether any row is ablated; computed once here so hooks never sync with the device.
    active: bool = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.sample_ids = torch.as_tensor(self.sample_ids, dtype=torch.long)
        self.powers = torch.as_tensor(self.powers, dtype=torch.long, device=self.sample_ids.device)
        if self.sample_ids.dim() != 1 or self.powers.shape != self.sample_ids.shape:
            raise ValueError(
                "MaskKeys.sample_ids and .powers must both have shape [R], got "
                f"{tuple(self.sample_ids.shape)} and {tuple(self.powers.shape)}"
            )
        if bool((self.powers < 0).any()):
            raise ValueError(f"MaskKeys.powers must be >= 0, got {self.powers.tolist()}")
        if self.token_keys is not None:
            self.token_keys = torch.as_tensor(
                self.token_keys, dtype=torch.long, device=self.sample_ids.device
            )
            if self.token_keys.dim() != 2 or self.token_keys.shape[0] != len(self.sample_ids):
                raise ValueError(
                    f"MaskKeys.token_keys must have shape [R={len(self.sample_ids)}, S], "
                    f"got {tuple(self.token_keys.shape)}"
                )
        self.step = int(self.step)
        self.active = bool((self.powers != 0).any())

    def __len__(self) -> int:
        return len(self.sample_ids)


# ----------------------------------------------------------------------------------------------
# Pure mask math
# ----------------------------------------------------------------------------------------------


def nested_rate(
    p: float, power: Union[int, torch.Tensor]
) -> Union[float, torch.Tensor]:
    """Drop rate of drop power ``i``: p_i = 1 - (1 - p)^i (0 for i = 0).

    ``power`` is an int (returns a float) or an integer tensor of any shape (returns float32 of
    the same shape).
    """
    if isinstance(power, torch.Tensor):
        return 1.0 - torch.pow(1.0 - p, power.to(torch.float32))
    return 1.0 - (1.0 - p) ** power


def nested_unit_masks(u: torch.Tensor, rates: torch.Tensor, scale: bool = True) -> torch.Tensor:
    """Keep masks from uniforms: ``(u >= rate) * (1 / (1 - rate) if scale else 1)``.

    Args:
        u: uniforms in [0, 1), shape [R, ...].
        rates: drop rate of each row, shape [R], each in [0, 1).
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


def site_uniforms(
    seed: int,
    keys: MaskKeys,
    site: str,
    layer_index: int,
    units: int,
    seq_len: Optional[int] = None,
    device: Union[torch.device, str, None] = None,
) -> torch.Tensor:
    """The uniforms behind one site's masks on one layer.

    Args:
        seed: user seed. keys: the rows. site: one of ``SITES``. layer_index: layer number.
        units: number of units at the site (heads for "attn_heads").
        seq_len: None for unit granularity; S for element granularity (token keys from
            ``keys.token_keys``, which must then have S columns, or ``arange(S)``).
        device: where to compute (default: the device of ``keys.sample_ids``).

    Returns:
        float32 [R, 1, units] (unit granularity) or [R, S, units] (element granularity).
    """
    device = keys.sample_ids.device if device is None else torch.device(device)
    site_index = SITES.index(site)
    sample_ids = keys.sample_ids.to(device)
    unit_ids = torch.arange(units, device=device)
    if seq_len is None:
        u = _keys.uniform(
            seed, HIDDEN_MASK_STREAM, keys.step, sample_ids[:, None], site_index, layer_index,
            unit_ids[None, :], device=device,
        )
        return u[:, None, :]
    if keys.token_keys is None:
        token_keys = torch.arange(seq_len, device=device)[None, :].expand(len(keys), seq_len)
    else:
        if keys.token_keys.shape[1] != seq_len:
            raise ValueError(
                f"MaskKeys.token_keys has {keys.token_keys.shape[1]} columns but the activation "
                f"has sequence length {seq_len}"
            )
        token_keys = keys.token_keys.to(device)
    return _keys.uniform(
        seed, HIDDEN_MASK_STREAM, keys.step, sample_ids[:, None, None], site_index, layer_index,
        unit_ids[None, None, :], token_keys[:, :, None], device=device,
    )


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
    element = cfg.granularity == "element"
    u = site_uniforms(
        cfg.seed, keys, site, layer_index, units, seq_len if element else None, device
    )
    rates = nested_rate(cfg.rate, keys.powers.to(u.device))
    # The comparison happens in float32: in bf16 the uniforms would collapse onto few values.
    return nested_unit_masks(u, rates, cfg.scale).to(dtype)


def apply_unit_mask(x: torch.Tensor, mask: torch.Tensor, group: int = 1) -> torch.Tensor:
    """Multiplies ``x`` [R, S, U * group] by ``mask`` [R, 1 or S, U]; ``group`` consecutive
    channels (a head's head_dim) share one unit's mask value. Returns x's shape."""
    if group == 1:
        return x * mask
    return (x.unflatten(-1, (-1, group)) * mask[..., None]).flatten(-2)


# ----------------------------------------------------------------------------------------------
# Current keys
# ----------------------------------------------------------------------------------------------

_CURRENT_KEYS: contextvars.ContextVar[Optional[MaskKeys]] = contextvars.ContextVar(
    "comparative_hidden_ablation_keys", default=None
)


class _KeysScope:
    """Context manager making ``keys`` current; re-enterable (a checkpoint may recompute twice)."""

    def __init__(self, keys: Optional[MaskKeys]) -> None:
        if keys is not None and not isinstance(keys, MaskKeys):
            raise TypeError(f"expected MaskKeys or None, got {type(keys).__name__}")
        self.keys = keys
        self._tokens: List[contextvars.Token] = []

    def __enter__(self) -> Optional[MaskKeys]:
        self._tokens.append(_CURRENT_KEYS.set(self.keys))
        return self.keys

    def __exit__(self, *exc) -> None:
        _CURRENT_KEYS.reset(self._tokens.pop())


def hidden_ablation_keys(keys: Optional[MaskKeys]) -> _KeysScope:
    """``with hidden_ablation_keys(keys):`` makes ``keys`` current for the forwards inside (None:
    no ablation); the previous keys are restored on exit."""
    return _KeysScope(keys)


def current_hidden_ablation_keys() -> Optional[MaskKeys]:
    """The keys the hooks would use now (None outside any ``hidden_ablation_keys``)."""
    return _CURRENT_KEYS.get()


# ----------------------------------------------------------------------------------------------
# Hooks
# ----------------------------------------------------------------------------------------------


class HiddenAblationHandle:
    """Returned by ``install_hidden_ablation``; ``remove()`` takes every hook off again."""

    def __init__(self, model: nn.Module, hooks: list, num_layers: int) -> None:
        self._model = model
        self._hooks = hooks
        self.num_layers = num_layers

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if getattr(self._model, _INSTALLED_ATTR, None) is self:
            delattr(self._model, _INSTALLED_ATTR)


_INSTALLED_ATTR = "_comparative_hidden_ablation"


def find_layers(model: nn.Module) -> List[nn.Module]:
    """Transformer layers of ``model`` in module order: modules with direct children ``attn``
    and ``mlp``. Looks through activation-checkpoint wrappers (which only hold the layer)."""
    return [
        m for m in model.modules() if "attn" in m._modules and "mlp" in m._modules
    ]


def _branch_output_module(layer: nn.Module, branch: str, scale_names: Sequence[str]) -> nn.Module:
    # The branch added to the residual is scale(branch(...)); gemma2 uses a real norm as scale,
    # after which a mask must be applied or the norm would undo it.
    for name in scale_names:
        mod = layer._modules.get(name)
        if mod is not None and not isinstance(mod, nn.Identity):
            return mod
    return layer._modules[branch]


def _make_hook(
    cfg: HiddenAblationConfig, site: str, layer_index: int, num_heads: Optional[int], pre: bool
) -> Callable:
    def masked(x: torch.Tensor) -> Optional[torch.Tensor]:
        keys = _CURRENT_KEYS.get()
        if keys is None or not keys.active or cfg.rate == 0.0:
            return None
        if x.dim() != 3:
            raise ValueError(
                f"hidden ablation expects [batch, seq, features] activations at {site}, "
                f"got shape {tuple(x.shape)}"
            )
        assert x.shape[0] == len(keys), (
            f"hidden ablation: the activation at {site} (layer {layer_index}) has batch size "
            f"{x.shape[0]} but the current MaskKeys describe {len(keys)} rows"
        )
        group = 1
        units = x.shape[-1]
        if num_heads is not None:
            if units % num_heads != 0:
                raise ValueError(
                    f"attn_heads: output_proj input width {units} is not a multiple of "
                    f"num_heads={num_heads}"
                )
            group, units = units // num_heads, num_heads
        mask = site_mask(cfg, keys, site, layer_index, units, x.shape[1], x.device, x.dtype)
        return apply_unit_mask(x, mask, group)

    if pre:
        def pre_hook(module, args):
            out = masked(args[0])
            return None if out is None else (out,) + tuple(args[1:])
        return pre_hook

    def hook(module, args, output):
        return masked(output)
    return hook


def _keys_aware(wrapper: CheckpointWrapper) -> bool:
    kw = getattr(wrapper.checkpoint_fn, "keywords", {}) or {}
    return kw.get("context_fn") is _checkpoint_context_fn


def install_hidden_ablation(model: nn.Module, cfg: HiddenAblationConfig) -> HiddenAblationHandle:
    """Registers mask hooks at ``cfg.sites`` on every transformer layer of ``model``.

    Layers are numbered in module order (the layer index is a mask key). Works before or after
    this module's ``set_activation_checkpointing``.

    Raises:
        ValueError: no layers found, a site's module is missing (e.g. an mlp without ``w2``),
            hooks already installed, or the model holds an activation-checkpoint wrapper that was
            not made by this module's ``set_activation_checkpointing`` (its recompute would use
            the wrong masks).
    """
    if getattr(model, _INSTALLED_ATTR, None) is not None:
        raise ValueError("hidden ablation hooks are already installed on this model")
    for m in model.modules():
        if isinstance(m, CheckpointWrapper) and not _keys_aware(m):
            raise ValueError(
                "the model is wrapped for activation checkpointing without the hidden-ablation "
                "context; apply comparative_recipe.ablation.hidden.set_activation_checkpointing "
                "instead of torchtune.training.set_activation_checkpointing"
            )
    layers = find_layers(model)
    if not layers:
        raise ValueError(
            "install_hidden_ablation found no transformer layers (modules with .attn and .mlp)"
        )
    hooks = []
    try:
        for li, layer in enumerate(layers):
            for site in cfg.sites:
                if site == "ffn_hidden":
                    w2 = getattr(layer.mlp, "w2", None)
                    if not isinstance(w2, nn.Module):
                        raise ValueError(
                            f"site 'ffn_hidden' needs layer.mlp.w2 (the down projection); layer "
                            f"{li}'s mlp is a {type(layer.mlp).__name__} without it"
                        )
                    hook = _make_hook(cfg, site, li, None, True)
                    hooks.append(w2.register_forward_pre_hook(hook))
                elif site == "attn_heads":
                    proj = getattr(layer.attn, "output_proj", None)
                    num_heads = getattr(layer.attn, "num_heads", None)
                    if not isinstance(proj, nn.Module) or not isinstance(num_heads, int):
                        raise ValueError(
                            f"site 'attn_heads' needs layer.attn.output_proj and .num_heads; "
                            f"layer {li}'s attn is a {type(layer.attn).__name__} without them"
                        )
                    hooks.append(
                        proj.register_forward_pre_hook(_make_hook(cfg, site, li, num_heads, True))
                    )
                elif site == "attn_out":
                    mod = _branch_output_module(layer, "attn", ("sa_scale", "ca_scale"))
                    hooks.append(mod.register_forward_hook(_make_hook(cfg, site, li, None, False)))
                else:  # ffn_out
                    mod = _branch_output_module(layer, "mlp", ("mlp_scale",))
                    hooks.append(mod.register_forward_hook(_make_hook(cfg, site, li, None, False)))
    except Exception:
        for h in hooks:
            h.remove()
        raise
    handle = HiddenAblationHandle(model, hooks, len(layers))
    setattr(model, _INSTALLED_ATTR, handle)
    return handle


# ----------------------------------------------------------------------------------------------
# Activation checkpointing
# ----------------------------------------------------------------------------------------------


def _checkpoint_context_fn():
    """Called by torch.utils.checkpoint at forward time: (forward ctx, recompute ctx)."""
    return nullcontext(), _KeysScope(_CURRENT_KEYS.get())


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
