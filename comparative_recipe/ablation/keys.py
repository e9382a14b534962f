"""Counter-based random numbers: a pure function of integer keys, identical on every device.

Ablation masks and crop orders must be reproducible from (seed, step, sample id, pass, site)
alone: the same sample gets the same masks in any batch row, on any rank, after a resume, and in
an activation-checkpointing recompute. A stateful generator cannot promise that; a hash can.

The hash is murmur3's 32-bit finaliser with a boost-style key combine, computed in int32 tensors
that wrap modulo 2**32 (bit-identical on CPU and CUDA): ``hash32`` mixes keys into words,
``pair_mix32`` is the cheap last round that hidden element masks spend per (row, token, unit),
and ``hash_keys`` / ``uniform`` give the words as non-negative int64 or as floats in [0, 1).
"""

from typing import Union

import torch

_MASK32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9

IntLike = Union[int, torch.Tensor]


# ----------------------------------------------------------------------------------------------
# 32-bit hash in int32 arithmetic (hidden masks)
# ----------------------------------------------------------------------------------------------
# The same murmur3 finaliser, computed in int32 tensors that wrap modulo 2**32 (as two's
# complement int32 arithmetic does on CPU and CUDA; tests/ablation/test_hidden.py compares it
# with a pure-Python reference). An int32 value h stands for the 32-bit word h mod 2**32; right
# shifts are made logical by masking off the sign extension.


def _signed32(c: int) -> int:
    c &= _MASK32
    return c - (1 << 32) if c >= 1 << 31 else c


MIX_M1 = _signed32(0x85EBCA6B)
MIX_M2 = _signed32(0xC2B2AE35)
_GOLDEN32 = _signed32(_GOLDEN)


def to_int32(k: IntLike, device: Union[torch.device, str, None] = None) -> torch.Tensor:
    """``k`` modulo 2**32 as int32 (the two's-complement view of its low 32 bits)."""
    k = torch.as_tensor(k, dtype=torch.int64, device=device)
    low = k & _MASK32
    return (low - ((low >> 31) << 32)).to(torch.int32)


def shr32(h: torch.Tensor, n: int) -> torch.Tensor:
    """Logical right shift of int32 words by ``n`` in [1, 31]."""
    return (h >> n) & ((1 << (32 - n)) - 1)


def mix32(h: torch.Tensor) -> torch.Tensor:
    """murmur3's fmix32 on int32 words: a bijection of 32-bit words with full avalanche."""
    h = h ^ shr32(h, 16)
    h = h * MIX_M1
    h = h ^ shr32(h, 13)
    h = h * MIX_M2
    return h ^ shr32(h, 16)


def combine32(h: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Folds key word ``k`` into hash word ``h`` (both int32, broadcasting): one full mix."""
    return mix32(h ^ (k + _GOLDEN32 + (h << 6) + shr32(h, 2)))


def hash32(*keys: IntLike, device: Union[torch.device, str, None] = None) -> torch.Tensor:
    """Mixes integer keys (python ints or int tensors that broadcast, each taken modulo 2**32)
    into int32 hash words of the broadcast shape; the order of the keys matters."""
    if device is None:
        device = next((k.device for k in keys if isinstance(k, torch.Tensor)), "cpu")
    h = torch.zeros((), dtype=torch.int32, device=device)
    for k in keys:
        k = k if isinstance(k, torch.Tensor) and k.dtype == torch.int32 else to_int32(k, device)
        h = combine32(h, k.to(device))
    return h


def pair_mix32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The cheap last round over the broadcast of two hash words ``a`` and ``b`` (int32):
    xor, multiply, xor-shift, multiply. Both inputs must already be well mixed (outputs of
    ``hash32``); the result's high bits depend on every bit of both."""
    h = (a ^ b) * MIX_M1
    h = h ^ shr32(h, 16)
    return h * MIX_M2


def hash_keys(*keys: IntLike, device: Union[torch.device, str, None] = None) -> torch.Tensor:
    """``hash32`` of the keys as int64 values in [0, 2**32), of the keys' broadcast shape."""
    return hash32(*keys, device=device).to(torch.int64) & _MASK32


def uniform(*keys: IntLike, device: Union[torch.device, str, None] = None) -> torch.Tensor:
    """Uniform floats in [0, 1) (float32, 24 random bits) from integer keys; see ``hash32``."""
    return (hash_keys(*keys, device=device) >> 8).to(torch.float32) * (1.0 / (1 << 24))
