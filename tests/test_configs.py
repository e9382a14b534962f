"""Every shipped config parses, names components that exist, and passes the recipe's checks."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from comparative_recipe._torchtune_compat import component
from comparative_recipe.methods import ComparativeMethod
from comparative_recipe.training.distributed import DISTRIBUTED_KEYS
from comparative_recipe.training.trainer import TRAINER_KEYS, VALIDATION_KEYS, check_config_keys

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))


def components(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("_component_", "builder"):
                yield value
            else:
                yield from components(value)
    elif isinstance(node, list):
        for value in node:
            yield from components(value)


def test_configs_are_shipped():
    names = {p.relative_to(p.parents[1]).as_posix() for p in CONFIGS}
    assert "demo/tiny_needle_qa.yaml" in names
    assert len(CONFIGS) >= 3


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_components_exist_and_settings_parse(path):
    cfg = OmegaConf.load(path)
    container = OmegaConf.to_container(cfg, resolve=True)
    for dotted in components(container):
        assert callable(component(dotted)), dotted
    method = ComparativeMethod.from_config(cfg)  # checks the method's sections
    assert method.settings.num_ablations >= 1
    assert cfg.task in ("sft", "classification")
    # every key is one the recipe it belongs to reads (the distributed keys only there)
    world_keys = DISTRIBUTED_KEYS if not path.stem.endswith("_single_device") else ()
    check_config_keys(cfg, TRAINER_KEYS | method.config_keys | set(world_keys))
    if "validation" in cfg:
        check_config_keys(cfg.validation, VALIDATION_KEYS | method.validation_keys, "validation")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_config_builds_its_model_on_the_meta_device(path):
    """The model section builds (no weights allocated) and its sizes fit the hidden ablation."""
    import torch
    from torchtune import config as tt_config

    from comparative_recipe.neurons import unit_counts

    cfg = OmegaConf.load(path)
    with torch.device("meta"):
        model = tt_config.instantiate(cfg.model)
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params > 0 and all(p.is_meta for p in model.parameters())
    counts = unit_counts(model)
    hidden = ComparativeMethod.from_config(cfg).settings.hidden
    for site in hidden.sites if hidden is not None else ():
        assert counts[site] and all(n > 0 for n in counts[site]), site
