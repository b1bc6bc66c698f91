"""The ``aiosyft`` command.

It fails like a tool: a bad argument or a bad combination of them is one line on stderr and exit
status 2; a failure while running (a port in use, a missing dataset, a lost worker: any aiosyft
error or OS error) is one line and status 1. ``-v`` adds the traceback, and its logs.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import ssl
import sys
import traceback
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, NoReturn

import mpc  # noqa: F401 - registers the mpc and provider command sets
import privacy  # noqa: F401 - registers the federated command set
from actors import ModelUpdates, Release, log
from actors.identity import CLUSTER_SECRET_ENV, CREDENTIALS_ENV, Credentials, from_environment
from actors.net import TRANSPORTS
from actors.registry import command_sets
from actors.tls import CA_ENV, CERT_ENV, KEY_ENV, TlsConfig
from actors.worker import GRACE
from privacy.dp import Sanitized
from protocol import SyftError
from runners.bench import bench_pointers, bench_transport, format_pointers, format_transport, write_json
from runners.bench_dp import bench_dp, format_dp
from runners.bench_mpc import bench_mpc, format_mpc, plot_mpc
from runners.bench_wide import bench_wide, format_wide
from runners.cluster import (
    BACKENDS,
    FAILED,
    LEADER,
    REPORT_ENV,
    SPIN,
    Placement,
    is_loopback,
    launch_command,
    run_worker,
)
from runners.datasets import DATA_ENV, SOURCES
from runners.demo import demo
from runners.experiments import TRANSPORTS as EXPERIMENT_TRANSPORTS
from runners.experiments import settings_from, table1, train_command, use_data_dir
from runners.federated import SPLITS, Federation
from runners.mpc_experiment import DEFAULTS as MPC_DEFAULTS
from runners.mpc_experiment import format_mpc_result, mpc_command
from runners.pate_experiment import PateSettings, format_pate, pate_command
from runners.table2 import run as table2

#: What ``aiosyft worker`` serves by default beside the torch allowlist: federated training, DP-SGD
#: steps and being a party to SPDZ. Being a crypto provider is asked for (``--enable provider``).
DEFAULT_SETS = ("train", "mpc", "dp", "pate")
#: What a command that fails while running reports in one line (exit status 1); anything else
#: is a bug and keeps its traceback. Dataset errors are SyftErrors; TimeoutError is an OSError.
FAILURES = (SyftError, OSError)
#: FedAvg's rounds when ``--rounds`` is not given.
DEFAULT_ROUNDS = 10
#: ``aiosyft worker`` options that only mean something with ``--dataset``, and their defaults.
SHARD_OPTIONS = {"shard": "0/1", "split": "round-robin", "split_seed": 0, "batch_size": 8,
                 "release": "model_updates"}  # fmt: skip
#: What the owner of a shard lets leave (``aiosyft worker --release``).
RELEASES = ("model_updates", "sanitized")


Commands = argparse._SubParsersAction  # what add_subparsers returns


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors in one line (argparse prints the whole usage before them)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _number(kind: Callable[[str], Any], name: str, accept: Callable[[Any], bool]) -> Callable[[str], Any]:
    """An argparse type: ``kind(text)`` that ``accept`` takes, else a one-line usage error."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {name}, got {text!r}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"expected {name}, got {text!r}")
        return value

    return parse


POSITIVE = _number(int, "a positive integer", lambda value: value > 0)
TWO_OR_MORE = _number(int, "an integer of at least 2", lambda value: value >= 2)
PORT = _number(int, "a port number (0-65535)", lambda value: 0 <= value <= 65535)
NONNEGATIVE_FLOAT = _number(float, "a number >= 0", lambda value: math.isfinite(value) and value >= 0)
NONNEGATIVE = _number(int, "an integer >= 0", lambda value: value >= 0)
POSITIVE_FLOAT = _number(float, "a number > 0", lambda value: math.isfinite(value) and value > 0)


