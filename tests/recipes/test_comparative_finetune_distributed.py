"""End-to-end runs of the distributed recipe on 2 gloo ranks (torchrun, tiny model, CPU)."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.recipes.recipe_helpers import (
    comparative_config,
    launch_distributed,
    read_metrics,
    run_recipe,
    with_output_dir,
    write,
)

pytestmark = pytest.mark.slow

WEIGHTS = "model-00001-of-00001.safetensors"
LOSSES = ("loss", "cmp_loss", "loss_0", "loss_1", "loss_2")


def distributed_config(assets, out, **overrides):
    """c = 2 (a crop, then hidden units), stacked passes, validation on 41 samples, a checkpoint
    every step: 6 steps of a global batch of 8 over the 48 samples, shuffled by seed 7."""
    val = assets / "val.jsonl"
    if not val.exists():
        lines = (assets / "data.jsonl").read_text().splitlines()[:41]
        val.write_text("\n".join(lines) + "\n")
    cfg = comparative_config(assets, out, batch_size=4, strategy="stacked", save_every_n_steps=1,
                             keep_last_checkpoints=10, count_collectives=True, clip_grad_norm=1.0,
                             seed=7)  # not the samplers' default 0: the data order follows it
    cfg["validation"] = {"dataset": dict(cfg["dataset"], data_files=str(val)), "batch_size": 8,
                         "every_n_steps": 3}
    cfg.update(overrides)
    return cfg


@pytest.fixture(scope="module")
def two_ranks(assets, tmp_path_factory):
    """The reference: 2 ranks x batch 4 on one node; rank 0 writes the HTML report at the end."""
    tmp = tmp_path_factory.mktemp("two_ranks")
    cfg = distributed_config(assets, tmp / "out", report=True)
    proc = launch_distributed(cfg, tmp, "two_ranks", nproc=2)
    assert proc.stdout.count("Report written to") == 1
    return cfg, tmp / "out"


def assert_same_run(a_dir, b_dir, steps=range(1, 7), rel=1e-5, weights_atol=1e-5):
    a, b = read_metrics(a_dir / "logs"), read_metrics(b_dir / "logs")
    for step in steps:
        for key in LOSSES:
            assert a[step][key] == pytest.approx(b[step][key], rel=rel), (step, key)
    final = f"step_{max(steps):06d}/{WEIGHTS}"
    w_a, w_b = load_file(a_dir / "checkpoints" / final), load_file(b_dir / "checkpoints" / final)
    for k in w_a:
        torch.testing.assert_close(w_a[k], w_b[k], rtol=1e-4, atol=weights_atol, msg=k)


def test_two_ranks_log_costs_and_validate_every_sample_once(two_ranks):
    _, out = two_ranks
    metrics = read_metrics(out / "logs")
    assert sorted(s for s in metrics if "loss" in metrics[s]) == list(range(1, 7))
    step = metrics[2]
    assert step["collectives"] > 0 and step["collective_bytes"] > 0
    assert step["peak_memory_cpu"] > 50e6
    # 41 validation samples split over 2 ranks: counted once each, none repeated
    assert metrics[3]["val_samples"] == metrics[6]["val_samples"] == 41
    assert (out / "best" / WEIGHTS).is_file()
    page = (out / "report.html").read_text()
    assert page.count("<img ") >= 4 and f"{metrics[6]['val_loss_0']:.4f}" in page


@pytest.mark.parametrize("variant", ["single_device_b8", "one_rank_b8", "two_ranks_b2_accum2"])
def test_global_batch_of_8_trains_alike_however_it_is_split(assets, tmp_path, two_ranks, variant):
    """1 rank x 8 (both recipes), and 2 ranks x 2 x 2 accumulation, equal 2 ranks x 4: the loss
    is normalised over all ranks and micro-batches, masks and crops follow the sample."""
    out = tmp_path / "out"
    if variant == "single_device_b8":
        cfg = distributed_config(assets, out, batch_size=8)
        del cfg["count_collectives"]
        run_recipe(cfg, tmp_path, variant)
    elif variant == "one_rank_b8":
        launch_distributed(distributed_config(assets, out, batch_size=8), tmp_path, variant, nproc=1)
    else:
        cfg = distributed_config(assets, out, batch_size=2, gradient_accumulation_steps=2)
        launch_distributed(cfg, tmp_path, variant, nproc=2)
    assert_same_run(out, two_ranks[1])
    a, b = read_metrics(out / "logs"), read_metrics(two_ranks[1] / "logs")
    assert a[6]["val_samples"] == 41
    assert a[6]["val_loss_0"] == pytest.approx(b[6]["val_loss_0"], rel=1e-5)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_emulated_nodes_equal_one_node(assets, tmp_path, two_ranks):
    """Two launchers (one per 'node', 1 process each) meet through a c10d rendezvous."""
    cfg = with_output_dir(two_ranks[0], tmp_path / "out")
    path = write(cfg, tmp_path / "multinode.yaml")
    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    launchers = [
        subprocess.Popen(
            [sys.executable, "-m", "comparative_recipe.cli", "run", "--nnodes=2",
             "--nproc_per_node=1", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
             "--rdzv_id=multinode-test", "comparative_finetune_distributed", "--config", str(path)],
            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=open(tmp_path / f"node{i}.log", "w"),
        )
        for i in range(2)
    ]
    try:
        codes = [p.wait(timeout=300) for p in launchers]
    finally:
        for p in launchers:
            if p.poll() is None:
                p.kill()
    assert codes == [0, 0], (tmp_path / "node0.log").read_text()[-3000:]
    assert_same_run(tmp_path / "out", two_ranks[1])


def descendants(pid):
    """The pids of all processes below ``pid`` (Linux /proc)."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def test_sigkill_then_resume_continues_the_same_curve(assets, tmp_path, two_ranks):
    """SIGKILL the whole job (launcher and ranks) as soon as step 3's checkpoint is being
    written, then resume: no half-written checkpoint, and steps 4.. equal the uninterrupted run."""
    cfg = with_output_dir(two_ranks[0], tmp_path / "out")
    path = write(cfg, tmp_path / "killed.yaml")
    ckpts = tmp_path / "out" / "checkpoints"
    job = subprocess.Popen(
        [sys.executable, "-m", "comparative_recipe.cli", "run", "--nproc_per_node=2",
         "comparative_finetune_distributed", "--config", str(path)],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "killed.log", "w"),
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    deadline = time.time() + 240
    while time.time() < deadline and job.poll() is None:
        names = [p.name for p in ckpts.iterdir()] if ckpts.is_dir() else []
        if any(n.startswith((".step_000003", "step_000003")) for n in names):
            break
        time.sleep(0.005)
    assert job.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
    # torchrun starts each worker in its own session: kill the launcher and every descendant.
    for pid in [job.pid, *descendants(job.pid)]:
        os.kill(pid, signal.SIGKILL)
    job.wait()

    complete = [p for p in ckpts.iterdir() if p.name.startswith("step_")]
    assert complete, "no checkpoint before the kill"
    for p in complete:  # a step directory only ever appears complete
        assert (p / "recipe_state.pt").is_file() and (p / WEIGHTS).is_file(), p
    resumed_from = max(int(p.name.split("_")[1]) for p in complete)

    launch_distributed(dict(cfg, resume_from_checkpoint=True), tmp_path, "resumed", nproc=2)
    assert not [p for p in ckpts.iterdir() if p.name.startswith(".")]
    steps = range(resumed_from + 1, 7)
    resumed_log = max((tmp_path / "out" / "logs").glob("*.txt"), key=lambda p: p.stat().st_mtime)
    logged = sorted({int(line.split()[1]) for line in resumed_log.read_text().splitlines()})
    assert logged == list(steps)
    full, resumed = read_metrics(two_ranks[1] / "logs"), read_metrics(tmp_path / "out" / "logs")
    for step in steps:
        for key in (*LOSSES, "lr"):
            assert resumed[step][key] == full[step][key], (step, key)
    w_a = load_file(two_ranks[1] / "checkpoints" / f"step_000006/{WEIGHTS}")
    w_b = load_file(ckpts / f"step_000006/{WEIGHTS}")
    assert all(torch.equal(w_a[k], w_b[k]) for k in w_a)


