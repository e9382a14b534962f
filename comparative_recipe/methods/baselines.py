"""The regularisers a user would otherwise pick, as training methods of the same loop.

Both mask hidden units at the ablation sites with the masks of the comparative method's first
nested level (drop rate ``ablation.hidden.rate``, sites, granularity and scaling as configured),
so that a comparison with comparative training holds on the same data, seeds, sites and budget:

- ``method: dropout``: one masked pass per step, trained on its task loss: dropout at the
  ablation sites (torchtune's decoders have no dropout of their own). With granularity
  ``element`` it is standard (inverted) dropout on those activations; with ``unit`` every
  sample drops whole units (a sub-network per sample, as the comparative method's passes do).
- ``method: rdrop``: two passes with independent masks and, per sample,
  ``(CE_1 + CE_2) / 2 + alpha * (KL(p_1 || p_2) + KL(p_2 || p_1)) / 4``: the R-Drop objective
  of Liang et al. (2021), ``CE_1 + CE_2 + alpha/2 (KL(p_1||p_2) + KL(p_2||p_1))``, halved so that
  its cross-entropy part is on the scale of one pass (lr and clip_grad_norm carry over). The KL
  is over the distribution the task's cross-entropy uses (the vocabulary at each scored token
  for ``sft``, the label words for ``classification``), averaged over the sample's scored
  positions like its cross-entropy.

Validation is the comparative method's with c = 0: the full model, no masks (loss, accuracy,
macro-F1, and generated answers with ``validation.generate``), under the same metric names
(``val_loss_0``, ...), so that ``validation.metric`` and the reports read alike for every method.
"""

import dataclasses
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torchtune import utils

from comparative_recipe import checks
from comparative_recipe.ablation.hidden import HiddenAblationConfig, hidden_ablation_keys, install_hidden_ablation
from comparative_recipe.ablation.plan import AblationLevel
from comparative_recipe.methods.comparative import ComparativeMethod, disable_model_dropout
from comparative_recipe.passes import ComparativeStepSpec, PassInput, build_passes
from comparative_recipe.tasks import TaskLosses, per_sample_mean
from comparative_recipe.training.dataloader import RecipeData
from comparative_recipe.training.sums import Sums

log = utils.get_logger("INFO")

# The comparative method's sections that these methods do not read, and what to do instead.
_COMPARATIVE_ONLY = {
    "loss": "the comparative loss",
    "strategy": "how the comparative passes are run",
}
_ABLATION_KEYS = {"hidden", "seed"}
FIRST_LEVEL = AblationLevel(crop_level=0, drop_power=1)