def _sets(option: str | None, refuse: Callable[[str], NoReturn]) -> list[str] | None:
    """``--enable a,b``; every named set must have been registered by a loaded package."""
    if option is None:
        return None
    sets = [name.strip() for name in option.split(",") if name.strip()]
    unknown = set(sets) - command_sets()
    if unknown:
        refuse(f"--enable: unknown command set(s) {', '.join(sorted(unknown))}; "
               f"known: {', '.join(sorted(command_sets()))}")  # fmt: skip
    return sets


def _credentials(path: str) -> Credentials:
    """``--credentials FILE``: a file that cannot be read or parsed is a bad argument."""
    try:
        return Credentials.load(path)
    except (OSError, ValueError) as exc:
        raise argparse.ArgumentTypeError(f"cannot use {path!r} as credentials: {exc}") from None


def _data_dir_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", help=f"dataset folder (default: ${DATA_ENV}, else the user cache)")


def _privacy_parsers(commands: Any) -> None:
    """``aiosyft table2`` and ``aiosyft pate``: differential privacy's experiments."""
    utility = commands.add_parser("table2", help="the paper's Table 2 (utility per privacy budget), here")
    utility.add_argument("--seeds", type=TWO_OR_MORE, default=10, help="seeds per cell (default 10)")
    utility.add_argument("--json", type=Path, help="also write the rows to this file")
    utility.add_argument(
        "--accountant", choices=("rdp", "pld"), default="rdp", help="what the owners keep budgets with"
    )
    utility.add_argument(
        "--png-dir", type=Path, default=Path("results"), help="where the two charts go (default results)"
    )
    _data_dir_option(utility)

    pate = commands.add_parser("pate", help="PATE on Pima: each owner the noisy aggregator of its teachers")
    pate.add_argument("--mechanism", choices=("gnmax", "confident", "lnmax"), default="confident")
    pate.add_argument("--teachers", type=POSITIVE, default=25, help="teachers per owner (default 25)")
    pate.add_argument("--workers", type=POSITIVE, default=2, help="data owners (default 2)")
    pate.add_argument("--sigma", type=POSITIVE_FLOAT, help="GNMax noise (gnmax, confident)")
    pate.add_argument("--threshold", type=float, help="Confident-GNMax's threshold on the max count")
    pate.add_argument("--sigma1", type=POSITIVE_FLOAT, help="Confident-GNMax's threshold noise")
    pate.add_argument("--gamma", type=POSITIVE_FLOAT, help="LNMax's inverse Laplace scale")
    pate.add_argument("--epsilon", type=POSITIVE_FLOAT, default=4.0, help="each owner's budget (default 4)")
    pate.add_argument("--queries", type=POSITIVE, help="ask at most this many public queries")
    pate.add_argument("--seed", type=int, default=0)
    pate.add_argument("--json", type=Path, help="also write the figures to this file")
    _data_dir_option(pate)


