"""What a comparative training step costs, side by side with plain fine-tuning.

    python benchmarks/comparative_step.py                 # the README table (~11 min on 2 cores)
    python benchmarks/comparative_step.py --help

One invocation measures, for each (model, scenario):
- ``plain``: fine-tuning with c = 0, the unit of cost;
- ``sequential`` (the reference: 1+c forwards, graphs kept, one backward), ``stacked`` and
  ``recompute``: the three pass strategies of ``comparative_recipe.passes.comparative_step``.

Scenarios: ``short`` (batch 8 x 256 tokens, hidden-unit ablation, c = 2) on the tiny and the
small model; ``long`` (batch 2 x 3072 tokens on the tiny model, input-chunk ablation, 2 crop
levels plus one hidden step, c = 3).

Step time is one optimizer step (the comparative step's forwards and backward, then AdamW), timed
interleaved: every repetition runs each variant once, in rotating order, after warm-up, at least
``--steps`` times and until the measured repetitions took ``--min-seconds``. The timing
process keeps freed memory for reuse (glibc without mmap for large blocks and without trimming), as
PyTorch's caching allocator does on CUDA: with glibc's defaults a step that holds (1+c) passes of
activations hands them back to the kernel and page-faults them in again on every step (about
190,000 minor faults and 15-25% of a ``small`` comparative step), a cost of the CPU allocator, not of
the passes; ``--system-malloc`` measures with the defaults. The ideal
is plain fine-tuning's step time x sum_k tokens_k / tokens_0 (the passes' arithmetic alone); for
``recompute`` plus one gradient-free forward per pass. Activation memory is the peak of bytes saved
for backward (``SavedTensorMeter``); peak RSS is the process's resident-set high-water mark during
a step above the resident set before it, measured in a fresh process per variant so that the
other variants' models do not count. Collectives and bytes are counted on 2 gloo ranks with FSDP2
(``CollectiveCounter``, per rank and optimizer step, including the recipe's one all-reduce).
"""

import argparse
import ctypes
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Dict, List

import torch

from comparative_recipe.ablation.hidden import HiddenAblationConfig, install_hidden_ablation
from comparative_recipe.ablation.plan import AblationLevel, ablation_plan
from comparative_recipe.loss import ComparativeLoss
from comparative_recipe.models.tiny import init_tiny_llama
from comparative_recipe.passes import ComparativeStepSpec, build_passes, comparative_step, run_pass
from comparative_recipe.tasks import SFTTask
from comparative_recipe.training.distributed import all_reduce_sum
from comparative_recipe.training.costs import (
    CollectiveCounter,
    SavedTensorMeter,
    peak_memory,
    reset_peak_memory,
)
from comparative_recipe.training.trainer import optimizer_step

MODELS = {
    # the demo's model
    "tiny": dict(vocab_size=512, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=128,
                 intermediate_dim=256, max_seq_len=4096),
    # 28M parameters
    "small": dict(vocab_size=8192, num_layers=8, num_heads=8, num_kv_heads=4, embed_dim=512,
                  intermediate_dim=1408, max_seq_len=1024),
}
VARIANTS = ("plain", "sequential", "stacked", "recompute")


@dataclass(frozen=True)
class Scenario:
    name: str
    batch_size: int
    seq_len: int
    n_hidden: int
    n_input: int
    window: int = 128  # tokens per droppable chunk
    answer: int = 16  # scored tokens at the end of each sample
    crop_rate: float = 0.5

    def plan(self, variant: str) -> List[AblationLevel]:
        return [] if variant == "plain" else ablation_plan(self.n_hidden, self.n_input)


SCENARIOS = {
    "short": Scenario("short", batch_size=8, seq_len=256, n_hidden=2, n_input=0, answer=128),
    "long": Scenario("long", batch_size=2, seq_len=3072, n_hidden=1, n_input=2),
}
HIDDEN = HiddenAblationConfig(rate=0.1)


