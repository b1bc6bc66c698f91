"""``aiosyft bench cluster``: what placing workers with Ray costs, beside local processes.

Two figures, the targets of the Ray backend: Table 1's training over Ray-placed WebSocket workers
against the same training over local worker processes, in the same run (Ray should add
placement, not a slower data path); and the time to launch three workers on a running Ray
cluster (beside three local processes, which do the same work: import, warm up, serve), with
the number of worker actors still alive once the launch is left (none).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import replace
from typing import Any

import torch

from runners.cluster import launch, load_ray_backend, settled_heap
from runners.datasets import data_dir, load
from runners.experiments import DEFAULTS, federated_run, worker_ids
from runners.federated import Federation


async def bench_cluster(repeats: int = 5, address: str | None = None) -> dict[str, Any]:
    """Table 1 over local processes and over Ray-placed ws workers, run by run alternately (a
    shared host drifts between blocks of runs), medians and their ratio; then three launches of
    three workers on the Ray cluster, timed up to connected, each beside a launch of three local
    processes, and the actors left after each.

    ``address``: a running Ray cluster (``auto``, ``ray://...``); without one a private Ray is
    started on this machine first, and the launches are timed on it once it runs."""
    ray_backend = load_ray_backend()  # Ray is an optional extra: a missing one is a one-line error
    ray = ray_backend.ray

    torch.set_num_threads(1)
    started = ray_backend.connect_ray(address, cpus_needed=3)
    try:
        settings = DEFAULTS["boston"]
        directory = str(data_dir(None))
        data = load("boston", directory, seed=settings.seed)
        federation = Federation("boston", 2, "round-robin", settings.seed, settings.batch_size)
        ids = worker_ids(2)
        common = {"federation": federation, "data_dir": directory}
        runs: dict[str, list[Any]] = {"local": [], "ray": []}
        async with launch(ids, "ws", backend="local", **common) as local, launch(
            ids, "ws", backend="ray", cpus=0.5, **common
        ) as placed:  # fmt: skip
            clusters = {"local": list(local), "ray": list(placed)}
            for workers in clusters.values():
                await federated_run(workers, data, replace(settings, epochs=1), "walk")  # warm-up
            with settled_heap():
                for _ in range(repeats):
                    for backend, workers in clusters.items():
                        runs[backend].append(await federated_run(workers, data, settings, "walk"))
        same = all(
            r.losses == runs["local"][0].losses and r.metric == runs["local"][0].metric
            for r in runs["local"] + runs["ray"]
        )
        seconds = {backend: statistics.median(r.seconds for r in rs) for backend, rs in runs.items()}

        launches: dict[str, list[float]] = {"ray": [], "local": []}
        left = []
        for index in range(3):
            names = [f"{name}{index}" for name in ("alice", "bob", "carol")]
            for backend, options in (("ray", {"cpus": 0.5}), ("local", {})):
                start = time.perf_counter()
                async with launch(names, "ws", backend=backend, **options) as cluster:
                    launches[backend].append(time.perf_counter() - start)
                    assert len(cluster) == 3
            alive = ray.util.list_named_actors(all_namespaces=True)
            left.append(sum(1 for actor in alive if actor["namespace"] == ray_backend.NAMESPACE))
    finally:
        if started:
            ray.shutdown()
    return {
        "workload": "Table 1: Boston Housing walk, 10 epochs, batch 8, 2 ws workers",
        "repeats": repeats,
        "local_seconds": seconds["local"],
        "ray_seconds": seconds["ray"],
        "ratio": seconds["ray"] / seconds["local"],
        "identical_results": same,
        "test_mse": runs["ray"][-1].metric,
        "launch_seconds": launches["ray"],
        "launch_median_seconds": statistics.median(launches["ray"]),
        "local_launch_seconds": launches["local"],
        "local_launch_median_seconds": statistics.median(launches["local"]),
        "actors_left": left,
    }


def format_cluster(figures: dict[str, Any]) -> str:
    launches = ", ".join(f"{s:.2f}" for s in figures["launch_seconds"])
    return "\n".join([
        f"{figures['workload']}, median of {figures['repeats']} runs each, alternated:",
        f"  local processes:    {figures['local_seconds']:.3f} s",
        f"  Ray-placed workers: {figures['ray_seconds']:.3f} s ({figures['ratio']:.2f}x local, target 1.10x)",
        f"  identical losses and test MSE: {figures['identical_results']} (MSE {figures['test_mse']:.2f})",
        f"launch of 3 workers on a running Ray cluster: {launches} s "
        f"(median {figures['launch_median_seconds']:.2f} s; target < 5 s)",
        f"  3 local processes, launched alongside: median {figures['local_launch_median_seconds']:.2f} s",
        f"worker actors alive after each shutdown: {figures['actors_left']} (target 0)",
    ])  # fmt: skip
