"""The comparative part of a recipe config, read and checked before anything runs.

Everything a user can get wrong in the ``ablation`` section or the strategy keys fails here with
a message that names the key, the bad value and what to write instead.
"""

from dataclasses import dataclass
from typing import Any, List, Optional

from omegaconf import DictConfig, OmegaConf

from comparative_recipe.ablation.hidden import HiddenAblationConfig
from comparative_recipe.ablation.plan import AblationLevel, ablation_plan
from comparative_recipe.passes import REDUCTIONS, STRATEGIES


def _non_negative_int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{key} must be a non-negative integer, got {value!r}")
    return value


def _rate(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"{key} must be a number in [0, 1), got {value!r}")
    return float(value)


@dataclass
class ComparativeSettings:
    """What the comparative step needs from the config.

    plan: the c ablation levels; hidden: hidden-unit ablation (None when no step masks units);
    crop_rate: q of the nested crops; strategy, reduction: see ``comparative_step``.
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
              hidden: {rate: 0.1, sites: [ffn_hidden, attn_heads], granularity: unit, scale: true}
              crop: {rate: 0.5}
        """
        section = cfg.get("ablation", None) or {}
        if isinstance(section, DictConfig):
            section = OmegaConf.to_container(section, resolve=True)
        known = {"n_hidden", "n_input", "order", "hidden", "crop", "seed"}
        unknown = set(section) - known
        if unknown:
            raise ValueError(
                f"unknown keys in ablation: {sorted(unknown)}; valid keys are {sorted(known)}"
            )
        n_hidden = _non_negative_int(section.get("n_hidden", 0), "ablation.n_hidden")
        n_input = _non_negative_int(section.get("n_input", 0), "ablation.n_input")
        plan = ablation_plan(n_hidden, n_input, section.get("order", "crop_first"))

        seed = cfg.get("seed", None)
        seed = _non_negative_int(section.get("seed", 0 if seed is None else seed), "ablation.seed")
        hidden_cfg = dict(section.get("hidden") or {})
        hidden = None
        if n_hidden > 0:
            hidden_cfg.setdefault("seed", seed)
            try:
                hidden = HiddenAblationConfig(**hidden_cfg)
            except TypeError as e:
                raise ValueError(f"bad ablation.hidden section {hidden_cfg}: {e}") from e
        crop_cfg = dict(section.get("crop") or {})
        unknown = set(crop_cfg) - {"rate"}
        if unknown:
            raise ValueError(
                f"unknown keys in ablation.crop: {sorted(unknown)} (only `rate`; how the input is "
                "split into chunks is a property of the dataset: set it in the dataset section)"
            )
        crop_rate = _rate(crop_cfg.get("rate", 0.5), "ablation.crop.rate")

        strategy = cfg.get("strategy", "sequential")
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        reduction = cfg.get("loss_reduction", "sample")
        if reduction not in REDUCTIONS:
            raise ValueError(f"loss_reduction must be one of {REDUCTIONS}, got {reduction!r}")
        return cls(plan, hidden, crop_rate, seed, strategy, reduction)
