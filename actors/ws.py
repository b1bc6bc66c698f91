"""Workers over WebSocket (aiohttp): one binary WebSocket message per frame.

``GET /ws`` upgrades once ``Authorization: Bearer <secret>`` proved the identity ``X-Aiosyft-Id``
names (checked before the upgrade, so an unauthenticated peer never gets to send a message); that
identity is then the sender of everything on the link. ``GET /health`` answers the worker's id,
objects held, uptime and protocol version, for launchers and load balancers.

Nothing costly happens before authentication: until a peer's upgrade was accepted, the worker
reads at most :data:`_REQUEST_LIMIT` bytes from it (request line, headers and any body together:
aiohttp's own limits allow ~2 MiB of headers per connection) and closes the connection beyond
that, or after :data:`_CONNECT_TIMEOUT`; no handler reads a request body, and one left unread
closes the connection instead of being drained. ``max_msg_size`` (the frame limit) applies only
after the upgrade.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ssl
from collections.abc import Coroutine
from typing import Any

import aiohttp
from aiohttp import web

from actors.log import get_logger
from actors.tls import TlsConfig, client_side, register_secure_dialer, serve_tls_connections
from actors.transport import DialingTransport, FlowControl, register_dialer
from actors.worker import Worker
from protocol import DEFAULT_MAX_FRAME, AuthenticationFailed, WorkerLost
from protocol.codec import Buffer

ID_HEADER = "X-Aiosyft-Id"
_CONNECT_TIMEOUT = 10.0
#: All an unauthenticated peer may send: an upgrade request is a few hundred bytes (aiosyft's
#: client sends ~300); this leaves room for what proxies add.
_REQUEST_LIMIT = 16 * 1024
_log = get_logger()


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


class _Unauthenticated(asyncio.BufferedProtocol):
    """Stands between a new connection and aiohttp until the peer has authenticated.

    It reads into a buffer of its own, :data:`_REQUEST_LIMIT` bytes at most over the whole
    connection, and hands what it read to aiohttp's request handler; past the limit, or
    :data:`_CONNECT_TIMEOUT` after the connection (or its last served ``/health``), it closes the
    connection. Once the upgrade is accepted (:meth:`authenticated`) it steps aside: the transport
    talks to aiohttp directly, at full speed and under the frame limit.
    """

    def __init__(self, handler: asyncio.Protocol) -> None:
        self.handler = handler
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray(_REQUEST_LIMIT + 1)
        self._read = 0
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self._expire_later()
        self.handler.connection_made(transport)

    def _expire_later(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = asyncio.get_running_loop().call_later(_CONNECT_TIMEOUT, self._expire)

    def _expire(self) -> None:
        if self.transport is not None:
            _log.warning("unauthenticated connection timed out", peer=str(self._peer()))
            self.transport.abort()

    def _peer(self) -> object:
        return self.transport.get_extra_info("peername") if self.transport is not None else None

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self._buffer)[: len(self._buffer) - self._read]

    def buffer_updated(self, nbytes: int) -> None:
        self._read += nbytes
        if self._read > _REQUEST_LIMIT:
            _log.warning("unauthenticated request too large, closing the connection", peer=str(self._peer()))
            assert self.transport is not None
            self.transport.abort()
            return
        self.handler.data_received(bytes(memoryview(self._buffer)[:nbytes]))

    def eof_received(self) -> bool | None:
        return self.handler.eof_received()

    def pause_writing(self) -> None:
        self.handler.pause_writing()

    def resume_writing(self) -> None:
        self.handler.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop()
        self.handler.connection_lost(exc)

    def _stop(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._buffer = bytearray()

    def authenticated(self) -> None:
        """The peer proved its identity: aiohttp reads the connection itself from now on."""
        self._stop()
        if self.transport is not None:
            self.transport.set_protocol(self.handler)

    def served(self) -> None:
        """A request that needs no identity (``/health``) was answered: its bytes are paid for."""
        self._read = 0
        self._expire_later()


def _guard(request: web.BaseRequest) -> _Unauthenticated | None:
    transport = request.transport
    protocol = transport.get_protocol() if transport is not None else None
    return protocol if isinstance(protocol, _Unauthenticated) else None


class _GuardedSite(web.BaseSite):
    """A TCP site whose connections start behind :class:`_Unauthenticated` (and with ``ssl``, after
    the TLS handshake: a peer without a certificate from the CA never reaches aiohttp)."""

    def __init__(
        self, runner: web.BaseRunner, host: str, port: int, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context)
        self._host, self._port = host, port

    @property
    def name(self) -> str:
        return f"{'https' if self._ssl_context else 'http'}://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        handlers = self._runner.server
        assert handlers is not None
        # BaseSite.stop() closes self._server; runner.addresses reads its sockets.
        if self._ssl_context is None:
            self._server = await asyncio.get_running_loop().create_server(
                lambda: _Unauthenticated(handlers()), self._host, self._port
            )
        else:  # TLS on the socket itself (actors.tls.TlsSocketTransport), not asyncio's TLS layer
            self._server = await serve_tls_connections(
                lambda: _Unauthenticated(handlers()),
                self._host,
                self._port,
                self._ssl_context,
                handshake_timeout=_CONNECT_TIMEOUT,
                on_refused=lambda peer, exc: _log.warning(
                    "TLS handshake failed", peer=str(peer), reason=str(exc)
                ),
            )


def _bearer(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    return header[7:] if header.startswith("Bearer ") else None


def make_app(worker: Worker) -> web.Application:
    """The aiohttp application serving ``worker``."""
    log = get_logger(worker=worker.id)
    max_frame_size = worker.codec.max_frame_size

    async def health(request: web.Request) -> web.Response:
        guard = _guard(request)
        if guard is not None:
            guard.served()
        return web.json_response(worker.status())

    async def protocol(request: web.Request) -> web.StreamResponse:
        peer_id = request.headers.get(ID_HEADER, "")
        if not worker.authenticate(peer_id, _bearer(request)):
            log.warning(
                "connection refused", peer=str(request.remote), identity=peer_id, reason="wrong credentials"
            )
            refused = web.Response(status=401, text="missing or wrong credentials")
            refused.force_close()  # a refused peer has nothing more to say on this connection
            return refused
        guard = _guard(request)
        if guard is not None:
            guard.authenticated()
        ws = web.WebSocketResponse(max_msg_size=max_frame_size, compress=False)
        try:
            await ws.prepare(request)
        except ValueError as exc:  # aiohttp reads Sec-WebSocket-Key as text and may fail on it
            log.warning("connection refused", peer=str(request.remote), identity=peer_id, reason=str(exc))
            refused = web.Response(status=400, text="unreadable WebSocket handshake")
            refused.force_close()
            return refused
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
            while not mailbox.empty():  # frames the closed session will never read: let go of them now
                mailbox.get_nowait()
            outbox.close(WorkerLost(f"{peer_id} disconnected"))
        return ws

    app = web.Application(client_max_size=_REQUEST_LIMIT)  # no handler reads a body; none may be large
    app.router.add_get("/health", health)
    app.router.add_get("/ws", protocol)
    return app


async def serve_ws(
    worker: Worker, host: str, port: int, tls: TlsConfig | None = None
) -> tuple[web.AppRunner, str]:
    """Serve ``worker`` on ``ws://host:port`` (port 0 picks a free one), or with ``tls`` on
    ``wss://host:port`` only; returns the address."""
    runner = web.AppRunner(
        make_app(worker), access_log=None, handle_signals=False, shutdown_timeout=2.0, lingering_time=0
    )  # lingering_time 0: a request body nobody read closes the connection, it is not drained
    await runner.setup()
    site = _GuardedSite(runner, host, port, tls.server_context() if tls is not None else None)
    await site.start()
    bound = runner.addresses[0]  # the first socket's, should the host resolve to several
    return runner, f"{'wss' if tls is not None else 'ws'}://{host}:{bound[1]}"


class WebSocketTransport(DialingTransport):
    """Client end of a WebSocket link: ``ws://host:port``, or with ``tls`` ``wss://host:port``."""

    scheme = "ws"
    _session: aiohttp.ClientSession | None = None
    _outbox: _Outbox | None = None

    def __init__(
        self,
        address: str,
        local_id: str,
        *,
        secret: str | None = None,
        max_frame_size: int = DEFAULT_MAX_FRAME,
        tls: TlsConfig | None = None,
    ) -> None:
        scheme, context = client_side(address, tls)  # a plaintext address with TLS on is refused
        if scheme is not None:
            self.scheme = scheme  # split_address checks the address against it
        super().__init__(address, local_id, secret=secret, max_frame_size=max_frame_size)
        self._ssl: ssl.SSLContext | bool = context if context is not None else True

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
                ssl=self._ssl,
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
        except Exception as exc:  # any way of not getting through is a named failure, never silence
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
register_secure_dialer(
    "wss",
    lambda address, local_id, *, secret, tls: WebSocketTransport(address, local_id, secret=secret, tls=tls),
)
