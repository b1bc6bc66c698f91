"""Failures reach whoever waits on them, by name and at once, and leave nothing behind.

Real worker processes are killed with SIGKILL mid-walk and mid-FedAvg; the leader must name the
worker within a second, keep talking to the survivors, and (FedAvg with ``min_workers``) finish
with them. Bad addresses, forwards to workers that cannot be reached, announcements that never
come and identities that leave are each checked on live workers.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import pytest
import torch

import actors
from actors.pointer import PointerTensor, new_object_id
from protocol import Expect, Forward, WorkerLost
from runners.cluster import local_cluster
from runners.datasets import load
from runners.experiments import DEFAULTS, federated_run
from runners.federated import Federation
from tests.conftest import bounded, needs_data

NETWORK = ["ws", "tcp"]


async def _kill_during(run: asyncio.Task[object], process: asyncio.subprocess.Process, after: float) -> float:
    """SIGKILL ``process`` once ``run`` is well under way; when it was killed."""
    await asyncio.sleep(after)
    assert not run.done(), "the run ended before the worker could be killed"
    process.kill()
    return time.perf_counter()


@needs_data
@pytest.mark.parametrize("transport", NETWORK)
@bounded(40)
async def test_a_worker_killed_mid_walk_is_named_at_once_and_the_others_still_answer(transport: str) -> None:
    data = load("boston", seed=0)
    federation = Federation("boston", 2, "round-robin", 0, 8)
    async with local_cluster(["bob", "alice"], transport, federation=federation) as cluster:
        settings = replace(DEFAULTS["boston"], epochs=10_000)
        run = asyncio.create_task(federated_run(list(cluster), data, settings, "walk"))
        killed = await _kill_during(run, cluster.processes["alice"], after=1.0)
        with pytest.raises(WorkerLost) as lost:
            await asyncio.wait_for(run, 5.0)
        named = time.perf_counter() - killed
        assert "alice" in str(lost.value) and cluster.addresses["alice"] in str(lost.value)
        assert lost.value.worker == "alice"
        assert named < 1.0, f"the walk named the lost worker {named:.2f} s after it died"
        start = time.perf_counter()
        status = await asyncio.wait_for(cluster["bob"].ping(), 1.0)  # the survivor's link is free
        assert status["id"] == "bob" and time.perf_counter() - start < 0.5
        x = actors.send(torch.arange(4.0), cluster["bob"])
        assert torch.equal(await asyncio.wait_for((x * 2).get(), 1.0), torch.arange(4.0) * 2)
    assert all(process.returncode is not None for process in cluster.processes.values())


@needs_data
@pytest.mark.parametrize("transport", NETWORK)
@bounded(60)
async def test_fedavg_carries_on_with_the_workers_that_remain(transport: str) -> None:
    data = load("boston", seed=0)
    federation = Federation("boston", 3, "round-robin", 0, 8)
    settings = replace(DEFAULTS["boston"], epochs=40)
    async with local_cluster(["bob", "alice", "carol"], transport, federation=federation) as cluster:
        run = asyncio.create_task(federated_run(list(cluster), data, settings, "fedavg", 4, min_workers=2))
        await _kill_during(run, cluster.processes["carol"], after=0.5)
        result = await asyncio.wait_for(run, 40.0)
        assert len(result.losses) == 4 and all(loss == loss for loss in result.losses)  # no NaN
        # with the last two gone, fewer than two remain: the run stops, naming who left
        rerun = asyncio.create_task(
            federated_run(list(cluster)[:2], data, settings, "fedavg", 400, min_workers=2)
        )
        killed = await _kill_during(rerun, cluster.processes["alice"], after=0.5)
        with pytest.raises(WorkerLost, match="alice") as lost:
            await asyncio.wait_for(rerun, 5.0)
        assert time.perf_counter() - killed < 1.0
        assert "fewer than the 2 required" in str(lost.value)
    assert all(process.returncode is not None for process in cluster.processes.values())


@pytest.mark.parametrize("address", ["tcp://127.0.0.1", "tcp://127.0.0.1:99999", "ws://:8777", "tcp:/x:1"])
@bounded(5)
async def test_a_bad_address_is_an_error_at_once_naming_it(address: str) -> None:
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"bad address|cannot connect to") as bad:
        await actors.connect(address, timeout=3.0)
    assert address in str(bad.value)
    assert time.perf_counter() - start < 0.5


@pytest.mark.parametrize("transport", NETWORK)
@bounded(20)
async def test_a_forward_that_cannot_be_delivered_fails_the_pointer_with_the_reason(transport: str) -> None:
    async with local_cluster(["bob", "alice"], transport) as cluster:
        bob, alice = cluster["bob"], cluster["alice"]
        # alice is told to deliver to an address where nobody listens (bob's id, a dead port)
        x = actors.send(torch.ones(3), alice)
        await x
        dead = f"{transport}://127.0.0.1:9"
        new_id = new_object_id()
        bob.connection.tell(Expect(bob.connection.next_id(), "me", [new_id], "alice"))
        conn = alice.connection
        conn.tell(Forward(conn.next_id(), "me", [x.id], "bob", dead, [new_id], True))
        conn.moved(new_id, bob.connection)
        x._released = True  # the object left alice: its pointer is the one on bob
        start = time.perf_counter()
        with pytest.raises(WorkerLost, match="cannot forward to bob") as lost:
            await asyncio.wait_for(PointerTensor(bob, new_id).get(), 5.0)
        assert dead in str(lost.value)
        assert time.perf_counter() - start < 2.0  # not the 60 s wait for an announced object
        # and to an address no transport can dial, alike
        new_id = new_object_id()
        bob.connection.tell(Expect(bob.connection.next_id(), "me", [new_id], "alice"))
        y = actors.send(torch.ones(3), alice)
        await y
        conn.tell(Forward(conn.next_id(), "me", [y.id], "bob", f"{transport}://nowhere", [new_id], True))
        conn.moved(new_id, bob.connection)
        y._released = True
        with pytest.raises(WorkerLost, match="bad address"):
            await asyncio.wait_for(PointerTensor(bob, new_id).get(), 2.0)
        assert (await alice.ping())["id"] == "alice"


@pytest.mark.parametrize("transport", NETWORK)
@bounded(20)
async def test_a_dead_peer_fails_what_waits_for_its_objects_at_once(transport: str) -> None:
    async with local_cluster(["bob", "alice"], transport) as cluster:
        bob, alice = cluster["bob"], cluster["alice"]
        warm = actors.send(torch.ones(2), alice).move(bob)  # alice has a link to bob now
        assert torch.equal(await warm.get(), torch.ones(2))
        # bob waits for an object alice never sends; alice dies
        new_id = new_object_id()
        bob.connection.tell(Expect(bob.connection.next_id(), "me", [new_id], "alice"))
        waiting = PointerTensor(bob, new_id) + 1
        await asyncio.sleep(0.2)
        cluster.processes["alice"].kill()
        start = time.perf_counter()
        with pytest.raises(WorkerLost, match="alice left"):
            await asyncio.wait_for(waiting.get(), 5.0)
        assert time.perf_counter() - start < 1.0
        assert (await bob.ping())["objects"] == 0


@bounded(10)
async def test_announcements_that_never_come_expire_free_and_tell_their_waiters() -> None:
    bob = actors.VirtualWorker("bob", expect_timeout=0.3)
    try:
        ids = [new_object_id() for _ in range(1000)]
        bob.connection.tell(Expect(bob.connection.next_id(), "me", ids, "alice"))
        waiting = PointerTensor(bob, ids[0]) * 2
        with pytest.raises(WorkerLost, match=r"did not arrive within 0\.3 s"):
            await asyncio.wait_for(waiting.get(), 3.0)
        with pytest.raises(WorkerLost, match="did not arrive"):  # asked afterwards, same answer
            await PointerTensor(bob, ids[1]).get()
        assert (await bob.ping())["objects"] == 0
        assert not bob.worker.dispatch.arrivals
        assert len(bob.worker.dispatch.failures) <= bob.worker.max_failures
    finally:
        await bob.close()


@pytest.mark.parametrize("transport", NETWORK)
@bounded(20)
async def test_a_departed_leader_s_objects_are_freed_after_the_grace_period_unless_it_returns(
    transport: str,
) -> None:
    server = await actors.serve(actors.Worker("bob", grace=0.5), transport)
    try:
        leader = await actors.connect(server.address, identity="me")
        kept = actors.send(torch.arange(3.0), leader)
        await kept
        kept._released = True  # this handle will not free it: the worker must
        await leader.close()
        await asyncio.sleep(0.2)
        back = await actors.connect(server.address, identity="me")  # back within the grace period
        await asyncio.sleep(0.6)
        assert torch.equal(await PointerTensor(back, kept.id).fetch(), torch.arange(3.0))
        other = actors.send(torch.ones(2), back)
        await other
        other._released = True
        await back.close()
        start = time.perf_counter()
        while server.worker.store.objects:  # gone within grace + 1 s
            assert time.perf_counter() - start < 1.5, "a departed identity's objects were kept"
            await asyncio.sleep(0.05)
        assert time.perf_counter() - start > 0.3  # not before the grace period
    finally:
        await server.close()
