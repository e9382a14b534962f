"""The training and validation dataloaders, resumable mid-epoch and identical on any rank count."""

from functools import partial

from torch.utils.data import Dataset
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler

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
