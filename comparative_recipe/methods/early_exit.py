"""Early exit with a learned halting distribution as a training method of the one loop
(PonderNet's objective, PALBERT's deterministic Q-exit; ``method: early_exit``).

Its own parts: the ``early_exit`` section, the halting heads (``early_exit.heads``; a module the
trainer optimises, shards and saves beside the model as ``halting_heads.safetensors``), the
step and its metrics. Every layer's output at the scored positions is read out by the model's
own norm and output projection (``early_exit.readout``: label words for ``task:
classification``, the vocabulary for answers), and the loss is

    sum_n p_n * taskloss_n + beta * KL(p_G || p)     (or KL(p || p_G): ``kl: exit_to_prior``)

per sample, p the exit distribution of the halting heads (``early_exit.ponder``), floored at
eps / L once the mass before a layer reaches 1 - eps, p_G the truncated geometric prior of
``lambda_p``; the loop divides the summed loss by the number of samples.

Settings (``early_exit`` section; defaults are PALBERT's, the KL direction measured here, see
the README)::

    early_exit:
      objective: pondernet # pabee: PABEE's baseline (no heads; sum_n n L_n / sum_n n)
      halting: {kind: mlp, depth: 3, hidden_dim: 128}   # or {kind: linear}
      lambda_p: 0.1        # prior's halting probability, in (0, 1)
      beta: 0.5            # KL weight, >= 0
      eps: 0.05            # floor, in [0, 1)
      kl: prior_to_exit    # KL(p_G || p); exit_to_prior: KL(p || p_G)
      seed: 0              # heads' initialisation; default the run's seed

Validation scores every layer once (loss, expected layers, the Q-exit decision of the whole
depth at q = 0.5, each layer's loss and metric: what fixed truncation at that depth gives).
``validation.exit_rules`` (what ``tune-cmp eval`` sets by default) also runs the layer-by-layer
inference of each rule (``early_exit.inference``) and of all layers, timing each::

    validation:
      exit_rules: {q_exit: {q: 0.5}, sample: {seed: 0}, patience: {patience: 6}, fixed: {layers: 12}}
"""

import time
from dataclasses import dataclass, field
from typing import Any, Dict, FrozenSet, List, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torchtune import utils

from comparative_recipe import checks
from comparative_recipe.early_exit.heads import HaltingHeadSettings, HaltingHeads
from comparative_recipe.early_exit.inference import EXIT_RULES, ExitRule, early_exit_forward
from comparative_recipe.early_exit.ponder import (
    KL_DIRECTIONS,
    PonderTerms,
    exit_distribution,
    exit_histogram,
    expected_layers,
    floor_exit_distribution,
    layer_weighted_loss,
    ponder_loss,
    q_exit_layers,
    truncated_geometric_prior,
)
from comparative_recipe.early_exit.readout import TaskReadout
from comparative_recipe.passes import macro_f1
from comparative_recipe.tasks import _whole, build_task, shift_labels
from comparative_recipe.training.dataloader import RecipeData
from comparative_recipe.training.distributed import unshard_parameters
from comparative_recipe.training.sums import Sums

log = utils.get_logger("INFO")

EARLY_EXIT_KEYS = frozenset({"objective", "halting", "lambda_p", "beta", "eps", "kl", "seed"})
# pondernet: the halting heads and the PonderNet loss; pabee: PABEE's baseline, no heads, the
# layers' losses weighted by their index (exit by patience, or at a fixed layer).
OBJECTIVES = ("pondernet", "pabee")
_HALTING_KEYS = EARLY_EXIT_KEYS - {"objective"}
HEADS_MODULE = "halting_heads"
# The whole-depth Q-exit that validation reports during training.
VALIDATION_Q = 0.5
_RULE_KEYS = {"q_exit": {"q"}, "sample": {"seed"}, "patience": {"patience"}, "fixed": {"layers"}}
# What every timed rule is compared with: all layers through the same layer-by-layer code.
FULL = "full"
DEFAULT_EXIT_RULES = {"pondernet": {"q_exit": {"q": 0.5}, "sample": {"seed": 0}, "patience": None},
                      "pabee": {"patience": None}}


