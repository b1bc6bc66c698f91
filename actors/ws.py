"""Workers over WebSocket (aiohttp): one binary WebSocket message per frame.

``GET /ws`` upgrades once ``Authorization: Bearer <secret>`` proved the identity ``X-Aiosyft-Id``
names (checked before the upgrade, so an unauthenticated peer never gets to send a message); that
identity is then the sender of everything on the link. ``GET /health`` answers the worker's id,
objects held, uptime and protocol version, for launchers and load balancers.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Coroutine
from typing import Any

import aiohttp
from aiohttp import web

from actors.log import get_logger
from actors.transport import DialingTransport, FlowControl, register_dialer
from actors.worker import Worker
from protocol import AuthenticationFailed, WorkerLost
from protocol.codec import Buffer

ID_HEADER = "X-Aiosyft-Id"
_CONNECT_TIMEOUT = 10.0


class _Outbox:
    """Frames to send on one WebSocket, in order, started at once.

    ``send_bytes`` is a coroutine while the worker's and the connection's ``send`` are not. It
    only suspends when the socket is full, so the outbox steps it right away (``coro.send(None)``)
    and hands the rest of the write to a task only if it does suspend: a frame leaves in the same
    turn of the event loop, with no writer task to wake (one loop iteration less per message each
    way). Frames sent meanwhile queue and that task writes them too; the flow pauses while more
    than ``limit`` bytes wait.
    """

    def __init__(
        self, ws: web.WebSocketResponse | aiohttp.ClientWebSocketResponse, limit: int = 1 << 22
    ) -> None:
        self.ws = ws
        self.flow = FlowControl()
        self.limit = limit
        self._frames: collections.deque[Buffer] = collections.deque()
        self._bytes = 0
        self._writing: Coroutine[Any, Any, None] | None = None
        self._finisher: asyncio.Task[None] | None = None
        self._closed: BaseException | None = None
        self._idle = asyncio.Event()
        self._idle.set()

    def send(self, frame: Buffer) -> None:
        if self._closed is not None:
            raise self._closed
        if self._writing is not None:
            self._frames.append(frame)
            self._bytes += len(frame)
            if self._bytes > self.limit:
                self.flow.pause()
            return
        self._idle.clear()
        self._writing = writing = self.ws.send_bytes(frame)
        try:
            blocker = writing.send(None)
        except StopIteration:
            self._writing = None
            self._idle.set()
            return
        except Exception as exc:
            self.close(WorkerLost(f"websocket write failed: {exc}"))
            return
        self._finisher = asyncio.get_running_loop().create_task(self._finish(blocker))

    async def _finish(self, blocker: Any) -> None:
        """Finish the suspended write, then write the frames queued meanwhile, in order."""
        try:
            while True:
                writing = self._writing
                assert writing is not None
                while True:
                    if blocker is None:  # a bare yield: try again next turn
                        await asyncio.sleep(0)
                    else:
                        # Shielded: aiohttp shares its drain future among writers, and close()
                        # cancelling this task must not cancel it under them.
                        with contextlib.suppress(Exception):  # the write raises it when stepped on
                            await asyncio.shield(blocker)
                    try:
                        blocker = writing.send(None)
                    except StopIteration:
                        break
                while True:  # start the queued frames until one suspends, or none is left
                    if not self._frames:
                        self._writing = self._finisher = None
                        self._idle.set()
                        self.flow.resume()
                        return
                    frame = self._frames.popleft()
                    self._bytes -= len(frame)
                    self._writing = self.ws.send_bytes(frame)
                    try:
                        blocker = self._writing.send(None)
                    except StopIteration:
                        continue
                    break
        except asyncio.CancelledError:
            self._finisher = None
            self.close(WorkerLost("websocket write cancelled"))
            raise
        except Exception as exc:
            self._finisher = None
            self.close(WorkerLost(f"websocket write failed: {exc}"))

    async def flushed(self) -> None:
        """Wait until every queued frame has been handed to the socket."""
        if self._closed is None:
            await self._idle.wait()

    def close(self, exc: BaseException) -> None:
        if self._closed is None:
            self._closed = exc
            if self._writing is not None:
                self._writing.close()
                self._writing = None
            if self._finisher is not None:
                self._finisher.cancel()
                self._finisher = None
            self._frames.clear()
            self._idle.set()
            self.flow.fail(exc)


def _bearer(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    return header[7:] if header.startswith("Bearer ") else None


def make_app(worker: Worker) -> web.Application:
    """The aiohttp application serving ``worker``."""
    log = get_logger(worker=worker.id)
    max_frame_size = worker.codec.max_frame_size

    async def health(request: web.Request) -> web.Response:
        return web.json_response(worker.status())

    async def protocol(request: web.Request) -> web.StreamResponse:
        peer_id = request.headers.get(ID_HEADER, "")
        if not worker.authenticate(peer_id, _bearer(request)):
            log.warning(
                "connection refused", peer=str(request.remote), identity=peer_id, reason="wrong credentials"
            )
            return web.Response(status=401, text="missing or wrong credentials")
        ws = web.WebSocketResponse(max_msg_size=max_frame_size, compress=False)
        await ws.prepare(request)
        outbox = _Outbox(ws)
        session = worker.open_session(peer_id, outbox.send)
        session.flow = outbox.flow
        session.on_close = lambda: asyncio.ensure_future(ws.close())
        log.info("connected", peer=peer_id, address=str(request.remote))
        mailbox = session.mailbox
        try:
            async for message in ws:
                if message.type is aiohttp.WSMsgType.BINARY:
                    await mailbox.put(message.data)
                elif message.type is aiohttp.WSMsgType.ERROR:
                    log.warning("websocket error", peer=peer_id, error=str(ws.exception()))
                    break
                else:
                    log.warning("non-binary websocket message ignored", peer=peer_id, kind=str(message.type))
        finally:
            session.on_close = None
            session.close()
            outbox.close(WorkerLost(f"{peer_id} disconnected"))
        return ws

    app = web.Application(client_max_size=max_frame_size)
    app.router.add_get("/health", health)
    app.router.add_get("/ws", protocol)
    return app


async def serve_ws(worker: Worker, host: str, port: int) -> tuple[web.AppRunner, str]:
    """Serve ``worker`` on ``ws://host:port`` (port 0 picks a free one); returns the address."""
    runner = web.AppRunner(make_app(worker), access_log=None, handle_signals=False, shutdown_timeout=2.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0]  # the first socket's, should the host resolve to several
    return runner, f"ws://{host}:{bound[1]}"


