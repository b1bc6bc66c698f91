"""Workers over plain TCP: length-prefixed frames on an asyncio BufferedProtocol.

Record: ``length u32 (little endian) | frame``. Small frames are written with their length in one
``write`` (one segment, one syscall); large ones are read straight into a buffer of their own, so a
64 MiB tensor is received without being copied again and decodes as a view of that buffer.

The first record each way is a handshake, not a protocol message: the client sends
``{"aiosyft": version, "id": its identity, "secret": its secret}``, the worker answers
``{"ok": true, "id": ...}`` or ``{"ok": false, "error": ...}`` and closes. A session is opened only
after the secret proved the identity, so nothing from an unauthenticated peer is ever decoded as a
message, and that identity is the sender of everything on the link.

Nothing costly happens before that: until the handshake succeeded, either end reads records of at
most :data:`_HELLO_LIMIT` bytes into a buffer of that size, and a record declared larger closes the
connection at once (it would otherwise allocate up to ``max_frame_size``, 1 GiB by default, for
anyone who can open a socket). The full limit and the staging buffer come with authentication.

With TLS (``tls://``) the same :class:`FrameStream` runs on :class:`actors.tls.TlsSocketTransport`,
which lets OpenSSL read and write the socket itself, rather than on asyncio's TLS layer: that layer
cost a third of a small round trip and half of the bulk throughput on a 2-core machine, this one
costs what the cipher and a second ``read`` per record do. The handshake, and the refusal of a
peer without a certificate from the CA, still come before the stream sees a byte, within
:data:`_HANDSHAKE_TIMEOUT`.
"""

from __future__ import annotations

import asyncio
import collections
import struct
from collections.abc import Callable
from typing import Any

import msgpack

from actors.log import get_logger
from actors.tls import (
    TlsConfig,
    client_side,
    open_tls_connection,
    register_secure_dialer,
    serve_tls_connections,
)
from actors.transport import DialingTransport, FlowControl, register_dialer
from actors.worker import Session, Worker
from protocol import (
    DEFAULT_MAX_FRAME,
    PROTOCOL_VERSION,
    AuthenticationFailed,
    FrameTooLarge,
    ProtocolError,
    WorkerLost,
)
from protocol.codec import Buffer

_LENGTH = struct.Struct("<I")
#: Staging buffer for small records; a record that cannot fit gets a buffer of its own.
_STAGING = 1 << 18
#: Below this, length and frame are joined into one write.
_JOIN_BELOW = 1 << 16
#: The handshake is tiny; a bigger first record is not a handshake. It is also all that either end
#: reads before the other has authenticated (or, for a client, answered).
_HELLO_LIMIT = 4096
_HANDSHAKE_TIMEOUT = 10.0
_log = get_logger()


