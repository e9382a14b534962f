"""The early-exit recipes end to end on a tiny 4-layer model: training, the halting heads in
every checkpoint, exact resume, 2 ranks like 1, LoRA, `tune-cmp eval` per exit rule, and bad
input failing before anything is written."""

import json
import os
import sys

import pytest
import torch

from comparative_recipe.models.tiny import init_tiny_llama_checkpoint
from tests.recipes.recipe_helpers import (
    MODEL,
    base_config,
    launch_distributed,
    read_metrics,
    run,
    run_recipe,
    with_output_dir,
    write,
)
from tests.recipes.test_lora import LORA

pytestmark = pytest.mark.slow

DEEP = dict(MODEL, num_layers=4)
HEADS = "halting_heads.pt"


@pytest.fixture(scope="module")
def deep_base(tmp_path_factory):
    root = tmp_path_factory.mktemp("deep_base")
    init_tiny_llama_checkpoint(root, seed=0, **DEEP)
    return root


def needle(split="train", n=32):
    return {"_component_": "comparative_recipe.data.needle_qa_dataset", "split": split,
            "n_samples": n, "n_paragraphs": 2, "seed": 0}


def early_exit_config(assets, base, out, **overrides):
    cfg = base_config(assets, out)
    cfg["model"] = {**cfg["model"], **DEEP}
    cfg["checkpointer"] = {**cfg["checkpointer"], "checkpoint_dir": str(base)}
    cfg.update({
        "dataset": needle(), "method": "early_exit", "task": "sft",
        "early_exit": {"halting": {"depth": 2, "hidden_dim": 16}, "beta": 0.5},
        "validation": {"dataset": needle("validation", 16), "batch_size": 8},
        "optimizer": {"_component_": "torch.optim.AdamW", "lr": 3e-3, "fused": False},
    })
    cfg.update(overrides)
    return cfg


def train(cfg, tmp_path, name, recipe="early_exit_finetune_single_device", check=True):
    return run_recipe(cfg, tmp_path, name, recipe=recipe, check=check)


def evaluate(cfg, tmp_path, name, *overrides, check=True):
    path = write(cfg, tmp_path / f"{name}.yaml")
    return run([sys.executable, "-m", "comparative_recipe.cli", "eval", "--config", str(path),
                *overrides], cwd=tmp_path, check=check)


