"""Data for comparative training: dataset builders, the comparative collate, the embedded demo."""

from comparative_recipe.data.collate import collate_padding_idx, comparative_collate
from comparative_recipe.data.datasets import (
    classification_dataset,
    ClassificationDataset,
    ComparativeDataset,
    context_qa_dataset,
    ContextQADataset,
    separator_token_ids,
    special_token_ids,
    validate_vocab,
)
from comparative_recipe.data.demo import (
    DEMO_PAD_ID,
    demo_tokenizer,
    needle_qa_dataset,
    needle_qa_records,
)

__all__ = [
    "ClassificationDataset",
    "ComparativeDataset",
    "ContextQADataset",
    "DEMO_PAD_ID",
    "classification_dataset",
    "collate_padding_idx",
    "comparative_collate",
    "context_qa_dataset",
    "demo_tokenizer",
    "needle_qa_dataset",
    "needle_qa_records",
    "separator_token_ids",
    "special_token_ids",
    "validate_vocab",
]
