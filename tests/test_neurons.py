"""The neuron sites: where they are, how many units, and that reading one hands exactly the
activation entering w2 / output_proj (or leaving attn / mlp), compared with hooks written here."""

from copy import deepcopy

import pytest
import torch
from torch import nn
from torchtune import training as tt_training
from torchtune.models.gemma import gemma
from torchtune.models.gemma2 import gemma2
from torchtune.models.llama3_2 import llama3_2, lora_llama3_2
from torchtune.models.mistral import mistral
from torchtune.models.phi3 import phi3
from torchtune.models.qwen2 import qwen2
from torchtune.modules import TransformerSelfAttentionLayer

from comparative_recipe.ablation.hidden import (
    HiddenAblationConfig,
    MaskKeys,
    hidden_ablation_keys,
    install_hidden_ablation,
    set_activation_checkpointing,
    site_mask,
)
from comparative_recipe.models.tiny import tiny_llama
from comparative_recipe.neurons import (
    SITES,
    capture_site_activations,
    find_layers,
    mask_units,
    register_site_hook,
    site_layout,
    site_layouts,
    unit_counts,
)


def tiny(seed=0):
    torch.manual_seed(seed)
    return tiny_llama(vocab_size=512, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32,
                      intermediate_dim=64, max_seq_len=256)


def tokens(batch=2, seq=9):
    return torch.randint(0, 512, (batch, seq), generator=torch.Generator().manual_seed(0))


def test_unit_counts_of_the_tiny_llama():
    model = tiny()
    assert unit_counts(model) == {
        "ffn_hidden": [64, 64], "attn_heads": [4, 4], "attn_out": [32, 32], "ffn_out": [32, 32],
    }
    heads = site_layouts(model, "attn_heads")
    assert [(lay.group, lay.width, lay.num_kv_heads, lay.heads_per_kv) for lay in heads] == [
        (8, 32, 2, 2)
    ] * 2
    assert heads[1].kv_head_index().tolist() == [0, 0, 1, 1]
    layer = model.layers[1]
    expected = {
        "ffn_hidden": (layer.mlp.w2, "input"), "attn_heads": (layer.attn.output_proj, "input"),
        "attn_out": (layer.attn, "output"), "ffn_out": (layer.mlp, "output"),
    }
    for site, (module, side) in expected.items():
        lay = site_layout(layer, site, 1)
        assert lay.module is module and lay.side == side and lay.layer is layer


def test_layouts_of_other_architectures():
    torch.manual_seed(0)
    g = gemma(vocab_size=64, num_layers=1, num_heads=4, head_dim=16, num_kv_heads=1, embed_dim=32,
              intermediate_dim=48, max_seq_len=32)
    assert unit_counts(g) == {"ffn_hidden": [48], "attn_heads": [4], "attn_out": [32],
                              "ffn_out": [32]}
    assert site_layouts(g, "attn_heads")[0].group == 16  # heads * head_dim != embed_dim
    assert site_layouts(g, "attn_heads")[0].heads_per_kv == 4
    g2 = gemma2(vocab_size=64, num_layers=1, num_heads=4, head_dim=8, num_kv_heads=2,
                embed_dim=32, intermediate_dim=48, max_seq_len=32, sliding_window_size=8)
    layer = g2.layers[0]
    # gemma2 normalises each branch after it: the branch's output is the norm's output
    assert site_layout(layer, "attn_out").module is layer.sa_scale
    assert site_layout(layer, "ffn_out").module is layer.mlp_scale
    lora = lora_llama3_2(["q_proj", "output_proj"], apply_lora_to_mlp=True, vocab_size=64,
                         num_layers=1, num_heads=4, num_kv_heads=2, embed_dim=32,
                         intermediate_dim=48, max_seq_len=32, lora_rank=2, lora_alpha=4)
    assert unit_counts(lora) == {"ffn_hidden": [48], "attn_heads": [4], "attn_out": [32],
                                 "ffn_out": [32]}