def _bench_parser(commands: Any) -> None:
    bench = commands.add_parser("bench", help="benchmarks, each beside its reference")
    suites = bench.add_subparsers(dest="suite", required=True)
    pointers = suites.add_parser("pointers", help="cost of a pointer operation on a virtual worker")
    pointers.add_argument("--json", type=Path, help="also write the figures to this file")
    pointers.add_argument("--repeats", type=POSITIVE, default=7, help="timed runs; the median is reported")
    transport = suites.add_parser("transport", help="WebSocket and TCP workers beside the raw transports")
    transport.add_argument("--json", type=Path, help="also write the figures to this file")
    transport.add_argument("--repeats", type=POSITIVE, default=5, help="timed runs; the median is reported")
    transport.add_argument("--tls", action="store_true", help="measure TLS too, beside plaintext")
    wide = suites.add_parser(
        "wide", help="arithmetic modulo 2^128 (authenticated MPC) beside int64, one thread"
    )
    wide.add_argument("--json", type=Path, help="also write the figures to this file")
    wide.add_argument("--repeats", type=POSITIVE, default=7, help="timed runs; the median is reported")
    dp = suites.add_parser("dp", help="DP-SGD on the Boston MLP beside non-private plain PyTorch")
    dp.add_argument("--json", type=Path, help="also write the figures to this file")
    dp.add_argument("--repeats", type=POSITIVE, default=5, help="timed runs; the median is reported")
    _data_dir_option(dp)
    spdz = suites.add_parser("mpc", help="SPDZ operations between worker processes, beside plain PyTorch")
    spdz.add_argument("--json", type=Path, help="also write the figures to this file")
    spdz.add_argument(
        "--png", type=Path, default=Path("results/bench_mpc.png"), help="chart (default %(default)s)"
    )
    spdz.add_argument("--repeats", type=POSITIVE, default=5, help="timed runs; the median is reported")
    spdz.add_argument("--transport", choices=TRANSPORTS, default="tcp")
    spdz.add_argument("--semi-honest-only", action="store_true", help="skip the authenticated (SPDZ2k) rows")
    cluster = suites.add_parser("cluster", help="Table 1 over Ray-placed workers beside local processes")
    cluster.add_argument("--json", type=Path, help="also write the figures to this file")
    cluster.add_argument("--repeats", type=POSITIVE, default=5, help="timed runs; the median is reported")
    cluster.add_argument("--address", help="a running Ray cluster (default: a private one started first)")
    _data_dir_option(cluster)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="aiosyft", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=0,
        help="log info (-v) or debug (-vv), in the worker processes started too; tracebacks of failures",
    )  # fmt: skip
    commands = parser.add_subparsers(dest="command", required=True)

    commands.add_parser("demo", help="pointer tensors on virtual workers, checked against PyTorch")
    _worker_parser(commands)
    _train_parser(commands)

    spdz = commands.add_parser("mpc", help="encrypted inference and training beside plaintext (SPDZ)")
    spdz.add_argument("--dataset", choices=sorted(SOURCES), default="boston")
    spdz.add_argument("--parties", type=TWO_OR_MORE, default=2, help="parties holding shares (default 2)")
    spdz.add_argument("--transport", choices=EXPERIMENT_TRANSPORTS, default="virtual")
    spdz.add_argument("--epochs", type=POSITIVE, help="encrypted training epochs (default per dataset)")
    spdz.add_argument("--lr", type=POSITIVE_FLOAT, help="learning rate (default per dataset)")
    spdz.add_argument("--json", type=Path, help="also write the figures to this file")
    spdz.add_argument(
        "--authenticated", action="store_true", help="the actively secure mode (SPDZ2k MACs, checked)"
    )
    _data_dir_option(spdz)

    table = commands.add_parser("table1", help="the paper's Table 1 (training time per mode), measured here")
    table.add_argument(
        "--repeats", type=POSITIVE, default=5, help="timed runs per mode; the median is reported"
    )
    table.add_argument("--json", type=Path, help="also write the rows to this file")
    table.add_argument(
        "--png", type=Path, default=Path("results/table1.png"), help="bar chart (default results/table1.png)"
    )
    _data_dir_option(table)

    _privacy_parsers(commands)

    _launch_parser(commands)

    _bench_parser(commands)

    fuzzing = commands.add_parser("fuzz", help="hostile frames at a live worker: crashes, hangs, leaks")
    fuzzing.add_argument("--transport", choices=["virtual", "ws", "tcp", "all"], default="all")
    fuzzing.add_argument("--frames", type=POSITIVE, default=100_000, help="per transport (%(default)s)")
    fuzzing.add_argument("--seed", type=int, default=0, help="the same frames for the same seed")
    fuzzing.add_argument("--json", type=Path, help="also write the figures to this file")
    return parser


#: ``aiosyft launch`` options only the Ray backend takes (the Namespace names and their flags).
RAY_OPTIONS = {"address": "--address", "place": "--place", "owner_resources": "--owner-resources",
               "cpus": "--cpus", "restart": "--restart", "state_dir": "--state-dir"}  # fmt: skip


