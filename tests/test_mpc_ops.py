"""SPDZ arithmetic against plain PyTorch, for 2 and 3 parties, and what each worker is sent.

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
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mpc
from mpc.sigmoid import approx
from protocol import Command, Flow, Store
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
    "add": (lambda x, y: x + y, lambda x, y: x + y, 2 * U),
    "sub": (lambda x, y: x - y, lambda x, y: x - y, 2 * U),
    "neg": (lambda x, y: -x, lambda x, y: -x, U),
    "add public": (lambda x, y: x + 2.5, lambda x, y: x + 2.5, 2 * U),
    "mul public": (lambda x, y: x * -0.75, lambda x, y: x * -0.75, 4 * U),
    "mul": (lambda x, y: x * y, lambda x, y: x * y, 25 * U),
    "matmul": (lambda x, y: x @ y.t(), lambda x, y: x @ y.t(), 120 * U),
    "sum": (lambda x, y: x.sum(1), lambda x, y: x.sum(1), 4 * U),
    "mean": (lambda x, y: x.mean(0), lambda x, y: x.mean(0), 4 * U),
    "index and cat": (
        lambda x, y: mpc.cat([x[0:1], y[1:]], 0),
        lambda x, y: torch.cat([x[0:1], y[1:]], 0),
        U,
    ),
    "transpose and reshape": (lambda x, y: x.t().reshape(-1), lambda x, y: x.t().reshape(-1), U),
    "sigmoid": (lambda x, y: torch.sigmoid(x), lambda x, y: approx(x), 400 * U),
}


@pytest.mark.parametrize("n", [2, 3])
@bounded(30)
async def test_every_operation_matches_plain_pytorch(cast: dict[str, Any], n: int) -> None:
    torch.manual_seed(n)
    x, y = torch.randn(3, 4) * 3, torch.randn(3, 4) * 3
    parties = _parties(cast, n)
    sx = mpc.share(x, *parties, crypto_provider=cast["carol"])
    sy = mpc.share(y, *parties, crypto_provider=cast["carol"])
    issued = {name: shared(sx, sy) for name, (shared, _, _) in OPS.items()}  # all before any await
    for name, result in issued.items():
        _, plain, tolerance = OPS[name]
        expected = plain(x, y)
        got = await result.get()
        assert got.shape == expected.shape, name
        assert torch.allclose(got, expected, atol=tolerance, rtol=0), (
            f"{name}: {(got - expected).abs().max()}"
        )


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
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.integers(1, 4),
    cols=st.integers(1, 4),
    scale=st.sampled_from([1e-3, 1.0, 10.0, 30.0]),
    n=st.sampled_from([2, 3]),
    seed=st.integers(0, 2**16),
)
async def test_products_hold_for_any_shape_sign_and_magnitude(
    cast: dict[str, Any], rows: int, cols: int, scale: float, n: int, seed: int
) -> None:
    """Negative values, broadcasting a row, factors up to 30. Truncation fails (off by about
    2^48) with probability about ``|x * y| / 2^31`` per element, the price of 64-bit shares:
    5% at 1e8, 4e-7 at 900 (this test's largest), so values stay at the scale of ML."""
    torch.manual_seed(seed)
    x, y = (torch.rand(rows, cols) * 2 - 1) * scale, (torch.rand(1, cols) * 2 - 1) * scale
    parties = _parties(cast, n)
    async with asyncio.timeout(20):
        sx = mpc.share(x, *parties, crypto_provider=cast["carol"])
        sy = mpc.share(y, *parties, crypto_provider=cast["carol"])
        xd, yd = x.double(), y.double()
        product = (await (sx * sy).get()).double()
        bound = (xd.abs() + yd.abs()) * U + 2 * U + (xd * yd).abs() * 2**-23  # and float32 decoding
        assert bool(((product - xd * yd).abs() <= bound * 1.01).all())
        dot = (await (sx @ sy.t()).get()).double()
        assert torch.allclose(dot, xd @ yd.t(), atol=float(cols * bound.max() + 2 * U), rtol=2**-22)


@pytest.mark.parametrize("transport", ["virtual"], indirect=True)
@bounded(20)
async def test_shares_are_uniform_and_never_the_secret(cast: dict[str, Any]) -> None:
    alice, bob = cast["alice"], cast["bob"]
    secret = torch.full((10_000,), 3.0)
    first = mpc.share(secret, alice, bob, crypto_provider=cast["carol"])
    second = mpc.share(secret, alice, bob, crypto_provider=cast["carol"])
    encoded = mpc.encode(secret)
    shares = [await s.fetch() for s in first.shares]
    again = [await s.fetch() for s in second.shares]
    for share in shares:
        assert not torch.equal(share, encoded)
        bits = ((share.unsqueeze(1) >> torch.arange(64)) & 1).float().mean(0)
        assert bool(((bits > 0.47) & (bits < 0.53)).all()), "each bit of a share is a fair coin"
    assert not torch.equal(shares[0], again[0])  # fresh randomness every time
    assert torch.equal(shares[0] + shares[1], encoded)
    zeros = mpc.share(torch.zeros(100), alice, bob, crypto_provider=cast["carol"])
    for share in zeros.shares:
        assert bool((await share.fetch()).ne(0).any()), "a share of zeros is not zero"


def _record(worker: Any, into: list[Any]) -> None:
    """Keep every message ``worker`` (a virtual worker's actor) is handed."""
    actor = worker.worker
    dispatch = actor.dispatch.dispatch
    deliver = actor.flows.deliver

    def recording_dispatch(session: Any, message: Any) -> None:
        into.append(message)
        dispatch(session, message)

    def recording_deliver(sender: str, flow_id: int, tag: str, value: Any, label: Any) -> None:
        into.append(Flow(0, sender, flow_id, tag, value, None))
        deliver(sender, flow_id, tag, value, label)

    actor.dispatch.dispatch = recording_dispatch
    actor.flows.deliver = recording_deliver


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, list | tuple):
        return [t for item in value for t in _tensors(item)]
    if isinstance(value, dict):
        return [t for item in value.values() for t in _tensors(item)]
    return []


