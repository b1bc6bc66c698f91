"""Nothing costly before authentication, on every network transport, measured on a real worker.

A worker process is started as people start one (``python -m runners.cli worker``), and its
resident memory is read from ``/proc/<pid>/status`` while unauthenticated connections declare
huge records (TCP) or send huge requests (WebSocket): the worker must read a few KiB from each,
close every one of them itself, and keep nothing once they are gone. The first connection of each
flood is checked alone first, so a regression costs the machine one declared record, not a hundred.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import re
import selectors
import struct
import subprocess
import sys
import time
import tracemalloc
import weakref
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest

import actors
from actors import tcp
from actors.identity import CLUSTER_SECRET_ENV, CREDENTIALS_ENV, SECRET_ENV
from protocol import PROTOCOL_VERSION, WorkerLost
from tests.conftest import CLUSTER, CREDENTIALS, bounded, secret_of

ROOT = Path(__file__).resolve().parent.parent
MIB = 1 << 20
GIB = 1 << 30
FLOOD = 100
#: What a flood may add to the worker while it lasts, and what may be left once it is over.
DURING, AFTER = 16 * MIB, 4 * MIB


class WorkerProcess:
    """``aiosyft worker`` in a process of its own; its logs go to a file, for failures to show."""

    def __init__(self, transport: str, log: Path) -> None:
        env = {key: value for key, value in os.environ.items() if key not in (CREDENTIALS_ENV, SECRET_ENV)}
        env[CLUSTER_SECRET_ENV] = CLUSTER
        self.log = log
        self._stderr = log.open("wb")
        command = [sys.executable, "-m", "runners.cli", "worker", "--id", f"guarded-{transport}",
                   "--transport", transport, "--port", "0"]  # fmt: skip
        self.process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr
        )
        self.address = self._ready(60.0)
        self.host, port = self.address.split("://")[1].rsplit(":", 1)
        self.port = int(port)

    def _ready(self, seconds: float) -> str:
        assert self.process.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(self.process.stdout, selectors.EVENT_READ)
            if not selector.select(seconds):
                raise TimeoutError(f"the worker was not ready within {seconds} s: {self.log.read_text()}")
        line = self.process.stdout.readline().decode()
        assert line.startswith("READY "), f"{line!r}; {self.log.read_text()}"
        return line.split()[1]

    def rss(self) -> int:
        """Resident memory, in bytes."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        found = re.search(r"^VmRSS:\s+(\d+) kB$", status, re.MULTILINE)
        assert found is not None
        return int(found[1]) * 1024

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None:
                pipe.close()
        self._stderr.close()


@pytest.fixture(scope="module")
def tcp_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    worker = WorkerProcess("tcp", tmp_path_factory.mktemp("tcp") / "worker.log")
    yield worker
    worker.stop()


@pytest.fixture(scope="module")
def ws_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    worker = WorkerProcess("ws", tmp_path_factory.mktemp("ws") / "worker.log")
    yield worker
    worker.stop()


async def _settled_rss(worker: WorkerProcess, seconds: float = 0.3) -> int:
    """The worker's RSS once it has had ``seconds`` to process what it was sent."""
    await asyncio.sleep(seconds)
    return worker.rss()


async def _closed_by_peer(reader: asyncio.StreamReader, seconds: float) -> bool:
    """Whether the other end closed (or reset) the connection within ``seconds``; what it sent
    before closing is read and dropped."""
    try:
        async with asyncio.timeout(seconds):
            while await reader.read(1 << 16):
                pass
    except TimeoutError:
        return False
    except ConnectionError:
        pass
    return True


