"""Every shipped config parses, names components that exist, and passes the recipe's checks."""

import inspect
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from comparative_recipe._torchtune_compat import component
from comparative_recipe.data.chunking import ChunkingConfig, chunking_config
from comparative_recipe.methods import ComparativeMethod, build_method
from comparative_recipe.training.adapters import lora_settings
from comparative_recipe.training.distributed import DISTRIBUTED_KEYS
from comparative_recipe.training.trainer import TRAINER_KEYS, VALIDATION_KEYS, check_config_keys

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))
# "#   tune download <repo> ... --output-dir <dir>" in a config's header comment
DOWNLOAD = re.compile(r"^#\s+tune download (\S+) .*?--output-dir (\S+)", re.M)
DOWNLOADED = [p for p in CONFIGS if DOWNLOAD.search(p.read_text())]
# The authors rank against the first ablated model for large models, the ultra baseline for small
LARGE_MODEL_PARAMS = 3e9
# Adapter configs: a lora_* / qlora_* builder (torchtune 0.6.1 has no qlora_qwen2_5_*: Qwen's
# QLoRA configs use the LoRA builder with quantize_base: True, and say so in their name)
LORA_CONFIGS = [p for p in CONFIGS if "lora" in str(OmegaConf.load(p).model._component_)]
# The sections a LoRA config keeps from the full fine-tuning config it is a variant of
SHARED_SECTIONS = ("task", "ablation", "loss", "strategy", "tokenizer", "checkpointer", "dataset",
                   "batch_size", "gradient_accumulation_steps", "loss_reduction",
                   "num_output_chunks", "lr_scheduler", "dtype")


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
    method = build_method(cfg)  # checks the method's sections
    if isinstance(method, ComparativeMethod):
        assert method.settings.num_ablations >= 1
    assert cfg.task in ("sft", "classification")
    # every key is one the recipe it belongs to reads (the distributed keys only there)
    world_keys = DISTRIBUTED_KEYS if not path.stem.endswith("_single_device") else ()
    check_config_keys(cfg, TRAINER_KEYS | method.config_keys | set(world_keys))
    if "validation" in cfg:
        check_config_keys(cfg.validation, VALIDATION_KEYS | method.validation_keys, "validation")
        if "metric" in cfg.validation:  # one the run's validation computes
            assert cfg.validation.metric in {f"val_{n}" for n in method.validation_metric_names()}


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
    hidden = hidden_ablation(build_method(cfg))
    for site in hidden.sites if hidden is not None else ():
        assert counts[site] and all(n > 0 for n in counts[site]), site
    # the tokenizer never makes a sample longer than the model's positions
    tokenizer_len = cfg.tokenizer.get("max_seq_len", None)
    if tokenizer_len is not None:
        assert tokenizer_len <= model.max_seq_len, (tokenizer_len, model.max_seq_len)
    baseline = cfg.get("loss", {}).get("baseline", "ultra")
    assert baseline == ("first" if n_params >= LARGE_MODEL_PARAMS else "ultra"), n_params


def hidden_ablation(method):
    """The hidden-unit ablation a method masks with (None if it masks none: early exit)."""
    if isinstance(method, ComparativeMethod):
        return method.settings.hidden
    return getattr(method, "hidden", None)


