"""``aiosyft bench dp``: DP-SGD on the Boston MLP beside plain PyTorch, in the same run.

The project's figure is the real thing: two virtual workers holding the halves of the training
set under a sanitized release, the paper's sampling (a worker at random per step, a Poisson lot
there), ten epochs' worth of steps at expected lot sizes 8 and 64. The reference is the same
network trained by plain, non-private PyTorch on batches of the same size for ten epochs.
Each figure is the median of several runs, taken in alternation.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812

import actors
from privacy.dp import DpSettings, Sanitized, train_dp
from privacy.federated import FederatedDataset, make_model, publish_shard
from runners.cluster import settled_heap
from runners.datasets import load

EPOCHS = 10


def _plain(data: Any, batch: int) -> float:
    model = make_model(data.x_train.shape[1])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001)
    start = time.perf_counter()
    for _ in range(EPOCHS):
        for i in range(0, len(data.x_train), batch):
            optimizer.zero_grad()
            F.mse_loss(model(data.x_train[i : i + batch]), data.y_train[i : i + batch]).backward()
            optimizer.step()
    return time.perf_counter() - start


async def bench_dp(repeats: int = 5) -> dict[str, Any]:
    torch.set_num_threads(1)
    data = load("boston", seed=0)
    workers = [actors.VirtualWorker(name) for name in ("bob", "alice")]
    result: dict[str, Any] = {"repeats": repeats, "epochs": EPOCHS}
    try:
        for k, worker in enumerate(workers):
            x, y = data.x_train[k::2], data.y_train[k::2]
            publish_shard(worker.worker, "boston", x, y, releases=(Sanitized(epsilon=1e9),))
        dataset = await FederatedDataset.from_workers(workers, "boston")
        for batch in (8, 64):
            settings = DpSettings(
                lot=batch, clip=1.0, sigma=1.0, lr=0.01, steps=EPOCHS * len(data.x_train) // batch
            )

            async def private(settings: DpSettings = settings) -> float:
                model = make_model(data.x_train.shape[1])
                start = time.perf_counter()
                await train_dp(model, dataset, settings)
                return time.perf_counter() - start

            await private()  # warm-up (and each plan's ledger room, found once)
            _plain(data, batch)
            ours, plain = [], []
            with settled_heap():
                for _ in range(repeats):
                    plain.append(_plain(data, batch))
                    ours.append(await private())
            seconds, reference = statistics.median(ours), statistics.median(plain)
            result[f"seconds_b{batch}"] = seconds
            result[f"plain_seconds_b{batch}"] = reference
            result[f"ratio_b{batch}"] = seconds / reference
    finally:
        for worker in workers:
            await worker.close()
    result["opacus"] = _opacus_note()
    return result


def _opacus_note() -> str:
    try:
        import opacus  # noqa: F401, PLC0415
    except ImportError:
        return "not installed (peers.md measured it at 4.6x at batch 8 and 3.2x at batch 64 here)"
    return "installed, not measured yet"


def format_dp(result: dict[str, Any]) -> str:
    lines = [
        "| lot size | DP-SGD (aiosyft, 2 virtual workers) | plain PyTorch, no privacy | ratio |",
        "| ---: | ---: | ---: | ---: |",
    ]
    for batch in (8, 64):
        lines.append(
            f"| {batch} | {result[f'seconds_b{batch}']:.3f} s | {result[f'plain_seconds_b{batch}']:.3f} s | "
            f"{result[f'ratio_b{batch}']:.2f}x |"
        )
    lines.append(f"\nOpacus: {result['opacus']}")
    return "\n".join(lines)
