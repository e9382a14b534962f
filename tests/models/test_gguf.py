"""GGUF -> HF conversion: a tiny random llama GGUF written here, converted, loaded by torchtune.

The reference is independent of the converter: the HF-layout weights drawn here go straight
through torchtune's own `convert_weights.hf_to_tune` into the model; the GGUF instead holds
them in llama.cpp's layout (q/k rows permuted by `_llama_cpp_rows` below, written from the
llama.cpp convention, not from the converter).
"""

import json
import runpy
import sys

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from torchtune.models.convert_weights import hf_to_tune  # noqa: E402
from torchtune.training import FullModelHFCheckpointer  # noqa: E402

from comparative_recipe.models.gguf import gguf_to_hf, main  # noqa: E402
from comparative_recipe.models.smollm2 import smollm2  # noqa: E402

VOCAB, DIM, LAYERS, HEADS, KV_HEADS, FFN = 40, 32, 2, 4, 2, 48
HEAD_DIM = DIM // HEADS
ROPE_BASE, EPS = 100_000.0, 1e-5
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
# A byte-level BPE small enough to apply by hand: letters, the byte-level space "Ġ", five digits
# and five merges (in rank order).
MERGES = ["h e", "l l", "he ll", "Ġ w", "l o"]
TOKENS = (
    ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + list("abcdefghijklmnopqrstuvwxyz") + ["Ġ"]
    + list("01234") + [m.replace(" ", "") for m in MERGES]
)
assert len(TOKENS) == VOCAB


