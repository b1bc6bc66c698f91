"""PATE across workers: each owner trains its teachers and is the noisy aggregator of them,
charging its own ledger before any noise; a leader with only the public API gets noisy labels
and nothing else."""

from __future__ import annotations

import json
import math
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import dp_accounting
import pytest
import torch
from dp_accounting import rdp
from torch import nn

import actors
import privacy.pate  # noqa: F401 - registers the pate command set
from actors.pointer import call
from privacy.dp import Plan, Sanitized
from privacy.federated import FederatedDataset, publish_shard, spec_key
from privacy.pate import UNANSWERED, combine, teacher_votes
from privacy.pate.training import TeacherSettings, pate_labels
from privacy.pate.workers import partitions, predictions, teacher_seed, train_one
from protocol import BadArguments, BudgetExhausted, PermissionDenied
from protocol.modules import module_spec
from tests.conftest import bounded

FEATURES = 4
OPTIONS = {"teachers": 6, "epochs": 5, "lr": 0.2, "loss": "bce_logits", "seed": 3}


def _data(rows: int = 60, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, FEATURES, generator=generator)
    y = (x[:, :1] + 0.3 * torch.randn(rows, 1, generator=generator) > 0).float()
    return x, y


def _key() -> str:
    return spec_key(module_spec(nn.Sequential(nn.Linear(FEATURES, 1))))


@asynccontextmanager
async def _owner(
    name: str = "bob", epsilon: float = 50.0
) -> AsyncIterator[tuple[Any, actors.Worker, Any, Any]]:
    worker = actors.VirtualWorker(name)
    try:
        x, y = _data()
        publish_shard(worker.worker, "d", x, y, releases=(Sanitized(epsilon=epsilon),))
        yield worker, worker.worker, worker.published("d/x"), worker.published("d/y")
    finally:
        await worker.close()


def _ledger(actor: actors.Worker, name: str = "bob") -> Any:
    return actor.state.get("dp.ledgers", {}).get(f"{name}/d")


def _library_epsilon(events: list[tuple[dp_accounting.DpEvent, int]], delta: float = 1e-5) -> float:
    accountant = rdp.RdpAccountant()
    for event, count in events:
        accountant.compose(event, count)
    return accountant.get_epsilon(delta)


# -- functional ------------------------------------------------------------------------------------
@bounded(30)
async def test_with_tiny_noise_the_labels_are_the_teachers_plurality_reproduced_locally() -> None:
    queries = torch.randn(20, FEATURES, generator=torch.Generator().manual_seed(9))
    async with _owner(epsilon=1e6) as (bob, actor, px, py):
        ensemble = call(bob, "pate.train_teachers", [_key(), px, py], OPTIONS)
        labels = await call(
            bob,
            "pate.answer",
            [_key(), ensemble, actors.send(queries, bob)],
            {"mechanism": "gnmax", "n_classes": 2, "sigma": 0.05},
        ).get()
        ledger = _ledger(actor)
        assert ledger.lots == {Plan(1.0, 0.05 / math.sqrt(2.0)): 20}
    x, y = _data()
    flats = torch.stack(
        [
            train_one(
                _key(),
                x[part],
                y[part],
                epochs=5,
                lr=0.2,
                loss="bce_logits",
                seed=teacher_seed(3, t),
                batch_size=8,
            )
            for t, part in enumerate(partitions(len(x), 6, 3))
        ]
    )
    votes = teacher_votes(predictions(_key(), flats, queries), 2)
    decided = votes.max(dim=1).values * 2 != 6  # no 3-3 tie, where noise decides
    assert decided.sum() > 10
    assert torch.equal(labels[decided], votes.argmax(dim=1)[decided])
    assert labels.dtype == torch.int64


@pytest.mark.parametrize("queries", [7, 30])
@bounded(30)
async def test_each_owner_s_ledger_is_the_library_s_for_the_queries_it_answered(queries: int) -> None:
    q = torch.randn(queries, FEATURES)
    async with _owner() as (bob, actor, px, py):
        ensemble = call(bob, "pate.train_teachers", [_key(), px, py], OPTIONS)
        sent = actors.send(q, bob)
        for options in (
            {"mechanism": "gnmax", "sigma": 20.0},
            {"mechanism": "lnmax", "gamma": 0.01},
            {"mechanism": "confident", "sigma": 20.0, "sigma1": 30.0, "threshold": 4.0},
        ):
            await call(bob, "pate.answer", [_key(), ensemble, sent], {"n_classes": 2, **options}).get()
        expected = _library_epsilon(
            [
                (
                    dp_accounting.GaussianDpEvent(20.0 / math.sqrt(2.0)),
                    2 * queries,
                ),  # gnmax + confident's answers
                (dp_accounting.LaplaceDpEvent(1.0 / (2 * 0.01)), queries),  # epsilon 2 gamma each
                (dp_accounting.GaussianDpEvent(30.0), queries),  # confident's threshold checks
            ]
        )
        assert _ledger(actor).epsilon() == pytest.approx(expected, rel=1e-9)


