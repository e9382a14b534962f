"""Tests of the tiny Llama model and its HF-format checkpoint."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torchtune import training

from comparative_recipe.models.tiny import (
    init_tiny_llama,
    init_tiny_llama_checkpoint,
    tiny_llama,
    tiny_llama_hf_checkpointer,
    tiny_llama_hf_config,
)

SMALL = dict(vocab_size=128, embed_dim=32, intermediate_dim=64, max_seq_len=64)


def random_tokens(vocab_size, batch=2, seq=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, seq), generator=generator)


def test_forward_shape():
    model = tiny_llama()
    logits = model(random_tokens(512, batch=2, seq=16))
    assert logits.shape == (2, 16, 512)


def test_init_is_deterministic_and_keeps_global_rng(tmp_path):
    state = torch.random.get_rng_state()
    init_tiny_llama_checkpoint(tmp_path / "a", seed=3, **SMALL)
    init_tiny_llama_checkpoint(tmp_path / "b", seed=3, **SMALL)
    init_tiny_llama_checkpoint(tmp_path / "c", seed=4, **SMALL)
    assert torch.equal(torch.random.get_rng_state(), state)

    weights = {name: (tmp_path / name / "model.safetensors").read_bytes() for name in "abc"}
    assert weights["a"] == weights["b"]
    assert weights["a"] != weights["c"]
    configs = {name: (tmp_path / name / "config.json").read_text() for name in "abc"}
    assert configs["a"] == configs["b"]
    # Nothing but the checkpoint is left behind (no temporary directories).
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == ["config.json", "model.safetensors"]


@pytest.mark.parametrize("tie", [True, False])
def test_checkpoint_loads_back_with_same_logits(tmp_path, tie):
    kwargs = dict(SMALL, tie_word_embeddings=tie)
    checkpointer = tiny_llama_hf_checkpointer(tmp_path / "ckpt", tmp_path / "out", seed=1, **kwargs)
    state_dict = checkpointer.load_checkpoint()[training.MODEL_KEY]

    loaded = tiny_llama(**kwargs)
    loaded.load_state_dict(state_dict, strict=True)
    reference = init_tiny_llama(seed=1, **kwargs)

    tokens = random_tokens(SMALL["vocab_size"])
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), reference(tokens), rtol=0, atol=0)


def test_config_json_fields(tmp_path):
    init_tiny_llama_checkpoint(tmp_path, seed=0, **SMALL)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config == tiny_llama_hf_config(seed=0, **SMALL)
    assert config["model_type"] == "llama"
    assert config["head_dim"] == 32 // 4
    assert config["num_key_value_heads"] == 2
    assert config["tie_word_embeddings"] is True


def test_initial_loss_is_near_log_vocab():
    vocab_size = 512
    model = init_tiny_llama(seed=0)
    tokens = random_tokens(vocab_size, batch=4, seq=64, seed=1)
    with torch.no_grad():
        logits = model(tokens)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, vocab_size), tokens[:, 1:].reshape(-1))
    assert abs(loss.item() - math.log(vocab_size)) < 1.0


def test_existing_checkpoint_is_reused(tmp_path):
    init_tiny_llama_checkpoint(tmp_path, seed=0, **SMALL)
    weights = tmp_path / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    init_tiny_llama_checkpoint(tmp_path, seed=0, **SMALL)
    assert weights.stat().st_mtime_ns == mtime


def test_empty_directory_is_filled(tmp_path):
    (tmp_path / "ckpt").mkdir()
    init_tiny_llama_checkpoint(tmp_path / "ckpt", seed=0, **SMALL)
    assert (tmp_path / "ckpt" / "model.safetensors").is_file()


def test_mismatched_existing_config_raises(tmp_path):
    init_tiny_llama_checkpoint(tmp_path, seed=0, **SMALL)
    with pytest.raises(ValueError, match="different config.*hidden_size"):
        init_tiny_llama_checkpoint(tmp_path, seed=0, **dict(SMALL, embed_dim=64))
    with pytest.raises(ValueError, match="different config.*tiny_llama_seed"):
        init_tiny_llama_checkpoint(tmp_path, seed=1, **SMALL)


def test_foreign_directory_raises(tmp_path):
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="no config.json"):
        init_tiny_llama_checkpoint(tmp_path, seed=0, **SMALL)


def test_unknown_model_setting_raises(tmp_path):
    with pytest.raises(TypeError):
        init_tiny_llama_checkpoint(tmp_path, seed=0, hidden_size=32)
