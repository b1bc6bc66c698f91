"""Flows: protocols as straight-line async code between workers, started together by a leader.

A test command set registers its flows here, as any room would (``actors.registry.command``):
the runtime is extended without editing a table of its own.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import torch

import actors
from actors.flows import start_flow
from actors.registry import command
from protocol import BadArguments, Flow, FlowAborted, PermissionDenied, WorkerLost, published_id
from tests.conftest import secret_of

DELAY = 0.1


@command("test.swap", command_set="test", kind="flow")
async def swap(ctx: Any, value: torch.Tensor, *, peer: str, delay: float = 0.0) -> torch.Tensor:
    """Each party sends its value to the other and returns the sum, after a pause."""
    ctx.send(peer, "value", value)
    other = await ctx.recv(peer, "value")
    await asyncio.sleep(delay)
    return value + other


@command("test.hang", command_set="test", kind="flow")
async def hang(ctx: Any) -> None:
    ctx.state["hung"] = ctx.state.get("hung", 0) + 1
    await asyncio.Event().wait()


@command("test.fail", command_set="test", kind="flow")
async def fail(ctx: Any, value: torch.Tensor) -> None:
    raise ValueError(f"refusing {value.tolist()}")


@command("test.caller", command_set="test")
def caller(ctx: Any) -> str:
    """A plain command that reads its context."""
    return f"{ctx.caller}@{ctx.me}"


def swap_run(alice: actors.RemoteWorker, bob: actors.RemoteWorker, a: Any, b: Any, delay: float = 0.0) -> Any:
    return start_flow(
        "test.swap",
        {alice: ([a], {"peer": bob.id, "delay": delay}), bob: ([b], {"peer": alice.id, "delay": delay})},
    )


async def test_two_parties_exchange_directly(alice, bob):
    x, y = actors.send(torch.tensor([1.0, 2.0]), alice), actors.send(torch.tensor([10.0, 20.0]), bob)
    results = swap_run(alice, bob, x, y)
    async with asyncio.timeout(10):
        assert torch.equal(await results[alice].get(), torch.tensor([11.0, 22.0]))
        assert torch.equal(await results[bob].get(), torch.tensor([11.0, 22.0]))


async def test_fifty_flows_take_the_time_of_the_slowest(alice, bob):
    """50 runs started by one leader overlap: each waits DELAY, all together about DELAY."""
    pairs = [
        (actors.send(torch.tensor([float(i)]), alice), actors.send(torch.tensor([100.0 * i]), bob))
        for i in range(50)
    ]
    await asyncio.gather(*(p for pair in pairs for p in pair))
    start = time.perf_counter()
    runs = [swap_run(alice, bob, a, b, DELAY) for a, b in pairs]
    async with asyncio.timeout(20):
        values = await asyncio.gather(*(run[alice].get() for run in runs), *(run[bob].get() for run in runs))
    elapsed = time.perf_counter() - start
    for i, value in enumerate(values[:50]):
        assert value.item() == 101.0 * i
    assert values[50:] == values[:50]
    assert elapsed < 10 * DELAY, (
        f"50 flows took {elapsed:.2f} s: they ran one after another (sum {50 * DELAY} s)"
    )


async def test_a_pending_flow_holds_up_only_what_uses_it(alice, bob):
    x, y = actors.send(torch.tensor([1.0]), alice), actors.send(torch.tensor([2.0]), bob)
    results = swap_run(alice, bob, x, y, delay=0.5)
    start = time.perf_counter()
    async with asyncio.timeout(10):
        other = actors.send(torch.tensor([5.0]), alice) * 2  # sent after the flow started: goes on
        assert torch.equal(await other.get(), torch.tensor([10.0]))
        assert time.perf_counter() - start < 0.4
        uses = results[alice] * 10  # waits for the flow's result
        assert torch.equal(await uses.get(), torch.tensor([30.0]))
        assert time.perf_counter() - start >= 0.5
        await results[bob]


async def test_a_failed_flow_is_the_failure_of_its_result(alice):
    x = actors.send(torch.tensor([7.0]), alice)
    [result] = start_flow("test.fail", {alice: ([x], None)}).values()
    async with asyncio.timeout(10):
        with pytest.raises(ValueError, match=r"refusing \[7.0\]"):
            await (result + 1)


async def test_a_party_whose_input_failed_aborts_the_run_at_once(alice, bob):
    """alice's part never starts (its input is a failure): bob, waiting for alice's value, hears
    at once that alice failed, and why, instead of waiting out the receive timeout."""
    broken = start_flow("test.fail", {alice: ([actors.send(torch.tensor([1.0]), alice)], None)})[alice]
    y = actors.send(torch.tensor([2.0]), bob)
    results = swap_run(alice, bob, broken, y)
    async with asyncio.timeout(10):
        with pytest.raises(
            FlowAborted, match=r"alice, a party of this run, failed in test.swap \(ValueError: refusing"
        ):
            await results[bob]
        with pytest.raises(ValueError, match="refusing"):
            await results[alice]


async def test_a_flow_must_be_started_as_one(alice):
    async with asyncio.timeout(10):
        with pytest.raises(BadArguments, match="start_flow"):
            await actors.pointer.call(
                alice, "test.swap", [actors.send(torch.ones(1), alice)], {"peer": "bob"}
            )


async def test_commands_see_their_caller(bob, make_worker, transport):
    async with asyncio.timeout(10):
        assert await actors.pointer.call(bob, "test.caller", []).get() == "me@bob"


async def test_flows_of_a_departed_sender_are_cancelled(make_worker, transport):
    carol = await make_worker("carol")
    leader = await actors.connect(carol.address, identity="dave", secret=secret_of("dave"))
    [pending] = start_flow("test.hang", {leader: ([], None)}).values()
    del pending  # its delete waits for the flow, and runs when the flow is cancelled
    async with asyncio.timeout(10):
        await leader.ping()  # the command has been run: the flow is hanging now
        status = await carol.ping()
        assert status["sessions"] == 2
        await leader.close()
        while (await carol.ping())["sessions"] != 1:
            await asyncio.sleep(0.01)
    if transport == "virtual":
        worker = carol.worker
        assert worker.state["hung"] == 1
        for _ in range(100):
            if not worker.flow_tasks:
                break
            await asyncio.sleep(0.01)
        assert not worker.flow_tasks, "a flow outlived the sender that started it"


async def test_a_flow_cannot_send_private_data_to_a_party(make_worker, transport):
    """What a flow sends passes the owner's policy, like a FORWARD: a flow started on
    published data cannot carry it to another party."""
    bob = await make_worker("bob")
    alice = await make_worker("alice")
    if transport != "virtual":
        pytest.skip("publishing needs the worker object, which only virtual handles expose here")
    bob.worker.publish("secret/x", torch.tensor([3.0, 4.0]), releases=[actors.policy.ModelUpdates()])
    mine = actors.send(torch.tensor([1.0, 1.0]), alice)
    results = swap_run(bob, alice, bob.published("secret/x"), mine)
    async with asyncio.timeout(10):
        with pytest.raises(PermissionDenied, match="bob/secret"):
            await results[bob]
        for task in list(alice.worker.flow_tasks):  # alice waits for a value that never comes
            task.cancel()
        with pytest.raises(WorkerLost, match="cancelled"):
            await results[alice]
    bob.worker.store.drop(published_id("secret/x"))


async def test_flow_messages_reach_only_the_flow_and_party_they_name(make_worker, transport):
    """A peer that knows a run's id still cannot speak for another party: messages are filed
    under the identity of the link they came on."""
    alice = await make_worker("alice")
    bob = await make_worker("bob")
    x, y = actors.send(torch.tensor([1.0]), alice), actors.send(torch.tensor([2.0]), bob)
    run = 0x5EED
    results = start_flow(
        "test.swap",
        {alice: ([x], {"peer": "bob", "delay": 0.0}), bob: ([y], {"peer": "alice", "delay": 0.0})},
        flow_id=run,
    )
    mallory = await actors.connect(alice.address, identity="mallory", secret=secret_of("mallory"))
    connection = mallory.connection
    connection.tell(Flow(connection.next_id(), "mallory", run, "value", torch.tensor([1000.0])))
    connection.tell(
        Flow(connection.next_id(), "bob", run, "value", torch.tensor([1000.0]))
    )  # a spoofed sender
    async with asyncio.timeout(10):
        await mallory.ping()  # answered after both messages: the spoofed one was refused and said so
        assert any(
            isinstance(e, PermissionDenied) and "as 'bob'" in str(e) for e in connection.protocol_errors
        )
        assert torch.equal(await results[alice].get(), torch.tensor([3.0]))
        assert torch.equal(await results[bob].get(), torch.tensor([3.0]))
    await mallory.close()
