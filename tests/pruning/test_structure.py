"""Removing units is masking them: a cut model computes what the full model computes with those
units zeroed by hand (hooks written here), for FFN units, grouped-query heads and MHA heads
(which take their kv head along), across model families; the pruned-model builder rebuilds a
cut model's shapes so that its state dict loads strictly."""

import pytest
import torch
from torch import nn
from torchtune.models.llama3_2 import llama3_2
from torchtune.models.qwen2 import qwen2

from comparative_recipe.models.pruned import pruned_model
from comparative_recipe.models.tiny import init_tiny_llama
from comparative_recipe.pruning.structure import (
    check_head_grouping,
    compacted_keep,
    layer_sizes,
    shrink_layer,
    shrink_model,
)


def zeroing_hooks(model, removed_ffn, removed_heads, head_dim):
    """Forward pre-hooks on w2 / output_proj that zero the removed channels by hand."""
    handles = []
    for i, layer in enumerate(model.layers):
        def ffn(mod, args, idx=removed_ffn[i]):
            x = args[0].clone()
            x[..., idx] = 0
            return (x,)

        def heads(mod, args, idx=removed_heads[i]):
            x = args[0].clone()
            for h in idx:
                x[..., h * head_dim:(h + 1) * head_dim] = 0
            return (x,)

        handles.append(layer.mlp.w2.register_forward_pre_hook(ffn))
        handles.append(layer.attn.output_proj.register_forward_pre_hook(heads))
    return handles


def removed(keep, n):
    return [u for u in range(n) if u not in set(keep)]


@pytest.mark.parametrize("family", ["llama_gqa", "llama_mha", "qwen2_bias"])
def test_a_cut_model_computes_the_masked_full_model(family):
    torch.manual_seed(0)
    if family == "llama_gqa":
        model = llama3_2(vocab_size=97, num_layers=2, num_heads=6, num_kv_heads=2, embed_dim=48,
                         max_seq_len=64, intermediate_dim=40)
        heads = [torch.tensor([0, 2, 4, 5]), torch.tensor([1, 2, 3, 4])]  # 2 per kv group
    elif family == "llama_mha":
        model = llama3_2(vocab_size=97, num_layers=2, num_heads=4, num_kv_heads=4, embed_dim=32,
                         max_seq_len=64, intermediate_dim=40)
        heads = [torch.tensor([1, 3]), torch.tensor([0, 1, 2])]
    else:
        model = qwen2(vocab_size=97, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32,
                      intermediate_dim=40, max_seq_len=64)
        heads = [torch.tensor([0, 2]), torch.tensor([0, 1, 2, 3])]
    model.eval()
    n_heads, head_dim = model.layers[0].attn.num_heads, model.layers[0].attn.head_dim
    ffn = [torch.tensor([0, 3, 7, 8, 20, 39]), torch.arange(0, 40, 3)]
    tokens = torch.randint(0, 97, (3, 17))
    handles = zeroing_hooks(model, [removed(k.tolist(), 40) for k in ffn],
                            [removed(k.tolist(), n_heads) for k in heads], head_dim)
    with torch.no_grad():
        expected = model(tokens)
    for h in handles:
        h.remove()
    shrink_model(model, {"ffn_hidden": ffn, "attn_heads": heads})
    with torch.no_grad():
        got = model(tokens)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    sizes = layer_sizes(model)
    assert sizes["ffn_hidden"] == [6, 14]
    assert sizes["attn_heads"] == [len(k) for k in heads]
    if family == "llama_mha":
        assert sizes["attn_kv_heads"] == [2, 3]
        assert model.layers[0].attn.k_proj.weight.shape == (2 * head_dim, 32)
    if family == "qwen2_bias":
        assert model.layers[0].attn.q_proj.bias.shape == (2 * head_dim,)


def test_grouped_query_heads_must_keep_the_same_number_per_kv_head():
    assert check_head_grouping(torch.tensor([0, 1, 4, 5]), 6, 3).tolist() == [0, 2]
    with pytest.raises(ValueError, match="breaks the grouped-query layout"):
        check_head_grouping(torch.tensor([0, 1, 2]), 6, 3)
    with pytest.raises(ValueError, match="every attention head"):
        check_head_grouping(torch.tensor([], dtype=torch.long), 6, 3)
    model = init_tiny_llama(num_layers=1)
    with pytest.raises(ValueError, match="every FFN hidden unit"):
        shrink_layer(model.layers[0], {"ffn_hidden": torch.tensor([], dtype=torch.long)})
    with pytest.raises(ValueError, match="sorted distinct"):
        shrink_layer(model.layers[0], {"ffn_hidden": torch.tensor([3, 1])})


def test_lora_projections_are_refused_with_the_merged_weights_as_the_fix():
    from torchtune.models.llama3_2 import lora_llama3_2

    model = lora_llama3_2(lora_attn_modules=["q_proj"], apply_lora_to_mlp=True, vocab_size=64,
                          num_layers=1, num_heads=4, num_kv_heads=2, embed_dim=32,
                          max_seq_len=32, intermediate_dim=16, lora_rank=2, lora_alpha=4)
    with pytest.raises(ValueError, match="merged"):
        shrink_layer(model.layers[0], {"ffn_hidden": torch.tensor([0, 1])})


def test_the_pruned_builder_loads_a_cut_state_dict_strictly_with_the_same_logits():
    base = {"_component_": "comparative_recipe.models.tiny.tiny_llama", "num_layers": 2,
            "num_heads": 4, "num_kv_heads": 2, "embed_dim": 32, "intermediate_dim": 24}
    model = init_tiny_llama(seed=3, **{k: v for k, v in base.items() if k != "_component_"})
    model.eval()
    shrink_model(model, {"ffn_hidden": [torch.tensor([1, 5, 6]), torch.tensor([0, 2, 3, 23])],
                         "attn_heads": [torch.tensor([1, 3]), torch.tensor([0, 1, 2, 3])]})
    sizes = layer_sizes(model)
    rebuilt = pruned_model(base, **sizes)
    rebuilt.load_state_dict(model.state_dict())  # strict: every shape matches
    rebuilt.eval()
    tokens = torch.randint(0, 512, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(tokens), model(tokens))
    keep = compacted_keep(init_tiny_llama(num_layers=2, num_heads=4, num_kv_heads=2,
                                          embed_dim=32, intermediate_dim=24), sizes)
    assert [k.tolist() for k in keep["attn_heads"]] == [[0, 2], [0, 1, 2, 3]]
    with pytest.raises(ValueError, match="not a grouped-query layout"):
        pruned_model(base, attn_heads=[3, 4], attn_kv_heads=[2, 2])


def test_a_module_that_is_not_a_linear_layer_is_named():
    model = init_tiny_llama(num_layers=1)
    model.layers[0].mlp.w1 = nn.Identity()
    with pytest.raises(ValueError, match=r"mlp.w1 is a Identity"):
        shrink_layer(model.layers[0], {"ffn_hidden": torch.tensor([0])})
