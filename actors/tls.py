"""TLS for network workers: ``wss://`` and ``tls://`` (TLS over the TCP transport), mutual.

Secrets (:mod:`actors.identity`) say who a peer is, but on their own they cross the network in
the clear, to whatever address was dialled. With a :class:`TlsConfig` both ends of every link
present a certificate from one configured CA and check the other's, so:

* credentials and data only ever cross an encrypted connection: a worker holding a TlsConfig
  listens with TLS only, and refuses to dial a plaintext address (:class:`InsecureAddress`),
  including the addresses it is told to forward objects to;
* a client only talks to a server whose certificate names the host it dialled (it cannot be
  tricked into handing its secret to someone else's server), and a server only admits a peer
  holding a certificate from the CA (``CERT_REQUIRED`` on both sides), before any aiosyft byte.

A certificate admits a peer to the cluster; which identity it then speaks as is still proven by
its secret, so a CA can be shared by a whole deployment without binding names to certificates.

The TLS of ``tls://`` links and of ``wss://`` workers runs on :class:`TlsSocketTransport`
(:func:`open_tls_connection`, :func:`serve_tls_connections`), OpenSSL on the socket itself, not on
asyncio's TLS layer, whose copies and per-call Python cost made TLS a third slower; aiohttp's
client (the dialling end of ``wss://``) still uses asyncio's.

Configuration: ``TlsConfig(ca, cert, key)`` (files, PEM), or from the environment
(:data:`CA_ENV`, :data:`CERT_ENV`, :data:`KEY_ENV`) as ``aiosyft launch --tls`` hands it to the
processes it starts. :func:`issue_certificates` makes a throwaway CA and certificates for that.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import os
import socket
import ssl
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from actors.transport import Transport, dial, register_dialer
from protocol import InsecureAddress

#: The CA certificate peers' certificates must chain to, this process's certificate (chain) and key.
CA_ENV = "AIOSYFT_TLS_CA"
CERT_ENV = "AIOSYFT_TLS_CERT"
KEY_ENV = "AIOSYFT_TLS_KEY"

#: Secure address schemes and the plaintext transport each runs over.
SECURE_SCHEMES = {"wss": "ws", "tls": "tcp", "tcp+tls": "tcp"}
#: Plaintext network schemes, and the secure scheme that replaces each.
PLAIN_SCHEMES = {"ws": "wss", "tcp": "tls"}


class TlsConfig:
    """Where this process's TLS material is: the CA to trust, its certificate chain and key.

    The contexts are built once, on first use (loading a key and a CA costs a few ms), and
    shared by every link of the process.
    """

    def __init__(
        self, ca: str | os.PathLike[str], cert: str | os.PathLike[str], key: str | os.PathLike[str]
    ) -> None:
        self.ca, self.cert, self.key = Path(ca), Path(cert), Path(key)
        self._server: ssl.SSLContext | None = None
        self._client: ssl.SSLContext | None = None

    def __repr__(self) -> str:
        return f"TlsConfig(ca={str(self.ca)!r}, cert={str(self.cert)!r}, key={str(self.key)!r})"

    def _context(self, purpose: ssl.Purpose) -> ssl.SSLContext:
        context = ssl.SSLContext(
            ssl.PROTOCOL_TLS_SERVER if purpose is ssl.Purpose.CLIENT_AUTH else ssl.PROTOCOL_TLS_CLIENT
        )
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        # TLS 1.2 renegotiation would make a write wait for a read; nothing here needs it.
        context.options |= ssl.OP_NO_RENEGOTIATION
        # Mutual: each side presents its certificate and requires one from the CA of the other.
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cafile=str(self.ca))
        context.load_cert_chain(str(self.cert), str(self.key))
        return context

    def server_context(self) -> ssl.SSLContext:
        """The context a worker listens with: clients without a certificate from the CA are refused."""
        if self._server is None:
            self._server = self._context(ssl.Purpose.CLIENT_AUTH)
        return self._server

    def client_context(self) -> ssl.SSLContext:
        """The context this process dials with: the server's certificate must come from the CA and
        name the host dialled (``check_hostname``), so a secret never goes to the wrong server."""
        if self._client is None:
            context = self._context(ssl.Purpose.SERVER_AUTH)
            context.check_hostname = True  # PROTOCOL_TLS_CLIENT's default; said here, since it matters
            self._client = context
        return self._client

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> TlsConfig | None:
        """The configuration ``$AIOSYFT_TLS_CA``, ``_CERT`` and ``_KEY`` name; ``None`` when none is
        set. Some but not all of them is a mistake (a ValueError), never a silent plaintext."""
        environ = os.environ if environ is None else environ
        values = {name: environ.get(name) or None for name in (CA_ENV, CERT_ENV, KEY_ENV)}
        if not any(values.values()):
            return None
        missing = [name for name, value in values.items() if value is None]
        if missing:
            raise ValueError(f"TLS needs ${CA_ENV}, ${CERT_ENV} and ${KEY_ENV}; ${', $'.join(missing)} unset")
        return cls(values[CA_ENV], values[CERT_ENV], values[KEY_ENV])  # type: ignore[arg-type]

    def environment(self) -> dict[str, str]:
        """The variables that hand this configuration to a child process."""
        return {CA_ENV: str(self.ca), CERT_ENV: str(self.cert), KEY_ENV: str(self.key)}


def scheme_of(address: str) -> str:
    return address.partition("://")[0].lower() if "://" in address else ""


def is_secure(address: str) -> bool:
    """Whether ``address`` is dialled over TLS."""
    return scheme_of(address) in SECURE_SCHEMES


def check_dialable(address: str, tls: TlsConfig | None) -> None:
    """Refuse what would put credentials or data on a plaintext wire, or cannot be dialled.

    With TLS on, a ``ws://`` or ``tcp://`` address is refused (:class:`InsecureAddress`) rather than
    dialled: the secret goes out in the first bytes. A ``wss://`` or ``tls://`` address needs a
    configuration (a certificate to present). In-process addresses (``virtual://``) cross no wire.
    """
    scheme = scheme_of(address)
    if tls is not None and scheme in PLAIN_SCHEMES:
        raise InsecureAddress(
            f"TLS is on: refusing to dial {address!r} in plaintext, where credentials and data "
            f"would cross unencrypted (use {PLAIN_SCHEMES[scheme]}://)"
        )
    if tls is None and scheme in SECURE_SCHEMES:
        raise ValueError(
            f"cannot dial {address!r} without a TLS configuration: give tls=TlsConfig(...) or set "
            f"${CA_ENV}, ${CERT_ENV} and ${KEY_ENV}"
        )


def client_side(address: str, tls: TlsConfig | None) -> tuple[str | None, ssl.SSLContext | None]:
    """What a dialing transport needs for ``address``: the secure scheme to check the address
    against (``None`` for a plaintext one) and the context to dial it with. Refuses as
    :func:`check_dialable` does."""
    check_dialable(address, tls)
    if not is_secure(address):
        return None, None
    return scheme_of(address), tls.client_context() if tls is not None else None


class SecureDialer(Protocol):
    def __call__(self, address: str, local_id: str, *, secret: str | None, tls: TlsConfig) -> Transport: ...


_SECURE_DIALERS: dict[str, SecureDialer] = {}


def register_secure_dialer(scheme: str, dialer: SecureDialer) -> None:
    """Make ``dial_secure`` reach ``scheme://...`` addresses with ``dialer``. The scheme is dialled
    by plain :func:`~actors.transport.dial` too, with the environment's configuration."""
    _SECURE_DIALERS[scheme] = dialer

    def from_environment(address: str, local_id: str, *, secret: str | None) -> Transport:
        tls = TlsConfig.from_environment()
        check_dialable(address, tls)  # none: a ValueError saying what is missing
        assert tls is not None
        return dialer(address, local_id, secret=secret, tls=tls)

    register_dialer(scheme, from_environment)


def dial_secure(address: str, local_id: str, *, secret: str | None, tls: TlsConfig | None) -> Transport:
    """A transport to ``address`` as :func:`~actors.transport.dial` makes one, under ``tls``:
    TLS addresses are dialled with it, plaintext network addresses refused
    (:class:`InsecureAddress`), in-process ones dialled as they are."""
    if tls is None:  # a TLS address then takes the environment's configuration, if any
        return dial(address, local_id, secret=secret)
    check_dialable(address, tls)
    dialer = _SECURE_DIALERS.get(scheme_of(address))
    if dialer is None:
        return dial(address, local_id, secret=secret)
    return dialer(address, local_id, secret=secret, tls=tls)


# -- a throwaway CA, for a launcher's processes and for tests ----------------------------------
def issue_certificates(
    directory: str | os.PathLike[str],
    identities: Iterable[str],
    hosts: Iterable[str] = ("127.0.0.1", "::1", "localhost"),
    *,
    days: int = 7,
) -> dict[str, TlsConfig]:
    """Make a fresh CA in ``directory`` and a certificate for each identity, valid for ``hosts``
    (IP addresses and DNS names alike), as serving and as dialling end.

    The CA's key is discarded once the certificates are signed: nobody, not even whoever reads
    the directory later, can issue another one for this cluster. Keys are written readable by
    their owner alone. Returns each identity's configuration.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "aiosyft"),
                          x509.NameAttribute(NameOID.COMMON_NAME, common)])  # fmt: skip

    signing_only = x509.KeyUsage(
        digital_signature=False, content_commitment=False, key_encipherment=False, data_encipherment=False,
        key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
    )  # fmt: skip
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = name("aiosyft throwaway CA")
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(signing_only, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_path = directory / "ca.pem"
    ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))

    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host.strip("[]"))))
        except ValueError:
            names.append(x509.DNSName(host))
    configs = {}
    for index, identity in enumerate(identities):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name(identity))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
            )
            .sign(ca_key, hashes.SHA256())
        )
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in identity)
        cert_path, key_path = directory / f"{index}-{safe}.pem", directory / f"{index}-{safe}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as file:
            file.write(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
        configs[identity] = TlsConfig(ca_path, cert_path, key_path)
    return configs


# -- TLS straight on the socket ----------------------------------------------------------------
#: Plaintext handed to one ``SSL_write``: large enough that a bulk frame costs few Python calls,
#: small enough that what must be copied when the socket fills up is little.
_WRITE_CHUNK = 1 << 18
#: Plaintext read in one go before other callbacks get a turn (``SSL_read`` returns one record,
#: at most 16 KiB, per call).
_READ_BUDGET = 1 << 22
_HIGH_WATER, _LOW_WATER = 1 << 16, 1 << 14
_P = TypeVar("_P", bound=asyncio.BufferedProtocol)
#: The most plaintext one TLS record carries: a read that returns less ended a burst, usually.
_FULL_RECORD = 1 << 14


class TlsSocketTransport(asyncio.Transport):
    """An asyncio transport that drives a non-blocking :class:`ssl.SSLSocket` from the event loop.

    asyncio's own TLS layer (``asyncio.sslproto``) runs OpenSSL on memory BIOs in Python: every
    byte is copied into and out of them once more, and every read and write costs some 10 us of
    Python bookkeeping, which on a 2-core machine cost a third of a small round trip and half of
    the bulk throughput. Here OpenSSL reads and writes the socket itself: a record is decrypted
    straight into the protocol's buffer (``recv_into``), a frame is encrypted straight from the
    sender's buffer, and the loop only watches the file descriptor (``add_reader``/``add_writer``),
    so it needs a selector event loop (the default on Linux and macOS).

    With a :class:`asyncio.BufferedProtocol` (aiosyft's frame reader) a record lands where the
    frame it belongs to is assembled; a plain :class:`asyncio.Protocol` (aiohttp's server, behind
    ``wss://``) gets the bytes of each record. Writes go out at once; what the socket does not
    take is copied (a sender may reuse its buffer) and written when it can, in order, with
    ``pause_writing``/``resume_writing`` as for any asyncio transport. ``SSL_write`` must be retried
    with the same bytes after it would block, so the length of such a write is remembered.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: ssl.SSLSocket,
        protocol: asyncio.BufferedProtocol | asyncio.Protocol,
        server: bool,
    ) -> None:
        super().__init__(
            {
                "socket": sock,
                "peername": _peername(sock),
                "sockname": sock.getsockname(),
                "sslcontext": sock.context,
                "ssl_object": sock,
                "peercert": sock.getpeercert(),
                "cipher": sock.cipher(),
                "compression": sock.compression(),
                "server_side": server,
            }
        )
        self._loop = loop
        self._sock: ssl.SSLSocket | None = sock
        self._fd = sock.fileno()
        self._protocol = protocol
        self._closing = False  # close() or abort() called: no more reads, writes drain (close) or not
        self._lost = False  # connection_lost() scheduled
        self._reading = True
        self._reader_on = self._writer_on = False
        self._buffer = bytearray()  # plaintext the socket has not taken yet
        self._in_flight = 0  # length of the SSL_write that would block and must be retried as is
        self._read_wants_write = self._write_wants_read = False
        self._writing_paused = False
        self._high, self._low = _HIGH_WATER, _LOW_WATER
        self._scratch: bytearray | None = None

    def start(self) -> None:
        """Hand the connection to the protocol and begin reading."""
        self._protocol.connection_made(self)
        if self._reading and not self._closing:
            self._add_reader()
            self._loop.call_soon(self._read_ready)  # a record OpenSSL may already hold

    # -- reading ----------------------------------------------------------------------------
    def _add_reader(self) -> None:
        if not self._reader_on:
            self._loop.add_reader(self._fd, self._read_ready)
            self._reader_on = True

    def _remove_reader(self) -> None:
        if self._reader_on:
            self._loop.remove_reader(self._fd)
            self._reader_on = False

    def _read_ready(self) -> None:
        sock = self._sock
        if sock is None or self._closing:
            return
        if self._write_wants_read:  # OpenSSL needed to read before it could write on
            self._write_wants_read = False
            self._write_ready()
        protocol = self._protocol
        budget = _READ_BUDGET
        try:
            while self._reading and not self._closing:
                buffered = isinstance(protocol, asyncio.BufferedProtocol)
                buffer = protocol.get_buffer(-1) if buffered else self._staging()
                try:
                    nbytes = sock.recv_into(buffer)
                except ssl.SSLWantReadError:
                    return
                except ssl.SSLWantWriteError:  # a post-handshake message to answer first
                    self._read_wants_write = True
                    self._add_writer()
                    return
                del buffer  # the protocol may grow what it lent (no export may outlive the read)
                if nbytes == 0:
                    self._eof()
                    return
                if buffered:
                    protocol.buffer_updated(nbytes)
                else:
                    protocol.data_received(bytes(memoryview(self._staging())[:nbytes]))
                protocol = self._protocol  # data_received may hand the connection on (set_protocol)
                budget -= nbytes
                if self._sock is None or self._sock.pending():
                    continue  # decrypted bytes the socket will not signal (or gone: the loop ends)
                if nbytes < _FULL_RECORD:
                    # Most likely the end of what was sent: return to the loop rather than pay a
                    # failing read (a syscall and an exception) to find out; the selector says
                    # if more came.
                    return
                if budget <= 0:
                    return
        except (ssl.SSLError, OSError) as exc:
            self._force_close(exc)
        except BaseException as exc:
            self._force_close(exc)
            raise

    def _staging(self) -> bytearray:
        """Where records for a protocol that takes bytes (``data_received``) are decrypted."""
        if self._scratch is None:
            self._scratch = bytearray(_FULL_RECORD)
        return self._scratch

    def _eof(self) -> None:
        self._remove_reader()
        keep_open = self._protocol.eof_received()
        if not keep_open:
            self.close()

    def pause_reading(self) -> None:
        self._reading = False
        self._remove_reader()

    def resume_reading(self) -> None:
        if self._reading or self._closing:
            return
        self._reading = True
        self._add_reader()
        if self._sock is not None and self._sock.pending():  # decrypted bytes the socket will not signal
            self._loop.call_soon(self._read_ready)

    def is_reading(self) -> bool:
        return self._reading and not self._closing

    # -- writing ----------------------------------------------------------------------------
    def _add_writer(self) -> None:
        if not self._writer_on:
            self._loop.add_writer(self._fd, self._write_ready)
            self._writer_on = True

    def _remove_writer(self) -> None:
        if self._writer_on:
            self._loop.remove_writer(self._fd)
            self._writer_on = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or self._sock is None:
            return
        if self._buffer:  # behind already: keep the order
            self._buffer += data
            self._maybe_pause()
            return
        size = data.nbytes if isinstance(data, memoryview) else len(data)
        if size <= _WRITE_CHUNK:  # one SSL_write: the common case, kept short
            try:
                self._sock.send(data)
                return
            except ssl.SSLWantWriteError:
                self._in_flight = size
                self._add_writer()
            except ssl.SSLWantReadError:
                self._in_flight, self._write_wants_read = size, True
            except (ssl.SSLError, OSError) as exc:
                self._force_close(exc)
                return
            self._buffer += data
            self._maybe_pause()
            return
        view = memoryview(data).cast("B")
        sent = 0
        try:
            while sent < len(view):
                size = min(len(view) - sent, _WRITE_CHUNK)
                try:
                    sent += self._sock.send(view[sent : sent + size])
                except ssl.SSLWantWriteError:
                    self._in_flight = size
                    break
                except ssl.SSLWantReadError:
                    self._in_flight, self._write_wants_read = size, True
                    break
        except (ssl.SSLError, OSError) as exc:
            self._force_close(exc)
            return
        if sent < len(view):
            self._buffer += view[sent:]
            if not self._write_wants_read:
                self._add_writer()
            self._maybe_pause()

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def _write_ready(self) -> None:
        sock = self._sock
        if sock is None:
            return
        if self._read_wants_write:
            self._read_wants_write = False
            self._loop.call_soon(self._read_ready)
        buffer = self._buffer
        try:
            while buffer:
                size = self._in_flight or min(len(buffer), _WRITE_CHUNK)
                try:
                    with memoryview(buffer)[:size] as chunk:
                        sent = sock.send(chunk)
                except ssl.SSLWantWriteError:
                    self._in_flight = size
                    self._add_writer()
                    self._maybe_resume()
                    return
                except ssl.SSLWantReadError:
                    self._in_flight, self._write_wants_read = size, True
                    self._remove_writer()
                    self._maybe_resume()
                    return
                self._in_flight = 0
                del buffer[:sent]
        except (ssl.SSLError, OSError) as exc:
            self._force_close(exc)
            return
        self._remove_writer()
        self._maybe_resume()
        if self._closing and not self._lost:
            self._lose(None)

    def _maybe_pause(self) -> None:
        if not self._writing_paused and len(self._buffer) > self._high:
            self._writing_paused = True
            self._protocol.pause_writing()

    def _maybe_resume(self) -> None:
        if self._writing_paused and len(self._buffer) <= self._low:
            self._writing_paused = False
            self._protocol.resume_writing()

    def get_write_buffer_size(self) -> int:
        return len(self._buffer)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._low, self._high

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._high = _HIGH_WATER if high is None else high
        self._low = self._high // 4 if low is None else low

    def can_write_eof(self) -> bool:
        return False  # TLS has no half-close

    def write_eof(self) -> None:
        raise NotImplementedError("TLS connections cannot be half-closed")

    # -- closing ----------------------------------------------------------------------------
    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        """Stop reading; the connection ends once what was written has gone out."""
        if self._closing:
            return
        self._closing = True
        self._remove_reader()
        if not self._buffer:
            self._lose(None)

    def abort(self) -> None:
        self._force_close(None)

    def _force_close(self, exc: BaseException | None) -> None:
        if self._lost:
            return
        self._closing = True
        self._buffer.clear()
        self._remove_reader()
        self._remove_writer()
        self._lose(exc, clean=False)

    def _lose(self, exc: BaseException | None, *, clean: bool = True) -> None:
        self._lost = True
        self._remove_reader()
        self._remove_writer()
        self._loop.call_soon(self._connection_lost, exc, clean)

    def _connection_lost(self, exc: BaseException | None, clean: bool) -> None:
        sock, self._sock = self._sock, None
        try:
            self._protocol.connection_lost(exc if isinstance(exc, Exception) or exc is None else None)
        finally:
            if sock is not None:
                if clean:  # say close_notify, so the peer tells an end from a truncation
                    with contextlib.suppress(ssl.SSLError, OSError, ValueError):
                        sock.unwrap()  # non-blocking: sends ours, does not wait for the peer's
                sock.close()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        assert isinstance(protocol, asyncio.BufferedProtocol | asyncio.Protocol)
        self._protocol = protocol

    def get_protocol(self) -> asyncio.BufferedProtocol | asyncio.Protocol:
        return self._protocol


def _peername(sock: socket.socket) -> Any:
    try:
        return sock.getpeername()
    except OSError:
        return None


class _Handoff(asyncio.Protocol):
    """Takes a freshly connected socket away from asyncio before it reads a byte of it, for
    :class:`TlsSocketTransport` to drive. asyncio resolves, connects and accepts as it always
    does; its own transport is closed on a duplicate of the descriptor, so only ours remains."""

    def __init__(self, on_socket: Callable[[socket.socket], None] | None = None) -> None:
        self.socket: socket.socket | None = None
        self._on_socket = on_socket

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # asyncio adds its reader only after connection_made, and not for a closing transport.
        sock = transport.get_extra_info("socket").dup()
        transport.abort()
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # frames leave at once
        self.socket = sock
        if self._on_socket is not None:
            self._on_socket(sock)


def _wake(ready: asyncio.Future[None]) -> None:
    if not ready.done():
        ready.set_result(None)


async def _handshake(loop: asyncio.AbstractEventLoop, sock: ssl.SSLSocket, timeout: float) -> None:
    """Run the TLS handshake on a non-blocking socket, within ``timeout`` seconds."""
    fd = sock.fileno()
    try:
        async with asyncio.timeout(timeout):
            while True:
                try:
                    sock.do_handshake()
                    return
                except ssl.SSLWantReadError:
                    add, remove = loop.add_reader, loop.remove_reader
                except ssl.SSLWantWriteError:
                    add, remove = loop.add_writer, loop.remove_writer
                ready: asyncio.Future[None] = loop.create_future()
                add(fd, _wake, ready)
                try:
                    await ready
                finally:
                    remove(fd)
    except TimeoutError:
        raise ConnectionAbortedError(
            f"TLS handshake is taking longer than {timeout} seconds: aborting the connection"
        ) from None


async def open_tls_connection(
    protocol_factory: Callable[[], _P],
    host: str,
    port: int,
    context: ssl.SSLContext,
    *,
    handshake_timeout: float,
) -> tuple[TlsSocketTransport, _P]:
    """Dial ``host:port`` over TLS on a :class:`TlsSocketTransport`, checking the server's
    certificate against ``host``; what ``loop.create_connection(ssl=context)`` does, without
    asyncio's TLS layer."""
    loop = asyncio.get_running_loop()
    _, handoff = await loop.create_connection(_Handoff, host, port)
    assert handoff.socket is not None
    sock = context.wrap_socket(handoff.socket, server_hostname=host, do_handshake_on_connect=False)
    try:
        await _handshake(loop, sock, handshake_timeout)
    except BaseException:
        sock.close()
        raise
    protocol = protocol_factory()
    transport = TlsSocketTransport(loop, sock, protocol, server=False)
    transport.start()
    return transport, protocol


async def serve_tls_connections(
    protocol_factory: Callable[[], asyncio.BufferedProtocol | asyncio.Protocol],
    host: str,
    port: int,
    context: ssl.SSLContext,
    *,
    handshake_timeout: float,
    on_refused: Callable[[Any, BaseException], None] | None = None,
) -> asyncio.Server:
    """Listen on ``host:port`` and serve each connection that completes the TLS handshake within
    ``handshake_timeout`` on a :class:`TlsSocketTransport`; ``on_refused(peer, error)`` hears of
    the others (no certificate, another CA's, not TLS at all, too slow), whose sockets are closed.
    Returns the listening :class:`asyncio.Server`, which is closed as usual."""
    loop = asyncio.get_running_loop()
    handshakes: set[asyncio.Task[None]] = set()

    async def accept(raw: socket.socket) -> None:
        peer = _peername(raw)
        try:
            sock = context.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
        except (ssl.SSLError, OSError) as exc:
            raw.close()
            if on_refused is not None:
                on_refused(peer, exc)
            return
        try:
            await _handshake(loop, sock, handshake_timeout)
        except (ssl.SSLError, OSError) as exc:
            sock.close()
            if on_refused is not None:
                on_refused(peer, exc)
            return
        except BaseException:
            sock.close()
            raise
        TlsSocketTransport(loop, sock, protocol_factory(), server=True).start()

    def on_socket(raw: socket.socket) -> None:
        task = loop.create_task(accept(raw))
        handshakes.add(task)
        task.add_done_callback(handshakes.discard)

    return await loop.create_server(lambda: _Handoff(on_socket), host, port)