def symmetric_kl(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """KL(p_a || p_b) + KL(p_b || p_a) of the softmax distributions, per row.

    logits_a, logits_b: [N, V] (any float dtype; computed in float32). Returns [N] float32,
    ``sum_v (p_a - p_b) * (log p_a - log p_b)``, which is >= 0 and 0 only where p_a = p_b.
    """
    la, lb = F.log_softmax(logits_a.float(), dim=-1), F.log_softmax(logits_b.float(), dim=-1)
    return ((la.exp() - lb.exp()) * (la - lb)).sum(dim=-1)


class _MaskedPassesMethod:
    """What dropout and R-Drop share: the config checks, the masks of the first nested level
    at the ablation sites, the step's sums and metrics, and full-model validation."""

    name = ""
    # ``validation.passes`` is the comparative method's: here validation is the full model only
    validation_keys = ComparativeMethod.validation_keys - {"passes"}
    normaliser = "weight"
    default_metric = ComparativeMethod.default_metric

    def __init__(self, hidden: HiddenAblationConfig, validator: ComparativeMethod) -> None:
        self.hidden, self.validator = hidden, validator
        self.spec: Optional[ComparativeStepSpec] = None

    @classmethod
    def _read_config(cls, cfg: DictConfig):
        """(hidden ablation config, full-model validator) from a recipe config, checked."""
        for key, what in _COMPARATIVE_ONLY.items():
            if key in cfg:
                raise ValueError(
                    f"`{key}` sets {what}, which method: {cls.name} does not use: remove it, "
                    "or set method: comparative"
                )
        section = cfg.get("ablation", None) or {}
        if isinstance(section, DictConfig):
            section = OmegaConf.to_container(section, resolve=True)
        other = sorted(set(section) - _ABLATION_KEYS)
        if other:
            raise ValueError(
                f"ablation.{other[0]} belongs to the comparative method's passes; method: "
                f"{cls.name} reads only ablation.hidden (its masks: the first level's drop rate "
                "ablation.hidden.rate, sites, granularity) and ablation.seed: remove "
                f"{['ablation.' + k for k in other]}"
            )
        if not section.get("hidden"):
            raise ValueError(
                f"method: {cls.name} masks hidden units as configured in ablation.hidden: set "
                "e.g. ablation.hidden: {rate: 0.1, sites: [ffn_hidden, attn_heads]}"
            )
        run_seed = cfg.get("seed", None)
        seed = checks.non_negative_int(
            section.get("seed", 0 if run_seed is None else run_seed), "ablation.seed"
        )
        try:
            hidden = HiddenAblationConfig(**{"seed": seed, **section["hidden"]})
        except TypeError as e:
            raise ValueError(f"bad ablation.hidden section {section['hidden']}: {e}") from e
        # validation: the comparative method with c = 0 (the full model), the same task and data
        validator = ComparativeMethod.from_config(OmegaConf.create({
            key: cfg[key] for key in ("task", "loss_reduction", "seed", "validation") if key in cfg
        }))
        return hidden, validator

    # ---------------------------------------------------------------- the loop's interface

    def set_tokenizer(self, tokenizer: Any) -> None:
        self.validator.set_tokenizer(tokenizer)

    def prepare(self, model: nn.Module, data: RecipeData) -> None:
        self.validator.prepare(model, data)
        changed = disable_model_dropout(model)
        if changed:
            utils.log_rank_zero(
                log, f"Dropout turned off in {len(changed)} places (e.g. {changed[0]}): "
                f"method: {self.name} masks the ablation sites instead",
            )
        install_hidden_ablation(model, self.hidden)
        self.spec = dataclasses.replace(self.validator.spec, plan=(FIRST_LEVEL,))

    def _masked_pass(self, batch: Dict[str, torch.Tensor], mask_key: int) -> PassInput:
        """The batch with the first level's masks keyed by ``mask_key`` (no crops)."""
        if self.spec is None:
            raise RuntimeError(f"{type(self).__name__}.prepare(model, data) must run before a step")
        return build_passes(batch, self.spec, mask_key)[1]

    def _forward(self, model: nn.Module, p: PassInput):
        with hidden_ablation_keys(p.keys):
            logits = model(p.tokens)
        return logits, self.spec.task(logits, p.targets)

    def _sums(self, outs: List[TaskLosses], sample_loss: torch.Tensor,
              kl: Optional[torch.Tensor] = None) -> Tuple[Sums, torch.Tensor]:
        """(the step's sums, each sample's weight in the back-propagated sum)."""
        first = outs[0]
        valid = first.n_tokens > 0
        vf = valid.float()
        weight = first.n_tokens.float() * vf if self.spec.reduction == "token" else vf
        sums = {
            "weight": weight.sum(),
            "weighted_loss": (sample_loss.detach() * weight).sum(),
            "samples": vf.sum(),
            "tokens": (first.n_tokens * valid).sum(),
            "ce": (torch.stack([o.loss.detach() for o in outs]).mean(0) * vf).sum(),
        }
        if kl is not None:
            sums["kl"] = (kl.detach() * vf).sum()
        if first.correct is not None:
            sums["correct"] = (first.correct * valid).sum()
        return Sums(sums), weight

    def step_metrics(self, sums: Dict[str, Any], seconds: float) -> Dict[str, float]:
        n = max(sums["samples"], 1.0)
        metrics = {
            "loss": sums["weighted_loss"] / max(sums["weight"], 1e-12),
            "ce": sums["ce"] / n,
            "samples": sums["samples"],
            "tokens": sums["tokens"],
            "tokens_per_second": sums["tokens"] / seconds,
        }
        if "kl" in sums:
            metrics["kl"] = sums["kl"] / n
        if "correct" in sums:
            metrics["accuracy"] = sums["correct"] / n  # of the (first) masked pass
        return metrics

    def validation_step(self, model: nn.Module, batch: Dict[str, torch.Tensor]) -> Sums:
        return self.validator.validation_step(model, batch)

    def validation_metrics(self, sums: Dict[str, Any]) -> Dict[str, float]:
        return self.validator.validation_metrics(sums)

    def validation_metric_names(self):
        return self.validator.validation_metric_names()

    def describe_validation(self, metrics: Dict[str, float]) -> str:
        return self.validator.describe_validation(metrics)


class DropoutMethod(_MaskedPassesMethod):
    """``method: dropout``: one pass per step with the first nested level's masks."""

    name = "dropout"
    config_keys = frozenset({"method", "ablation", "task", "loss_reduction"})

    @classmethod
    def from_config(cls, cfg: DictConfig) -> "DropoutMethod":
        return cls(*cls._read_config(cfg))

    def train_step(self, model: nn.Module, batch: Dict[str, torch.Tensor], step: int,
                   set_grad_sync=None) -> Sums:
        _, out = self._forward(model, self._masked_pass(batch, step))
        sums, weight = self._sums([out], out.loss)
        (out.loss * weight).sum().backward()
        return sums


class RDropMethod(_MaskedPassesMethod):
    """``method: rdrop``: two passes with independent masks, CE on both plus the symmetric KL
    between their predictions (``rdrop.alpha``, default 1.0)."""

    name = "rdrop"
    config_keys = frozenset({"method", "ablation", "task", "loss_reduction", "rdrop"})

    def __init__(self, hidden: HiddenAblationConfig, validator: ComparativeMethod,
                 alpha: float = 1.0) -> None:
        super().__init__(hidden, validator)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha < 0:
            raise ValueError(f"rdrop.alpha must be a number >= 0, got {alpha!r}")
        self.alpha = float(alpha)

    @classmethod
    def from_config(cls, cfg: DictConfig) -> "RDropMethod":
        section = cfg.get("rdrop", None) or {}
        checks.known_keys(dict(section), {"alpha"}, "rdrop")
        return cls(*cls._read_config(cfg), alpha=section.get("alpha", 1.0))

    @staticmethod
    def mask_key(step: int, pass_index: int) -> int:
        """The mask key of pass 0 or 1 at ``step``: distinct for every (step, pass)."""
        return 2 * step + pass_index

    def train_step(self, model: nn.Module, batch: Dict[str, torch.Tensor], step: int,
                   set_grad_sync=None) -> Sums:
        logits, outs, targets = [], [], None
        for j in range(2):
            p = self._masked_pass(batch, self.mask_key(step, j))
            lg, out = self._forward(model, p)
            logits.append(lg)
            outs.append(out)
            targets = p.targets
        z_a, rows = self.spec.task.scored_logits(logits[0], targets)
        z_b, _ = self.spec.task.scored_logits(logits[1], targets)
        kl = per_sample_mean(symmetric_kl(z_a, z_b), rows, targets.shape[0])
        sample_loss = (outs[0].loss + outs[1].loss) / 2 + self.alpha * kl / 4
        sums, weight = self._sums(outs, sample_loss, kl)
        (sample_loss * weight).sum().backward()
        return sums

