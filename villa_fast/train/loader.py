"""A resumable loader for datasets whose items are whole batches (the retrieval evaluation: one query with all
its candidates per item)."""

from __future__ import annotations

import random
from collections.abc import Callable

from torch.utils.data import DataLoader

__all__ = ["ItemLoader"]


class ItemLoader:
    """One item per batch, in a per-epoch permutation drawn from ``(seed, epoch)``, sharded by rank.

    Same resumable interface as :class:`villa_fast.data.TokenBucketLoader`: ``state_dict()`` ->
    ``{"epoch", "batch_index", "seed"}``; ``iter()`` continues after the batches handed out.
    """

    def __init__(
        self,
        dataset,
        collate_fn: Callable,
        *,
        shuffle: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        limit: int = 0,
    ):
        self.dataset = dataset
        self.collate_fn = collate_fn
        self.shuffle = shuffle
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.num_workers = num_workers
        self.limit = limit
        self.epoch = 0
        self.batch_index = 0

    def _indices(self) -> list[int]:
        ids = list(range(len(self.dataset)))
        if self.limit:
            ids = ids[: self.limit]
        if self.shuffle:
            random.Random((self.seed * 1_000_003 + self.epoch) & ((1 << 63) - 1)).shuffle(ids)
        n = len(ids) // self.world_size * self.world_size if self.shuffle else len(ids)
        return ids[:n][self.rank :: self.world_size]

    def __len__(self) -> int:
        return len(self._indices())

    def __iter__(self):
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(self.epoch, self.seed)
        ids = self._indices()[self.batch_index :]
        loader = DataLoader(
            _Subset(self.dataset, ids), batch_size=1, collate_fn=self.collate_fn, num_workers=self.num_workers
        )
        for batch in loader:
            self.batch_index += 1
            yield batch
        self.epoch += 1
        self.batch_index = 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch_index": self.batch_index, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self.batch_index = int(state.get("batch_index", 0))
        self.seed = int(state.get("seed", self.seed))


class _Subset:
    def __init__(self, dataset, ids: list[int]):
        self.dataset, self.ids = dataset, ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        return self.dataset[self.ids[i]]
