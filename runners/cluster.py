"""Worker processes on this machine: one ``aiosyft worker`` each, supervised by their launcher.

A child prints ``READY <address>`` once it is warmed up and serving; the launcher waits for every
child's line, then connects (the connection's ping is the health check). The launcher provisions
identities: a fresh secret for each worker and for the leader (``me``), a credentials file of
their hashes that every worker checks connections against, and each child's own secret in its
environment (never on a command line, where ``ps`` shows it). Children watch their
standard input, a pipe the launcher holds open: when the launcher goes away by any means, even
SIGKILL, each child sees end-of-file and stops, so no worker outlives it. A worker whose standard
input is no pipe (a terminal, ``/dev/null`` under systemd, nohup or a container, a file, none at
all) has no launcher to outlive and serves until it is signalled.

A child that cannot start (a port in use, a missing dataset) says why in one ``FAILED <reason>``
line on its standard output instead of its own error line, and the launcher reports it naming the
worker, so a failed launch is one line too. Children log at the level their launcher logs.

:func:`launch` is the one entry point for scripts: ``backend="local"`` starts these processes,
``backend="ray"`` has a Ray cluster place and supervise the same workers
(:mod:`runners.ray_backend`, imported only then: Ray is optional).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ipaddress
import os
import signal
import stat
import sys
import tempfile
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
import torch

import actors
from actors.identity import (
    CREDENTIALS_ENV,
    IDENTITY_ENV,
    SECRET_ENV,
    Credentials,
    from_environment,
    new_secret,
)
from actors.log import get_logger, verbosity
from actors.tls import TlsConfig, issue_certificates
from actors.worker import GRACE
from privacy.federated import publish_shard
from protocol import WorkerLost
from runners.datasets import load
from runners.federated import Federation

#: The identity a launcher's own process (the leader) connects as.
LEADER = "me"

READY = "READY"
#: A launched child's report that it could not start, and the variable that asks it for one.
FAILED = "FAILED"
REPORT_ENV = "AIOSYFT_REPORT_TO_LAUNCHER"
_START_TIMEOUT = 60.0
_STOP_TIMEOUT = 5.0


#: How long a worker process keeps polling for an object it was told is coming. Long enough to
#: cover a peer's training step (a walk's hop), short enough not to starve other processes on a
#: small host: on 2 cores, 0.5-1 ms made the Table 1 walk 20% faster, 3 ms made it slower.
SPIN = 0.001


class WorkerStartFailed(WorkerLost):
    """A worker process exited, or said it failed, before it was ready."""


def is_loopback(host: str) -> bool:
    """Whether listening on ``host`` is reachable from this machine only."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a name: it may resolve to anything
        return False


def warm_up(threads: int) -> None:
    """Set torch's threads and pay the lazy first-use costs before reporting healthy.

    One thread per worker process: on a shared small host, torch's default threading made a tiny
    model many times slower. The first optimizer construction imports lazily (~0.8 s), so it is
    done here, and the objects of those imports are frozen out of the garbage collector's walks.
    """
    torch.set_num_threads(threads)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.nn.functional.mse_loss(model(torch.ones(2, 4)), torch.zeros(2, 1)).backward()
    optimizer.step()
    gc.collect()  # a worker process lives for its set-up: what exists now is never walked again
    gc.freeze()


@contextlib.contextmanager
def settled_heap() -> Iterator[None]:
    """Keep every object alive now out of the garbage collector's walks while the block runs.

    A process that has imported torch tracks ~190k objects; a pipelined epoch keeps enough
    messages in flight that young objects keep being promoted, and every few runs a full
    collection walks all of them (~80 ms on this kind of machine: 30 us per Table 1 step).
    Frozen objects are not walked; leaving the block gives them back to the collector, so a
    process that goes on (a test session) loses nothing.
    """
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


