import math

import pytest
import torch

from comparative_recipe.loss import (
    ComparativeLoss,
    comparative_loss,
    listmle_loss,
    regularised_loss,
    ultra_pass_weights,
    violation_rate,
)

F64 = torch.float64


def t(*rows):
    return torch.tensor(rows, dtype=F64)


def distinct_losses(b, n, seed=0):
    """Positive losses with no ties within a row, so every hinge is away from its kink."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, n, generator=g, dtype=F64).argsort(dim=1).to(F64) * 0.37 + 0.1 + \
        torch.rand(b, n, generator=g, dtype=F64) * 0.05


def autograd_per_sample(fn, losses):
    """d fn(losses)[b] / d losses[b, k], one sample at a time (no assumption of independence)."""
    rows = []
    for b in range(losses.size(0)):
        x = losses.detach().clone().requires_grad_(True)
        (g,) = torch.autograd.grad(fn(x)[b], x)
        assert torch.all(g[torch.arange(losses.size(0)) != b] == 0)
        rows.append(g[b])
    return torch.stack(rows)


# ---------------------------------------------------------------- pairwise values


def test_c1_ultra_matches_closed_form():
    for l0, l1 in [(0.5, 2.0), (2.0, 0.5), (1.0, 1.0), (0.0, 3.0), (3.0, 0.0)]:
        want = (l0 + l1) / 3 if l0 <= l1 else 2 * l0 / 3
        assert comparative_loss(t([l0, l1])).item() == pytest.approx(want)


def test_c2_ultra_by_hand():
    # l = [3, 1, 2]: pairs (0,1) relu(3-1)=2, (0,2) relu(3-2)=1, (1,2) relu(1-2)=0 -> 3;
    # dummy b=0: 3+1+2 = 6; total 9 / C(4,2)=6 -> 1.5
    # l = [1, 3, 2]: pairs 0 + 0 + relu(3-2)=1; dummy 6; total 7 / 6
    got = comparative_loss(t([3.0, 1.0, 2.0], [1.0, 3.0, 2.0]))
    torch.testing.assert_close(got, t(1.5, 7 / 6))


def test_first_baseline_by_hand():
    # [1, 3, 2]: m = 2, l0 = 1 < m -> b = 1.5; pairs 1; dummy 0 + 1.5 + 0.5 = 2 -> 3/6
    # [3, 1, 2]: m = 1, l0 >= m -> b = 1; pairs 3; dummy 2 + 0 + 1 = 3 -> 6/6
    # c=1, [1, 2]: b = 1.5; pairs 0; dummy 0 + 0.5 -> 0.5/3.  [2, 1]: b = 1; 1 + 1 -> 2/3
    got = comparative_loss(t([1.0, 3.0, 2.0], [3.0, 1.0, 2.0]), baseline="first")
    torch.testing.assert_close(got, t(0.5, 1.0))
    got = comparative_loss(t([1.0, 2.0], [2.0, 1.0]), baseline="first")
    torch.testing.assert_close(got, t(0.5 / 3, 2 / 3))


def test_best_baseline_by_hand():
    # [1, 3, 2]: b = 1; pairs 1; dummy 0 + 2 + 1 = 3 -> 4/6
    # [3, 1, 2]: b = 1; pairs 3; dummy 2 + 0 + 1 = 3 -> 6/6
    got = comparative_loss(t([1.0, 3.0, 2.0], [3.0, 1.0, 2.0]), baseline="best")
    torch.testing.assert_close(got, t(4 / 6, 1.0))


@pytest.mark.parametrize("mode", ["pairwise", "listmle", "regulariser"])
@pytest.mark.parametrize("baseline", ["ultra", "first", "best"])
def test_c0_is_plain_fine_tuning_for_every_baseline(mode, baseline):
    """Regression: with c = 0, baseline 'best' made the loss and its gradient identically 0
    (b = min = l0), so training silently did nothing; 'first' raised. Now every baseline and
    mode is the full model's task loss, with gradient 1."""
    x = t([2.5], [0.75]).requires_grad_(True)
    loss = ComparativeLoss(mode=mode, baseline=baseline)
    out = loss(x)
    torch.testing.assert_close(out, t(2.5, 0.75))
    out.sum().backward()
    torch.testing.assert_close(x.grad, t([1.0], [1.0]))
    torch.testing.assert_close(loss.pass_weights(x), t([1.0], [1.0]))
    # the pure pairwise loss agrees: with nothing to rank against, the dummy is 0
    torch.testing.assert_close(comparative_loss(x.detach(), baseline), t(2.5, 0.75))


