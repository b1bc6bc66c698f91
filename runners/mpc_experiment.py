"""``aiosyft mpc``: encrypted inference and training beside plaintext, on Boston or Pima.

The paper claims that privacy techniques other than differential privacy do not change
accuracy; this is the check. One network (Linear-sigmoid-Linear-sigmoid-Linear, the sigmoid
being the polynomial the parties compute, :class:`mpc.ApproxSigmoid`) is

* trained in plaintext PyTorch, then run on secret-shared test data with its parameters shared
  (**encrypted inference**), and
* trained from the same initial weights on secret-shared batches, every gradient computed on
  shares (**encrypted training**), then reconstructed and evaluated.

Both are compared with the plaintext figures. The leader holds the data here (it shares its
own test set and batches): the parties see only shares, the provider only shapes.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

import actors
import mpc
from mpc import spdz2k
from mpc.training import reference_step, sgd_step
from runners.cluster import local_cluster
from runners.datasets import Dataset, load


@dataclass(frozen=True)
class MpcSettings:
    epochs: int
    lr: float
    batch_size: int = 32
    seed: int = 0


#: Few epochs (every step is a dozen rounds between the parties), a learning rate that gets
#: somewhere in them; pre-activations stay near the sigmoid polynomial's range [-8, 8].
DEFAULTS = {"boston": MpcSettings(epochs=10, lr=0.05), "pima": MpcSettings(epochs=10, lr=0.2)}


def make_network(dataset: Dataset, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    features = dataset.x_train.shape[1]
    sigmoid = mpc.ApproxSigmoid
    model = nn.Sequential(nn.Linear(features, 32), sigmoid(), nn.Linear(32, 24), sigmoid(), nn.Linear(24, 1))
    if dataset.task == "regression":  # start at the mean price: the first epochs learn shape, not scale
        with torch.no_grad():
            model[4].bias.fill_(float(dataset.y_train.mean()))
    return model


def metric(dataset: Dataset, output: torch.Tensor) -> float:
    """Test MSE (regression) or accuracy with threshold 1/2 on a 0/1 target (binary)."""
    if dataset.task == "regression":
        return float(((output - dataset.y_test) ** 2).mean())
    return float(((output > 0.5).float() == dataset.y_test).float().mean())


@contextlib.asynccontextmanager
async def mpc_workers(parties: int, transport: str) -> AsyncIterator[tuple[list[Any], Any]]:
    ids = [f"party{i}" for i in range(parties)]
    if transport == "virtual":
        workers = [actors.VirtualWorker(worker_id) for worker_id in [*ids, "provider"]]
        try:
            yield workers[:-1], workers[-1]
        finally:
            for worker in workers:
                await worker.close()
    else:
        async with local_cluster(
            [*ids, "provider"], transport=transport, enable=["mpc", "provider"]
        ) as cluster:
            yield list(cluster)[:-1], list(cluster)[-1]


async def mpc_command(
    dataset_name: str, parties: int, transport: str, settings: MpcSettings, *, authenticated: bool = False
) -> dict[str, Any]:
    """Plaintext, encrypted inference and encrypted training on one split; ``authenticated``:
    in the actively secure mode (:mod:`mpc.spdz2k`), every opening MAC-checked."""
    torch.set_num_threads(1)
    data = load(dataset_name, seed=settings.seed)
    initial = make_network(data, settings.seed)
    batches = [
        (data.x_train[i : i + settings.batch_size], data.y_train[i : i + settings.batch_size])
        for i in range(0, len(data.x_train), settings.batch_size)
    ]
    plain = copy.deepcopy(initial)
    start = time.perf_counter()
    for _ in range(settings.epochs):
        for x, y in batches:
            reference_step(plain, x, y, settings.lr)
    plain_seconds = time.perf_counter() - start
    with torch.no_grad():
        plain_output = plain(data.x_test)
    result: dict[str, Any] = {"dataset": dataset_name, "parties": parties, "transport": transport,
                              "mode": "authenticated" if authenticated else "semi-honest",
                              "epochs": settings.epochs, "plaintext": metric(data, plain_output),
                              "plaintext_seconds": plain_seconds}  # fmt: skip
    async with mpc_workers(parties, transport) as (workers, provider):
        session = spdz2k.Session(*workers, crypto_provider=provider) if authenticated else None

        async def shared(value: torch.Tensor) -> mpc.SharedTensor:
            if session is not None:
                return await session.share(value)
            return mpc.share(value, *workers, crypto_provider=provider)

        async def shared_module(model: nn.Sequential) -> mpc.SharedModule:
            if session is not None:
                return await session.share_module(model)
            return mpc.share_module(model, *workers, crypto_provider=provider)

        start = time.perf_counter()
        encrypted_model = await shared_module(plain)
        output = encrypted_model(await shared(data.x_test))
        inferred = await output.get()
        result |= {"inference": metric(data, inferred), "inference_seconds": time.perf_counter() - start,
                   "inference_rounds": output.depth,
                   "inference_max_error": float((inferred - plain_output).abs().max())}  # fmt: skip

        trainee = await shared_module(initial)
        shared_batches = [(await shared(x), await shared(y)) for x, y in batches]
        start = time.perf_counter()
        with tqdm(total=settings.epochs, unit="epoch", desc="encrypted training", leave=False) as bar:
            for _ in range(settings.epochs):
                outputs = [sgd_step(trainee, sx, sy, settings.lr) for sx, sy in shared_batches]
                await outputs[-1]
                if session is not None:
                    await session.verify()  # each epoch's openings checked as it ends
                bar.update(1)
        trained = await trainee.float_precision()
        result["training_seconds"] = time.perf_counter() - start
        with torch.no_grad():
            result["training"] = metric(data, trained(data.x_test))
    return result


def format_mpc_result(result: dict[str, Any]) -> str:
    regression = result["dataset"] == "boston"
    name = "test MSE" if regression else "test accuracy"

    def shown(value: float) -> str:
        return f"{value:.3f}" if regression else f"{100 * value:.1f}%"

    def change(value: float) -> str:
        return f"{100 * (value - result['plaintext']) / result['plaintext']:+.2f}%"

    lines = [
        f"{result['dataset']}, {result['parties']} parties + provider over {result['transport']}, "
        f"{result['epochs']} epochs, {result.get('mode', 'semi-honest')}",
        f"| | {name} | vs plaintext | seconds |",
        "| --- | ---: | ---: | ---: |",
        f"| plaintext training and inference | {shown(result['plaintext'])} | | "
        f"{result['plaintext_seconds']:.3f} |",
        f"| encrypted inference (plaintext-trained model) | {shown(result['inference'])} | "
        f"{change(result['inference'])} | {result['inference_seconds']:.3f} |",
        f"| encrypted training, then plaintext evaluation | {shown(result['training'])} | "
        f"{change(result['training'])} | {result['training_seconds']:.3f} |",
        f"\nencrypted inference: {result['inference_rounds']} rounds, largest output difference "
        f"{result['inference_max_error']:.2e} (fixed point, 16 fractional bits)",
    ]
    return "\n".join(lines)
