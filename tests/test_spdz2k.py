"""The authenticated mode (SPDZ2k, :mod:`mpc.spdz2k`): every operation against plain PyTorch,
encrypted inference and training against the plaintext step, and every cheat a party can try
with its own worker caught before any value is revealed.

A cheating party here is ``bob`` with its protocol code changed (the flows of a virtual worker
run in this process, so the test swaps a function for ``bob`` only) or its stored objects
edited: exactly what an attacker who runs a party's worker controls. The honest parties and the
leader use the public API. Fixed-point bounds are those of ``tests/test_mpc.py``: a product is off
by at most ``(|x| + |y|) U + U``.
"""

from __future__ import annotations

import asyncio
import copy
import math
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import mpc
from actors.flows import start_flow
from actors.pointer import call
from mpc import spdz2k, wide
from mpc.spdz2k import protocols
from mpc.spdz2k.material import AuthMaterial
from mpc.spdz2k.shares import AuthShare
from mpc.training import reference_step, sgd_step
from protocol import (
    BadArguments,
    CheatingDetected,
    CommitmentBroken,
    FlowAborted,
    MacCheckFailed,
    OutputsDisagree,
    SyftError,
)
from tests.conftest import bounded

U = 2.0**-16
PARTIES = ("alice", "bob", "carol")


@pytest.fixture
async def cast(make_worker: Any) -> dict[str, Any]:
    return {name: await make_worker(name) for name in (*PARTIES, "dave")}


def _session(cast: dict[str, Any], n: int = 2) -> spdz2k.Session:
    return spdz2k.Session(*(cast[p] for p in PARTIES[:n]), crypto_provider=cast["dave"])


def _close(got: torch.Tensor, expected: torch.Tensor, bound: Any, what: str) -> None:
    assert got.shape == expected.shape, f"{what}: shape {list(got.shape)}"
    error = (got.double() - expected.double()).abs()
    allowed = torch.as_tensor(bound, dtype=torch.float64) + expected.double().abs() * 2**-23 + 1e-12
    assert bool((error <= allowed).all()), f"{what}: off by {float((error - allowed).max()):.3g} beyond bound"


