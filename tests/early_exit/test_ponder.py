"""The PonderNet objective and the whole-depth exit rules, against hand computations."""

import itertools
import math
import random

import pytest
import torch

from comparative_recipe.early_exit.ponder import (
    exit_distribution,
    exit_histogram,
    expected_layers,
    floor_exit_distribution,
    kl_to_prior,
    patience_exit_layers,
    ponder_loss,
    q_exit_layers,
    sample_exit_layers,
    truncated_geometric_prior,
)


def _exit_by_hand(lams):
    """p_n = lambda_n prod_{j<n} (1 - lambda_j), p_L = prod_j (1 - lambda_j), by a loop."""
    p, reach = [], 1.0
    for lam in lams:
        p.append(lam * reach)
        reach *= 1.0 - lam
    p.append(reach)
    return p


def _kl_by_hand(a, b):
    """sum a log(a / b) with 0 log 0 = 0."""
    return sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)


# ------------------------------------------------------------------ exit_distribution


def test_exit_distribution_matches_hand_loop():
    p = exit_distribution(torch.tensor([[0.2, 0.5, 0.1]]))
    # 0.2, 0.8*0.5, 0.8*0.5*0.1, 0.8*0.5*0.9
    expected = [0.2, 0.4, 0.04, 0.36]
    assert p.shape == (1, 4)
    assert p[0].tolist() == pytest.approx(expected, abs=1e-7)
    assert p[0].tolist() == pytest.approx(_exit_by_hand([0.2, 0.5, 0.1]), abs=1e-7)


def test_exit_distribution_random_rows_match_loop_and_sum_to_one():
    g = torch.Generator().manual_seed(0)
    lams = torch.rand(6, 5, generator=g) * 0.98 + 0.01
    p = exit_distribution(lams)
    assert p.shape == (6, 6)
    for row, lam_row in zip(p.tolist(), lams.tolist()):
        assert row == pytest.approx(_exit_by_hand(lam_row), abs=1e-6)
        assert math.fsum(row) == pytest.approx(1.0, abs=1e-6)
    assert (p >= 0).all()


def test_exit_distribution_extreme_lambdas():
    # lambda_1 = 1 puts all mass on layer 1; all zeros put it on the last layer.
    p = exit_distribution(torch.tensor([[1.0, 0.3, 0.7], [0.0, 0.0, 0.0]]))
    assert p.tolist() == [[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]]


def test_exit_distribution_bf16_input_gives_float32():
    lam = torch.tensor([[0.2, 0.5, 0.1]], dtype=torch.bfloat16)
    p = exit_distribution(lam)
    assert p.dtype == torch.float32
    rounded = lam.float()[0].tolist()  # the bf16 values, exactly
    assert p[0].tolist() == pytest.approx(_exit_by_hand(rounded), abs=1e-7)
    assert p.sum().item() == pytest.approx(1.0, abs=1e-6)


def test_exit_distribution_single_layer_model():
    # L = 1: no halting heads, the only layer takes everything.
    p = exit_distribution(torch.zeros(3, 0))
    assert p.tolist() == [[1.0], [1.0], [1.0]]


# ------------------------------------------------------------ floor_exit_distribution


def test_floor_replaces_layers_after_mass_reaches_one_minus_eps():
    p = torch.tensor([[0.5, 0.25, 0.125, 0.125]])
    # mass before each layer: 0, 0.5, 0.75, 0.875; 1 - eps = 0.75 is reached at layer 3
    out = floor_exit_distribution(p, eps=0.25)
    assert out[0].tolist() == [0.5, 0.25, 0.25 / 4, 0.25 / 4]


def test_floor_hand_example_mixed_rows():
    # dyadic numbers, so that the float32 cumsum is exact
    p = torch.tensor([[0.875, 0.0625, 0.03125, 0.03125],
                      [0.25, 0.25, 0.25, 0.25],
                      [0.5, 0.3125, 0.125, 0.0625]])
    eps = 0.125
    out = floor_exit_distribution(p, eps).tolist()
    for row, got in zip(p.tolist(), out):
        before = 0.0
        for pn, gn in zip(row, got):
            assert gn == (eps / 4 if before >= 1.0 - eps else pn)
            before += pn
    # row 0: mass 0.875 before layer 2 -> layers 2..4 floored; row 1: at most 0.75 before
    # any layer -> unchanged; row 2: 0.5, 0.8125, 0.9375 -> only layer 4 floored
    assert out[0] == [0.875, 0.03125, 0.03125, 0.03125]
    assert out[1] == [0.25, 0.25, 0.25, 0.25]
    assert out[2] == [0.5, 0.3125, 0.125, 0.03125]


