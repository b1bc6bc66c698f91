"""``aiosyft pate``: PATE across workers on Pima, each owner the noisy aggregator of its own teachers.

The training part of Pima is split into the owners' private shards and a public, unlabeled part the
leader keeps (its labels are used only to report how right the noisy labels were). Each owner
(a virtual worker publishing its shard under a ``Sanitized`` budget) trains its teachers and
answers the leader's public queries with LNMax, GNMax or Confident-GNMax, charging its ledger
first; the leader combines the owners' labels (post-processing) and trains a student on them,
reported beside a non-private model trained on all the owners' data and the majority class.

The leader asks as many public queries as every owner's budget pays for at the chosen noise
(data-independent accounting); more would be refused (``BudgetExhausted``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

import actors
from privacy.dp import Ledger, Sanitized
from privacy.federated import FederatedDataset, publish_shard
from privacy.pate import UNANSWERED
from privacy.pate.training import TeacherSettings, pate_labels, train_student
from privacy.pate.workers import ANSWERS, charges, owner_epsilon
from protocol import BudgetExhausted
from runners.datasets import load

DELTA = 1e-5
#: Each mechanism's noise when not given. Data-independently a query costs the same whatever the
#: votes, so at a few epsilon an owner pays for only a few dozen queries at noise of ~10 votes;
#: 25 teachers per owner (about 9 Pima rows each) make the vote gaps that noise leaves readable.
DEFAULT_NOISE: dict[str, dict[str, float]] = {
    "gnmax": {"sigma": 10.0},
    "confident": {"sigma": 8.0, "threshold": 10.0, "sigma1": 8.0},
    "lnmax": {"gamma": 0.05},
}


@dataclass(frozen=True)
class PateSettings:
    mechanism: str = "confident"
    workers: int = 2
    teachers: int = 25
    epsilon: float = 4.0
    sigma: float | None = None
    threshold: float | None = None
    sigma1: float | None = None
    gamma: float | None = None
    public_fraction: float = 0.25
    max_queries: int | None = None
    seed: int = 0

    def noise(self) -> dict[str, float]:
        """The aggregator's parameters: the given ones, else :data:`DEFAULT_NOISE`'s."""
        given = {"sigma": self.sigma, "threshold": self.threshold, "sigma1": self.sigma1, "gamma": self.gamma}
        defaults = DEFAULT_NOISE[self.mechanism]
        return {name: given[name] if given[name] is not None else value for name, value in defaults.items()}


def affordable(settings: PateSettings, limit: int) -> int:
    """How many queries (at most ``limit``) one owner's budget pays for, data-independently: the
    largest n whose charges fit a fresh ledger."""
    noise = settings.noise()
    per_query = {"sigma": noise.get("sigma"), "gamma": noise.get("gamma"), "sigma1": noise.get("sigma1")}
    ledger = Ledger("owner/budget", settings.epsilon, DELTA)
    return ledger.largest(lambda n: charges(settings.mechanism, n, **per_query), limit)


def _model(features: int, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(features, 1))


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float(((model(x).reshape(-1) > 0).long() == y.reshape(-1).long()).float().mean())


async def pate_command(settings: PateSettings, directory: str | None = None) -> dict[str, Any]:
    """Run the experiment; returns its figures (see the module docstring)."""
    data = load("pima", directory, seed=settings.seed)
    n_public = math.ceil(len(data.x_train) * settings.public_fraction)
    public_x, public_y = data.x_train[:n_public], data.y_train[:n_public]
    private_x, private_y = data.x_train[n_public:], data.y_train[n_public:]
    shards = list(
        zip(private_x.tensor_split(settings.workers), private_y.tensor_split(settings.workers), strict=True)
    )
    features = data.x_train.shape[1]
    limit = n_public if settings.max_queries is None else min(n_public, settings.max_queries)
    n_queries = affordable(settings, limit)
    if n_queries == 0:
        raise BudgetExhausted(
            f"an owner's budget (epsilon {settings.epsilon:g}) pays for no query at this noise"
        )
    queries, truth = public_x[:n_queries], public_y[:n_queries].reshape(-1).long()
    noise = settings.noise()
    teachers = TeacherSettings(teachers=settings.teachers, seed=settings.seed)
    workers = [actors.VirtualWorker(f"owner{k}") for k in range(settings.workers)]
    try:
        for worker, (x, y) in zip(workers, shards, strict=True):
            publish_shard(
                worker.worker, "pima", x, y, releases=(Sanitized(epsilon=settings.epsilon, delta=DELTA),)
            )
        dataset = await FederatedDataset.from_workers(list(workers), "pima")
        labels, answers = await pate_labels(
            dataset.shards, queries, _model(features, settings.seed), mechanism=settings.mechanism,
            teachers=teachers, **noise,
        )  # fmt: skip
        owners = []
        for worker, own in zip(workers, answers, strict=True):
            ledger = worker.worker.state["dp.ledgers"][f"{worker.id}/pima"]
            owners.append({
                "owner": worker.id,
                "answered": int((own != UNANSWERED).sum()),
                "ledger_epsilon": ledger.epsilon(),
                # Computed by the owner from its own votes (this is one process): not for publication.
                "data_dependent_epsilon": owner_epsilon(worker.worker.state.get(ANSWERS, []), DELTA),
            })  # fmt: skip
    finally:
        for worker in workers:
            await worker.close()
    answered = labels != UNANSWERED
    student = train_student(_model(features, settings.seed), queries, labels, seed=settings.seed)
    baseline = train_student(_model(features, settings.seed), private_x, private_y.reshape(-1).long(),
                             seed=settings.seed)  # fmt: skip
    majority = float(max(data.y_test.mean(), 1 - data.y_test.mean()))
    label_accuracy = (
        float((labels[answered] == truth[answered]).float().mean()) if bool(answered.any()) else 0.0
    )
    return {
        "settings": asdict(settings) | {"noise": noise, "delta": DELTA},
        "queries": n_queries,
        "answered": int(answered.sum()),
        "label_accuracy": label_accuracy,
        "student_accuracy": _accuracy(student, data.x_test, data.y_test),
        "baseline_accuracy": _accuracy(baseline, data.x_test, data.y_test),
        "majority_accuracy": majority,
        "owners": owners,
    }


def format_pate(figures: dict[str, Any]) -> str:
    """The markdown summary ``aiosyft pate`` prints."""
    s = figures["settings"]
    noise = ", ".join(f"{k} {v:g}" for k, v in s["noise"].items())
    lines = [
        f"## PATE on Pima: {s['mechanism']} ({noise}), {s['workers']} owners x {s['teachers']} teachers, "
        f"epsilon {s['epsilon']:g} per owner (delta {s['delta']:g})",
        "",
        "| figure | value |",
        "|---|---|",
        f"| public queries asked (what the budget pays for) | {figures['queries']} |",
        f"| answered (owners' combination, ties dropped) | {figures['answered']} |",
        f"| aggregated-label accuracy (on the answered) | {figures['label_accuracy']:.3f} |",
        f"| student test accuracy | {figures['student_accuracy']:.3f} |",
        f"| non-private baseline (all owners' data) | {figures['baseline_accuracy']:.3f} |",
        f"| majority class | {figures['majority_accuracy']:.3f} |",
        "",
        "| owner | answered | ledger epsilon (data-independent, RDP) "
        "| data-dependent epsilon (owner's own figure, not for publication) |",
        "|---|---|---|---|",
    ]
    for owner in figures["owners"]:
        lines.append(
            f"| {owner['owner']} | {owner['answered']} | {owner['ledger_epsilon']:.3f} "
            f"| {owner['data_dependent_epsilon']:.3f} |"
        )
    return "\n".join(lines)


__all__ = ["DEFAULT_NOISE", "PateSettings", "affordable", "format_pate", "pate_command"]
