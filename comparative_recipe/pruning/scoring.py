"""Scoring units on data for pruning, as a method of the training loop's evaluation.

``PruneScorer.validation_step`` turns one batch into named sums that add over batches and
ranks (``Trainer.validation_sums``): per site, the concatenated per-layer unit scores of
``attribution`` (activation x gradient of the answers' log-likelihood,
``comparative_recipe.attribution``) or the per-channel squared activation norms that ``wanda``
needs. ``unit_scores`` then gives every method's scores from those sums and the full model's
weights.

The answers (targets) are the dataset's in the ``supervised`` setting. In the ``unsupervised``
one they are the model's own: for generative QA its greedy answer to the prompt (the tokens
before the dataset's answer, which is never read), for classification its predicted label word.
A row with no target (an excluded sample, a rank's padding item) counts nowhere.
"""

from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX

from comparative_recipe import neurons
from comparative_recipe.attribution import site_attributions
from comparative_recipe.loss import ComparativeLoss
from comparative_recipe.methods.comparative import VALIDATION_STEP_KEY
from comparative_recipe.metrics.generation import greedy_generate, qa_prompts, stop_token_ids
from comparative_recipe.passes import ComparativeStepSpec, build_passes
from comparative_recipe.pruning.scores import magnitude_scores, random_scores, wanda_scores
from comparative_recipe.pruning.settings import PruneSettings
from comparative_recipe.tasks import ClassificationTask, build_task
from comparative_recipe.training.dataloader import RecipeData
from comparative_recipe.training.sums import Sums


