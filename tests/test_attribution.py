"""Attribution scores: the pure reduction by hand, and the collector against an independent path
(the gradient of a per-token multiplicative mask of ones) and a finite difference."""

import pytest
import torch

from comparative_recipe import neurons
from comparative_recipe.ablation.hidden import set_activation_checkpointing
from comparative_recipe.attribution import attribution_scores, site_attributions
from comparative_recipe.models.tiny import tiny_llama
from torchtune import modules

SITES = ("ffn_hidden", "attn_heads", "attn_out")


def test_attribution_scores_by_hand():
    # R=1, S=3, U=2, G=2
    acts = torch.tensor([[[[1.0, 2.0], [0.5, 0.0]],
                          [[-1.0, 1.0], [2.0, 2.0]],
                          [[3.0, 0.0], [1.0, 1.0]]]])
    grads = torch.tensor([[[[1.0, 1.0], [2.0, 5.0]],
                           [[1.0, -2.0], [-1.0, 0.5]],
                           [[1.0, 1.0], [1.0, 1.0]]]])
    # per token and unit: |a . g| = unit 0: |1+2|=3, |-1-2|=3, |3|=3; unit 1: |1|=1, |-2+1|=1, |2|=2
    positions = torch.tensor([[True, True, False]])
    assert attribution_scores(acts, grads, positions, "sum").tolist() == [6.0, 2.0]
    assert attribution_scores(acts, grads, positions, "max").tolist() == [3.0, 1.0]
    all_pos = torch.ones(1, 3, dtype=torch.bool)
    assert attribution_scores(acts, grads, all_pos, "sum").tolist() == [9.0, 4.0]
    assert attribution_scores(acts, grads, all_pos, "max").tolist() == [3.0, 2.0]
    # taylor: |signed sum|: unit 0: |3 - 3| = 0, |3 - 3 + 3| = 3; unit 1: |1 - 1| = 0, |1 - 1 + 2| = 2
    assert attribution_scores(acts, grads, positions, "taylor").tolist() == [0.0, 0.0]
    assert attribution_scores(acts, grads, all_pos, "taylor").tolist() == [3.0, 2.0]
    # rows add up
    two = attribution_scores(acts.repeat(2, 1, 1, 1), grads.repeat(2, 1, 1, 1), all_pos.repeat(2, 1))
    assert two.tolist() == [18.0, 8.0]


def test_attribution_scores_rejects_bad_shapes_and_reductions():
    a = torch.zeros(1, 2, 3, 1)
    with pytest.raises(ValueError, match=r"\[R, S, U, G\]"):
        attribution_scores(a, torch.zeros(1, 2, 3, 2), torch.ones(1, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="attribution reduce"):
        attribution_scores(a, a, torch.ones(1, 2, dtype=torch.bool), "mean")


def _model(seed=0):
    torch.manual_seed(seed)
    model = tiny_llama(vocab_size=64, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32,
                       intermediate_dim=48, max_seq_len=32)
    return model.eval()


def _objective(targets):
    def log_likelihood(logits):
        logp = torch.log_softmax(logits, -1)
        picked = logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
        return (picked * (targets >= 0)).sum()
    return log_likelihood


def _batch():
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 64, (3, 10), generator=g)
    targets = torch.randint(0, 64, (3, 10), generator=g)
    targets[:, :6] = -100  # only the "answer" positions are scored
    positions = torch.ones(3, 10, dtype=torch.bool)
    positions[2, 7:] = False  # padding of row 2
    return tokens, targets, positions


def _mask_gradients(model, tokens, objective, site):
    """Independent path: d objective / d m for a per-token mask m of ones at every layer of
    ``site`` ([R, S, units] per layer), by plain autograd."""
    masks = {}

    def multiply(lay, x):
        m = torch.ones(x.shape[:-1], dtype=x.dtype, requires_grad=True)
        masks[lay.layer_index] = m
        return x * m[..., None]

    handle = neurons.register_site_hook(model, site, multiply)
    try:
        value = objective(model(tokens))
        grads = torch.autograd.grad(value, [masks[i] for i in sorted(masks)])
    finally:
        handle.remove()
    return value, grads


@pytest.mark.parametrize("reduce", ["sum", "max", "taylor"])
def test_site_attributions_equal_the_gradient_of_a_mask_of_ones(reduce):
    model = _model()
    tokens, targets, positions = _batch()
    objective = _objective(targets)
    scores = site_attributions(model, tokens, objective, positions, SITES, reduce)
    assert set(scores) == set(SITES)
    for site in SITES:
        _, grads = _mask_gradients(model, tokens, objective, site)
        assert len(scores[site]) == len(grads) == 2
        for got, g in zip(scores[site], grads):
            effect = g.abs() * positions[..., None]
            expected = {"sum": effect.sum(1).sum(0), "max": effect.amax(1).sum(0),
                        "taylor": (g * positions[..., None]).sum(1).abs().sum(0)}[reduce]
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
            assert got.shape == (neurons.site_layouts(model, site)[0].units,)
            assert bool((got > 0).any())
    assert all(p.grad is None for p in model.parameters())


def test_a_first_order_score_matches_a_finite_difference():
    """Scaling one FFN unit at every position by (1 + e) changes the objective by about
    e * sum_t a.g: the signed sum behind the scores (central difference; the decoder's logits
    are float32, so e is not tiny)."""
    model = _model().double()
    tokens, targets, _ = _batch()
    objective = _objective(targets)
    _, grads = _mask_gradients(model, tokens, objective, "ffn_hidden")
    unit, layer, eps = 5, 1, 1e-2

    def objective_scaled(factor):
        def scaled(lay, x):
            if lay.layer_index == layer:
                x = x.clone()
                x[..., unit, :] *= factor
            return x

        handle = neurons.register_site_hook(model, "ffn_hidden", scaled)
        with torch.no_grad():
            value = float(objective(model(tokens)))
        handle.remove()
        return value

    derivative = (objective_scaled(1 + eps) - objective_scaled(1 - eps)) / (2 * eps)
    expected = float(grads[layer][..., unit].sum())
    assert abs(expected) > 1e-2
    assert derivative == pytest.approx(expected, rel=2e-2)


def test_frozen_parameters_and_activation_checkpointing_give_the_same_scores():
    tokens, targets, positions = _batch()
    objective = _objective(targets)
    reference = site_attributions(_model(), tokens, objective, positions, SITES)
    model = _model()
    for p in model.parameters():
        p.requires_grad_(False)
    set_activation_checkpointing(model, auto_wrap_policy={modules.TransformerSelfAttentionLayer})
    model.train()  # checkpointing recomputes in training mode; the tiny model has no dropout
    got = site_attributions(model, tokens, objective, positions, SITES)
    for site in SITES:
        for a, b in zip(got[site], reference[site]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert all(p.grad is None for p in model.parameters())
    # no hook is left behind: a plain forward equals the model's output without hooks
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), _model()(tokens))