async def _attack(worker: WorkerProcess, payload: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(worker.host, worker.port)
    writer.write(payload)
    with contextlib.suppress(ConnectionError):  # the worker may close before all of it is taken
        await writer.drain()
    return reader, writer


async def _flood(worker: WorkerProcess, payload: bytes) -> tuple[int, int, int, list[bool]]:
    """Open :data:`FLOOD` unauthenticated connections each sending ``payload``.

    Returns the worker's RSS before, while the connections are open on this side (the first
    alone, then all of them) and after this side closed them, and whether the worker closed each.
    """
    # Warm-up: the first refusal imports and caches things. It must be closed by the worker, or
    # a regression would go on to make a hundred connections hold what this one holds.
    reader, writer = await _attack(worker, payload)
    assert await _closed_by_peer(reader, 5.0), "the worker left an unauthenticated connection open"
    writer.close()
    before = await _settled_rss(worker)
    first = [await _attack(worker, payload)]
    alone = await _settled_rss(worker)
    assert alone - before < DURING, f"one connection added {(alone - before) / MIB:.1f} MiB"
    rest = await asyncio.gather(*(_attack(worker, payload) for _ in range(FLOOD - 1)))
    connections = first + list(rest)
    during = await _settled_rss(worker)
    closed = await asyncio.gather(*(_closed_by_peer(reader, 5.0) for reader, _ in connections))
    for _, writer in connections:
        writer.close()
    after = await _settled_rss(worker, 0.5)
    return before, during, after, list(closed)


def _check(before: int, during: int, after: int, closed: list[bool], worker: WorkerProcess) -> None:
    assert all(closed), f"the worker left {closed.count(False)} of {FLOOD} unauthenticated connections open"
    assert during - before < DURING, f"{FLOOD} connections added {(during - before) / MIB:.1f} MiB"
    assert after - before < AFTER, f"{(after - before) / MIB:.1f} MiB still held after they closed"
    assert worker.process.poll() is None, "the worker died"


# -- TCP ----------------------------------------------------------------------------------------
@bounded(60)
async def test_tcp_records_declared_before_the_handshake_are_refused_unread(tcp_worker) -> None:
    """100 connections each declare a 1 GiB record (and send 4 KiB of it) instead of a hello."""
    payload = struct.pack("<I", GIB) + b"\0" * 4096
    before, during, after, closed = await _flood(tcp_worker, payload)
    _check(before, during, after, closed, tcp_worker)
    # and the worker still serves whoever authenticates
    worker = await actors.connect(tcp_worker.address, identity="me", secret=secret_of("me"))
    try:
        assert (await worker.ping())["objects"] == 0
    finally:
        await worker.close()


@bounded(60)
async def test_tcp_a_hello_sized_record_is_the_most_read_before_the_handshake(tcp_worker) -> None:
    """A declared length just over the handshake's limit is refused as soon as it is read."""
    payload = struct.pack("<I", 4097) + b"\0" * 4097
    before, during, after, closed = await _flood(tcp_worker, payload)
    _check(before, during, after, closed, tcp_worker)


def _hello_record(identity: str, secret: str) -> bytes:
    hello = msgpack.packb({"aiosyft": PROTOCOL_VERSION, "id": identity, "secret": secret})
    return struct.pack("<I", len(hello)) + hello


async def _authenticated(tcp_worker: WorkerProcess) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(tcp_worker.host, tcp_worker.port)
    writer.write(_hello_record("me", secret_of("me")))
    answer_length = struct.unpack("<I", await reader.readexactly(4))[0]
    assert msgpack.unpackb(await reader.readexactly(answer_length))["ok"] is True
    return reader, writer


@bounded(60)
async def test_tcp_an_announced_record_costs_only_what_has_arrived(tcp_worker) -> None:
    """An authenticated peer announces a record of almost 1 GiB and sends 1 MiB of it: the
    worker's buffer grows with the bytes that came, not with the number announced (announcing
    costs the peer four bytes; the fuzzer's tcp runs peaked at 2 GiB before this)."""
    before = await _settled_rss(tcp_worker)
    _, writer = await _authenticated(tcp_worker)
    writer.write(struct.pack("<I", GIB - 1) + b"\0" * MIB)
    await writer.drain()
    grown = await _settled_rss(tcp_worker, 0.5) - before
    writer.close()
    assert grown < 32 * MIB, f"{grown / MIB:.0f} MiB for 1 MiB received"


@bounded(60)
async def test_tcp_a_large_record_is_freed_when_its_connection_closes(tcp_worker) -> None:
    """After the handshake a 256 MiB record is allowed; the connection closing after 128 MiB of it
    must give the memory back at once (no reference cycle keeping it for a full GC)."""
    before = await _settled_rss(tcp_worker)
    _, writer = await _authenticated(tcp_worker)
    writer.write(struct.pack("<I", 256 * MIB) + b"\0" * (128 * MIB))
    await writer.drain()
    deadline = time.monotonic() + 10
    while tcp_worker.rss() - before < 100 * MIB:  # the record's buffer holds what arrived
        assert time.monotonic() < deadline, "the worker never allocated the record"
        await asyncio.sleep(0.05)
    writer.close()
    while tcp_worker.rss() - before > AFTER:
        assert time.monotonic() < deadline, f"{(tcp_worker.rss() - before) / MIB:.0f} MiB kept after closing"
        await asyncio.sleep(0.05)


@bounded(30)
async def test_tcp_client_reads_no_large_record_before_the_workers_answer() -> None:
    """A server that answers the hello with a 1 GiB record: the client refuses it unread."""
    closed = asyncio.get_running_loop().create_future()

    async def hostile(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(4)
        writer.write(struct.pack("<I", GIB) + b"\0" * 65536)
        closed.set_result(await _closed_by_peer(reader, 5.0))
        writer.close()

    server = await asyncio.start_server(hostile, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    tracemalloc.start()
    try:
        with pytest.raises(WorkerLost):
            await actors.connect(f"tcp://127.0.0.1:{port}", identity="me", secret="x", timeout=5)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        server.close()
    assert await closed, "the client kept the connection open"
    assert peak < 4 * MIB, f"the client allocated {peak / MIB:.0f} MiB for an unauthenticated record"


# -- WebSocket ----------------------------------------------------------------------------------
def _request(headers: list[str]) -> bytes:
    return ("\r\n".join(["GET /ws HTTP/1.1", "Host: worker", *headers]) + "\r\n").encode()


@bounded(60)
async def test_ws_unauthenticated_headers_are_not_read_past_a_few_kib(ws_worker) -> None:
    """100 connections each send 64 headers of 8000 bytes (within aiohttp's own per-header limits,
    so ~512 KiB each that it would otherwise keep) and never finish the request."""
    padding = [f"X-Pad-{i}: {'a' * 8000}" for i in range(64)]
    before, during, after, closed = await _flood(ws_worker, _request(padding))
    _check(before, during, after, closed, ws_worker)


@bounded(60)
async def test_ws_an_unauthenticated_request_body_closes_the_connection(ws_worker) -> None:
    """100 unauthenticated upgrade requests each announce a 1 GiB body and send 1 MiB of it: each
    gets its 401 and the connection closes at once (not drained for seconds, not buffered)."""
    payload = _request(["Upgrade: websocket", "Connection: Upgrade", f"Content-Length: {GIB}", ""])
    before, during, after, closed = await _flood(ws_worker, payload + b"\0" * MIB)
    _check(before, during, after, closed, ws_worker)
    # the refusal was an answer, not just a reset; and an authenticated peer still gets in
    reader, writer = await asyncio.open_connection(ws_worker.host, ws_worker.port)
    writer.write(payload)
    assert (await reader.readline()).startswith(b"HTTP/1.1 401")
    writer.close()
    worker = await actors.connect(ws_worker.address, identity="me", secret=secret_of("me"))
    try:
        assert (await worker.ping())["objects"] == 0
    finally:
        await worker.close()


@bounded(30)
async def test_ws_health_keeps_answering_on_one_connection(ws_worker) -> None:
    """``/health`` needs no identity; a monitor polling it on one kept-alive connection is not cut
    off by the unauthenticated limit (each answered request is paid for)."""
    reader, writer = await asyncio.open_connection(ws_worker.host, ws_worker.port)
    request = b"GET /health HTTP/1.1\r\nHost: worker\r\nX-Pad: " + b"a" * 1000 + b"\r\n\r\n"
    try:
        for _ in range(40):  # 40 KiB in all, more than the limit for any one request
            writer.write(request)
            assert (await reader.readline()).startswith(b"HTTP/1.1 200")
            length = 0
            while (line := await reader.readline()) != b"\r\n":
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            assert b'"id"' in await reader.readexactly(length)
    finally:
        writer.close()


@bounded(20)
async def test_tcp_a_closed_connection_keeps_nothing_for_the_garbage_collector(monkeypatch) -> None:
    """A stream's callbacks are bound methods of the connection handler that holds the stream; once
    the connection closes, that cycle must not keep the handler (and buffers) for a full collection.
    With the collector off, each handler must be freed by reference counting alone and each stream
    must hold no buffer (authenticated, refused, and cut off at the first record)."""
    handlers: list[weakref.ref[tcp._ServerSide]] = []
    streams: list[weakref.ref[tcp.FrameStream]] = []

    class Recorded(tcp._ServerSide):
        def __init__(self, worker: actors.Worker, stream: tcp.FrameStream) -> None:
            super().__init__(worker, stream)
            handlers.append(weakref.ref(self))
            streams.append(weakref.ref(stream))

    monkeypatch.setattr(tcp, "_ServerSide", Recorded)
    server = await actors.serve(actors.Worker("freed", credentials=CREDENTIALS), "tcp")
    host, port = server.address.split("://")[1].rsplit(":", 1)
    first_records = [_hello_record("me", secret_of("me")), _hello_record("me", "wrong"), b"\xff" * 8]
    gc.collect()
    gc.disable()
    try:
        for record in first_records:
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(record + struct.pack("<I", 100) + b"\0" * 50)  # and half a record after it
            await asyncio.sleep(0.05)
            writer.close()
            await _closed_by_peer(reader, 5.0)
        for _ in range(100):
            await asyncio.sleep(0.01)
            if len(handlers) == 3 and all(ref() is None for ref in handlers):
                break
        assert [ref() is None for ref in handlers] == [True, True, True]
        held = [(len(stream._buffer), stream._large) for ref in streams if (stream := ref()) is not None]
        assert held == [(0, None)] * len(held)
    finally:
        gc.enable()
        await server.close()
