"""What a transport is, and how a worker dials a peer by address.

A transport carries frames to one worker, in order, and hands back the frames it answers with.
``write`` never blocks, because pointer operations are synchronous (they return a new pointer at
once): what cannot go out yet waits in the transport, and ``drain`` lets a producer wait for it.
The same frames cross every transport, so a scenario that passes over one passes over all.
"""

from __future__ import annotations

import abc
import asyncio
import collections
from collections.abc import Callable
from typing import Protocol
from urllib.parse import urlsplit

from protocol import DEFAULT_MAX_FRAME, FrameTooLarge, WorkerLost
from protocol.codec import Buffer

FrameHandler = Callable[[Buffer], None]
LossHandler = Callable[[BaseException], None]


class Transport(abc.ABC):
    """The client end of a link to one worker."""

    #: How to reach the worker again (``virtual://bob``, ``ws://127.0.0.1:8777``).
    address: str

    @abc.abstractmethod
    def start(self, on_frame: FrameHandler, on_lost: LossHandler) -> None:
        """Begin delivering the worker's frames to ``on_frame``; ``on_lost`` when the link dies."""

    @abc.abstractmethod
    def write(self, frame: Buffer) -> None:
        """Queue ``frame`` for the worker, after every frame written before it."""

    @abc.abstractmethod
    async def drain(self) -> None:
        """Wait until frames written so far have been handed to the worker."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop; frames not yet handed over are dropped."""


class FlowControl:
    """Write-side backpressure of one link: the transport pauses it when its send buffer is full
    and resumes it once drained, so whoever produces frames can wait instead of piling them up."""

    __slots__ = ("_waiter", "paused")

    def __init__(self) -> None:
        self.paused = False
        self._waiter: asyncio.Future[None] | None = None

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def fail(self, exc: BaseException) -> None:
        """The link is gone: nobody should wait for it to drain."""
        self.paused = False
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    async def wait(self) -> None:
        if self.paused:
            if self._waiter is None:
                self._waiter = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._waiter)


class Sink(Protocol):
    """Where a connected transport's frames go, and its write-side backpressure."""

    flow: FlowControl

    def send(self, frame: Buffer) -> None: ...


class DialingTransport(Transport):
    """A network client end: connects in the background; frames written meanwhile wait.

    Subclasses implement :meth:`_run` (connect, call :meth:`_connected` with the sink, then
    deliver frames until the link ends) and close what they opened in :meth:`_closed`.
    """

    #: The address scheme this transport dials (``ws``, ``tcp``).
    scheme: str = ""

    def __init__(
        self,
        address: str,
        local_id: str,
        *,
        secret: str | None = None,
        max_frame_size: int = DEFAULT_MAX_FRAME,
    ) -> None:
        self.host, self.port = split_address(address, self.scheme)  # a bad address fails here, at once
        self.address = address
        #: The identity this end authenticates as, and its secret.
        self.local_id = local_id
        self.secret = secret
        self.max_frame_size = max_frame_size
        self._sink: Sink | None = None
        self._waiting: collections.deque[Buffer] = collections.deque()
        self._on_frame: FrameHandler = lambda frame: None
        self._on_lost: LossHandler = lambda exc: None
        self._lost: BaseException | None = None
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._task: asyncio.Task[None] | None = None

    def start(self, on_frame: FrameHandler, on_lost: LossHandler) -> None:
        self._on_frame, self._on_lost = on_frame, on_lost
        self._task = asyncio.get_running_loop().create_task(self._run())

    @abc.abstractmethod
    async def _run(self) -> None: ...

    async def _closed(self) -> None:
        """Release what the subclass opened (after the link is known lost)."""

    def _connected(self, sink: Sink) -> None:
        while self._waiting:
            sink.send(self._waiting.popleft())
        self._sink = sink
        self.ready.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        if self._lost is None:
            self._lost = exc
            self._waiting.clear()
            if self._sink is not None:
                self._sink.flow.fail(exc)
            if not self.ready.done():
                self.ready.set_exception(exc)
                self.ready.exception()  # retrieved here; whoever awaits it still gets it
            self._on_lost(exc)

    def write(self, frame: Buffer) -> None:
        if self._lost is not None:
            raise self._lost
        if len(frame) > self.max_frame_size:
            raise FrameTooLarge(f"frame of {len(frame)} bytes exceeds the limit of {self.max_frame_size}")
        if self._sink is None:
            self._waiting.append(frame)
        else:
            self._sink.send(frame)

    async def drain(self) -> None:
        await asyncio.shield(self.ready)
        if self._sink is not None:
            await self._sink.flow.wait()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._fail(WorkerLost(f"connection to {self.address} closed"))
        await self._closed()


def split_address(address: str, scheme: str) -> tuple[str, int]:
    """``scheme://host:port`` as (host, port); a ValueError naming the address otherwise."""
    try:
        parts = urlsplit(address)
        port = parts.port
    except ValueError as exc:  # a port out of range, an unreadable netloc
        raise ValueError(f"bad address {address!r}: {exc}") from None
    if parts.scheme != scheme or not parts.hostname or port is None or port == 0:
        raise ValueError(f"bad address {address!r}: expected {scheme}://host:port")
    return parts.hostname, port


class Dialer(Protocol):
    def __call__(self, address: str, local_id: str, *, secret: str | None) -> Transport: ...


_DIALERS: dict[str, Dialer] = {}


def register_dialer(scheme: str, dialer: Dialer) -> None:
    """Make ``dial`` reach addresses ``scheme://...`` with ``dialer(address, local_id, secret=)``."""
    _DIALERS[scheme] = dialer


def dial(address: str, local_id: str, *, secret: str | None = None) -> Transport:
    """A transport to the worker at ``address``, authenticating as ``local_id`` with ``secret``.

    It is returned at once and connects in the background; frames written meanwhile wait.
    """
    scheme, sep, _ = address.partition("://")
    dialer = _DIALERS.get(scheme) if sep else None
    if dialer is None:
        raise ValueError(f"no transport for address {address!r} (known: {sorted(_DIALERS)})")
    return dialer(address, local_id, secret=secret)