@dataclass(frozen=True)
class EarlyExitSettings:
    """The ``early_exit`` section, checked (see the module doc)."""

    objective: str = "pondernet"
    halting: HaltingHeadSettings = field(default_factory=HaltingHeadSettings)
    lambda_p: float = 0.1
    beta: float = 0.5
    eps: float = 0.05
    kl: str = "prior_to_exit"
    seed: int = 0

    def __post_init__(self) -> None:
        checks.choice(self.objective, OBJECTIVES, "early_exit.objective")
        checks.open_unit(self.lambda_p, "early_exit.lambda_p")
        checks.finite_number(self.beta, "early_exit.beta", allow_zero=True)
        checks.rate(self.eps, "early_exit.eps")
        checks.choice(self.kl, KL_DIRECTIONS, "early_exit.kl")
        checks.non_negative_int(self.seed, "early_exit.seed")

    @classmethod
    def from_config(cls, cfg: DictConfig) -> "EarlyExitSettings":
        section = _plain(cfg.get("early_exit", None)) or {}
        checks.known_keys(section, EARLY_EXIT_KEYS, "early_exit")
        if section.get("objective") == "pabee" and _HALTING_KEYS & set(section):
            raise ValueError(
                f"early_exit.objective: pabee trains no halting heads, so "
                f"{sorted(_HALTING_KEYS & set(section))} would be ignored: remove them, or use "
                "objective: pondernet"
            )
        halting = section.pop("halting", None) or {}
        checks.known_keys(halting, {"kind", "depth", "hidden_dim"}, "early_exit.halting")
        if halting.get("kind") == "linear" and {"depth", "hidden_dim"} & set(halting):
            raise ValueError(
                "early_exit.halting: a linear head has no hidden layers, so depth and hidden_dim "
                "would be ignored: remove them (on the command line: "
                "'early_exit.halting={kind: linear}'), or set kind: mlp"
            )
        run_seed = cfg.get("seed", None)
        section.setdefault("seed", 0 if run_seed is None else run_seed)
        return cls(halting=HaltingHeadSettings(**halting), **section)


def _plain(section: Any) -> Any:
    if isinstance(section, DictConfig):
        return OmegaConf.to_container(section, resolve=True)
    return dict(section) if isinstance(section, dict) else section


def exit_rules_from_config(section: Any, objective: str = "pondernet") -> List[ExitRule]:
    """``validation.exit_rules``: a mapping rule name -> its settings (or null for the
    defaults), e.g. ``{q_exit: {q: 0.5}, patience: null}``, in the order given; or ``default``:
    q_exit (q 0.5), sample and patience, or patience alone for ``objective: pabee``."""
    section = _plain(section)
    if section == "default":
        section = DEFAULT_EXIT_RULES[objective]
    if not isinstance(section, dict) or not section:
        raise ValueError(
            f"validation.exit_rules must map rule names {list(EXIT_RULES)} to their settings, "
            f"e.g. {{q_exit: {{q: 0.5}}, patience: {{patience: 6}}}}; got {section!r}"
        )
    rules = []
    for name, settings in section.items():
        checks.choice(name, EXIT_RULES, "validation.exit_rules key")
        settings = _plain(settings) or {}
        checks.known_keys(settings, _RULE_KEYS[name], f"validation.exit_rules.{name}")
        if name == "fixed" and "layers" not in settings:
            raise ValueError(
                "validation.exit_rules.fixed needs layers: the depth to truncate at, e.g. "
                "fixed: {layers: 12}"
            )
        rules.append(ExitRule(name, **settings))
        if objective == "pabee" and rules[-1].needs_lambdas:
            raise ValueError(
                f"exit rule {name} reads the halting heads, which early_exit.objective: pabee "
                "does not train: use patience or fixed"
            )
    return rules