def test_a_failing_rank_fails_the_job_with_its_error(assets, tmp_path):
    cfg = comparative_config(assets, tmp_path / "out", batch_size=4)
    cfg["dataset"] = dict(cfg["dataset"], _component_="tests.recipes.faults.failing_dataset", fail_rank=1, after=10)
    cfg["distributed_timeout_minutes"] = 10
    start = time.time()
    proc = launch_distributed(cfg, tmp_path, "failing", nproc=2, check=False,
                              PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    assert proc.returncode != 0
    assert "injected data failure on rank 1" in proc.stderr
    assert "rank      : 1" in proc.stderr  # torchrun's summary names the failing rank
    assert time.time() - start < 120  # the other rank did not wait for the 10-minute timeout


@pytest.mark.parametrize("override,needle", [
    ({"fsdp_cpu_offload": True}, "fsdp_cpu_offload"),
    ({"strategy": "stack"}, "strategy"),
])
def test_bad_distributed_config_fails_before_training(assets, tmp_path, override, needle):
    cfg = comparative_config(assets, tmp_path / "out", **override)
    proc = launch_distributed(cfg, tmp_path, "bad", nproc=2, check=False)
    assert proc.returncode != 0 and needle in proc.stderr
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_launching_without_torchrun_says_how(assets, tmp_path):
    cfg = comparative_config(assets, tmp_path / "out")
    proc = run_recipe(cfg, tmp_path, "plain", check=False, recipe="comparative_finetune_distributed")
    assert proc.returncode != 0 and "torchrun" in proc.stderr.strip().splitlines()[-1]


def test_mid_epoch_checkpoint_refuses_another_world_size(assets, tmp_path, two_ranks):
    out = tmp_path / "out"
    (out / "checkpoints").mkdir(parents=True)
    os.symlink(two_ranks[1] / "checkpoints" / "step_000003", out / "checkpoints" / "step_000003")
    cfg = with_output_dir(two_ranks[0], out)
    proc = launch_distributed(dict(cfg, resume_from_checkpoint=True), tmp_path, "resize", nproc=1,
                              check=False)
    assert proc.returncode != 0 and "resume it with 2 ranks" in proc.stderr
