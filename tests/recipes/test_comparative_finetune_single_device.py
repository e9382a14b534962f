"""End-to-end runs of the single-device recipe (subprocesses, tiny model, generated data)."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.recipes.recipe_helpers import (
    MODEL,
    base_config,
    comparative_config,
    instruct_source,
    read_metrics,
    run,
    run_recipe,
    write,
)

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("batch_size,reduction", [(1, "sample"), (4, "token")])
def test_c0_matches_torchtune_full_finetune(assets, tmp_path, batch_size, reduction):
    """c = 0 is plain fine-tuning: the same per-step losses and weights as torchtune's recipe."""
    ours = comparative_config(assets, tmp_path / "ours", batch_size=batch_size, ablation={},
                              loss_reduction=reduction)
    run_recipe(ours, tmp_path, "ours")
    theirs = base_config(assets, tmp_path / "theirs", batch_size=batch_size)
    theirs.update({
        "dataset": {"_component_": "torchtune.datasets.instruct_dataset", **instruct_source(assets)},
        "loss": {"_component_": "torchtune.modules.loss.CEWithChunkedOutputLoss"},
        "optimizer_in_bwd": False,
    })
    write(theirs, tmp_path / "theirs.yaml")
    run([str(Path(sys.executable).parent / "tune"), "run", "full_finetune_single_device", "--config", str(tmp_path / "theirs.yaml")],
        cwd=tmp_path)
    a, b = read_metrics(tmp_path / "ours" / "logs"), read_metrics(tmp_path / "theirs" / "logs")
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for step in a:
        assert a[step]["loss"] == pytest.approx(b[step]["loss"], rel=1e-5), step
        assert a[step]["loss_0"] == pytest.approx(a[step]["cmp_loss"], rel=1e-6)
    w_ours = load_file(tmp_path / "ours" / "checkpoints" / "step_000006" / "model-00001-of-00001.safetensors")
    w_theirs = load_file(tmp_path / "theirs" / "epoch_0" / "model-00001-of-00001.safetensors")
    for key in w_theirs:
        torch.testing.assert_close(w_ours[key], w_theirs[key], rtol=1e-4, atol=1e-6)


def test_resume_reproduces_the_uninterrupted_run(assets, tmp_path):
    """Kill-free resume test: a run's checkpoints are truncated to a mid-epoch one and resumed."""
    cfg = comparative_config(assets, tmp_path / "full", epochs=2, max_steps_per_epoch=4,
                             save_every_n_steps=1, keep_last_checkpoints=10, strategy="recompute")
    run_recipe(cfg, tmp_path, "full")
    full = read_metrics(tmp_path / "full" / "logs")
    assert sorted(full) == list(range(1, 9))
    ckpts = tmp_path / "full" / "checkpoints"
    for resume_from in [6, 4]:  # mid-epoch 2, and the epoch boundary
        out = tmp_path / f"resumed_{resume_from}"
        (out / "checkpoints").mkdir(parents=True)
        os.symlink(ckpts / f"step_{resume_from:06d}", out / "checkpoints" / f"step_{resume_from:06d}")
        resumed_cfg = dict(cfg, output_dir=str(out), resume_from_checkpoint=True,
                           metric_logger={**cfg["metric_logger"], "log_dir": str(out / "logs")},
                           checkpointer={**cfg["checkpointer"], "output_dir": str(out)})
        run_recipe(resumed_cfg, tmp_path, f"resumed_{resume_from}")
        resumed = read_metrics(out / "logs")
        assert sorted(resumed) == list(range(resume_from + 1, 9))
        for step in resumed:
            for key in ("loss", "loss_0", "loss_1", "loss_2", "lr"):
                assert resumed[step][key] == full[step][key], (resume_from, step, key)
        final = "step_000008/model-00001-of-00001.safetensors"
        w_a, w_b = load_file(ckpts / final), load_file(out / "checkpoints" / final)
        assert all(torch.equal(w_a[k], w_b[k]) for k in w_a)


def test_demo_config_runs_and_writes_checkpoints(tmp_path):
    """The embedded default through the CLI: metrics logged, validation run, checkpoints written."""
    out = tmp_path / "demo"
    run([sys.executable, "-m", "comparative_recipe.cli", "run", "comparative_finetune_single_device",
         "--config", "demo/tiny_needle_qa", f"output_dir={out}", "max_steps_per_epoch=4",
         "validation.every_n_steps=2", "validation.dataset.n_samples=32", "dataset.n_samples=128"],
        cwd=tmp_path)
    metrics = read_metrics(out / "logs")
    for key in ("loss", "cmp_loss", "loss_0", "loss_1", "loss_2", "violation_rate",
                "tokens_per_second", "pass_tokens_per_second", "lr"):
        assert key in metrics[4], key
    assert "val_loss_0" in metrics[2] and "val_loss_2" in metrics[4]
    step_dir = out / "checkpoints" / "step_000004"
    assert (step_dir / "config.json").is_file() and (step_dir / "recipe_state.pt").is_file()
    assert list(step_dir.glob("*.safetensors"))
    assert (out / "best").is_dir()
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]


