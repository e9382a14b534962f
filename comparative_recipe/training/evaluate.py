"""Validation: the full model's loss and task metric, and each ablation's loss."""

from typing import Callable, Dict, Iterable, Sequence

import torch
from torch import nn
from torchtune import utils

from comparative_recipe.ablation.plan import AblationLevel
from comparative_recipe.loss import ComparativeLoss, violation_rate
from comparative_recipe.passes import comparative_step

# Views and masks of validation batches use this step key, so every validation sees the same
# ablated inputs and the numbers are comparable across a run.
VALIDATION_STEP_KEY = -1


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
    n_pass = len(plan) + 1
    # [losses per pass | accuracy per pass | cmp loss | violation rate | samples]
    sums = torch.zeros(2 * n_pass + 3, dtype=torch.float64, device=device)
    has_accuracy = False
    for batch in batches:
        utils.batch_to_device(batch, device)
        res = comparative_step(
            model, batch, plan=plan, task=task, loss_fn=loss_fn, strategy="sequential",
            crop_rate=crop_rate, seed=seed, step=VALIDATION_STEP_KEY, pad_id=pad_id,
            backward=False,
        )
        v = res.valid
        sums[:n_pass] += res.losses[v].sum(dim=0).double()
        if res.correct is not None:
            has_accuracy = True
            sums[n_pass : 2 * n_pass] += res.correct[v].sum(dim=0).double()
        sums[-3] += res.sample_loss[v].sum().double()
        sums[-2] += violation_rate(res.losses[v]).sum().double()
        sums[-1] += v.sum()
    sums = reduce_sums(sums)
    model.train(was_training)
    n = max(float(sums[-1]), 1.0)
    out = {f"val_loss_{k}": float(sums[k]) / n for k in range(n_pass)}
    if has_accuracy:
        out.update({f"val_accuracy_{k}": float(sums[n_pass + k]) / n for k in range(n_pass)})
    out["val_cmp_loss"] = float(sums[-3]) / n
    out["val_violation_rate"] = float(sums[-2]) / n
    out["val_samples"] = float(sums[-1])
    return out
