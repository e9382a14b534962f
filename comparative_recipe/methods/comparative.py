"""The cross-model comparative loss as a training method of the one loop.

Its own parts: the ``ablation``/``loss``/``task``/``strategy``/``loss_reduction`` config keys
(read and checked here before anything runs), the model preparation (hidden-unit ablation hooks;
the builder's own dropout turned off, since the method's full model runs without any ablation and
every strategy must see the same forward), the step (``passes.comparative_step``) and its
metrics. Validation scores the full model alone (``validation.passes: full``, the default: enough
to select a checkpoint) or every pass (``all``: the ablation curve, about (1+c) x the cost).
With ``validation.generate`` (e.g. ``{max_new_tokens: 32}``) it also generates each QA sample's
answer greedily in every validated pass and reports exact match and token F1
(``metrics.generation``).
"""

from dataclasses import dataclass
from typing import Any, Dict, FrozenSet, List, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torchtune import config, utils

from comparative_recipe import checks
from comparative_recipe.ablation.hidden import HiddenAblationConfig, install_hidden_ablation
from comparative_recipe.ablation.plan import ORDERS, AblationLevel, ablation_plan
from comparative_recipe.loss import ComparativeLoss
from comparative_recipe.passes import (
    ComparativeStepSpec,
    REDUCTIONS,
    STRATEGIES,
    build_passes,
    comparative_metrics,
    comparative_step,
)
from comparative_recipe.metrics.generation import (
    AnswerDecoder,
    GenerationSettings,
    generation_metrics,
    generation_sums,
    stop_token_ids,
)
from comparative_recipe.tasks import build_task
from comparative_recipe.training.dataloader import RecipeData
from comparative_recipe.training.sums import Sums

log = utils.get_logger("INFO")

# Views and masks of validation batches use this step key, so every validation sees the same
# ablated inputs and the numbers are comparable across a run.
VALIDATION_STEP_KEY = -1
VALIDATION_PASSES = ("full", "all")
# How many samples the data checks look at before training starts.
_PROBE_SAMPLES = 64


@dataclass
class ComparativeSettings:
    """The ``ablation`` section and strategy keys of a config, checked.

    plan: the c ablation levels; hidden: hidden-unit ablation (None when no step masks units);
    crop_rate: q of the nested crops; seed: keys masks and crops; strategy, reduction: see
    ``passes.comparative_step``.
    """

    plan: List[AblationLevel]
    hidden: Optional[HiddenAblationConfig]
    crop_rate: float
    seed: int
    strategy: str
    reduction: str

    @property
    def num_ablations(self) -> int:
        return len(self.plan)

    @property
    def uses_crops(self) -> bool:
        return any(lvl.crop_level > 0 for lvl in self.plan)

    @classmethod
    def from_config(cls, cfg: DictConfig) -> "ComparativeSettings":
        """Reads ``ablation``, ``strategy``, ``loss_reduction`` and ``seed`` of a recipe config.

        Expected layout (all keys optional; no ``ablation`` section means c = 0)::

            ablation:
              n_hidden: 1          # hidden-unit ablation steps
              n_input: 1           # input-crop steps
              order: crop_first
              seed: 0              # default: the run's seed
              hidden: {rate: 0.1, sites: [ffn_hidden, attn_heads], granularity: unit, scale: true}
              crop: {rate: 0.5}
        """
        section = cfg.get("ablation", None) or {}
        if isinstance(section, DictConfig):
            section = OmegaConf.to_container(section, resolve=True)
        checks.known_keys(section, {"n_hidden", "n_input", "order", "hidden", "crop", "seed"},
                          "ablation")
        n_hidden = checks.non_negative_int(section.get("n_hidden", 0), "ablation.n_hidden")
        n_input = checks.non_negative_int(section.get("n_input", 0), "ablation.n_input")
        order = checks.choice(section.get("order", "crop_first"), ORDERS, "ablation.order")
        plan = ablation_plan(n_hidden, n_input, order)

        run_seed = cfg.get("seed", None)
        seed = checks.non_negative_int(
            section.get("seed", 0 if run_seed is None else run_seed), "ablation.seed"
        )
        hidden_cfg = dict(section.get("hidden") or {})
        hidden = None
        if n_hidden > 0:
            hidden_cfg.setdefault("seed", seed)
            try:
                hidden = HiddenAblationConfig(**hidden_cfg)
            except TypeError as e:
                raise ValueError(f"bad ablation.hidden section {hidden_cfg}: {e}") from e
        elif hidden_cfg:
            raise ValueError(
                "ablation.hidden is set but ablation.n_hidden is 0, so it would be ignored: set "
                "ablation.n_hidden >= 1 or remove ablation.hidden"
            )
        crop_cfg = dict(section.get("crop") or {})
        checks.known_keys(
            crop_cfg, {"rate"}, "ablation.crop",
            "How the input is split into chunks is a property of the dataset: set it in the "
            "dataset's `chunking` section",
        )
        if crop_cfg and n_input == 0:
            raise ValueError(
                "ablation.crop is set but ablation.n_input is 0, so it would be ignored: set "
                "ablation.n_input >= 1 or remove ablation.crop"
            )
        crop_rate = checks.rate(crop_cfg.get("rate", 0.5), "ablation.crop.rate")
        strategy = checks.choice(cfg.get("strategy", "sequential"), STRATEGIES, "strategy")
        reduction = checks.choice(cfg.get("loss_reduction", "sample"), REDUCTIONS, "loss_reduction")
        return cls(plan, hidden, crop_rate, seed, strategy, reduction)


