"""A dataset that fails on one rank after some reads: for the failing-rank test (a config
component; the test puts the repository root on PYTHONPATH)."""

import os

from torch.utils.data import Dataset

from comparative_recipe.data import comparative_dataset


class _FailsOnRank(Dataset):
    def __init__(self, dataset, rank: int, after: int):
        self.dataset, self.rank, self.after, self.reads = dataset, rank, after, 0

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        self.reads += 1
        if int(os.environ.get("RANK", 0)) == self.rank and self.reads > self.after:
            raise RuntimeError(f"injected data failure on rank {self.rank}")
        return self.dataset[i]


def failing_dataset(tokenizer, *, fail_rank: int, after: int, **kwargs):
    return _FailsOnRank(comparative_dataset(tokenizer, **kwargs), fail_rank, after)
