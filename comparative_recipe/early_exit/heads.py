"""The halting heads of early exit: one per decoder layer but the last, all in one module.

Head n (n = 1..L-1) reads the answer position's output of layer n and of layer n-1 (zeros for
n = 1), each RMS-normalised without weights (decoder states grow with depth; the heads should
see their direction, not their scale), concatenated to [2D], and gives lambda_n in (0, 1):
``depth`` blocks of Linear + Tanh of width ``hidden_dim`` then Linear -> 1 and a sigmoid
(``kind: mlp``, PALBERT's "Lambda layer"), or a single Linear -> 1 (``kind: linear``).

The heads' weights are stacked over layers ([L-1, in, out]), so that every layer's head runs in
one batched matmul per training step (one call of the module: one FSDP all-gather when it is
sharded); ``layer_lambda`` runs one head alone for the layer-by-layer inference.
"""

import math
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from comparative_recipe import checks

HEAD_KINDS = ("mlp", "linear")


@dataclass(frozen=True)
class HaltingHeadSettings:
    """The ``early_exit.halting`` section: ``kind`` (mlp | linear), ``depth`` (Linear + Tanh
    blocks of an mlp head, >= 1; PALBERT's is 3) and ``hidden_dim`` (their width)."""

    kind: str = "mlp"
    depth: int = 3
    hidden_dim: int = 128

    def __post_init__(self) -> None:
        checks.choice(self.kind, HEAD_KINDS, "early_exit.halting.kind")
        checks.positive_int(self.depth, "early_exit.halting.depth")
        checks.positive_int(self.hidden_dim, "early_exit.halting.hidden_dim")

    def dims(self, embed_dim: int) -> List[int]:
        """Widths from input to output: [2D, hidden_dim x depth, 1] (mlp) or [2D, 1]."""
        inner = [self.hidden_dim] * self.depth if self.kind == "mlp" else []
        return [2 * embed_dim, *inner, 1]


def _normalised(h: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return F.rms_norm(h.float(), (h.shape[-1],), eps=1e-6).to(dtype)


class HaltingHeads(nn.Module):
    """Halting heads of layers 1..L-1 of a decoder with ``num_layers`` layers of width
    ``embed_dim``.

    ``forward(states)``: states [L-1, B, D] (the answer position's output of every layer but the
    last) -> lambdas [B, L-1]. ``layer_lambda(n, state, previous)``: [A, D], [A, D] or None ->
    [A], head n alone.

    Initialisation (``seed``): every weight and bias uniform in +-1/sqrt(fan_in) like
    ``nn.Linear``, except the output bias, logit(``initial_lambda``), so that training starts
    near the prior's exit distribution.
    """

    def __init__(self, num_layers: int, embed_dim: int, settings: HaltingHeadSettings,
                 seed: int = 0, initial_lambda: float = 0.1) -> None:
        super().__init__()
        if num_layers < 2:
            raise ValueError(
                f"early exit needs a model of at least 2 layers (this one has {num_layers}): "
                "with one layer there is nothing to exit from"
            )
        self.num_layers, self.embed_dim, self.settings = num_layers, embed_dim, settings
        dims = settings.dims(embed_dim)
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        generator = torch.Generator().manual_seed(int(seed))
        n = num_layers - 1
        dtype = torch.get_default_dtype()
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            bound = 1.0 / math.sqrt(d_in)
            w = (torch.rand(n, d_in, d_out, generator=generator) * 2 - 1) * bound
            b = (torch.rand(n, 1, d_out, generator=generator) * 2 - 1) * bound
            if i == len(dims) - 2:
                b.fill_(math.log(initial_lambda / (1.0 - initial_lambda)))
            self.weights.append(nn.Parameter(w.to(dtype)))
            self.biases.append(nn.Parameter(b.to(dtype)))

    def _inputs(self, state: torch.Tensor, previous: Optional[torch.Tensor]) -> torch.Tensor:
        dtype = self.weights[0].dtype
        state = _normalised(state, dtype)
        previous = torch.zeros_like(state) if previous is None else _normalised(previous, dtype)
        return torch.cat([state, previous], dim=-1)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        if states.dim() != 3 or states.shape[0] != self.num_layers - 1 or \
                states.shape[-1] != self.embed_dim:
            raise ValueError(
                f"halting heads of {self.num_layers} layers x {self.embed_dim} got states of "
                f"shape {tuple(states.shape)}; expected [{self.num_layers - 1}, B, {self.embed_dim}]"
            )
        dtype = self.weights[0].dtype
        x = _normalised(states, dtype)
        x = torch.cat([x, torch.cat([torch.zeros_like(x[:1]), x[:-1]], dim=0)], dim=-1)
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            x = torch.baddbmm(b, x, w)
            if i < last:
                x = torch.tanh(x)
        return torch.sigmoid(x.float().squeeze(-1)).transpose(0, 1)  # [B, L-1]

    def layer_lambda(self, n: int, state: torch.Tensor,
                     previous: Optional[torch.Tensor]) -> torch.Tensor:
        """lambda_n of head n (1 <= n < L) for [A, D] states -> [A] float32."""
        if not 1 <= n < self.num_layers:
            raise ValueError(f"layer {n} has no halting head (heads are 1..{self.num_layers - 1})")
        x = self._inputs(state, previous)
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            x = torch.addmm(b[n - 1], x, w[n - 1])
            if i < last:
                x = torch.tanh(x)
        return torch.sigmoid(x.float().squeeze(-1))
