"""Flows: protocols that run between workers as straight-line async code.

A flow is a registered command of kind ``"flow"``. Each party runs its own instance as a task
owned by its worker; instances of one protocol run share a ``flow_id`` and reach each other
through their :class:`~actors.context.Context`: ``ctx.send(party, tag, value)`` and
``await ctx.recv(party, tag)``. Messages go worker to worker (FLOW), never through the leader,
and a message is delivered only to the flow it names, as coming from the identity its connection
authenticated. A message that arrives before its flow has asked for it waits in a bounded buffer.

The leader starts a run with :func:`start_flow`, which sends every party its command at once and
returns their result pointers without waiting.
"""

from __future__ import annotations

import asyncio
import collections
import copy
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from actors.log import get_logger
from actors.pointer import PointerTensor, call, new_object_id
from actors.policy import Label
from protocol import Flow, FlowAborted, MalformedMessage, SyftError

if TYPE_CHECKING:
    from actors.connection import Connection
    from actors.remote import RemoteWorker

#: The keyword that carries a run's id and parties; a flow never sees it as an argument.
FLOW_OPTION = "flow"
#: Messages kept for flows that have not asked for them yet, per sending identity: one that
#: sends many cannot crowd out the others'.
EARLY_LIMIT = 65536
#: The tag a failed party's worker tells the others with (flows' own tags may not start with "!").
ABORT = "!abort"
#: The tag of one message carrying several flows' messages: ``[[flow_id, tag, value, label]...]``.
BATCH = "!batch"
#: Runs remembered as aborted (oldest forgotten first): a message may still be on its way.
ABORTED_LIMIT = 4096

_Key = tuple[int, str, str]


