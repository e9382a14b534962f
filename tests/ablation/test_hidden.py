import copy
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import CheckpointError
from torchtune import training as tt_training
from torchtune.models.gemma import gemma
from torchtune.models.gemma2 import gemma2
from torchtune.models.llama3_2 import llama3_2
from torchtune.models.mistral import mistral
from torchtune.models.phi3 import phi3
from torchtune.models.qwen2 import qwen2
from torchtune.modules import TransformerSelfAttentionLayer

from comparative_recipe.ablation.hidden import (
    SITES,
    HiddenAblationConfig,
    MaskKeys,
    apply_unit_mask,
    current_hidden_ablation_keys,
    hidden_ablation_keys,
    install_hidden_ablation,
    nested_rate,
    nested_unit_masks,
    set_activation_checkpointing,
    site_mask,
)

VOCAB = 128
AC_POLICY = {TransformerSelfAttentionLayer}

BUILDERS = {
    "llama3_2": lambda: llama3_2(
        vocab_size=VOCAB, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32,
        max_seq_len=64, intermediate_dim=64,
    ),
    "qwen2": lambda: qwen2(
        vocab_size=VOCAB, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32,
        intermediate_dim=64, max_seq_len=64,
    ),
    # heads * head_dim (4 * 16) != embed_dim (32): output_proj input is wider than the residual
    "gemma": lambda: gemma(
        vocab_size=VOCAB, num_layers=2, num_heads=4, head_dim=16, num_kv_heads=1, embed_dim=32,
        intermediate_dim=64, max_seq_len=64,
    ),
    "gemma2": lambda: gemma2(
        vocab_size=VOCAB, num_layers=2, num_heads=4, head_dim=8, num_kv_heads=2, embed_dim=32,
        intermediate_dim=64, max_seq_len=64, sliding_window_size=8,
    ),
    "phi3": lambda: phi3(
        vocab_size=VOCAB, num_layers=2, num_heads=4, num_kv_heads=4, embed_dim=32,
        intermediate_dim=64, max_seq_len=64,
    ),
    "mistral": lambda: mistral(
        vocab_size=VOCAB, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32,
        intermediate_dim=64, max_seq_len=64,
    ),
}


def build(name="llama3_2", seed=0):
    torch.manual_seed(seed)
    return BUILDERS[name]()


def tokens(batch=2, seq=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq), generator=g)


def keys(powers, sample_ids=None, step=3, token_keys=None):
    if sample_ids is None:
        sample_ids = list(range(10, 10 + len(powers)))
    return MaskKeys(torch.tensor(sample_ids), torch.tensor(powers), step, token_keys)


# ------------------------------------------------------------------------------------------
# Config and pure math
# ------------------------------------------------------------------------------------------


def test_config_validation_and_normalisation():
    cfg = HiddenAblationConfig(sites=["ffn_out", "attn_heads"])
    assert cfg.sites == ("ffn_out", "attn_heads")
    with pytest.raises(ValueError, match=r"1\.0.*\[0, 1\)|\[0, 1\).*1\.0"):
        HiddenAblationConfig(rate=1.0)
    with pytest.raises(ValueError, match=r"-0\.1"):
        HiddenAblationConfig(rate=-0.1)
    with pytest.raises(ValueError, match="ffn_hidden"):
        HiddenAblationConfig(sites=("mlp_hidden",))
    with pytest.raises(ValueError, match="granularity"):
        HiddenAblationConfig(granularity="token")


def test_nested_rate_values():
    assert nested_rate(0.1, 0) == 0.0
    assert [nested_rate(0.1, i) for i in (1, 2, 3)] == pytest.approx([0.1, 0.19, 0.271])
    t = nested_rate(0.1, torch.tensor([0, 1, 2, 3]))
    assert t[0].item() == 0.0
    assert t.tolist() == pytest.approx([0.0, 0.1, 0.19, 0.271], abs=1e-6)


def test_nested_unit_masks_by_hand():
    u = torch.tensor([[0.05, 0.5, 0.95], [0.05, 0.15, 0.2], [0.3, 0.0, 0.99]])
    rates = torch.tensor([0.1, 0.19, 0.0])
    expected = torch.tensor([[0, 1 / 0.9, 1 / 0.9], [0, 0, 1 / 0.81], [1, 1, 1]])
    assert torch.allclose(nested_unit_masks(u, rates), expected)
    assert torch.equal(nested_unit_masks(u, rates)[2], torch.ones(3))
    assert torch.equal(
        nested_unit_masks(u, rates, scale=False), (expected > 0).float()
    )
    # a rate that rounds to 1 drops everything without producing NaN
    m = nested_unit_masks(u, torch.tensor([1.0, 0.0, 0.0]))
    assert torch.equal(m[0], torch.zeros(3)) and not m.isnan().any()


