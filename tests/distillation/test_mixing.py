"""Teacher weighting, mixing and the chunked distillation loss, against float64 hand loops."""

import math

import pytest
import torch

from comparative_recipe.distillation.mixing import (
    RULES,
    distillation_token_losses,
    mixed_target,
    prior_weights,
    shift_to_gold,
    teacher_weights,
    top_k_logits,
)


def softmax(row, t=1.0):
    m = max(x / t for x in row)
    e = [math.exp(x / t - m) for x in row]
    z = sum(e)
    return [v / z for v in e]


def hand_target(teachers, n, gold, rule, prior, temperature, tau):
    """(mixed target p_T as a list, weights) of token n, by hand."""
    k = len(teachers)
    probs1 = [softmax(teachers[i][n]) for i in range(k)]
    if rule in ("uniform", "probability_shift"):
        score = [1.0] * k
    elif rule == "gold":
        score = [probs1[i][gold] ** (1 / tau) for i in range(k)]
    else:
        score = [math.exp(sum(p * math.log(p) for p in probs1[i] if p > 0) / tau) for i in range(k)]
    w = [prior[i] * score[i] for i in range(k)]
    w = [x / sum(w) for x in w]
    probs_t = [softmax(teachers[i][n], temperature) for i in range(k)]
    target = [sum(w[i] * probs_t[i][v] for i in range(k)) for v in range(len(probs_t[0]))]
    if rule == "probability_shift":
        top = max(range(len(target)), key=lambda v: target[v])
        target[top], target[gold] = target[gold], target[top]
    return target, w


def hand_losses(student, teachers, gold, rule, prior, temperature, tau):
    ce, kd, weights = [], [], []
    for n in range(len(student)):
        target, w = hand_target(teachers, n, gold[n], rule, prior, temperature, tau)
        q1 = softmax(student[n])
        qt = softmax(student[n], temperature)
        ce.append(-math.log(q1[gold[n]]))
        kd.append(temperature ** 2 * sum(p * (math.log(p) - math.log(q)) for p, q in zip(target, qt) if p > 0))
        weights.append(w)
    return ce, kd, weights


def case(seed=0, k=3, n=7, v=11):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(n, v, generator=g, dtype=torch.float64) * 2
    teachers = torch.randn(k, n, v, generator=g, dtype=torch.float64) * 3
    gold = torch.randint(0, v, (n,), generator=g)
    return student, teachers, gold


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("temperature,tau", [(1.0, 1.0), (2.0, 0.5)])
@pytest.mark.parametrize("chunk_size", [1, 3, 100])
def test_losses_and_weights_equal_hand_loops(rule, temperature, tau, chunk_size):
    student, teachers, gold = case()
    prior = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    out = distillation_token_losses(student, teachers, gold, rule, prior,
                                    temperature=temperature, tau=tau, chunk_size=chunk_size)
    ce, kd, w = hand_losses(student.tolist(), teachers.tolist(), gold.tolist(), rule,
                            prior.tolist(), temperature, tau)
    torch.testing.assert_close(out.ce.double(), torch.tensor(ce, dtype=torch.float64), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.kd.double(), torch.tensor(kd, dtype=torch.float64), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.weights.double(), torch.tensor(w, dtype=torch.float64).T, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("chunk_size", [2, 100])
def test_gradient_equals_autograd_of_the_plain_formula(rule, chunk_size):
    student, teachers, gold = case(seed=1)
    prior = torch.tensor([0.2, 0.2, 0.6], dtype=torch.float64)
    temperature, alpha = 1.5, 0.3
    s1 = student.clone().requires_grad_(True)
    out = distillation_token_losses(s1, teachers, gold, rule, prior, temperature=temperature,
                                    chunk_size=chunk_size)
    coeff = torch.linspace(0.5, 1.5, student.shape[0], dtype=torch.float64)
    ((alpha * out.ce + (1 - alpha) * out.kd) * coeff).sum().backward()

    s2 = student.clone().requires_grad_(True)
    target, _ = mixed_target(teachers, gold, rule, prior, temperature)
    p = target.exp().double()
    ce = torch.nn.functional.cross_entropy(s2, gold, reduction="none")
    log_q = torch.log_softmax(s2 / temperature, dim=-1)
    kd = temperature ** 2 * (p * (torch.where(p > 0, p.log(), 0.0) - log_q)).sum(-1)
    ((alpha * ce + (1 - alpha) * kd) * coeff).sum().backward()
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-5, atol=1e-6)


