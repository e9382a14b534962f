"""Convert a llama-architecture GGUF file into an HF-format checkpoint directory.

The output directory holds what `torchtune.training.FullModelHFCheckpointer` (model_type
LLAMA3_2 or LLAMA3) reads: `model.safetensors` (every tensor dequantised to float32, HF key
names) and `config.json`; if the GGUF carries a GPT-2-style BPE tokenizer, also `vocab.json`,
`merges.txt`, `tokenizer_config.json` (with the chat template) and `special_tokens_map.json`,
and, for a pre-tokenizer in `PRE_TOKENIZERS` (SmolLM2's `smollm`, GPT-2's), the HF `tokenizers`
file `tokenizer.json` that `comparative_recipe.models.smollm2.smollm2_tokenizer` reads.

Command line:

    python -m comparative_recipe.models.gguf INPUT.gguf OUT_DIR

Needs the optional `gguf` package (`pip install comparative_recipe[gguf]`).

About the q/k layout: llama.cpp's converter permutes the rows of every q and k projection from
HF's rotary layout (each head's first half of rows rotates with its second half) to the
interleaved layout (rows 2i and 2i+1 of a head form one rotary pair):
`w.reshape(n_head, 2, head_dim // 2, dim).swapaxes(1, 2)`. `_unpermute` applies the inverse.
"""

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from safetensors.torch import save_file

__all__ = ["gguf_to_hf", "main"]

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"

# llama.cpp tensor name (inside block N for the blk.* ones) -> HF Llama name.
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
# GGUF token types (llama.cpp's llama_token_type): 3 = control, 4 = user defined.
_SPECIAL_TOKEN_TYPES = (3, 4)
# llama.cpp's `tokenizer.ggml.pre` names -> whether digits are split one by one before the
# byte-level (GPT-2 regex) split. SmolLM2's tokenizer.json: Digits(individual) then ByteLevel.
PRE_TOKENIZERS = {"smollm": True, "gpt-2": False, "gpt2": False, "default": False}


def _import_gguf():
    try:
        import gguf  # noqa: PLC0415
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "Reading GGUF files needs the `gguf` package: pip install 'comparative_recipe[gguf]'"
        ) from e
    return gguf


def _field(reader, key: str, default: Any = None) -> Any:
    field = reader.get_field(key)
    if field is None:
        return default
    return field.contents()


def _required(reader, key: str) -> Any:
    value = _field(reader, key)
    if value is None:
        raise ValueError(f"GGUF file lacks the required metadata key {key!r}")
    return value


def _clean_float(value: float) -> float:
    """A float32 metadata value as the decimal it was written from (9.99999975e-06 -> 1e-05)."""
    return float(f"{float(value):.7g}")


def _hf_name(gguf_name: str, num_layers: int) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _BLOCK_NAMES:
        layer = int(parts[1])
        if layer >= num_layers:
            raise ValueError(f"tensor {gguf_name!r} is beyond block_count={num_layers}")
        return f"model.layers.{layer}.{_BLOCK_NAMES[parts[2]]}"
    if gguf_name == "rope_freqs.weight":
        raise ValueError(
            "GGUF holds rope_freqs.weight (Llama-3 RoPE frequency scaling); only unscaled RoPE "
            "is supported"
        )
    raise ValueError(f"unsupported tensor {gguf_name!r} in a llama GGUF")


