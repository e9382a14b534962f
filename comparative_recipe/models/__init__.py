"""Model builders and checkpoints used by comparative_recipe."""

from comparative_recipe.models.gguf import gguf_to_hf
from comparative_recipe.models.smollm2 import smollm2, smollm2_135m

from comparative_recipe.models.tiny import (
    init_tiny_llama,
    init_tiny_llama_checkpoint,
    tiny_llama,
    tiny_llama_hf_checkpointer,
    tiny_llama_hf_config,
)

__all__ = [
    "gguf_to_hf",
    "smollm2",
    "smollm2_135m",
    "init_tiny_llama",
    "init_tiny_llama_checkpoint",
    "tiny_llama",
    "tiny_llama_hf_checkpointer",
    "tiny_llama_hf_config",
]
