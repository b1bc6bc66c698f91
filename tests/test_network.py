"""What only network workers have: tokens, the health endpoint, frame limits, lost links."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
import torch

import actors
from protocol import AuthenticationFailed, FrameTooLarge, WorkerLost

NETWORK = ["ws", "tcp"]


@pytest.fixture
async def served(request: pytest.FixtureRequest):
    """A worker served in this process, with its token; closed after the test."""
    servers: list[actors.Server] = []

    async def serve(transport: str, **options) -> actors.Server:
        server = await actors.serve(actors.Worker("bob", token="right", **options), transport)
        servers.append(server)
        return server

    yield serve
    for server in servers:
        await server.close()


@pytest.mark.parametrize("transport", NETWORK)
@pytest.mark.parametrize("token", [None, "wrong", ""])
async def test_missing_or_wrong_token_is_refused_before_any_message(served, transport, token):
    server = await served(transport)
    with pytest.raises(AuthenticationFailed):
        await actors.connect(server.address, token=token)
    assert server.worker.sessions == set(), "a refused peer must not get a session"
    good = await actors.connect(server.address, token="right")
    assert (await good.ping())["id"] == "bob"
    await good.close()


@pytest.mark.parametrize("transport", NETWORK)
async def test_token_from_environment(served, transport, monkeypatch):
    server = await served(transport)
    monkeypatch.setenv("AIOSYFT_TOKEN", "right")
    worker = await actors.connect(server.address)
    assert worker.id == "bob"
    await worker.close()


async def test_health_endpoint(served):
    server = await served("ws")
    worker = await actors.connect(server.address, token="right")
    pointer = actors.send(torch.ones(3), worker)
    await pointer
    async with (
        aiohttp.ClientSession() as session,
        session.get(server.address.replace("ws://", "http://") + "/health") as response,
    ):
        assert response.status == 200
        health = await response.json()
    assert health["id"] == "bob"
    assert health["objects"] == 1
    assert health["version"] == 1
    assert health["uptime"] > 0
    del pointer
    await worker.close()


@pytest.mark.parametrize("transport", NETWORK)
async def test_frames_over_the_limit_are_refused_on_both_sides(served, transport):
    server = await served(transport, max_frame_size=1 << 16)
    # The sender refuses what it knows is too large, before anything leaves.
    small = await actors.connect(server.address, token="right", max_frame_size=1 << 16)
    with pytest.raises(FrameTooLarge):
        actors.send(torch.zeros(1 << 15), small)
    assert (await small.ping())["objects"] == 0, "the refused frame must not be half-sent"
    await small.close()
    # A sender with a larger limit gets its link closed by the worker, which keeps serving others.
    big = await actors.connect(server.address, token="right", max_frame_size=1 << 20)
    pointer = actors.send(torch.zeros(1 << 15), big)
    with pytest.raises(WorkerLost):
        await pointer
    other = await actors.connect(server.address, token="right")
    assert torch.equal(await (actors.send(torch.ones(2), other) * 3).get(), torch.full((2,), 3.0))
    await other.close()
    await big.close()


@pytest.mark.parametrize("transport", NETWORK)
async def test_worker_stopping_fails_pending_pointers_promptly(served, transport):
    server = await served(transport)
    worker = await actors.connect(server.address, token="right")
    x = actors.send(torch.ones(2), worker)
    await x
    await server.close()
    with pytest.raises(WorkerLost):
        await asyncio.wait_for(x + 1, 5)
    with pytest.raises(WorkerLost):
        x + 1
    await worker.close()


@pytest.mark.parametrize("transport", NETWORK)
async def test_unreachable_address(transport):
    with pytest.raises(WorkerLost):
        await actors.connect(f"{transport}://127.0.0.1:9", token="x", timeout=5)


async def test_reply_timeout_declares_a_silent_worker_lost(served):
    server = await served("tcp")
    worker = await actors.connect(server.address, token="right", reply_timeout=0.2)
    for session in server.worker.sessions:  # the worker stops answering this sender
        session.task.cancel()
    with pytest.raises(WorkerLost, match="did not answer"):
        await worker.ping()
    await worker.close()
