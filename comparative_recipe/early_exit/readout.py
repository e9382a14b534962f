"""The task head shared by every layer: the model's own final norm and output projection.

Layer n's prediction is ``output(norm(h_n))`` at the scored positions: restricted to the label
words' first tokens for classification (the prediction is the argmax class), the whole
vocabulary for answers (teacher-forced: the answer is right when every answer token is the
argmax, which is exactly when greedy decoding from the n-layer model writes it).
"""

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from comparative_recipe.tasks import IGNORE_INDEX, per_sample_mean


@dataclass
class ScoredPositions:
    """What a batch scores, one entry per scored position.

    rows, positions: [N] long; targets: [N] long (the class index for classification, the
    token id for answers); answer_positions: [B] long, each row's first scored position (where
    the halting heads read; 0 for a row without one); has_target: [B] bool."""

    rows: torch.Tensor
    positions: torch.Tensor
    targets: torch.Tensor
    answer_positions: torch.Tensor
    has_target: torch.Tensor

    @property
    def batch_size(self) -> int:
        return int(self.has_target.shape[0])


def scored_positions(targets: torch.Tensor,
                     label_token_ids: Optional[Sequence[int]] = None) -> ScoredPositions:
    """The scored positions of [B, S] shifted targets: every labelled position for answers;
    the first one of each row, its target mapped to a class index, for classification
    (``label_token_ids``: the label words' first token ids, in class order)."""
    scored = targets != IGNORE_INDEX
    has_target = scored.any(dim=1)
    answer_positions = scored.int().argmax(dim=1)
    if label_token_ids is None:
        rows, positions = scored.nonzero(as_tuple=True)
        return ScoredPositions(rows, positions, targets[rows, positions], answer_positions,
                               has_target)
    rows = has_target.nonzero().squeeze(1)
    positions = answer_positions[rows]
    ids = torch.as_tensor(list(label_token_ids), device=targets.device)
    token = targets[rows, positions]
    is_class = token[:, None] == ids[None, :]
    if not bool(is_class.any(dim=1).all()):
        bad = token[~is_class.any(dim=1)].tolist()
        raise ValueError(
            f"scored token ids {bad} are not label words {ids.tolist()}: the dataset and the "
            "task must use the same label_words"
        )
    return ScoredPositions(rows, positions, is_class.int().argmax(dim=1), answer_positions,
                           has_target)


@dataclass
class LayerReadout:
    """One layer's task results for some rows.

    loss: [R] mean cross-entropy of each row's scored positions; correct: [R] bool, every one
    argmax-right; predicted: [R] the argmax class (classification; -1 elsewhere);
    position_predictions: [M] the argmax at each of these rows' scored positions (in the
    order of ``ScoredPositions`` restricted to them)."""

    loss: torch.Tensor
    correct: torch.Tensor
    predicted: torch.Tensor
    position_predictions: torch.Tensor


class TaskReadout:
    """Reads a task's predictions out of any layer's states with ``model``'s norm and output
    projection; ``label_token_ids`` restricts them to the label words (classification)."""

    def __init__(self, model: nn.Module, label_token_ids: Optional[Sequence[int]] = None) -> None:
        self.model = model
        self.label_token_ids = None if label_token_ids is None else [int(i) for i in label_token_ids]

    @property
    def is_classification(self) -> bool:
        return self.label_token_ids is not None

    def positions(self, targets: torch.Tensor) -> ScoredPositions:
        return scored_positions(targets, self.label_token_ids)

    def logits(self, states: torch.Tensor) -> torch.Tensor:
        """[N, D] states (a layer's output, before the final norm) -> [N, C] float32 logits."""
        return self.task_logits(self.model.output(self.model.norm(states)))

    def task_logits(self, vocab_logits: torch.Tensor) -> torch.Tensor:
        """[N, V] logits over the vocabulary -> [N, C] float32 logits of the task: the label
        words' (classification), else all of them."""
        logits = vocab_logits.float()
        if self.label_token_ids is not None:
            logits = logits[:, torch.as_tensor(self.label_token_ids, device=logits.device)]
        return logits

    def read(self, logits: torch.Tensor, targets: torch.Tensor, local_rows: torch.Tensor,
             n_rows: int) -> LayerReadout:
        """Per-row results from [M, C] logits of scored positions, their [M] targets and the
        [M] row (in 0..n_rows-1) each belongs to."""
        loss = F.cross_entropy(logits, targets, reduction="none")
        argmax = logits.argmax(dim=-1)
        wrong = torch.zeros(n_rows, device=logits.device).index_add(
            0, local_rows, (argmax != targets).float())
        predicted = torch.full((n_rows,), -1, dtype=torch.long, device=logits.device)
        if self.is_classification:
            predicted[local_rows] = argmax
        return LayerReadout(per_sample_mean(loss, local_rows, n_rows), wrong == 0, predicted,
                            argmax)

    def read_rows(self, h: torch.Tensor, rows: torch.Tensor, scored: ScoredPositions,
                  entries: Optional[torch.Tensor] = None) -> LayerReadout:
        """The results of the rows ``rows`` ([A], batch rows) whose layer output is ``h``
        ([A, S, D], in that order). ``entries``: the indices into ``scored`` of these rows'
        positions (computed when not given)."""
        if entries is None:
            entries = entries_of(rows, scored)
        local = local_index(rows, scored.batch_size)[scored.rows[entries]]
        states = h[local, scored.positions[entries]]
        return self.read(self.logits(states), scored.targets[entries], local, rows.shape[0])


def local_index(rows: torch.Tensor, batch_size: int) -> torch.Tensor:
    """[B] map from batch row to its index in ``rows`` (-1 for rows not in it)."""
    index = torch.full((batch_size,), -1, dtype=torch.long, device=rows.device)
    index[rows] = torch.arange(rows.shape[0], device=rows.device)
    return index


def entries_of(rows: torch.Tensor, scored: ScoredPositions) -> torch.Tensor:
    """The indices into ``scored`` of the positions of the batch rows ``rows``."""
    member = local_index(rows, scored.batch_size)[scored.rows] >= 0
    return member.nonzero().squeeze(1)
