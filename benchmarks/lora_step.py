"""What a comparative training step costs with full fine-tuning, LoRA and QLoRA.

    OMP_NUM_THREADS=1 python benchmarks/lora_step.py --threads 1   # the README table (~8 min)
    python benchmarks/lora_step.py --help

The ``small`` model of ``benchmarks/comparative_step.py`` (8 layers, 512 wide, 28M parameters),
fp32 on CPU, as
- ``full``: every parameter trainable (``init_tiny_llama(seed=0)``);
- ``lora``: ``tiny_lora_llama`` with adapters of rank 8 (alpha 16) on ``q_proj``, ``v_proj``,
  ``output_proj`` and the FFN's three linears, the full model's weights loaded and the base frozen
  (``LoRAAdapters.freeze_base``, as the recipes do);
- ``qlora``: the same with the base weights of every attention and FFN linear in NF4 (torchao;
  the token embedding, tied to the output layer, and the norms stay fp32). NF4 dequantises to the
  input's dtype, so the arithmetic is fp32 too.

For each, the strategies of ``comparative_step.py`` on its ``short`` scenario (batch 8 x 256
tokens, c = 2 hidden-unit steps): ``plain`` (c = 0), ``sequential``, ``stacked`` and
``recompute``. A step is the comparative step's forwards and backward, then AdamW over the
trainable parameters (``comparative_step.Runner.step``). Step times are timed interleaved: every
repetition runs each of the 12 variants once, in rotating order; ``--warmup`` unmeasured
repetitions, then ``--steps`` measured ones, medians. The timing keeps freed memory for reuse
(``retain_freed_memory``), as comparative_step.py does.

Memory, in bytes, from the first (unmeasured) repetition of each variant:
- parameters: all parameters as stored; an NF4 weight counts its real storage (its packed 4-bit
  data, its quantized scalers, their factors and mean, and its 16-value NF4 table);
- gradients: the ``.grad`` tensors after backward, just before the optimizer steps;
- optimizer: every tensor in ``optimizer.state`` after the step (AdamW: two moments per trainable
  tensor and its step count);
- activations: the peak of bytes saved for backward (``SavedTensorMeter``, parameters excluded).
"""

import argparse
import json
import os
import statistics
import sys
import time
from typing import Dict, List

import torch
from torchao.dtypes.nf4tensor import NF4Tensor

from comparative_recipe.ablation.hidden import install_hidden_ablation
from comparative_recipe.models.tiny import init_tiny_llama, tiny_lora_llama, tiny_qlora_llama
from comparative_recipe.training.adapters import LoRAAdapters, lora_settings
from comparative_recipe.training.costs import SavedTensorMeter
from comparative_step import (  # this folder: the same models, scenario, step and machine record
    HIDDEN,
    MODELS,
    SCENARIOS,
    VARIANTS,
    Runner,
    machine,
    retain_freed_memory,
    table,
)

ADAPTERS = ("full", "lora", "qlora")
LORA = dict(lora_attn_modules=["q_proj", "v_proj", "output_proj"], apply_lora_to_mlp=True,
            lora_rank=8, lora_alpha=16)
BUILDERS = {"lora": "comparative_recipe.models.tiny.tiny_lora_llama",
            "qlora": "comparative_recipe.models.tiny.tiny_qlora_llama"}
SETTINGS = {
    "small": MODELS["small"],
    # for the smoke test: the tiny model with as many kv heads as heads, so that every linear's
    # weight fills whole NF4 blocks (k_proj is 128 x 128)
    "tiny": {**MODELS["tiny"], "num_kv_heads": MODELS["tiny"]["num_heads"]},
}
# torchao's NF4: 64-element blocks whose scalers are quantized in blocks of 256
NF4_BLOCK = 64 * 256


