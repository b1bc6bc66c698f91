"""``aiosyft bench``: this project's figures beside a reference measured in the same run.

Every figure is the median of several runs after a warm-up, and each is printed next to its
reference (pure PyTorch, or the bare mechanism underneath) as a ratio, because only ratios taken
side by side on one machine mean anything on shared, noisy hosts.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgpack
import torch

import actors
from protocol import Kind, ref_ext

#: Operations per timed run; large enough that loop wake-ups amortize as they do in real use.
OPS = 20_000
AWAITED_OPS = 2_000


def _median_us(samples: list[float]) -> float:
    return statistics.median(samples) * 1e6


async def _runs(fn: Callable[[], Awaitable[float]], repeats: int) -> float:
    await fn()  # warm-up: allocator, caches, lazy imports
    return _median_us([await fn() for _ in range(repeats)])


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


async def _floor_op(n: int) -> float:
    """A bare asyncio.Queue hop with msgpack encode and decode of the same COMMAND message."""
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    done = asyncio.get_running_loop().create_future()
    ref = ref_ext(0x1234_5678_9ABC)

    async def consume() -> None:
        for _ in range(n):
            msgpack.unpackb(await queue.get())
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
        local = await _runs(lambda: _local_op(OPS), repeats)
        floor = await _runs(lambda: _floor_op(OPS), repeats)
        pipelined = await _runs(lambda: _pipelined_op(worker, OPS), repeats)
        awaited = await _runs(lambda: _awaited_op(worker, AWAITED_OPS), repeats)
    finally:
        await worker.close()
    return {
        "local_op_us": local,
        "pipelined_op_us": pipelined,
        "awaited_op_us": awaited,
        "floor_op_us": floor,
        "pipelined_ops_per_s": 1e6 / pipelined,
        "overhead_op_us": pipelined - local,
    }


def format_pointers(result: dict[str, float]) -> str:
    floor, local = result["floor_op_us"], result["local_op_us"]
    rows = [
        ("local tensor op (x = x + 1)", result["local_op_us"], "-"),
        ("floor: queue hop + msgpack", floor, "-"),
        (
            "pipelined pointer op",
            result["pipelined_op_us"],
            f"{result['pipelined_op_us'] / floor:.2f}x floor, {result['pipelined_op_us'] / local:.2f}x local",
        ),
        (
            "  of which runtime overhead",
            result["overhead_op_us"],
            f"{result['overhead_op_us'] / floor:.2f}x floor",
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
