"""The worker actor: lifecycle, sessions and peers. What it does with each message is
:mod:`actors.dispatch`; what it holds is :mod:`actors.store`; who may see what is
:mod:`actors.policy`.

Each connected identity's link gets a :class:`Session`: a bounded mailbox and a task that hands
its messages, in the order sent, to the dispatcher. The session never waits for anything but its
mailbox and its link's backpressure: a message that must wait for an object still on its way
is parked by the dispatcher, and the next ones go on.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import time
from collections.abc import Callable, Iterable
from typing import Any

from actors.connection import Connection
from actors.dispatch import Arrival, Dispatch
from actors.flows import FlowRouter
from actors.identity import Credentials
from actors.log import get_logger, tracing
from actors.policy import Policy, Public, Release, Taint
from actors.registry import commands_for, label_rules
from actors.store import ObjectStore
from actors.tls import TlsConfig, dial_secure
from actors.transport import FlowControl
from protocol import (
    DEFAULT_MAX_FRAME,
    PROTOCOL_VERSION,
    Codec,
    Command,
    Error,
    ProtocolError,
    Reply,
    SyftError,
    WireError,
    WorkerLost,
    published_id,
)
from protocol.codec import Buffer

#: Default mailbox bound per sender: enough to keep a pipeline full, small enough to bound memory.
MAILBOX_SIZE = 1024
_SESSION_NUMBERS = itertools.count(1)
#: Objects forwarded ahead of their owner's announcement that a worker keeps meanwhile.
MAX_UNCLAIMED = 4096
#: Seconds a departed identity's objects are kept for it to reconnect (``Worker(grace=...)``).
GRACE = 60.0
#: Failed announcements a worker remembers for their owners (the oldest are forgotten).
MAX_FAILURES = 4096


class Session:
    """One authenticated link's ordered mailbox on a worker, and the task that drains it."""

    def __init__(
        self, worker: Worker, identity: str, send: Callable[[Buffer], None], mailbox_size: int
    ) -> None:
        self.worker = worker
        #: Who is on the other end, as the transport authenticated it: the sender of everything.
        self.identity = identity
        #: A pseudo object id that this sender's waiting messages read and the ones with unnamed
        #: effects (``backward`` writes the gradients of leaves it does not name) write.
        self.barrier = -next(_SESSION_NUMBERS)
        self._send = send
        self.closed = False
        #: This sender's messages waiting in the dispatcher's scheduler.
        self.parked: dict[Any, None] = {}
        #: Flows this sender started that are still running (cancelled when it leaves).
        self.flows: set[asyncio.Future[Any]] = set()
        #: Called once when the session closes (the transport tells its client the worker is gone).
        self.on_close: Callable[[], None] | None = None
        #: The reply direction's backpressure; the session stops reading while it is paused.
        self.flow: FlowControl | None = None
        self.mailbox: asyncio.Queue[Buffer] = asyncio.Queue(mailbox_size)
        self.task = asyncio.get_running_loop().create_task(
            self._run(), name=f"aiosyft:{worker.id}<-{identity}"
        )

    @property
    def peer_id(self) -> str:
        return self.identity

    async def _run(self) -> None:
        worker = self.worker
        mailbox = self.mailbox
        dispatch = worker.dispatch
        identity = self.identity
        trace = worker.log.debug if tracing() else None
        while True:
            frame = await mailbox.get()
            messages = worker.decode(self, frame)
            while True:
                try:  # a frame can turn unreadable midway: serve what came before, report the rest
                    message = next(messages)
                except StopIteration:
                    break
                except ProtocolError as exc:
                    worker.report_bad_frame(self, exc)
                    break
                if trace is not None:
                    trace("message", msg_id=message.msg_id, kind=type(message).__name__, sender=identity)
                if type(message) is Command and message.sender == identity:  # most messages
                    try:
                        if dispatch.tails:
                            dispatch.command(self, message)
                        else:  # nothing pending: nothing to wait for
                            dispatch.run_command(self, message)
                    except Exception as exc:  # a bad message costs its sender an error, never the worker
                        dispatch.report_failure(self, message, exc)
                else:
                    dispatch.dispatch(self, message)
            if self.flow is not None and self.flow.paused:
                try:
                    await self.flow.wait()
                except SyftError:  # the link is gone; its transport closes this session
                    return

    def send(self, frame: Buffer) -> None:
        """Hand a frame back to the sender; a link that is already gone only costs a log line
        (its transport closes this session), never the session itself."""
        if self.closed:
            return
        try:
            self._send(frame)
        except (SyftError, OSError) as exc:
            self.worker.log.info("reply dropped: the link is gone", sender=self.identity, error=str(exc))

    def reply(self, in_reply_to: int, value: Any) -> None:
        worker = self.worker
        try:
            frame = worker.codec.encode(Reply(worker.next_msg_id(), worker.id, in_reply_to, value))
        except Exception as exc:  # the value cannot travel: say so instead of going silent
            self.error(in_reply_to, WireError.from_exception(exc))
            return
        self.send(frame)

    def error(self, in_reply_to: int, error: WireError) -> None:
        worker = self.worker
        message = Error(
            worker.next_msg_id(),
            worker.id,
            in_reply_to,
            error.type_name,
            error.message,
            error.traceback,
            error.failed_id,
        )
        self.send(worker.codec.encode(message))

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.task.cancel()
        for flow in list(self.flows):  # nothing this sender started runs on without it
            flow.cancel()
        self.worker.session_closed(self)
        on_close, self.on_close = self.on_close, None
        if on_close is not None:
            on_close()


