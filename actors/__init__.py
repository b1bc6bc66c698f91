"""The runtime: workers as asyncio actors, their stores, transports and pointers."""

from actors.api import get, move, send
from actors.connection import Connection
from actors.hook import hook_torch, unhook_torch
from actors.module import RemoteOptimizer, get_module, move_module, send_module
from actors.net import Server, connect, serve
from actors.pointer import ObjectPointer, PointerTensor, new_object_id
from actors.remote import RemoteWorker
from actors.transport import Transport, dial, register_dialer
from actors.virtual import VirtualWorker
from actors.worker import Worker

__all__ = [
    "Connection",
    "ObjectPointer",
    "PointerTensor",
    "RemoteOptimizer",
    "RemoteWorker",
    "Server",
    "Transport",
    "VirtualWorker",
    "Worker",
    "connect",
    "dial",
    "get",
    "get_module",
    "hook_torch",
    "move",
    "move_module",
    "new_object_id",
    "register_dialer",
    "send",
    "send_module",
    "serve",
    "unhook_torch",
]
