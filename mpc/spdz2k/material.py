"""The provider's part in the authenticated mode: the MAC key's shares, and authenticated
material (Beaver triples, truncation pairs, random masks), each value with its MAC shares.

The provider draws ``alpha_i`` for every party of a session and keeps ``alpha = sum alpha_i``
(mod 2^128) to compute the MACs of the material it deals, and nothing else of the session.
A request's *free* values (``a`` and ``b`` of a triple, ``r`` of a pair, a mask) are uniform in
Z_2^128 and come, as in the semi-honest mode, from each party's 16-byte seed; party ``i < n - 1``
also expands its shares of the *derived* values (``c = a * b``, ``r >> f``) and every MAC share
from its seed, and the last party gets those explicitly, as the one correction. So the provider
sends the last party the derived values' shares and all the MAC shares; the other parties get
16 bytes each.

A trusted provider is this mode's assumption, as in the semi-honest one: it knows ``alpha`` and
could forge MACs. What the MACs stop is a cheating *party*.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import Any

import torch

from actors.context import Context
from actors.registry import command
from mpc import wide
from mpc.provider import COMMAND_SET, MAX_ELEMENTS, PRODUCTS, PROVIDER_SET
from mpc.ring import SEED_BYTES, check_shift, expand, new_seed
from mpc.spdz2k.shares import AuthShare, MacKey
from protocol import BadArguments, PermissionDenied

#: Sessions one caller may keep open on a provider (a key is 16 bytes; the bound stops a
#: caller from growing the provider's memory without end).
MAX_SESSIONS = 4096
KINDS = ("mul", "matmul", "trunc", "rand", "input")
_STATE = "spdz2k"


def check_session(session: Any) -> str:
    if not isinstance(session, str) or not 16 <= len(session) <= 64 or not session.isalnum():
        raise BadArguments("a session id is 16 to 64 letters and digits")
    return session


def plan(kind: str, shapes: Any, options: dict[str, Any]) -> tuple[list[list[int]], list[list[int]]]:
    """The shapes of a request's free values and of its derived values."""
    if kind not in KINDS:
        raise BadArguments(f"unknown authenticated material {kind!r}; known: {', '.join(KINDS)}")
    if not isinstance(shapes, list) or not all(
        isinstance(s, list) and all(type(d) is int and d >= 0 for d in s) for s in shapes
    ):
        raise BadArguments("shapes must be lists of non-negative integers")
    if kind in PRODUCTS:
        if len(shapes) != 2:
            raise BadArguments(f"{kind} material takes two input shapes")
        metas = [torch.empty(tuple(s), dtype=torch.int64, device="meta") for s in shapes]
        try:
            product = list(PRODUCTS[kind](metas[0], metas[1], {}).shape)
        except (RuntimeError, TypeError, ValueError) as exc:
            raise BadArguments(f"{kind} of shapes {shapes[0]} and {shapes[1]}: {exc}") from exc
        if kind == "mul" and shapes[0] != shapes[1]:
            raise BadArguments("authenticated elementwise products take operands of one shape")
        if kind == "matmul" and (len(shapes[0]) != 2 or len(shapes[1]) != 2):
            raise BadArguments("authenticated matrix products take two matrices")
        free, derived = [list(shapes[0]), list(shapes[1])], [product]
    else:
        if len(shapes) != 1:
            raise BadArguments(f"{kind} material takes one shape")
        free, derived = [list(shapes[0])], ([list(shapes[0])] if kind == "trunc" else [])
        if kind == "trunc":
            check_shift(options.get("bits"))
    if any(torch.Size(s).numel() > MAX_ELEMENTS // 4 for s in free + derived):
        raise BadArguments(f"material of more than {MAX_ELEMENTS // 4} elements per tensor is refused")
    return free, derived


def _wide_shapes(shapes: Sequence[Sequence[int]]) -> list[list[int]]:
    return [[2, *s] for s in shapes]


@command("provider.auth_key", command_set=PROVIDER_SET, kind="flow")
async def deal_key(ctx: Context, session: str, parties: list[str]) -> None:
    """Draw every party's ``alpha_i``, send each its own, keep their sum for this session."""
    session = check_session(session)
    if (
        not isinstance(parties, list)
        or len(parties) < 2
        or ctx.me in parties
        or len(set(parties)) != len(parties)
    ):
        raise BadArguments("a session is two or more distinct parties, the provider not among them")
    sessions = ctx.state.setdefault(_STATE, {})
    if session in sessions:
        raise BadArguments(f"session {session[:8]} exists already")
    if sum(1 for owner, _, _ in sessions.values() if owner == ctx.caller) >= MAX_SESSIONS:
        raise BadArguments(f"{ctx.caller} has {MAX_SESSIONS} sessions open on this provider")
    shares = [torch.tensor(secrets.randbits(64) - 2**63, dtype=torch.int64) for _ in parties]
    alpha = torch.zeros(2, dtype=torch.int64)
    for share in shares:
        alpha = wide.add(alpha, wide.from_int64(share.reshape(1), signed=False).reshape(2))
    sessions[session] = (ctx.caller, alpha, tuple(parties))
    for party, share in zip(parties, shares, strict=True):
        ctx.send(party, "alpha", share)


@command("mpc.auth.key", command_set=COMMAND_SET, kind="flow")
async def receive_key(ctx: Context, session: str, provider: str) -> MacKey:
    alpha = await ctx.recv(provider, "alpha")
    if not isinstance(alpha, torch.Tensor) or alpha.dtype != torch.int64 or alpha.dim() != 0:
        raise BadArguments("a MAC key share is one int64")
    return MacKey(check_session(session), alpha, provider)


def _session(ctx: Context, options: Any, parties: list[str]) -> torch.Tensor:
    if not isinstance(options, dict):
        raise BadArguments("options must be a map")
    session = check_session(options.get("session"))
    found = ctx.state.get(_STATE, {}).get(session)
    if found is None:
        raise BadArguments(f"no session {session[:8]} on this provider")
    owner, alpha, members = found
    if owner != ctx.caller:
        raise PermissionDenied(f"session {session[:8]} is not {ctx.caller}'s")
    if tuple(parties) != members:
        raise BadArguments(f"session {session[:8]} is for the parties {list(members)}")
    return alpha


def _derive(kind: str, free: list[torch.Tensor], options: dict[str, Any]) -> list[torch.Tensor]:
    if kind == "mul":
        return [wide.mul(free[0], free[1])]
    if kind == "matmul":
        return [wide.matmul(free[0], free[1])]
    if kind == "trunc":
        return [wide.from_int64(wide.low(free[0]) >> options["bits"])]
    return []


@command("provider.auth_material", command_set=PROVIDER_SET, kind="flow")
async def deal(
    ctx: Context, kind: str, shapes: list[list[int]], parties: list[str], options: dict[str, Any]
) -> torch.Tensor | None:
    """The provider's half of one request: seeds out first, then the last party's corrections.
    For ``input`` the mask's value comes back to the caller (the input's owner), who alone may
    then publish ``x - r``."""
    if not isinstance(parties, list) or not all(isinstance(p, str) for p in parties) or len(parties) < 2:
        raise BadArguments("material is for two or more parties")
    if ctx.me in parties:
        raise BadArguments("material is for two or more parties, the provider not among them")
    alpha = _session(ctx, options, parties)
    free_shapes, derived_shapes = plan(kind, shapes, options)
    seeds = [new_seed() for _ in parties]
    for party, seed in zip(parties, seeds, strict=True):
        ctx.send(party, "seed", seed)
    everything = free_shapes + derived_shapes
    last = len(parties) - 1
    free: list[torch.Tensor] = []  # sums over the parties, the first party's own tensors to start
    others: list[torch.Tensor] = []  # the non-last parties' derived and MAC shares, summed
    for i, seed in enumerate(seeds):
        mine = expand(seed, _wide_shapes(free_shapes if i == last else everything + everything))
        free = (
            mine[: len(free_shapes)] if i == 0 else [wide.add(t, p) for t, p in zip(free, mine, strict=False)]
        )
        if i != last:
            rest = mine[len(free_shapes) :]
            others = rest if i == 0 else [wide.add(t, p) for t, p in zip(others, rest, strict=True)]
    others_derived, others_macs = others[: len(derived_shapes)], others[len(derived_shapes) :]
    derived = _derive(kind, free, options)
    corrections = [wide.sub(value, share) for value, share in zip(derived, others_derived, strict=True)]
    for value, share in zip(free + derived, others_macs, strict=True):
        corrections.append(wide.sub(wide.mul(alpha, value), share))
    ctx.send(parties[last], "corrections", corrections)
    return free[0] if kind == "input" else None


class Parts:
    """One party's part of one request, as the seed gave it; the last party's derived shares
    and MAC shares arrive later (:meth:`complete`), once the provider has made them."""

    __slots__ = ("kind", "session", "free", "derived", "macs", "_provider", "_shapes")

    def __init__(
        self, kind: str, session: str, provider: str, shapes: tuple[list[list[int]], list[list[int]]]
    ) -> None:
        self.kind = kind
        self.session = session
        self.free: list[torch.Tensor] = []
        self.derived: list[torch.Tensor] | None = None
        self.macs: list[torch.Tensor] | None = None
        self._provider = provider
        self._shapes = shapes

    async def receive(self, ctx: Context, last: bool) -> Parts:
        seed = await ctx.recv(self._provider, "seed")
        if not isinstance(seed, bytes) or len(seed) != SEED_BYTES:
            raise BadArguments(f"a material seed is {SEED_BYTES} bytes")
        free_shapes, derived_shapes = self._shapes
        everything = free_shapes + derived_shapes
        if last:
            self.free = expand(seed, _wide_shapes(free_shapes))
            return self
        mine = expand(seed, _wide_shapes(everything + everything))
        self.free = mine[: len(free_shapes)]
        self.derived = mine[len(free_shapes) : len(everything)]
        self.macs = mine[len(everything) :]
        return self

    async def complete(self, ctx: Context) -> list[AuthShare]:
        """Every value of the request with this party's MAC share: ``[a, b, c]``, ``[r, r >> f]``
        or ``[mask]``."""
        free_shapes, derived_shapes = self._shapes
        if self.macs is None:
            corrections = await ctx.recv(self._provider, "corrections")
            expected = _wide_shapes(derived_shapes + free_shapes + derived_shapes)
            if (
                not isinstance(corrections, list)
                or [
                    list(t.shape) if isinstance(t, torch.Tensor) and t.dtype == torch.int64 else None
                    for t in corrections
                ]
                != expected
            ):
                raise BadArguments("the provider's corrections are not of the request's shapes")
            self.derived = corrections[: len(derived_shapes)]
            self.macs = corrections[len(derived_shapes) :]
        assert self.derived is not None
        values = self.free + self.derived
        return [AuthShare(v, m, self.session) for v, m in zip(values, self.macs, strict=True)]


class AuthMaterial:
    """One party's authenticated material for one operation, single use (as
    :class:`mpc.provider.Material`: no message can carry one)."""

    __slots__ = ("kind", "session", "provider", "shares")

    def __init__(self, kind: str, session: str, provider: str, shares: list[AuthShare]) -> None:
        self.kind = kind
        self.session = session
        self.provider = provider
        self.shares: list[AuthShare] | None = shares

    def __repr__(self) -> str:
        state = "used" if self.shares is None else f"{len(self.shares)} values"
        return f"<AuthMaterial {self.kind}: {state}>"


def take(material: Any, kind: str, key: MacKey) -> list[AuthShare]:
    if not isinstance(material, AuthMaterial):
        raise BadArguments(f"{kind} needs authenticated material from a crypto provider, "
                           f"not a {type(material).__name__}")  # fmt: skip
    if material.shares is None:
        raise BadArguments(f"this {material.kind} material was used already: material is single use")
    if material.kind != kind:
        raise BadArguments(f"{kind} needs {kind} material, got {material.kind}")
    if material.session != key.session or material.provider != key.provider:
        raise BadArguments("the material belongs to another session, or another provider, than the key")
    shares, material.shares = material.shares, None
    return shares


@command("mpc.auth.material", command_set=COMMAND_SET, kind="flow")
async def receive(  # noqa: PLR0917 - one flow's fixed arguments
    ctx: Context, kind: str, shapes: list[list[int]], provider: str, last: bool, options: dict[str, Any]
) -> AuthMaterial:
    """A party's half of a request made ahead of its operation."""
    if not isinstance(options, dict):
        raise BadArguments("options must be a map")
    session = check_session(options.get("session"))
    parts = Parts(kind, session, provider, plan(kind, shapes, options))
    await parts.receive(ctx, last)
    return AuthMaterial(kind, session, provider, await parts.complete(ctx))
