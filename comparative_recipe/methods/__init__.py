"""Training methods: what each brings to the one training loop (``training.trainer``).

A recipe config picks one with ``method:`` (default ``comparative``); ``build_method`` builds it.
"""

from omegaconf import DictConfig

from comparative_recipe import checks
from comparative_recipe.methods.baselines import DropoutMethod, RDropMethod
from comparative_recipe.methods.comparative import ComparativeMethod, ComparativeSettings

METHODS = {"comparative": ComparativeMethod, "dropout": DropoutMethod, "rdrop": RDropMethod}


def build_method(cfg: DictConfig):
    """The training method a recipe config names: ``method: comparative`` (the default) |
    ``dropout`` | ``rdrop``, built from the config (every key of its sections checked)."""
    name = checks.choice(cfg.get("method", "comparative"), tuple(METHODS), "method")
    return METHODS[name].from_config(cfg)


__all__ = [
    "ComparativeMethod",
    "ComparativeSettings",
    "DropoutMethod",
    "METHODS",
    "RDropMethod",
    "build_method",
]
