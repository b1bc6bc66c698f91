"""The ``aiosyft`` command."""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path

from actors import log
from runners.bench import bench_pointers, format_pointers, write_json
from runners.demo import demo


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aiosyft", description=__doc__)
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log info (-v) or debug (-vv)")
    commands = parser.add_subparsers(dest="command", required=True)

    commands.add_parser("demo", help="pointer tensors on virtual workers, checked against PyTorch")

    bench = commands.add_parser("bench", help="benchmarks, each beside its reference")
    suites = bench.add_subparsers(dest="suite", required=True)
    pointers = suites.add_parser("pointers", help="cost of a pointer operation on a virtual worker")
    pointers.add_argument("--json", type=Path, help="also write the figures to this file")
    pointers.add_argument("--repeats", type=int, default=7, help="timed runs; the median is reported")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    log.configure([logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)])
    if args.command == "demo":
        asyncio.run(demo())
    elif args.command == "bench" and args.suite == "pointers":
        result = asyncio.run(bench_pointers(args.repeats))
        print(format_pointers(result))
        write_json(result, args.json)
