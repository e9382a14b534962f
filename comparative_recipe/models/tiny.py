"""A tiny Llama 3.2-style model and an HF-format checkpoint of it, for demos and tests.

Nothing is downloaded: the checkpoint is a deterministic random initialisation written on first
use. A config uses the two components together:

    model:
      _component_: comparative_recipe.models.tiny.tiny_llama
      embed_dim: 64
    checkpointer:
      _component_: comparative_recipe.models.tiny.tiny_llama_hf_checkpointer
      checkpoint_dir: /tmp/tiny_llama
      output_dir: /tmp/run
      embed_dim: 64          # the same model settings as in `model`

The checkpoint directory holds `model.safetensors` (HF key names, written by
`torchtune.models.convert_weights.tune_to_hf`) and an HF `config.json`, which is what
`torchtune.training.FullModelHFCheckpointer` reads for model_type LLAMA3_2 (or LLAMA3).
"""

import inspect
import json
from functools import partial
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch
from safetensors.torch import save_file
from torchtune.models.convert_weights import tune_to_hf
from torchtune.models.llama3_2 import llama3_2, lora_llama3_2
from torchtune.modules import TransformerDecoder
from torchtune.training import FullModelHFCheckpointer

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"

# Standard deviation of the re-initialised embedding (and untied output) weights. torch's
# default N(0, 1) embedding, tied to the output layer, starts the loss near 60 instead of ln(V).
EMBEDDING_INIT_STD = 0.02

# Llama3ScaledRoPE settings used by torchtune's llama3_2 builder, recorded in config.json.
_ROPE_SCALE_FACTOR = 32
_ROPE_LOW_FREQ_FACTOR = 1.0
_ROPE_HIGH_FREQ_FACTOR = 4.0
_ROPE_OLD_CONTEXT_LEN = 8192


def tiny_llama(
    vocab_size: int = 512,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    embed_dim: int = 64,
    intermediate_dim: int = 128,
    max_seq_len: int = 1024,
    tie_word_embeddings: bool = True,
    rope_base: int = 500_000,
    norm_eps: float = 1e-5,
    attn_dropout: float = 0.0,
) -> TransformerDecoder:
    """A small Llama 3.2 decoder built by torchtune's `llama3_2` component builder.

    The weights have torch's default initialisation; `init_tiny_llama` gives the initialisation
    that the tiny checkpoints are written with.
    """
    return llama3_2(
        vocab_size=vocab_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        embed_dim=embed_dim,
        max_seq_len=max_seq_len,
        intermediate_dim=intermediate_dim,
        rope_base=rope_base,
        norm_eps=norm_eps,
        attn_dropout=attn_dropout,
        scale_factor=_ROPE_SCALE_FACTOR,
        tie_word_embeddings=tie_word_embeddings,
    )


def tiny_lora_llama(
    lora_attn_modules: List[str],
    apply_lora_to_mlp: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    quantize_base: bool = False,
    vocab_size: int = 512,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    embed_dim: int = 64,
    intermediate_dim: int = 128,
    max_seq_len: int = 1024,
    tie_word_embeddings: bool = True,
    rope_base: int = 500_000,
    norm_eps: float = 1e-5,
    attn_dropout: float = 0.0,
) -> TransformerDecoder:
    """`tiny_llama` with LoRA adapters, built by torchtune's `lora_llama3_2` component builder:
    it loads the same checkpoints (no ``apply_lora_to_output``: torchtune's Llama 3.2 builder
    has none for its tied embeddings). QLoRA (``quantize_base``) needs every quantized weight's
    element count to be a multiple of 16384 (torchao's NF4 blocks), e.g. ``embed_dim: 128``,
    ``num_kv_heads`` = ``num_heads``, ``intermediate_dim: 256``."""
    return lora_llama3_2(
        lora_attn_modules=list(lora_attn_modules),
        apply_lora_to_mlp=apply_lora_to_mlp,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        quantize_base=quantize_base,
        vocab_size=vocab_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        embed_dim=embed_dim,
        max_seq_len=max_seq_len,
        intermediate_dim=intermediate_dim,
        rope_base=rope_base,
        norm_eps=norm_eps,
        attn_dropout=attn_dropout,
        scale_factor=_ROPE_SCALE_FACTOR,
        tie_word_embeddings=tie_word_embeddings,
    )