@pytest.mark.parametrize("transport", ["virtual"], indirect=True)
@pytest.mark.parametrize("n", [2, 3])
@bounded(30)
async def test_the_provider_and_the_leader_never_see_data_or_shares(cast: dict[str, Any], n: int) -> None:
    parties, provider = _parties(cast, n), cast["carol"]
    seen: dict[str, list[Any]] = {worker.id: [] for worker in (*parties, provider)}
    for worker in (*parties, provider):
        _record(worker, seen[worker.id])
    leader_got: list[Any] = []
    for worker in parties:
        decode = worker.connection.codec.decode
        worker.connection.codec.decode = lambda frame, decode=decode: _tap(decode(frame), leader_got)
    x, y = torch.randn(4, 4), torch.randn(4, 4)
    sx = mpc.share(x, *parties, crypto_provider=provider)
    sy = mpc.share(y, *parties, crypto_provider=provider)
    results = [sx * sy, sx @ sy, torch.sigmoid(sx), F.linear(sx, sy, sx[0])]
    for result in results:
        await result
    secrets = [mpc.encode(x), mpc.encode(y)]
    shares = [await s.fetch() for s in (*sx.shares, *sy.shares)]
    leader_got.clear()  # what came back to the leader during the operations was checked below
    assert not any(_tensors(m.args) or _tensors(m.kwargs) for m in seen["carol"] if isinstance(m, Command))
    assert not any(isinstance(m, Store | Flow) for m in seen["carol"]), "the provider is sent shapes only"
    ids = {w.id for w in parties} | {"carol"}
    for party in parties:
        for message in seen[party.id]:
            if isinstance(message, Flow):
                assert message.sender in ids - {party.id}
                for tensor in _tensors(message.value):
                    assert not any(
                        t.shape == tensor.shape and torch.equal(t, tensor) for t in [*secrets, *shares]
                    )


def _tap(messages: Any, into: list[Any]) -> Any:
    for message in messages:
        into.append(message)
        yield message


@pytest.mark.parametrize("transport", ["virtual"], indirect=True)
async def test_mismatches_are_refused_before_anything_is_sent(cast: dict[str, Any]) -> None:
    alice, bob, dave, carol = cast["alice"], cast["bob"], cast["dave"], cast["carol"]
    x = mpc.share(torch.ones(2), alice, bob, crypto_provider=carol)
    with pytest.raises(ValueError, match="different parties"):
        x + mpc.share(torch.ones(2), alice, dave, crypto_provider=carol)
    with pytest.raises(ValueError, match="precisions differ"):
        x * mpc.share(torch.ones(2), alice, bob, crypto_provider=carol, precision=8)
    with pytest.raises(ValueError, match="different crypto providers"):
        x * mpc.share(torch.ones(2), alice, bob, crypto_provider=dave)
    with pytest.raises(ValueError, match="cannot also be a party"):
        mpc.share(torch.ones(2), alice, bob, crypto_provider=bob)
    with pytest.raises(ValueError, match="two or more"):
        mpc.share(torch.ones(2), alice, crypto_provider=carol)
    with pytest.raises(ValueError, match="no crypto provider"):
        mpc.share(torch.ones(2), alice, bob) * mpc.share(torch.ones(2), alice, bob)
    with pytest.raises(TypeError, match="int64"):
        mpc.share(torch.ones(2), alice, bob, crypto_provider=carol, precision=None)
    integers = mpc.share(torch.tensor([3, -4]), alice, bob, crypto_provider=carol, precision=None)
    assert torch.equal(await (integers * integers).get(), torch.tensor([9, 16]))  # exact: no truncation


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
    assert spent.online_bytes == 5 * n * (n - 1) * 8 * (9 + 9 + (9 if truncation else 0))
    for t in independent:
        await t