def make_batch(s: Scenario, vocab: int, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Random tokens: a context of ``window``-token droppable chunks, then a protected question
    (16 tokens) and the scored answer."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, vocab, (s.batch_size, s.seq_len), generator=g)
    chunk_ids = torch.full_like(tokens, -1)
    labels = torch.full_like(tokens, -100)
    context = s.seq_len - s.answer - 16
    if s.n_input:
        chunk_ids[:, :context] = torch.arange(context) // s.window
    labels[:, -s.answer:] = tokens[:, -s.answer:]
    return {"tokens": tokens, "labels": labels, "chunk_ids": chunk_ids,
            "sample_ids": torch.arange(s.batch_size)}


class Runner:
    """One variant: its model, optimizer and a ``step(k)`` = one optimizer step."""

    def __init__(self, model_name: str, s: Scenario, variant: str, shard: bool = False):
        self.s, self.variant, self.plan = s, variant, s.plan(variant)
        self.spec = ComparativeStepSpec(
            plan=self.plan, task=SFTTask(), loss_fn=ComparativeLoss(),
            strategy="sequential" if variant == "plain" else variant, crop_rate=s.crop_rate,
        )
        self.model = init_tiny_llama(seed=0, **MODELS[model_name])
        if shard:
            from comparative_recipe.training.distributed import shard_model

            shard_model(self.model, cpu_offload=False)
        if any(level.drop_power for level in self.plan):
            install_hidden_ablation(self.model, HIDDEN)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.batch = make_batch(s, MODELS[model_name]["vocab_size"])
        self.world_size = torch.distributed.get_world_size() if shard else 1
        self.sync = self.model.set_requires_gradient_sync if shard else None

    def step(self, k: int):
        res = comparative_step(self.model, self.batch, self.spec, step=k, set_grad_sync=self.sync)
        sums = res.sums()
        if self.world_size > 1:
            sums = sums.reduced(all_reduce_sum)
        optimizer_step(self.model, self.optimizer, None,
                       grad_scale=self.world_size / sums["weight"].clamp(min=1.0),
                       clip_grad_norm=None)
        return res

    @torch.no_grad()
    def forward_only(self) -> None:
        """The full view's forward and loss without gradient (recompute's extra work per pass)."""
        comparative_step(self.model, self.batch, self.spec.full_model_only(), step=0,
                         backward=False)


def retain_freed_memory() -> bool:
    """Makes this process's glibc malloc keep freed memory for reuse: no mmap for large blocks
    (they would be unmapped on free) and no trimming of the heap. False where that is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))


def time_variants(
    model_name: str, s: Scenario, warmup: int, steps: int, min_seconds: float
) -> Dict[str, Dict]:
    """Step times of every variant: at least ``steps`` measured repetitions, and more until the
    measured ones took ``min_seconds`` (a 0.1 s step needs many to show its median)."""
    runners = {v: Runner(model_name, s, v) for v in VARIANTS}
    times = {v: [] for v in (*VARIANTS, "forward")}
    tokens = {}
    rep, started = 0, None
    while rep < warmup + steps or time.perf_counter() - started < min_seconds:
        if rep == warmup:
            started = time.perf_counter()
        order = VARIANTS[rep % len(VARIANTS):] + VARIANTS[: rep % len(VARIANTS)]
        for v in order:
            t0 = time.perf_counter()
            res = runners[v].step(rep)
            dt = time.perf_counter() - t0
            tokens[v] = res.pass_tokens.tolist()
            if rep >= warmup:
                times[v].append(dt)
        t0 = time.perf_counter()
        runners["plain"].forward_only()
        if rep >= warmup:
            times["forward"].append(time.perf_counter() - t0)
        rep += 1
    return {"times": times, "tokens": tokens}


def pass_costs(model_name: str, s: Scenario, warmup: int, steps: int) -> List[Dict]:
    """Each pass alone (forward and backward of its task loss): time against tokens kept."""
    runner = Runner(model_name, s, "sequential")
    passes = build_passes(runner.batch, runner.spec, step=0)
    times = [[] for _ in passes]
    for rep in range(warmup + steps):
        for k, p in enumerate(passes):
            t0 = time.perf_counter()
            run_pass(runner.model, SFTTask(), p).loss.sum().backward()
            if rep >= warmup:
                times[k].append(time.perf_counter() - t0)
            runner.model.zero_grad(set_to_none=True)
    medians = [statistics.median(t) for t in times]
    tokens = [int(p.n_input_tokens) for p in passes]
    return [{"model": model_name, "scenario": s.name, "pass": k, "level": f"({lvl.crop_level}, {lvl.drop_power})",
             "tokens": tokens[k], "tokens_ratio": tokens[k] / tokens[0],
             "ms": 1e3 * medians[k], "time_ratio": medians[k] / medians[0]}
            for k, lvl in enumerate([AblationLevel(0, 0), *runner.plan])]


def memory_of(model_name: str, scenario: str, variant: str) -> Dict[str, int]:
    """In a fresh process: saved-for-backward peak and the step's peak RSS growth."""
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    runner = Runner(model_name, SCENARIOS[scenario], variant)
    runner.step(0)  # optimizer state and allocator pools exist before measuring
    cpu = torch.device("cpu")
    reset_peak_memory(cpu)
    start = peak_memory(cpu)
    meter = SavedTensorMeter(exclude=runner.model.parameters())
    with meter:
        runner.step(1)
    return {"saved_bytes": meter.peak, "rss_growth": peak_memory(cpu) - start}


def _collectives_worker(rank: int, store: str, jobs, out: str) -> None:
    os.environ["LOCAL_WORLD_SIZE"] = "2"
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                                         world_size=2)
    found = {}
    for model_name, scenario, variant in jobs:
        runner = Runner(model_name, SCENARIOS[scenario], variant, shard=True)
        counter = CollectiveCounter()
        with counter:  # every step issues the same collectives: the first one is counted
            runner.step(0)
        found[f"{model_name}/{scenario}/{variant}"] = {"collectives": counter.count,
                                                       "collective_bytes": counter.bytes}
        del runner
    if rank == 0:
        with open(out, "w") as f:
            json.dump(found, f)
    torch.distributed.destroy_process_group()


