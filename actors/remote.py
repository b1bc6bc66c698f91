"""The handle a script holds for a worker: a plain reference, whatever the transport.

``tell`` and ``ask`` live on its :class:`~actors.connection.Connection`; pointer operators and
module proxies are sugar built on top of it (see :mod:`actors.pointer`, :mod:`actors.module`).
"""

from __future__ import annotations

from types import TracebackType
from typing import Any, Self

from actors.api import send
from actors.connection import Connection
from actors.pointer import PointerTensor
from protocol import Ping, published_id


class RemoteWorker:
    """A reference to one worker: where it is and the connection that reaches it."""

    def __init__(self, worker_id: str, connection: Connection) -> None:
        self.id = worker_id
        self.connection = connection

    @property
    def address(self) -> str:
        return self.connection.address

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id} at {self.address}>"

    def send(self, obj: Any) -> Any:
        """Send a tensor (returns a pointer) or a module (its parameters move here)."""
        return send(obj, self)

    def published(self, name: str) -> Any:
        """A pointer to the worker's own object ``name`` (its data): compute on it there; it can
        be neither fetched nor moved. No message is sent; ``await`` it to learn its shape."""
        return PointerTensor(self, published_id(name))

    async def ping(self) -> dict[str, Any]:
        """The worker's status: id, objects held, uptime, protocol version."""
        connection = self.connection
        status: dict[str, Any] = await connection.ask(Ping(connection.next_id(), connection.local_id))
        return status

    async def drain(self) -> None:
        """Wait until everything sent so far is in the worker's mailbox (backpressure)."""
        await self.connection.drain()

    async def close(self) -> None:
        await self.connection.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