def test_floor_eps_zero_leaves_p_unchanged():
    g = torch.Generator().manual_seed(1)
    p = exit_distribution(torch.rand(5, 6, generator=g) * 0.8 + 0.1)
    assert torch.equal(floor_exit_distribution(p, 0.0), p)
    # a row whose mass is spent at layer 1: the later zeros stay zeros (eps / L = 0)
    spent = torch.tensor([[1.0, 0.0, 0.0]])
    assert floor_exit_distribution(spent, 0.0).tolist() == [[1.0, 0.0, 0.0]]


def test_floor_blocks_gradient_through_floored_entries():
    lam = torch.tensor([[0.5, 0.5, 0.5]], requires_grad=True)
    p = exit_distribution(lam)  # [0.5, 0.25, 0.125, 0.125]
    out = floor_exit_distribution(p, eps=0.25)  # layers 3 and 4 floored
    out[0, 2:].sum().backward()
    assert lam.grad.tolist() == [[0.0, 0.0, 0.0]]

    # the kept entry p_2 = lambda_2 (1 - lambda_1) keeps its gradient:
    # d/d lambda_1 = -lambda_2 = -0.5, d/d lambda_2 = 1 - lambda_1 = 0.5, d/d lambda_3 = 0
    lam.grad = None
    out = floor_exit_distribution(exit_distribution(lam), eps=0.25)
    out[0, 1].backward()
    assert lam.grad.tolist() == [[-0.5, 0.5, 0.0]]


# ---------------------------------------------------------- truncated_geometric_prior


def test_truncated_geometric_prior_by_hand():
    prior = truncated_geometric_prior(4, 0.1)
    assert prior.dtype == torch.float32
    assert prior.tolist() == pytest.approx([0.1, 0.09, 0.081, 0.729], abs=1e-7)
    assert prior.sum().item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("num_layers,lambda_p", [(1, 0.3), (2, 0.5), (7, 0.25), (12, 0.05)])
def test_truncated_geometric_prior_formula_and_sum(num_layers, lambda_p):
    prior = truncated_geometric_prior(num_layers, lambda_p).tolist()
    expected = [lambda_p * (1 - lambda_p) ** (n - 1) for n in range(1, num_layers)]
    expected.append(1.0 - math.fsum(expected))  # the last layer takes the rest
    assert prior == pytest.approx(expected, abs=1e-6)
    assert math.fsum(prior) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("num_layers", [0, -3])
def test_truncated_geometric_prior_rejects_no_layers(num_layers):
    with pytest.raises(ValueError):
        truncated_geometric_prior(num_layers, 0.1)


# ----------------------------------------------------------------------- kl_to_prior

P_ROWS = [[0.2, 0.3, 0.5], [0.6, 0.3, 0.1]]
PRIOR3 = [0.25, 0.25, 0.5]


def test_kl_prior_to_exit_by_hand():
    kl = kl_to_prior(torch.tensor(P_ROWS), torch.tensor(PRIOR3), "prior_to_exit")
    assert kl.shape == (2,)
    expected = [_kl_by_hand(PRIOR3, row) for row in P_ROWS]
    assert kl.tolist() == pytest.approx(expected, abs=1e-6)


def test_kl_exit_to_prior_by_hand():
    kl = kl_to_prior(torch.tensor(P_ROWS), torch.tensor(PRIOR3), "exit_to_prior")
    expected = [_kl_by_hand(row, PRIOR3) for row in P_ROWS]
    assert kl.tolist() == pytest.approx(expected, abs=1e-6)
    # the two directions differ on this example (KL is not symmetric)
    other = kl_to_prior(torch.tensor(P_ROWS), torch.tensor(PRIOR3), "prior_to_exit")
    assert abs(kl[1].item() - other[1].item()) > 1e-3


