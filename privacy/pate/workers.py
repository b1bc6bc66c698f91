"""PATE where the data is: each owner trains its own teachers and is the noisy aggregator of them.

There is no trusted aggregator. An owner's worker trains ``teachers`` models on disjoint
partitions of the data it published (:func:`train_teachers`), and answers the leader's public
queries with a noisy argmax of their votes (:func:`answer`), charging its own ledger before any
noise is drawn. Nothing but noisy labels ever leaves an owner, and each owner's ledger accounts
for exactly what it released; combining several owners' labels is post-processing
(:mod:`privacy.pate.training`).

Data-independent charges, per query (one record is in one partition, so it changes one
teacher's vote: two counts of the histogram by one each):

* GNMax: the Gaussian mechanism on the histogram, L2 sensitivity sqrt(2), noise sigma: a
  Gaussian event of noise multiplier ``sigma / sqrt(2)`` (RDP ``alpha / sigma^2``);
* Confident-GNMax: the threshold check on the max count (sensitivity 1): a Gaussian of
  ``sigma1``; plus the answer, charged for every query (whether it is answered depends on the
  data, so charging only answered ones would need the data-dependent analysis);
* LNMax: the Laplace mechanism, L1 sensitivity 2, scale ``1 / gamma``: a Laplace event of noise
  multiplier ``1 / (2 gamma)``, epsilon ``2 gamma`` per query.

The owner also keeps its own votes (``ctx.state["pate.answers"]``) for its private, data-dependent
bookkeeping (:func:`owner_epsilon`); that figure is a function of the private votes and is never
released by this module.
"""

from __future__ import annotations

import json
import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from actors.context import Context
from actors.policy import RAW
from actors.registry import Declassify, command
from privacy.dp.ledger import Plan
from privacy.dp.release import SANITIZED
from privacy.dp.sgd import charge, check_rows, generator_for
from privacy.federated.steps import LOSSES, flat_parameters, load_flat
from privacy.pate import analysis
from privacy.pate.aggregation import UNANSWERED, confident_gnmax, gnmax, laplace_noisy_max, teacher_votes
from protocol.errors import BadArguments
from protocol.modules import build_module

#: The PATE command set (``aiosyft worker --enable pate``).
COMMAND_SET = "pate"
#: Aggregators :func:`answer` runs, by the name the leader gives.
MECHANISMS = ("gnmax", "confident", "lnmax")
#: Where a worker keeps the ensembles it trained (by object identity) and its own answers.
TEACHERS = "pate.teachers"
ANSWERS = "pate.answers"


@dataclass(frozen=True)
class Ensemble:
    """What the owner remembers of an ensemble it trained: the tensor it returned (weakly: the
    leader's pointer decides its lifetime), its own copy of the parameters (so that an in-place
    write through the leader's pointer changes nothing it answers with), and the model spec."""

    ref: weakref.ReferenceType[torch.Tensor]
    kept: torch.Tensor
    spec: str
    partitions: tuple[int, ...]


def _init(model: nn.Module, generator: torch.Generator) -> None:
    """PyTorch's default initialization of dense and convolutional layers (uniform within
    ``1 / sqrt(fan_in)``), drawn from ``generator``: deterministic given the seed, and without
    touching torch's global generator (this runs in a job thread beside other commands)."""
    with torch.no_grad():
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if not isinstance(weight, nn.Parameter) or weight.dim() < 2:
                continue
            bound = 1.0 / math.sqrt(weight[0].numel())
            weight.uniform_(-bound, bound, generator=generator)
            bias = getattr(module, "bias", None)
            if isinstance(bias, nn.Parameter):
                bias.uniform_(-bound, bound, generator=generator)


def partitions(rows: int, teachers: int, seed: int) -> list[torch.Tensor]:
    """The disjoint partitions of ``rows`` records, one per teacher: a seeded permutation cut into
    near-equal parts. Disjointness is what makes one record move at most one teacher's vote."""
    order = torch.randperm(rows, generator=torch.Generator().manual_seed(seed))
    return list(order.tensor_split(teachers))


def train_one(
    spec: str,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    loss: str,
    seed: int,
    batch_size: int,
) -> torch.Tensor:
    """One teacher: a fresh model of ``spec`` (seeded), mini-batch SGD on ``(x, y)``, flat parameters.

    Public so that a test (or an owner) can reproduce a teacher exactly outside the worker."""
    model = build_module(json.loads(spec))
    generator = torch.Generator().manual_seed(seed)
    _init(model, generator)
    loss_fn = LOSSES[loss]
    target = y.reshape(-1).long() if loss == "cross_entropy" else y
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(epochs):
        for batch in torch.randperm(len(x), generator=generator).split(batch_size):
            optimizer.zero_grad()
            loss_fn(model(x[batch]), target[batch]).backward()
            optimizer.step()
    return flat_parameters(model)


