"""Named sums: what a training step hands the loop, added over micro-batches and ranks.

A method's step returns ``Sums``: named tensors (0-d, 1-d such as one entry per pass, or more,
such as per pass and class) that are plain sums over samples, so they add up exactly over micro-batches and ranks. The loop packs
them into one float64 vector for a single all-reduce and a single host transfer, and reads the
gradient normaliser by name.
"""

from typing import Callable, Dict, Iterable, List, Mapping, Union

import torch

HostValue = Union[float, List]


class Sums:
    """An ordered mapping name -> tensor of sums; ``a + b`` adds entry by entry.

    Both operands of ``+`` must have the same names and shapes (the same method built them).
    """

    def __init__(self, values: Mapping[str, torch.Tensor]):
        self.values: Dict[str, torch.Tensor] = {}
        for name, value in values.items():
            self.values[name] = torch.as_tensor(value).detach()

    def __getitem__(self, name: str) -> torch.Tensor:
        try:
            return self.values[name]
        except KeyError:
            raise KeyError(f"no sum named {name!r}; the step computed {list(self.values)}") from None

    def __contains__(self, name: str) -> bool:
        return name in self.values

    def __add__(self, other: "Sums") -> "Sums":
        if list(other.values) != list(self.values):
            raise ValueError(
                f"cannot add sums with names {list(other.values)} to {list(self.values)}"
            )
        return Sums({k: v + other.values[k].to(v.device) for k, v in self.values.items()})

    @staticmethod
    def total(parts: Iterable["Sums"]) -> "Sums":
        parts = list(parts)
        if not parts:
            raise ValueError("no sums to add")
        out = parts[0]
        for p in parts[1:]:
            out = out + p
        return out

    def pack(self) -> torch.Tensor:
        """All entries as one float64 vector (the layout ``unpack`` reverses)."""
        return torch.cat([v.reshape(-1).to(torch.float64) for v in self.values.values()])

    def unpack(self, flat: torch.Tensor) -> "Sums":
        """Sums with this object's names and shapes, read from ``flat`` (as ``pack`` wrote)."""
        out, offset = {}, 0
        for name, v in self.values.items():
            n = v.numel()
            out[name] = flat[offset: offset + n].reshape(v.shape)
            offset += n
        if offset != flat.numel():
            raise ValueError(f"expected {offset} packed values, got {flat.numel()}")
        return Sums(out)

    def reduced(self, all_reduce_sum: Callable[[torch.Tensor], torch.Tensor]) -> "Sums":
        """The sums over all ranks, through one all-reduce of the packed vector."""
        return self.unpack(all_reduce_sum(self.pack()))

    def to_host(self) -> Dict[str, HostValue]:
        """Python numbers (nested lists for entries with dimensions), with one device-to-host
        transfer."""
        flat = self.pack().cpu()
        out, offset = {}, 0
        for name, v in self.values.items():
            n = v.numel()
            out[name] = flat[offset: offset + n].reshape(v.shape).tolist()
            offset += n
        return out