BAD_INPUTS = [
    ({"ablation": {"n_hidden": 1, "hidden": {"rate": 1.0}}}, "rate"),
    ({"ablation": {"n_hidden": -1}}, "n_hidden"),
    ({"ablation": {"n_hidden": 1, "hidden": {"sites": ["ffn_hiden"]}}}, "ffn_hiden"),
    ({"ablation": {"n_input": 1, "crop": {"rate": -0.1}}}, "rate"),
    ({"strategy": "stack"}, "strategy"),
    ({"report": "sometimes"}, "report must be true or false"),
    ({"report": True, "metric_logger": {"_component_": "torchtune.training.metric_logging.StdoutLogger"}},
     "report: true reads the run's metric logs"),
    ({"gradient_acumulation_steps": 2}, "did you mean 'gradient_accumulation_steps'"),
    ({"fsdp_cpu_offload": False}, "comparative_finetune_distributed"),
    ({"validation": {"dataset": {}, "every_n_step": 2}}, "every_n_steps"),
    ({"validation": {"dataset": {}, "metric": "val_accuracy_0"}}, "val_accuracy_0' is not computed"),
    ({"dataset": {"_component_": "comparative_recipe.data.comparative_dataset",
                  "builder": "torchtune.datasets.instruct_dataset", "source": "json",
                  "data_files": "DATA", "split": "train",
                  "chunking": {"protect_leading": 100000}}},
     "droppable chunk"),
    ({"model": {"_component_": "comparative_recipe.models.tiny.tiny_llama", **dict(MODEL, vocab_size=256)},
      "checkpointer": {"_component_": "comparative_recipe.models.tiny.tiny_llama_hf_checkpointer",
                       "checkpoint_dir": "SMALL", "output_dir": "OUT", **dict(MODEL, vocab_size=256)}},
     "vocab"),
    ({"checkpointer": {"_component_": "torchtune.training.FullModelHFCheckpointer",
                       "checkpoint_dir": "/nonexistent/ckpt", "checkpoint_files": ["model.safetensors"],
                       "model_type": "LLAMA3_2", "output_dir": "OUT"}}, "checkpoint"),
]


@pytest.mark.parametrize("override,needle", BAD_INPUTS)
def test_bad_input_fails_before_training_with_a_clear_message(assets, tmp_path, override, needle):
    out = tmp_path / "out"
    cfg = comparative_config(assets, out)
    override = json.loads(json.dumps(override).replace("OUT", str(out)).replace("SMALL", str(tmp_path / "small"))
                          .replace("DATA", str(assets / "data.jsonl")))
    cfg.update(override)
    proc = run_recipe(cfg, tmp_path, check=False)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert needle in last, proc.stderr[-2000:]
    assert not (out / "checkpoints").exists() and not (out / "logs").exists()


def test_dataset_without_needed_fields(assets, tmp_path):
    cfg = comparative_config(assets, tmp_path / "out")
    cfg["dataset"]["column_map"] = {"input": "question"}
    proc = run_recipe(cfg, tmp_path, check=False)
    assert proc.returncode != 0 and "question" in proc.stderr


def test_classification_reports_accuracy_for_every_pass(assets, tmp_path):
    """Label words scored at the answer position; validation accuracy logged per pass."""
    rows = ["text,label"] + [
        f"{'the film was bright and warm' if i % 2 else 'the film was dull and cold'} {i},"
        f"{'yes' if i % 2 else 'no'}"
        for i in range(40)
    ]
    (tmp_path / "cls.csv").write_text("\n".join(rows) + "\n")
    dataset = {"_component_": "comparative_recipe.data.classification_dataset",
               "source": "csv", "data_files": str(tmp_path / "cls.csv"), "split": "train",
               "label_words": ["no", "yes"], "template": "Review: {text}\nLabel:"}
    cfg = comparative_config(assets, tmp_path / "cls", dataset=dataset, task="classification",
                             ablation={"n_hidden": 2}, strategy="stacked",
                             validation={"dataset": dataset, "every_n_steps": 3,
                                         "metric": "val_accuracy_0", "passes": "all"})
    run_recipe(cfg, tmp_path, "cls")
    metrics = read_metrics(tmp_path / "cls" / "logs")
    for k in range(3):
        assert 0.0 <= metrics[6][f"val_accuracy_{k}"] <= 1.0
        assert 0.0 <= metrics[6][f"accuracy_{k}"] <= 1.0
        assert 0.0 <= metrics[6][f"val_macro_f1_{k}"] <= 1.0
    assert metrics[6]["val_samples"] == 40
    best = torch.load(tmp_path / "cls" / "best" / "recipe_state.pt", weights_only=False)
    assert best["metric"] == "val_accuracy_0"
    assert best["value"] == max(metrics[s]["val_accuracy_0"] for s in (3, 6))


def test_validation_follows_its_cadence_without_a_second_run_at_epoch_ends(assets, tmp_path):
    """Regression: with every_n_steps 3 and epochs of 4 steps, validation ran at step 3 and
    again at step 4 (the epoch end the cadence just missed), then at 6 and 8. With a cadence it
    now runs on the cadence only; without one, at every epoch end."""
    val = dict(comparative_config(assets, tmp_path)["dataset"])
    cfg = comparative_config(assets, tmp_path / "cadence", epochs=2, max_steps_per_epoch=4,
                             validation={"dataset": val, "every_n_steps": 3})
    run_recipe(cfg, tmp_path, "cadence")
    metrics = read_metrics(tmp_path / "cadence" / "logs")
    assert sorted(s for s in metrics if "val_loss_0" in metrics[s]) == [3, 6]
    # the full model alone by default: no ablation losses in validation
    assert "val_loss_1" not in metrics[3]
    cfg = comparative_config(assets, tmp_path / "epochs", epochs=2, max_steps_per_epoch=4,
                             validation={"dataset": val})
    run_recipe(cfg, tmp_path, "epochs")
    metrics = read_metrics(tmp_path / "epochs" / "logs")
    assert sorted(s for s in metrics if "val_loss_0" in metrics[s]) == [4, 8]
