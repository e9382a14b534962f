"""The three pass strategies under FSDP2 on 1 and 2 gloo ranks, with and without activation
checkpointing, give the gradient of the single-process reference (global normalisation)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_passes import HIDDEN, make_batch, make_model
from comparative_recipe.ablation.hidden import install_hidden_ablation
from comparative_recipe.passes import STRATEGIES, comparative_step

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = str(Path(sys.executable).parent / "torchrun")


def reference():
    """Plain model, one process, the whole 8-sample batch, sequential, no checkpointing."""
    from tests.workers.fsdp_strategy_grads import BATCH, STEP, spec

    model = make_model()
    install_hidden_ablation(model, HIDDEN)
    res = comparative_step(model, make_batch(**BATCH), spec("sequential"), step=STEP)
    weight = res.sample_weight.sum()
    grads = {n: p.grad / weight for n, p in model.named_parameters()}
    return res.losses, grads


@pytest.mark.parametrize("world_size", [1, 2])
def test_every_strategy_with_and_without_ac_matches_the_reference(tmp_path, world_size):
    out = tmp_path / "grads.pt"
    proc = subprocess.run(
        [TORCHRUN, "--standalone", f"--nproc_per_node={world_size}", "-m", "tests.workers.fsdp_strategy_grads",
         str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    found = torch.load(out)
    ref_losses, ref_grads = reference()
    assert sorted(found) == sorted((ac, s) for ac in (False, True) for s in STRATEGIES)
    for key, got in found.items():
        # rank r held rows r::world_size of the batch
        losses = torch.empty_like(ref_losses)
        for r, part in enumerate(got["losses"]):
            losses[r::world_size] = part
        torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=1e-6, msg=str(key))
        assert got["grads"].keys() == ref_grads.keys()
        for name, g in ref_grads.items():
            rel = (got["grads"][name] - g).norm() / g.norm()
            assert rel < 1e-5, (key, name, float(rel))
