"""``aiosyft bench mpc``: SPDZ operations between worker processes, beside plain PyTorch.

Two parties and the crypto provider run as separate worker processes on loopback TCP; the
leader (this process) only issues commands. Per operation: the median total time (the
provider's work included: material asked for with the operation), the online time (material
made and delivered first, then the operation timed), the rounds on the longest chain, the bytes
the parties sent one another and the provider sent them, and plain PyTorch in this process.
The peer figures are those of the best-known PyTorch MPC library on this kind of machine
(``../shared/notes/peers.md``: CrypTen 0.4.1, two parties and a dealer process).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

import mpc
from mpc import spdz2k
from mpc.training import reference_step, sgd_step
from runners.cluster import local_cluster

#: CrypTen 0.4.1, 2 parties and a dealer process, seconds (peers.md: the upper ends).
PEER_SECONDS = {"mul_1000x1000": 0.125, "matmul_256": 0.030, "mlp_inference": 0.535, "mlp_train_epoch": 19.8}
PEER_ROUNDS = {"mlp_inference": 49}
BATCH = 32
#: Rounds of each measure run before timing: a worker process's heap grows to the size of a
#: 1000x1000 product's buffers over its first four or so (online mul: 140 ms, then 32-52 ms).
WARM_UPS = 4


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(13, 32), mpc.ApproxSigmoid(), nn.Linear(32, 24), mpc.ApproxSigmoid(), nn.Linear(24, 1)
    )


async def _settle(result: Any) -> None:
    """Wait until every share of ``result`` (a shared tensor or a list of them) exists."""
    for tensor in result if isinstance(result, list) else [result]:
        await tensor


def median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    """The median of ``repeats`` timed calls of ``fn``, after one untimed (allocator warm,
    kernels compiled)."""
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


async def _no_check() -> None:
    return None


async def _measure(
    name: str, issue: Callable[[], Any], plain: Callable[[], Any], repeats: int, bar: tqdm, *,
    before: Callable[[], int] = lambda: 0, check: Callable[[], Awaitable[None]] = _no_check,
) -> dict[str, Any]:  # fmt: skip
    """``before``: the depth the operands already have (a model trained in earlier runs);
    ``check``: what must follow the operation before its result could be trusted (the
    authenticated mode's MAC check of everything it opened), timed with it."""

    async def done(result: Any) -> None:
        await _settle(result)
        await check()

    for _ in range(WARM_UPS):  # links between parties, and each process's heap grown to size
        await done(issue())
        with mpc.recording() as asked:
            await done(issue())
        made = asked.prepare()
        await asyncio.gather(*(share.resolve() for material in made for share in material))
        await done(issue())
    totals, onlines = [], []
    depth, online_bytes, material_bytes = 0, 0, 0
    for _ in range(repeats):
        start_depth = before()
        start = time.perf_counter()
        with mpc.meter() as spent:
            result = issue()
        await done(result)
        totals.append(time.perf_counter() - start)
        depth = max(r.depth for r in (result if isinstance(result, list) else [result])) - start_depth
        online_bytes, material_bytes = spent.online_bytes, spent.material_bytes
        with mpc.recording() as asked:
            await done(issue())
        made = asked.prepare()
        await asyncio.gather(*(share.resolve() for material in made for share in material))
        start = time.perf_counter()
        await done(issue())
        onlines.append(time.perf_counter() - start)
        bar.update(1)
    return {
        "name": name,
        "seconds": statistics.median(totals),
        "online_seconds": statistics.median(onlines),
        "rounds": depth,
        "bytes": online_bytes + material_bytes,
        "online_bytes": online_bytes,
        "material_bytes": material_bytes,
        "plaintext_seconds": median_seconds(plain, repeats),
        "peer_seconds": PEER_SECONDS[name],
    }


async def _inputs() -> dict[str, Any]:
    """The operands and the model both modes run on (one draw, so the rows compare)."""
    data = torch.randn(506, 13)
    return {
        "x": torch.randn(1000, 1000),
        "y": torch.randn(1000, 1000),
        "a": torch.randn(256, 256),
        "b": torch.randn(256, 256),
        "data": data,
        "targets": torch.randn(506, 1),
    }


async def _mode(
    inputs: dict[str, Any], share: Callable[[torch.Tensor], Awaitable[mpc.SharedTensor]],
    encrypted: Any, repeats: int, bar: tqdm, *, check: Callable[[], Awaitable[None]] = _no_check,
) -> list[dict[str, Any]]:  # fmt: skip
    """The four operations on tensors ``share`` makes (one mode), each ``repeats`` times."""
    x, y, a, b, data, targets = (inputs[k] for k in ("x", "y", "a", "b", "data", "targets"))
    sx, sy, sa, sb, sdata = [await share(t) for t in (x, y, a, b, data)]
    batches = [
        (await share(data[i : i + BATCH]), await share(targets[i : i + BATCH])) for i in range(0, 506, BATCH)
    ]
    for tensor in (sx, sy, sa, sb, sdata, *(t for pair in batches for t in pair)):
        await tensor
    model = _mlp()

    def epoch() -> list[mpc.SharedTensor]:
        return [sgd_step(encrypted, bx, by, lr=1e-3) for bx, by in batches]

    plain_model = _mlp()

    def plain_epoch() -> None:
        for i in range(0, 506, BATCH):
            reference_step(plain_model, data[i : i + BATCH], targets[i : i + BATCH], 1e-3)

    measures: list[tuple[str, Callable[[], Any], Callable[[], Any]]] = [
        ("mul_1000x1000", lambda: sx * sy, lambda: x * y),
        ("matmul_256", lambda: sa @ sb, lambda: a @ b),
        ("mlp_inference", lambda: encrypted(sdata), lambda: model(data)),
        ("mlp_train_epoch", epoch, plain_epoch),
    ]

    def trained_depth() -> int:
        return max(p.depth for _, p in encrypted.named_parameters())

    ops = []
    for name, issue, plain in measures:
        bar.set_description(name)
        before = trained_depth if name == "mlp_train_epoch" else (lambda: 0)
        ops.append(await _measure(name, issue, plain, repeats, bar, before=before, check=check))
    return ops


async def bench_mpc(
    repeats: int = 5, transport: str = "tcp", *, authenticated: bool = True
) -> dict[str, Any]:
    """The four operations of the SPDZ issue, each ``repeats`` times (medians), semi-honest and
    (``authenticated``) with MACs, the check of every opening included in the time."""
    torch.set_num_threads(1)  # as every worker process runs
    inputs = await _inputs()
    async with local_cluster(
        ["alice", "bob", "provider"], transport=transport, enable=["mpc", "provider"]
    ) as c:
        alice, bob, provider = c.workers
        parties = (alice, bob)

        async def shared(value: torch.Tensor) -> mpc.SharedTensor:
            return mpc.share(value, *parties, crypto_provider=provider)

        modes = 2 if authenticated else 1
        with tqdm(total=4 * repeats * modes, unit="run", leave=False) as bar:
            encrypted = mpc.share_module(_mlp(), *parties, crypto_provider=provider)
            ops = await _mode(inputs, shared, encrypted, repeats, bar)
            result: dict[str, Any] = {"ops": ops, "repeats": repeats, "transport": transport, "parties": 2}
            if authenticated:
                session = spdz2k.Session(*parties, crypto_provider=provider)
                model = await session.share_module(_mlp())
                checked = await _mode(inputs, session.share, model, repeats, bar, check=session.verify)
                for op, semi in zip(checked, ops, strict=True):
                    op["vs_semi_honest"] = op["seconds"] / semi["seconds"]
                    op["online_vs_semi_honest"] = op["online_seconds"] / semi["online_seconds"]
                result["authenticated"] = checked
    return result


def format_mpc(result: dict[str, Any]) -> str:
    lines = [
        "| op | total | online | rounds | bytes | plaintext | CrypTen | total / CrypTen |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for op in result["ops"]:
        peer = op["peer_seconds"]
        peer_rounds = PEER_ROUNDS.get(op["name"])
        rounds = f"{op['rounds']}" + (f" (CrypTen {peer_rounds})" if peer_rounds else "")
        times = f"{1e3 * op['seconds']:.1f} ms | {1e3 * op['online_seconds']:.1f} ms"
        lines.append(
            f"| {op['name']} | {times} | {rounds} | {op['bytes'] / 1e6:.1f} MB | "
            f"{1e3 * op['plaintext_seconds']:.2f} ms | {1e3 * peer:.0f} ms | {op['seconds'] / peer:.3f}x |"
        )
    if result.get("authenticated"):
        lines += [
            "",
            f"Authenticated (SPDZ2k, MACs checked: {spdz2k.SECURITY_BITS:.0f}-bit statistical security), "
            "the MAC check of every opening included:",
            "",
            "| op | total | online | rounds | bytes | total / semi-honest | online / semi-honest |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for op in result["authenticated"]:
            lines.append(
                f"| {op['name']} | {1e3 * op['seconds']:.1f} ms | {1e3 * op['online_seconds']:.1f} ms | "
                f"{op['rounds']} | {op['bytes'] / 1e6:.1f} MB | {op['vs_semi_honest']:.2f}x | "
                f"{op['online_vs_semi_honest']:.2f}x |"
            )
    return "\n".join(lines)


def plot_mpc(result: dict[str, Any], path: Path) -> None:
    import matplotlib  # noqa: PLC0415 - only the plotting command pays for it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    ops = result["ops"]
    positions = range(len(ops))
    figure, axis = plt.subplots(figsize=(8, 4))
    series = (
        ("plaintext_seconds", "plain PyTorch", "#bbbbbb"),
        ("online_seconds", "aiosyft online", "#90cdf4"),
        ("seconds", "aiosyft total", "#2b6cb0"),
        ("peer_seconds", "CrypTen (peers.md)", "#e53e3e"),
    )
    width = 0.2
    for k, (key, label, color) in enumerate(series):
        bars = [p + (k - 1.5) * width for p in positions]
        axis.bar(bars, [op[key] for op in ops], width, label=label, color=color)
    axis.set_yscale("log")
    axis.set_xticks(list(positions), [op["name"] for op in ops])
    axis.set_ylabel("seconds (log)")
    axis.set_title("SPDZ, 2 parties + provider, separate processes on loopback")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
