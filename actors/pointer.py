"""Pointers: futures of objects that live on another worker.

An operation on a :class:`PointerTensor` sends one COMMAND naming a fresh result id and returns a
pointer to that id at once (promise pipelining): ``(x + 1).sum()`` costs two messages and no
waiting. ``await ptr`` resolves when the result exists and raises the remote error if it (or
anything it was computed from) failed; ``await ptr.get()`` brings the value home. Dropping the last
reference frees the remote object, in batches.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import random
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Self

import msgpack
import torch

from protocol import (
    Expect,
    Forward,
    Get,
    GetMode,
    PointerNotResolved,
    Store,
    ref_ext,
)
from protocol.allowlist import COMMANDS, TENSOR_ATTRIBUTES, name_of

if TYPE_CHECKING:
    from actors.remote import RemoteWorker

_getrandbits = random.Random(os.urandom(16)).getrandbits


def new_object_id() -> int:
    """A fresh object id: random, so that any sender can name objects without coordination."""
    return _getrandbits(62) + 1


class ObjectPointer:
    """A pointer to any remote object (an optimizer, a tuple of results, a tensor)."""

    __slots__ = ("location", "id", "_wire", "_released", "__weakref__")

    def __init__(self, location: RemoteWorker, obj_id: int) -> None:
        self.location = location
        self.id = obj_id
        self._wire: msgpack.ExtType | None = None
        self._released = False

    def __wire__(self) -> msgpack.ExtType:
        wire = self._wire
        if wire is None:
            wire = self._wire = ref_ext(self.id)
        return wire

    def __del__(self) -> None:
        if not self._released:
            # At interpreter or loop shutdown there is nothing left to free.
            with contextlib.suppress(Exception):
                self.location.connection.release(self.id)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.location.id}:{self.id:#x}>"

    def _check_live(self) -> None:
        if self._released:
            raise PointerNotResolved(f"{self!r} was already fetched with get(); it points nowhere")

    def __await__(self) -> Any:
        return self.resolve().__await__()

    def resolve(self) -> Awaitable[Self]:
        """Ask now whether the object exists; the awaitable gives this pointer back or raises."""
        self._check_live()
        connection = self.location.connection
        future = connection.ask(Get(connection.next_id(), connection.local_id, self.id, GetMode.META))
        future.add_done_callback(functools.partial(connection.take_failure, self.id))  # its reply tells
        return self._resolved(future)

    async def _resolved(self, future: Awaitable[dict[str, Any]]) -> Self:
        self._learn(await future)
        return self

    def _learn(self, meta: dict[str, Any]) -> None:
        """Record what resolution told (tensors keep shape and dtype)."""

    def get(self) -> asyncio.Future[Any]:
        """Fetch the value and free it remotely. The request leaves now, after every command
        already sent through this pointer's worker."""
        self._check_live()
        connection = self.location.connection
        future = connection.ask(Get(connection.next_id(), connection.local_id, self.id, GetMode.RELEASE))
        future.add_done_callback(functools.partial(connection.take_failure, self.id))
        self._released = True
        return future

    def fetch(self) -> Awaitable[Any]:
        """Fetch a copy of the value; the remote object stays."""
        self._check_live()
        connection = self.location.connection
        return connection.ask(Get(connection.next_id(), connection.local_id, self.id, GetMode.COPY))

    def move(self, destination: RemoteWorker, *, announced: int | None = None) -> Self:
        """Move the object to ``destination``, worker to worker; this pointer follows it.

        Nothing is awaited: commands sent afterwards to ``destination`` that use the object wait
        on that worker until it has arrived. ``announced``: an id :func:`plan_route` announced
        there for this hop (no EXPECT is sent now).
        """
        self._check_live()
        if self.location is not destination:  # one object: the general case's grouping, without it
            if announced is None:
                announced = new_object_id()
                there = destination.connection
                there.tell(Expect(there.next_id(), there.local_id, [announced], self.location.id))
            _forward([self], [announced], destination)
        return self


def plan_route(start: RemoteWorker, route: list[RemoteWorker]) -> list[int | None]:
    """Announce the hops of an object that will visit ``route`` in order from ``start``: one
    EXPECT per (destination, source) instead of one per hop. Returns, per stop, the id to pass
    as ``move(..., announced=)`` (``None`` where the object is already there). Every announced
    hop must be made: an announcement nobody fulfils waits out its deadline."""
    ids: list[int | None] = []
    groups: dict[tuple[int, int], tuple[RemoteWorker, RemoteWorker, list[int]]] = {}
    here = start
    for stop in route:
        if stop is here:
            ids.append(None)
            continue
        new_id = new_object_id()
        groups.setdefault((id(stop), id(here)), (stop, here, []))[2].append(new_id)
        ids.append(new_id)
        here = stop
    for destination, source, group in groups.values():
        there = destination.connection
        there.tell(Expect(there.next_id(), there.local_id, group, source.id))
    return ids


