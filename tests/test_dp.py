"""DP-SGD where the data is, and each owner's ledger: exact clipping, the noise's scale, the
library's epsilon, calibration, budgets that refuse and survive a restart, and a leader that never
receives anything unsanitized from a DP-protected dataset (on every transport)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import dp_accounting
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from dp_accounting import pld, rdp
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import actors
from actors.pointer import call
from privacy.dp import GhostModel, Ledger, Plan, Sanitized, calibrate_sigma
from privacy.federated import flat_parameters, spec_key
from protocol import BadArguments, BudgetExhausted, PermissionDenied
from protocol.modules import module_spec
from tests.conftest import bounded, worker_in_hand


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3), nn.Sigmoid(), nn.Linear(3, 1))


def _per_example_loop(model: nn.Module, x: torch.Tensor, y: torch.Tensor, clip: float) -> torch.Tensor:
    total = torch.zeros(sum(p.numel() for p in model.parameters()))
    for i in range(len(x)):
        model.zero_grad()
        F.mse_loss(model(x[i : i + 1]), y[i : i + 1]).backward()
        grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        total += grad * min(1.0, clip / (float(grad.norm()) + 1e-6))
    return total


@settings(max_examples=20, deadline=None)
@given(rows=st.integers(1, 12), clip=st.sampled_from([0.01, 0.3, 1.0, 1e3]), seed=st.integers(0, 999))
def test_clipped_per_example_gradients_equal_a_per_example_loop(rows: int, clip: float, seed: int) -> None:
    model = _mlp(seed)
    x, y = torch.randn(rows, 5) * 3, torch.randn(rows, 1) * 3
    ghost = GhostModel(model).clipped_sum(flat_parameters(model), x, y, "mse", clip)
    expected = _per_example_loop(model, x, y, clip)
    assert torch.allclose(ghost, expected, atol=1e-5 * max(1.0, float(expected.abs().max())), rtol=1e-4)


@pytest.mark.parametrize("activation", [nn.Tanh, nn.ELU])  # by hand, and by autograd
def test_other_activations_clip_exactly_too(activation: type[nn.Module]) -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 6), activation(), nn.Linear(6, 2))
    x, y = torch.randn(9, 5), torch.randn(9, 2)
    ghost = GhostModel(model)
    assert ghost.manual == (activation is nn.Tanh)
    summed = ghost.clipped_sum(flat_parameters(model), x, y, "mse", 0.2)
    assert torch.allclose(summed, _per_example_loop(model, x, y, 0.2), atol=1e-6)


def test_each_example_s_contribution_is_at_most_the_clip() -> None:
    model = _mlp()
    x, y = torch.randn(1, 5) * 100, torch.randn(1, 1) * 100
    one = GhostModel(model).clipped_sum(flat_parameters(model), x, y, "mse", 0.5)
    assert float(one.norm()) <= 0.5 + 1e-5


# -- the ledger -------------------------------------------------------------------------------------
def _library_epsilon(plans: list[tuple[float, float, int]], delta: float) -> float:
    accountant = rdp.RdpAccountant()
    for rate, sigma, count in plans:
        accountant.compose(
            dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(sigma)), count
        )
    return accountant.get_epsilon(delta)


def test_an_owner_s_epsilon_is_the_library_s_for_the_lots_it_served() -> None:
    ledger = Ledger("bob/boston", epsilon=50.0, delta=1e-5)
    for _ in range(30):
        ledger.charge(Plan(0.02, 1.1))
    for _ in range(10):
        ledger.charge(Plan(0.05, 2.0))
    assert ledger.epsilon() == pytest.approx(
        _library_epsilon([(0.02, 1.1, 30), (0.05, 2.0, 10)], 1e-5), rel=1e-12
    )
    assert ledger.epsilon(accountant="pld") < ledger.epsilon()  # the tighter accountant, for reports


def test_a_budget_refuses_the_lot_that_would_exceed_it_and_says_what_is_left(tmp_path: Path) -> None:
    plan = Plan(0.04, 1.1)
    ledger = Ledger("bob/boston", epsilon=2.0, delta=1e-5, path=tmp_path / "ledger.json")
    served = 0
    with pytest.raises(BudgetExhausted, match=r"bob/boston.*epsilon 2.*spent 1\.\d+ in \d+ lots"):
        while True:
            ledger.charge(plan)
            served += 1
    assert served > 10
    spent, over = (_library_epsilon([(0.04, 1.1, n)], 1e-5) for n in (served, served + 1))
    assert spent <= 2.0 < over  # every lot that fits, and not one more
    restarted = Ledger("bob/boston", epsilon=2.0, delta=1e-5, path=tmp_path / "ledger.json")
    assert restarted.lots == {plan: served}  # the restart forgets nothing
    with pytest.raises(BudgetExhausted):
        restarted.charge(plan)
    assert not (tmp_path / "ledger.json.tmp").exists()  # written whole, then renamed over


@pytest.mark.parametrize(("rate", "steps", "epsilon"), [(0.02, 500, 1.0), (0.01, 1000, 0.5), (0.1, 50, 4.0)])
def test_calibration_never_exceeds_its_target(rate: float, steps: int, epsilon: float) -> None:
    sigma = calibrate_sigma(rate, steps, epsilon, 1e-5)
    assert _library_epsilon([(rate, sigma, steps)], 1e-5) <= epsilon
    assert _library_epsilon([(rate, sigma * 0.98, steps)], 1e-5) > epsilon  # and is nearly the least


# -- on a worker -----------------------------------------------------------------------------------
@pytest.mark.parametrize("transport", ["virtual"])
@bounded(20)
async def test_the_noise_has_the_promised_scale(transport: str) -> None:
    """With every example in the lot (rate 1) the clipped sum is known; what remains of the update
    is the noise times lr / L. Its sample standard deviation over 2,561 coordinates lies within 6
    standard errors (1.4% of it) of sigma * C * lr / L: a false failure about once in 10^8 runs."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 64), nn.ReLU(), nn.Linear(64, 32), nn.Sigmoid(), nn.Linear(32, 1))
    x, y = torch.randn(8, 5), torch.randn(8, 1)
    async with worker_in_hand(transport, "bob") as (bob, actor):
        actor.publish("d/x", x, releases=[Sanitized(epsilon=1e6)])
        actor.publish("d/y", y, releases=[Sanitized(epsilon=1e6)])
        flat = flat_parameters(model)
        sent = actors.send(flat.clone(), bob)
        options = {"lot": 8.0, "clip": 0.5, "sigma": 3.0, "lr": 2.0}
        await call(bob, "dp.sgd_step", [spec_key(module_spec(model)), sent, bob.published("d/x"),
                                        bob.published("d/y")], options).resolve()  # fmt: skip
        after = await sent.get()
    clipped = _per_example_loop(model, x, y, 0.5)
    noise = (flat - after) * 8.0 / 2.0 - clipped
    expected = 3.0 * 0.5
    standard_error = expected / math.sqrt(2 * len(noise))
    assert abs(float(noise.std()) - expected) < 6 * standard_error
    assert abs(float(noise.mean())) < 6 * expected / math.sqrt(len(noise))


