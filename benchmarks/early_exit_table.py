"""The early-exit comparison table: full model, fixed truncation at Q-exit's mean depth, PABEE,
PonderNet sampling and Q-exit (task metric, mean exit layer, measured wall-time speed-up).

Not a test and not run in CI. Each setting trains with ``tune-cmp run
early_exit_finetune_single_device``, then ``tune-cmp eval`` times every exit rule on the best
checkpoint (``full``: all layers through the same layer-by-layer code), and a second eval times
``fixed`` at Q-exit's mean depth, rounded:

    python benchmarks/early_exit_table.py demo                   # demo/tiny_early_exit, ~10 min
    python benchmarks/early_exit_table.py smollm2 /tmp/smollm2_rt  # after smollm2_rotten_tomatoes.py prepare
    python benchmarks/early_exit_table.py table                  # print the stored figures

Settings: PonderNet with the KL in both directions (``prior_to_exit``: KL(p_G || p), the PALBERT
code's; ``exit_to_prior``: KL(p || p_G), PonderNet's paper) and PABEE's baseline objective
(``early_exit.objective: pabee``, exit by patience). Figures go to
``benchmarks/results/early_exit.json``.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "early_exit.json"
SETTINGS = {
    "pondernet_prior_to_exit": ["early_exit.kl=prior_to_exit"],
    "pondernet_exit_to_prior": ["early_exit.kl=exit_to_prior"],
    "pondernet_beta_0.05": ["early_exit.kl=prior_to_exit", "early_exit.beta=0.05"],
    "pabee": ["early_exit.objective=pabee", "~early_exit.lambda_p", "~early_exit.beta",
              "~early_exit.eps", "~early_exit.kl", "~early_exit.halting"],
}
TASKS = {
    # from a plainly fine-tuned 6-layer demo model (``plain_demo``), as PALBERT starts from a
    # trained model: from random weights the 6 layers stay near chance in 300 steps
    "demo": {"config": "demo/tiny_early_exit", "metric": "exact_match",
             "overrides": ["optimizer.lr=1e-3", "max_steps_per_epoch=200"]},
    "smollm2": {"config": "smollm2/135M_early_exit_classification_single_device",
                "overrides": [], "metric": "accuracy"},
}
PLAIN_DEMO = ["demo/tiny_needle_qa", "model.num_layers=6", "~ablation", "validation.passes=full"]
PLAIN_WEIGHTS = "model-00001-of-00001.safetensors"


def _cli(*args, log):
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-m", "comparative_recipe.cli", *args],
                              stdout=f, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed; see {log}")
    return time.perf_counter() - t0


def _evaluate(config, out, base, name, rules=None):
    path = out / f"eval_{name}.json"
    args = ["eval", "--config", config, *base, f"checkpointer.checkpoint_dir={out / 'best'}",
            f"eval.output_path={path}", "eval.overwrite=true"]
    if rules is not None:
        args.append(f"eval.exit_rules={rules}")
    _cli(*args, log=out / f"eval_{name}.log")
    return json.loads(path.read_text())


def plain_demo(root):
    """Plain fine-tuning of the 6-layer demo model (300 steps): the start of every demo setting."""
    out = Path(root) / "demo" / "plain"
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "best" / PLAIN_WEIGHTS).is_file():
        _cli("run", "comparative_finetune_single_device", "--config", *PLAIN_DEMO[:1],
             *PLAIN_DEMO[1:], f"output_dir={out}", log=out.parent / "plain_train.log")
    return [f"checkpointer.checkpoint_dir={out / 'best'}",
            f"checkpointer.checkpoint_files=[{PLAIN_WEIGHTS}]"]


def plain_rows(config, out, base, depth):
    """The starting model itself through the shared readout: all layers and ``depth`` layers
    (an early-exit config with objective pabee loads no heads)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "eval.json"
    _cli("eval", "--config", config, *base, f"output_dir={out}", *SETTINGS["pabee"],
         f"eval.output_path={path}", "eval.overwrite=true",
         f"eval.exit_rules={{fixed: {{layers: {depth}}}}}", log=out / "eval.log")
    return {r["rule"]: r for r in json.loads(path.read_text())["exit_rules"]}


