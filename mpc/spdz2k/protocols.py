"""The authenticated protocols: inputs, Beaver products and truncation carrying MACs, and the
batched MAC check that runs before any value is revealed.

**Products.** As in :mod:`mpc.beaver`, every party opens ``eps = x - a`` and ``delta = y - b``
(now modulo 2^128, still uniform) and computes ``z = c + eps b + a delta (+ eps delta on party
0)``; its MAC share follows the same formula with the MAC shares of ``c``, ``b`` and ``a`` and
``alpha_i eps delta``. Each opened value is kept with this party's MAC share of it
(``m_x - m_a``) until a check.

**Truncation** cannot be local with MACs (the notes): the provider's authenticated pair
``[r], [r >> f]`` (``>>`` on the low 64 bits, as the semi-honest mode), one opening of ``z - r``,
and the public ``((z - r) >> f) + 1`` added, exactly the semi-honest arithmetic.

**The check** (SPDZ2k, Cramer et al. 2018, batched as in its section 4): the parties toss a
coin (commit to a 16-byte seed each, then open; the XOR seeds AES-CTR) for coefficients
``chi_j`` uniform in Z_2^64, one per opened element; party ``i`` computes
``sigma_i = sum chi_j m_ij - alpha_i sum chi_j y_j`` modulo 2^128, commits to it, opens it, and
everyone aborts unless ``sum sigma_i = 0``. An error ``e`` on an opened value (from a changed
share, opening, MAC or triple) survives only if ``alpha e`` is guessed modulo 2^128 with the low
64 bits of ``alpha`` uniform to the cheater: the check passes a cheat with probability at most
``2^-(s - log2(s + 1))`` for s = 64, about ``2^-58`` per check.

**Outputs** are opened among the parties with their high 64 bits masked by ``2^64 rho`` (the
lift's high bits say something about how the value was computed), checked with everything
opened before them, and only then returned: each party's result is the value modulo 2^64, so
the leader, who fetches every party's, sees them agree or knows someone lied.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import os
from collections.abc import Iterator
from typing import Any

import torch

from actors.context import Context
from actors.registry import command
from mpc import wide
from mpc.opening import check_parties, open_all
from mpc.provider import COMMAND_SET
from mpc.ring import SEED_BYTES, check_shift, expand
from mpc.spdz2k.material import Parts, plan, take
from mpc.spdz2k.shares import AuthShare, MacKey, add_lifted, check_key, check_public, check_share
from protocol import BadArguments, CommitmentBroken, MacCheckFailed

#: SPDZ2k's s: the bits by which shares and MACs are wider than values (k = 64, k + s = 128).
S = 64
#: Statistical security of one MAC check, in bits (about 58).
SECURITY_BITS = S - math.log2(S + 1)


@command("mpc.auth.beaver", command_set=COMMAND_SET, kind="flow")
async def beaver(
    ctx: Context,
    x: Any,
    y: Any,
    key: Any,
    material: Any = None,
    *,
    op: str,
    parties: list[str],
    bits: int | None = None,
    trunc: Any = None,
    provider: str | None = None,
) -> AuthShare:
    """This party's authenticated share of ``x * y`` or ``x @ y`` (truncated by ``bits``)."""
    index = check_parties(ctx, parties)
    mac_key = check_key(key)
    xs, ys = check_share("x", x, mac_key), check_share("y", y, mac_key)
    if op not in ("mul", "matmul"):
        raise BadArguments(f"unknown authenticated product {op!r}")
    parts: Parts | None = None
    if material is not None:
        a, b, c = take(material, op, mac_key)
        a_value, b_value = a.value, b.value
    elif provider is not None:
        if provider != mac_key.provider:
            raise BadArguments(f"{provider} did not deal this session's key: its material is not taken")
        shapes = plan(op, [list(xs.shape), list(ys.shape)], {})
        parts = await Parts(op, mac_key.session, provider, shapes).receive(
            ctx, last=index == len(parties) - 1
        )
        a_value, b_value = parts.free
    else:
        raise BadArguments("a product needs material made ahead, or the provider of this run")
    if a_value.shape != xs.value.shape or b_value.shape != ys.value.shape:
        shapes = f"{list(a_value.shape[1:])} and {list(b_value.shape[1:])}"
        raise BadArguments(
            f"the triple is for shapes {shapes}, the operands are {list(xs.shape)} and {list(ys.shape)}"
        )
    eps, delta = await open_all(
        ctx, parties, "eps,delta", [wide.sub(xs.value, a_value), wide.sub(ys.value, b_value)], wide.add
    )
    if parts is not None:
        a, b, c = await parts.complete(ctx)
    mac_key.record(ctx.flow_id or 0, eps, wide.sub(xs.mac, a.mac))
    mac_key.record(ctx.flow_id or 0, delta, wide.sub(ys.mac, b.mac))
    # z = c + eps b + a delta (+ eps delta on party 0) = c + eps b + (a + eps) delta, and its
    # MAC share m_c + eps m_b + (m_a + alpha_i eps) delta: four products, eps delta folded in
    left_value = wide.add(a.value, eps) if index == 0 else a.value
    left_mac = wide.add(a.mac, mac_key.times(eps))
    if op == "mul":
        value = wide.add(c.value, wide.add(wide.mul(eps, b.value), wide.mul(left_value, delta)))
        mac = wide.add(c.mac, wide.add(wide.mul(eps, b.mac), wide.mul(left_mac, delta)))
    else:  # one product per public operand: [b | m_b] side by side, [a ; m_a] stacked
        right = wide.matmul(eps, torch.cat([b.value, b.mac], dim=2))
        left = wide.matmul(torch.cat([left_value, left_mac], dim=1), delta)
        n, m = a.value.shape[1], b.value.shape[2]
        value = wide.add(c.value, wide.add(right[:, :, :m], left[:, :n]))
        mac = wide.add(c.mac, wide.add(right[:, :, m:], left[:, n:]))
    z = AuthShare(value, mac, mac_key.session)
    if bits is None:
        return z
    return await truncate(ctx, mac_key, z, bits, parties, index, trunc)


