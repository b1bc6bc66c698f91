"""Federated learning: splits, the epoch plan, walk and FedAvg training against plain PyTorch,
what the leader receives, and the default settings on the real datasets.

Training tests build their workers here (rather than through ``make_worker``) because each owner
must publish its shard on the worker object itself, which a network handle does not reach. Each
owner releases model updates only (:func:`~privacy.federated.publish_shard`'s default), as a
federated learning owner does. Every such test checks on the way out that the workers hold
nothing but their published data.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
from collections.abc import AsyncIterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from hypothesis import given, settings
from hypothesis import strategies as st

import actors
from actors.connection import Connection
from actors.pointer import PointerTensor, call
from privacy.federated import (
    SPLITS,
    FederatedDataLoader,
    FederatedDataset,
    Settings,
    epoch_plan,
    fusable,
    make_model,
    publish_shard,
    reference_walk,
    shard_order,
    split_indices,
    train_fedavg,
    train_walk,
)
from protocol import Codec, PermissionDenied, RemoteError, Store, published_id
from protocol.modules import module_spec
from runners.datasets import SOURCES, Dataset, data_dir, load
from runners.experiments import DEFAULTS, federated_run, federated_workers, train_command
from runners.federated import Federation
from tests.conftest import CREDENTIALS, plain_fedavg, secret_of

TOY = "toy"


@pytest.fixture(autouse=True)
def one_torch_thread() -> Any:
    """As every worker process runs (see ``runners.cluster.warm_up``); tiny models are much
    faster so on a small shared host, and the results are the same."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _toy(n: int = 40, seed: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    """A small regression problem: y = x @ w + noise, 3 features."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=generator)
    y = x @ torch.tensor([[1.5], [-2.0], [0.5]]) + 0.1 * torch.randn(n, 1, generator=generator)
    return x, y


def _shards(x: torch.Tensor, y: torch.Tensor, indices: list[torch.Tensor]) -> list[tuple[Any, Any]]:
    return [(x[i].clone(), y[i].clone()) for i in indices]


class Owners(list):
    """The handles, and (for inspection) the worker actors behind them."""

    actors: list[actors.Worker]


@contextlib.asynccontextmanager
async def holding(
    transport: str, shards: list[tuple[torch.Tensor, torch.Tensor]], prefix: str = "owner"
) -> AsyncIterator[Owners]:
    """Workers over ``transport``; worker k publishes ``shards[k]`` as its own data. On a clean
    exit every worker must hold exactly its two published tensors and nothing else."""
    handles = Owners()
    handles.actors = []
    servers: list[actors.Server] = []
    try:
        for k, (x, y) in enumerate(shards):
            worker_id = f"{prefix}{k}"
            options = {"credentials": CREDENTIALS, "secret": secret_of(worker_id)}
            if transport == "virtual":
                virtual = actors.VirtualWorker(worker_id, local_secret=secret_of("me"), **options)
                publish_shard(virtual.worker, TOY, x, y)
                handles.append(virtual)
                handles.actors.append(virtual.worker)
            else:
                server = await actors.serve(actors.Worker(worker_id, **options), transport)
                servers.append(server)
                publish_shard(server.worker, TOY, x, y)
                handles.append(await actors.connect(server.address, identity="me", secret=secret_of("me")))
                handles.actors.append(server.worker)
        yield handles
        gc.collect()
        await asyncio.sleep(0)  # let the batched deletes leave
        for handle in handles:
            assert (await handle.ping())["objects"] == 2, f"{handle.id} holds more than its shard"
    finally:
        for handle in handles:
            await handle.close()
        for server in servers:
            await server.close()


def _assert_same_parameters(trained: torch.nn.Module, reference: torch.nn.Module) -> None:
    ours, theirs = list(trained.parameters()), list(reference.parameters())
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs, strict=True):
        assert type(a) is not PointerTensor and isinstance(a, torch.Tensor)
        assert torch.equal(a.detach(), b.detach()), (a, b)


def _changed(model: torch.nn.Module, fresh: torch.nn.Module) -> bool:
    return any(
        not torch.equal(a.detach(), b.detach())
        for a, b in zip(model.parameters(), fresh.parameters(), strict=True)
    )