def test_temperature_divides_pairwise():
    x = distinct_losses(5, 4)
    for baseline in ("ultra", "first", "best"):
        torch.testing.assert_close(
            comparative_loss(x, baseline, temperature=2.5), comparative_loss(x, baseline) / 2.5
        )


def test_c0_ultra_is_plain_finetuning():
    x = torch.tensor([[0.3], [1.7], [4.0]], requires_grad=True)
    out = comparative_loss(x)
    assert torch.equal(out, x[:, 0])
    out.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


# ---------------------------------------------------------------- listmle


def listmle_reference(row, b, temperature):
    """-log P(order) under Plackett-Luce, one prefix at a time, in python floats."""
    scores = [-v / temperature for v in row] + [-b / temperature]
    nll = 0.0
    for k in range(len(row)):
        rest = scores[k:]
        nll -= math.log(math.exp(scores[k]) / sum(math.exp(s) for s in rest))
    return nll


def test_listmle_matches_reference():
    x = distinct_losses(6, 4, seed=3)
    for baseline in ("ultra", "first", "best"):
        for temperature in (1.0, 0.5, 3.0):
            got = listmle_loss(x, baseline, temperature)
            for r in range(x.size(0)):
                row = x[r].tolist()
                if baseline == "ultra":
                    b = 0.0
                elif baseline == "best":
                    b = min(row)
                else:
                    m = min(row[1:])
                    b = (row[0] + m) / 2 if row[0] < m else m
                want = listmle_reference(row, b, temperature)
                assert got[r].item() == pytest.approx(want, rel=1e-12)


def test_listmle_c0_and_large_losses_are_finite():
    # c = 0, ultra: -log(e^{-l} / (e^{-l} + 1)) = log(1 + e^{l})
    assert listmle_loss(t([2.0])).item() == pytest.approx(math.log(1 + math.exp(2.0)))
    big = torch.tensor([[1000.0, 2000.0, 3000.0]])  # naive exp would overflow
    assert torch.isfinite(listmle_loss(big)).all()


# ---------------------------------------------------------------- regulariser


def test_regulariser_by_hand():
    # [3, 1, 2]: hinge over models = 2 + 1 + 0 = 3, / C(3,2)=3 -> 1
    x = t([3.0, 1.0, 2.0])
    assert regularised_loss(x, "max").item() == pytest.approx(3 + 1)
    assert regularised_loss(x, "avg").item() == pytest.approx(2 + 1)
    assert regularised_loss(x, "first").item() == pytest.approx(3 + 1)
    # [1, 3, 2], primary first: 1 + hinge 1/3
    assert regularised_loss(t([1.0, 3.0, 2.0]), "first").item() == pytest.approx(1 + 1 / 3)
    # weight 0.5, T = 2: 3 + 0.5 * 3 / (2 * 3)
    assert regularised_loss(x, "max", weight=0.5, temperature=2.0).item() == pytest.approx(3.25)
    assert regularised_loss(x, "avg", weight=0.0).item() == pytest.approx(2.0)
    # c = 0: the primary alone, for any primary
    for primary in ("max", "avg", "first"):
        assert regularised_loss(t([1.25]), primary).item() == 1.25


# ---------------------------------------------------------------- gradients


def test_autograd_matches_ultra_closed_form():
    for c in range(0, 6):
        x = distinct_losses(8, c + 1, seed=c)
        got = autograd_per_sample(comparative_loss, x)
        torch.testing.assert_close(got, ultra_pass_weights(x))