def _launch_parser(commands: Commands) -> None:
    launch = commands.add_parser(
        "launch", help="start N workers (local processes, or actors on a Ray cluster); Ctrl-C stops them"
    )
    launch.add_argument("--workers", required=True, help="comma-separated ids, e.g. alice,bob,carol")
    launch.add_argument("--transport", choices=TRANSPORTS, default="ws")
    launch.add_argument(
        "--backend", choices=BACKENDS, default="local",
        help="local processes (default), or actors a Ray cluster places and restarts (needs '.[ray]')",
    )  # fmt: skip
    launch.add_argument("--host", help="where workers listen (default 127.0.0.1; with Ray, their node's IP)")
    launch.add_argument("--port", type=PORT, default=8777, help="first port; the next workers count up")
    launch.add_argument("--enable", help="command sets the workers serve (default: each worker's default)")
    launch.add_argument(
        "--tls", action="store_true",
        help="mutual TLS on every link, with a throwaway CA and certificates for the workers and the leader",
    )  # fmt: skip
    launch.add_argument("--dataset", choices=sorted(SOURCES), help="worker k loads and holds shard k of it")
    launch.add_argument("--split", choices=SPLITS, help="how the dataset is split (default round-robin)")
    launch.add_argument(
        "--data-dir", help=f"dataset folder on each worker's machine (default: its ${DATA_ENV} or cache)"
    )
    ray = launch.add_argument_group("Ray backend (--backend ray)")
    ray.add_argument(
        "--address", help="the Ray cluster: auto, HOST:PORT or ray://HOST:PORT (default: a private one here)"
    )
    ray.add_argument(
        "--place", action="append", default=[], metavar="WORKER=SPEC",
        help="where a worker goes: node:ID_OR_IP, pg:NAME[/BUNDLE] or a custom resource (owner:alice[=1])",
    )  # fmt: skip
    ray.add_argument(
        "--owner-resources", action="store_true",
        help="each worker not --place'd goes to a node offering the resource owner:<its id>",
    )  # fmt: skip
    ray.add_argument("--cpus", type=POSITIVE_FLOAT, help="CPUs Ray reserves per worker (default 1)")
    ray.add_argument("--restart", type=NONNEGATIVE, help="times Ray restarts a worker that dies (default 0)")
    ray.add_argument(
        "--state-dir",
        help="with --release sanitized: each worker's ledger is STATE_DIR/<id>.ledger on its node, kept "
        "across restarts",
    )  # fmt: skip
    launch.add_argument(
        "--release", choices=RELEASES, help="what may leave of a shard (default model updates)"
    )
    launch.add_argument("--epsilon", type=POSITIVE_FLOAT, help="each shard's privacy budget (default 1)")
    launch.add_argument("--delta", type=POSITIVE_FLOAT, help="the budget's delta (default 1e-5)")


