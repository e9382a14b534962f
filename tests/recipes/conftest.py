"""Fixtures of the recipe tests."""

import json

import pytest

from comparative_recipe.data.demo import demo_tokenizer, needle_qa_records
from comparative_recipe.models.tiny import init_tiny_llama_checkpoint
from tests.recipes.recipe_helpers import MODEL


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    """A tokenizer, a random tiny HF checkpoint and an instruct-style json file."""
    root = tmp_path_factory.mktemp("assets")
    demo_tokenizer(str(root / "sp.model"), vocab_size=512)
    init_tiny_llama_checkpoint(root / "base", seed=0, **MODEL)
    records = needle_qa_records(48, seed=1, n_paragraphs=3)
    with open(root / "data.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps({"input": "\n\n".join(r["context"]) + "\n\n" + r["question"],
                                "output": r["answer"]}) + "\n")
    return root
