"""The benchmark scripts run from a clean checkout and measure what they claim (memory figures
are deterministic; no timing is asserted)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"

pytestmark = pytest.mark.slow


def run(script, *args, cwd):
    proc = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.parametrize("script", ["comparative_step.py", "per_sample_ce.py", "lora_step.py",
                                    "early_exit_table.py"])
def test_help(script, tmp_path):
    assert "usage:" in run(script, "--help", cwd=tmp_path)


def test_per_sample_ce_halves_saved_memory_and_upcasts_one_chunk(tmp_path):
    out = tmp_path / "ce.json"
    run("per_sample_ce.py", "--batch", "2", "--seq", "64", "--vocab", "1000", "--chunks", "8",
        "--repeats", "1", "--json", str(out), cwd=tmp_path)
    plain, chunked = json.loads(out.read_text())["rows"].values()
    assert chunked["saved_mb"] <= 0.5 * plain["saved_mb"] * 1.01  # bf16 logits, not fp32
    assert chunked["largest_fp32_mb"] <= plain["largest_fp32_mb"] / 8 * 1.01


def test_comparative_step_table_and_memory_ordering(tmp_path):
    out = tmp_path / "steps.json"
    stdout = run("comparative_step.py", "--models", "tiny", "--scenarios", "short", "--warmup", "0",
                 "--steps", "1", "--min-seconds", "0", "--no-collectives", "--json", str(out), cwd=tmp_path)
    assert "| tiny | short | recompute |" in stdout
    result = json.loads(out.read_text())
    rows = {r["variant"]: r for r in result["rows"]}
    assert sorted(rows) == ["plain", "recompute", "sequential", "stacked"]
    assert rows["plain"]["x_plain"] == 1.0 and rows["sequential"]["c"] == 2
    assert rows["plain"]["measured_steps"] == 1
    # hidden ablation keeps every token: each pass processes the full view
    assert rows["stacked"]["pass_tokens"] == [rows["plain"]["pass_tokens"][0]] * 3
    # activation memory: the reference keeps (1+c) graphs, recompute one
    assert rows["sequential"]["saved_x_plain"] > 2.5
    assert rows["recompute"]["saved_x_plain"] < 1.25
    assert result["machine"]["torch_threads"] >= 1 and result["targets"]


def test_lora_step_memory_is_what_each_adapter_trains(tmp_path):
    out = tmp_path / "lora.json"
    stdout = run("lora_step.py", "--model", "tiny", "--warmup", "1", "--steps", "1",
                 "--threads", "1", "--json", str(out), cwd=tmp_path)
    assert "| qlora | recompute |" in stdout
    result = json.loads(out.read_text())
    rows = {(r["adapter"], r["variant"]): r for r in result["rows"]}
    assert sorted(rows) == sorted((a, v) for a in ("full", "lora", "qlora")
                                  for v in ("plain", "sequential", "stacked", "recompute"))
    assert rows[("full", "plain")]["x_plain_full"] == 1.0
    assert all(r["measured_steps"] == 1 for r in rows.values())
    # the adapters: rank x (in + out) fp32 weights per adapted linear (lora_a and lora_b)
    m, rank = result["model_settings"], result["lora"]["lora_rank"]
    d, ffn = m["embed_dim"], m["intermediate_dim"]
    kv = m["num_kv_heads"] * d // m["num_heads"]
    in_out = [(d, d), (d, kv), (d, d), (d, ffn), (ffn, d), (d, ffn)]  # q, v, output, w1, w2, w3
    adapter_bytes = m["num_layers"] * sum(rank * (i + o) * 4 for i, o in in_out)
    for (adapter, variant), r in rows.items():
        # AdamW: exp_avg and exp_avg_sq per trainable tensor, and its fp32 step count
        assert r["optimizer_bytes"] == 2 * r["trainable_bytes"] + 4 * r["trainable_tensors"]
        if adapter == "full":
            assert r["grad_bytes"] == r["trainable_bytes"] == r["param_bytes"]
            assert r["trainable_params"] == r["params"]
        else:
            assert r["grad_bytes"] == r["trainable_bytes"] == adapter_bytes
            assert r["trainable_params"] * 4 == adapter_bytes
    for v in ("plain", "sequential", "stacked", "recompute"):
        lora, qlora = rows[("lora", v)], rows[("qlora", v)]
        # the same fp32 parameters but the linears' base weights, 4-bit NF4 plus its scalers
        assert qlora["param_bytes"] < lora["param_bytes"]
        assert qlora["param_bytes"] - qlora["nf4_param_bytes"] == (
            lora["param_bytes"] - 4 * qlora["nf4_params"])
        assert 0.5 < qlora["nf4_param_bytes"] / qlora["nf4_params"] < 0.55  # ~4.1 bits a weight
    for adapter in ("full", "lora", "qlora"):
        # (1+c) graphs kept against one
        assert rows[(adapter, "sequential")]["activation_bytes"] > 2.5 * rows[(adapter, "plain")]["activation_bytes"]
        assert rows[(adapter, "recompute")]["activation_bytes"] < 1.25 * rows[(adapter, "plain")]["activation_bytes"]
    assert result["machine"]["torch_threads"] == 1