def test_ultra_closed_form_c2_by_hand():
    # [3, 1, 2], over C(4,2) = 6:  k=0: 1 + #{3>1, 3>2} = 3;  k=1: 1 + #{1>2} - #{3>1} = 0;
    # k=2: 1 - #{3>2, 1>2} = 0
    torch.testing.assert_close(ultra_pass_weights(t([3.0, 1.0, 2.0])), t([3 / 6, 0.0, 0.0]))
    # ties are no violation, matching autograd's relu'(0) = 0: only the dummy terms remain
    tied = t([2.0, 2.0, 2.0], [1.0, 2.0, 2.0])
    torch.testing.assert_close(ultra_pass_weights(tied), t([1 / 6] * 3, [1 / 6] * 3))
    want = autograd_per_sample(comparative_loss, tied)
    torch.testing.assert_close(ultra_pass_weights(tied), want)


def all_configs():
    for mode in ("pairwise", "listmle"):
        for baseline in ("ultra", "first", "best"):
            for temperature in (1.0, 0.7):
                yield dict(mode=mode, baseline=baseline, temperature=temperature)
    for primary in ("max", "avg", "first"):
        for weight in (0.0, 1.0, 2.5):
            yield dict(mode="regulariser", primary=primary, weight=weight, temperature=1.3)


@pytest.mark.parametrize("cfg", list(all_configs()), ids=str)
def test_pass_weights_equal_autograd(cfg):
    loss = ComparativeLoss(**cfg)
    for c in range(0, 4):
        x = distinct_losses(5, c + 1, seed=10 + c)
        torch.testing.assert_close(loss.pass_weights(x), autograd_per_sample(loss, x))


@pytest.mark.parametrize("mode", ["pairwise", "listmle", "regulariser"])
def test_pass_weights_match_finite_differences(mode):
    # ultra has no baseline to move, so the detached gradient is the true derivative
    loss = ComparativeLoss(mode=mode, temperature=0.8)
    x = distinct_losses(4, 4, seed=7)
    eps = 1e-6
    fd = torch.empty_like(x)
    for k in range(x.size(1)):
        e = torch.zeros_like(x)
        e[:, k] = eps
        fd[:, k] = (loss(x + e) - loss(x - e)) / (2 * eps)
    torch.testing.assert_close(loss.pass_weights(x), fd, atol=1e-7, rtol=1e-6)


def test_pass_weights_under_no_grad_and_inference_mode():
    loss = ComparativeLoss()
    x = distinct_losses(4, 3, seed=2)
    want = ultra_pass_weights(x)
    with torch.no_grad():
        got = loss.pass_weights(x)
    torch.testing.assert_close(got, want)
    assert not got.requires_grad
    with torch.inference_mode():
        xi = x.clone()
        got = loss.pass_weights(xi)
    torch.testing.assert_close(got, want)


def test_pass_weights_reproduce_model_gradient():
    # the recompute strategy: losses without grad -> weights -> sum_k w_k * grad(l_k)
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(3, dtype=F64, generator=g, requires_grad=True)
    inputs = torch.randn(4, 3, 3, dtype=F64, generator=g)  # [B, 1+c, features]

    def pass_losses(k):
        return (inputs[:, k] @ theta).exp()  # [B], positive

    for cfg in all_configs():
        loss = ComparativeLoss(**cfg)
        theta.grad = None
        loss(torch.stack([pass_losses(k) for k in range(3)], dim=1)).mean().backward()
        want = theta.grad.clone()

        with torch.no_grad():
            w = loss.pass_weights(torch.stack([pass_losses(k) for k in range(3)], dim=1))
        theta.grad = None
        for k in range(3):
            (pass_losses(k) * w[:, k]).mean().backward()
        torch.testing.assert_close(theta.grad, want, msg=str(cfg))


