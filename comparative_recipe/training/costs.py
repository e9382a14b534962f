"""What an optimizer step costs: collectives issued and bytes moved, peak memory, and
activation memory (bytes saved for backward).

Used by the distributed (FSDP2) recipes to log per-step costs and by the benchmarks.
"""

import resource
import sys
from typing import Any, Dict, List, Optional

import torch
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

# Ops of these namespaces that move no data between processes.
_NOT_COMMUNICATION = {"wait", "wait_tensor", "check_for_nan", "_wrap_tensor_autograd"}
# Synchronisation only: counted as collectives with 0 bytes.
_BARRIERS = {"barrier", "monitored_barrier_"}


def _tensor_bytes(value: Any) -> int:
    """Bytes of the tensors in ``value`` (a tensor, or a list/tuple of them, nested); 0 otherwise."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


class CollectiveCounter(TorchDispatchMode):
    """Counts the collectives this process issues while active (``with counter:``) and their bytes.

    A collective is any op of the ``c10d`` namespace (what ``torch.distributed.all_reduce`` and
    friends, and FSDP2's all-gathers and reduce-scatters, dispatch to) or of ``_c10d_functional``
    (functional collectives, DTensor), except the bookkeeping ops ``wait``, ``wait_tensor``,
    ``check_for_nan`` and ``_wrap_tensor_autograd``.
    Point-to-point ops (send/recv) are counted too. Barriers count as collectives of 0 bytes.

    Bytes of one collective = its payload = the larger of the bytes of its input tensor(s) and of
    its output tensor(s): an all-gather counts its gathered output, a reduce-scatter its full input,
    an all-reduce or broadcast its tensor(s). It is what one rank hands to or receives from the
    collective, not what goes over the wire (that depends on the algorithm, e.g. a ring all-reduce
    sends about twice its payload).

    Collectives issued from autograd backward hooks (FSDP2 reduce-scatters and re-gathers) are
    counted, since dispatch modes are carried into the backward pass; so are the collectives that
    DTensor ops lower to (the mode defers to DTensor). Counts are per process.

    Attributes: ``count``, ``bytes``, ``by_op`` (op name such as ``"c10d._allgather_base_"`` ->
    ``[count, bytes]``); ``reset()`` zeroes them.
    """

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.bytes = 0
        self.by_op: Dict[str, List[int]] = {}

    def reset(self) -> None:
        self.count = 0
        self.bytes = 0
        self.by_op = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if isinstance(func, torch._ops.HigherOrderOperator):
            return func(*args, **(kwargs or {}))
        if any(issubclass(t, DTensor) for t in types):
            # DTensor first: it lowers the op to plain-tensor ops and
            # collectives (e.g. the all-reduce of a sharded gradient norm), which come back here.
            return NotImplemented
        out = func(*args, **(kwargs or {}))
        if func.namespace not in ("c10d", "_c10d_functional"):
            return out
        name = func._opname
        if name in _NOT_COMMUNICATION:
            return out
        if name in _BARRIERS:
            payload = 0
        else:
            # One group per argument (a tensor or a list of them) plus the result: the largest is
            # the input or the output side, never their sum.
            groups = list(args) + list((kwargs or {}).values()) + [out]
            payload = max(_tensor_bytes(g) for g in groups)
        key = f"{func.namespace}.{name}"
        entry = self.by_op.setdefault(key, [0, 0])
        entry[0] += 1
        entry[1] += payload
        self.count += 1
        self.bytes += payload
        return out


# Whether the last reset_peak_memory on CPU managed to reset the process peak RSS.
_rss_reset = False


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window for ``device`` (see ``peak_memory``)."""
    global _rss_reset
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        # Linux >= 4.0: "5" resets the process peak RSS (VmHWM) to the current RSS.
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _rss_reset = True
    except OSError:
        _rss_reset = False


def peak_memory(device: torch.device) -> int:
    """Peak memory in bytes since the last ``reset_peak_memory(device)``.

    CUDA: peak bytes allocated by PyTorch's caching allocator on ``device``. Any other device:
    peak resident set size of the whole process (VmHWM); if ``/proc/self/clear_refs`` could not be
    written (not Linux, some containers) that is the peak since the process started, and
    ``peak_memory_kind`` says so.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, kB elsewhere


def peak_memory_kind(device: torch.device) -> str:
    """What ``peak_memory(device)`` measures, as a metric-name suffix.

    ``"cuda_max_allocated"``, ``"cpu_peak_rss"`` (since the last reset) or
    ``"cpu_lifetime_peak_rss"`` (the reset was not possible, or never done).
    """
    if torch.device(device).type == "cuda":
        return "cuda_max_allocated"
    return "cpu_peak_rss" if _rss_reset else "cpu_lifetime_peak_rss"




def _storage_ptr(t: torch.Tensor) -> Optional[int]:
    """The address of ``t``'s storage; None for a wrapper subclass without one (torchao's
    NF4Tensor, whose parameters are what a QLoRA linear saves for backward)."""
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError, TypeError):
        return None


class _Saved:
    """A tensor saved for backward, counted while the autograd graph holds it."""

    __slots__ = ("tensor", "meter", "key")

    def __init__(self, tensor: torch.Tensor, meter: "SavedTensorMeter", key: Any):
        self.tensor, self.meter, self.key = tensor, meter, key

    def __del__(self) -> None:
        if self.key is not None:
            self.meter._release(self.key)


class SavedTensorMeter:
    """Activation memory: bytes of the tensors autograd saves for backward, live and peak.

    While active (``with meter:``), every tensor an op saves for backward is counted from when it
    is saved until the graph that holds it is freed (after its backward, or when dropped).
    Storages are counted once however many saved views share them, and ``exclude`` storages
    (the parameters, by default none) are not counted: a weight saved by a matmul is not
    activation memory. Works on any device; with activation checkpointing only what the
    checkpoint keeps (the layer inputs) is saved, which is the point of checkpointing.

    Attributes: ``live`` (bytes now), ``peak`` (max of ``live`` since ``reset()``).
    """

    def __init__(self, exclude: Any = ()) -> None:
        self._excluded = {ptr for p in exclude if (ptr := _storage_ptr(p)) is not None}
        self._refs: Dict[Any, List[int]] = {}  # storage key -> [saved count, bytes]
        self.live = 0
        self.peak = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def reset(self) -> None:
        self.peak = self.live

    def _pack(self, t: torch.Tensor) -> _Saved:
        ptr = _storage_ptr(t)
        if not ptr or ptr in self._excluded:  # a storage-less subclass: QLoRA's NF4 weights
            return _Saved(t, self, None)
        storage = t.untyped_storage()
        key = (t.device, ptr)
        entry = self._refs.get(key)
        if entry is None:
            entry = self._refs[key] = [0, storage.nbytes()]
            self.live += entry[1]
            self.peak = max(self.peak, self.live)
        entry[0] += 1
        return _Saved(t, self, key)

    @staticmethod
    def _unpack(saved: _Saved) -> torch.Tensor:
        return saved.tensor

    def _release(self, key: Any) -> None:
        entry = self._refs[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self._refs[key]

    def __enter__(self) -> "SavedTensorMeter":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)


__all__ = ["CollectiveCounter", "SavedTensorMeter", "peak_memory", "peak_memory_kind", "reset_peak_memory"]
