"""`tune-cmp prune` end to end on the tiny checkpoint: the written model computes what the
unpruned one computes with the removed units zeroed (hooks written here), in torchtune (its
torchtune_config.yaml, and torchtune's own llama3_2 builder for an FFN-only cut) and in
transformers; the removed units are the lowest scores; 2 ranks score as one; a global ranking
loads through its config; bad input fails before anything is written."""

import json
import sys

import pytest
import torch
from omegaconf import OmegaConf
from torchtune import config, training
from torchtune.models.llama3_2 import llama3_2

from comparative_recipe.models.tiny import tiny_llama
from tests.recipes.recipe_helpers import MODEL, comparative_config, run, run_recipe, write

pytestmark = pytest.mark.slow


def prune_cfg(assets, out, **prune):
    cfg = comparative_config(assets, out)
    cfg["validation"] = {"dataset": cfg["dataset"], "batch_size": 8}
    cfg["prune"] = {"output_dir": str(out / "pruned"), **prune}
    return cfg


def load(config_path):
    cfg = OmegaConf.load(config_path)
    model = config.instantiate(cfg.model)
    model.load_state_dict(config.instantiate(cfg.checkpointer).load_checkpoint()[training.MODEL_KEY])
    return model.eval()


def base_model(assets):
    model = tiny_llama(**MODEL)
    ckpt = training.FullModelHFCheckpointer(
        checkpoint_dir=str(assets / "base"), checkpoint_files=["model.safetensors"],
        model_type="LLAMA3_2", output_dir=str(assets / "unused"))
    model.load_state_dict(ckpt.load_checkpoint()[training.MODEL_KEY])
    return model.eval()


def masked_logits(model, report, tokens):
    """The unpruned model with every unit the report removed zeroed at w2 / output_proj."""
    head_dim = MODEL["embed_dim"] // MODEL["num_heads"]
    hooks = []
    for i, layer in enumerate(model.layers):
        for site, module, group in (("ffn_hidden", layer.mlp.w2, 1),
                                    ("attn_heads", layer.attn.output_proj, head_dim)):
            if site not in report["sites"]:
                continue
            kept = set(report["sites"][site]["kept_units"][i])
            units = report["sites"][site]["units"][i]
            gone = [c for u in range(units) if u not in kept for c in range(u * group, (u + 1) * group)]

            def zero(mod, args, gone=gone):
                x = args[0].clone()
                x[..., gone] = 0
                return (x,)

            hooks.append(module.register_forward_pre_hook(zero))
    with torch.no_grad():
        out = model(tokens)
    for h in hooks:
        h.remove()
    return out


@pytest.fixture(scope="module")
def pruned(assets, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prune")
    out = tmp / "out"
    cfg = prune_cfg(assets, out, sparsity={"ffn_hidden": 0.25, "attn_heads": 0.5})
    proc = run_recipe(cfg, tmp, "prune", recipe="comparative_prune")
    return tmp, out / "pruned", json.loads((out / "pruned" / "pruning.json").read_text()), proc


def test_the_pruned_model_is_the_masked_model_in_torchtune_and_transformers(assets, pruned):
    tmp, path, report, proc = pruned
    assert "parameters:" in proc.stdout and "tune-cmp eval --config" in proc.stdout
    assert report["method"] == "attribution" and report["data"] == "supervised"
    assert report["sites"]["ffn_hidden"]["kept"] == [48, 48]  # 64 - round(16)
    assert report["sites"]["attn_heads"]["kept"] == [2, 2]  # one head from each kv group
    hf = json.loads((path / "config.json").read_text())
    assert (hf["intermediate_size"], hf["num_attention_heads"], hf["num_key_value_heads"],
            hf["head_dim"]) == (48, 2, 2, 8)
    tokens = torch.randint(0, 512, (2, 19), generator=torch.Generator().manual_seed(0))
    expected = masked_logits(base_model(assets), report, tokens)
    with torch.no_grad():
        got = load(path / "torchtune_config.yaml")(tokens)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    transformers = pytest.importorskip("transformers")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf_model(tokens).logits, expected, rtol=1e-4, atol=1e-4)
    params = sum(p.numel() for p in hf_model.parameters())
    assert params == report["parameters"]["after"] < report["parameters"]["before"]


def test_the_removed_units_are_the_lowest_scores_per_layer_and_kv_group(pruned):
    _, _, report, _ = pruned
    ffn = report["sites"]["ffn_hidden"]
    for scores, kept in zip(ffn["scores"], ffn["kept_units"]):
        gone = [s for u, s in enumerate(scores) if u not in kept]
        assert max(gone) <= min(scores[u] for u in kept)
    heads = report["sites"]["attn_heads"]
    for scores, kept in zip(heads["scores"], heads["kept_units"]):
        for group in ((0, 1), (2, 3)):  # 4 heads over 2 kv heads
            (k,) = [h for h in group if h in kept]
            (g,) = [h for h in group if h not in kept]
            assert scores[g] <= scores[k]


