"""What only network workers have: credentials on the wire, the health endpoint, frame limits, lost links."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
import torch

import actors
from actors.identity import Credentials
from protocol import PROTOCOL_VERSION, AuthenticationFailed, FrameTooLarge, WorkerLost

NETWORK = ["ws", "tcp"]
CREDENTIALS = Credentials.from_secrets({"me": "right", "mallory": "mallory's own"})


@pytest.fixture
async def served(request: pytest.FixtureRequest):
    """A worker served in this process, knowing the secrets of "me" and "mallory"; closed after
    the test."""
    servers: list[actors.Server] = []

    async def serve(transport: str, **options) -> actors.Server:
        server = await actors.serve(actors.Worker("bob", credentials=CREDENTIALS, **options), transport)
        servers.append(server)
        return server

    yield serve
    for server in servers:
        await server.close()


@pytest.mark.parametrize("transport", NETWORK)
@pytest.mark.parametrize(
    ("identity", "secret"),
    [("me", None), ("me", "wrong"), ("me", ""), ("me", "mallory's own"), ("mallory", "right"), ("", "right")],
)
async def test_missing_or_wrong_secret_is_refused_before_any_message(
    served, transport, identity, secret, caplog
):
    """Each identity has its own secret: another identity's secret proves nothing, and the
    refusal names neither secret."""
    server = await served(transport)
    with pytest.raises(AuthenticationFailed) as refused:
        await actors.connect(server.address, identity=identity, secret=secret)
    assert server.worker.sessions == set(), "a refused peer must not get a session"
    for text in ("right", "mallory's own"):
        assert text not in str(refused.value) and text not in caplog.text
    good = await actors.connect(server.address, identity="me", secret="right")
    assert (await good.ping())["id"] == "bob"
    await good.close()


@pytest.mark.parametrize("transport", NETWORK)
async def test_identity_and_secret_from_environment(served, transport, monkeypatch):
    server = await served(transport)
    monkeypatch.setenv("AIOSYFT_IDENTITY", "mallory")
    monkeypatch.setenv("AIOSYFT_SECRET", "mallory's own")
    worker = await actors.connect(server.address)
    assert worker.id == "bob"
    await worker.close()


async def test_health_endpoint(served):
    server = await served("ws")
    worker = await actors.connect(server.address, secret="right")
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
    assert health["version"] == PROTOCOL_VERSION
    assert health["uptime"] > 0
    del pointer
    await worker.close()


@pytest.mark.parametrize("transport", NETWORK)
async def test_frames_over_the_limit_are_refused_on_both_sides(served, transport):
    server = await served(transport, max_frame_size=1 << 16)
    # The sender refuses what it knows is too large, before anything leaves.
    small = await actors.connect(server.address, secret="right", max_frame_size=1 << 16)
    with pytest.raises(FrameTooLarge):
        actors.send(torch.zeros(1 << 15), small)
    assert (await small.ping())["objects"] == 0, "the refused frame must not be half-sent"
    await small.close()
    # A sender with a larger limit gets its link closed by the worker, which keeps serving others.
    big = await actors.connect(server.address, secret="right", max_frame_size=1 << 20)
    pointer = actors.send(torch.zeros(1 << 15), big)
    with pytest.raises(WorkerLost):
        await pointer
    other = await actors.connect(server.address, secret="right")
    assert torch.equal(await (actors.send(torch.ones(2), other) * 3).get(), torch.full((2,), 3.0))
    await other.close()
    await big.close()


@pytest.mark.parametrize("transport", NETWORK)
async def test_worker_stopping_fails_pending_pointers_promptly(served, transport):
    server = await served(transport)
    worker = await actors.connect(server.address, secret="right")
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
        await actors.connect(f"{transport}://127.0.0.1:9", secret="x", timeout=5)


async def test_reply_timeout_declares_a_silent_worker_lost(served):
    server = await served("tcp")
    worker = await actors.connect(server.address, secret="right", reply_timeout=0.2)
    for session in server.worker.sessions:  # the worker stops answering this sender
        session.task.cancel()
    with pytest.raises(WorkerLost, match="did not answer"):
        await worker.ping()
    await worker.close()
