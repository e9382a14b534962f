"""Ablation curves, per-layer utility and attribution of checkpoints (``tune-cmp analyze``).

For each checkpoint the analysis scores the validation data (the training loop's own evaluation,
``Trainer.evaluate``: every sample once, sums reduced over ranks) with the full model and with
many ablated sub-models, each one *probe point*:

- hidden curves: the units of one site (``ffn_hidden``, ``attn_heads``, ``attn_out``,
  ``ffn_out``) or of all sites together masked at rates 0.1 ... 0.5 on every layer, with the
  comparative loss's own masks (``ablation.hidden``: the same hash of (seed, sample, site, layer,
  unit), granularity and scaling as training), for several mask seeds;
- the crop curve: input chunks cropped at rates 0.25, 0.5, 0.75 (``ablation.crops``: at least one
  chunk, the same views as training's first crop level), for several crop seeds;
- per-layer points: one layer's FFN units or heads masked at ``layer_rate``, every other layer
  intact (the heatmap of where the utility sits);
- attribution: activation x gradient of the answer log-likelihood per unit
  (``comparative_recipe.attribution``), summed over the data.

Rate 0 of every curve is the full model. The config is the training config; its ``analyze``
section (every key optional)::

    analyze:
      checkpoints: [<run>/best, ...]   # weight folders, or LoRA adapter folders (adapter_model.pt)
                                       # on the config's base; default: checkpointer.checkpoint_dir
      labels: [plain, comparative]     # one per checkpoint; default: <parent>/<name> of each
      dataset: {...}                   # default: validation.dataset
      batch_size: 64                   # default: validation.batch_size, else batch_size
      generate: {max_new_tokens: 8}    # exact match / token F1 per point (default: validation's)
      curves: [ffn_hidden, attn_heads, attn_out, ffn_out, all, crop]
      rates: [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]
      crop_rates: [0.0, 0.25, 0.5, 0.75]
      seeds: [0, 1, 2]
      layer_rate: 0.5                  # null: no per-layer points
      layer_sites: [ffn_hidden, attn_heads]
      attribution: sum                 # sum | max | taylor over positions; null: none
      granularity: unit                # default: ablation.hidden.granularity, else unit
      scale: true                      # default: ablation.hidden.scale, else true
      output_dir: <output_dir>/analysis
      name: ablation                   # <output_dir>/<name>.json and <name>_*.png
      overwrite: false
      plots: true                      # PNGs (matplotlib); false: the JSON alone

Everything here but the recipe's final write is pure or per batch; the JSON layout is
``analysis_report``'s (and the README's).
"""

import datetime
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from comparative_recipe import checks
from comparative_recipe.ablation.hidden import (
    GRANULARITIES,
    HiddenAblationConfig,
    install_hidden_ablation,
)
from comparative_recipe.ablation.plan import AblationLevel
from comparative_recipe.attribution import REDUCTIONS, site_attributions
from comparative_recipe.evaluation import (
    check_output_path,
    checkpoint_overrides,
    config_section,
    section_output_dir,
    with_evaluated_data,
)
from comparative_recipe.loss import ComparativeLoss
from comparative_recipe.methods.comparative import VALIDATION_STEP_KEY, check_dataset_supports_crops
from comparative_recipe.metrics.generation import (
    AnswerDecoder,
    GenerationSettings,
    generation_metrics,
    generation_sums,
    stop_token_ids,
)
from comparative_recipe.neurons import SITES, find_layers, unit_counts
from comparative_recipe.passes import (
    ComparativeStepSpec,
    StepResult,
    build_passes,
    comparative_metrics,
    run_pass,
)
from comparative_recipe.tasks import build_task
from comparative_recipe.training.adapters import ADAPTER_WEIGHTS_FILE
from comparative_recipe.training.dataloader import RecipeData
from comparative_recipe.training.sums import Sums

ANALYZE_KEYS = frozenset({
    "checkpoints", "labels", "dataset", "batch_size", "generate", "curves", "rates",
    "crop_rates", "seeds", "layer_rate", "layer_sites", "attribution", "granularity", "scale",
    "output_dir", "name", "overwrite", "plots",
})
# Hidden curves: name -> the sites masked together.
HIDDEN_CURVES = {**{site: (site,) for site in SITES}, "all": SITES}
CROP_CURVE = "crop"
CURVES = (*HIDDEN_CURVES, CROP_CURVE)
DEFAULT_RATES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)
DEFAULT_CROP_RATES = (0.0, 0.25, 0.5, 0.75)
DEFAULT_SEEDS = (0, 1, 2)
DEFAULT_LAYER_SITES = ("ffn_hidden", "attn_heads")
PASS_METRICS = ("loss", "accuracy", "macro_f1", "exact_match", "f1")
# log10(score / mean score) histogram of the attribution summary.
HIST_EDGES = tuple(x / 4 for x in range(-16, 9))  # -4 ... 2 in quarter decades
REPORT_VERSION = 1


