"""A seeded subset of a dataset: the few examples of a low-resource setting."""

from typing import Any

import torch
from torch.utils.data import Dataset


class ExampleSubset(Dataset):
    """``num_examples`` samples of ``dataset``, drawn without replacement by ``seed`` (the same
    ones on every rank and run), in their original order. Other attributes (a classification
    dataset's ``label_token_ids``, a chunked dataset's settings) are the dataset's."""

    def __init__(self, dataset: Dataset, num_examples: int, seed: int = 0) -> None:
        if num_examples > len(dataset):
            raise ValueError(
                f"num_examples={num_examples} but the dataset has {len(dataset)} samples: "
                "lower it or add data"
            )
        g = torch.Generator().manual_seed(int(seed))
        self.indices = sorted(torch.randperm(len(dataset), generator=g)[:num_examples].tolist())
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        return self.dataset[self.indices[i]]

    def __getattr__(self, name: str) -> Any:
        if name in ("dataset", "indices"):
            raise AttributeError(name)
        return getattr(self.dataset, name)
