"""Workers placed and supervised by Ray (``launch(..., backend="ray")``, ``aiosyft launch
--backend ray``), on a real Ray cluster of several nodes on this machine, never a mock.

One cluster for the whole module (Ray's own cluster utilities start a head and two more
nodes, each its own raylet, in about 5 s): the head offers ``owner:alice``, the others
``owner:bob`` and ``owner:carol``, as data owners' machines would. Ray's logs go to a temporary
directory and no dashboard starts. Skipped, saying why, only when Ray cannot start here.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import actors
import mpc
from actors.pointer import call
from actors.tls import TlsConfig
from privacy.dp import Ledger, Plan, Sanitized
from privacy.federated import flat_parameters, spec_key
from protocol import BudgetExhausted, WorkerLost
from protocol.modules import module_spec
from runners import launch
from runners.cluster import Placement, WorkerStartFailed
from runners.datasets import data_dir, load
from runners.experiments import DEFAULTS, federated_run, worker_ids
from runners.federated import Federation
from tests.conftest import bounded, needs_data

ROOT = Path(__file__).resolve().parent.parent
U = 2.0**-16


def _named_actors() -> list[str]:
    """Our worker actors Ray still counts alive, whoever started them."""
    import ray  # noqa: PLC0415

    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == "aiosyft"]


async def _gone(pids: list[int], seconds: float = 10.0) -> list[int]:
    """The processes among ``pids`` still running after ``seconds``."""
    for _ in range(int(seconds * 20)):
        left = [pid for pid in pids if Path(f"/proc/{pid}").exists()]
        if not left:
            return []
        await asyncio.sleep(0.05)
    return left


@pytest.fixture(scope="module")
def nodes() -> Iterator[dict[str, Any]]:
    """A three-node Ray cluster on this machine: each owner's node id, and its address."""
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]')")
    from ray.cluster_utils import Cluster  # noqa: PLC0415

    # Ray's sockets live in its temporary directory: a short path, and the address file too.
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    previous = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = temp
    cluster = None
    try:
        try:
            cluster = Cluster(
                initialize_head=True,
                head_node_args={"num_cpus": 2, "resources": {"owner:alice": 1}, "include_dashboard": False},
            )
            bob = cluster.add_node(num_cpus=2, resources={"owner:bob": 1})
            carol = cluster.add_node(num_cpus=2, resources={"owner:carol": 1})
            ray.init(address=cluster.address, logging_level=logging.WARNING, log_to_driver=False)
        except Exception as exc:  # any way Ray fails to start here is a reason to skip, stated
            if cluster is not None:
                cluster.shutdown()
            pytest.skip(f"Ray cannot start a cluster on this machine: {type(exc).__name__}: {exc}")
        yield {"alice": cluster.head_node.node_id, "bob": bob.node_id, "carol": carol.node_id,
               "address": cluster.address}  # fmt: skip
        ray.shutdown()
        cluster.shutdown()
    finally:
        if previous is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = previous
        shutil.rmtree(temp, ignore_errors=True)


def owner(name: str) -> Placement:
    return Placement(resources={f"owner:{name}": 1})


# -- placement and shutdown -------------------------------------------------------------------
@bounded(60)
async def test_workers_land_on_the_nodes_asked_for_and_shutdown_leaves_nothing(nodes):
    """By custom resource, by node id and by placement group (a bundle reserved on bob's node,
    not where Ray would put a worker unasked: the head); each listens on its node's IP, and data
    moves worker to worker over our transport. Leaving the block leaves no actor and no worker
    process."""
    import ray  # noqa: PLC0415

    group = ray.util.placement_group([{"CPU": 0.5, "owner:bob": 1}], name="bob-bundle")
    await group.ready()
    placement = {"alice": owner("carol"), "bob": Placement(node=nodes["bob"]),
                 "carol": Placement.parse("pg:bob-bundle/0")}  # fmt: skip
    try:
        start = time.perf_counter()
        async with launch(["alice", "bob", "carol"], "ws", backend="ray", cpus=0.5, placement=placement) as c:
            launched = time.perf_counter() - start
            placed = c.placed
            assert {w: placed[w].node_id for w in placed} == {
                "alice": nodes["carol"], "bob": nodes["bob"], "carol": nodes["bob"]
            }  # fmt: skip
            for worker_id, where in placed.items():
                assert c.addresses[worker_id].startswith(f"ws://{where.node_ip}:")
            assert len(_named_actors()) == 3
            alice, bob, carol = c
            data = torch.arange(6.0).view(2, 3)
            x = actors.send(data, alice)
            y = (x * 2).move(bob).move(carol)  # node to node directly; the leader relays nothing
            assert torch.equal(await y.get(), data * 2)
            del x
            pids = [where.pid for where in placed.values()]
    finally:
        ray.util.remove_placement_group(group)
    print(f"launch of 3 Ray workers: {launched:.2f} s")
    assert _named_actors() == []
    assert await _gone(pids) == []