tiny_qlora_llama = partial(tiny_lora_llama, quantize_base=True)
tiny_qlora_llama.__doc__ = "`tiny_lora_llama` with NF4 base weights (QLoRA)."


def init_tiny_llama(seed: int = 0, **tiny_llama_kwargs: Any) -> TransformerDecoder:
    """A `tiny_llama` with a deterministic initialisation for `seed`.

    Layers keep torch's default initialisation, drawn from a generator seeded with `seed`;
    the token embeddings (and the output layer, when untied) are then redrawn from
    N(0, EMBEDDING_INIT_STD**2), so the initial loss on random tokens is close to ln(vocab).
    The caller's global random state is left unchanged.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = tiny_llama(**tiny_llama_kwargs)
        with torch.no_grad():
            torch.nn.init.normal_(model.tok_embeddings.weight, mean=0.0, std=EMBEDDING_INIT_STD)
            if isinstance(model.output, torch.nn.Linear):
                torch.nn.init.normal_(model.output.weight, mean=0.0, std=EMBEDDING_INIT_STD)
    return model


def tiny_llama_hf_config(seed: int = 0, **tiny_llama_kwargs: Any) -> Dict[str, Any]:
    """The HF `config.json` contents of a tiny Llama checkpoint written with `seed`.

    Besides the standard HF Llama fields it records `tiny_llama_seed`, so that a checkpoint
    written with another seed is not mistaken for this one.
    """
    settings = _tiny_llama_settings(tiny_llama_kwargs)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": settings["vocab_size"],
        "num_hidden_layers": settings["num_layers"],
        "num_attention_heads": settings["num_heads"],
        "num_key_value_heads": settings["num_kv_heads"],
        "hidden_size": settings["embed_dim"],
        "head_dim": settings["embed_dim"] // settings["num_heads"],
        "intermediate_size": settings["intermediate_dim"],
        "max_position_embeddings": settings["max_seq_len"],
        "tie_word_embeddings": settings["tie_word_embeddings"],
        "rope_theta": settings["rope_base"],
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": float(_ROPE_SCALE_FACTOR),
            "low_freq_factor": _ROPE_LOW_FREQ_FACTOR,
            "high_freq_factor": _ROPE_HIGH_FREQ_FACTOR,
            "original_max_position_embeddings": _ROPE_OLD_CONTEXT_LEN,
        },
        "rms_norm_eps": settings["norm_eps"],
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
        "tiny_llama_seed": seed,
    }


def _tiny_llama_settings(tiny_llama_kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """`tiny_llama`'s arguments with defaults filled in; raises TypeError on unknown names."""
    bound = inspect.signature(tiny_llama).bind(**tiny_llama_kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def init_tiny_llama_checkpoint(
    checkpoint_dir: Union[str, Path], *, seed: int = 0, **tiny_llama_kwargs: Any
) -> Path:
    """Write an HF-format checkpoint of `init_tiny_llama(seed, **tiny_llama_kwargs)`.

    The directory gets `model.safetensors` and `config.json`. It is written into a temporary
    directory beside `checkpoint_dir` and moved into place with one rename, so a reader never
    sees half a checkpoint and concurrent writers (e.g. several ranks) are safe.

    If `checkpoint_dir` already holds a checkpoint with the same config (same settings and
    seed), nothing is written.

    Returns:
        The checkpoint directory.

    Raises:
        ValueError: if `checkpoint_dir` exists, is not empty, and does not hold a tiny Llama
            checkpoint with the same config.
    """
    checkpoint_dir = Path(checkpoint_dir)
    config = tiny_llama_hf_config(seed=seed, **tiny_llama_kwargs)
    if _check_existing(checkpoint_dir, config):
        return checkpoint_dir

    model = init_tiny_llama(seed=seed, **tiny_llama_kwargs)
    hf_state_dict = tune_to_hf(
        model.state_dict(),
        num_heads=config["num_attention_heads"],
        num_kv_heads=config["num_key_value_heads"],
        dim=config["hidden_size"],
        head_dim=config["head_dim"],
    )
    hf_state_dict = {k: v.contiguous() for k, v in hf_state_dict.items()}

    checkpoint_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(
        tempfile.mkdtemp(prefix=f".{checkpoint_dir.name}.tmp-", dir=checkpoint_dir.parent)
    )
    try:
        save_file(hf_state_dict, str(tmp_dir / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        try:
            # Renaming onto an empty directory succeeds; onto a non-empty one it fails.
            os.replace(tmp_dir, checkpoint_dir)
        except OSError:
            # Someone else wrote checkpoint_dir meanwhile: accept it only if it is the same.
            if not _check_existing(checkpoint_dir, config):
                raise
    finally:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir, ignore_errors=True)
    return checkpoint_dir


def _check_existing(checkpoint_dir: Path, config: Dict[str, Any]) -> bool:
    """True if `checkpoint_dir` holds the checkpoint `config` describes, False if it is absent
    or an empty directory; raises ValueError otherwise."""
    if not checkpoint_dir.exists():
        return False
    if not checkpoint_dir.is_dir():
        raise ValueError(f"checkpoint_dir {checkpoint_dir} exists and is not a directory")
    if not any(checkpoint_dir.iterdir()):
        return False
    config_path = checkpoint_dir / CONFIG_FILE
    if not config_path.is_file():
        raise ValueError(
            f"{checkpoint_dir} exists and is not empty but has no {CONFIG_FILE}: it is not a "
            "tiny Llama checkpoint. Choose another checkpoint_dir or remove it."
        )
    existing = json.loads(config_path.read_text())
    expected = json.loads(json.dumps(config))
    if existing != expected:
        differences = ", ".join(
            f"{key}: {existing.get(key, '<missing>')!r} (wanted {expected.get(key, '<missing>')!r})"
            for key in sorted(set(existing) | set(expected))
            if existing.get(key, "<missing>") != expected.get(key, "<missing>")
        )
        raise ValueError(
            f"{checkpoint_dir} holds a checkpoint with a different config ({differences}). "
            "Choose another checkpoint_dir, remove it, or use the settings it was written with."
        )
    if not (checkpoint_dir / WEIGHTS_FILE).is_file():
        raise ValueError(f"{checkpoint_dir} has {CONFIG_FILE} but no {WEIGHTS_FILE}")
    return True


def tiny_llama_hf_checkpointer(
    checkpoint_dir: Union[str, Path],
    output_dir: Union[str, Path],
    *,
    checkpoint_files: Optional[List[str]] = None,
    seed: int = 0,
    model_type: str = "LLAMA3_2",
    adapter_checkpoint: Optional[str] = None,
    recipe_checkpoint: Optional[str] = None,
    should_load_recipe_state: bool = False,
    safe_serialization: bool = True,
    **tiny_llama_kwargs: Any,
) -> FullModelHFCheckpointer:
    """A `FullModelHFCheckpointer` on a tiny Llama checkpoint, written first if missing.

    Meant as the `_component_` of a config's `checkpointer:` section. `seed` and
    `tiny_llama_kwargs` go to `init_tiny_llama_checkpoint` and must match the config's model;
    the other arguments go to `FullModelHFCheckpointer`. Without `checkpoint_files` the
    checkpoint is `checkpoint_dir/model.safetensors`, written first if missing; with them (e.g.
    a step checkpoint to resume from) those files are loaded as they are.
    """
    if checkpoint_files is None:
        init_tiny_llama_checkpoint(checkpoint_dir, seed=seed, **tiny_llama_kwargs)
        checkpoint_files = [WEIGHTS_FILE]
    return FullModelHFCheckpointer(
        checkpoint_dir=str(checkpoint_dir),
        checkpoint_files=list(checkpoint_files),
        model_type=model_type,
        output_dir=str(output_dir),
        adapter_checkpoint=adapter_checkpoint,
        recipe_checkpoint=recipe_checkpoint,
        should_load_recipe_state=should_load_recipe_state,
        safe_serialization=safe_serialization,
    )
