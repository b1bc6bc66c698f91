"""The opt-in hook, in the spirit of the paper's ``hook.py``.

``hook_torch()`` adds ``send``/``get``/``move`` to ``torch.Tensor`` and ``torch.nn.Module`` so
scripts read like the paper (``x.send(bob)``, ``model.send(bob)``, ``await model.get()``).
Nothing in aiosyft needs it; ``unhook_torch()`` takes it away again. Rooms above this one add
their own methods (``mpc``: ``fix_precision``, ``share``) with :func:`provide`, so the hook
installs them without importing upward.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from actors.api import get, move, send
from actors.module import location_of

_ADDED: list[tuple[type, str]] = []
_PROVIDED: dict[tuple[type, str], Any] = {}


def provide(cls: type, name: str, value: Any) -> None:
    """Have :func:`hook_torch` add ``value`` as ``cls.name`` (now, if the hook is already in)."""
    _PROVIDED[(cls, name)] = value
    if _ADDED and (cls, name) not in _ADDED:
        _add(cls, name, value)


def _add(cls: type, name: str, value: Any) -> None:
    if name in vars(cls):
        raise RuntimeError(f"{cls.__name__}.{name} already exists; refusing to replace it")
    setattr(cls, name, value)
    _ADDED.append((cls, name))


def hook_torch() -> None:
    """Install the methods (idempotent)."""
    if _ADDED:
        return
    _add(torch.Tensor, "send", send)
    _add(nn.Module, "send", send)
    _add(nn.Module, "get", get)
    _add(nn.Module, "move", move)
    _add(nn.Module, "location", property(location_of))
    for (cls, name), value in _PROVIDED.items():
        _add(cls, name, value)


def unhook_torch() -> None:
    """Remove what :func:`hook_torch` added."""
    while _ADDED:
        cls, name = _ADDED.pop()
        delattr(cls, name)
