"""The messages workers exchange: a small, versioned, documented set.

Every message starts with its id (unique per sender and connection) and its sender's worker id.
On the wire a message is a msgpack array ``[kind, *fields]``; in memory it is the NamedTuple
below, so it is cheap to build on the per-operation hot path and needs no schema library.

Object ids are chosen by whoever creates the object (random 63-bit integers), which is what lets
a leader pipeline ``y = x + 1; z = y * 2`` without waiting for any reply: both commands name their
result ids up front. Replies name the id of the message they answer.

Objects a worker holds on its own behalf (its data, published under a name) have ids derived
from the name (:func:`published_id`), in a range random ids never take, so a leader can point at
a worker's dataset without asking for it.

Who sent a message is the identity its connection authenticated, never what the message says:
the ``sender`` field must equal that identity or the message is refused, and a field naming
another identity (a STORE's ``owner``) is believed only where that identity announced it.

Version history:
    1 - STORE, COMMAND, GET, DELETE, FORWARD, EXPECT, PING, REPLY, ERROR.
    2 - STORE carries the object's label; FLOW carries a protocol's messages between parties;
        EXPECT names the worker the objects come from.
"""

from __future__ import annotations

import hashlib
from enum import IntEnum
from typing import Any, NamedTuple

PROTOCOL_VERSION = 2

#: Random object ids lie in [1, 2**62]; published ones in (2**62, 2**63).
RANDOM_ID_LIMIT = 1 << 62


def published_id(name: str) -> int:
    """The object id under which a worker publishes its own object called ``name``."""
    digest = hashlib.blake2b(name.encode(), digest_size=8).digest()
    return RANDOM_ID_LIMIT + 1 + int.from_bytes(digest, "big") % (RANDOM_ID_LIMIT - 1)


class Kind(IntEnum):
    STORE = 1
    COMMAND = 2
    GET = 3
    DELETE = 4
    FORWARD = 5
    EXPECT = 6
    PING = 7
    REPLY = 8
    ERROR = 9
    FLOW = 10


class GetMode(IntEnum):
    """What a GET asks for."""

    META = 0  #: wait until the object exists; reply with its type, shape and dtype only
    COPY = 1  #: reply with a copy of the value; the worker keeps it
    RELEASE = 2  #: reply with the value and drop it from the worker's store


class Store(NamedTuple):
    """Store ``obj`` under ``obj_id``. ``owner`` is who controls it (``None``: the sender); a
    worker forwarding an object names the identity that asked for the move, which the receiver
    believes only for ids that identity announced (EXPECT) from this sender. ``label`` lists the
    object's taints as ``[source, form, audience]`` triples (see :mod:`actors.policy`)."""

    msg_id: int
    sender: str
    obj_id: int
    obj: Any
    owner: str | None = None
    label: list[Any] | None = None


class Command(NamedTuple):
    """Run the allowlisted operation ``op`` on ``args``/``kwargs`` and store the result.

    Remote objects appear in ``args`` as object references. There is no reply on success: the
    sender learns of the result by a later GET, and of a failure by an unsolicited ERROR whose
    ``failed_id`` is ``result_id``.
    """

    msg_id: int
    sender: str
    result_id: int
    op: str
    args: list[Any]
    kwargs: dict[str, Any] | None = None


class Get(NamedTuple):
    """Ask for an object (see :class:`GetMode`); answered by a REPLY or an ERROR."""

    msg_id: int
    sender: str
    obj_id: int
    mode: int = GetMode.COPY


class Delete(NamedTuple):
    """Drop objects; ids that are already gone are ignored. Sent in batches, never answered."""

    msg_id: int
    sender: str
    obj_ids: list[int]


class Forward(NamedTuple):
    """Send objects ``obj_ids`` straight to another worker as ``new_ids`` (the leader never
    relays their data).

    ``dest_address`` is how to reach the destination (``virtual://alice``, ``ws://host:port``);
    with ``release`` the objects leave this worker, which is a move rather than a copy. A whole
    model moves in one FORWARD.
    """

    msg_id: int
    sender: str
    obj_ids: list[int]
    dest_id: str
    dest_address: str
    new_ids: list[int]
    release: bool = True


class Expect(NamedTuple):
    """Announce that ``obj_ids`` will arrive from worker ``source``, owned by the sender.

    Commands that use one of them wait for it (only those: everything else keeps flowing),
    instead of failing with a missing object. Only ``source`` may deliver them.
    """

    msg_id: int
    sender: str
    obj_ids: list[int]
    source: str


class Ping(NamedTuple):
    """Liveness and status; answered by a REPLY with the worker's status map."""

    msg_id: int
    sender: str


class Reply(NamedTuple):
    """The answer to message ``in_reply_to``."""

    msg_id: int
    sender: str
    in_reply_to: int
    value: Any


class Error(NamedTuple):
    """A failure: the answer to ``in_reply_to``, or (``in_reply_to`` 0) an unsolicited report
    that the command producing ``failed_id`` failed."""

    msg_id: int
    sender: str
    in_reply_to: int
    type_name: str
    message: str
    traceback: str = ""
    failed_id: int | None = None


class Flow(NamedTuple):
    """One message of a protocol run between workers (a flow): ``value`` for the flow
    ``flow_id`` under ``tag``. The receiving worker hands it to that flow's ``recv(sender,
    tag)``; ``label`` is the value's label, as in STORE."""

    msg_id: int
    sender: str
    flow_id: int
    tag: str
    value: Any
    label: list[Any] | None = None


Message = Store | Command | Get | Delete | Forward | Expect | Ping | Reply | Error | Flow

CLASS_OF_KIND: dict[int, type[Any]] = {
    Kind.STORE: Store,
    Kind.COMMAND: Command,
    Kind.GET: Get,
    Kind.DELETE: Delete,
    Kind.FORWARD: Forward,
    Kind.EXPECT: Expect,
    Kind.PING: Ping,
    Kind.REPLY: Reply,
    Kind.ERROR: Error,
    Kind.FLOW: Flow,
}
KIND_OF_CLASS: dict[type[Any], int] = {cls: int(kind) for kind, cls in CLASS_OF_KIND.items()}
