"""LoRA / QLoRA preparation: settings, the adapters' start, merging, fingerprints, and the
comparative step on LoRA linears against the plain model they extend."""

import math

import pytest
import torch
from omegaconf import OmegaConf
from torchtune.modules.peft import LoRALinear, get_merged_lora_ckpt

from comparative_recipe.ablation.hidden import HiddenAblationConfig, install_hidden_ablation
from comparative_recipe.ablation.plan import ablation_plan
from comparative_recipe.loss import ComparativeLoss
from comparative_recipe.methods.comparative import disable_model_dropout
from comparative_recipe.models.tiny import init_tiny_llama, tiny_lora_llama, tiny_qlora_llama
from comparative_recipe.passes import ComparativeStepSpec, comparative_step
from comparative_recipe.tasks import SFTTask
from comparative_recipe.training.adapters import (
    LoRAAdapters,
    LoRASettings,
    base_fingerprint,
    lora_settings,
    merge_lora_weights,
)

MODEL = dict(vocab_size=128, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32,
             intermediate_dim=64, max_seq_len=64)
LORA = dict(lora_attn_modules=["q_proj", "v_proj", "output_proj"], apply_lora_to_mlp=True,
            lora_rank=4, lora_alpha=8)
TINY_LORA = "comparative_recipe.models.tiny.tiny_lora_llama"


def settings_of(**model):
    return lora_settings(OmegaConf.create({"_component_": TINY_LORA, **model}))


def lora_pair(**lora):
    """A plain tiny model and the LoRA model on its weights (lora_b zero, as built)."""
    plain = init_tiny_llama(seed=0, **MODEL)
    torch.manual_seed(1)
    model = tiny_lora_llama(**{**LORA, **lora}, **MODEL)
    missing, unexpected = model.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(".lora_" in k for k in missing)
    return plain, model


def batch(rows=4, seq=24, answer=6):
    tokens = torch.randint(1, MODEL["vocab_size"], (rows, seq), generator=torch.Generator().manual_seed(3))
    labels = torch.full_like(tokens, -100)
    labels[:, -answer:] = tokens[:, -answer:]
    return {"tokens": tokens, "labels": labels, "chunk_ids": torch.full_like(tokens, -1),
            "sample_ids": torch.arange(rows)}


# ------------------------------------------------------------------------------ settings

def test_settings_take_the_builders_defaults_and_the_config():
    s = settings_of(**MODEL, lora_attn_modules=["q_proj", "k_proj"], lora_rank=2)
    assert s == LoRASettings(rank=2, alpha=16.0, attn_modules=("q_proj", "k_proj"),
                             apply_to_mlp=False, apply_to_output=False, dropout=0.0,
                             quantize_base=False)
    assert s.target_modules == ["q_proj", "k_proj"] and s.scale == 8.0
    q = lora_settings(OmegaConf.create({"_component_": "comparative_recipe.models.tiny.tiny_qlora_llama",
                                        "lora_attn_modules": ["q_proj"], "apply_lora_to_mlp": True}))
    assert q.quantize_base and q.target_modules == ["q_proj", "w1", "w2", "w3"]
    assert lora_settings(OmegaConf.create({"_component_": "comparative_recipe.models.tiny.tiny_llama"})) is None


@pytest.mark.parametrize("model,needle", [
    ({"lora_attn_modules": ["q_proj"], "lora_rank": 0}, "model.lora_rank must be an integer >= 1, got 0"),
    ({"lora_attn_modules": ["q_proj"], "lora_rank": -4}, "model.lora_rank must be an integer >= 1"),
    ({"lora_attn_modules": ["q_proj", "o_proj"]}, "unknown projection 'o_proj'"),
    ({"lora_attn_modules": ["qproj"]}, "did you mean 'q_proj'?"),
    ({"lora_attn_modules": "q_proj"}, "must be a list of projection names"),
    ({"lora_attn_modules": []}, "the LoRA model has no adapter"),
    ({}, "model.lora_attn_modules is not set"),
    ({"lora_attn_modules": ["q_proj"], "lora_alpha": 0}, "model.lora_alpha must be a finite number > 0"),
    ({"lora_attn_modules": ["q_proj"], "lora_dropout": 1.0}, "model.lora_dropout must be a number in [0, 1)"),
    ({"lora_attn_modules": ["q_proj"], "lora_rnk": 8}, "model.lora_rnk (did you mean 'lora_rank'?) is not an argument"),
    ({"lora_attn_modules": ["q_proj"], "apply_lora_to_output": True}, "tied embeddings have no apply_lora_to_output"),
])
def test_bad_lora_settings_are_errors_naming_the_key(model, needle):
    with pytest.raises(ValueError, match=None) as e:
        settings_of(**model)
    assert needle in str(e.value)


