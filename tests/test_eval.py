"""The evaluation's config handling, report and output rules (in process, no model run)."""

import json

import pytest
import torch
from omegaconf import OmegaConf

from comparative_recipe.evaluation import (
    checkpoint_overrides,
    evaluation_config,
    evaluation_report,
    format_table,
    write_report,
)
from comparative_recipe.methods import ComparativeMethod
from comparative_recipe.training.distributed import DISTRIBUTED_KEYS, World
from comparative_recipe.training.progress import TrainingProgress
from comparative_recipe.training.trainer import Trainer


def training_config(tmp_path, **overrides):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir(exist_ok=True)
    (ckpt / "model-00001-of-00001.safetensors").write_bytes(b"")
    cfg = {
        "output_dir": str(tmp_path / "out"), "seed": 0, "device": "cpu", "dtype": "fp32",
        "batch_size": 4, "epochs": 1, "optimizer": {"_component_": "torch.optim.AdamW"},
        "tokenizer": {}, "model": {}, "dataset": {"_component_": "train"},
        "checkpointer": {"_component_": "x", "checkpoint_dir": str(ckpt),
                         "checkpoint_files": ["model.safetensors"], "output_dir": "${output_dir}"},
        "validation": {"dataset": {"_component_": "val"}, "batch_size": 8, "every_n_steps": 10,
                       "metric": "val_loss_0"},
        "ablation": {"n_hidden": 1},
    }
    cfg.update(overrides)
    return OmegaConf.create(cfg)


def test_the_training_config_is_an_eval_config(tmp_path):
    cfg = training_config(tmp_path)
    eval_cfg, settings = evaluation_config(cfg)
    assert eval_cfg.validation.dataset == {"_component_": "val"}
    assert eval_cfg.validation.batch_size == 8 and eval_cfg.validation.passes == "all"
    assert settings.output_path == tmp_path / "out" / "eval" / "ckpt.json"
    # the weights the recipes write, since the configured (base model) file is not there
    assert settings.checkpoint_overrides == {"checkpoint_files": ["model-00001-of-00001.safetensors"]}
    # training keys (optimizer, epochs, the training dataset) are accepted, as a trainer reads them
    method = ComparativeMethod.from_config(eval_cfg)
    assert method.validation_passes == "all"
    Trainer(eval_cfg, method, World.single_device(torch.device("cpu")),
            world_keys=(*DISTRIBUTED_KEYS, "eval"))


def test_the_eval_section_overrides_validation(tmp_path):
    cfg = training_config(tmp_path, eval={
        "dataset": {"_component_": "test"}, "batch_size": 2, "passes": "full",
        "generate": {"max_new_tokens": 5}, "output_path": str(tmp_path / "r.json")})
    eval_cfg, settings = evaluation_config(cfg)
    assert eval_cfg.validation.dataset == {"_component_": "test"}
    assert eval_cfg.validation.batch_size == 2
    method = ComparativeMethod.from_config(eval_cfg)
    assert method.validation_passes == "full" and method.generation.max_new_tokens == 5
    assert settings.output_path == tmp_path / "r.json"
    # without any validation batch size: the training batch size
    cfg = training_config(tmp_path, validation={"dataset": {"_component_": "val"}})
    assert evaluation_config(cfg)[0].validation.batch_size == 4


@pytest.mark.parametrize("override,error,needle", [
    ({"eval": {"output_pth": "x.json"}}, ValueError, "did you mean 'output_path'"),
    ({"eval": {"passes": "some"}}, ValueError, "validation.passes"),
    ({"eval": {"overwrite": "yes"}}, ValueError, "eval.overwrite"),
    ({"validation": None}, ValueError, "eval.dataset"),
    ({"eval": {"generate": {"max_tokens": 3}}}, ValueError, "max_tokens"),
])
def test_bad_eval_config_is_an_error(tmp_path, override, error, needle):
    cfg = training_config(tmp_path, **override)
    with pytest.raises(error, match=needle):
        eval_cfg, _ = evaluation_config(cfg)
        ComparativeMethod.from_config(eval_cfg)


