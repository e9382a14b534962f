"""Data for comparative training: dataset builders, chunking, the comparative collate, the
embedded demo. Builders are usable as ``_component_: comparative_recipe.data.<builder>``."""

from comparative_recipe.data.chunking import (
    ChunkingConfig,
    chunking_config,
    PAD_CHUNK,
    PROTECTED_CHUNK,
)
from comparative_recipe.data.classification import classification_dataset, ClassificationDataset
from comparative_recipe.data.collate import collate_padding_idx, comparative_collate
from comparative_recipe.data.comparative import comparative_dataset, ComparativeDataset
from comparative_recipe.data.context_qa import (
    context_qa_dataset,
    context_qa_from_data,
    ContextQADataset,
    DEFAULT_PASSAGE_TEMPLATE,
    DEFAULT_QA_INSTRUCTION,
    join_sentences,
    multi_passage_qa_dataset,
    read_passages,
    supporting_titles,
)
from comparative_recipe.data.demo import (
    DEMO_PAD_ID,
    demo_tokenizer,
    needle_qa_dataset,
    needle_qa_records,
)
from comparative_recipe.data.messages import (
    CHUNK_ROLES,
    message_content_spans,
    MessageSpansTokenizer,
)
from comparative_recipe.data.wordnet import sense_accuracy, wordnet_sense_dataset
from comparative_recipe.data.tokenizer_utils import (
    separator_token_ids,
    special_token_ids,
    TokenTexts,
    validate_vocab,
)

__all__ = [
    "sense_accuracy",
    "wordnet_sense_dataset",
    "CHUNK_ROLES",
    "ChunkingConfig",
    "ClassificationDataset",
    "ComparativeDataset",
    "ContextQADataset",
    "DEFAULT_PASSAGE_TEMPLATE",
    "DEFAULT_QA_INSTRUCTION",
    "DEMO_PAD_ID",
    "MessageSpansTokenizer",
    "PAD_CHUNK",
    "PROTECTED_CHUNK",
    "TokenTexts",
    "chunking_config",
    "classification_dataset",
    "collate_padding_idx",
    "comparative_collate",
    "comparative_dataset",
    "context_qa_dataset",
    "context_qa_from_data",
    "demo_tokenizer",
    "join_sentences",
    "message_content_spans",
    "multi_passage_qa_dataset",
    "needle_qa_dataset",
    "needle_qa_records",
    "read_passages",
    "separator_token_ids",
    "special_token_ids",
    "supporting_titles",
    "validate_vocab",
]
