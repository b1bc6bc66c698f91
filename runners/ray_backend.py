"""Workers placed and supervised by a Ray cluster: ``launch(..., backend="ray")`` and
``aiosyft launch --backend ray``.

Users who outgrow one machine already run a cluster scheduler, so the project uses one rather
than grow its own: Ray chooses each worker's node (a node, a custom resource such as
``owner:alice`` that the data owner's node advertises, a placement group), restarts it, and
reports its death. Ray carries control only: ids, options, credentials (hashes, and each
worker's own secret), addresses. Tensors never go through Ray's object store or an actor
method's arguments: a worker loads its data where it runs, from a directory on its node, and
every value travels over our own transports, leader to worker and worker to worker.

Each worker is an async Ray actor whose event loop runs :func:`runners.cluster.start_worker`, the
code an ``aiosyft worker`` process runs, bound to its node's IP, so a Ray-placed worker is the
same worker with the same data path. The launcher provisions identities as
:func:`runners.cluster.start_processes` does.

This is the only module that imports Ray, and only :func:`runners.cluster.load_ray_backend`
imports it, when the Ray backend is asked for: the project imports and runs without Ray.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import secrets
import socket
import tempfile
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError
from ray.util.placement_group import get_placement_group
from ray.util.scheduling_strategies import (
    NodeAffinitySchedulingStrategy,
    PlacementGroupSchedulingStrategy,
)

import actors
from actors import log
from actors.identity import Credentials, new_secret
from actors.log import get_logger
from actors.tls import TlsConfig, issue_certificates
from actors.worker import GRACE
from protocol import SyftError, WorkerLost
from runners.cluster import LEADER, SPIN, Cluster, Placement, WorkerStartFailed, start_worker
from runners.federated import Federation

#: The Ray namespace of every worker actor, so ``ray list actors`` and cleanup checks find them.
NAMESPACE = "aiosyft"
#: How long a launch waits for every worker to be placed, started and serving. A worker that
#: asks for a resource no node offers stays pending for ever in Ray; this turns that into an
#: error naming it.
START_TIMEOUT = 60.0
#: How long a launch tries to open a TCP connection to a given Ray address before refusing it.
PROBE_TIMEOUT = 5.0
#: How long shutdown lets the workers close their endpoints before their actors are killed.
GRACEFUL_STOP = 2.0
#: How long shutdown waits for Ray to confirm each killed actor dead.
STOP_TIMEOUT = 10.0

_log = get_logger()


class RayUnavailable(SyftError, ConnectionError):
    """The Ray cluster at ``address`` cannot be reached."""

    address: str | None = None


@dataclass(frozen=True)
class WorkerSpec:
    """Everything that crosses Ray to start one worker: options and credentials, no data.

    ``credentials`` holds hashes only; ``secret`` is this worker's own, as a launched process
    gets it in its environment. ``tls_pem`` is (CA, certificate, key) as PEM text, written to a
    private directory on the worker's node."""

    worker_id: str
    transport: str
    host: str | None
    port: int
    credentials: Credentials
    secret: str
    threads: int = 1
    federation: Federation | None = None
    shard: int = 0
    data_dir: str | None = None
    releases: tuple[actors.Release, ...] = (actors.ModelUpdates(),)
    enable: tuple[str, ...] | None = None
    spin: float = SPIN
    grace: float = GRACE
    log_level: int = logging.WARNING
    tls_pem: tuple[str, str, str] | None = None


@dataclass(frozen=True)
class Placed:
    """Where a worker ended up, as its actor reports it."""

    address: str
    node_id: str
    node_ip: str
    pid: int


