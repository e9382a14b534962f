"""torch.distributed pieces of the distributed recipe: process group, FSDP2 sharding, reductions.

torchtune 0.6.1's distributed recipes assume CUDA in a few places (memory stats, cache
clearing, backend strings); everything here works on CPU with gloo as well as on CUDA with NCCL.
"""

import os
from datetime import timedelta
from typing import Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torchtune import training


def init_process_group(device: torch.device, timeout_minutes: Optional[float] = None) -> Tuple[int, int]:
    """Joins the process group torchrun set up (env://): nccl on CUDA, gloo on CPU.

    Returns (world_size, rank). ``timeout_minutes`` bounds how long a collective waits for a
    rank that died or hangs before the job fails (torch's default: 10 min NCCL, 30 min gloo).
    """
    if not training.is_distributed():
        raise RuntimeError(
            "the distributed recipe must be launched by torchrun (RANK, WORLD_SIZE, MASTER_ADDR "
            "and MASTER_PORT unset): use `tune-cmp run --nproc_per_node N "
            "comparative_finetune_distributed --config ...`, or the single-device recipe"
        )
    kwargs = {"backend": training.get_distributed_backend(device.type)}
    if timeout_minutes is not None:
        kwargs["timeout"] = timedelta(minutes=float(timeout_minutes))
    if device.type == "cuda":
        # Binds NCCL communicators to this rank's GPU up front (no guessing from LOCAL_RANK later).
        kwargs["device_id"] = device
    dist.init_process_group(**kwargs)
    return dist.get_world_size(), dist.get_rank()


def set_threads_per_rank() -> int:
    """Splits the node's CPU cores between its ranks (torchrun's LOCAL_WORLD_SIZE), so that
    CPU ranks, or the CPU work of GPU ranks, do not oversubscribe the cores. Returns the count."""
    ranks_on_node = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    threads = max(1, (os.cpu_count() or 1) // ranks_on_node)
    torch.set_num_threads(threads)
    return threads


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over all ranks (in place, returned); ``t`` unchanged without a process group."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def check_cpu_offload(fsdp_cpu_offload: bool, device: torch.device) -> None:
    if fsdp_cpu_offload and device.type != "cuda":
        raise ValueError(
            f"fsdp_cpu_offload=True needs CUDA devices (device is {device.type}): it moves "
            "parameters, gradients and optimizer state from the GPU to CPU memory; on CPU the "
            "model already lives there. Set fsdp_cpu_offload: False"
        )


def shard_model(model: nn.Module, *, cpu_offload: bool, reshard_after_forward: bool = True) -> None:
    """FSDP2 over a torchtune decoder: one FSDP unit per ``layers.<i>`` (the activation-checkpoint
    wrapper when there is one), then the root (embeddings, final norm, output projection)."""
    training.shard_model(
        model=model,
        shard_conditions=[training.get_shard_conditions],
        cpu_offload=cpu_offload,
        reshard_after_forward=reshard_after_forward,
    )
