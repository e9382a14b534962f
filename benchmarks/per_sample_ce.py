"""Per-sample cross-entropy: chunked (``comparative_recipe.tasks.per_sample_cross_entropy``)
against the plain fp32 upcast, on one [B, S, V] batch of bf16 logits.

    python benchmarks/per_sample_ce.py [--batch 4] [--seq 1024] [--vocab 32000] [--chunks 8]

Prints, for forward + backward of ``sum_b w_b * loss_b``: the median time, the bytes autograd
saves for backward (``SavedTensorMeter``), and the largest fp32 tensor any op creates (a dispatch
mode), as one table and a JSON file.
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from comparative_recipe.tasks import per_sample_cross_entropy
from comparative_recipe.training.costs import SavedTensorMeter


class LargestFloat32(TorchDispatchMode):
    """Records the element count of the largest fp32 tensor produced while active."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                self.numel = max(self.numel, t.numel())
        return out


def plain(logits, targets):
    token_loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    n = (targets != -100).sum(1)
    return token_loss.view(targets.shape).sum(1) / n.clamp(min=1)


def chunked(num_chunks):
    return lambda logits, targets: per_sample_cross_entropy(logits, targets, num_chunks=num_chunks).loss


def measure(fn, logits, targets, weights, repeats):
    times = []
    for _ in range(repeats):
        x = logits.detach().requires_grad_()
        t0 = time.perf_counter()
        (fn(x, targets) * weights).sum().backward()
        times.append(time.perf_counter() - t0)
    x = logits.detach().requires_grad_()
    meter, largest = SavedTensorMeter(), LargestFloat32()
    with meter, largest:
        loss = (fn(x, targets) * weights).sum()
    with largest:
        loss.backward()
    return {"ms": 1e3 * statistics.median(times), "saved_mb": meter.peak / 2**20,
            "largest_fp32_mb": largest.numel * 4 / 2**20}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--chunks", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default="benchmarks/results/per_sample_ce.json")
    args = p.parse_args(argv)

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(args.batch, args.seq, args.vocab, generator=g).to(torch.bfloat16)
    targets = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
    targets[:, : args.seq // 2] = -100
    weights = torch.rand(args.batch, generator=g)
    assert torch.allclose(plain(logits, targets), chunked(args.chunks)(logits, targets), rtol=1e-5)

    bf16_mb = logits.numel() * 2 / 2**20
    rows = {"plain (fp32 upcast)": measure(plain, logits, targets, weights, args.repeats),
            f"chunked ({args.chunks})": measure(chunked(args.chunks), logits, targets, weights,
                                                args.repeats)}
    print(f"logits [B={args.batch}, S={args.seq}, V={args.vocab}] bf16: {bf16_mb:.0f} MB; "
          f"torch threads {torch.get_num_threads()}")
    print("| loss | fwd+bwd ms | saved for backward MB | largest fp32 tensor MB |")
    print("|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['ms']:.0f} | {r['saved_mb']:.0f} | {r['largest_fp32_mb']:.0f} |")
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"args": vars(args), "logits_bf16_mb": bf16_mb, "rows": rows}, f, indent=1)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