def _dataset_sections(cfg):
    container = OmegaConf.to_container(cfg, resolve=True)
    yield "dataset", container["dataset"]
    if "validation" in container and "dataset" in container["validation"]:
        yield "validation.dataset", container["validation"]["dataset"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_dataset_sections_parse(path):
    """What `tune validate` does not reach: the chunking section, and the keys that
    comparative_dataset passes on to its builder (bound to the builder's signature)."""
    for where, section in _dataset_sections(OmegaConf.load(path)):
        kwargs = {k: v for k, v in section.items() if k != "_component_"}
        if "chunking" in kwargs:
            chunking_config(kwargs.pop("chunking"), ChunkingConfig())
        kwargs.pop("chunk_roles", None)  # comparative_dataset's own key, not the builder's
        if "builder" in kwargs:
            builder = component(kwargs.pop("builder"))
            try:
                inspect.signature(builder).bind(None, **kwargs)  # the tokenizer, then the keys
            except TypeError as e:
                raise AssertionError(f"{where}: {e}") from e


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_strategy_and_distributed_keys_fit_the_config(path):
    cfg = OmegaConf.load(path)
    method = build_method(cfg)
    settings = method.settings if isinstance(method, ComparativeMethod) else None
    if settings is not None and settings.strategy == "stacked":
        # stacking right-pads every crop view to the uncropped length: (1+c) full passes
        assert not settings.uses_crops
    if path.stem.endswith("_distributed"):
        assert set(DISTRIBUTED_KEYS) <= set(cfg), sorted(set(DISTRIBUTED_KEYS) - set(cfg))


@pytest.mark.parametrize(
    "path", [p for p in CONFIGS if "long_context" in p.stem], ids=lambda p: p.stem
)
def test_long_context_configs_are_memory_lean_and_crop_first(path):
    cfg = OmegaConf.load(path)
    assert cfg.tokenizer.max_seq_len >= 8192
    assert cfg.enable_activation_checkpointing and cfg.strategy == "recompute"
    assert cfg.num_output_chunks >= 8
    assert cfg.ablation.n_input >= 2 and cfg.ablation.get("n_hidden", 0) <= 1
    assert cfg.dataset.chunking.mode in ("paragraph", "window")


def test_long_context_configs_are_shipped():
    names = {p.relative_to(p.parents[1]).as_posix() for p in CONFIGS if "long_context" in p.stem}
    assert any(n.endswith("_distributed.yaml") for n in names)
    assert any(n.endswith("_single_device.yaml") for n in names)


@pytest.mark.parametrize("path", DOWNLOADED, ids=lambda p: p.stem)
def test_the_download_line_fills_the_checkpoint_dir(path):
    """`tune download ... --output-dir D` in the header: the checkpointer reads D and the
    tokenizer's files are in D."""
    out = DOWNLOAD.search(path.read_text()).group(2).rstrip("/")
    cfg = OmegaConf.load(path)
    assert str(cfg.checkpointer.checkpoint_dir).rstrip("/") == out
    for key in ("path", "merges_file"):
        if key in cfg.tokenizer:
            assert str(cfg.tokenizer[key]).startswith(out + "/"), key


def _is_qlora(path):
    return "qlora" in path.stem


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_adapter_configs_are_recognised_by_their_builder(path):
    """A config is an adapter config exactly when its builder is a LoRA one, and its name says
    which: `_lora_` / `_qlora_` (QLoRA: quantized base weights, activation checkpointing)."""
    cfg = OmegaConf.load(path)
    settings = lora_settings(cfg.model)  # raises on a key the builder does not take
    builder = str(cfg.model._component_)
    if "lora" not in builder:
        assert settings is None, builder
        assert "save_adapter_weights_only" not in cfg
        assert "lora" not in path.stem
        return
    assert settings is not None, builder
    assert re.search(r"_q?lora_", path.stem), path.stem
    assert settings.rank >= 1 and settings.target_modules
    assert settings.quantize_base is _is_qlora(path), (builder, settings)
    if "qlora" in builder:
        assert _is_qlora(path)
    if _is_qlora(path):
        assert cfg.enable_activation_checkpointing is True
    assert isinstance(cfg.save_adapter_weights_only, bool)


def test_adapter_configs_are_shipped():
    names = {p.relative_to(p.parents[1]).as_posix() for p in LORA_CONFIGS}
    assert "qwen2_5/0.5B_lora_comparative_single_device.yaml" in names
    assert "smollm2/135M_lora_comparative_single_device.yaml" in names
    assert any(_is_qlora(p) for p in LORA_CONFIGS)
    assert any(p.stem.endswith("_distributed") for p in LORA_CONFIGS)


@pytest.mark.parametrize("path", LORA_CONFIGS, ids=lambda p: p.stem)
def test_adapter_configs_keep_their_full_configs_comparative_sections(path):
    """An adapter config is its full fine-tuning config with an adapter: the same task, passes,
    loss, data and model files, its own output_dir."""
    full_path = path.with_name(re.sub(r"_q?lora_", "_", path.name))
    assert full_path.is_file(), full_path
    cfg, full = OmegaConf.load(path), OmegaConf.load(full_path)
    raw, raw_full = OmegaConf.to_container(cfg), OmegaConf.to_container(full)  # ${output_dir} kept
    for key in SHARED_SECTIONS:
        assert raw.get(key) == raw_full.get(key), key
    assert cfg.output_dir != full.output_dir
    if full_path.stem.endswith("_distributed"):
        for key in DISTRIBUTED_KEYS:
            assert cfg[key] == full[key], key
