"""Workers over WebSocket (aiohttp): one binary WebSocket message per frame.

``GET /ws`` upgrades to the protocol once the ``Authorization: Bearer <token>`` header matched
(checked before the upgrade, so an unauthenticated peer never gets to send a message);
``X-Aiosyft-Id`` names the sender. ``GET /health`` answers the worker's id, objects held, uptime
and protocol version, for launchers and load balancers.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any

import aiohttp
from aiohttp import web

from actors.auth import token_matches
from actors.log import get_logger
from actors.transport import DialingTransport, FlowControl, register_dialer
from actors.worker import Worker
from protocol import DEFAULT_MAX_FRAME, AuthenticationFailed, WorkerLost
from protocol.codec import Buffer

ID_HEADER = "X-Aiosyft-Id"
_CONNECT_TIMEOUT = 10.0


class _Outbox:
    """Frames to send on one WebSocket, in order, by one writer task.

    ``send_bytes`` is a coroutine while the worker's and the connection's ``send`` are not; the
    outbox bridges them and pauses the flow while more than ``limit`` bytes wait.
    """

    def __init__(
        self, ws: web.WebSocketResponse | aiohttp.ClientWebSocketResponse, limit: int = 1 << 22
    ) -> None:
        self.ws = ws
        self.flow = FlowControl()
        self.limit = limit
        self._frames: collections.deque[Buffer] = collections.deque()
        self._bytes = 0
        self._wake = asyncio.Event()
        self.task = asyncio.get_running_loop().create_task(self._write())

    def send(self, frame: Buffer) -> None:
        self._frames.append(frame)
        self._bytes += len(frame)
        if self._bytes > self.limit:
            self.flow.pause()
        self._wake.set()

    async def _write(self) -> None:
        frames = self._frames
        while True:
            await self._wake.wait()
            self._wake.clear()
            while frames:
                frame = frames.popleft()
                self._bytes -= len(frame)
                await self.ws.send_bytes(frame)
            self.flow.resume()

    async def flushed(self) -> None:
        while self._frames and not self.task.done():
            await asyncio.sleep(0)

    def close(self, exc: BaseException) -> None:
        self.task.cancel()
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
        if not token_matches(worker.token, _bearer(request)):
            log.warning("connection refused", peer=str(request.remote), reason="missing or wrong token")
            return web.Response(status=401, text="missing or wrong token")
        peer_id = request.headers.get(ID_HEADER, "anonymous")
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
    server = site._server
    assert server is not None
    bound = server.sockets[0].getsockname()  # type: ignore[union-attr]
    return runner, f"ws://{host}:{bound[1]}"


class WebSocketTransport(DialingTransport):
    """Client end of a WebSocket link."""

    def __init__(
        self,
        address: str,
        local_id: str,
        *,
        token: str | None = None,
        max_frame_size: int = DEFAULT_MAX_FRAME,
    ) -> None:
        super().__init__(address, local_id, token=token, max_frame_size=max_frame_size)
        self._session: aiohttp.ClientSession | None = None
        self._outbox: _Outbox | None = None

    async def _run(self) -> None:
        headers = {ID_HEADER: self.local_id}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
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
                AuthenticationFailed(f"{self.address} refused the token")
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


register_dialer("ws", lambda address, local_id, *, token: WebSocketTransport(address, local_id, token=token))
