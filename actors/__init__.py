"""The runtime: workers as asyncio actors, their stores, transports and pointers."""

from actors.api import get, move, send
from actors.connection import Connection
from actors.context import Context
from actors.flows import start_flow
from actors.hook import hook_torch, unhook_torch
from actors.identity import Credentials, derive_secret, new_secret
from actors.module import RemoteOptimizer, get_module, move_module, send_module
from actors.net import Server, connect, serve
from actors.pointer import ObjectPointer, PointerTensor, new_object_id
from actors.policy import ModelUpdates, Public, Release, release_kind
from actors.registry import command, label_rule
from actors.remote import RemoteWorker
from actors.transport import Transport, dial, register_dialer
from actors.virtual import VirtualWorker
from actors.worker import Worker

__all__ = [
    "Connection",
    "Context",
    "Credentials",
    "ModelUpdates",
    "Public",
    "Release",
    "ObjectPointer",
    "PointerTensor",
    "RemoteOptimizer",
    "RemoteWorker",
    "Server",
    "Transport",
    "VirtualWorker",
    "Worker",
    "command",
    "connect",
    "derive_secret",
    "dial",
    "get",
    "get_module",
    "hook_torch",
    "label_rule",
    "move",
    "move_module",
    "new_object_id",
    "new_secret",
    "register_dialer",
    "release_kind",
    "send",
    "send_module",
    "serve",
    "start_flow",
    "unhook_torch",
]
