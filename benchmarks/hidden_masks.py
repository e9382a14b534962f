"""What element-granularity hidden masks cost against unit-granularity ones.

    python benchmarks/hidden_masks.py              # the small model, about 3 minutes on 2 cores
    python benchmarks/hidden_masks.py --help

Two measurements:
- one mask: ``site_mask`` of a [rows, tokens, units] element mask (default [4, 512, 2048]) and of
  the unit mask of the same site, against the multiply the mask feeds;
- a training step of the ``small`` model of ``benchmarks/comparative_step.py`` (8 layers, 512
  wide, 28M parameters; batch 8 x 256 tokens) as the ``sequential`` pass strategy runs it: the
  full pass and c = 2 hidden passes (drop powers 1 and 2) forward under ``hidden_ablation_keys``,
  a per-sample task loss of each, one backward (no optimizer step: it would add the same time
  to both). Granularity ``element`` and ``unit`` alternate, after warm-up; medians.

The timing process keeps freed memory for reuse (glibc without mmap for large blocks and without
trimming), as PyTorch's caching allocator does on CUDA, so that the (1+c) passes' activations are
not page-faulted in again every step. The figure to watch is the ratio element / unit, the median
over repetitions of the two back-to-back steps' ratio (goal <= 1.15); the machine's load average
is recorded, since other processes on a shared machine inflate single steps.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

from comparative_recipe.ablation.hidden import (
    HiddenAblationConfig,
    MaskKeys,
    hidden_ablation_keys,
    install_hidden_ablation,
    site_mask,
)
from comparative_recipe.models.tiny import init_tiny_llama
from comparative_step import MODELS, retain_freed_memory  # this folder: the same models

GRANULARITIES = ("element", "unit")
GOAL = 1.15


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def time_one_mask(rows: int, tokens: int, units: int, repeats: int) -> Dict[str, float]:
    """Milliseconds of one element mask, one unit mask and the multiply, [rows, tokens, units]."""
    k = MaskKeys(torch.arange(rows), torch.arange(rows) % 2 + 1, step=3)
    x = torch.randn(rows, tokens, units)
    found = {}
    for g in GRANULARITIES:
        cfg = HiddenAblationConfig(rate=0.1, granularity=g)
        found[f"{g}_mask_ms"] = median_ms(
            lambda: site_mask(cfg, k, "ffn_hidden", 1, units, tokens), repeats
        )
    mask = site_mask(HiddenAblationConfig(rate=0.1, granularity="element"), k, "ffn_hidden", 1,
                     units, tokens)
    found["multiply_ms"] = median_ms(lambda: x * mask, repeats)
    return found


class Step:
    """One model with hidden ablation of one granularity; ``__call__(step)`` is a step."""

    def __init__(self, model_name: str, granularity: str, batch: int, seq: int, answer: int,
                 sites: List[str]) -> None:
        self.model = init_tiny_llama(seed=0, **MODELS[model_name])
        install_hidden_ablation(
            self.model, HiddenAblationConfig(rate=0.1, sites=tuple(sites), granularity=granularity)
        )
        vocab = MODELS[model_name]["vocab_size"]
        g = torch.Generator().manual_seed(0)
        self.tokens = torch.randint(1, vocab, (batch, seq), generator=g)
        self.targets = torch.full_like(self.tokens, -100)  # next-token targets of the answer
        self.targets[:, -answer - 1:-1] = self.tokens[:, -answer:]
        self.sample_ids = torch.arange(batch)
        self.token_keys = torch.arange(seq).expand(batch, seq)

    def __call__(self, step: int) -> float:
        losses = []
        for power in (0, 1, 2):
            keys = MaskKeys(self.sample_ids, torch.full_like(self.sample_ids, power), step,
                            self.token_keys)
            with hidden_ablation_keys(keys):
                logits = self.model(self.tokens)
            ce = F.cross_entropy(logits.flatten(0, 1).float(), self.targets.flatten(),
                                 reduction="none").view_as(self.targets)
            scored = (self.targets != -100).sum(1)
            losses.append(ce.sum(1) / scored)  # per-sample task loss
        loss = torch.stack(losses, 1).mean()
        self.model.zero_grad(set_to_none=True)
        loss.backward()
        return float(loss.detach())


def time_steps(model_name: str, batch: int, seq: int, answer: int, sites: List[str],
               warmup: int, repeats: int) -> Dict[str, List[float]]:
    steps = {g: Step(model_name, g, batch, seq, answer, sites) for g in GRANULARITIES}
    times: Dict[str, List[float]] = {g: [] for g in GRANULARITIES}
    for rep in range(warmup + repeats):
        order = GRANULARITIES if rep % 2 == 0 else GRANULARITIES[::-1]
        for g in order:
            t0 = time.perf_counter()
            steps[g](rep)
            if rep >= warmup:
                times[g].append(time.perf_counter() - t0)
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small", choices=sorted(MODELS))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--answer", type=int, default=128, help="scored tokens at the end of a sample")
    p.add_argument("--sites", nargs="+", default=["ffn_hidden", "attn_heads"])
    p.add_argument("--warmup", type=int, default=1, help="unmeasured steps per granularity")
    p.add_argument("--repeats", type=int, default=5, help="measured steps per granularity")
    p.add_argument("--mask-shape", type=int, nargs=3, default=[4, 512, 2048],
                   metavar=("ROWS", "TOKENS", "UNITS"))
    p.add_argument("--mask-repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--json", default="benchmarks/results/hidden_masks.json",
                   help="where to write the results (default %(default)s)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    retained = retain_freed_memory()
    info = {
        "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "timing_allocator": "glibc, freed memory retained" if retained else "system default",
        "load_average_before": os.getloadavg(),
    }
    print(f"machine: {info}", flush=True)

    shape = "x".join(map(str, args.mask_shape))
    mask = time_one_mask(*args.mask_shape, repeats=args.mask_repeats)
    print(f"one [{shape}] mask: element {mask['element_mask_ms']:.1f} ms, unit "
          f"{mask['unit_mask_ms']:.2f} ms; the multiply it feeds {mask['multiply_ms']:.1f} ms",
          flush=True)

    t0 = time.perf_counter()
    times = time_steps(args.model, args.batch, args.seq, args.answer, args.sites, args.warmup,
                       args.repeats)
    med = {g: 1e3 * statistics.median(t) for g, t in times.items()}
    # each repetition runs both, back to back: its ratio is robust to slow drifts of the
    # machine's load (other processes on a shared machine)
    paired = [e / u for e, u in zip(times["element"], times["unit"])]
    ratio = statistics.median(paired)
    print(f"{args.model} step (batch {args.batch} x {args.seq}, c = 2 hidden passes, sites "
          f"{' '.join(args.sites)}), median of {args.repeats}: element {med['element']:.0f} ms, "
          f"unit {med['unit']:.0f} ms ({time.perf_counter() - t0:.0f} s)")
    verdict = "met" if ratio <= GOAL else "MISSED"
    print(f"ratio element/unit: {ratio:.3f} (median of the repetitions' ratios; ratio of the "
          f"medians {med['element'] / med['unit']:.3f}; goal <= {GOAL}: {verdict})")

    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({
            "machine": info, "args": vars(args), "mask_shape": args.mask_shape, "mask": mask,
            "step_ms": med, "step_times_s": times, "paired_ratios": paired,
            "ratio_element_unit": ratio, "ratio_of_medians": med["element"] / med["unit"],
            "goal": GOAL, "load_average_after": os.getloadavg(),
        }, f, indent=1)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
