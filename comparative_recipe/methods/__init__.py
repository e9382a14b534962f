"""Training methods: what each brings to the one training loop (``training.trainer``).

A recipe config picks one with ``method:`` (default ``comparative``); ``build_method`` builds it.
"""

from omegaconf import DictConfig

from comparative_recipe import checks
from comparative_recipe.methods.baselines import DropoutMethod, RDropMethod
from comparative_recipe.methods.comparative import ComparativeMethod, ComparativeSettings
from comparative_recipe.methods.early_exit import EarlyExitMethod

METHODS = {"comparative": ComparativeMethod, "dropout": DropoutMethod, "rdrop": RDropMethod,
           "early_exit": EarlyExitMethod}


def build_method(cfg: DictConfig, default: str = "comparative"):
    """The training method a recipe config names: ``method: comparative`` (the default) |
    ``dropout`` | ``rdrop`` | ``early_exit``, built from the config (every key of its sections
    checked); ``default``: the method of a config without ``method:``."""
    name = checks.choice(cfg.get("method", default), tuple(METHODS), "method")
    return METHODS[name].from_config(cfg)


__all__ = [
    "ComparativeMethod",
    "ComparativeSettings",
    "DropoutMethod",
    "EarlyExitMethod",
    "METHODS",
    "RDropMethod",
    "build_method",
]