def test_layers_are_found_through_checkpoint_wrappers():
    for wrap in (lambda m: tt_training.set_activation_checkpointing(
                     m, auto_wrap_policy={TransformerSelfAttentionLayer}),
                 lambda m: set_activation_checkpointing(m, {TransformerSelfAttentionLayer})):
        model = tiny()
        layers = list(model.layers)
        wrap(model)
        assert type(model.layers[0]).__name__ == "CheckpointWrapper"
        assert find_layers(model) == layers
        assert unit_counts(model)["ffn_hidden"] == [64, 64]


def test_missing_modules_are_named():
    model = tiny()
    layer = model.layers[0]
    layer.mlp = nn.Sequential(nn.Linear(32, 64), nn.Linear(64, 32))
    with pytest.raises(ValueError, match=r"site 'ffn_hidden' needs layer\.mlp\.w2"):
        site_layout(layer, "ffn_hidden")
    assert site_layout(layer, "ffn_out").units == 32  # counted from the attention's output
    with pytest.raises(ValueError, match="neuron site must be one of"):
        site_layout(layer, "mlp_hidden")
    with pytest.raises(ValueError, match="not a transformer layer"):
        site_layout(layer.attn, "ffn_hidden")


def _independent_capture(model, site):
    """The activation of ``site`` per layer, by hooks written here: [R, S, width]."""
    seen = {}
    handles = []
    for i, layer in enumerate(model.layers):
        if site == "ffn_hidden":
            handles.append(layer.mlp.w2.register_forward_pre_hook(
                lambda m, a, i=i: seen.setdefault(i, a[0].detach().clone())))
        elif site == "attn_heads":
            handles.append(layer.attn.output_proj.register_forward_pre_hook(
                lambda m, a, i=i: seen.setdefault(i, a[0].detach().clone())))
        else:
            mod = layer.attn if site == "attn_out" else layer.mlp
            handles.append(mod.register_forward_hook(
                lambda m, a, out, i=i: seen.setdefault(i, out.detach().clone())))
    return seen, handles


@pytest.mark.parametrize("site", SITES)
def test_reading_a_site_returns_exactly_its_activation(site):
    model = tiny()
    ref, handles = _independent_capture(model, site)
    with torch.no_grad(), capture_site_activations(model, site) as acts:
        model(tokens())
    for h in handles:
        h.remove()
    lays = site_layouts(model, site)
    assert sorted(acts) == [0, 1]
    for i, lay in enumerate(lays):
        (got,) = acts[i]
        assert got.shape == (2, 9, lay.units, lay.group)
        assert torch.equal(got.flatten(-2), ref[i])
    # the hooks are gone after the block
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


def test_query_heads_share_the_kv_head_the_layout_names():
    """Perturbing kv head g's key projection changes exactly the query heads that the layout
    maps to g."""
    model = tiny()
    layer_index = 1
    attn = model.layers[layer_index].attn
    lay = site_layouts(model, "attn_heads")[layer_index]
    x = tokens()
    with torch.no_grad(), capture_site_activations(model, "attn_heads") as before:
        model(x)
    for g in range(lay.num_kv_heads):
        with torch.no_grad():
            saved = attn.k_proj.weight.clone()
            attn.k_proj.weight[g * attn.head_dim:(g + 1) * attn.head_dim] *= 3.0
            with capture_site_activations(model, "attn_heads") as after:
                model(x)
            attn.k_proj.weight.copy_(saved)
        changed = [
            not torch.equal(before[layer_index][0][:, :, h], after[layer_index][0][:, :, h])
            for h in range(lay.units)
        ]
        assert changed == (lay.kv_head_index() == g).tolist()


def test_reading_sees_the_masks_unless_prepended():
    model = tiny()
    install_hidden_ablation(model, HiddenAblationConfig(rate=0.5, sites=("attn_heads",)))
    keys = MaskKeys(torch.tensor([3, 4]), torch.tensor([0, 2]), step=1)
    with torch.no_grad(), hidden_ablation_keys(keys):
        with capture_site_activations(model, "attn_heads") as masked, \
                capture_site_activations(model, "attn_heads", prepend=True) as raw:
            model(tokens())
    m, r = masked[0][0], raw[0][0]
    assert torch.equal(m[0], r[0])  # drop power 0: untouched
    dropped = (m[1] == 0).all(-1) & (r[1] != 0).any(-1)  # [S, heads]
    assert dropped.any() and (dropped == dropped[0]).all()  # unit masks: the same at every token


