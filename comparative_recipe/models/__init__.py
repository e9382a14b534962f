"""Model builders, tokenizers and checkpoints used by comparative_recipe.

Model families live in their own modules, named as configs name them
(``comparative_recipe.models.smollm2.smollm2_135m``); they are not re-exported here, where a
function named like its module would hide the module. The GGUF converter is
``comparative_recipe.models.gguf`` (run it with ``python -m``).
"""

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