@bounded(30)
async def test_the_leader_never_receives_anything_unsanitized_from_a_dp_dataset(transport: str) -> None:
    model = _mlp()
    x, y = torch.randn(20, 5), torch.randn(20, 1)
    key = spec_key(module_spec(model))
    async with worker_in_hand(transport, "bob") as (bob, actor):
        actor.publish("dp/x", x, releases=[Sanitized(epsilon=10.0)])
        actor.publish("dp/y", y, releases=[Sanitized(epsilon=10.0)])
        px, py = bob.published("dp/x"), bob.published("dp/y")
        attempts: dict[str, Any] = {
            "an ordinary step": call(
                bob, "nn.sgd_step", [key, actors.send(flat_parameters(model), bob), px, py]
            ),
            "a loss": F.mse_loss(px.sum(1, keepdim=True), py),
            "a gradient": _gradient_of(bob, px, py),
            "the data": px + 0,
        }
        for name, pointer in attempts.items():
            with pytest.raises(PermissionDenied):
                await pointer.get()
            assert name
        sanitized = actors.send(flat_parameters(model), bob)
        await call(bob, "dp.sgd_step", [key, sanitized, px, py], {"lot": 5.0, "clip": 1.0, "sigma": 1.0,
                                                                   "lr": 0.1}).resolve()  # fmt: skip
        assert (await sanitized.get()).shape == flat_parameters(model).shape  # this, and only this
        assert actor.state["dp.ledgers"]["bob/dp"].lots == {Plan(0.25, 1.0): 1}
        actor.store.drop(px.id)
        actor.store.drop(py.id)


