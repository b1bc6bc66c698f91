"""How an experiment spreads a dataset over its workers.

In a real deployment every owner loads its own data. In the local simulations here each worker
process loads the dataset file and keeps only its shard (``aiosyft worker --dataset ... --shard
k/n``), and virtual workers get theirs from the process that creates them. Either way the shard
is :func:`privacy.federated.split_indices`'s, so every process cuts the same one. The library
(shards, loaders, training) is :mod:`privacy.federated`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from privacy.federated import SPLITS, split_indices
from runners.datasets import Dataset

__all__ = ["SPLITS", "Federation"]


@dataclass(frozen=True)
class Federation:
    """How a dataset's training part is spread over workers."""

    dataset: str
    workers: int
    split: str = "round-robin"
    seed: int = 0
    batch_size: int = 8

    def shards(self, data: Dataset) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every worker's ``(x, y)``: only the process simulating all owners calls this."""
        indices = split_indices(
            len(data.x_train), self.workers, self.split, targets=data.y_train, features=data.x_train,
            batch_size=self.batch_size, seed=self.seed,
        )  # fmt: skip
        return [(data.x_train[i].clone(), data.y_train[i].clone()) for i in indices]

    def worker_arguments(self, shard: int) -> list[str]:
        """``aiosyft worker`` options that make a worker process load and publish its shard."""
        return ["--dataset", self.dataset, "--shard", f"{shard}/{self.workers}", "--split", self.split,
                "--split-seed", str(self.seed), "--batch-size", str(self.batch_size)]  # fmt: skip
