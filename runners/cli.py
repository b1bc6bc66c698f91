"""The ``aiosyft`` command."""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path

import privacy  # noqa: F401 - registers the federated command set
from actors import log
from actors.identity import CREDENTIALS_ENV, Credentials
from actors.net import TRANSPORTS
from actors.registry import command_sets
from runners.bench import bench_pointers, bench_transport, format_pointers, format_transport, write_json
from runners.cluster import SPIN, launch, run_worker
from runners.datasets import DATA_ENV, SOURCES
from runners.demo import demo
from runners.experiments import TRANSPORTS as EXPERIMENT_TRANSPORTS
from runners.experiments import settings_from, table1, train_command, use_data_dir
from runners.federated import SPLITS, Federation

#: What ``aiosyft worker`` serves by default beside the torch allowlist: federated training.
DEFAULT_SETS = ("train",)


def _sets(option: str | None) -> list[str] | None:
    """``--enable a,b``; every named set must have been registered by a loaded package."""
    if option is None:
        return None
    sets = [name.strip() for name in option.split(",") if name.strip()]
    unknown = set(sets) - command_sets()
    if unknown:
        raise SystemExit(f"aiosyft: unknown command set(s) {', '.join(sorted(unknown))}; "
                         f"known: {', '.join(sorted(command_sets()))}")  # fmt: skip
    return sets


def _credentials(path: str | None) -> Credentials | None:
    if path is not None:
        return Credentials.load(path)
    return None  # the environment's, if any (see runners.cluster.run_worker)


def _data_dir_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", help=f"dataset folder (default: ${DATA_ENV}, else the user cache)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aiosyft", description=__doc__)
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log info (-v) or debug (-vv)")
    commands = parser.add_subparsers(dest="command", required=True)

    commands.add_parser("demo", help="pointer tensors on virtual workers, checked against PyTorch")

    worker = commands.add_parser("worker", help="run one worker (the way to span machines)")
    worker.add_argument("--id", required=True, help="the worker's id")
    # A cluster secret is read from the environment only ($AIOSYFT_CLUSTER_SECRET), never an option.
    worker.add_argument("--transport", choices=TRANSPORTS, default="ws")
    worker.add_argument("--host", default="127.0.0.1")
    worker.add_argument("--port", type=int, default=8777, help="0 picks a free port")
    worker.add_argument(
        "--credentials",
        help=f"file of identities and secret hashes to check peers against (default: ${CREDENTIALS_ENV})",
    )
    worker.add_argument(
        "--enable", default=",".join(DEFAULT_SETS),
        help="command sets to serve beside the torch allowlist (default: %(default)s)",
    )  # fmt: skip
    worker.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    worker.add_argument(
        "--spin-us", type=float, default=SPIN * 1e6,
        help="microseconds to poll, not sleep, for an object on its way (default %(default)g; 0: off)",
    )  # fmt: skip
    worker.add_argument("--dataset", choices=sorted(SOURCES), help="load and hold a shard of this dataset")
    worker.add_argument("--shard", default="0/1", help="which shard, as K/N (default 0/1)")
    worker.add_argument("--split", choices=SPLITS, default="round-robin")
    worker.add_argument("--split-seed", type=int, default=0)
    worker.add_argument("--batch-size", type=int, default=8, help="batch size of a round-robin split")
    _data_dir_option(worker)

    train = commands.add_parser("train", help="federated training on Boston Housing or Pima Diabetes")
    train.add_argument("--dataset", choices=sorted(SOURCES), default="boston")
    train.add_argument("--workers", type=int, default=2)
    train.add_argument("--transport", choices=EXPERIMENT_TRANSPORTS, default="virtual")
    train.add_argument("--style", choices=("walk", "fedavg"), default="walk")
    train.add_argument("--epochs", type=int, help="epochs (walk) or local epochs per round (fedavg)")
    train.add_argument("--rounds", type=int, default=10, help="FedAvg rounds")
    train.add_argument("--lr", type=float)
    train.add_argument("--batch-size", type=int)
    train.add_argument("--split", choices=SPLITS, default="round-robin")
    train.add_argument("--seed", type=int)
    _data_dir_option(train)

    table = commands.add_parser("table1", help="the paper's Table 1 (training time per mode), measured here")
    table.add_argument("--repeats", type=int, default=5, help="timed runs per mode; the median is reported")
    table.add_argument("--json", type=Path, help="also write the rows to this file")
    table.add_argument(
        "--png", type=Path, default=Path("results/table1.png"), help="bar chart (default results/table1.png)"
    )
    _data_dir_option(table)

    launch = commands.add_parser("launch", help="start N local worker processes; Ctrl-C stops them")
    launch.add_argument("--workers", required=True, help="comma-separated ids, e.g. alice,bob,carol")
    launch.add_argument("--transport", choices=TRANSPORTS, default="ws")
    launch.add_argument("--host", default="127.0.0.1")
    launch.add_argument("--port", type=int, default=8777, help="first port; the next workers count up")
    launch.add_argument("--enable", help="command sets the workers serve (default: each worker's default)")

    bench = commands.add_parser("bench", help="benchmarks, each beside its reference")
    suites = bench.add_subparsers(dest="suite", required=True)
    pointers = suites.add_parser("pointers", help="cost of a pointer operation on a virtual worker")
    pointers.add_argument("--json", type=Path, help="also write the figures to this file")
    pointers.add_argument("--repeats", type=int, default=7, help="timed runs; the median is reported")
    transport = suites.add_parser("transport", help="WebSocket and TCP workers beside the raw transports")
    transport.add_argument("--json", type=Path, help="also write the figures to this file")
    transport.add_argument("--repeats", type=int, default=5, help="timed runs; the median is reported")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    log.configure([logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)])
    if args.command == "demo":
        asyncio.run(demo())
    elif args.command == "worker":
        data = None
        if args.dataset is not None:
            shard, _, count = args.shard.partition("/")
            federation = Federation(
                args.dataset, int(count or 1), args.split, args.split_seed, args.batch_size
            )
            data = (federation, int(shard), args.data_dir)
        asyncio.run(
            run_worker(
                args.id,
                args.transport,
                args.host,
                args.port,
                credentials=_credentials(args.credentials),
                threads=args.threads,
                data=data,
                spin=args.spin_us / 1e6,
                enable=_sets(args.enable),
            )
        )
    elif args.command == "train":
        use_data_dir(args.data_dir)
        federation = Federation(args.dataset, args.workers, args.split)
        asyncio.run(train_command(federation, args.transport, args.style, settings_from(args), args.rounds))
    elif args.command == "table1":
        use_data_dir(args.data_dir)
        asyncio.run(table1(args.repeats, args.json, args.png))
    elif args.command == "launch":
        ids = [name.strip() for name in args.workers.split(",") if name.strip()]
        asyncio.run(launch(ids, args.transport, args.host, args.port, _sets(args.enable)))
    elif args.command == "bench" and args.suite == "pointers":
        result = asyncio.run(bench_pointers(args.repeats))
        print(format_pointers(result))
        write_json(result, args.json)
    elif args.command == "bench" and args.suite == "transport":
        results = asyncio.run(bench_transport(args.repeats))
        print(format_transport(results))
        write_json(results, args.json)


if __name__ == "__main__":
    main()