def _gradient_of(bob: Any, px: Any, py: Any) -> Any:
    w = actors.send(torch.zeros(5, 1, requires_grad=True), bob)
    F.mse_loss(px @ w, py).backward()
    return w.grad


@pytest.mark.parametrize("keep_going", [False, True])
@bounded(60)
async def test_the_paper_s_sampling_charges_each_owner_the_lots_it_served(keep_going: bool) -> None:
    """The leader picks a worker per step (its seeded, public choice); each owner's ledger holds
    exactly the lots it served, at its own rate; over budget an owner refuses, and training
    stops there or goes on with the others."""
    from privacy.dp import DpSettings, schedule, train_dp  # noqa: PLC0415
    from privacy.federated import FederatedDataset, make_model, publish_shard  # noqa: PLC0415

    torch.manual_seed(0)
    sizes = {"bob": 40, "alice": 80}
    workers = [actors.VirtualWorker(name) for name in sizes]
    try:
        for worker in workers:
            x, y = torch.randn(sizes[worker.id], 5), torch.randn(sizes[worker.id], 1)
            budget = 3.0 if worker.id == "bob" else 1e3  # bob's runs out first
            publish_shard(worker.worker, "d", x, y, releases=[Sanitized(epsilon=budget)])
        dataset = await FederatedDataset.from_workers(workers, "d")
        settings = DpSettings(lot=4, clip=1.0, sigma=1.0, lr=0.01, steps=120, seed=7)
        model = make_model(5, (8,))
        if not keep_going:
            with pytest.raises(BudgetExhausted, match="bob/d"):
                await train_dp(model, dataset, settings, keep_going=False, burst=8)
            return
        history = await train_dp(model, dataset, settings, keep_going=True, burst=8)
        ledgers = {w.id: w.worker.state["dp.ledgers"][f"{w.id}/d"] for w in workers}
        bob_lots = ledgers["bob"].lots[Plan(4 / 40, 1.0)]
        assert (
            _library_epsilon([(0.1, 1.0, bob_lots)], 1e-5)
            <= 3.0
            < _library_epsilon([(0.1, 1.0, bob_lots + 1)], 1e-5)
        )
        assert history.refused == ["bob"]
        alice_lots = ledgers["alice"].lots[Plan(4 / 80, 1.0)]
        assert bob_lots + alice_lots == history.steps_done == 120  # every step served by someone
        first = schedule(2, 8, seed=7)  # the first burst is the seed's schedule: bob is worker 0
        assert ledgers["alice"].lots and first.count(0) <= bob_lots
    finally:
        for worker in workers:
            await worker.close()