@dataclass(frozen=True)
class ProbePoint:
    """One ablated sub-model: ``curve`` (a ``CURVES`` name, or "layer"), its rate and seed, the
    sites masked (none for the crop curve) and, for per-layer points, the one layer masked."""

    curve: str
    rate: float
    seed: int
    sites: Tuple[str, ...] = ()
    layer: Optional[int] = None

    @property
    def is_crop(self) -> bool:
        return self.curve == CROP_CURVE


@dataclass
class AnalysisSettings:
    """The ``analyze`` section, checked (module docstring)."""

    checkpoints: List[Path]
    labels: List[str]
    curves: Tuple[str, ...]
    rates: Tuple[float, ...]
    crop_rates: Tuple[float, ...]
    seeds: Tuple[int, ...]
    layer_rate: Optional[float]
    layer_sites: Tuple[str, ...]
    attribution: Optional[str]
    granularity: str
    scale: bool
    output_path: Path
    overwrite: bool
    plots: bool

    @property
    def hidden_curves(self) -> List[str]:
        return [c for c in self.curves if c != CROP_CURVE]

    @property
    def output_dir(self) -> Path:
        return self.output_path.parent

    @property
    def stem(self) -> str:
        return self.output_path.stem


def _rates(value: Any, key: str) -> Tuple[float, ...]:
    if isinstance(value, (str, int, float)) or not hasattr(value, "__iter__"):
        raise ValueError(f"analyze.{key} must be a list of rates in [0, 1), got {value!r}")
    rates = tuple(checks.rate(r, f"analyze.{key}") for r in value)
    if len(set(rates)) != len(rates) or list(rates) != sorted(rates):
        raise ValueError(f"analyze.{key} must be increasing without repeats, got {list(rates)}")
    if rates and rates[0] != 0.0:
        rates = (0.0, *rates)  # the full model anchors every curve
    return rates


def _names(value: Any, choices: Sequence[str], key: str) -> Tuple[str, ...]:
    value = [value] if isinstance(value, str) else list(value)
    for v in value:
        checks.choice(v, tuple(choices), f"analyze.{key}")
    if len(set(value)) != len(value):
        raise ValueError(f"analyze.{key} must not repeat, got {value}")
    return tuple(value)


def checkpoint_label(path: Path) -> str:
    """``<parent>/<name>`` of a checkpoint folder: ``demo_cmp/best``."""
    return f"{path.parent.name}/{path.name}" if path.parent.name else path.name