class Worker:
    """An actor that owns objects and runs allowlisted commands on them for its senders.

    ``credentials`` checks who connects (``None``: anyone may claim any identity, which is only
    sensible on loopback); ``secret`` is this worker's own, presented when it dials a peer.
    ``enable`` names the command sets it serves beyond the torch allowlist (``None``: every set
    a package loaded in this process registered). ``tls`` (:class:`~actors.tls.TlsConfig`) is
    what it serves with and dials its peers with: with it, no link of this worker is plaintext.
    """

    def __init__(
        self,
        worker_id: str,
        *,
        address: str | None = None,
        mailbox_size: int = MAILBOX_SIZE,
        expect_timeout: float = 60.0,
        max_frame_size: int = DEFAULT_MAX_FRAME,
        credentials: Credentials | None = None,
        secret: str | None = None,
        enable: Iterable[str] | None = None,
        spin: float = 0.0,
        max_unclaimed: int = MAX_UNCLAIMED,
        grace: float = GRACE,
        max_failures: int = MAX_FAILURES,
        tls: TlsConfig | None = None,
    ) -> None:
        self.id = worker_id
        #: Certificates for its links; ``serve(..., tls=)`` sets it too. With it, the worker dials
        #: TLS addresses only (a plaintext one fails as :class:`~actors.tls.InsecureAddress`).
        self.tls = tls
        #: Seconds an identity's objects outlive its last connection, so that it can reconnect
        #: and carry on; then they are freed.
        self.grace = grace
        self._departures: dict[str, asyncio.TimerHandle] = {}
        #: Announcements that ended in failure, remembered (bounded) for their owners' messages.
        self.max_failures = max_failures
        #: Seconds to keep polling, rather than sleeping, while a message waits for an announced
        #: object (0: sleep at once). See :meth:`note_waiting`.
        self.spin = spin
        self._spin_until = 0.0
        self._spinning = False
        self.credentials = credentials
        self.secret = secret
        self.address = address or f"virtual://{worker_id}"
        self.mailbox_size = mailbox_size
        self.expect_timeout = expect_timeout
        self.max_unclaimed = max_unclaimed
        self.log = get_logger(worker=worker_id)
        self.store = ObjectStore()
        self.policy = Policy(worker_id)
        self.flows = FlowRouter(worker_id)
        self.flow_tasks: set[asyncio.Future[Any]] = set()
        #: Per-worker state of extensions (privacy ledgers, provider material), by their names.
        self.state: dict[str, Any] = {}
        self.command_sets = enable
        self.dispatch = Dispatch(self, commands_for(enable), label_rules())
        self.codec = Codec(max_frame_size)
        self.sessions: set[Session] = set()
        self.peers: dict[tuple[str, str], Connection] = {}
        #: Announced objects with their deadlines, oldest first (one watchdog for all).
        self._deadlines: dict[Arrival, float] = {}
        self._watchdog: asyncio.TimerHandle | None = None
        self.started = time.monotonic()
        self._closing = False
        self._msg_ids = iter(range(1, 1 << 62)).__next__

    def __repr__(self) -> str:
        return f"<Worker {self.id} objects={len(self.store)}>"

    def next_msg_id(self) -> int:
        return self._msg_ids()

    # -- lifecycle --------------------------------------------------------------------------
    def open_session(self, identity: str, send: Callable[[Buffer], None]) -> Session:
        """A new mailbox for a link authenticated as ``identity``; ``send`` carries replies back.
        A stopped worker takes none (a session opened then would serve on without a worker)."""
        if self._closing:
            raise WorkerLost(f"worker {self.id} stopped")
        session = Session(self, identity, send, self.mailbox_size)
        self.sessions.add(session)
        departure = self._departures.pop(identity, None)
        if departure is not None:  # back within its grace period: everything it held is still here
            departure.cancel()
            self.log.info("identity back", identity=identity)
        return session

    def session_closed(self, session: Session) -> None:
        """A link went away. If it was its identity's last: what that identity was to deliver
        fails now (a peer gone mid-protocol), and what it owns is freed after the grace period."""
        self.sessions.discard(session)
        identity = session.identity
        if any(other.identity == identity for other in self.sessions):
            return
        self.dispatch.source_lost(identity)
        self.flows.party_lost(identity, WorkerLost(f"{identity}, a party of this run, left"))
        if identity not in self._departures and not self._closing:
            self._departures[identity] = asyncio.get_running_loop().call_later(
                self.grace, self._forget, identity
            )

    def _forget(self, identity: str) -> None:
        """The grace period is over: free everything ``identity`` owned or had announced."""
        self._departures.pop(identity, None)
        freed = self.dispatch.forget(identity)
        self.flows.forget_sender(identity)
        self.log.info("identity gone, its objects freed", identity=identity, objects=freed)

    def authenticate(self, identity: Any, secret: Any) -> bool:
        """Whether ``secret`` proves ``identity`` (every transport asks this before a session)."""
        if not isinstance(identity, str) or not identity:
            return False
        if self.credentials is None:
            return True
        return self.credentials.verify(identity, secret)

    async def on_start(self) -> None:
        """Hook: runs before the worker serves (warm-up, loading data)."""

    async def on_stop(self) -> None:
        """Hook: runs when the worker stops."""

    async def close(self) -> None:
        self._closing = True
        for departure in self._departures.values():
            departure.cancel()
        self._departures.clear()
        await self.on_stop()
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        sessions = list(self.sessions)
        for session in sessions:
            session.close()
        flows = list(self.flow_tasks)
        for flow in flows:
            flow.cancel()
        await asyncio.gather(*(s.task for s in sessions), *flows, return_exceptions=True)
        for peer in list(self.peers.values()):
            await peer.close()
        self.peers.clear()
        self.store.clear()

    def status(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "objects": len(self.store),
            "uptime": time.monotonic() - self.started,
            "version": PROTOCOL_VERSION,
            "sessions": len(self.sessions),
        }

    def peer(self, peer_id: str, address: str) -> Connection:
        """The connection to another worker, dialled on first use (workers talk directly)."""
        key = (peer_id, address)
        connection = self.peers.get(key)
        if connection is None or connection.lost is not None:
            # With TLS on, a plaintext address raises here: the secret would go out in the clear.
            transport = dial_secure(address, self.id, secret=self.secret, tls=self.tls)
            codec = Codec(self.codec.max_frame_size)
            connection = Connection(self.id, peer_id, transport, codec, expect_id=peer_id)
            self.peers[key] = connection
            connection.when_lost(functools.partial(self._peer_lost, peer_id))
        return connection

    def _peer_lost(self, peer_id: str, reason: BaseException) -> None:
        """Our link to a peer dropped: the flows waiting on it would wait in vain."""
        self.flows.party_lost(
            peer_id, WorkerLost(f"{peer_id}, a party of this run, is unreachable: {reason}")
        )

    # -- data of its own --------------------------------------------------------------------
    def publish(
        self, name: str, value: Any, *, releases: Iterable[Release] = (), dataset: str | None = None
    ) -> int:
        """Hold ``value`` as this worker's own object called ``name``.

        Peers can compute on it (and read its shape) through a pointer, but can neither fetch,
        move, change nor delete it, and nothing derived from it leaves this worker except
        through ``releases`` (say :class:`~actors.policy.ModelUpdates` for federated training;
        :class:`~actors.policy.Public` for data that is not private). Releases are declared
        per dataset: ``dataset`` (default: ``name`` up to its first ``/``) names it, so
        ``boston/x`` and ``boston/y`` share one declaration.
        """
        releases = tuple(releases)
        source = f"{self.id}/{dataset or name.partition('/')[0]}"
        declared = self.policy.releases.get(source)
        if declared is not None and declared != releases:
            raise ValueError(f"{source} was published with other releases: {declared}")
        self.policy.declare(source, releases)
        self.store.public = self.policy.public()
        obj_id = published_id(name)
        public = any(isinstance(r, Public) and r.to is None for r in releases)
        label = frozenset() if public else frozenset({Taint(source, "raw")})
        self.store.put(obj_id, value, self.id, label)
        return obj_id

    # -- the per-message path ---------------------------------------------------------------
    def decode(self, session: Session, frame: Buffer) -> Any:
        try:
            return self.codec.decode(frame)
        except ProtocolError as exc:
            self.report_bad_frame(session, exc)
            return iter(())

    def report_bad_frame(self, session: Session, exc: ProtocolError) -> None:
        self.log.warning("bad frame", sender=session.identity, msg_id=exc.msg_id, error=str(exc))
        session.error(exc.msg_id or 0, WireError.from_exception(exc))

    def watch(self, arrival: Arrival) -> None:
        """Expire ``arrival`` at its deadline unless it comes first. Deadlines are set in order
        with one timeout, so one timer for the oldest serves them all."""
        self._deadlines[arrival] = arrival.deadline
        if self._watchdog is None:
            self._watchdog = asyncio.get_running_loop().call_at(arrival.deadline, self._expire_waits)

    def unwatch(self, arrival: Arrival) -> None:
        """It came: forget its deadline now, not when the watchdog next looks (a walk announces
        an object per step; kept for the whole timeout they pile up in the collector's way)."""
        self._deadlines.pop(arrival, None)

    def _expire_waits(self) -> None:
        self._watchdog = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        for arrival, deadline in list(self._deadlines.items()):
            if arrival.done:
                del self._deadlines[arrival]
                continue
            if deadline > now:
                self._watchdog = loop.call_at(deadline, self._expire_waits)
                return
            del self._deadlines[arrival]
            self.dispatch.expire(arrival)

    def note_waiting(self) -> None:
        """A message was parked. With :attr:`spin` set, the loop keeps polling for up to that
        long before it sleeps: what it waits for is usually moments away (a peer finishing the
        step that sends it), and a process that sleeps between steps wakes on a cold core
        (measured on a 2-core VM: a walk step ran in 185 us after a sleep, 101 us on a core
        that stayed busy)."""
        if self.spin > 0:
            loop = asyncio.get_running_loop()
            self._spin_until = loop.time() + self.spin
            if not self._spinning:
                self._spinning = True
                loop.call_soon(self._keep_polling)

    def _keep_polling(self) -> None:
        """While something is parked and the spin lasts, stay in the ready queue: the loop then
        polls its sockets without blocking."""
        loop = asyncio.get_running_loop()
        if self.dispatch.tails and loop.time() < self._spin_until:
            loop.call_soon(self._keep_polling)
        else:
            self._spinning = False