class WorkerActor:
    """One worker in an async Ray actor: its event loop serves the worker's endpoint.

    Ray runs ``__init__`` again on every restart, with the same spec; serving starts on the first
    method call (``start``), which the launcher makes at launch and again after a restart, so a
    restarted worker reloads its data from its directory and its ledger from its file before
    it serves anyone."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.server: actors.Server | None = None
        self._lock: asyncio.Lock | None = None
        self._stopped: asyncio.Event | None = None
        self._tls_dir: tempfile.TemporaryDirectory[str] | None = None

    async def start(self) -> Placed:
        """Serve (once) and say where: the address, the node, the process."""
        self._lock = self._lock or asyncio.Lock()
        async with self._lock:
            if self.server is None:
                self.server = await self._serve()
        node, ip = ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address()
        address = self.server.address
        scheme, _, rest = address.partition("://")
        host, _, port = rest.rpartition(":")
        if _unspecified(host):  # listening on every interface: reached at the node's IP
            address = f"{scheme}://{ip}:{port}"
        return Placed(address, node, ip, os.getpid())

    async def _serve(self) -> actors.Server:
        spec = self.spec
        log.configure(spec.log_level)
        tls = None
        if spec.tls_pem is not None:  # the certificates live on this node, readable by this process
            self._tls_dir = tempfile.TemporaryDirectory(prefix="aiosyft-tls-")
            paths = []
            for name, text in zip(("ca.pem", "cert.pem", "key.pem"), spec.tls_pem, strict=True):
                path = Path(self._tls_dir.name) / name
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "w") as file:
                    file.write(text)
                paths.append(path)
            tls = TlsConfig(*paths)
        data = None
        if spec.federation is not None:
            data = (spec.federation, spec.shard, spec.data_dir)
        # What ``aiosyft worker`` imports: the command sets it registers, and their defaults.
        from runners.cli import DEFAULT_SETS  # noqa: PLC0415 - the worker process's imports, here

        enable = spec.enable if spec.enable is not None else DEFAULT_SETS
        host = spec.host or ray.util.get_node_ip_address()
        server = await start_worker(
            spec.worker_id, spec.transport, host, spec.port, credentials=spec.credentials,
            secret=spec.secret, threads=spec.threads, data=data, releases=spec.releases,
            spin=spec.spin, enable=enable, grace=spec.grace, tls=tls,
        )  # fmt: skip
        node = ray.get_runtime_context().get_node_id()
        get_logger(worker=spec.worker_id).info("serving in a Ray actor", address=server.address, node=node)
        return server

    async def wait(self) -> None:
        """Return only once the worker was stopped on purpose: the launcher keeps one call
        pending per worker, and Ray fails it the moment the actor dies."""
        self._stopped = self._stopped or asyncio.Event()
        await self._stopped.wait()

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.close()
        self._stopped = self._stopped or asyncio.Event()
        self._stopped.set()


_RemoteWorkerActor = ray.remote(WorkerActor)


def _unspecified(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_unspecified
    except ValueError:  # a name
        return False


class RayCluster(Cluster):
    """A :class:`~runners.cluster.Cluster` whose workers are Ray actors, supervised.

    A worker's death is reported at once by name: the leader's link to it fails with
    :class:`WorkerLost` (as for any worker), and Ray's report of the actor's death arrives in
    :meth:`next_loss`, also a :class:`WorkerLost` naming it. With ``restarts``, Ray restarts it
    and :meth:`reconnect` hands the leader a new link to it."""

    def __init__(self, restarts: int = 0) -> None:
        super().__init__()
        self.restarts = restarts
        self.handles: dict[str, Any] = {}
        self.placed: dict[str, Placed] = {}
        #: How many times each worker died (Ray's reports).
        self.deaths: dict[str, int] = {}
        self._losses: asyncio.Queue[WorkerLost] = asyncio.Queue()
        self._back: dict[str, asyncio.Event] = {}
        self._watchers: dict[str, asyncio.Task[None]] = {}
        self._stopping = False
        self.started_ray = False

    async def next_loss(self) -> WorkerLost:
        """The next worker death Ray reported, naming the worker (``.worker``, ``.address``)."""
        return await self._losses.get()

    def restarts_left(self, worker_id: str) -> int:
        return max(0, self.restarts - self.deaths.get(worker_id, 0))

    async def serving(self, worker_id: str) -> Placed:
        """Where ``worker_id`` serves; after a death, once Ray has restarted it. Raises
        :class:`WorkerLost` when it died with no restart left."""
        await self._back[worker_id].wait()
        if worker_id not in self.placed:
            raise WorkerLost(f"worker {worker_id} died for good: Ray did not restart it")
        return self.placed[worker_id]

    async def reconnect(self, worker_id: str) -> actors.RemoteWorker:
        """A new link to ``worker_id`` once Ray has restarted it (call it after the death was
        reported, :meth:`next_loss`); it replaces the old handle in the cluster. The restarted
        worker reloaded its data and ledger; objects it held before are gone, and old pointers
        to them stay invalid."""
        placed = await self.serving(worker_id)
        worker = await actors.connect(placed.address, identity=LEADER, secret=self.secret, tls=self.tls)
        for index, old in enumerate(self.workers):
            if old.id == worker_id:
                await old.close()
                self.workers[index] = worker
                break
        else:
            self.workers.append(worker)
        return worker

    def kill(self, worker_id: str, *, restart: bool = True) -> None:
        """Kill a worker's actor as a crash would (Ray may restart it, within ``restarts``)."""
        ray.kill(self.handles[worker_id], no_restart=not restart)

    def _watch(self, worker_id: str) -> None:
        self._back[worker_id] = asyncio.Event()
        self._back[worker_id].set()  # serving
        self._watchers[worker_id] = asyncio.get_running_loop().create_task(self._supervise(worker_id))

    async def _supervise(self, worker_id: str) -> None:
        handle = self.handles[worker_id]
        logger = get_logger(worker=worker_id)
        while not self._stopping:
            try:
                await handle.wait.remote()
                return  # stopped on purpose
            except RayActorError as exc:
                if self._stopping:
                    return
                placed = self.placed.pop(worker_id, None)
                self._back[worker_id] = asyncio.Event()
                self.deaths[worker_id] = self.deaths.get(worker_id, 0) + 1
                where = f" at {placed.address} on node {placed.node_id[:12]}" if placed else ""
                reason = " ".join(str(exc).split())[:300]
                lost = WorkerLost(f"worker {worker_id}{where} died (Ray: {reason})")
                lost.worker, lost.address = worker_id, placed.address if placed else None
                logger.error("worker lost", address=lost.address, restarts_left=self.restarts_left(worker_id))
                self._losses.put_nowait(lost)
                for worker in self.workers:  # a dead node may never close our link: Ray knows first
                    if worker.id == worker_id and worker.connection.lost is None:
                        await worker.close()
            try:  # a restarted actor serves again on its first call; a dead one fails it
                placed = await _restarted(handle)
            except (RayActorError, RayTaskError) as exc:
                if self._stopping:
                    return
                logger.error("worker not restarted", reason=" ".join(str(exc).split())[:300])
                self._back[worker_id].set()  # wakes waiters; nothing placed: gone for good
                return
            self.placed[worker_id] = placed
            self.addresses[worker_id] = placed.address
            logger.warning("worker restarted", address=placed.address, node=placed.node_id)
            self._back[worker_id].set()

    async def stop(self) -> None:
        """Close the links, kill every actor, wait until Ray confirms each one dead, and leave
        Ray as found (shut down only a Ray this launch started)."""
        self._stopping = True
        for worker in self.workers:
            await worker.close()
        for watcher in self._watchers.values():
            watcher.cancel()
        # Close each endpoint first, as a local worker closes on SIGTERM, then kill the actor.
        stops = [handle.stop.remote() for handle in self.handles.values()]
        with contextlib.suppress(RayActorError, RayTaskError, TimeoutError):
            async with asyncio.timeout(GRACEFUL_STOP):
                await asyncio.gather(*stops, return_exceptions=True)
        for handle in self.handles.values():
            with contextlib.suppress(RayActorError, ValueError):
                ray.kill(handle, no_restart=True)
        for worker_id, handle in self.handles.items():
            try:
                async with asyncio.timeout(STOP_TIMEOUT):
                    while True:  # a stopped actor answers at once until its kill lands
                        await handle.wait.remote()
                        await asyncio.sleep(0.05)
            except (RayActorError, RayTaskError):
                pass  # dead, as asked
            except TimeoutError:
                _log.warning("Ray did not confirm the worker's death", worker=worker_id)
        self.handles.clear()
        if self.directory is not None:
            self.directory.cleanup()
            self.directory = None
        if self.started_ray:
            ray.shutdown()
            self.started_ray = False


