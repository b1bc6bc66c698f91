"""What a worker does with each message: the handlers, the command path, and the scheduler.

Every handler takes the identity of the session the message came in on (authenticated by its
transport) and asks the worker's :class:`~actors.policy.Policy` before touching an object.

**Order without blocking.** One sender's messages run in the order sent, except that a message
that must wait (for an object still travelling from a peer, a job, a flow) waits alone: the
scheduler parks it behind whatever it depends on, and later messages that touch none of the
same objects run meanwhile. Per object it keeps the last writer and the readers since, so
reads of one object run together and a write waits for both. With nothing pending the hot
path pays one truth test (``if self.tails``).

**Labels.** A command's result carries the union of its arguments' labels; an in-place command
adds them to its target and to everything sharing its storage; ``backward`` labels gradients;
operations whose output shape depends on values mark the shape private; registered label
rules are the only declassification. Errors of commands on labelled data keep their type and
drop their message (it could quote the data).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from actors.context import Context
from actors.flows import ABORT, BATCH, FLOW_OPTION
from actors.policy import (
    EMPTY,
    GRADIENT,
    RAW,
    SHAPE,
    Label,
    converted,
    label_from_wire,
    label_to_wire,
    with_form,
)
from actors.registry import CommandSpec, LabelIO
from actors.store import Failure
from protocol import (
    RANDOM_ID_LIMIT,
    BadArguments,
    Command,
    CommandNotAllowed,
    Delete,
    Expect,
    Flow,
    Forward,
    Get,
    GetMode,
    MalformedMessage,
    ObjectNotFound,
    ObjRef,
    PermissionDenied,
    Ping,
    ProtocolError,
    Store,
    SyftError,
    WireError,
    WorkerLost,
)
from protocol.allowlist import (
    ALIASING,
    COMMANDS,
    GRAD_CLEARERS,
    GRAD_READERS,
    INPLACE,
    MUTATES,
    SHAPE_DEPENDENT,
)

if TYPE_CHECKING:
    from actors.worker import Session, Worker

_MISSING: Any = object()
_NO_REFS: dict[str, list[int]] = {}
_CONTAINERS = (list, tuple, dict)
_Tensor = torch.Tensor
#: Operations whose labels need more than the union of their arguments'.
_SPECIAL = (
    INPLACE
    | GRAD_READERS
    | GRAD_CLEARERS
    | SHAPE_DEPENDENT
    | ALIASING
    | set(MUTATES)
    | {op for op in COMMANDS if op.startswith("F.")}  # any may be called with inplace=True
    | {"Tensor.backward", "Tensor.set_grad", "getitem", "Tensor.__getitem__", "torch.where", "Tensor.where"}
    | {
        f"optim.{name}"
        for name in ("SGD", "Adam", "AdamW", "Adagrad", "Adadelta", "Adamax", "RMSprop", "NAdam", "RAdam")
    }
)
#: Operations that write their first argument whatever it is.
_SELF_WRITERS = ("Tensor.backward", "Tensor.set_grad")
#: The options through which an operation of MUTATES writes (``out=`` for any).
_MUTATED_OPTIONS = ("out", "running_mean", "running_var", "weight")
WITHHELD = "details withheld: the operation ran on labelled data"


class Refs(NamedTuple):
    """The objects a registered command's message named: all of them, per positional argument,
    and per keyword (its arguments are resolved in place, so these are taken first)."""

    ids: list[int]
    positions: list[list[int]]
    kwrefs: dict[str, list[int]]


class _DependencyFailed(Exception):
    def __init__(self, failure: Failure) -> None:
        self.failure = failure


# -- the scheduler ----------------------------------------------------------------------------
class Node:
    """Something later messages may have to wait for: a parked message, a job, a flow, or an
    object announced by EXPECT. ``start`` runs when nothing it depends on is pending.

    Reads of a worker's own data (published ids) are not tracked: no message may write it, so
    nothing orders against them (a walk's steps all read the same shard)."""

    __slots__ = ("reads", "writes", "followers", "blockers", "start", "done", "owner")

    def __init__(
        self, reads: Iterable[int], writes: Iterable[int], start: Callable[[Node], None], owner: str
    ) -> None:
        self.writes = writes
        self.reads = reads
        self.followers: list[Node] = []
        self.blockers = 0
        self.start = start
        self.done = False
        #: Whose the objects it writes will be: nobody else may queue behind them.
        self.owner = owner


class Scheduler:
    """Per object: the pending writer and the pending readers since (``tails``). Readers are
    kept in a dict (an ordered set): a walk parks dozens of steps reading the same shard, and
    each must leave in constant time."""

    def __init__(self) -> None:
        self.tails: dict[int, list[Any]] = {}

    def blocked(self, reads: Iterable[int], writes: Iterable[int]) -> bool:
        tails = self.tails
        for obj_id in reads:
            if obj_id > RANDOM_ID_LIMIT:  # a worker's own data: no message writes it
                continue
            entry = tails.get(obj_id)
            if entry is not None and entry[0] is not None:
                return True
        return any(obj_id in tails for obj_id in writes)

    def add(self, node: Node, after: Iterable[Node] = ()) -> None:
        """Register ``node`` behind what it depends on (and ``after``); start it now if that
        is nothing."""
        tails = self.tails
        before: dict[Node, None] = {}
        for other in after:
            if not other.done:
                before[other] = None
        writes = node.writes
        for obj_id in node.reads:
            if obj_id in writes or obj_id > RANDOM_ID_LIMIT:
                continue
            entry = tails.get(obj_id)
            if entry is None:
                tails[obj_id] = [None, {node: None}]
                continue
            if entry[0] is not None:
                before[entry[0]] = None
            entry[1][node] = None
        for obj_id in writes:
            entry = tails.get(obj_id)
            if entry is not None:
                if entry[0] is not None:
                    before[entry[0]] = None
                before.update(entry[1])
            tails[obj_id] = [node, {}]
        before.pop(node, None)
        node.blockers = len(before)
        for other in before:
            other.followers.append(node)
        if not before:
            node.start(node)

    def finish(self, node: Node) -> None:
        if node.done:
            return
        node.done = True
        tails = self.tails
        for obj_id in node.reads:
            entry = tails.get(obj_id)
            if entry is not None:
                readers = entry[1]
                readers.pop(node, None)
                if entry[0] is None and not readers:
                    del tails[obj_id]
        for obj_id in node.writes:
            entry = tails.get(obj_id)
            if entry is not None and entry[0] is node:
                entry[0] = None
                if not entry[1]:
                    del tails[obj_id]
        followers, node.followers = node.followers, []
        for follower in followers:
            follower.blockers -= 1
            if follower.blockers == 0:
                follower.start(follower)


class Arrival(Node):
    """An object announced by EXPECT: owned by ``owner``, deliverable only by ``source``."""

    __slots__ = ("obj_id", "source", "deadline")

    def __init__(self, obj_id: int, owner: str, source: str, deadline: float) -> None:
        self.reads, self.writes, self.start = (), (obj_id,), _nothing  # Node's, inline: one per EXPECT
        self.followers: list[Node] = []
        self.blockers, self.done = 0, False
        self.obj_id = obj_id
        self.owner = owner
        self.source = source
        self.deadline = deadline


def _nothing(node: Node) -> None:
    pass


class _Parked(Node):
    """A message waiting for what it touches; ``handler(session, message)`` runs it."""

    __slots__ = ("session", "message", "handler")

    def __init__(  # noqa: PLR0917 - one call site
        self, reads: list[int], writes: list[int], start: Callable[[Node], None], session: Session,
        message: Any, handler: Callable[[Session, Any], Any],
    ) -> None:  # fmt: skip
        self.reads, self.writes, self.start = reads, writes, start  # Node's, inline: one per parked message
        self.followers: list[Node] = []
        self.blockers, self.done = 0, False
        self.owner = session.identity
        self.session = session
        self.message = message
        self.handler = handler


def refs_in(value: Any, out: list[int]) -> list[int]:
    """Every object id referenced anywhere in ``value`` (lists, tuples, dict values)."""
    kind = type(value)
    if kind is ObjRef:
        out.append(value.id)
    elif kind is list or kind is tuple:
        for item in value:
            if type(item) is ObjRef:
                out.append(item.id)
            elif type(item) in _CONTAINERS:
                refs_in(item, out)
    elif kind is dict:
        for item in value.values():
            refs_in(item, out)
    return out


# -- the dispatcher ---------------------------------------------------------------------------
class Dispatch:
    """The message handlers of one worker (see the module docstring)."""

    def __init__(self, worker: Worker, commands: dict[str, CommandSpec], label_rules: dict[str, Any]) -> None:
        self.worker = worker
        self.store = worker.store
        self.policy = worker.policy
        self.log = worker.log
        self.scheduler = Scheduler()
        self.tails = self.scheduler.tails
        #: Announced objects still on their way, by id.
        self.arrivals: dict[int, Arrival] = {}
        #: STOREs a peer made on another identity's behalf before that identity announced them.
        self.unclaimed: dict[tuple[int, str], Store] = {}
        #: Announced objects that never came: their owner and failure, oldest first, bounded.
        self.failures: dict[int, tuple[str, Failure]] = {}
        #: Wire name -> callable run inline with no context: the torch allowlist, and
        #: registered plain commands that need no context.
        self.fast: dict[str, Callable[..., Any]] = dict(COMMANDS)
        self.commands: dict[str, CommandSpec] = {}
        self.label_rules = dict(label_rules)
        for name, spec in commands.items():
            if spec.kind == "plain" and not spec.context:
                self.fast[name] = spec.fn
            else:
                self.commands[name] = spec
                self.fast.pop(name, None)
            if spec.labels is not None:
                self.label_rules[name] = spec.labels
        self.special = _SPECIAL | set(self.label_rules)
        #: Arguments (by position) an operation writes into besides its first.
        self.written_positions: dict[str, tuple[int, ...]] = dict(MUTATES)
        for name, rule in self.label_rules.items():
            positions = tuple(p for p in getattr(rule, "targets", ()) if isinstance(p, int))
            if positions:
                self.written_positions[name] = self.written_positions.get(name, ()) + positions
        self.handlers: dict[type, Callable[[Session, Any], None]] = {
            Store: self.on_store,
            Get: self.on_get,
            Delete: self.on_delete,
            Forward: self.on_forward,
            Expect: self.on_expect,
            Ping: self.on_ping,
            Flow: self.on_flow,
        }
        self.touches: dict[type, Callable[[Any], tuple[list[int], list[int]]]] = {
            Get: lambda m: ([], [m.obj_id]) if m.mode == GetMode.RELEASE else ([m.obj_id], []),
            Delete: lambda m: ([], list(m.obj_ids)),
            Forward: lambda m: ([], list(m.obj_ids)) if m.release else (list(m.obj_ids), []),
        }

    # -- entry points -----------------------------------------------------------------------
    def dispatch(self, session: Session, message: Any) -> None:
        """Run (or park) one message; a bad one costs its sender an error, never the worker."""
        try:
            kind = type(message)
            handler = self.handlers.get(kind)
            if handler is None and kind is not Command:
                if isinstance(message, ProtocolError):  # the codec yields what it could not read
                    raise message
                raise MalformedMessage(f"a worker does not accept {kind.__name__} messages")
            if message.sender != session.identity:
                raise self.policy.refuse(
                    None,
                    session.identity,
                    f"send a message as {message.sender!r} (the connection is its own)",
                )
            if handler is None:
                self.command(session, message)
                return
            touches = self.touches.get(kind)
            if touches is not None and self.tails:
                reads, writes = touches(message)
                if session.barrier in self.tails:
                    reads.append(session.barrier)
                try:
                    blocked = self.scheduler.blocked(reads, writes)
                except TypeError:  # an id that is not even a number: the handler says what is wrong
                    blocked = False
                if blocked and all(type(i) is int for i in (*reads, *writes)):
                    self._park(session, message, reads, writes, handler)
                    return
            handler(session, message)
        except Exception as exc:
            self.report_failure(session, message, exc)

    def report_failure(self, session: Session, message: Any, exc: Exception) -> None:
        msg_id = exc.msg_id if exc is message else getattr(message, "msg_id", 0)  # type: ignore[attr-defined]
        self.log.warning("message failed", sender=session.identity, msg_id=msg_id, error=repr(exc))
        session.error(msg_id or 0, WireError.from_exception(exc))

    def _park(
        self, session: Session, message: Any, reads: list[int], writes: list[int],
        handler: Callable[[Session, Any], Any],
    ) -> None:  # fmt: skip
        """Run ``message`` once what it touches is no longer pending; later messages go on. A
        message that writes its sender's barrier waits for everything that sender parked.

        Only behind what is, or will be, the sender's own (or the worker's): a message that
        names another identity's object would fail when it runs, and queued meanwhile it would
        hold up that owner's own messages for as long as the sender keeps it waiting."""
        identity, wid, owners, tails = session.identity, self.worker.id, self.store.owners, self.tails
        for obj_id in (*reads, *writes):  # whose it is, or will be once what is pending is done
            owner = owners.get(obj_id)
            if owner is None:
                entry = tails.get(obj_id)
                if entry is None or entry[0] is None:
                    continue
                owner = entry[0].owner
            if owner != identity and owner != wid:  # noqa: PLR1714 - hot
                raise self.policy.refuse(obj_id, identity, f"use an object of {owner}")
        if self.worker.spin:
            self.worker.note_waiting()
        node = _Parked(reads, writes, self.run_parked, session, message, handler)  # type: ignore[arg-type]
        after = list(session.parked) if session.barrier in writes else ()
        session.parked[node] = None
        self.scheduler.add(node, after)

    def run_parked(self, node: _Parked) -> None:
        session, message = node.session, node.message
        if session.closed and type(message) is not Delete:  # its sender left; a cleanup still runs
            self.finish_parked(node)
            return
        try:
            follow = node.handler(session, message)
        except Exception as exc:
            self.report_failure(session, message, exc)
            follow = None
        if isinstance(follow, Node) and not follow.done:  # a job or flow: done when it is
            follow.followers.append(node)
            node.blockers = 1
            node.start = self.finish_parked  # type: ignore[assignment]
        else:
            self.finish_parked(node)
        if self.tails and self.worker.spin:  # more is parked: what it waits for is likely moments away
            self.worker.note_waiting()

    def finish_parked(self, node: _Parked) -> None:
        node.session.parked.pop(node, None)
        self.scheduler.finish(node)

    # -- commands ---------------------------------------------------------------------------
    def command(self, session: Session, message: Command) -> None:
        """Run a command now, or park it behind what it touches (the session calls
        :meth:`run_command` itself while nothing is pending)."""
        _, sender, result_id, op, args, kwargs = message
        if self.tails:
            if type(result_id) is not int:
                raise MalformedMessage("a command's result id must be an integer")
            if not 0 <= result_id <= RANDOM_ID_LIMIT or self.store.owners.get(result_id, sender) != sender:
                self.check_may_write(result_id, sender)  # refused now, not after it waited
            reads = refs_in(args, []) if type(args) is list else []
            if kwargs:
                refs_in(kwargs, reads)
            writes = [result_id]
            if op in self.special or (type(kwargs) is dict and "out" in kwargs):
                writes += self._scheduled_writes(op, args, kwargs)
            if op == "Tensor.backward":  # writes the gradients of leaves it does not name: after
                writes.append(session.barrier)  # everything this sender parked, before the rest
                if session.parked:
                    self._park(session, message, reads, writes, self.run_command)
                    return
            elif session.barrier in self.tails:
                reads.append(session.barrier)
            if self.scheduler.blocked(reads, writes):
                self._park(session, message, reads, writes, self.run_command)
                return
        self.run_command(session, message)

    def _scheduled_writes(self, op: str, args: Any, kwargs: Any) -> list[int]:
        """What a command writes besides its result, from its message (before it runs), with
        everything sharing storage with it: what later messages touching them must wait for."""
        if type(args) is not list:
            return []
        kwargs = kwargs if type(kwargs) is dict else {}
        refs = _positions(args) if op in self.written_positions else None
        kwrefs = {name: _refs_of(kwargs[name]) for name in _MUTATED_OPTIONS if name in kwargs}
        every = refs_in(kwargs, refs_in(args, [])) if op in GRAD_READERS or op in GRAD_CLEARERS else []
        target = args[0].id if args and type(args[0]) is ObjRef else None
        written = self._writes(op, target, every, refs, kwrefs, args, kwargs)
        groups = self.store.groups
        if not written or not groups:
            return written
        return [member for obj_id in written for member in groups.get(obj_id, (obj_id,))]

    def run_command(self, session: Session, message: Command) -> Node | None:  # noqa: PLR0915 - inlined hot path
        """Execute a command now (its inputs are all present); a job or flow returns its node.
        Whose its result id is is checked here, when it runs: a parked command's may have
        changed hands while it waited."""
        _, sender, result_id, op, args, kwargs = message
        store = self.store
        objects, owners, labels = store.objects, store.owners, store.labels
        if type(result_id) is not int:
            raise MalformedMessage("a command's result id must be an integer")
        if not 0 <= result_id <= RANDOM_ID_LIMIT or owners.get(result_id, sender) != sender:
            self.check_may_write(result_id, sender)
        label = EMPTY
        ids: list[int] = []
        spec: CommandSpec | None = None
        positions: list[list[int]] | None = None
        target: int | None = None
        try:
            fn = self.fast.get(op) if type(op) is str else None
            if fn is None:
                spec = self.commands.get(op) if type(op) is str else None
                if spec is None:
                    raise CommandNotAllowed(f"command {op!r} is not served by {self.worker.id}")
            if type(args) is not list:
                raise BadArguments(f"{op}: arguments must be a list")
            special = op in self.special
            if special or spec is not None:  # a registered command's label rule reads them later
                if spec is not None or op in self.label_rules or op in MUTATES:
                    positions = _positions(args)
                if args and type(args[0]) is ObjRef:
                    target = args[0].id
            wid = self.worker.id
            for i, arg in enumerate(args):
                if type(arg) is ObjRef:
                    obj_id = arg.id
                    value = objects.get(obj_id, _MISSING)
                    if value is _MISSING:
                        raise self.missing(obj_id, sender)
                    owner = owners[obj_id]
                    if owner != sender and owner != wid:  # noqa: PLR1714 - no tuple per argument
                        raise self.policy.refuse(obj_id, sender, f"use an object of {owner}")
                    if type(value) is Failure:
                        raise _DependencyFailed(value)
                    args[i] = value
                    ids.append(obj_id)
                    if labels:
                        own = labels.get(obj_id)
                        if own:
                            label = label | own if label else own
                elif type(arg) in _CONTAINERS:
                    label = self._resolve_nested(args, i, sender, ids, label)
            kwrefs: dict[str, list[int]] = _NO_REFS
            if kwargs:
                kwrefs = {}
                if type(kwargs) is not dict:
                    raise BadArguments(f"{op}: keyword arguments must be a map")
                for key, value in kwargs.items():  # options are mostly plain values
                    if type(value) is ObjRef or type(value) in _CONTAINERS:
                        holder = [value]
                        before = len(ids)
                        label = self._resolve_nested(holder, 0, sender, ids, label)
                        kwargs[key] = holder[0]
                        kwrefs[key] = ids[before:]
                if "out" in kwargs:
                    special = True
            if spec is not None:
                refs = Refs(ids, positions or [], kwrefs)
                return self._start(session, message, spec, args, kwargs or {}, label, refs)
            if special:
                self._check_targets(op, sender, target, ids, positions, kwrefs, args, kwargs)
            result = fn(*args, **kwargs) if kwargs else fn(*args)
            if special or label or store.grad_labels:
                label = self._effects(op, sender, target, ids, positions, kwrefs, args, kwargs or {}, label)
        except _DependencyFailed as dependency:
            result, label = dependency.failure, EMPTY
            if spec is not None and spec.kind == "flow":
                self._abort_unstarted(spec.name, kwargs, dependency.failure.error)
        except SyftError as exc:
            result, label = Failure(WireError.from_exception(exc, result_id)), EMPTY
            session.error(0, result.error)
        except Exception as exc:
            result = Failure(self._wire_error(exc, result_id, label))
            label = EMPTY
            session.error(0, result.error)
        if ids and (
            (result._is_view() or op in ALIASING or _contains(args, result))
            if isinstance(result, _Tensor)
            else _holds_aliases(op, result, args)
        ):
            linked = [member for obj_id in ids for member in store.members(obj_id)]  # before put:
            store.put(result_id, result, sender, label)  # a reused id must not cut its own links
            store.alias([result_id, *linked])
        elif label or result_id in objects:
            store.put(result_id, result, sender, label)
        else:
            objects[result_id] = result
            owners[result_id] = sender
        return None

    def _resolve_nested(
        self, holder: list[Any], index: int, sender: str, ids: list[int], label: Label
    ) -> Label:
        """Replace the references inside ``holder[index]`` by their objects (a fresh copy of
        the containers: the decoded message is not shared)."""
        store = self.store
        wid = self.worker.id

        def resolve(value: Any) -> Any:
            nonlocal label
            kind = type(value)
            if kind is ObjRef:
                obj = store.objects.get(value.id, _MISSING)
                if obj is _MISSING:
                    raise self.missing(value.id, sender)
                owner = store.owners[value.id]
                if owner not in (sender, wid):
                    raise self.policy.refuse(value.id, sender, f"use an object of {owner}")
                if type(obj) is Failure:
                    raise _DependencyFailed(obj)
                ids.append(value.id)
                own = store.label(value.id)
                if own:
                    label = label | own
                return obj
            if kind is list:
                return [resolve(v) for v in value]
            if kind is tuple:
                return tuple(resolve(v) for v in value)
            if kind is dict:
                return {k: resolve(v) for k, v in value.items()}
            return value

        holder[index] = resolve(holder[index])
        return label

    def _wire_error(self, exc: BaseException, result_id: int, label: Label) -> WireError:
        error = WireError.from_exception(exc, result_id)
        if label:  # the message could quote the data (an index out of range, a value)
            error.message, error.traceback = WITHHELD, ""
        return error

    def _put(self, obj_id: int, value: Any, owner: str, label: Label) -> None:
        self.store.put(obj_id, value, owner, label)

    def _check_targets(  # noqa: PLR0917 - one private call site on the hot path
        self,
        op: str,
        sender: str,
        target: int | None,
        ids: list[int],
        positions: list[list[int]] | None,
        kwrefs: dict[str, list[int]],
        args: list[Any],
        kwargs: dict[str, Any] | None,
    ) -> None:
        """An in-place write must touch only the sender's own objects, through every alias: a
        view of a worker's data is still that data."""
        targets = self._writes(op, target, ids, positions, kwrefs, args, kwargs)
        owners = self.store.owners
        for obj_id in targets:
            for member in self.store.members(obj_id):
                owner = owners.get(member)
                if owner is not None and owner != sender:
                    raise self.policy.refuse(member, sender, f"write into an object of {owner}")

    def _writes(  # noqa: PLR0917 - private
        self,
        op: str,
        target: int | None,
        every: list[int],
        refs: list[list[int]] | None,
        kwrefs: dict[str, list[int]],
        args: list[Any],
        kwargs: dict[str, Any] | None,
    ) -> list[int]:
        """The objects an operation writes into besides its result: its first argument
        (``target``) when in place, every argument (``every``) when it reads or clears
        gradients, and the positions (``refs``, per argument) and options (``kwrefs``) it is
        declared to write. One rule for the scheduler (from the message, before the command
        runs) and for the owner checks and labels (from the resolved arguments)."""
        written: list[int] = []
        if op in INPLACE or op in _SELF_WRITERS or (op[:2] == "F." and _inplace_flag(args, kwargs)):
            if target is not None:
                written.append(target)
        elif op in GRAD_READERS or op in GRAD_CLEARERS:
            written += every
        if refs is not None:
            for position in self.written_positions.get(op, ()):
                if position < len(refs):
                    written += refs[position]
        if kwrefs:
            for name in _MUTATED_OPTIONS if op in MUTATES else ("out",):
                written += kwrefs.get(name, ())
        return written

    def _effects(  # noqa: PLR0917 - one private call site on the hot path
        self,
        op: str,
        sender: str,
        target: int | None,
        ids: list[int],
        positions: list[list[int]] | None,
        kwrefs: dict[str, list[int]],
        args: list[Any],
        kwargs: dict[str, Any],
        label: Label,
    ) -> Label:
        """The result's label, after applying the operation's effects on other labels."""
        store = self.store
        rule = self.label_rules.get(op)
        if rule is not None and positions is not None:
            label = rule(LabelIO(store, positions, kwrefs, args, kwargs))
            if op == "optim.sgd_step" and kwargs.get("zero_grad"):
                for obj_id in ids:
                    for member in store.members(obj_id):
                        store.grad_labels.pop(member, None)
            return label
        if op in GRAD_READERS or op in GRAD_CLEARERS:
            grads = EMPTY
            for obj_id in ids:
                for member in store.members(obj_id):
                    grads = grads | store.grad_labels.get(member, EMPTY)
            if op in GRAD_CLEARERS:
                for obj_id in ids:
                    for member in store.members(obj_id):
                        store.grad_labels.pop(member, None)
                return label
            if op == "Tensor.grad":
                return label | grads
            if op == "nn.utils.clip_grad_norm_":
                for obj_id in ids:
                    store.grow_grad(obj_id, grads)
                return label | grads
            for obj_id in ids:  # an optimizer step: what the gradients carried is in the parameters now
                store.grow(obj_id, label | grads)
                if kwargs.get("zero_grad"):
                    for member in store.members(obj_id):
                        store.grad_labels.pop(member, None)
            return label | grads
        if op == "Tensor.backward":
            loss = store.label(target) if target is not None else EMPTY
            others = EMPTY
            for obj_id in ids[1 if target is not None else 0 :]:
                others = others | store.label(obj_id)
            written = converted(loss, {RAW: GRADIENT}) | others
            if written:  # the graph holds only objects the sender may use: its own, the worker's
                owners, mine = store.owners, (sender, self.worker.id)
                for obj_id, value in store.objects.items():
                    if isinstance(value, _Tensor) and value.requires_grad and owners.get(obj_id) in mine:
                        store.grow_grad(obj_id, written)
            return label
        if op == "Tensor.set_grad":
            if target is not None:
                grad = EMPTY
                for obj_id in ids[1:]:
                    grad = grad | store.label(obj_id)
                if grad:
                    store.grad_labels[target] = grad
                else:
                    store.grad_labels.pop(target, None)
            return label
        if target is not None and (op in INPLACE or (op[:2] == "F." and _inplace_flag(args, kwargs))):
            store.grow(target, label)
            label = store.label(target)
        for obj_id in self._writes(op, None, [], positions, kwrefs, args, kwargs):
            store.grow(obj_id, label)
        if label and (op in SHAPE_DEPENDENT or _shape_from_values(op, args, ids, store)):
            label = with_form(label, SHAPE)
        return label

    # -- jobs and flows ----------------------------------------------------------------------
    def _start(  # noqa: PLR0917, PLR0915 - one private call site
        self, session: Session, message: Command, spec: CommandSpec, args: list[Any], kwargs: dict[str, Any],
        label: Label, refs: Refs,
    ) -> Node | None:  # fmt: skip
        """Start a registered command that takes a context, a job or a flow. Its result id is
        pending until it ends: commands that use it wait for it, nothing else does. ``refs``
        are the objects its message named, taken before they were resolved in place: what it
        reads, and what its label rule is about."""
        worker = self.worker
        sender, result_id = session.identity, message.result_id
        flow = kwargs.pop(FLOW_OPTION, None) if spec.kind == "flow" else None
        flow_id, parties = None, None
        if spec.kind == "flow":
            if not (
                isinstance(flow, list)
                and len(flow) == 2
                and type(flow[0]) is int
                and isinstance(flow[1], dict)
            ):
                raise BadArguments(f"{spec.name} is a flow: start it with actors.start_flow")
            flow_id, parties = flow[0], {str(k): str(v) for k, v in flow[1].items()}
            worker.flows.started(flow_id, parties)
        ctx = Context(
            worker, sender, message.msg_id, result_id, label=label, flow_id=flow_id, parties=parties
        )
        call = (
            functools.partial(spec.fn, ctx, *args, **kwargs)
            if spec.context
            else functools.partial(spec.fn, *args, **kwargs)
        )
        node = Node(list(refs.ids), [result_id], _nothing, sender)

        def finish(result: Any, exc: BaseException | None) -> None:
            if exc is not None:
                if isinstance(exc, asyncio.CancelledError):
                    exc = WorkerLost(f"{spec.name} was cancelled: its caller left or the worker stopped")
                withheld = ctx.label if not isinstance(exc, SyftError) else EMPTY
                failure = Failure(self._wire_error(exc, result_id, withheld))
                self._put(result_id, failure, sender, EMPTY)
                if not session.closed:
                    session.error(0, failure.error)
                if flow_id is not None and parties:
                    self._abort_run(flow_id, parties, spec.name, failure.error)
            else:
                rule = self.label_rules.get(spec.name)
                io = LabelIO(self.store, refs.positions, refs.kwrefs, args, kwargs)
                out_label = rule(io) if rule is not None else ctx.label
                self._put(result_id, result, sender, out_label)
            if flow_id is not None:
                worker.flows.forget(flow_id)
            self.scheduler.finish(node)

        if spec.kind == "plain":
            try:
                value = call()
            except Exception as exc:
                finish(None, exc)
            else:
                finish(value, None)
            return None
        self.scheduler.add(node)
        self.log.info("started", kind=spec.kind, op=spec.name, sender=sender, msg_id=message.msg_id)
        if spec.kind == "job":
            future = asyncio.get_running_loop().run_in_executor(None, call)
        else:
            future = asyncio.ensure_future(call())
            session.flows.add(future)
            future.add_done_callback(session.flows.discard)
            worker.flow_tasks.add(future)
            future.add_done_callback(worker.flow_tasks.discard)

        def done(future: asyncio.Future[Any]) -> None:
            if future.cancelled():
                finish(None, asyncio.CancelledError())
                return
            exc = future.exception()
            finish(None if exc is not None else future.result(), exc)
            self.log.info("done", op=spec.name, sender=sender, msg_id=message.msg_id, failed=exc is not None)

        future.add_done_callback(done)
        return node

    def _abort_unstarted(self, op: str, kwargs: Any, error: WireError) -> None:
        """A flow whose input had failed never starts here: its other parties, which would wait
        for its messages until they time out, hear at once that it failed, and why."""
        flow = kwargs.get(FLOW_OPTION) if type(kwargs) is dict else None
        if isinstance(flow, list) and len(flow) == 2 and type(flow[0]) is int and isinstance(flow[1], dict):
            self._abort_run(flow[0], {str(k): str(v) for k, v in flow[1].items()}, op, error)

    def _abort_run(self, flow_id: int, parties: dict[str, str], op: str, error: WireError) -> None:
        """Tell the run's other parties that this one failed, so that none waits for it. The
        error's message goes too, already withheld if the run had read labelled data."""
        me = self.worker.id
        for party, address in parties.items():
            if party == me:
                continue
            try:
                connection = self.worker.peer(party, address)
                reason = f"failed in {op} ({error.type_name}: {error.message})"
                connection.tell(Flow(connection.next_id(), me, flow_id, ABORT, reason, None))
            except Exception as exc:
                self.log.info("abort not delivered", party=party, flow_id=flow_id, error=repr(exc))

    # -- other messages ---------------------------------------------------------------------
    def check_may_write(self, obj_id: int, sender: str) -> None:
        """Only the worker publishes under published ids, only the worker uses negative ids (its
        sessions' barriers: guessable, and whoever owned one could hold up that session), and
        nobody replaces another's object."""
        if obj_id > RANDOM_ID_LIMIT:
            raise self.policy.refuse(
                obj_id, sender, f"write under an id reserved for {self.worker.id}'s own data"
            )
        if obj_id < 0:
            raise self.policy.refuse(obj_id, sender, "write under a negative id, reserved for the worker")
        owner = self.store.owners.get(obj_id)
        if owner is None and obj_id in self.arrivals:
            owner = self.arrivals[obj_id].owner
        if owner is not None and owner != sender:
            raise self.policy.refuse(obj_id, sender, f"replace an object of {owner}")

    def label_from(self, raw: Any, sender: str, obj_id: int | None = None) -> Label:
        """A label as ``sender`` sent it; one that cannot be read is refused, as every refusal
        is, through the policy (logged and counted by the owner)."""
        try:
            return label_from_wire(raw)
        except PermissionDenied as exc:
            raise self.policy.refuse(obj_id, sender, f"send {exc}") from None

    def on_store(self, session: Session, message: Store) -> None:
        self.store_from(session.identity, message)

    def store_from(self, sender: str, message: Store) -> None:
        obj_id = message.obj_id
        if type(obj_id) is not int:
            raise MalformedMessage("STORE needs an integer object id")
        owner = message.owner if type(message.owner) is str else sender
        if owner == self.worker.id:
            raise self.policy.refuse(obj_id, sender, f"make an object {self.worker.id}'s own data")
        label = self.label_from(message.label, sender, obj_id)
        arrival = self.arrivals.get(obj_id)
        if owner != sender:  # on another's behalf: only where that identity announced it from us
            if arrival is None:
                self._hold_unclaimed(obj_id, sender, message)
                return
            if arrival.owner != owner or arrival.source != sender:
                raise self.policy.refuse(
                    obj_id,
                    sender,
                    f"deliver an object {arrival.owner} announced from {arrival.source or 'nobody'}",
                )
        elif arrival is not None and arrival.owner != sender:
            raise self.policy.refuse(obj_id, sender, f"deliver an object {arrival.owner} announced")
        if arrival is None:
            self.check_may_write(obj_id, owner)
        obj = message.obj
        if type(obj) is WireError:
            obj = Failure(obj)
        self._put(obj_id, obj, owner, label)
        if arrival is not None:
            del self.arrivals[obj_id]
            self.worker.unwatch(arrival)
            self.scheduler.finish(arrival)

    def _hold_unclaimed(self, obj_id: int, sender: str, message: Store) -> None:
        """A forwarded object can outrun its owner's EXPECT (they travel on different links):
        keep it, boundedly, until the announcement comes or its deadline passes."""
        if obj_id in self.store.objects:
            raise self.policy.refuse(obj_id, sender, f"replace an object on behalf of {message.owner}")
        self.unclaimed[obj_id, sender] = message  # by sender: no one can displace another's
        if len(self.unclaimed) > self.worker.max_unclaimed:
            oldest, held_by = next(iter(self.unclaimed))
            del self.unclaimed[oldest, held_by]
            self.log.warning("unannounced object dropped", obj_id=oldest, sender=held_by)

    def on_get(self, session: Session, message: Get) -> None:
        requester = session.identity
        obj_id = message.obj_id
        if type(obj_id) is not int:
            raise MalformedMessage(f"object ids are integers, got {type(obj_id).__name__}")
        value = self.store.objects.get(obj_id, _MISSING)
        if value is _MISSING:
            why = self.missing(obj_id, requester)
            if isinstance(why, _DependencyFailed):  # its announcement failed: that is the answer
                session.error(message.msg_id, why.failure.error)
                if message.mode == GetMode.RELEASE:
                    self.failures.pop(obj_id, None)
            else:
                session.error(message.msg_id, WireError.from_exception(why))
            return
        owner = self.store.owners[obj_id]
        if owner not in (requester, self.worker.id):
            raise self.policy.refuse(obj_id, requester, f"read an object of {owner}")
        mode = message.mode
        if type(value) is Failure:
            session.error(message.msg_id, value.error)
            if mode == GetMode.RELEASE and owner == requester:
                self.store.drop(obj_id)
        elif mode == GetMode.META:
            meta = describe(value)
            if "shape" in meta and self.policy.shape_private(self.store.label(obj_id)):
                del meta["shape"]
            session.reply(message.msg_id, meta)
        elif mode in (GetMode.COPY, GetMode.RELEASE):
            try:
                self.policy.check_leave(obj_id, self.store.leaving_label(obj_id), requester, requester)
            finally:  # refused or not, the pointer is spent: its object goes
                if mode == GetMode.RELEASE and owner == requester:
                    self.store.drop(obj_id)
            session.reply(message.msg_id, value)
            return
        else:
            raise MalformedMessage(f"unknown GET mode {mode!r}")

    def on_delete(self, session: Session, message: Delete) -> None:
        if type(message.obj_ids) is not list:
            raise MalformedMessage("DELETE needs a list of object ids")
        requester = session.identity
        owners = self.store.owners
        refused = None
        for obj_id in message.obj_ids:
            owner = owners.get(obj_id) if type(obj_id) is int else None
            if owner == requester:
                self.store.drop(obj_id)
            elif owner is not None and owner != self.worker.id:  # the worker's data: a pointer was dropped
                refused = self.policy.refuse(obj_id, requester, f"delete an object of {owner}")
        if refused is not None:
            raise refused

    def on_forward(self, session: Session, message: Forward) -> None:
        obj_ids, new_ids = message.obj_ids, message.new_ids
        if type(obj_ids) is not list or type(new_ids) is not list or len(obj_ids) != len(new_ids):
            raise MalformedMessage("FORWARD needs two lists of object ids of the same length")
        if type(message.dest_id) is not str or type(message.dest_address) is not str:
            raise MalformedMessage("FORWARD needs a destination id and address")
        requester = session.identity
        if message.dest_id == self.worker.id:  # what is released to this worker stays here
            raise self.policy.refuse(None, requester, f"forward to {self.worker.id} itself")
        try:
            peer = self.worker.peer(message.dest_id, message.dest_address)
        except Exception as exc:  # an address no transport can even dial
            self._undeliverable(session, message, exc)
            return
        released: list[int] = []
        stores = [
            self._outgoing(session, message, obj_id, new_id, peer.next_id(), released)
            for obj_id, new_id in zip(obj_ids, new_ids, strict=True)
        ]
        if message.release:  # moved, delivered or not: the sender's pointer follows the new id
            for obj_id in released:
                self.store.drop(obj_id)
        if peer.lost is not None:
            self._undeliverable(session, message, peer.lost)
            return
        if not peer.usable:  # still dialling: if it never gets through, the sender hears why
            peer.when_unreached(functools.partial(self._undeliverable, session, message))
        try:
            peer.tell_all(stores)  # a whole model crosses in one frame
        except Exception:  # some value cannot travel: send each alone, failures as failures
            for store in stores:
                try:
                    peer.tell(store)
                except Exception as exc:
                    peer.tell(store._replace(obj=WireError.from_exception(exc, store.obj_id), label=None))

    def _outgoing(  # noqa: PLR0917 - one call site
        self, session: Session, message: Forward, obj_id: Any, new_id: Any, msg_id: int, released: list[int]
    ) -> Store:
        """The STORE that carries one forwarded object (or the reason it cannot go) on."""
        requester = session.identity
        label: Label = EMPTY
        try:
            if type(obj_id) is not int:
                raise MalformedMessage("object ids are integers")
            value = self.store.objects.get(obj_id, _MISSING)
            if value is _MISSING:
                why = self.missing(obj_id, requester)
                if not isinstance(why, _DependencyFailed):
                    raise why
                value = why.failure  # its announcement failed: the failure travels on
                if message.release:
                    self.failures.pop(obj_id, None)
            else:
                owner = self.store.owners[obj_id]
                if owner not in (requester, self.worker.id):
                    raise self.policy.refuse(obj_id, requester, f"move an object of {owner}")
                if owner == requester:  # moved or refused, the sender's pointer has left it
                    released.append(obj_id)
                label = self.policy.check_leave(
                    obj_id, self.store.leaving_label(obj_id), requester, message.dest_id
                )
        except (ObjectNotFound, PermissionDenied, MalformedMessage) as exc:
            value = Failure(WireError.from_exception(exc, obj_id))
            session.error(message.msg_id, value.error)
        payload = value.error if type(value) is Failure else value
        return Store(msg_id, self.worker.id, new_id, payload, requester, label_to_wire(label))

    def _undeliverable(self, session: Session, message: Forward, exc: BaseException) -> None:
        """A forward that cannot reach its destination fails each moved object, reported to the
        sender under its new id: its pointer already points there, and its worker (the leader's
        connection) turns the report into the failure of what waits there."""
        reason = f"cannot forward to {message.dest_id} at {message.dest_address}: {exc}"
        self.log.warning(
            "forward undeliverable", sender=session.identity, msg_id=message.msg_id, error=reason
        )
        for new_id in message.new_ids:
            session.error(message.msg_id, WireError.from_exception(WorkerLost(reason), new_id))

    def on_expect(self, session: Session, message: Expect) -> None:
        if type(message.obj_ids) is not list or not all(type(i) is int for i in message.obj_ids):
            raise MalformedMessage("EXPECT needs a list of integer object ids")
        if type(message.source) is not str:
            raise MalformedMessage("EXPECT names the worker the objects come from")
        owner = session.identity
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.worker.expect_timeout
        for obj_id in message.obj_ids:
            if obj_id in self.store.objects or obj_id in self.arrivals:
                continue
            self.check_may_write(obj_id, owner)
            arrival = Arrival(obj_id, owner, message.source, deadline)
            self.arrivals[obj_id] = arrival
            self.scheduler.add(arrival)
            self.worker.watch(arrival)
            held = self.unclaimed.pop((obj_id, message.source), None)
            if held is not None:
                try:
                    self.store_from(message.source, held)
                except Exception as exc:
                    self.log.warning(
                        "held object refused", obj_id=obj_id, sender=message.source, error=str(exc)
                    )

    def expire(self, arrival: Arrival) -> None:
        """An announced object did not come in time: whoever waits for it gets the error."""
        self.fail_arrival(
            arrival,
            WorkerLost(
                f"object {arrival.obj_id:#x} was announced from {arrival.source or 'a peer'} but did "
                f"not arrive within {self.worker.expect_timeout:g} s"
            ),
        )

    def source_lost(self, source: str) -> None:
        """``source`` (a peer that was to deliver announced objects) is gone: what waits for
        them fails now, not at their deadlines."""
        for arrival in [a for a in self.arrivals.values() if a.source == source]:
            self.fail_arrival(
                arrival, WorkerLost(f"{source} left before it delivered object {arrival.obj_id:#x}")
            )

    def forget(self, identity: str) -> int:
        """Free every object ``identity`` owns here and every announcement it made; the number
        freed. (Its parked messages went with its sessions.)"""
        for arrival in [a for a in self.arrivals.values() if a.owner == identity]:
            self.fail_arrival(arrival, WorkerLost(f"{identity} left"))
        owned = list(self.store.ids_owned_by(identity))
        for obj_id in owned:
            self.store.drop(obj_id)
        for obj_id in [i for i, (owner, _) in self.failures.items() if owner == identity]:
            del self.failures[obj_id]
        for key in [k for k, held in self.unclaimed.items() if held.owner == identity]:
            del self.unclaimed[key]
        return len(owned)

    def fail_arrival(self, arrival: Arrival, error: SyftError) -> None:
        """The object will not come: the messages waiting for it fail with ``error``, and the
        worker keeps only a bounded record of the failure (not an object) for its owner's later
        messages."""
        obj_id = arrival.obj_id
        if self.arrivals.get(obj_id) is not arrival:
            return
        del self.arrivals[obj_id]
        self.worker.unwatch(arrival)
        failure = Failure(WireError.from_exception(error, obj_id))
        self._put(obj_id, failure, arrival.owner, EMPTY)
        self.scheduler.finish(arrival)  # what could run, ran (and failed) just now
        if self.store.objects.get(obj_id) is failure:
            self.store.drop(obj_id)
            self.remember_failure(obj_id, arrival.owner, failure)

    def remember_failure(self, obj_id: int, owner: str, failure: Failure) -> None:
        self.failures[obj_id] = (owner, failure)
        if len(self.failures) > self.worker.max_failures:
            del self.failures[next(iter(self.failures))]

    def missing(self, obj_id: int, requester: str) -> Exception:
        """Why ``obj_id`` is not here: the failure its owner's announcement ended in, if it
        was theirs, else it was never here (or is gone)."""
        record = self.failures.get(obj_id)
        if record is not None and record[0] == requester:
            return _DependencyFailed(record[1])
        return ObjectNotFound(f"object {obj_id!r} not found")

    def on_ping(self, session: Session, message: Ping) -> None:
        session.reply(message.msg_id, self.worker.status())

    def on_flow(self, session: Session, message: Flow) -> None:
        if type(message.flow_id) is not int or type(message.tag) is not str:
            raise MalformedMessage("FLOW needs an integer flow id and a string tag")
        if message.tag == BATCH:  # several flows' messages from one peer, in the order sent
            entries = message.value
            if type(entries) is not list or not all(type(e) is list and len(e) == 4 for e in entries):
                raise MalformedMessage("a FLOW batch is a list of [flow_id, tag, value, label]")
            for flow_id, tag, _, _ in entries:  # all of it is readable, or none of it is taken
                if type(flow_id) is not int or type(tag) is not str or tag.startswith("!"):
                    raise MalformedMessage("a FLOW batch entry needs an integer flow id and a flow's tag")
            labels = [self.label_from(label, session.identity) for *_, label in entries]
            for (flow_id, tag, value, _), label in zip(entries, labels, strict=True):
                self.worker.flows.deliver(session.identity, flow_id, tag, value, label)
            return
        label = self.label_from(message.label, session.identity)
        if message.tag == ABORT and not self.worker.flows.may_abort(message.flow_id, session.identity):
            rule = f"abort run {message.flow_id:#x}, not being its party"
            raise self.policy.refuse(None, session.identity, rule)
        self.worker.flows.deliver(session.identity, message.flow_id, message.tag, message.value, label)


def _inplace_flag(args: list[Any], kwargs: dict[str, Any] | None) -> bool:
    """``F.relu(x, inplace=True)`` and the like (positionally too: any later ``True``)."""
    if kwargs and kwargs.get("inplace") is True:
        return True
    return any(arg is True for arg in args[1:])


def _positions(args: list[Any]) -> list[list[int]]:
    """The object ids each argument names (``_refs_of`` of each, inline: it runs every step)."""
    return [
        [arg.id] if type(arg) is ObjRef else refs_in(arg, []) if type(arg) in _CONTAINERS else []
        for arg in args
    ]


def _refs_of(arg: Any) -> list[int]:
    if type(arg) is ObjRef:
        return [arg.id]
    if type(arg) in _CONTAINERS:
        return refs_in(arg, [])
    return []


def _contains(args: Any, value: Any, depth: int = 0) -> bool:
    """Whether ``value`` is one of ``args`` or inside a list or tuple among them (the operation
    handed back an input, or an element of one)."""
    for arg in args:
        if arg is value:
            return True
        if depth < 3 and (type(arg) is list or type(arg) is tuple) and _contains(arg, value, depth + 1):
            return True
    return False


def _holds_aliases(op: str, result: Any, args: list[Any]) -> bool:
    """A tuple or list holding views or inputs (``split``, ``unbind``, ``atleast_1d``), or an
    optimizer holding its parameters."""
    if type(result) is tuple or type(result) is list:
        return any(
            (isinstance(r, _Tensor) and (r._is_view() or _contains(args, r))) or type(r) in (list, tuple)
            for r in result
        )
    return op.startswith("optim.") and type(result) is not Failure


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, list | tuple):
        return [v for v in value if isinstance(v, torch.Tensor)]
    return []


def _shape_from_values(op: str, args: list[Any], ids: list[int], store: Any) -> bool:
    """Whether labelled values may decide the result's shape: a boolean mask as an index, the
    one-argument ``where``, or a labelled number used after the first argument, where a size, a
    count or a dimension goes: a Python value (from ``item``, ``tolist``) or a one-element
    integer tensor (``t.new_zeros([k])``, ``t.expand(k)``, ``torch.narrow(t, 0, 0, k)``)."""
    if op in ("getitem", "Tensor.__getitem__") and len(args) > 1:
        keys = args[1] if isinstance(args[1], tuple | list) else (args[1],)
        if any(isinstance(k, torch.Tensor) and k.dtype == torch.bool for k in keys):
            return True
    if op in ("torch.where", "Tensor.where") and len(args) == 1:
        return True
    first = args[0] if args else None
    for obj_id in ids:
        if not store.label(obj_id):
            continue
        value = store.objects.get(obj_id)
        if not isinstance(value, torch.Tensor):
            return True
        if (
            value is not first
            and value.numel() == 1
            and not value.is_floating_point()
            and not value.is_complex()
        ):
            return True
    return False


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
