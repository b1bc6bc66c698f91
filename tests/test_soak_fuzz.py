"""Live workers under hostile input and under load, over every transport.

The codec's own fuzz tests (``test_codec.py``) decode frames in isolation and the worker-error
tests send hand-made bad frames one by one. Here a running worker takes a few hundred frames per
transport: frames captured from a real client's run, then mutated (bits flipped, bytes set,
inserted, deleted, duplicated, cut, spliced), mixed with messages that Hypothesis builds and
encodes with the project's own ``FrameBuilder``. After every batch the worker must still answer
the fuzzing link and a legitimate client, whose object the fuzzer must not have touched, and no
task may have died with an unhandled error. The transports' own layers (TCP records, WebSocket
message types) get garbage too. Then the soak: several clients pipeline hundreds of commands
each to one worker, and every reply arrives exactly once, with that client's value.

The capture, the mutators, the strategies and the checks after each batch live in
``runners/fuzz.py``: ``aiosyft fuzz`` runs them at 100k frames per transport against a worker
with another identity's objects, shares and flows (``tests/test_fuzz.py`` runs it short).

``test_another_identity_cannot_hold_up_an_owners_object`` pins down what the fuzz found: another
identity can park a command on my object and make my next operation on it wait.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import gc
import random
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import msgpack
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import actors
from actors.ws import ID_HEADER
from protocol import PROTOCOL_VERSION, Codec, Command, Error, Expect, ObjRef, Ping, Reply, published_id
from protocol.codec import FrameBuilder
from runners.fuzz import (
    FUZZER,
    LEGIT,
    capture,
    check_serving,
    encoded,
    mutated_frames,
    raw,
    structured,
    virtual_peer,
)
from tests.conftest import CREDENTIALS, TRANSPORTS, bounded, connect_as, secret_of, worker_in_hand

#: Seconds one batch (sending it, and the checks after it) may take before the test fails; a
#: batch takes milliseconds.
BATCH_TIMEOUT = 5.0


# -- a live worker, a legitimate client, a fuzzing client and frames captured from a real run ------
@dataclasses.dataclass
class Live:
    actor: actors.Worker
    me: actors.RemoteWorker
    fuzzer: actors.RemoteWorker
    legit: actors.PointerTensor
    #: Frames the fuzzing client wrote during a real run: the seeds of the mutations.
    corpus: list[bytes]
    #: Object ids that exist on the worker, for the messages Hypothesis builds.
    known_ids: list[int]
    #: The fuzzing client's pointers from the captured run: their objects stay as targets.
    held: list[actors.PointerTensor]
    #: What reached the event loop's exception handler (an error nobody handled).
    loop_errors: list[dict[str, Any]]


def _peer() -> actors.VirtualWorker:
    """A second worker the fuzzing client moves an object to (a FORWARD to capture)."""
    return virtual_peer(secret_of, CREDENTIALS)


@pytest.fixture(params=TRANSPORTS)
async def live(request: pytest.FixtureRequest) -> AsyncIterator[Live]:
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: errors.append(context))
    peer = _peer()
    try:
        async with worker_in_hand(str(request.param), "fuzzed") as (me, actor):
            fuzzer = await connect_as(actor, FUZZER)
            try:
                async with asyncio.timeout(BATCH_TIMEOUT):
                    corpus, held = await capture(fuzzer, peer)
                    legit = actors.send(LEGIT, me)
                    await legit
                known = [*(p.id for p in held), legit.id, published_id("x")]
                yield Live(actor, me, fuzzer, legit, corpus, known, held, errors)
                del legit, held
            finally:
                fuzzer.connection._failures.clear()  # the fuzzer's failures are expected, not news
                await fuzzer.close()
    finally:
        await peer.close()
        loop.set_exception_handler(previous)


# -- the fuzz test ---------------------------------------------------------------------------------
async def _check_still_serving(live: Live) -> None:
    """The worker answers the fuzzing link (after everything it sent), the legitimate client's
    object is intact and computes the right value, and nothing died unhandled (the checks
    ``aiosyft fuzz`` runs after every batch, :func:`runners.fuzz.check_serving`)."""
    await check_serving(live.actor, live.fuzzer, live.legit, live.loop_errors)


@settings(
    max_examples=16,
    deadline=None,
    database=None,
    derandomize=True,  # the same few hundred frames every run: a failure here reproduces
    # No shrinking: the worker's state carries over from batch to batch, so a shrunk batch
    # means little, and each failing attempt would wait out BATCH_TIMEOUT again.
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    report_multiple_bugs=False,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
@given(data=st.data())
async def test_a_live_worker_survives_mutated_and_random_frames(live: Live, data: st.DataObject) -> None:
    """Each example sends a batch of about 25 frames on the fuzzing link; over the examples a few
    hundred per transport, one worker throughout."""
    frames: list[bytes] = []
    for _ in range(data.draw(st.integers(20, 30), label="batch size")):
        source = data.draw(st.integers(0, 9), label="source")
        if source < 6:
            frames.append(data.draw(mutated_frames(live.corpus), label="mutated"))
        elif source < 9:
            frame = encoded(data.draw(structured(live.known_ids), label="structured"))
            if frame is not None:
                frames.append(frame)
        else:
            frames.append(data.draw(raw, label="raw"))
    async with asyncio.timeout(BATCH_TIMEOUT):
        connection = live.fuzzer.connection
        connection.flush()
        for frame in frames:
            connection.transport.write(frame)
        await _check_still_serving(live)


@bounded(20)
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_replayed_captured_frames_leave_the_worker_serving(transport: str) -> None:
    """Each captured frame sent again, unmutated and out of order, three times: duplicate
    stores, gets of objects already fetched, deletes of deleted ids, a second move of a moved
    object. All of it is the sender's own business; the worker keeps serving."""
    async with worker_in_hand(transport, "replayed") as (me, actor):
        peer = _peer()
        fuzzer = await connect_as(actor, FUZZER)
        try:
            corpus, held = await capture(fuzzer, peer)
            shuffled = corpus * 3
            random.Random(7).shuffle(shuffled)
            for frame in shuffled:
                fuzzer.connection.transport.write(frame)
            assert (await fuzzer.ping())["id"] == actor.id
            legit = actors.send(LEGIT, me)
            assert torch.equal(await (legit - 1).get(), LEGIT - 1)
            del legit, held
        finally:
            fuzzer.connection._failures.clear()
            await fuzzer.close()
            await peer.close()