def connect_ray(address: str | None, *, cpus_needed: float = 0) -> bool:
    """Join the Ray cluster at ``address`` (``auto``, ``HOST:PORT`` or ``ray://HOST:PORT``), or
    with ``None`` start a private one on this machine, sized to the workers' CPUs (Ray counts
    CPUs logically; a worker mostly waits on the network). Returns whether Ray was started
    here, for the caller to shut down. An already connected driver (a script, a test) is used
    as it is."""
    if ray.is_initialized():
        return False
    options: dict[str, Any] = {"namespace": NAMESPACE, "logging_level": logging.WARNING,
                               "log_to_driver": log.verbosity() > 0}  # fmt: skip
    if address is None:
        options |= {
            "num_cpus": max(os.cpu_count() or 1, int(cpus_needed + 0.999)),
            "include_dashboard": False,
        }
    else:
        _probe(address)
    try:
        ray.init(address=address, **options)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        error = RayUnavailable(f"cannot reach the Ray cluster at {address}: {' '.join(str(exc).split())}")
        error.address = address
        raise error from exc
    return True


def _probe(address: str) -> None:
    """Fail at once, naming ``address``, when nothing listens there: Ray itself retries an
    unreachable cluster for minutes before it says so."""
    host, colon, port = address.removeprefix("ray://").rpartition(":")
    if not colon or not port.isdigit():
        return  # "auto", or a form Ray resolves itself
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_TIMEOUT):
            pass
    except OSError as exc:
        error = RayUnavailable(f"cannot reach the Ray cluster at {address}: {exc.strerror or exc}")
        error.address = address
        raise error from None


