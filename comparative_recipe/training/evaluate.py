"""Validation: the full model's loss and task metric, and each ablation's loss."""

from typing import Callable, Dict, Iterable, Sequence

import torch
from torch import nn
from torchtune import utils

from comparative_recipe.ablation.plan import AblationLevel
from comparative_recipe.loss import ComparativeLoss
from comparative_recipe.passes import comparative_step, metrics_from_sums

# Views and masks of validation batches use this step key, so every validation sees the same
# ablated inputs and the numbers are comparable across a run.
VALIDATION_STEP_KEY = -1
# What validation reports of the step metrics (``metrics_from_sums``), prefixed with ``val_``.
_VALIDATION_METRICS = ("loss_", "accuracy_", "cmp_loss", "violation_rate", "samples")


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[Dict[str, torch.Tensor]],
    *,
    plan: Sequence[AblationLevel],
    task: Callable,
    loss_fn: ComparativeLoss,
    crop_rate: float,
    seed: int,
    pad_id: int,
    device: torch.device,
    reduce_sums: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
) -> Dict[str, float]:
    """Means over all valid validation samples (sample-weighted, as the method's loss).

    Returns ``val_loss_k`` for each pass k (0 = the full model), ``val_cmp_loss``,
    ``val_violation_rate``, ``val_samples`` and, for classification, ``val_accuracy_k``.
    ``reduce_sums`` sums the accumulated vector over ranks in distributed runs.
    """
    was_training = model.training
    model.eval()
    sums, has_accuracy = None, False
    for batch in batches:
        utils.batch_to_device(batch, device)
        res = comparative_step(
            model, batch, plan=plan, task=task, loss_fn=loss_fn, strategy="sequential",
            crop_rate=crop_rate, seed=seed, step=VALIDATION_STEP_KEY, pad_id=pad_id,
            backward=False,
        )
        has_accuracy = res.correct is not None
        sums = res.sums() if sums is None else sums + res.sums()
    model.train(was_training)
    if sums is None:
        raise ValueError("the validation dataset is empty: add samples or remove `validation`")
    sums = reduce_sums(sums)
    metrics = metrics_from_sums(sums, with_accuracy=has_accuracy)
    return {f"val_{k}": v for k, v in metrics.items() if k.startswith(_VALIDATION_METRICS)}
