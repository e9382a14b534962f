"""Distillation from several teachers with per-token prediction weighting: the math.

At every scored token n each of K teachers gives a distribution p_k (same vocabulary as the
student). A rule gives each teacher a weight w_kn (a distribution over teachers), the mixed
target is ``p_T = sum_k w_kn p_k``, and the student's per-token loss is

    alpha * CE(gold) + (1 - alpha) * T^2 * KL(p_T^(T) || softmax(s / T))

with p_k^(T) the teachers at temperature T (Hinton et al.'s T^2 keeps the gradient's scale).
Rules (Wahle, arXiv 2301.08130, leaves the exact weighting open; these are its candidates):

- ``uniform``: w_kn = prior_k (the configured static weights, 1/K by default);
- ``gold``: w_kn ∝ prior_k * p_k(gold)^(1/tau): trust the teachers that are right;
- ``confidence``: w_kn ∝ prior_k * exp(-H(p_k) / tau): trust the confident (low-entropy) ones;
- ``probability_shift``: uniform, then where the mix does not rank the gold token first, its
  probability and the top token's are swapped, so the target always ranks gold first.

The weights read the teachers at temperature 1 (a teacher's probability of gold is a property of
the teacher, not of the distillation temperature); the target is mixed at temperature T.
"""

from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F

RULES = ("uniform", "gold", "confidence", "probability_shift")


def _wide(x: torch.Tensor) -> torch.Tensor:
    """``x`` in at least float32 (float64 stays float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def prior_weights(weights: Optional[Sequence[float]], num_teachers: int) -> torch.Tensor:
    """The static teacher weights [K] (float64): ``weights`` checked, or uniform when None.

    ValueError for no teacher, a length other than K, a negative weight, or weights that do not
    sum to 1 (within 1e-6): they are a distribution over teachers.
    """
    if num_teachers < 1:
        raise ValueError(
            "distillation needs at least one teacher: list them under distillation.teachers "
            "(each with its model and checkpointer)"
        )
    if weights is None:
        return torch.full((num_teachers,), 1.0 / num_teachers, dtype=torch.float64)
    values = [float(w) for w in weights]
    if len(values) != num_teachers:
        raise ValueError(f"{len(values)} teacher weights for {num_teachers} teachers: give one per teacher")
    if any(w < 0 for w in values) or abs(sum(values) - 1.0) > 1e-6:
        raise ValueError(
            f"teacher weights {values} must be >= 0 and sum to 1 (a distribution over the "
            f"teachers; they sum to {sum(values):.6g}): e.g. {[round(1 / num_teachers, 4)] * num_teachers}"
        )
    return torch.tensor(values, dtype=torch.float64)


def teacher_weights(teacher_logprobs: torch.Tensor, gold: torch.Tensor, rule: str,
                    prior: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """Per-token weights of the teachers.

    teacher_logprobs: [K, N, V] log-probabilities at temperature 1; gold: [N] target ids;
    prior: [K] static weights (a distribution); tau > 0 sharpens (< 1) or flattens (> 1) the
    ``gold`` and ``confidence`` rules. Returns [K, N] (at least float32), each column summing to 1.
    """
    if rule not in RULES:
        raise ValueError(f"teacher weighting rule must be one of {list(RULES)}, got {rule!r}")
    if tau <= 0:
        raise ValueError(f"the weighting temperature must be > 0, got {tau}")
    lp = _wide(teacher_logprobs)
    log_prior = prior.to(lp.device, lp.dtype).log()[:, None]  # [K, 1]
    if rule in ("uniform", "probability_shift"):
        return log_prior.exp().expand(lp.shape[0], lp.shape[1]).contiguous()
    if rule == "gold":
        score = lp.gather(-1, gold[None, :, None].expand(lp.shape[0], -1, 1)).squeeze(-1)
    else:
        entropy = -(lp.exp() * lp.nan_to_num(neginf=0.0)).sum(-1)
        score = -entropy
    # finite floor: a gold token outside every teacher's top-k leaves the prior, not NaN
    score = score.clamp(min=-1e4) / tau
    return torch.softmax(log_prior + (score - score.max(dim=0).values), dim=0)


def mix_teachers(teacher_logprobs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """log p_T [N, V] of the mixture ``sum_k w_kn p_k`` ([K, N, V] log-probs, [K, N] weights)."""
    return torch.logsumexp(_wide(teacher_logprobs) + _wide(weights).log()[:, :, None], dim=0)


def shift_to_gold(logprobs: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
    """[N, V] log-probs with, in each row whose argmax is not ``gold``, the gold entry and the
    argmax entry swapped (the distribution is permuted, still normalised)."""
    top = logprobs.argmax(dim=-1)
    rows = torch.arange(logprobs.shape[0], device=logprobs.device)
    out = logprobs.clone()
    out[rows, gold] = logprobs[rows, top]
    out[rows, top] = logprobs[rows, gold]
    return out


def mixed_target(teacher_logits: torch.Tensor, gold: torch.Tensor, rule: str,
                 prior: torch.Tensor, temperature: float = 1.0,
                 tau: float = 1.0) -> "tuple[torch.Tensor, torch.Tensor]":
    """(log p_T [N, V] at ``temperature``, weights [K, N]) from teacher logits [K, N, V]."""
    z = _wide(teacher_logits)
    weights = teacher_weights(F.log_softmax(z, dim=-1), gold, rule, prior, tau)
    target = mix_teachers(F.log_softmax(z / temperature, dim=-1), weights)
    if rule == "probability_shift":
        target = shift_to_gold(target, gold)
    return target, weights


class TokenLosses(NamedTuple):
    """Per scored token: ce [N] (student cross-entropy of gold), kd [N] (T^2 KL(p_T || q_S)),
    weights [K, N] (each teacher's weight)."""

    ce: torch.Tensor
    kd: torch.Tensor
    weights: torch.Tensor


class _ChunkedDistillation(torch.autograd.Function):
    """Student logits [N, V] -> (ce [N], kd [N]), one chunk of tokens at a time.

    The teachers' fp32 distributions exist for one chunk only, in the forward and again in the
    backward (recomputed from the saved teacher logits, which are in their own dtype): nothing
    [K, N, V] or [N, V] in fp32 outlives a chunk.
    """

    @staticmethod
    def forward(ctx, student, teacher_logits, gold, prior, rule, temperature, tau, chunk_size):
        ctx.save_for_backward(student, teacher_logits, gold, prior)
        ctx.settings = (rule, temperature, tau, chunk_size)
        n, dtype = student.shape[0], _wide(student[:0]).dtype
        ce = student.new_zeros(n, dtype=dtype)
        kd = student.new_zeros(n, dtype=dtype)
        weights = student.new_zeros(teacher_logits.shape[0], n, dtype=dtype)
        for a in range(0, n, chunk_size):
            b = min(n, a + chunk_size)
            s = _wide(student[a:b])
            target, weights[:, a:b] = mixed_target(
                teacher_logits[:, a:b], gold[a:b], rule, prior, temperature, tau
            )
            ce[a:b] = F.cross_entropy(s, gold[a:b], reduction="none")
            log_q = F.log_softmax(s / temperature, dim=-1)
            p = target.exp()
            kd[a:b] = temperature ** 2 * (p * (target.nan_to_num(neginf=0.0) - log_q)).sum(-1)
        ctx.mark_non_differentiable(weights)
        return ce, kd, weights

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_ce, grad_kd, _grad_weights):
        student, teacher_logits, gold, prior = ctx.saved_tensors
        rule, temperature, tau, chunk_size = ctx.settings
        grad = torch.empty_like(student)
        for a in range(0, student.shape[0], chunk_size):
            b = min(student.shape[0], a + chunk_size)
            s = _wide(student[a:b])
            target, _ = mixed_target(teacher_logits[:, a:b], gold[a:b], rule, prior, temperature, tau)
            g_ce = torch.softmax(s, dim=-1)
            g_ce[torch.arange(b - a, device=s.device), gold[a:b]] -= 1.0
            # d/ds of T^2 KL(p || softmax(s / T)) = T (softmax(s / T) - p)
            g_kd = temperature * (torch.softmax(s / temperature, dim=-1) - target.exp())
            grad[a:b] = (grad_ce[a:b, None] * g_ce + grad_kd[a:b, None] * g_kd).to(grad.dtype)
        return grad, None, None, None, None, None, None, None


