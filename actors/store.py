"""The object store a worker keeps: values by id, who owns each, and what is still on its way."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

from protocol import ObjectNotFound, WireError


class Failure:
    """Stands in the store where a command failed, so every command using it fails alike."""

    __slots__ = ("error",)

    def __init__(self, error: WireError) -> None:
        self.error = error

    def __repr__(self) -> str:
        return f"Failure({self.error!r})"


class Awaiting(Exception):
    """Raised by a lookup of an object that is announced but has not arrived yet."""

    def __init__(self, obj_id: int) -> None:
        super().__init__(obj_id)
        self.obj_id = obj_id


_MISSING: Any = object()


class ObjectStore:
    """Objects by id, their owners, and who waits for the objects announced by EXPECT.

    Owners are recorded for every object so that per-object permissions (the owner decides what
    leaves a worker) can be enforced here later without touching the handlers. An announced
    object maps to the futures of the sessions waiting for it; ``put`` resolves them itself, so
    a waiting session resumes on the next turn of the loop (a walking model waits once a step).
    """

    __slots__ = ("objects", "owners", "arrivals")

    def __init__(self) -> None:
        self.objects: dict[int, Any] = {}
        self.owners: dict[int, str] = {}
        self.arrivals: dict[int, list[asyncio.Future[bool]]] = {}

    def __len__(self) -> int:
        return len(self.objects)

    def __contains__(self, obj_id: int) -> bool:
        return obj_id in self.objects

    def put(self, obj_id: int, value: Any, owner: str) -> None:
        self.objects[obj_id] = value
        self.owners[obj_id] = owner
        if self.arrivals:
            _wake(self.arrivals.pop(obj_id, ()))

    def get(self, obj_id: int) -> Any:
        """The value (possibly a :class:`Failure`); :class:`Awaiting` if it is still coming."""
        value = self.objects.get(obj_id, _MISSING)
        if value is _MISSING:
            raise self.missing(obj_id)
        return value

    def missing(self, obj_id: Any) -> Exception:
        """The exception for a lookup that found nothing: wait for it, or it does not exist."""
        if obj_id in self.arrivals:
            return Awaiting(obj_id)
        return ObjectNotFound(f"object {obj_id!r} not found")

    def delete(self, obj_ids: Iterable[int], requester: str) -> None:
        """Drop objects; one owned by someone other than ``requester`` only loses that
        reference, so a peer's dropped pointer never deletes a worker's own data."""
        objects, owners = self.objects, self.owners
        for obj_id in obj_ids:
            if owners.get(obj_id, requester) != requester:
                continue
            if objects.pop(obj_id, _MISSING) is not _MISSING:
                owners.pop(obj_id, None)
            else:  # announced and dropped before it came: its waiters retry and find nothing
                _wake(self.arrivals.pop(obj_id, ()))

    def expect(self, obj_id: int) -> None:
        if obj_id not in self.objects and obj_id not in self.arrivals:
            self.arrivals[obj_id] = []

    def wait(self, obj_id: int) -> asyncio.Future[bool] | None:
        """A future resolved (True) when the announced ``obj_id`` arrives or is dropped;
        ``None`` if it is no longer awaited. Resolve it with False to give up waiting."""
        waiters = self.arrivals.get(obj_id)
        if waiters is None:
            return None
        waiter = asyncio.get_running_loop().create_future()
        waiters.append(waiter)
        return waiter

    def clear(self) -> None:
        self.objects.clear()
        self.owners.clear()
        for waiters in self.arrivals.values():
            _wake(waiters)
        self.arrivals.clear()


def _wake(waiters: Iterable[asyncio.Future[bool]]) -> None:
    for waiter in waiters:
        if not waiter.done():
            waiter.set_result(True)