class EarlyExitMethod:
    """PonderNet early-exit fine-tuning (``training.trainer.TrainingMethod``)."""

    config_keys = frozenset({"method", "early_exit", "task"})
    validation_keys = frozenset({"exit_rules"})
    normaliser = "samples"
    default_metric = "val_loss"

    def __init__(self, settings: EarlyExitSettings, task: str = "sft",
                 exit_rules: Optional[List[ExitRule]] = None) -> None:
        self.settings, self.task_name = settings, checks.choice(task, ("sft", "classification"), "task")
        self.exit_rules = list(exit_rules or [])
        self.metric = "accuracy" if task == "classification" else "exact_match"
        self.heads: Optional[HaltingHeads] = None
        self.halting = settings.objective == "pondernet"
        self.prepared = False
        self.readout: Optional[TaskReadout] = None
        self.num_layers = 0
        self.num_classes = 0

    @classmethod
    def from_config(cls, cfg: DictConfig) -> "EarlyExitMethod":
        if cfg.get("loss_reduction", None) is not None:
            raise ValueError(
                "loss_reduction is read by the comparative method; method: early_exit averages "
                "the PonderNet loss over samples: remove it"
            )
        val = cfg.get("validation", None) or {}
        rules = val.get("exit_rules", None)
        settings = EarlyExitSettings.from_config(cfg)
        return cls(settings, cfg.get("task", "sft"),
                   exit_rules_from_config(rules, settings.objective) if rules is not None else None)

    @classmethod
    def for_recipe(cls, cfg: DictConfig, recipe: str) -> "EarlyExitMethod":
        """The method of an early-exit recipe's config: ``method`` unset or ``early_exit``."""
        method = cfg.get("method", "early_exit")
        if method != "early_exit":
            raise ValueError(
                f"{recipe} trains method: early_exit, but the config sets method: {method}: "
                "remove the key, or run comparative_finetune_single_device / "
                "comparative_finetune_distributed, which train every method"
            )
        return cls.from_config(cfg)

    # ------------------------------------------------------------------ the loop's interface

    def prepare(self, model: nn.Module, data: RecipeData) -> None:
        layers = getattr(model, "layers", None)
        if layers is None or not hasattr(model, "norm") or not hasattr(model, "output"):
            raise ValueError(
                f"method: early_exit needs a torchtune TransformerDecoder (layers, norm, output); "
                f"got {type(model).__name__}"
            )
        L = len(layers)
        self.exit_rules = [r.resolved(L) for r in self.exit_rules]
        for rule in self.exit_rules:
            if rule.name == "fixed" and rule.layers > L:
                raise ValueError(f"validation.exit_rules.fixed.layers={rule.layers} but the model "
                                 f"has {L} layers: choose 1..{L}")
        task = build_task(self.task_name, data.dataset)
        label_ids = task.label_token_ids.tolist() if self.task_name == "classification" else None
        self.num_classes = len(label_ids) if label_ids else 0
        self.readout = TaskReadout(model, label_ids)
        self.num_layers = L
        # the outputs of layers 1..L-1 (torchtune returns the input of each listed layer)
        model.output_hidden_states = list(range(1, L))
        param = next(model.parameters())
        self.prepared = True
        if not self.halting:
            return
        with torch.device(param.device):
            previous = torch.get_default_dtype()
            torch.set_default_dtype(param.dtype)
            try:
                self.heads = HaltingHeads(L, model.tok_embeddings.embedding_dim,
                                          self.settings.halting, seed=self.settings.seed,
                                          initial_lambda=self.settings.lambda_p)
            finally:
                torch.set_default_dtype(previous)
        self.prior = truncated_geometric_prior(L, self.settings.lambda_p).to(param.device)

    def trained_modules(self) -> Dict[str, nn.Module]:
        """What the trainer optimises, shards and saves beside the model (``prepare`` first)."""
        self._require_prepared()
        return {HEADS_MODULE: self.heads} if self.halting else {}

    def _require_prepared(self) -> None:
        if not self.prepared:
            raise RuntimeError("EarlyExitMethod.prepare(model, data) must run before a step")

    def _all_layers(self, model: nn.Module, batch: Dict[str, torch.Tensor]):
        """(scored positions, per-layer results [L] of LayerReadout, lambdas [B, L-1] or None
        without halting heads) of one forward through every layer."""
        self._require_prepared()
        targets = shift_labels(batch["labels"])
        scored = self.readout.positions(targets)
        outputs = model(batch["tokens"])
        if not isinstance(outputs, list) or len(outputs) != self.num_layers:
            raise RuntimeError(
                "the model did not return the hidden states of layers 1..L-1: something reset "
                "model.output_hidden_states after EarlyExitMethod.prepare"
            )
        *hidden, logits = outputs
        unshard_parameters(model)  # the readouts below use its norm and output projection
        rows = torch.arange(targets.shape[0], device=targets.device)
        answer = scored.answer_positions
        lambdas = None
        if self.halting:
            lambdas = self.heads(torch.stack([h[rows, answer] for h in hidden]))
        B, local = targets.shape[0], scored.rows
        per_layer = [
            self.readout.read(self.readout.logits(h[scored.rows, scored.positions]),
                              scored.targets, local, B)
            for h in hidden
        ]
        final = self.readout.task_logits(_whole(logits)[scored.rows, scored.positions])
        per_layer.append(self.readout.read(final, scored.targets, local, B))
        return scored, per_layer, lambdas

    def _objective(self, per_layer, lambdas):
        """(exit distribution [B, L] or None, layer losses [B, L], PonderTerms)."""
        losses = torch.stack([r.loss for r in per_layer], dim=1)  # [B, L]
        if not self.halting:
            task = layer_weighted_loss(losses)
            return None, losses, PonderTerms(loss=task, task=task, kl=torch.zeros_like(task))
        p = exit_distribution(lambdas)
        s = self.settings
        terms = ponder_loss(losses, floor_exit_distribution(p, s.eps), self.prior, s.beta, s.kl)
        return p, losses, terms

    def _base_sums(self, scored, per_layer, p, terms) -> Dict[str, torch.Tensor]:
        v = scored.has_target.float()
        last = per_layer[-1]
        sums = {
            "samples": v.sum(),
            "loss": (terms.loss.detach() * v).sum(),
            "task_loss": (terms.task.detach() * v).sum(),
            "last_loss": (last.loss.detach() * v).sum(),
            "last_correct": (last.correct.float() * v).sum(),
        }
        if p is not None:
            sums["kl"] = (terms.kl.detach() * v).sum()
            sums["expected_layers"] = (expected_layers(p.detach()) * v).sum()
        return sums

    def train_step(self, model: nn.Module, batch: Dict[str, torch.Tensor], step: int,
                   set_grad_sync=None) -> Sums:
        scored, per_layer, lambdas = self._all_layers(model, batch)
        p, _, terms = self._objective(per_layer, lambdas)
        (terms.loss * scored.has_target.float()).sum().backward()
        return Sums(self._base_sums(scored, per_layer, p, terms))

    def _class_sums(self, predicted: torch.Tensor, target: torch.Tensor, valid: torch.Tensor,
                    prefix: str) -> Dict[str, torch.Tensor]:
        C = self.num_classes
        v = valid.float()
        pred = torch.nn.functional.one_hot(predicted.clamp(min=0), C).float() * v[:, None]
        actual = torch.nn.functional.one_hot(target.clamp(min=0), C).float() * v[:, None]
        return {f"{prefix}_class_hits": (pred * actual).sum(0),
                f"{prefix}_class_predicted": pred.sum(0), f"{prefix}_class_actual": actual.sum(0)}

    @torch.no_grad()
    def validation_step(self, model: nn.Module, batch: Dict[str, torch.Tensor]) -> Sums:
        scored, per_layer, lambdas = self._all_layers(model, batch)
        p, losses, terms = self._objective(per_layer, lambdas)
        sums = self._base_sums(scored, per_layer, p, terms)
        v = scored.has_target
        vf = v.float()
        sums["layer_loss"] = (losses * vf[:, None]).sum(0)
        sums["layer_correct"] = torch.stack([(r.correct & v).float().sum() for r in per_layer])
        if p is not None:
            q_layers = q_exit_layers(p, VALIDATION_Q)
            pick = (q_layers - 1)[:, None]
            sums["q_exit_loss"] = (losses.gather(1, pick).squeeze(1) * vf).sum()
            correct = torch.stack([r.correct for r in per_layer], dim=1)
            sums["q_exit_correct"] = (correct.gather(1, pick).squeeze(1) & v).float().sum()
            sums["q_exit_layers"] = (q_layers.float() * vf).sum()
        target = torch.full_like(scored.answer_positions, -1)
        if self.readout.is_classification:
            target[scored.rows] = scored.targets
        for name, rule in self.timed_rules().items():
            sums.update(self._rule_sums(model, batch, scored, name, rule, target))
        return Sums(sums)

    def timed_rules(self) -> Dict[str, ExitRule]:
        """The rules an evaluation times, by report name: ``full`` (all layers, through the same
        layer-by-layer code) first, then ``validation.exit_rules``; none without those."""
        if not self.exit_rules:
            return {}
        return {FULL: ExitRule("fixed", layers=self.num_layers),
                **{r.name: r for r in self.exit_rules}}

    def _rule_sums(self, model, batch, scored, name: str, rule: ExitRule,
                   target) -> Dict[str, torch.Tensor]:
        tokens = batch["tokens"]
        sync = torch.distributed.is_available() and torch.distributed.is_initialized() and \
            torch.distributed.get_world_size() > 1
        _synchronize(tokens.device)
        t0 = time.perf_counter()
        out = early_exit_forward(model, self.heads, self.readout, tokens, scored, rule,
                                 batch.get("sample_ids"), sync=sync)
        _synchronize(tokens.device)
        seconds = time.perf_counter() - t0
        v = scored.has_target
        vf = v.float()
        sums = {
            f"{name}_loss": (out.loss * vf).sum(),
            f"{name}_correct": (out.correct & v).float().sum(),
            f"{name}_layers": (out.exit_layer.float() * vf).sum(),
            f"{name}_histogram": exit_histogram(out.exit_layer[v], self.num_layers),
            f"{name}_seconds": torch.tensor(seconds, dtype=torch.float64, device=tokens.device),
        }
        if self.readout.is_classification:
            sums.update(self._class_sums(out.predicted, target, v, name))
        return sums

    def validation_metric_names(self) -> FrozenSet[str]:
        m = self.metric
        names = {"samples", "loss", "task_loss", "last_loss", f"last_{m}"}
        if self.halting:
            names |= {"kl", "expected_layers", "q_exit_loss", f"q_exit_{m}", "q_exit_layers"}
        names |= {f"{k}_layer_{n}" for k in ("loss", m) for n in range(1, self.num_layers + 1)} \
            if self.num_layers else set()
        for r in self.timed_rules():
            names |= {f"{r}_{k}" for k in ("loss", m, "layers", "seconds", "speedup")}
            if self.task_name == "classification":
                names.add(f"{r}_macro_f1")
        return frozenset(names)

    def _metrics(self, sums: Dict[str, Any]) -> Dict[str, float]:
        n = max(sums["samples"], 1.0)
        m = self.metric
        out = {"loss": sums["loss"] / n, "task_loss": sums["task_loss"] / n,
               "last_loss": sums["last_loss"] / n, f"last_{m}": sums["last_correct"] / n,
               "samples": sums["samples"]}
        for key in ("kl", "expected_layers"):
            if key in sums:
                out[key] = sums[key] / n
        return out

    def step_metrics(self, sums: Dict[str, Any], seconds: float) -> Dict[str, float]:
        out = self._metrics(sums)
        out["samples_per_second"] = sums["samples"] / seconds
        return out

    def validation_metrics(self, sums: Dict[str, Any]) -> Dict[str, float]:
        out = self._metrics(sums)
        n = max(sums["samples"], 1.0)
        m = self.metric
        for i, (loss, correct) in enumerate(zip(sums["layer_loss"], sums["layer_correct"]), 1):
            out[f"loss_layer_{i}"] = loss / n
            out[f"{m}_layer_{i}"] = correct / n
        if "q_exit_layers" in sums:
            out["q_exit_loss"] = sums["q_exit_loss"] / n
            out[f"q_exit_{m}"] = sums["q_exit_correct"] / n
            out["q_exit_layers"] = sums["q_exit_layers"] / n
        full_seconds = sums.get(f"{FULL}_seconds")
        for r in self.timed_rules():
            out[f"{r}_loss"] = sums[f"{r}_loss"] / n
            out[f"{r}_{m}"] = sums[f"{r}_correct"] / n
            out[f"{r}_layers"] = sums[f"{r}_layers"] / n
            out[f"{r}_seconds"] = sums[f"{r}_seconds"]
            out[f"{r}_speedup"] = full_seconds / max(sums[f"{r}_seconds"], 1e-12)
            for i, count in enumerate(sums[f"{r}_histogram"], 1):
                out[f"{r}_exits_layer_{i}"] = count
            if self.task_name == "classification":
                out[f"{r}_macro_f1"] = macro_f1(sums[f"{r}_class_hits"],
                                                sums[f"{r}_class_predicted"],
                                                sums[f"{r}_class_actual"])
        return out

    def exit_rule_rows(self, metrics: Dict[str, float]) -> List[Dict[str, Any]]:
        """One report row per timed rule, from ``val_`` metrics: its setting, task metric,
        loss, mean exit layer, wall-time speed-up against all layers, seconds, and how many
        samples left at each layer."""
        rows = []
        for name, rule in self.timed_rules().items():
            row = {"rule": name, "setting": rule.describe()}
            for key in (self.metric, "macro_f1", "loss", "layers", "speedup", "seconds"):
                if f"val_{name}_{key}" in metrics:
                    row[key] = metrics[f"val_{name}_{key}"]
            row["exit_histogram"] = [metrics[f"val_{name}_exits_layer_{n}"]
                                     for n in range(1, self.num_layers + 1)]
            rows.append(row)
        return rows

    def describe_validation(self, metrics: Dict[str, float]) -> str:
        m = self.metric
        line = f"loss={metrics['val_loss']:.4f} task_loss={metrics['val_task_loss']:.4f} "
        if self.halting:
            line += (f"kl={metrics['val_kl']:.4f} expected_layers={metrics['val_expected_layers']:.2f} "
                     f"q_exit: {m}={metrics[f'val_q_exit_{m}']:.4f} "
                     f"layers={metrics['val_q_exit_layers']:.2f}; ")
        line += f"all layers: {m}={metrics[f'val_last_{m}']:.4f}"
        for r in self.timed_rules():
            if r != FULL:
                line += (f"; {r}: {m}={metrics[f'val_{r}_{m}']:.4f} layers="
                         f"{metrics[f'val_{r}_layers']:.2f} speedup={metrics[f'val_{r}_speedup']:.2f}x")
        return line


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
