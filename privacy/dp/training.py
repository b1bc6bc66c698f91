"""Federated DP-SGD with the paper's sampling: each step the leader picks a worker at random,
and that worker samples a lot of expected size L from its own N_w examples (rate L / N_w).

The model walks as one flat vector (as the fused walk does) and each step is one ``dp.sgd_step``
on the chosen worker, which charges its owner's ledger. The leader knows which worker served
each step, so the random choice gives no amplification against it: each owner accounts exactly
the lots it served, at its own rate (``../shared/notes/dp.md``). When an owner refuses a lot
(``BudgetExhausted``), training stops there, or, with ``keep_going``, goes on with the others.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import actors
from actors.pointer import call, plan_route
from privacy.federated.data import FederatedDataset
from privacy.federated.steps import flat_parameters, load_flat, spec_key
from privacy.federated.training import fusable
from protocol import BudgetExhausted


@dataclass(frozen=True)
class DpSettings:
    """One DP-SGD run: expected lot size, clip norm, noise multiplier, learning rate, steps."""

    lot: int = 8
    clip: float = 1.0
    sigma: float = 1.0
    lr: float = 0.05
    steps: int = 100
    loss: str = "mse"
    seed: int = 0


@dataclass
class DpHistory:
    steps_done: int = 0
    #: Owners that refused a lot (their budget spent), in the order they did.
    refused: list[str] = field(default_factory=list)


def schedule(workers: int, steps: int, seed: int) -> list[int]:
    """The leader's choice of worker for each step. It is public and independent of the data,
    so it can be drawn ahead: each owner may then calibrate its noise for exactly the lots it
    will serve (``schedule(...).count(w)``) instead of for a guess with slack."""
    chooser = random.Random(seed)
    return [chooser.randrange(workers) for _ in range(steps)]


async def train_dp(
    model: nn.Module,
    dataset: FederatedDataset,
    settings: DpSettings,
    progress: Callable[[int], None] | None = None,
    *,
    keep_going: bool = False,
    burst: int = 64,
    sigmas: Mapping[str, float] | None = None,
    snapshot: Callable[[int, torch.Tensor], None] | None = None,
) -> DpHistory:
    """Train ``model`` in place; it is local again at the end. Steps are sent in bursts of
    ``burst`` (the workers never wait for the leader inside one). The worker of step ``i`` is
    ``schedule(n_workers, settings.steps, settings.seed)[i]`` (once an owner has refused, with
    ``keep_going``, its steps go to one of the others at random). ``sigmas`` gives an owner
    (by worker id) a noise multiplier of its own, ``settings.sigma`` being everyone else's.
    ``snapshot(steps_done, parameters)`` sees a copy of the flat parameters after each burst
    (sanitized, so they may leave), for training curves; it costs one round trip per burst."""
    spec = fusable(model)
    if spec is None:
        raise TypeError("DP-SGD takes a model of allowlisted layers with float32 parameters")
    key = spec_key(spec)
    everyone = list(dataset.shards)
    picks = schedule(len(everyone), settings.steps, settings.seed)
    chooser = random.Random(settings.seed + 1)  # who takes a refused owner's steps: public too
    shards = list(everyone)
    flat = actors.send(flat_parameters(model), shards[0].worker)
    options = {"lot": float(settings.lot), "clip": settings.clip, "lr": settings.lr, "loss": settings.loss}
    sigmas = sigmas or {}
    history = DpHistory()
    done = 0
    while done < settings.steps and shards:
        count = min(burst, settings.steps - done)
        chosen = [everyone[i] for i in picks[done : done + count]]
        chosen = [shard if shard in shards else chooser.choice(shards) for shard in chosen]
        hops = plan_route(flat.location, [shard.worker for shard in chosen])
        steps = []
        for shard, hop in zip(chosen, hops, strict=True):
            flat.move(shard.worker, announced=hop)
            noise = {"sigma": sigmas.get(shard.worker.id, settings.sigma)}
            step = call(shard.worker, "dp.sgd_step", [key, flat, shard.x, shard.y], options | noise)
            steps.append((shard, step))
        outcomes = await _outcomes(steps)
        for (shard, _), outcome in zip(steps, outcomes, strict=True):
            if isinstance(outcome, BudgetExhausted):
                if not keep_going:
                    raise outcome
                if shard in shards:
                    shards.remove(shard)
                    history.refused.append(shard.worker.id)
            elif isinstance(outcome, BaseException):
                raise outcome
            else:
                done += 1
        history.steps_done = done
        if snapshot is not None:
            snapshot(done, await flat.clone().get())
        if progress is not None:
            progress(done)
    load_flat(model, await flat.get())
    return history


async def _outcomes(steps: list[tuple[Any, actors.PointerTensor]]) -> list[BaseException | None]:
    """Each step's failure, or ``None``, asking each worker once: a worker answers in order,
    so once its last step of the burst has answered, the reports of the earlier ones are in."""
    last: dict[actors.RemoteWorker, actors.PointerTensor] = {}
    for _, step in steps:
        last[step.location] = step
    answers = await asyncio.gather(*(step.resolve() for step in last.values()), return_exceptions=True)
    finals = {step.location: answer for step, answer in zip(last.values(), answers, strict=True)}
    outcomes: list[BaseException | None] = []
    for _, step in steps:
        if step is last[step.location]:
            answer = finals[step.location]
            outcomes.append(answer if isinstance(answer, BaseException) else None)
        else:
            outcomes.append(step.location.connection.take_failure(step.id))
    return outcomes
