"""Training methods: what each brings to the one training loop (``training.trainer``)."""

from comparative_recipe.methods.comparative import ComparativeMethod, ComparativeSettings

__all__ = ["ComparativeMethod", "ComparativeSettings"]