@bounded(30)
async def test_lnmax_and_confident_run_and_confident_marks_what_it_declined() -> None:
    q = torch.randn(40, FEATURES)
    async with _owner(epsilon=1e7) as (bob, _, px, py):
        ensemble = call(bob, "pate.train_teachers", [_key(), px, py], OPTIONS)
        sent = actors.send(q, bob)
        lnmax = await call(
            bob, "pate.answer", [_key(), ensemble, sent], {"mechanism": "lnmax", "n_classes": 2, "gamma": 0.5}
        ).get()
        assert set(lnmax.tolist()) <= {0, 1}
        never = await call(
            bob,
            "pate.answer",
            [_key(), ensemble, sent],
            {"mechanism": "confident", "n_classes": 2, "sigma": 1.0, "sigma1": 0.01, "threshold": 7.0},
        ).get()
        assert (never == UNANSWERED).all()  # 6 teachers never reach 7 votes
        always = await call(
            bob,
            "pate.answer",
            [_key(), ensemble, sent],
            {"mechanism": "confident", "n_classes": 2, "sigma": 1.0, "sigma1": 0.01, "threshold": 2.5},
        ).get()
        assert set(always.tolist()) <= {0, 1}


def test_owners_answers_combine_by_teacher_weight_and_ties_are_dropped() -> None:
    a = torch.tensor([0, 1, 1, UNANSWERED, UNANSWERED, 0])
    b = torch.tensor([0, 0, UNANSWERED, 1, UNANSWERED, 1])
    c = torch.tensor([1, 0, UNANSWERED, UNANSWERED, UNANSWERED, UNANSWERED])
    assert combine([a, b], [5, 5], 2).tolist() == [0, UNANSWERED, 1, 1, UNANSWERED, UNANSWERED]
    assert combine([a, b], [5, 3], 2).tolist() == [0, 1, 1, 1, UNANSWERED, 0]
    assert combine([a, b, c], [5, 5, 5], 2).tolist() == [0, 0, 1, 1, UNANSWERED, UNANSWERED]


@bounded(30)
async def test_the_leader_s_pate_labels_asks_every_owner_and_combines() -> None:
    workers = [actors.VirtualWorker(name) for name in ("ann", "ben")]
    try:
        for k, worker in enumerate(workers):
            publish_shard(worker.worker, "d", *_data(seed=k), releases=(Sanitized(epsilon=1e6),))
        dataset = await FederatedDataset.from_workers(workers, "d")
        labels, answers = await pate_labels(
            dataset.shards,
            torch.randn(10, FEATURES),
            nn.Sequential(nn.Linear(FEATURES, 1)),
            mechanism="gnmax",
            teachers=TeacherSettings(teachers=4, epochs=2),
            sigma=0.05,
        )
        assert torch.equal(labels, combine(answers, [4, 4], 2))
        for worker in workers:
            assert _ledger(worker.worker, worker.id).lots == {Plan(1.0, 0.05 / math.sqrt(2.0)): 10}
    finally:
        for worker in workers:
            await worker.close()


# -- hostile: a leader with only the public API -------------------------------------------------
@bounded(30)
async def test_the_ensemble_itself_never_leaves() -> None:
    async with _owner() as (bob, _, px, py):
        ensemble = call(bob, "pate.train_teachers", [_key(), px, py], OPTIONS)
        with pytest.raises(PermissionDenied):
            await ensemble.get()


