"""Serving a worker on the network, and connecting to one.

``serve`` puts a :class:`~actors.worker.Worker` behind WebSocket or TCP; ``connect`` returns a
:class:`~actors.remote.RemoteWorker` handle used exactly like a ``VirtualWorker``.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from aiohttp import web

from actors.connection import Connection
from actors.identity import IDENTITY_ENV, SECRET_ENV
from actors.remote import RemoteWorker
from actors.tcp import TcpTransport, serve_tcp
from actors.tls import SECURE_SCHEMES, TlsConfig, scheme_of
from actors.transport import Transport, dial
from actors.worker import Worker
from actors.ws import WebSocketTransport, serve_ws
from protocol import DEFAULT_MAX_FRAME, Codec

TRANSPORTS = ("ws", "tcp")


class Server:
    """A worker listening on one address; ``await server.close()`` stops both."""

    def __init__(self, worker: Worker, address: str, handle: web.AppRunner | asyncio.Server) -> None:
        self.worker = worker
        self.address = address
        self._handle = handle

    async def close(self) -> None:
        # The worker first: closing its sessions closes their links, its peer links go too, so
        # no open connection (a peer's, or our own to a peer) holds the listener's shutdown up.
        if isinstance(self._handle, asyncio.Server):
            self._handle.close()
        await self.worker.close()
        if isinstance(self._handle, web.AppRunner):
            await self._handle.cleanup()
        else:
            await self._handle.wait_closed()


async def serve(
    worker: Worker, transport: str, host: str = "127.0.0.1", port: int = 0, *, tls: TlsConfig | None = None
) -> Server:
    """Serve ``worker`` over ``transport`` ("ws" or "tcp"); port 0 picks a free port.

    With ``tls`` (default: the worker's own :attr:`~actors.Worker.tls`) it listens on
    ``wss://`` or ``tls://`` only, and the worker dials its peers with the same certificates.
    """
    tls = tls if tls is not None else worker.tls
    worker.tls = tls
    if transport == "ws":
        runner, address = await serve_ws(worker, host, port, tls)
        worker.address = address
        return Server(worker, address, runner)
    if transport == "tcp":
        server, address = await serve_tcp(worker, host, port, tls)
        worker.address = address
        return Server(worker, address, server)
    raise ValueError(f"unknown transport {transport!r}; expected one of {TRANSPORTS}")


async def connect(
    address: str,
    *,
    identity: str | None = None,
    secret: str | None = None,
    max_frame_size: int = DEFAULT_MAX_FRAME,
    timeout: float = 10.0,
    reply_timeout: float | None = None,
    tls: TlsConfig | None = None,
) -> RemoteWorker:
    """Connect to the worker at ``ws://host:port``, ``tcp://host:port`` or ``virtual://id``,
    authenticating as ``identity`` with ``secret`` (default: ``$AIOSYFT_IDENTITY``, else
    ``"me"``, and ``$AIOSYFT_SECRET``).

    ``wss://host:port`` and ``tls://host:port`` are dialled over mutual TLS with ``tls`` (default:
    the ``$AIOSYFT_TLS_*`` configuration); with TLS configured, a plaintext network address is
    refused (:class:`~actors.tls.InsecureAddress`) before anything is sent.

    Returns once the worker has answered, so wrong credentials (:class:`AuthenticationFailed`) or an
    unreachable address (:class:`WorkerLost`) surfaces here, not at the first operation.
    ``timeout`` bounds the connection; ``reply_timeout`` (off by default: a remote job may
    legitimately run long) declares the worker lost when any answer takes longer than that.
    """
    local_id = identity if identity is not None else os.environ.get(IDENTITY_ENV) or "me"
    secret = secret if secret is not None else os.environ.get(SECRET_ENV) or None
    tls = tls if tls is not None else TlsConfig.from_environment()
    transport: Transport
    scheme = scheme_of(address)
    if scheme in ("ws", "wss"):
        transport = WebSocketTransport(
            address, local_id, secret=secret, max_frame_size=max_frame_size, tls=tls
        )
    elif scheme in ("tcp", *(s for s, plain in SECURE_SCHEMES.items() if plain == "tcp")):
        transport = TcpTransport(address, local_id, secret=secret, max_frame_size=max_frame_size, tls=tls)
    elif scheme == "virtual":
        transport = dial(address, local_id, secret=secret)
    else:
        raise ValueError(
            f"cannot connect to {address!r}: use ws://host:port, tcp://host:port, wss://host:port, "
            "tls://host:port or virtual://id"
        )
    connection = Connection(local_id, address, transport, Codec(max_frame_size), reply_timeout=reply_timeout)
    worker = RemoteWorker(address, connection)
    try:
        status: dict[str, Any] = await asyncio.wait_for(worker.ping(), timeout)
    except BaseException:
        await connection.close()
        raise
    worker.id = connection.remote_id = str(status["id"])
    return worker