# -- 1. what it computes ------------------------------------------------------------------------
@pytest.mark.parametrize("n", [2, 3])
@bounded(120)
async def test_operations_match_plain_pytorch(cast: dict[str, Any], transport: str, n: int) -> None:
    if transport != "virtual" and n == 3:
        pytest.skip("three parties run over the virtual transport; the network runs two")
    torch.manual_seed(n)
    session = _session(cast, n)
    x, y, w = torch.randn(4, 3), torch.randn(4, 3), torch.randn(3, 5)
    sx, sy, sw = await asyncio.gather(session.share(x), session.share(y), session.share(w))
    cases: list[tuple[str, Any, torch.Tensor, Any]] = [
        ("x", sx, x, U),
        ("x + y", sx + sy, x + y, 2 * U),
        ("x - y + 1.5", sx - sy + 1.5, x - y + 1.5, 3 * U),
        ("-x", -sx, -x, U),
        ("x * y", sx * sy, x * y, (x.abs() + y.abs()) * U + U),
        ("x * 0.75", sx * 0.75, x * 0.75, (x.abs() + 0.75) * U + U),
        ("x @ w", sx @ sw, x @ w, (x.abs().sum(1, keepdim=True) + w.abs().sum(0)) * U + U),
        ("x @ public", sx @ w, x @ w, (x.abs().sum(1, keepdim=True) + w.abs().sum(0)) * U + U),
        ("public @ w", x @ sw, x @ w, (x.abs().sum(1, keepdim=True) + w.abs().sum(0)) * U + U),
        ("x.scale(1e-3)", sx.scale(1e-3), x * 1e-3, 2 * U),
        ("x.sum(0)", sx.sum(0), x.sum(0), 4 * U),
        ("x.mean()", sx.mean(), x.mean(), 13 * U),
        ("x.t()[1:, ::2]", sx.t()[1:, ::2], x.t()[1:, ::2], U),
        ("x.reshape(2, 6)", sx.reshape(2, 6), x.reshape(2, 6), U),
        ("cat", mpc.cat([sx, sy], dim=1), torch.cat([x, y], 1), U),
        ("x + bias", sx + sw[:, 0], x + w[:, 0], 2 * U),
        ("combine", sx.combine([(0.5, sx), (-2.0, sy)], 0.25), 0.25 + 0.5 * x - 2 * y, 6 * U),
        ("sigmoid", sx.sigmoid(), mpc.sigmoid.approx(x), 40 * U),
    ]
    for what, shared, expected, bound in cases:
        assert isinstance(shared, spdz2k.AuthenticatedTensor), what
        _close(await shared.get(), expected, bound, what)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.integers(1, 5),
    inner=st.integers(1, 6),
    cols=st.integers(1, 4),
    magnitude=st.sampled_from([1e-3, 1.0, 30.0]),
    n=st.sampled_from([2, 3]),
    seed=st.integers(0, 2**16),
)
async def test_honest_runs_pass_the_check_for_any_shape_and_magnitude(
    cast: dict[str, Any],
    transport: str,
    rows: int,
    inner: int,
    cols: int,
    magnitude: float,
    n: int,
    seed: int,
) -> None:
    """Products and linear operations over shapes, signs and magnitudes: every check passes
    (no false alarm) and every result is the plaintext one within the fixed-point bound."""
    if transport != "virtual":
        pytest.skip("hypothesis searches over the virtual transport; the network runs fixed cases")
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, inner, generator=generator, dtype=torch.float64) * magnitude
    y = torch.randn(rows, inner, generator=generator, dtype=torch.float64) * magnitude
    w = torch.randn(inner, cols, generator=generator, dtype=torch.float64) * magnitude
    async with asyncio.timeout(30):
        session = _session(cast, n)
        sx, sy, sw = await asyncio.gather(session.share(x), session.share(y), session.share(w))
        x, y, w = (mpc.decode(mpc.encode(t)).double() for t in (x, y, w))  # what was shared
        _close(await (sx * sy - sx).get(), x * y - x, (x.abs() + y.abs()) * U + 2 * U, "x * y - x")
        bound = (x.abs().sum(1, keepdim=True) + w.abs().sum(0)) * U + U
        _close(await (sx @ sw + 0.5).get(), x @ w + 0.5, bound + U, "x @ w + 0.5")
        await session.verify()


@bounded(60)
async def test_integers_wrap_exactly_modulo_2_64(cast: dict[str, Any]) -> None:
    session = _session(cast)
    x = torch.tensor([2**62 + 3, -(2**63), 12345, -1], dtype=torch.int64)
    y = torch.tensor([5, 3, -(2**40), 2**63 - 1], dtype=torch.int64)
    sx, sy = await session.share(x, precision=None), await session.share(y, precision=None)
    assert torch.equal(await (sx * sy).get(), x * y)  # torch's int64 product wraps mod 2^64
    assert torch.equal(await (sx + sy + 7).get(), x + y + 7)