def move_pointers(pointers: list[ObjectPointer], destination: RemoteWorker) -> None:
    """Move several objects to ``destination`` with one EXPECT there and one FORWARD per source
    worker (an EXPECT names the one worker that may deliver); each pointer follows its object."""
    by_source: dict[int, tuple[RemoteWorker, list[ObjectPointer]]] = {}
    for pointer in pointers:
        pointer._check_live()
        if pointer.location is not destination:
            by_source.setdefault(id(pointer.location), (pointer.location, []))[1].append(pointer)
    if not by_source:
        return
    there = destination.connection
    for source, group in by_source.values():
        new_ids = [new_object_id() for _ in group]
        there.tell(Expect(there.next_id(), there.local_id, new_ids, source.id))
        _forward(group, new_ids, destination)


def _forward(pointers: list[ObjectPointer], new_ids: list[int], destination: RemoteWorker) -> None:
    """One FORWARD from the pointers' common worker to ``destination``; each pointer follows its
    object. A failure reported for an object travels along, and so does the duty to report it."""
    here, there = pointers[0].location.connection, destination.connection
    here.tell(Forward(here.next_id(), here.local_id, [p.id for p in pointers], destination.id,
                      destination.address, new_ids))  # fmt: skip
    for pointer, new_id in zip(pointers, new_ids, strict=True):
        here.moved(new_id, there)
        failure = here.take_failure(pointer.id)
        if failure is not None:
            there._failures[new_id] = failure
        pointer.location = destination
        pointer.id = new_id
        pointer._wire = None


def call(
    location: RemoteWorker,
    op: str,
    args: list[Any],
    kwargs: dict[str, Any] | None = None,
    result: type[ObjectPointer] | None = None,
) -> Any:
    """Pipeline ``op`` on ``location`` and return a pointer to its future result."""
    for i, arg in enumerate(args):
        if isinstance(arg, ObjectPointer):
            if arg.location is not location:
                _elsewhere(arg, location)
            args[i] = arg._wire or arg.__wire__()  # what the codec would do, minus a callback
        elif type(arg) in _NESTED:
            _check_nested(arg, location)
    if kwargs:
        _check_nested(kwargs, location)
    result_id = _getrandbits(62) + 1
    location.connection.command(result_id, op, args, kwargs)
    return (result or PointerTensor)(location, result_id)


_NESTED = (list, tuple, dict)


def _elsewhere(pointer: ObjectPointer, location: RemoteWorker) -> None:
    raise ValueError(f"{pointer!r} lives on {pointer.location.id}, not {location.id}: move it there first")


def _check_nested(value: Any, location: RemoteWorker) -> None:
    """Pointers inside lists, tuples and keyword arguments must live on ``location`` too."""
    for item in value.values() if type(value) is dict else value:
        if isinstance(item, ObjectPointer):
            if item.location is not location:
                _elsewhere(item, location)
        elif type(item) in _NESTED:
            _check_nested(item, location)


def _location_of(args: Any, kwargs: dict[str, Any] | None) -> RemoteWorker:
    stack = [args, list(kwargs.values()) if kwargs else ()]
    while stack:
        for item in stack.pop():
            if isinstance(item, ObjectPointer):
                return item.location
            if isinstance(item, list | tuple):
                stack.append(item)
    raise TypeError("no pointer among the arguments")


