"""Batched early-exit inference: every sequence leaves at its own layer, the rest go on.

``early_exit_forward`` runs a torchtune decoder one layer at a time. After layer n it asks the
exit rule which rows are done; those are read out at layer n and dropped from the batch, so no
later layer computes anything for them, and the rows that stay see exactly the computation they
would see alone (per-row attention, no cross-row state). One decision per sequence, taken at its
answer position (the first scored position): a classification prompt, or the prompt of an
answer, which the n-layer model then scores (or writes: its KV cache has every layer it uses).
Per-token exit inside a generated answer is not supported: a token that leaves at layer n would
leave layers n+1..L without its keys and values for the tokens after it.

Rules (``ExitRule``): ``q_exit`` (the first layer where the cumulative exit probability exceeds
q), ``sample`` (PonderNet's Bernoulli(lambda_n) draws, keyed by (seed, sample id, layer), so a
sample gets the same draws in any batch and on any rank), ``patience`` (PABEE: the prediction
unchanged for ``patience`` layers) and ``fixed`` (every row at layer ``layers``). The
whole-depth forms of the same rules are ``early_exit.ponder.*_exit_layers``.

With FSDP2 every rank calls every layer until no rank has a row left (the layers' all-gathers
are collective); a rank whose rows are all done runs them on one dummy row.
"""

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule

from comparative_recipe import checks
from comparative_recipe.ablation.keys import uniform
from comparative_recipe.early_exit.heads import HaltingHeads
from comparative_recipe.early_exit.readout import ScoredPositions, TaskReadout, entries_of, local_index
from comparative_recipe.training.distributed import all_reduce_sum, unshard_parameters

EXIT_RULES = ("q_exit", "sample", "patience", "fixed")
# Keys the sampled rule's uniforms are drawn with, beside (seed, sample id, layer).
_SAMPLE_STREAM = 0x5A3