class WebSocketTransport(DialingTransport):
    """Client end of a WebSocket link."""

    _session: aiohttp.ClientSession | None = None
    _outbox: _Outbox | None = None

    async def _run(self) -> None:
        headers = {ID_HEADER: self.local_id}
        if self.secret:
            headers["Authorization"] = f"Bearer {self.secret}"
        self._session = aiohttp.ClientSession()
        try:
            ws = await self._session.ws_connect(
                self.address.rstrip("/") + "/ws",
                headers=headers,
                max_msg_size=self.max_frame_size,
                compress=0,
                timeout=aiohttp.ClientWSTimeout(ws_close=_CONNECT_TIMEOUT),
            )
        except aiohttp.WSServerHandshakeError as exc:
            refused = exc.status == 401
            self._fail(
                AuthenticationFailed(f"{self.address} refused the credentials of {self.local_id!r}")
                if refused
                else WorkerLost(f"cannot reach {self.address}: {exc}")
            )
            await self._closed()
            return
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            self._fail(WorkerLost(f"cannot reach {self.address}: {exc}"))
            await self._closed()
            return
        self._outbox = _Outbox(ws)
        self._connected(self._outbox)
        reason: Any = "closed by the worker"
        try:
            async for message in ws:
                if message.type is aiohttp.WSMsgType.BINARY:
                    self._on_frame(message.data)
                elif message.type is aiohttp.WSMsgType.ERROR:
                    reason = ws.exception()
                    break
        except Exception as exc:
            reason = exc
        self._fail(WorkerLost(f"lost the connection to {self.address}: {reason}"))
        await self._closed()

    async def close(self) -> None:
        if self._outbox is not None and self._lost is None:
            await self._outbox.flushed()
        await super().close()

    async def _closed(self) -> None:
        if self._outbox is not None:
            self._outbox.close(WorkerLost(f"connection to {self.address} closed"))
        if self._session is not None:
            await self._session.close()


register_dialer(
    "ws", lambda address, local_id, *, secret: WebSocketTransport(address, local_id, secret=secret)
)