# -- splits ----------------------------------------------------------------------------------
@settings(max_examples=200, deadline=None, database=None)
@given(data=st.data(), n=st.integers(1, 150))
def test_every_split_is_a_partition(data, n) -> None:
    workers = data.draw(st.integers(1, min(n, 9)), label="workers")
    scheme = data.draw(st.sampled_from(SPLITS), label="scheme")
    batch = data.draw(st.integers(1, 16), label="batch")
    seed = data.draw(st.integers(0, 2**31), label="seed")
    generator = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, 3, (n, 1), generator=generator).float()  # many ties
    features = torch.randn(n, 4, generator=generator)
    parts = split_indices(n, workers, scheme, targets=targets, features=features, feature=2,
                          batch_size=batch, seed=seed)  # fmt: skip
    assert len(parts) == workers
    assert all(p.dtype == torch.int64 and p.ndim == 1 for p in parts)
    assert sorted(torch.cat(parts).tolist()) == list(range(n))  # disjoint and complete
    sizes = [len(p) for p in parts]
    if scheme == "round-robin":
        batches = -(-n // batch)
        assert sizes == [
            sum(min(batch, n - b * batch) for b in range(k, batches, workers)) for k in range(workers)
        ]
    else:
        assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_round_robin_with_fewer_batches_than_workers_still_partitions() -> None:
    parts = split_indices(10, 3, "round-robin", batch_size=8, seed=0)
    permutation = split_indices(10, 1, "round-robin", batch_size=8, seed=0)[0]
    assert [p.tolist() for p in parts] == [permutation[:8].tolist(), permutation[8:].tolist(), []]


def test_contiguous_split_is_consecutive_blocks() -> None:
    parts = split_indices(10, 3, "contiguous")
    assert [p.tolist() for p in parts] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]


def test_round_robin_puts_batch_i_of_the_seeded_permutation_on_worker_i_mod_n() -> None:
    permutation = split_indices(30, 1, "round-robin", batch_size=4, seed=5)[0]
    assert sorted(permutation.tolist()) == list(range(30))
    assert permutation.tolist() != list(range(30))  # it is shuffled
    assert torch.equal(permutation, split_indices(30, 1, "iid", seed=5)[0])  # the same seeded shuffle
    assert not torch.equal(permutation, split_indices(30, 1, "round-robin", batch_size=4, seed=6)[0])
    parts = split_indices(30, 3, "round-robin", batch_size=4, seed=5)
    batches = permutation.split(4)  # 8 batches: 4, 4, ..., 4, 2
    for i, batch in enumerate(batches):
        worker, position = i % 3, i // 3
        assert torch.equal(parts[worker][4 * position : 4 * position + len(batch)], batch), i
    assert [len(p) for p in parts] == [12, 10, 8]
    assert [p.tolist() for p in parts] == [
        p.tolist() for p in split_indices(30, 3, "round-robin", batch_size=4, seed=5)
    ]


def test_iid_split_is_seeded_equal_blocks_of_a_shuffle() -> None:
    parts = split_indices(20, 4, "iid", seed=9)
    permutation = split_indices(20, 1, "iid", seed=9)[0]
    assert [p.tolist() for p in parts] == [permutation[5 * k : 5 * k + 5].tolist() for k in range(4)]
    assert [p.tolist() for p in split_indices(20, 4, "iid", seed=10)] != [p.tolist() for p in parts]


def test_label_split_sorts_by_target_worker_0_gets_the_smallest() -> None:
    generator = torch.Generator().manual_seed(3)
    targets = torch.randn(23, 1, generator=generator)
    parts = split_indices(23, 4, "label", targets=targets)
    assert sorted(torch.cat(parts).tolist()) == list(range(23))
    ranked = torch.argsort(targets[:, 0])
    assert set(parts[0].tolist()) == set(ranked[: len(parts[0])].tolist())
    for low, high in itertools.pairwise(parts):
        assert targets[low].max() < targets[high].min()
    # 1-D targets work alike, and ties keep the items' order (a stable sort)
    ties = split_indices(6, 2, "label", targets=torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 0.0]))
    assert [p.tolist() for p in ties] == [[1, 3, 5], [0, 2, 4]]