async def start_worker(
    worker_id: str,
    transport: str,
    host: str,
    port: int,
    *,
    credentials: Credentials | None = None,
    secret: str | None = None,
    threads: int = 1,
    data: tuple[Federation, int, str | None] | None = None,
    releases: tuple[actors.Release, ...] = (actors.ModelUpdates(),),
    spin: float = SPIN,
    enable: Iterable[str] | None = None,
    grace: float = GRACE,
    tls: TlsConfig | None = None,
) -> actors.Server:
    """Warm up, load and publish the shard, and serve one worker: everything a worker does before
    it is ready, shared by a worker process (:func:`run_worker`) and a Ray actor
    (:mod:`runners.ray_backend`), so a worker placed by Ray is the same worker.

    Credentials and the worker's own secret default to what the environment holds (a
    launcher's children); with none, any peer may claim any identity (a warning says so).
    With ``data`` = (federation, shard, data directory) the worker first loads the dataset and
    publishes its shard as its own data, releasing ``releases`` (model updates by default; a
    sanitized release keeps its ledger where it says, across restarts). ``spin``: see
    :meth:`actors.Worker.note_waiting`; ``enable``: the command sets it serves; ``grace``: how
    long a departed identity's objects are kept for it. ``tls`` (default: the ``$AIOSYFT_TLS_*``
    configuration) serves on ``wss://``/``tls://`` and dials peers over TLS only.
    """
    warm_up(threads)
    env_credentials, env_secret = from_environment()
    credentials = credentials or env_credentials
    secret = secret or env_secret
    tls = tls or TlsConfig.from_environment()
    worker = actors.Worker(
        worker_id, credentials=credentials, secret=secret, spin=spin, enable=enable, grace=grace, tls=tls
    )
    if data is not None:
        federation, shard, directory = data
        x, y = federation.shards(load(federation.dataset, directory, seed=federation.seed))[shard]
        publish_shard(worker, federation.dataset, x, y, releases)
    server = await actors.serve(worker, transport, host, port)
    if credentials is None:
        get_logger(worker=worker_id).warning(
            "no credentials: any peer may claim any identity", address=server.address
        )
    return server


async def run_worker(
    worker_id: str,
    transport: str,
    host: str,
    port: int,
    *,
    credentials: Credentials | None = None,
    secret: str | None = None,
    threads: int = 1,
    data: tuple[Federation, int, str | None] | None = None,
    releases: tuple[actors.Release, ...] = (actors.ModelUpdates(),),
    spin: float = SPIN,
    enable: Iterable[str] | None = None,
    grace: float = GRACE,
    tls: TlsConfig | None = None,
) -> None:
    """Serve one worker (:func:`start_worker`, whose arguments these are) until SIGTERM, SIGINT
    or, when its standard input is a pipe, the end of it (the launcher is gone)."""
    server = await start_worker(
        worker_id, transport, host, port, credentials=credentials, secret=secret, threads=threads,
        data=data, releases=releases, spin=spin, enable=enable, grace=grace, tls=tls,
    )  # fmt: skip
    log = get_logger(worker=worker_id)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    watcher = loop.create_task(_watch_stdin(stop, log))
    print(f"{READY} {server.address}", flush=True)
    log.info("serving", address=server.address)
    await stop.wait()
    watcher.cancel()
    log.info("stopping")
    await server.close()


async def _watch_stdin(stop: asyncio.Event, log: structlog.stdlib.BoundLogger) -> None:
    """Set ``stop`` when the launcher's pipe on standard input ends.

    Only a pipe (or socket) is a launcher's: ``/dev/null`` ends at once and a file soon, but a
    worker started so (systemd, nohup, containers) must keep serving; a terminal and a closed
    standard input (``sys.stdin`` is None; fd 0 may since belong to a socket) say nothing either.
    """
    if sys.stdin is None:
        return
    try:
        mode = os.fstat(sys.stdin.fileno()).st_mode
    except (OSError, ValueError):  # closed after all
        return
    if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):
        return
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    try:
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while await reader.read(1 << 16):
            pass
    except OSError as exc:  # the pipe broke: its other end is as gone as at end-of-file
        log.debug("standard input failed", error=str(exc))
    log.info("standard input closed: the launcher is gone")
    stop.set()


class Cluster:
    """Handles to the workers of a local cluster, in the order they were named."""

    def __init__(self) -> None:
        self.workers: list[actors.RemoteWorker] = []
        self.processes: dict[str, asyncio.subprocess.Process] = {}
        self.addresses: dict[str, str] = {}
        #: The leader's own secret (identity :data:`LEADER`), and where the credentials live.
        self.secret: str | None = None
        self.directory: tempfile.TemporaryDirectory[str] | None = None
        #: The leader's certificates when the workers were started with TLS.
        self.tls: TlsConfig | None = None

    def __iter__(self) -> Iterator[actors.RemoteWorker]:
        return iter(self.workers)

    def __len__(self) -> int:
        return len(self.workers)

    def __getitem__(self, key: int | str) -> actors.RemoteWorker:
        if isinstance(key, int):
            return self.workers[key]
        for worker in self.workers:
            if worker.id == key:
                return worker
        raise KeyError(key)