def count_collectives(jobs) -> Dict[str, Dict[str, int]]:
    """Collectives per rank and optimizer step on 2 gloo ranks (FSDP2), for every job."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "collectives.json")
        torch.multiprocessing.spawn(_collectives_worker, args=(os.path.join(tmp, "store"), jobs, out),
                                    nprocs=2, join=True)
        with open(out) as f:
            return json.load(f)


def summarise(model_name, s, timing, memory, collectives) -> List[Dict]:
    t = timing["times"]
    plain = statistics.median(t["plain"])
    forward = statistics.median(t["forward"])
    rows = []
    for v in VARIANTS:
        median = statistics.median(t[v])
        q = statistics.quantiles(t[v], n=4) if len(t[v]) >= 2 else [median] * 3
        tokens = timing["tokens"][v]
        work = sum(tokens) / tokens[0]  # the passes' tokens in units of the full view
        ideal = plain * work + (forward * work if v == "recompute" else 0.0)
        mem, base_mem = memory[v], memory["plain"]
        row = {
            "model": model_name, "scenario": s.name, "variant": v,
            "c": len(s.plan(v)), "pass_tokens": tokens,
            "step_ms": 1e3 * median, "step_ms_iqr": 1e3 * (q[2] - q[0]),
            "step_ms_min": 1e3 * min(t[v]), "step_ms_max": 1e3 * max(t[v]),
            "measured_steps": len(t[v]),
            "tokens_per_s": tokens[0] / median,
            "x_plain": median / plain, "ideal_ms": 1e3 * ideal, "x_ideal": median / ideal,
            "saved_mb": mem["saved_bytes"] / 2**20,
            "saved_x_plain": mem["saved_bytes"] / base_mem["saved_bytes"],
            "rss_growth_mb": mem["rss_growth"] / 2**20,
            "rss_x_plain": mem["rss_growth"] / max(base_mem["rss_growth"], 1),
        }
        c = collectives.get(f"{model_name}/{s.name}/{v}")
        if c is not None:
            row["collectives"] = c["collectives"]
            row["collective_mb"] = c["collective_bytes"] / 2**20
        rows.append(row)
    return rows


COLUMNS = [
    ("model", "model", "{}"), ("scenario", "scenario", "{}"), ("variant", "variant", "{}"),
    ("c", "c", "{}"), ("step_ms", "step ms", "{:.0f}"), ("step_ms_iqr", "IQR ms", "{:.0f}"),
    ("measured_steps", "n", "{}"),
    ("tokens_per_s", "tokens/s", "{:.0f}"), ("x_plain", "x plain", "{:.2f}"),
    ("x_ideal", "x ideal", "{:.2f}"), ("saved_mb", "saved MB", "{:.1f}"),
    ("saved_x_plain", "x plain", "{:.2f}"), ("rss_growth_mb", "RSS+ MB", "{:.0f}"),
    ("rss_x_plain", "x plain", "{:.2f}"), ("collectives", "colls", "{}"),
    ("collective_mb", "coll MB", "{:.1f}"),
]


def table(rows: List[Dict], columns=COLUMNS) -> str:
    """A markdown table of ``rows``: ``columns`` are (key, header, format); a missing key is -."""
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    lines = [head, sep]
    for r in rows:
        cells = [fmt.format(r[k]) if k in r else "-" for k, _, fmt in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def check_targets(rows: List[Dict], per_pass: List[Dict]) -> List[Dict]:
    """The issue's targets, each with the measured figure."""
    out = []

    def target(name, value, ok):
        out.append({"target": name, "measured": value, "met": bool(ok)})

    by = {(r["model"], r["scenario"], r["variant"]): r for r in rows}
    for r in rows:
        key = f"{r['model']}/{r['scenario']}/{r['variant']}"
        if r["variant"] != "plain":
            target(f"{key}: step time <= 1.10 x ideal", round(r["x_ideal"], 3), r["x_ideal"] <= 1.10)
        if r["variant"] == "recompute":
            target(f"{key}: activation memory <= 1.25 x plain", round(r["saved_x_plain"], 3),
                   r["saved_x_plain"] <= 1.25)
        if r["variant"] == "sequential":
            n = r["c"] + 1
            work = sum(r["pass_tokens"]) / r["pass_tokens"][0]
            target(f"{key}: activation memory about (1+c) x plain (tokens: {work:.2f})",
                   round(r["saved_x_plain"], 3), 0.75 * work <= r["saved_x_plain"] <= 1.25 * n)
        if r["variant"] == "stacked" and len(set(r["pass_tokens"])) > 1:
            # stacking right-pads every view to the longest (the full input): its arithmetic is
            # (1+c) full passes whatever the crops keep
            plain = by[(r["model"], r["scenario"], "plain")]
            padded = r["step_ms"] / (plain["step_ms"] * (r["c"] + 1))
            target(f"{key}: (explained) step time vs the padded ideal, plain x (1+c)",
                   round(padded, 3), padded <= 1.10)
        if r["variant"] == "stacked" and "collectives" in r:
            plain = by[(r["model"], r["scenario"], "plain")]
            target(f"{key}: collectives per step == plain's ({plain['collectives']})",
                   r["collectives"], r["collectives"] == plain["collectives"])
    for r in per_pass:
        if r["pass"] > 0:
            target(f"{r['model']}/{r['scenario']}/pass {r['pass']}: time ratio <= 1.10 x tokens "
                   f"ratio ({r['tokens_ratio']:.2f})", round(r["time_ratio"], 3),
                   r["time_ratio"] <= 1.10 * r["tokens_ratio"])
    return out