def test_a_misspelt_top_level_key_is_still_an_error(tmp_path):
    eval_cfg, _ = evaluation_config(training_config(tmp_path, valdiation={}))
    with pytest.raises(ValueError, match="did you mean 'validation'"):
        Trainer(eval_cfg, ComparativeMethod.from_config(eval_cfg),
                World.single_device(torch.device("cpu")), world_keys=(*DISTRIBUTED_KEYS, "eval"))


def test_an_existing_report_is_never_replaced_without_overwrite(tmp_path):
    report = tmp_path / "r.json"
    report.write_text("mine")
    cfg = training_config(tmp_path, eval={"output_path": str(report)})
    with pytest.raises(FileExistsError, match="eval.overwrite=true"):
        evaluation_config(cfg)
    with pytest.raises(FileExistsError):
        write_report(report, {"a": 1})
    assert report.read_text() == "mine"
    cfg = training_config(tmp_path, eval={"output_path": str(report), "overwrite": True})
    _, settings = evaluation_config(cfg)
    write_report(settings.output_path, {"a": 1}, overwrite=settings.overwrite)
    assert json.loads(report.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_checkpoint_files_configured_or_found(tmp_path):
    ckpt = tmp_path / "c"
    ckpt.mkdir()
    (ckpt / "model.safetensors").write_bytes(b"")
    cfg = OmegaConf.create({"checkpoint_dir": str(ckpt), "checkpoint_files": ["model.safetensors"]})
    assert checkpoint_overrides(cfg) == {"checkpoint_files": ["model.safetensors"]}
    with pytest.raises(FileNotFoundError, match="not a directory"):
        checkpoint_overrides(OmegaConf.create({"checkpoint_dir": str(tmp_path / "nope")}))
    run = tmp_path / "run"
    (run / "best").mkdir(parents=True)
    (run / "best" / "model-00001-of-00001.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="best/model-00001-of-00001.safetensors"):
        checkpoint_overrides(OmegaConf.create({"checkpoint_dir": str(run)}))


def test_report_and_table(tmp_path):
    cfg = training_config(tmp_path)
    eval_cfg, settings = evaluation_config(cfg)
    metrics = {"val_loss_0": 1.5, "val_loss_1": 2.0, "val_exact_match_0": 0.5,
               "val_exact_match_1": 0.25, "val_f1_0": 0.6, "val_f1_1": 0.3, "val_samples": 4.0,
               "val_cmp_loss": 0.1, "val_violation_rate": 0.0}
    report = evaluation_report(metrics, cfg=eval_cfg, settings=settings,
                               pass_labels=["full model", "hidden p=0.10"], world_size=2)
    assert report["passes"] == [
        {"pass": 0, "ablation": "full model", "loss": 1.5, "exact_match": 0.5, "f1": 0.6},
        {"pass": 1, "ablation": "hidden p=0.10", "loss": 2.0, "exact_match": 0.25, "f1": 0.3},
    ]
    assert report["samples"] == 4 and report["world_size"] == 2
    assert report["checkpoint"]["checkpoint_files"] == ["model-00001-of-00001.safetensors"]
    assert report["dataset"] == {"_component_": "val"} and report["metrics"] == metrics
    json.dumps(report)
    table = format_table(report).splitlines()
    assert table[0].split() == ["pass", "ablation", "loss", "exact_match", "f1"]
    assert table[2].split() == ["0", "full", "model", "1.5000", "0.5000", "0.6000"]
    assert "samples=4" in table[-1] and "full model ahead of every ablation" in table[-1]


@pytest.mark.parametrize("name", ["val_exact_match_0", "val_f1_2"])
def test_generation_metrics_select_the_highest(name):
    progress = TrainingProgress(seed=0)
    assert progress.record_best({name: 0.5}, name)
    assert not progress.record_best({name: 0.4}, name)
    assert progress.record_best({name: 0.6}, name)


def test_a_baseline_method_is_evaluated_on_its_full_model(tmp_path):
    from comparative_recipe.methods import build_method

    cfg = training_config(tmp_path, method="dropout", ablation={"hidden": {"rate": 0.1}})
    eval_cfg, _ = evaluation_config(cfg)
    assert "passes" not in eval_cfg.validation
    Trainer(eval_cfg, build_method(eval_cfg), World.single_device(torch.device("cpu")),
            world_keys=(*DISTRIBUTED_KEYS, "eval"))