# -- what the fuzz found ----------------------------------------------------------------------------
@bounded(20)
@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize(
    ("op", "owners_step"),
    [("Tensor.add_", "read"), ("torch.add", "in-place write")],
    ids=["parked-write-blocks-owners-read", "parked-read-blocks-owners-write"],
)
async def test_another_identity_cannot_hold_up_an_owners_object(
    transport: str, op: str, owners_step: str
) -> None:
    """Found by the fuzz above. Mallory may neither write nor use my object, yet she can park a
    command on it: she announces an object that never comes (EXPECT), then names my object and
    that one in a command. The worker schedules her command's reads and writes before checking
    that she may touch my object, so my next operation on it waits behind hers until her
    announcement expires (``expect_timeout``, 60 s by default; she can announce again). Her
    command must be refused at once, or at least hold nobody but her up."""
    async with worker_in_hand(transport, "held-up") as (me, actor):
        mine = actors.send(torch.ones(3), me)
        await mine
        mallory = await connect_as(actor, "mallory")
        try:
            never, codec = actors.new_object_id(), Codec()
            connection = mallory.connection
            connection.transport.write(
                codec.encode(Expect(connection.next_id(), "mallory", [never], "nobody"))
            )
            command = Command(
                connection.next_id(), "mallory", actors.new_object_id(), op, [ObjRef(mine.id), ObjRef(never)]
            )
            connection.transport.write(codec.encode(command))
            await mallory.ping()  # her messages have been handled (parked) by now
            try:
                async with asyncio.timeout(1.0):  # it takes milliseconds
                    if owners_step == "read":
                        assert torch.equal(await (mine * 2).get(), torch.full((3,), 2.0))
                    else:
                        mine.add_(1)
                        assert torch.equal(await mine.fetch(), torch.full((3,), 2.0))
            except TimeoutError:
                pytest.fail(f"my {owners_step} of my own object waited behind mallory's parked {op}")
            del mine
        finally:
            connection._failures.clear()
            await mallory.close()