def teacher_seed(seed: int, teacher: int) -> int:
    """Teacher ``teacher``'s own seed: distinct per teacher, reproducible from the run's seed."""
    return seed * 1_000_003 + teacher + 1


@command("pate.train_teachers", command_set=COMMAND_SET, kind="job")
def train_teachers(
    ctx: Context,
    spec: str,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    teachers: int,
    epochs: int,
    lr: float,
    loss: str,
    seed: int,
    batch_size: int = 8,
) -> torch.Tensor:
    """Train ``teachers`` models on disjoint partitions of this worker's published ``(x, y)``.

    Returns their flat parameters, ``[teachers, numel]``. No label rule: the result is raw data
    of the owner and never leaves; only :func:`answer` turns it into noisy labels. The data must
    be the published tensors themselves: a tensor the leader derived (rows mixed from many
    records) would let one record move many teachers, and the analysis assumes one.
    """
    if not isinstance(spec, str):
        raise BadArguments(
            "pate.train_teachers takes the model spec as its JSON key (privacy.federated.spec_key)"
        )
    if loss not in LOSSES:
        raise BadArguments(f"unknown loss {loss!r}; known: {', '.join(LOSSES)}")
    if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and len(x) == len(y) > 0):
        raise BadArguments("x and y must be tensors with the same positive number of rows")
    if not (isinstance(teachers, int) and 1 <= teachers <= len(x)):
        raise BadArguments(f"teachers must be between 1 and the {len(x)} rows (each needs a record)")
    if not (
        isinstance(epochs, int) and epochs >= 1 and lr > 0 and isinstance(batch_size, int) and batch_size >= 1
    ):
        raise BadArguments("need epochs >= 1, lr > 0 and batch_size >= 1")
    check_rows(ctx, x, y, "pate.train_teachers")
    parts = partitions(len(x), teachers, seed)
    flats = [
        train_one(
            spec,
            x[part],
            y[part],
            epochs=epochs,
            lr=lr,
            loss=loss,
            seed=teacher_seed(seed, t),
            batch_size=batch_size,
        )
        for t, part in enumerate(parts)
    ]
    ensemble = torch.stack(flats)
    known: dict[int, Ensemble] = ctx.state.setdefault(TEACHERS, {})
    key = id(ensemble)
    known[key] = Ensemble(weakref.ref(ensemble), ensemble.clone(), spec, tuple(len(p) for p in parts))
    weakref.finalize(ensemble, known.pop, key, None)
    return ensemble


