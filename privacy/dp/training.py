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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

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


async def train_dp(
    model: nn.Module,
    dataset: FederatedDataset,
    settings: DpSettings,
    progress: Callable[[int], None] | None = None,
    *,
    keep_going: bool = False,
    burst: int = 64,
) -> DpHistory:
    """Train ``model`` in place; it is local again at the end. Steps are sent in bursts of
    ``burst`` (the workers never wait for the leader inside one)."""
    spec = fusable(model)
    if spec is None:
        raise TypeError("DP-SGD takes a model of allowlisted layers with float32 parameters")
    key = spec_key(spec)
    chooser = random.Random(settings.seed)  # the leader's choice of worker: public, data-independent
    shards = list(dataset.shards)
    flat = actors.send(flat_parameters(model), shards[0].worker)
    options = {"lot": float(settings.lot), "clip": settings.clip, "sigma": settings.sigma, "lr": settings.lr,
               "loss": settings.loss}  # fmt: skip
    history = DpHistory()
    done = 0
    while done < settings.steps and shards:
        count = min(burst, settings.steps - done)
        picks = [chooser.choice(shards) for _ in range(count)]
        hops = plan_route(flat.location, [shard.worker for shard in picks])
        steps = []
        for shard, hop in zip(picks, hops, strict=True):
            flat.move(shard.worker, announced=hop)
            steps.append((shard, call(shard.worker, "dp.sgd_step", [key, flat, shard.x, shard.y], options)))
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