@pytest.mark.parametrize("transport", ["virtual"])
@bounded(20)
async def test_a_leader_cannot_feed_dp_sgd_rows_mixed_from_many_records(transport: str) -> None:
    """Clipping bounds one record's influence only if one record is one row: DP-SGD on a tensor
    derived from the data (each row the mean of all records) is refused, and nothing is charged."""
    model = _mlp()
    key = spec_key(module_spec(model))
    async with worker_in_hand(transport, "bob") as (bob, actor):
        actor.publish("dp/x", torch.randn(20, 5), releases=[Sanitized(epsilon=10.0)])
        actor.publish("dp/y", torch.randn(20, 1), releases=[Sanitized(epsilon=10.0)])
        px, py = bob.published("dp/x"), bob.published("dp/y")
        options = {"lot": 5.0, "clip": 1.0, "sigma": 1.0, "lr": 0.1}
        for x in (px.mean(0, keepdim=True).expand(20, 5), px * 1.0):
            flat = actors.send(flat_parameters(model), bob)
            with pytest.raises(BadArguments, match="published data itself"):
                await call(bob, "dp.sgd_step", [key, flat, x, py], options).resolve()
            assert torch.equal(await flat.get(), flat_parameters(model))  # untouched
        assert "dp.ledgers" not in actor.state or not actor.state["dp.ledgers"]["bob/dp"].lots
        actor.store.drop(px.id)
        actor.store.drop(py.id)


@bounded(120)
@pytest.mark.skipif(not (Path(__file__).resolve().parent.parent.parent / "shared" / "datasets").exists()
                    and "AIOSYFT_DATA" not in os.environ, reason="needs the datasets")  # fmt: skip
async def test_a_worker_process_keeps_its_ledger_across_a_restart(tmp_path: Path) -> None:
    """``aiosyft worker --release sanitized --ledger F``: lots served before a restart still count
    after it, and the budget refuses exactly when the library says it is spent."""
    import asyncio  # noqa: PLC0415
    import sys  # noqa: PLC0415

    from runners.datasets import data_dir, load  # noqa: PLC0415
    from runners.federated import Federation  # noqa: PLC0415
    from tests.conftest import CLUSTER, secret_of  # noqa: PLC0415

    root = Path(__file__).resolve().parent.parent
    directory = str(data_dir(None))
    ledger = tmp_path / "bob.ledger"
    argv = [sys.executable, "-m", "runners.cli", "worker", "--id", "bob", "--transport", "tcp", "--port", "0",
            "--dataset", "boston", "--shard", "0/2", "--release", "sanitized", "--epsilon", "3",
            "--ledger", str(ledger), "--data-dir", directory]  # fmt: skip
    env = {**os.environ, "AIOSYFT_CLUSTER_SECRET": CLUSTER}
    rows = len(Federation("boston", 2).shards(load("boston", directory))[0][0])
    fits = Ledger("bob/boston", 3.0, 1e-5).remaining(Plan(40 / rows, 1.5))  # about ten lots
    model = nn.Sequential(nn.Linear(13, 4), nn.ReLU(), nn.Linear(4, 1))
    key, flat0 = spec_key(module_spec(model)), flat_parameters(model)
    assert fits > 3
    options = {"lot": 40.0, "clip": 1.0, "sigma": 1.5, "lr": 0.01}

    async def session(steps: int | None) -> int:
        process = await asyncio.create_subprocess_exec(
            *argv, cwd=root, env=env, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE
        )
        try:
            assert process.stdout is not None
            address = (await process.stdout.readline()).decode().split()[1]
            bob = await actors.connect(address, identity="me", secret=secret_of("me"))
            served = 0
            try:
                flat = actors.send(flat0.clone(), bob)
                x, y = bob.published("boston/x"), bob.published("boston/y")
                while steps is None or served < steps:
                    try:
                        await call(bob, "dp.sgd_step", [key, flat, x, y], options).resolve()
                    except BudgetExhausted:
                        break
                    served += 1
            finally:
                await bob.close()
            return served
        finally:
            process.terminate()
            await process.wait()

    assert await session(3) == 3
    assert await session(None) == fits - 3  # the restart forgot nothing


