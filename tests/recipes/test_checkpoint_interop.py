"""What the recipes write loads in the ecosystem: transformers, and torchtune's own recipes.

A tiny Llama 3.2-style model (torchtune's `llama3_2` builder, HF-format input checkpoint with
tokenizer files beside the weights) is fine-tuned for two steps by the single-device recipe
through `torchtune.training.FullModelHFCheckpointer`. Its final step checkpoint is then

* loaded by `transformers.AutoModelForCausalLM.from_pretrained` and compared, logit for logit,
  with the torchtune model loaded from the same folder;
* run through torchtune's `generate` recipe (`tune run generate`), whose greedy output is checked
  against a greedy loop over the torchtune model written here.

The SmolLM2 path is checked too: a tiny random GGUF (the writer of `tests/models/test_gguf.py`)
converted by `comparative_recipe.models.gguf` loads in transformers with the logits of
`comparative_recipe.models.smollm2.smollm2` (q/k row order and RoPE base both matter).
"""

import json
import shutil
import stat
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torchtune import training
from torchtune.training import FullModelHFCheckpointer

from comparative_recipe.data.demo import demo_tokenizer
from comparative_recipe.models.tiny import tiny_llama
from comparative_recipe.training.checkpointing import weight_files
from tests.recipes.recipe_helpers import MODEL, comparative_config, run, run_recipe

pytestmark = pytest.mark.slow

STEPS = 2
ATOL = 1e-5

# Files an HF model folder carries beside its weights; the recipe's output must keep them.
TOKENIZER_CONFIG = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
                    "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False}
EXTRA_FILES = {
    "tokenizer_config.json": json.dumps(TOKENIZER_CONFIG),
    "special_tokens_map.json": json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}),
    "generation_config.json": json.dumps({"bos_token_id": 1, "eos_token_id": 2}),
    "original/params.json": json.dumps({"dim": MODEL["embed_dim"]}),  # a subfolder, as in meta-llama repos
    ".notes": "hidden files are not copied",
}


