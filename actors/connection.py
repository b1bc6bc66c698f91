"""The client end of a link: message ids, replies, batched deletes, errors nobody awaited.

One :class:`Connection` per (local worker, remote worker) pair. It is what pointers talk through
and what a worker uses to reach its peers, so the leader and the workers share one mechanism.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import copy
import itertools
from collections.abc import Callable
from typing import Any

from actors.log import get_logger
from actors.transport import Transport
from protocol import (
    AuthenticationFailed,
    Codec,
    Delete,
    Error,
    Kind,
    Ping,
    Reply,
    Store,
    SyftError,
    WireError,
    WorkerLost,
)
from protocol.codec import Buffer, FrameBuilder

#: A burst is cut into frames of at most this many messages or header bytes.
BATCH_MESSAGES = 4096
BATCH_BYTES = 1 << 20
_COMMAND = int(Kind.COMMAND)
#: Failure reports kept for pointers that have not asked yet.
MAX_UNRETRIEVED = 256
#: Recent moves remembered in case their source reports them undeliverable.
MAX_FORWARDED = 4096


class Connection:
    """Sends messages to one worker and routes what comes back.

    ``tell`` is fire and forget, ``ask`` returns a future for the reply. Messages sent in one
    turn of the event loop leave together as one frame (a message carrying tensor bytes closes
    its frame at once, so the tensor is captured when it is sent). Unsolicited ERRORs (a
    pipelined command failed) are kept by result id until a pointer asks for them; one dropped
    without being asked is logged, the way asyncio reports an exception never retrieved.
    """

    def __init__(
        self,
        local_id: str,
        remote_id: str,
        transport: Transport,
        codec: Codec | None = None,
        *,
        reply_timeout: float | None = None,
        expect_id: str | None = None,
    ) -> None:
        self.local_id = local_id
        #: Seconds a question may wait for its answer before the worker counts as lost; ``None``
        #: waits as long as the link is up (a dropped link fails everything at once anyway).
        self.reply_timeout = reply_timeout
        self.remote_id = remote_id
        self.transport = transport
        self.codec = codec or Codec()
        self._frame = FrameBuilder(self.codec.max_frame_size)
        self.loop = asyncio.get_running_loop()
        self.next_id = itertools.count(1).__next__
        self.lost: SyftError | None = None
        self.protocol_errors: collections.deque[SyftError] = collections.deque(maxlen=64)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._failures: dict[int, SyftError] = {}
        self._deletes: list[int] = []
        self._flush_scheduled = False
        self._asked_this_turn = False
        self.log = get_logger(worker=local_id, peer=remote_id)
        #: Messages held until the worker proved to be ``expect_id`` (see :meth:`_verify`).
        self._held: list[Any] | None = None
        #: Whether the worker has answered (a link that never did may not have carried anything).
        self.usable = expect_id is None
        self._unreached: list[Callable[[BaseException], None]] = []
        self._watchers: list[Callable[[BaseException], None]] = []
        #: Objects moved away from this worker by id, to the connection of the worker they went
        #: to: a report that one could not be delivered is turned into its failure there.
        self.forwarded: dict[int, Connection] = {}
        transport.start(self._on_frame, self._on_lost)
        if expect_id is not None:
            self._verify(expect_id)

    def _verify(self, expect_id: str) -> None:
        """Hold everything until the worker at this address says it is ``expect_id``: a worker
        forwarding data released to bob must not hand it to whoever answers at the address it
        was given. (The worker's word is all there is until TLS authenticates servers.)"""
        ping = Ping(self.next_id(), self.local_id)
        answer = self.ask(ping)
        self._held = []

        def verified(future: asyncio.Future[Any]) -> None:
            held, self._held = self._held or [], None
            if future.cancelled() or future.exception() is not None:
                return  # the link failed; its error reaches whoever uses it
            status = future.result()
            found = status.get("id") if isinstance(status, dict) else None
            if found != expect_id:
                self._on_lost(
                    AuthenticationFailed(f"{self.transport.address} answered as {found!r}, not {expect_id!r}")
                )
                self._closing = self.loop.create_task(self.transport.close())
                return
            self.usable, self._unreached = True, []
            if held:
                self.tell_all(held)

        answer.add_done_callback(verified)

    def when_unreached(self, callback: Callable[[BaseException], None]) -> None:
        """Call ``callback`` with the reason if this link is lost before the worker answered
        (so nothing sent on it can have been served)."""
        if self.lost is not None and not self.usable:
            callback(self.lost)
        elif not self.usable:
            self._unreached.append(callback)

    def lost_error(self) -> SyftError:
        """A fresh copy of why the link is lost, to raise: raising the one stored error would
        hang each raiser's frames (and every object they hold) on this connection."""
        assert self.lost is not None
        return copy.copy(self.lost)

    def when_lost(self, callback: Callable[[BaseException], None]) -> None:
        """Call ``callback`` with the reason when this link is lost (now, if it already is)."""
        if self.lost is not None:
            callback(self.lost)
        else:
            self._watchers.append(callback)

    @property
    def address(self) -> str:
        return self.transport.address

    # -- sending ----------------------------------------------------------------------------
    def tell(self, message: Any) -> None:
        """Send ``message`` without waiting for anything."""
        if self.lost is not None:
            raise self.lost_error()
        if self._held is not None:
            self._held.append(message)
            return
        self._added(self._frame.add(message))

    def tell_all(self, messages: list[Any]) -> None:
        """Send ``messages`` together: what they carry is captured once, in one frame."""
        if self.lost is not None:
            raise self.lost_error()
        if self._held is not None:
            self._held.extend(messages)
            return
        holds_views = False
        for message in messages:
            holds_views = self._frame.add(message) or holds_views
        self._added(holds_views)

    def command(self, result_id: int, op: str, args: list[Any], kwargs: dict[str, Any] | None) -> None:
        """Pipeline one COMMAND; the hot path of every pointer operation."""
        if self.lost is not None:
            raise self.lost_error()
        fields = [_COMMAND, self.next_id(), self.local_id, result_id, op, args, kwargs]
        self._added(self._frame.add_wire(fields))

    def _added(self, holds_tensor_views: bool) -> None:
        frame = self._frame
        if holds_tensor_views or len(frame) >= BATCH_MESSAGES or frame.header_bytes >= BATCH_BYTES:
            self.flush()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self.flush)

    def ask(self, message: Any) -> asyncio.Future[Any]:
        """Send ``message`` and return a future for its reply (or its typed error)."""
        future = self.loop.create_future()
        if self.lost is not None:
            future.set_exception(self.lost_error())
            return future
        self._add_deletes()  # objects dropped before this question are gone when it is answered
        self.tell(message)
        self._pending[message.msg_id] = future
        if not self._asked_this_turn:
            # The first question of a turn leaves at once (a round trip is then one loop
            # iteration shorter); any others asked in the same turn share the next frame.
            self.flush()
            self._asked_this_turn = True
            self._flush_scheduled = True
            self.loop.call_soon(self.flush)
        if self.reply_timeout is not None:
            timer = self.loop.call_later(self.reply_timeout, self._expire, message.msg_id)
            future.add_done_callback(lambda _: timer.cancel())
        return future

    def _expire(self, msg_id: int) -> None:
        future = self._pending.get(msg_id)
        if future is not None and not future.done():
            self._on_lost(WorkerLost(f"{self.remote_id} did not answer within {self.reply_timeout:g} s"))
            self._closing = self.loop.create_task(self.transport.close())

    def flush(self) -> None:
        """Hand the frame being built (and any batched deletes) to the transport now."""
        self._flush_scheduled = False
        self._asked_this_turn = False
        self._add_deletes()
        if len(self._frame) and self.lost is None:
            self.transport.write(self._frame.build())

    def _add_deletes(self) -> None:
        if self._deletes and self.lost is None:
            ids, self._deletes = self._deletes, []
            self._frame.add(Delete(self.next_id(), self.local_id, ids))

    def request_frame(self, frame: Buffer, msg_id: int) -> asyncio.Future[Any]:
        """Send a pre-built (possibly deliberately broken) frame and await the answer to
        ``msg_id``: how tests and tools probe a worker's handling of bad input."""
        self.flush()
        future = self.loop.create_future()
        self._pending[msg_id] = future
        self.transport.write(frame)
        return future

    def release(self, obj_id: int) -> None:
        """Free a remote object soon; deletes leave in one batch per turn of the event loop."""
        failure = self._failures.pop(obj_id, None) if self._failures else None
        if failure is not None:
            self._unretrieved(obj_id, failure)
        if self.lost is not None:
            return
        self._deletes.append(obj_id)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self.flush)

    def take_failure(self, obj_id: int, *_: Any) -> SyftError | None:
        """The error reported for ``obj_id``, if any; it counts as retrieved. Called when an
        answer about the object arrives, which is always after the report (one sender's
        messages are answered in order)."""
        return self._failures.pop(obj_id, None) if self._failures else None

    def _unretrieved(self, obj_id: int, failure: SyftError) -> None:
        self.log.error("remote error never retrieved", obj_id=obj_id, error=str(failure))

    async def drain(self) -> None:
        """Wait until what was sent has been handed to the worker (backpressure point)."""
        self.flush()
        await self.transport.drain()

    async def close(self) -> None:
        for obj_id, failure in self._failures.items():
            self._unretrieved(obj_id, failure)
        self._failures.clear()
        self.flush()
        await self.transport.close()
        self._on_lost(WorkerLost(f"connection to {self.remote_id} closed"))

    def _named(self, exc: BaseException) -> WorkerLost:
        """The loss, naming the worker and where it was: whoever waits learns which one left."""
        reason = str(exc) or type(exc).__name__
        who = self.remote_id if self.remote_id != self.address else "worker"
        lost = WorkerLost(f"lost {who} at {self.address}: {reason}")
        lost.worker, lost.address = (self.remote_id if who != "worker" else None), self.address
        return lost

    # -- receiving --------------------------------------------------------------------------
    def _on_frame(self, frame: Buffer) -> None:
        try:
            for message in self.codec.decode(frame):
                self._on_message(message)
        except SyftError as exc:
            self.log.warning("undecodable frame from worker", error=str(exc))
            self.protocol_errors.append(exc)

    def _on_message(self, message: Any) -> None:
        kind = type(message)
        if kind is Reply:
            future = self._pending.pop(message.in_reply_to, None)
            if future is not None and not future.done():
                future.set_result(message.value)
        elif kind is Error:
            error = WireError(
                message.type_name, message.message, message.traceback, message.failed_id
            ).to_exception()
            future = self._pending.pop(message.in_reply_to, None) if message.in_reply_to else None
            if future is not None:
                if not future.done():
                    future.set_exception(error)
            elif type(message.failed_id) is int and message.failed_id in self.forwarded:
                self._failed_forward(message.failed_id, error)
            elif type(message.failed_id) is int:
                # Kept until a pointer asks or is dropped. A pointer dropped before its report
                # came would leave it here forever: the oldest are logged and let go.
                self._failures[message.failed_id] = error
                if len(self._failures) > MAX_UNRETRIEVED:
                    oldest = next(iter(self._failures))
                    self._unretrieved(oldest, self._failures.pop(oldest))
            else:
                self.log.warning("worker reported an error", msg_id=message.in_reply_to, error=str(error))
                self.protocol_errors.append(error)
        elif isinstance(message, SyftError):
            self.log.warning("bad message from worker", error=str(message))
            self.protocol_errors.append(message)
        else:
            self.log.warning("unexpected message from worker", kind=kind.__name__, msg_id=message.msg_id)

    def moved(self, new_id: int, destination: Connection) -> None:
        """``new_id`` is on its way from this worker to ``destination`` (see :attr:`forwarded`);
        reports come at once if at all, so only the latest few are kept."""
        self.forwarded[new_id] = destination
        if len(self.forwarded) > MAX_FORWARDED:
            del self.forwarded[next(iter(self.forwarded))]

    def _failed_forward(self, obj_id: int, error: SyftError) -> None:
        """The object never left for its destination: its pointer (there now) fails with the
        reason, and so does whatever waits for it there. This side announced it, so this side
        may deliver the failure in its place."""
        destination = self.forwarded.pop(obj_id)
        destination._failures[obj_id] = error
        wire = WireError(type(error).__name__, str(error), "", obj_id)
        with contextlib.suppress(SyftError):  # that worker is gone too: its own loss tells
            destination.tell(Store(destination.next_id(), destination.local_id, obj_id, wire, None, None))

    def _on_lost(self, exc: BaseException) -> None:
        if self.lost is None:
            self.lost = exc if isinstance(exc, AuthenticationFailed) else self._named(exc)
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(self.lost_error())
        unreached, self._unreached = self._unreached, []
        for callback in unreached:
            callback(self.lost)
        watchers, self._watchers = self._watchers, []
        for callback in watchers:
            callback(self.lost)