def check_dataset_supports_crops(dataset) -> None:
    """Input-crop steps need samples with droppable chunks: fail before training if none has."""
    n = min(len(dataset), _PROBE_SAMPLES)
    for i in range(n):
        chunk_ids = dataset[i].get("chunk_ids")
        if chunk_ids is not None and max(chunk_ids, default=-1) >= 0:
            return
    raise ValueError(
        f"ablation.n_input > 0 but none of the first {n} samples has a droppable chunk: the "
        "dataset must split its context into chunks (comparative_recipe.data: "
        "context_qa_dataset, or comparative_dataset with a `chunking` section), and the "
        "protected spans (protect_leading/protect_trailing) must leave some context; or set "
        "ablation.n_input: 0"
    )


def disable_model_dropout(model: nn.Module) -> List[str]:
    """Sets every dropout of a torchtune model to 0: ``nn.Dropout`` modules (LoRA dropout too)
    and the attention's ``attn_dropout`` probability. Returns the names of what was changed."""
    changed = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Dropout) and module.p > 0:
            module.p = 0.0
            changed.append(name)
        p = getattr(module, "attn_dropout", None)
        if isinstance(p, float) and p > 0:
            module.attn_dropout = 0.0
            changed.append(f"{name}.attn_dropout")
    return changed