@bounded(30)
async def test_a_forged_ensemble_is_refused_and_nothing_is_charged() -> None:
    q = torch.randn(5, FEATURES)
    numel = FEATURES + 1
    async with _owner() as (bob, actor, px, py):
        real = call(bob, "pate.train_teachers", [_key(), px, py], OPTIONS)
        sent = actors.send(q, bob)
        forged = {
            "rows of the data": px[:6, :numel] if numel <= FEATURES else px[:6].repeat(1, 2)[:, :numel],
            "the leader's own tensor": actors.send(torch.randn(6, numel), bob),
            "a copy of the real one": real * 1.0,
        }
        for name, ensemble in forged.items():
            with pytest.raises(BadArguments, match="trained on this worker"):
                await call(
                    bob,
                    "pate.answer",
                    [_key(), ensemble, sent],
                    {"mechanism": "gnmax", "n_classes": 2, "sigma": 1.0},
                ).get()
            assert name
        with pytest.raises(BadArguments, match="unknown mechanism"):
            await call(bob, "pate.answer", [_key(), real, sent], {"mechanism": "max", "n_classes": 2}).get()
        real.add_(1.0)  # written in place through the leader's pointer
        with pytest.raises((BadArguments, PermissionDenied)):
            await call(
                bob, "pate.answer", [_key(), real, sent], {"mechanism": "gnmax", "n_classes": 2, "sigma": 1.0}
            ).get()
        ledger = _ledger(actor)
        assert ledger is None or not ledger.lots


@bounded(30)
async def test_labels_for_queries_derived_from_the_owner_s_data_cannot_leave() -> None:
    async with _owner() as (bob, _, px, py):
        ensemble = call(bob, "pate.train_teachers", [_key(), px, py], OPTIONS)
        labels = call(
            bob,
            "pate.answer",
            [_key(), ensemble, px[:5] * 1.0],
            {"mechanism": "gnmax", "n_classes": 2, "sigma": 1.0},
        )
        with pytest.raises(PermissionDenied):
            await labels.get()
        public = call(
            bob,
            "pate.answer",
            [_key(), ensemble, actors.send(torch.randn(5, FEATURES), bob)],
            {"mechanism": "gnmax", "n_classes": 2, "sigma": 1.0},
        )
        assert (await public.get()).shape == (5,)  # the same answer on public queries leaves


@bounded(30)
async def test_over_budget_the_owner_refuses_before_any_label_exists() -> None:
    async with _owner(epsilon=1.0) as (bob, actor, px, py):
        ensemble = call(bob, "pate.train_teachers", [_key(), px, py], OPTIONS)
        labels = call(
            bob,
            "pate.answer",
            [_key(), ensemble, actors.send(torch.randn(50, FEATURES), bob)],
            {"mechanism": "gnmax", "n_classes": 2, "sigma": 2.0},
        )
        with pytest.raises(BudgetExhausted, match="bob/d"):
            await labels.get()
        assert not _ledger(actor).lots
        assert "pate.answers" not in actor.state  # no noise was drawn, no answer recorded


@bounded(30)
async def test_teachers_train_only_on_the_published_data_itself() -> None:
    async with _owner() as (bob, actor, px, py):
        for x in (
            px * 1.0,
            px.mean(0, keepdim=True).expand(60, FEATURES),
            actors.send(torch.randn(60, FEATURES), bob),
        ):
            with pytest.raises(BadArguments, match="published data itself"):
                await call(bob, "pate.train_teachers", [_key(), x, py], OPTIONS).get()
        assert not actor.state.get("pate.teachers")


# -- the command -----------------------------------------------------------------------------------
@pytest.mark.skipif(
    not (Path(__file__).resolve().parent.parent.parent / "shared" / "datasets").exists()
    and "AIOSYFT_DATA" not in os.environ,
    reason="needs the datasets",
)
def test_aiosyft_pate_reports_its_figures(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from runners.cli import main  # noqa: PLC0415

    out = tmp_path / "pate.json"
    directory = os.environ.get("AIOSYFT_DATA") or str(
        Path(__file__).resolve().parent.parent.parent / "shared" / "datasets"
    )
    main(
        [
            "pate",
            "--mechanism",
            "gnmax",
            "--teachers",
            "5",
            "--epsilon",
            "3",
            "--queries",
            "20",
            "--json",
            str(out),
            "--data-dir",
            directory,
        ]
    )
    figures = json.loads(out.read_text())
    assert 0 < figures["queries"] <= 20 and figures["answered"] <= figures["queries"]
    assert len(figures["owners"]) == 2
    for owner in figures["owners"]:
        assert 0 < owner["ledger_epsilon"] <= 3.0
        assert owner["data_dependent_epsilon"] >= 0
    assert "not for publication" in capsys.readouterr().out
