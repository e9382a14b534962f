"""The pruning table: task metric, parameters and measured inference time of pruned models.

Not a test and not run in CI. Every row is ``tune-cmp prune`` then ``tune-cmp eval`` of the
written ``torchtune_config.yaml`` (the full model only), at FFN sparsities 10-50% (heads at the
largest sparsity <= it that the grouped-query layout allows), for attribution in the three data
settings and the three baselines:

    # the demo task: a plainly and a comparatively fine-tuned model from the same start
    python benchmarks/pruning_table.py demo --run plain=/tmp/demo_plain \\
        --run comparative=/tmp/demo_cmp --out /tmp/prune_demo
    # SmolLM2-135M-Instruct on Rotten Tomatoes (after smollm2_rotten_tomatoes.py prepare DIR)
    python benchmarks/pruning_table.py smollm2 --data /tmp/smollm2_rt --out /tmp/prune_rt
    python benchmarks/pruning_table.py reduce --data /tmp/smollm2_rt --out /tmp/prune_rt
    python benchmarks/pruning_table.py reduce --run plain=/tmp/demo_plain \\
        --run comparative=/tmp/demo_cmp --out /tmp/prune_demo --sparsities 0.5
    python benchmarks/pruning_table.py table       # the README's tables again

``reduce`` measures attribution's sum vs max over positions (and all vs answer positions) on
SmolLM2. The SmolLM2 rows score 64 training reviews (16 for the low-resource ones) and evaluate
on the first 128 dev reviews (``--examples``, ``--dev-size``).
Inference time: the median of 5 timed forwards of one fixed batch (after 2 warm-up ones), in
this process, on the CPU with the threads torch has. Figures go to
``benchmarks/results/pruning.json``.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

RESULTS = Path(__file__).resolve().parent / "results" / "pruning.json"
SPARSITIES = (0.1, 0.2, 0.3, 0.4, 0.5)
# label -> prune section: attribution in the three data settings, then the baselines
METHODS = {
    "attribution (supervised)": {"method": "attribution"},
    "attribution (16 examples)": {"method": "attribution", "num_examples": 16},
    "attribution (unsupervised)": {"method": "attribution", "data": "unsupervised"},
    "wanda": {"method": "wanda"},
    "magnitude": {"method": "magnitude"},
    "random": {"method": "random"},
}
DATA_METHODS = ("attribution", "wanda")


def _tune_cmp() -> str:
    beside = Path(sys.executable).parent / "tune-cmp"
    return str(beside) if beside.exists() else "tune-cmp"


def _env() -> Dict[str, str]:
    return dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")


def head_sparsity(s: float, heads: int, kv: int) -> float:
    """The largest head sparsity <= s that keeps the grouped-query layout (0: none)."""
    step = 1 if heads == kv else kv
    return max([k / heads for k in range(0, heads, step) if k / heads <= s + 1e-9])


def _run(cmd: List[str]) -> None:
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, env=_env(), stdout=subprocess.DEVNULL)


def inference_ms(config_path: Path, batch: int, seq: int) -> float:
    """Median ms of a forward of [batch, seq] random tokens of the model ``config_path``
    describes, its weights loaded by its checkpointer."""
    import torch
    from omegaconf import OmegaConf
    from torchtune import config, training

    from comparative_recipe.evaluation import checkpoint_overrides
    from comparative_recipe.training.checkpointing import instantiate_checkpointer

    cfg = OmegaConf.load(config_path)
    model = config.instantiate(cfg.model)
    ckpt = instantiate_checkpointer(cfg.checkpointer, **checkpoint_overrides(cfg.checkpointer))
    model.load_state_dict(ckpt.load_checkpoint()[training.MODEL_KEY])
    model.eval()
    tokens = torch.randint(0, model.tok_embeddings.num_embeddings, (batch, seq),
                           generator=torch.Generator().manual_seed(0))
    times = []
    with torch.no_grad():
        for i in range(7):
            t0 = time.perf_counter()
            model(tokens)
            if i >= 2:
                times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def _eval(config_path: Path, report: Path, extra: List[str]) -> Dict:
    if report.exists():
        report.unlink()
    _run([_tune_cmp(), "eval", "--config", str(config_path), "eval.passes=full",
          f"eval.output_path={report}", *extra])
    return json.loads(report.read_text())["passes"][0]


def _params(config_path: Path) -> int:
    import torch
    from omegaconf import OmegaConf
    from torchtune import config

    from comparative_recipe.pruning.export import parameter_count

    with torch.device("meta"):
        return parameter_count(config.instantiate(OmegaConf.load(config_path).model))


def _write_config(cfg, path: Path) -> Path:
    from omegaconf import OmegaConf

    path.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(cfg), path)
    return path


def rows_for(label: str, cfg: Dict, data_keys: Dict, out: Path, heads: int, kv: int,
             sparsities, eval_extra: List[str], timing) -> List[Dict]:
    """Prunes the model of ``cfg`` (a plain dict config: the trained model's) with every
    method at every sparsity and evaluates each; ``data_keys``: the prune keys of the data
    methods (dataset, batch size, examples)."""
    base_config = _write_config(cfg, out / "configs" / f"{label}.yaml")
    full = _eval(base_config, out / f"{label}_full.json", eval_extra)
    rows = [{"model": label, "method": "unpruned", "sparsity": 0.0, "head_sparsity": 0.0,
             "parameters": _params(base_config), "ms": inference_ms(base_config, *timing),
             **{k: full[k] for k in full if k not in ("pass", "ablation")}}]
    print(rows[-1], flush=True)
    for name, section in METHODS.items():
        for s in sparsities:
            h = head_sparsity(s, heads, kv)
            tag = _tag(label, name, s)
            pruned = out / tag
            prune = {**(data_keys if section["method"] in DATA_METHODS else {}), **section,
                     "sparsity": {"ffn_hidden": s, "attn_heads": h},
                     "output_dir": str(pruned), "overwrite": True}
            path = _write_config({**cfg, "prune": prune}, out / "configs" / f"{tag}.yaml")
            start = time.perf_counter()
            _run([_tune_cmp(), "prune", "--config", str(path)])
            seconds = time.perf_counter() - start
            config_path = pruned / "torchtune_config.yaml"
            result = _eval(config_path, out / f"{tag}.json", eval_extra)
            report = json.loads((pruned / "pruning.json").read_text())
            rows.append({
                "model": label, "method": name, "sparsity": s, "head_sparsity": round(h, 4),
                "parameters": report["parameters"]["after"], "prune_seconds": round(seconds, 1),
                "ms": inference_ms(config_path, *timing),
                **{k: result[k] for k in result if k not in ("pass", "ablation")},
            })
            print(rows[-1], flush=True)
    return rows


def _config(name: str, overrides: Dict) -> Dict:
    """The shipped config ``name`` as a dict, with ``overrides`` (dotted keys) applied."""
    from omegaconf import OmegaConf

    from comparative_recipe.cli import all_recipes

    path = next(c.file_path for r in all_recipes() for c in r.configs if c.name == name)
    cfg = OmegaConf.load(path)
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value)
    return OmegaConf.to_container(cfg, resolve=True)


def _save(key: str, value) -> None:
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results[key] = value
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")


def _runs(values: List[str]) -> Dict[str, Path]:
    return {v.split("=", 1)[0]: Path(v.split("=", 1)[1]) for v in values}


DEMO_EVAL = ["eval.generate.max_new_tokens=8"]


def _demo_config(run: Path) -> Dict:
    return _config("demo/tiny_needle_qa", {"output_dir": str(run),
                                           "checkpointer.checkpoint_dir": str(run / "best")})


def demo(args) -> None:
    rows = []
    for label, run in _runs(args.run).items():
        # scored on 256 training samples (16 for the low-resource rows)
        rows += rows_for(label, _demo_config(run), {"batch_size": 32, "num_examples": 256},
                         args.out, 4, 2,
                         SPARSITIES, DEMO_EVAL, (16, 256))
    _save("demo", rows)
    print_table(rows)


def _smollm2_setup(args):
    """The SmolLM2 config (scored on training reviews, evaluated on the first ``--dev-size``
    dev reviews) and the prune keys of the data methods."""
    import csv

    data, model = args.data / "rotten_tomatoes", args.data / "SmolLM2-135M-Instruct"
    args.out.mkdir(parents=True, exist_ok=True)
    dev = args.out / f"dev_{args.dev_size}.csv"
    with open(data / "dev.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))[: args.dev_size]
    with open(dev, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    cfg = _config("smollm2/135M_comparative_classification_single_device", {
        "output_dir": str(args.out), "checkpointer.checkpoint_dir": str(model),
        "tokenizer.path": str(model / "tokenizer.json"),
        "dataset.data_files": str(data / "train.csv"),
        "validation.dataset.data_files": str(dev), "device": "cpu", "dtype": "fp32",
    })
    train = dict(cfg["validation"]["dataset"], data_files=str(data / "train.csv"))
    return cfg, {"dataset": train, "batch_size": 16, "num_examples": args.examples}


def smollm2(args) -> None:
    cfg, data_keys = _smollm2_setup(args)
    rows = rows_for("SmolLM2-135M-Instruct", cfg, data_keys, args.out, 9, 3, args.sparsities,
                    [], (4, 64))
    _save("smollm2_rotten_tomatoes", rows)
    print_table(rows)


def reduce_grid(args) -> None:
    """Attribution's sum vs max over positions, over all positions or the answer's (for
    classification one position, where sum = max), at each sparsity: on SmolLM2 (``--data``)
    or on demo runs (``--run``)."""
    if args.run:
        models = [(label, _demo_config(run), {"batch_size": 32, "num_examples": 256}, 4, 2,
                   DEMO_EVAL) for label, run in _runs(args.run).items()]
        key, grid = "demo_reduce", [(r, p) for p in ("all", "answer")
                                    for r in ("sum", "max", "taylor")]
    else:
        cfg, data_keys = _smollm2_setup(args)
        models = [("SmolLM2-135M-Instruct", cfg, data_keys, 9, 3, [])]
        key, grid = "smollm2_reduce", [("sum", "all"), ("max", "all"), ("taylor", "all"),
                                       ("sum", "answer")]
    rows = []
    for label, cfg, data_keys, heads, kv, eval_extra in models:
        for reduce, positions in grid:
            for s in args.sparsities:
                pruned = args.out / f"reduce_{label}_{reduce}_{positions}_{s}"
                prune = {**data_keys, "reduce": reduce, "positions": positions,
                         "sparsity": {"ffn_hidden": s, "attn_heads": head_sparsity(s, heads, kv)},
                         "output_dir": str(pruned), "overwrite": True}
                path = _write_config({**cfg, "prune": prune},
                                     args.out / "configs" / f"{pruned.name}.yaml")
                _run([_tune_cmp(), "prune", "--config", str(path)])
                result = _eval(pruned / "torchtune_config.yaml", args.out / f"{pruned.name}.json",
                               eval_extra)
                rows.append({"model": label, "reduce": reduce, "positions": positions,
                             "sparsity": s, **{k: result[k] for k in result
                                               if k not in ("pass", "ablation")}})
                print(rows[-1], flush=True)
    _save(key, rows)


def _tag(label: str, name: str, s: float) -> str:
    return "".join(c if c.isalnum() else "_" for c in f"{label}_{name}_{s}")


def retime(args) -> None:
    rows = json.loads(RESULTS.read_text())[args.key]
    timing = (16, 256) if args.key == "demo" else (4, 64)
    for r in rows:
        path = (args.out / "configs" / f"{r['model']}.yaml" if r["method"] == "unpruned" else
                args.out / _tag(r["model"], r["method"], r["sparsity"]) / "torchtune_config.yaml")
        r["ms"] = inference_ms(path, *timing)
        print(r["model"], r["method"], r["sparsity"], f"{r['ms']:.1f} ms", flush=True)
    _save(args.key, rows)
    print_table(rows)


def print_table(rows: List[Dict]) -> None:
    """Per model: one row per method, one column per sparsity, cells ``metric / loss``; then
    the parameters and forward time at each sparsity (the same for every method)."""
    metric = "accuracy" if any("accuracy" in r for r in rows) else "exact_match"
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        full = next(r for r in mine if r["method"] == "unpruned")
        sparsities = sorted({r["sparsity"] for r in mine if r["method"] != "unpruned"})
        heads = {r["sparsity"]: r["head_sparsity"] for r in mine}
        print(f"\n**{model}**: unpruned {metric} {full[metric]:.3f}, loss {full['loss']:.3f}, "
              f"{full['parameters']:,} parameters, forward {full['ms']:.0f} ms\n")
        print("| FFN / head sparsity | " + " | ".join(
            f"{s:.1f} / {heads[s]:.2f}" for s in sparsities) + " |")
        print("|---" * (len(sparsities) + 1) + "|")
        for method in dict.fromkeys(r["method"] for r in mine if r["method"] != "unpruned"):
            cells = {r["sparsity"]: r for r in mine if r["method"] == method}
            print(f"| {method} | " + " | ".join(
                f"{cells[s][metric]:.3f} / {cells[s]['loss']:.3f}" for s in sparsities) + " |")
        first = {r["sparsity"]: r for r in mine if r["method"] != "unpruned"}
        print("| parameters | " + " | ".join(f"{first[s]['parameters']:,}" for s in sparsities)
              + " |")
        ms = {s: statistics.median(r["ms"] for r in mine if r["sparsity"] == s
                                   and r["method"] != "unpruned") for s in sparsities}
        print("| forward ms (median over methods) | " + " | ".join(
            f"{ms[s]:.0f}" for s in sparsities) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo")
    d.add_argument("--run", action="append", required=True, help="LABEL=RUN_DIR (has best/)")
    d.add_argument("--out", type=Path, required=True)
    for name, default in (("smollm2", [0.1, 0.3, 0.5]), ("reduce", [0.3, 0.5])):
        s = sub.add_parser(name)
        s.add_argument("--data", type=Path, help="smollm2_rotten_tomatoes.py's DIR")
        if name == "reduce":
            s.add_argument("--run", action="append", help="LABEL=RUN_DIR: demo runs instead")
        s.add_argument("--out", type=Path, required=True)
        s.add_argument("--sparsities", type=float, nargs="+", default=default)
        s.add_argument("--dev-size", type=int, default=128)
        s.add_argument("--examples", type=int, default=64, help="scored training reviews")
    t = sub.add_parser("retime", help="measure the forward times of a table's rows again "
                       "(when nothing else runs), from the configs its run wrote")
    t.add_argument("key", choices=["demo", "smollm2_rotten_tomatoes"])
    t.add_argument("--out", type=Path, required=True, help="the --out of that run")
    sub.add_parser("table")
    args = parser.parse_args()
    if args.command == "demo":
        demo(args)
    elif args.command == "smollm2":
        smollm2(args)
    elif args.command == "reduce":
        reduce_grid(args)
    elif args.command == "retime":
        retime(args)
    else:
        results = json.loads(RESULTS.read_text())
        for key in ("demo", "smollm2_rotten_tomatoes"):
            if key in results:
                print_table(results[key])


if __name__ == "__main__":
    main()