def test_gradcheck():
    student, teachers, gold = case(seed=2, k=2, n=4, v=5)
    prior = torch.tensor([0.5, 0.5], dtype=torch.float64)
    s = student.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x: tuple(distillation_token_losses(x, teachers, gold, "gold", prior,
                                                  temperature=2.0, chunk_size=3)[:2]),
        (s,),
    )


def test_rules_by_hand_on_two_teachers():
    # teacher 0 is right and confident, teacher 1 wrong and flat
    logits = torch.tensor([[[4.0, 0.0, 0.0]], [[0.0, 0.1, 0.0]]])
    lp = torch.log_softmax(logits, dim=-1)
    gold = torch.tensor([0])
    prior = prior_weights(None, 2)
    w_gold = teacher_weights(lp, gold, "gold", prior)
    p0, p1 = lp[0, 0, 0].exp(), lp[1, 0, 0].exp()
    torch.testing.assert_close(w_gold[:, 0], torch.stack([p0, p1]) / (p0 + p1))
    assert teacher_weights(lp, gold, "confidence", prior)[0, 0] > 0.5
    torch.testing.assert_close(teacher_weights(lp, gold, "uniform", prior), torch.full((2, 1), 0.5))
    # tau -> small: the best teacher takes all the weight
    assert teacher_weights(lp, gold, "gold", prior, tau=0.01)[0, 0] > 0.999


def test_probability_shift_ranks_gold_first_and_keeps_the_mass():
    g = torch.Generator().manual_seed(3)
    lp = torch.log_softmax(torch.randn(50, 9, generator=g) * 3, dim=-1)
    gold = torch.randint(0, 9, (50,), generator=g)
    shifted = shift_to_gold(lp, gold)
    assert bool((shifted.argmax(-1) == gold).all())
    torch.testing.assert_close(shifted.exp().sum(-1), torch.ones(50))
    torch.testing.assert_close(shifted.sort(-1).values, lp.sort(-1).values)
    already = lp.argmax(-1) == gold
    torch.testing.assert_close(shifted[already], lp[already])


def test_top_k_keeps_k_entries_and_renormalises():
    z = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    kept = top_k_logits(z, 2)
    p = torch.softmax(kept, dim=-1)
    e3, e2 = math.exp(3.0), math.exp(2.0)
    torch.testing.assert_close(p, torch.tensor([[0.0, e3 / (e3 + e2), e2 / (e3 + e2), 0.0]]))
    assert top_k_logits(z, 4) is z


def test_gold_outside_every_top_k_falls_back_to_the_prior():
    z = top_k_logits(torch.tensor([[[5.0, 1.0, 0.0]], [[4.0, 2.0, 0.0]]]), 1)
    gold = torch.tensor([2])
    w = teacher_weights(torch.log_softmax(z, -1), gold, "gold", prior_weights([0.7, 0.3], 2))
    torch.testing.assert_close(w[:, 0], torch.tensor([0.7, 0.3]))
    student = torch.zeros(1, 3, requires_grad=True)
    out = distillation_token_losses(student, z, gold, "gold", prior_weights(None, 2))
    out.kd.sum().backward()
    assert torch.isfinite(out.kd).all() and torch.isfinite(student.grad).all()


def test_bfloat16_student_gets_a_bfloat16_gradient_close_to_fp32():
    student, teachers, gold = case(seed=4)
    prior = prior_weights(None, 3)
    s16 = student.to(torch.bfloat16).requires_grad_(True)
    out = distillation_token_losses(s16, teachers.to(torch.bfloat16), gold, "confidence", prior)
    out.kd.sum().backward()
    assert s16.grad.dtype == torch.bfloat16 and out.kd.dtype == torch.float32
    s32 = student.to(torch.bfloat16).float().requires_grad_(True)
    ref = distillation_token_losses(s32, teachers.to(torch.bfloat16).float(), gold, "confidence", prior)
    ref.kd.sum().backward()
    torch.testing.assert_close(s16.grad.float(), s32.grad, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("weights,k,message", [
    (None, 0, "at least one teacher"),
    ([0.5, 0.6], 2, "sum to 1"),
    ([1.2, -0.2], 2, ">= 0"),
    ([1.0], 2, "one per teacher"),
])
def test_prior_weight_errors(weights, k, message):
    with pytest.raises(ValueError, match=message):
        prior_weights(weights, k)


def test_input_errors():
    student, teachers, gold = case()
    prior = prior_weights(None, 3)
    with pytest.raises(ValueError, match="share the student's vocabulary"):
        distillation_token_losses(student, teachers[:, :, :5], gold, "uniform", prior)
    with pytest.raises(ValueError, match="rule must be one of"):
        distillation_token_losses(student, teachers, gold, "best", prior)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        distillation_token_losses(student, teachers, gold, "uniform", prior, temperature=0.0)
