"""``aiosyft bench``: this project's figures beside a reference measured in the same run.

Every figure is the median of several runs after a warm-up, and each is printed next to its
reference (pure PyTorch, or the bare mechanism underneath) as a ratio, because only ratios taken
side by side on one machine mean anything on shared, noisy hosts.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import struct
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import torch

import actors
from protocol import Kind, ref_ext
from runners.cluster import local_cluster, settled_heap

#: Operations per timed run; large enough that loop wake-ups amortize as they do in real use.
OPS = 20_000
AWAITED_OPS = 2_000


def _median_us(samples: list[float]) -> float:
    return statistics.median(samples) * 1e6


async def _runs(fn: Callable[[], Awaitable[float]], repeats: int) -> float:
    await fn()  # warm-up: allocator, caches, lazy imports
    return _median_us([await fn() for _ in range(repeats)])


async def _rounds(measures: dict[str, Callable[[], Awaitable[float]]], repeats: int) -> dict[str, float]:
    """Median microseconds of each measure, taken in rounds of one run of each: on a shared host
    the speed drifts between blocks of runs, and a figure and its reference must share it."""
    for fn in measures.values():
        await fn()  # warm-up: allocator, caches, lazy imports
    samples: dict[str, list[float]] = {name: [] for name in measures}
    for _ in range(repeats):
        for name, fn in measures.items():
            samples[name].append(await fn())
    return {name: _median_us(runs) for name, runs in samples.items()}


async def _local_op(n: int) -> float:
    x = torch.ones(4)
    start = time.perf_counter()
    for _ in range(n):
        x = x + 1
    return (time.perf_counter() - start) / n


async def _pipelined_op(worker: actors.RemoteWorker, n: int) -> float:
    x = actors.send(torch.ones(4), worker)
    await x
    start = time.perf_counter()
    for _ in range(n):
        x = x + 1
    await x
    elapsed = (time.perf_counter() - start) / n
    expected = torch.full((4,), 1.0 + n)
    assert torch.equal(await x.get(), expected), "pipelined result is wrong"
    return elapsed


async def _awaited_op(worker: actors.RemoteWorker, n: int) -> float:
    x = actors.send(torch.ones(4), worker)
    await x
    start = time.perf_counter()
    for _ in range(n):
        x = await (x + 1)
    return (time.perf_counter() - start) / n


async def _floor_op(n: int, *, execute: bool) -> float:
    """A bare asyncio.Queue hop with msgpack encode and decode of the same COMMAND message, and
    (``execute``) the same ``x + 1`` run by the consumer: a msgpack command through a queue
    mailbox, executed, with no actor runtime around it."""
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    done = asyncio.get_running_loop().create_future()
    ref = ref_ext(0x1234_5678_9ABC)

    async def consume() -> None:
        x = torch.ones(4)
        for _ in range(n):
            msgpack.unpackb(await queue.get())
            if execute:
                x = x + 1
        done.set_result(None)

    consumer = asyncio.create_task(consume())
    start = time.perf_counter()
    for i in range(n):
        message = [int(Kind.COMMAND), i, "me", 0x2345_6789_ABCD, "Tensor.__add__", [ref, 1], None]
        queue.put_nowait(msgpack.packb(message))
    await done
    elapsed = (time.perf_counter() - start) / n
    await consumer
    return elapsed


async def bench_pointers(repeats: int = 7) -> dict[str, float]:
    """Per-operation cost of pointer tensors on a virtual worker, beside its floors."""
    worker = actors.VirtualWorker("bench")
    try:
        with settled_heap():  # the floors and the pointers alike
            figures = await _rounds(
                {
                    "local": lambda: _local_op(OPS),
                    "floor": lambda: _floor_op(OPS, execute=True),
                    "hop": lambda: _floor_op(OPS, execute=False),
                    "pipelined": lambda: _pipelined_op(worker, OPS),
                    "awaited": lambda: _awaited_op(worker, AWAITED_OPS),
                },
                repeats,
            )
    finally:
        await worker.close()
    local, pipelined = figures["local"], figures["pipelined"]
    return {
        "local_op_us": local,
        "pipelined_op_us": pipelined,
        "awaited_op_us": figures["awaited"],
        "floor_op_us": figures["floor"],
        "floor_hop_us": figures["hop"],
        "pipelined_ops_per_s": 1e6 / pipelined,
        "overhead_op_us": pipelined - local,
    }


def format_pointers(result: dict[str, float]) -> str:
    floor, local = result["floor_op_us"], result["local_op_us"]
    rows = [
        ("local tensor op (x = x + 1)", result["local_op_us"], "-"),
        ("floor: queue hop + msgpack + the op", floor, "-"),
        ("  queue hop + msgpack alone", result["floor_hop_us"], "-"),
        (
            "pipelined pointer op",
            result["pipelined_op_us"],
            f"{result['pipelined_op_us'] / floor:.2f}x floor, {result['pipelined_op_us'] / local:.2f}x local",
        ),
        (
            "  of which runtime overhead",
            result["overhead_op_us"],
            f"{result['overhead_op_us'] / result['floor_hop_us']:.2f}x the hop alone",
        ),
        (
            "awaited pointer op (round trip)",
            result["awaited_op_us"],
            f"{result['awaited_op_us'] / floor:.1f}x floor",
        ),
    ]
    lines = ["| measure | us per op | ratio |", "| --- | ---: | --- |"]
    lines += [f"| {name} | {value:.2f} | {ratio} |" for name, value, ratio in rows]
    lines.append(f"\npipelined: {result['pipelined_ops_per_s']:,.0f} ops/s on one virtual worker")
    return "\n".join(lines)


def write_json(result: Any, path: Path | None) -> None:
    if path is not None:
        path.write_text(json.dumps(result, indent=2) + "\n")


# -- transports -------------------------------------------------------------------------------
TRANSPORT_ROUND_TRIPS = 2_000
BULK_BYTES = 64 << 20
_SMALL = b"x" * 100
_RAW_WINDOW = 256


async def _echo_process(kind: str) -> tuple[asyncio.subprocess.Process, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "runners.echo", kind, stdout=asyncio.subprocess.PIPE
    )
    assert process.stdout is not None
    line = (await process.stdout.readline()).decode().split()
    if not line or line[0] != "READY":
        process.kill()
        raise RuntimeError(f"the {kind} echo server did not start")
    return process, line[1]


class _RawClient:
    """Round trips, a window of pipelined messages and bulk transfer on a bare transport."""

    async def open(self, address: str) -> None: ...
    async def send(self, data: bytes) -> None: ...
    async def receive(self) -> bytes: ...
    async def close(self) -> None: ...

    async def round_trip(self, n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            await self.send(_SMALL)
            await self.receive()
        return (time.perf_counter() - start) / n

    async def pipelined(self, n: int) -> float:
        async def receive_all() -> None:
            for _ in range(n):
                await self.receive()

        start = time.perf_counter()
        receiver = asyncio.ensure_future(receive_all())
        for i in range(n):
            await self.send(_SMALL)
            if i % _RAW_WINDOW == 0:
                await asyncio.sleep(0)
        await receiver
        return (time.perf_counter() - start) / n

    async def bulk(self, payload: bytes) -> float:
        start = time.perf_counter()
        await self.send(payload)
        echoed = await self.receive()
        assert len(echoed) == len(payload)
        return time.perf_counter() - start


class _RawWebSocket(_RawClient):
    async def open(self, address: str) -> None:
        self.session = aiohttp.ClientSession()
        self.ws = await self.session.ws_connect(address, max_msg_size=1 << 30, compress=0)

    async def send(self, data: bytes) -> None:
        await self.ws.send_bytes(data)

    async def receive(self) -> bytes:
        return (await self.ws.receive()).data

    async def close(self) -> None:
        await self.ws.close()
        await self.session.close()


class _RawTcp(_RawClient):
    async def open(self, address: str) -> None:
        host, port = address.removeprefix("tcp://").split(":")
        self.reader, self.writer = await asyncio.open_connection(host, int(port), limit=1 << 27)

    async def send(self, data: bytes) -> None:
        if len(data) < 1 << 16:
            self.writer.write(struct.pack("<I", len(data)) + data)
        else:
            self.writer.write(struct.pack("<I", len(data)))
            self.writer.write(data)
        await self.writer.drain()

    async def receive(self) -> bytes:
        (length,) = struct.unpack("<I", await self.reader.readexactly(4))
        return await self.reader.readexactly(length)

    async def close(self) -> None:
        self.writer.close()


def _measures(worker: actors.RemoteWorker) -> dict[str, Callable[[], Awaitable[float]]]:
    """This project's transport measures on ``worker``: seconds per round trip, per pipelined
    command, and for a 64 MiB tensor there and back."""

    async def round_trip() -> float:
        start = time.perf_counter()
        for _ in range(TRANSPORT_ROUND_TRIPS):
            await worker.ping()
        return (time.perf_counter() - start) / TRANSPORT_ROUND_TRIPS

    async def pipelined() -> float:
        return await _pipelined_op(worker, OPS)

    bulk_tensor = torch.randn(BULK_BYTES // 4)

    async def bulk() -> float:
        start = time.perf_counter()
        back = await actors.send(bulk_tensor, worker).get()
        elapsed = time.perf_counter() - start
        assert torch.equal(back, bulk_tensor), "bulk transfer corrupted the tensor"
        return elapsed

    return {"rt_per_s": round_trip, "pipelined_per_s": pipelined, "mb_per_s": bulk}


def _rates(us: dict[str, float], prefix: str = "") -> dict[str, float]:
    """Median microseconds of the measures as rates: operations, or megabytes, per second."""
    return {
        prefix + "rt_per_s": 1e6 / us["rt_per_s"],
        prefix + "pipelined_per_s": 1e6 / us["pipelined_per_s"],
        prefix + "mb_per_s": 2 * BULK_BYTES / 1e6 / (us["mb_per_s"] / 1e6),
    }


async def _ours(worker: actors.RemoteWorker, repeats: int) -> dict[str, float]:
    measures = _measures(worker)
    bulk = measures.pop("mb_per_s")
    us = {name: await _runs(fn, repeats) for name, fn in measures.items()}
    us["mb_per_s"] = await _runs(bulk, max(3, repeats // 2))
    return _rates(us)


async def _ours_with_tls(
    plain: actors.RemoteWorker, secure: actors.RemoteWorker, repeats: int
) -> dict[str, float]:
    """The measures on a plaintext and a TLS worker, in alternating rounds (:func:`_rounds`), so
    that the cost of TLS is not the host's drift between two blocks of runs."""
    plain_measures, secure_measures = _measures(plain), _measures(secure)
    us: dict[str, float] = {}
    for name in plain_measures:
        pair = {"plain": plain_measures[name], "tls": secure_measures[name]}
        figures = await _rounds(pair, max(3, repeats // 2) if name == "mb_per_s" else repeats)
        us[name], us["tls_" + name] = figures["plain"], figures["tls"]
    return {**_rates(us), **_rates({k[4:]: v for k, v in us.items() if k.startswith("tls_")}, "tls_")}


async def _raw(client: _RawClient, repeats: int) -> dict[str, float]:
    payload = bytes(BULK_BYTES)
    return {
        "raw_rt_per_s": 1e6 / await _runs(lambda: client.round_trip(TRANSPORT_ROUND_TRIPS), repeats),
        "raw_pipelined_per_s": 1e6 / await _runs(lambda: client.pipelined(OPS), repeats),
        "raw_mb_per_s": 2
        * BULK_BYTES
        / 1e6
        / (await _runs(lambda: client.bulk(payload), max(3, repeats // 2)) / 1e6),
    }


async def bench_transport(repeats: int = 5, *, tls: bool = False) -> dict[str, dict[str, float]]:
    """Per transport: this project's figures and the bare transport's, each in its own process.

    With ``tls``, a second worker process serving over TLS (``wss://``, ``tls://``) is measured
    beside the plaintext one in the same rounds: its figures are ``tls_*``, the plaintext ones
    its reference.
    """
    results: dict[str, dict[str, float]] = {}
    for kind, raw_client in (("ws", _RawWebSocket), ("tcp", _RawTcp)):
        if tls:
            async with (
                local_cluster(["bench"], transport=kind) as cluster,
                local_cluster(["bench"], transport=kind, tls=True) as secure,
            ):
                ours = await _ours_with_tls(cluster[0], secure[0], repeats)
        else:
            async with local_cluster(["bench"], transport=kind) as cluster:
                ours = await _ours(cluster[0], repeats)
        process, address = await _echo_process(kind)
        client = raw_client()
        try:
            await client.open(address)
            raw = await _raw(client, repeats)
        finally:
            await client.close()
            process.kill()
            await process.wait()
        results[kind] = {**ours, **raw}
    return results


_LABELS = (("rt_per_s", "round trips/s, 1 in flight"),
           ("pipelined_per_s", "pipelined commands/s"),
           ("mb_per_s", "MB/s, 64 MiB there and back"))  # fmt: skip
_SECURE = {"ws": "wss", "tcp": "tls"}


def format_transport(results: dict[str, dict[str, float]]) -> str:
    lines = [
        "| transport | measure | aiosyft | raw transport | ratio |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for kind, figures in results.items():
        for key, label in _LABELS:
            ours, raw = figures[key], figures["raw_" + key]
            lines.append(f"| {kind} | {label} | {ours:,.0f} | {raw:,.0f} | {ours / raw:.2f} |")
    secure = {kind: figures for kind, figures in results.items() if "tls_rt_per_s" in figures}
    if secure:
        lines += [
            "",
            "| transport | measure | aiosyft, TLS | aiosyft, plaintext | ratio | TLS cost |",
            "| --- | --- | ---: | ---: | ---: | ---: |",
        ]
        for kind, figures in secure.items():
            for key, label in _LABELS:
                ours, plain = figures["tls_" + key], figures[key]
                cost = round(100 * (1 - ours / plain)) or 0  # no "-0%"
                lines.append(
                    f"| {_SECURE.get(kind, kind)} | {label} | {ours:,.0f} | {plain:,.0f} "
                    f"| {ours / plain:.2f} | {cost}% |"
                )
    return "\n".join(lines)