def test_feature_split_sorts_by_the_chosen_column() -> None:
    generator = torch.Generator().manual_seed(4)
    features = torch.randn(12, 3, generator=generator)
    parts = split_indices(12, 3, "feature", features=features, feature=2)
    column = features[:, 2]
    assert [p.tolist() for p in parts] == [
        torch.argsort(column)[4 * k : 4 * k + 4].tolist() for k in range(3)
    ]
    assert column[parts[0]].max() < column[parts[1]].min() < column[parts[1]].max() < column[parts[2]].min()
    by_first = split_indices(12, 3, "feature", features=features, feature=0)
    assert [p.tolist() for p in by_first] != [p.tolist() for p in parts]


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((5, 0, "iid"), {}, "cannot split 5 items across 0 workers"),
        ((3, 4, "contiguous"), {}, "cannot split 3 items across 4 workers"),
        ((0, 1, "iid"), {}, "cannot split 0 items across 1 workers"),
        ((10, 2, "shuffled"), {}, r"unknown split 'shuffled'; expected one of \('contiguous'"),
        ((10, 2, "label"), {}, "a split by label needs the targets"),
        ((10, 2, "feature"), {}, "a split by feature needs the features"),
    ],
)
def test_bad_split_arguments_raise_value_error(args, kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        split_indices(*args, **kwargs)


@pytest.mark.parametrize("scheme", ["label", "feature"])
def test_targets_or_features_of_the_wrong_length_are_refused(scheme) -> None:
    short = torch.arange(5.0).reshape(5, 1)
    with pytest.raises(ValueError):
        split_indices(10, 2, scheme, targets=short, features=short)


@pytest.mark.parametrize("batch_size", [0, -1])
def test_a_round_robin_batch_size_below_one_is_a_value_error(batch_size) -> None:
    with pytest.raises(ValueError):
        split_indices(10, 2, "round-robin", batch_size=batch_size)


def test_federation_shards_and_worker_arguments() -> None:
    x, y = _toy(20)
    data = Dataset(TOY, "regression", ("a", "b", "c"), x, y, x[:4], y[:4])
    federation = Federation(TOY, 3, "label", seed=2, batch_size=4)
    shards = federation.shards(data)
    expected = split_indices(20, 3, "label", targets=y, features=x, batch_size=4, seed=2)
    assert len(shards) == 3
    for (sx, sy), indices in zip(shards, expected, strict=True):
        assert torch.equal(sx, x[indices]) and torch.equal(sy, y[indices])
        assert sx.data_ptr() != x.data_ptr()  # copies: an owner keeps only its own rows
    assert federation.worker_arguments(1) == [
        "--dataset", TOY, "--shard", "1/3", "--split", "label", "--split-seed", "2", "--batch-size", "4",
    ]  # fmt: skip


# -- the epoch plan --------------------------------------------------------------------------
def test_epoch_plan_interleaves_the_shards_round_by_round() -> None:
    assert epoch_plan([10, 7, 3], 4) == [
        (0, slice(0, 4)), (1, slice(0, 4)), (2, slice(0, 3)),
        (0, slice(4, 8)), (1, slice(4, 7)),
        (0, slice(8, 10)),
    ]  # fmt: skip
    # equal shards: batch i of the epoch is on worker i mod n
    assert [k for k, _ in epoch_plan([24, 24, 24], 8)] == [0, 1, 2] * 3
    assert epoch_plan([], 8) == []
    assert epoch_plan([0, 3], 2) == [(1, slice(0, 2)), (1, slice(2, 3))]


@settings(max_examples=200, deadline=None, database=None)
@given(sizes=st.lists(st.integers(0, 40), max_size=6), batch=st.integers(1, 12))
def test_epoch_plan_visits_every_item_of_every_shard_once(sizes, batch) -> None:
    plan = epoch_plan(sizes, batch)
    counts = [-(-size // batch) for size in sizes]
    assert [k for k, _ in plan] == [
        k for r in range(max(counts, default=0)) for k in range(len(sizes)) if r < counts[k]
    ]
    visited: list[list[int]] = [[] for _ in sizes]
    for k, rows in plan:
        assert 0 < rows.stop - rows.start <= batch
        assert rows.start == len(visited[k])  # each shard's batches in order, no gaps
        visited[k].extend(range(rows.start, rows.stop))
    assert visited == [list(range(size)) for size in sizes]


def test_shard_order_is_a_seeded_permutation_per_seed_epoch_and_shard() -> None:
    base = shard_order(20, 1, 3, seed=5)
    assert sorted(base.tolist()) == list(range(20))
    assert base.tolist() != list(range(20))
    assert torch.equal(base, shard_order(20, 1, 3, seed=5))
    assert not torch.equal(base, shard_order(20, 1, 4, seed=5))  # another epoch
    assert not torch.equal(base, shard_order(20, 2, 3, seed=5))  # another shard
    assert not torch.equal(base, shard_order(20, 1, 3, seed=6))  # another seed
    epochs = {tuple(shard_order(20, 0, e, seed=0).tolist()) for e in range(10)}
    assert len(epochs) == 10
    assert shard_order(7, 0, 9, seed=1, shuffle=False).tolist() == list(range(7))


# -- walk training equals plain PyTorch ------------------------------------------------------
async def _walk(transport: str, shards, settings_: Settings, *, shuffle: bool = True, fused=None) -> None:
    n_features = shards[0][0].shape[1]
    federated = make_model(n_features, settings_.hidden, seed=1)
    local = make_model(n_features, settings_.hidden, seed=1)
    fresh = make_model(n_features, settings_.hidden, seed=1)
    progress: list[tuple[int, float]] = []
    async with holding(transport, shards) as workers:
        dataset = await FederatedDataset.from_workers(workers, TOY)
        assert [shard.size for shard in dataset.shards] == [len(x) for x, _ in shards]
        assert dataset.workers == workers and len(dataset) == sum(len(x) for x, _ in shards)
        loader = FederatedDataLoader(dataset, settings_.batch_size, shuffle=shuffle, seed=settings_.seed)
        assert len(loader) == len(epoch_plan([len(x) for x, _ in shards], settings_.batch_size))
        history = await train_walk(
            federated, loader, settings_, lambda e, v: progress.append((e, v)), fused=fused
        )
        del dataset, loader
    expected = reference_walk(local, shards, settings_, shuffle=shuffle)
    _assert_same_parameters(federated, local)
    assert history.epoch_loss == expected.epoch_loss
    assert progress == list(enumerate(expected.epoch_loss, start=1))
    assert _changed(federated, fresh)
    assert expected.epoch_loss[-1] < expected.epoch_loss[0]


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "op-by-op"])
async def test_walk_training_equals_plain_pytorch(transport, fused) -> None:
    x, y = _toy(40)
    shards = _shards(x, y, split_indices(40, 2, "round-robin", batch_size=8, seed=3))
    await _walk(
        transport, shards, Settings(epochs=3, lr=0.05, batch_size=8, seed=3, hidden=(8,)), fused=fused
    )


class _Watched(FederatedDataLoader):
    """Records when each epoch's batches are drawn, that is when its steps are sent."""

    def __init__(self, *args: Any, events: list[str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.events = events

    def epoch_rows(self, epoch: int) -> Any:
        self.events.append(f"send {epoch + 1}")
        return super().epoch_rows(epoch)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "op-by-op"])
async def test_the_walk_sends_each_epoch_before_awaiting_the_previous_loss(fused) -> None:
    x, y = _toy(32)
    events: list[str] = []
    shards = _shards(x, y, split_indices(32, 2, "round-robin", batch_size=8))
    async with holding("virtual", shards) as workers:
        dataset = await FederatedDataset.from_workers(workers, TOY)
        loader = _Watched(dataset, 8, events=events)
        await train_walk(make_model(3, (4,)), loader, Settings(epochs=3, hidden=(4,)),
                         lambda epoch, _: events.append(f"loss {epoch}"), fused=fused)  # fmt: skip
        del dataset, loader
    assert events == ["send 1", "send 2", "loss 1", "send 3", "loss 2", "loss 3"]


@pytest.mark.parametrize("shuffle", [True, False])
async def test_walk_training_with_three_uneven_shards_equals_plain_pytorch(transport, shuffle) -> None:
    x, y = _toy(40, seed=8)
    shards = [(x[:20].clone(), y[:20].clone()), (x[20:33].clone(), y[20:33].clone()),
              (x[33:].clone(), y[33:].clone())]  # fmt: skip
    assert epoch_plan([20, 13, 7], 5)[-1] == (0, slice(15, 20))  # shard 0 walks alone at the end
    await _walk(transport, shards, Settings(epochs=2, lr=0.03, batch_size=5, seed=11, hidden=(6, 4)),
                shuffle=shuffle)  # fmt: skip


# -- FedAvg ----------------------------------------------------------------------------------
def _plain_fedavg(
    model: torch.nn.Module, shards: list[tuple[torch.Tensor, torch.Tensor]], options: Settings, rounds: int
) -> list[float]:
    """FedAvg written out in plain PyTorch (:func:`tests.conftest.plain_fedavg`), weighted by
    shard size, with ``options``' settings."""
    total = sum(len(x) for x, _ in shards)
    return plain_fedavg(
        model, shards, [len(x) / total for x, _ in shards], rounds=rounds, epochs=options.epochs,
        lr=options.lr, batch_size=options.batch_size, seed=options.seed,
    )  # fmt: skip


def _assert_same_state(trained: torch.nn.Module, reference: torch.nn.Module) -> None:
    ours, theirs = trained.state_dict(), reference.state_dict()
    assert list(ours) == list(theirs)
    for name, value in theirs.items():
        assert torch.equal(ours[name], value), (name, ours[name], value)


async def test_fedavg_on_one_worker_is_local_training(transport) -> None:
    x, y = _toy(30)
    options = Settings(epochs=3, lr=0.05, batch_size=8, seed=0, hidden=(8,))
    model, two_rounds = make_model(3, options.hidden, seed=2), make_model(3, options.hidden, seed=2)
    async with holding(transport, [(x, y)]) as workers:
        dataset = await FederatedDataset.from_workers(workers, TOY)
        history = await train_fedavg(model, dataset, options, rounds=1)
        await train_fedavg(two_rounds, dataset, options, rounds=2)
        del dataset
    reference, reference_two = make_model(3, options.hidden, seed=2), make_model(3, options.hidden, seed=2)
    expected_losses = _plain_fedavg(reference, [(x, y)], options, rounds=1)
    _assert_same_state(model, reference)
    assert history.epoch_loss == expected_losses
    _plain_fedavg(reference_two, [(x, y)], options, rounds=2)
    _assert_same_state(two_rounds, reference_two)
    assert _changed(two_rounds, model)


async def test_fedavg_on_two_workers_equals_plain_pytorch(transport) -> None:
    """Uneven shards (25 and 15 rows): an unweighted average, or weights swapped between the
    workers, would not give these weights."""
    x, y = _toy(40, seed=9)
    shards = [(x[:25].clone(), y[:25].clone()), (x[25:].clone(), y[25:].clone())]
    options = Settings(epochs=2, lr=0.05, batch_size=4, seed=4, hidden=(8,))
    model, reference = make_model(3, options.hidden, seed=3), make_model(3, options.hidden, seed=3)
    rounds: list[int] = []
    async with holding(transport, shards) as workers:
        dataset = await FederatedDataset.from_workers(workers, TOY)
        history = await train_fedavg(
            model, dataset, options, rounds=3, progress=lambda r, _: rounds.append(r)
        )
        del dataset
    expected_losses = _plain_fedavg(reference, shards, options, rounds=3)
    _assert_same_state(model, reference)
    assert history.epoch_loss == expected_losses
    assert rounds == [1, 2, 3]
    assert _changed(model, make_model(3, options.hidden, seed=3))


async def test_a_fedavg_job_runs_while_the_worker_keeps_serving(transport) -> None:
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(2000, 3, generator=generator), torch.randn(2000, 1, generator=generator)
    model = make_model(3, (8,), seed=0)
    spec = module_spec(model)
    state = [t.detach().clone() for t in model.state_dict().values()]
    async with holding(transport, [(x, y)]) as workers:
        (worker,), (actor,) = workers, workers.actors
        data_x, data_y = worker.published(f"{TOY}/x"), worker.published(f"{TOY}/y")
        job = call(worker, "nn.fit", [spec, state, data_x, data_y], {"epochs": 30, "batch_size": 8})
        answered = 0
        for _ in range(1000):
            status = await asyncio.wait_for(worker.ping(), 10)
            assert status["id"] == "owner0"
            # other commands are served meanwhile too, on the very data the job uses (the sum
            # stays on the worker: only model updates leave it)
            total = await worker.published(f"{TOY}/x").sum()
            assert torch.equal(actor.store.objects[total.id], x.sum())
            del total
            if job.id in actor.store:  # the job is done
                break
            answered += 1  # both answers came while the job was still running
            await asyncio.sleep(0.01)
        new_state, loss = await job.get()
        del data_x, data_y
    assert answered >= 2, "the worker did not answer while its job ran"
    assert [t.shape for t in new_state] == [t.shape for t in state]
    assert any(not torch.equal(a, b) for a, b in zip(new_state, state, strict=True))
    assert isinstance(loss, float) and loss > 0


# -- what the leader receives ----------------------------------------------------------------
def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, list | tuple):
        return [t for v in value for t in _tensors(v)]
    return []


