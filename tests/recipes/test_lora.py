"""LoRA and QLoRA through the recipes: torchtune's LoRA recipe reproduced at c = 0, exact resume,
PEFT-loadable checkpoints, FSDP2 ranks, `tune-cmp eval` with an adapter, and bad input."""

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from comparative_recipe.models.tiny import init_tiny_llama_checkpoint, tiny_lora_llama
from tests.recipes.recipe_helpers import (
    MODEL,
    base_config,
    comparative_config,
    instruct_source,
    launch_distributed,
    read_metrics,
    run,
    run_recipe,
    with_output_dir,
    write,
)

pytestmark = pytest.mark.slow

LORA = {"lora_attn_modules": ["q_proj", "v_proj", "output_proj"], "apply_lora_to_mlp": True,
        "lora_rank": 4, "lora_alpha": 8}
LORA_MODEL = {"_component_": "comparative_recipe.models.tiny.tiny_lora_llama", **MODEL, **LORA}
# NF4 needs quantized weights of a multiple of 16384 elements
QLORA_DIMS = dict(MODEL, embed_dim=128, num_heads=4, num_kv_heads=4, intermediate_dim=256)
QLORA_MODEL = {"_component_": "comparative_recipe.models.tiny.tiny_qlora_llama", **QLORA_DIMS, **LORA}
FINAL = "model-00001-of-00001.safetensors"


def lora_config(assets, out, model=LORA_MODEL, base="base", **overrides):
    cfg = comparative_config(assets, out, model=dict(model), **overrides)
    cfg["checkpointer"] = dict(cfg["checkpointer"], checkpoint_dir=str(assets / base))
    return cfg


@pytest.fixture(scope="module")
def qlora_base(assets):
    init_tiny_llama_checkpoint(assets / "base_q", seed=0, **QLORA_DIMS)
    return "base_q"


@pytest.fixture(scope="module")
def lora_run(assets, tmp_path_factory):
    """4 comparative LoRA steps (c = 2), a checkpoint at every step, validation at the end."""
    tmp = tmp_path_factory.mktemp("lora")
    cfg = lora_config(assets, tmp / "run", max_steps_per_epoch=4, save_every_n_steps=1,
                      keep_last_checkpoints=10,
                      validation={"dataset": comparative_config(assets, tmp)["dataset"], "batch_size": 8})
    run_recipe(cfg, tmp, "lora")
    return cfg, tmp / "run"


def test_c0_matches_torchtune_lora_finetune(assets, tmp_path):
    """c = 0 with a LoRA builder is torchtune's lora_finetune_single_device, step for step:
    the same adapter initialisation, losses, adapter and merged weights."""
    ours = lora_config(assets, tmp_path / "ours", ablation={}, loss_reduction="token")
    run_recipe(ours, tmp_path, "ours")
    theirs = base_config(assets, tmp_path / "theirs", model=dict(LORA_MODEL),
                         save_adapter_weights_only=False)
    theirs.update({
        "dataset": {"_component_": "torchtune.datasets.instruct_dataset", **instruct_source(assets)},
        "loss": {"_component_": "torchtune.modules.loss.CEWithChunkedOutputLoss"},
    })
    write(theirs, tmp_path / "theirs.yaml")
    run([str(Path(sys.executable).parent / "tune"), "run", "lora_finetune_single_device",
         "--config", str(tmp_path / "theirs.yaml")], cwd=tmp_path)
    a, b = read_metrics(tmp_path / "ours" / "logs"), read_metrics(tmp_path / "theirs" / "logs")
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for step in a:
        assert a[step]["loss"] == pytest.approx(b[step]["loss"], rel=1e-5), step
    mine, torchtunes = tmp_path / "ours" / "checkpoints" / "step_000006", tmp_path / "theirs" / "epoch_0"
    ad_a, ad_b = torch.load(mine / "adapter_model.pt"), torch.load(torchtunes / "adapter_model.pt")
    assert sorted(ad_a) == sorted(ad_b) and len(ad_a) == 2 * 2 * 6
    for key in ad_b:
        torch.testing.assert_close(ad_a[key], ad_b[key], rtol=1e-4, atol=1e-6)
    peft_a, peft_b = load_file(mine / "adapter_model.safetensors"), load_file(torchtunes / "adapter_model.safetensors")
    assert sorted(peft_a) == sorted(peft_b)
    w_a, w_b = load_file(mine / "merged" / FINAL), load_file(torchtunes / FINAL)
    for key in w_b:
        torch.testing.assert_close(w_a[key], w_b[key], rtol=1e-4, atol=1e-6)