# -- the transports' own layers -------------------------------------------------------------------
async def _serves(me: actors.RemoteWorker) -> None:
    x = actors.send(LEGIT, me)
    assert torch.equal(await (x @ x.t()).get(), LEGIT @ LEGIT.t())
    del x


def _record(payload: bytes) -> bytes:
    return len(payload).to_bytes(4, "little") + payload


@bounded(20)
async def test_tcp_garbage_records_cost_only_their_own_link() -> None:
    """Raw TCP links: garbage instead of a handshake, a handshake too large, then (after a good
    handshake) random records, a record cut short by a closed socket, and a length beyond the
    frame limit. Each is refused or closed; the worker serves a legitimate client after each."""
    rng = random.Random(5)
    good_hello = msgpack.packb({"aiosyft": PROTOCOL_VERSION, "id": FUZZER, "secret": secret_of(FUZZER)})
    async with worker_in_hand("tcp", "tcp-fuzzed", max_frame_size=1 << 20) as (me, actor):
        host, port = actor.address.removeprefix("tcp://").split(":")
        scripts = [
            [_record(bytes(rng.getrandbits(8) for _ in range(40)))],
            [_record(b"\x81" + bytes(5000))],
            [b"\xff\xff\xff\xff"],
            [
                _record(good_hello),
                *(_record(bytes(rng.getrandbits(8) for _ in range(n))) for n in (0, 1, 11, 200)),
            ],
            [_record(good_hello), _record(bytes(64))[:-10]],
            [_record(good_hello), (2 << 20).to_bytes(4, "little") + bytes(100)],
        ]
        for script in scripts:
            reader, writer = await asyncio.open_connection(host, int(port))
            try:
                for chunk in script:
                    writer.write(chunk)
                await writer.drain()
                with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError, TimeoutError):
                    async with asyncio.timeout(0.3):
                        await reader.read(1 << 16)
            finally:
                writer.close()
                with contextlib.suppress(ConnectionError):
                    await writer.wait_closed()
            await _serves(me)
        await asyncio.sleep(0.05)
        assert [s.identity for s in actor.sessions] == ["me"], "every raw link's session is gone"


@bounded(20)
async def test_websocket_messages_of_every_type_cost_only_their_own_link() -> None:
    """Text, empty and random binary messages, a ping, then a close on one authenticated
    WebSocket: the worker answers what is binary with errors, ignores the rest, and serves a
    legitimate client throughout."""
    rng = random.Random(6)
    async with (
        worker_in_hand("ws", "ws-fuzzed") as (me, actor),
        aiohttp.ClientSession() as session,
    ):
        headers = {ID_HEADER: FUZZER, "Authorization": f"Bearer {secret_of(FUZZER)}"}
        async with session.ws_connect(actor.address + "/ws", headers=headers) as ws:
            await ws.send_str("not a frame")
            await ws.send_bytes(b"")
            for size in (1, 7, 12, 300):
                await ws.send_bytes(bytes(rng.getrandbits(8) for _ in range(size)))
            await ws.ping()
            await ws.send_bytes(bytes(FrameBuilder().build()))  # an empty but valid frame
            await _serves(me)
            answered = 0
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    while answered < 5:  # the empty and the four random binaries are reported
                        message = await ws.receive()
                        assert message.type is aiohttp.WSMsgType.BINARY, message
                        answered += 1
            assert answered == 5
        await _serves(me)
        await asyncio.sleep(0.05)
        assert [s.identity for s in actor.sessions] == ["me"]


