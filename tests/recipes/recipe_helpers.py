"""Shared by the recipe tests: subprocess runs, DiskLogger parsing, configs for the tiny model."""

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
RECIPES = REPO / "recipes"
MODEL = dict(vocab_size=512, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32,
             intermediate_dim=64, max_seq_len=256)


def run(args, cwd, check=True, timeout=300, **env_vars):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", **env_vars)
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def read_metrics(log_dir):
    """{step: {metric: value}} from torchtune's DiskLogger files."""
    steps = {}
    for path in sorted(Path(log_dir).glob("*.txt")):
        for line in path.read_text().splitlines():
            m = re.match(r"Step (\d+) \| (.*)", line)
            if m:
                entry = steps.setdefault(int(m.group(1)), {})
                for kv in m.group(2).split():
                    key, value = kv.split(":")
                    entry[key] = float(value)
    return steps


def base_config(assets, out, **overrides):
    """The keys both our recipe and torchtune's full_finetune_single_device read."""
    cfg = {
        "output_dir": str(out),
        "tokenizer": {"_component_": "comparative_recipe.data.demo.demo_tokenizer",
                      "path": str(assets / "sp.model"), "max_seq_len": 256},
        "model": {"_component_": "comparative_recipe.models.tiny.tiny_llama", **MODEL},
        "checkpointer": {"_component_": "torchtune.training.FullModelHFCheckpointer",
                         "checkpoint_dir": str(assets / "base"),
                         "checkpoint_files": ["model.safetensors"],
                         "model_type": "LLAMA3_2", "output_dir": str(out)},
        "resume_from_checkpoint": False,
        "seed": 0, "shuffle": True, "batch_size": 4, "epochs": 1, "max_steps_per_epoch": 6,
        "gradient_accumulation_steps": 1, "clip_grad_norm": None,
        "optimizer": {"_component_": "torch.optim.AdamW", "lr": 1e-3, "fused": False},
        "lr_scheduler": {"_component_": "torchtune.training.lr_schedulers.get_cosine_schedule_with_warmup",
                         "num_warmup_steps": 2},
        "device": "cpu", "dtype": "fp32", "compile": False,
        "enable_activation_checkpointing": False,
        "metric_logger": {"_component_": "torchtune.training.metric_logging.DiskLogger",
                          "log_dir": str(out / "logs")},
        "log_every_n_steps": 1,
    }
    cfg.update(overrides)
    return cfg


def instruct_source(assets):
    return {"source": "json", "data_files": str(assets / "data.jsonl"), "split": "train",
            "train_on_input": False}


def comparative_config(assets, out, **overrides):
    cfg = base_config(assets, out)
    cfg.update({
        "dataset": {"_component_": "comparative_recipe.data.comparative_dataset",
                    "builder": "torchtune.datasets.instruct_dataset", **instruct_source(assets),
                    "chunking": {"mode": "window", "window": 12}},
        "task": "sft",
        "loss": {"_component_": "comparative_recipe.loss.ComparativeLoss"},
        "ablation": {"n_hidden": 1, "n_input": 1, "hidden": {"rate": 0.2}},
        "strategy": "sequential",
    })
    cfg.update(overrides)
    return cfg


def write(cfg, path):
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_recipe(cfg, tmp_path, name="run", check=True, recipe="comparative_finetune_single_device"):
    path = write(cfg, tmp_path / f"{name}.yaml")
    script = RECIPES / f"{recipe}.py"
    return run([sys.executable, str(script), "--config", str(path)], cwd=tmp_path, check=check)


def launch_distributed(cfg, tmp_path, name, nproc, launcher_args=(), check=True,
                       recipe="comparative_finetune_distributed", **env_vars):
    """``tune-cmp run --nproc_per_node N [launcher_args] <recipe>``."""
    path = write(cfg, tmp_path / f"{name}.yaml")
    return run([sys.executable, "-m", "comparative_recipe.cli", "run", f"--nproc_per_node={nproc}",
                *launcher_args, recipe, "--config", str(path)],
               cwd=tmp_path, check=check, **env_vars)


def with_output_dir(cfg, out):
    """``cfg`` writing to ``out`` (output_dir, logs and checkpointer output)."""
    return dict(cfg, output_dir=str(out),
                metric_logger={**cfg["metric_logger"], "log_dir": str(out / "logs")},
                checkpointer={**cfg["checkpointer"], "output_dir": str(out)})
