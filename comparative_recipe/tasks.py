"""Per-sample task losses: what the comparative loss ranks.

torchtune's losses return one token mean over the whole batch; the comparative loss needs one task
loss per sample and pass. A task turns a forward's logits and the (already shifted) labels into
``TaskLosses`` with one entry per row.
"""

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX as IGNORE_INDEX

Logits = Union[torch.Tensor, List[torch.Tensor]]


@dataclass
class TaskLosses:
    """One forward's per-row results.

    loss:     [R] mean task loss of each row (0 where the row has nothing to score)
    n_tokens: [R] scored targets per row (labelled tokens; 1 or 0 for classification)
    correct:  [R] bool, classification only: prediction equals the target
    predicted, target: [R] long, classification only: predicted and true class (-1 where the
              row has no target); num_classes: the number of classes (0 for other tasks)
    """

    loss: torch.Tensor
    n_tokens: torch.Tensor
    correct: Optional[torch.Tensor] = None
    predicted: Optional[torch.Tensor] = None
    target: Optional[torch.Tensor] = None
    num_classes: int = 0


def shift_labels(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """[B, S] labels of tokens -> [B, S] targets of positions (position i predicts token i+1)."""
    pad = labels.new_full((labels.shape[0], 1), ignore_index)
    return torch.cat([labels[:, 1:], pad], dim=1)


def _bounds(length: int, num_chunks: int) -> List[Tuple[int, int]]:
    """``num_chunks`` contiguous [start, end) ranges over ``length`` positions, sizes within 1."""
    n = max(1, min(num_chunks, length))
    edges = [length * i // n for i in range(n + 1)]
    return list(zip(edges[:-1], edges[1:]))


class _ChunkedTokenCE(torch.autograd.Function):
    """[B, S, V] logits, [B, S] targets -> [B] sums of token cross-entropies (>= fp32).

    Forward and backward go over the sequence one chunk at a time, upcasting only that chunk;
    autograd keeps the logits in their own dtype, and the backward writes each chunk's gradient
    (softmax - one-hot, times the row's incoming gradient) into one buffer: no fp32 copy of the
    whole batch and no full-size zero tensor per chunk (what slicing then backward would cost).
    """

    @staticmethod
    def forward(ctx, logits, targets, ignore_index, num_chunks):
        ctx.save_for_backward(logits, targets)
        ctx.ignore_index, ctx.num_chunks = ignore_index, num_chunks
        dtype = torch.promote_types(logits.dtype, torch.float32)
        total = logits.new_zeros(logits.shape[0], dtype=dtype)
        for a, b in _bounds(logits.shape[1], num_chunks):
            token_loss = F.cross_entropy(
                logits[:, a:b].to(dtype).flatten(0, 1), targets[:, a:b].flatten(),
                ignore_index=ignore_index, reduction="none",
            )
            total += token_loss.view(-1, b - a).sum(dim=1)
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total):
        logits, targets = ctx.saved_tensors
        dtype = torch.promote_types(logits.dtype, torch.float32)
        grad = torch.empty_like(logits)
        for a, b in _bounds(logits.shape[1], ctx.num_chunks):
            tgt = targets[:, a:b]
            scored = tgt != ctx.ignore_index
            g = torch.softmax(logits[:, a:b].to(dtype), dim=-1)
            g.scatter_add_(-1, tgt.clamp(min=0).unsqueeze(-1), -scored.unsqueeze(-1).to(dtype))
            g *= (grad_total[:, None] * scored).unsqueeze(-1)
            grad[:, a:b] = g
        return grad, None, None, None


def per_sample_cross_entropy(
    logits: Logits,
    targets: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    *,
    num_chunks: int = 8,
) -> TaskLosses:
    """Mean token cross-entropy of each sample, computed one sequence chunk at a time.

    logits: [B, S, V] in any float dtype, or a list of [B, S_j, V] chunks along the sequence
        (torchtune's ``set_num_output_chunks``; each chunk is then used whole).
    targets: [B, S] shifted labels, ``ignore_index`` where nothing is scored.
    num_chunks: a single tensor is processed in ``min(num_chunks, S)`` sequence chunks of
        sizes within 1 of each other; 8 is torchtune's default.
    Returns ``TaskLosses`` with loss [B] (fp32, or fp64 for fp64 logits) and n_tokens [B]. A
    sample without scored tokens gets loss 0 and n_tokens 0 (never NaN); callers exclude it.

    Memory: fp32 logits exist for one chunk at a time ([B, ceil(S / n), V]), in the forward and
    in the backward; autograd saves only the logits in their own dtype (bf16 on GPU) and the
    targets, where ``F.cross_entropy(logits.float())`` and torchtune's CEWithChunkedOutputLoss
    keep fp32 log-probabilities for the whole [B, S, V].
    """
    if num_chunks < 1:
        raise ValueError(f"num_chunks must be >= 1, got {num_chunks}")
    if isinstance(logits, (list, tuple)):
        pieces = [(c, 1) for c in logits]
    else:
        pieces = [(logits, num_chunks)]
    target_pieces = targets.split([c.shape[1] for c, _ in pieces], dim=1)
    total = torch.zeros(targets.shape[0], dtype=torch.float32, device=targets.device)
    for (chunk, n), tgt in zip(pieces, target_pieces):
        if chunk.shape[1] > 0:
            total = total + _ChunkedTokenCE.apply(chunk, tgt, ignore_index, n)
    n_tokens = (targets != ignore_index).sum(dim=1)
    return TaskLosses(loss=total / n_tokens.clamp(min=1), n_tokens=n_tokens)


def _whole(logits: Logits) -> torch.Tensor:
    """[B, S, V] logits from a tensor or from torchtune's chunks along the sequence."""
    return torch.cat(list(logits), dim=1) if isinstance(logits, (list, tuple)) else logits


def per_sample_mean(values: torch.Tensor, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """[N] values of positions -> [n_rows] mean per row (0 for a row with none)."""
    total = values.new_zeros(n_rows).index_add(0, rows, values)
    count = values.new_zeros(n_rows).index_add(0, rows, torch.ones_like(values))
    return total / count.clamp(min=1)


class SFTTask:
    """Supervised fine-tuning: the task loss is the sample's mean token cross-entropy."""

    name = "sft"
    has_accuracy = False

    def __call__(self, logits: Logits, targets: torch.Tensor) -> TaskLosses:
        return per_sample_cross_entropy(logits, targets)

    def scored_logits(self, logits: Logits, targets: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(z [N, V], row [N])``: the logits at every scored target and each one's row."""
        rows, pos = (targets != IGNORE_INDEX).nonzero(as_tuple=True)
        return _whole(logits)[rows, pos], rows


class ClassificationTask:
    """Classification with a fixed label set, scored by label words at the answer position.

    Each sample's first scored target is one of ``label_token_ids`` (the first token of each
    label word, as the classification dataset encodes it). The task loss is the cross-entropy of
    the logits restricted to those ids at that position; the prediction is their argmax.

    Args:
        label_token_ids: the first token id of each label word, in class order.
    """

    name = "classification"
    has_accuracy = True

    def __init__(self, label_token_ids: Sequence[int]):
        ids = [int(i) for i in label_token_ids]
        if len(ids) < 2 or len(set(ids)) != len(ids):
            raise ValueError(
                f"label_token_ids must hold at least two distinct ids, got {ids}: give every "
                "label word a different first token"
            )
        self.label_token_ids = torch.tensor(ids)

    @staticmethod
    def _answer_positions(targets: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """([R] bool: the row has a target, [R]: its first scored position, 0 for none)."""
        scored = targets != IGNORE_INDEX
        return scored.any(dim=1), scored.int().argmax(dim=1)

    def scored_logits(self, logits: Logits, targets: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(z [N, C], row [N])``: the label words' logits at the answer position of every row
        that has a target, and those rows."""
        has_target, pos = self._answer_positions(targets)
        rows = has_target.nonzero().squeeze(1)
        return _whole(logits)[rows, pos[rows]][:, self.label_token_ids.to(targets.device)], rows

    def __call__(self, logits: Logits, targets: torch.Tensor) -> TaskLosses:
        logits = _whole(logits)
        has_target, pos = self._answer_positions(targets)
        rows = torch.arange(targets.shape[0], device=targets.device)
        label_ids = self.label_token_ids.to(targets.device)
        class_logits = logits[rows, pos][:, label_ids].float()  # [B, C]
        target_ids = targets[rows, pos]
        is_class = target_ids[:, None] == label_ids[None, :]  # [B, C]
        if bool((has_target & ~is_class.any(dim=1)).any()):
            bad = target_ids[has_target & ~is_class.any(dim=1)].tolist()
            raise ValueError(
                f"scored token ids {bad} are not label words {label_ids.tolist()}: the dataset "
                "and the task must use the same label_words"
            )
        target = is_class.int().argmax(dim=1)
        loss = F.cross_entropy(class_logits, target, reduction="none") * has_target
        predicted = class_logits.argmax(dim=1)
        correct = (predicted == target) & has_target
        missing = torch.full_like(target, -1)
        return TaskLosses(
            loss=loss, n_tokens=has_target.long(), correct=correct,
            predicted=torch.where(has_target, predicted, missing),
            target=torch.where(has_target, target, missing), num_classes=len(label_ids),
        )


TASKS = ("sft", "classification")


def build_task(name: str, dataset=None):
    """The task named in a config (``task: sft | classification``).

    Classification takes its label token ids from the dataset (``classification_dataset`` exposes
    ``label_token_ids``), so the label words are configured once, in the dataset section.
    """
    if name == "sft":
        return SFTTask()
    if name == "classification":
        ids = getattr(dataset, "label_token_ids", None)
        if ids is None:
            raise ValueError(
                "task: classification needs a dataset with label words, e.g. "
                "comparative_recipe.data.classification_dataset (it exposes "
                "label_token_ids); this dataset has none"
            )
        return ClassificationTask(ids)
    raise ValueError(f"task must be one of {TASKS}, got {name!r}")
