"""Model builders and checkpoints used by comparative_recipe."""

from comparative_recipe.models.tiny import (
    init_tiny_llama,
    init_tiny_llama_checkpoint,
    tiny_llama,
    tiny_llama_hf_checkpointer,
    tiny_llama_hf_config,
)

__all__ = [
    "init_tiny_llama",
    "init_tiny_llama_checkpoint",
    "tiny_llama",
    "tiny_llama_hf_checkpointer",
    "tiny_llama_hf_config",
]