def distillation_token_losses(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                              gold: torch.Tensor, rule: str, prior: torch.Tensor, *,
                              temperature: float = 1.0, tau: float = 1.0,
                              chunk_size: int = 1024) -> TokenLosses:
    """The per-token distillation terms at the N scored tokens.

    student_logits: [N, V] (differentiable, any float dtype); teacher_logits: [K, N, V] (no
    gradient); gold: [N] target ids; prior: [K] static teacher weights. ``chunk_size`` tokens
    are processed at a time. The caller combines ``alpha * ce + (1 - alpha) * kd``.
    """
    if teacher_logits.dim() != 3 or teacher_logits.shape[1:] != student_logits.shape:
        raise ValueError(
            f"teacher logits {tuple(teacher_logits.shape)} do not match the student's "
            f"{tuple(student_logits.shape)} as [K, N, V]: every teacher must share the student's "
            "vocabulary and score the same tokens"
        )
    if temperature <= 0:
        raise ValueError(f"the distillation temperature must be > 0, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    ce, kd, weights = _ChunkedDistillation.apply(
        student_logits, teacher_logits.detach(), gold, prior.to(student_logits.device),
        rule, float(temperature), float(tau), int(chunk_size),
    )
    return TokenLosses(ce, kd, weights)


def top_k_logits(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Teacher logits [..., V] kept at their k largest entries, -inf elsewhere: the teacher's
    top-k distribution, renormalised over those k tokens (what a top-k store holds)."""
    if k < 1:
        raise ValueError(f"top_k must be >= 1, got {k}")
    if k >= logits.shape[-1]:
        return logits
    values, index = logits.topk(k, dim=-1)
    return torch.full_like(logits, float("-inf")).scatter(-1, index, values)
