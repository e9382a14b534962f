"""The ``prune`` section of a config: what ``tune-cmp prune`` scores, removes and writes.

The config is the one the model was trained with (or any recipe config of the model: model,
tokenizer, checkpointer, data); ``checkpointer.checkpoint_dir`` is the checkpoint to prune. The
section (every key optional)::

    prune:
      method: attribution      # attribution | wanda | magnitude | random
      data: supervised         # supervised: the dataset's answers; unsupervised: the model's own
                               # greedy answers (the gold answers are never read)
      num_examples: null       # low-resource: score on this many examples (a seeded subset)
      reduce: sum              # attribution: sum | max of a unit's effect over a sample's positions,
                               # or taylor: | the signed sum | (zeroed at every position at once)
      positions: all           # attribution and wanda: all (every real token) | answer (the
                               # positions that predict an answer token)
      sites: [ffn_hidden, attn_heads]
      sparsity: 0.25           # the fraction of units removed, in [0, 1); or per site:
                               # {ffn_hidden: 0.3, attn_heads: 0.5}
      ranking: uniform         # uniform: the same count in every layer (a standard HF model)
                               # global: over all layers (per-layer sizes; torchtune format)
      dataset: {...}           # default: the training dataset (``dataset``), so that the
                               # validation data a pruned model is evaluated on stays unseen
      batch_size: 8            # default: validation.batch_size, else batch_size
      generate: {max_new_tokens: 32}   # unsupervised QA: the greedy answers (default
                                       # validation.generate, else 32 tokens)
      layers_per_pass: null    # attribution: probe this many layers per forward/backward (the
                               # memory bound on long inputs: that many layers' activations)
      seed: 0                  # random scores and the example subset
      output_dir: <output_dir>/pruned
      overwrite: false         # an existing output_dir is an error unless true

``prune_config`` checks all of it before anything is loaded, including the sparsity against the
model's layer sizes (the model is built on the meta device: no memory, no weights).
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
from omegaconf import DictConfig, OmegaConf
from torchtune import config

from comparative_recipe import checks, neurons
from comparative_recipe.attribution import REDUCTIONS
from comparative_recipe.evaluation import (
    checkpoint_overrides,
    config_section,
    section_output_dir,
    with_evaluated_data,
)
from comparative_recipe.metrics.generation import GenerationSettings
from comparative_recipe.pruning.scores import DATA_METHODS, METHODS
from comparative_recipe.pruning.select import RANKINGS, removal_count
from comparative_recipe.pruning.structure import PRUNABLE_SITES

PRUNE_KEYS = frozenset({
    "method", "data", "num_examples", "reduce", "positions", "sites", "sparsity", "ranking",
    "dataset", "batch_size", "generate", "layers_per_pass", "seed", "output_dir", "overwrite",
})
DATA_SETTINGS = ("supervised", "unsupervised")
POSITIONS = ("all", "answer")


@dataclass(frozen=True)
class PruneSettings:
    """The checked ``prune`` section (see the module doc); ``sparsity`` is per site."""

    method: str
    data: str
    num_examples: Optional[int]
    reduce: str
    positions: str
    sites: Tuple[str, ...]
    sparsity: Dict[str, float]
    ranking: str
    generation: GenerationSettings
    layers_per_pass: Optional[int]
    seed: int
    output_dir: Path
    overwrite: bool
    checkpoint_overrides: Dict[str, Any]

    @property
    def reads_data(self) -> bool:
        return self.method in DATA_METHODS

    @property
    def setting(self) -> str:
        """supervised | low_resource | unsupervised: how the README's table names it."""
        if self.data == "unsupervised":
            return "unsupervised"
        return "supervised" if self.num_examples is None else "low_resource"


def _sparsity(value: Any, sites: Tuple[str, ...]) -> Dict[str, float]:
    if hasattr(value, "keys"):
        unknown = sorted(set(value) - set(sites))
        if unknown:
            raise ValueError(f"prune.sparsity names sites {unknown} that prune.sites "
                             f"{list(sites)} does not prune")
        missing = [s for s in sites if s not in value]
        if missing:
            raise ValueError(f"prune.sparsity gives no sparsity for {missing}: give every site "
                             f"of prune.sites, or one number for all")
        return {s: checks.rate(value[s], f"prune.sparsity.{s}") for s in sites}
    return {s: checks.rate(value, "prune.sparsity") for s in sites}