async def start_processes(
    ids: list[str],
    transport: str,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    threads: int = 1,
    federation: Federation | None = None,
    enable: Iterable[str] | None = None,
    tls: bool = False,
    data_dir: str | None = None,
) -> Cluster:
    """Start one worker process per id (ports from ``port`` up, or free ports with 0); with a
    ``federation``, worker k loads and holds shard k of its dataset (from ``data_dir``, default
    ``$AIOSYFT_DATA``).

    With ``tls``, a throwaway CA in the cluster's temporary directory certifies each worker and
    the leader (:attr:`Cluster.tls`) for ``host`` and loopback; the workers serve over TLS only
    and dial each other so. The CA's key is not kept: no other certificate can join later.
    """
    cluster = Cluster()
    if LEADER in ids:
        raise ValueError(f"{LEADER!r} is the leader's identity; name the workers otherwise")
    secrets_by_id = {identity: new_secret() for identity in [LEADER, *ids]}
    cluster.secret = secrets_by_id[LEADER]
    cluster.directory = tempfile.TemporaryDirectory(prefix="aiosyft-")
    credentials = Path(cluster.directory.name) / "credentials"
    Credentials.write(credentials, secrets_by_id)
    certificates: dict[str, TlsConfig] = {}
    if tls:
        hosts = dict.fromkeys([host, "127.0.0.1", "::1", "localhost"])
        certificates = issue_certificates(Path(cluster.directory.name) / "tls", [LEADER, *ids], hosts)
        cluster.tls = certificates[LEADER]
    try:
        for index, worker_id in enumerate(ids):
            env = {**os.environ, CREDENTIALS_ENV: str(credentials), IDENTITY_ENV: worker_id,
                   SECRET_ENV: secrets_by_id[worker_id], REPORT_ENV: "1"}  # fmt: skip
            if tls:  # else a configuration in the environment (the leader's) is the workers' too
                env.update(certificates[worker_id].environment())
            worker_port = port + index if port else 0
            command = [sys.executable, "-m", "runners.cli", *["-v"] * verbosity(), "worker", "--id",
                       worker_id, "--transport", transport, "--host", host, "--port", str(worker_port),
                       "--threads", str(threads)]  # fmt: skip
            if federation is not None:
                command += federation.worker_arguments(index)
                command += ["--data-dir", data_dir] if data_dir is not None else []
            if enable is not None:
                command += ["--enable", ",".join(enable)]
            cluster.processes[worker_id] = await asyncio.create_subprocess_exec(
                *command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env
            )
        for worker_id, process in cluster.processes.items():
            cluster.addresses[worker_id] = await _ready(worker_id, process)
    except BaseException:
        await stop_processes(cluster)
        raise
    return cluster


async def _ready(worker_id: str, process: asyncio.subprocess.Process) -> str:
    assert process.stdout is not None
    try:
        async with asyncio.timeout(_START_TIMEOUT):
            while line := (await process.stdout.readline()).decode():
                if line.startswith(READY + " "):
                    return line.split()[1]
                if line.startswith(FAILED + " "):
                    raise WorkerStartFailed(
                        f"worker {worker_id} could not start: {line[len(FAILED) + 1 :].strip()}"
                    )
            code = await process.wait()
    except TimeoutError:
        raise WorkerStartFailed(f"worker {worker_id} was not ready within {_START_TIMEOUT:g} s") from None
    raise WorkerStartFailed(f"worker {worker_id} exited (status {code}) before it was ready")


async def stop_processes(cluster: Cluster) -> None:
    """SIGTERM every child, SIGKILL what has not exited within a few seconds, reap all."""
    for process in cluster.processes.values():
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
    for process in cluster.processes.values():
        try:
            await asyncio.wait_for(process.wait(), _STOP_TIMEOUT)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
    if cluster.directory is not None:
        cluster.directory.cleanup()
        cluster.directory = None


@contextlib.asynccontextmanager
async def local_cluster(
    ids: list[str],
    transport: str = "ws",
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    threads: int = 1,
    federation: Federation | None = None,
    enable: Iterable[str] | None = None,
    tls: bool = False,
    data_dir: str | None = None,
) -> AsyncIterator[Cluster]:
    """Worker processes on this machine, connected: ``async with local_cluster([...]) as c``.

    Leaving the block closes the connections and stops every process; none is left behind.
    With ``tls`` every link (the leader's and the workers' among themselves) is mutual TLS.
    """
    cluster = await start_processes(
        ids, transport, host=host, port=port, threads=threads, federation=federation, enable=enable, tls=tls,
        data_dir=data_dir,
    )  # fmt: skip
    try:
        for worker_id in ids:
            address = cluster.addresses[worker_id]
            cluster.workers.append(
                await actors.connect(address, identity=LEADER, secret=cluster.secret, tls=cluster.tls)
            )
        yield cluster
    finally:
        for worker in cluster.workers:
            await worker.close()
        await stop_processes(cluster)