def _random_tokens(vocab, shape=(2, 40), seed=0):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def _torchtune_model(checkpoint_dir, out_dir, model_type="LLAMA3_2", builder=None):
    """The model a torchtune recipe gets from ``checkpoint_dir`` (HF checkpointer, strict load)."""
    ckpt = FullModelHFCheckpointer(checkpoint_dir=str(checkpoint_dir),
                                   checkpoint_files=weight_files(checkpoint_dir),
                                   model_type=model_type, output_dir=str(out_dir))
    model = builder() if builder is not None else tiny_llama(**MODEL)
    model.load_state_dict(ckpt.load_checkpoint()[training.MODEL_KEY], strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def trained(assets, tmp_path_factory):
    """(input checkpoint dir, final step checkpoint dir) of a 2-step recipe run."""
    root = tmp_path_factory.mktemp("interop")
    hf_in = root / "hf_in"
    shutil.copytree(assets / "base", hf_in)  # model.safetensors + config.json (LlamaForCausalLM)
    shutil.copy(assets / "sp.model", hf_in / "tokenizer.model")
    for name, text in EXTRA_FILES.items():
        (hf_in / name).parent.mkdir(parents=True, exist_ok=True)
        (hf_in / name).write_text(text)
    out = root / "run"
    cfg = comparative_config(assets, out, max_steps_per_epoch=STEPS)
    cfg["checkpointer"] = dict(cfg["checkpointer"], checkpoint_dir=str(hf_in))
    run_recipe(cfg, root, "interop")
    final = out / "checkpoints" / f"step_{STEPS:06d}"
    assert final.is_dir(), sorted(p.name for p in (out / "checkpoints").iterdir())
    return hf_in, final


def test_output_folder_has_what_an_hf_model_folder_needs(trained):
    """torchtune's checkpointer writes the weights (renamed to model-0000i-of-0000n, plus the
    safetensors index) and copies every other file of the input folder, subfolders included,
    except weights (.safetensors/.bin/.pt/.pth), the two HF index files, dot-files and files over
    100 MiB (torchtune's copy_files); the recipe adds recipe_state.pt."""
    hf_in, final = trained
    files = sorted(str(p.relative_to(final)) for p in final.rglob("*") if p.is_file())
    assert files == sorted([
        "config.json", "model-00001-of-00001.safetensors", "model.safetensors.index.json",
        "recipe_state.pt", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
        "generation_config.json", "original/params.json",
    ])
    for name in ["config.json", "tokenizer.model", *[n for n in EXTRA_FILES if not n.startswith(".")]]:
        assert (final / name).read_bytes() == (hf_in / name).read_bytes(), name
    index = json.loads((final / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {"model-00001-of-00001.safetensors"}
    # Readable by whoever may read the other files: safetensors 0.8 alone would leave the
    # weights at 0600 (safetensors/safetensors#782); the index is written with open().
    mode = stat.S_IMODE((final / "model.safetensors.index.json").stat().st_mode)
    assert stat.S_IMODE((final / "model-00001-of-00001.safetensors").stat().st_mode) == mode
    # Tied embeddings: no lm_head.weight is written, and config.json says the weights are tied.
    assert "lm_head.weight" not in index["weight_map"]
    assert json.loads((final / "config.json").read_text())["tie_word_embeddings"] is True


def test_transformers_loads_the_recipe_output_with_the_same_logits(trained, tmp_path):
    transformers = pytest.importorskip("transformers")
    hf_in, final = trained
    hf_model, info = transformers.AutoModelForCausalLM.from_pretrained(
        str(final), dtype=torch.float32, output_loading_info=True)
    assert type(hf_model).__name__ == "LlamaForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    hf_model.eval()

    ours = _torchtune_model(final, tmp_path / "tt")
    base = _torchtune_model(hf_in, tmp_path / "tt_base")
    tokens = _random_tokens(MODEL["vocab_size"])
    with torch.no_grad():
        got, want, before = hf_model(tokens).logits, ours(tokens), base(tokens)
    diff = (got - want).abs().max().item()
    print(f"recipe output: transformers vs torchtune logits max |diff| = {diff:.3g}")
    assert diff < ATOL
    # The folder holds the fine-tuned weights, not the input ones (the check has teeth).
    assert (want - before).abs().max().item() > 100 * ATOL

    # The tokenizer files copied from the input folder load too, and encode as the recipe did.
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(final))
    tokenizer = demo_tokenizer(str(final / "tokenizer.model"))
    for text in ["Which room holds the key?", "two\n\nlines  and spaces", "Ünïcode 123"]:
        assert hf_tok(text)["input_ids"] == tokenizer.encode(text, add_bos=True, add_eos=False), text


def test_torchtune_generate_recipe_runs_on_the_recipe_output(trained, assets, tmp_path):
    """`tune run generate` on the step checkpoint, with the demo tokenizer (torchtune's
    Llama2Tokenizer: its messages -> tokens transform is what generate's prompt handling calls).
    Greedy (top_k 1): its text equals a greedy loop over the torchtune model (no KV cache)."""
    _, final = trained
    max_new, user = 8, "Which room holds the key?"
    cfg = {
        "output_dir": str(tmp_path / "gen"),
        "model": {"_component_": "comparative_recipe.models.tiny.tiny_llama", **MODEL},
        "checkpointer": {"_component_": "torchtune.training.FullModelHFCheckpointer",
                         "checkpoint_dir": str(final), "checkpoint_files": weight_files(final),
                         "model_type": "LLAMA3_2", "output_dir": str(tmp_path / "gen")},
        "tokenizer": {"_component_": "comparative_recipe.data.demo.demo_tokenizer",
                      "path": str(assets / "sp.model"), "max_seq_len": None},
        "device": "cpu", "dtype": "fp32", "seed": 1234,
        "prompt": {"system": None, "user": user},
        "max_new_tokens": max_new, "temperature": 1.0, "top_k": 1,
        "enable_kv_cache": True, "quantizer": None,
    }
    (tmp_path / "generate.yaml").write_text(yaml.safe_dump(cfg))
    proc = run([str(Path(sys.executable).parent / "tune"), "run", "generate",
                "--config", str(tmp_path / "generate.yaml")], cwd=tmp_path)

    # The same prompt as generate's convert_prompt_to_tokens, and greedy decoding by hand.
    from torchtune.data import Message

    tokenizer = demo_tokenizer(str(assets / "sp.model"))
    prompt = tokenizer({"messages": [Message(role="user", content=user),
                                     Message(role="assistant", content="")]}, inference=True)["tokens"]
    assert prompt[0] == tokenizer.bos_id and prompt[-1] != tokenizer.eos_id
    model = _torchtune_model(final, tmp_path / "tt")
    seq = list(prompt)
    with torch.no_grad():
        first = model(torch.tensor([prompt]))[0, -1].argmax().item()
        for _ in range(max_new):
            nxt = model(torch.tensor([seq]))[0, -1].argmax().item()
            seq.append(nxt)
            if nxt in tokenizer.stop_tokens:
                break
    generated = seq[len(prompt):]
    print(f"generate: prompt {prompt} -> greedy {generated}")
    assert generated[0] == first
    assert any(t not in tokenizer.stop_tokens for t in generated), generated  # real output tokens
    logged = proc.stdout + proc.stderr
    expected = tokenizer.decode(seq)
    assert len(expected) > len(tokenizer.decode(prompt))
    assert expected in logged, (expected, logged[-3000:])
    assert "tokens/sec" in logged


@pytest.mark.parametrize("tied,f16", [(True, False), (False, True)])
def test_gguf_conversion_loads_in_transformers_with_smollm2_logits(tmp_path, tied, f16):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    from torchtune.models.convert_weights import hf_to_tune

    from comparative_recipe.models.gguf import gguf_to_hf
    from tests.models import test_gguf as g

    hf_sd = g._hf_weights(tied=tied, f16=f16)
    # Weights only: the tokenizer files are not what this test is about.
    out = gguf_to_hf(g._write_gguf(tmp_path / "tiny.gguf", hf_sd, f16=f16, tokenizer=False), tmp_path / "hf")

    hf_model, info = transformers.AutoModelForCausalLM.from_pretrained(
        str(out), dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    hf_model.eval()
    rope = getattr(hf_model.config, "rope_parameters", None) or {"rope_theta": hf_model.config.rope_theta}
    assert rope["rope_theta"] == g.ROPE_BASE
    assert rope.get("rope_type", "default") == "default"  # plain RoPE, as smollm2 builds it
    assert hf_model.config.tie_word_embeddings is tied

    converted = _torchtune_model(out, tmp_path / "tt", "LLAMA3_2" if tied else "LLAMA3",
                                 builder=lambda: g._model(tied))
    reference = g._model(tied)
    ref_sd = hf_to_tune(hf_sd, num_heads=g.HEADS, num_kv_heads=g.KV_HEADS, dim=g.DIM, head_dim=g.HEAD_DIM)
    if tied:
        ref_sd.pop("output.weight", None)
    reference.load_state_dict(ref_sd)
    reference.eval()

    tokens = _random_tokens(g.VOCAB, (2, 33), seed=1)
    with torch.no_grad():
        got, want, ref = hf_model(tokens).logits, converted(tokens), reference(tokens)
    diff, diff_ref = (got - want).abs().max().item(), (got - ref).abs().max().item()
    print(f"GGUF tied={tied} f16={f16}: transformers vs smollm2 logits max |diff| = {diff:.3g}, "
          f"vs the source weights {diff_ref:.3g} (max |logit| {want.abs().max().item():.3g})")
    # fp32 noise of two implementations (RoPE tables built differently) on logits of size ~3.
    torch.testing.assert_close(got, want, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=ATOL)
    assert want.std() > 0.1

    # Both the q/k row order and the RoPE base change the logits: the comparison has teeth.
    with torch.no_grad():
        attn = hf_model.model.layers[0].self_attn
        q = attn.q_proj.weight.clone()
        attn.q_proj.weight.copy_(q[torch.from_numpy(g._llama_cpp_rows(q.shape[0], g.HEADS))])
        assert (hf_model(tokens).logits - want).abs().max() > 1e-3
        attn.q_proj.weight.copy_(q)
    config = transformers.AutoConfig.from_pretrained(str(out))
    if getattr(config, "rope_parameters", None):
        config.rope_parameters["rope_theta"] = 10_000.0
    else:
        config.rope_theta = 10_000.0
    wrong_base = transformers.AutoModelForCausalLM.from_pretrained(str(out), config=config, dtype=torch.float32)
    with torch.no_grad():
        assert (wrong_base.eval()(tokens).logits - want).abs().max() > 1e-3
