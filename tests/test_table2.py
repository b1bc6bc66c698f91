"""Table 2's machinery: the leader's schedule drawn ahead, each owner's noise calibrated for
exactly the lots it serves, the fixed data maps and their units, the training curves, and the
summary's numbers."""

from __future__ import annotations

import dataclasses
import math
import statistics

import pytest
import torch

import actors
from privacy.dp import DpSettings, Plan, Sanitized, schedule, train_dp
from privacy.federated import FederatedDataset, flat_parameters, make_model, publish_shard
from runners.datasets import load
from runners.table2 import (
    CURVE_POINTS,
    DELTA,
    EPSILONS,
    RECIPES,
    Cell,
    Recipe,
    bend,
    dp_cell,
    format_table2,
    metric,
    prepare,
    summarize,
)
from tests.conftest import bounded


def test_the_schedule_is_the_seed_s_and_covers_every_worker() -> None:
    picks = schedule(3, 300, seed=5)
    assert picks == schedule(3, 300, seed=5) != schedule(3, 300, seed=6)
    assert set(picks) == {0, 1, 2} and len(picks) == 300


@pytest.mark.parametrize("seed", [3, 5, 7])  # their schedules give bob 23, 31 and 32 of 50 lots
@bounded(60)
async def test_each_owner_serves_its_scheduled_lots_with_its_own_noise(seed: int) -> None:
    """The lots each ledger holds are the schedule's count for that owner, at that owner's
    sigma: what lets an owner calibrate for exactly what it will serve."""
    torch.manual_seed(0)
    workers = [actors.VirtualWorker(name) for name in ("bob", "alice")]
    try:
        for worker, rows in zip(workers, (40, 60), strict=True):
            publish_shard(
                worker.worker, "d", torch.randn(rows, 5), torch.randn(rows, 1), [Sanitized(epsilon=1e3)]
            )
        dataset = await FederatedDataset.from_workers(workers, "d")
        settings = DpSettings(lot=4, clip=1.0, sigma=1.0, lr=0.01, steps=50, seed=seed)
        sigmas = {"bob": 2.5}  # alice keeps the settings' sigma
        seen: list[tuple[int, torch.Tensor]] = []
        model = make_model(5, (4,))
        await train_dp(model, dataset, settings, sigmas=sigmas, burst=16,
                       snapshot=lambda done, flat: seen.append((done, flat)))  # fmt: skip
        picks = schedule(2, 50, seed=seed)
        ledgers = {w.id: w.worker.state["dp.ledgers"][f"{w.id}/d"].lots for w in workers}
        assert ledgers["bob"] == {Plan(4 / 40, 2.5): picks.count(0)}
        assert ledgers["alice"] == {Plan(4 / 60, 1.0): picks.count(1)}
        assert [done for done, _ in seen] == [16, 32, 48, 50]
        assert torch.equal(seen[-1][1], flat_parameters(model))  # the last snapshot is the result
    finally:
        for worker in workers:
            await worker.close()


def test_the_feature_map_and_the_target_s_units() -> None:
    x = torch.tensor([[-2.0, 0.5, 1.5]])
    assert torch.equal(bend(x), torch.tensor([[-2.0, 0.5, 1.5, 0.0, 1.5, 4.5]]))
    data = load("boston", seed=3)
    recipe = Recipe((), features="relu", center=25.0, scale=3.0)
    prepared = prepare(data, recipe)
    assert prepared.x_train.shape[1] == 2 * data.x_train.shape[1]
    model = make_model(prepared.x_test.shape[1], (), seed=1)
    with torch.no_grad():
        predicted = model(prepared.x_test) * 3.0 + 25.0
    assert metric(model, prepared, recipe) == pytest.approx(
        float(((predicted - data.y_test) ** 2).mean()), rel=1e-5
    )


@bounded(60)
async def test_a_cell_spends_each_owner_s_budget_and_no_more() -> None:
    """Calibrated for exactly the lots it serves, each owner ends within its budget and close
    to it (the calibration's tolerance); the curve has a point per burst."""
    recipe = Recipe((), lot=64, epochs=3, clip=0.3, lr=0.3)
    cell = await dp_cell("pima", 1.0, 0, recipe)
    assert set(cell.spent) == {"bob", "alice"}
    for rdp_spent, pld_spent in cell.spent.values():
        assert 0.9 < rdp_spent <= 1.0
        assert pld_spent < rdp_spent  # the tighter accountant, for reporting
    steps = round(3 * 614 / 64)
    assert len(cell.curve) == 1 + math.ceil(steps / math.ceil(steps / CURVE_POINTS))
    assert cell.curve[0][0] == 0.0 and cell.curve[-1] == (1.0, cell.value)
    assert 0.0 <= cell.value <= 100.0


def test_the_summary_is_mean_and_sample_deviation_per_cell() -> None:
    values = {"boston": [30.0, 20.0, 25.0], "pima": [70.0, 80.0, 75.0]}
    cells = {
        (dataset, epsilon): [
            Cell(v + (epsilon or 0), [], {"bob": (epsilon or 0, 0.0)}) for v in values[dataset]
        ]
        for dataset in RECIPES
        for epsilon in EPSILONS
    }
    result = summarize(cells, 3)
    row = next(r for r in result["rows"] if r["epsilon"] == 2.0)
    assert row["boston_mse"] == pytest.approx(27.0) and row["pima_accuracy"] == pytest.approx(77.0)
    assert row["boston_mse_std"] == pytest.approx(statistics.stdev([30.0, 20.0, 25.0]))
    assert row["delta"] == DELTA and row["most_spent_rdp"] == 2.0
    plain = next(r for r in result["rows"] if r["epsilon"] is None)
    assert plain["delta"] is None and plain["boston_mse"] == pytest.approx(25.0)
    assert "| (2, 1e-05) | 27.0 ± 5.0 | 28.5 |" in format_table2(result)


@bounded(60)
async def test_the_small_budget_recipe_averages_its_last_half() -> None:
    """The epsilon-0.5 recipe the README describes (linear, from zero, on the bent features,
    averaged over the last half of its steps): with averaging over every step, the result is
    the mean of the iterates, which no single iterate's test MSE gives."""
    recipe = RECIPES["boston"][0.5]
    assert (recipe.hidden, recipe.features, recipe.zero_init, recipe.average) == ((), "relu", True, 0.5)
    everything = dataclasses.replace(recipe, average=1.0)
    averaged = await dp_cell("boston", 0.5, 1, everything)
    assert averaged.curve[0] != averaged.curve[1]  # the walk moved
    assert averaged.value not in {value for _, value in averaged.curve[1:]}


def test_both_charts_are_drawn(tmp_path) -> None:
    from runners.table2 import plot_curves, plot_utility  # noqa: PLC0415

    curve = [(0.0, 90.0), (0.5, 40.0), (1.0, 30.0)]
    cells = {
        (dataset, epsilon): [Cell(28.0 if epsilon == 0.5 else 30.0, [] if epsilon is None else curve, {})] * 2
        for dataset in RECIPES
        for epsilon in EPSILONS
    }
    plot_utility(summarize(cells, 2), tmp_path / "utility.png")
    plot_curves(cells, tmp_path / "curves.png")
    for name in ("utility.png", "curves.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
