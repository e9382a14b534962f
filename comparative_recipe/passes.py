"""The comparative step: views of a batch, the 1+c passes, the loss and its backward.

Both recipes and the tests call ``comparative_step``; nothing here knows about optimizers,
ranks or logging. Pass k runs the model on crop view ``plan[k].crop_level`` with hidden masks of
drop power ``plan[k].drop_power`` (pass 0 is the full model: no crop, no mask).

Strategies (all give the same gradient):
- ``sequential``: 1+c forwards, graphs kept, one backward (the reference; (1+c)x activations).
- ``stacked``: all passes concatenated along the batch (views right-padded to the longest), one
  forward and one backward; per-row masks keep the passes apart.
- ``recompute``: the 1+c losses without grad, each pass's gradient weight from them
  (``ComparativeLoss.pass_weights``), then one forward+backward per pass with its weight: peak
  activation memory of a single pass.

The backward is on ``sum_b weight_b * L_b`` (``weight_b`` 1 per valid sample, or its number of
scored tokens with ``reduction="token"``), unnormalised: the caller divides the gradients by the
accumulated weight over micro-batches (and ranks) before the optimizer step.
"""

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from comparative_recipe.ablation.chunks import crop_views
from comparative_recipe.ablation.hidden import MaskKeys, hidden_ablation_keys
from comparative_recipe.ablation.plan import AblationLevel
from comparative_recipe.loss import ComparativeLoss, violation_rate
from comparative_recipe.tasks import IGNORE_INDEX, TaskLosses, shift_labels

STRATEGIES = ("sequential", "stacked", "recompute")
REDUCTIONS = ("sample", "token")


@dataclass
class PassInput:
    """The model input of one pass.

    tokens:    [B, S_k] the (possibly cropped) view, right-padded
    targets:   [B, S_k] shifted labels of that view
    keys:      per-row hidden-mask keys (drop power of this pass for every row)
    exhausted: [B] bool, the crop had nothing left to drop (view repeats the previous level)
    """

    tokens: torch.Tensor
    targets: torch.Tensor
    keys: MaskKeys
    exhausted: torch.Tensor

    @property
    def n_input_tokens(self) -> torch.Tensor:
        """Input tokens of the view, not counting padding (a 0-d tensor: no host sync)."""
        return (self.keys.token_keys >= 0).sum()


@dataclass
class StepResult:
    """What one comparative step computed (all detached).

    losses:      [B, 1+c] task loss per sample and pass
    n_tokens:    [B, 1+c] scored targets per sample and pass
    valid:       [B] samples that take part (scored targets in the full view)
    sample_loss: [B] comparative loss per sample (0 where not valid)
    sample_weight: [B] each sample's weight in the back-propagated sum (0 where not valid)
    exhausted:   [B, 1+c] crop had nothing left to drop
    pass_tokens: [1+c] input tokens each pass processed
    correct:     [B, 1+c] classification hits, or None
    """

    losses: torch.Tensor
    n_tokens: torch.Tensor
    valid: torch.Tensor
    sample_loss: torch.Tensor
    sample_weight: torch.Tensor
    exhausted: torch.Tensor
    pass_tokens: torch.Tensor
    correct: Optional[torch.Tensor] = None

    def sums(self) -> torch.Tensor:
        """Everything the step metrics need, as one float64 vector of sums over samples.

        Sums add up over micro-batches and ranks (one all-reduce, one host transfer); turn them
        into metrics with ``metrics_from_sums``. Layout: ``_SUM_FIELDS``, then per pass k the
        loss sum over valid samples, crops exhausted, classification hits, input tokens.
        """
        v, w = self.valid, self.sample_weight
        vf = v.to(self.losses.dtype)
        head = torch.stack([
            w.sum(),
            (self.sample_loss * w).sum(),
            vf.sum(),
            (self.sample_loss * vf).sum(),
            (violation_rate(self.losses) * vf).sum(),
            (~v).sum(),
            (self.n_tokens[:, 0] * v).sum(),
        ]).double()
        correct = self.correct if self.correct is not None else torch.zeros_like(self.exhausted)
        per_pass = torch.stack([
            (self.losses * vf[:, None]).sum(0),
            self.exhausted.sum(0),
            (correct * v[:, None]).sum(0),
            self.pass_tokens.to(self.losses.device),
        ]).double()
        return torch.cat([head, per_pass.flatten()])

    def metrics(self) -> Dict[str, float]:
        """Per-step numbers for the metric logger (means over valid samples)."""
        return metrics_from_sums(self.sums(), with_accuracy=self.correct is not None)