def _check_launch(args: argparse.Namespace, refuse: Callable[[str], NoReturn]) -> None:
    """``aiosyft launch``: the workers' names, and options that only apply to Ray or a dataset."""
    ids = [name.strip() for name in args.workers.split(",") if name.strip()]
    if not ids:
        refuse("--workers names no worker")
    if len(set(ids)) != len(ids):
        refuse(f"--workers names a worker twice: {args.workers}")
    if LEADER in ids:
        refuse(f"--workers: {LEADER!r} is the leader's identity; name the workers otherwise")
    if args.port and args.port + len(ids) - 1 > 65535:
        refuse(f"--port {args.port}: {len(ids)} workers need ports up to {args.port + len(ids) - 1}")
    args.ids = ids
    given = [flag for name, flag in RAY_OPTIONS.items() if getattr(args, name) not in (None, False, [])]
    if given and args.backend != "ray":
        refuse(f"{', '.join(given)} appl{'ies' if len(given) == 1 else 'y'} with --backend ray only")
    shard_options = [f"--{n.replace('_', '-')}" for n in ("split", "data_dir", "release") if getattr(args, n)]
    if shard_options and args.dataset is None:
        refuse(
            f"{', '.join(shard_options)} only appl{'ies' if len(shard_options) == 1 else 'y'} with --dataset"
        )
    budget = [f"--{n.replace('_', '-')}" for n in ("epsilon", "delta", "state_dir") if getattr(args, n)]
    if budget and args.release != "sanitized":
        refuse(f"{', '.join(budget)} only appl{'ies' if len(budget) == 1 else 'y'} with --release sanitized")
    if args.release == "sanitized" and args.backend != "ray":
        refuse("--release sanitized: launch the owners one by one (aiosyft worker --release sanitized) or "
               "with --backend ray --state-dir")  # fmt: skip
    if args.delta is not None and not args.delta < 1:
        refuse(f"--delta {args.delta}: expected a number below 1")
    args.federation = None
    if args.dataset is not None:
        args.federation = Federation(args.dataset, len(ids), args.split or "round-robin")
    args.ray_options = {}
    if args.backend != "ray":
        return
    placement: dict[str, Placement] = {}
    for item in args.place:
        worker_id, equals, spec = item.partition("=")
        if not equals or worker_id not in ids:
            refuse(f"--place {item!r}: expected WORKER=SPEC with WORKER one of --workers")
        if worker_id in placement:
            refuse(f"--place: {worker_id} is placed twice")
        try:
            placement[worker_id] = Placement.parse(spec)
        except ValueError as exc:
            refuse(f"--place {item!r}: {exc}")
    if args.owner_resources:
        for worker_id in ids:
            placement.setdefault(worker_id, Placement(resources={f"owner:{worker_id}": 1.0}))
    releases = {}
    if args.release == "sanitized":
        budget_of = {"epsilon": args.epsilon or 1.0, "delta": args.delta or 1e-5}
        for worker_id in ids:
            ledger = str(Path(args.state_dir) / f"{worker_id}.ledger") if args.state_dir else None
            releases[worker_id] = (Sanitized(**budget_of, ledger=ledger),)
    args.ray_options = {"address": args.address, "placement": placement, "cpus": args.cpus or 1.0,
                        "restarts": args.restart or 0, "releases": releases}  # fmt: skip


def _worker_parser(commands: Commands) -> None:
    worker = commands.add_parser("worker", help="run one worker (the way to span machines)")
    worker.add_argument("--id", required=True, help="the worker's id")
    # A cluster secret is read from the environment only ($AIOSYFT_CLUSTER_SECRET), never an option.
    worker.add_argument("--transport", choices=TRANSPORTS, default="ws")
    worker.add_argument("--host", default="127.0.0.1")
    worker.add_argument("--port", type=PORT, default=8777, help="0 picks a free port")
    worker.add_argument(
        "--credentials", type=_credentials,
        help=f"file of identities and secret hashes to check peers against (default: ${CREDENTIALS_ENV})",
    )  # fmt: skip
    worker.add_argument(
        "--insecure", action="store_true",
        help="listen beyond loopback without credentials: any peer may claim any identity",
    )  # fmt: skip
    worker.add_argument(
        "--enable", default=",".join(DEFAULT_SETS),
        help="command sets to serve beside the torch allowlist (default: %(default)s)",
    )  # fmt: skip
    worker.add_argument(
        "--grace", type=NONNEGATIVE_FLOAT, default=GRACE,
        help="seconds an identity's objects outlive its last connection (default %(default)g)",
    )  # fmt: skip
    worker.add_argument("--tls-ca", help=f"mutual TLS: the CA peers must come from (default: ${CA_ENV})")
    worker.add_argument("--tls-cert", help=f"this worker's certificate chain, PEM (default: ${CERT_ENV})")
    worker.add_argument("--tls-key", help=f"this worker's private key, PEM (default: ${KEY_ENV})")
    worker.add_argument("--threads", type=POSITIVE, default=1, help="torch threads (default 1)")
    worker.add_argument(
        "--spin-us", type=NONNEGATIVE_FLOAT, default=SPIN * 1e6,
        help="microseconds to poll, not sleep, for an object on its way (default %(default)g; 0: off)",
    )  # fmt: skip
    worker.add_argument("--dataset", choices=sorted(SOURCES), help="load and hold a shard of this dataset")
    # These four only apply with --dataset: None says "not given", so a stray one is refused.
    worker.add_argument("--shard", help="which shard, as K/N (default 0/1)")
    worker.add_argument("--split", choices=SPLITS, help="how the dataset is split (default round-robin)")
    worker.add_argument("--split-seed", type=int, help="seed of the split (default 0)")
    worker.add_argument("--batch-size", type=POSITIVE, help="batch size of a round-robin split (default 8)")
    worker.add_argument(
        "--release", choices=RELEASES,
        help="what may leave of the shard: model updates (default), or only DP-SGD steps within a budget",
    )  # fmt: skip
    # These four only apply with --release sanitized.
    worker.add_argument("--epsilon", type=POSITIVE_FLOAT, help="the shard's privacy budget (default 1)")
    worker.add_argument("--delta", type=POSITIVE_FLOAT, help="the budget's delta (default 1e-5)")
    worker.add_argument("--ledger", help="file the privacy ledger is kept in, to survive a restart")
    worker.add_argument(
        "--accountant", choices=("rdp", "pld"), help="what the budget is kept with (default rdp; pld tighter)"
    )
    _data_dir_option(worker)