def _unpermute(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Invert llama.cpp's q/k row permutation (interleaved rotary pairs -> HF half split)."""
    rows = weight.shape[0]
    if rows % (2 * n_heads) != 0:
        raise ValueError(f"cannot split {rows} rows into {n_heads} heads of rotary pairs")
    half = rows // n_heads // 2
    return (
        weight.reshape(n_heads, half, 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def _dequantise(gguf, tensor) -> np.ndarray:
    """The tensor as a float32 array in numpy (row-major, HF) shape."""
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    return np.array(values, dtype=np.float32).reshape(shape)


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.exists():
        if not out_dir.is_dir():
            raise FileExistsError(f"output path {str(out_dir)!r} exists and is not a directory")
        if any(out_dir.iterdir()):
            raise FileExistsError(f"output directory {str(out_dir)!r} is not empty; refusing to overwrite")


def _read_config(reader, arch: str, tensor_shapes: Dict[str, tuple]) -> Dict[str, Any]:
    hidden = int(_required(reader, f"{arch}.embedding_length"))
    num_layers = int(_required(reader, f"{arch}.block_count"))
    num_heads = int(_required(reader, f"{arch}.attention.head_count"))
    num_kv_heads = int(_field(reader, f"{arch}.attention.head_count_kv", num_heads))
    head_dim = int(_field(reader, f"{arch}.attention.key_length", hidden // num_heads))
    rope_dim = int(_field(reader, f"{arch}.rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise ValueError(f"partial rotary embeddings (rope dim {rope_dim} != head dim {head_dim}) are not supported")
    scaling = _field(reader, f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        raise ValueError(f"RoPE scaling {scaling!r} is not supported; only unscaled RoPE is")
    if "token_embd.weight" not in tensor_shapes:
        raise ValueError("GGUF file has no token_embd.weight tensor")
    vocab_size = int(_field(reader, f"{arch}.vocab_size", tensor_shapes["token_embd.weight"][0]))
    intermediate = _field(reader, f"{arch}.feed_forward_length")
    if intermediate is None:
        intermediate = tensor_shapes["blk.0.ffn_up.weight"][0]
    context = int(_field(reader, f"{arch}.context_length", 2048))
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": int(intermediate),
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": context,
        "rms_norm_eps": _clean_float(_required(reader, f"{arch}.attention.layer_norm_rms_epsilon")),
        "rope_theta": _clean_float(_field(reader, f"{arch}.rope.freq_base", 10_000.0)),
        "rope_scaling": None,
        "tie_word_embeddings": "output.weight" not in tensor_shapes,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
    }


def _tokenizer_files(reader) -> Optional[Dict[str, str]]:
    """Text of the HF tokenizer files, or None when the GGUF has no GPT-2-style tokenizer."""
    model = _field(reader, "tokenizer.ggml.model")
    tokens: Optional[List[str]] = _field(reader, "tokenizer.ggml.tokens")
    merges: Optional[List[str]] = _field(reader, "tokenizer.ggml.merges")
    if model != "gpt2" or tokens is None or merges is None:
        return None
    token_types = _field(reader, "tokenizer.ggml.token_type") or []

    def token(key: str) -> Optional[str]:
        idx = _field(reader, f"tokenizer.ggml.{key}_token_id")
        return tokens[int(idx)] if idx is not None and int(idx) < len(tokens) else None

    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("GGUF tokenizer has duplicate tokens")
    added = {
        str(i): {
            "content": tokens[i],
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i, kind in enumerate(token_types)
        if int(kind) in _SPECIAL_TOKEN_TYPES
    }
    specials = {
        name: tok
        for name, tok in (
            ("bos_token", token("bos")),
            ("eos_token", token("eos")),
            ("unk_token", token("unknown")),
            ("pad_token", token("padding")),
        )
        if tok is not None
    }
    tokenizer_config: Dict[str, Any] = {
        "tokenizer_class": "GPT2Tokenizer",
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        "add_prefix_space": bool(_field(reader, "tokenizer.ggml.add_space_prefix", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000_000,
        "added_tokens_decoder": added,
        "additional_special_tokens": [a["content"] for a in added.values() if a["content"] not in specials.values()],
        **specials,
    }
    pre = _field(reader, "tokenizer.ggml.pre")
    if pre is not None:
        tokenizer_config["gguf_pre_tokenizer"] = pre
    template = _field(reader, "tokenizer.chat_template")
    if template is not None:
        tokenizer_config["chat_template"] = template
    files = {
        "vocab.json": json.dumps(vocab, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "".join(m + "\n" for m in merges),
        "tokenizer_config.json": json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n",
        "special_tokens_map.json": json.dumps(specials, indent=2, ensure_ascii=False) + "\n",
    }
    if (pre or "default") in PRE_TOKENIZERS:
        special = [a["content"] for a in added.values()]
        files["tokenizer.json"] = _tokenizer_json(vocab, merges, special, PRE_TOKENIZERS[pre or "default"])
    return files


def _tokenizer_json(vocab: Dict[str, int], merges: List[str], special: List[str],
                    split_digits: bool) -> str:
    """The HF `tokenizers` file of a byte-level BPE: the GPT-2 split (after single digits when
    `split_digits`), no prefix space, ByteLevel decoder, `special` matched before the BPE."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        if split_digits else byte_level
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    return tok.to_str(pretty=False) + "\n"


def gguf_to_hf(gguf_path: Union[str, Path], out_dir: Union[str, Path]) -> Path:
    """Convert the llama-architecture GGUF file `gguf_path` into the HF checkpoint `out_dir`.

    All tensors are dequantised to float32; q/k projections are returned to HF's rotary layout.

    Returns:
        `out_dir` as a Path.

    Raises:
        FileNotFoundError: `gguf_path` does not exist.
        ValueError: not a GGUF file, not the llama architecture, or an unsupported feature.
        FileExistsError: `out_dir` exists and is not an empty directory.
    """
    gguf = _import_gguf()
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file {str(gguf_path)!r} not found")
    _check_out_dir(out_dir)
    try:
        reader = gguf.GGUFReader(str(gguf_path))
    except ValueError as e:
        raise ValueError(f"{str(gguf_path)!r} is not a readable GGUF file: {e}") from e

    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"only the llama architecture is supported, {str(gguf_path)!r} is {arch!r}")
    shapes = {t.name: tuple(int(d) for d in reversed(t.shape.tolist())) for t in reader.tensors}
    config = _read_config(reader, arch, shapes)

    state_dict: Dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        name = _hf_name(tensor.name, config["num_hidden_layers"])
        weight = _dequantise(gguf, tensor)
        if name.endswith("q_proj.weight"):
            weight = _unpermute(weight, config["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            weight = _unpermute(weight, config["num_key_value_heads"])
        state_dict[name] = torch.from_numpy(np.ascontiguousarray(weight))
    expected_vocab = state_dict["model.embed_tokens.weight"].shape[0]
    if expected_vocab != config["vocab_size"]:
        raise ValueError(f"vocab_size {config['vocab_size']} does not match token_embd rows {expected_vocab}")
    tokenizer = _tokenizer_files(reader)

    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(state_dict, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt"})
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    if tokenizer is not None:
        for filename, text in tokenizer.items():
            (out_dir / filename).write_text(text, encoding="utf-8")
    return out_dir


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m comparative_recipe.models.gguf",
        description="Convert a llama-architecture GGUF file into an HF-format checkpoint "
        "directory (float32 model.safetensors, config.json, tokenizer files).",
    )
    parser.add_argument("gguf_path", metavar="INPUT.gguf", help="the GGUF file to convert")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="output directory (must be absent or empty)")
    args = parser.parse_args(argv)
    try:
        out = gguf_to_hf(args.gguf_path, args.out_dir)
    except (FileNotFoundError, FileExistsError, ValueError, ImportError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
