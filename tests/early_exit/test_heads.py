"""HaltingHeads against a per-layer reference written with plain torch ops."""

import math

import pytest
import torch

from comparative_recipe.early_exit.heads import HaltingHeads, HaltingHeadSettings

L, D, B = 4, 8, 5
MLP = HaltingHeadSettings(kind="mlp", depth=2, hidden_dim=5)


def _rms(x):
    return x / torch.sqrt((x * x).mean(dim=-1, keepdim=True) + 1e-6)


def _reference(heads, states):
    """[L-1, B, D] -> [B, L-1]: head n by itself, one layer at a time, in float64."""
    out = []
    num_mats = len(heads.weights)
    for n in range(states.shape[0]):
        current = _rms(states[n].double())
        previous = _rms(states[n - 1].double()) if n > 0 else torch.zeros_like(current)
        x = torch.cat([current, previous], dim=-1)
        for i in range(num_mats):
            w = heads.weights[i][n].detach().double()
            b = heads.biases[i][n].detach().double()
            x = x @ w + b
            if i < num_mats - 1:
                x = torch.tanh(x)
        out.append(1.0 / (1.0 + torch.exp(-x[:, 0])))
    return torch.stack(out, dim=1)


def _states(seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    # grow with depth, like decoder states, to exercise the normalisation
    growth = torch.arange(1, L, dtype=torch.float32).view(L - 1, 1, 1)
    return torch.randn(L - 1, B, D, generator=g) * growth * scale


def test_forward_shape_and_range():
    heads = HaltingHeads(L, D, MLP, seed=0)
    lam = heads(_states())
    assert lam.shape == (B, L - 1)
    assert lam.dtype == torch.float32
    assert ((lam > 0) & (lam < 1)).all()


@pytest.mark.parametrize("settings", [MLP, HaltingHeadSettings(kind="mlp", depth=1, hidden_dim=3),
                                      HaltingHeadSettings(kind="linear")])
def test_forward_matches_per_layer_reference(settings):
    heads = HaltingHeads(L, D, settings, seed=0)
    states = _states(1)
    got = heads(states)
    expected = _reference(heads, states)
    assert torch.allclose(got.double(), expected, atol=1e-6, rtol=0)


def test_forward_ignores_the_scale_of_states():
    # the heads see each state's direction, not its scale (rms-normalised inputs)
    heads = HaltingHeads(L, D, MLP, seed=0)
    states = _states(2)
    scales = torch.tensor([3.0, 0.01, 250.0]).view(L - 1, 1, 1)
    assert torch.allclose(heads(states), heads(states * scales), atol=1e-5)


def test_layer_lambda_equals_forward_column():
    heads = HaltingHeads(L, D, MLP, seed=3)
    states = _states(3)
    full = heads(states)
    expected = _reference(heads, states)
    for n in range(1, L):
        previous = None if n == 1 else states[n - 2]
        lam = heads.layer_lambda(n, states[n - 1], previous)
        assert lam.shape == (B,)
        assert lam.dtype == torch.float32
        assert torch.allclose(lam, full[:, n - 1], atol=1e-6, rtol=0)
        assert torch.allclose(lam.double(), expected[:, n - 1], atol=1e-6, rtol=0)


@pytest.mark.parametrize("initial_lambda", [0.1, 0.3, 0.75])
def test_initial_output_bias_is_logit_of_initial_lambda(initial_lambda):
    for settings in (MLP, HaltingHeadSettings(kind="linear")):
        heads = HaltingHeads(L, D, settings, seed=0, initial_lambda=initial_lambda)
        logit = math.log(initial_lambda) - math.log(1.0 - initial_lambda)
        out_bias = heads.biases[-1].detach()
        assert out_bias.shape == (L - 1, 1, 1)
        assert torch.allclose(out_bias, torch.full_like(out_bias, logit), atol=1e-6)


@pytest.mark.parametrize("initial_lambda", [0.1, 0.3])
def test_zero_states_give_initial_lambda_for_linear_heads(initial_lambda):
    heads = HaltingHeads(L, D, HaltingHeadSettings(kind="linear"), seed=0,
                         initial_lambda=initial_lambda)
    # rms_norm(0) = 0, so only the output bias remains
    lam = heads(torch.zeros(L - 1, B, D))
    assert torch.allclose(lam, torch.full((B, L - 1), initial_lambda), atol=1e-6)
    assert torch.allclose(heads.layer_lambda(1, torch.zeros(2, D), None),
                          torch.full((2,), initial_lambda), atol=1e-6)


def test_zero_states_mlp_heads():
    # An mlp head's hidden biases still act on zero inputs (tanh(b)), so the output is not
    # initial_lambda exactly: check it against the bias-only chain, and that it becomes
    # initial_lambda once the output weights are zero.
    heads = HaltingHeads(L, D, MLP, seed=4, initial_lambda=0.2)
    zeros = torch.zeros(L - 1, B, D)
    lam = heads(zeros)
    for n in range(L - 1):
        h = torch.tanh(heads.biases[0][n, 0].detach().double())
        h = torch.tanh(h @ heads.weights[1][n].detach().double() + heads.biases[1][n, 0].double())
        z = h @ heads.weights[2][n].detach().double() + heads.biases[2][n, 0].double()
        expected = 1.0 / (1.0 + math.exp(-z.item()))
        assert lam[:, n].tolist() == pytest.approx([expected] * B, abs=1e-6)
    with torch.no_grad():
        heads.weights[-1].zero_()
    assert torch.allclose(heads(zeros), torch.full((B, L - 1), 0.2), atol=1e-6)


def test_initialisation_bounds():
    heads = HaltingHeads(L, D, MLP, seed=5)
    fan_ins = [2 * D, 5, 5]
    assert [tuple(w.shape) for w in heads.weights] == [(L - 1, 16, 5), (L - 1, 5, 5),
                                                      (L - 1, 5, 1)]
    for i, (w, b, fan_in) in enumerate(zip(heads.weights, heads.biases, fan_ins)):
        bound = 1.0 / math.sqrt(fan_in)
        assert w.abs().max().item() <= bound
        if i < len(fan_ins) - 1:
            assert b.abs().max().item() <= bound


def test_same_seed_same_parameters_different_seed_different():
    a = HaltingHeads(L, D, MLP, seed=7)
    b = HaltingHeads(L, D, MLP, seed=7)
    c = HaltingHeads(L, D, MLP, seed=8)
    pa, pb, pc = (list(m.parameters()) for m in (a, b, c))
    assert len(pa) == len(pb) == len(pc) == 6
    assert all(torch.equal(x, y) for x, y in zip(pa, pb))
    # every weight differs; the output biases are the same constant by design
    assert all(not torch.equal(x, y) for x, y in zip(a.weights, c.weights))
    assert all(not torch.equal(x, y) for x, y in zip(list(a.biases)[:-1], list(c.biases)[:-1]))


def test_each_layer_has_its_own_head():
    heads = HaltingHeads(L, D, MLP, seed=0)
    w0 = heads.weights[0]
    assert not torch.equal(w0[0], w0[1]) and not torch.equal(w0[1], w0[2])


def test_linear_kind_has_one_weight():
    heads = HaltingHeads(L, D, HaltingHeadSettings(kind="linear", depth=3, hidden_dim=7), seed=0)
    assert len(heads.weights) == 1 and len(heads.biases) == 1
    assert tuple(heads.weights[0].shape) == (L - 1, 2 * D, 1)
    assert tuple(heads.biases[0].shape) == (L - 1, 1, 1)


def test_settings_dims():
    assert HaltingHeadSettings(kind="mlp", depth=3, hidden_dim=4).dims(6) == [12, 4, 4, 4, 1]
    assert HaltingHeadSettings(kind="linear", depth=3, hidden_dim=4).dims(6) == [12, 1]


def test_gradients_reach_every_parameter():
    heads = HaltingHeads(L, D, MLP, seed=0)
    heads(_states(6)).sum().backward()
    for p in heads.parameters():
        assert p.grad is not None and p.grad.abs().sum().item() > 0


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize("num_layers", [1, 0])
def test_too_few_layers_raise(num_layers):
    with pytest.raises(ValueError):
        HaltingHeads(num_layers, D, MLP)


def test_two_layers_is_enough():
    heads = HaltingHeads(2, D, MLP)
    assert heads(torch.randn(1, B, D)).shape == (B, 1)


@pytest.mark.parametrize("shape", [(L - 2, B, D), (L, B, D), (L - 1, B, D - 1)])
def test_wrong_state_shape_raises(shape):
    heads = HaltingHeads(L, D, MLP)
    with pytest.raises(ValueError):
        heads(torch.randn(*shape))


@pytest.mark.parametrize("shape", [(L - 1, D), (L - 1, 2, B, D)])
def test_wrong_state_rank_raises_value_error(shape):
    heads = HaltingHeads(L, D, MLP)
    with pytest.raises(ValueError):
        heads(torch.randn(*shape))


@pytest.mark.parametrize("n", [0, L, -1, L + 1])
def test_layer_lambda_without_head_raises(n):
    heads = HaltingHeads(L, D, MLP)
    with pytest.raises(ValueError):
        heads.layer_lambda(n, torch.randn(2, D), torch.randn(2, D))


@pytest.mark.parametrize("kwargs", [dict(kind="conv"), dict(depth=0), dict(hidden_dim=0),
                                    dict(depth=-1), dict(depth=True), dict(hidden_dim=2.0)])
def test_bad_settings_raise(kwargs):
    with pytest.raises(ValueError):
        HaltingHeadSettings(**kwargs)
