"""Worker processes: the launcher, computations spanning processes, killed and restarted workers.

These start real processes (each imports torch), so they are few and each does a lot.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
import uuid
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest
import torch

import actors
from privacy.federated import FederatedDataLoader, FederatedDataset, make_model, train_walk
from protocol import ObjectNotFound, WorkerLost
from runners import local_cluster
from runners.cluster import start_processes, stop_processes
from runners.experiments import DEFAULTS
from runners.federated import Federation
from tests.conftest import worker_pids

ROOT = Path(__file__).resolve().parent.parent


def _port_is_free(address: str) -> bool:
    host, port = address.split("://")[1].split(":")
    with socket.socket() as sock:
        return sock.connect_ex((host, int(port.rstrip("/")))) != 0


async def _wait_gone(marker: str, seconds: float = 10.0) -> list[int]:
    for _ in range(int(seconds * 20)):
        if not (left := worker_pids(marker)):
            return []
        await asyncio.sleep(0.05)
    return left


@pytest.mark.parametrize("transport", ["ws", "tcp"])
async def test_three_processes_a_killed_worker_and_a_clean_stop(transport):
    tag = uuid.uuid4().hex[:8]
    ids = [f"alice-{tag}", f"bob-{tag}", f"carol-{tag}"]
    async with local_cluster(ids, transport=transport) as cluster:
        alice, bob, carol = cluster
        assert [w.id for w in cluster] == ids
        data = torch.arange(12.0).view(3, 4)
        x = actors.send(data, alice)
        y = (x @ x.t()).move(bob)  # alice -> bob directly
        z = torch.relu(y - 50).move(carol)  # bob -> carol directly
        assert torch.equal(await z.get(), torch.relu(data @ data.t() - 50))
        assert (await bob.ping())["objects"] == 1  # y

        doomed = actors.send(torch.ones(4), carol) * 2
        cluster.processes[ids[2]].send_signal(signal.SIGKILL)
        with pytest.raises(WorkerLost):
            await asyncio.wait_for(doomed.get(), 10)
        # The others keep serving, and moving to the dead worker fails clearly, without a hang.
        assert torch.equal(await (y + 1).get(), data @ data.t() + 1)
        with pytest.raises(WorkerLost):
            await asyncio.wait_for(x.copy().move(carol), 10)
        del x, y, doomed
    assert await _wait_gone(tag) == []
    for address in cluster.addresses.values():
        assert _port_is_free(address)


async def test_reconnect_after_a_restart_leaves_old_pointers_invalid():
    tag = uuid.uuid4().hex[:8]
    cluster = await start_processes([f"dora-{tag}"], "tcp")
    try:
        address = cluster.addresses[f"dora-{tag}"]
        worker = await actors.connect(address, identity="me", secret=cluster.secret)
        old = actors.send(torch.ones(2), worker)
        await old
        await stop_processes(cluster)
        with pytest.raises(WorkerLost):
            await asyncio.wait_for(old.get(), 10)
        port = int(address.rsplit(":", 1)[1])
        cluster = await start_processes([f"dora-{tag}"], "tcp", port=port)
        again = await actors.connect(address, identity="me", secret=cluster.secret)
        assert torch.equal(await (actors.send(torch.ones(2), again) + 1).get(), torch.full((2,), 2.0))
        # The restarted worker lost everything: naming an old object there finds nothing.
        with pytest.raises(ObjectNotFound):
            await actors.pointer.PointerTensor(again, old.id).get()
        await worker.close()
        await again.close()
        del old
    finally:
        await stop_processes(cluster)
    assert await _wait_gone(tag) == []


async def _launch(ids: list[str], transport: str) -> tuple[asyncio.subprocess.Process, dict[str, str], str]:
    """The launcher, the addresses it printed, and the leader's secret from the file it named."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "runners.cli", "launch", "--workers", ",".join(ids),
        "--transport", transport, "--port", "0", stdout=asyncio.subprocess.PIPE, cwd=ROOT,
    )  # fmt: skip
    assert process.stdout is not None
    addresses, secret = {}, ""
    async with asyncio.timeout(90):
        while (line := (await process.stdout.readline()).decode()) and not line.startswith("ready"):
            name, _, address = line.strip().partition(" ")
            if name in ids:
                addresses[name] = address
            elif line.startswith("connect as AIOSYFT_IDENTITY=me"):
                secret_file = Path(line.split(" from ", 1)[1].strip())
                assert secret_file.stat().st_mode & 0o077 == 0, "the secret file is readable by others"
                secret = secret_file.read_text().strip()
    assert set(addresses) == set(ids), f"launcher printed {addresses}"
    assert secret and secret not in line, "the secret itself is never printed"
    return process, addresses, secret


@pytest.mark.parametrize("how", ["SIGINT", "SIGKILL"])
async def test_launch_stops_every_worker(how):
    tag = uuid.uuid4().hex[:8]
    ids = [f"erin-{tag}", f"fred-{tag}"]
    launcher, addresses, secret = await _launch(ids, "ws")
    assert len(worker_pids(tag)) == 2
    async with aiohttp.ClientSession() as session:
        for worker_id, address in addresses.items():
            async with session.get(address.replace("ws://", "http://") + "/health") as response:
                assert (await response.json())["id"] == worker_id
    worker = await actors.connect(addresses[ids[0]], identity="me", secret=secret)
    assert torch.equal(await (actors.send(torch.ones(2), worker) * 5).get(), torch.full((2,), 5.0))
    await worker.close()

    launcher.send_signal(getattr(signal, how))
    await asyncio.wait_for(launcher.wait(), 20)
    # SIGKILL gives the launcher no chance to clean up: the workers notice it is gone by themselves.
    assert await _wait_gone(tag) == []
    for address in addresses.values():
        assert _port_is_free(address)


async def test_a_worker_killed_mid_walk_ends_the_walk_with_worker_lost_promptly():
    """The surviving worker waits for a model that will never come (up to its expect timeout,
    a minute); the leader must not: it raises as soon as the dead worker's link drops."""
    tag = uuid.uuid4().hex[:8]
    ids = [f"erin-{tag}", f"frank-{tag}"]
    federation = Federation("boston", 2, "round-robin", 0, 8)
    async with local_cluster(ids, transport="tcp", federation=federation) as cluster:
        dataset = await FederatedDataset.from_workers(list(cluster), "boston")
        settings = replace(DEFAULTS["boston"], epochs=1000)  # far longer than the test waits
        walk = asyncio.create_task(train_walk(make_model(13), FederatedDataLoader(dataset, 8), settings))
        await asyncio.sleep(0.5)
        assert not walk.done()
        cluster.processes[ids[1]].send_signal(signal.SIGKILL)
        with pytest.raises(WorkerLost):
            await asyncio.wait_for(walk, 15)
        del dataset
    assert await _wait_gone(tag) == []