def _leaks(frames: list[bytes], x: torch.Tensor, y: torch.Tensor) -> list[str]:
    """Every way the frames carry the training data: a decoded number equal to one of its
    values, or the raw bytes of a feature row."""
    secret = set(x.flatten().tolist()) | set(y.flatten().tolist())
    rows = [row.numpy().tobytes() for row in x]
    found = []
    codec = Codec()
    for frame in frames:
        for row in rows:
            if row in frame:
                found.append("the bytes of a feature row")
        for message in codec.decode(frame):
            for tensor in _tensors(list(message)):
                if tensor.is_floating_point() and set(tensor.flatten().tolist()) & secret:
                    found.append(f"a {type(message).__name__} holding {tuple(tensor.shape)} of the data")
    return found


async def test_the_leader_never_receives_the_training_data(monkeypatch) -> None:
    frames: list[bytes] = []
    on_frame = Connection._on_frame

    def recording(self: Connection, frame: Any) -> None:
        if self.local_id == "me":  # the leader's connections, not the workers' to each other
            frames.append(bytes(frame))
        on_frame(self, frame)

    monkeypatch.setattr(Connection, "_on_frame", recording)
    x, y = _toy(40, seed=12)
    shards = _shards(x, y, split_indices(40, 2, "round-robin", batch_size=8, seed=0))
    options = Settings(epochs=3, lr=0.05, batch_size=8, seed=0, hidden=(8,))
    model, reference = make_model(3, options.hidden, seed=0), make_model(3, options.hidden, seed=0)
    async with holding("virtual", shards) as workers:
        dataset = await FederatedDataset.from_workers(workers, TOY)
        await train_walk(model, FederatedDataLoader(dataset, options.batch_size, seed=options.seed), options)
        del dataset
        assert frames, "the recorder saw nothing"
        received = [t for frame in frames for m in Codec().decode(frame) for t in _tensors(list(m))]
        # the trained parameters (one flat vector) and each worker's losses of every epoch
        assert len(received) >= 1 + options.epochs * len(workers)
        assert _leaks(frames, x, y) == []
        # the recorder does see data when data does travel
        frames.clear()
        assert torch.equal(await actors.send(x[:3], workers[0]).get(), x[:3])
        assert "the bytes of a feature row" in _leaks(frames, x, y)
    reference_walk(reference, shards, options)
    _assert_same_parameters(model, reference)


