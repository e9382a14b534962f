"""The prune section: the scored data default to the training set, per-site sparsities, and
every key the chosen method would ignore is an error (before anything is loaded)."""

import pytest
from omegaconf import OmegaConf

from comparative_recipe.models.tiny import init_tiny_llama_checkpoint
from comparative_recipe.pruning.settings import prune_config

MODEL = dict(vocab_size=64, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32,
             intermediate_dim=16, max_seq_len=64)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "base"
    init_tiny_llama_checkpoint(path, seed=0, **MODEL)
    return path


def cfg(checkpoint, tmp_path, **prune):
    return OmegaConf.create({
        "output_dir": str(tmp_path / "out"),
        "model": {"_component_": "comparative_recipe.models.tiny.tiny_llama", **MODEL},
        "checkpointer": {"_component_": "torchtune.training.FullModelHFCheckpointer",
                         "checkpoint_dir": str(checkpoint), "checkpoint_files": ["model.safetensors"],
                         "model_type": "LLAMA3_2", "output_dir": str(tmp_path / "out")},
        "dataset": {"_component_": "train_data"}, "batch_size": 4,
        "validation": {"dataset": {"_component_": "dev_data"}, "batch_size": 2,
                       "generate": {"max_new_tokens": 5}},
        "prune": prune,
    })


def test_the_training_data_are_scored_by_default(checkpoint, tmp_path):
    out, s = prune_config(cfg(checkpoint, tmp_path, sparsity=0.5))
    assert out.validation.dataset._component_ == "train_data"
    assert out.validation.batch_size == 2 and "generate" not in out.validation
    assert s.sparsity == {"ffn_hidden": 0.5, "attn_heads": 0.5}
    assert s.generation.max_new_tokens == 5  # validation.generate makes unsupervised answers
    assert s.output_dir == tmp_path / "out" / "pruned" and s.setting == "supervised"
    out, s = prune_config(cfg(checkpoint, tmp_path, sparsity={"ffn_hidden": 0.25, "attn_heads": 0},
                              dataset={"_component_": "other"}, num_examples=8, batch_size=3))
    assert out.validation.dataset._component_ == "other" and out.validation.batch_size == 3
    assert s.setting == "low_resource" and s.sparsity["attn_heads"] == 0.0


@pytest.mark.parametrize("prune, message", [
    ({"sparsity": 0.5, "method": "random", "dataset": {"_component_": "x"}}, "reads weights alone"),
    ({"sparsity": 0.5, "method": "wanda", "layers_per_pass": 2}, "read by method attribution"),
    ({"sparsity": 0.5, "generate": {"max_new_tokens": 3}}, "prune.data=unsupervised only"),
    ({"sparsity": {"ffn_hidden": 0.5}}, "gives no sparsity for ['attn_heads']"),
    ({"sparsity": 0.5, "sites": ["ffn_out"]}, "prune.sites entry must be one of"),
    ({"sparsity": 0.5, "ranking": "per_layer"}, "prune.ranking must be one of"),
    ({}, "set prune.sparsity"),
])
def test_keys_that_would_be_ignored_or_are_wrong_are_errors(checkpoint, tmp_path, prune, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        prune_config(cfg(checkpoint, tmp_path, **prune))


def test_an_existing_output_is_kept_unless_overwrite(checkpoint, tmp_path):
    (tmp_path / "out" / "pruned").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="prune.overwrite=true"):
        prune_config(cfg(checkpoint, tmp_path, sparsity=0.5))
    assert prune_config(cfg(checkpoint, tmp_path, sparsity=0.5, overwrite=True))[1].overwrite