@pytest.mark.parametrize("granularity", ["unit", "element"])
def test_masks_nested_across_powers(granularity):
    cfg = HiddenAblationConfig(rate=0.2, granularity=granularity)
    k = keys([0, 1, 2, 3, 4], sample_ids=[7] * 5)
    kept = site_mask(cfg, k, "ffn_hidden", 1, 512, 6) > 0
    assert kept[0].all()
    for i in range(1, 5):
        assert not (kept[i] & ~kept[i - 1]).any()  # kept at power i => kept at power i - 1
        assert (kept[i - 1] & ~kept[i]).any()  # and strictly fewer survive
        assert kept[i].float().mean().item() == pytest.approx(0.8**i, abs=0.05)


@pytest.mark.parametrize("granularity", ["unit", "element"])
def test_mask_follows_sample_not_row(granularity):
    cfg = HiddenAblationConfig(rate=0.3, granularity=granularity)
    k = keys([1, 2, 1, 3], sample_ids=[5, 9, 2, 40])
    perm = torch.tensor([2, 0, 3, 1])
    kp = MaskKeys(k.sample_ids[perm], k.powers[perm], k.step)
    for site in SITES:
        m = site_mask(cfg, k, site, 0, 16, 5)
        torch.manual_seed(123)  # global RNG must not matter
        assert torch.equal(site_mask(cfg, kp, site, 0, 16, 5), m[perm])
    # and the keys do matter: other step, layer, site, or sample -> other masks
    m = site_mask(cfg, k, "ffn_hidden", 0, 64, 5)
    other_step = keys([1, 2, 1, 3], [5, 9, 2, 40], step=4)
    assert not torch.equal(m, site_mask(cfg, other_step, "ffn_hidden", 0, 64, 5))
    assert not torch.equal(m, site_mask(cfg, k, "ffn_hidden", 1, 64, 5))
    assert not torch.equal(m, site_mask(cfg, k, "ffn_out", 0, 64, 5))
    assert not torch.equal(m[0], m[2])  # same power, different samples


def test_element_masks_vary_per_token_unit_masks_do_not():
    k = keys([2, 2])
    unit = site_mask(HiddenAblationConfig(rate=0.3), k, "ffn_hidden", 0, 64, 8)
    elem_cfg = HiddenAblationConfig(rate=0.3, granularity="element")
    elem = site_mask(elem_cfg, k, "ffn_hidden", 0, 64, 8)
    assert unit.shape == (2, 1, 64) and elem.shape == (2, 8, 64)
    assert all(not torch.equal(elem[:, 0], elem[:, t]) for t in range(1, 8))


def test_token_keys_make_cropped_rows_match_uncropped_columns():
    cfg = HiddenAblationConfig(rate=0.4, granularity="element")
    full = site_mask(cfg, keys([1, 2], [3, 4]), "attn_out", 1, 32, 10)
    kept = torch.tensor([[0, 2, 3, 7, 9], [1, 4, 5, 6, 8]])
    cropped = site_mask(cfg, keys([1, 2], [3, 4], token_keys=kept), "attn_out", 1, 32, 5)
    assert torch.equal(cropped, torch.stack([full[r, kept[r]] for r in range(2)]))
    with pytest.raises(ValueError, match="token_keys"):
        site_mask(cfg, keys([1, 2], [3, 4], token_keys=kept), "attn_out", 1, 32, 6)


@pytest.mark.parametrize("power", [1, 3])
def test_inverted_scale_keeps_expectation(power):
    cfg = HiddenAblationConfig(rate=0.1)
    m = site_mask(cfg, keys([power] * 4), "ffn_hidden", 0, 50_000, 1)
    assert m.mean().item() == pytest.approx(1.0, abs=0.01)
    values = m.unique()
    assert values[0].item() == 0.0 and values[1:].tolist() == pytest.approx([1 / 0.9**power])


def test_apply_unit_mask_groups_channels():
    x = torch.arange(2 * 3 * 6, dtype=torch.float32).reshape(2, 3, 6) + 1
    mask = torch.tensor([[[1.0, 0.0, 2.0]], [[0.0, 1.0, 1.0]]])
    out = apply_unit_mask(x, mask, group=2)
    assert torch.equal(out, x * mask.repeat_interleave(2, dim=-1))