# -- the soak ------------------------------------------------------------------------------------
CLIENTS = 4
COMMANDS_PER_CLIENT = 500


class _Ledger:
    """What one link asked (message ids) and what came back (the ids answered, with repeats)."""

    def __init__(self, worker: actors.RemoteWorker) -> None:
        self.asked: list[int] = []
        self.answered: list[int] = []
        connection = worker.connection
        ask, decode = connection.ask, connection.codec.decode

        def asking(message: Any) -> Any:
            self.asked.append(message.msg_id)
            return ask(message)

        def decoding(frame: Any) -> Iterator[Any]:
            for message in decode(frame):
                if type(message) in (Reply, Error):
                    self.answered.append(message.in_reply_to)
                yield message

        connection.ask = asking
        connection.codec.decode = decoding


async def _pipeline(client: actors.RemoteWorker, c: int) -> list[tuple[int, Any]]:
    """``COMMANDS_PER_CLIENT`` commands and their gets, all sent before any answer is awaited,
    cut into frames at random points; a ping now and then. Each value names its client and
    command: ``x + i`` with ``x = [c, 0, -c]`` is ``[c + i, i, i - c]``."""
    rng = random.Random(c)
    connection = client.connection
    x = actors.send(torch.tensor([float(c), 0.0, -float(c)], dtype=torch.float64), client)
    pending: list[tuple[int, Any]] = []
    for i in range(COMMANDS_PER_CLIENT):
        pending.append((i, (x + i).get()))
        if i % 97 == 0:  # a ping asked right here, between the gets (``ping()`` would ask later)
            pending.append((-1, connection.ask(Ping(connection.next_id(), connection.local_id))))
        if rng.random() < 0.03:
            await asyncio.sleep(0)  # the burst so far leaves; the other clients' interleave
    values = await asyncio.gather(*(future for _, future in pending))
    del x
    return [(i, value) for (i, _), value in zip(pending, values, strict=True)]


@bounded(60)
@pytest.mark.parametrize("transport", ["ws", "tcp"])
async def test_clients_pipelining_to_one_worker_get_every_reply_exactly_once(transport: str) -> None:
    async with worker_in_hand(transport, "soaked") as (_, actor):
        clients = [await connect_as(actor, f"soak{c}") for c in range(CLIENTS)]
        try:
            ledgers = [_Ledger(client) for client in clients]
            results = await asyncio.gather(*(_pipeline(client, c) for c, client in enumerate(clients)))
            for c, (client, ledger, result) in enumerate(zip(clients, ledgers, results, strict=True)):
                gets = [(i, value) for i, value in result if i >= 0]
                assert [i for i, _ in gets] == list(range(COMMANDS_PER_CLIENT))
                for i, value in gets:
                    expected = torch.tensor([c + i, i, i - c], dtype=torch.float64)
                    assert torch.equal(value, expected), (c, i, value)
                assert all(status["id"] == actor.id for i, status in result if i < 0)
                assert len(ledger.asked) == len(set(ledger.asked)) == len(result)
                repeated = [m for m, n in collections.Counter(ledger.answered).items() if n > 1]
                assert repeated == [], f"client {c} got {len(repeated)} answers twice"
                assert sorted(ledger.answered) == sorted(ledger.asked), f"client {c}: answers do not match"
                assert not client.connection.protocol_errors and client.connection.lost is None
            gc.collect()
            await asyncio.sleep(0)
            for client in clients:
                await client.ping()  # carries any last deletes
            assert len(actor.store) == 0
        finally:
            for client in clients:
                await client.close()