async def truncate(  # noqa: PLR0917 - one private caller per protocol
    ctx: Context, key: MacKey, z: AuthShare, bits: int, parties: list[str], index: int, material: Any
) -> AuthShare:  # fmt: skip
    check_shift(bits)
    r, shifted = take(material, "trunc", key)
    if r.value.shape != z.value.shape:
        raise BadArguments(f"truncation material must be of shape {list(z.shape)}")
    if index != 0:  # re-mask: the provider dealt this party's shares of r >> f (see mpc.truncation)
        masks = [wide.random(list(z.shape)), wide.random(list(z.shape))]
        ctx.send(parties[0], "remask", masks)
    (w,) = await open_all(ctx, parties, "z-r", [wide.sub(z.value, r.value)], wide.add)
    key.record(ctx.flow_id or 0, w, wide.sub(z.mac, r.mac))
    public = wide.from_int64((wide.low(w) >> bits).add_(1))  # +1: unbiased, as mpc.truncation
    out = add_lifted(shifted, key, public, index == 0)
    if index != 0:
        return AuthShare(wide.sub(out.value, masks[0]), wide.sub(out.mac, masks[1]), out.session)
    value, mac = out.value, out.mac
    for party in parties[1:]:
        theirs = await ctx.recv(party, "remask")
        if (
            not isinstance(theirs, list)
            or len(theirs) != 2
            or any(
                not isinstance(t, torch.Tensor) or t.dtype != torch.int64 or t.shape != value.shape
                for t in theirs
            )
        ):
            raise BadArguments(f"{party} sent a re-mask of the wrong kind or shape")
        value, mac = wide.add(value, theirs[0]), wide.add(mac, theirs[1])
    return AuthShare(value, mac, out.session)


