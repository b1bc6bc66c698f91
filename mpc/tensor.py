"""The shared tensor (the paper's MPCTensor): one additive share on each party, driven by the leader.

``share(x, alice, bob, crypto_provider=carol)`` leaves one share on each party; every operation
returns a new :class:`SharedTensor` at once (its shares are pointers, so futures), and
``await y.get()`` reconstructs. Linear operations (add, sub, neg, public scalars, sum, reshape,
indexing, ...) run on each party's share alone: a pipelined command per party, no round.
Products (``*``, ``@``) are one Beaver flow per operation, with the provider's material asked
for in the same breath: independent products' rounds overlap, since nothing here waits.

The leader is not a party: it sends commands and the parties' ids, and it holds pointers. It
never receives a share or an opening during an operation; only :meth:`SharedTensor.get` fetches
the result's shares, where the owners' policy allows it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.nn.functional as F  # noqa: N812

import actors
from actors.flows import start_flow
from actors.pointer import PointerTensor, call
from mpc.ring import PRECISION, check_precision, decode, encode, split
from protocol import SyftError


@dataclass(frozen=True)
class Cost:
    """What one operation cost: rounds of openings, and bytes the parties sent one another
    (``online_bytes``) and the provider sent the parties (``material_bytes``)."""

    rounds: int = 0
    online_bytes: int = 0
    material_bytes: int = 0


FREE = Cost()


class Meter:
    """Adds up the cost of every operation issued while it is open (``with mpc.meter() as m``)."""

    def __init__(self) -> None:
        self.operations = 0
        self.online_bytes = 0
        self.material_bytes = 0

    def add(self, cost: Cost) -> None:
        if cost.rounds or cost.online_bytes or cost.material_bytes:
            self.operations += 1
        self.online_bytes += cost.online_bytes
        self.material_bytes += cost.material_bytes


_METERS: contextvars.ContextVar[tuple[Meter, ...]] = contextvars.ContextVar("mpc_meters", default=())


_T = TypeVar("_T")


@contextlib.contextmanager
def _scoped(stack: contextvars.ContextVar[tuple[_T, ...]], item: _T) -> Iterator[_T]:
    """``item`` joins ``stack`` for the block (meters and recordings nest)."""
    token = stack.set((*stack.get(), item))
    try:
        yield item
    finally:
        stack.reset(token)


def meter() -> contextlib.AbstractContextManager[Meter]:
    return _scoped(_METERS, Meter())


class SharedTensor:
    """Additive shares of one secret over ``parties``, in fixed point with ``precision``
    fractional bits (``None``: plain integers mod 2^64)."""

    __slots__ = ("shares", "parties", "provider", "precision", "_meta", "cost", "depth")

    def __init__(  # noqa: PLR0917 - the tensor's parts
        self,
        shares: Sequence[PointerTensor],
        parties: Sequence[actors.RemoteWorker],
        provider: actors.RemoteWorker | None,
        precision: int | None,
        shape: Sequence[int],
        cost: Cost = FREE,
        depth: int = 0,
    ) -> None:
        if len(shares) != len(parties):
            raise ValueError("one share per party")
        self.shares = tuple(shares)
        self.parties = tuple(parties)
        self.provider = provider
        self.precision = precision
        self._meta = torch.empty(tuple(shape), dtype=torch.int64, device="meta")
        #: What the operation that made this tensor cost.
        self.cost = cost
        #: Rounds of openings on the longest chain of operations that led here from the shared
        #: inputs: what a computation waits for, since independent rounds overlap.
        self.depth = depth
        for meter in _METERS.get():
            meter.add(cost)

    # -- what it is -----------------------------------------------------------------------------
    @property
    def shape(self) -> torch.Size:
        return self._meta.shape

    def size(self, dim: int | None = None) -> Any:
        return self._meta.shape if dim is None else self._meta.shape[dim]

    def dim(self) -> int:
        return self._meta.dim()

    def numel(self) -> int:
        return self._meta.numel()

    def __len__(self) -> int:
        return len(self._meta)

    def __repr__(self) -> str:
        fixed = f"precision={self.precision}" if self.precision is not None else "integers"
        where = ", ".join(p.id for p in self.parties)
        return f"<SharedTensor {list(self.shape)} over {where}, {fixed}>"

    async def get(self) -> torch.Tensor:
        """Reconstruct (the shares come to the caller, where the parties' policy allows). The
        shares stay where they are, for further use; they are freed with this tensor."""
        shares = await asyncio.gather(*(share.fetch() for share in self.shares))
        total = shares[0].clone()
        for share in shares[1:]:
            total += share
        return total if self.precision is None else decode(total, self.precision)

    def __await__(self) -> Any:
        """``await y`` waits until every share exists (failures raise), and returns ``y``."""

        async def resolved() -> SharedTensor:
            await asyncio.gather(*(share.resolve() for share in self.shares))
            return self

        return resolved().__await__()

    # -- building results -------------------------------------------------------------------------
    def _like(
        self, shares: Sequence[PointerTensor], meta: torch.Tensor, cost: Cost = FREE, *others: SharedTensor
    ) -> SharedTensor:
        depth = max((self.depth, *(other.depth for other in others))) + cost.rounds
        return SharedTensor(shares, self.parties, self.provider, self.precision, meta.shape, cost, depth)

    def _local(self, op: str, *args: Any, **kwargs: Any) -> SharedTensor:
        """The same linear operation on every share (no communication)."""
        meta = getattr(self._meta, op)(*args, **kwargs)
        return self._like([getattr(share, op)(*args, **kwargs) for share in self.shares], meta)

    def _check_peer(self, other: SharedTensor) -> None:
        if [p.id for p in other.parties] != [p.id for p in self.parties]:
            raise ValueError(f"{self!r} and {other!r} are shared over different parties: reshare one of them")
        if other.precision != self.precision:
            raise ValueError(f"precisions differ: {self.precision} and {other.precision} fractional bits")
        if getattr(other.provider, "id", None) != getattr(self.provider, "id", None):
            raise ValueError("the two tensors name different crypto providers")

    def _public(self, value: Any) -> torch.Tensor:
        """A public operand, in this tensor's encoding."""
        tensor = torch.as_tensor(value)
        if self.precision is None:
            if tensor.is_floating_point():
                raise TypeError("an integer shared tensor takes integer public operands")
            return tensor.to(torch.int64)
        return encode(tensor, self.precision)

    # -- linear: each party alone -----------------------------------------------------------------
    def __add__(self, other: Any) -> SharedTensor:
        if isinstance(other, SharedTensor):
            self._check_peer(other)
            meta = self._meta + other._meta
            return self._like(
                [a + b for a, b in zip(self.shares, other.shares, strict=True)], meta, FREE, other
            )
        public = self._public(other)
        meta = self._meta + public.to("meta")
        first, *rest = self.shares  # party 0 adds the public value; the others only broadcast
        grown = meta.shape != self.shape
        return self._like(
            [first + public, *(share.expand(meta.shape) if grown else share for share in rest)], meta
        )

    __radd__ = __add__

    def __neg__(self) -> SharedTensor:
        return self._like([-share for share in self.shares], self._meta)

    def __sub__(self, other: Any) -> SharedTensor:
        if isinstance(other, SharedTensor):
            self._check_peer(other)  # refused before anything is sent
        else:
            self._public(other)
        return self + (-other)

    def __rsub__(self, other: Any) -> SharedTensor:
        self._public(other)
        return (-self) + other

    def sum(self, dim: int | Sequence[int] | None = None, keepdim: bool = False) -> SharedTensor:
        if dim is None:
            return self._local("sum")
        return self._local("sum", dim, keepdim=keepdim)

    def mean(self, dim: int | Sequence[int] | None = None, keepdim: bool = False) -> SharedTensor:
        """The sum times the public ``1/n`` (fixed point: truncated like any product)."""
        if self.precision is None:
            raise TypeError("the mean of integers is not an integer: fix the precision first")
        total = self.sum(dim, keepdim)
        count = self.numel() // max(total.numel(), 1) if self.numel() else 1
        return total * (1.0 / count)

    def reshape(self, *shape: Any) -> SharedTensor:
        return self._local("reshape", *shape)

    view = reshape

    def transpose(self, dim0: int, dim1: int) -> SharedTensor:
        return self._local("transpose", dim0, dim1)

    def t(self) -> SharedTensor:
        return self._local("t")

    @property
    def T(self) -> SharedTensor:  # noqa: N802 - torch's name
        return self.t()

    def flatten(self, start_dim: int = 0, end_dim: int = -1) -> SharedTensor:
        return self._local("flatten", start_dim, end_dim)

    def unsqueeze(self, dim: int) -> SharedTensor:
        return self._local("unsqueeze", dim)

    def squeeze(self, dim: int | None = None) -> SharedTensor:
        return self._local("squeeze") if dim is None else self._local("squeeze", dim)

    def __getitem__(self, key: Any) -> SharedTensor:
        meta = self._meta[key]
        return self._like([share[key] for share in self.shares], meta)

    # -- products ---------------------------------------------------------------------------------
    def __mul__(self, other: Any) -> SharedTensor:
        if isinstance(other, SharedTensor):
            return self._beaver("mul", other, self._meta * other._meta)
        public = self._public(other)
        product = self._times_public(public, self._meta * public.to("meta"))
        return product._truncated() if self.precision is not None else product

    __rmul__ = __mul__

    def __matmul__(self, other: Any) -> SharedTensor:
        if isinstance(other, SharedTensor):
            return self._beaver("matmul", other, self._meta @ other._meta)
        public = self._public(other)
        product = self._matmul_public(public, self._meta @ public.to("meta"))
        return product._truncated() if self.precision is not None else product

    def __rmatmul__(self, other: Any) -> SharedTensor:
        public = self._public(other)
        product = self._matmul_public(public, public.to("meta") @ self._meta, left=True)
        return product._truncated() if self.precision is not None else product

    def _times_public(self, public: torch.Tensor, meta: torch.Tensor) -> SharedTensor:
        """Every share times a public ring value (linear: no communication, no truncation)."""
        return self._like([share * public for share in self.shares], meta)

    def _matmul_public(self, public: torch.Tensor, meta: torch.Tensor, left: bool = False) -> SharedTensor:
        """Every share by a public ring matrix, ``share @ public`` (``public @ share`` if ``left``)."""
        if left:
            return self._like([call(s.location, "torch.matmul", [public, s]) for s in self.shares], meta)
        return self._like([share @ public for share in self.shares], meta)

    def matmul(self, other: Any) -> SharedTensor:
        return self @ other

    def scale(self, factor: float) -> SharedTensor:
        """Times a public real ``factor``, encoded with enough extra fractional bits that a small
        factor keeps about 20 significant bits (``0.001 * 2 / 32`` in 16 bits would be 4)."""
        if self.precision is None:
            raise TypeError("scaling by a real number needs fixed precision")
        if factor == 0:
            return self * 0
        extra = min(max(0, 20 - math.floor(math.log2(abs(factor))) - self.precision), 46 - self.precision)
        bits = self.precision + max(extra, 0)
        public = encode(torch.tensor(float(factor), dtype=torch.float64), bits)
        return self._times_public(public, self._meta)._truncated(bits)

    def combine(self, terms: Sequence[tuple[float, SharedTensor]], constant: float = 0.0) -> SharedTensor:
        """``constant + sum(c * t for c, t in terms)`` with public real ``c``: one truncation for
        the whole sum (a round among three or more parties), not one per term."""
        if self.precision is None:
            raise TypeError("a combination with real coefficients needs fixed precision")
        total: SharedTensor | None = None
        for coefficient, term in terms:
            self._check_peer(term)
            public = encode(torch.tensor(float(coefficient)), self.precision)
            scaled = term._times_public(public, term._meta)
            total = scaled if total is None else total + scaled
        if total is None:
            raise ValueError("combine needs at least one term")
        return total._truncated() + constant

    def conv2d(self, weight: Any, stride: Any = 1, padding: Any = 0) -> SharedTensor:
        """``F.conv2d`` with a shared kernel (a Beaver product) or a public one (local)."""
        from mpc.conv import conv2d_ring  # noqa: PLC0415 - registers the conv product on import

        options = {"stride": stride, "padding": padding}
        if isinstance(weight, SharedTensor):
            return self._beaver("conv2d", weight, conv2d_ring(self._meta, weight._meta, **options), options)
        public = self._public(weight)
        meta = conv2d_ring(self._meta, public.to("meta"), **options)
        shares = [call(s.location, "mpc.conv2d", [s, public], options) for s in self.shares]
        product = self._like(shares, meta)
        return product._truncated() if self.precision is not None else product

    def avg_pool2d(self, kernel_size: Any, stride: Any = None, padding: Any = 0) -> SharedTensor:
        """Each party sums its windows; the public ``1 / window`` divides (truncated)."""
        from mpc.conv import _pair, sum_pool2d  # noqa: PLC0415

        options = {"kernel_size": kernel_size, "stride": stride, "padding": padding}
        meta = sum_pool2d(self._meta, **options)
        summed = self._like([call(s.location, "mpc.sum_pool2d", [s], options) for s in self.shares], meta)
        kh, kw = _pair(kernel_size)
        return summed * (1.0 / (kh * kw))

    def sigmoid(self) -> SharedTensor:
        from mpc.sigmoid import sigmoid  # noqa: PLC0415

        return sigmoid(self)

    @classmethod
    def __torch_function__(
        cls, func: Any, types: Any, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        """The PyTorch spelling (``F.linear(x, w)``, ``torch.sigmoid(x)``, ``F.conv2d``...) of
        what this class offers; anything else is refused by name, never computed in the clear."""
        kwargs = kwargs or {}
        handler = _TORCH_FUNCTIONS.get(func)
        if handler is None:
            name = getattr(func, "__name__", repr(func))
            raise TypeError(f"{name} is not available on shared tensors")
        return handler(*args, **kwargs)

    def _request(self, op: str, bits: int | None = None) -> tuple[str, dict[str, Any]]:
        """How this tensor's mode asks the provider for ``op``'s material: its kind and options."""
        if op == "trunc":
            return op, {"precision": self.precision if bits is None else bits}
        return op, {}

    def _join(self, shares: list[PointerTensor], dim: int) -> PointerTensor:
        """One party's shares of several tensors, joined along ``dim`` (:func:`cat`)."""
        return call(shares[0].location, "torch.cat", [shares], {"dim": dim})

    def _provider(self) -> actors.RemoteWorker:
        if self.provider is None:
            raise ValueError(f"{self!r} has no crypto provider: share it with crypto_provider=...")
        return self.provider

    def _material(self, kind: str, shapes: list[list[int]], options: dict[str, Any]) -> list[PointerTensor]:
        """One operation's material: made ahead (:func:`prepare`) or asked for now."""
        prepared = self._prepared(kind, shapes, options)
        if prepared is not None:
            return prepared
        return _new_material(self._provider(), self.parties, kind, shapes, options)

    def _prepared(
        self, kind: str, shapes: list[list[int]], options: dict[str, Any]
    ) -> list[PointerTensor] | None:
        """Material made ahead for this operation, if any (and note the need, when recording)."""
        key = _material_key(self._provider(), self.parties, kind, shapes, options)
        for recording in _RECORDINGS.get():
            recording.keys.append(key)
        ready = _PREPARED.get(key)
        if not ready:
            return None
        material = ready.popleft()
        if not ready:
            del _PREPARED[key]
        return material

    def _trunc_material(self, shape: Sequence[int], bits: int | None = None) -> list[PointerTensor] | None:
        if self.precision is None or len(self.parties) == 2:
            return None
        return self._material("trunc", [list(shape)], {"precision": self.precision if bits is None else bits})

    def _beaver(
        self, op: str, other: SharedTensor, meta: torch.Tensor, product_options: dict[str, Any] | None = None
    ) -> SharedTensor:
        self._check_peer(other)
        provider = self._provider()
        shapes = [list(self.shape), list(other.shape)]
        material = self._prepared(op, shapes, product_options or {})
        trunc = self._trunc_material(meta.shape)
        ids = [p.id for p in self.parties]
        options: dict[str, Any] = {"op": op, "parties": ids, "precision": self.precision}
        if product_options:
            options["options"] = product_options
        calls: dict[actors.RemoteWorker, tuple[list[Any], dict[str, Any] | None]] = {}
        for i, party in enumerate(self.parties):
            args = [self.shares[i], other.shares[i], material[i] if material else None]
            calls[party] = (args, {**options, "trunc": trunc[i] if trunc else None, "provider": provider.id})
        ops = None
        if material is None:  # the provider makes this run's triple within the run
            calls[provider] = ([op, shapes, ids, product_options or {}], None)
            ops = {provider: "provider.material"}
        runs = start_flow("mpc.beaver", calls, ops=ops)
        if material is None:
            _quietly(runs[provider])
        n = len(self.parties)
        online = n * (n - 1) * 8 * (self.numel() + other.numel() + (meta.numel() if trunc else 0))
        online += (n - 1) * 8 * meta.numel() if trunc else 0  # the re-masks to party 0
        material_bytes = (16 * n + 8 * meta.numel()) * (2 if trunc else 1)
        cost = Cost(rounds=2 if trunc else 1, online_bytes=online, material_bytes=material_bytes)
        return self._like([runs[party] for party in self.parties], meta, cost, other)

    def _truncated(self, bits: int | None = None) -> SharedTensor:
        """Back to ``precision`` fractional bits after a product by a public value encoded with
        ``bits`` fractional bits (default: the same precision)."""
        assert self.precision is not None
        bits = self.precision if bits is None else bits
        n = len(self.parties)
        if n == 2:
            shares = [
                call(share.location, "mpc.truncate_share", [share, bits, i])
                for i, share in enumerate(self.shares)
            ]
            return self._like(shares, self._meta)
        trunc = self._trunc_material(self.shape, bits)
        assert trunc is not None
        ids = [p.id for p in self.parties]
        runs = start_flow(
            "mpc.truncate_shared",
            {
                party: ([self.shares[i]], {"precision": bits, "parties": ids, "trunc": trunc[i]})
                for i, party in enumerate(self.parties)
            },
        )
        online = (n * (n - 1) + (n - 1)) * 8 * self.numel()  # openings, and the re-masks to party 0
        cost = Cost(rounds=1, online_bytes=online, material_bytes=16 * n + 8 * self.numel())
        return self._like([runs[party] for party in self.parties], self._meta, cost)


def _linear(x: SharedTensor, weight: Any, bias: Any = None) -> SharedTensor:
    out = x @ (weight.t() if isinstance(weight, SharedTensor) else torch.as_tensor(weight).t())
    return out if bias is None else out + bias


def cat(tensors: Sequence[SharedTensor], dim: int = 0) -> SharedTensor:
    """``torch.cat`` of shared tensors over the same parties: each party joins its shares."""
    first = tensors[0]
    for other in tensors[1:]:
        first._check_peer(other)
    meta = torch.cat([t._meta for t in tensors], dim)
    columns = zip(*(t.shares for t in tensors), strict=True)
    shares = [first._join(list(column), dim) for column in columns]
    return first._like(shares, meta, FREE, *tensors[1:])


_TORCH_FUNCTIONS: dict[Any, Any] = {
    torch.add: lambda x, y: x + y,
    torch.sub: lambda x, y: x - y,
    torch.mul: lambda x, y: x * y,
    torch.matmul: lambda x, y: x @ y,
    torch.neg: lambda x: -x,
    torch.sum: lambda x, dim=None, keepdim=False: x.sum(dim, keepdim),
    torch.mean: lambda x, dim=None, keepdim=False: x.mean(dim, keepdim),
    torch.sigmoid: lambda x: x.sigmoid(),
    torch.cat: cat,
    F.linear: _linear,
    F.conv2d: lambda x, w, bias=None, stride=1, padding=0: (
        x.conv2d(w, stride, padding)
        if bias is None
        else x.conv2d(w, stride, padding) + bias.reshape(-1, 1, 1)
    ),
    F.avg_pool2d: lambda x, kernel_size, stride=None, padding=0: x.avg_pool2d(kernel_size, stride, padding),
}


def _new_material(
    provider: actors.RemoteWorker, parties: Sequence[actors.RemoteWorker], kind: str, shapes: list[list[int]],
    options: dict[str, Any],
) -> list[PointerTensor]:  # fmt: skip
    """Ask the provider for one operation's material; each party gets its part."""
    party_op, provider_op, kind = MATERIAL_FLOWS.get(kind, ("mpc.material", "provider.material", kind))
    ids = [p.id for p in parties]
    calls: dict[actors.RemoteWorker, tuple[list[Any], dict[str, Any] | None]] = {
        provider: ([kind, shapes, ids, options], None)
    }
    last = len(parties) - 1
    for i, party in enumerate(parties):
        calls[party] = ([kind, shapes, provider.id, i == last, options], None)
    runs = start_flow(party_op, calls, ops={provider: provider_op})
    _quietly(runs[provider])
    return [runs[party] for party in parties]


def _quietly(pointer: PointerTensor) -> None:
    """Hear a provider's part out without reporting its failure: a failed part aborts the run,
    so the parties' results carry the error already (and say which party failed)."""
    task = asyncio.ensure_future(pointer.resolve())
    task.add_done_callback(lambda done: done.cancelled() or done.exception())


#: Kinds of material other modes ask for: kind -> (the parties' flow, the provider's flow, the
#: kind as that flow names it). The semi-honest kinds are not listed.
MATERIAL_FLOWS: dict[str, tuple[str, str, str]] = {}

#: Material made ahead of need, by (provider, parties, kind, shapes, options), oldest first.
_PREPARED: dict[tuple[Any, ...], collections.deque[list[PointerTensor]]] = {}


def _make_ahead(key: tuple[Any, ...]) -> list[PointerTensor]:
    """Ask for the material ``key`` describes now, for the next operation that needs it."""
    provider, parties, kind, shapes, options = key
    material = _new_material(provider, parties, kind, [list(s) for s in shapes], dict(options))
    _PREPARED.setdefault(key, collections.deque()).append(material)
    return material


def _material_key(
    provider: actors.RemoteWorker, parties: Sequence[actors.RemoteWorker], kind: str, shapes: list[list[int]],
    options: dict[str, Any],
) -> tuple[Any, ...]:  # fmt: skip
    return (provider, tuple(parties), kind, tuple(tuple(s) for s in shapes), tuple(sorted(options.items())))


class Recording:
    """The material a computation asked for, to have it made ahead next time (``prepare()``)."""

    def __init__(self) -> None:
        self.keys: list[tuple[Any, ...]] = []

    def prepare(self) -> list[list[PointerTensor]]:
        """Ask for all of it now; returns the material, for whoever wants to await it."""
        return [_make_ahead(key) for key in self.keys]


_RECORDINGS: contextvars.ContextVar[tuple[Recording, ...]] = contextvars.ContextVar(
    "mpc_recordings", default=()
)


def recording() -> contextlib.AbstractContextManager[Recording]:
    """Record the material the operations issued inside ask for (``with mpc.recording() as r``)."""
    return _scoped(_RECORDINGS, Recording())


def prepare(op: str, x: SharedTensor, y: SharedTensor | Sequence[int] | None = None, count: int = 1) -> None:
    """Have the provider make material for ``count`` future ``x op y`` now (``op``: ``"mul"``,
    ``"matmul"``; ``"trunc"`` for the truncations of fixed-point products of ``x``'s shape among
    three or more parties). Those operations then open at once instead of waiting for the
    provider: its work moves out of the online phase."""
    if op == "trunc":
        shapes = [list(x.shape)]
    else:
        other = y.shape if isinstance(y, SharedTensor) else y
        if other is None:
            raise ValueError(f"prepare({op!r}) needs the other operand or its shape")
        shapes = [list(x.shape), list(other)]
    kind, options = x._request(op)
    key = _material_key(x._provider(), x.parties, kind, shapes, options)
    for _ in range(count):
        _make_ahead(key)


def share(
    value: Any,
    *parties: actors.RemoteWorker,
    crypto_provider: actors.RemoteWorker | None = None,
    precision: int | None = PRECISION,
    shape: Sequence[int] | None = None,
) -> SharedTensor:
    """Additive shares of ``value`` on ``parties``.

    ``value`` is a float tensor (encoded with ``precision`` fractional bits), an int64 tensor
    (shared as integers when ``precision`` is ``None``), or a fixed-precision tensor (its own
    precision). A local value is split here, with the secure generator, and each party is sent
    its share only. A remote one (a pointer, or a fixed-precision tensor on a worker) is split
    on its worker, which sends the parties their shares directly: its owner's *shares* release
    (:class:`mpc.release.Shares`) decides whether they may go."""
    if len(parties) < 2:
        raise ValueError("share among two or more parties")
    if len({p.id for p in parties}) != len(parties):
        raise ValueError("the parties must be distinct workers")
    if crypto_provider is not None and crypto_provider.id in {p.id for p in parties}:
        raise ValueError(f"the crypto provider {crypto_provider.id} cannot also be a party")
    child, precision = _ring_of(value, precision)
    if isinstance(child, PointerTensor):
        return _share_remote(child, parties, crypto_provider, precision, shape)
    shares = [
        actors.send(piece, party) for piece, party in zip(split(child, len(parties)), parties, strict=True)
    ]
    return SharedTensor(shares, parties, crypto_provider, precision, child.shape)


def _share_remote(
    child: PointerTensor, parties: Sequence[actors.RemoteWorker], provider: actors.RemoteWorker | None,
    precision: int | None, shape: Sequence[int] | None,
) -> SharedTensor:  # fmt: skip
    """Split where the data lives (:mod:`mpc.sharing`): its worker sends each party its share."""
    if shape is None:
        try:
            shape = child.shape
        except SyftError as exc:
            raise ValueError(f"sharing {child!r} needs its shape: await it first, or pass shape=") from exc
    owner = child.location
    options = {"owner": owner.id, "parties": [p.id for p in parties]}
    calls: dict[actors.RemoteWorker, tuple[list[Any], dict[str, Any] | None]] = {owner: ([child], options)}
    for party in parties:
        if party is not owner:
            calls[party] = ([], options)
    runs = start_flow("mpc.share_from", calls)
    if owner not in parties:
        _quietly(runs[owner])  # its part's result is nothing; a failure reaches the parties' too
    return SharedTensor([runs[party] for party in parties], parties, provider, precision, shape)


def _ring_of(value: Any, precision: int | None) -> tuple[Any, int | None]:
    fixed_precision = getattr(value, "precision", None)
    child = getattr(value, "child", None)
    if child is not None and fixed_precision is not None:  # a FixedPrecisionTensor
        return child, fixed_precision
    if isinstance(value, PointerTensor):
        return value, precision
    tensor = torch.as_tensor(value)
    if tensor.dtype == torch.int64 and precision is None:
        return tensor, None
    if precision is None:
        raise TypeError(f"only int64 tensors are shared as integers, got {tensor.dtype}")
    check_precision(precision)
    return encode(tensor, precision), precision
