"""Counter-based random numbers: a pure function of integer keys, identical on every device.

Ablation masks and crop orders must be reproducible from (seed, step, sample id, pass, site)
alone: the same sample gets the same masks in any batch row, on any rank, after a resume, and in
an activation-checkpointing recompute. A stateful generator cannot promise that; a hash can.

The hash is 32-bit (murmur3's finaliser) emulated in int64 tensors, so every intermediate stays
below 2**63 and the result is bit-identical on CPU and CUDA.
"""

from typing import Union

import torch

_MASK32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9

IntLike = Union[int, torch.Tensor]


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for x in [0, 2**32), without int64 overflow."""
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _MASK32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def hash_keys(*keys: IntLike, device: Union[torch.device, str, None] = None) -> torch.Tensor:
    """Mixes integer keys (python ints or int tensors that broadcast) into uint32 values.

    Returns an int64 tensor with values in [0, 2**32) and the broadcast shape of the keys.
    Any change of any key changes the result; the order of the keys matters.
    """
    if device is None:
        device = next((k.device for k in keys if isinstance(k, torch.Tensor)), "cpu")
    h = torch.zeros((), dtype=torch.int64, device=device)
    for k in keys:
        k = torch.as_tensor(k, dtype=torch.int64, device=device) & _MASK32
        h = _fmix32((h ^ ((k + _GOLDEN + (h << 6) + (h >> 2)) & _MASK32)) & _MASK32)
    return h


def uniform(*keys: IntLike, device: Union[torch.device, str, None] = None) -> torch.Tensor:
    """Uniform floats in [0, 1) (float32, 24 random bits) from integer keys; see ``hash_keys``."""
    return (hash_keys(*keys, device=device) >> 8).to(torch.float32) * (1.0 / (1 << 24))