#: Where :func:`launch` can start workers: processes on this machine, or actors on a Ray cluster.
BACKENDS = ("local", "ray")


@dataclass(frozen=True)
class Placement:
    """Where Ray puts one worker: on a node (its id, or its IP when only one node has it), on a
    node offering custom ``resources`` (one per data owner is natural: ``{"owner:alice": 1}``),
    or in a bundle of a named placement group. Unset: wherever Ray finds the CPUs."""

    node: str | None = None
    resources: Mapping[str, float] = field(default_factory=dict)
    placement_group: str | None = None
    bundle: int = -1

    @classmethod
    def parse(cls, text: str) -> Placement:
        """``node:ID_OR_IP``, ``pg:NAME[/BUNDLE]`` or ``RESOURCE[=AMOUNT]`` (``owner:alice``):
        the CLI's ``--place WORKER=SPEC``."""
        kind, _, rest = text.partition(":")
        if kind == "node" and rest:
            return cls(node=rest)
        if kind == "pg" and rest:
            name, slash, bundle = rest.partition("/")
            if slash and not bundle.isdigit():
                raise ValueError(f"placement {text!r}: the bundle after / is an index")
            return cls(placement_group=name, bundle=int(bundle) if slash else -1)
        name, equals, amount = text.partition("=")
        try:
            value = float(amount) if equals else 1.0
        except ValueError:
            raise ValueError(f"placement {text!r}: the amount after = is a number") from None
        if not name or not value > 0:
            raise ValueError(f"placement {text!r}: expected node:ID, pg:NAME[/BUNDLE] or RESOURCE[=AMOUNT]")
        return cls(resources={name: value})


@contextlib.asynccontextmanager
async def launch(
    ids: list[str],
    transport: str = "ws",
    *,
    backend: str = "local",
    host: str | None = None,
    port: int = 0,
    threads: int = 1,
    federation: Federation | None = None,
    data_dir: str | None = None,
    enable: Iterable[str] | None = None,
    tls: bool = False,
    **ray_options: Any,
) -> AsyncIterator[Cluster]:
    """Connected workers wherever ``backend`` puts them: ``async with launch(ids) as cluster``.

    ``backend="local"`` (the default) is :func:`local_cluster`: processes on this machine.
    ``backend="ray"`` places each worker on a Ray cluster (:mod:`runners.ray_backend`), so a
    script spans a cluster by changing one argument; ``ray_options`` are what only Ray means
    (``address``, ``placement``, ``cpus``, ``releases``, ``restarts``), see
    :func:`runners.ray_backend.start_ray_workers`. Everything else (pointers, training, MPC, DP,
    policy, identities) runs unchanged over the same transports. Ray is imported only here, and
    only for its backend: the project runs without it installed.
    """
    if backend == "local":
        if ray_options:
            raise ValueError(f"{', '.join(sorted(ray_options))}: only the Ray backend takes these")
        async with local_cluster(
            ids, transport, host=host or "127.0.0.1", port=port, threads=threads, federation=federation,
            enable=enable, tls=tls, data_dir=data_dir,
        ) as cluster:  # fmt: skip
            yield cluster
    elif backend == "ray":
        ray_cluster = load_ray_backend().ray_cluster
        async with ray_cluster(
            ids, transport, host=host, port=port, threads=threads, federation=federation, data_dir=data_dir,
            enable=enable, tls=tls, **ray_options,
        ) as cluster:  # fmt: skip
            yield cluster
    else:
        raise ValueError(f"unknown backend {backend!r}: one of {', '.join(BACKENDS)}")


def load_ray_backend() -> Any:
    """:mod:`runners.ray_backend`, imported on demand: Ray is an optional extra."""
    try:
        from runners import ray_backend  # noqa: PLC0415 - Ray is imported for its backend only
    except ModuleNotFoundError as exc:
        if exc.name != "ray" and not (exc.name or "").startswith("ray."):
            raise
        raise WorkerStartFailed("the Ray backend needs Ray: pip install -e '.[ray]'") from None
    return ray_backend


