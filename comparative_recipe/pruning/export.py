"""Writing a pruned model: weights, its configs and what was removed, as one folder.

``prune.ranking: uniform`` (the same sizes in every layer) gives a standard HF checkpoint,
written by the torchtune checkpointer that loaded the model:

    <prune.output_dir>/model-00001-of-00001.safetensors ...  HF weights
                      config.json            intermediate_size, num_attention_heads,
                                             num_key_value_heads and head_dim updated:
                                             transformers' from_pretrained loads it
                      tokenizer files ...    copied from the input checkpoint
                      torchtune_config.yaml  the run's config with the pruned model
                                             (``comparative_recipe.models.pruned.pruned_model``)
                                             and this folder as checkpointer: ``tune-cmp eval``
                                             and torchtune's recipes load it
                      pruning.json           settings, per-layer sizes, kept units, scores

``prune.ranking: global`` (per-layer sizes) writes the weights in torchtune's format
(``model.safetensors``, torchtune's keys, read by ``torchtune.training.
FullModelTorchTuneCheckpointer``), since HF's Llama/Qwen configs hold one FFN size and one head
count for all layers: torchtune (through ``torchtune_config.yaml``) loads it, transformers does
not. The folder appears complete or not at all.
"""

import datetime
import json
import os
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torchtune import training

from comparative_recipe.pruning.select import achieved_sparsity
from comparative_recipe.pruning.settings import PruneSettings
from comparative_recipe.pruning.structure import layer_sizes
from comparative_recipe.training.checkpointing import CheckpointManager

REPORT_VERSION = 1
CONFIG_FILE = "torchtune_config.yaml"
REPORT_FILE = "pruning.json"
TORCHTUNE_WEIGHTS = "model.safetensors"


def parameter_count(model: nn.Module) -> int:
    """Parameters of ``model``, a tied weight once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _uniform(values: List[int]) -> Optional[int]:
    return values[0] if values and all(v == values[0] for v in values) else None


def hf_config(source: Dict[str, Any], sizes: Dict[str, list], head_dim: int) -> Dict[str, Any]:
    """The HF ``config.json`` of a uniformly pruned model: ``source`` with its sizes updated
    (``head_dim`` explicit, since HF derives it from hidden_size / num_attention_heads)."""
    out = dict(source)
    for key, site in (("intermediate_size", "ffn_hidden"), ("num_attention_heads", "attn_heads"),
                      ("num_key_value_heads", "attn_kv_heads")):
        value = _uniform(sizes[site])
        if value is None:
            raise ValueError(f"{site} differs between layers ({sizes[site]}): an HF config holds "
                             "one size for all layers; write it with prune.ranking=global")
        out[key] = value
    out["head_dim"] = head_dim
    return out


def pruned_config(cfg: DictConfig, sizes: Dict[str, list], checkpointer: Dict[str, Any]) -> str:
    """The run's config (its ``prune`` section left out) with the pruned model and
    ``checkpointer``, as YAML text."""
    data = OmegaConf.to_container(cfg, resolve=True)
    data.pop("prune", None)
    data["model"] = {
        "_component_": "comparative_recipe.models.pruned.pruned_model",
        "base": data["model"], **{k: list(v) for k, v in sizes.items()},
    }
    data["checkpointer"] = checkpointer
    header = ("# The pruned model written by tune-cmp prune: evaluate it with\n"
              "#   tune-cmp eval --config <this file>\n")
    return header + OmegaConf.to_yaml(OmegaConf.create(data))


def _hf_file_names(weight_map: Dict[str, str]) -> List[str]:
    indices = sorted(set(weight_map.values()))
    total = f"{len(indices):05d}"
    return [f"model-{int(i):05d}-of-{total}.safetensors" for i in indices]


def write_pruned(
    model: nn.Module,
    *,
    cfg: DictConfig,
    settings: PruneSettings,
    checkpointer: Any,
    report: Dict[str, Any],
) -> Path:
    """Writes the pruned ``model`` to ``settings.output_dir`` (see the module doc).

    ``checkpointer``: the torchtune checkpointer that loaded the unpruned weights, built with
    ``output_dir=CheckpointManager(cfg.output_dir).staging_dir``; ``report``: pruning.json.
    """
    out = settings.output_dir
    sizes = layer_sizes(model)
    model_type = checkpointer._model_type.name
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    report = {**report, "format": "hf" if settings.ranking == "uniform" else "torchtune",
              "layer_sizes": sizes}
    manager = CheckpointManager(str(cfg.output_dir))
    if settings.ranking == "uniform":
        head_dim = int(state["layers.0.attn.q_proj.weight"].shape[0] // sizes["attn_heads"][0])
        config_json = hf_config(checkpointer._config, sizes, head_dim)
        checkpointer._config = config_json  # the HF conversion permutes q/k per head
        files = _hf_file_names(checkpointer._weight_map)
        ckpt = {"_component_": "torchtune.training.FullModelHFCheckpointer",
                "checkpoint_dir": str(out), "checkpoint_files": files,
                "model_type": model_type, "output_dir": str(cfg.output_dir)}
        manager.checkpointer = checkpointer
        manager.save_model(out, {training.MODEL_KEY: state}, files={
            "config.json": config_json, REPORT_FILE: report,
            CONFIG_FILE: pruned_config(cfg, sizes, ckpt),
        })
        return out
    from safetensors.torch import save_file

    ckpt = {"_component_": "torchtune.training.FullModelTorchTuneCheckpointer",
            "checkpoint_dir": str(out), "checkpoint_files": [TORCHTUNE_WEIGHTS],
            "model_type": model_type, "output_dir": str(cfg.output_dir)}
    tmp = manager.staging_dir / "pruned"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(state, str(tmp / TORCHTUNE_WEIGHTS))
    (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    (tmp / CONFIG_FILE).write_text(pruned_config(cfg, sizes, ckpt))
    for path in tmp.iterdir():
        os.chmod(path, 0o644)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def pruning_report(
    settings: PruneSettings,
    *,
    checkpoint: str,
    units: Dict[str, List[int]],
    kept: Dict[str, List[torch.Tensor]],
    scores: Dict[str, List[torch.Tensor]],
    params_before: int,
    params_after: int,
    samples: Optional[int],
    world_size: int,
) -> Dict[str, Any]:
    """pruning.json: what was scored and how, what each layer kept, and every unit's score."""
    sites = {}
    for site in settings.sites:
        n_kept = [int(k.numel()) for k in kept[site]]
        sites[site] = {
            "sparsity": settings.sparsity[site],
            "achieved_sparsity": achieved_sparsity(kept[site], units[site]),
            "units": list(units[site]), "kept": n_kept,
            "kept_units": [k.tolist() for k in kept[site]],
            "scores": [[float(x) for x in s] for s in scores[site]],
        }
    return {
        "version": REPORT_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "checkpoint": checkpoint,
        "method": settings.method,
        "data": settings.setting if settings.reads_data else None,
        "num_examples": settings.num_examples,
        "samples": samples,
        "reduce": settings.reduce if settings.method == "attribution" else None,
        "positions": settings.positions if settings.reads_data else None,
        "ranking": settings.ranking,
        "seed": settings.seed,
        "world_size": world_size,
        "parameters": {"before": params_before, "after": params_after,
                       "removed_fraction": 1.0 - params_after / params_before},
        "sites": sites,
    }
