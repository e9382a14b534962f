"""The hidden-ablation hooks under torch.compile: every layer and step shares the compiled code
(no recompile per layer, site or step, no graph break), and the compiled model computes what the
eager one does."""

import copy

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters
from torchtune import training
from torchtune.modules import TransformerSelfAttentionLayer

from comparative_recipe.ablation import hidden
from comparative_recipe.ablation.hidden import (
    SITES,
    HiddenAblationConfig,
    MaskKeys,
    hidden_ablation_keys,
    install_hidden_ablation,
    set_activation_checkpointing,
)
from comparative_recipe.models.tiny import tiny_llama

pytestmark = pytest.mark.slow

BATCH, SEQ = 2, 12


def _tiny(num_layers):
    torch.manual_seed(0)
    return tiny_llama(vocab_size=512, num_layers=num_layers, num_heads=4, num_kv_heads=2,
                      embed_dim=32, intermediate_dim=64, max_seq_len=256)


def _run(model, x, k):
    model.zero_grad(set_to_none=True)
    with hidden_ablation_keys(k):
        out = model(x)
    out.float().pow(2).mean().backward()
    grads = {n.replace("._checkpoint_wrapped_module", "").replace("._orig_mod", ""): p.grad.clone()
             for n, p in model.named_parameters()}
    return out.detach(), grads


def _graphs_of_a_training_run(num_layers, granularity, ac, monkeypatch):
    """Compiles a tiny model as the trainer does (per layer, then activation checkpointing, then
    the ablation), runs 3 steps x drop powers 0, 1, 2 with changing sample ids, each against
    eager; returns (graphs after the first step, graphs at the end)."""
    monkeypatch.setenv("TORCH_COMPILE_BACKEND", "aot_eager")  # dynamo's graphs, fast to build
    torch._dynamo.reset()
    counters.clear()
    cfg = HiddenAblationConfig(rate=0.3, sites=SITES, granularity=granularity, seed=4)
    eager = _tiny(num_layers)
    compiled = copy.deepcopy(eager)
    install_hidden_ablation(eager, cfg)
    training.compile_model(compiled, verbose=False)
    if ac:
        set_activation_checkpointing(compiled, {TransformerSelfAttentionLayer})
    install_hidden_ablation(compiled, cfg)
    x = torch.randint(0, 512, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    token_keys = torch.arange(SEQ).expand(BATCH, SEQ) * 2
    after_first = None
    for step in range(3):
        for power in (0, 1, 2):
            k = MaskKeys(torch.tensor([7 * step, 7 * step + 3]), torch.tensor([power, power]),
                         step, token_keys)
            out, grads = _run(compiled, x, k)
            ref_out, ref_grads = _run(eager, x, k)
            torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
            assert grads.keys() == ref_grads.keys()
            for name in grads:
                torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6)
        if after_first is None:
            after_first = counters["stats"]["unique_graphs"]
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert not any("recompile" in reason for reason in counters["unimplemented"])
    return after_first, counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("granularity", ["unit", "element"])
def test_layers_and_steps_share_compiled_code(granularity, monkeypatch):
    found = {}
    for num_layers, ac in ((2, False), (4, False), (3, True)):
        first, last = _graphs_of_a_training_run(num_layers, granularity, ac, monkeypatch)
        assert last == first, "a later step, drop power or sample recompiled"
        found[(num_layers, ac)] = last
    # one graph for the full-model pass (drop power 0), one for ablated passes, whatever the
    # number of layers (4 layers x 4 sites would exceed dynamo's recompile limit of 8 per code
    # object if layers or sites were specialised)
    assert set(found.values()) == {2}, found


def test_inductor_element_masks_are_bit_identical_to_eager():
    """The hooks' mask function compiled by inductor (generated int32 code) gives the same
    masks as the eager, chunked kernels."""
    torch._dynamo.reset()
    cfg = HiddenAblationConfig(rate=0.3, granularity="element", seed=9)
    k = MaskKeys(torch.tensor([3, 1 << 33, -5]), torch.tensor([0, 1, 3]), 17,
                 torch.tensor([[0, 2, 5, 9, -1, -1], [1, 2, 3, 4, 5, 6], [8, 7, 6, 5, 4, 3]]))
    key = hidden.layer_key(cfg.seed, "ffn_hidden", 2)
    ukeys = hidden.unit_keys(key, 1000)
    key_t = torch.tensor(key, dtype=torch.int64)
    key_t = torch.where(key_t >= 2**31, key_t - 2**32, key_t).to(torch.int32)

    def mask(keys, key_word, unit_words):
        return hidden._mask_from_words(cfg, keys, key_word, unit_words, 6, torch.float32)

    eager = mask(k, key_t, ukeys)
    compiled = torch.compile(mask, backend="inductor", fullgraph=True)(k, key_t, ukeys)
    assert torch.equal(compiled, eager)
    assert (eager == 0).any() and (eager > 0).any()
