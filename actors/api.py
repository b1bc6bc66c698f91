"""Module-level verbs that work without the torch hook: ``send``, ``get``, ``move``."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from actors.module import get_module, move_module, send_module
from actors.pointer import ObjectPointer, send_tensor

if TYPE_CHECKING:
    from actors.remote import RemoteWorker


def send(obj: Any, worker: RemoteWorker) -> Any:
    """A tensor becomes a pointer; a module's parameters go to ``worker`` (the module is returned)."""
    if isinstance(obj, torch.Tensor):
        return send_tensor(obj, worker)
    if isinstance(obj, nn.Module):
        return send_module(obj, worker)
    raise TypeError(f"cannot send a {type(obj).__name__}: send tensors or modules")


def get(obj: Any) -> Awaitable[Any]:
    """Awaitable of the value behind a pointer, or of a module made local again."""
    if isinstance(obj, ObjectPointer):
        return obj.get()
    if isinstance(obj, nn.Module):
        return get_module(obj)
    raise TypeError(f"cannot get a {type(obj).__name__}: it is not remote")


def move(obj: Any, worker: RemoteWorker) -> Any:
    """Move a pointer's object or a module's parameters to ``worker``, worker to worker."""
    if isinstance(obj, ObjectPointer):
        return obj.move(worker)
    if isinstance(obj, nn.Module):
        return move_module(obj, worker)
    raise TypeError(f"cannot move a {type(obj).__name__}: it is not remote")
