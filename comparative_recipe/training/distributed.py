"""torch.distributed pieces of the distributed recipe: process group, FSDP2 sharding, reductions.

torchtune 0.6.1's distributed recipes assume CUDA in a few places (memory stats, cache
clearing, backend strings); everything here works on CPU with gloo as well as on CUDA with NCCL.
"""

import os
from datetime import timedelta
from typing import Any, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, fully_shard
from torchtune import training, utils
from torchtune.modules.peft import get_adapter_state_dict

# Config keys that only a torchrun-launched (FSDP2) run reads.
DISTRIBUTED_KEYS = (
    "fsdp_cpu_offload", "fsdp_reshard_after_forward", "distributed_timeout_minutes",
    "count_collectives",
)


def check_single_process(cfg: Any, recipe: str, distributed_recipe: str) -> None:
    """A single-device recipe runs as one process, and no key that only the distributed recipe
    reads is set (it would be ignored)."""
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if processes > 1:
        raise RuntimeError(
            f"{recipe} was launched as {processes} processes, which would each train the whole "
            f"model on the same data: use {distributed_recipe} with torchrun, or launch one "
            "process"
        )
    distributed_only = [key for key in DISTRIBUTED_KEYS if key in cfg]
    if distributed_only:
        raise ValueError(
            f"{distributed_only} are keys of {distributed_recipe} (FSDP2 over several "
            "processes); this recipe trains on one device and would ignore them: remove them, "
            "or run the distributed recipe"
        )


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


def unshard_parameters(module: nn.Module) -> None:
    """All-gathers the parameters an FSDP2 unit holds itself (not its child units'), for use
    outside its forward: a root's norm and output projection read after the forward (FSDP2
    reshards them when the forward ends); their gradients are still reduced at the end of the
    backward. Nothing for a module that is not sharded or already gathered."""
    if isinstance(module, FSDPModule):
        module.unshard()


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


class World:
    """The processes a run trains on, and how the model is laid over them.

    One process (``World.single_device``) is the smallest case: collectives are no-ops, the model
    is built on the device and loaded directly. A torchrun job (``World.from_torchrun``) joins the
    process group, builds the model on the meta device, shards it with FSDP2 (one unit per
    decoder layer) and loads each rank's shard. The training loop calls the same methods either
    way; nothing else in it knows how many ranks there are.
    """

    def __init__(
        self,
        device: torch.device,
        *,
        world_size: int = 1,
        rank: int = 0,
        sharded: bool = False,
        cpu_offload: bool = False,
        reshard_after_forward: bool = True,
    ) -> None:
        self.device = device
        self.world_size, self.rank = world_size, rank
        self.is_rank_zero = rank == 0
        self.sharded = sharded
        self.cpu_offload = cpu_offload
        self.reshard_after_forward = reshard_after_forward

    @classmethod
    def single_device(cls, device: torch.device) -> "World":
        return cls(device)

    @classmethod
    def from_torchrun(
        cls,
        device: torch.device,
        *,
        timeout_minutes: Optional[float] = None,
        cpu_offload: bool = False,
        reshard_after_forward: bool = True,
    ) -> "World":
        """Joins the process group torchrun set up and shards models with FSDP2."""
        check_cpu_offload(cpu_offload, device)
        world_size, rank = init_process_group(device, timeout_minutes)
        if device.type == "cpu":
            set_threads_per_rank()
        return cls(
            device, world_size=world_size, rank=rank, sharded=True, cpu_offload=cpu_offload,
            reshard_after_forward=reshard_after_forward,
        )

    @classmethod
    def from_config(cls, cfg: Any, *, torchrun: Optional[bool] = None) -> "World":
        """The world of a recipe config: torchrun's ranks (the config's ``fsdp_cpu_offload``,
        ``fsdp_reshard_after_forward`` and ``distributed_timeout_minutes``) when ``torchrun``,
        by default when the process was launched by torchrun; else ``cfg.device`` alone."""
        device = utils.get_device(device=cfg.device)
        if torchrun is None:
            torchrun = training.is_distributed()
        if not torchrun:
            return cls.single_device(device)
        return cls.from_torchrun(
            device, timeout_minutes=cfg.get("distributed_timeout_minutes", None),
            cpu_offload=cfg.get("fsdp_cpu_offload", False),
            reshard_after_forward=cfg.get("fsdp_reshard_after_forward", True),
        )

    def model_init_device(self) -> torch.device:
        """Where to build the model: the meta device when it will be sharded."""
        return torch.device("meta") if self.sharded else self.device

    def load_model(self, model: nn.Module, state_dict: dict, dtype: torch.dtype) -> None:
        """Loads the full ``state_dict`` into ``model`` (sharding it first when sharded)."""
        if not self.sharded:
            model.load_state_dict(state_dict)
            training.validate_expected_param_dtype(model.named_parameters(), dtype=dtype)
            return
        shard_model(
            model, cpu_offload=self.cpu_offload, reshard_after_forward=self.reshard_after_forward
        )
        with training.set_default_dtype(dtype), self.device:
            for m in model.modules():
                if hasattr(m, "rope_init"):  # RoPE caches are not in the state dict
                    m.rope_init()
        training.load_from_full_model_state_dict(
            model, state_dict, self.device, strict=True, cpu_offload=self.cpu_offload
        )
        training.validate_no_params_on_meta_device(model)

    def full_model_state(self, model: nn.Module, adapter_weights_only: bool = False) -> Optional[dict]:
        """The whole model's state dict on rank 0 (None elsewhere); collective when sharded.
        ``adapter_weights_only``: only the LoRA adapters' entries (nothing else is gathered)."""
        if not self.sharded:
            state = model.state_dict()
            return get_adapter_state_dict(state) if adapter_weights_only else state
        return training.gather_cpu_state_dict(
            model, self.is_rank_zero, device=self.device, adapter_weights_only=adapter_weights_only
        )

    def shard_module(self, module: nn.Module) -> None:
        """Lays a method's own module (already on this rank's device, equal on every rank) over
        the world as the model is: one FSDP2 unit of its own when sharded, else as it is."""
        if self.sharded:
            kwargs = {"reshard_after_forward": self.reshard_after_forward}
            if self.cpu_offload:
                kwargs["offload_policy"] = CPUOffloadPolicy()
            fully_shard(module, **kwargs)

    def full_module_state(self, module: nn.Module) -> Optional[dict]:
        """A module's whole state dict as CPU tensors on rank 0 (None elsewhere); collective
        when sharded."""
        if not self.sharded:
            return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
        state = training.gather_cpu_state_dict(module, self.is_rank_zero, device=self.device)
        return state if self.is_rank_zero else None

    def full_optimizer_state(self, model: nn.Module, optimizer) -> Optional[dict]:
        """The optimizer state for the whole model on rank 0; collective when sharded."""
        if not self.sharded:
            return optimizer.state_dict()
        return training.get_full_optimizer_state_dict(
            model, optimizer, self.is_rank_zero, device=self.device
        )

    def load_optimizer_state(self, model: nn.Module, optimizer, state: dict) -> None:
        if not self.sharded:
            optimizer.load_state_dict(state)
        else:
            training.load_from_full_optimizer_state_dict(model, optimizer, state, self.device)

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(t) if self.world_size > 1 else t

    def barrier(self) -> None:
        if dist.is_available() and dist.is_initialized():
            dist.barrier()

    def grad_sync_setter(self, model: nn.Module):
        """FSDP's ``set_requires_gradient_sync`` of a sharded model, else None."""
        return model.set_requires_gradient_sync if self.sharded else None

    def close(self) -> None:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