def run_task(task, root, data_dir=None, settings=None, eval_only=False):
    spec = TASKS[task]
    base = list(spec["overrides"])
    start = plain_demo(root) if task == "demo" else []
    base += start
    if data_dir is not None:
        base += [f"tokenizer.path={data_dir}/SmolLM2-135M-Instruct/tokenizer.json",
                 f"checkpointer.checkpoint_dir={data_dir}/SmolLM2-135M-Instruct",
                 f"dataset.data_files={data_dir}/rotten_tomatoes/train.csv",
                 f"validation.dataset.data_files={data_dir}/rotten_tomatoes/dev.csv"]
    results = {}
    for name in settings or SETTINGS:
        out = Path(root) / task / name
        overrides = [*base, f"output_dir={out}", *SETTINGS[name]]
        out.mkdir(parents=True, exist_ok=True)
        seconds = None
        if not (eval_only and (out / "best").is_dir()):
            seconds = _cli("run", "early_exit_finetune_single_device", "--config", spec["config"],
                           *overrides, log=Path(root) / task / f"{name}_train.log")
        report = _evaluate(spec["config"], out, overrides, "rules")
        rows = {r["rule"]: r for r in report["exit_rules"]}
        ref = rows.get("q_exit", rows.get("patience"))
        depth = max(1, round(ref["layers"]))
        fixed = _evaluate(spec["config"], out, overrides, "fixed", f"{{fixed: {{layers: {depth}}}}}")
        rows["fixed"] = {r["rule"]: r for r in fixed["exit_rules"]}["fixed"]
        m = report["metrics"]
        results[name] = {
            "train_seconds": seconds,
            "rules": rows,
            "per_layer": {k[4:]: v for k, v in m.items()
                          if k.startswith(("val_loss_layer_", f"val_{spec['metric']}_layer_"))},
            "samples": report["samples"],
        }
        print(format_rows(task, name, rows, spec["metric"]), flush=True)
    depth = max(1, round(results[next(iter(results))]["rules"]["fixed"]["layers"]))
    config = spec["config"]
    if task == "demo":
        start_base = [*base]
    else:
        start_base = [*base, f"checkpointer.checkpoint_dir={data_dir}/SmolLM2-135M-Instruct"]
    # the starting model's own rows, with its weights as they are (no training)
    results["start"] = {"rules": plain_rows(config, Path(root) / task / "start", start_base, depth)}
    print(format_rows(task, "start", results["start"]["rules"], spec["metric"]), flush=True)
    return results


def format_rows(task, name, rows, metric):
    lines = [f"{task} / {name}"]
    for rule, r in rows.items():
        lines.append(f"  {rule:9s} {r['setting']:12s} {metric}={r.get(metric, float('nan')):.4f} "
                     f"loss={r['loss']:.4f} layers={r['layers']:.2f} speedup={r['speedup']:.2f}x")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo")
    d.add_argument("--root", default="/tmp/early_exit_table")
    d.add_argument("--settings", nargs="*", choices=list(SETTINGS))
    d.add_argument("--eval-only", action="store_true",
                   help="re-evaluate the settings already trained under --root")
    s = sub.add_parser("smollm2")
    s.add_argument("data_dir")
    s.add_argument("--root", default="/tmp/early_exit_table")
    s.add_argument("--settings", nargs="*", choices=list(SETTINGS))
    s.add_argument("--eval-only", action="store_true",
                   help="re-evaluate the settings already trained under --root")
    sub.add_parser("table")
    args = p.parse_args()
    stored = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    if args.command == "table":
        for task, results in stored.items():
            for name, r in results.items():
                print(format_rows(task, name, r["rules"], TASKS[task]["metric"]))
        return
    data_dir = getattr(args, "data_dir", None)
    results = run_task(args.command, args.root, data_dir, args.settings, args.eval_only)
    for name, r in results.items():  # a re-evaluation keeps the training time it had
        old = stored.get(args.command, {}).get(name, {})
        if r.get("train_seconds", 0) is None and "train_seconds" in old:
            r["train_seconds"] = old["train_seconds"]
    stored.setdefault(args.command, {}).update(results)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(stored, indent=2) + "\n")


if __name__ == "__main__":
    main()
