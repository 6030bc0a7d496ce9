"""The meta set: held out from the training data, and read in deterministic batches.

The paper holds out 1,000 class-balanced training examples as its meta set and never trains on them. Meta batches
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


def split_meta_set(dataset, fraction: float, seed: int) -> tuple:
    """Split `dataset` into (train, meta) with `fraction` of it held out as the meta set.

    When a label column exists the meta set is class-balanced: the same number of examples of every class, and
    every class keeps at least one training example. Returns `datasets.Dataset.select` views for a
    `datasets.Dataset`, `torch.utils.data.Subset`s otherwise; the training part keeps the original order.
    """
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
    train = [i for i in range(n) if i not in held]
    if hasattr(dataset, "select"):
        return dataset.select(train), dataset.select(meta)
    return torch.utils.data.Subset(dataset, train), torch.utils.data.Subset(dataset, meta)


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