@pytest.mark.filterwarnings("ignore:size_average and reduce args will be deprecated")
async def test_model_updates_let_training_losses_and_trained_parameters_leave_and_nothing_else() -> None:
    """The release's label rules (``privacy.federated.releases``), step by step on a worker."""
    x, y = _toy(16)
    async with holding("virtual", [(x, y)]) as (owner,):
        data_x, data_y = owner.published(f"{TOY}/x"), owner.published(f"{TOY}/y")
        weight = actors.send(torch.zeros(3, 1, requires_grad=True), owner)
        output = data_x @ weight  # a model's output: it requires grad
        # what is not a training loss stays: an elementwise loss (either way of asking for one),
        # the output itself, a loss of the data alone, a plain statistic of the data
        kept = [
            F.mse_loss(output, data_y, reduction="none"),
            call(owner, "F.mse_loss", [output, data_y], {"reduce": False}),
            data_x @ weight,
            F.mse_loss(data_x[:, :1], data_y),
            data_x.sum(),
        ]
        for value in kept:
            with pytest.raises(PermissionDenied, match="form raw"):
                await value.get()
            owner.connection.release(value.id)  # a refused get leaves the object there
        loss = F.l1_loss(output, data_y)
        loss.backward()
        call(owner, "optim.sgd_step", [[weight]], {"lr": 0.1})
        # the training loss and the parameters a step changed with its gradients leave
        assert torch.equal(await loss.get(), F.l1_loss(x @ torch.zeros(3, 1), y))
        trained = await weight.get()
        assert trained.shape == (3, 1) and not torch.equal(trained, torch.zeros(3, 1))
        # data copied into a gradient is not a gradient: what a step writes with it stays
        smuggled = actors.send(torch.zeros(3, 1, requires_grad=True), owner)
        smuggled.grad = data_x[:3, :1]
        call(owner, "optim.sgd_step", [[smuggled]], {"lr": -1.0})
        call(owner, "optim.zero_grad", [[smuggled]])  # the parameter's own label is what keeps it
        with pytest.raises(PermissionDenied, match="form raw"):
            await smuggled.get()
        owner.connection.release(smuggled.id)
        del data_x, data_y, output, kept, value, loss