def nf4_shapes(settings: Dict) -> Dict[str, tuple]:
    """The (out, in) shapes of the linears QLoRA quantizes, and a check that each fills whole
    NF4 blocks."""
    d, h, kv = settings["embed_dim"], settings["num_heads"], settings["num_kv_heads"]
    head = d // h
    shapes = {"q_proj": (d, d), "k_proj": (kv * head, d), "v_proj": (kv * head, d),
              "output_proj": (d, d), "w1": (settings["intermediate_dim"], d),
              "w2": (d, settings["intermediate_dim"]), "w3": (settings["intermediate_dim"], d)}
    bad = {n: s for n, s in shapes.items() if (s[0] * s[1]) % NF4_BLOCK}
    if bad:
        raise ValueError(f"QLoRA needs every quantized weight's element count to be a multiple of "
                         f"{NF4_BLOCK}: {bad} are not")
    return shapes


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds; an NF4Tensor's are those of its inner tensors."""
    if isinstance(t, NF4Tensor):
        return sum(tensor_bytes(getattr(t, name)) for name in t.__tensor_flatten__()[0])
    return t.numel() * t.element_size()


class AdapterRunner(Runner):
    """``comparative_step.Runner`` on the full, LoRA or QLoRA model: AdamW over the trainable
    parameters only."""

    def __init__(self, model_name: str, adapter: str, variant: str):
        super().__init__(model_name, SCENARIOS["short"], variant)
        settings = SETTINGS[model_name]
        if settings != MODELS[model_name]:  # Runner built MODELS[model_name]: rebuild
            self.model = init_tiny_llama(seed=0, **settings)
            if any(level.drop_power for level in self.plan):
                install_hidden_ablation(self.model, HIDDEN)
        self.adapter, self.describe = adapter, "all parameters"
        if adapter != "full":
            if adapter == "qlora":
                nf4_shapes(settings)
            lora = lora_settings({"_component_": BUILDERS[adapter], **LORA, **settings})
            build = tiny_qlora_llama if adapter == "qlora" else tiny_lora_llama
            model = build(**LORA, **settings)
            found = model.load_state_dict(self.model.state_dict(), strict=False)  # full's weights
            if found.unexpected_keys or any("lora_" not in k for k in found.missing_keys):
                raise RuntimeError(f"the {adapter} model does not take the full model's weights: "
                                   f"{found}")
            adapters = LoRAAdapters(lora)
            adapters.freeze_base(model)
            self.describe = adapters.describe()
            if any(level.drop_power for level in self.plan):
                install_hidden_ablation(model, HIDDEN)
            self.model = model
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=1e-4)

    def measured_step(self, k: int) -> Dict[str, int]:
        """One step, recording its memory: parameters, gradients (just before the optimizer
        steps), optimizer state after it and the peak of activations saved for backward."""
        grads = {}

        def before_step(optimizer, args, kwargs):
            grads["bytes"] = sum(tensor_bytes(p.grad) for p in self.model.parameters()
                                 if p.grad is not None)

        handle = self.optimizer.register_step_pre_hook(before_step)
        meter = SavedTensorMeter(exclude=self.model.parameters())
        try:
            with meter:
                self.step(k)
        finally:
            handle.remove()
        params = list(self.model.parameters())
        return {
            "param_bytes": sum(tensor_bytes(p) for p in params),
            "nf4_param_bytes": sum(tensor_bytes(p) for p in params if isinstance(p, NF4Tensor)),
            "nf4_params": sum(p.numel() for p in params if isinstance(p, NF4Tensor)),
            "params": sum(p.numel() for p in params),
            "trainable_params": sum(p.numel() for p in self.trainable),
            "trainable_tensors": len(self.trainable),
            "trainable_bytes": sum(tensor_bytes(p) for p in self.trainable),
            "grad_bytes": grads["bytes"],
            "optimizer_bytes": sum(tensor_bytes(v) for state in self.optimizer.state.values()
                                   for v in state.values() if isinstance(v, torch.Tensor)),
            "activation_bytes": meter.peak,
        }