def test_an_ffn_cut_loads_with_torchtunes_own_builder(assets, tmp_path):
    out = tmp_path / "out"
    cfg = prune_cfg(assets, out, method="magnitude", sparsity=0.5, sites=["ffn_hidden"])
    run_recipe(cfg, tmp_path, "prune", recipe="comparative_prune")
    path = out / "pruned"
    hf = json.loads((path / "config.json").read_text())
    model = llama3_2(vocab_size=512, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32,
                     max_seq_len=256, intermediate_dim=hf["intermediate_size"],
                     scale_factor=32, tie_word_embeddings=True)
    ckpt = OmegaConf.load(path / "torchtune_config.yaml").checkpointer
    state = training.FullModelHFCheckpointer(
        checkpoint_dir=ckpt.checkpoint_dir, checkpoint_files=list(ckpt.checkpoint_files),
        model_type="LLAMA3_2", output_dir=str(tmp_path / "x")).load_checkpoint()
    model.load_state_dict(state[training.MODEL_KEY])
    tokens = torch.randint(0, 512, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(tokens), load(path / "torchtune_config.yaml")(tokens))
    assert hf["intermediate_size"] == 32


def test_two_ranks_score_as_one_and_a_global_ranking_loads(assets, pruned, tmp_path):
    _, _, one, _ = pruned
    out = tmp_path / "out"
    cfg = prune_cfg(assets, out, sparsity={"ffn_hidden": 0.25, "attn_heads": 0.5})
    path = write(cfg, tmp_path / "two.yaml")
    run([sys.executable, "-m", "comparative_recipe.cli", "prune", "--nproc_per_node", "2",
         "--config", str(path)], cwd=tmp_path)
    two = json.loads((out / "pruned" / "pruning.json").read_text())
    assert two["world_size"] == 2 and two["samples"] == one["samples"] == 48
    for site in ("ffn_hidden", "attn_heads"):
        assert two["sites"][site]["kept_units"] == one["sites"][site]["kept_units"]
        for a, b in zip(one["sites"][site]["scores"], two["sites"][site]["scores"]):
            assert b == pytest.approx(a, rel=1e-4, abs=1e-7)
    # a global ranking: per-layer sizes, torchtune's format, loaded through its config
    cfg = prune_cfg(assets, tmp_path / "g", method="random", sparsity=0.4, ranking="global",
                    sites=["ffn_hidden"])
    run_recipe(cfg, tmp_path, "global", recipe="comparative_prune")
    report = json.loads((tmp_path / "g" / "pruned" / "pruning.json").read_text())
    assert report["format"] == "torchtune" and sum(report["sites"]["ffn_hidden"]["kept"]) == 77
    model = load(tmp_path / "g" / "pruned" / "torchtune_config.yaml")
    assert [layer.mlp.w2.in_features for layer in model.layers] == report["sites"]["ffn_hidden"]["kept"]
    tokens = torch.randint(0, 512, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), masked_logits(base_model(assets), report, tokens),
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("prune, extra, message", [
    ({"sparsity": 1.0}, {}, "prune.sparsity must be a number in [0, 1)"),
    ({"sparsity": {"ffn_hidden": 0.3, "attn_heads": 0.25}}, {}, "breaks the grouped-query layout"),
    ({"sparsity": {"ffn_hidden": 0.3, "attn_heads": 0.9}}, {}, "removes all 4 attn_heads units"),
    ({"sparsity": 0.3, "method": "magnitude", "reduce": "max"}, {}, "read by method attribution"),
    ({"sparsity": 0.3, "sparsityy": 0.2}, {}, "did you mean 'sparsity'"),
    ({"sparsity": {"ffn_hidden": 0.3, "attn_heads": 0.5}},
     {"tokenizer": {"max_seq_len": 8}}, "has a labelled token"),
    ({"sparsity": {"ffn_hidden": 0.3, "attn_heads": 0.5}},
     {"model": {"intermediate_dim": 48}}, "does not match the model config"),
])
def test_bad_input_fails_before_anything_is_written(assets, tmp_path, prune, extra, message):
    out = tmp_path / "out"
    cfg = prune_cfg(assets, out, **prune)
    for key, value in extra.items():
        cfg[key] = {**cfg[key], **value}
    proc = run_recipe(cfg, tmp_path, "bad", check=False, recipe="comparative_prune")
    assert proc.returncode != 0
    assert message in proc.stderr + proc.stdout, (proc.stderr + proc.stdout)[-3000:]
    assert not (out / "pruned").exists()