def _strategy(worker_id: str, placement: Placement) -> dict[str, Any]:
    """Ray's options for one worker's placement; a node given by IP must name one node."""
    options: dict[str, Any] = {}
    if placement.resources:
        options["resources"] = dict(placement.resources)
    if placement.node is not None:
        alive = [node for node in ray.nodes() if node.get("Alive")]
        node_ids = [n["NodeID"] for n in alive if placement.node in (n["NodeID"], n["NodeManagerAddress"])]
        if len(node_ids) != 1:
            state = "no live node" if not node_ids else f"{len(node_ids)} nodes (give a node id)"
            raise WorkerStartFailed(f"worker {worker_id}: node {placement.node} matches {state}")
        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_ids[0], soft=False)
    elif placement.placement_group is not None:
        try:
            group = get_placement_group(placement.placement_group)
        except ValueError:
            raise WorkerStartFailed(
                f"worker {worker_id}: no placement group named {placement.placement_group!r}"
            ) from None
        options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
            group, placement_group_bundle_index=placement.bundle
        )
    return options


def _tls_material(
    ids: list[str], host: str | None, directory: Path
) -> tuple[dict[str, tuple[str, str, str]], TlsConfig]:
    """Certificates for the workers and the leader, valid for every live node's IP (where a
    worker may land), ``host`` and loopback; the workers' as PEM text to send with their spec."""
    ips = [node["NodeManagerAddress"] for node in ray.nodes() if node.get("Alive")]
    hosts = dict.fromkeys([*([host] if host else []), *ips, "127.0.0.1", "::1", "localhost"])
    certificates = issue_certificates(directory, [LEADER, *ids], hosts)
    pem = {
        worker_id: (config.ca.read_text(), config.cert.read_text(), config.key.read_text())
        for worker_id, config in certificates.items()
        if worker_id != LEADER
    }
    return pem, certificates[LEADER]