def test_a_site_hook_can_replace_the_activation():
    """Zeroing head 1 through the hook equals zeroing the output projection's head-1 columns."""
    model, reference = tiny(), tiny()
    with torch.no_grad():
        for layer in reference.layers:
            layer.attn.output_proj.weight[:, 8:16] = 0.0

    def drop_head_1(lay, acts):
        mask = torch.ones(lay.units)
        mask[1] = 0.0
        return acts * mask[:, None]

    handle = register_site_hook(model, "attn_heads", drop_head_1)
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-6)
    handle.remove()
    with torch.no_grad():
        assert not torch.allclose(model(x), reference(x))


def test_mask_units_groups_channels_of_a_unit():
    x = torch.randn(2, 3, 4 * 5)
    mask = (torch.rand(2, 3, 4) > 0.5).float()
    expected = x.clone()
    for u in range(4):
        expected[..., u * 5:(u + 1) * 5] *= mask[..., u:u + 1]
    assert torch.equal(mask_units(x, mask, 5), expected)


@pytest.fixture
def one_rank_group(tmp_path):
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    yield
    dist.destroy_process_group()


def test_sites_through_fsdp2(one_rank_group):
    """FSDP2 (one unit per layer, then the root) keeps the sites, their counts, what reading
    them returns and the ablation's masks."""
    from torch.distributed.fsdp import fully_shard

    plain, sharded = tiny(), tiny()
    for layer in sharded.layers:
        fully_shard(layer)
    fully_shard(sharded)
    assert unit_counts(sharded) == unit_counts(plain)
    cfg = HiddenAblationConfig(rate=0.4, sites=("ffn_hidden", "attn_heads"),
                               granularity="element")
    for model in (plain, sharded):
        install_hidden_ablation(model, cfg)
    keys = MaskKeys(torch.tensor([5, 6]), torch.tensor([1, 2]), step=2)
    x = tokens()
    found = []
    for model in (plain, sharded):
        with torch.no_grad(), hidden_ablation_keys(keys), \
                capture_site_activations(model, "ffn_hidden") as acts:
            found.append((model(x), acts[1][0]))
    torch.testing.assert_close(found[1][0], found[0][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(found[1][1], found[0][1], rtol=1e-5, atol=1e-6)
    assert (found[1][1] == 0).any()  # the masked activation was read


# ------------------------------------------------------------------ the families shipped configs use

# Tiny instances of the component builders behind configs/<family>/ (qwen2_5 builds with qwen2),
# with the sizes that decide the site layout: (builder, layers, heads, kv heads, head_dim,
# embed_dim, intermediate_dim). gemma2's heads * head_dim (64) differ from its residual width
# (32), as in gemma2_2b (8 * 256 != 2304); phi3 has as many kv heads as query heads.
FAMILIES = {
    "llama3_2": (lambda: llama3_2(vocab_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                                  embed_dim=32, intermediate_dim=48, max_seq_len=32),
                 2, 4, 2, 8, 32, 48),
    "qwen2_5": (lambda: qwen2(vocab_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                              embed_dim=32, intermediate_dim=48, max_seq_len=32),
                2, 4, 2, 8, 32, 48),
    "gemma2": (lambda: gemma2(vocab_size=64, num_layers=2, num_heads=4, head_dim=16,
                              num_kv_heads=2, embed_dim=32, intermediate_dim=48, max_seq_len=32,
                              sliding_window_size=4),
               2, 4, 2, 16, 32, 48),
    "phi3": (lambda: phi3(vocab_size=64, num_layers=2, num_heads=4, num_kv_heads=4, embed_dim=32,
                          intermediate_dim=48, max_seq_len=32),
             2, 4, 4, 8, 32, 48),
    "mistral": (lambda: mistral(vocab_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                                embed_dim=32, intermediate_dim=48, max_seq_len=32),
                2, 4, 2, 8, 32, 48),
}


def family(name, seed=0):
    torch.manual_seed(seed)
    model = FAMILIES[name][0]()
    model.eval()
    return model


def family_tokens(batch=2, seq=10):
    return torch.randint(0, 64, (batch, seq), generator=torch.Generator().manual_seed(1))


def zero_units_in_weights(model, site, dropped):
    """The reference: removes units by zeroing the weights that read them. ``dropped[layer]`` is
    a bool [units]; ffn_hidden: w2's input columns; attn_heads: output_proj's head_dim-column
    block of each head."""
    with torch.no_grad():
        for li, layer in enumerate(model.layers):
            if site == "ffn_hidden":
                layer.mlp.w2.weight[:, dropped[li]] = 0.0
            else:
                cols = dropped[li].repeat_interleave(layer.attn.head_dim)
                layer.attn.output_proj.weight[:, cols] = 0.0
    return model


@pytest.mark.parametrize("name", list(FAMILIES))
def test_unit_counts_of_each_family(name):
    _, layers, heads, kv, head_dim, embed, hidden = FAMILIES[name]
    model = family(name)
    assert type(model.layers[0].attn).__name__ in ("MultiHeadAttention", "Gemma2Attention")
    assert unit_counts(model) == {
        "ffn_hidden": [hidden] * layers, "attn_heads": [heads] * layers,
        "attn_out": [embed] * layers, "ffn_out": [embed] * layers,
    }
    for lay in site_layouts(model, "attn_heads"):
        assert (lay.group, lay.num_kv_heads, lay.heads_per_kv) == (head_dim, kv, heads // kv)
        assert lay.module is lay.layer.attn.output_proj and lay.side == "input"
    for lay in site_layouts(model, "ffn_hidden"):
        assert lay.module is lay.layer.mlp.w2 and lay.group == 1


@pytest.mark.parametrize("site", ["ffn_hidden", "attn_heads"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_masking_a_unit_removes_exactly_its_contribution(name, site):
    """Masking unit 1 of ``site`` on every layer through the site hook gives the logits of the
    same model with the weights that read unit 1 zeroed, and differs from the full model."""
    model = family(name)
    units = unit_counts(model, [site])[site]
    dropped = [torch.arange(n) == 1 for n in units]
    reference = zero_units_in_weights(deepcopy(model), site, dropped)

    def drop(lay, acts):
        mask = (~dropped[lay.layer_index]).to(acts.dtype)
        return mask_units(acts.flatten(-2), mask, lay.group).unflatten(-1, (lay.units, lay.group))

    x = family_tokens()
    with torch.no_grad():
        full = model(x)
        handle = register_site_hook(model, site, drop)
        masked = model(x)
        handle.remove()
        torch.testing.assert_close(masked, reference(x), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(masked, full)
        torch.testing.assert_close(model(x), full, rtol=0, atol=0)  # the hook is gone


@pytest.mark.parametrize("name", list(FAMILIES))
def test_hidden_ablation_on_each_family_drops_the_masked_units(name):
    """install_hidden_ablation on a tiny instance of each family: a forward with masks keyed by
    sample and drop power gives, row by row, the model whose weights reading the masked FFN units
    and heads are zeroed (unit masks, no rescaling); a power-0 row is the full model."""
    sites = ("ffn_hidden", "attn_heads")
    cfg = HiddenAblationConfig(rate=0.4, sites=sites, granularity="unit", scale=False)
    model = family(name)
    plain = deepcopy(model)
    install_hidden_ablation(model, cfg)
    x = family_tokens(batch=3)
    keys = MaskKeys(torch.tensor([7, 8, 9]), torch.tensor([0, 1, 2]), step=5)
    with torch.no_grad(), hidden_ablation_keys(keys):
        out = model(x)
    with torch.no_grad():
        assert torch.equal(out[0], plain(x)[0])
    n_dropped = 0
    for row in (1, 2):
        reference = deepcopy(plain)
        for site in sites:
            units = unit_counts(plain, [site])[site]
            dropped = [site_mask(cfg, keys, site, li, n, x.shape[1])[row, 0] == 0
                       for li, n in enumerate(units)]
            n_dropped += sum(int(d.sum()) for d in dropped)
            zero_units_in_weights(reference, site, dropped)
        with torch.no_grad():
            torch.testing.assert_close(out[row], reference(x[row:row + 1])[0], rtol=1e-5,
                                       atol=1e-5)
    assert n_dropped > 0