@pytest.mark.parametrize("direction", ["prior_to_exit", "exit_to_prior"])
def test_kl_of_identical_distributions_is_zero(direction):
    prior = torch.tensor([0.1, 0.09, 0.081, 0.729])
    kl = kl_to_prior(prior.expand(3, 4).clone(), prior, direction)
    assert kl.tolist() == pytest.approx([0.0, 0.0, 0.0], abs=1e-7)


@pytest.mark.parametrize("direction", ["prior_to_exit", "exit_to_prior"])
def test_kl_is_nonnegative_on_random_rows(direction):
    g = torch.Generator().manual_seed(2)
    p = exit_distribution(torch.rand(20, 5, generator=g) * 0.9 + 0.05)
    kl = kl_to_prior(p, truncated_geometric_prior(6, 0.2), direction)
    assert (kl >= -1e-6).all()


def test_kl_prior_to_exit_with_zero_in_p_stays_finite():
    p = torch.tensor([[0.5, 0.5, 0.0]])
    kl = kl_to_prior(p, torch.tensor(PRIOR3), "prior_to_exit")
    assert torch.isfinite(kl).all()
    tiny = 2.0 ** -126  # float32's smallest normal, the clamp of p
    expected = (0.25 * math.log(0.25 / 0.5) * 2
                + 0.5 * (math.log(0.5) - math.log(tiny)))
    assert kl.item() == pytest.approx(expected, rel=1e-5)


def test_kl_exit_to_prior_treats_zero_log_zero_as_zero():
    p = torch.tensor([[0.5, 0.5, 0.0]])
    kl = kl_to_prior(p, torch.tensor(PRIOR3), "exit_to_prior")
    expected = 0.5 * math.log(0.5 / 0.25) * 2  # the zero entry contributes nothing
    assert kl.item() == pytest.approx(expected, abs=1e-6)


def test_kl_unknown_direction_raises():
    with pytest.raises(ValueError):
        kl_to_prior(torch.tensor(P_ROWS), torch.tensor(PRIOR3), "symmetric")


# ----------------------------------------------------------------------- ponder_loss


@pytest.mark.parametrize("direction", ["prior_to_exit", "exit_to_prior"])
def test_ponder_loss_is_task_plus_beta_kl_by_hand(direction):
    layer_losses = [[2.0, 1.0, 0.5], [0.3, 4.0, 1.5]]
    beta = 0.7
    terms = ponder_loss(torch.tensor(layer_losses), torch.tensor(P_ROWS),
                        torch.tensor(PRIOR3), beta, direction)
    task = [sum(p * l for p, l in zip(pr, lr)) for pr, lr in zip(P_ROWS, layer_losses)]
    if direction == "prior_to_exit":
        kl = [_kl_by_hand(PRIOR3, row) for row in P_ROWS]
    else:
        kl = [_kl_by_hand(row, PRIOR3) for row in P_ROWS]
    assert terms.task.tolist() == pytest.approx(task, abs=1e-6)
    assert terms.kl.tolist() == pytest.approx(kl, abs=1e-6)
    assert terms.loss.tolist() == pytest.approx([t + beta * k for t, k in zip(task, kl)],
                                                abs=1e-6)


def test_ponder_loss_default_direction_is_prior_to_exit():
    layer_losses = torch.tensor([[1.0, 1.0, 1.0]])
    terms = ponder_loss(layer_losses, torch.tensor([P_ROWS[0]]), torch.tensor(PRIOR3), 1.0)
    assert terms.kl.item() == pytest.approx(_kl_by_hand(PRIOR3, P_ROWS[0]), abs=1e-6)
    assert terms.task.item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("direction", ["prior_to_exit", "exit_to_prior"])
def test_ponder_loss_gradcheck(direction):
    # The module computes in float32 whatever the input dtype (its documented contract), so
    # the finite-difference step and the tolerances are those float32 allows.
    g = torch.Generator().manual_seed(3)
    lam = (torch.rand(2, 3, generator=g, dtype=torch.float64) * 0.6 + 0.2).requires_grad_()
    layer_losses = torch.rand(2, 4, generator=g, dtype=torch.float64) * 3
    prior = truncated_geometric_prior(4, 0.2)

    def f(lam):
        p = exit_distribution(lam)
        return ponder_loss(layer_losses, p, prior, 0.5, direction).loss.sum().double()

    assert torch.autograd.gradcheck(f, (lam,), eps=1e-3, atol=2e-3, rtol=1e-2)