@dataclass(frozen=True)
class ExitRule:
    """An exit rule and its setting: ``q`` (q_exit, in (0, 1)), ``patience`` (>= 1; unset:
    PABEE's 6, at most L // 3, see ``resolved``), ``layers`` (fixed, 1..L), ``seed`` (sample)."""

    name: str
    q: float = 0.5
    patience: Optional[int] = None
    layers: Optional[int] = None
    seed: int = 0

    def __post_init__(self) -> None:
        checks.choice(self.name, EXIT_RULES, "exit rule")
        checks.open_unit(self.q, "q_exit.q")
        if self.patience is not None:
            checks.positive_int(self.patience, "patience.patience")
        checks.non_negative_int(self.seed, "sample.seed")
        if self.name == "fixed":
            checks.positive_int(self.layers, "fixed.layers")

    def resolved(self, num_layers: int) -> "ExitRule":
        """This rule for a model of ``num_layers`` layers: an unset patience becomes
        max(1, min(6, L // 3)): PABEE's 6 for its 12-layer models scaled down (a patience of
        L - 1 or more never exits before the last layer)."""
        if self.name != "patience" or self.patience is not None:
            return self
        return dataclasses.replace(self, patience=max(1, min(6, num_layers // 3)))

    @property
    def needs_lambdas(self) -> bool:
        return self.name in ("q_exit", "sample")

    def describe(self) -> str:
        return {"q_exit": f"q={self.q:g}", "sample": f"seed={self.seed}",
                "patience": f"patience={self.patience}", "fixed": f"layers={self.layers}"}[self.name]


def sample_uniforms(seed: int, sample_ids: torch.Tensor, layer: int) -> torch.Tensor:
    """[A] uniforms in [0, 1) of the ``sample`` rule at ``layer`` for these samples."""
    return uniform(seed, _SAMPLE_STREAM, sample_ids, layer, device=sample_ids.device)


@dataclass
class ExitResult:
    """Per row of the batch: exit_layer [B] long (1..L), loss [B], correct [B] bool, predicted
    [B] long (classification; -1 elsewhere); layer_rows [L]: rows computed at each layer."""

    exit_layer: torch.Tensor
    loss: torch.Tensor
    correct: torch.Tensor
    predicted: torch.Tensor
    layer_rows: torch.Tensor


def _others_running(rows_left: int, sync: bool, device: torch.device) -> bool:
    if not sync:
        return rows_left > 0
    return bool(all_reduce_sum(torch.tensor([rows_left], device=device)).item() > 0)


@torch.no_grad()
def early_exit_forward(model: nn.Module, heads: Optional[HaltingHeads], readout: TaskReadout,
                       tokens: torch.Tensor, scored: ScoredPositions, rule: ExitRule,
                       sample_ids: Optional[torch.Tensor] = None, sync: bool = False) -> ExitResult:
    """Runs ``model`` on ``tokens`` ([B, S], right-padded) with early exit by ``rule``.

    heads: needed by q_exit and sample; sample_ids: [B], needed by sample; sync: run every
    layer while any rank has rows left (FSDP2 over several ranks)."""
    B, L = tokens.shape[0], len(model.layers)
    device = tokens.device
    if rule.needs_lambdas and heads is None:
        raise ValueError(f"exit rule {rule.name} needs the halting heads")
    if rule.name == "sample" and sample_ids is None:
        raise ValueError("exit rule sample needs the batch's sample_ids")
    rule = rule.resolved(L)
    if rule.name == "fixed" and rule.layers > L:
        raise ValueError(f"fixed.layers={rule.layers} but the model has {L} layers")
    for m in (model, heads):
        unshard_parameters(m)  # run outside their forward (the layers gather their own)
    exit_layer = torch.full((B,), L, dtype=torch.long, device=device)
    loss = torch.zeros(B, device=device)
    correct = torch.zeros(B, dtype=torch.bool, device=device)
    predicted = torch.full((B,), -1, dtype=torch.long, device=device)
    layer_rows = torch.zeros(L, dtype=torch.long)
    # rule state of every batch row
    reach = torch.ones(B, device=device)  # prod_{j<n} (1 - lambda_j)
    cumulative = torch.zeros(B, device=device)  # sum_{j<=n} p_j
    streak = torch.zeros(B, dtype=torch.long, device=device)
    last_prediction = torch.full_like(scored.targets, -1)

    active = torch.arange(B, device=device)  # batch rows still running, in batch order
    h = model.tok_embeddings(tokens)
    previous: Optional[torch.Tensor] = None  # the active rows' answer states of layer n-1
    for n, layer in enumerate(model.layers, start=1):
        if not _others_running(active.shape[0], sync, device):
            break
        if active.shape[0] == 0:  # other ranks go on: join the layer's collectives
            layer(h.new_zeros((1,) + h.shape[1:]))
            continue
        h = layer(h)
        layer_rows[n - 1] = active.shape[0]
        local = torch.arange(active.shape[0], device=device)
        state = h[local, scored.answer_positions[active]]
        if n == L:
            done = torch.ones_like(active, dtype=torch.bool)
        elif rule.name == "fixed":
            done = torch.full_like(active, n >= rule.layers, dtype=torch.bool)
        elif rule.name == "patience":
            entries = entries_of(active, scored)
            result = readout.read_rows(h, active, scored, entries)
            same = result.position_predictions == last_prediction[entries]
            mismatches = torch.zeros(active.shape[0], device=device).index_add(
                0, local_index(active, B)[scored.rows[entries]], (~same).float())
            unchanged = (mismatches == 0) if n > 1 else torch.zeros_like(active, dtype=torch.bool)
            streak[active] = torch.where(unchanged, streak[active] + 1, 0)
            last_prediction[entries] = result.position_predictions
            done = streak[active] >= rule.patience
        else:
            lam = heads.layer_lambda(n, state, previous)
            if rule.name == "q_exit":
                cumulative[active] += reach[active] * lam
                reach[active] *= 1.0 - lam
                done = cumulative[active] > rule.q
            else:
                done = sample_uniforms(rule.seed, sample_ids[active], n) < lam
        if bool(done.any()):
            rows = active[done]
            out = readout.read_rows(h[done], rows, scored)
            exit_layer[rows] = n
            loss[rows], correct[rows], predicted[rows] = out.loss, out.correct, out.predicted
            keep = ~done
            active, h, state = active[keep], h[keep], state[keep]
        previous = state
    for m in (model, heads):
        if isinstance(m, FSDPModule):
            m.reshard()
    has = scored.has_target
    return ExitResult(exit_layer, loss * has, correct & has, predicted, layer_rows)