def test_baselines_are_detached():
    # best, [1, 3, 2]: b = l0. Attached, the dummy terms relu(3 - b) + relu(2 - b) would give l0
    # a gradient of -2/6; detached, l0 (the best model) gets none.
    # l1: hinge (1,2) + dummy = 2/6; l2: -hinge (1,2) + dummy = 0.
    x = t([1.0, 3.0, 2.0]).requires_grad_(True)
    comparative_loss(x, "best").sum().backward()
    torch.testing.assert_close(x.grad, t([0.0, 2 / 6, 0.0]))
    # first, same losses: b = (l0 + l2)/2 = 1.5; attached it would pull l0 and l2 by -1/6 each
    x = t([1.0, 3.0, 2.0]).requires_grad_(True)
    comparative_loss(x, "first").sum().backward()
    torch.testing.assert_close(x.grad, t([0.0, 2 / 6, 0.0]))
    # listmle, c = 1, best, [1, 2]: b = 1 detached. Loss = lse(-1, -2, -b) + 1 + lse(-2, -b) + 2;
    # d/dl0 = 1 - softmax_0(-1, -2, -1); d/dl1 = 1 - softmax_1(-1,-2,-1) - softmax_0(-2, -1)
    x = t([1.0, 2.0]).requires_grad_(True)
    listmle_loss(x, "best").sum().backward()
    p3 = torch.softmax(torch.tensor([-1.0, -2.0, -1.0], dtype=x.dtype), 0)
    p2 = torch.softmax(torch.tensor([-2.0, -1.0], dtype=x.dtype), 0)
    torch.testing.assert_close(x.grad, torch.stack([1 - p3[0], 1 - p3[1] - p2[0]])[None])


# ---------------------------------------------------------------- violation rate


def test_violation_rate_by_hand():
    x = t(
        [1.0, 2.0, 3.0],  # ordered: 0 of 3
        [3.0, 2.0, 1.0],  # reversed: 3 of 3
        [1.0, 3.0, 2.0],  # (1,2) only: 1 of 3
        [2.0, 2.0, 2.0],  # ties are not violations
    )
    torch.testing.assert_close(violation_rate(x), t(0.0, 1.0, 1 / 3, 0.0))
    torch.testing.assert_close(violation_rate(t([2.0, 1.0], [1.0, 2.0])), t(1.0, 0.0))
    torch.testing.assert_close(violation_rate(t([5.0])), t(0.0))


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(mode="hinge"), ["mode", "'hinge'", "pairwise", "listmle", "regulariser"]),
        (dict(baseline="worst"), ["baseline", "'worst'", "ultra", "first", "best"]),
        (dict(primary="min"), ["primary", "'min'", "max", "avg", "first"]),
        (dict(temperature=0.0), ["temperature", "0.0", "> 0"]),
        (dict(temperature=-1.0), ["temperature", "-1.0"]),
        (dict(temperature=float("nan")), ["temperature", "nan"]),
        (dict(weight=-0.5), ["weight", "-0.5", ">= 0"]),
    ],
)
def test_bad_arguments_raise(kwargs, words):
    with pytest.raises(ValueError) as err:
        ComparativeLoss(**kwargs)
    for w in words:
        assert w in str(err.value)


def test_bad_inputs_raise():
    loss = ComparativeLoss()
    for bad in (torch.ones(3), torch.ones(2, 0), torch.ones(2, 2, 2)):
        with pytest.raises(ValueError, match="shape"):
            loss(bad)
        with pytest.raises(ValueError, match="shape"):
            loss.pass_weights(bad)
    with pytest.raises(ValueError, match="floating"):
        loss(torch.ones(2, 2, dtype=torch.long))
    one_col = torch.ones(2, 1)
    with pytest.raises(ValueError, match="baseline"):
        comparative_loss(torch.ones(2, 2), baseline="worst")
    with pytest.raises(ValueError, match="temperature"):
        listmle_loss(torch.ones(2, 2), temperature=0)
    # the regulariser has no dummy, so baseline 'first' does not constrain c there
    reg = ComparativeLoss(mode="regulariser", baseline="first")
    torch.testing.assert_close(reg.pass_weights(one_col), torch.ones(2, 1))