def machine() -> Dict:
    return {
        "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "python": platform.python_version(),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["tiny", "small"], choices=sorted(MODELS))
    p.add_argument("--scenarios", nargs="+", default=["short", "long"], choices=sorted(SCENARIOS))
    p.add_argument("--warmup", type=int, default=2, help="unmeasured repetitions (default 2)")
    p.add_argument("--steps", type=int, default=5,
                   help="measured repetitions, at least (default 5)")
    p.add_argument("--min-seconds", type=float, default=20.0,
                   help="repeat until the measured repetitions of a case took this long "
                        "(default 20)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--no-collectives", action="store_true", help="skip the 2-rank gloo counts")
    p.add_argument("--system-malloc", action="store_true",
                   help="time with glibc's default malloc settings (freed memory returned to the "
                        "kernel and faulted in again every step)")
    p.add_argument("--json", default="benchmarks/results/comparative_step.json",
                   help="where to write the results (default %(default)s)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ["BENCH_THREADS"] = str(torch.get_num_threads())

    # the long scenario is meant for the tiny model only (a 3k-token step of the small one
    # takes tens of seconds on a CPU)
    cases = [(m, s) for m in args.models for s in args.scenarios if s == "short" or m == "tiny"]
    info = machine()
    # Only the timing (this process); the memory figures come from fresh processes with defaults.
    retained = not args.system_malloc and retain_freed_memory()
    info["timing_allocator"] = "glibc, freed memory retained" if retained else "system default"
    print(f"machine: {info}", flush=True)

    collectives = {}
    if not args.no_collectives:
        t0 = time.perf_counter()
        collectives = count_collectives([(m, s, v) for m, s in cases for v in VARIANTS])
        print(f"collectives counted on 2 gloo ranks in {time.perf_counter() - t0:.0f} s", flush=True)

    rows, per_pass = [], []
    ctx = mp.get_context("spawn")
    for m, s in cases:
        t0 = time.perf_counter()
        with ctx.Pool(1, maxtasksperchild=1) as pool:
            memory = {v: pool.apply(memory_of, (m, s, v)) for v in VARIANTS}
        timing = time_variants(m, SCENARIOS[s], args.warmup, args.steps, args.min_seconds)
        rows += summarise(m, SCENARIOS[s], timing, memory, collectives)
        if SCENARIOS[s].n_input:
            per_pass += pass_costs(m, SCENARIOS[s], args.warmup, args.steps)
        print(f"{m}/{s} measured in {time.perf_counter() - t0:.0f} s", flush=True)

    targets = check_targets(rows, per_pass)
    print()
    print(table(rows))
    if per_pass:
        print("\nEach pass alone (forward + backward), input-chunk ablation:\n")
        print("| model | scenario | pass | (crop level, drop power) | tokens | x pass 0 | ms | x pass 0 |")
        print("|---|---|---|---|---|---|---|---|")
        for r in per_pass:
            print(f"| {r['model']} | {r['scenario']} | {r['pass']} | {r['level']} | {r['tokens']} "
                  f"| {r['tokens_ratio']:.2f} | {r['ms']:.0f} | {r['time_ratio']:.2f} |")
    print()
    for t in targets:
        print(f"[{'met' if t['met'] else 'MISSED'}] {t['target']}: {t['measured']}")
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"machine": info, "warmup": args.warmup, "steps": args.steps,
                   "min_seconds": args.min_seconds, "rows": rows,
                   "per_pass": per_pass, "targets": targets}, f, indent=1)
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
