"""The comparative step: views of a batch, the 1+c passes, the loss and its backward.

The comparative method (``methods.comparative``) calls ``comparative_step`` with a
``ComparativeStepSpec`` built once from the config; nothing here knows about optimizers, ranks
or logging. Pass k runs the model on crop view ``plan[k].crop_level`` with hidden masks of
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

import dataclasses
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX

from comparative_recipe import checks
from comparative_recipe.ablation.crops import compact_rows, crop_views
from comparative_recipe.ablation.hidden import MaskKeys, check_hidden_ablation, hidden_ablation_keys
from comparative_recipe.ablation.plan import AblationLevel
from comparative_recipe.data.chunking import PAD_CHUNK
from comparative_recipe.loss import ComparativeLoss, violation_rate
from comparative_recipe.tasks import TaskLosses, shift_labels
from comparative_recipe.training.sums import Sums

STRATEGIES = ("sequential", "stacked", "recompute")
REDUCTIONS = ("sample", "token")


@dataclass(frozen=True)
class ComparativeStepSpec:
    """Everything a comparative step needs besides the model, the batch and the step number;
    built once from the config (``ComparativeMethod``) and passed as one object.

    plan: the c ablation levels (``ablation_plan``); task: (logits, shifted labels) ->
    ``TaskLosses``; loss_fn: the comparative loss; strategy: ``sequential`` | ``stacked`` |
    ``recompute``; reduction: ``sample`` (each valid sample weighs 1, as the method defines) or
    ``token`` (weighted by its scored tokens; with c = 0 torchtune's token mean); crop_rate: q of
    the nested crops; seed: keys every mask and crop; pad_id: the token id of padding.
    """

    plan: Sequence[AblationLevel]
    task: Callable[..., TaskLosses]
    loss_fn: ComparativeLoss
    strategy: str = "sequential"
    reduction: str = "sample"
    crop_rate: float = 0.5
    seed: int = 0
    pad_id: int = 0

    def __post_init__(self) -> None:
        checks.choice(self.strategy, STRATEGIES, "strategy")
        checks.choice(self.reduction, REDUCTIONS, "loss_reduction")
        checks.rate(self.crop_rate, "ablation.crop.rate")
        object.__setattr__(self, "plan", tuple(self.plan))

    @property
    def uses_hidden_ablation(self) -> bool:
        return any(lvl.drop_power > 0 for lvl in self.plan)

    def full_model_only(self) -> "ComparativeStepSpec":
        """The same step with no ablated pass (c = 0): the full model's task loss alone."""
        return dataclasses.replace(self, plan=())


@dataclass
class PassInput:
    """The model input of one pass.

    tokens:    [B, S_k] the (possibly cropped) view, right-padded
    targets:   [B, S_k] shifted labels of that view
    keys:      per-row hidden-mask keys (drop power of this pass for every row)
    exhausted: [B] bool, this pass is a crop step and had nothing left to drop (the view repeats
               the previous level); always False for a hidden-unit step
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
    exhausted:   [B, 1+c] the pass's crop had nothing left to drop
    pass_tokens: [1+c] input tokens each pass processed
    correct:     [B, 1+c] classification hits, or None
    predicted:   [B, 1+c] predicted class (-1 without a target), or None
    target:      [B] true class (-1 without a target), or None
    num_classes: classes of a classification task (0 otherwise)
    """

    losses: torch.Tensor
    n_tokens: torch.Tensor
    valid: torch.Tensor
    sample_loss: torch.Tensor
    sample_weight: torch.Tensor
    exhausted: torch.Tensor
    pass_tokens: torch.Tensor
    correct: Optional[torch.Tensor] = None
    predicted: Optional[torch.Tensor] = None
    target: Optional[torch.Tensor] = None
    num_classes: int = 0

    def sums(self) -> Sums:
        """The step's named sums over samples (they add over micro-batches and ranks).

        ``weight`` is the gradient normaliser (the back-propagated sum is unnormalised).
        Per pass (1-d, length 1+c): ``pass_loss`` (over valid samples), ``crop_exhausted``,
        ``pass_tokens`` and, for classification, ``correct``; per pass and class (2-d,
        [1+c, C]) ``class_hits`` and ``class_predicted``, and per class ``class_actual`` (for
        macro-F1). Read them with ``comparative_metrics``.
        """
        v, w = self.valid, self.sample_weight
        vf = v.to(self.losses.dtype)
        sums = {
            "weight": w.sum(),
            "weighted_loss": (self.sample_loss * w).sum(),
            "samples": vf.sum(),
            "cmp_loss": (self.sample_loss * vf).sum(),
            "violations": (violation_rate(self.losses) * vf).sum(),
            "excluded": (~v).sum(),
            "tokens": (self.n_tokens[:, 0] * v).sum(),
            "pass_loss": (self.losses * vf[:, None]).sum(0),
            "crop_exhausted": self.exhausted.sum(0),
            "pass_tokens": self.pass_tokens.to(self.losses.device),
        }
        if self.correct is not None:
            sums["correct"] = (self.correct * v[:, None]).sum(0)
        if self.predicted is not None:
            scored = (v & (self.target >= 0)).to(self.losses.dtype)
            predicted = F.one_hot(self.predicted.clamp(min=0), self.num_classes) * scored[:, None, None]
            actual = F.one_hot(self.target.clamp(min=0), self.num_classes) * scored[:, None]
            sums["class_hits"] = (predicted * actual[:, None]).sum(0)
            sums["class_predicted"] = predicted.sum(0)
            sums["class_actual"] = actual.sum(0)
        return Sums(sums)


def macro_f1(hits: Sequence[float], predicted: Sequence[float], actual: Sequence[float]) -> float:
    """Mean over classes of F1 = 2 hits / (predicted + actual), over the classes that occur as a
    prediction or a target (0.0 when none does)."""
    scores = [2 * h / (p + a) for h, p, a in zip(hits, predicted, actual) if p + a > 0]
    return sum(scores) / len(scores) if scores else 0.0


def comparative_metrics(sums: Dict[str, object]) -> Dict[str, float]:
    """Logged metrics from host ``StepResult.sums()`` (possibly added over micro-batches and ranks).

    ``loss`` is the objective the step optimised (weighted mean of per-sample losses);
    ``cmp_loss``, ``violation_rate``, ``loss_k`` and ``accuracy_k`` are means over valid samples;
    ``samples`` (valid), ``excluded_samples``, ``crop_exhausted_k`` (k >= 1), ``tokens`` and
    ``pass_tokens_k`` are counts; ``macro_f1_k`` (classification) is over all summed samples.
    """
    n = max(sums["samples"], 1.0)
    out = {
        "loss": sums["weighted_loss"] / max(sums["weight"], 1e-12),
        "cmp_loss": sums["cmp_loss"] / n,
        "violation_rate": sums["violations"] / n,
        "samples": sums["samples"],
        "excluded_samples": sums["excluded"],
        "tokens": sums["tokens"],
    }
    for k, loss in enumerate(sums["pass_loss"]):
        out[f"loss_{k}"] = loss / n
        if k > 0:
            out[f"crop_exhausted_{k}"] = sums["crop_exhausted"][k]
        if "correct" in sums:
            out[f"accuracy_{k}"] = sums["correct"][k] / n
        if "class_hits" in sums:
            out[f"macro_f1_{k}"] = macro_f1(
                sums["class_hits"][k], sums["class_predicted"][k], sums["class_actual"]
            )
        out[f"pass_tokens_{k}"] = sums["pass_tokens"][k]
    return out


def _uncropped_view(batch: Dict[str, torch.Tensor], pad_id: int):
    """The batch itself as the level-0 view: (tokens, labels, token keys), right-padded.

    Padding is where ``chunk_ids`` is ``PAD_CHUNK``. A left-padded batch (a custom collate) is
    compacted to right padding, since the model gets no attention mask and would otherwise number
    the positions of a left-padded row from its padding.
    """
    tokens, labels, pad = batch["tokens"], batch["labels"], batch["chunk_ids"] == PAD_CHUNK
    if bool((pad[:, :-1] & ~pad[:, 1:]).any()):  # padding before a token
        tokens, labels, token_keys, _ = compact_rows(tokens, labels, ~pad, pad_id)
        return tokens, labels, token_keys
    keys = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    return tokens, labels, torch.where(pad, -1, keys)


def build_passes(
    batch: Dict[str, torch.Tensor], spec: ComparativeStepSpec, step: int
) -> List[PassInput]:
    """The 1+c pass inputs of a batch (pass 0 the full model, then ``spec.plan``).

    Crop views depend only on (seed, step, sample id), so the same sample gets the same views in
    any row, on any rank, and after a resume.
    """
    sample_ids = batch["sample_ids"]
    levels = sorted({0} | {lvl.crop_level for lvl in spec.plan})
    no_crop = torch.zeros_like(sample_ids, dtype=torch.bool)
    if levels == [0]:
        views = {0: (*_uncropped_view(batch, spec.pad_id), no_crop)}
    else:
        views = {
            lvl: (v.tokens, v.labels, v.token_keys, v.exhausted)
            for lvl, v in zip(
                levels,
                crop_views(
                    batch["tokens"], batch["labels"], batch["chunk_ids"], sample_ids, levels,
                    rate=spec.crop_rate, seed=spec.seed, step=step, pad_id=spec.pad_id,
                ),
            )
        }
    passes, previous_level = [], 0
    for lvl in [AblationLevel(0, 0), *spec.plan]:
        t, lab, token_keys, exhausted = views[lvl.crop_level]
        if lvl.crop_level == previous_level:
            exhausted = no_crop  # a hidden-unit step: the view repeats by design
        previous_level = lvl.crop_level
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
        targets=torch.cat([pad(p.targets, CROSS_ENTROPY_IGNORE_IDX) for p in passes]),
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
    spec: ComparativeStepSpec,
    *,
    step: int,
    backward: bool = True,
    set_grad_sync: Optional[Callable[[bool], None]] = None,
) -> StepResult:
    """Runs the full model and its c ablations on ``batch`` and back-propagates the loss.

    Args:
        batch: collated batch (tokens, labels, sample_ids, chunk_ids), on the model's device.
        spec: what to run (plan, task, loss, strategy, reduction, crop rate, seed, pad id).
        step: the training step, a key of every mask and crop.
        backward: False computes the losses only (no grad), e.g. for validation.
        set_grad_sync: called with False before backwards that must not sync gradients and
            True before the last one (FSDP's ``set_requires_gradient_sync``); ``recompute`` only.

    Raises:
        ValueError: the plan masks hidden units but ``model`` has no hidden ablation installed
            (or an activation-checkpoint wrapper that cannot carry the masks).
    """
    if spec.uses_hidden_ablation:
        check_hidden_ablation(model)
    passes = build_passes(batch, spec, step)
    n_passes, batch_size = len(passes), batch["tokens"].shape[0]
    task, strategy = spec.task, spec.strategy

    def forward_all() -> List[TaskLosses]:
        if strategy == "stacked" and n_passes > 1:
            out = run_pass(model, task, stack_passes(passes, spec.pad_id))
            split = lambda x: (  # noqa: E731
                [None] * n_passes if x is None else list(x.view(n_passes, batch_size).unbind(0))
            )
            return [
                TaskLosses(lo, n, c, p, t, out.num_classes)
                for lo, n, c, p, t in zip(
                    split(out.loss), split(out.n_tokens), split(out.correct),
                    split(out.predicted), split(out.target),
                )
            ]
        return [run_pass(model, task, p) for p in passes]

    use_grad = backward and strategy != "recompute"
    with torch.set_grad_enabled(use_grad):
        outs = forward_all()
    losses = torch.stack([o.loss for o in outs], dim=1)  # [B, 1+c]
    n_tokens = torch.stack([o.n_tokens for o in outs], dim=1)
    valid = n_tokens[:, 0] > 0
    weights = _sample_weights(n_tokens[:, 0], valid, spec.reduction)
    loss_fn = spec.loss_fn

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

    correct = predicted = None
    if outs[0].correct is not None:
        correct = torch.stack([o.correct for o in outs], dim=1)
    if outs[0].predicted is not None:
        predicted = torch.stack([o.predicted for o in outs], dim=1)
    return StepResult(
        losses=losses.detach(),
        n_tokens=n_tokens,
        valid=valid,
        sample_loss=sample_loss.detach(),
        sample_weight=weights,
        exhausted=torch.stack([p.exhausted for p in passes], dim=1),
        pass_tokens=torch.stack([p.n_input_tokens for p in passes]),
        correct=correct,
        predicted=predicted,
        target=outs[0].target,
        num_classes=outs[0].num_classes,
    )