async def test_a_workers_own_data_cannot_be_fetched_moved_or_deleted(transport) -> None:
    x, y = _toy(12)
    refused = "its label does not let it leave"
    async with holding(transport, [(x[:6], y[:6]), (x[6:], y[6:])]) as owners:
        bob, alice = owners
        with pytest.raises(PermissionDenied, match=f"on {bob.id}: .*{refused}.*releases model_updates"):
            await bob.published(f"{TOY}/x").get()
        with pytest.raises(PermissionDenied, match=refused):
            await bob.published(f"{TOY}/y").fetch()
        moved = bob.published(f"{TOY}/x").move(alice)
        assert moved.location is alice
        with pytest.raises(PermissionDenied, match=refused):
            await moved
        with pytest.raises(PermissionDenied, match=refused):
            await moved.get()
        # a dropped pointer, and even an explicit delete, leave the data where it is
        pointer = await bob.published(f"{TOY}/x")
        assert pointer.shape == (6, 3)
        del pointer
        gc.collect()
        bob.connection.release(published_id(f"{TOY}/x"))
        bob.connection.release(published_id(f"{TOY}/y"))
        await asyncio.sleep(0)
        assert (await bob.ping())["objects"] == 2
        assert (await alice.ping())["objects"] == 2
        # and it is intact (looked at on the workers: it does not leave them), and computing on
        # it where it is still works
        for actor, (held_x, held_y) in zip(owners.actors, [(x[:6], y[:6]), (x[6:], y[6:])], strict=True):
            assert torch.equal(actor.store.objects[published_id(f"{TOY}/x")], held_x)
            assert torch.equal(actor.store.objects[published_id(f"{TOY}/y")], held_y)
        doubled = await (bob.published(f"{TOY}/x") * 2).sum()
        assert torch.equal(owners.actors[0].store.objects[doubled.id], (x[:6] * 2).sum())
        del doubled


