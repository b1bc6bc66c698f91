"""PATE across workers, the leader's half: ask every owner for noisy labels, combine, train a student.

Each owner trains its teachers and answers with its own noisy aggregator
(:mod:`privacy.pate.workers`); the leader sees only the labels each owner released under its
``Sanitized`` budget. Combining them is post-processing of sanitized releases, so it costs no
privacy: each owner's ledger already accounts for everything that left it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import actors
from actors.pointer import call
from privacy.federated.data import Shard
from privacy.federated.steps import spec_key
from privacy.pate.aggregation import UNANSWERED
from protocol.modules import module_spec


@dataclass(frozen=True)
class TeacherSettings:
    """How each owner trains its teachers (the same on every owner; each uses its own seed)."""

    teachers: int = 5
    epochs: int = 20
    lr: float = 0.1
    loss: str = "bce_logits"
    batch_size: int = 8
    seed: int = 0


async def owner_labels(
    shard: Shard,
    key: str,
    queries: torch.Tensor,
    *,
    teachers: TeacherSettings,
    seed: int,
    aggregator: dict[str, Any],
) -> torch.Tensor:
    """One owner: train its teachers on its published shard, then get its noisy labels."""
    worker = shard.worker
    ensemble = call(
        worker,
        "pate.train_teachers",
        [key, shard.x, shard.y],
        {
            "teachers": teachers.teachers,
            "epochs": teachers.epochs,
            "lr": teachers.lr,
            "loss": teachers.loss,
            "seed": seed,
            "batch_size": teachers.batch_size,
        },
    )
    sent = actors.send(queries, worker)
    labels = call(worker, "pate.answer", [key, ensemble, sent], aggregator)
    return await labels.get()


def combine(answers: Sequence[torch.Tensor], weights: Sequence[float], n_classes: int) -> torch.Tensor:
    """Student labels from the owners' answers: each owner's label counts with its weight (its
    number of teachers), a query keeps the label with the largest total weight, and is dropped
    (``UNANSWERED``) on a tie or when no owner answered it. Post-processing of sanitized labels."""
    if not answers:
        raise ValueError("no answers to combine")
    tally = torch.zeros(len(answers[0]), n_classes, dtype=torch.float64)
    for labels, weight in zip(answers, weights, strict=True):
        given = labels != UNANSWERED
        tally[given] += torch.nn.functional.one_hot(labels[given], n_classes).to(torch.float64) * weight
    best = tally.max(dim=1)
    ties = (tally == best.values[:, None]).sum(dim=1) > 1
    combined = best.indices.clone()
    combined[ties | (best.values == 0)] = UNANSWERED
    return combined


async def pate_labels(
    shards: Sequence[Shard],
    queries: torch.Tensor,
    model: nn.Module,
    *,
    mechanism: str,
    n_classes: int = 2,
    teachers: TeacherSettings | None = None,
    sigma: float | None = None,
    gamma: float | None = None,
    threshold: float | None = None,
    sigma1: float | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Noisy labels for ``queries`` from every owner concurrently, and their combination.

    ``model`` gives the teachers' architecture (any allowlisted layers). Returns ``(labels,
    answers)``: the combined student labels and each owner's own answers, in ``shards`` order.
    An owner over budget raises ``BudgetExhausted`` before any of its labels exists.
    """
    teachers = teachers or TeacherSettings()
    key = spec_key(module_spec(model))
    aggregator: dict[str, Any] = {"mechanism": mechanism, "n_classes": n_classes}
    for name, value in (("sigma", sigma), ("gamma", gamma), ("threshold", threshold), ("sigma1", sigma1)):
        if value is not None:
            aggregator[name] = value
    answers = await asyncio.gather(
        *(
            owner_labels(
                shard, key, queries, teachers=teachers, seed=teachers.seed + 7919 * k, aggregator=aggregator
            )
            for k, shard in enumerate(shards)
        )
    )
    labels = combine(answers, [teachers.teachers] * len(answers), n_classes)
    return labels, list(answers)


def train_student(
    model: nn.Module,
    x: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: int = 200,
    lr: float = 0.05,
    seed: int = 0,
) -> nn.Module:
    """Train ``model`` (plain local PyTorch) on the answered queries with their labels.

    One output: logistic loss on the label as a 0/1 target; several: cross-entropy. Full-batch
    Adam, deterministic given ``seed`` (queries are few: PATE pays per query)."""
    keep = labels != UNANSWERED
    x, labels = x[keep], labels[keep]
    if not len(x):
        return model
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(epochs):
        optimizer.zero_grad()
        out = model(x)
        if out.shape[-1] == 1:
            loss = nn.functional.binary_cross_entropy_with_logits(out.reshape(-1), labels.to(out.dtype))
        else:
            loss = nn.functional.cross_entropy(out, labels)
        loss.backward()
        optimizer.step()
    return model


__all__ = ["TeacherSettings", "combine", "owner_labels", "pate_labels", "train_student"]
