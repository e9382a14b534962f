import json
import os
import subprocess
import sys
import textwrap
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from comparative_recipe.training.costs import (
    CollectiveCounter,
    SavedTensorMeter,
    peak_memory,
    peak_memory_kind,
    reset_peak_memory,
)

# torch 2.13 renamed all_gather_into_tensor / reduce_scatter_tensor (the old names warn).
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
all_gather_coalesced = (
    getattr(funcol, "all_gather_single_coalesced", None) or funcol.all_gather_into_tensor_coalesced
)


@pytest.fixture(scope="module")
def world_of_one(tmp_path_factory):
    if dist.is_initialized():
        pytest.skip("a default process group is already initialized in this process")
    store = tmp_path_factory.mktemp("pg") / "store"
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=0, world_size=1, timeout=timedelta(seconds=30)
    )
    yield
    dist.destroy_process_group()


def test_counts_each_all_reduce_with_its_bytes(world_of_one):
    t = torch.ones(1000)  # float32: 4000 bytes
    counter = CollectiveCounter()
    with counter:
        for _ in range(3):
            dist.all_reduce(t)
        dist.all_reduce(t, async_op=True).wait()
    assert counter.count == 4
    assert counter.bytes == 4 * 4000
    assert counter.by_op == {"c10d.allreduce_": [4, 16000]}


def test_all_gather_counts_its_output_and_reduce_scatter_its_input(world_of_one):
    counter = CollectiveCounter()
    with counter:
        all_gather_single(torch.empty(250, dtype=torch.float64), torch.ones(250, dtype=torch.float64))
    assert (counter.count, counter.bytes) == (1, 2000)
    counter.reset()
    with counter:
        ins = [torch.ones(10), torch.ones(3)]
        # a list of tensors in, one tensor per rank out: the bytes are the whole gathered list
        dist.all_gather([torch.empty(10)], ins[0])
        with dist._coalescing_manager(async_ops=True) as cm:
            for x in ins:
                reduce_scatter_single(torch.empty_like(x), x)
        cm.wait()
    assert counter.by_op == {
        "c10d.allgather_": [1, 40],
        "c10d.reduce_scatter_tensor_coalesced_": [1, 52],
    }


def test_functional_collectives_are_counted_but_not_their_waits(world_of_one):
    counter = CollectiveCounter()
    with counter:
        y = funcol.all_reduce(torch.ones(100), "sum", dist.group.WORLD)
        y = funcol.wait_tensor(y)
        z = all_gather_coalesced([torch.ones(7), torch.ones(5)], dist.group.WORLD)
        z = [funcol.wait_tensor(t) for t in z]
    assert counter.by_op == {
        "_c10d_functional.all_reduce": [1, 400],
        "_c10d_functional.all_gather_into_tensor_coalesced": [1, 48],
    }
    assert counter.count == 2


def test_barrier_counts_as_a_collective_of_zero_bytes(world_of_one):
    counter = CollectiveCounter()
    with counter:
        dist.barrier()
    assert counter.by_op == {"c10d.barrier": [1, 0]}


def test_other_ops_pass_through_uncounted(world_of_one):
    a, b = torch.randn(8, 8), torch.randn(8, 8)
    counter = CollectiveCounter()
    with counter:
        c = (a @ b).relu().sum(0)
        d = torch.ones(5)
        dist.all_reduce(d)
    assert torch.equal(c, (a @ b).relu().sum(0))
    assert torch.equal(d, torch.ones(5))
    assert counter.count == 1 and counter.by_op == {"c10d.allreduce_": [1, 20]}


def test_nothing_is_counted_outside_the_with_block_and_reset_zeroes(world_of_one):
    t = torch.ones(10)
    counter = CollectiveCounter()
    dist.all_reduce(t)
    with counter:
        dist.all_reduce(t)
    dist.all_reduce(t)
    assert (counter.count, counter.bytes) == (1, 40)
    counter.reset()
    assert (counter.count, counter.bytes, counter.by_op) == (0, 0, {})
    with counter:
        dist.all_reduce(t)
    assert (counter.count, counter.bytes) == (1, 40)


