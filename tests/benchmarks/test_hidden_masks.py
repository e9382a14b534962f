"""benchmarks/hidden_masks.py runs from a clean checkout with a tiny setting and reports its
ratio (no timing is asserted)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "hidden_masks.py"

pytestmark = pytest.mark.slow


def test_tiny_run_prints_the_ratio_and_writes_json(tmp_path):
    out = tmp_path / "masks.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--model", "tiny", "--batch", "2", "--seq", "32",
         "--answer", "8", "--warmup", "0", "--repeats", "2", "--mask-shape", "2", "16", "64",
         "--mask-repeats", "1", "--json", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ratio element/unit:" in proc.stdout
    result = json.loads(out.read_text())
    assert len(result["step_times_s"]["element"]) == len(result["step_times_s"]["unit"]) == 2
    assert result["ratio_element_unit"] > 0 and result["mask"]["element_mask_ms"] > 0