def analysis_config(cfg: DictConfig) -> Tuple[DictConfig, AnalysisSettings]:
    """The config the trainer reads for an analysis (the ``analyze`` section's data in its
    ``validation``) and the settings; every key is checked and the output path too (an
    existing report is an error without ``overwrite``), before anything is loaded."""
    section = config_section(cfg, "analyze", ANALYZE_KEYS)
    section = OmegaConf.to_container(section, resolve=True) if OmegaConf.is_config(section) else dict(section)
    out = with_evaluated_data(cfg, section, "analyze")
    hidden = (cfg.get("ablation", None) or {}).get("hidden", None) or {}

    checkpoints = section.get("checkpoints", None)
    if checkpoints is None:
        directory = cfg.checkpointer.get("checkpoint_dir", None)
        if directory is None:
            raise ValueError("nothing to analyze: set analyze.checkpoints (or checkpointer.checkpoint_dir)")
        checkpoints = [directory]
    if isinstance(checkpoints, str):
        checkpoints = [checkpoints]
    checkpoints = [Path(str(c)) for c in checkpoints]
    if not checkpoints:
        raise ValueError("analyze.checkpoints is empty: give at least one checkpoint folder")
    for c in checkpoints:
        if not c.is_dir():
            raise FileNotFoundError(
                f"analyze.checkpoints: {c} is not a directory; give checkpoint folders such as "
                "<output_dir>/best or <output_dir>/checkpoints/step_<N>"
            )
    labels = section.get("labels", None)
    if labels is None:
        labels = [checkpoint_label(c) for c in checkpoints]
    labels = [labels] if isinstance(labels, str) else [str(x) for x in labels]
    if len(labels) != len(checkpoints):
        raise ValueError(
            f"analyze.labels has {len(labels)} names for {len(checkpoints)} checkpoints: give one "
            "label per checkpoint, in the same order"
        )
    if len(set(labels)) != len(labels):
        raise ValueError(f"analyze.labels must be distinct (they name the curves), got {labels}")

    curves = _names(section.get("curves", CURVES), CURVES, "curves")
    rates = _rates(section.get("rates", DEFAULT_RATES), "rates")
    crop_rates = _rates(section.get("crop_rates", DEFAULT_CROP_RATES), "crop_rates")
    seeds = section.get("seeds", DEFAULT_SEEDS)
    seeds = (seeds,) if isinstance(seeds, int) else tuple(seeds)
    seeds = tuple(checks.non_negative_int(s, "analyze.seeds") for s in seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"analyze.seeds must be distinct non-negative integers, got {list(seeds)}")
    layer_rate = section.get("layer_rate", 0.5)
    if layer_rate is not None:
        layer_rate = checks.rate(layer_rate, "analyze.layer_rate")
        if layer_rate == 0.0:
            raise ValueError("analyze.layer_rate 0 ablates nothing: give a rate in (0, 1), or null")
    layer_sites = _names(section.get("layer_sites", DEFAULT_LAYER_SITES), SITES, "layer_sites")
    attribution = section.get("attribution", "sum")
    if attribution is not None:
        attribution = checks.choice(attribution, REDUCTIONS, "analyze.attribution")
    if "layer_sites" in section and layer_rate is None and attribution is None:
        raise ValueError("analyze.layer_sites is set but layer_rate and attribution are null, so "
                         "it would be ignored: set a layer_rate or remove layer_sites")
    granularity = checks.choice(
        section.get("granularity", hidden.get("granularity", "unit")), GRANULARITIES,
        "analyze.granularity",
    )
    scale = section.get("scale", hidden.get("scale", True))
    overwrite, plots = section.get("overwrite", False), section.get("plots", True)
    for key, value in (("scale", scale), ("overwrite", overwrite), ("plots", plots)):
        checks.flag(value, f"analyze.{key}")
    output_dir = section_output_dir(cfg, section, "analyze", "analysis")
    name = str(section.get("name", "ablation"))
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"analyze.name must be a plain file stem such as 'ablation', got {name!r}")
    output_path = Path(str(output_dir)) / f"{name}.json"
    check_output_path(output_path, overwrite, section="analyze")
    settings = AnalysisSettings(
        checkpoints, labels, curves, rates, crop_rates, seeds, layer_rate, layer_sites,
        attribution, granularity, scale, output_path, overwrite, plots,
    )
    if not probe_points(settings, num_layers=1) and attribution is None:
        raise ValueError("the analysis would compute nothing: give analyze.rates or crop_rates "
                         "above 0, a layer_rate or attribution")
    return out, settings


def checkpoint_load(cfg: DictConfig, checkpoint: Path) -> Tuple[Dict[str, Any], Optional[Path]]:
    """(checkpointer overrides, adapter folder) that load ``checkpoint`` with ``cfg``'s model:
    a folder with ``adapter_model.pt`` is an adapter on the configured base, any other folder
    holds the weights themselves."""
    if (checkpoint / ADAPTER_WEIGHTS_FILE).is_file():
        return checkpoint_overrides(cfg.checkpointer), checkpoint
    ckpt = OmegaConf.merge(cfg.checkpointer, {"checkpoint_dir": str(checkpoint)})
    return {"checkpoint_dir": str(checkpoint), **checkpoint_overrides(ckpt)}, None


def probe_points(settings: AnalysisSettings, num_layers: int) -> List[ProbePoint]:
    """Every ablated sub-model of an analysis, curves first (rate 0 is the full model: none)."""
    points = []
    for curve in settings.curves:
        rates = settings.crop_rates if curve == CROP_CURVE else settings.rates
        sites = () if curve == CROP_CURVE else HIDDEN_CURVES[curve]
        points += [ProbePoint(curve, r, s, sites) for r in rates if r > 0 for s in settings.seeds]
    if settings.layer_rate is not None:
        points += [
            ProbePoint("layer", settings.layer_rate, s, (site,), layer)
            for site in settings.layer_sites for layer in range(num_layers) for s in settings.seeds
        ]
    return points


