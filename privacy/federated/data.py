"""Data split across workers, held by them, iterated by the leader through pointers.

Each worker holds its shard as its *own* data (published under ``"<dataset>/x"`` and
``"<dataset>/y"``, releasing model updates only): the leader can compute on it where it is, but
can neither fetch nor move it, and what it receives of a training run is losses and parameters.
Who splits the data and how each owner gets its shard is the experiment's business
(``runners.federated``); :func:`split_indices` is the rule.

The order in which batches are visited is a pure function of the shard sizes, the batch size,
the seed and the epoch (:func:`epoch_plan`), shared by the federated loader and the pure-PyTorch
reference, which is what lets a test demand that both give the same weights.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

import actors
from actors.policy import ModelUpdates, Release

SPLITS = ("contiguous", "round-robin", "iid", "label", "feature")


def split_indices(
    n_items: int,
    n_workers: int,
    scheme: str,
    *,
    targets: torch.Tensor | None = None,
    features: torch.Tensor | None = None,
    feature: int = 0,
    batch_size: int = 8,
    seed: int = 0,
) -> list[torch.Tensor]:
    """Which items each worker holds.

    ``contiguous``: consecutive blocks. ``round-robin``: a seeded shuffle cut into batches, batch
    i to worker i mod n (the paper's Table 1 workload). ``iid``: a seeded shuffle cut into equal
    blocks. ``label`` / ``feature``: non-iid, items sorted by target (or by one feature column)
    and cut into blocks, so each worker sees a different part of the distribution.
    """
    if n_workers < 1 or n_items < n_workers:
        raise ValueError(f"cannot split {n_items} items across {n_workers} workers")
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    for label, values in (("targets", targets), ("features", features)):
        if values is not None and len(values) != n_items:
            raise ValueError(f"{label} have {len(values)} rows for {n_items} items")
    generator = torch.Generator().manual_seed(seed)
    if scheme == "contiguous":
        order = torch.arange(n_items)
    elif scheme == "round-robin":
        batches = torch.randperm(n_items, generator=generator).split(batch_size)
        empty = torch.empty(0, dtype=torch.long)
        return [torch.cat([empty, *batches[k::n_workers]]) for k in range(n_workers)]
    elif scheme == "iid":
        order = torch.randperm(n_items, generator=generator)
    elif scheme == "label":
        if targets is None:
            raise ValueError("a split by label needs the targets")
        order = torch.argsort(targets.reshape(len(targets), -1)[:, 0], stable=True)
    elif scheme == "feature":
        if features is None:
            raise ValueError("a split by feature needs the features")
        order = torch.argsort(features[:, feature], stable=True)
    else:
        raise ValueError(f"unknown split {scheme!r}; expected one of {SPLITS}")
    return list(order.tensor_split(n_workers))


def publish_shard(
    worker: actors.Worker,
    name: str,
    x: torch.Tensor,
    y: torch.Tensor,
    releases: Iterable[Release] = (ModelUpdates(),),
) -> None:
    """Make ``(x, y)`` the worker's own data under ``name``, declaring what may leave of it:
    by default model updates (parameters trained on it, and training losses), to anyone. With
    no releases nothing derived from the data leaves the worker."""
    releases = tuple(releases)
    worker.publish(f"{name}/x", x, releases=releases)
    worker.publish(f"{name}/y", y, releases=releases)


def epoch_plan(sizes: list[int], batch_size: int) -> list[tuple[int, slice]]:
    """The batches of an epoch as ``(shard, slice of that shard's epoch order)``, in visiting
    order: round r visits batch r of every shard that still has one (batch i lands on worker
    i mod n when shards are equal). :func:`shard_order` gives each shard's order per epoch."""
    counts = [(size + batch_size - 1) // batch_size for size in sizes]
    plan = []
    for r in range(max(counts, default=0)):
        for k, count in enumerate(counts):
            if r < count:
                plan.append((k, slice(r * batch_size, min((r + 1) * batch_size, sizes[k]))))
    return plan


def shard_order(size: int, shard: int, epoch: int, *, seed: int = 0, shuffle: bool = True) -> torch.Tensor:
    """The order in which shard ``shard`` visits its items in ``epoch``."""
    if not shuffle:
        return torch.arange(size)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch * 1_009 + shard)
    return torch.randperm(size, generator=generator)


@dataclass
class Shard:
    worker: actors.RemoteWorker
    x: actors.PointerTensor
    y: actors.PointerTensor
    size: int


class FederatedDataset:
    """Pointers to every worker's shard of one dataset."""

    def __init__(self, name: str, shards: list[Shard]) -> None:
        self.name = name
        self.shards = shards

    @classmethod
    async def from_workers(cls, workers: list[actors.RemoteWorker], name: str) -> FederatedDataset:
        """Point at the shards the workers published; only their shapes cross the network."""
        shards = []
        for worker in workers:
            x = await worker.published(f"{name}/x")
            y = await worker.published(f"{name}/y")
            if x.shape[0] != y.shape[0]:
                raise ValueError(f"{worker.id} holds {x.shape[0]} features but {y.shape[0]} targets")
            shards.append(Shard(worker, x, y, x.shape[0]))
        return cls(name, shards)

    def __len__(self) -> int:
        return sum(shard.size for shard in self.shards)

    @property
    def workers(self) -> list[actors.RemoteWorker]:
        return [shard.worker for shard in self.shards]


class FederatedDataLoader:
    """Yields ``(worker, x batch, y batch)`` pointers; the batches never leave their worker.

    At the start of an epoch each worker gets its shuffled order (an index tensor) and gathers its
    shard in that order; a batch is then a slice of that gathered copy, one cheap command.
    """

    def __init__(
        self, dataset: FederatedDataset, batch_size: int = 8, *, shuffle: bool = True, seed: int = 0
    ) -> None:
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed

    @property
    def sizes(self) -> list[int]:
        return [shard.size for shard in self.dataset.shards]

    def __len__(self) -> int:
        return len(epoch_plan(self.sizes, self.batch_size))

    def epoch(
        self, epoch: int
    ) -> Iterator[tuple[actors.RemoteWorker, actors.PointerTensor, actors.PointerTensor]]:
        for worker, x, y, rows in self.epoch_rows(epoch):
            yield worker, x[rows], y[rows]

    def epoch_rows(
        self, epoch: int
    ) -> Iterator[tuple[actors.RemoteWorker, actors.PointerTensor, actors.PointerTensor, slice]]:
        """Each batch as (worker, its shard in this epoch's order, the same for targets, rows):
        for steps that slice the batch themselves, saving two commands a step."""
        shards = self.dataset.shards
        ordered = []
        for k, shard in enumerate(shards):
            order = shard_order(shard.size, k, epoch, seed=self.seed, shuffle=self.shuffle)
            ordered.append((shard.x[order], shard.y[order]))
        for k, rows in epoch_plan(self.sizes, self.batch_size):
            x, y = ordered[k]
            yield shards[k].worker, x, y, rows
