"""SPDZ beyond the arithmetic of ``test_mpc.py``: layers (sigmoid, linear, convolution,
pooling, cat), rounds and bytes per computation, and openings sharing messages.

Tolerances come from the fixed-point error (16 fractional bits, unit ``U = 2^-16``): encoding
rounds each input by ``U/2``; a product of values below ``B`` in magnitude is off by about
``B * U`` from its inputs' rounding plus one unit from truncation; a sum of ``k`` terms adds
theirs. Network transports run a few small cases each (the suite must stay fast); hypothesis
searches shapes and values over virtual workers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F  # noqa: N812

import mpc
from mpc.sigmoid import approx
from tests.conftest import bounded

U = 2.0**-16
NAMES = ("alice", "bob", "dave")


@pytest.fixture
async def cast(make_worker: Any) -> dict[str, Any]:
    """Three possible parties and a provider over the test's transport."""
    return {name: await make_worker(name) for name in (*NAMES, "carol")}


def _parties(cast: dict[str, Any], n: int) -> list[Any]:
    return [cast[name] for name in NAMES[:n]]


OPS: dict[str, tuple[Callable[..., Any], Callable[..., Any], float]] = {
    # name: (on shared tensors, on plain tensors, tolerance for inputs below 10 in magnitude)
    "index, cat": (lambda x, y: mpc.cat([x[0:1], y[1:]], 0), lambda x, y: torch.cat([x[0:1], y[1:]]), U),
    "public @ shared": (lambda x, y: torch.ones(2, 3) @ x, lambda x, y: torch.ones(2, 3) @ x, 4 * U),
    "sigmoid": (lambda x, y: torch.sigmoid(x), lambda x, y: approx(x), 400 * U),
    "linear": (lambda x, y: F.linear(x, y, x[0]), lambda x, y: F.linear(x, y, x[0]), 200 * U),
}


@pytest.mark.parametrize("n", [2, 3])
@bounded(30)
async def test_sigmoid_cat_and_layers_match_plain_pytorch(cast: dict[str, Any], n: int) -> None:
    torch.manual_seed(n)
    x, y = torch.randn(3, 4) * 3, torch.randn(4, 4) * 3
    parties = _parties(cast, n)
    sx = mpc.share(x, *parties, crypto_provider=cast["carol"])
    sy = mpc.share(y, *parties, crypto_provider=cast["carol"])
    issued = {name: shared(sx, sy) for name, (shared, _, _) in OPS.items()}  # all before any await
    for name, result in issued.items():
        _, plain, tolerance = OPS[name]
        expected = plain(x, y)
        got = await result.get()
        assert got.shape == expected.shape, name
        error = (got - expected).abs().max()
        assert torch.allclose(got, expected, atol=tolerance, rtol=0), f"{name}: {error}"


@pytest.mark.parametrize("transport", ["virtual"], indirect=True)
@pytest.mark.parametrize("n", [2, 3])
@bounded(30)
async def test_convolution_and_pooling_match_plain_pytorch(cast: dict[str, Any], n: int) -> None:
    torch.manual_seed(0)
    image, kernel = torch.randn(2, 3, 6, 6), torch.randn(4, 3, 3, 3)
    parties = _parties(cast, n)
    si = mpc.share(image, *parties, crypto_provider=cast["carol"])
    sk = mpc.share(kernel, *parties, crypto_provider=cast["carol"])
    conv = F.conv2d(si, sk, stride=2, padding=1)
    public = F.conv2d(si, kernel, padding=1)
    pooled = F.avg_pool2d(si, 2)
    assert torch.allclose(await conv.get(), F.conv2d(image, kernel, stride=2, padding=1), atol=400 * U)
    assert torch.allclose(await public.get(), F.conv2d(image, kernel, padding=1), atol=400 * U)
    assert torch.allclose(await pooled.get(), F.avg_pool2d(image, 2), atol=2 * U)


@pytest.mark.parametrize("transport", ["virtual"], indirect=True)
@pytest.mark.parametrize("n", [2, 3])
async def test_each_result_counts_its_rounds(cast: dict[str, Any], n: int) -> None:
    parties = _parties(cast, n)
    x = mpc.share(torch.ones(3, 3), *parties, crypto_provider=cast["carol"])
    truncation = 0 if n == 2 else 1
    assert (x + x).cost.rounds == 0 and (x * 2.0).depth == truncation
    assert (x * x).cost.rounds == 1 + truncation  # exactly one round per product, one more to truncate
    assert (x @ x).cost.rounds == 1 + truncation
    assert ((x * x) * x).depth == 2 * (1 + truncation)  # dependent products chain their rounds
    with mpc.meter() as spent:
        independent = [x * x for _ in range(5)]
    assert max(t.depth for t in independent) == 1 + truncation  # independent ones overlap
    remasks = (n - 1) * 8 * 9 if truncation else 0  # to party 0, beside the opening of x - r
    assert spent.online_bytes == 5 * (n * (n - 1) * 8 * (9 + 9 + (9 if truncation else 0)) + remasks)
    for t in independent:
        await t


@pytest.mark.parametrize("transport", ["virtual"], indirect=True)
@bounded(20)
async def test_openings_of_products_issued_together_share_frames(cast: dict[str, Any]) -> None:
    """Ten products issued together: each party's ten openings to the other leave in one frame
    or two, not ten (a round costs a message, however many products it serves)."""
    alice, bob = cast["alice"], cast["bob"]
    x = mpc.share(torch.randn(4, 4), alice, bob, crypto_provider=cast["carol"])
    await (x * x)  # the parties' links exist now
    frames: list[int] = []
    for party in (alice, bob):
        for connection in party.worker.peers.values():
            if connection.remote_id in ("alice", "bob"):
                write = connection.transport.write
                connection.transport.write = lambda frame, write=write: (
                    frames.append(len(frame)),
                    write(frame),
                )
    mpc.prepare("mul", x, x, count=10)  # material first: the products' runs start together
    await asyncio.sleep(0.05)
    products = [x * x for _ in range(10)]
    for product in products:
        await product
    assert 2 <= len(frames) <= 4, f"{len(frames)} frames between the parties for 10 products"