@pytest.mark.parametrize("direction", ["prior_to_exit", "exit_to_prior"])
def test_ponder_loss_gradient_matches_float64_reference(direction):
    # an independent float64 reference of the same objective, written with a python loop
    g = torch.Generator().manual_seed(4)
    lam0 = torch.rand(3, 4, generator=g, dtype=torch.float64) * 0.6 + 0.2
    layer_losses = torch.rand(3, 5, generator=g, dtype=torch.float64) * 2
    prior = torch.tensor([0.2 * 0.8 ** n for n in range(4)] + [0.8 ** 4], dtype=torch.float64)
    beta = 0.3

    lam = lam0.clone().float().requires_grad_()
    ponder_loss(layer_losses, exit_distribution(lam), prior, beta, direction).loss.sum().backward()

    ref_lam = lam0.clone().requires_grad_()
    total = 0.0
    for b in range(3):
        reach, p = 1.0, []
        for n in range(4):
            p.append(ref_lam[b, n] * reach)
            reach = reach * (1 - ref_lam[b, n])
        p.append(reach)
        for n in range(5):
            total = total + p[n] * layer_losses[b, n]
            if direction == "prior_to_exit":
                total = total + beta * prior[n] * torch.log(prior[n] / p[n])
            else:
                total = total + beta * p[n] * torch.log(p[n] / prior[n])
    total.backward()
    assert torch.allclose(lam.grad.double(), ref_lam.grad, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------- expected_layers


def test_expected_layers_by_hand():
    p = torch.tensor([[0.1, 0.2, 0.7], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.25, 0.5, 0.25]])
    # 0.1 + 0.4 + 2.1 = 2.6; 1; 3; 0.25 + 1 + 0.75 = 2
    assert expected_layers(p).tolist() == pytest.approx([2.6, 1.0, 3.0, 2.0], abs=1e-6)


def test_expected_layers_of_prior():
    prior = truncated_geometric_prior(4, 0.1)
    expected = 1 * 0.1 + 2 * 0.09 + 3 * 0.081 + 4 * 0.729
    assert expected_layers(prior[None]).item() == pytest.approx(expected, abs=1e-6)


# --------------------------------------------------------------------- q_exit_layers


def _q_exit_by_hand(row, q):
    total = 0.0
    for n, pn in enumerate(row, start=1):
        total += pn
        if total > q:
            return n
    return len(row)


def test_q_exit_hand_examples():
    p = torch.tensor([[0.75, 0.125, 0.0625, 0.0625],   # crosses 0.5 at layer 1
                      [0.5, 0.25, 0.125, 0.125],       # 0.5 is not > 0.6; 0.75 is: layer 2
                      [0.25, 0.25, 0.25, 0.25],        # cumsum 0.5 == q: not an exit -> 3
                      [0.0, 0.0, 0.0, 1.0],            # layer 4
                      [0.1, 0.1, 0.1, 0.1]])           # never crosses: caught at L
    q = torch.tensor([0.5, 0.6, 0.5, 0.5, 0.5])
    got = [q_exit_layers(p[i:i + 1], q[i].item()).item() for i in range(5)]
    assert got == [1, 2, 3, 4, 4]
    assert got == [_q_exit_by_hand(row, qi) for row, qi in zip(p.tolist(), q.tolist())]


def test_q_exit_exact_equality_does_not_exit():
    p = torch.tensor([[0.25, 0.25, 0.5]])
    assert q_exit_layers(p, 0.5).tolist() == [3]
    assert q_exit_layers(p, 0.25).tolist() == [2]
    # q = 1: the full distribution's cumsum equals 1, never exceeds it -> last layer
    assert q_exit_layers(p, 1.0).tolist() == [3]


def test_q_exit_batch_against_loop():
    g = torch.Generator().manual_seed(5)
    p = exit_distribution(torch.rand(30, 6, generator=g))
    for q in (0.1, 0.5, 0.9):
        got = q_exit_layers(p, q)
        assert got.dtype == torch.long
        # the reference accumulates in float32 like the code, so near-ties agree
        cums = p.cumsum(-1).tolist()
        expected = [next((n + 1 for n, c in enumerate(row) if c > q), 7) for row in cums]
        assert got.tolist() == expected


# ---------------------------------------------------------------- sample_exit_layers


