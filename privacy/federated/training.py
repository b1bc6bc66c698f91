"""Federated training in the paper's two styles, and the pure-PyTorch references they must match.

* **walk** (the paper's): one model visits the batches in order; for each batch it moves to that
  batch's worker (worker to worker, directly) and forward, loss, backward and the SGD step run
  there. Every step is a handful of pipelined commands: the leader never waits inside an epoch.
* **fedavg**: each worker trains E epochs on its shard as one remote job (``nn.fit``), all
  workers at once; the leader averages the returned states weighted by shard size.

What the leader receives is losses and parameters, nothing else: each owner published its
shard releasing model updates (:func:`~privacy.federated.data.publish_shard`), and the label
rules of the steps (:mod:`~privacy.federated.steps`, :mod:`~privacy.federated.releases`) say
which results those are.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import actors
from actors.log import get_logger
from actors.pointer import call, plan_route
from privacy.federated.data import FederatedDataLoader, FederatedDataset, Shard, epoch_plan, shard_order
from privacy.federated.steps import LOSSES, fit, flat_parameters, load_flat, spec_key
from protocol import WorkerLost
from protocol.modules import load_state, module_spec

Progress = Callable[[int, float], None]
_log = get_logger()


@dataclass(frozen=True)
class Settings:
    """One federated run (the experiments' defaults per dataset: ``runners.experiments.DEFAULTS``)."""

    epochs: int = 10
    lr: float = 0.001
    batch_size: int = 8
    seed: int = 0
    loss: str = "mse"
    hidden: tuple[int, ...] = (32, 24)


def make_model(n_features: int, hidden: tuple[int, ...] = (32, 24), seed: int = 0) -> nn.Sequential:
    """The paper's MLP: Linear-ReLU blocks and one output, seeded."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    width = n_features
    for size in hidden:
        layers += [nn.Linear(width, size), nn.ReLU()]
        width = size
    return nn.Sequential(*layers, nn.Linear(width, 1))


@dataclass
class History:
    epoch_loss: list[float] = field(default_factory=list)


def fusable(model: nn.Module) -> list[list[Any]] | None:
    """The spec of a model the fused walk can train: allowlisted layers, float32 parameters, no
    buffers (running statistics would not travel in the flat vector). ``None`` otherwise."""
    try:
        spec = module_spec(model)
    except TypeError:
        return None
    if any(True for _ in model.buffers()) or any(p.dtype != torch.float32 for p in model.parameters()):
        return None
    return spec


async def train_walk(
    model: nn.Module,
    loader: FederatedDataLoader,
    settings: Settings,
    progress: Progress | None = None,
    *,
    fused: bool | None = None,
) -> History:
    """The paper's style; ``model`` is trained in place and is local again at the end.

    ``fused`` (the default when the model allows it, see :func:`fusable`): the parameters walk as
    one flat vector and each step is one ``nn.sgd_step`` command. Otherwise the module's own
    forward runs here with pointer parameters, every operation a pipelined command. Both give
    the weights plain PyTorch gives.
    """
    spec = fusable(model) if fused is not False else None
    if fused and spec is None:
        raise TypeError("this model cannot take fused steps: see privacy.federated.fusable")
    if spec is not None:
        return await _walk_fused(model, spec, loader, settings, progress)
    loss_fn = LOSSES[settings.loss]
    actors.send_module(model, loader.dataset.workers[0])
    optimizer = actors.RemoteOptimizer(torch.optim.SGD, model.parameters(), lr=settings.lr)
    optimizer.zero_grad()

    def epoch_steps(epoch: int) -> _Epoch:
        sent = _Epoch()
        for worker, x, y in loader.epoch(epoch):
            actors.move_module(model, worker)  # no gradients to carry: each step drops them
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step(zero_grad=True)
            sent.add(worker, loss)  # after backward its graph is freed; the value stays
        return sent.ask_mean()

    history = await _epochs(settings.epochs, epoch_steps, progress, loader.dataset.workers)
    await actors.get_module(model)
    return history


async def _walk_fused(
    model: nn.Module, spec: list[list[Any]], loader: FederatedDataLoader, settings: Settings,
    progress: Progress | None,
) -> History:  # fmt: skip
    flat = actors.send(flat_parameters(model), loader.dataset.workers[0])
    key, options = spec_key(spec), {"loss": settings.loss, "lr": settings.lr}

    def epoch_steps(epoch: int) -> _Epoch:
        sent = _Epoch()
        steps = list(loader.epoch_rows(epoch))
        hops = plan_route(flat.location, [worker for worker, *_ in steps])  # the epoch's EXPECTs at once
        for (worker, x, y, rows), hop in zip(steps, hops, strict=True):
            flat.move(worker, announced=hop)  # one tensor, worker to worker; nothing when already there
            sent.add(worker, call(worker, "nn.sgd_step", [key, flat, x, y], {**options, "rows": rows}))
        return sent.ask_mean()

    history = await _epochs(settings.epochs, epoch_steps, progress, loader.dataset.workers)
    load_flat(model, await flat.get())
    return history


async def _epochs(
    epochs: int,
    epoch_steps: Callable[[int], _Epoch],
    progress: Progress | None,
    workers: list[actors.RemoteWorker],
) -> History:
    """Send each epoch's steps while the workers still run the previous one, then wait for that
    one's loss: the workers never sit idle at an epoch's end waiting for the leader's next
    burst, and at most two epochs are in flight. A failed step ends the walk with its error,
    once every step sent has answered (they would fail alike, and each unheard failure would
    be logged as never retrieved)."""
    history = History()
    pending: list[_Epoch] = []  # epochs whose loss is not in yet, oldest first

    async def settle(keep: int) -> None:
        while len(pending) > keep:
            history.epoch_loss.append(await pending[0].mean())
            pending.pop(0)
            if progress is not None:
                progress(len(history.epoch_loss), history.epoch_loss[-1])

    try:
        for epoch in range(epochs):
            pending.append(epoch_steps(epoch))
            await asyncio.sleep(0)  # the burst leaves now, before this process waits
            await settle(keep=1)
        await settle(keep=0)
    except Exception as exc:
        with contextlib.suppress(TimeoutError):  # one deadline for all of them, not one each
            async with asyncio.timeout(HEAR_OUT_TIMEOUT):
                for sent in pending:
                    await sent.hear_out()
        lost = next((w.connection.lost for w in workers if w.connection.lost is not None), None)
        if lost is not None and lost is not exc:  # a worker died: say which, not what it broke
            raise lost from exc
        raise
    return history


#: Seconds a failed walk waits, in all, for its other steps' answers before raising its error.
HEAR_OUT_TIMEOUT = 0.5


class _Epoch:
    """One epoch's steps, sent: their loss pointers per worker, in visiting order."""

    def __init__(self) -> None:
        self.losses: dict[actors.RemoteWorker, list[actors.PointerTensor]] = {}
        self.order: list[tuple[actors.RemoteWorker, int]] = []
        self._stacks: list[asyncio.Future[Any]] = []

    def add(self, worker: actors.RemoteWorker, loss: actors.PointerTensor) -> None:
        mine = self.losses.setdefault(worker, [])
        self.order.append((worker, len(mine)))
        mine.append(loss)

    def ask_mean(self) -> _Epoch:
        """Each worker stacks its own losses and one small tensor per worker will come back;
        the requests leave now, right behind the epoch's steps."""
        self._stacks = [torch.stack(losses).get() for losses in self.losses.values()]
        for stack in self._stacks:  # the first failure is raised by mean(); the rest are alike
            stack.add_done_callback(_retrieve)
        return self

    async def mean(self) -> float:
        """The mean loss in visiting order: the very float plain PyTorch computes."""
        by_worker = dict(zip(self.losses, await asyncio.gather(*self._stacks), strict=True))
        return float(torch.stack([by_worker[worker][i] for worker, i in self.order]).detach().mean())

    async def hear_out(self) -> None:
        """Wait for every step's answer, failures included, and take them as retrieved (the
        caller bounds the wait: the walk's error must not wait for a step that never answers)."""
        steps = [loss.resolve() for losses in self.losses.values() for loss in losses]
        await asyncio.gather(*steps, return_exceptions=True)


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


async def train_fedavg(
    model: nn.Module,
    dataset: FederatedDataset,
    settings: Settings,
    rounds: int,
    progress: Progress | None = None,
    *,
    min_workers: int | None = None,
) -> History:
    """FedAvg: ``rounds`` rounds of ``settings.epochs`` local epochs per worker, run as jobs.

    A lost worker stops the run, unless ``min_workers`` is given (Flower's ``min_fit_clients``
    with ``accept_failures``): then the round goes on with the workers that answered, weighted
    by their shard sizes, and later rounds leave the lost one out, as long as at least that
    many remain. Any other failure stops the run.
    """
    spec = module_spec(model)
    state = [t.detach().clone() for t in model.state_dict().values()]
    active = list(range(len(dataset.shards)))  # by index: each keeps its seed when others leave
    history = History()
    for r in range(rounds):
        shards = [dataset.shards[k] for k in active]
        jobs = [
            _job(shard, [spec, state, shard.x, shard.y], _job_options(settings, r, k))
            for k, shard in zip(active, shards, strict=True)
        ]
        outcomes = await asyncio.gather(*jobs, return_exceptions=True)
        answered = []
        for k, shard, outcome in zip(active, shards, outcomes, strict=True):
            if not isinstance(outcome, BaseException):
                answered.append((k, shard.size, outcome))
            elif isinstance(outcome, WorkerLost) and min_workers is not None:
                _log.warning("worker left", worker=shard.worker.id, round=r, error=str(outcome))
            else:
                raise outcome
        active = [k for k, _, _ in answered]
        if len(active) < (min_workers or 0):
            lost = next(o for o in outcomes if isinstance(o, BaseException))
            raise WorkerLost(
                f"round {r}: {len(active)} worker(s) left, fewer than the {min_workers} required ({lost})"
            ) from lost
        total = sum(size for _, size, _ in answered)
        weights = [size / total for _, size, _ in answered]
        state = _average([result[0] for _, _, result in answered], weights)
        losses = [result[1] for _, _, result in answered]
        history.epoch_loss.append(sum(w * loss for w, loss in zip(weights, losses, strict=True)))
        if progress is not None:
            progress(r + 1, history.epoch_loss[-1])
    load_state(model, state)
    return history


async def _job(shard: Shard, args: list[Any], options: dict[str, object]) -> Any:
    """One worker's round; a worker already known lost fails here like one lost meanwhile."""
    return await call(shard.worker, "nn.fit", args, options).get()


def _job_options(settings: Settings, round_: int, shard: int) -> dict[str, object]:
    return {
        "loss": settings.loss,
        "lr": settings.lr,
        "epochs": settings.epochs,
        "batch_size": settings.batch_size,
        "seed": settings.seed * 1_000_003 + round_ * 1_009 + shard,
    }


def _average(states: list[list[torch.Tensor]], weights: list[float]) -> list[torch.Tensor]:
    """Weighted mean of each floating-point state tensor; counters (BatchNorm's) from the first."""
    averaged = []
    for tensors in zip(*states, strict=True):
        if tensors[0].is_floating_point():
            averaged.append(sum(w * t for w, t in zip(weights, tensors, strict=True)))
        else:
            averaged.append(tensors[0].clone())
    return averaged


# -- references: the same computations in plain PyTorch, one process --------------------------
def reference_walk(
    model: nn.Module,
    shards: list[tuple[torch.Tensor, torch.Tensor]],
    settings: Settings,
    *,
    shuffle: bool = True,
) -> History:
    """What :func:`train_walk` computes, with the shards in hand and ``torch.optim.SGD``."""
    loss_fn = LOSSES[settings.loss]
    optimizer = torch.optim.SGD(model.parameters(), lr=settings.lr)
    sizes = [len(x) for x, _ in shards]
    history = History()
    for epoch in range(settings.epochs):
        ordered = []
        for k, (x, y) in enumerate(shards):
            order = shard_order(len(x), k, epoch, seed=settings.seed, shuffle=shuffle)
            ordered.append((x[order], y[order]))
        losses = []
        for k, rows in epoch_plan(sizes, settings.batch_size):
            x, y = ordered[k]
            optimizer.zero_grad()
            loss = loss_fn(model(x[rows]), y[rows])
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
        history.epoch_loss.append(float(torch.stack(losses).mean()))
    return history


def reference_fedavg(
    model: nn.Module, shards: list[tuple[torch.Tensor, torch.Tensor]], settings: Settings, rounds: int
) -> None:
    """What :func:`train_fedavg` computes, in this process."""
    spec = module_spec(model)
    state = [t.detach().clone() for t in model.state_dict().values()]
    total = sum(len(x) for x, _ in shards)
    for r in range(rounds):
        results = [fit(spec, state, x, y, **_job_options(settings, r, k)) for k, (x, y) in enumerate(shards)]
        state = _average([result[0] for result in results], [len(x) / total for x, _ in shards])
    load_state(model, state)
