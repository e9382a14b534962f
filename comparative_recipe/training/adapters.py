"""LoRA and QLoRA: how the one training loop prepares a model's parameters for adapter
fine-tuning, whatever the method.

A config asks for adapters through its model builder: any builder with torchtune's LoRA
arguments (``lora_attn_modules``, ``apply_lora_to_mlp``, ``apply_lora_to_output``,
``lora_rank``, ``lora_alpha``, ``lora_dropout``, ``quantize_base``), i.e. torchtune's
``lora_*`` and ``qlora_*`` builders (QLoRA: the base weights in NF4 through torchao, the
adapters in the training dtype). ``LoRAAdapters`` then

- checks those settings before anything runs (``lora_settings``);
- freezes the base: only adapter parameters require gradients, so only they get gradients and
  optimizer state (``freeze_base``);
- gives the adapters' starting weights (``initial_state``): ``lora_b = 0``, ``lora_a`` drawn
  as torchtune draws it (Kaiming uniform). A model built on a device has drawn them in its
  builder with the run's seeded RNG, exactly as torchtune's ``lora_finetune_single_device``
  does; a model built on the meta device (FSDP2) draws them on CPU from ``seed`` in module
  order, so a sharded run starts alike on any number of ranks;
- writes checkpoints as torchtune's LoRA recipes do (``checkpoint_dict``): ``adapter_model.pt``
  (torchtune keys, what a resume reads), ``adapter_model.safetensors`` and
  ``adapter_config.json`` (PEFT's format, loadable with ``PeftModel.from_pretrained`` onto
  the HF base model) and, unless ``save_adapter_weights_only``, the merged weights in HF
  format; plus ``base_model.json``, a fingerprint of the base weights, so that an adapter is
  never put on another base model (``load_adapter``).

The hidden-unit masks need nothing from here: they act on the inputs of the down projection and
of the attention output projection, which a LoRA linear feeds to its base weight and its
adapter alike (``comparative_recipe.neurons``).
"""

import difflib
import hashlib
import inspect
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torchtune import training
from torchtune.modules.peft import get_adapter_params, get_lora_module_names, set_trainable_params

from comparative_recipe import checks
from comparative_recipe._torchtune_compat import component

LORA_ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "output_proj")
# HF / PEFT names of torchtune's projections, for the hint of a mistaken name
_HF_NAMES = {"o_proj": "output_proj", "gate_proj": "apply_lora_to_mlp",
             "up_proj": "apply_lora_to_mlp", "down_proj": "apply_lora_to_mlp"}
# What torchtune's checkpointer names the adapter files it writes.
ADAPTER_WEIGHTS_FILE = "adapter_model.pt"
ADAPTER_FILES = ("adapter_model.pt", "adapter_model.safetensors", "adapter_model.bin",
                 "adapter_config.json")
BASE_MODEL_FILE = "base_model.json"
# Elements sampled from each base tensor for its fingerprint.
_FINGERPRINT_SAMPLES = 64


@dataclass(frozen=True)
class LoRASettings:
    """The LoRA arguments of a model builder, checked.

    rank, alpha: the adapters' rank r and scale numerator (updates are ``alpha / r * B A x``);
    attn_modules: the attention projections with adapters; apply_to_mlp, apply_to_output: the
    FFN's three linears, the output projection; dropout: LoRA dropout on the adapters' input;
    quantize_base: QLoRA (base weights of the adapted linears, and the other FFN/attention
    linears, in NF4).
    """

    rank: int
    alpha: float
    attn_modules: Tuple[str, ...]
    apply_to_mlp: bool
    apply_to_output: bool
    dropout: float
    quantize_base: bool

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def target_modules(self) -> List[str]:
        """torchtune's module names with adapters (``q_proj``, ..., ``w1``, ``output``)."""
        return get_lora_module_names(list(self.attn_modules), self.apply_to_mlp,
                                     self.apply_to_output)

    def adapter_config(self) -> Dict[str, Any]:
        """The adapter config torchtune's checkpointer turns into PEFT's adapter_config.json."""
        return {"r": self.rank, "lora_alpha": self.alpha, "lora_dropout": self.dropout,
                "target_modules": self.target_modules, "peft_type": "LORA"}


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)


