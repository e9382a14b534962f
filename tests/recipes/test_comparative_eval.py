"""`tune-cmp eval` end to end: train the demo config a few steps, then evaluate its checkpoint
on one process and on 2 torchrun ranks (gloo, CPU)."""

import json
import sys

import pytest
import torch

from tests.recipes.recipe_helpers import read_metrics, run

pytestmark = pytest.mark.slow

# 25 validation samples: an odd count, so 2 ranks get a padding sample that must count nowhere.
DEMO = ["--config", "demo/tiny_needle_qa", "validation.dataset.n_samples=25",
        "validation.generate.max_new_tokens=4"]


def tune_cmp(*args, cwd, check=True):
    return run([sys.executable, "-m", "comparative_recipe.cli", *map(str, args)], cwd=cwd, check=check)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """4 steps of the demo, validated (every pass, with generation) at step 4, the step of the
    last checkpoint; best checkpoint by token F1."""
    tmp = tmp_path_factory.mktemp("eval")
    out = tmp / "out"
    tune_cmp("run", "comparative_finetune_single_device", *DEMO, f"output_dir={out}",
             "max_steps_per_epoch=4", "validation.every_n_steps=4", "dataset.n_samples=128",
             "validation.metric=val_f1_0", cwd=tmp)
    return tmp, out


@pytest.fixture(scope="module")
def one_rank(trained):
    tmp, out = trained
    proc = tune_cmp("eval", *DEMO, f"output_dir={out}",
                    f"checkpointer.checkpoint_dir={out / 'checkpoints' / 'step_000004'}", cwd=tmp)
    report = json.loads((out / "eval" / "step_000004.json").read_text())
    return proc, report


def test_eval_reports_every_pass_and_matches_the_trainers_validation(trained, one_rank):
    tmp, out = trained
    proc, report = one_rank
    logged = read_metrics(out / "logs")[4]
    assert report["samples"] == 25 == logged["val_samples"]
    assert [p["pass"] for p in report["passes"]] == [0, 1, 2]
    assert report["passes"][0]["ablation"] == "full model"
    for k, entry in enumerate(report["passes"]):
        assert set(entry) == {"pass", "ablation", "loss", "exact_match", "f1"}
        # the trainer's own validation of the same weights (logged at step 4, then saved)
        assert entry["loss"] == pytest.approx(logged[f"val_loss_{k}"], rel=1e-5), k
        for name in ("exact_match", "f1"):
            assert 0.0 <= entry[name] <= 1.0
            assert entry[name] == pytest.approx(logged[f"val_{name}_{k}"], abs=1e-4), (k, name)
    assert report["checkpoint"]["checkpoint_files"] == ["model-00001-of-00001.safetensors"]
    assert "full model" in proc.stdout and "exact_match" in proc.stdout
    best = torch.load(out / "best" / "recipe_state.pt", weights_only=False)
    assert best["metric"] == "val_f1_0"
    # nothing of the training run was touched or created by the evaluation
    assert sorted(p.name for p in out.iterdir()) == [".staging", "base_model", "best",
        "checkpoints", "eval", "logs", "tokenizer", "torchtune_config.yaml"]


def test_two_ranks_give_the_numbers_of_one(trained, one_rank):
    tmp, out = trained
    path = tmp / "two_ranks.json"
    tune_cmp("eval", "--nproc_per_node", "2", *DEMO, f"output_dir={out}",
             f"checkpointer.checkpoint_dir={out / 'best'}", f"eval.output_path={path}", cwd=tmp)
    two, one = json.loads(path.read_text()), one_rank[1]
    assert two["world_size"] == 2 and two["samples"] == 25
    for key, value in one["metrics"].items():
        assert two["metrics"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_existing_report_and_misspelt_key_fail_before_loading(trained, one_rank):
    tmp, out = trained
    ckpt = f"checkpointer.checkpoint_dir={out / 'checkpoints' / 'step_000004'}"
    proc = tune_cmp("eval", *DEMO, f"output_dir={out}", ckpt, cwd=tmp, check=False)
    assert proc.returncode != 0 and "eval.overwrite=true" in proc.stderr.strip().splitlines()[-1]
    proc = tune_cmp("eval", *DEMO, f"output_dir={out}", ckpt, f"eval.output_pth={tmp / 'x.json'}",
                    cwd=tmp, check=False)
    assert proc.returncode != 0
    assert "did you mean 'output_path'" in proc.stderr.strip().splitlines()[-1]