class AblationProbe:
    """The analysis as a method of the loop's evaluation (``Trainer.evaluate``): its validation
    step scores the full model and every probe point on a batch (and the attribution), as named
    sums that add over batches and ranks. Pass k of the sums is ``points[k - 1]``."""

    normaliser = "weight"
    default_metric = "val_loss_0"

    def __init__(self, settings: AnalysisSettings, method: Any, task: str,
                 generation: Optional[GenerationSettings] = None) -> None:
        # the run's method: its keys are the config's, the analysis reads none of them
        self.config_keys = frozenset(method.config_keys) | {"analyze"}
        self.validation_keys = frozenset(method.validation_keys)
        self.settings, self.task_name, self.generation = settings, task, generation
        self.tokenizer: Any = None
        self.points: Optional[List[ProbePoint]] = None
        # called with 1 after every batch (a progress bar's update), if set
        self.on_batch: Optional[Callable[[int], Any]] = None

    def set_tokenizer(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def prepare(self, model: nn.Module, data: RecipeData) -> None:
        s = self.settings
        if CROP_CURVE in s.curves and len(s.crop_rates) > 1:
            try:
                check_dataset_supports_crops(data.dataset)
            except ValueError as e:
                raise ValueError(
                    f"the crop curve needs chunked samples ({e}); or leave 'crop' out of "
                    "analyze.curves"
                ) from None
        self.task = build_task(self.task_name, data.dataset)
        self.pad_id = data.pad_id
        self.num_layers = len(find_layers(model))
        self.units = unit_counts(model, s.layer_sites if s.attribution else ())
        self.points = probe_points(s, self.num_layers)
        if self.generation is not None:
            if self.tokenizer is None:
                raise RuntimeError("analyze.generate needs the tokenizer: call set_tokenizer first")
            self.stop_tokens = stop_token_ids(self.tokenizer, self.generation.stop_tokens)
            self.decoder = AnswerDecoder(self.tokenizer, self.stop_tokens)

    def _spec(self, plan: Tuple[AblationLevel, ...] = (), crop_rate: float = 0.5,
              seed: int = 0) -> ComparativeStepSpec:
        """The views of a batch: pass 0 the full model, pass 1 ``plan[0]`` (if any)."""
        return ComparativeStepSpec(
            plan=plan, task=self.task, loss_fn=ComparativeLoss(), crop_rate=crop_rate,
            seed=seed, pad_id=self.pad_id,
        )

    def _run_point(self, model: nn.Module, batch: Dict[str, torch.Tensor], point: ProbePoint):
        if point.is_crop:
            p = build_passes(batch, self._spec((AblationLevel(1, 0),), point.rate, point.seed),
                             VALIDATION_STEP_KEY)[1]
            return p, run_pass(model, self.task, p), self._generate(model, p)
        cfg = HiddenAblationConfig(rate=point.rate, sites=point.sites, scale=self.settings.scale,
                                   granularity=self.settings.granularity, seed=point.seed)
        handle = install_hidden_ablation(
            model, cfg, layers=None if point.layer is None else [point.layer]
        )
        try:
            p = build_passes(batch, self._spec((AblationLevel(0, 1),)), VALIDATION_STEP_KEY)[1]
            return p, run_pass(model, self.task, p), self._generate(model, p)
        finally:
            handle.remove()

    def _generate(self, model: nn.Module, p) -> Optional[Dict[str, torch.Tensor]]:
        if self.generation is None:
            return None
        return generation_sums(model, [p], self.generation, self.decoder, self.stop_tokens,
                               self.pad_id)

    def validation_step(self, model: nn.Module, batch: Dict[str, torch.Tensor]) -> Sums:
        if self.points is None:
            raise RuntimeError("AblationProbe.prepare(model, data) must run before a step")
        full = build_passes(batch, self._spec(), VALIDATION_STEP_KEY)[0]
        passes, outs, gens = [full], [run_pass(model, self.task, full)], [self._generate(model, full)]
        for point in self.points:
            p, out, gen = self._run_point(model, batch, point)
            passes.append(p), outs.append(out), gens.append(gen)
        stack = lambda xs: None if xs[0] is None else torch.stack(xs, dim=1)  # noqa: E731
        losses = stack([o.loss for o in outs])
        n_tokens = stack([o.n_tokens for o in outs])
        valid = n_tokens[:, 0] > 0
        result = StepResult(
            losses=losses, n_tokens=n_tokens, valid=valid,
            sample_loss=torch.zeros_like(losses[:, 0]), sample_weight=valid.to(losses.dtype),
            exhausted=torch.stack([p.exhausted for p in passes], dim=1),
            pass_tokens=torch.stack([p.n_input_tokens for p in passes]),
            correct=stack([o.correct for o in outs]),
            predicted=stack([o.predicted for o in outs]),
            target=outs[0].target, num_classes=outs[0].num_classes,
        )
        sums = dict(result.sums().values)
        if self.generation is not None:
            sums["gen_samples"] = gens[0]["gen_samples"]
            sums["exact_match"] = torch.cat([g["exact_match"] for g in gens])
            sums["token_f1"] = torch.cat([g["token_f1"] for g in gens])
        if self.settings.attribution is not None:
            sums.update(self._attribution(model, full))
        if self.on_batch is not None:
            self.on_batch(1)
        return Sums(sums)

    def _attribution(self, model: nn.Module, full) -> Dict[str, torch.Tensor]:
        def log_likelihood(logits):
            out = self.task(logits, full.targets)
            return -(out.loss * out.n_tokens).sum()  # summed log-probability of the answers

        scores = site_attributions(
            model, full.tokens, log_likelihood, positions=full.keys.token_keys >= 0,
            sites=self.settings.layer_sites, reduce=self.settings.attribution,
        )
        return {f"attribution_{site}": torch.cat(v).double() for site, v in scores.items()}

    def validation_metrics(self, sums: Dict[str, Any]) -> Dict[str, float]:
        metrics = {k: v for k, v in comparative_metrics(sums).items()
                   if k.startswith(("loss_", "accuracy_", "macro_f1_", "crop_exhausted_"))
                   or k == "samples"}
        metrics.update(generation_metrics(sums))
        return metrics

    def attribution_scores(self, sums: Dict[str, Any]) -> Dict[str, List[List[float]]]:
        """``{site: [[score of each unit] per layer]}`` from the host sums."""
        out = {}
        for site in self.settings.layer_sites:
            flat, per_layer, at = sums[f"attribution_{site}"], [], 0
            for n in self.units[site]:
                per_layer.append(list(flat[at:at + n]))
                at += n
            out[site] = per_layer
        return out


# ------------------------------------------------------------------------------ the report


def trapezoid(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Area under the piecewise-linear curve through (xs, ys)."""
    return sum((x1 - x0) * (y0 + y1) / 2 for x0, x1, y0, y1 in zip(xs, xs[1:], ys, ys[1:]))


def spread(per_seed: Sequence[Sequence[float]]) -> Dict[str, Any]:
    """mean, std (over seeds, ddof 0), min and max at each rate of ``per_seed`` [seeds][rates]."""
    columns = list(zip(*per_seed))
    mean = [sum(c) / len(c) for c in columns]
    std = [math.sqrt(sum((x - m) ** 2 for x in c) / len(c)) for c, m in zip(columns, mean)]
    return {"mean": mean, "std": std, "min": [min(c) for c in columns],
            "max": [max(c) for c in columns], "per_seed": [list(r) for r in per_seed]}


def attribution_summary(per_layer: Sequence[Sequence[float]]) -> Dict[str, Any]:
    """What the report keeps of one site's unit scores (``[[score] per layer]``): per-layer
    totals, a histogram per layer of log10(score / mean score over the site's units) on
    ``HIST_EDGES`` (clipped into the outer bins), the share of the total held by the top 10% of
    units and the fraction of units below 1% of the mean."""
    scores = [s for layer in per_layer for s in layer]
    mean = sum(scores) / max(len(scores), 1)
    edges, counts = list(HIST_EDGES), []
    for layer in per_layer:
        row = [0] * (len(edges) - 1)
        for s in layer:
            x = math.log10(s / mean) if s > 0 and mean > 0 else edges[0]
            i = sum(1 for e in edges[1:-1] if x >= e)
            row[i] += 1
        counts.append(row)
    ranked = sorted(scores, reverse=True)
    top = ranked[: max(1, math.ceil(len(ranked) / 10))]
    total = sum(scores)
    return {
        "units_per_layer": [len(layer) for layer in per_layer],
        "layer_total": [sum(layer) for layer in per_layer],
        "relative_log10_hist": {"edges": edges, "counts": counts},
        "top10_share": sum(top) / total if total > 0 else 0.0,
        "near_zero_fraction": sum(1 for s in scores if s < 0.01 * mean) / max(len(scores), 1),
    }


def checkpoint_analysis(
    metrics: Dict[str, float],
    points: Sequence[ProbePoint],
    settings: AnalysisSettings,
    *,
    label: str,
    checkpoint: Path,
    adapter: Optional[Path],
    attribution: Optional[Dict[str, List[List[float]]]] = None,
    num_layers: int = 0,
) -> Dict[str, Any]:
    """One checkpoint's entry of the analysis report from the evaluation's metrics
    (``val_<metric>_<k>``: pass 0 the full model, pass k the point ``points[k - 1]``)."""
    names = [m for m in PASS_METRICS if f"val_{m}_0" in metrics]
    full = {m: metrics[f"val_{m}_0"] for m in names}
    value: Dict[ProbePoint, Dict[str, float]] = {}
    for k, point in enumerate(points, start=1):
        value[point] = {m: metrics[f"val_{m}_{k}"] for m in names}
        if point.is_crop:
            value[point]["crop_exhausted"] = metrics.get(f"val_crop_exhausted_{k}", 0.0)
    samples = max(metrics.get("val_samples", 0.0), 1.0)

    def curve_point(curve: str, rate: float, seed: int) -> ProbePoint:
        return ProbePoint(curve, rate, seed, () if curve == CROP_CURVE else HIDDEN_CURVES[curve])

    def at(curve: str, rate: float, seed: int, name: str) -> float:
        return full[name] if rate == 0 else value[curve_point(curve, rate, seed)][name]

    curves = []
    for curve in settings.curves:
        rates = settings.crop_rates if curve == CROP_CURVE else settings.rates
        entry: Dict[str, Any] = {
            "name": curve, "kind": "crop" if curve == CROP_CURVE else "hidden",
            "sites": [] if curve == CROP_CURVE else list(HIDDEN_CURVES[curve]), "rates": list(rates),
            "metrics": {}, "auc": {},
        }
        for name in names:
            per_seed = [[at(curve, r, s, name) for r in rates] for s in settings.seeds]
            entry["metrics"][name] = spread(per_seed)
            mean = entry["metrics"][name]["mean"]
            entry["auc"][name] = {"area": trapezoid(rates, mean),
                                  "above_full": trapezoid(rates, [m - full[name] for m in mean])}
        if curve == CROP_CURVE:
            entry["crop_exhausted"] = [
                0.0 if r == 0 else sum(value[curve_point(curve, r, s)]["crop_exhausted"]
                                       for s in settings.seeds) / (len(settings.seeds) * samples)
                for r in rates
            ]
        curves.append(entry)

    layers = None
    if settings.layer_rate is not None:
        layers = {"rate": settings.layer_rate, "num_layers": num_layers, "sites": {}}
        for site in settings.layer_sites:
            per_seed = [
                [value[ProbePoint("layer", settings.layer_rate, s, (site,), i)]["loss"]
                 for i in range(num_layers)]
                for s in settings.seeds
            ]
            loss = spread(per_seed)
            rise = spread([[x - full["loss"] for x in row] for row in per_seed])
            layers["sites"][site] = {
                "loss": {"mean": loss["mean"], "std": loss["std"]},
                "loss_increase": {"mean": rise["mean"], "std": rise["std"]},
            }
    attr = None
    if attribution is not None:
        attr = {"reduce": settings.attribution, "samples": int(samples),
                "sites": {site: attribution_summary(v) for site, v in attribution.items()}}
    return {
        "label": label, "checkpoint_dir": str(checkpoint),
        "adapter": None if adapter is None else str(adapter),
        "full_model": full, "curves": curves, "layers": layers, "attribution": attr,
    }


def analysis_report(cfg: DictConfig, settings: AnalysisSettings,
                    checkpoints: List[Dict[str, Any]], samples: int) -> Dict[str, Any]:
    """The analysis JSON: settings, and one ``checkpoint_analysis`` entry per checkpoint."""
    names = [m for m in PASS_METRICS if checkpoints and m in checkpoints[0]["full_model"]]
    return {
        "version": REPORT_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dataset": OmegaConf.to_container(cfg.validation.dataset, resolve=True),
        "samples": samples,
        "task": str(cfg.get("task", "sft")),
        "settings": {
            "curves": list(settings.curves), "rates": list(settings.rates),
            "crop_rates": list(settings.crop_rates), "seeds": list(settings.seeds),
            "granularity": settings.granularity, "scale": settings.scale,
            "layer_rate": settings.layer_rate, "layer_sites": list(settings.layer_sites),
            "attribution": None if settings.attribution is None else {"reduce": settings.attribution},
        },
        "metrics": names,
        "checkpoints": checkpoints,
    }