def test_keys_context_restores():
    a, b = keys([1]), keys([2])
    assert current_hidden_ablation_keys() is None
    with hidden_ablation_keys(a):
        with hidden_ablation_keys(b):
            assert current_hidden_ablation_keys() is b
        assert current_hidden_ablation_keys() is a
        with pytest.raises(RuntimeError):
            with hidden_ablation_keys(None):
                assert current_hidden_ablation_keys() is None
                raise RuntimeError
        assert current_hidden_ablation_keys() is a
    assert current_hidden_ablation_keys() is None


# ------------------------------------------------------------------------------------------
# Hooks on torchtune models
# ------------------------------------------------------------------------------------------

ALL_SITES = HiddenAblationConfig(sites=SITES)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_hooks_are_exact_no_ops_without_ablation(name):
    plain, hooked = build(name), build(name)
    sd_keys = list(hooked.state_dict())
    handle = install_hidden_ablation(hooked, ALL_SITES)
    assert handle.num_layers == 2
    assert list(hooked.state_dict()) == sd_keys
    x = tokens()
    with torch.no_grad():
        ref = plain(x)
        assert torch.equal(hooked(x), ref)
        with hidden_ablation_keys(keys([0, 0])):
            assert torch.equal(hooked(x), ref)
        with hidden_ablation_keys(keys([0, 2])):
            out = hooked(x)
    # a power-0 row is exact even next to an ablated row
    assert torch.equal(out[0], ref[0]) and not torch.allclose(out[1], ref[1])


def _site_modules(layer, site):
    """(module, is_pre_hook) where the site's activation can be observed."""
    if site == "ffn_hidden":
        return layer.mlp.w2, True
    if site == "attn_heads":
        return layer.attn.output_proj, True
    scale = layer.sa_scale if site == "attn_out" else layer.mlp_scale
    if not isinstance(scale, nn.Identity):
        return scale, False
    return (layer.attn if site == "attn_out" else layer.mlp), False