@command("mpc.auth.truncate", command_set=COMMAND_SET, kind="flow")
async def truncate_flow(
    ctx: Context, z: Any, key: Any, *, bits: int, parties: list[str], trunc: Any
) -> AuthShare:
    """Truncate one authenticated value on its own (after a product by a public number)."""
    index = check_parties(ctx, parties)
    mac_key = check_key(key)
    return await truncate(ctx, mac_key, check_share("z", z, mac_key), bits, parties, index, trunc)


@command("mpc.auth.input", command_set=COMMAND_SET, context=False)
def input_share(material: Any, key: Any, masked: Any, first: bool) -> AuthShare:
    """This party's share of an input ``x`` from the provider's ``[r]`` and the public
    ``x - r`` its owner (who alone knows ``r``) computed."""
    mac_key = check_key(key)
    (r,) = take(material, "input", mac_key)
    d = check_public(masked)
    if d.shape != r.value.shape:
        raise BadArguments(f"the masked input has shape {list(d.shape)}, the mask {list(r.value.shape)}")
    return add_lifted(r, mac_key, d, first)


class _CoinToss:
    """Commit to a seed now, open it once every party has committed: nobody can choose its
    seed after seeing another's, so the coefficients are uniform if one party is honest."""

    def __init__(self, ctx: Context, parties: list[str]) -> None:
        self.ctx, self.others = ctx, [p for p in parties if p != ctx.me]
        self.seed = os.urandom(SEED_BYTES)
        for party in self.others:
            ctx.send(party, "coin-commit", hashlib.sha256(self.seed).digest())

    async def result(self) -> bytes:
        commits = await asyncio.gather(*(self.ctx.recv(p, "coin-commit") for p in self.others))
        for party in self.others:
            self.ctx.send(party, "coin", self.seed)
        seeds = await asyncio.gather(*(self.ctx.recv(p, "coin") for p in self.others))
        coin = bytearray(self.seed)
        for party, commit, seed in zip(self.others, commits, seeds, strict=True):
            if (
                not isinstance(seed, bytes)
                or len(seed) != SEED_BYTES
                or hashlib.sha256(seed).digest() != commit
            ):
                raise CommitmentBroken(f"coin toss: {party} opened a seed that does not match its commitment")
            coin = bytearray(x ^ y for x, y in zip(coin, seed, strict=True))
        return bytes(coin)


async def _open_committed(ctx: Context, parties: list[str], sigma: torch.Tensor) -> list[torch.Tensor]:
    """Everyone's ``sigma``, each committed to (salted SHA-256) before any is opened."""
    others = [p for p in parties if p != ctx.me]
    salt = os.urandom(16)
    for party in others:
        ctx.send(party, "sigma-commit", hashlib.sha256(salt + sigma.numpy().tobytes()).digest())
    commits = await asyncio.gather(*(ctx.recv(p, "sigma-commit") for p in others))
    for party in others:
        ctx.send(party, "sigma", [salt, sigma])
    opened = await asyncio.gather(*(ctx.recv(p, "sigma") for p in others))
    sigmas = [sigma]
    for party, commit, theirs in zip(others, commits, opened, strict=True):
        ok = (
            isinstance(theirs, list) and len(theirs) == 2 and isinstance(theirs[0], bytes)
            and isinstance(theirs[1], torch.Tensor) and theirs[1].dtype == torch.int64
            and theirs[1].shape == (2,)
        )  # fmt: skip
        if not ok or hashlib.sha256(theirs[0] + theirs[1].numpy().tobytes()).digest() != commit:
            raise CommitmentBroken(f"MAC check: {party} opened a share other than the one it committed to")
        sigmas.append(theirs[1])
    return sigmas