async def start_ray_workers(
    ids: list[str],
    transport: str,
    *,
    address: str | None = None,
    host: str | None = None,
    port: int = 0,
    threads: int = 1,
    cpus: float = 1.0,
    placement: Mapping[str, Placement] | None = None,
    federation: Federation | None = None,
    data_dir: str | None = None,
    releases: Mapping[str, tuple[actors.Release, ...]] | None = None,
    enable: Iterable[str] | None = None,
    restarts: int = 0,
    tls: bool = False,
) -> RayCluster:
    """Start one worker actor per id on the Ray cluster at ``address`` and wait until each
    serves; with a ``federation``, worker k loads shard k of its dataset from ``data_dir`` (a
    directory on its node; default: that node's ``$AIOSYFT_DATA``). ``releases``: what each
    worker's shard lets leave (default model updates); a sanitized release's ledger is a file
    on the worker's node, so a restarted worker keeps its spent budget. ``host``: where each
    worker listens (default: its node's IP). ``restarts``: how many times Ray restarts a
    worker that dies."""
    if LEADER in ids:
        raise ValueError(f"{LEADER!r} is the leader's identity; name the workers otherwise")
    unknown = set(placement or {}) - set(ids)
    if unknown:
        raise ValueError(f"placement names no launched worker: {', '.join(sorted(unknown))}")
    cluster = RayCluster(restarts)
    cluster.started_ray = connect_ray(address, cpus_needed=cpus * len(ids))
    try:
        secrets_by_id = {identity: new_secret() for identity in [LEADER, *ids]}
        cluster.secret = secrets_by_id[LEADER]
        cluster.directory = tempfile.TemporaryDirectory(prefix="aiosyft-")
        Credentials.write(Path(cluster.directory.name) / "credentials", secrets_by_id)
        credentials = Credentials.from_secrets(secrets_by_id)  # hashes only cross Ray
        pem: dict[str, tuple[str, str, str]] = {}
        if tls:
            pem, cluster.tls = _tls_material(ids, host, Path(cluster.directory.name) / "tls")
        tag = secrets.token_hex(3)
        for index, worker_id in enumerate(ids):
            spec = WorkerSpec(
                worker_id, transport, host, port + index if port else 0, credentials,
                secrets_by_id[worker_id], threads, federation, index, data_dir,
                (releases or {}).get(worker_id, (actors.ModelUpdates(),)),
                tuple(enable) if enable is not None else None, tls_pem=pem.get(worker_id),
                log_level=(logging.WARNING, logging.INFO, logging.DEBUG)[log.verbosity()],
            )  # fmt: skip
            options = _strategy(worker_id, (placement or {}).get(worker_id, Placement()))
            cluster.handles[worker_id] = _RemoteWorkerActor.options(
                name=f"{worker_id}.{tag}", namespace=NAMESPACE, num_cpus=cpus, max_restarts=restarts,
                max_task_retries=0, max_concurrency=1000, **options,
            ).remote(spec)  # fmt: skip
        starts = {worker_id: handle.start.remote() for worker_id, handle in cluster.handles.items()}
        for worker_id, ref in starts.items():
            cluster.placed[worker_id] = await _started(worker_id, ref, placement, cpus)
            cluster.addresses[worker_id] = cluster.placed[worker_id].address
        for worker_id in ids:
            cluster._watch(worker_id)
    except BaseException:
        await cluster.stop()
        raise
    return cluster


async def _restarted(handle: Any) -> Placed:
    """The placement of a restarted actor once it serves again; Ray refuses calls (actor
    unavailable) while it restarts, and fails them for good (actor died) when it will not."""
    while True:
        try:
            return await handle.start.remote()
        except ActorUnavailableError:
            await asyncio.sleep(0.1)


async def _started(
    worker_id: str, ref: Any, placement: Mapping[str, Placement] | None, cpus: float
) -> Placed:
    """The worker's placement once it serves; its failure to start, named."""
    try:
        async with asyncio.timeout(START_TIMEOUT):
            return await ref
    except TimeoutError:
        wanted = (placement or {}).get(worker_id, Placement())
        raise WorkerStartFailed(
            f"worker {worker_id} was not placed and serving within {START_TIMEOUT:g} s "
            f"(asked for {cpus:g} CPU, {wanted}): does a live node offer it?"
        ) from None
    except RayTaskError as exc:
        cause = getattr(exc, "cause", exc)
        raise WorkerStartFailed(
            f"worker {worker_id} could not start: {type(cause).__name__}: {cause}"
        ) from None
    except RayActorError as exc:
        raise WorkerStartFailed(
            f"worker {worker_id} died before it was ready: {' '.join(str(exc).split())[:300]}"
        ) from None


@contextlib.asynccontextmanager
async def ray_cluster(ids: list[str], transport: str = "ws", **options: Any) -> AsyncIterator[RayCluster]:
    """Ray-placed workers, connected: as :func:`runners.cluster.local_cluster`. Leaving the
    block closes the links, kills every actor and waits until Ray confirms them dead."""
    cluster = await start_ray_workers(ids, transport, **options)
    try:
        for worker_id in ids:
            cluster.workers.append(
                await actors.connect(
                    cluster.addresses[worker_id], identity=LEADER, secret=cluster.secret, tls=cluster.tls
                )
            )
        yield cluster
    finally:
        await cluster.stop()


__all__ = ["NAMESPACE", "Placed", "RayCluster", "RayUnavailable", "WorkerSpec", "ray_cluster",
           "start_ray_workers"]  # fmt: skip
