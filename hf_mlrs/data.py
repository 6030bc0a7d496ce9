"""The meta set: held out from the training data, and read in deterministic batches.

The paper holds out 1,000 class-balanced training examples as its meta set and never trains on them; here they rejoin
training once no meta step is left in the run (`MetaShareSampler`). Meta batches
are drawn by index from a seeded permutation per pass, so batch m is a pure function of (m, rank): resuming from
a checkpoint draws exactly the batches the uninterrupted run would have drawn, with no sampler state to save.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence

import torch


LABEL_COLUMNS = ("label", "labels")


def _label_column(dataset) -> list | None:
    """The labels of a `datasets.Dataset` (from its `label`/`labels` column), else None."""
    names = getattr(dataset, "column_names", None) or []
    for name in LABEL_COLUMNS:
        if name in names:
            labels = dataset.with_format(None)[name]  # plain Python values even for torch-formatted datasets
            if all(isinstance(y, (int, str, bool)) for y in labels):
                return list(labels)
    return None


def split_meta_indices(dataset, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, meta) indices of `dataset`, `fraction` of it held out as the meta set (see `split_meta_set`)."""
    n = len(dataset)
    n_meta = max(1, round(fraction * n))
    rng = random.Random(seed)
    labels = _label_column(dataset)
    if labels is not None:
        by_class = defaultdict(list)
        for i, y in enumerate(labels):
            by_class[y].append(i)
        per_class = max(1, n_meta // len(by_class))
        meta = []
        for y in sorted(by_class, key=str):
            members = by_class[y]
            meta += rng.sample(members, min(per_class, len(members) - 1))
    else:
        meta = rng.sample(range(n), min(n_meta, n - 1))
    meta = sorted(meta)
    held = set(meta)
    return [i for i in range(n) if i not in held], meta


def split_meta_set(dataset, fraction: float, seed: int) -> tuple:
    """Split `dataset` into (train, meta) with `fraction` of it held out as the meta set.

    When a label column exists the meta set is class-balanced: the same number of examples of every class, and
    every class keeps at least one training example. Returns `datasets.Dataset.select` views for a
    `datasets.Dataset`, `torch.utils.data.Subset`s otherwise; the training part keeps the original order.
    """
    train, meta = split_meta_indices(dataset, fraction, seed)
    return subset(dataset, train), subset(dataset, meta)


def subset(dataset, indices: Sequence[int]):
    """The examples `indices` of `dataset`: a `datasets.Dataset.select` view, else a `torch.utils.data.Subset`."""
    return dataset.select(indices) if hasattr(dataset, "select") else torch.utils.data.Subset(dataset, indices)


class MetaShareSampler(torch.utils.data.Sampler):
    """Training order over a dataset part of which is held out as the meta set, until the meta set is released.

    Once no meta step is left in a run (a learned scale that holds, or the final cooldown), the held-out examples
    would never be used again: `release()` returns them to training from the next epoch on. Every epoch is a seeded
    permutation, of the training part before the release and of the whole dataset after it, cut to the training
    part's length, so the Trainer's count of steps per epoch does not change (a released epoch is a random subset of
    the whole of that size: every example has the same chance). An epoch's order is drawn when the epoch starts and
    depends only on (seed, epoch, released), and `released_from` is part of the run's checkpointed state, so a
    resumed run (and every process of a distributed one) draws the same batches as the run it continues.
    """

    def __init__(self, train_indices: Sequence[int], num_examples: int, seed: int):
        self.train_indices = list(train_indices)
        self.num_examples = num_examples
        self.seed = seed
        self.epoch = 0
        self.released_from: int | None = None  # the first epoch that draws from the whole dataset

    # Called before each epoch by the Trainer (through Accelerate) and by MLRSTrainer's epoch hook, which also reaches
    # it through a resumed loader of several processes.
    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def release(self) -> None:
        """The meta set is no longer needed: it rejoins training from the next epoch (this one's order is drawn)."""
        if self.released_from is None:
            self.released_from = self.epoch + 1

    @property
    def released(self) -> bool:
        return self.released_from is not None and self.epoch >= self.released_from

    def __len__(self) -> int:
        return len(self.train_indices)

    def __iter__(self):
        pool = range(self.num_examples) if self.released else self.train_indices
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + 2 * self.epoch + int(self.released))
        order = torch.randperm(len(pool), generator=generator)[: len(self.train_indices)].tolist()
        return iter([pool[i] for i in order])

    def state_dict(self) -> dict:
        return {"released_from": self.released_from}

    def load_state_dict(self, state: dict) -> None:
        self.released_from = state["released_from"]


class MetaBatchSampler:
    """Indices of meta batch `m` on process `rank` of `world`: consecutive slices of seeded per-pass permutations.

    Every process reads a different slice, so the averaged hypergradient uses `world * batch_size` examples.
    """

    def __init__(self, num_examples: int, batch_size: int, seed: int):
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.seed = seed
        self._permutations: dict[int, list[int]] = {}

    def _permutation(self, epoch: int) -> list[int]:
        if epoch not in self._permutations:
            if len(self._permutations) > 2:
                self._permutations.pop(min(self._permutations))
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._permutations[epoch] = torch.randperm(self.num_examples, generator=generator).tolist()
        return self._permutations[epoch]

    def indices(self, m: int, rank: int = 0, world: int = 1) -> Sequence[int]:
        start = (m * world + rank) * self.batch_size
        positions = range(start, start + self.batch_size)
        return [self._permutation(p // self.num_examples)[p % self.num_examples] for p in positions]
