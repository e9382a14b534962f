"""The training and validation dataloaders, resumable mid-epoch and identical on any rank count."""

from functools import partial
from typing import Any, NamedTuple, Optional

from omegaconf import DictConfig
from torch.utils.data import Dataset
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler
from torchtune import config
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX

from comparative_recipe.data.collate import comparative_collate


def build_dataloader(
    dataset: Dataset,
    *,
    batch_size: int,
    shuffle: bool,
    pad_id: int,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = True,
) -> StatefulDataLoader:
    """A ``StatefulDataLoader`` over ``dataset`` with the comparative collate.

    The sampler is torchtune's choice (``StatefulDistributedSampler``, shuffled by ``seed`` and
    the epoch set with ``sampler.set_epoch``), so with c = 0 the batches equal those of
    torchtune's own recipes, and ``state_dict()`` resumes in the middle of an epoch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(dataset) < batch_size * world_size and drop_last:
        raise ValueError(
            f"the dataset has {len(dataset)} samples, fewer than one batch of {batch_size} "
            f"per rank on {world_size} rank(s): lower batch_size or add data"
        )
    sampler = StatefulDistributedSampler(
        dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed
    )
    return StatefulDataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=partial(comparative_collate, padding_idx=pad_id),
        drop_last=drop_last,
    )


class _RankShard(Dataset):
    """Samples ``rank, rank + world_size, ...`` of ``dataset``, padded so that every rank has
    the same count: all ranks must run the same number of forwards under FSDP. A padding item
    repeats sample 0 with every label ignored, so it counts nowhere (an excluded sample)."""

    def __init__(self, dataset: Dataset, rank: int, world_size: int):
        self.dataset, self.rank, self.world_size = dataset, rank, world_size
        self._len = -(-len(dataset) // world_size)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int):
        index = self.rank + i * self.world_size
        if index < len(self.dataset):
            return self.dataset[index]
        item = dict(self.dataset[0])
        item["labels"] = [CROSS_ENTROPY_IGNORE_IDX] * len(item["labels"])
        return item


def build_eval_dataloader(
    dataset: Dataset, *, batch_size: int, pad_id: int, rank: int = 0, world_size: int = 1
) -> StatefulDataLoader:
    """Every sample of ``dataset`` exactly once over all ranks, in order (no sample repeated to
    even out the ranks, unlike ``DistributedSampler``), with the same batch count on each rank."""
    if batch_size < 1:
        raise ValueError(f"validation batch_size must be >= 1, got {batch_size}")
    return StatefulDataLoader(
        _RankShard(dataset, rank, world_size),
        batch_size=batch_size,
        shuffle=False,
        collate_fn=partial(comparative_collate, padding_idx=pad_id),
    )


class RecipeData(NamedTuple):
    """What a run trains and validates on: the training dataset, this rank's training batches,
    its share of the validation set (None without ``validation``) and the padding token id."""

    dataset: Dataset
    dataloader: StatefulDataLoader
    val_dataloader: Optional[StatefulDataLoader]
    pad_id: int


def setup_data(
    cfg: DictConfig, tokenizer: Any, *, pad_id: int, seed: int, rank: int = 0, world_size: int = 1
) -> RecipeData:
    """The configured datasets and their dataloaders.

    ``seed`` (the run's) shuffles the training order, so a run on one device and one on N ranks
    see the same samples in each global batch; with seed 0 the batches are torchtune's.
    """
    dataset = config.instantiate(cfg.dataset, tokenizer)
    dataloader = build_dataloader(
        dataset, batch_size=cfg.batch_size, shuffle=cfg.shuffle, pad_id=pad_id,
        seed=seed, rank=rank, world_size=world_size,
    )
    val_dataloader = None
    val_cfg = cfg.get("validation", None)
    if val_cfg is not None:
        val_dataloader = build_eval_dataloader(
            config.instantiate(val_cfg.dataset, tokenizer),
            batch_size=val_cfg.get("batch_size", cfg.batch_size),
            pad_id=pad_id, rank=rank, world_size=world_size,
        )
    return RecipeData(dataset, dataloader, val_dataloader, pad_id)
