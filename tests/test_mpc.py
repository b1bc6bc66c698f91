"""SPDZ (``mpc.share`` and :class:`mpc.SharedTensor`): every operation against plain PyTorch for
2 and 3 parties, what the shares look like, who is sent what, refusals, departures, rounds.

Fixed-point error, with ``f = 16`` fractional bits and one unit ``U = 2^-16``:

* encoding rounds each input by at most ``U/2``;
* a sum of ``k`` shared values is off by at most ``k * U/2`` (the shares add exactly);
* a product ``x * y`` (shared or public factor) is off by at most ``(|x| + |y|) * U/2`` from its
  inputs' rounding plus one unit from truncation (two parties: local truncation, off by one in
  the last bit; three: ``floor`` plus a 0/1 correction): we allow ``(|x| + |y|) * U + U``;
* ``x @ y`` over ``k`` terms: ``(sum_k |x_ik| + sum_k |y_kj|) * U + U`` (one truncation);
* results are decoded to float32: ``|value| * 2^-23`` more.

Truncation also fails outright (off by about ``2^48``) with probability about ``|x * y| / 2^31``
per element (the shares straddle the wrap): the products here stay at or below ``1e3`` in
magnitude (about 5e-7 per element), where that never shows.

Network transports run one small case per party count (the suite must stay fast); hypothesis
searches shapes, signs, magnitudes and broadcasting over virtual workers only.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import gc
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mpc
from protocol import Command, Expect, Flow, FlowAborted, Forward, Store, SyftError, WorkerLost
from tests.conftest import assert_stores_empty, bounded, worker_in_hand

U = 2.0**-16
PARTIES = ("alice", "bob", "carol")
PROVIDER = "dave"
HYPOTHESIS = settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture
async def cast(make_worker: Any) -> dict[str, Any]:
    """Three parties and a provider over the test's transport, serving every command set
    (``make_worker`` enables every registered set; importing :mod:`mpc` registers ``mpc`` and
    ``provider``)."""
    return {name: await make_worker(name) for name in (*PARTIES, PROVIDER)}


def _parties(cast: dict[str, Any], n: int) -> list[Any]:
    return [cast[name] for name in PARTIES[:n]]


def _assert_close(got: torch.Tensor, expected: torch.Tensor, bound: Any, what: str) -> None:
    """``|got - expected| <= bound`` elementwise, plus float32 decoding's relative error."""
    assert got.shape == expected.shape, f"{what}: shape {list(got.shape)}, expected {list(expected.shape)}"
    got, expected = got.double(), expected.double()
    allowed = torch.as_tensor(bound, dtype=torch.float64) + expected.abs() * 2**-23 + 1e-12
    error = (got - expected).abs()
    assert bool((error <= allowed).all()), f"{what}: off by {float((error - allowed).max()):.3g} beyond bound"


def _product_bound(x: torch.Tensor, y: Any) -> torch.Tensor:
    y = torch.as_tensor(y, dtype=torch.float64)
    return (x.double().abs() + y.abs()) * U + U