def pseudo_answers(
    model: nn.Module, task: Any, tokens: torch.Tensor, targets: torch.Tensor, real: torch.Tensor,
    *, max_new_tokens: int, stop_tokens: List[int], pad_id: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The model's own answers as targets (see the module doc).

    Args:
        tokens: [B, S] right-padded inputs. targets: [B, S] their shifted labels (where the
            answer starts; QA: the labelled tokens themselves are never read). real: [B, S]
            bool, the tokens that are not padding.

    Returns:
        (tokens [B, S'], targets [B, S'], real [B, S'] bool): classification keeps the tokens
        and scores the predicted label word at the answer position; QA returns prompt +
        greedy answer.
    """
    if isinstance(task, ClassificationTask):
        with torch.no_grad():
            z, rows = task.scored_logits(model(tokens), targets)
        _, pos = task._answer_positions(targets)
        new = torch.full_like(targets, CROSS_ENTROPY_IGNORE_IDX)
        label_ids = task.label_token_ids.to(targets.device)
        new[rows, pos[rows]] = label_ids[z.argmax(dim=1)]
        return tokens, new, real
    prompt_lengths, has, _ = qa_prompts(tokens, targets)
    answers = greedy_generate(model, tokens, prompt_lengths, max_new_tokens=max_new_tokens,
                              stop_tokens=stop_tokens, pad_id=pad_id, active=has)
    lengths = [int(p) + len(a) for p, a in zip(prompt_lengths.tolist(), answers)]
    width = max(max(lengths), 1)
    out = tokens.new_full((tokens.shape[0], width), pad_id)
    new = torch.full_like(out, CROSS_ENTROPY_IGNORE_IDX)
    real = torch.zeros_like(out, dtype=torch.bool)
    for b, (p, a) in enumerate(zip(prompt_lengths.tolist(), answers)):
        if not bool(has[b]):
            continue
        p = int(p)
        out[b, :p] = tokens[b, :p]
        real[b, :p + len(a)] = True
        if a:
            ids = torch.tensor(a, dtype=tokens.dtype, device=tokens.device)
            out[b, p:p + len(a)] = ids
            new[b, p - 1:p - 1 + len(a)] = ids
    return out, new, real


class PruneScorer:
    """Scores units on the data (a method of ``Trainer.evaluate``; see the module doc)."""

    normaliser = "samples"
    default_metric = "val_samples"

    def __init__(self, settings: PruneSettings, method: Any, task: str) -> None:
        # the run's method: its keys are the config's, the scorer reads none of them
        self.config_keys = frozenset(method.config_keys) | {"prune"}
        self.validation_keys = frozenset(method.validation_keys)
        self.settings, self.task_name = settings, task
        self.tokenizer: Any = None
        self.units: Optional[Dict[str, List[int]]] = None
        self.on_batch = None  # called with 1 after every batch (a progress bar's update), if set

    def set_tokenizer(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def prepare(self, model: nn.Module, data: RecipeData) -> None:
        self.task = build_task(self.task_name, data.dataset)
        self.pad_id = data.pad_id
        self.num_layers = len(neurons.find_layers(model))
        self.units = {site: [lay.width if self.settings.method == "wanda" else lay.units
                             for lay in neurons.site_layouts(model, site)]
                      for site in self.settings.sites}
        self.stop_tokens = stop_token_ids(self.tokenizer, self.settings.generation.stop_tokens) \
            if self.tokenizer is not None else list(self.settings.generation.stop_tokens)

    def _inputs(self, model: nn.Module, batch: Dict[str, torch.Tensor]):
        spec = ComparativeStepSpec(plan=(), task=self.task, loss_fn=ComparativeLoss(),
                                   pad_id=self.pad_id)
        full = build_passes(batch, spec, VALIDATION_STEP_KEY)[0]
        tokens, targets, real = full.tokens, full.targets, full.keys.token_keys >= 0
        if self.settings.data == "unsupervised":
            tokens, targets, real = pseudo_answers(
                model, self.task, tokens, targets, real,
                max_new_tokens=self.settings.generation.max_new_tokens,
                stop_tokens=self.stop_tokens, pad_id=self.pad_id,
            )
        scored = targets != CROSS_ENTROPY_IGNORE_IDX
        has = scored.any(dim=1)
        positions = scored if self.settings.positions == "answer" else real
        return tokens, targets, positions & has[:, None], has

    def validation_step(self, model: nn.Module, batch: Dict[str, torch.Tensor]) -> Sums:
        if self.units is None:
            raise RuntimeError("PruneScorer.prepare(model, data) must run before a step")
        tokens, targets, positions, has = self._inputs(model, batch)
        sums = {"samples": has.sum().double(), "positions": positions.sum().double()}
        if self.settings.method == "attribution":
            sums.update(self._attribution(model, tokens, targets, positions))
        else:
            sums.update(self._squared_norms(model, tokens, positions))
        if self.on_batch is not None:
            self.on_batch(1)
        return Sums(sums)

    def _attribution(self, model, tokens, targets, positions) -> Dict[str, torch.Tensor]:
        def log_likelihood(logits):
            out = self.task(logits, targets)
            return -(out.loss * out.n_tokens).sum()  # summed log-probability of the answers

        n, step = self.num_layers, self.settings.layers_per_pass or self.num_layers
        parts: Dict[str, List[torch.Tensor]] = {site: [] for site in self.settings.sites}
        for first in range(0, n, step):  # one forward and backward per group of layers
            scores = site_attributions(
                model, tokens, log_likelihood, positions, sites=self.settings.sites,
                reduce=self.settings.reduce, layers=range(first, min(first + step, n)),
            )
            for site, per_layer in scores.items():
                parts[site].extend(per_layer)
        return {f"score_{site}": torch.cat(v).double() for site, v in parts.items()}

    def _squared_norms(self, model, tokens, positions) -> Dict[str, torch.Tensor]:
        sums: Dict[str, Dict[int, torch.Tensor]] = {site: {} for site in self.settings.sites}
        weight = positions.to(torch.float32)[..., None, None]

        def recorder(site):
            def record(lay: neurons.SiteLayout, x: torch.Tensor) -> None:
                sums[site][lay.layer_index] = ((x.float() ** 2) * weight).sum((0, 1)).flatten()
            return record

        handles = [neurons.register_site_hook(model, site, recorder(site))
                   for site in self.settings.sites]
        try:
            with torch.no_grad():
                model(tokens)
        finally:
            for h in handles:
                h.remove()
        return {f"score_{site}": torch.cat([sums[site][i] for i in range(self.num_layers)]).double()
                for site in self.settings.sites}

    def validation_metrics(self, sums: Dict[str, Any]) -> Dict[str, float]:
        return {"samples": float(sums["samples"]), "positions": float(sums["positions"])}

    def data_sums(self, sums: Dict[str, Any]) -> Dict[str, List[torch.Tensor]]:
        """``{site: [per-layer tensor]}`` of the summed scores (or squared norms)."""
        out = {}
        for site in self.settings.sites:
            flat = torch.as_tensor(sums[f"score_{site}"], dtype=torch.float64)
            out[site] = list(torch.split(flat, self.units[site]))
        return out


def unit_scores(model: nn.Module, settings: PruneSettings,
                data: Optional[Dict[str, List[torch.Tensor]]] = None) -> Dict[str, List[torch.Tensor]]:
    """``{site: [float [U] per layer]}``: the scores of ``settings.method`` on the full
    (unsharded) ``model``; ``data``: ``PruneScorer.data_sums`` for the data methods."""
    out = {}
    for site in settings.sites:
        layouts = neurons.site_layouts(model, site)
        if settings.method == "attribution":
            out[site] = [s.float() for s in data[site]]
        elif settings.method == "wanda":
            out[site] = [wanda_scores(lay, s) for lay, s in zip(layouts, data[site])]
        elif settings.method == "magnitude":
            out[site] = [magnitude_scores(lay) for lay in layouts]
        else:
            out[site] = [random_scores(lay.units, settings.seed, site, lay.layer_index)
                         for lay in layouts]
    return out