def measure(model_name: str, warmup: int, steps: int) -> Dict[str, Dict]:
    """Memory of each variant (its first step) and step times, interleaved."""
    keys = [(a, v) for a in ADAPTERS for v in VARIANTS]
    runners = {key: AdapterRunner(model_name, *key) for key in keys}
    times = {key: [] for key in keys}
    memory, tokens = {}, {}
    for rep in range(warmup + steps):
        order = keys[rep % len(keys):] + keys[: rep % len(keys)]
        for key in order:
            if rep == 0:
                memory[key] = runners[key].measured_step(rep)
                continue
            t0 = time.perf_counter()
            res = runners[key].step(rep)
            dt = time.perf_counter() - t0
            tokens[key] = res.pass_tokens.tolist()
            if rep >= warmup:
                times[key].append(dt)
        print(f"repetition {rep + 1}/{warmup + steps} done", flush=True)
    describe = {key: runners[key].describe for key in keys}
    return {"times": times, "memory": memory, "tokens": tokens, "describe": describe}


def summarise(model_name: str, found: Dict) -> List[Dict]:
    base = statistics.median(found["times"][("full", "plain")])
    rows = []
    for (adapter, variant), t in found["times"].items():
        median = statistics.median(t)
        plain = statistics.median(found["times"][(adapter, "plain")])
        mem = found["memory"][(adapter, variant)]
        rows.append({
            "model": model_name, "adapter": adapter, "variant": variant,
            "trained": found["describe"][(adapter, variant)],
            "c": len(SCENARIOS["short"].plan(variant)),
            "pass_tokens": found["tokens"].get((adapter, variant)),
            "step_ms": 1e3 * median, "step_ms_min": 1e3 * min(t), "step_ms_max": 1e3 * max(t),
            "measured_steps": len(t), "step_times_s": t,
            "x_plain_full": median / base, "x_plain_same_adapter": median / plain,
            **mem,
            "param_mib": mem["param_bytes"] / 2**20, "grad_mib": mem["grad_bytes"] / 2**20,
            "optimizer_mib": mem["optimizer_bytes"] / 2**20,
            "activation_mib": mem["activation_bytes"] / 2**20,
        })
    return rows


COLUMNS = [
    ("adapter", "adapter", "{}"), ("variant", "strategy", "{}"),
    ("trainable_params", "trainable params", "{:,}"), ("step_ms", "step ms", "{:.0f}"),
    ("x_plain_full", "x plain full", "{:.2f}"), ("param_mib", "params MiB", "{:.1f}"),
    ("grad_mib", "grads MiB", "{:.1f}"), ("optimizer_mib", "optimizer MiB", "{:.1f}"),
    ("activation_mib", "activations MiB", "{:.0f}"),
]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small", choices=sorted(SETTINGS),
                   help="small (default; the README's) or tiny (the smoke test's, seconds)")
    p.add_argument("--warmup", type=int, default=1,
                   help="unmeasured repetitions, at least 1: the first one measures memory "
                        "(default 1)")
    p.add_argument("--steps", type=int, default=2, help="measured repetitions (default 2)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--json", default="benchmarks/results/lora_step.json",
                   help="where to write the results (default %(default)s)")
    args = p.parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        p.error("--warmup and --steps must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    info = machine()
    info["omp_num_threads"] = os.environ.get("OMP_NUM_THREADS")
    retained = retain_freed_memory()
    info["timing_allocator"] = "glibc, freed memory retained" if retained else "system default"
    print(f"machine: {info}", flush=True)
    print(f"torch threads: {torch.get_num_threads()}, OMP_NUM_THREADS="
          f"{info['omp_num_threads']}", flush=True)

    found = measure(args.model, args.warmup, args.steps)
    rows = summarise(args.model, found)
    wall = time.perf_counter() - started
    print()
    print(table(rows, COLUMNS))
    print(f"\n{args.model} model, short scenario (batch 8 x 256 tokens, c = 2); medians of "
          f"{args.steps} interleaved steps after {args.warmup} warm-up; "
          f"{torch.get_num_threads()} torch thread(s); {wall:.0f} s in all")
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"machine": info, "model": args.model, "model_settings": SETTINGS[args.model],
                   "lora": LORA, "scenario": "short", "warmup": args.warmup, "steps": args.steps,
                   "wall_s": wall, "rows": rows}, f, indent=1)
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
