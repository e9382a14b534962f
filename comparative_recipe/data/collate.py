"""Collate for comparative training: the torchtune SFT batch plus sample ids and chunk ids.

The batch (what the comparative step reads), every tensor right-padded to the longest sample:

- ``tokens``     LongTensor [B, S]: padded with the tokenizer's pad id.
- ``labels``     LongTensor [B, S]: NOT shifted, as torchtune's SFT datasets emit them
  (labels[b, i] is token i if it is trained on, else -100); the step shifts them.
- ``sample_ids`` LongTensor [B]: each sample's index in the dataset; keys every random choice
  (masks, crop orders), so a sample gets the same ablations in any row, on any rank.
- ``chunk_ids``  LongTensor [B, S]: ``PAD_CHUNK`` (-2) on padding, ``PROTECTED_CHUNK`` (-1) on
  tokens never dropped, k >= 0 on droppable chunk k of that sample (0..n_b-1 in order of
  position); see ``comparative_recipe.data.chunking``.
- ``class_id``   LongTensor [B]: only for classification items.
"""

from typing import Any, Dict, List, Mapping

import torch
from torch.nn.utils.rnn import pad_sequence

from torchtune.data import CROSS_ENTROPY_IGNORE_IDX

from comparative_recipe.data.chunking import PAD_CHUNK, PROTECTED_CHUNK


def collate_padding_idx(tokenizer: Any) -> int:
    """The token id to pad ``tokens`` with for this tokenizer.

    ``tokenizer.pad_id`` when it is a valid id (>= 0), else 0. torchtune's ``llama2_tokenizer``
    sets ``pad_id = 0`` itself (SentencePiece models usually have no pad piece, so the raw
    ``SentencePieceProcessor.pad_id()`` is -1); id 0 is then the ``<unk>`` piece. Any valid id
    works: padding sits at the end of each row (right padding, causal attention) and carries
    label ``ignore_idx`` and chunk id -2, so it never influences a loss. A negative id would
    index the embedding out of range, hence the fallback.
    """
    pad_id = getattr(tokenizer, "pad_id", None)
    if isinstance(pad_id, int) and pad_id >= 0:
        return pad_id
    return 0


def _long_1d(values: Any, key: str, index: int) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=torch.long)
    if t.dim() != 1:
        raise ValueError(
            f"batch item {index}: '{key}' must be 1-D, got shape {tuple(t.shape)}"
        )
    return t


def comparative_collate(
    batch: List[Mapping[str, Any]],
    padding_idx: int = 0,
    ignore_idx: int = CROSS_ENTROPY_IGNORE_IDX,
) -> Dict[str, torch.Tensor]:
    """Right-pads a list of samples into the comparative batch (see the module docstring).

    Each item needs ``tokens`` and ``labels`` (same length ``S_b``, lists or 1-D tensors of
    ints) and ``sample_id`` (int), as ``ComparativeDataset`` emits them. ``chunk_ids`` (length
    ``S_b``) is optional: an item without it gets all -1 (nothing droppable). An integer
    ``class_id`` present on every item is collated too. Other fields are ignored.

    Args:
        batch (List[Mapping[str, Any]]): the samples.
        padding_idx (int): token id used to pad ``tokens``; must be >= 0 (see
            ``collate_padding_idx``). Default 0.
        ignore_idx (int): label used to pad ``labels``. Default -100.

    Returns:
        Dict[str, torch.Tensor]: with ``S = max_b S_b``,

        - ``tokens``     LongTensor [B, S], padded with ``padding_idx``
        - ``labels``     LongTensor [B, S], padded with ``ignore_idx`` (not shifted)
        - ``sample_ids`` LongTensor [B]
        - ``chunk_ids``  LongTensor [B, S], padded with -2
        - ``class_id``   LongTensor [B], only if the items carry ``class_id``

    Raises:
        ValueError: on an empty batch, a negative ``padding_idx``, a missing ``sample_id``,
            lengths that disagree within an item, or ``class_id`` on some items only.
    """
    if len(batch) == 0:
        raise ValueError("comparative_collate got an empty batch")
    if padding_idx < 0:
        raise ValueError(
            f"padding_idx must be a valid token id (>= 0), got {padding_idx}; "
            "use comparative_recipe.data.collate_padding_idx(tokenizer)"
        )

    tokens, labels, chunk_ids, sample_ids = [], [], [], []
    for i, item in enumerate(batch):
        if "sample_id" not in item:
            raise ValueError(
                f"batch item {i} has no 'sample_id' (fields: {sorted(item.keys())}); "
                "wrap the dataset in comparative_recipe.data.ComparativeDataset"
            )
        tok = _long_1d(item["tokens"], "tokens", i)
        lab = _long_1d(item["labels"], "labels", i)
        if "chunk_ids" in item and item["chunk_ids"] is not None:
            chk = _long_1d(item["chunk_ids"], "chunk_ids", i)
        else:
            chk = torch.full_like(tok, PROTECTED_CHUNK)
        if not (len(tok) == len(lab) == len(chk)):
            raise ValueError(
                f"batch item {i}: tokens, labels and chunk_ids have lengths "
                f"{len(tok)}, {len(lab)}, {len(chk)}; they must be equal"
            )
        tokens.append(tok)
        labels.append(lab)
        chunk_ids.append(chk)
        sample_ids.append(int(item["sample_id"]))

    out = {
        "tokens": pad_sequence(tokens, batch_first=True, padding_value=padding_idx),
        "labels": pad_sequence(labels, batch_first=True, padding_value=ignore_idx),
        "sample_ids": torch.tensor(sample_ids, dtype=torch.long),
        "chunk_ids": pad_sequence(chunk_ids, batch_first=True, padding_value=PAD_CHUNK),
    }

    has_class = [("class_id" in item) for item in batch]
    if any(has_class):
        if not all(has_class):
            raise ValueError("'class_id' is present on some batch items but not on all")
        out["class_id"] = torch.tensor([int(item["class_id"]) for item in batch], dtype=torch.long)
    return out