async def test_shards_of_different_lengths_are_refused() -> None:
    async with actors.VirtualWorker("uneven") as worker:
        publish_shard(worker.worker, TOY, torch.zeros(5, 3), torch.zeros(4, 1))
        with pytest.raises(ValueError, match="uneven holds 5 features but 4 targets"):
            await FederatedDataset.from_workers([worker], TOY)


async def test_a_store_cannot_overwrite_a_workers_own_data() -> None:
    async with actors.VirtualWorker("victim") as worker:
        publish_shard(worker.worker, TOY, torch.ones(4, 3), torch.ones(4, 1))
        connection = worker.connection
        connection.tell(Store(connection.next_id(), connection.local_id, published_id(f"{TOY}/x"),
                              torch.zeros(1), "victim"))  # fmt: skip
        assert (await worker.published(f"{TOY}/x")).shape == (4, 3)


async def test_a_command_result_cannot_take_over_a_workers_own_data() -> None:
    x = torch.randn(4, 3)
    async with actors.VirtualWorker("victim") as worker:
        publish_shard(worker.worker, TOY, x, torch.ones(4, 1))
        target = published_id(f"{TOY}/x")
        source = worker.published(f"{TOY}/x")
        worker.connection.command(target, "Tensor.clone", [source], None)
        taken = PointerTensor(worker, target)
        with pytest.raises(PermissionDenied):
            await taken.fetch()


# -- the default settings on the real data ---------------------------------------------------
def _require(name: str) -> None:
    path = data_dir() / SOURCES[name].filename
    if not path.is_file():
        pytest.skip(f"{path.name} not found in {data_dir()} (set $AIOSYFT_DATA to the datasets folder)")


async def test_boston_defaults_reach_the_papers_test_mse() -> None:
    _require("boston")
    result = await train_command(Federation("boston", 2), "virtual", "walk", DEFAULTS["boston"], rounds=1)
    assert result.metric <= 25.0
    assert len(result.losses) == DEFAULTS["boston"].epochs
    assert result.losses[-1] < result.losses[0]