class ComparativeMethod:
    """Comparative-loss fine-tuning (``training.trainer.TrainingMethod``).

    Build with ``ComparativeMethod.from_config(cfg)`` (checks every key of its sections); the
    trainer then calls ``prepare`` with the loaded model and the data.
    """

    config_keys = frozenset({"method", "ablation", "loss", "task", "strategy", "loss_reduction"})
    validation_keys = frozenset({"passes", "generate"})
    normaliser = "weight"
    default_metric = "val_loss_0"

    def __init__(self, settings: ComparativeSettings, loss_fn: ComparativeLoss, task: str = "sft",
                 validation_passes: str = "full",
                 generation: Optional[GenerationSettings] = None) -> None:
        self.settings, self.loss_fn, self.task_name = settings, loss_fn, task
        self.validation_passes = checks.choice(
            validation_passes, VALIDATION_PASSES, "validation.passes"
        )
        if generation is not None and task != "sft":
            raise ValueError(
                f"validation.generate scores generated answers (generative QA, task: sft); with "
                f"task: {task} remove it (classification reports accuracy and macro-F1)"
            )
        self.generation = generation
        self.tokenizer: Any = None
        self.spec: Optional[ComparativeStepSpec] = None

    @classmethod
    def from_config(cls, cfg: DictConfig) -> "ComparativeMethod":
        settings = ComparativeSettings.from_config(cfg)
        loss_cfg = cfg.get("loss", None)
        loss_fn = ComparativeLoss() if loss_cfg is None else config.instantiate(loss_cfg)
        val = cfg.get("validation", None) or {}
        return cls(settings, loss_fn, cfg.get("task", "sft"), val.get("passes", "full"),
                   GenerationSettings.from_config(val.get("generate", None)))

    def set_tokenizer(self, tokenizer: Any) -> None:
        """The run's tokenizer (the trainer hands it over before ``prepare``): generative
        validation decodes answers and stops at its EOS / stop tokens."""
        self.tokenizer = tokenizer

    def validation_metric_names(self) -> FrozenSet[str]:
        """The names ``validation_metrics`` returns (without ``val_``), known from the config
        alone, so that the trainer checks ``validation.metric`` before training."""
        n = 1 + (self.settings.num_ablations if self.validation_passes == "all" else 0)
        per_pass = ["loss"]
        if self.task_name == "classification":
            per_pass += ["accuracy", "macro_f1"]
        if self.generation is not None:
            per_pass += ["exact_match", "f1"]
        names = {"samples"} | {f"{name}_{k}" for name in per_pass for k in range(n)}
        if n > 1:
            names |= {"cmp_loss", "violation_rate"}
        return frozenset(names)

    def pass_labels(self) -> List[str]:
        """A short description of each validated pass (pass 0 first), for reports."""
        n = 1 + (self.settings.num_ablations if self.validation_passes == "all" else 0)
        return [describe_level(lvl, self.settings) for lvl in [AblationLevel(0, 0), *self.settings.plan][:n]]

    def prepare(self, model: nn.Module, data: RecipeData) -> None:
        s = self.settings
        if s.uses_crops:
            check_dataset_supports_crops(data.dataset)
        task = build_task(self.task_name, data.dataset)
        if s.num_ablations > 0:
            changed = disable_model_dropout(model)
            if changed:
                utils.log_rank_zero(
                    log, f"Dropout turned off in {len(changed)} places (e.g. {changed[0]}): the "
                    "comparative method's full model runs without ablation, and its ablations "
                    "are the configured hidden-unit masks",
                )
        if s.hidden is not None:
            install_hidden_ablation(model, s.hidden)
        self.spec = ComparativeStepSpec(
            plan=s.plan, task=task, loss_fn=self.loss_fn, strategy=s.strategy,
            reduction=s.reduction, crop_rate=s.crop_rate, seed=s.seed, pad_id=data.pad_id,
        )
        self._validation_spec = (
            self.spec if self.validation_passes == "all" else self.spec.full_model_only()
        )
        if self.generation is not None:
            if self.tokenizer is None:
                raise RuntimeError(
                    "validation.generate needs the tokenizer: call set_tokenizer(tokenizer) "
                    "before prepare (the trainer does)"
                )
            self._stop_tokens = stop_token_ids(self.tokenizer, self.generation.stop_tokens)
            if not self._stop_tokens:
                raise ValueError(
                    "validation.generate: the tokenizer has no eos_id or stop_tokens, so an "
                    "answer would never end early; set validation.generate.stop_tokens"
                )
            self._decoder = AnswerDecoder(self.tokenizer, self._stop_tokens)
            self._pad_id = data.pad_id

    def _require_prepared(self) -> ComparativeStepSpec:
        if self.spec is None:
            raise RuntimeError("ComparativeMethod.prepare(model, data) must run before a step")
        return self.spec

    def train_step(self, model: nn.Module, batch: Dict[str, torch.Tensor], step: int,
                   set_grad_sync=None) -> Sums:
        spec = self._require_prepared()
        return comparative_step(model, batch, spec, step=step, set_grad_sync=set_grad_sync).sums()

    def validation_step(self, model: nn.Module, batch: Dict[str, torch.Tensor]) -> Sums:
        self._require_prepared()
        sums = comparative_step(
            model, batch, self._validation_spec, step=VALIDATION_STEP_KEY, backward=False
        ).sums()
        if self.generation is None:
            return sums
        # the same views and mask keys as the loss passes (they depend on the step key only)
        passes = build_passes(batch, self._validation_spec, VALIDATION_STEP_KEY)
        generated = generation_sums(
            model, passes, self.generation, self._decoder, self._stop_tokens, self._pad_id
        )
        return Sums({**sums.values, **generated})

    def step_metrics(self, sums: Dict[str, Any], seconds: float) -> Dict[str, float]:
        metrics = comparative_metrics(sums)
        metrics["tokens_per_second"] = metrics["tokens"] / seconds
        metrics["pass_tokens_per_second"] = sum(sums["pass_tokens"]) / seconds
        return metrics

    def validation_metrics(self, sums: Dict[str, Any]) -> Dict[str, float]:
        metrics = comparative_metrics(sums)
        keep = ("loss_", "accuracy_", "macro_f1_", "samples")
        if len(sums["pass_loss"]) > 1:
            keep += ("cmp_loss", "violation_rate")
        metrics = {k: v for k, v in metrics.items() if k.startswith(keep)}
        metrics.update(generation_metrics(sums))
        return metrics

    def describe_validation(self, metrics: Dict[str, float]) -> str:
        n_passes = sum(k.startswith("val_loss_") for k in metrics)
        parts = [f"loss_{k}={metrics[f'val_loss_{k}']:.4f}" for k in range(n_passes)]
        for name in ("accuracy", "macro_f1", "exact_match", "f1"):
            parts += [
                f"{name}_{k}={metrics[f'val_{name}_{k}']:.4f}"
                for k in range(n_passes) if f"val_{name}_{k}" in metrics
            ]
        line = " ".join(parts)
        if n_passes > 1:
            losses = [metrics[f"val_loss_{k}"] for k in range(n_passes)]
            ahead = all(losses[0] < other for other in losses[1:])
            line += " (full model ahead of every ablation)" if ahead else (
                " (full model NOT ahead of every ablation)")
        return line


def describe_level(level: AblationLevel, settings: ComparativeSettings) -> str:
    """``full model``, or what a pass ablates: its crop rate q_i (at least i chunks) and its
    hidden-unit drop rate p_i, e.g. ``crop q=0.50 + hidden p=0.10``."""
    parts = []
    if level.crop_level > 0:
        q = 1.0 - (1.0 - settings.crop_rate) ** level.crop_level
        parts.append(f"crop q={q:.2f}")
    if level.drop_power > 0 and settings.hidden is not None:
        p = 1.0 - (1.0 - settings.hidden.rate) ** level.drop_power
        parts.append(f"hidden p={p:.2f}")
    return " + ".join(parts) if parts else "full model"
