"""What a party holds in the authenticated mode: MAC-carrying shares, its share of the MAC key
with the openings not yet checked, and the linear operations it runs alone.

A value ``x`` of Z_2^64 (the semi-honest ring: fixed point as there) is held as a lift ``x~`` in
Z_2^128 with ``x~ = x mod 2^64``; party ``i`` holds ``x_i`` and ``m_i`` (wide tensors of
:mod:`mpc.wide`) with ``sum x_i = x~`` and ``sum m_i = alpha * x~`` modulo 2^128, where
``alpha = sum alpha_i`` and each ``alpha_i`` is a uniform 64-bit number only party ``i``
(and the provider, which dealt it) knows. Linear operations act on ``x_i`` and ``m_i`` alike,
so the relation survives them; adding a public ``c`` is ``x_0 + c`` on party 0 and
``m_i + alpha_i c`` on every party.

Neither a share nor a key share can leave its worker: the codec knows no such type, so a
``fetch`` of one is refused, and only the protocols' checked openings carry anything out.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from actors.registry import command
from mpc import wide
from mpc.provider import COMMAND_SET
from protocol import BadArguments, CheatingDetected

#: Largest number of opened ring elements a key keeps before a check must clear them (2 GiB of
#: wide openings and MAC shares): beyond it a party refuses to open more.
MAX_PENDING = 2**26


class MacKey:
    """Party ``i``'s share ``alpha_i`` of one session's MAC key, and what it opened since the
    last check: per run, the opened values with its MAC shares of them."""

    __slots__ = ("session", "alpha", "provider", "pending", "pending_elements", "aborted")

    def __init__(self, session: str, alpha: torch.Tensor, provider: str) -> None:
        self.session = session
        self.alpha = alpha  # a 0-d int64, read as an unsigned 64-bit number
        #: The provider that dealt this key: the only one whose material this session takes.
        self.provider = provider
        self.pending: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.pending_elements = 0
        #: Why the session was aborted, once a check failed: it refuses all further use.
        self.aborted: str | None = None

    def __repr__(self) -> str:
        return f"<MacKey of session {self.session[:8]}: {len(self.pending)} runs to check>"

    def usable(self) -> MacKey:
        if self.aborted is not None:
            raise CheatingDetected(f"session {self.session[:8]} was aborted: {self.aborted}")
        return self

    def times(self, public: torch.Tensor) -> torch.Tensor:
        """``alpha_i * public`` for a wide public value: this party's MAC share of it."""
        return wide.mul_int64(public, self.alpha, signed=False)

    def record(self, run: int, opened: torch.Tensor, mac: torch.Tensor) -> None:
        """Keep an opened value and this party's MAC share of it until the next check."""
        size = opened[0].numel()
        if self.pending_elements + size > MAX_PENDING:
            raise BadArguments(
                f"{self.pending_elements} opened elements await a MAC check: check before opening more"
            )
        self.pending.setdefault(run, []).append((opened, mac))
        self.pending_elements += size