async def test_pima_defaults_reach_the_target_accuracy() -> None:
    _require("pima")
    result = await train_command(Federation("pima", 2), "virtual", "walk", DEFAULTS["pima"], rounds=1)
    assert result.metric >= 0.72
    assert len(result.losses) == DEFAULTS["pima"].epochs


async def test_boston_over_worker_processes_gives_exactly_the_virtual_result() -> None:
    _require("boston")
    options = DEFAULTS["boston"]
    data = load("boston", seed=options.seed)
    federation = Federation("boston", 2, seed=options.seed, batch_size=options.batch_size)
    shards = federation.shards(data)
    async with federated_workers("virtual", federation, data) as workers:
        virtual = await federated_run(workers, data, options, "walk")
    async with federated_workers("ws", federation, data) as workers:
        assert [w.address.startswith("ws://") for w in workers] == [True, True]
        for worker, (x, y) in zip(workers, shards, strict=True):  # each process loaded its own shard
            # (its values stay there: the equal results below are what shows they are the same)
            assert (await worker.published("boston/x")).shape == x.shape
            assert (await worker.published("boston/y")).shape == y.shape
            with pytest.raises(PermissionDenied):
                await worker.published("boston/x").sum(dim=0).get()
        processes = await federated_run(workers, data, options, "walk")
    assert processes.metric == virtual.metric
    assert processes.losses == virtual.losses
    assert virtual.metric <= 25.0
    model = make_model(data.x_test.shape[1], options.hidden, options.seed)
    reference_walk(model, shards, options)
    with torch.no_grad():
        expected = float(torch.nn.functional.mse_loss(model(data.x_test), data.y_test))
    assert virtual.metric == expected


async def test_two_ws_workers_that_talked_to_each_other_stop_promptly() -> None:
    servers = [
        await actors.serve(actors.Worker(name, credentials=CREDENTIALS, secret=secret_of(name)), "ws")
        for name in ("ping0", "pong0")
    ]
    a, b = [await actors.connect(s.address, identity="me", secret=secret_of("me")) for s in servers]
    try:
        assert torch.equal(await actors.send(torch.ones(3), a).move(b).move(a).get(), torch.ones(3))
        await a.close()
        await b.close()
        # as a cluster stops: every worker is told to stop at once
        await asyncio.wait_for(asyncio.gather(*(server.close() for server in servers)), 2.0)
    finally:
        for server in servers:
            await server.worker.close()
        for server in servers:
            await server.close()


async def test_models_the_fused_walk_cannot_take_fall_back_or_are_refused() -> None:
    """BatchNorm keeps running statistics, which a flat vector of parameters would not carry."""
    with_buffers = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 1))
    assert fusable(with_buffers) is None
    assert fusable(make_model(3, (4,))) == module_spec(make_model(3, (4,)))
    x, y = _toy(16)
    async with holding("virtual", [(x, y)]) as workers:
        dataset = await FederatedDataset.from_workers(workers, TOY)
        with pytest.raises(TypeError, match="fused"):
            await train_walk(with_buffers, FederatedDataLoader(dataset, 8), Settings(epochs=1), fused=True)
        del dataset


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "op-by-op"])
async def test_a_step_that_fails_stops_the_walk_with_the_workers_error(recwarn, caplog, fused) -> None:
    """The leader runs an epoch ahead; a failed step still surfaces as the worker's error, with
    nothing left behind: no mean never awaited, no failure never retrieved (every later step
    fails alike), no object left on the workers. The step ran on the owners' data, so the error
    keeps its type but not its message (it could quote the data)."""
    x, y = _toy(32)
    shards = [(x[:16].clone(), y[:16].view(-1).clone()), (x[16:].clone(), y[16:].view(-1).clone())]
    async with holding("virtual", shards) as workers:
        dataset = await FederatedDataset.from_workers(workers, TOY)
        settings_ = Settings(epochs=3, loss="cross_entropy", hidden=(4,))  # float targets: not classes
        with pytest.raises(RuntimeError, match="details withheld") as failure:
            await train_walk(make_model(3, (4,)), FederatedDataLoader(dataset, 8), settings_, fused=fused)
        assert isinstance(failure.value, RemoteError)
        del dataset, failure
        gc.collect()
        await asyncio.sleep(0.01)
    assert not [w for w in recwarn if "never awaited" in str(w.message)]
    assert "never retrieved" not in caplog.text