async def mac_check(
    ctx: Context, key: MacKey, parties: list[str], entries: list[tuple[torch.Tensor, torch.Tensor]],
    coin: _CoinToss | None = None,
) -> None:  # fmt: skip
    """The batched check of ``entries`` (opened value, this party's MAC share of it); raises
    :class:`MacCheckFailed` and aborts the session unless every opened value was genuine."""
    try:
        coin = coin or _CoinToss(ctx, parties)
        seed = await coin.result()
        weights = expand(seed, [list(y.shape[1:]) for y, _ in entries])
        opened, macs = torch.zeros(2, dtype=torch.int64), torch.zeros(2, dtype=torch.int64)
        for (y, m), chi in zip(entries, weights, strict=True):
            opened = wide.add(opened, wide.sum(wide.mul_int64(y, chi, signed=False)))
            macs = wide.add(macs, wide.sum(wide.mul_int64(m, chi, signed=False)))
        sigma = wide.sub(macs, key.times(opened))
        total = torch.zeros(2, dtype=torch.int64)
        for share in await _open_committed(ctx, parties, sigma):
            total = wide.add(total, share)
        if not wide.is_zero(total):
            elements = sum(y[0].numel() for y, _ in entries)
            raise MacCheckFailed(
                f"MAC check failed on {elements} opened elements: some party changed a share, an "
                "opening, a MAC or its material; the session is aborted"
            )
    except (MacCheckFailed, CommitmentBroken) as exc:
        key.aborted = str(exc)
        raise


def _pending(key: MacKey, runs: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The openings of ``runs`` (in the leader's order, the same on every party)."""
    if not isinstance(runs, list) or not all(type(r) is int for r in runs):
        raise BadArguments("runs is a list of run ids")
    missing = [r for r in runs if r not in key.pending]
    if missing:
        raise BadArguments(f"runs {missing[:4]} opened nothing here: they failed, or never ran on this party")
    entries = []
    for run in runs:
        recorded = key.pending.pop(run)
        key.pending_elements -= sum(y[0].numel() for y, _ in recorded)
        entries.extend(recorded)
    return entries


@command("mpc.auth.check", command_set=COMMAND_SET, kind="flow")
async def check(ctx: Context, key: Any, *after: Any, parties: list[str], runs: list[int]) -> None:
    """Check every opening of ``runs`` (``after``: their results here, so that this waits for
    them to finish)."""
    check_parties(ctx, parties)
    mac_key = check_key(key)
    entries = _pending(mac_key, runs)
    with _completes(mac_key):
        await mac_check(ctx, mac_key, parties, entries)


@command("mpc.auth.reveal", command_set=COMMAND_SET, kind="flow")
async def reveal(
    ctx: Context, x: Any, key: Any, mask: Any, *after: Any, parties: list[str], runs: list[int]
) -> torch.Tensor:
    """Open ``x`` to the parties, check it with every opening of ``runs``, and return it (mod
    2^64) only if the check passed."""
    check_parties(ctx, parties)
    mac_key = check_key(key)
    share = check_share("x", x, mac_key)
    (rho,) = take(mask, "rand", mac_key)
    if rho.value.shape != share.value.shape:
        raise BadArguments(f"the output mask must be of shape {list(share.shape)}")
    entries = _pending(mac_key, runs)
    with _completes(mac_key):
        value = wide.add(share.value, _times_2_64(rho.value))
        mac = wide.add(share.mac, _times_2_64(rho.mac))
        coin = _CoinToss(ctx, parties)  # its commitment leaves with the opening
        (opened,) = await open_all(ctx, parties, "output", [value], wide.add)
        entries.append((opened, mac))
        await mac_check(ctx, mac_key, parties, entries, coin)
    return wide.low(opened).clone()


@contextlib.contextmanager
def _completes(key: MacKey) -> Iterator[None]:
    """Openings taken off for a check are gone: a check that does not complete leaves them never
    checked, so the session stops there (else a party could have its cheat forgotten by breaking
    the check off, with a missing message or an error of another kind)."""
    try:
        yield
    except BaseException as exc:
        if key.aborted is None:
            key.aborted = f"a MAC check did not complete ({type(exc).__name__}): its openings went unchecked"
        raise


def _times_2_64(w: torch.Tensor) -> torch.Tensor:
    return torch.stack([torch.zeros_like(w[0]), w[0]])
