import copy
import random
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torchtune import training as tt_training
from torchtune.models.gemma import gemma
from torchtune.models.gemma2 import gemma2
from torchtune.models.llama3_2 import llama3_2
from torchtune.models.mistral import mistral
from torchtune.models.phi3 import phi3
from torchtune.models.qwen2 import qwen2
from torchtune.modules import TransformerSelfAttentionLayer

from comparative_recipe.ablation import hidden
from comparative_recipe.ablation import keys as hkeys
from comparative_recipe.ablation.hidden import (
    SITES,
    HiddenAblationConfig,
    MaskKeys,
    apply_unit_mask,
    check_hidden_ablation,
    current_hidden_ablation_keys,
    hidden_ablation_keys,
    install_hidden_ablation,
    nested_rate,
    nested_unit_masks,
    set_activation_checkpointing,
    site_mask,
    site_uniforms,
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
# A pure-Python reference of the mask hash (32-bit words as python ints)
# ------------------------------------------------------------------------------------------

W = 0xFFFFFFFF


def ref_mix(h):
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & W
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & W
    return h ^ (h >> 16)


def ref_combine(h, k):
    return ref_mix(h ^ ((k + 0x9E3779B9 + ((h << 6) & W) + (h >> 2)) & W))


def ref_hash(*ks):
    h = 0
    for k in ks:
        h = ref_combine(h, k & W)
    return h


def ref_pair(a, b):
    h = ((a ^ b) * 0x85EBCA6B) & W
    h ^= h >> 16
    return (h * 0xC2B2AE35) & W


def ref_word(seed, step, sample, site, layer, unit, token=None):
    """The documented word of (seed, step, sample id, site, layer, unit[, token key])."""
    key = ref_hash(seed, 1, SITES.index(site), layer)
    a = ref_combine(key, ref_hash(step, sample))
    if token is not None:
        a = ref_combine(a, token & W)
    return ref_pair(a, ref_hash(key, unit))


def ref_uniform(word):
    return (word ^ 0x80000000) / 2**32


def signed(words):
    return torch.tensor([w - (1 << 32) if w >= 1 << 31 else w for w in words], dtype=torch.int32)


def test_int32_arithmetic_wraps_modulo_2_32():
    """The int32 hash relies on wrapping multiply, add and shift-left; checked on a long tensor
    (vectorised kernels) and a short one (scalar tails)."""
    rng = random.Random(0)
    for n in (1000, 7):
        a = [rng.randrange(1 << 32) for _ in range(n)]
        t = signed(a)
        for c in (0x85EBCA6B, 0xC2B2AE35, 0x9E3779B9):
            c32 = c - (1 << 32)
            assert torch.equal(t * c32, signed([(x * c) & W for x in a]))
            assert torch.equal(t + c32, signed([(x + c) & W for x in a]))
        assert torch.equal(t << 6, signed([(x << 6) & W for x in a]))
        assert torch.equal(hkeys.shr32(t, 13), signed([x >> 13 for x in a]))


def test_int32_hash_matches_python_reference_on_random_keys():
    rng = random.Random(1)
    raw = [rng.randrange(-(1 << 40), 1 << 40) for _ in range(300)] + [-1, 0, (1 << 32) - 1]
    other = [rng.randrange(1 << 31) for _ in raw]
    got = hkeys.hash32(torch.tensor(raw), torch.tensor(other), 12345)
    assert torch.equal(got, signed([ref_hash(a, b, 12345) for a, b in zip(raw, other)]))
    assert torch.equal(hkeys.to_int32(torch.tensor(raw)), signed([a & W for a in raw]))
    a, b = [rng.randrange(1 << 32) for _ in range(64)], [rng.randrange(1 << 32) for _ in range(33)]
    grid = hkeys.pair_mix32(signed(a)[:, None], signed(b)[None, :])
    assert torch.equal(grid.flatten(), signed([ref_pair(x, y) for x in a for y in b]))


@pytest.mark.parametrize("chunk", [None, 37])
def test_masks_match_python_reference(chunk, monkeypatch):
    """site_mask (the hooks' function) against the reference words, for both granularities,
    random keys (large and negative ids, token keys -1 for padding), eager chunks forced small
    and the default."""
    if chunk is not None:
        monkeypatch.setitem(hidden.ELEMENT_CHUNK, "cpu", chunk)
    rng = random.Random(2)
    for granularity in ("unit", "element"):
        seed, step, layer = rng.randrange(1 << 31), rng.randrange(1 << 20), rng.randrange(40)
        site = rng.choice(SITES)
        cfg = HiddenAblationConfig(rate=0.35, granularity=granularity, seed=seed)
        sample_ids = [rng.randrange(-(1 << 35), 1 << 35) for _ in range(3)]
        powers = [0, 1, 3]
        tok = [[rng.randrange(-1, 5000) for _ in range(5)] for _ in sample_ids]
        k = MaskKeys(torch.tensor(sample_ids), torch.tensor(powers), step, torch.tensor(tok))
        units = 19
        got = site_mask(cfg, k, site, layer, units, 5)
        for r, (sid, power) in enumerate(zip(sample_ids, powers)):
            p = 1 - (1 - 0.35) ** power
            for s in range(got.shape[1]):
                token = tok[r][s] if granularity == "element" else None
                for j in range(units):
                    u = ref_uniform(ref_word(seed, step, sid, site, layer, j, token))
                    expected = torch.tensor(1 / (1 - p) if u >= p else 0.0, dtype=torch.float32)
                    assert got[r, s, j] == expected, (granularity, r, s, j)


def test_uniforms_and_float_rule_give_the_hook_masks():
    """nested_unit_masks on site_uniforms (float64) is the integer-threshold rule exactly."""
    k = keys([0, 1, 2, 5], [4, 4, 9, 9], step=11, token_keys=torch.arange(24).view(4, 6) * 3)
    for granularity in ("unit", "element"):
        cfg = HiddenAblationConfig(rate=0.3, granularity=granularity, seed=5)
        u = site_uniforms(5, k, "attn_out", 2, 300, 6 if granularity == "element" else None)
        rates = nested_rate(0.3, k.powers, dtype=torch.float64)
        expected = nested_unit_masks(u, rates).float()
        assert torch.equal(site_mask(cfg, k, "attn_out", 2, 300, 6), expected)


# ------------------------------------------------------------------------------------------
# Config and mask properties
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
    with pytest.raises(ValueError, match="repeat"):
        HiddenAblationConfig(sites=("ffn_out", "ffn_out"))
    with pytest.raises(ValueError, match="granularity"):
        HiddenAblationConfig(granularity="token")
    with pytest.raises(ValueError, match="scale"):
        HiddenAblationConfig(scale="no")
    with pytest.raises(ValueError, match="seed"):
        HiddenAblationConfig(seed=1.5)


def test_nested_rate_values():
    assert nested_rate(0.1, 0) == 0.0
    assert [nested_rate(0.1, i) for i in (1, 2, 3)] == pytest.approx([0.1, 0.19, 0.271])
    t = nested_rate(0.1, torch.tensor([0, 1, 2, 3]))
    assert t[0].item() == 0.0 and t.dtype == torch.float32
    assert t.tolist() == pytest.approx([0.0, 0.1, 0.19, 0.271], abs=1e-6)
    assert nested_rate(0.1, torch.tensor([3]), dtype=torch.float64).item() == pytest.approx(
        0.271, abs=1e-15
    )


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


def test_a_rate_that_rounds_to_one_drops_everything():
    cfg = HiddenAblationConfig(rate=0.9)
    m = site_mask(cfg, keys([400, 1]), "ffn_hidden", 0, 4096, 1)  # 0.1**400 == 0 in float64
    assert torch.equal(m[0], torch.zeros_like(m[0])) and not m.isnan().any()
    assert (m[1] > 0).any()


@pytest.mark.parametrize("granularity", ["unit", "element"])
def test_masks_nested_across_powers(granularity):
    cfg = HiddenAblationConfig(rate=0.2, granularity=granularity)
    k = keys([0, 1, 2, 3, 4], sample_ids=[7] * 5)
    kept = site_mask(cfg, k, "ffn_hidden", 1, 4096, 8) > 0
    assert kept[0].all()
    for i in range(1, 5):
        assert not (kept[i] & ~kept[i - 1]).any()  # kept at power i => kept at power i - 1
        assert (kept[i - 1] & ~kept[i]).any()  # and strictly fewer survive
        assert kept[i].float().mean().item() == pytest.approx(0.8**i, abs=0.02)


def _offdiag_correlations(x):
    """Correlations between the rows of x [n, m] (over the m columns), off the diagonal."""
    c = torch.corrcoef(x.double())
    return c[~torch.eye(len(c), dtype=torch.bool)]


def test_element_masks_are_independent_across_tokens_and_units():
    cfg = HiddenAblationConfig(rate=0.3, granularity="element")
    # tokens: 48 tokens x 4096 units; adjacent token keys are the hardest case for a hash
    kept = (site_mask(cfg, keys([1]), "ffn_hidden", 0, 4096, 48)[0] > 0).float()
    corr = _offdiag_correlations(kept)  # std 1/sqrt(4096) = 0.016 if independent
    assert corr.abs().max() < 0.08 and abs(corr.mean()) < 0.005
    assert kept.mean().item() == pytest.approx(0.7, abs=0.01)
    # units: 48 units over 4096 tokens
    kept = (site_mask(cfg, keys([1]), "ffn_hidden", 0, 48, 4096)[0] > 0).float()
    corr = _offdiag_correlations(kept.T)
    assert corr.abs().max() < 0.08 and abs(corr.mean()) < 0.005
    # rows (samples 0..15 at the same step), layers and sites
    per_sample = site_mask(cfg, keys([1] * 16, list(range(16))), "ffn_hidden", 0, 256, 16) > 0
    assert _offdiag_correlations(per_sample.flatten(1).float()).abs().max() < 0.08
    layers = torch.stack([
        site_mask(cfg, keys([1]), site, layer, 256, 16)[0].flatten() > 0
        for site in ("ffn_hidden", "ffn_out") for layer in range(4)
    ])
    assert _offdiag_correlations(layers.float()).abs().max() < 0.08


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
    # and the keys do matter: other step, layer, site, seed or sample -> other masks
    m = site_mask(cfg, k, "ffn_hidden", 0, 64, 5)
    other_step = keys([1, 2, 1, 3], [5, 9, 2, 40], step=4)
    assert not torch.equal(m, site_mask(cfg, other_step, "ffn_hidden", 0, 64, 5))
    assert not torch.equal(m, site_mask(cfg, k, "ffn_hidden", 1, 64, 5))
    assert not torch.equal(m, site_mask(cfg, k, "ffn_out", 0, 64, 5))
    other_seed = HiddenAblationConfig(rate=0.3, granularity=granularity, seed=1)
    assert not torch.equal(m, site_mask(other_seed, k, "ffn_hidden", 0, 64, 5))
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
    bf16 = site_mask(cfg, keys([power] * 4), "ffn_hidden", 0, 64, 1, dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16


def test_apply_unit_mask_groups_channels():
    x = torch.arange(2 * 3 * 6, dtype=torch.float32).reshape(2, 3, 6) + 1
    mask = torch.tensor([[[1.0, 0.0, 2.0]], [[0.0, 1.0, 1.0]]])
    out = apply_unit_mask(x, mask, group=2)
    assert torch.equal(out, x * mask.repeat_interleave(2, dim=-1))


def test_keys_context_restores():
    a, b = keys([0]), keys([0, 0])
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
    # per thread: another thread starts with no keys
    seen = []
    with hidden_ablation_keys(a):
        t = threading.Thread(target=lambda: seen.append(current_hidden_ablation_keys()))
        t.start()
        t.join()
    assert seen == [None]


# ------------------------------------------------------------------------------------------
# Explicit ablation: a pass that masks nothing is an error, not the full model's loss
# ------------------------------------------------------------------------------------------


def test_ablated_keys_on_a_model_without_hooks_raise():
    model = build()
    x = tokens()
    with torch.no_grad():
        ref = model(x)
        with hidden_ablation_keys(keys([0, 0])):  # the full model: nothing to mask
            assert torch.equal(model(x), ref)
        with pytest.raises(ValueError, match="no hidden-ablation hook ran.*install_hidden_abl"):
            with hidden_ablation_keys(keys([0, 1])):
                model(x)
        # an error inside the block is not replaced by this one
        with pytest.raises(KeyError):
            with hidden_ablation_keys(keys([1, 1])):
                raise KeyError("inner")
    with pytest.raises(ValueError, match=r"install_hidden_ablation\(model, cfg\).*n_hidden: 0"):
        check_hidden_ablation(model)
    handle = install_hidden_ablation(model, HiddenAblationConfig())
    assert check_hidden_ablation(model) is handle
    with torch.no_grad(), hidden_ablation_keys(keys([0, 1])):
        assert not torch.allclose(model(x), ref)
    handle.remove()
    with pytest.raises(ValueError, match="install_hidden_ablation"):
        check_hidden_ablation(model)


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


@pytest.mark.parametrize("granularity", ["unit", "element"])
@pytest.mark.parametrize("name", list(BUILDERS))
@pytest.mark.parametrize("site", SITES)
def test_each_site_masks_exactly_its_activation(name, site, granularity):
    model = build(name)
    cfg = HiddenAblationConfig(rate=0.5, sites=(site,), granularity=granularity)
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
        register = mod.register_forward_pre_hook if pre else mod.register_forward_hook
        register(capture("masked", pre))

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


@pytest.mark.parametrize("site", ["ffn_hidden", "attn_heads"])
def test_one_layer_gets_exactly_the_all_layer_masks_of_that_layer(site):
    """``layers=[1]``: layer 1 is masked as the all-layer ablation masks it, layer 0 not."""
    x, k = tokens(), keys([1, 1])
    cfg = HiddenAblationConfig(rate=0.4, sites=(site,), seed=7)
    model = build()

    def forward(layers):
        seen = []
        record = lambda lay, a: seen.append((lay.layer_index, a.detach().clone()))  # noqa: E731
        before = hidden.neurons.register_site_hook(model, site, record)  # runs before the masks
        handle = install_hidden_ablation(model, cfg, layers=layers)
        after = hidden.neurons.register_site_hook(model, site, record)  # and after them
        with torch.no_grad(), hidden_ablation_keys(k):
            out = model(x)
        for h in (handle, before, after):
            h.remove()
        return out, seen

    all_out, _ = forward(None)
    one_out, seen = forward([1])
    with torch.no_grad():
        assert not torch.allclose(one_out, model(x)) and not torch.allclose(one_out, all_out)
    (l0a, raw0), (l0b, after0), (l1a, raw1), (l1b, after1) = seen
    assert (l0a, l0b, l1a, l1b) == (0, 0, 1, 1)
    assert torch.equal(raw0, after0)  # layer 0 untouched
    units = model.layers[1].attn.num_heads if site == "attn_heads" else raw1.shape[-2]
    mask = site_mask(cfg, k, site, 1, units, x.shape[1])
    assert (mask == 0).any()
    assert torch.equal(after1, raw1 * mask[..., None])  # the all-layer masks of layer 1
    with pytest.raises(ValueError, match=r"layers must be indices in \[0, 2\)"):
        install_hidden_ablation(model, cfg, layers=[2])


def test_remove_restores_and_reinstall_is_allowed():
    model, plain = build(), build()
    x = tokens()
    buffers = [n for n, _ in model.named_buffers()]
    handle = install_hidden_ablation(model, ALL_SITES)
    assert len(list(model.named_buffers())) == len(buffers) + 2 * 2 * len(SITES)
    with pytest.raises(ValueError, match="already installed"):
        install_hidden_ablation(model, ALL_SITES)
    handle.remove()
    assert [n for n, _ in model.named_buffers()] == buffers
    with torch.no_grad():
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
    buffers = [n for n, _ in model.named_buffers()]
    model.layers[1].mlp = NoDown()
    with pytest.raises(ValueError, match="w2"):
        install_hidden_ablation(model, HiddenAblationConfig(sites=("attn_out", "ffn_hidden")))
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    assert [n for n, _ in model.named_buffers()] == buffers  # nothing left behind
    install_hidden_ablation(model, HiddenAblationConfig(sites=("ffn_out", "attn_heads")))
    with hidden_ablation_keys(keys([1, 1, 1])), pytest.raises(ValueError, match="3 rows"):
        model(tokens(batch=2))


def test_install_on_meta_weights_is_refused():
    with torch.device("meta"):
        model = build()
    with pytest.raises(ValueError, match="meta"):
        install_hidden_ablation(model, ALL_SITES)


# ------------------------------------------------------------------------------------------
# Activation checkpointing: the recompute must see the forward's keys
# ------------------------------------------------------------------------------------------


def _grads_two_passes_one_backward(model, keys_a, keys_b, backward_in_b=False, thread=False):
    """Pass A and pass B run forward under different keys, then one backward: after both
    blocks, or inside pass B's block (B's keys current, ``backward_in_b``), or on a fresh thread
    (which starts with no keys, like CUDA's autograd thread)."""
    x = tokens(batch=2, seq=10, seed=1)
    target = tokens(batch=2, seq=10, seed=2)
    model.zero_grad(set_to_none=True)

    def loss_of(k):
        with hidden_ablation_keys(k):
            return F.cross_entropy(model(x).flatten(0, 1), target.flatten())

    loss_a = loss_of(keys_a)
    errors = []

    def backward(loss):
        try:
            loss.backward()
        except BaseException as e:  # re-raised on the calling thread
            errors.append(e)

    if backward_in_b:
        with hidden_ablation_keys(keys_b):
            loss_b = F.cross_entropy(model(x).flatten(0, 1), target.flatten())
            backward(loss_a + loss_b)
    else:
        loss = loss_a + loss_of(keys_b)
        if thread:
            t = threading.Thread(target=backward, args=(loss,))
            t.start()
            t.join()
        else:
            backward(loss)
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


@pytest.mark.parametrize("ac_first", [True, False])
@pytest.mark.parametrize("granularity", ["unit", "element"])
def test_gradients_identical_with_and_without_checkpointing(granularity, ac_first):
    cfg = HiddenAblationConfig(rate=0.3, sites=SITES, granularity=granularity)
    base = build("llama3_2")
    ac = copy.deepcopy(base)
    install_hidden_ablation(base, cfg)
    if ac_first:  # both orders are supported
        set_activation_checkpointing(ac, AC_POLICY)
        install_hidden_ablation(ac, cfg)
    else:
        install_hidden_ablation(ac, cfg)
        set_activation_checkpointing(ac, AC_POLICY)
    assert sum(type(m).__name__ == "CheckpointWrapper" for m in ac.modules()) == 2
    check_hidden_ablation(ac)

    token_keys = torch.tensor([[0, 1, 2, 4, 5, 6, 8, 9, 11, 12], list(range(10))])
    ka = keys([1, 1], [3, 8], step=5, token_keys=token_keys)
    kb = keys([2, 2], [3, 8], step=5, token_keys=token_keys)
    g_ref = _grads_two_passes_one_backward(base, ka, kb)
    _assert_same_grads(g_ref, _grads_two_passes_one_backward(ac, ka, kb))
    _assert_same_grads(g_ref, _grads_two_passes_one_backward(ac, ka, kb, backward_in_b=True))
    _assert_same_grads(g_ref, _grads_two_passes_one_backward(ac, ka, kb, thread=True))


def test_plain_activation_checkpointing_before_install_is_refused():
    model = build()
    tt_training.set_activation_checkpointing(model, auto_wrap_policy=AC_POLICY)
    with pytest.raises(ValueError, match="'layers.0'.*hidden.set_activation_checkpointing"):
        install_hidden_ablation(model, ALL_SITES)


FOREIGN_CHECK = (
    r"cannot carry the hidden-ablation masks: 'layers\.0', 'layers\.1' are CheckpointWrappers"
    r".*comparative_recipe\.ablation\.hidden\.set_activation_checkpointing\(model, "
    r"auto_wrap_policy\) instead"
)
FOREIGN_RECOMPUTE = (
    r"recompute during backward that does not carry the forward's mask keys.*"
    r"comparative_recipe\.ablation\.hidden\.set_activation_checkpointing"
)


def test_torchtune_checkpointing_after_install_fails_with_instructions():
    """torchtune's set_activation_checkpointing after install: the step's check says what to
    do, and a backward without that check raises the same advice instead of torch's "A
    different number of tensors was saved" (no keys at backward) or a silently wrong gradient
    (pass B's keys still current)."""
    model = build()
    install_hidden_ablation(model, ALL_SITES)
    tt_training.set_activation_checkpointing(model, auto_wrap_policy=AC_POLICY)
    with pytest.raises(ValueError, match=FOREIGN_CHECK):
        check_hidden_ablation(model)
    ka, kb = keys([1, 1], [3, 8], step=5), keys([2, 2], [3, 8], step=5)
    for backward_in_b in (False, True):
        with pytest.raises(ValueError, match=FOREIGN_RECOMPUTE):
            _grads_two_passes_one_backward(model, ka, kb, backward_in_b=backward_in_b)
    with pytest.raises(ValueError, match=FOREIGN_RECOMPUTE):
        _grads_two_passes_one_backward(model, ka, kb, thread=True)


def test_any_foreign_checkpoint_wrapper_is_named():
    model = build()
    install_hidden_ablation(model, ALL_SITES)
    check_hidden_ablation(model)
    model.layers[1] = checkpoint_wrapper(model.layers[1])
    with pytest.raises(ValueError, match=r"'layers\.1' is a CheckpointWrapper without"):
        check_hidden_ablation(model)


def test_check_walks_the_model_only_after_its_tree_changed(monkeypatch):
    calls = []
    walk = hidden._foreign_wrappers
    monkeypatch.setattr(hidden, "_foreign_wrappers", lambda m: calls.append(1) or walk(m))
    model = build()
    install_hidden_ablation(model, ALL_SITES)
    calls.clear()
    for _ in range(3):
        check_hidden_ablation(model)
    assert calls == []
    set_activation_checkpointing(model, AC_POLICY)
    check_hidden_ablation(model)
    check_hidden_ablation(model)
    assert calls == [1]
    model.layers[0] = build().layers[0]  # a layer replaced: its hooks are gone
    with pytest.raises(ValueError, match="layers changed"):
        check_hidden_ablation(model)