@bounded(120)
async def test_encrypted_training_matches_the_plaintext_step(cast: dict[str, Any]) -> None:
    """One SGD step of a Linear-sigmoid-Linear model on authenticated shares, parameter by
    parameter against :func:`reference_step`, then inference with the updated model."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 6), mpc.ApproxSigmoid(), nn.Linear(6, 1))
    plain = copy.deepcopy(model)
    x, y = torch.randn(8, 4) * 0.5, torch.randn(8, 1)
    session = _session(cast)
    encrypted = await session.share_module(model)
    sx, sy = await session.share(x), await session.share(y)
    output = sgd_step(encrypted, sx, sy, lr=0.1)
    expected_output = reference_step(plain, x, y, 0.1)
    _close(await output.get(), expected_output, 2e-3, "output")
    for (name, shared), reference in zip(encrypted.named_parameters(), plain.parameters(), strict=True):
        _close(await shared.get(), reference.detach(), 2e-3, name)
    _close(await encrypted(sx).get(), plain(x).detach(), 2e-3, "inference after the step")
    await session.verify()


@bounded(60)
async def test_material_made_ahead_is_used_and_checked(cast: dict[str, Any]) -> None:
    session = _session(cast)
    x, y = torch.randn(5, 5), torch.randn(5, 5)
    sx, sy = await session.share(x), await session.share(y)
    with mpc.recording() as asked:
        first = sx @ sy
    await first
    made = asked.prepare()
    await asyncio.gather(*(share.resolve() for material in made for share in material))
    assert {key[2] for key in asked.keys} == {"auth.matmul", "auth.trunc"}
    _close(await (sx @ sy).get(), x @ y, (x.abs().sum(1, keepdim=True) + y.abs().sum(0)) * U + U, "prepared")
    assert not mpc.tensor._PREPARED, "the prepared material was used"


@bounded(60)
async def test_verify_covers_concurrent_runs_and_reveals_nothing(
    cast: dict[str, Any], transport: str
) -> None:
    _in_hand(transport)
    session = _session(cast)
    sx = await session.share(torch.randn(3, 3))
    products = [sx * sx for _ in range(4)]  # issued together, checked together
    await session.verify()
    assert session.take_unchecked() == ([], [[], []])
    for p in products:
        await p
    for name in ("alice", "bob"):
        assert not any(key.pending for key in _keys(cast[name])), f"{name} still holds unchecked openings"


def _in_hand(transport: str) -> None:
    if transport != "virtual":
        pytest.skip("reads a worker's store: the virtual transport hands the worker itself")


def _keys(worker: Any) -> list[Any]:
    return [obj for obj in worker.worker.store.objects.values() if isinstance(obj, spdz2k.shares.MacKey)]


def _stored(worker: Any, pointer: Any) -> Any:
    """An object in a virtual worker's store: what the attacker who runs that worker can edit."""
    return worker.worker.store.get(pointer.id)


@bounded(60)
async def test_argument_errors_are_named(cast: dict[str, Any]) -> None:
    session = _session(cast)
    sx, sy = await session.share(torch.randn(2, 3)), await session.share(torch.randn(3, 2))
    with pytest.raises(ValueError, match="operands of one shape"):
        sx * sy
    plain = mpc.share(torch.randn(2, 3), cast["alice"], cast["bob"], crypto_provider=cast["dave"])
    with pytest.raises(ValueError, match="not of one authenticated session"):
        sx + plain
    other = _session(cast)
    sz = await other.share(torch.randn(2, 3))
    with pytest.raises(ValueError, match="not of one authenticated session"):
        sx + sz
    with pytest.raises(TypeError, match="not available in the authenticated mode"):
        sx.conv2d(torch.ones(1, 1, 1, 1))
    await plain


# -- 2. what an attacker cannot do ----------------------------------------------------------------
@bounded(60)
async def test_a_share_or_key_never_leaves_its_party(cast: dict[str, Any], transport: str) -> None:
    """The leader (or anyone holding a pointer) asking for bob's share, MAC or key share gets
    a refusal: the codec cannot carry them, so only checked openings leave a party."""
    _in_hand(transport)
    session = _session(cast)
    sx = await session.share(torch.randn(2, 2))
    await sx
    share, key = sx.shares[1], session.keys[1]
    for pointer in (share, key):
        with pytest.raises(BadArguments, match=r"cannot send an object of type mpc\.spdz2k"):
            await pointer.fetch()
    # nor through the tensor allowlist or the semi-honest protocols: none takes one
    attempts = [
        share + 0,
        share.data,
        share.reshape(-1),
        call(cast["bob"], "mpc.truncate_share", [share, 16, 1]),
    ]
    for attempt in attempts:
        with pytest.raises(SyftError):
            await attempt.fetch()
    assert isinstance(_stored(cast["bob"], share), AuthShare)


