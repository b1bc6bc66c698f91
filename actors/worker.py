"""The worker actor: a store of objects and one ordered mailbox per connected sender.

Each sender (the leader, or a peer worker) gets a :class:`Session`: a bounded mailbox and a task
that executes that sender's messages one at a time, in the order sent. That order is what makes
pipelining safe (a command naming the result of the previous one always finds it). Handlers are
synchronous and never wait for a remote reply; the one thing a session may wait for is an object
that was announced (EXPECT) and is still travelling from a peer, and then only that sender's
queue waits, so the peer's own session keeps running and delivers it.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from actors.connection import Connection
from actors.log import get_logger, tracing
from actors.store import Awaiting, Failure, ObjectStore
from actors.transport import FlowControl, dial
from protocol import (
    DEFAULT_MAX_FRAME,
    PROTOCOL_VERSION,
    RANDOM_ID_LIMIT,
    BadArguments,
    Codec,
    Command,
    Delete,
    Error,
    Expect,
    Forward,
    Get,
    GetMode,
    MalformedMessage,
    ObjectNotFound,
    ObjRef,
    PermissionDenied,
    Ping,
    ProtocolError,
    Reply,
    Store,
    SyftError,
    WireError,
    WorkerLost,
    published_id,
)
from protocol.allowlist import COMMANDS, JOBS, lookup
from protocol.codec import Buffer

#: Default mailbox bound per sender: enough to keep a pipeline full, small enough to bound memory.
MAILBOX_SIZE = 1024


class _DependencyFailed(Exception):
    def __init__(self, failure: Failure) -> None:
        self.failure = failure


class Session:
    """One sender's ordered mailbox on a worker, and the task that drains it."""

    def __init__(
        self, worker: Worker, peer_id: str, send: Callable[[Buffer], None], mailbox_size: int
    ) -> None:
        self.worker = worker
        self.peer_id = peer_id
        self._send = send
        #: Called once when the session closes (the transport tells its client the worker is gone).
        self.on_close: Callable[[], None] | None = None
        #: The reply direction's backpressure; the session stops reading while it is paused.
        self.flow: FlowControl | None = None
        self.mailbox: asyncio.Queue[Buffer] = asyncio.Queue(mailbox_size)
        self.task = asyncio.get_running_loop().create_task(
            self._run(), name=f"aiosyft:{worker.id}<-{peer_id}"
        )

    async def _run(self) -> None:
        worker = self.worker
        mailbox = self.mailbox
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
                    trace("message", msg_id=message.msg_id, kind=type(message).__name__, sender=self.peer_id)
                while True:
                    try:
                        if type(message) is Command:  # most messages: skip the generic dispatch
                            worker._on_command(self, message)
                        else:
                            worker.dispatch(self, message)
                        break
                    except Awaiting as awaiting:
                        await worker.wait_for_arrival(awaiting, message.sender)
                    except Exception as exc:  # a bad message costs its sender an error, never the worker
                        worker.report_failure(self, message, exc)
                        break
            if self.flow is not None and self.flow.paused:
                try:
                    await self.flow.wait()
                except SyftError:  # the link is gone; its transport closes this session
                    return

    def send(self, frame: Buffer) -> None:
        """Hand a frame back to the sender; a link that is already gone only costs a log line
        (its transport closes this session), never the session itself."""
        try:
            self._send(frame)
        except (SyftError, OSError) as exc:
            self.worker.log.info("reply dropped: the link is gone", sender=self.peer_id, error=str(exc))

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
        self.task.cancel()
        self.worker.sessions.discard(self)
        on_close, self.on_close = self.on_close, None
        if on_close is not None:
            on_close()