def test_sample_exit_hand_examples():
    lambdas = torch.tensor([[0.3, 0.6, 0.9],
                            [0.3, 0.6, 0.9],
                            [0.3, 0.6, 0.9],
                            [0.5, 0.5, 0.5],
                            [0.9, 0.1, 0.1]])
    uniforms = torch.tensor([[0.5, 0.5, 0.5],      # 0.5 < 0.6 at layer 2
                             [0.95, 0.95, 0.95],   # never: L = 4
                             [0.1, 0.0, 0.0],      # layer 1
                             [0.5, 0.5, 0.5],      # u == lambda is not < : L
                             [0.95, 0.5, 0.05]])   # layer 3
    got = sample_exit_layers(lambdas, uniforms)
    assert got.tolist() == [2, 4, 1, 4, 3]


def test_sample_exit_against_loop():
    g = torch.Generator().manual_seed(6)
    lambdas = torch.rand(40, 5, generator=g)
    uniforms = torch.rand(40, 5, generator=g)
    expected = []
    for lam_row, u_row in zip(lambdas.tolist(), uniforms.tolist()):
        expected.append(next((n + 1 for n, (l, u) in enumerate(zip(lam_row, u_row)) if u < l),
                             6))
    assert sample_exit_layers(lambdas, uniforms).tolist() == expected


# -------------------------------------------------------------- patience_exit_layers


def _patience_by_hand(unchanged, patience):
    """First layer m (2..L) such that layers m-patience..m all predict the same, i.e. the
    entries m-1-patience..m-2 of ``unchanged`` are all True; else L."""
    L = len(unchanged) + 1
    for m in range(2, L + 1):
        start = m - 1 - patience
        if start >= 0 and all(unchanged[start:m - 1]):
            return m
    return L


def test_patience_hand_example_exits_at_layer_three():
    unchanged = torch.tensor([[True, True, False, True]])
    assert patience_exit_layers(unchanged, 2).tolist() == [3]
    assert patience_exit_layers(unchanged, 1).tolist() == [2]


def test_patience_break_resets_counter():
    # layers: 1=2, 2!=3, 3=4, 4=5 -> with patience 2 the streak restarts after the break
    unchanged = torch.tensor([[True, False, True, True, False]])
    assert patience_exit_layers(unchanged, 2).tolist() == [5]
    # a streak of 2 before the break is not enough for patience 3; none later either
    assert patience_exit_layers(unchanged, 3).tolist() == [6]


def test_patience_never_reached_exits_at_last_layer():
    unchanged = torch.tensor([[False, True, False, True],
                              [False, False, False, False],
                              [True, True, True, True]])
    assert patience_exit_layers(unchanged, 2).tolist() == [5, 5, 3]
    # patience L - 1 = 4: even an all-unchanged row reaches it only at the last layer
    assert patience_exit_layers(unchanged, 4).tolist() == [5, 5, 5]
    assert patience_exit_layers(unchanged, 5).tolist() == [5, 5, 5]


@pytest.mark.parametrize("patience", [1, 2, 3, 4])
def test_patience_against_brute_force(patience):
    rng = random.Random(patience)
    rows = [[rng.random() < 0.7 for _ in range(7)] for _ in range(50)]
    got = patience_exit_layers(torch.tensor(rows), patience)
    assert got.dtype == torch.long
    assert got.tolist() == [_patience_by_hand(row, patience) for row in rows]


def test_patience_exhaustive_small():
    rows = [list(bits) for bits in itertools.product([False, True], repeat=4)]
    for patience in (1, 2, 3):
        got = patience_exit_layers(torch.tensor(rows), patience).tolist()
        assert got == [_patience_by_hand(row, patience) for row in rows]


# -------------------------------------------------------------------- exit_histogram


def test_exit_histogram_by_hand():
    hist = exit_histogram(torch.tensor([1, 3, 3, 4, 1]), 5)
    assert hist.dtype == torch.float32
    assert hist.tolist() == [2.0, 0.0, 2.0, 1.0, 0.0]


def test_exit_histogram_against_counter():
    rng = random.Random(7)
    layers = [rng.randint(1, 6) for _ in range(100)]
    hist = exit_histogram(torch.tensor(layers), 6).tolist()
    assert hist == [float(layers.count(n)) for n in range(1, 7)]
    assert sum(hist) == 100
