"""The authenticated shared tensor, as the leader drives it, and the session it belongs to.

``session = mpc.spdz2k.Session(alice, bob, crypto_provider=carol)`` has the provider deal a
MAC key; ``x = await session.share(tensor)`` authenticates an input (the leader learns the
provider's mask ``r`` and publishes ``x - r``, so no party ever sees ``x`` or can change it);
every operation then returns an :class:`AuthenticatedTensor` at once, exactly as a
:class:`~mpc.tensor.SharedTensor` does (the same API, so :mod:`mpc.nn` and
:mod:`mpc.training` run on it unchanged). ``await y.get()`` opens ``y`` to the parties and checks
it, and every value opened since the last check, before any party returns it; ``await
session.verify()`` checks without revealing anything.

What this costs over the semi-honest mode: arithmetic modulo 2^128 (:mod:`mpc.wide`) on values
and MACs, twice the opened bytes, a round of truncation after every fixed-point product among
two parties too (local truncation cannot carry MACs), and four rounds per check.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Sequence
from typing import Any

import torch

import actors
from actors.flows import start_flow
from actors.pointer import PointerTensor, call, new_object_id
from mpc import wide
from mpc.nn import SharedModule, _leaves
from mpc.ring import PRECISION, decode
from mpc.tensor import FREE, MATERIAL_FLOWS, Cost, SharedTensor, _quietly, _ring_of
from protocol import CheatingDetected, OutputsDisagree

for _kind in ("mul", "matmul", "trunc", "rand"):
    MATERIAL_FLOWS["auth." + _kind] = ("mpc.auth.material", "provider.auth_material", _kind)


class Session:
    """One MAC key shared by ``parties``, dealt by the crypto provider, and the runs whose
    openings no check has covered yet."""

    def __init__(self, *parties: actors.RemoteWorker, crypto_provider: actors.RemoteWorker) -> None:
        if len(parties) < 2 or len({p.id for p in parties}) != len(parties):
            raise ValueError("a session is two or more distinct parties")
        if crypto_provider.id in {p.id for p in parties}:
            raise ValueError(f"the crypto provider {crypto_provider.id} cannot also be a party")
        self.id = secrets.token_hex(16)
        self.parties = tuple(parties)
        self.provider = crypto_provider
        ids = [p.id for p in parties]
        calls: dict[actors.RemoteWorker, tuple[list[Any], dict[str, Any] | None]] = {
            crypto_provider: ([self.id, ids], None)
        }
        for party in parties:
            calls[party] = ([self.id, crypto_provider.id], None)
        runs = start_flow("mpc.auth.key", calls, ops={crypto_provider: "provider.auth_key"})
        _quietly(runs[crypto_provider])
        #: Each party's share of the MAC key (a pointer: it never leaves the party).
        self.keys = [runs[p] for p in parties]
        self._unchecked: list[tuple[int, list[PointerTensor]]] = []

    def __repr__(self) -> str:
        return f"<Session {self.id[:8]} over {', '.join(p.id for p in self.parties)}>"

    def opened(self, run: int, results: list[PointerTensor]) -> None:
        """Note a run that opened values: the next check covers it."""
        self._unchecked.append((run, results))

    def take_unchecked(self) -> tuple[list[int], list[list[PointerTensor]]]:
        """The runs to check next, and per party its results of them (the check waits on them)."""
        taken, self._unchecked = self._unchecked, []
        return [run for run, _ in taken], [
            [results[i] for _, results in taken] for i in range(len(self.parties))
        ]

    async def share(self, value: Any, precision: int | None = PRECISION) -> AuthenticatedTensor:
        """Authenticated shares of a local ``value`` (a float tensor encoded with ``precision``
        fractional bits, or int64 with ``precision=None``)."""
        child, precision = _ring_of(value, precision)
        if isinstance(child, PointerTensor):
            raise TypeError("authenticated sharing takes a local value (the leader's input)")
        shape = [list(child.shape)]
        ids = [p.id for p in self.parties]
        options = {"session": self.id}
        calls: dict[actors.RemoteWorker, tuple[list[Any], dict[str, Any] | None]] = {
            self.provider: (["input", shape, ids, options], None)
        }
        last = len(self.parties) - 1
        for i, party in enumerate(self.parties):
            calls[party] = (["input", shape, self.provider.id, i == last, options], None)
        runs = start_flow("mpc.auth.material", calls, ops={self.provider: "provider.auth_material"})
        mask = await runs[self.provider].fetch()  # r, the input's one-time pad: known here only
        masked = wide.sub(wide.from_int64(child), mask)
        shares = [
            call(party, "mpc.auth.input", [runs[party], self.keys[i], masked, i == 0])
            for i, party in enumerate(self.parties)
        ]
        return AuthenticatedTensor(shares, self, precision, child.shape)

    async def share_module(self, model: Any, precision: int = PRECISION) -> SharedModule:
        """Every parameter of ``model`` authenticated (the layers :mod:`mpc.nn` supports)."""
        leaves = _leaves(model)
        parameters = []
        for _, layer in leaves:
            names = [name for name, _ in layer.named_parameters(recurse=False)]
            values = await asyncio.gather(
                *(self.share(p.detach(), precision) for _, p in layer.named_parameters(recurse=False))
            )
            parameters.append(dict(zip(names, values, strict=True)))
        return SharedModule([layer for _, layer in leaves], parameters)  # type: ignore[arg-type]

    async def verify(self) -> None:
        """Check every value opened so far; raises :class:`~protocol.MacCheckFailed` (or
        another :class:`~protocol.CheatingDetected`) if some party cheated."""
        runs, after = self.take_unchecked()
        if not runs:
            return
        ids = [p.id for p in self.parties]
        results = start_flow(
            "mpc.auth.check",
            {
                party: ([self.keys[i], *after[i]], {"parties": ids, "runs": runs})
                for i, party in enumerate(self.parties)
            },
        )
        await _all_or_cheat([results[p].resolve() for p in self.parties])


async def _all_or_cheat(waits: list[Any]) -> list[Any]:
    """Every party's answer; when some failed, a detected cheat is the error to report (a party
    that merely stopped because another aborted says less)."""
    answers = await asyncio.gather(*waits, return_exceptions=True)
    errors = [a for a in answers if isinstance(a, BaseException)]
    if errors:
        raise next((e for e in errors if isinstance(e, CheatingDetected)), errors[0])
    return answers


class AuthenticatedTensor(SharedTensor):
    """A :class:`~mpc.tensor.SharedTensor` whose shares carry MACs (the authenticated mode)."""

    __slots__ = ("session",)

    def __init__(  # noqa: PLR0917 - the tensor's parts
        self,
        shares: Sequence[PointerTensor],
        session: Session,
        precision: int | None,
        shape: Sequence[int],
        cost: Cost = FREE,
        depth: int = 0,
    ) -> None:
        self.session = session
        super().__init__(shares, session.parties, session.provider, precision, shape, cost, depth)

    def __repr__(self) -> str:
        return "<Authenticated" + super().__repr__()[1:]

    def _like(
        self, shares: Sequence[PointerTensor], meta: torch.Tensor, cost: Cost = FREE, *others: SharedTensor
    ) -> AuthenticatedTensor:
        depth = max((self.depth, *(other.depth for other in others))) + cost.rounds
        return AuthenticatedTensor(shares, self.session, self.precision, meta.shape, cost, depth)

    def _check_peer(self, other: SharedTensor) -> None:
        if not isinstance(other, AuthenticatedTensor) or other.session is not self.session:
            raise ValueError(f"{self!r} and {other!r} are not of one authenticated session")
        super()._check_peer(other)

    def _each(self, op: str, *args: Any) -> list[PointerTensor]:
        return [call(s.location, op, [s, *args]) for s in self.shares]

    def _local(self, op: str, *args: Any, **kwargs: Any) -> AuthenticatedTensor:
        meta = getattr(self._meta, op)(*args, **kwargs)
        values = [*args, *kwargs.values()]
        return self._like([call(s.location, "mpc.auth.local", [op, s, *values]) for s in self.shares], meta)

    def __getitem__(self, key: Any) -> AuthenticatedTensor:
        meta = self._meta[key]
        return self._like(
            [call(s.location, "mpc.auth.local", ["getitem", s, key]) for s in self.shares], meta
        )

    def expand(self, *shape: int) -> AuthenticatedTensor:
        return self._local("expand", *shape)

    def __add__(self, other: Any) -> AuthenticatedTensor:
        if isinstance(other, SharedTensor):
            self._check_peer(other)
            meta = self._meta + other._meta
            shares = [
                call(a.location, "mpc.auth.add", [a, b])
                for a, b in zip(self.shares, other.shares, strict=True)
            ]
            return self._like(shares, meta, FREE, other)
        public = self._public(other)
        meta = self._meta + public.to("meta")
        shares = [
            call(s.location, "mpc.auth.add_public", [s, key, public, i == 0])
            for i, (s, key) in enumerate(zip(self.shares, self.session.keys, strict=True))
        ]
        return self._like(shares, meta)

    __radd__ = __add__

    def __neg__(self) -> AuthenticatedTensor:
        return self._like(self._each("mpc.auth.neg"), self._meta)

    def _times_public(self, public: torch.Tensor, meta: torch.Tensor) -> AuthenticatedTensor:
        return self._like(self._each("mpc.auth.mul_public", public), meta)

    def _matmul_public(
        self, public: torch.Tensor, meta: torch.Tensor, left: bool = False
    ) -> AuthenticatedTensor:
        return self._like(self._each("mpc.auth.matmul_public", public, left), meta)

    def __mul__(self, other: Any) -> SharedTensor:
        if isinstance(other, SharedTensor):
            self._check_peer(other)
            if self.shape != other.shape:
                raise ValueError(
                    f"authenticated products take operands of one shape, got {list(self.shape)} and "
                    f"{list(other.shape)}: expand one first"
                )
        return super().__mul__(other)

    __rmul__ = __mul__

    def conv2d(self, weight: Any, stride: Any = 1, padding: Any = 0) -> SharedTensor:
        raise TypeError("convolutions are not available in the authenticated mode yet")

    def avg_pool2d(self, kernel_size: Any, stride: Any = None, padding: Any = 0) -> SharedTensor:
        raise TypeError("average pooling is not available in the authenticated mode yet")

    def _join(self, shares: list[PointerTensor], dim: int) -> PointerTensor:
        return call(shares[0].location, "mpc.auth.cat", [shares, dim])

    def _request(self, op: str, bits: int | None = None) -> tuple[str, dict[str, Any]]:
        options: dict[str, Any] = {"session": self.session.id}
        if op == "trunc":
            options["bits"] = self.precision if bits is None else bits
        return "auth." + op, options

    def _beaver(
        self, op: str, other: SharedTensor, meta: torch.Tensor, product_options: dict[str, Any] | None = None
    ) -> SharedTensor:
        self._check_peer(other)
        if product_options:
            raise TypeError(f"{op} is not available in the authenticated mode yet")
        provider = self._provider()
        shapes = [list(self.shape), list(other.shape)]
        kind, options = self._request(op)
        material = self._prepared(kind, shapes, options)
        trunc = None
        if self.precision is not None:
            trunc_kind, trunc_options = self._request("trunc")
            trunc = self._material(trunc_kind, [list(meta.shape)], trunc_options)
        ids = [p.id for p in self.parties]
        calls: dict[actors.RemoteWorker, tuple[list[Any], dict[str, Any] | None]] = {}
        for i, party in enumerate(self.parties):
            args = [self.shares[i], other.shares[i], self.session.keys[i], material[i] if material else None]
            kwargs = {"op": op, "parties": ids, "bits": self.precision, "trunc": trunc[i] if trunc else None}
            calls[party] = (args, {**kwargs, "provider": None if material else provider.id})
        ops = None
        if material is None:
            calls[provider] = ([op, shapes, ids, options], None)
            ops = {provider: "provider.auth_material"}
        run = new_object_id()
        runs = start_flow("mpc.auth.beaver", calls, ops=ops, flow_id=run)
        if material is None:
            _quietly(runs[provider])
        results = [runs[party] for party in self.parties]
        self.session.opened(run, results)
        n, size = len(self.parties), meta.numel()
        online = n * (n - 1) * 16 * (self.numel() + other.numel() + (size if trunc else 0))
        online += (n - 1) * 32 * size if trunc else 0
        material_bytes = (
            16 * n + 16 * (2 * size + self.numel() + other.numel()) + (16 * n + 48 * size if trunc else 0)
        )
        cost = Cost(rounds=2 if trunc else 1, online_bytes=online, material_bytes=material_bytes)
        return self._like(results, meta, cost, other)

    def _truncated(self, bits: int | None = None) -> AuthenticatedTensor:
        assert self.precision is not None
        kind, options = self._request("trunc", bits)
        trunc = self._material(kind, [list(self.shape)], options)
        ids = [p.id for p in self.parties]
        run = new_object_id()
        calls: dict[actors.RemoteWorker, tuple[list[Any], dict[str, Any] | None]] = {
            party: (
                [self.shares[i], self.session.keys[i]],
                {"bits": options["bits"], "parties": ids, "trunc": trunc[i]},
            )
            for i, party in enumerate(self.parties)
        }
        runs = start_flow("mpc.auth.truncate", calls, flow_id=run)
        results = [runs[party] for party in self.parties]
        self.session.opened(run, results)
        n, size = len(self.parties), self.numel()
        cost = Cost(
            rounds=1, online_bytes=(n * (n - 1) * 16 + (n - 1) * 32) * size, material_bytes=16 * n + 48 * size
        )
        return self._like(results, self._meta, cost)

    async def verify(self) -> None:
        """Check every value this tensor's session opened so far (nothing is revealed)."""
        await self.session.verify()

    async def get(self) -> torch.Tensor:
        """Open to the parties, check (this value and everything opened before it), and return
        the value, which every party reports: they agree, or :class:`OutputsDisagree`."""
        kind, options = self._request("rand")
        masks = self._material(kind, [list(self.shape)], options)
        runs, after = self.session.take_unchecked()
        ids = [p.id for p in self.parties]
        results = start_flow(
            "mpc.auth.reveal",
            {
                party: (
                    [self.shares[i], self.session.keys[i], masks[i], *after[i]],
                    {"parties": ids, "runs": runs},
                )
                for i, party in enumerate(self.parties)
            },
        )
        values = await _all_or_cheat([results[p].fetch() for p in self.parties])
        first = values[0]
        for party, value in zip(self.parties[1:], values[1:], strict=True):
            if not isinstance(value, torch.Tensor) or not torch.equal(value, first):
                raise OutputsDisagree(
                    f"{party.id} reported another value than {self.parties[0].id} for one output"
                )
        return first if self.precision is None else decode(first, self.precision)


def share(
    value: Any,
    *parties: actors.RemoteWorker,
    crypto_provider: actors.RemoteWorker,
    precision: int | None = PRECISION,
) -> Any:
    """``await mpc.spdz2k.share(x, alice, bob, crypto_provider=carol)``: a new session's shares
    of ``x`` (share more values in one session with :meth:`Session.share`)."""
    return Session(*parties, crypto_provider=crypto_provider).share(value, precision)


__all__ = ["AuthenticatedTensor", "Session", "share"]