def _llama_cpp_rows(n_rows: int, n_heads: int) -> np.ndarray:
    """Row i of llama.cpp's q/k weight is row `_llama_cpp_rows(...)[i]` of the HF weight.

    Within a head, HF keeps the first rotary half in rows 0..d/2-1 and its partners in rows
    d/2..d-1; llama.cpp interleaves them: its rows 2j and 2j+1 are HF rows j and d/2 + j.
    """
    head_dim = n_rows // n_heads
    order = []
    for h in range(n_heads):
        for j in range(head_dim // 2):
            order += [h * head_dim + j, h * head_dim + head_dim // 2 + j]
    return np.array(order)


def _hf_weights(tied: bool, f16: bool, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, std=0.2):
        t = torch.randn(*shape, generator=g) * std
        return t.half().float() if f16 else t

    sd = {"model.embed_tokens.weight": rand(VOCAB, DIM, std=0.5), "model.norm.weight": 1 + rand(DIM, std=0.1)}
    if not tied:
        sd["lm_head.weight"] = rand(VOCAB, DIM, std=0.5)
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = 1 + rand(DIM, std=0.1)
        sd[p + "post_attention_layernorm.weight"] = 1 + rand(DIM, std=0.1)
        sd[p + "self_attn.q_proj.weight"] = rand(HEADS * HEAD_DIM, DIM)
        sd[p + "self_attn.k_proj.weight"] = rand(KV_HEADS * HEAD_DIM, DIM)
        sd[p + "self_attn.v_proj.weight"] = rand(KV_HEADS * HEAD_DIM, DIM)
        sd[p + "self_attn.o_proj.weight"] = rand(DIM, HEADS * HEAD_DIM)
        sd[p + "mlp.gate_proj.weight"] = rand(FFN, DIM)
        sd[p + "mlp.up_proj.weight"] = rand(FFN, DIM)
        sd[p + "mlp.down_proj.weight"] = rand(DIM, FFN)
    return sd


def _gguf_name(hf_name: str) -> str:
    fixed = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if hf_name in fixed:
        return fixed[hf_name]
    _, _, layer, *rest = hf_name.split(".")
    block = {
        "input_layernorm.weight": "attn_norm",
        "post_attention_layernorm.weight": "ffn_norm",
        "self_attn.q_proj.weight": "attn_q",
        "self_attn.k_proj.weight": "attn_k",
        "self_attn.v_proj.weight": "attn_v",
        "self_attn.o_proj.weight": "attn_output",
        "mlp.gate_proj.weight": "ffn_gate",
        "mlp.up_proj.weight": "ffn_up",
        "mlp.down_proj.weight": "ffn_down",
    }[".".join(rest)]
    return f"blk.{layer}.{block}.weight"


def _write_gguf(path, hf_sd, *, f16=False, arch="llama", tokenizer=True):
    w = gguf.GGUFWriter(str(path), arch=arch)
    w.add_block_count(LAYERS)
    w.add_context_length(256)
    w.add_embedding_length(DIM)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(ROPE_BASE)
    w.add_layer_norm_rms_eps(EPS)
    w.add_vocab_size(VOCAB)
    if tokenizer:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("smollm")
        w.add_token_list(TOKENS)
        w.add_token_types([3, 3, 3] + [1] * (VOCAB - 3))
        w.add_token_merges(MERGES)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_chat_template(TEMPLATE)
    for name, t in hf_sd.items():
        a = t.numpy()
        if name.endswith("q_proj.weight"):
            a = a[_llama_cpp_rows(a.shape[0], HEADS)]
        elif name.endswith("k_proj.weight"):
            a = a[_llama_cpp_rows(a.shape[0], KV_HEADS)]
        # llama.cpp keeps 1-D norms in F32 and stores matrices as F16 in an F16 file.
        a = np.ascontiguousarray(a.astype(np.float16 if f16 and a.ndim == 2 else np.float32))
        w.add_tensor(_gguf_name(name), a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _model(tied: bool):
    return smollm2(
        vocab_size=VOCAB, num_layers=LAYERS, num_heads=HEADS, num_kv_heads=KV_HEADS, embed_dim=DIM,
        intermediate_dim=FFN, max_seq_len=256, rope_base=ROPE_BASE, norm_eps=EPS, tie_word_embeddings=tied,
    )


def test_permutation_helper_matches_llama_cpp_reshape():
    # The test's row order equals llama.cpp's reshape(n_head, 2, d/2, ...).swapaxes(1, 2).
    w = np.arange(HEADS * HEAD_DIM * 3).reshape(HEADS * HEAD_DIM, 3)
    llama_cpp = w.reshape(HEADS, 2, HEAD_DIM // 2, 3).swapaxes(1, 2).reshape(w.shape)
    np.testing.assert_array_equal(w[_llama_cpp_rows(w.shape[0], HEADS)], llama_cpp)


@pytest.mark.parametrize("tied,f16", [(True, False), (False, True)])
def test_converted_checkpoint_matches_reference_logits(tmp_path, tied, f16):
    hf_sd = _hf_weights(tied=tied, f16=f16)
    path = _write_gguf(tmp_path / "tiny.gguf", hf_sd, f16=f16)
    out = gguf_to_hf(path, tmp_path / "hf")

    # The written HF weights are the source weights (q/k back in HF layout).
    ckpt = FullModelHFCheckpointer(
        checkpoint_dir=str(out), checkpoint_files=["model.safetensors"],
        model_type="LLAMA3_2" if tied else "LLAMA3", output_dir=str(tmp_path / "run"),
    )
    converted = _model(tied)
    converted.load_state_dict(ckpt.load_checkpoint()["model"])

    reference = _model(tied)
    ref_sd = hf_to_tune(hf_sd, num_heads=HEADS, num_kv_heads=KV_HEADS, dim=DIM, head_dim=HEAD_DIM)
    if tied:
        ref_sd.pop("output.weight", None)
    reference.load_state_dict(ref_sd)

    tokens = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = converted(tokens), reference(tokens)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max()
    # A wrong q/k layout would change the logits: the check has teeth.
    assert want.std() > 0.1

    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]) == (DIM, HEADS, KV_HEADS)
    assert (config["head_dim"], config["intermediate_size"], config["num_hidden_layers"]) == (HEAD_DIM, FFN, LAYERS)
    assert config["vocab_size"] == VOCAB and config["tie_word_embeddings"] is tied
    assert config["rms_norm_eps"] == EPS and config["rope_theta"] == ROPE_BASE
    assert config["torch_dtype"] == "float32"


def test_wrong_inverse_is_detected(tmp_path):
    """Loading the GGUF rows without the inverse permutation gives different logits."""
    hf_sd = _hf_weights(tied=True, f16=False)
    permuted = {
        k: (v[_llama_cpp_rows(v.shape[0], HEADS if "q_proj" in k else KV_HEADS)] if ("q_proj" in k or "k_proj" in k) else v)
        for k, v in hf_sd.items()
    }
    tokens = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(2))
    logits = []
    for sd in (hf_sd, permuted):
        m = _model(True)
        m.load_state_dict(hf_to_tune(sd, num_heads=HEADS, num_kv_heads=KV_HEADS, dim=DIM, head_dim=HEAD_DIM))
        with torch.no_grad():
            logits.append(m(tokens))
    assert not torch.allclose(logits[0], logits[1], atol=1e-3)


def test_tokenizer_files(tmp_path):
    out = gguf_to_hf(_write_gguf(tmp_path / "tiny.gguf", _hf_weights(True, False)), tmp_path / "hf")
    vocab = json.loads((out / "vocab.json").read_text(encoding="utf-8"))
    assert vocab == {tok: i for i, tok in enumerate(TOKENS)}
    lines = (out / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("#version") and lines[1:] == MERGES
    cfg = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert cfg["chat_template"] == TEMPLATE
    assert cfg["bos_token"] == "<|im_start|>" and cfg["eos_token"] == "<|im_end|>"
    assert set(cfg["added_tokens_decoder"]) == {"0", "1", "2"}


def test_no_tokenizer_writes_only_weights(tmp_path):
    out = gguf_to_hf(_write_gguf(tmp_path / "t.gguf", _hf_weights(True, False), tokenizer=False), tmp_path / "hf")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]


def test_error_paths(tmp_path, capsys):
    with pytest.raises(FileNotFoundError):
        gguf_to_hf(tmp_path / "missing.gguf", tmp_path / "a")
    not_gguf = tmp_path / "junk.gguf"
    not_gguf.write_bytes(b"not a gguf file at all" * 4)
    with pytest.raises(ValueError, match="GGUF"):
        gguf_to_hf(not_gguf, tmp_path / "b")
    other = _write_gguf(tmp_path / "falcon.gguf", _hf_weights(True, False), arch="falcon", tokenizer=False)
    with pytest.raises(ValueError, match="llama architecture"):
        gguf_to_hf(other, tmp_path / "c")
    assert not (tmp_path / "c").exists()

    good = _write_gguf(tmp_path / "tiny.gguf", _hf_weights(True, False), tokenizer=False)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        gguf_to_hf(good, busy)
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    gguf_to_hf(good, empty)  # an existing empty directory is fine

    # The command line reports each problem with exit status 2 and a message.
    for argv, message in [
        ([str(tmp_path / "missing.gguf"), str(tmp_path / "d")], "not found"),
        ([str(other), str(tmp_path / "e")], "llama architecture"),
        ([str(good), str(busy)], "not empty"),
    ]:
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        assert message in capsys.readouterr().err
    assert main([str(good), str(tmp_path / "f")]) == 0
    assert (tmp_path / "f" / "model.safetensors").is_file()


def test_module_command_runs(tmp_path, monkeypatch, capsys):
    """`python -m comparative_recipe.models.gguf` runs `main` (run in-process to stay fast)."""
    argv = ["gguf", str(tmp_path / "missing.gguf"), str(tmp_path / "o")]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.delitem(sys.modules, "comparative_recipe.models.gguf", raising=False)
    with pytest.raises(SystemExit) as exc:
        runpy.run_module("comparative_recipe.models.gguf", run_name="__main__", alter_sys=True)
    assert exc.value.code == 2 and "not found" in capsys.readouterr().err