# The scalar sums at the head of ``StepResult.sums()``.
_SUM_FIELDS = ("weight", "weighted_loss", "valid", "cmp_loss", "violations", "excluded", "tokens")


def metrics_from_sums(sums: torch.Tensor, with_accuracy: bool = False) -> Dict[str, float]:
    """Metrics from ``StepResult.sums()`` (possibly summed over micro-batches and ranks).

    ``loss`` is the objective the step optimised (weighted mean of per-sample losses);
    ``cmp_loss``, ``violation_rate``, ``loss_k`` and ``accuracy_k`` are means over valid samples;
    ``samples`` (valid), ``excluded_samples``, ``crop_exhausted_k``, ``tokens`` and
    ``pass_tokens_k`` are counts.
    """
    values = sums.tolist()
    head = dict(zip(_SUM_FIELDS, values))
    n_passes = (len(values) - len(_SUM_FIELDS)) // 4
    loss_k, exhausted_k, correct_k, tokens_k = (
        values[len(_SUM_FIELDS) + i * n_passes : len(_SUM_FIELDS) + (i + 1) * n_passes]
        for i in range(4)
    )
    n = max(head["valid"], 1.0)
    out = {
        "loss": head["weighted_loss"] / max(head["weight"], 1e-12),
        "cmp_loss": head["cmp_loss"] / n,
        "violation_rate": head["violations"] / n,
        "samples": head["valid"],
        "excluded_samples": head["excluded"],
        "tokens": head["tokens"],
    }
    for k in range(n_passes):
        out[f"loss_{k}"] = loss_k[k] / n
        if k > 0:
            out[f"crop_exhausted_{k}"] = exhausted_k[k]
        if with_accuracy:
            out[f"accuracy_{k}"] = correct_k[k] / n
        out[f"pass_tokens_{k}"] = tokens_k[k]
    return out


def build_passes(
    batch: Dict[str, torch.Tensor],
    plan: Sequence[AblationLevel],
    *,
    crop_rate: float,
    seed: int,
    step: int,
    pad_id: int,
) -> List[PassInput]:
    """The 1+c pass inputs of a batch (pass 0 the full model, then ``plan``).

    Crop views depend only on (seed, step, sample id), so the same sample gets the same views in
    any row, on any rank, and after a resume.
    """
    tokens, labels, chunk_ids = batch["tokens"], batch["labels"], batch["chunk_ids"]
    sample_ids = batch["sample_ids"]
    levels = sorted({0} | {lvl.crop_level for lvl in plan})
    if levels == [0]:
        keys = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        keys = torch.where(chunk_ids == -2, -1, keys)
        views = {0: (tokens, labels, keys, torch.zeros_like(sample_ids, dtype=torch.bool))}
    else:
        views = {
            lvl: (v.tokens, v.labels, v.token_keys, v.exhausted)
            for lvl, v in zip(
                levels,
                crop_views(
                    tokens, labels, chunk_ids, sample_ids, levels,
                    rate=crop_rate, seed=seed, step=step, pad_id=pad_id,
                ),
            )
        }
    passes = []
    for lvl in [AblationLevel(0, 0), *plan]:
        t, lab, token_keys, exhausted = views[lvl.crop_level]
        powers = torch.full_like(sample_ids, lvl.drop_power)
        keys = MaskKeys(sample_ids=sample_ids, powers=powers, step=step, token_keys=token_keys)
        passes.append(PassInput(t, shift_labels(lab), keys, exhausted))
    return passes


def stack_passes(passes: Sequence[PassInput], pad_id: int) -> PassInput:
    """All passes as one batch of (1+c)*B rows, right-padded to the longest view (pass-major)."""
    width = max(p.tokens.shape[1] for p in passes)

    def pad(x: torch.Tensor, value: int) -> torch.Tensor:
        return nn.functional.pad(x, (0, width - x.shape[1]), value=value)

    return PassInput(
        tokens=torch.cat([pad(p.tokens, pad_id) for p in passes]),
        targets=torch.cat([pad(p.targets, IGNORE_INDEX) for p in passes]),
        keys=MaskKeys(
            sample_ids=torch.cat([p.keys.sample_ids for p in passes]),
            powers=torch.cat([p.keys.powers for p in passes]),
            step=passes[0].keys.step,
            token_keys=torch.cat([pad(p.keys.token_keys, -1) for p in passes]),
        ),
        exhausted=torch.cat([p.exhausted for p in passes]),
    )


def run_pass(model: nn.Module, task: Callable, p: PassInput) -> TaskLosses:
    """One forward of ``model`` on a pass input, with that pass's hidden masks active."""
    with hidden_ablation_keys(p.keys):
        logits = model(p.tokens)
    return task(logits, p.targets)