def lora_settings(cfg_model: Mapping) -> Optional[LoRASettings]:
    """The checked LoRA settings of a ``model`` config section, None when its builder has no
    LoRA arguments. Unset arguments take the builder's defaults; an argument the builder does
    not take, a rank below 1, an unknown projection or DoRA is an error naming the key."""
    model = _plain(cfg_model)
    path = model.pop("_component_", None)
    if path is None:
        return None  # no builder: instantiating the model reports it
    builder = component(path)
    try:
        params = inspect.signature(builder).parameters
    except (TypeError, ValueError):
        return None
    if "lora_attn_modules" not in params:
        return None
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    unknown = [k for k in model if k not in params]
    if unknown and not takes_any:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, list(params), n=1)
            hints.append(f"model.{k}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ValueError(
            f"{', '.join(hints)} {'is not an argument' if len(hints) == 1 else 'are not arguments'}"
            f" of {path}, whose arguments are {sorted(params)}"
            + (". Models with tied embeddings have no apply_lora_to_output: the output "
               "projection is the embedding" if "apply_lora_to_output" in unknown else "")
        )

    def arg(name: str, default: Any = None) -> Any:
        if name in model:
            return model[name]
        p = params.get(name)
        return default if p is None or p.default is p.empty else p.default

    if "lora_attn_modules" not in model:
        raise ValueError(
            "model.lora_attn_modules is not set: the attention projections that get adapters, "
            f"a list of {list(LORA_ATTN_MODULES)} (may be [] with apply_lora_to_mlp: True)"
        )
    modules = model["lora_attn_modules"]
    if isinstance(modules, str) or not isinstance(modules, (list, tuple)):
        raise ValueError(f"model.lora_attn_modules must be a list of projection names, got {modules!r}")
    for name in modules:
        if name not in LORA_ATTN_MODULES:
            close = ([_HF_NAMES[name]] if name in _HF_NAMES
                     else difflib.get_close_matches(str(name), LORA_ATTN_MODULES, n=1))
            raise ValueError(
                f"model.lora_attn_modules has an unknown projection {name!r}"
                + (f" (did you mean {close[0]!r}?)" if close else "")
                + f"; the attention projections are {list(LORA_ATTN_MODULES)} (the FFN's "
                "linears get adapters with apply_lora_to_mlp: True)"
            )
    if len(set(modules)) != len(modules):
        raise ValueError(f"model.lora_attn_modules names a projection twice: {list(modules)}")
    if arg("use_dora", False):
        raise ValueError(
            "model.use_dora: DoRA is not supported by these recipes (its magnitude vectors are "
            "initialised from the loaded base weights, which the sharded loading here does not "
            "do); set use_dora: False for LoRA"
        )
    settings = LoRASettings(
        rank=checks.positive_int(arg("lora_rank"), "model.lora_rank"),
        alpha=checks.finite_number(arg("lora_alpha"), "model.lora_alpha"),
        attn_modules=tuple(modules),
        apply_to_mlp=bool(arg("apply_lora_to_mlp", False)),
        apply_to_output=bool(arg("apply_lora_to_output", False)),
        dropout=checks.rate(arg("lora_dropout", 0.0), "model.lora_dropout"),
        quantize_base=bool(arg("quantize_base", False)),
    )
    if not settings.target_modules:
        raise ValueError(
            "the LoRA model has no adapter: set model.lora_attn_modules (e.g. [q_proj, v_proj]), "
            "apply_lora_to_mlp: True or apply_lora_to_output: True"
        )
    return settings