class AuthShare:
    """One party's share of an authenticated value: wide ``value`` and ``mac`` of one shape."""

    __slots__ = ("value", "mac", "session")

    def __init__(self, value: torch.Tensor, mac: torch.Tensor, session: str) -> None:
        self.value = value
        self.mac = mac
        self.session = session

    @property
    def shape(self) -> torch.Size:
        return self.value.shape[1:]

    def __repr__(self) -> str:
        return f"<AuthShare {list(self.shape)} of session {self.session[:8]}>"

    def each(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> AuthShare:
        return AuthShare(fn(self.value), fn(self.mac), self.session)


def check_share(name: str, value: Any, key: MacKey | None = None) -> AuthShare:
    if not isinstance(value, AuthShare):
        raise BadArguments(f"{name}: expected an authenticated share, got {type(value).__name__}")
    if key is not None and value.session != key.session:
        raise BadArguments(f"{name} belongs to another session than the key")
    return value


def check_key(value: Any) -> MacKey:
    if not isinstance(value, MacKey):
        raise BadArguments(f"expected this party's MAC key share, got {type(value).__name__}")
    return value.usable()


def check_public(value: Any) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.dtype != torch.int64:
        raise BadArguments("a public operand is an int64 (ring) tensor")
    return value


def _dim(d: int) -> int:
    """A dimension of the value as a dimension of its wide tensor (the leading 2 comes first)."""
    return d + 1 if d >= 0 else d


def _index(key: Any) -> Any:
    return (slice(None), *(key if isinstance(key, tuple) else (key,)))


#: Operations that only move elements: the same on the value and on the MAC.
SHAPE_OPS: dict[str, Callable[..., torch.Tensor]] = {
    "reshape": lambda w, *shape: w.reshape(
        2, *(shape[0] if len(shape) == 1 and isinstance(shape[0], list | tuple) else shape)
    ),
    "transpose": lambda w, d0, d1: w.transpose(_dim(d0), _dim(d1)),
    "t": lambda w: w if w.dim() < 3 else w.transpose(1, 2),
    "flatten": lambda w, start=0, end=-1: w.flatten(_dim(start), _dim(end)),
    "unsqueeze": lambda w, d: w.unsqueeze(_dim(d)),
    "squeeze": lambda w, *d: (
        w.squeeze(_dim(d[0])) if d else w.reshape(2, *[n for n in w.shape[1:] if n != 1])
    ),
    "getitem": lambda w, key: w[_index(key)],
    "expand": lambda w, *shape: w.expand(2, *shape),
    "sum": lambda w, dim=None, keepdim=False: wide.sum(w, dim, keepdim),
}


@command("mpc.auth.local", command_set=COMMAND_SET, context=False)
def local(op: str, share: Any, *args: Any) -> AuthShare:
    """One linear operation of :data:`SHAPE_OPS` on this party's share (no communication)."""
    fn = SHAPE_OPS.get(op) if isinstance(op, str) else None
    if fn is None:
        raise BadArguments(f"unknown local operation {op!r}; known: {', '.join(SHAPE_OPS)}")
    x = check_share("share", share)
    try:
        return x.each(lambda w: fn(w, *args))
    except (RuntimeError, IndexError, TypeError, ValueError, OverflowError) as exc:
        raise BadArguments(f"{op} of a share of shape {list(x.shape)}: {exc}") from exc


@command("mpc.auth.add", command_set=COMMAND_SET, context=False)
def add(x: Any, y: Any, negate: bool = False) -> AuthShare:
    """``x + y`` (``x - y`` with ``negate``) of two shares of one session (broadcasting)."""
    a, b = check_share("x", x), check_share("y", y)
    if a.session != b.session:
        raise BadArguments("the two shares belong to different sessions")
    combine = wide.sub if negate else wide.add
    try:
        return AuthShare(combine(a.value, b.value), combine(a.mac, b.mac), a.session)
    except (RuntimeError, ValueError) as exc:
        raise BadArguments(f"shapes {list(a.shape)} and {list(b.shape)}: {exc}") from exc


@command("mpc.auth.neg", command_set=COMMAND_SET, context=False)
def neg(x: Any) -> AuthShare:
    return check_share("x", x).each(wide.neg)


@command("mpc.auth.add_public", command_set=COMMAND_SET, context=False)
def add_public(x: Any, key: Any, public: Any, first: bool, lifted: bool = False) -> AuthShare:
    """``x + c`` for a public ``c``: int64 (sign-extended), or wide already (``lifted``: the
    input protocol's ``x - r``). Party 0 (``first``) adds it to its value share, every party
    ``alpha_i c`` to its MAC share."""
    share, mac_key = check_share("x", x), check_key(key)
    if share.session != mac_key.session:
        raise BadArguments("the share belongs to another session than the key")
    c = check_public(public)
    if lifted and (c.dim() < 1 or c.shape[0] != 2):
        raise BadArguments("a wide public value has a leading dimension of 2")
    try:
        return add_lifted(share, mac_key, c if lifted else wide.from_int64(c), first)
    except (RuntimeError, ValueError) as exc:
        raise BadArguments(f"shapes {list(share.shape)} and {list(c.shape)}: {exc}") from exc


def add_lifted(share: AuthShare, key: MacKey, lifted: torch.Tensor, first: bool) -> AuthShare:
    """``share + c`` for a wide public ``c`` (broadcasting as torch does)."""
    shape = torch.broadcast_shapes(share.shape, lifted.shape[1:])
    value = wide.add(share.value, lifted) if first else share.value.expand(2, *shape)
    return AuthShare(value, wide.add(share.mac, key.times(lifted)), share.session)


@command("mpc.auth.mul_public", command_set=COMMAND_SET, context=False)
def mul_public(x: Any, public: Any) -> AuthShare:
    """``x * c`` for a public int64 ``c`` (broadcasting): a linear map of every share."""
    share, c = check_share("x", x), check_public(public)
    try:
        return share.each(lambda w: wide.mul_int64(w, c))
    except (RuntimeError, ValueError) as exc:
        raise BadArguments(f"shapes {list(share.shape)} and {list(c.shape)}: {exc}") from exc


@command("mpc.auth.matmul_public", command_set=COMMAND_SET, context=False)
def matmul_public(x: Any, public: Any, left: bool = False) -> AuthShare:
    """``x @ c`` (or ``c @ x`` with ``left``) for a public int64 matrix ``c``."""
    share, c = check_share("x", x), check_public(public)
    if share.value.dim() != 3 or c.dim() != 2:
        raise BadArguments("authenticated products by a public matrix take two matrices")
    lifted = wide.from_int64(c)
    try:
        if left:
            return share.each(lambda w: wide.matmul(lifted, w))
        return share.each(lambda w: wide.matmul(w, lifted))
    except (RuntimeError, ValueError) as exc:
        raise BadArguments(str(exc)) from exc


@command("mpc.auth.cat", command_set=COMMAND_SET, context=False)
def cat(shares: Any, dim: int = 0) -> AuthShare:
    if not isinstance(shares, list) or not shares or type(dim) is not int:
        raise BadArguments("cat takes a list of shares and a dimension")
    parts = [check_share(f"shares[{i}]", s) for i, s in enumerate(shares)]
    if len({p.session for p in parts}) != 1:
        raise BadArguments("the shares belong to different sessions")
    try:
        return AuthShare(
            torch.cat([p.value for p in parts], _dim(dim)),
            torch.cat([p.mac for p in parts], _dim(dim)),
            parts[0].session,
        )
    except RuntimeError as exc:
        raise BadArguments(f"cat: {exc}") from exc