def _announce(cluster: Cluster) -> None:
    """Print where the workers are and where the leader's secret (and certificates) are."""
    for worker_id, address in cluster.addresses.items():
        print(f"{worker_id} {address}", flush=True)
    assert cluster.directory is not None and cluster.secret is not None
    secret_file = Path(cluster.directory.name) / f"{LEADER}.secret"
    fd = os.open(secret_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(cluster.secret + "\n")
    print(f"connect as {IDENTITY_ENV}={LEADER} with {SECRET_ENV} from {secret_file}", flush=True)
    if cluster.tls is not None:
        exports = " ".join(f"{name}={value}" for name, value in cluster.tls.environment().items())
        print(f"TLS: the leader's certificates: export {exports}", flush=True)


async def launch_command(
    ids: list[str],
    transport: str,
    host: str | None,
    port: int,
    enable: Iterable[str] | None = None,
    *,
    tls: bool = False,
    backend: str = "local",
    federation: Federation | None = None,
    data_dir: str | None = None,
    ray_options: dict[str, Any] | None = None,
) -> None:
    """``aiosyft launch``: start the workers (with a ``federation``, worker k holding shard k),
    print where they are and where the leader's secret (and with ``tls``, its certificates) is,
    stop them all on a signal, or (raising :class:`WorkerLost`) when one exits. With the Ray
    backend, a worker Ray restarts is announced with its new address, and one lost for good
    stops them all."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    if backend == "ray":
        options = {"host": host, "port": port, "enable": enable, "tls": tls, "federation": federation,
                   "data_dir": data_dir, **(ray_options or {})}  # fmt: skip
        await _launch_on_ray(ids, transport, options, stop)
        return
    cluster = await start_processes(
        ids, transport, host=host or "127.0.0.1", port=port, enable=enable, tls=tls, federation=federation,
        data_dir=data_dir,
    )  # fmt: skip
    try:
        _announce(cluster)
        print("ready; Ctrl-C stops every worker", flush=True)
        waiters = [asyncio.ensure_future(stop.wait())]
        waiters += [asyncio.ensure_future(p.wait()) for p in cluster.processes.values()]
        _, pending = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for waiter in pending:
            waiter.cancel()
        exited = [
            (worker_id, p.returncode)
            for worker_id, p in cluster.processes.items()
            if p.returncode is not None
        ]
        if exited and not stop.is_set():  # a lost worker is a failure of the launch, stated once
            worker_id, code = exited[0]
            raise WorkerLost(f"worker {worker_id} exited with status {code}; stopping every worker")
    finally:
        await stop_processes(cluster)


async def _launch_on_ray(
    ids: list[str], transport: str, options: dict[str, Any], stop: asyncio.Event
) -> None:
    """``aiosyft launch --backend ray``: as for processes, with Ray's reports of deaths and
    restarts; every actor is killed on the way out, whatever the way."""
    cluster = await load_ray_backend().start_ray_workers(ids, transport, **options)
    restarting: set[asyncio.Future[Any]] = set()
    stopped = asyncio.ensure_future(stop.wait())
    loss = asyncio.ensure_future(cluster.next_loss())
    try:
        _announce(cluster)
        for worker_id, placed in cluster.placed.items():
            print(
                f"placed: {worker_id} on node {placed.node_id} ({placed.node_ip}), pid {placed.pid}",
                flush=True,
            )
        print("ready; Ctrl-C stops every worker", flush=True)
        while not stop.is_set():
            done, _ = await asyncio.wait({stopped, loss, *restarting}, return_when=asyncio.FIRST_COMPLETED)
            for future in done & restarting:
                restarting.discard(future)
                worker_id, placed = future.result()  # one Ray could not restart raises WorkerLost here
                print(f"{worker_id} {placed.address}", flush=True)
                print(f"restarted: {worker_id} on node {placed.node_id}, pid {placed.pid}", flush=True)
            if loss in done:
                lost = loss.result()
                assert lost.worker is not None
                if cluster.deaths[lost.worker] > cluster.restarts:
                    raise WorkerLost(f"{lost}; no restart left, stopping every worker")
                print(f"lost: {lost}; Ray restarts it", file=sys.stderr, flush=True)
                restarting.add(asyncio.ensure_future(_named_serving(cluster, lost.worker)))
                loss = asyncio.ensure_future(cluster.next_loss())
    finally:
        for future in (stopped, loss, *restarting):
            future.cancel()
        await cluster.stop()


async def _named_serving(cluster: Any, worker_id: str) -> tuple[str, Any]:
    return worker_id, await cluster.serving(worker_id)
