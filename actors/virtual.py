"""Virtual workers: real actors in this process, reached through queues.

The frames are exactly those a network transport carries (encoded, then decoded on the other
side), so a scenario that passes here exercises the whole protocol, and data sent to a virtual
worker is a copy: mutating either side never changes the other.
"""

from __future__ import annotations

import asyncio
import collections
import weakref
from typing import Any

from actors.connection import Connection
from actors.remote import RemoteWorker
from actors.transport import FrameHandler, LossHandler, Transport, register_dialer
from actors.worker import Session, Worker
from protocol import AuthenticationFailed, WorkerLost
from protocol.codec import Buffer

_WORKERS: weakref.WeakValueDictionary[str, Worker] = weakref.WeakValueDictionary()


class VirtualTransport(Transport):
    """Frames go straight into the worker's mailbox for this sender; replies come back by call.

    A full mailbox does not block the (synchronous) writer: frames wait in a backlog that a pump
    task feeds into the mailbox as the worker catches up, and ``drain`` waits for that pump.
    """

    def __init__(self, worker: Worker, local_id: str, secret: str | None = None) -> None:
        if not worker.authenticate(local_id, secret):
            worker.log.warning("connection refused", peer=local_id, reason="missing or wrong secret")
            raise AuthenticationFailed(f"{worker.id} refused the credentials of {local_id!r}")
        self.worker = worker
        self.local_id = local_id
        self.address = worker.address
        self._session: Session | None = None
        self._backlog: collections.deque[Buffer] = collections.deque()
        self._pump: asyncio.Task[None] | None = None
        self._lost: WorkerLost | None = None

    def start(self, on_frame: FrameHandler, on_lost: LossHandler) -> None:
        session = self.worker.open_session(self.local_id, on_frame)

        def closed() -> None:
            self._lost = WorkerLost(f"worker {self.worker.id} stopped")
            on_lost(self._lost)

        session.on_close = closed
        self._session = session

    def write(self, frame: Buffer) -> None:
        if self._lost is not None:
            raise self._lost
        assert self._session is not None, "transport not started"
        mailbox = self._session.mailbox
        if self._backlog or mailbox.full():
            self._backlog.append(frame)
            if self._pump is None or self._pump.done():
                self._pump = asyncio.get_running_loop().create_task(self._feed(mailbox))
        else:
            mailbox.put_nowait(frame)

    async def _feed(self, mailbox: asyncio.Queue[Buffer]) -> None:
        backlog = self._backlog
        while backlog:
            await mailbox.put(backlog[0])
            backlog.popleft()

    async def drain(self) -> None:
        if self._pump is not None and not self._pump.done():
            await asyncio.shield(self._pump)

    async def close(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
        self._backlog.clear()
        if self._session is not None:
            self._session.on_close = None
            self._session.close()


def _dial_virtual(address: str, local_id: str, *, secret: str | None = None) -> Transport:
    worker_id = address.removeprefix("virtual://")
    worker = _WORKERS.get(worker_id)
    if worker is None:
        raise WorkerLost(f"no virtual worker {worker_id!r} in this process")
    return VirtualTransport(worker, local_id, secret)


register_dialer("virtual", _dial_virtual)


class VirtualWorker(RemoteWorker):
    """A worker living in this process, used exactly like a network worker.

    Create it inside a running event loop; ``await worker.close()`` (or ``async with``) stops it.
    ``worker.worker`` is the actor itself, for inspection in tests. This handle connects as
    ``local_id`` (with ``local_secret`` when the worker has credentials); others connect with
    ``actors.connect("virtual://<id>", identity=..., secret=...)``, each link its own identity.
    """

    def __init__(
        self, worker_id: str, *, local_id: str = "me", local_secret: str | None = None, **options: Any
    ) -> None:
        existing = _WORKERS.get(worker_id)
        if existing is not None and existing.sessions:
            raise ValueError(f"a virtual worker {worker_id!r} is already running in this process")
        self.worker = Worker(worker_id, **options)
        _WORKERS[worker_id] = self.worker
        transport = VirtualTransport(self.worker, local_id, local_secret)
        super().__init__(worker_id, Connection(local_id, worker_id, transport))

    async def close(self) -> None:
        await super().close()
        await self.worker.close()
        if _WORKERS.get(self.id) is self.worker:
            del _WORKERS[self.id]