def test_only_the_adapters_train(assets, lora_run):
    """Merged weights differ from the base only where adapters are; the optimizer state holds
    the adapters alone."""
    _, out = lora_run
    final = out / "checkpoints" / "step_000004"
    base, merged = load_file(assets / "base" / "model.safetensors"), load_file(final / "merged" / FINAL)
    assert sorted(base) == sorted(merged)
    adapted = ("q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    for key in base:
        same = torch.equal(base[key], merged[key])
        assert same != any(f".{m}." in key for m in adapted), key
    state = torch.load(final / "recipe_state.pt", weights_only=False)["optimizer"]
    n_adapters = len(torch.load(final / "adapter_model.pt"))
    assert len(state["state"]) == n_adapters == 24
    assert sum(len(g["params"]) for g in state["param_groups"]) == n_adapters


@pytest.mark.parametrize("variant", ["lora", "qlora"])
def test_resume_from_an_adapter_checkpoint_reproduces_the_uninterrupted_run(assets, tmp_path, qlora_base, variant):
    model, base = (LORA_MODEL, "base") if variant == "lora" else (QLORA_MODEL, qlora_base)
    cfg = lora_config(assets, tmp_path / "full", model=model, base=base, epochs=2,
                      max_steps_per_epoch=3, save_every_n_steps=1, keep_last_checkpoints=10,
                      strategy="recompute", save_adapter_weights_only=True,
                      enable_activation_checkpointing=variant == "qlora")
    run_recipe(cfg, tmp_path, "full")
    full = read_metrics(tmp_path / "full" / "logs")
    assert sorted(full) == list(range(1, 7))
    ckpts = tmp_path / "full" / "checkpoints"
    assert not (ckpts / "step_000006" / "merged").exists()  # adapter weights only
    out = tmp_path / "resumed"
    (out / "checkpoints").mkdir(parents=True)
    os.symlink(ckpts / "step_000004", out / "checkpoints" / "step_000004")  # mid epoch 2
    run_recipe(dict(with_output_dir(cfg, out), resume_from_checkpoint=True), tmp_path, "resumed")
    resumed = read_metrics(out / "logs")
    assert sorted(resumed) == [5, 6]
    for step in resumed:
        for key in ("loss", "loss_0", "loss_1", "loss_2", "lr"):
            assert resumed[step][key] == full[step][key], (step, key)
    a = torch.load(ckpts / "step_000006" / "adapter_model.pt")
    b = torch.load(out / "checkpoints" / "step_000006" / "adapter_model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def _our_logits(assets, checkpoint, tokens):
    """The LoRA model of the recipes with the base weights and the checkpoint's adapter."""
    from torchtune.training import FullModelHFCheckpointer

    ckpt = FullModelHFCheckpointer(checkpoint_dir=str(assets / "base"),
                                   checkpoint_files=["model.safetensors"], model_type="LLAMA3_2",
                                   output_dir=str(checkpoint.parent.parent / "unused"))
    model = tiny_lora_llama(**MODEL, **LORA)
    state = {**ckpt.load_checkpoint()["model"], **torch.load(checkpoint / "adapter_model.pt")}
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        return model.eval()(tokens)


def test_the_adapter_loads_in_peft_and_the_merged_weights_in_transformers(assets, lora_run, monkeypatch):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    # PEFT 0.21 raises ImportError on finding torchao < 0.16 (torchtune 0.6.1 needs 0.13) when
    # it looks for torchao-quantized layers; these layers are plain: load as without torchao.
    import peft.tuners.lora.torchao as peft_torchao
    import peft.utils.quantization_utils as peft_quantization

    monkeypatch.setattr(peft_torchao, "is_torchao_available", lambda: False)
    monkeypatch.setattr(peft_quantization, "is_torchao_available", lambda: False)
    _, out = lora_run
    final = out / "checkpoints" / "step_000004"
    config = json.loads((final / "adapter_config.json").read_text())
    # PEFT's LoraConfig keys (huggingface.co/docs/peft: LoraConfig)
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert sorted(config["target_modules"]) == sorted(
        ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "up_proj"])
    tokens = torch.randint(0, MODEL["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(0))
    ours = _our_logits(assets, final, tokens)
    base = transformers.AutoModelForCausalLM.from_pretrained(str(assets / "base"), dtype=torch.float32)
    with_adapter = peft.PeftModel.from_pretrained(base, str(final)).eval()
    with torch.no_grad():
        theirs = with_adapter(tokens).logits
        plain = with_adapter.get_base_model()
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
    # the merged weights are a plain HF folder (no adapter_config.json that transformers would
    # apply on top of them)
    assert not list((final / "merged").glob("adapter_*"))
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(final / "merged"), dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(tokens).logits, ours, rtol=1e-4, atol=1e-4)
    # the adapter changed the model: not the base model's logits
    base_only = transformers.AutoModelForCausalLM.from_pretrained(str(assets / "base"), dtype=torch.float32).eval()
    with torch.no_grad():
        assert (base_only(tokens).logits - ours).abs().max() > 1e-4
    del plain


def test_eval_with_an_adapter_equals_eval_of_the_merged_weights(assets, lora_run, tmp_path):
    cfg, out = lora_run
    final = out / "checkpoints" / "step_000004"
    path = write(cfg, tmp_path / "lora.yaml")
    cli = [sys.executable, "-m", "comparative_recipe.cli", "eval", "--config", str(path)]
    run([*cli, f"eval.adapter={final}", f"eval.output_path={tmp_path / 'a.json'}"], cwd=tmp_path)
    plain = dict(cfg, model={"_component_": "comparative_recipe.models.tiny.tiny_llama", **MODEL},
                 checkpointer=dict(cfg["checkpointer"], checkpoint_dir=str(final / "merged")))
    plain_path = write(plain, tmp_path / "plain.yaml")
    run([sys.executable, "-m", "comparative_recipe.cli", "eval", "--config", str(plain_path),
         f"eval.output_path={tmp_path / 'b.json'}"], cwd=tmp_path)
    a = json.loads((tmp_path / "a.json").read_text())
    b = json.loads((tmp_path / "b.json").read_text())
    assert a["checkpoint"]["adapter"] == str(final) and b["checkpoint"]["adapter"] is None
    assert len(a["passes"]) == 3
    for k in a["metrics"]:
        assert a["metrics"][k] == pytest.approx(b["metrics"][k], rel=1e-5, abs=1e-6), k
    # and equals the training run's own validation at that step
    logged = read_metrics(out / "logs")[4]
    assert a["metrics"]["val_loss_0"] == pytest.approx(logged["val_loss_0"], rel=1e-5)


def test_analyze_an_adapter_like_its_merged_weights(assets, lora_run, tmp_path):
    """`tune-cmp analyze` takes an adapter folder (on the config's base) and a full-weights
    folder alike: the adapter's curves are those of its merged weights."""
    cfg, out = lora_run
    final = out / "checkpoints" / "step_000004"
    small = ["analyze.seeds=[0]", "analyze.rates=[0.0,0.5]", "analyze.crop_rates=[0.0,0.5]",
             "analyze.curves=[attn_heads,all,crop]"]
    path = write(cfg, tmp_path / "lora.yaml")
    run([sys.executable, "-m", "comparative_recipe.cli", "analyze", "--config", str(path),
         f"analyze.checkpoints=[{final}]", f"analyze.output_dir={tmp_path / 'a'}", *small],
        cwd=tmp_path)
    plain = dict(cfg, model={"_component_": "comparative_recipe.models.tiny.tiny_llama", **MODEL})
    plain_path = write(plain, tmp_path / "plain.yaml")
    run([sys.executable, "-m", "comparative_recipe.cli", "analyze", "--config", str(plain_path),
         f"analyze.checkpoints=[{final / 'merged'}]", f"analyze.output_dir={tmp_path / 'b'}",
         "analyze.plots=false", *small], cwd=tmp_path)
    (a,), (b,) = (json.loads((tmp_path / d / "ablation.json").read_text())["checkpoints"]
                  for d in "ab")
    assert a["adapter"] == str(final) and b["adapter"] is None
    assert [c["name"] for c in a["curves"]] == ["attn_heads", "all", "crop"]
    for ca, cb in zip(a["curves"], b["curves"]):
        assert ca["metrics"]["loss"]["mean"] == pytest.approx(cb["metrics"]["loss"]["mean"], rel=1e-5)
        assert ca["metrics"]["loss"]["mean"][1] != ca["metrics"]["loss"]["mean"][0]
    for site in ("ffn_hidden", "attn_heads"):
        assert a["layers"]["sites"][site]["loss"]["mean"] == pytest.approx(
            b["layers"]["sites"][site]["loss"]["mean"], rel=1e-5)
        # activation x gradient flows through the frozen base into the adapters' outputs
        assert a["attribution"]["sites"][site]["layer_total"] == pytest.approx(
            b["attribution"]["sites"][site]["layer_total"], rel=1e-4)
    assert (tmp_path / "a" / "ablation_curves.png").is_file()


def test_two_ranks_train_lora_like_one(assets, tmp_path):
    """FSDP2: 2 ranks x batch 2 with activation checkpointing = 1 rank x batch 4; the sharded
    runs draw the initial adapters from the seed, whatever the number of ranks."""
    runs = {}
    for nproc in (1, 2):
        out = tmp_path / f"r{nproc}"
        cfg = lora_config(assets, out, batch_size=4 // nproc, max_steps_per_epoch=4,
                          enable_activation_checkpointing=nproc == 2)
        launch_distributed(cfg, tmp_path, f"r{nproc}", nproc)
        runs[nproc] = out
    a, b = read_metrics(runs[1] / "logs"), read_metrics(runs[2] / "logs")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert a[step]["loss"] == pytest.approx(b[step]["loss"], rel=1e-5), step
    ad_a = torch.load(runs[1] / "checkpoints" / "step_000004" / "adapter_model.pt")
    ad_b = torch.load(runs[2] / "checkpoints" / "step_000004" / "adapter_model.pt")
    for key in ad_a:
        torch.testing.assert_close(ad_a[key], ad_b[key], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("model,needle", [
    (dict(LORA_MODEL, lora_rank=0), "model.lora_rank must be an integer >= 1, got 0"),
    (dict(LORA_MODEL, lora_attn_modules=["q_proj", "out_proj"]), "unknown projection 'out_proj'"),
])
def test_bad_lora_settings_fail_before_anything_is_written(assets, tmp_path, model, needle):
    out = tmp_path / "out"
    proc = run_recipe(lora_config(assets, out, model=model), tmp_path, "bad", check=False)
    assert proc.returncode != 0 and needle in proc.stderr
    assert not out.exists()


@pytest.mark.parametrize("model,needle", [
    (dict(QLORA_MODEL, **MODEL), "multiple of 16384"),  # 32-wide weights: 1024 elements
    (dict(LORA_MODEL, num_kv_heads=3), "num_heads (4) must be divisible by num_kv_heads (3)"),
])
def test_a_model_that_cannot_be_built_fails_before_anything_is_written(assets, tmp_path, model, needle):
    """The model is built on the meta device first: builder and NF4 errors come before any
    data, weights or output directory."""
    out = tmp_path / "out"
    proc = run_recipe(lora_config(assets, out, model=model), tmp_path, "bad", check=False)
    assert proc.returncode != 0 and needle in proc.stderr, proc.stderr[-2000:]
    assert not out.exists()


def test_an_adapter_of_another_base_model_is_refused(assets, tmp_path, lora_run):
    cfg, out = lora_run
    init_tiny_llama_checkpoint(tmp_path / "other_base", seed=1, **MODEL)
    other = dict(cfg["checkpointer"], checkpoint_dir=str(tmp_path / "other_base"))
    # resuming onto it
    resumed = tmp_path / "resumed"
    shutil.copytree(out / "checkpoints" / "step_000002", resumed / "checkpoints" / "step_000002")
    bad = dict(with_output_dir(cfg, resumed), resume_from_checkpoint=True,
               checkpointer=dict(other, output_dir=str(resumed)))
    proc = run_recipe(bad, tmp_path, "resumed", check=False)
    assert proc.returncode != 0 and "was trained on another base model" in proc.stderr
    assert not (resumed / "logs").exists()
    # evaluating on it
    path = write(dict(cfg, checkpointer=other), tmp_path / "eval.yaml")
    proc = run([sys.executable, "-m", "comparative_recipe.cli", "eval", "--config", str(path),
                f"eval.adapter={out / 'checkpoints' / 'step_000004'}",
                f"eval.output_path={tmp_path / 'x.json'}"], cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "was trained on another base model" in proc.stderr
    assert not (tmp_path / "x.json").exists()


def test_qlora_on_two_ranks_trains_like_one_device(assets, tmp_path):
    """NF4 base weights sharded by FSDP2: a 2-rank QLoRA run, continued on one device from its
    epoch-boundary checkpoint, gives the 2-rank run's next losses and adapters."""
    dims = dict(QLORA_DIMS, embed_dim=256, intermediate_dim=512)  # 2 NF4 scaler blocks per rank
    init_tiny_llama_checkpoint(assets / "base_q2", seed=0, **dims)
    model = dict(QLORA_MODEL, **dims)
    cfg = lora_config(assets, tmp_path / "two", model=model, base="base_q2", epochs=2,
                      max_steps_per_epoch=2, batch_size=2)
    launch_distributed(cfg, tmp_path, "two", 2)
    two = read_metrics(tmp_path / "two" / "logs")
    assert sorted(two) == [1, 2, 3, 4]
    one = tmp_path / "one"
    (one / "checkpoints").mkdir(parents=True)
    os.symlink(tmp_path / "two" / "checkpoints" / "step_000002", one / "checkpoints" / "step_000002")
    run_recipe(dict(with_output_dir(cfg, one), batch_size=4, resume_from_checkpoint=True),
               tmp_path, "one")
    resumed = read_metrics(one / "logs")
    assert sorted(resumed) == [3, 4]
    for step in resumed:
        assert resumed[step]["loss"] == pytest.approx(two[step]["loss"], rel=1e-5), step
    a = torch.load(tmp_path / "two" / "checkpoints" / "step_000004" / "adapter_model.pt")
    b = torch.load(one / "checkpoints" / "step_000004" / "adapter_model.pt")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)


def test_qlora_on_one_fsdp2_rank_is_refused_before_training(assets, tmp_path, qlora_base):
    cfg = lora_config(assets, tmp_path / "q", model=QLORA_MODEL, base=qlora_base)
    proc = launch_distributed(cfg, tmp_path, "q", 1, check=False)
    assert proc.returncode != 0 and "on one FSDP2 rank fails on this stack" in proc.stderr
    assert not (tmp_path / "q" / "logs").exists()