class PointerTensor(ObjectPointer):
    """A tensor on a remote worker, used like a tensor.

    Every allowlisted ``torch.Tensor`` method and operator is available and returns a new pointer
    at once; ``torch.*`` and ``torch.nn.functional`` calls reach it through
    ``__torch_function__``. ``shape``, ``dtype`` and ``requires_grad`` are known once the pointer
    is resolved (``await ptr``), or at once for a tensor that was sent.
    """

    __slots__ = ("_meta",)

    def __init__(self, location: RemoteWorker, obj_id: int, meta: dict[str, Any] | None = None) -> None:
        # ObjectPointer.__init__ written out: this runs once per pipelined operation.
        self.location = location
        self.id = obj_id
        self._wire = None
        self._released = False
        self._meta = meta

    def _learn(self, meta: dict[str, Any]) -> None:
        self._meta = meta

    def _metadata(self, key: str) -> Any:
        meta = self._meta
        if meta is None or key not in meta:
            raise PointerNotResolved(f"{key} of {self!r} is known once it is resolved: await it first")
        return meta[key]

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self._metadata("shape"))

    @property
    def dtype(self) -> torch.dtype:
        return self._metadata("dtype")

    @property
    def requires_grad(self) -> bool:
        return bool(self._metadata("requires_grad"))

    @property
    def ndim(self) -> int:
        return len(self._metadata("shape"))

    def size(self, dim: int | None = None) -> Any:
        return self.shape if dim is None else self.shape[dim]

    def dim(self) -> int:
        return self.ndim

    def numel(self) -> int:
        return self.shape.numel()

    def __len__(self) -> int:
        shape = self._metadata("shape")
        if not shape:
            raise TypeError("len() of a 0-d tensor")
        return int(shape[0])

    def __repr__(self) -> str:
        meta = self._meta
        detail = f" shape={tuple(meta['shape'])} dtype={meta['dtype']}" if meta and "shape" in meta else ""
        return f"<PointerTensor {self.location.id}:{self.id:#x}{detail}>"

    def __bool__(self) -> bool:
        raise TypeError("a remote tensor has no truth value here: use `await ptr.get()` first")

    def __iter__(self) -> Any:
        raise TypeError("iterating a remote tensor would need its value: index it or get() it")

    __hash__ = object.__hash__

    def __getitem__(self, key: Any) -> PointerTensor:
        # ``getitem`` also indexes the tuples that multi-output ops (max, sort, topk) return.
        return call(self.location, "getitem", [self, key])

    def __setitem__(self, key: Any, value: Any) -> None:
        call(self.location, "Tensor.__setitem__", [self, key, value])

    @property
    def grad(self) -> PointerTensor:
        return call(self.location, "Tensor.grad", [self])

    @grad.setter
    def grad(self, value: Any) -> None:
        call(self.location, "Tensor.set_grad", [self, value])

    def copy(self) -> PointerTensor:
        """A new, independent remote object with the same value, on the same worker."""
        return call(self.location, "Tensor.clone", [self])

    @classmethod
    def __torch_function__(
        cls, func: Callable[..., Any], types: Any, args: Any = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        return call(_location_of(args, kwargs), name_of(func), list(args), kwargs or None)


def _remote_method(op: str, name: str) -> Callable[..., PointerTensor]:
    def method(self: PointerTensor, *args: Any, **kwargs: Any) -> PointerTensor:
        return call(self.location, op, [self, *args], kwargs or None)

    method.__name__ = name
    method.__qualname__ = f"PointerTensor.{name}"
    method.__doc__ = f"Remote ``torch.Tensor.{name}``: returns a pointer at once."
    return method


def _remote_attribute(op: str, name: str) -> property:
    def read(self: PointerTensor) -> PointerTensor:
        return call(self.location, op, [self])

    read.__doc__ = f"Pointer to the remote tensor's ``{name}``."
    return property(read)


def _install_tensor_methods() -> None:
    local = {"shape", "dtype", "requires_grad", "ndim", "grad", "size", "dim", "numel"}
    for op in COMMANDS:
        if not op.startswith("Tensor."):
            continue
        name = op.removeprefix("Tensor.")
        if name in local or name in ("__getitem__", "__setitem__", "set_grad", "clone"):
            continue
        if name in TENSOR_ATTRIBUTES:
            setattr(PointerTensor, name, _remote_attribute(op, name))
        elif name.startswith("__") or not hasattr(PointerTensor, name):
            setattr(PointerTensor, name, _remote_method(op, name))
    PointerTensor.clone = _remote_method("Tensor.clone", "clone")  # type: ignore[attr-defined]
    PointerTensor.__hash__ = object.__hash__  # type: ignore[assignment] # __eq__ is remote


_install_tensor_methods()


def send_tensor(tensor: torch.Tensor, worker: RemoteWorker) -> PointerTensor:
    """Send a copy of ``tensor`` to ``worker``; the pointer knows its shape and dtype at once."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"expected a tensor, got {type(tensor).__name__}")
    connection = worker.connection
    obj_id = new_object_id()
    connection.tell(Store(connection.next_id(), connection.local_id, obj_id, tensor))
    meta = {
        "type": "Tensor",
        "shape": tuple(tensor.shape),
        "dtype": tensor.dtype,
        "requires_grad": tensor.requires_grad,
    }
    return PointerTensor(worker, obj_id, meta)
