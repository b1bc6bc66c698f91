"""Models on remote workers: the module stays here, its parameters live there.

``send_module`` replaces every parameter and buffer of a ``torch.nn.Module`` by a pointer to a
copy on the worker. The module's own ``forward`` then runs unchanged on this side, and each torch
operation in it becomes a pipelined command on the worker, so any module whose forward is made of
allowlisted operations trains remotely with no model code on the worker and nothing executable on
the wire. ``loss.backward()`` and :class:`RemoteOptimizer` steps run where the parameters are.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from actors.log import get_logger
from actors.pointer import ObjectPointer, PointerTensor, call, move_pointers, send_tensor
from protocol.allowlist import name_of

_log = get_logger()

if TYPE_CHECKING:
    from actors.remote import RemoteWorker


def _slots(module: nn.Module) -> Iterator[tuple[dict[str, Any], str]]:
    """Every (dict, name) that holds a parameter or buffer, submodules included."""
    for sub in module.modules():
        for table in (sub._parameters, sub._buffers):
            for name in table:
                if table[name] is not None:
                    yield table, name


def send_module(module: nn.Module, worker: RemoteWorker) -> nn.Module:
    """Place ``module``'s parameters and buffers on ``worker``; returns ``module``."""
    sent: dict[int, PointerTensor] = {}  # tied weights stay tied
    for table, name in _slots(module):
        value = table[name]
        if isinstance(value, ObjectPointer):
            raise ValueError(f"{type(module).__name__}.{name} is already on {value.location.id}")
        pointer = sent.get(id(value))
        if pointer is None:
            pointer = sent[id(value)] = send_tensor(value, worker)
        table[name] = pointer
    return module


def module_pointers(module: nn.Module) -> list[PointerTensor]:
    """The distinct pointers standing in for ``module``'s parameters and buffers."""
    seen: dict[int, PointerTensor] = {}
    for table, name in _slots(module):
        value = table[name]
        if isinstance(value, PointerTensor):
            seen.setdefault(id(value), value)
    return list(seen.values())


def location_of(module: nn.Module) -> RemoteWorker | None:
    """Where ``module``'s parameters are, or ``None`` if they are here."""
    pointers = module_pointers(module)
    return pointers[0].location if pointers else None


def move_module(module: nn.Module, worker: RemoteWorker) -> nn.Module:
    """Move the parameters worker to worker (the leader relays nothing); returns ``module``."""
    move_pointers(module_pointers(module), worker)
    return module


async def get_module(module: nn.Module) -> nn.Module:
    """Bring the parameters (with their gradients) back; returns ``module``, local again."""
    pointers = module_pointers(module)
    values = await asyncio.gather(*(p.get() for p in pointers))
    fetched = {id(p): v for p, v in zip(pointers, values, strict=True)}
    for table, name in _slots(module):
        value = table[name]
        if isinstance(value, PointerTensor):
            table[name] = fetched[id(value)]
    return module


class RemoteOptimizer:
    """A ``torch.optim`` optimizer that lives with the parameters it updates.

    Plain SGD (no momentum, dampening or Nesterov) is stateless: each step is one command on
    whatever worker the parameters are on, so a model can walk between workers freely. Any other
    optimizer is built on the parameters' worker and rebuilt if they move; its state (momentum,
    Adam moments) does not follow them, which a warning says.
    """

    def __init__(
        self, optimizer_cls: type[torch.optim.Optimizer], params: Iterable[Any], **hyper: Any
    ) -> None:
        self._op = name_of(optimizer_cls)  # raises CommandNotAllowed for unknown optimizers
        self.params = list(params)
        if not self.params or not all(isinstance(p, PointerTensor) for p in self.params):
            raise TypeError("RemoteOptimizer needs the pointer parameters of a sent module")
        self.hyper = hyper
        self._stateless = optimizer_cls is torch.optim.SGD and set(hyper) <= {"lr", "weight_decay"}
        if self._stateless and "lr" not in hyper:
            raise TypeError("SGD needs a learning rate")
        self._remote: ObjectPointer | None = None
        self._built_for: tuple[Any, ...] = ()

    def _location(self) -> RemoteWorker:
        location = self.params[0].location
        if any(p.location is not location for p in self.params):
            raise ValueError("the parameters of one optimizer must live on one worker")
        return location

    def _handle(self) -> ObjectPointer:
        location = self._location()
        key = (location, *(p.id for p in self.params))
        if self._remote is None or key != self._built_for:
            if self._remote is not None:
                _log.warning("optimizer rebuilt where its parameters moved; its state did not follow",
                             optimizer=self._op, worker=location.id)  # fmt: skip
            self._remote = call(location, self._op, [self.params], self.hyper, ObjectPointer)
            self._built_for = key
        return self._remote

    def zero_grad(self) -> ObjectPointer:
        return call(self._location(), "optim.zero_grad", [self.params], None, ObjectPointer)

    def step(self, *, zero_grad: bool = False) -> ObjectPointer:
        """One step; ``zero_grad=True`` also drops the gradients, as ``zero_grad()`` right after
        would (one command instead of two, and no gradients to carry if the model moves next)."""
        if self._stateless:
            options = {**self.hyper, "zero_grad": True} if zero_grad else self.hyper
            return call(self._location(), "optim.sgd_step", [self.params], options, ObjectPointer)
        if zero_grad:
            self.step()
            return self.zero_grad()
        handle = self._handle()
        return call(handle.location, "Optimizer.step", [handle], None, ObjectPointer)
