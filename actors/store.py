"""The object store a worker keeps: values by id, who owns each, and their labels.

Labels live beside the values, sparsely: most objects carry none, and the hot path pays one
truth test (``if store.labels``) when no object on the worker is labelled at all. Two more
tables keep labels honest where Python values alias one another:

* ``grad_labels``: what flowed into an object's gradient (written by ``backward``), kept apart
  from the object's own label so that an optimizer step can tell gradients from data copied in;
* ``groups``: objects sharing storage (a view, ``.data``, an operation that returns its input),
  so that writing into one labels all of them. A group is one set shared by its members.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from actors.policy import EMPTY, Label
from protocol import ObjectNotFound, WireError


class Failure:
    """Stands in the store where a command failed, so every command using it fails alike."""

    __slots__ = ("error",)

    def __init__(self, error: WireError) -> None:
        self.error = error

    def __repr__(self) -> str:
        return f"Failure({self.error!r})"


_MISSING: Any = object()


class ObjectStore:
    """Objects by id, their owners and labels, and which of them share storage."""

    __slots__ = ("objects", "owners", "labels", "grad_labels", "groups", "public")

    def __init__(self) -> None:
        self.objects: dict[int, Any] = {}
        self.owners: dict[int, str] = {}
        self.labels: dict[int, Label] = {}
        self.grad_labels: dict[int, Label] = {}
        self.groups: dict[int, set[int]] = {}
        #: Taints this worker's owners let go to anyone (see :meth:`Policy.public`): they
        #: restrict nothing, so they are dropped where they arise, as they are when they leave.
        self.public: Label = EMPTY

    def __len__(self) -> int:
        return len(self.objects)

    def __contains__(self, obj_id: int) -> bool:
        return obj_id in self.objects

    def put(self, obj_id: int, value: Any, owner: str, label: Label = EMPTY) -> None:
        """Store (or replace) an object; a replaced object leaves its storage group."""
        if obj_id in self.groups:
            self._ungroup(obj_id)
        if self.grad_labels:
            self.grad_labels.pop(obj_id, None)
        self.objects[obj_id] = value
        self.owners[obj_id] = owner
        if label and self.public and not label.isdisjoint(self.public):
            label = label - self.public
        if label:
            self.labels[obj_id] = label
        elif self.labels:
            self.labels.pop(obj_id, None)

    def get(self, obj_id: int) -> Any:
        """The value (possibly a :class:`Failure`); ObjectNotFound if there is none."""
        value = self.objects.get(obj_id, _MISSING)
        if value is _MISSING:
            raise ObjectNotFound(f"object {obj_id!r} not found")
        return value

    def drop(self, obj_id: int) -> bool:
        """Forget one object entirely; False if there was none."""
        if self.objects.pop(obj_id, _MISSING) is _MISSING:
            return False
        self.owners.pop(obj_id, None)
        if self.labels:
            self.labels.pop(obj_id, None)
        if self.grad_labels:
            self.grad_labels.pop(obj_id, None)
        if obj_id in self.groups:
            self._ungroup(obj_id)
        return True

    def label(self, obj_id: int) -> Label:
        return self.labels.get(obj_id, EMPTY) if self.labels else EMPTY

    def leaving_label(self, obj_id: int) -> Label:
        """What leaves with the object: its gradient travels with a tensor."""
        label = self.label(obj_id)
        grad = self.grad_labels.get(obj_id) if self.grad_labels else None
        return label | grad if grad else label

    # -- storage groups ---------------------------------------------------------------------
    def members(self, obj_id: int) -> Iterable[int]:
        group = self.groups.get(obj_id)
        return group if group is not None else (obj_id,)

    def alias(self, obj_ids: Iterable[int]) -> None:
        """Record that these objects share storage."""
        merged: set[int] = set()
        for obj_id in obj_ids:
            if obj_id in self.objects:
                merged |= self.groups.get(obj_id, {obj_id})
        if len(merged) > 1:
            for obj_id in merged:
                self.groups[obj_id] = merged

    def grow(self, obj_id: int, label: Label) -> None:
        """Add ``label`` to the object and to everything sharing its storage."""
        if label and self.public and not label.isdisjoint(self.public):
            label = label - self.public
        if not label:
            return
        labels = self.labels
        for member in self.members(obj_id):
            if member in self.objects:
                old = labels.get(member)
                labels[member] = old | label if old else label

    def grow_grad(self, obj_id: int, label: Label) -> None:
        if label and self.public and not label.isdisjoint(self.public):
            label = label - self.public
        if label:
            old = self.grad_labels.get(obj_id)
            self.grad_labels[obj_id] = old | label if old else label

    def _ungroup(self, obj_id: int) -> None:
        group = self.groups.pop(obj_id)
        group.discard(obj_id)
        if len(group) == 1:
            self.groups.pop(next(iter(group)), None)

    def ids_owned_by(self, owner: str) -> Iterator[int]:
        return (obj_id for obj_id, o in self.owners.items() if o == owner)

    def clear(self) -> None:
        self.objects.clear()
        self.owners.clear()
        self.labels.clear()
        self.grad_labels.clear()
        self.groups.clear()