def _sample_weights(n_tokens_full: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "token":
        return n_tokens_full.float() * valid
    return valid.float()


def comparative_step(
    model: nn.Module,
    batch: Dict[str, torch.Tensor],
    *,
    plan: Sequence[AblationLevel],
    task: Callable[..., TaskLosses],
    loss_fn: ComparativeLoss,
    strategy: str = "sequential",
    reduction: str = "sample",
    crop_rate: float = 0.0,
    seed: int = 0,
    step: int = 0,
    pad_id: int = 0,
    backward: bool = True,
    set_grad_sync: Optional[Callable[[bool], None]] = None,
) -> StepResult:
    """Runs the full model and its c ablations on ``batch`` and back-propagates the loss.

    Args:
        batch: collated batch (tokens, labels, sample_ids, chunk_ids), on the model's device.
        plan: the c ablation levels (``ablation_plan``).
        task: maps (logits, shifted labels) to per-row ``TaskLosses``.
        loss_fn: the comparative loss (per-sample, and per-pass gradient weights).
        strategy: ``sequential`` | ``stacked`` | ``recompute``.
        reduction: ``sample`` (each valid sample weighs 1, as the method defines) or ``token``
            (weighted by its scored tokens; with c=0 this is torchtune's token-mean SFT loss).
        backward: False computes the losses only (no grad), e.g. for validation.
        set_grad_sync: called with False before backwards that must not sync gradients and
            True before the last one (FSDP's ``set_requires_gradient_sync``); ``recompute`` only.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown pass strategy {strategy!r}; choose one of {STRATEGIES}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown loss reduction {reduction!r}; choose one of {REDUCTIONS}")
    passes = build_passes(batch, plan, crop_rate=crop_rate, seed=seed, step=step, pad_id=pad_id)
    n_passes, batch_size = len(passes), batch["tokens"].shape[0]

    def forward_all() -> List[TaskLosses]:
        if strategy == "stacked":
            out = run_pass(model, task, stack_passes(passes, pad_id))
            split = lambda x: list(x.view(n_passes, batch_size).unbind(0))  # noqa: E731
            return [
                TaskLosses(lo, n, c)
                for lo, n, c in zip(
                    split(out.loss),
                    split(out.n_tokens),
                    split(out.correct) if out.correct is not None else [None] * n_passes,
                )
            ]
        return [run_pass(model, task, p) for p in passes]

    use_grad = backward and strategy != "recompute"
    with torch.set_grad_enabled(use_grad):
        outs = forward_all()
    losses = torch.stack([o.loss for o in outs], dim=1)  # [B, 1+c]
    n_tokens = torch.stack([o.n_tokens for o in outs], dim=1)
    valid = n_tokens[:, 0] > 0
    weights = _sample_weights(n_tokens[:, 0], valid, reduction)

    # No early exit for batches without valid samples: every rank must run the same backwards
    # (FSDP's collectives), so such a batch back-propagates zero weights.
    with torch.set_grad_enabled(use_grad):
        sample_loss = losses.new_zeros(batch_size).index_put((valid,), loss_fn(losses[valid]))
    if backward:
        if strategy == "recompute":
            grad_w = torch.zeros_like(losses)
            grad_w[valid] = loss_fn.pass_weights(losses[valid])
            for k, p in enumerate(passes):
                if set_grad_sync is not None:
                    set_grad_sync(k == n_passes - 1)
                out = run_pass(model, task, p)
                (out.loss * grad_w[:, k] * weights).sum().backward()
        else:
            (sample_loss * weights).sum().backward()

    correct = None
    if outs[0].correct is not None:
        correct = torch.stack([o.correct for o in outs], dim=1)
    return StepResult(
        losses=losses.detach(),
        n_tokens=n_tokens,
        valid=valid,
        sample_loss=sample_loss.detach(),
        sample_weight=weights,
        exhausted=torch.stack([p.exhausted for p in passes], dim=1),
        pass_tokens=torch.stack([p.n_input_tokens for p in passes]),
        correct=correct,
    )


def merge_results(results: Sequence[StepResult]) -> StepResult:
    """Micro-batch results of one optimizer step as one result (rows concatenated)."""
    if len(results) == 1:
        return results[0]
    cat = lambda name: torch.cat([getattr(r, name) for r in results])  # noqa: E731
    return StepResult(
        losses=cat("losses"),
        n_tokens=cat("n_tokens"),
        valid=cat("valid"),
        sample_loss=cat("sample_loss"),
        sample_weight=cat("sample_weight"),
        exhausted=cat("exhausted"),
        pass_tokens=sum(r.pass_tokens for r in results),
        correct=cat("correct") if results[0].correct is not None else None,
    )
