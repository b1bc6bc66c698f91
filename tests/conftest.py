"""Shared fixtures: workers over each transport, and the check that every test frees what it made.

``make_worker`` is the one way tests get a worker, so a scenario written once runs over every
transport in ``TRANSPORTS``. After each test every worker must hold no objects: dropped pointers
must have freed their remote objects (PySyft's leaks were exactly this).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import gc
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F  # noqa: N812 - the name everyone reads

import actors
from actors.identity import Credentials, derive_secret
from runners.datasets import DatasetError, data_dir, fetch

TRANSPORTS = ["virtual", "ws", "tcp"]
#: Every test worker checks identities against secrets derived from this; the leader is "me".
CLUSTER = "test-cluster-secret"
CREDENTIALS = Credentials.derived(CLUSTER)


def secret_of(identity: str) -> str:
    return derive_secret(CLUSTER, identity)


def bounded(seconds: float = 20.0) -> Callable[[Callable[..., Awaitable[Any]]], Callable[..., Any]]:
    """Fail a test that waits longer than ``seconds`` on the network, instead of hanging."""

    def wrap(test: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
        @functools.wraps(test)
        async def run(*args: Any, **kwargs: Any) -> Any:
            async with asyncio.timeout(seconds):
                return await test(*args, **kwargs)

        return run

    return wrap


MakeWorker = Callable[[str], Awaitable[actors.RemoteWorker]]


async def assert_stores_empty(workers: list[actors.RemoteWorker]) -> None:
    """Every worker holds nothing once the test's pointers are gone."""
    gc.collect()
    await asyncio.sleep(0)  # let the batched deletes leave
    for worker in workers:
        if worker.connection.lost is not None:
            continue
        status = await worker.ping()
        assert status["objects"] == 0, f"{worker.id} still holds {status['objects']} objects"


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def make_worker(transport: str) -> AsyncIterator[MakeWorker]:
    made: list[actors.RemoteWorker] = []
    servers: list[actors.Server] = []

    async def make(worker_id: str, **options: Any) -> actors.RemoteWorker:
        """A worker over the test's transport; network ones are served in this process."""
        options = {"credentials": CREDENTIALS, "secret": secret_of(worker_id), **options}
        if transport == "virtual":
            worker: actors.RemoteWorker = actors.VirtualWorker(
                worker_id, local_secret=secret_of("me"), **options
            )
        else:
            server = await actors.serve(actors.Worker(worker_id, **options), transport)
            servers.append(server)
            worker = await actors.connect(server.address, identity="me", secret=secret_of("me"))
        made.append(worker)
        return worker

    yield make
    try:
        await assert_stores_empty(made)
    finally:
        for worker in made:
            await worker.close()
        for server in servers:
            await server.close()


@pytest.fixture
async def bob(make_worker: MakeWorker) -> actors.RemoteWorker:
    return await make_worker("bob")


@pytest.fixture
async def alice(make_worker: MakeWorker) -> actors.RemoteWorker:
    return await make_worker("alice")


@contextlib.asynccontextmanager
async def worker_in_hand(
    transport: str, worker_id: str, *, identity: str = "me", **options: Any
) -> AsyncIterator[tuple[actors.RemoteWorker, actors.Worker]]:
    """A worker over ``transport`` and the actor behind it, both closed on exit.

    For tests that must see what a worker holds without sending it anything: a ping would carry
    any pending deletes along with it, so such a test reads the actor's store instead.
    """
    options = {"credentials": CREDENTIALS, "secret": secret_of(worker_id), **options}
    server: actors.Server | None = None
    handle: actors.RemoteWorker
    if transport == "virtual":
        virtual = actors.VirtualWorker(
            worker_id, local_id=identity, local_secret=secret_of(identity), **options
        )
        handle, actor = virtual, virtual.worker
    else:
        server = await actors.serve(actors.Worker(worker_id, **options), transport)
        actor = server.worker
        handle = await actors.connect(server.address, identity=identity, secret=secret_of(identity))
    try:
        yield handle, actor
    finally:
        await handle.close()
        if server is not None:
            await server.close()


async def connect_as(actor: actors.Worker, identity: str, **options: Any) -> actors.RemoteWorker:
    """One more link to ``actor`` as ``identity``; its address says the transport."""
    return await actors.connect(actor.address, identity=identity, secret=secret_of(identity), **options)


# -- what several test files share --------------------------------------------------------------
def _have_datasets() -> bool:
    try:
        fetch("boston", download=False)
        fetch("pima", download=False)
    except DatasetError:
        return False
    return True


#: For tests that read the paper's datasets (CI points $AIOSYFT_DATA at them).
needs_data = pytest.mark.skipif(not _have_datasets(), reason=f"datasets not found in {data_dir()}")


def worker_pids(marker: str) -> list[int]:
    """Pids of ``aiosyft worker`` processes whose command line mentions ``marker`` (a unique id
    or a part of one): how tests see that no worker outlived its launcher."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if marker in cmdline and "runners.cli" in cmdline and " worker " in cmdline:
                found.append(int(entry.name))
    return found


def plain_fedavg(
    model: torch.nn.Module,
    shards: list[tuple[torch.Tensor, torch.Tensor]],
    weights: list[float],
    *,
    rounds: int,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.mse_loss,
) -> list[float]:
    """FedAvg written out in plain PyTorch, sharing nothing with the project but its documented
    seeding (worker k shuffles round r with a generator seeded ``seed * 1_000_003 + r * 1_009 +
    k``): each worker trains a copy of ``model`` for ``epochs`` epochs of ``torch.optim.SGD`` on
    shuffled mini-batches, and the copies' states are combined into ``model`` with ``weights``.
    Returns each round's loss: the same weighted mean of the workers' mean batch losses."""
    losses = []
    for round_ in range(rounds):
        states, mean_losses = [], []
        for k, (x, y) in enumerate(shards):
            local = copy.deepcopy(model)
            optimizer = torch.optim.SGD(local.parameters(), lr=lr)
            generator = torch.Generator().manual_seed(seed * 1_000_003 + round_ * 1_009 + k)
            values = []
            for _ in range(epochs):
                for batch in torch.randperm(len(x), generator=generator).split(batch_size):
                    optimizer.zero_grad()
                    loss = loss_fn(local(x[batch]), y[batch])
                    loss.backward()
                    optimizer.step()
                    values.append(loss.item())
            states.append(local.state_dict())
            mean_losses.append(sum(values) / len(values))
        model.load_state_dict(
            {
                name: sum(w * state[name] for w, state in zip(weights, states, strict=True))
                for name in states[0]
            }
        )
        losses.append(sum(w * value for w, value in zip(weights, mean_losses, strict=True)))
    return losses