def base_fingerprint(state_dict: Mapping[str, torch.Tensor]) -> str:
    """A hash of a base model's weights: names, shapes, dtypes and a strided sample of every
    tensor's values (cheap on an 8B model, different for two fine-tunes of one architecture)."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name]
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // _FINGERPRINT_SAMPLES)
        sample = flat[::step][:_FINGERPRINT_SAMPLES].to("cpu", torch.float32)
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()


def merge_lora_weights(state_dict: Mapping[str, torch.Tensor], scale: float) -> Dict[str, torch.Tensor]:
    """The plain model's weights with every adapter folded in: ``W + scale * B @ A`` for each
    ``<module>.lora_a.weight`` / ``lora_b.weight`` pair, which are dropped. Computed in fp32 and
    cast to the adapters' (training) dtype, which QLoRA's dequantised W may not have; a new
    dict, the input is not modified (its tensors may be the live model's)."""
    merged = {k: v for k, v in state_dict.items() if ".lora_" not in k}
    prefixes = {k[: -len(".lora_a.weight")] for k in state_dict if k.endswith(".lora_a.weight")}
    for prefix in sorted(prefixes):
        a_dtype = state_dict[f"{prefix}.lora_a.weight"].dtype
        a = state_dict[f"{prefix}.lora_a.weight"].float()
        b = state_dict[f"{prefix}.lora_b.weight"].float()
        w = state_dict[f"{prefix}.weight"]
        merged[f"{prefix}.weight"] = (w.float().cpu() + scale * (b @ a).cpu()).to(a_dtype)
    return merged


def adapter_files_in(directory: Path) -> List[str]:
    """The adapter files torchtune's checkpointer wrote in ``directory``."""
    return [name for name in ADAPTER_FILES if (Path(directory) / name).is_file()]


class LoRAAdapters:
    """Adapter fine-tuning of the model a config builds (see the module doc).

    Build with ``LoRAAdapters.from_config(cfg)`` (None for a plain builder); the trainer calls
    ``freeze_base`` on the built model, loads ``initial_state`` or ``load_adapter``'s weights
    with the base, and saves ``checkpoint_dict``'s output with ``files``.
    """

    def __init__(self, settings: LoRASettings, save_adapter_weights_only: bool = False) -> None:
        self.settings = settings
        self.save_adapter_weights_only = save_adapter_weights_only
        self.adapter_names: List[str] = []
        self.fingerprint: Optional[str] = None
        self.model_type: Optional[str] = None

    @classmethod
    def from_config(cls, cfg: DictConfig) -> Optional["LoRAAdapters"]:
        settings = lora_settings(cfg.model)
        only = cfg.get("save_adapter_weights_only", None)
        if settings is None:
            if only is not None:
                raise ValueError(
                    f"save_adapter_weights_only is set but {cfg.model._component_} is not a LoRA "
                    "builder, so there is no adapter and the key would be ignored: remove it, or "
                    "use a lora_* / qlora_* builder"
                )
            return None
        if only is not None and not isinstance(only, bool):
            raise ValueError(f"save_adapter_weights_only must be true or false, got {only!r}")
        adapters = cls(settings, bool(only))
        adapters.model_type = cfg.checkpointer.get("model_type", None)
        return adapters

    def describe(self) -> str:
        s = self.settings
        return (f"{'QLoRA (NF4 base)' if s.quantize_base else 'LoRA'} rank {s.rank}, alpha "
                f"{s.alpha:g}, on {', '.join(s.target_modules)}")

    # ------------------------------------------------------------------------- the model

    def freeze_base(self, model: nn.Module) -> int:
        """Only adapter parameters require gradients; call before wrapping (activation
        checkpointing, FSDP). Returns the number of trainable parameters."""
        params = get_adapter_params(model)
        if not params:
            raise ValueError(f"{type(model).__name__} has no LoRA adapter parameters")
        set_trainable_params(model, params)
        self.adapter_names = sorted(params)
        return sum(p.numel() for p in params.values())

    def initial_state(self, model: nn.Module, seed: int) -> Dict[str, torch.Tensor]:
        """The adapters' starting weights, unsharded, keyed as in the model's state dict: the
        builder's own draw for a model on a real device, else (meta) lora_a Kaiming-uniform
        from ``seed`` on CPU in module order and lora_b zero."""
        generator = torch.Generator().manual_seed(seed)
        params = dict(model.named_parameters())
        state = {}
        for name in self.adapter_names:
            p = params[name]
            if not p.is_meta:
                state[name] = p.detach()
            elif name.endswith("lora_a.weight"):
                w = torch.empty(p.shape, dtype=p.dtype)
                nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=generator)
                state[name] = w
            elif name.endswith("lora_b.weight"):
                state[name] = torch.zeros(p.shape, dtype=p.dtype)
            else:
                raise ValueError(f"no initialisation for adapter parameter {name}")
        return state

    def check_state(self, model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
        """``state`` holds exactly this model's adapters, with their shapes."""
        params = dict(model.named_parameters())
        expected = {n: tuple(params[n].shape) for n in self.adapter_names}
        got = {n: tuple(t.shape) for n, t in state.items()}
        if got == expected:
            return
        missing = sorted(set(expected) - set(got))
        extra = sorted(set(got) - set(expected))
        shapes = [f"{n}: {got[n]} != {expected[n]}" for n in sorted(set(got) & set(expected))
                  if got[n] != expected[n]]
        details = "; ".join(filter(None, [
            f"missing {missing[:4]}{' ...' if len(missing) > 4 else ''}" if missing else "",
            f"unexpected {extra[:4]}{' ...' if len(extra) > 4 else ''}" if extra else "",
            f"shapes {shapes[:4]}" if shapes else "",
        ]))
        raise ValueError(
            f"the adapter in {source} does not fit this model ({details}): it was trained on "
            "another base model or with other LoRA settings (lora_rank, lora_attn_modules, "
            f"apply_lora_to_mlp/output); this config has {self.describe()}"
        )

    # ---------------------------------------------------------------------- checkpoints

    def set_base(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Records the fingerprint of the base weights the adapters sit on."""
        self.fingerprint = base_fingerprint(state_dict)

    def files(self) -> Dict[str, Dict[str, Any]]:
        """JSON files written into every checkpoint beside the adapter."""
        return {BASE_MODEL_FILE: {"fingerprint": self.fingerprint, "model_type": self.model_type,
                                  "adapter": self.describe()}}

    def load_adapter(self, directory: Path) -> Dict[str, torch.Tensor]:
        """The torchtune-format adapter weights of a checkpoint directory, after checking that
        they were trained on the base model loaded (``set_base`` first)."""
        directory = Path(directory)
        weights = directory / ADAPTER_WEIGHTS_FILE
        if not weights.is_file():
            present = adapter_files_in(directory) if directory.is_dir() else []
            raise FileNotFoundError(
                f"{directory} holds no {ADAPTER_WEIGHTS_FILE} (the adapter weights the LoRA "
                f"recipes write; found {present or 'no adapter files'}): give a checkpoint "
                "directory of a LoRA run, <output_dir>/best or <output_dir>/checkpoints/step_<N>"
            )
        info_path = directory / BASE_MODEL_FILE
        if info_path.is_file():
            recorded = json.loads(info_path.read_text()).get("fingerprint")
            if self.fingerprint is not None and recorded != self.fingerprint:
                raise ValueError(
                    f"the adapter in {directory} was trained on another base model: the base "
                    f"weights loaded from checkpointer.checkpoint_dir differ from those it was "
                    f"trained on ({BASE_MODEL_FILE} fingerprint {recorded[:12]}..., these weights "
                    f"{self.fingerprint[:12]}...). Set checkpointer.checkpoint_dir to the base "
                    "model of that run"
                )
        return torch.load(weights, map_location="cpu", weights_only=True)

    def checkpoint_dict(self, model_state: Mapping[str, torch.Tensor]) -> Dict[str, Any]:
        """torchtune's checkpoint dict of a LoRA save: the adapter, its PEFT config and, unless
        ``save_adapter_weights_only``, the merged weights (``model_state``: the full state
        dict, or only the adapters when saving adapter weights only)."""
        adapter = {k: v for k, v in model_state.items() if k in self.adapter_names}
        out = {training.ADAPTER_KEY: adapter,
               training.ADAPTER_CONFIG: self.settings.adapter_config()}
        if not self.save_adapter_weights_only:
            out[training.MODEL_KEY] = merge_lora_weights(model_state, self.settings.scale)
        return out