def _train_parser(commands: Commands) -> None:
    train = commands.add_parser("train", help="federated training on Boston Housing or Pima Diabetes")
    train.add_argument("--dataset", choices=sorted(SOURCES), default="boston")
    train.add_argument("--workers", type=POSITIVE, default=2)
    train.add_argument("--transport", choices=EXPERIMENT_TRANSPORTS, default="virtual")
    train.add_argument("--style", choices=("walk", "fedavg"), default="walk")
    train.add_argument("--epochs", type=POSITIVE, help="epochs (walk) or local epochs per round (fedavg)")
    train.add_argument(
        "--rounds", type=POSITIVE, help=f"FedAvg rounds (default {DEFAULT_ROUNDS}; fedavg only)"
    )
    train.add_argument(
        "--min-workers", type=POSITIVE,
        help="fedavg only: carry on while this many workers remain (default: stop at the first lost)",
    )  # fmt: skip
    train.add_argument("--lr", type=POSITIVE_FLOAT)
    train.add_argument("--batch-size", type=POSITIVE)
    train.add_argument("--split", choices=SPLITS, default="round-robin")
    train.add_argument("--seed", type=int)
    _data_dir_option(train)


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What argparse cannot check alone: options that do not apply, values that depend on others."""
    command = args.command

    def refuse(message: str) -> NoReturn:
        parser.exit(2, f"aiosyft {command}: error: {message} (see aiosyft {command} --help)\n")

    if command == "train" and args.style != "fedavg" and args.rounds is not None:
        refuse("--rounds applies to --style fedavg only (a walk runs --epochs)")
    if command == "train" and args.min_workers is not None:
        if args.style != "fedavg":
            refuse("--min-workers applies to --style fedavg only (a walk stops at a lost worker)")
        if args.min_workers > args.workers:
            refuse(f"--min-workers {args.min_workers} is more than the {args.workers} workers")
    if command == "worker":
        _check_worker(args, refuse)
    if command == "launch":
        _check_launch(args, refuse)
    if command in ("worker", "launch"):
        args.sets = _sets(args.enable, refuse)


def _check_worker(args: argparse.Namespace, refuse: Callable[[str], NoReturn]) -> None:
    if not args.id.strip():
        refuse("--id is empty")
    given = [f"--{name.replace('_', '-')}" for name in SHARD_OPTIONS if getattr(args, name) is not None]
    if given and args.dataset is None:
        refuse(f"{', '.join(given)} only appl{'ies' if len(given) == 1 else 'y'} with --dataset")
    for name, default in SHARD_OPTIONS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    shard, slash, count = args.shard.partition("/")
    if not (shard.isdigit() and count.isdigit() and slash and int(shard) < int(count)):
        refuse(f"--shard {args.shard!r}: expected K/N with 0 <= K < N")
    budget = [f"--{n}" for n in ("epsilon", "delta", "ledger", "accountant") if getattr(args, n) is not None]
    if budget and args.release != "sanitized":
        refuse(f"{', '.join(budget)} only appl{'ies' if len(budget) == 1 else 'y'} with --release sanitized")
    if args.delta is not None and not args.delta < 1:
        refuse(f"--delta {args.delta}: expected a number below 1")
    if args.credentials is None:
        try:  # the environment's, as run_worker would read them
            args.credentials = from_environment()[0]
        except (OSError, ValueError) as exc:
            refuse(f"${CREDENTIALS_ENV}: {exc}")
    tls_files = {"--tls-ca": args.tls_ca, "--tls-cert": args.tls_cert, "--tls-key": args.tls_key}
    if any(tls_files.values()):
        missing = [name for name, value in tls_files.items() if not value]
        if missing:
            refuse(f"TLS needs --tls-ca, --tls-cert and --tls-key; {', '.join(missing)} not given")
        args.tls = TlsConfig(args.tls_ca, args.tls_cert, args.tls_key)
    else:
        try:  # the environment's, as run_worker would read it
            args.tls = TlsConfig.from_environment()
        except ValueError as exc:
            refuse(str(exc))
    if args.tls is not None:
        try:  # a missing file or a key that does not match its certificate: say so before serving
            args.tls.server_context()
            args.tls.client_context()
        except (OSError, ssl.SSLError) as exc:
            refuse(f"TLS: cannot load {args.tls}: {exc}")
    if args.credentials is None and not is_loopback(args.host) and not args.insecure:
        refuse(
            f"--host {args.host} listens beyond this machine, and without credentials any peer there "
            f"may claim any identity: give --credentials (or ${CREDENTIALS_ENV} or ${CLUSTER_SECRET_ENV}), "
            "or --insecure"
        )


def _worker_releases(args: argparse.Namespace) -> tuple[Release, ...]:
    """What the worker's shard lets leave: model updates, or DP-SGD steps within a budget."""
    if args.release != "sanitized":
        return (ModelUpdates(),)
    budget = {"epsilon": args.epsilon or 1.0, "delta": args.delta or 1e-5}
    return (Sanitized(**budget, ledger=args.ledger, accountant=args.accountant or "rdp"),)