@pytest.mark.parametrize("transport", ["virtual", "tcp"])
@bounded(30)
async def test_a_sanitized_release_to_named_identities_keeps_its_audience(transport: str) -> None:
    """Parameters a DP-SGD step changed carry the owner's sanitized taint with its audience:
    the leader it names may fetch them, a second worker it does not name may not receive them.
    (A registered command's label rule once saw no arguments, and the walking parameters left
    unlabelled.)"""
    from tests.test_policy import Site  # noqa: PLC0415

    site = Site(transport)
    try:
        bob, eve = await site.start("bob"), await site.start("eve")
        x, y = torch.randn(20, 5), torch.randn(20, 1)
        releases = [Sanitized(to=["me"], epsilon=100.0)]
        site.workers["bob"].publish("d/x", x, releases=releases)
        site.workers["bob"].publish("d/y", y, releases=releases)
        model = _mlp()
        flat = actors.send(flat_parameters(model), bob)
        options = {"lot": 5.0, "clip": 1.0, "sigma": 1.0, "lr": 0.1}
        await call(bob, "dp.sgd_step", [spec_key(module_spec(model)), flat, bob.published("d/x"),
                                        bob.published("d/y")], options).resolve()  # fmt: skip
        with pytest.raises(PermissionDenied, match="leave to eve"):
            await flat.copy().move(eve).get()
        assert (await flat.get()).shape == flat_parameters(model).shape
    finally:
        await site.close()


def _pld_epsilon(rate: float, sigma: float, count: int, delta: float) -> float:
    accountant = pld.PLDAccountant()
    accountant.compose(dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(sigma)), count)
    return accountant.get_epsilon(delta)


def test_a_budget_kept_with_pld_refuses_at_the_pld_bound_and_admits_more_than_rdp(tmp_path: Path) -> None:
    """The owner may keep its budget with the tighter accountant: the same noise then pays for
    more lots, and the ledger stops exactly where the library's PLD epsilon would pass it."""
    plan, budget = Plan(0.5, 4.0), 1.0
    tight = Ledger("bob/d", epsilon=budget, delta=1e-5, path=tmp_path / "bob.ledger", accountant="pld")
    loose = Ledger("bob/d", epsilon=budget, delta=1e-5)
    served = 0
    with pytest.raises(BudgetExhausted, match="bob/d"):
        while True:
            tight.charge(plan)
            served += 1
    assert _pld_epsilon(0.5, 4.0, served, 1e-5) <= budget < _pld_epsilon(0.5, 4.0, served + 1, 1e-5)
    assert served > loose.remaining(plan)  # RDP stops earlier on the same lots
    assert tight.epsilon() == pytest.approx(_pld_epsilon(0.5, 4.0, served, 1e-5))
    again = Ledger("bob/d", epsilon=budget, delta=1e-5, path=tmp_path / "bob.ledger", accountant="pld")
    assert again.lots == {plan: served} and again.remaining(plan) == 0


def test_calibration_under_pld_never_exceeds_its_target_and_needs_less_noise() -> None:
    sigma = calibrate_sigma(0.8, 4, 0.5, 1e-5, accountant="pld")
    assert _pld_epsilon(0.8, sigma, 4, 1e-5) <= 0.5
    assert sigma < calibrate_sigma(0.8, 4, 0.5, 1e-5)


def test_a_sanitized_release_names_its_accountant() -> None:
    assert Sanitized(epsilon=1.0, accountant="pld") != Sanitized(epsilon=1.0)
    assert hash(Sanitized(epsilon=1.0, accountant="pld")) == hash(Sanitized(epsilon=1.0, accountant="pld"))
    with pytest.raises(ValueError, match="unknown accountant"):
        Sanitized(epsilon=1.0, accountant="moments")
    with pytest.raises(ValueError, match="unknown accountant"):
        Ledger("bob/d", 1.0, 1e-5, accountant="moments")