class FrameStream(asyncio.BufferedProtocol):
    """Reads length-prefixed records into frames and writes frames as records.

    A new stream reads handshake-sized records only (:data:`_HELLO_LIMIT`, in a buffer of that
    size); :meth:`open` lifts the limit to ``max_frame_size`` once the peer authenticated.
    """

    def __init__(self, max_frame_size: int, on_connect: Callable[[FrameStream], None] | None = None) -> None:
        self.max_frame_size = max_frame_size
        self._on_connect = on_connect
        self.on_frame: Callable[[bytearray], None] = _ignore_frame
        self.on_lost: Callable[[BaseException], None] = _ignore_loss
        self.flow = FlowControl()
        self.transport: asyncio.Transport | None = None
        #: The largest record this end reads now: the handshake's until :meth:`open`.
        self.limit = _HELLO_LIMIT
        self._buffer = bytearray(_LENGTH.size + _HELLO_LIMIT)
        self._start = 0
        self._end = 0
        self._large: bytearray | None = None
        self._large_filled = 0
        self._large_length = 0  # what the record announced; the buffer grows towards it
        self._held = False
        self.closed: BaseException | None = None

    def open(self) -> None:
        """The peer authenticated: read records up to ``max_frame_size`` from now on."""
        pending = self._buffer[self._start : self._end]
        self._buffer = bytearray(_STAGING)
        self._buffer[: len(pending)] = pending
        self._start, self._end = 0, len(pending)
        self.limit = self.max_frame_size

    def hold(self) -> None:
        """Deliver no further frame until :meth:`resume`: what the next frames may be (and how
        large) depends on the one just delivered, and deciding that may take a turn of the loop."""
        self._held = True
        if self.transport is not None:
            self.transport.pause_reading()

    def resume(self) -> None:
        """Deliver the frames that arrived during :meth:`hold`, and read on."""
        self._held = False
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.resume_reading()
            self._parse()

    # -- asyncio protocol -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if self._on_connect is not None:
            self._on_connect(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = exc or ConnectionResetError("connection closed")
        self.flow.fail(WorkerLost(f"connection lost: {self.closed}"))
        on_lost = self.on_lost
        # Whoever handles this stream's frames usually holds the stream too (bound methods): drop
        # the callbacks so that cycle does not keep the buffers (up to a frame each) alive until a
        # full garbage collection, and drop the buffers themselves at once.
        self.on_frame, self.on_lost, self._on_connect = _ignore_frame, _ignore_loss, None
        self._buffer, self._large = bytearray(), None
        self._start = self._end = self._large_filled = 0
        on_lost(self.closed)

    def pause_writing(self) -> None:
        self.flow.pause()

    def resume_writing(self) -> None:
        self.flow.resume()

    def get_buffer(self, sizehint: int) -> memoryview:
        large = self._large
        if large is not None:
            if self._large_filled == len(large):  # full so far: double it, up to the record
                large.extend(bytes(min(len(large), self._large_length - len(large))))
            return memoryview(large)[self._large_filled :]
        if self._end == len(self._buffer):  # full: move the incomplete record to the front
            pending = self._end - self._start
            self._buffer[:pending] = self._buffer[self._start : self._end]
            self._start, self._end = 0, pending
        return memoryview(self._buffer)[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        large = self._large
        if large is not None:
            self._large_filled += nbytes
            if self._large_filled == self._large_length:
                self._large = None
                self.on_frame(large)
            return
        self._end += nbytes
        self._parse()

    def _parse(self) -> None:
        while not self._held and self._end - self._start >= _LENGTH.size:
            buffer = self._buffer  # again each time: a frame's handler may open() the stream
            (length,) = _LENGTH.unpack_from(buffer, self._start)
            if length > self.limit:
                error = FrameTooLarge(
                    f"record of {length} bytes exceeds the limit of {self.limit}"
                    if self.limit == self.max_frame_size
                    else f"record of {length} bytes before authentication (at most {self.limit})"
                )
                _log.warning("frame refused, closing the connection", error=str(error))
                self.abort(error)
                return
            body = self._start + _LENGTH.size
            if self._end - body >= length:
                self._start = body + length
                self.on_frame(buffer[body : body + length])
                if self.transport is None or self.transport.is_closing():
                    return
            elif _LENGTH.size + length > len(buffer):  # too big to stage: read into its own buffer,
                # which grows as the bytes come: announcing a large record costs the peer nothing,
                # so it must cost the worker nothing either until they arrive.
                have = self._end - body
                large = bytearray(max(have, min(length, 2 * len(buffer))))
                large[:have] = buffer[body : self._end]
                self._large, self._large_filled, self._large_length = large, have, length
                self._start = self._end = 0
                return
            else:
                break
        if self._start == self._end:
            self._start = self._end = 0

    # -- writing ----------------------------------------------------------------------------
    def send(self, frame: Buffer) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            raise WorkerLost(f"connection closed: {self.closed}")
        size = len(frame)
        if size > self.max_frame_size:
            raise FrameTooLarge(f"frame of {size} bytes exceeds the limit of {self.max_frame_size}")
        if size < _JOIN_BELOW:
            transport.write(_LENGTH.pack(size) + frame)
        else:
            transport.write(_LENGTH.pack(size))
            transport.write(frame)

    def abort(self, exc: BaseException) -> None:
        if self.transport is not None:
            self.closed = exc
            self.transport.abort()


def _ignore_frame(frame: bytearray) -> None:
    """Where frames go when nobody (yet, or any longer) reads them."""


def _ignore_loss(exc: BaseException) -> None:
    """What a loss does when nobody (yet, or any longer) cares."""


def _hello(payload: dict[str, Any]) -> bytes:
    return msgpack.packb(payload)


def _read_hello(frame: Buffer) -> dict[str, Any]:
    if len(frame) > _HELLO_LIMIT:
        raise ProtocolError("handshake record too large")
    try:
        hello = msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except Exception as exc:
        raise ProtocolError(f"unreadable handshake: {exc}") from exc
    if not isinstance(hello, dict):
        raise ProtocolError("the handshake is a map")
    return hello


class TcpTransport(DialingTransport):
    """Client end of a TCP link: ``tcp://host:port``, or with ``tls`` ``tls://host:port``."""

    scheme = "tcp"
    _stream: FrameStream | None = None

    def __init__(
        self,
        address: str,
        local_id: str,
        *,
        secret: str | None = None,
        max_frame_size: int = DEFAULT_MAX_FRAME,
        tls: TlsConfig | None = None,
    ) -> None:
        scheme, self._ssl = client_side(address, tls)  # a plaintext address with TLS on is refused
        if scheme is not None:
            self.scheme = scheme  # split_address checks the address against it
        super().__init__(address, local_id, secret=secret, max_frame_size=max_frame_size)

    async def _run(self) -> None:
        host, port = self.host, self.port
        loop = asyncio.get_running_loop()
        try:
            stream: FrameStream
            if self._ssl is None:
                _, stream = await loop.create_connection(lambda: FrameStream(self.max_frame_size), host, port)
            else:
                _, stream = await open_tls_connection(
                    lambda: FrameStream(self.max_frame_size),
                    host,
                    port,
                    self._ssl,
                    handshake_timeout=_HANDSHAKE_TIMEOUT,
                )
            self._stream = stream
            answer: asyncio.Future[Buffer] = loop.create_future()

            def on_answer(frame: bytearray) -> None:
                stream.hold()  # what follows is read under the full limit, if the answer is yes
                if not answer.done():
                    answer.set_result(frame)

            stream.on_frame = on_answer
            stream.on_lost = lambda exc: (
                answer.done()
                or answer.set_exception(WorkerLost(f"{self.address} closed during the handshake"))
            )
            stream.send(
                _hello({"aiosyft": PROTOCOL_VERSION, "id": self.local_id, "secret": self.secret or ""})
            )
            hello = _read_hello(await asyncio.wait_for(answer, _HANDSHAKE_TIMEOUT))
            if not hello.get("ok"):
                stream.abort(AuthenticationFailed("refused"))
                raise AuthenticationFailed(f"{self.address} refused the connection: {hello.get('error')}")
        except AuthenticationFailed as exc:
            self._fail(exc)
            return
        except Exception as exc:
            if self._stream is not None:
                self._stream.abort(exc)
            self._fail(WorkerLost(f"cannot reach {self.address}: {exc}"))
            return
        stream.open()
        stream.on_frame = self._on_frame
        stream.on_lost = lambda exc: self._fail(WorkerLost(f"lost the connection to {self.address}: {exc}"))
        self._connected(stream)
        stream.resume()

    async def _closed(self) -> None:
        if self._stream is not None and self._stream.transport is not None:
            self._stream.transport.close()


register_dialer("tcp", lambda address, local_id, *, secret: TcpTransport(address, local_id, secret=secret))
for _scheme in ("tls", "tcp+tls"):
    register_secure_dialer(
        _scheme,
        lambda address, local_id, *, secret, tls: TcpTransport(address, local_id, secret=secret, tls=tls),
    )


class _ServerSide:
    """One accepted connection: the handshake, then frames into the sender's session."""

    def __init__(self, worker: Worker, stream: FrameStream) -> None:
        self.worker = worker
        self.stream = stream
        self.session: Session | None = None
        self._backlog: collections.deque[bytearray] = collections.deque()
        self._feeder: asyncio.Task[None] | None = None
        self.log = get_logger(worker=worker.id)
        stream.on_frame = self._on_hello
        stream.on_lost = self._on_lost
        self._timeout = asyncio.get_running_loop().call_later(
            _HANDSHAKE_TIMEOUT, lambda: stream.abort(ProtocolError("handshake timeout"))
        )

    def _on_hello(self, frame: bytearray) -> None:
        self._timeout.cancel()
        peer = self.stream.transport.get_extra_info("peername") if self.stream.transport else None
        try:
            hello = _read_hello(frame)
            if hello.get("aiosyft") != PROTOCOL_VERSION:
                raise ProtocolError(f"protocol version {hello.get('aiosyft')!r}, expected {PROTOCOL_VERSION}")
            if not self.worker.authenticate(hello.get("id"), hello.get("secret")):
                raise AuthenticationFailed(f"missing or wrong credentials for {str(hello.get('id'))[:64]!r}")
        except (ProtocolError, AuthenticationFailed) as exc:
            self.log.warning("connection refused", peer=str(peer), reason=str(exc))
            self.stream.send(_hello({"ok": False, "error": str(exc)}))
            self.stream.transport.close() if self.stream.transport else None
            return
        peer_id = str(hello["id"])
        self.stream.open()
        self.stream.send(_hello({"ok": True, "id": self.worker.id}))
        session = self.worker.open_session(peer_id, self.stream.send)
        session.flow = self.stream.flow
        session.on_close = self._close
        self.session = session
        self.stream.on_frame = self._deliver
        self.log.info("connected", peer=peer_id, address=str(peer))

    def _deliver(self, frame: bytearray) -> None:
        assert self.session is not None
        mailbox = self.session.mailbox
        if self._backlog or mailbox.full():  # the worker is behind: stop reading the socket
            self._backlog.append(frame)
            if self.stream.transport is not None:
                self.stream.transport.pause_reading()
            if self._feeder is None or self._feeder.done():
                self._feeder = asyncio.get_running_loop().create_task(self._feed(mailbox))
        else:
            mailbox.put_nowait(frame)

    async def _feed(self, mailbox: asyncio.Queue[Buffer]) -> None:
        while self._backlog:
            await mailbox.put(self._backlog.popleft())
        transport = self.stream.transport
        if transport is not None and not transport.is_closing():
            transport.resume_reading()

    def _on_lost(self, exc: BaseException) -> None:
        self._timeout.cancel()
        self._backlog.clear()
        if self._feeder is not None:
            self._feeder.cancel()
        if self.session is not None:
            self.session.on_close = None
            self.session.close()
            mailbox = self.session.mailbox
            while not mailbox.empty():  # frames the closed session will never read: let go of them now
                mailbox.get_nowait()

    def _close(self) -> None:
        if self.stream.transport is not None:
            self.stream.transport.close()


async def serve_tcp(
    worker: Worker, host: str, port: int, tls: TlsConfig | None = None
) -> tuple[asyncio.Server, str]:
    """Serve ``worker`` on ``tcp://host:port`` (port 0 picks a free one), or with ``tls`` on
    ``tls://host:port`` only; returns the address.

    With TLS the handshake (and the refusal of a peer without a certificate from the CA, logged)
    comes before :class:`FrameStream` sees a byte, bounded by the same timeout as aiosyft's own.
    """
    loop = asyncio.get_running_loop()
    max_frame_size = worker.codec.max_frame_size

    def accept() -> FrameStream:
        return FrameStream(max_frame_size, on_connect=lambda stream: _ServerSide(worker, stream))

    if tls is None:
        server = await loop.create_server(accept, host, port)
    else:
        log = get_logger(worker=worker.id)
        server = await serve_tls_connections(
            accept,
            host,
            port,
            tls.server_context(),
            handshake_timeout=_HANDSHAKE_TIMEOUT,
            on_refused=lambda peer, exc: log.warning("TLS handshake failed", peer=str(peer), reason=str(exc)),
        )
    bound = server.sockets[0].getsockname()
    return server, f"{'tls' if tls is not None else 'tcp'}://{host}:{bound[1]}"