def _matmul_bound(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return x.double().abs().sum(-1, keepdim=True) * U + y.double().abs().sum(-2, keepdim=True) * U + U


# -- 1. every operation against plain PyTorch, 2 and 3 parties, every transport -----------------
def _operations(
    x: torch.Tensor, y: torch.Tensor, w: torch.Tensor
) -> dict[str, tuple[Callable, Any, Any, int]]:
    """name: (on (sx, sy, sw), plain result, error bound, rounds among 2 parties) for x, y of
    shape 2x3 and w of shape 3x2. The rounds among three parties are those of two plus one for
    every truncated result (a product)."""
    row = torch.tensor([0.5, -2.0, 3.25])
    mean1 = x.mean(1)
    return {
        "add": (lambda a, b, c: a + b, x + y, U, 0),
        "sub": (lambda a, b, c: a - b, x - y, U, 0),
        "neg": (lambda a, b, c: -a, -x, U / 2, 0),
        "add public scalar": (lambda a, b, c: a + 2.5, x + 2.5, U, 0),
        "radd public": (lambda a, b, c: 1.5 + a, 1.5 + x, U, 0),
        "sub public row (broadcast)": (lambda a, b, c: a - row, x - row, U, 0),
        "rsub public": (lambda a, b, c: 4.0 - a, 4.0 - x, U, 0),
        "add public larger (grows)": (lambda a, b, c: a[0] + x, x[0] + x, U, 0),
        "mul public scalar": (lambda a, b, c: a * -0.75, x * -0.75, _product_bound(x, 0.75), 0),
        "rmul public scalar": (lambda a, b, c: 3 * a, 3 * x, _product_bound(x, 3), 0),
        "mul public row": (lambda a, b, c: a * row, x * row, _product_bound(x, row), 0),
        "matmul public": (lambda a, b, c: a @ w, x @ w, _matmul_bound(x, w), 0),
        "rmatmul public": (lambda a, b, c: w @ a, w @ x, _matmul_bound(w, x), 0),
        "mul": (lambda a, b, c: a * b, x * y, _product_bound(x, y), 1),
        "mul broadcast": (lambda a, b, c: a * b[1], x * y[1], _product_bound(x, y[1]), 1),
        "matmul": (lambda a, b, c: a @ c, x @ w, _matmul_bound(x, w), 1),
        "matmul method": (lambda a, b, c: a.matmul(b.t()), x @ y.t(), _matmul_bound(x, y.t()), 1),
        "sum dim": (lambda a, b, c: a.sum(1), x.sum(1), 3 * U / 2, 0),
        "sum keepdim": (lambda a, b, c: a.sum(0, keepdim=True), x.sum(0, keepdim=True), U, 0),
        "sum all": (lambda a, b, c: a.sum(), x.sum(), 6 * U / 2, 0),
        "mean dim": (lambda a, b, c: a.mean(1), mean1, (mean1.abs() * 3 + 1) * U + U, 0),
        "reshape": (lambda a, b, c: a.reshape(3, 2), x.reshape(3, 2), U / 2, 0),
        "view": (lambda a, b, c: a.view(-1), x.view(-1), U / 2, 0),
        "transpose": (lambda a, b, c: a.transpose(0, 1), x.transpose(0, 1), U / 2, 0),
        "t": (lambda a, b, c: a.t(), x.t(), U / 2, 0),
        "T": (lambda a, b, c: a.T, x.T, U / 2, 0),
        "flatten": (lambda a, b, c: a.flatten(), x.flatten(), U / 2, 0),
        "unsqueeze": (lambda a, b, c: a.unsqueeze(1), x.unsqueeze(1), U / 2, 0),
        "squeeze": (lambda a, b, c: a[:, 1:2].squeeze(), x[:, 1:2].squeeze(), U / 2, 0),
        "squeeze dim": (lambda a, b, c: a.unsqueeze(0).squeeze(0), x, U / 2, 0),
        "index": (lambda a, b, c: a[1], x[1], U / 2, 0),
        "slice": (lambda a, b, c: a[:, ::2], x[:, ::2], U / 2, 0),
        "index tensor": (lambda a, b, c: a[torch.tensor([1, 0, 1])], x[torch.tensor([1, 0, 1])], U / 2, 0),
    }


@pytest.mark.parametrize("n", [2, 3])
@bounded(30)
async def test_every_operation_matches_pytorch_and_counts_its_rounds(cast: dict[str, Any], n: int) -> None:
    """All operations issued before any await (independent runs overlap), then each result
    checked against PyTorch within its bound, and its ``cost.rounds``: 0 for linear operations,
    1 per product among two parties, 2 among three (the truncation's opening); a product by a
    public value costs 0 rounds among two parties, 1 among three."""
    generator = torch.Generator().manual_seed(n)
    x = (torch.rand(2, 3, generator=generator) * 2 - 1) * 8
    y = (torch.rand(2, 3, generator=generator) * 2 - 1) * 8
    w = (torch.rand(3, 2, generator=generator) * 2 - 1) * 8
    parties, provider = _parties(cast, n), cast[PROVIDER]
    sx, sy, sw = (mpc.share(t, *parties, crypto_provider=provider) for t in (x, y, w))
    operations = _operations(x, y, w)
    issued = {name: shared(sx, sy, sw) for name, (shared, *_) in operations.items()}
    for name, (_, expected, bound, rounds) in operations.items():
        result = issued[name]
        truncates = name.startswith(("mul", "rmul", "matmul", "rmatmul", "mean"))
        assert result.cost.rounds == rounds + (1 if truncates and n == 3 else 0), name
        assert result.shape == expected.shape, name
        _assert_close(await result.get(), expected, bound, f"{name} ({n} parties)")


@pytest.mark.parametrize("n", [2, 3])
@bounded(30)
async def test_integers_are_exact_modulo_2_64(cast: dict[str, Any], n: int) -> None:
    """int64 tensors shared with ``precision=None`` are ring integers: products are exact (no
    truncation: one round even among three parties) and wrap modulo 2^64 like torch's int64."""
    parties, provider = _parties(cast, n), cast[PROVIDER]
    x = torch.tensor([[3, -4], [2**40, 7]])
    y = torch.tensor([[-5, 6], [2**30, -1]])
    sx = mpc.share(x, *parties, crypto_provider=provider, precision=None)
    sy = mpc.share(y, *parties, crypto_provider=provider, precision=None)
    products = {"mul": (sx * sy, x * y), "matmul": (sx @ sy, x @ y), "public": (sx * 3 + sy, x * 3 + y)}
    assert products["mul"][0].cost.rounds == products["matmul"][0].cost.rounds == 1
    assert products["public"][0].cost.rounds == 0
    for name, (shared, plain) in products.items():
        got = await shared.get()
        assert got.dtype == torch.int64 and torch.equal(got, plain), name
    assert int((x * y)[1, 0]) == 2**70 % 2**64  # == 0: the wrap is torch's, reproduced exactly


# -- hypothesis, virtual workers only ------------------------------------------------------------
def _broadcastable(data: st.DataObject, shape: list[int]) -> list[int]:
    """A trailing part of ``shape`` with some sizes replaced by 1."""
    tail = shape[data.draw(st.integers(0, len(shape) - 1)) :]
    return [1 if data.draw(st.booleans()) else size for size in tail]


def _values(seed: int, shape: list[int], magnitude: float) -> torch.Tensor:
    """Uniform in ``[-magnitude, magnitude]``, the extremes included when there is room."""
    generator = torch.Generator().manual_seed(seed)
    values = (torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1) * magnitude
    flat = values.view(-1)
    flat[:2] = torch.tensor([magnitude, -magnitude], dtype=torch.float64)[: flat.numel()]
    return values.float()


SHAPES = st.lists(st.integers(1, 4), min_size=1, max_size=3)


@pytest.mark.parametrize("transport", ["virtual"], indirect=True)
@HYPOTHESIS
@given(
    data=st.data(),
    shape=SHAPES,
    magnitude=st.sampled_from([1e-3, 1.0, 1e3, 1e6]),
    n=st.sampled_from([2, 3]),
    seed=st.integers(0, 2**16),
)
async def test_linear_operations_hold_for_any_shape_sign_magnitude_and_broadcast(
    cast: dict[str, Any], data: st.DataObject, shape: list[int], magnitude: float, n: int, seed: int
) -> None:
    """Values up to 1e6 in magnitude (the encoding's limit is 2^46, about 7e13)."""
    other = _broadcastable(data, shape)
    x, y = _values(seed, shape, magnitude), _values(seed + 1, other, magnitude)
    public = _values(seed + 2, other, magnitude)
    dim = data.draw(st.integers(-len(shape), len(shape) - 1))
    parties = _parties(cast, n)
    async with asyncio.timeout(20):
        sx = mpc.share(x, *parties, crypto_provider=cast[PROVIDER])
        sy = mpc.share(y, *parties, crypto_provider=cast[PROVIDER])
        results = {
            "add": (sx + sy, x.double() + y.double(), U),
            "radd": (sy + sx, y.double() + x.double(), U),
            "sub": (sx - sy, x.double() - y.double(), U),
            "neg": (-sx, -x.double(), U / 2),
            "add public": (sx + public, x.double() + public.double(), U),
            "rsub public": (public - sx, public.double() - x.double(), U),
            "sum": (sx.sum(dim), x.double().sum(dim), shape[dim] * U / 2),
            "sum all": ((sx - sy).sum(), (x.double() - y.double()).sum(), x.numel() * U),
        }
        for name, (shared, expected, bound) in results.items():
            _assert_close(await shared.get(), expected, bound, name)


@pytest.mark.parametrize("transport", ["virtual"], indirect=True)
@HYPOTHESIS
@given(
    data=st.data(),
    shape=SHAPES,
    magnitudes=st.sampled_from([(1e-3, 1e-3), (1.0, 1.0), (30.0, 30.0), (1e4, 0.1), (0.1, 1e4)]),
    n=st.sampled_from([2, 3]),
    seed=st.integers(0, 2**16),
)
async def test_products_hold_for_any_shape_sign_magnitude_and_broadcast(
    cast: dict[str, Any], data: st.DataObject, shape: list[int], magnitudes: tuple[float, float], n: int,
    seed: int,
) -> None:  # fmt: skip
    """Factors up to 1e4 against factors up to 0.1, or both up to 30: products stay at or below
    1e3 (where truncation's wrap failure has probability about 5e-7 per element)."""
    other = _broadcastable(data, shape)
    x, y = _values(seed, shape, magnitudes[0]), _values(seed + 1, other, magnitudes[1])
    inner = data.draw(st.integers(1, 4))
    m = _values(seed + 2, [shape[-1], inner], magnitudes[1])
    parties = _parties(cast, n)
    async with asyncio.timeout(20):
        sx = mpc.share(x, *parties, crypto_provider=cast[PROVIDER])
        sy = mpc.share(y, *parties, crypto_provider=cast[PROVIDER])
        sm = mpc.share(m, *parties, crypto_provider=cast[PROVIDER])
        xd, yd, md = x.double(), y.double(), m.double()
        results = {
            "mul": (sx * sy, xd * yd, _product_bound(x, y)),
            "rmul": (sy * sx, yd * xd, _product_bound(x, y)),
            "mul public": (sx * y, xd * yd, _product_bound(x, y)),
            "matmul": (sx @ sm, xd @ md, _matmul_bound(x, m)),
            "matmul public": (sx @ m, xd @ md, _matmul_bound(x, m)),
        }
        for name, (shared, expected, bound) in results.items():
            _assert_close(await shared.get(), expected, bound, f"{name} ({n} parties)")


# -- 2. shares look uniform and are never the secret ---------------------------------------------
@pytest.mark.parametrize("transport", ["virtual"], indirect=True)
@pytest.mark.parametrize("n", [2, 3])
@bounded(20)
async def test_shares_are_uniform_fresh_and_never_the_secret(cast: dict[str, Any], n: int) -> None:
    parties, provider = _parties(cast, n), cast[PROVIDER]
    secret = torch.full((10_000,), -3.5)
    encoded = mpc.encode(secret)
    first = [await s.fetch() for s in mpc.share(secret, *parties, crypto_provider=provider).shares]
    second = [await s.fetch() for s in mpc.share(secret, *parties, crypto_provider=provider).shares]
    assert torch.equal(sum(first[1:], first[0]), encoded)  # they are shares of it, modulo 2^64
    bit = torch.arange(64)
    for i, share in enumerate(first):
        assert not bool(share.eq(encoded).any()), f"share {i} holds the secret"
        ones = ((share.unsqueeze(1) >> bit) & 1).double().mean(0)  # each of the 64 bits: a fair coin
        assert bool(((ones > 0.47) & (ones < 0.53)).all()), (
            f"share {i} bits: {ones.min():.3f}..{ones.max():.3f}"
        )
        assert share.unique().numel() > 9_990, f"share {i} of a constant is not spread out"
        assert not bool(share.eq(second[i]).any()), "two sharings of one value reuse randomness"
    zeros = mpc.share(torch.zeros(1000), *parties, crypto_provider=provider)
    for share in zeros.shares:
        assert bool((await share.fetch()).ne(0).all()), "a share of zeros shows zeros"
    integers = mpc.share(torch.zeros(1000, dtype=torch.int64), *parties, precision=None)
    for share in integers.shares:
        assert bool((await share.fetch()).ne(0).all()), "a share of integer zeros shows zeros"


# -- 3. what the provider, the leader and the parties are sent -----------------------------------
def _record(worker: Any, into: list[tuple[str, Any]]) -> None:
    """Keep every message the actor behind a virtual ``worker`` decodes (commands included: they
    bypass ``dispatch.dispatch``), with the identity its session authenticated."""
    actor = worker.worker
    decode = actor.decode

    def recording(session: Any, frame: Any) -> Any:
        for message in decode(session, frame):
            # a copy: the flows work on what they receive in place (a party's share of c, for
            # one, becomes its share of the product)
            into.append((session.identity, copy.deepcopy(message)))
            yield message

    actor.decode = recording


def _tap(worker: Any, into: list[Any]) -> None:
    """Keep every message the leader's connection to ``worker`` decodes."""
    codec = worker.connection.codec
    decode = codec.decode

    def tapped(frame: Any) -> Any:
        for message in decode(frame):
            into.append(message)
            yield message

    codec.decode = tapped


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, list | tuple):
        return [t for item in value for t in _tensors(item)]
    if isinstance(value, dict):
        return [t for item in value.values() for t in _tensors(item)]
    return []