def _run_privacy(args: argparse.Namespace) -> None:
    use_data_dir(args.data_dir)
    if args.command == "table2":
        table2(args.seeds, args.json, args.png_dir, args.accountant)
        return
    settings = PateSettings(
        mechanism=args.mechanism, workers=args.workers, teachers=args.teachers, epsilon=args.epsilon,
        sigma=args.sigma, threshold=args.threshold, sigma1=args.sigma1, gamma=args.gamma,
        max_queries=args.queries, seed=args.seed,
    )  # fmt: skip
    figures = asyncio.run(pate_command(settings, args.data_dir))
    print(format_pate(figures))
    write_json(figures, args.json)


def _run(args: argparse.Namespace) -> None:
    if args.command == "demo":
        asyncio.run(demo())
    elif args.command == "worker":
        data = None
        if args.dataset is not None:
            shard, _, count = args.shard.partition("/")
            federation = Federation(args.dataset, int(count), args.split, args.split_seed, args.batch_size)
            data = (federation, int(shard), args.data_dir)
        asyncio.run(
            run_worker(
                args.id,
                args.transport,
                args.host,
                args.port,
                credentials=args.credentials,
                threads=args.threads,
                data=data,
                releases=_worker_releases(args),
                spin=args.spin_us / 1e6,
                enable=args.sets,
                grace=args.grace,
                tls=args.tls,
            )
        )
    elif args.command == "train":
        use_data_dir(args.data_dir)
        federation = Federation(args.dataset, args.workers, args.split)
        rounds = args.rounds if args.rounds is not None else DEFAULT_ROUNDS
        run = train_command(
            federation, args.transport, args.style, settings_from(args), rounds, min_workers=args.min_workers
        )
        asyncio.run(run)
    elif args.command == "mpc":
        use_data_dir(args.data_dir)
        defaults = MPC_DEFAULTS[args.dataset]
        settings = replace(defaults, epochs=args.epochs or defaults.epochs, lr=args.lr or defaults.lr)
        figures = asyncio.run(
            mpc_command(
                args.dataset, args.parties, args.transport, settings, authenticated=args.authenticated
            )
        )
        print(format_mpc_result(figures))
        write_json(figures, args.json)
    elif args.command == "table1":
        use_data_dir(args.data_dir)
        asyncio.run(table1(args.repeats, args.json, args.png))
    elif args.command in ("table2", "pate"):
        _run_privacy(args)
    elif args.command == "launch":
        launch = launch_command(
            args.ids, args.transport, args.host, args.port, args.sets, tls=args.tls, backend=args.backend,
            federation=args.federation, data_dir=args.data_dir, ray_options=args.ray_options,
        )  # fmt: skip
        asyncio.run(launch)
    elif args.command == "bench":
        _run_bench(args)


