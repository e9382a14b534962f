"""Cross-model comparative loss (Zhu et al., arXiv 2301.03765) on per-sample task losses.

Every function takes ``losses`` of shape [B, 1+c]: column 0 is the task loss of the full model,
columns 1..c those of increasingly ablated models. The loss asks that less-ablated models have
lower task loss, and returns one value per sample, shape [B]; the caller averages over the batch.

A detached "dummy" baseline b is ranked last, after the most ablated model:
  ultra: b = 0 (every task loss is pushed down directly)
  best:  b = min_k l_k
  first: m = min_{k>=1} l_k; b = (l_0 + m) / 2 if l_0 < m else m
With c = 0 there is nothing to rank the full model against: every baseline is b = 0 and
``ComparativeLoss`` is plain fine-tuning (the loss is l_0) in every mode.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from comparative_recipe import checks

MODES = ("pairwise", "listmle", "regulariser")
BASELINES = ("ultra", "first", "best")
PRIMARIES = ("max", "avg", "first")


def _check_losses(losses: torch.Tensor) -> None:
    """Raises ValueError unless losses is a floating [B, 1+c] tensor."""
    if not isinstance(losses, torch.Tensor):
        raise ValueError(f"losses must be a torch.Tensor of shape [B, 1+c], got {type(losses)}")
    if losses.dim() != 2 or losses.size(1) < 1:
        raise ValueError(
            f"losses must have shape [B, 1+c] with at least one column (the full model), "
            f"got shape {tuple(losses.shape)}"
        )
    if not losses.is_floating_point():
        raise ValueError(f"losses must be a floating-point tensor, got dtype {losses.dtype}")


def pairs(n: int) -> int:
    """C(n, 2), the number of unordered pairs among n items."""
    return n * (n - 1) // 2


def baseline_loss(losses: torch.Tensor, baseline: str = "ultra") -> torch.Tensor:
    """The dummy's loss b, shape [B], detached (no gradient ever flows through it).

    With c = 0 (one column) every baseline is 0: ``best`` would otherwise make the loss and its
    gradient identically zero, and ``first`` has no ablated model to compare with.
    """
    checks.choice(baseline, BASELINES, "baseline")
    _check_losses(losses)
    l = losses.detach()
    if baseline == "ultra" or l.size(1) == 1:
        return torch.zeros_like(l[:, 0])
    if baseline == "best":
        return l.amin(dim=1)
    l0, m = l[:, 0], l[:, 1:].amin(dim=1)
    return torch.where(l0 < m, (l0 + m) / 2, m)


def pairwise_hinge(losses: torch.Tensor) -> torch.Tensor:
    """sum over i < j of relu(l_i - l_j): [B, n] -> [B]. Zero when n = 1."""
    i, j = torch.triu_indices(losses.size(1), losses.size(1), offset=1, device=losses.device)
    return F.relu(losses[:, i] - losses[:, j]).sum(dim=1)


def comparative_loss(
    losses: torch.Tensor, baseline: str = "ultra", temperature: float = 1.0
) -> torch.Tensor:
    """Pairwise comparative loss: [B, 1+c] -> [B].

    The hinges over all ordered pairs of the 1+c models and the dummy (appended last), divided
    by T * C(c+2, 2). With c = 0 and ``ultra`` it is exactly l_0, i.e. plain fine-tuning.
    """
    checks.finite_number(temperature, "temperature")
    b = baseline_loss(losses, baseline)
    ranked = torch.cat([losses, b[:, None]], dim=1)
    return pairwise_hinge(ranked) / (temperature * pairs(ranked.size(1)))


def listmle_loss(
    losses: torch.Tensor, baseline: str = "ultra", temperature: float = 1.0
) -> torch.Tensor:
    """Plackett-Luce negative log-likelihood of full > ablated_1 > ... > ablated_c > dummy.

    [B, 1+c] -> [B]. Scores are s_k = -l_k / T (the dummy's is -b / T); the result is
    sum_{k=0..c} [logsumexp(s_k, ..., s_{c+1}) - s_k]. Not normalised by the number of models.
    """
    checks.finite_number(temperature, "temperature")
    b = baseline_loss(losses, baseline)
    s = -torch.cat([losses, b[:, None]], dim=1) / temperature
    # tail_lse[:, k] = logsumexp(s[:, k:]), computed stably from the end of the list
    tail_lse = torch.logcumsumexp(s.flip(1), dim=1).flip(1)
    return (tail_lse[:, :-1] - s[:, :-1]).sum(dim=1)


def regularised_loss(
    losses: torch.Tensor, primary: str = "max", weight: float = 1.0, temperature: float = 1.0
) -> torch.Tensor:
    """Primary task loss plus a comparative regulariser: [B, 1+c] -> [B].

    primary is the max, mean, or full model's (``first``) of the 1+c losses; the regulariser is
    the pairwise hinge over the 1+c models (no dummy) divided by T * C(c+1, 2), 0 when c = 0.
    """
    checks.choice(primary, PRIMARIES, "primary")
    checks.finite_number(temperature, "temperature")
    checks.finite_number(weight, "weight", allow_zero=True)
    _check_losses(losses)
    if primary == "max":
        main = losses.amax(dim=1)  # ties share the gradient equally
    elif primary == "avg":
        main = losses.mean(dim=1)
    else:
        main = losses[:, 0]
    n = losses.size(1)
    if n == 1:
        return main
    return main + weight * pairwise_hinge(losses) / (temperature * pairs(n))


def ultra_pass_weights(losses: torch.Tensor) -> torch.Tensor:
    """d comparative_loss / d l_k for baseline ``ultra``, T = 1, in closed form: [B, 1+c] -> same.

    w_k = (1 + #{j > k: l_k > l_j} - #{i < k: l_i > l_k}) / C(c+2, 2). The leading 1 is the
    dummy term relu(l_k - 0), so this assumes l_k > 0 (true of cross-entropy short of a
    perfect prediction). Ties count as no violation, as relu'(0) = 0 does in autograd.
    """
    _check_losses(losses)
    l = losses.detach()
    n = l.size(1)
    beats = (l[:, :, None] > l[:, None, :]).to(l.dtype)  # beats[b, k, j] = l_k > l_j
    later = torch.ones(n, n, dtype=torch.bool, device=l.device).triu(diagonal=1)  # j > k
    above = (beats * later).sum(dim=2)  # k loses to a more ablated model j: push l_k down
    below = (beats * later).sum(dim=1)  # a less ablated model i loses to k: push l_k up
    return (1 + above - below) / pairs(n + 1)


@torch.no_grad()
def violation_rate(losses: torch.Tensor) -> torch.Tensor:
    """Fraction of the C(c+1, 2) pairs i < j with l_j < l_i strictly: [B, 1+c] -> [B].

    A violation is a more ablated model beating a less ablated one. 0 when c = 0.
    """
    _check_losses(losses)
    n = losses.size(1)
    if n == 1:
        return torch.zeros_like(losses[:, 0])
    i, j = torch.triu_indices(n, n, offset=1, device=losses.device)
    return (losses[:, j] < losses[:, i]).to(losses.dtype).mean(dim=1)


class ComparativeLoss(nn.Module):
    """The comparative loss as a config component: per-sample task losses [B, 1+c] -> [B].

    mode: ``pairwise`` (the paper's loss), ``listmle`` (Plackett-Luce), or ``regulariser``
    (primary + weight * pairwise hinge; ``baseline`` is unused there). ``primary`` and
    ``weight`` are used by ``regulariser`` only; ``temperature`` by every mode.
    """

    def __init__(
        self,
        mode: str = "pairwise",
        baseline: str = "ultra",
        temperature: float = 1.0,
        primary: str = "max",
        weight: float = 1.0,
    ):
        super().__init__()
        checks.choice(mode, MODES, "mode")
        checks.choice(baseline, BASELINES, "baseline")
        checks.choice(primary, PRIMARIES, "primary")
        checks.finite_number(temperature, "temperature")
        checks.finite_number(weight, "weight", allow_zero=True)
        self.mode = mode
        self.baseline = baseline
        self.temperature = float(temperature)
        self.primary = primary
        self.weight = float(weight)

    def forward(self, losses: torch.Tensor) -> torch.Tensor:
        """Per-sample comparative losses, [B, 1+c] -> [B]; l_0 itself when c = 0."""
        _check_losses(losses)
        if losses.size(1) == 1:
            return losses[:, 0]
        if self.mode == "pairwise":
            return comparative_loss(losses, self.baseline, self.temperature)
        if self.mode == "listmle":
            return listmle_loss(losses, self.baseline, self.temperature)
        return regularised_loss(losses, self.primary, self.weight, self.temperature)

    def pass_weights(self, losses: torch.Tensor) -> torch.Tensor:
        """w[b, k] = d forward(losses)[b] / d losses[b, k] at these values: [B, 1+c] -> same.

        By the chain rule, sum_k w_k * grad(l_k) is the exact gradient of the per-sample loss,
        so the 1+c passes can be run without grad, weighted, and back-propagated one at a time.
        Works under torch.no_grad() and torch.inference_mode().
        """
        _check_losses(losses)
        # inference_mode(False) is a no-op outside inference mode; inside, it lets us build a graph
        with torch.inference_mode(False), torch.enable_grad():
            x = losses.detach().clone().requires_grad_(True)
            # samples are independent, so the gradient of the sum is the per-sample derivative
            (w,) = torch.autograd.grad(self.forward(x).sum(), x)
        return w

    def extra_repr(self) -> str:
        if self.mode == "regulariser":
            return (f"mode={self.mode}, primary={self.primary}, weight={self.weight}, "
                    f"temperature={self.temperature}")
        return f"mode={self.mode}, baseline={self.baseline}, temperature={self.temperature}"