class Worker:
    """An actor that owns objects and runs allowlisted commands on them for its senders."""

    def __init__(
        self,
        worker_id: str,
        *,
        address: str | None = None,
        mailbox_size: int = MAILBOX_SIZE,
        expect_timeout: float = 60.0,
        max_frame_size: int = DEFAULT_MAX_FRAME,
        token: str | None = None,
        spin: float = 0.0,
    ) -> None:
        self.id = worker_id
        #: Seconds to keep polling, rather than sleeping, while a session waits for an announced
        #: object (0: sleep at once). See :meth:`wait_for_arrival`.
        self.spin = spin
        self._spin_until = 0.0
        self._spinning = False
        #: The cluster's shared secret: required of whoever connects, presented to peers.
        self.token = token
        self.address = address or f"virtual://{worker_id}"
        self.mailbox_size = mailbox_size
        self.expect_timeout = expect_timeout
        self.store = ObjectStore()
        self.codec = Codec(max_frame_size)
        self.sessions: set[Session] = set()
        self.peers: dict[str, Connection] = {}
        self._jobs: set[int] = set()
        #: Sessions waiting for announced objects, with their deadlines (oldest first).
        self._deadlines: dict[asyncio.Future[bool], float] = {}
        self._watchdog: asyncio.TimerHandle | None = None
        self.started = time.monotonic()
        self.log = get_logger(worker=worker_id)
        self._msg_ids = iter(range(1, 1 << 62)).__next__
        self._handlers: dict[type, Callable[[Session, Any], None]] = {
            Command: self._on_command,
            Store: self._on_store,
            Get: self._on_get,
            Delete: self._on_delete,
            Forward: self._on_forward,
            Expect: self._on_expect,
            Ping: self._on_ping,
        }

    def __repr__(self) -> str:
        return f"<Worker {self.id} objects={len(self.store)}>"

    def next_msg_id(self) -> int:
        return self._msg_ids()

    # -- lifecycle --------------------------------------------------------------------------
    def open_session(self, peer_id: str, send: Callable[[Buffer], None]) -> Session:
        """A new mailbox for sender ``peer_id``; ``send`` carries replies back to it."""
        session = Session(self, peer_id, send, self.mailbox_size)
        self.sessions.add(session)
        return session

    async def on_start(self) -> None:
        """Hook: runs before the worker serves (warm-up, loading data)."""

    async def on_stop(self) -> None:
        """Hook: runs when the worker stops."""

    async def close(self) -> None:
        await self.on_stop()
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        sessions = list(self.sessions)
        for session in sessions:
            session.close()
        await asyncio.gather(*(s.task for s in sessions), return_exceptions=True)
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
        connection = self.peers.get(address)
        if connection is None or connection.lost is not None:
            connection = Connection(
                self.id, peer_id, dial(address, self.id, token=self.token), Codec(self.codec.max_frame_size)
            )
            self.peers[address] = connection
        return connection

    # -- the per-message path ---------------------------------------------------------------
    def decode(self, session: Session, frame: Buffer) -> Iterator[Any]:
        try:
            return self.codec.decode(frame)
        except ProtocolError as exc:
            self.report_bad_frame(session, exc)
            return iter(())

    def report_bad_frame(self, session: Session, exc: ProtocolError) -> None:
        self.log.warning("bad frame", sender=session.peer_id, msg_id=exc.msg_id, error=str(exc))
        session.error(exc.msg_id or 0, WireError.from_exception(exc))

    def dispatch(self, session: Session, message: Any) -> None:
        handler = self._handlers.get(type(message))
        try:
            if handler is None:
                if isinstance(message, ProtocolError):
                    raise message
                raise MalformedMessage(f"a worker does not accept {type(message).__name__} messages")
            handler(session, message)
        except Awaiting:
            raise
        except Exception as exc:  # a bad message costs its sender an error, never the worker
            self.report_failure(session, message, exc)

    def report_failure(self, session: Session, message: Any, exc: Exception) -> None:
        msg_id = exc.msg_id if exc is message else message.msg_id  # type: ignore[attr-defined]
        self.log.warning("message failed", sender=session.peer_id, msg_id=msg_id, error=repr(exc))
        session.error(msg_id or 0, WireError.from_exception(exc))

    async def wait_for_arrival(self, awaiting: Awaiting, owner: str) -> None:
        """Wait (bounded) for an announced object; if it never comes, it becomes a failure.

        The store resolves this session's own future when the object comes; otherwise the
        worker's one watchdog resolves it at its deadline. A walking model waits here once per
        step: a timer per wait (or ``wait_for`` and its task) cost more than the rest of the wait.

        With :attr:`spin` set, the loop keeps polling for up to that long before it sleeps. An
        announced object is usually moments away (a peer is finishing the step that sends it),
        and a process that sleeps between steps wakes on a cold core: measured on a 2-core VM,
        a walk step ran in 185 us after a sleep and in 101 us on a core that stayed busy.
        """
        waiter = self.store.wait(awaiting.obj_id)
        if waiter is None:  # it came (or was dropped) meanwhile: the retry tells which
            return
        bounded = awaiting.obj_id not in self._jobs  # a job's result takes as long as it takes
        if bounded:
            loop = asyncio.get_running_loop()
            now = loop.time()
            deadline = now + self.expect_timeout
            self._deadlines[waiter] = deadline
            if self._watchdog is None:
                self._watchdog = loop.call_at(deadline, self._expire_waits)
            if self.spin > 0:
                self._spin_until = now + self.spin
                if not self._spinning:
                    self._spinning = True
                    loop.call_soon(self._keep_polling)
        try:
            came = await waiter
        finally:
            if bounded:
                self._deadlines.pop(waiter, None)
        if not came:
            error = WorkerLost(
                f"object {awaiting.obj_id:#x} was announced but did not arrive within "
                f"{self.expect_timeout:g} s"
            )
            self.store.put(awaiting.obj_id, Failure(WireError.from_exception(error, awaiting.obj_id)), owner)
        # If the announced object was deleted before it came, the retry reports it missing.

    def _keep_polling(self) -> None:
        """While a wait is on and the spin lasts, stay in the ready queue: the loop then polls
        its sockets without blocking."""
        loop = asyncio.get_running_loop()
        if self._deadlines and loop.time() < self._spin_until:
            loop.call_soon(self._keep_polling)
        else:
            self._spinning = False

    def _expire_waits(self) -> None:
        """Give up the waits whose deadline passed; sleep until the next one. Deadlines are
        set in order with one timeout, so the oldest comes first."""
        self._watchdog = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        for waiter, deadline in list(self._deadlines.items()):
            if deadline > now:
                self._watchdog = loop.call_at(deadline, self._expire_waits)
                return
            del self._deadlines[waiter]
            _give_up(waiter)

    def _on_command(self, session: Session, message: Command) -> None:
        # The hot path of every pointer operation: checks are inlined, not called.
        _, sender, result_id, op, args, kwargs = message
        store = self.store
        if type(result_id) is not int:
            raise MalformedMessage("a command's result id must be an integer")
        if result_id > RANDOM_ID_LIMIT or store.owners.get(result_id, sender) != sender:
            self._check_may_write(result_id, sender)
        try:
            fn = COMMANDS.get(op) if type(op) is str else None
            if fn is None:
                fn = lookup(op)  # raises CommandNotAllowed naming it
            if type(args) is not list:
                raise BadArguments(f"{op}: arguments must be a list")
            objects = store.objects
            for i, arg in enumerate(args):
                if type(arg) is ObjRef and type(value := objects.get(arg.id, _MISSING)) is not Failure:
                    if value is _MISSING:
                        raise store.missing(arg.id)
                    args[i] = value
                elif type(arg) in _CONTAINERS or type(arg) is ObjRef:
                    self._resolve(args)
                    break
            if kwargs:
                if type(kwargs) is not dict:
                    raise BadArguments(f"{op}: keyword arguments must be a map")
                for value in kwargs.values():  # options are mostly plain values: resolve only refs
                    if type(value) is ObjRef or type(value) in _CONTAINERS:
                        self._resolve_values(kwargs)
                        break
            if op in JOBS:
                self._start_job(session, message, functools.partial(fn, *args, **(kwargs or {})))
                return
            result = fn(*args, **kwargs) if kwargs else fn(*args)
        except Awaiting:
            raise
        except _DependencyFailed as dependency:
            result = dependency.failure
        except Exception as exc:
            result = Failure(WireError.from_exception(exc, result_id))
            session.error(0, result.error)
        if store.arrivals:
            store.put(result_id, result, sender)
        else:
            store.objects[result_id] = result
            store.owners[result_id] = sender

    def _start_job(self, session: Session, message: Command, job: Callable[[], Any]) -> None:
        """Run a job in a thread; its result id is announced until it is done, so commands that
        use it wait for it, while everything else (other senders, pings) is served meanwhile."""
        result_id = message.result_id
        self.store.expect(result_id)
        self._jobs.add(result_id)
        self.log.info("job started", sender=session.peer_id, msg_id=message.msg_id, op=message.op)

        def done(future: asyncio.Future[Any]) -> None:
            self._jobs.discard(result_id)
            if future.cancelled():
                return
            exc = future.exception()
            if exc is None:
                result = future.result()
            else:
                result = Failure(WireError.from_exception(exc, result_id))
                session.error(0, result.error)
            self.store.put(result_id, result, message.sender)
            self.log.info("job done", sender=session.peer_id, msg_id=message.msg_id, failed=exc is not None)

        asyncio.get_running_loop().run_in_executor(None, job).add_done_callback(done)

    def _resolve(self, args: list[Any]) -> None:
        """Replace object references by the objects, in place (the list was just decoded)."""
        objects = self.store.objects
        for i, arg in enumerate(args):
            kind = type(arg)
            if kind is ObjRef:
                value = objects.get(arg.id, _MISSING)
                if value is _MISSING:
                    raise self.store.missing(arg.id)
                if type(value) is Failure:
                    raise _DependencyFailed(value)
                args[i] = value
            elif kind is list:
                self._resolve(arg)
            elif kind is tuple:
                items = list(arg)
                self._resolve(items)
                args[i] = tuple(items)
            elif kind is dict:
                self._resolve_values(arg)

    def _resolve_values(self, mapping: dict[Any, Any]) -> None:
        keys = list(mapping)
        values = [mapping[k] for k in keys]
        self._resolve(values)
        mapping.update(zip(keys, values, strict=True))

    def _lookup(self, obj_id: Any) -> Any:
        if type(obj_id) is not int:
            raise MalformedMessage(f"object ids are integers, got {type(obj_id).__name__}")
        return self.store.get(obj_id)

    def _check_may_write(self, obj_id: int, sender: str) -> None:
        """Only the worker publishes under published ids, and nobody replaces another's object."""
        if obj_id > RANDOM_ID_LIMIT:
            raise PermissionDenied(f"object id {obj_id:#x} is reserved for {self.id}'s own data")
        owner = self.store.owners.get(obj_id)
        if owner is not None and owner != sender:
            raise PermissionDenied(f"object {obj_id:#x} belongs to {owner}; {sender} cannot replace it")

    def _on_store(self, session: Session, message: Store) -> None:
        if type(message.obj_id) is not int:
            raise MalformedMessage("STORE needs an integer object id")
        owner = message.owner if type(message.owner) is str else message.sender
        if owner == self.id:
            raise PermissionDenied(f"only {self.id} itself can make an object its own data")
        self._check_may_write(message.obj_id, owner)
        obj = message.obj
        if type(obj) is WireError:
            obj = Failure(obj)
        self.store.put(message.obj_id, obj, owner)

    def _on_get(self, session: Session, message: Get) -> None:
        try:
            value = self._lookup(message.obj_id)
        except ObjectNotFound as exc:
            session.error(message.msg_id, WireError.from_exception(exc))
            return
        mode = message.mode
        if type(value) is Failure:
            session.error(message.msg_id, value.error)
        elif mode == GetMode.META:
            session.reply(message.msg_id, describe(value))
        elif mode in (GetMode.COPY, GetMode.RELEASE):
            self._check_may_leave(message.obj_id)
            session.reply(message.msg_id, value)
        else:
            raise MalformedMessage(f"unknown GET mode {mode!r}")
        if mode == GetMode.RELEASE:
            self.store.delete((message.obj_id,), message.sender)

    def _check_may_leave(self, obj_id: int) -> None:
        """The worker's own objects (its data) are computed on where they are; they never leave."""
        if self.store.owners.get(obj_id) == self.id:
            raise PermissionDenied(f"object {obj_id:#x} is {self.id}'s own data; it does not leave {self.id}")

    def _on_delete(self, session: Session, message: Delete) -> None:
        if type(message.obj_ids) is not list:
            raise MalformedMessage("DELETE needs a list of object ids")
        self.store.delete(message.obj_ids, message.sender)

    def _on_forward(self, session: Session, message: Forward) -> None:
        obj_ids, new_ids = message.obj_ids, message.new_ids
        if type(obj_ids) is not list or type(new_ids) is not list or len(obj_ids) != len(new_ids):
            raise MalformedMessage("FORWARD needs two lists of object ids of the same length")
        peer = self.peer(message.dest_id, message.dest_address)
        stores = []
        for obj_id, new_id in zip(obj_ids, new_ids, strict=True):
            owner = self.store.owners.get(obj_id, message.sender)
            try:
                value = self._lookup(obj_id)
                self._check_may_leave(obj_id)
            except (ObjectNotFound, PermissionDenied) as exc:
                value = Failure(WireError.from_exception(exc, obj_id))
                owner = message.sender
                session.error(message.msg_id, value.error)
            payload = value.error if type(value) is Failure else value
            stores.append(Store(peer.next_id(), self.id, new_id, payload, owner))
        try:
            peer.tell_all(stores)  # a whole model crosses in one frame
        except Exception:  # some value cannot travel: send each alone, failures as failures
            for store in stores:
                try:
                    peer.tell(store)
                except Exception as exc:
                    error = WireError.from_exception(exc, store.obj_id)
                    peer.tell(store._replace(obj=error))
        if message.release:
            self.store.delete(obj_ids, message.sender)

    def publish(self, name: str, value: Any) -> int:
        """Hold ``value`` as this worker's own object called ``name``: peers can compute on it
        (and read its shape) through a pointer, but can neither fetch, move nor delete it."""
        obj_id = published_id(name)
        self.store.put(obj_id, value, self.id)
        return obj_id

    def _on_expect(self, session: Session, message: Expect) -> None:
        if type(message.obj_ids) is not list or not all(type(i) is int for i in message.obj_ids):
            raise MalformedMessage("EXPECT needs a list of integer object ids")
        for obj_id in message.obj_ids:
            self.store.expect(obj_id)

    def _on_ping(self, session: Session, message: Ping) -> None:
        session.reply(message.msg_id, self.status())


_MISSING: Any = object()
_CONTAINERS = (list, tuple, dict)


def _give_up(waiter: asyncio.Future[bool]) -> None:
    if not waiter.done():
        waiter.set_result(False)


def describe(value: Any) -> dict[str, Any]:
    """What a pointer learns when it resolves: the type and, for tensors, shape and dtype."""
    if isinstance(value, torch.Tensor):
        return {
            "type": "Tensor",
            "shape": tuple(value.shape),
            "dtype": value.dtype,
            "requires_grad": value.requires_grad,
        }
    return {"type": type(value).__name__}