@pytest.mark.parametrize("name", list(BUILDERS))
@pytest.mark.parametrize("site", SITES)
def test_each_site_masks_exactly_its_activation(name, site):
    model = build(name)
    cfg = HiddenAblationConfig(rate=0.5, sites=(site,))
    layers = list(model.layers)
    seen = {"raw": [], "masked": []}

    def capture(kind, pre):
        if pre:
            return lambda mod, args: seen[kind].append(args[0].detach().clone())
        return lambda mod, args, out: seen[kind].append(out.detach().clone())

    # hooks run in registration order: "raw" is registered before install, "masked" after
    for layer in layers:
        mod, pre = _site_modules(layer, site)
        (mod.register_forward_pre_hook if pre else mod.register_forward_hook)(capture("raw", pre))
    install_hidden_ablation(model, cfg)
    for layer in layers:
        mod, pre = _site_modules(layer, site)
        (mod.register_forward_pre_hook if pre else mod.register_forward_hook)(capture("masked", pre))

    k = keys([1, 2])
    x = tokens()
    with torch.no_grad():
        ref = model(x)
        seen["raw"].clear(), seen["masked"].clear()
        with hidden_ablation_keys(k):
            out = model(x)
    assert not torch.allclose(out, ref)
    for li, (raw, masked) in enumerate(zip(seen["raw"], seen["masked"])):
        if site == "attn_heads":
            heads = layers[li].attn.num_heads
            mask = site_mask(cfg, k, site, li, heads, x.shape[1])
            mask = mask.repeat_interleave(raw.shape[-1] // heads, dim=-1)
        else:
            mask = site_mask(cfg, k, site, li, raw.shape[-1], x.shape[1])
        assert (mask == 0).any()
        assert torch.equal(masked == 0, (mask == 0).expand_as(raw) | (raw == 0))
        assert torch.equal(masked, raw * mask)


def test_remove_restores_and_reinstall_is_allowed():
    model, plain = build(), build()
    x = tokens()
    handle = install_hidden_ablation(model, ALL_SITES)
    with pytest.raises(ValueError, match="already installed"):
        install_hidden_ablation(model, ALL_SITES)
    handle.remove()
    with torch.no_grad(), hidden_ablation_keys(keys([3, 3])):
        assert torch.equal(model(x), plain(x))
    install_hidden_ablation(model, ALL_SITES).remove()


def test_missing_site_and_wrong_batch_raise():
    class NoDown(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(32, 32)

        def forward(self, x):
            return self.proj(x)

    model = build()
    model.layers[1].mlp = NoDown()
    with pytest.raises(ValueError, match="w2"):
        install_hidden_ablation(model, HiddenAblationConfig(sites=("ffn_hidden",)))
    assert not any(m._forward_pre_hooks for m in model.modules())  # nothing left behind
    install_hidden_ablation(model, HiddenAblationConfig(sites=("ffn_out", "attn_heads")))
    with hidden_ablation_keys(keys([1, 1, 1])), pytest.raises(AssertionError, match="3 rows"):
        model(tokens(batch=2))


def test_plain_activation_checkpointing_is_refused():
    model = build()
    tt_training.set_activation_checkpointing(model, auto_wrap_policy=AC_POLICY)
    with pytest.raises(ValueError, match="set_activation_checkpointing"):
        install_hidden_ablation(model, ALL_SITES)


# ------------------------------------------------------------------------------------------
# Activation checkpointing: the recompute must see the forward's keys
# ------------------------------------------------------------------------------------------


def _grads_two_passes_one_backward(model, keys_a, keys_b, backward_keys=None, thread=False):
    """Pass A and pass B run forward under different keys, then one backward, run with
    ``backward_keys`` current (optionally on a fresh thread, which starts with no keys, like
    CUDA's autograd thread)."""
    x = tokens(batch=2, seq=10, seed=1)
    target = tokens(batch=2, seq=10, seed=2)
    model.zero_grad(set_to_none=True)
    losses = []
    for k in (keys_a, keys_b):
        with hidden_ablation_keys(k):
            losses.append(F.cross_entropy(model(x).flatten(0, 1), target.flatten()))
    loss = losses[0] + losses[1]
    errors = []

    def backward():
        try:
            with hidden_ablation_keys(backward_keys):
                loss.backward()
        except BaseException as e:  # re-raised on the calling thread
            errors.append(e)

    if thread:
        t = threading.Thread(target=backward)
        t.start()
        t.join()
    else:
        backward()
    if errors:
        raise errors[0]
    return {
        n.replace("._checkpoint_wrapped_module", ""): p.grad.clone()
        for n, p in model.named_parameters()
    }


def _assert_same_grads(g1, g2):
    assert g1.keys() == g2.keys()
    for n in g1:
        assert torch.equal(g1[n], g2[n]), n


@pytest.mark.parametrize("granularity", ["unit", "element"])
def test_gradients_identical_with_and_without_checkpointing(granularity):
    cfg = HiddenAblationConfig(rate=0.3, sites=SITES, granularity=granularity)
    base = build("llama3_2")
    ac = copy.deepcopy(base)
    install_hidden_ablation(base, cfg)
    set_activation_checkpointing(ac, AC_POLICY)  # before install: both orders are supported
    install_hidden_ablation(ac, cfg)
    assert sum(type(m).__name__ == "CheckpointWrapper" for m in ac.modules()) == 2

    token_keys = torch.tensor([[0, 1, 2, 4, 5, 6, 8, 9, 11, 12], list(range(10))])
    ka = keys([1, 1], [3, 8], step=5, token_keys=token_keys)
    kb = keys([2, 2], [3, 8], step=5, token_keys=token_keys)
    g_ref = _grads_two_passes_one_backward(base, ka, kb)
    _assert_same_grads(g_ref, _grads_two_passes_one_backward(ac, ka, kb))
    _assert_same_grads(g_ref, _grads_two_passes_one_backward(ac, ka, kb, backward_keys=kb))
    _assert_same_grads(g_ref, _grads_two_passes_one_backward(ac, ka, kb, thread=True))


def test_plain_checkpointing_gives_a_different_gradient():
    """The failure the checkpoint context prevents is real: without it the recompute uses the
    keys current at backward time. With pass B's keys still current, pass A's layers are
    recomputed with B's masks and the gradient is silently wrong; with no keys current, torch
    notices that the recompute saved fewer tensors and raises."""
    cfg = HiddenAblationConfig(rate=0.3, sites=SITES)
    base = build("llama3_2")
    plain_ac = copy.deepcopy(base)
    install_hidden_ablation(base, cfg)
    install_hidden_ablation(plain_ac, cfg)
    tt_training.set_activation_checkpointing(plain_ac, auto_wrap_policy=AC_POLICY)
    ka, kb = keys([1, 1], [3, 8], step=5), keys([2, 2], [3, 8], step=5)
    g_ref = _grads_two_passes_one_backward(base, ka, kb)
    g_bad = _grads_two_passes_one_backward(plain_ac, ka, kb, backward_keys=kb)
    assert any(not torch.allclose(g_ref[n], g_bad[n]) for n in g_ref)
    with pytest.raises(CheckpointError):
        _grads_two_passes_one_backward(plain_ac, ka, kb)