def test_dora_is_refused():
    cfg = {"_component_": "torchtune.models.llama3_2.lora_llama3_2_1b",
           "lora_attn_modules": ["q_proj"], "use_dora": True}
    with pytest.raises(ValueError, match="DoRA is not supported"):
        lora_settings(OmegaConf.create(cfg))


def test_save_adapter_weights_only_without_adapters_is_an_error():
    cfg = OmegaConf.create({"model": {"_component_": "comparative_recipe.models.tiny.tiny_llama"},
                            "checkpointer": {}, "save_adapter_weights_only": True})
    with pytest.raises(ValueError, match="not a LoRA builder"):
        LoRAAdapters.from_config(cfg)


# ---------------------------------------------------------------------- the adapters' start

def adapters_for(model):
    adapters = LoRAAdapters(settings_of(**MODEL, **LORA))
    adapters.freeze_base(model)
    return adapters


def test_only_adapter_parameters_are_trainable():
    _, model = lora_pair()
    trainable = adapters_for(model).freeze_base(model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(".lora_a." in n or ".lora_b." in n for n in names)
    # rank 4 on q_proj and output_proj (32->32), v_proj (32->16: 2 kv heads of 8), w1, w3
    # (32->64) and w2 (64->32), on 2 layers
    per_layer = 2 * 4 * (32 + 32) + 4 * (32 + 16) + 3 * 4 * (32 + 64)
    assert trainable == sum(p.numel() for p in model.parameters() if p.requires_grad) == 2 * per_layer


def test_meta_models_draw_the_adapters_from_the_seed_like_torchtune():
    with torch.device("meta"):
        meta = tiny_lora_llama(**LORA, **MODEL)
    adapters = adapters_for(meta)
    a, b = adapters.initial_state(meta, seed=7), adapters.initial_state(meta, seed=7)
    assert sorted(a) == adapters.adapter_names
    for name, t in a.items():
        assert torch.equal(t, b[name]) and not t.is_meta
        if name.endswith("lora_b.weight"):
            assert torch.count_nonzero(t) == 0
        else:  # Kaiming uniform with a = sqrt(5): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
            bound = 1 / math.sqrt(t.shape[1])
            assert t.abs().max() <= bound and t.abs().max() > 0.8 * bound
    other = adapters.initial_state(meta, seed=8)
    assert not torch.equal(a["layers.0.attn.q_proj.lora_a.weight"], other["layers.0.attn.q_proj.lora_a.weight"])
    # a model on a device keeps the draw of its builder
    _, model = lora_pair()
    own = adapters_for(model).initial_state(model, seed=7)
    assert torch.equal(own["layers.1.mlp.w2.lora_a.weight"], model.layers[1].mlp.w2.lora_a.weight)


def test_an_adapter_of_other_shapes_is_refused_with_the_difference():
    _, model = lora_pair()
    adapters = adapters_for(model)
    state = adapters.initial_state(model, seed=0)
    bad = dict(state, **{"layers.0.attn.q_proj.lora_a.weight": torch.zeros(8, 32)})
    with pytest.raises(ValueError, match=r"does not fit this model .*shapes .*\(8, 32\) != \(4, 32\)"):
        adapters.check_state(model, bad, "ckpt")
    missing = {k: v for k, v in state.items() if ".mlp." not in k}
    with pytest.raises(ValueError, match="missing"):
        adapters.check_state(model, missing, "ckpt")


# ------------------------------------------------------------------- merging, fingerprints

def test_merging_equals_torchtunes_merge_and_the_lora_forward():
    _, model = lora_pair()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_b.weight.normal_(0, 0.1)
    state = model.state_dict()
    before = {k: v.clone() for k, v in state.items()}
    merged = merge_lora_weights(state, scale=LORA["lora_alpha"] / LORA["lora_rank"])
    assert all(torch.equal(state[k], before[k]) for k in state)  # nothing modified in place
    theirs = get_merged_lora_ckpt({k: v.clone() for k, v in state.items()},
                                  rank=LORA["lora_rank"], alpha=LORA["lora_alpha"])
    assert sorted(merged) == sorted(theirs)
    for k in theirs:
        torch.testing.assert_close(merged[k], theirs[k], rtol=1e-6, atol=1e-7)
    plain = init_tiny_llama(seed=5, **MODEL)
    plain.load_state_dict(merged)
    tokens = batch()["tokens"]
    with torch.no_grad():
        torch.testing.assert_close(plain(tokens), model(tokens), rtol=1e-5, atol=1e-5)


def test_fingerprints_tell_base_models_apart():
    a = init_tiny_llama(seed=0, **MODEL).state_dict()
    b = init_tiny_llama(seed=1, **MODEL).state_dict()
    assert base_fingerprint(a) == base_fingerprint({k: v.clone() for k, v in a.items()})
    assert base_fingerprint(a) != base_fingerprint(b)
    nudged = dict(a, **{"norm.scale": a["norm.scale"] + 1e-3})
    assert base_fingerprint(a) != base_fingerprint(nudged)


# ------------------------------------------------- the comparative step on LoRA linears

@pytest.mark.parametrize("strategy", ["sequential", "recompute"])
def test_masks_and_gradients_equal_those_of_the_plain_model(strategy):
    """With lora_b = 0 the LoRA model computes the plain model's function; the hidden masks act
    on the same units (inputs of w2 and output_proj, LoRA linears here), so every pass has the
    plain model's loss, and the adapters' gradients follow from the plain weights' gradients:
    dL/dB = scale * dL/dW @ A^T and dL/dA = scale * B^T dL/dW = 0."""
    plain, model = lora_pair(lora_dropout=0.25)
    adapters_for(model)
    dropped = disable_model_dropout(model)  # what the comparative method does with c >= 1
    assert sum(".dropout" in n for n in dropped) == 2 * 6  # every LoRA linear's dropout
    hidden = HiddenAblationConfig(rate=0.3, sites=("ffn_hidden", "attn_heads"), seed=2)
    for m in (plain, model):
        install_hidden_ablation(m, hidden)
    spec = ComparativeStepSpec(plan=ablation_plan(2, 0), task=SFTTask(), loss_fn=ComparativeLoss(),
                               strategy=strategy)
    b = batch()
    res_plain = comparative_step(plain, dict(b), spec, step=3)
    res_lora = comparative_step(model, dict(b), spec, step=3)
    torch.testing.assert_close(res_lora.losses, res_plain.losses, rtol=1e-6, atol=1e-6)
    assert res_plain.losses[:, 1:].ne(res_plain.losses[:, :1]).all()  # the masks did something
    scale = LORA["lora_alpha"] / LORA["lora_rank"]
    plain_modules = dict(plain.named_modules())
    checked = 0
    for name, m in model.named_modules():
        if not isinstance(m, LoRALinear):
            continue
        grad_w = plain_modules[name].weight.grad
        torch.testing.assert_close(m.lora_b.weight.grad, scale * grad_w @ m.lora_a.weight.T,
                                   rtol=1e-5, atol=1e-7)
        assert torch.count_nonzero(m.lora_a.weight.grad) == 0
        assert m.weight.grad is None
        checked += 1
    assert checked == 12
    assert all(p.grad is None for n, p in model.named_parameters() if ".lora_" not in n)


def test_qlora_keeps_nf4_base_weights_and_trains_the_adapters():
    from torchao.dtypes.nf4tensor import NF4Tensor

    dims = dict(MODEL, embed_dim=128, num_heads=4, num_kv_heads=4, intermediate_dim=256)
    model = tiny_qlora_llama(**LORA, **dims)
    model.load_state_dict(init_tiny_llama(seed=0, **dims).state_dict(), strict=False)
    adapters = LoRAAdapters(lora_settings(OmegaConf.create(
        {"_component_": "comparative_recipe.models.tiny.tiny_qlora_llama", **LORA})))
    adapters.freeze_base(model)
    assert isinstance(model.layers[0].attn.q_proj.weight, NF4Tensor)
    assert isinstance(model.layers[0].attn.k_proj.weight, NF4Tensor)  # FrozenNF4Linear
    install_hidden_ablation(model, HiddenAblationConfig(rate=0.2))
    spec = ComparativeStepSpec(plan=ablation_plan(1, 0), task=SFTTask(), loss_fn=ComparativeLoss())
    res = comparative_step(model, batch(), spec, step=0)
    assert torch.isfinite(res.losses).all()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == set(adapters.adapter_names)
    # the state dict gives bf16 base weights (torchtune's QLoRA hook), which merge
    merged = merge_lora_weights(model.state_dict(), adapters.settings.scale)
    assert merged["layers.0.attn.q_proj.weight"].dtype == torch.float32
    assert not any(".lora_" in k for k in merged)