def predictions(spec: str, ensemble: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """Each teacher's class for each query, ``[teachers, queries]``: with one output, the sign
    of the logit (class 1 when it is positive); with several, their argmax."""
    model = build_module(json.loads(spec))
    rows = []
    with torch.no_grad():
        for flat in ensemble:
            load_flat(model, flat)
            out = model(queries)
            rows.append((out.reshape(-1) > 0).long() if out.shape[-1] == 1 else out.argmax(dim=-1))
    return torch.stack(rows)


def charges(
    mechanism: str,
    queries: int,
    *,
    sigma: float | None = None,
    gamma: float | None = None,
    sigma1: float | None = None,
) -> list[tuple[Plan, int]]:
    """The data-independent ledger entries for answering ``queries`` queries (module docstring)."""
    if mechanism == "gnmax":
        assert sigma is not None
        return [(Plan(1.0, sigma / math.sqrt(2.0)), queries)]
    if mechanism == "confident":
        assert sigma is not None and sigma1 is not None
        return [(Plan(1.0, sigma1), queries), (Plan(1.0, sigma / math.sqrt(2.0)), queries)]
    if mechanism == "lnmax":
        assert gamma is not None
        return [(Plan(1.0, 1.0 / (2.0 * gamma), "laplace"), queries)]
    raise BadArguments(f"unknown mechanism {mechanism!r}; known: {', '.join(MECHANISMS)}")


def _parameters(mechanism: str, sigma: Any, gamma: Any, threshold: Any, sigma1: Any) -> dict[str, float]:
    """The mechanism's parameters, each a positive finite number where one is needed."""
    needed = {"gnmax": ("sigma",), "confident": ("sigma", "threshold", "sigma1"), "lnmax": ("gamma",)}
    if mechanism not in needed:
        raise BadArguments(f"unknown mechanism {mechanism!r}; known: {', '.join(MECHANISMS)}")
    given = {"sigma": sigma, "gamma": gamma, "threshold": threshold, "sigma1": sigma1}
    values: dict[str, float] = {}
    for name in needed[mechanism]:
        value = given[name]
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise BadArguments(f"{mechanism} needs {name}, a finite number")
        if name != "threshold" and not value > 0:
            raise BadArguments(f"{mechanism} needs {name} > 0, got {value}")
        values[name] = float(value)
    return values


@command("pate.answer", command_set=COMMAND_SET, labels=Declassify(data=(1,), mapping={RAW: SANITIZED}))
def answer(
    ctx: Context,
    spec: str,
    ensemble: torch.Tensor,
    queries: torch.Tensor,
    *,
    mechanism: str,
    n_classes: int,
    sigma: float | None = None,
    gamma: float | None = None,
    threshold: float | None = None,
    sigma1: float | None = None,
) -> torch.Tensor:
    """Noisy labels for ``queries`` from an ensemble this worker trained: int64, ``UNANSWERED``
    (-1) where Confident-GNMax declined.

    Everything is checked before anything is computed, and the owner's ledger is charged for all
    the queries before any noise is drawn; a refusal (``BadArguments``, ``BudgetExhausted``)
    leaves nothing charged. The label rule turns the ensemble's raw taint into *sanitized* (the
    labels may leave under the owner's ``Sanitized`` release); the queries keep their own label,
    so queries derived from the owner's data give labels that stay here.
    """
    known: dict[int, Ensemble] = ctx.state.get(TEACHERS, {})
    record = known.get(id(ensemble))
    if record is None or record.ref() is not ensemble:
        raise BadArguments(
            "pate.answer takes an ensemble pate.train_teachers trained on this worker (the very "
            "result it returned), not a tensor derived from the data or made elsewhere: the analysis "
            "assumes teachers trained on disjoint partitions"
        )
    if spec != record.spec:
        raise BadArguments("the spec is not the one the ensemble was trained with")
    if not torch.equal(ensemble, record.kept):
        raise BadArguments(
            "the ensemble was changed since it was trained: its teachers are no longer the owner's"
        )
    if not (isinstance(n_classes, int) and not isinstance(n_classes, bool) and n_classes >= 2):
        raise BadArguments("n_classes must be an integer of at least 2")
    parameters = _parameters(mechanism, sigma, gamma, threshold, sigma1)
    if not (isinstance(queries, torch.Tensor) and queries.dim() >= 2 and len(queries) > 0):
        raise BadArguments("queries must be a tensor of at least one row of features")
    try:
        votes_of = predictions(spec, record.kept, queries.to(record.kept.dtype))
    except RuntimeError as exc:  # the queries' shape does not fit the model's input
        raise BadArguments(f"the queries do not fit the model: {exc}") from None
    if int(votes_of.max()) >= n_classes:
        raise BadArguments(f"the model predicts classes beyond n_classes={n_classes}")
    votes = teacher_votes(votes_of, n_classes)
    # Charged before the noise exists: over budget, nothing below runs.
    charge(ctx, *charges(mechanism, len(queries), sigma=sigma, gamma=gamma, sigma1=sigma1))
    generator = generator_for(ctx)
    answered = None
    if mechanism == "gnmax":
        labels = gnmax(votes, parameters["sigma"], generator)
    elif mechanism == "lnmax":
        labels = laplace_noisy_max(votes, parameters["gamma"], generator)
    else:
        labels, answered = confident_gnmax(
            votes, parameters["threshold"], parameters["sigma1"], parameters["sigma"], generator
        )
    ctx.state.setdefault(ANSWERS, []).append(
        {"mechanism": mechanism, "votes": votes, "answered": answered, **parameters}
    )
    return labels


def owner_epsilon(records: Sequence[dict[str, Any]], delta: float) -> float:
    """The owner's data-dependent epsilon for the answers it gave (``state["pate.answers"]``).

    A function of the private votes: for the owner's own bookkeeping (is the budget really
    spent? may it answer more?), never for publication as it is ([P18] Section 4.2). RDP curves
    are summed over all answers and converted once with the improved conversion, as the
    ledger's accountant does, so the two figures compare. LNMax log moments ``alpha(l)`` are RDP
    ``alpha(l) / l`` at order ``l + 1``; with any LNMax answer every curve is taken at those orders.
    """
    if not records:
        return 0.0
    laplace = any(r["mechanism"] == "lnmax" for r in records)
    orders = analysis.DEFAULT_MOMENTS + 1.0 if laplace else analysis.DEFAULT_ORDERS
    total = np.zeros_like(orders)
    for r in records:
        if r["mechanism"] == "gnmax":
            total += analysis.gnmax_rdp(r["votes"], r["sigma"], orders)
        elif r["mechanism"] == "confident":
            total += analysis.confident_gnmax_rdp(
                r["votes"], r["threshold"], r["sigma1"], r["sigma"], orders, answered=r["answered"]
            )
        else:
            moments = orders - 1.0
            total += analysis.lnmax_log_moments(r["votes"], r["gamma"], moments) / moments
    return analysis.rdp_to_epsilon(orders, total, delta, conversion="improved")[0]


__all__ = [
    "ANSWERS",
    "COMMAND_SET",
    "MECHANISMS",
    "TEACHERS",
    "UNANSWERED",
    "answer",
    "charges",
    "owner_epsilon",
    "partitions",
    "predictions",
    "teacher_seed",
    "train_one",
    "train_teachers",
]