# Run by two processes. Linear(5, 7) and Linear(7, 3), each its own FSDP2 group, then the root
# (which holds no parameter of its own, so issues no collective).
FSDP_WORKER = textwrap.dedent(
    """
    import json, sys
    from datetime import timedelta
    import torch, torch.distributed as dist, torch.nn as nn
    from torch.distributed.fsdp import fully_shard
    from comparative_recipe.training.costs import CollectiveCounter

    rank, store, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=2,
                            timeout=timedelta(seconds=30))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    fully_shard(model[0], reshard_after_forward=True)
    fully_shard(model[2], reshard_after_forward=True)
    fully_shard(model)
    counter = CollectiveCounter()
    steps = []
    for _ in range(2):
        counter.reset()
        with counter:
            model(torch.randn(4, 5)).sum().backward()
        steps.append(counter.by_op)
    # The norm of sharded (DTensor) gradients: DTensor lowers it to one all-reduce.
    counter.reset()
    with counter:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
    steps.append(counter.by_op)
    dist.destroy_process_group()
    with open(out, "w") as f:
        json.dump(steps, f)
    """
)


def test_counts_fsdp2_all_gathers_and_reduce_scatters_of_a_step(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(FSDP_WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(rank), str(tmp_path / "store"), str(tmp_path / f"{rank}.json")],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for rank in range(2)
    ]
    try:
        logs = [p.communicate(timeout=120)[0].decode() for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log

    # Padded to the world size along dim 0: 7 -> 8 rows, 3 -> 4 rows.
    elements = 8 * 5 + 8 + 4 * 7 + 4
    for rank in range(2):
        *steps, clip = json.loads((tmp_path / f"{rank}.json").read_text())
        assert clip == {"_c10d_functional.all_reduce": [1, 4 * 4]}  # the 4 per-parameter norms
        for by_op in steps:
            assert by_op == {
                # forward: one per group; backward: each group re-gathered after the reshard
                "c10d._allgather_base_": [4, 2 * elements * 4],
                # backward hooks: one per group, of the group's full (unsharded) gradient
                "c10d._reduce_scatter_base_": [2, elements * 4],
            }


def test_cpu_peak_memory_sees_a_200mb_tensor_and_resets():
    cpu = torch.device("cpu")
    reset_peak_memory(cpu)
    base = peak_memory(cpu)
    t = torch.ones(50_000_000)  # 200 MB, every page touched
    with_tensor = peak_memory(cpu)
    assert with_tensor - base >= 190e6
    del t
    if peak_memory_kind(cpu) != "cpu_peak_rss":
        pytest.skip("/proc/self/clear_refs is not writable here: the CPU peak cannot be reset")
    reset_peak_memory(cpu)
    assert peak_memory(cpu) < with_tensor - 150e6


def test_peak_memory_kind_names_the_measure():
    assert peak_memory_kind(torch.device("cuda")) == "cuda_max_allocated"
    assert peak_memory_kind(torch.device("cpu")) in ("cpu_peak_rss", "cpu_lifetime_peak_rss")


def test_saved_tensor_meter_counts_saved_storages_once_until_backward_frees_them():
    x = torch.randn(1000, requires_grad=True)
    meter = SavedTensorMeter()
    with meter:
        y = x.exp()  # saves its output: 4000 bytes
        z = y.sin()  # saves its input, the same storage: counted once
        assert meter.live == 4000
        w = (z * 3.0).sum()  # a scalar factor saves no tensor
    assert meter.live == 4000
    w.backward()
    assert meter.live == 0 and meter.peak == 4000


def test_saved_tensor_meter_excludes_parameters_and_sees_graphs_overlap():
    model = torch.nn.Linear(100, 100, bias=False)
    x = torch.randn(8, 100)
    meter = SavedTensorMeter(exclude=model.parameters())
    with meter:
        # x does not require grad: linear saves x (for the weight's gradient) only
        loss_a = model(x).square().sum()  # square saves its input: 8 x 100 floats
    assert meter.live == 2 * 8 * 100 * 4
    with meter:
        loss_b = model(x).square().sum()
    # both graphs alive (sequential); x is saved by both but held once
    assert meter.peak == 3 * 8 * 100 * 4
    (loss_a + loss_b).backward()
    assert meter.live == 0
    meter.reset()
    for _ in range(2):  # one graph at a time: recompute
        with meter:
            loss = model(x).square().sum()
        loss.backward()
    assert meter.peak == 2 * 8 * 100 * 4