def _equal_to_any(tensor: torch.Tensor, secrets: list[torch.Tensor]) -> bool:
    return any(
        s.shape == tensor.shape and s.dtype == tensor.dtype and torch.equal(s, tensor) for s in secrets
    )


@pytest.mark.parametrize("transport", ["virtual"], indirect=True)
@pytest.mark.parametrize("n", [2, 3])
@bounded(30)
async def test_the_provider_and_the_leader_never_see_secrets_or_shares(cast: dict[str, Any], n: int) -> None:
    """The provider is sent shapes and party names only; the leader no FLOW message and no
    tensor while the operations run; a party gets FLOW messages only from the other parties and
    the provider, and none carries a secret, a share of one, or a result's share."""
    parties, provider = _parties(cast, n), cast[PROVIDER]
    seen: dict[str, list[tuple[str, Any]]] = {w.id: [] for w in (*parties, provider)}
    for worker in (*parties, provider):
        _record(worker, seen[worker.id])
    leader: list[Any] = []
    for worker in (*parties, provider):
        _tap(worker, leader)
    x, y = torch.randn(4, 4) * 5, torch.randn(4, 4) * 5
    sx = mpc.share(x, *parties, crypto_provider=provider)
    sy = mpc.share(y, *parties, crypto_provider=provider)
    results = [sx * sy, sx @ sy, sx * 0.5, (sx + sy) * sx, sy.t() @ sx]
    for result in results:
        await result
    during = list(leader)
    secrets = [mpc.encode(x), mpc.encode(y)]
    shares = [await s.fetch() for s in (*sx.shares, *sy.shares)]
    outputs = [await s.fetch() for r in results for s in r.shares]
    secrets += [mpc.encode(r) for r in (x * y, x @ y)]  # the encoded products (of the rounded inputs)
    private = [*secrets, *shares, *outputs]

    assert not any(isinstance(m, Flow) for m in during), "a party sent the leader a FLOW message"
    for tensor in (t for m in during for t in _tensors(m)):
        assert not _equal_to_any(tensor, private), "the leader was sent a share while the operations ran"
    to_provider = [m for _, m in seen[PROVIDER]]
    assert to_provider, "the recording saw nothing: the provider was never asked"
    assert not any(isinstance(m, Store | Forward | Expect | Flow) for m in to_provider), "data reached it"
    for message in to_provider:
        assert not _tensors(message), f"{message} carried a tensor to the provider"
    assert {m.op for m in to_provider if isinstance(m, Command)} == {"provider.material"}

    names = {w.id for w in parties}
    for party in parties:
        flows = [(who, m) for who, m in seen[party.id] if isinstance(m, Flow)]
        assert flows, f"{party.id} took part in no run"
        for who, message in flows:
            assert who in (names - {party.id}) | {PROVIDER}, f"{party.id} got a FLOW from {who}"
            # Not even the provider's material equals a result's share: among three parties the
            # shares of r >> f it deals are re-masked after truncation (mpc/truncation.py).
            for tensor in _tensors(message.value):
                assert not _equal_to_any(tensor, private), f"{who} sent {party.id} a secret or a share"
        for who, message in seen[party.id]:
            if isinstance(message, Store):
                assert who == "me" and not _equal_to_any(message.obj, secrets)