def check_sparsity_fits(model: torch.nn.Module, sparsity: Dict[str, float], ranking: str) -> None:
    """A uniform sparsity must leave every layer a unit and (heads) the grouped-query layout."""
    if ranking != "uniform":
        return
    for site, s in sparsity.items():
        for lay in neurons.site_layouts(model, site):
            removal_count(lay.units, s, site, lay.num_kv_heads, lay.layer_index)


def prune_config(cfg: DictConfig) -> Tuple[DictConfig, PruneSettings]:
    """The config the scorer and the trainer read (its ``validation`` section holds the scored
    data) and the checked settings. Raises before anything is loaded or written."""
    section = config_section(cfg, "prune", PRUNE_KEYS)
    method = checks.choice(section.get("method", "attribution"), METHODS, "prune.method")
    data = checks.choice(section.get("data", "supervised"), DATA_SETTINGS, "prune.data")
    sites = tuple(section.get("sites", PRUNABLE_SITES))
    if not sites or len(set(sites)) != len(sites):
        raise ValueError(f"prune.sites must name distinct sites of {list(PRUNABLE_SITES)}, "
                         f"got {list(sites)}")
    for site in sites:
        checks.choice(site, PRUNABLE_SITES, "prune.sites entry")
    if "sparsity" not in section:
        raise ValueError("set prune.sparsity: the fraction of units to remove, e.g. 0.25")
    sparsity = _sparsity(section.sparsity, sites)
    ranking = checks.choice(section.get("ranking", "uniform"), RANKINGS, "prune.ranking")
    reads = method in DATA_METHODS
    for key in ("reduce", "layers_per_pass"):
        if key in section and method != "attribution":
            raise ValueError(f"prune.{key} is read by method attribution only; remove it "
                             f"(prune.method is {method})")
    for key in ("data", "num_examples", "positions", "dataset", "batch_size", "generate"):
        if key in section and not reads:
            raise ValueError(f"prune.{key} is read by the methods that score data "
                             f"({list(DATA_METHODS)}); {method} reads weights alone: remove it")
    if "generate" in section and data != "unsupervised":
        raise ValueError("prune.generate makes the unsupervised pseudo-answers; it is read "
                         "with prune.data=unsupervised only")
    num_examples = section.get("num_examples", None)
    if num_examples is not None:
        num_examples = checks.positive_int(num_examples, "prune.num_examples")
    reduce = checks.choice(section.get("reduce", "sum"), REDUCTIONS, "prune.reduce")
    positions = checks.choice(section.get("positions", "all"), POSITIONS, "prune.positions")
    layers_per_pass = section.get("layers_per_pass", None)
    if layers_per_pass is not None:
        layers_per_pass = checks.positive_int(layers_per_pass, "prune.layers_per_pass")
    seed = checks.non_negative_int(section.get("seed", 0), "prune.seed")
    overwrite = checks.flag(section.get("overwrite", False), "prune.overwrite")
    out = section_output_dir(cfg, section, "prune", "pruned")
    if out.exists() and not overwrite:
        raise FileExistsError(
            f"{out} exists: a pruned model is never replaced unless prune.overwrite=true; "
            "choose another prune.output_dir or set prune.overwrite=true"
        )
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"prune.output_dir {out} is a file; name a directory")
    source = Path(str(cfg.checkpointer.get("checkpoint_dir", "")))
    if out.resolve() == source.resolve():
        raise ValueError(f"prune.output_dir {out} is the checkpoint being pruned; choose another")

    generate = section.get("generate", None)
    if generate is None and cfg.get("validation", None) is not None:
        generate = cfg.validation.get("generate", None)
    generation = GenerationSettings.from_config(generate) or GenerationSettings()
    if reads:
        scored = section
        if section.get("dataset", None) is None and cfg.get("dataset", None) is not None:
            scored = OmegaConf.merge(section, {"dataset": cfg.dataset})
        out_cfg = with_evaluated_data(cfg, scored, "prune")
    else:
        out_cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    if out_cfg.get("validation", None) is not None and "generate" in out_cfg.validation:
        del out_cfg.validation["generate"]  # the scorer generates with ``generation`` alone
    overrides = checkpoint_overrides(cfg.checkpointer)
    with torch.device("meta"):
        meta_model = config.instantiate(cfg.model)
    check_sparsity_fits(meta_model, sparsity, ranking)
    return out_cfg, PruneSettings(
        method=method, data=data, num_examples=num_examples, reduce=reduce, positions=positions,
        sites=sites, sparsity=sparsity, ranking=ranking, generation=generation,
        layers_per_pass=layers_per_pass, seed=seed, output_dir=out, overwrite=overwrite,
        checkpoint_overrides=overrides,
    )
