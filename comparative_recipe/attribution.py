"""Attribution of the task to neuron units: activation x gradient, the score that analysis plots
and pruning ranks by.

A unit's effect at one token is the first-order change of the objective (the log-likelihood of
the scored answer tokens, teacher-forced) when the unit is zeroed there:
``|sum_g a[t, u, g] * dJ/da[t, u, g]|`` over the unit's channels g (a head's head_dim; 1 for
FFN channels and residual outputs). A unit's score sums that effect over the positions of each
example (``reduce="sum"``) or takes its maximum (``"max"``), and sums over examples.
``"taylor"`` takes the absolute value of the signed sum over the example's positions instead,
``|sum_t sum_g a * dJ/da|``: the first-order change of the objective when the unit is zeroed at
every position at once, which is what pruning does (effects of opposite sign cancel). The sites and
units are those of ``comparative_recipe.neurons``: the units the comparative loss masks.
"""

from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from comparative_recipe import checks, neurons

REDUCTIONS = ("sum", "max", "taylor")


def attribution_scores(
    acts: torch.Tensor, grads: torch.Tensor, positions: torch.Tensor, reduce: str = "sum"
) -> torch.Tensor:
    """Per-unit attribution scores of one site on one layer, summed over rows.

    Args:
        acts: [R, S, U, G] the site's activation (U units of G channels).
        grads: [R, S, U, G] the objective's gradient with respect to it.
        positions: [R, S] bool, the tokens that count (real tokens, not padding).
        reduce: "sum" or "max" of the per-token effect over each row's positions, or
            "taylor", the absolute signed sum.

    Returns:
        float32 [U]: sum over rows of reduce_t |sum_g acts * grads| ("taylor":
        |sum_t sum_g acts * grads|).
    """
    checks.choice(reduce, REDUCTIONS, "attribution reduce")
    if acts.shape != grads.shape or acts.dim() != 4 or positions.shape != acts.shape[:2]:
        raise ValueError(
            f"attribution_scores: acts and grads must both be [R, S, U, G] and positions [R, S], "
            f"got {tuple(acts.shape)}, {tuple(grads.shape)} and {tuple(positions.shape)}"
        )
    signed = (acts.float() * grads.float()).sum(-1) * positions[..., None].float()  # [R, S, U]
    if reduce == "taylor":
        return signed.sum(1).abs().sum(0)
    effect = signed.abs()  # >= 0: a position left out (0) never wins a max
    per_row = effect.sum(1) if reduce == "sum" else effect.amax(1)
    return per_row.sum(0)


def site_attributions(
    model: nn.Module,
    tokens: torch.Tensor,
    objective: Callable[[torch.Tensor], torch.Tensor],
    positions: torch.Tensor,
    sites: Sequence[str] = ("ffn_hidden", "attn_heads"),
    reduce: str = "sum",
    layers: Optional[Sequence[int]] = None,
) -> Dict[str, List[torch.Tensor]]:
    """Attribution scores of every unit of ``sites`` on every layer for one batch.

    Runs ``model(tokens)`` with grad enabled, ``objective(logits)`` (a 0-d tensor to maximise,
    e.g. the summed log-likelihood of the answer tokens) and one ``torch.autograd.grad`` with
    respect to the site activations only: no parameter's ``.grad`` is touched, and frozen
    parameters (LoRA, QLoRA) are fine. Activation checkpointing is fine too (a recompute
    records nothing).

    Args:
        tokens: [R, S] input ids. positions: [R, S] bool, the positions that count.
        layers: the layer indices probed (default all): memory holds the site activations of
            those layers alone, so a long input is scored a few layers per call.

    Returns:
        ``{site: [float32 [units] of each probed layer, in layer order]}`` summed over the rows.
    """
    checks.choice(reduce, REDUCTIONS, "attribution reduce")
    records: Dict[str, Dict[int, tuple]] = {site: {} for site in sites}
    probed = None if layers is None else frozenset(int(i) for i in layers)
    handles = []

    def recorder(site: str):
        def record(lay: neurons.SiteLayout, x: torch.Tensor) -> torch.Tensor:
            # a zero the objective is differentiated against: its gradient is the activation's,
            # and the graph needs no parameter that requires grad
            if probed is not None and lay.layer_index not in probed:
                return None
            probe = torch.zeros_like(x, requires_grad=True)
            if torch._C._current_graph_task_id() == -1:  # not a checkpoint recompute
                if lay.layer_index in records[site]:
                    raise ValueError(
                        f"site_attributions: layer {lay.layer_index} computed {site} twice in "
                        "one forward"
                    )
                records[site][lay.layer_index] = (x.detach(), probe)
            return x + probe

        return record

    try:
        for site in sites:
            handles.append(neurons.register_site_hook(model, site, recorder(site)))
        with torch.enable_grad():
            value = objective(model(tokens))
            if value.dim() != 0:
                raise ValueError(f"the attribution objective must be 0-d, got {tuple(value.shape)}")
            order = [(site, i) for site in sites for i in sorted(records[site])]
            grads = torch.autograd.grad(value, [records[s][i][1] for s, i in order])
    finally:
        for h in handles:
            h.remove()
    out: Dict[str, List[torch.Tensor]] = {site: [] for site in sites}
    for (site, i), grad in zip(order, grads):
        out[site].append(attribution_scores(records[site][i][0], grad, positions, reduce))
    return out