@pytest.fixture(scope="module")
def trained(assets, deep_base, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("early_exit")
    cfg = early_exit_config(assets, deep_base, tmp / "run")
    train(cfg, tmp, "run")
    return cfg, tmp / "run"


def test_checkpoints_hold_the_halting_heads_and_eval_reports_every_rule(trained, tmp_path):
    cfg, out = trained
    for ckpt in (out / "best", out / "checkpoints" / "step_000006"):
        heads = torch.load(ckpt / HEADS, weights_only=True)
        assert heads["weights.0"].shape == (3, 64, 16)  # L-1 heads over [2D] -> 16
    metrics = read_metrics(out / "logs")
    assert 1 <= metrics[6]["val_q_exit_layers"] <= 4 and metrics[6]["val_samples"] == 16
    evaluate(cfg, tmp_path, "eval", f"checkpointer.checkpoint_dir={out / 'best'}",
             f"eval.output_path={tmp_path / 'report.json'}")
    report = json.loads((tmp_path / "report.json").read_text())
    rows = {r["rule"]: r for r in report["exit_rules"]}
    assert list(rows) == ["full", "q_exit", "sample", "patience"]
    assert rows["full"]["layers"] == 4 and rows["full"]["speedup"] == 1.0
    assert rows["patience"]["setting"] == "patience=1"  # max(1, min(6, L // 3))
    for r in rows.values():
        assert sum(r["exit_histogram"]) == 16
        assert r["layers"] == pytest.approx(
            sum(n * c for n, c in enumerate(r["exit_histogram"], 1)) / 16)
    # the layer-by-layer Q-exit takes the decisions of the whole-depth rule of validation
    m = report["metrics"]
    assert rows["q_exit"]["layers"] == pytest.approx(m["val_q_exit_layers"])
    assert rows["q_exit"]["exact_match"] == pytest.approx(m["val_q_exit_exact_match"])
    assert rows["q_exit"]["loss"] == pytest.approx(m["val_q_exit_loss"], rel=1e-5)
    assert rows["full"]["loss"] == pytest.approx(m["val_last_loss"], rel=1e-5)


def test_resume_reproduces_the_uninterrupted_run(assets, deep_base, tmp_path):
    cfg = early_exit_config(assets, deep_base, tmp_path / "full", epochs=2, max_steps_per_epoch=3,
                            save_every_n_steps=1, keep_last_checkpoints=10)
    train(cfg, tmp_path, "full")
    full = read_metrics(tmp_path / "full" / "logs")
    ckpts = tmp_path / "full" / "checkpoints"
    out = tmp_path / "resumed"
    (out / "checkpoints").mkdir(parents=True)
    os.symlink(ckpts / "step_000004", out / "checkpoints" / "step_000004")
    train(dict(with_output_dir(cfg, out), resume_from_checkpoint=True), tmp_path, "resumed")
    resumed = read_metrics(out / "logs")
    assert sorted(resumed) == [5, 6]
    for step in resumed:
        for key in ("loss", "task_loss", "kl", "expected_layers", "lr"):
            assert resumed[step][key] == full[step][key], (step, key)
    a = torch.load(ckpts / "step_000006" / HEADS, weights_only=True)
    b = torch.load(out / "checkpoints" / "step_000006" / HEADS, weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_two_ranks_with_activation_checkpointing_train_like_one(assets, deep_base, tmp_path):
    one = early_exit_config(assets, deep_base, tmp_path / "one", max_steps_per_epoch=3,
                            shuffle=False)
    train(one, tmp_path, "one")
    two = early_exit_config(assets, deep_base, tmp_path / "two", max_steps_per_epoch=3,
                            shuffle=False, batch_size=2, enable_activation_checkpointing=True)
    launch_distributed(two, tmp_path, "two", 2, recipe="early_exit_finetune_distributed")
    m1, m2 = read_metrics(tmp_path / "one" / "logs"), read_metrics(tmp_path / "two" / "logs")
    for step in (1, 2, 3):
        for key in ("loss", "task_loss", "kl", "expected_layers"):
            assert m2[step][key] == pytest.approx(m1[step][key], rel=1e-4), (step, key)
    h1 = torch.load(tmp_path / "one" / "checkpoints" / "step_000003" / HEADS, weights_only=True)
    h2 = torch.load(tmp_path / "two" / "checkpoints" / "step_000003" / HEADS, weights_only=True)
    for k in h1:
        torch.testing.assert_close(h2[k], h1[k], rtol=1e-4, atol=1e-5)


def test_lora_trains_the_adapters_and_the_heads(assets, deep_base, tmp_path):
    model = {"_component_": "comparative_recipe.models.tiny.tiny_lora_llama", **DEEP, **LORA}
    cfg = early_exit_config(assets, deep_base, tmp_path / "lora", model=model,
                            max_steps_per_epoch=3)
    train(cfg, tmp_path, "lora")
    step = tmp_path / "lora" / "checkpoints" / "step_000003"
    assert (step / "adapter_model.pt").is_file() and (step / HEADS).is_file()
    initial = torch.load(step / HEADS, weights_only=True)["weights.0"]
    assert initial.shape == (3, 64, 16)
    evaluate(cfg, tmp_path, "eval", f"eval.adapter={step}",
             f"eval.output_path={tmp_path / 'lora.json'}", "eval.exit_rules={q_exit: {q: 0.3}}")
    rows = json.loads((tmp_path / "lora.json").read_text())["exit_rules"]
    assert [r["rule"] for r in rows] == ["full", "q_exit"] and rows[1]["setting"] == "q=0.3"


def _fails(proc, *messages):
    assert proc.returncode != 0
    for m in messages:
        assert m in proc.stderr + proc.stdout, (m, proc.stderr[-3000:])


def test_bad_input_fails_before_anything_is_written(assets, deep_base, trained, tmp_path):
    for name, overrides, message in [
        ("q", {"validation": {"dataset": needle("validation", 16),
                              "exit_rules": {"q_exit": {"q": 1.5}}}},
         "q_exit.q must be a number in (0, 1), got 1.5"),
        ("beta", {"early_exit": {"beta": -1}}, "early_exit.beta must be a finite number >= 0"),
        ("lambda_p", {"early_exit": {"lambda_p": 1.2}}, "early_exit.lambda_p must be a number in (0, 1)"),
        ("method", {"method": "comparative"}, "trains method: early_exit"),
    ]:
        out = tmp_path / name
        _fails(train(early_exit_config(assets, deep_base, out, **overrides), tmp_path, name,
                     check=False), message)
        assert not out.exists(), name
    cfg, run_dir = trained
    # heads of another configuration than the checkpoint's
    other = dict(cfg, early_exit={"halting": {"depth": 2, "hidden_dim": 32}})
    _fails(evaluate(other, tmp_path, "mismatch", f"checkpointer.checkpoint_dir={run_dir / 'best'}",
                    f"eval.output_path={tmp_path / 'm.json'}", check=False),
           "does not fit the configured HaltingHeads", "weights.0: (3, 64, 16) in the file, (3, 64, 32) configured")
    assert not (tmp_path / "m.json").exists()
    # a checkpoint without halting heads (the base model)
    _fails(evaluate(cfg, tmp_path, "noheads", f"eval.output_path={tmp_path / 'n.json'}", check=False),
           f"holds no {HEADS}")
    # an exit rule for a method without them
    comparative = {k: v for k, v in cfg.items() if k not in ("method", "early_exit")}
    _fails(evaluate(comparative, tmp_path, "cmp", f"checkpointer.checkpoint_dir={run_dir / 'best'}",
                    f"eval.output_path={tmp_path / 'c.json'}", "eval.exit_rules={q_exit: null}",
                    check=False), "exit_rules")


def test_pabee_baseline_trains_without_heads_and_exits_by_patience(assets, deep_base, tmp_path):
    cfg = early_exit_config(assets, deep_base, tmp_path / "pabee", max_steps_per_epoch=3,
                            early_exit={"objective": "pabee"})
    train(cfg, tmp_path, "pabee")
    best = tmp_path / "pabee" / "best"
    assert not (best / HEADS).exists()
    evaluate(cfg, tmp_path, "eval", f"checkpointer.checkpoint_dir={best}",
             f"eval.output_path={tmp_path / 'pabee.json'}")
    rows = json.loads((tmp_path / "pabee.json").read_text())["exit_rules"]
    assert [r["rule"] for r in rows] == ["full", "patience"]


def test_two_ranks_evaluate_like_one(trained, tmp_path):
    """Each rank runs its rows layer by layer and joins the layers' collectives until every
    rank is done: the same rows, decisions and metrics as one process."""
    cfg, out = trained
    reports = {}
    for n in (1, 2):
        path = write(cfg, tmp_path / f"eval{n}.yaml")
        torchrun = [f"--nproc_per_node={n}"] if n > 1 else []
        run([sys.executable, "-m", "comparative_recipe.cli", "eval", *torchrun, "--config",
             str(path), f"checkpointer.checkpoint_dir={out / 'best'}",
             f"eval.output_path={tmp_path / f'r{n}.json'}"], cwd=tmp_path)
        reports[n] = json.loads((tmp_path / f"r{n}.json").read_text())
    assert reports[2]["world_size"] == 2
    for a, b in zip(reports[1]["exit_rules"], reports[2]["exit_rules"]):
        assert a["rule"] == b["rule"] and a["exit_histogram"] == b["exit_histogram"]
        for key in ("exact_match", "layers"):
            assert a[key] == pytest.approx(b[key])
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