def _run_bench(args: argparse.Namespace) -> None:
    if args.suite == "pointers":
        result = asyncio.run(bench_pointers(args.repeats))
        print(format_pointers(result))
        write_json(result, args.json)
    elif args.suite == "transport":
        results = asyncio.run(bench_transport(args.repeats, tls=args.tls))
        print(format_transport(results))
        write_json(results, args.json)
    elif args.suite == "wide":
        figures = bench_wide(args.repeats)
        print(format_wide(figures))
        write_json(figures, args.json)
    elif args.suite == "dp":
        use_data_dir(args.data_dir)
        figures = asyncio.run(bench_dp(args.repeats))
        print(format_dp(figures))
        write_json(figures, args.json)
    elif args.suite == "cluster":
        from runners.bench_cluster import bench_cluster, format_cluster  # noqa: PLC0415 - Ray's bench

        use_data_dir(args.data_dir)
        figures = asyncio.run(bench_cluster(args.repeats, args.address))
        print(format_cluster(figures))
        write_json(figures, args.json)
    elif args.suite == "mpc":
        figures = asyncio.run(
            bench_mpc(args.repeats, args.transport, authenticated=not args.semi_honest_only)
        )
        print(format_mpc(figures))
        write_json(figures, args.json)
        args.png.parent.mkdir(parents=True, exist_ok=True)
        plot_mpc(figures, args.png)
        print(f"chart: {args.png}")


def _run_fuzz(args: argparse.Namespace) -> None:
    """Exit status 1 when the fuzz found anything (a crash, hang, leak or violation)."""
    try:
        from runners.fuzz import fuzz_command  # noqa: PLC0415 - it needs hypothesis, a dev dependency
    except ModuleNotFoundError as exc:
        raise SystemExit(f"aiosyft fuzz: needs {exc.name} (pip install -e '.[dev]')") from None

    transports = ["virtual", "ws", "tcp"] if args.transport == "all" else [args.transport]
    if not args.verbose:  # a warning per bad frame otherwise
        logging.getLogger("aiosyft").setLevel(logging.CRITICAL)
    reports = asyncio.run(fuzz_command(transports, args.frames, args.seed, args.json))
    if not all(report.ok for report in reports):
        sys.exit(1)


def _failure(exc: BaseException) -> BaseException | None:
    """The failure to report in one line: ``exc`` itself, or the first of a group made only of
    failures; ``None`` for anything else (a bug, which keeps its traceback)."""
    if isinstance(exc, BaseExceptionGroup):
        leaves = [_failure(inner) for inner in exc.exceptions]
        return leaves[0] if leaves and all(leaf is not None for leaf in leaves) else None
    return exc if isinstance(exc, FAILURES) else None


def _describe(exc: BaseException) -> str:
    """One line naming the failure: aiosyft's errors by their class (the vocabulary the README
    uses), OS errors by their own message; never more than one line."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if isinstance(exc, SyftError) else text


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    _check(parser, args)
    log.configure([logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)])
    try:
        (_run_fuzz if args.command == "fuzz" else _run)(args)
    except KeyboardInterrupt:
        if args.verbose:
            traceback.print_exc()
        print(f"aiosyft {args.command}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as exc:
        failure = _failure(exc)
        if failure is None:
            raise
        if args.verbose:
            traceback.print_exc()
        message = _describe(failure)
        if args.command == "worker" and os.environ.get(REPORT_ENV):
            # Launched: the launcher reads this and names the worker in its own one line.
            print(f"{FAILED} {message}", flush=True)
        else:
            print(f"aiosyft {args.command}: error: {message}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