# -- 4. refusals, before anything is sent --------------------------------------------------------
@contextlib.contextmanager
def _nothing_sent(monkeypatch: pytest.MonkeyPatch, workers: list[Any], what: str, check: bool = True) -> Any:
    """Fails (with ``check``) if any message to ``workers`` is queued inside; yields the list of
    workers that were sent something."""
    sent: list[str] = []
    for worker in workers:
        connection = worker.connection
        for name in ("tell", "tell_all", "command", "ask"):
            original = getattr(connection, name)

            def counting(*args: Any, _original: Any = original, _to: str = worker.id) -> Any:
                sent.append(_to)
                return _original(*args)

            monkeypatch.setattr(connection, name, counting)
    yield sent
    monkeypatch.undo()
    assert not check or not sent, f"{what}: refused, but messages went to {sent}"


@pytest.mark.parametrize("transport", ["virtual"], indirect=True)
@bounded(20)
async def test_mismatches_are_refused_naming_the_problem_before_anything_is_sent(
    cast: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    alice, bob, carol, dave = (cast[name] for name in (*PARTIES, PROVIDER))
    everyone = [alice, bob, carol, dave]
    x = mpc.share(torch.ones(2, 2), alice, bob, crypto_provider=dave)
    others = {
        "parties": mpc.share(torch.ones(2, 2), alice, carol, crypto_provider=dave),
        "order": mpc.share(torch.ones(2, 2), bob, alice, crypto_provider=dave),
        "more parties": mpc.share(torch.ones(2, 2), alice, bob, carol, crypto_provider=dave),
        "provider": mpc.share(torch.ones(2, 2), alice, bob, crypto_provider=carol),
        "no provider": mpc.share(torch.ones(2, 2), alice, bob),
        "precision": mpc.share(torch.ones(2, 2), alice, bob, crypto_provider=dave, precision=8),
        "integers": mpc.share(
            torch.ones(2, 2, dtype=torch.int64), alice, bob, crypto_provider=dave, precision=None
        ),
    }
    await asyncio.gather(x, *others.values())
    one, ints, bare, share = torch.ones(2), others["integers"], others["no provider"], mpc.share
    cases: list[tuple[str, Callable[[], Any], type[Exception], str]] = [
        ("parties +", lambda: x + others["parties"], ValueError, "different parties"),
        ("parties *", lambda: x * others["parties"], ValueError, "different parties"),
        ("party order @", lambda: x @ others["order"], ValueError, "different parties"),
        ("more parties", lambda: x * others["more parties"], ValueError, "different parties"),
        ("provider *", lambda: x * others["provider"], ValueError, "different crypto providers"),
        ("provider +", lambda: x + others["provider"], ValueError, "different crypto providers"),
        ("provider vs none", lambda: x @ others["no provider"], ValueError, "different crypto providers"),
        ("none at all", lambda: bare * bare, ValueError, "no crypto provider"),
        ("precision *", lambda: x * others["precision"], ValueError, "precisions differ"),
        ("precision +", lambda: x + others["precision"], ValueError, "precisions differ"),
        ("fixed vs integers", lambda: x + ints, ValueError, "precisions differ"),
        ("cat", lambda: mpc.cat([x, others["parties"]]), ValueError, "different parties"),
        ("provider is a party", lambda: share(one, alice, bob, crypto_provider=bob), ValueError,
         "provider bob cannot also be a party"),
        ("one party", lambda: share(one, alice, crypto_provider=dave), ValueError, "two or more"),
        ("no party", lambda: share(one, crypto_provider=dave), ValueError, "two or more"),
        ("same party twice", lambda: share(one, alice, alice, crypto_provider=dave), ValueError, "distinct"),
        ("bad precision", lambda: share(one, alice, bob, precision=40), ValueError, "precision"),
        ("float as integers", lambda: share(one, alice, bob, precision=None), TypeError, "int64"),
        ("too large to encode", lambda: share(one * 2.0**50, alice, bob), ValueError, "magnitude"),
        ("float public on integers", lambda: ints * 0.5, TypeError, "integer"),
    ]  # fmt: skip
    for name, operation, error, message in cases:
        with _nothing_sent(monkeypatch, everyone, name), pytest.raises(error, match=message):
            operation()


@pytest.mark.parametrize("transport", ["virtual"], indirect=True)
@pytest.mark.parametrize("case", ["sub parties", "sub provider", "sub precision", "mean of integers"])
@bounded(20)
async def test_refusals_of_sub_and_mean_send_nothing(
    cast: dict[str, Any], monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    alice, bob, carol, dave = (cast[name] for name in (*PARTIES, PROVIDER))
    one = torch.ones(2, 2)
    x = mpc.share(one, alice, bob, crypto_provider=dave)
    others = {
        "sub parties": (mpc.share(one, alice, carol, crypto_provider=dave), ValueError, "parties"),
        "sub provider": (mpc.share(one, alice, bob, crypto_provider=carol), ValueError, "provider"),
        "sub precision": (
            mpc.share(one, alice, bob, crypto_provider=dave, precision=8),
            ValueError,
            "precision",
        ),
        "mean of integers": (mpc.share(one.long(), alice, bob, precision=None), TypeError, "integers"),
    }
    other, error, message = others[case]
    await asyncio.gather(x, other)
    with (
        _nothing_sent(monkeypatch, [alice, bob, carol, dave], case, check=False) as sent,
        pytest.raises(error, match=message),
    ):
        if case == "mean of integers":
            other.mean()
        else:
            x - other  # the refusal is the point
    del others, other, x  # the refused operation's stray results are freed meanwhile
    gc.collect()
    assert not sent, f"{case}: refused, but messages went to {sent}"


@pytest.mark.parametrize("transport", ["virtual"], indirect=True)
@bounded(20)
async def test_int64_tensors_are_fixed_point_with_a_precision_and_ring_integers_without(
    cast: dict[str, Any],
) -> None:
    alice, bob, dave = cast["alice"], cast["bob"], cast[PROVIDER]
    value = torch.tensor([3, -7, 0])
    fixed = mpc.share(value, alice, bob, crypto_provider=dave, precision=16)
    ring = mpc.share(value, alice, bob, crypto_provider=dave, precision=None)
    assert fixed.precision == 16 and ring.precision is None
    assert sum(await asyncio.gather(*(s.fetch() for s in fixed.shares))).tolist() == [3 << 16, -7 << 16, 0]
    got = await (fixed * fixed).get()  # decoded to floats: 9, 49, 0 (truncated back to 16 bits)
    assert got.dtype == torch.float32 and got.tolist() == [9.0, 49.0, 0.0]
    exact = await (ring * ring).get()
    assert exact.dtype == torch.int64 and exact.tolist() == [9, 49, 0]
    half = await (fixed * 0.5).get()
    assert half.tolist() == [1.5, -3.5, 0.0]  # a fraction, which integers cannot hold
    with pytest.raises(TypeError, match="integer"):
        ring * 0.5


# -- 5. a party that leaves ----------------------------------------------------------------------
@bounded(25)
async def test_a_party_that_leaves_mid_product_fails_it_naming_the_party(transport: str) -> None:
    """Three parties and a provider; alice is cut off from the provider (her material never
    comes, so she never opens), bob and carol open theirs and wait for alice's: then alice's
    worker stops. Their parts fail at once naming alice; nothing waits for RECV_TIMEOUT."""
    async with contextlib.AsyncExitStack() as stack:
        held = {
            name: await stack.enter_async_context(worker_in_hand(transport, name))
            for name in (*PARTIES, PROVIDER)
        }
        (alice, alice_actor), (bob, bob_actor), (carol, carol_actor), (dave, _) = held.values()
        deliver = alice_actor.flows.deliver

        def from_anyone_but_dave(sender: str, *args: Any) -> None:
            if sender != PROVIDER:
                deliver(sender, *args)

        alice_actor.flows.deliver = from_anyone_but_dave
        waiting = {"bob": asyncio.Event(), "carol": asyncio.Event()}
        for name, actor in (("bob", bob_actor), ("carol", carol_actor)):
            receive = actor.flows.receive

            def noting(flow_id: int, party: str, tag: str, _receive: Any = receive, _name: str = name) -> Any:
                if party == "alice" and tag == "eps,delta":
                    waiting[_name].set()
                return _receive(flow_id, party, tag)

            actor.flows.receive = noting

        x = mpc.share(torch.randn(8, 8), alice, bob, carol, crypto_provider=dave)
        await x
        product = x * x
        await asyncio.gather(*(event.wait() for event in waiting.values()))  # mid-protocol
        await alice_actor.close()
        for i, name in ((1, "bob"), (2, "carol")):
            with pytest.raises((WorkerLost, FlowAborted), match="alice"):
                await product.shares[i]
            assert not held[name][1].flow_tasks, f"{name}'s part of the run is still running"
        with pytest.raises(SyftError):
            await product.shares[0]
        del x, product
        for _ in range(2):  # failed results' tracebacks hold pointers in cycles
            gc.collect()
            await asyncio.sleep(0.01)
        await assert_stores_empty([bob, carol, dave])


@pytest.mark.parametrize("transport", ["virtual"], indirect=True)
@bounded(20)
async def test_a_party_gone_before_the_product_starts_fails_it_naming_the_party(make_worker: Any) -> None:
    """Two parties: alice's worker stops as the product is issued, before she opens anything.
    Bob's part fails naming alice, and the leader refuses the next product at once."""
    alice, bob, dave = [await make_worker(name) for name in ("alice", "bob", PROVIDER)]
    x = mpc.share(torch.randn(4, 4), alice, bob, crypto_provider=dave)
    await x
    product = x @ x
    await alice.worker.close()
    with pytest.raises((WorkerLost, FlowAborted), match="alice"):
        await product.shares[1]
    with pytest.raises(WorkerLost, match="alice"):
        x * x
    del x, product
    for _ in range(2):
        gc.collect()
        await asyncio.sleep(0.01)


# -- 7. many products at once --------------------------------------------------------------------
@pytest.mark.parametrize("transport", ["virtual"], indirect=True)
@pytest.mark.parametrize("n", [2, 3])
@bounded(30)
async def test_twenty_products_issued_together_are_each_right(cast: dict[str, Any], n: int) -> None:
    """20 independent products (muls and matmuls, each with its own provider run) issued before
    any await, their runs interleaving on the same workers: none takes another's material or
    openings (every result checked; a mix-up would be off by whole units)."""
    parties, provider = _parties(cast, n), cast[PROVIDER]
    generator = torch.Generator().manual_seed(20 + n)
    pairs = [
        ((torch.rand(3, 3, generator=generator) * 2 - 1) * 10, torch.full((3, 3), i - 9.5)) for i in range(20)
    ]
    shared = [
        (mpc.share(a, *parties, crypto_provider=provider), mpc.share(b, *parties, crypto_provider=provider))
        for a, b in pairs
    ]
    products = [sa * sb if i % 2 else sa @ sb for i, (sa, sb) in enumerate(shared)]
    assert all(p.depth == (1 if n == 2 else 2) for p in products)  # independent: their rounds overlap
    values = await asyncio.gather(*(p.get() for p in products))
    for i, ((a, b), got) in enumerate(zip(pairs, values, strict=True)):
        if i % 2:
            _assert_close(got, a * b, _product_bound(a, b), f"mul {i}")
        else:
            _assert_close(got, a @ b, _matmul_bound(a, b), f"matmul {i}")
