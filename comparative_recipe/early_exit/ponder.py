"""The PonderNet objective and the exit rules of early exit, as pure tensor functions.

Layers are counted from 1 to L: "exit at layer n" means that layers 1..n ran and the task head
read layer n's output. A halting head gives lambda_n in (0, 1) for n = 1..L-1; the last layer
always halts (lambda_L = 1), so the exit distribution is

    p_n = lambda_n * prod_{j<n} (1 - lambda_j)        (n < L),   p_L = prod_{j<L} (1 - lambda_j)

and sums to 1 (Banino et al., PonderNet, 2021; Balagansky & Gavrilov, PALBERT, 2022).
Everything here is computed in float32 whatever the input dtype.
"""

from dataclasses import dataclass

import torch

# KL(p_G || p): the PALBERT reference code's direction; KL(p || p_G): PonderNet's paper.
KL_DIRECTIONS = ("prior_to_exit", "exit_to_prior")


def exit_distribution(lambdas: torch.Tensor) -> torch.Tensor:
    """[B, L-1] halting probabilities -> [B, L] exit distribution p (rows sum to 1)."""
    lam = lambdas.float()
    reach = torch.cumprod(1.0 - lam, dim=-1)  # prod_{j<=n} (1 - lambda_j)
    ones = lam.new_ones(lam.shape[:-1] + (1,))
    return torch.cat([ones, reach], dim=-1) * torch.cat([lam, ones], dim=-1)


def floor_exit_distribution(p: torch.Tensor, eps: float) -> torch.Tensor:
    """The training-time floor of PALBERT: once the mass of the layers before layer n reaches
    ``1 - eps``, layer n gets the constant ``eps / L`` (no gradient) instead of its vanishing
    p_n, so that log p stays finite in the KL and every layer keeps a little task-loss weight.

    p: [B, L]. ``eps = 0`` returns p unchanged (up to the layers with exactly zero mass)."""
    before = p.cumsum(dim=-1) - p
    return torch.where(before >= 1.0 - eps, torch.full_like(p, eps / p.shape[-1]), p)


def truncated_geometric_prior(num_layers: int, lambda_p: float) -> torch.Tensor:
    """[L] prior p_G(n) = lambda_p (1 - lambda_p)^(n-1) for n < L; layer L takes the rest."""
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    n = torch.arange(num_layers, dtype=torch.float64)
    prior = lambda_p * (1.0 - lambda_p) ** n
    prior[-1] = (1.0 - lambda_p) ** (num_layers - 1)
    return prior.float()


def kl_to_prior(p: torch.Tensor, prior: torch.Tensor, direction: str) -> torch.Tensor:
    """[B, L] exit distributions, [L] prior -> [B] KL divergence per row.

    ``prior_to_exit``: KL(p_G || p) = sum_n p_G(n) log(p_G(n) / p_n);
    ``exit_to_prior``: KL(p || p_G) = sum_n p_n log(p_n / p_G(n)) (0 log 0 = 0)."""
    p = p.float()
    prior = prior.to(device=p.device, dtype=torch.float32).expand_as(p)
    tiny = torch.finfo(torch.float32).tiny
    if direction == "prior_to_exit":
        return (prior * (prior.log() - p.clamp(min=tiny).log())).sum(dim=-1)
    if direction == "exit_to_prior":
        return (torch.xlogy(p, p) - p * prior.log()).sum(dim=-1)
    raise ValueError(f"kl direction must be one of {KL_DIRECTIONS}, got {direction!r}")


@dataclass
class PonderTerms:
    """Per-row parts of the PonderNet loss, [B] each: ``loss = task + beta * kl``."""

    loss: torch.Tensor
    task: torch.Tensor
    kl: torch.Tensor


def ponder_loss(layer_losses: torch.Tensor, p: torch.Tensor, prior: torch.Tensor, beta: float,
                direction: str = "prior_to_exit") -> PonderTerms:
    """The PonderNet objective per row: ``sum_n p_n * L_n + beta * KL``.

    layer_losses: [B, L] task loss of each row read out at every layer; p: [B, L] exit
    distribution (floored or not, as the caller trains); prior: [L]."""
    task = (p.float() * layer_losses.float()).sum(dim=-1)
    kl = kl_to_prior(p, prior, direction)
    return PonderTerms(loss=task + beta * kl, task=task, kl=kl)


def layer_weighted_loss(layer_losses: torch.Tensor) -> torch.Tensor:
    """PABEE's training objective per row: ``sum_n n L_n / sum_n n`` (deeper layers weigh
    more; Zhou et al., 2020). layer_losses: [B, L] -> [B]."""
    n = torch.arange(1, layer_losses.shape[-1] + 1, device=layer_losses.device,
                     dtype=torch.float32)
    return (layer_losses.float() * n).sum(dim=-1) / n.sum()


def expected_layers(p: torch.Tensor) -> torch.Tensor:
    """[B, L] exit distribution -> [B] expected exit layer sum_n n p_n."""
    n = torch.arange(1, p.shape[-1] + 1, device=p.device, dtype=torch.float32)
    return (p.float() * n).sum(dim=-1)


# ---------------------------------------------------------------------------- exit rules
# Each takes what is known of every layer and returns the exit layer of every row, [B] long in
# 1..L. The layer-by-layer inference (``early_exit.inference``) takes the same decisions while
# the later layers have not run; these whole-depth forms are its reference and what validation
# during training uses.


def q_exit_layers(p: torch.Tensor, q: float) -> torch.Tensor:
    """Q-exit: the first layer where the cumulative exit probability exceeds ``q``.

    p: [B, L] (the exact distribution; the last layer catches what never crosses)."""
    crossed = p.float().cumsum(dim=-1) > q
    crossed[..., -1] = True
    return crossed.int().argmax(dim=-1) + 1


def sample_exit_layers(lambdas: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """PonderNet's sampling: exit at the first layer n with u_n < lambda_n, else at L.

    lambdas, uniforms: [B, L-1] (uniforms in [0, 1), one per row and layer)."""
    halts = uniforms < lambdas.float()
    full = torch.ones(halts.shape[:-1] + (1,), dtype=torch.bool, device=halts.device)
    return torch.cat([halts, full], dim=-1).int().argmax(dim=-1) + 1


def patience_exit_layers(unchanged: torch.Tensor, patience: int) -> torch.Tensor:
    """PABEE: exit at the first layer whose prediction equals that of the ``patience`` layers
    before it, else at L.

    unchanged: [B, L-1] bool, entry n-1 (n = 1..L-1) tells whether layer n+1 predicts what
    layer n predicts."""
    count = torch.zeros(unchanged.shape[:-1], dtype=torch.long, device=unchanged.device)
    exit_layer = torch.full_like(count, unchanged.shape[-1] + 1)
    for n in range(unchanged.shape[-1]):
        count = torch.where(unchanged[..., n], count + 1, torch.zeros_like(count))
        exit_layer = torch.where((count >= patience) & (exit_layer > n + 2),
                                 torch.full_like(count, n + 2), exit_layer)
    return exit_layer


def exit_histogram(exit_layers: torch.Tensor, num_layers: int) -> torch.Tensor:
    """[B] exit layers in 1..L -> [L] float32 counts of rows exiting at each layer."""
    return torch.bincount(exit_layers - 1, minlength=num_layers).float()