class FlowRouter:
    """A worker's mailboxes for flow messages, by (flow id, sending party, tag)."""

    def __init__(self, worker_id: str, limit: int = EARLY_LIMIT) -> None:
        self.limit = limit
        self._waiting: dict[_Key, asyncio.Future[tuple[Any, Label]]] = {}
        self._early: dict[_Key, collections.deque[tuple[Any, Label]]] = {}
        self._early_counts: collections.Counter[str] = collections.Counter()
        #: Each run's parties, while it runs here: only they may abort it.
        self._runs: dict[int, frozenset[str]] = {}
        #: Aborts for runs not started here yet: kept (boundedly) until the run says who its parties are.
        self._pending_aborts: dict[int, list[tuple[str, str]]] = {}
        #: Runs a party gave up on: flow id -> the error their receives get.
        self._aborted: dict[int, SyftError] = {}
        self.worker_id = worker_id
        #: What this worker's flows sent each peer in this turn of the loop, not yet gone.
        self._outbox: dict[Connection, list[list[Any]]] = {}
        self.log = get_logger(worker=worker_id)

    def post(self, connection: Connection, flow_id: int, tag: str, value: Any, label: Any) -> None:
        """Send a flow message to the peer behind ``connection`` at the end of this turn, with
        everything else the worker's flows send it meanwhile: products issued together open in
        one message per pair of parties, not one each."""
        entries = self._outbox.get(connection)
        if entries is None:
            entries = self._outbox[connection] = []
            asyncio.get_running_loop().call_soon(self._flush, connection)
        entries.append([flow_id, tag, value, label])

    def _flush(self, connection: Connection) -> None:
        entries = self._outbox.pop(connection, [])
        try:
            if len(entries) == 1:
                flow_id, tag, value, label = entries[0]
                connection.tell(Flow(connection.next_id(), self.worker_id, flow_id, tag, value, label))
            elif entries:
                connection.tell(Flow(connection.next_id(), self.worker_id, 0, BATCH, entries, None))
        except SyftError as exc:  # the link is gone: the flows waiting on that party hear of it
            self.log.info("flow messages not sent", peer=connection.remote_id, error=str(exc))

    def deliver(self, sender: str, flow_id: int, tag: str, value: Any, label: Label) -> None:
        if tag.startswith("!") and tag not in (ABORT,):
            raise MalformedMessage(f"flow tag {tag!r} is reserved")
        if tag == ABORT:
            reason = value if isinstance(value, str) else "failed"
            if flow_id in self._runs:
                self.abort(flow_id, FlowAborted(f"{sender}, a party of this run, {reason[:200]}"))
            else:  # who may abort it is known once the run starts here
                self._pending_aborts.setdefault(flow_id, []).append((sender, reason[:200]))
                while len(self._pending_aborts) > ABORTED_LIMIT:
                    del self._pending_aborts[next(iter(self._pending_aborts))]
            return
        key = (flow_id, sender, tag)
        waiter = self._waiting.pop(key, None)
        if waiter is not None and not waiter.done():
            waiter.set_result((value, label))
            return
        if self._early_counts[sender] >= self.limit:
            self.log.warning(
                "flow message dropped: too many waiting", sender=sender, flow_id=flow_id, tag=tag
            )
            return
        self._early.setdefault(key, collections.deque()).append((value, label))
        self._early_counts[sender] += 1

    def receive(self, flow_id: int, party: str, tag: str) -> asyncio.Future[tuple[Any, Label]]:
        key = (flow_id, party, tag)
        future: asyncio.Future[tuple[Any, Label]] = asyncio.get_running_loop().create_future()
        early = self._early.get(key)
        if early:
            future.set_result(early.popleft())
            self._early_counts[party] -= 1
            if not early:
                del self._early[key]
            return future
        aborted = self._aborted.get(flow_id)
        if aborted is not None:
            future.set_exception(copy.copy(aborted))  # a copy each: raising one would keep its raisers
            return future
        if key in self._waiting:
            raise RuntimeError(f"flow {flow_id:#x} already waits for {tag!r} from {party}")
        self._waiting[key] = future
        return future

    def started(self, flow_id: int, parties: Iterable[str]) -> None:
        """Run ``flow_id`` starts here with ``parties``: aborts that came first count now, if a
        party sent them."""
        members = self._runs[flow_id] = frozenset(parties)
        for sender, reason in self._pending_aborts.pop(flow_id, ()):
            if sender in members:
                self.abort(flow_id, FlowAborted(f"{sender}, a party of this run, {reason}"))
                break

    def may_abort(self, flow_id: int, sender: str) -> bool:
        """Whether ``sender`` may abort run ``flow_id``: a party of it (or, before the run starts
        here, anyone: the abort waits until the run names its parties)."""
        parties = self._runs.get(flow_id)
        return parties is None or sender in parties

    def abort(self, flow_id: int, error: SyftError) -> None:
        """Another party of run ``flow_id`` gave up: what this worker's part waits for, and
        will wait for, fails with ``error`` (messages already here are still delivered)."""
        self._aborted[flow_id] = error
        while len(self._aborted) > ABORTED_LIMIT:
            del self._aborted[next(iter(self._aborted))]
        for key in [k for k in self._waiting if k[0] == flow_id]:
            waiter = self._waiting.pop(key)
            if not waiter.done():
                waiter.set_exception(copy.copy(error))

    def party_lost(self, party: str, error: SyftError) -> None:
        """``party`` left (its last link closed): every run waiting on it fails now."""
        for flow_id in {k[0] for k in self._waiting if k[1] == party}:
            self.abort(flow_id, error)

    def forget(self, flow_id: int) -> None:
        """A run ended on this worker: drop what it left (messages nobody will ask for)."""
        self._runs.pop(flow_id, None)
        self._pending_aborts.pop(flow_id, None)
        for key in [k for k in self._early if k[0] == flow_id]:
            self._early_counts[key[1]] -= len(self._early.pop(key))
        for key in [k for k in self._waiting if k[0] == flow_id]:
            self._waiting.pop(key).cancel()

    def forget_sender(self, identity: str) -> None:
        """``identity`` is gone for good (its grace period is over): what it sent for runs that
        never asked is let go, and its pending aborts with it."""
        for key in [k for k in self._early if k[1] == identity]:
            del self._early[key]
        self._early_counts.pop(identity, None)
        for flow_id in list(self._pending_aborts):
            kept = [entry for entry in self._pending_aborts[flow_id] if entry[0] != identity]
            if kept:
                self._pending_aborts[flow_id] = kept
            else:
                del self._pending_aborts[flow_id]


def start_flow(
    op: str,
    calls: dict[RemoteWorker, tuple[list[Any], dict[str, Any] | None]],
    *,
    flow_id: int | None = None,
    ops: dict[RemoteWorker, str] | None = None,
) -> dict[RemoteWorker, PointerTensor]:
    """Start one run of flow ``op``: each worker gets ``op(*args, **kwargs)`` with the run's id
    and every party's address. Returns each party's result pointer at once. ``ops`` gives some
    parties another flow of the same run (a crypto provider runs its half of a protocol as a
    command of its own set, which the other parties do not serve)."""
    run = new_object_id() if flow_id is None else flow_id
    parties = {worker.id: worker.address for worker in calls}
    results = {}
    for worker, (args, kwargs) in calls.items():
        options = {**(kwargs or {}), FLOW_OPTION: [run, parties]}
        results[worker] = call(worker, (ops or {}).get(worker, op), list(args), options)
    return results
