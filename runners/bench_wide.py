"""Micro-benchmark of :mod:`mpc.wide` (arithmetic modulo 2^128) beside the same int64 operation.

SPDZ2k's authenticated mode does its local work on wide tensors where the semi-honest mode uses
int64 ones, so the ratio of the two, measured in one process on one thread (as in a worker),
is what the wide kernels add to each protocol operation. Operands come from ``torch.randint``:
timing needs no secure randomness.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from mpc import wide
from runners.bench_mpc import median_seconds

_MILLION = 1 << 20


def _words(*shape: int) -> torch.Tensor:
    return torch.randint(-(1 << 63), (1 << 63) - 1, shape, dtype=torch.int64)


def _cases() -> dict[str, tuple[Callable[[], Any], Callable[[], Any]]]:
    """name -> (wide operation, the int64 operation it replaces)."""
    a, b = _words(2, _MILLION), _words(2, _MILLION)
    factor = _words(_MILLION)
    big_a, big_b = _words(2, 256, 256), _words(2, 256, 256)
    small_a, small_b = _words(2, 32, 13), _words(2, 13, 506)
    return {
        "mul 1M": (lambda: wide.mul(a, b), lambda: a[0] * b[0]),
        "mul_int64 1M": (lambda: wide.mul_int64(a, factor), lambda: a[0] * factor),
        "mul_int64 1M by an int": (lambda: wide.mul_int64(a, 1 << 16), lambda: a[0] * (1 << 16)),
        "add 1M": (lambda: wide.add(a, b), lambda: a[0] + b[0]),
        "sub 1M": (lambda: wide.sub(a, b), lambda: a[0] - b[0]),
        "sum 1M": (lambda: wide.sum(a), a[0].sum),
        "matmul 256x256x256": (lambda: wide.matmul(big_a, big_b), lambda: big_a[0] @ big_b[0]),
        "matmul 32x13x506": (lambda: wide.matmul(small_a, small_b), lambda: small_a[0] @ small_b[0]),
    }


def bench_wide(repeats: int = 7) -> dict[str, Any]:
    """Median seconds of each wide operation and of its int64 counterpart, one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = {}
        for name, (wide_op, int64_op) in _cases().items():
            wide_s = median_seconds(wide_op, repeats)
            int64_s = median_seconds(int64_op, repeats)
            results[name] = {"wide_s": wide_s, "int64_s": int64_s, "ratio": wide_s / int64_s}
    finally:
        torch.set_num_threads(threads)
    return {"compiled": wide.compiled(), "repeats": repeats, "operations": results}


def format_wide(report: dict[str, Any]) -> str:
    kernels = "compiled C kernels" if report["compiled"] else "torch ops (no compiled kernels)"
    lines = [
        f"mpc.wide, one thread, median of {report['repeats']}, elementwise: {kernels}",
        f"{'operation':<24} {'wide ms':>9} {'int64 ms':>9} {'ratio':>7}",
    ]
    for name, row in report["operations"].items():
        lines.append(
            f"{name:<24} {row['wide_s'] * 1e3:>9.3f} {row['int64_s'] * 1e3:>9.3f} {row['ratio']:>6.1f}x"
        )
    return "\n".join(lines)


__all__ = ["bench_wide", "format_wide"]