def test_placement_specs_parse():
    assert Placement.parse("owner:alice") == Placement(resources={"owner:alice": 1.0})
    assert Placement.parse("gpu_box=0.5") == Placement(resources={"gpu_box": 0.5})
    assert Placement.parse("node:10.0.0.7") == Placement(node="10.0.0.7")
    assert Placement.parse("pg:owners/1") == Placement(placement_group="owners", bundle=1)
    for bad in ("pg:owners/x", "owner=lots", "x=0"):
        with pytest.raises(ValueError, match="placement"):
            Placement.parse(bad)


async def test_options_only_ray_takes_are_refused_by_the_local_backend():
    with pytest.raises(ValueError, match=r"address.*only the Ray backend"):
        async with launch(["alice"], backend="local", address="auto"):
            pass
    with pytest.raises(ValueError, match="unknown backend 'slurm'"):
        async with launch(["alice"], backend="slurm"):
            pass


@bounded(60)
async def test_a_worker_that_cannot_start_is_named_and_nothing_is_left(nodes):
    """A port already taken on the worker's node: the launch fails with the worker's name and
    the reason, and the actors it had started are gone."""
    import ray  # noqa: PLC0415

    with socket.socket() as taken:
        taken.bind((ray.util.get_node_ip_address(), 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(WorkerStartFailed, match=r"worker gina could not start: .*[Aa]ddress") as caught:
            async with launch(["gina"], "tcp", backend="ray", port=port, cpus=0.5):
                pass
    assert "gina" in str(caught.value)
    assert _named_actors() == []


# -- the same results over Ray-placed workers -------------------------------------------------
@needs_data
@bounded(150)
async def test_table1_over_ray_placed_workers_equals_local_processes(nodes):
    """Table 1's training (Boston, walk, 10 epochs, two ws workers each holding its shard,
    loaded where it runs): every epoch's loss and the test MSE equal bit for bit."""
    settings = DEFAULTS["boston"]
    directory = str(data_dir(None))
    data = load("boston", directory, seed=settings.seed)
    federation = Federation("boston", 2, "round-robin", settings.seed, settings.batch_size)
    ids = worker_ids(2)
    results = {}
    for backend, options in (
        ("local", {}),
        ("ray", {"cpus": 0.5, "placement": {ids[0]: owner("bob"), ids[1]: owner("carol")}}),
    ):
        async with launch(
            ids, "ws", backend=backend, federation=federation, data_dir=directory, **options
        ) as c:
            results[backend] = await federated_run(list(c), data, settings, "walk")
    assert len(results["ray"].losses) == settings.epochs
    assert results["ray"].losses == results["local"].losses
    assert results["ray"].metric == results["local"].metric


@bounded(90)
async def test_two_party_mpc_multiplication_over_ray_matches_local_processes(nodes):
    """SPDZ between two Ray-placed parties on different nodes with a provider on a third:
    the product is within the fixed-point bound of PyTorch's, as over local processes, and
    the two runs agree within twice that bound (fresh random shares each run). The Ray workers
    listen on every interface and are announced at their node's IP."""
    generator = torch.Generator().manual_seed(7)
    x = (torch.rand(3, 4, generator=generator) * 2 - 1) * 8
    y = (torch.rand(3, 4, generator=generator) * 2 - 1) * 8
    bound = (x.double().abs() + y.double().abs()) * U + U + (x * y).double().abs() * 2**-23
    products = {}
    placement = {"alice": owner("alice"), "bob": owner("bob"), "dave": owner("carol")}
    for backend, options in (
        ("local", {}),
        ("ray", {"cpus": 0.5, "placement": placement, "host": "0.0.0.0"}),
    ):
        async with launch(["alice", "bob", "dave"], "tcp", backend=backend, enable=["mpc", "provider"],
                          **options) as cluster:  # fmt: skip
            alice, bob, dave = cluster
            if backend == "ray":
                announced = {w: (cluster.addresses[w], p.node_ip) for w, p in cluster.placed.items()}
                assert all(a.startswith(f"tcp://{ip}:") for a, ip in announced.values()), announced
            sx = mpc.share(x, alice, bob, crypto_provider=dave)
            sy = mpc.share(y, alice, bob, crypto_provider=dave)
            products[backend] = (await (sx * sy).get()).double()
            del sx, sy
    for backend, product in products.items():
        assert bool(((product - (x * y).double()).abs() <= bound).all()), backend
    assert bool(((products["ray"] - products["local"]).abs() <= 2 * bound).all())


# -- supervision: death, restart, persisted state ---------------------------------------------
@needs_data
@bounded(120)
async def test_a_killed_worker_is_reported_by_name_and_restarts_with_its_data_and_ledger(nodes, tmp_path):
    """bob owns shard 0 of Boston under a DP budget whose ledger is a file on his node. Killing
    his actor is reported by name twice over (the leader's link, and Ray's report of the death);
    Ray restarts him; he reloads his shard from his data directory and his ledger from its file,
    so the leader, reconnected, gets exactly the lots the budget had left. With no restart left,
    the next death is final."""
    directory = str(data_dir(None))
    ledger = tmp_path / "bob.ledger"
    releases = {"bob": (Sanitized(epsilon=3.0, delta=1e-5, ledger=str(ledger)),)}
    federation = Federation("boston", 2)
    rows = len(federation.shards(load("boston", directory))[0][0])
    fits = Ledger("bob/boston", 3.0, 1e-5).remaining(Plan(40 / rows, 1.5))
    assert fits > 3
    model = nn.Sequential(nn.Linear(13, 4), nn.ReLU(), nn.Linear(4, 1))
    key, flat0 = spec_key(module_spec(model)), flat_parameters(model)
    options = {"lot": 40.0, "clip": 1.0, "sigma": 1.5, "lr": 0.01}

    async def serve_lots(worker: actors.RemoteWorker, most: int | None) -> int:
        flat = actors.send(flat0.clone(), worker)
        x, y = worker.published("boston/x"), worker.published("boston/y")
        served = 0
        while most is None or served < most:
            try:
                await call(worker, "dp.sgd_step", [key, flat, x, y], options).resolve()
            except BudgetExhausted:
                break
            served += 1
        return served

    async with launch(["bob"], "tcp", backend="ray", federation=federation, data_dir=directory, cpus=0.5,
                      placement={"bob": owner("bob")}, releases=releases, restarts=1) as cluster:  # fmt: skip
        bob = cluster["bob"]
        assert await serve_lots(bob, 3) == 3
        first = cluster.placed["bob"]
        held = actors.send(torch.ones(2), bob)
        await held
        cluster.kill("bob")
        lost = await asyncio.wait_for(cluster.next_loss(), 15)  # Ray's report
        assert lost.worker == "bob" and "worker bob" in str(lost) and lost.address == first.address
        with pytest.raises(WorkerLost) as link:  # our link's report
            await held.get()
        assert link.value.worker == "bob"
        del held

        bob = await asyncio.wait_for(cluster.reconnect("bob"), 60)
        assert cluster.placed["bob"].pid != first.pid
        assert cluster.placed["bob"].node_id == nodes["bob"]
        assert await serve_lots(bob, None) == fits - 3  # the restart forgot nothing it spent

        cluster.kill("bob")
        assert (await asyncio.wait_for(cluster.next_loss(), 15)).worker == "bob"
        with pytest.raises(WorkerLost, match="bob died for good"):
            await asyncio.wait_for(cluster.serving("bob"), 30)
    assert _named_actors() == []


# -- the command ------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["SIGINT", "SIGKILL"])
@bounded(90)
async def test_aiosyft_launch_backend_ray_places_serves_and_stops_every_actor(nodes, how):
    """``aiosyft launch --backend ray --address A --place ... --tls``: prints the addresses, the
    nodes, the leader's secret file and certificates; a leader connects with them over mutual
    TLS to a worker on another node, and that worker sends to the other over TLS too (their
    certificates name every node's IP). Stopping it leaves no actor and no worker process,
    even by SIGKILL: the actors belong to its Ray job, which dies with it."""
    argv = [sys.executable, "-m", "runners.cli", "launch", "--backend", "ray", "--address", nodes["address"],
            "--workers", "erin,fred", "--port", "0", "--cpus", "0.5", "--place", "erin=owner:bob",
            "--place", f"fred=node:{nodes['carol']}", "--transport", "tcp", "--tls"]  # fmt: skip
    process = await asyncio.create_subprocess_exec(*argv, cwd=ROOT, stdout=asyncio.subprocess.PIPE)
    assert process.stdout is not None
    addresses, nodes_of, pids, secret, tls = {}, {}, [], "", {}
    try:
        async with asyncio.timeout(60):
            while (line := (await process.stdout.readline()).decode()) and not line.startswith("ready"):
                words = line.split()
                if words[0] in ("erin", "fred"):
                    addresses[words[0]] = words[1]
                elif line.startswith("placed: "):
                    nodes_of[words[1]] = words[4]
                    pids.append(int(words[-1]))
                elif line.startswith("connect as AIOSYFT_IDENTITY=me"):
                    secret = Path(line.split(" from ", 1)[1].strip()).read_text().strip()
                elif line.startswith("TLS: "):
                    tls = dict(word.split("=", 1) for word in words if "=" in word)
        assert nodes_of == {"erin": nodes["bob"], "fred": nodes["carol"]}
        assert len(_named_actors()) == 2
        assert all(address.startswith("tls://") for address in addresses.values())
        config = TlsConfig(tls["AIOSYFT_TLS_CA"], tls["AIOSYFT_TLS_CERT"], tls["AIOSYFT_TLS_KEY"])
        fred = await actors.connect(addresses["fred"], identity="me", secret=secret, tls=config)
        erin = await actors.connect(addresses["erin"], identity="me", secret=secret, tls=config)
        moved = (actors.send(torch.ones(2), fred) * 5).move(erin)  # carol's node to bob's, over TLS
        assert torch.equal(await moved.get(), torch.full((2,), 5.0))
        await fred.close()
        await erin.close()
    finally:
        process.send_signal(getattr(signal, how))
        await asyncio.wait_for(process.wait(), 30)
    assert process.returncode == (0 if how == "SIGINT" else -signal.SIGKILL)
    assert await _gone(pids) == []
    assert _named_actors() == []


@bounded(60)
async def test_an_unreachable_ray_is_one_line_naming_its_address():
    pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]')")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "runners.cli", "launch", "--backend", "ray", "--address", "127.0.0.1:1",
        "--workers", "alice", cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, stderr = await process.communicate()
    assert process.returncode == 1
    lines = stderr.decode().strip().splitlines()
    assert lines == [lines[0]] and "RayUnavailable" in lines[0] and "127.0.0.1:1" in lines[0], lines


# -- Ray stays optional -----------------------------------------------------------------------
def test_only_the_ray_backend_imports_ray():
    """The project imports and runs without Ray: one module imports it, and nothing imports that
    module but the launcher, on demand."""
    import ast  # noqa: PLC0415

    importers = set()
    for room in ("protocol", "actors", "mpc", "privacy", "runners"):
        for path in (ROOT / room).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
                if isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                if any(n == "ray" or n.startswith(("ray.", "runners.ray_backend")) for n in names):
                    importers.add(str(path.relative_to(ROOT)))
    assert importers == {"runners/ray_backend.py", "runners/cluster.py"}
    text = (ROOT / "runners/cluster.py").read_text()
    assert "\nfrom runners import ray_backend" not in text and "\nimport ray" not in text  # lazily only


@bounded(60)
async def test_without_ray_the_ray_backend_is_one_line_saying_so():
    script = "import sys; sys.modules['ray'] = None; from runners.cli import main; main(sys.argv[1:])"
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, "launch", "--backend", "ray", "--workers", "alice", cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, stderr = await process.communicate()
    assert process.returncode == 1
    assert stderr.decode().strip().splitlines() == [
        "aiosyft launch: error: WorkerStartFailed: the Ray backend needs Ray: pip install -e '.[ray]'"
    ]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--address", "auto"], "--address applies with --backend ray only"),
        (["--restart", "2", "--cpus", "2"], "--cpus, --restart apply with --backend ray only"),
        (
            ["--backend", "ray", "--place", "zoe=owner:zoe"],
            "expected WORKER=SPEC with WORKER one of --workers",
        ),
        (["--backend", "ray", "--place", "alice=pg:x/y"], "the bundle after / is an index"),
        (["--backend", "ray", "--data-dir", "/d"], "--data-dir only applies with --dataset"),
        (
            ["--backend", "ray", "--dataset", "boston", "--state-dir", "/s"],
            "only applies with --release sanitized",
        ),
    ],
)
def test_launch_refuses_options_that_do_not_apply(capsys, argv, message):
    from runners.cli import main  # noqa: PLC0415

    with pytest.raises(SystemExit) as exit_:
        main(["launch", "--workers", "alice,bob", *argv])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