@bounded(60)
async def test_what_a_party_sees_of_an_input_or_an_output_is_masked(
    cast: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """bob records what it is sent: the leader's masked input ``x - r`` and the opened output.
    The same ``x`` shared twice shows bob two unrelated values, neither of them ``x``; the same
    value revealed twice shows the same low word (the output, which the parties are meant to
    learn) under two unrelated high words (the lift, which would tell how it was computed)."""
    seen: dict[str, list[torch.Tensor]] = {"input": [], "output": []}
    honest_add, honest_open = protocols.add_lifted, protocols.open_all

    def add_lifted(share: Any, key: Any, lifted: torch.Tensor, first: bool) -> Any:
        if not first:  # bob, the second of two parties, taking the public x - r
            seen["input"].append(lifted.clone())
        return honest_add(share, key, lifted, first)

    async def open_all(
        ctx: Any, parties: list[str], tag: str, values: list[torch.Tensor], add: Any = None
    ) -> Any:
        opened = await honest_open(ctx, parties, tag, values, add)
        if ctx.me == "bob" and tag == "output":
            seen["output"].append(opened[0].clone())
        return opened

    monkeypatch.setattr(protocols, "add_lifted", add_lifted)
    monkeypatch.setattr(protocols, "open_all", open_all)
    x = torch.tensor([1.5, -2.0, 3.25])
    session = _session(cast)
    shared = [await session.share(x) for _ in range(2)]
    for tensor in shared:
        await tensor
    encoded = mpc.encode(x)
    first, second = seen["input"]
    assert not bool((wide.low(first) == encoded).any()) and not bool((wide.low(second) == encoded).any())
    assert not bool((first == second).any()), "the same input was masked the same way twice"
    assert torch.equal(await shared[0].get(), x) and torch.equal(await shared[0].get(), x)
    one, two = seen["output"]
    assert torch.equal(one[0], encoded) and torch.equal(two[0], encoded)  # the output itself
    assert not bool((one[1] == two[1]).any()), "the output's high word was not masked afresh"


def _cheat_on_opening(monkeypatch: pytest.MonkeyPatch, tag: str, error: int = 1, high: bool = False) -> None:
    """bob adds ``error`` (to the low or the high word) to what it opens under ``tag``."""
    honest = protocols.open_all

    async def cheating(
        ctx: Any, parties: list[str], what: str, values: list[torch.Tensor], add: Any = None
    ) -> Any:
        if ctx.me == "bob" and what == tag:
            bad = values[0].clone()
            bad[1 if high else 0].view(-1)[0] += error
            values = [bad, *values[1:]]
        return await honest(ctx, parties, what, values, add)

    monkeypatch.setattr(protocols, "open_all", cheating)


@pytest.mark.parametrize("tag", ["eps,delta", "z-r", "output"])
@bounded(60)
async def test_an_error_in_an_opening_is_caught(
    cast: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tag: str
) -> None:
    session = _session(cast)
    sx, sy = await session.share(torch.randn(3, 3)), await session.share(torch.randn(3, 3))
    _cheat_on_opening(monkeypatch, tag)
    with pytest.raises(MacCheckFailed, match="MAC check failed"):
        await (sx * sy).get()


@pytest.mark.parametrize("part", ["value", "mac"])
@bounded(60)
async def test_an_error_in_a_share_or_its_mac_is_caught(
    cast: dict[str, Any], part: str, transport: str
) -> None:
    _in_hand(transport)
    session = _session(cast)
    sx, sy = await session.share(torch.randn(3, 3)), await session.share(torch.randn(3, 3))
    await sx
    share = _stored(cast["bob"], sx.shares[1])
    getattr(share, part)[0, 1, 1] += 1  # bob edits its own share of x
    with pytest.raises(MacCheckFailed):
        await (sx + sy).get()


@pytest.mark.parametrize("which", [0, 1, 2])  # a, b, c of the triple
@bounded(60)
async def test_an_error_in_a_triple_is_caught(cast: dict[str, Any], which: int, transport: str) -> None:
    _in_hand(transport)
    session = _session(cast)
    sx, sy = await session.share(torch.randn(3, 3)), await session.share(torch.randn(3, 3))
    mpc.prepare("mul", sx, sy)
    ready = next(iter(mpc.tensor._PREPARED.values()))[0]
    await asyncio.gather(*(p.resolve() for p in ready))
    material = _stored(cast["bob"], ready[1])
    assert isinstance(material, AuthMaterial)
    material.shares[which].value[0, 0, 0] += 1 << 20  # bob's share of a, b or c
    with pytest.raises(MacCheckFailed):
        await (sx * sy).get()


@pytest.mark.parametrize("guess", [0, 1])
@bounded(60)
async def test_the_z_2_64_pitfall_does_not_apply(cast: dict[str, Any], guess: int, transport: str) -> None:
    """Over Z_2^64 with a 64-bit key, adding 2^63 to a share and ``guess * 2^63`` to its MAC passes
    whenever the guess matches the key's parity: half the time. Here MACs are modulo 2^128 and the
    error ``alpha 2^63`` depends on 65 bits of alpha: both guesses are caught."""
    _in_hand(transport)
    session = _session(cast)
    sx = await session.share(torch.randn(2, 2))
    await sx
    share = _stored(cast["bob"], sx.shares[1])
    share.value[0, 0, 0] += -(2**63)  # + 2^63 in the low word
    share.mac[0, 0, 0] += -(2**63) * guess
    with pytest.raises(MacCheckFailed):
        await sx.get()


@bounded(60)
async def test_an_error_in_the_high_word_only_is_caught(
    cast: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An error of 2^64 leaves the value modulo 2^64 alone but still fails the MAC: the check is
    on the whole 128 bits, so the cheat is seen even when it would have done no harm."""
    session = _session(cast)
    sx, sy = await session.share(torch.randn(2, 2)), await session.share(torch.randn(2, 2))
    _cheat_on_opening(monkeypatch, "eps,delta", high=True)
    product = sx * sy
    with pytest.raises(MacCheckFailed):
        await session.verify()
    await product


@bounded(60)
async def test_a_seed_other_than_the_committed_one_is_caught(
    cast: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """bob commits to one coin seed and opens another (to steer the coefficients)."""
    honest = protocols._CoinToss.result

    async def switched(self: Any) -> bytes:
        if self.ctx.me == "bob":
            self.seed = bytes(16)
        return await honest(self)

    monkeypatch.setattr(protocols._CoinToss, "result", switched)
    session = _session(cast)
    sx = await session.share(torch.randn(2, 2))
    with pytest.raises(CommitmentBroken, match="coin toss: bob"):
        await (sx * sx).get()


@bounded(60)
async def test_a_rushing_party_cannot_cancel_its_error(
    cast: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """bob cheats on an opening, then waits for alice's check value and opens the one that makes
    the sum zero: it cannot have committed to that value, so the commitment gives it away."""
    _cheat_on_opening(monkeypatch, "eps,delta")
    honest = protocols._open_committed

    async def rushing(ctx: Any, parties: list[str], sigma: torch.Tensor) -> Any:
        if ctx.me != "bob":
            return await honest(ctx, parties, sigma)
        ctx.send("alice", "sigma-commit", bytes(32))
        await ctx.recv("alice", "sigma-commit")
        salt, theirs = await ctx.recv("alice", "sigma")
        ctx.send("alice", "sigma", [salt, wide.neg(theirs)])
        return [sigma]

    monkeypatch.setattr(protocols, "_open_committed", rushing)
    session = _session(cast)
    sx = await session.share(torch.randn(2, 2))
    product = sx * sx
    with pytest.raises(CommitmentBroken, match="MAC check: bob"):
        await session.verify()
    await asyncio.gather(*(s.resolve() for s in product.shares))


@bounded(60)
async def test_a_party_that_reports_another_output_is_caught(
    cast: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """bob passes the check honestly, then tells the leader another value than was opened."""
    honest = protocols.mac_check

    async def lying(ctx: Any, key: Any, parties: list[str], entries: list[Any], coin: Any = None) -> None:
        await honest(ctx, key, parties, entries, coin)
        if ctx.me == "bob":
            entries[-1][0][0] += 1  # the opened output, which bob's part then returns

    monkeypatch.setattr(protocols, "mac_check", lying)
    session = _session(cast)
    sx = await session.share(torch.tensor([1.0, 2.0]))
    with pytest.raises(OutputsDisagree, match="bob reported another value"):
        await sx.get()


@bounded(60)
async def test_a_caught_session_refuses_further_work(
    cast: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    session = _session(cast)
    sx = await session.share(torch.randn(2, 2))
    _cheat_on_opening(monkeypatch, "eps,delta")
    with pytest.raises(MacCheckFailed):
        await (sx * sx).get()
    monkeypatch.undo()
    with pytest.raises((CheatingDetected, FlowAborted)):
        await (sx * sx).get()
    with pytest.raises(CheatingDetected, match="aborted"):
        await (sx + 1.0).get()


@bounded(60)
async def test_a_leader_cannot_check_runs_that_never_ran(cast: dict[str, Any]) -> None:
    session = _session(cast)
    sx = await session.share(torch.randn(2, 2))
    session.opened(12345, [sx.shares[0], sx.shares[1]])
    with pytest.raises(BadArguments, match="opened nothing here"):
        await session.verify()


async def test_the_check_is_stated_at_forty_bits_or_more() -> None:
    assert pytest.approx(64 - math.log2(65), abs=0.05) == spdz2k.SECURITY_BITS
    assert spdz2k.SECURITY_BITS >= 40


@bounded(60)
async def test_material_from_a_provider_other_than_the_session_s_is_refused(cast: dict[str, Any]) -> None:
    """A malicious leader has carol (which it may control) deal the product's triple, in the run
    or made ahead under the session's own id: a triple its dealer knows would unmask the
    openings, so the parties take material only from the provider that dealt their key."""
    session = _session(cast)
    sx = await session.share(torch.randn(2, 2))
    parties, ids = session.parties, [p.id for p in session.parties]
    carol = cast["carol"]

    def product(material: list[Any] | None, provider: str | None) -> list[Any]:
        calls = {
            party: (
                [sx.shares[i], sx.shares[i], session.keys[i], material[i] if material else None],
                {"op": "mul", "parties": ids, "provider": provider},
            )
            for i, party in enumerate(parties)
        }
        runs = start_flow("mpc.auth.beaver", calls)
        return [runs[p] for p in parties]

    for result in product(None, "carol"):
        with pytest.raises(BadArguments, match="carol did not deal this session's key"):
            await result.resolve()
    rogue = {carol: ([session.id, ids], None)} | {p: ([session.id, "carol"], None) for p in parties}
    keys = start_flow("mpc.auth.key", rogue, ops={carol: "provider.auth_key"})
    material = mpc.tensor._new_material(carol, parties, "auth.mul", [[2, 2], [2, 2]], {"session": session.id})
    for result in product(material, None):
        with pytest.raises(BadArguments, match="another provider"):
            await result.resolve()
    for pointer in keys.values():
        await pointer.resolve()


@bounded(60)
async def test_a_cheat_is_not_forgotten_when_the_check_is_broken_off(
    cast: dict[str, Any], monkeypatch: pytest.MonkeyPatch, transport: str
) -> None:
    """bob cheats on an opening, then makes the check fail with an error of another kind (it
    claims the run never ran here): alice has already taken the openings off for the check, so
    the session stops, and no later check can pass with the cheat unchecked."""
    _in_hand(transport)
    session = _session(cast)
    sx = await session.share(torch.randn(2, 2))
    await sx
    bob_key = _stored(cast["bob"], session.keys[1])
    honest = protocols._pending

    def claims_missing(key: Any, runs: Any) -> Any:
        if key is bob_key:
            raise BadArguments("runs opened nothing here")
        return honest(key, runs)

    _cheat_on_opening(monkeypatch, "eps,delta")
    monkeypatch.setattr(protocols, "_pending", claims_missing)
    product = sx * sx
    with pytest.raises((BadArguments, FlowAborted)):
        await session.verify()
    monkeypatch.undo()
    with pytest.raises(CheatingDetected, match="did not complete"):
        await (product + 1.0).get()
