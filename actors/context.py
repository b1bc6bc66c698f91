"""What a registered command sees of the worker running it.

A command is a function of ``(ctx, *args)``. ``ctx`` says who called (the identity the
connection authenticated, never a field of the message), and gives the store, the policy, the
logger, per-extension state (a privacy ledger, a provider's material) and, in a flow, the
parties of the run. Values a flow sends to a party pass the same policy as a FORWARD: a flow
cannot carry out what a pointer could not.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from actors.policy import EMPTY, Label, label_to_wire
from protocol import PermissionDenied, WorkerLost

#: Seconds a flow waits for one message from a party before counting it lost (a party that
#: died before it ever connected here has no link whose loss would say so sooner).
RECV_TIMEOUT = 120.0

if TYPE_CHECKING:
    import structlog

    from actors.connection import Connection
    from actors.policy import Policy
    from actors.store import ObjectStore
    from actors.worker import Worker


class Context:
    """One command's view of its worker (see the module docstring)."""

    __slots__ = ("worker", "caller", "msg_id", "result_id", "label", "flow_id", "parties")

    def __init__(
        self,
        worker: Worker,
        caller: str,
        msg_id: int,
        result_id: int,
        *,
        label: Label = EMPTY,
        flow_id: int | None = None,
        parties: dict[str, str] | None = None,
    ) -> None:
        self.worker = worker
        self.caller = caller
        self.msg_id = msg_id
        self.result_id = result_id
        #: The label of everything this command has read so far: its arguments, then whatever
        #: it received. Its result carries it (unless the command's label rule declassifies).
        self.label = label
        self.flow_id = flow_id
        self.parties = parties or {}

    @property
    def me(self) -> str:
        return self.worker.id

    @property
    def store(self) -> ObjectStore:
        return self.worker.store

    @property
    def policy(self) -> Policy:
        return self.worker.policy

    @property
    def log(self) -> structlog.stdlib.BoundLogger:
        return self.worker.log.bind(msg_id=self.msg_id, caller=self.caller)

    @property
    def state(self) -> dict[str, Any]:
        """Per-worker state of the extensions (keyed by their own names), kept across commands."""
        return self.worker.state

    def taint(self, label: Label) -> None:
        """Add to what this command's result is computed from."""
        if label:
            self.label = self.label | label

    # -- flows ------------------------------------------------------------------------------
    def peer(self, party: str) -> Connection:
        address = self.parties.get(party)
        if address is None:
            raise PermissionDenied(
                f"{party} is not a party of this flow (parties: {', '.join(self.parties)})"
            )
        return self.worker.peer(party, address)

    def send(self, party: str, tag: str, value: Any, label: Label | None = None) -> None:
        """Send ``value`` to ``party`` under ``tag``; nothing is awaited.

        ``label`` is what the value was computed from (default: everything this flow has read),
        and the policy decides, as for a FORWARD, whether it may go to ``party``. What the
        worker's flows send one party in one turn of its event loop leaves as one message
        (:meth:`~actors.flows.FlowRouter.post`): do not change ``value`` after sending it.
        """
        if self.flow_id is None:
            raise RuntimeError("send() is for flows: this command was not started as one")
        if tag.startswith("!"):
            raise ValueError(f"flow tags starting with '!' are the runtime's, not {tag!r}")
        label = self.label if label is None else label
        carried = self.worker.policy.check_leave(self.result_id, label, self.caller, party)
        self.worker.flows.post(self.peer(party), self.flow_id, tag, value, label_to_wire(carried))

    async def recv(self, party: str, tag: str) -> Any:
        """The value ``party`` sent under ``tag`` in this run; its label joins this flow's."""
        if self.flow_id is None:
            raise RuntimeError("recv() is for flows: this command was not started as one")
        if party not in self.parties:
            raise PermissionDenied(
                f"{party} is not a party of this flow (parties: {', '.join(self.parties)})"
            )
        peer = self.peer(party)
        if peer.lost is not None:  # our own link to it is down: it will not answer
            raise WorkerLost(f"{party}, a party of this run, is unreachable: {peer.lost}")
        try:
            async with asyncio.timeout(RECV_TIMEOUT):
                value, label = await self.worker.flows.receive(self.flow_id, party, tag)
        except TimeoutError:
            raise WorkerLost(f"{party}, a party of this run, sent nothing for {RECV_TIMEOUT:g} s") from None
        self.taint(label)
        return value
