"""TLS on network workers: ``wss://`` and ``tls://`` with certificates from one CA, both ways.

Functional: the leader and workers, and workers among themselves, work over TLS on both
transports. Hostile: peers without a certificate from the CA (none, another CA's, a certificate
for another host) are refused while the worker keeps serving others; a plaintext client to a
TLS port fails cleanly; a TLS worker will not dial a plaintext peer; and what crosses the wire
holds neither a secret nor a tensor's bytes. The CAs are made at test time (trustme).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import stat
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import msgpack
import pytest
import torch
import trustme
from cryptography import x509

import actors
import actors.tcp
from actors.identity import Credentials, new_secret
from actors.tls import CA_ENV, CERT_ENV, KEY_ENV, InsecureAddress, TlsConfig, issue_certificates
from protocol import PROTOCOL_VERSION, WorkerLost
from runners.cli import main
from runners.cluster import local_cluster
from tests.conftest import bounded

NETWORK = ["ws", "tcp"]
PLAIN = {"wss": "ws", "tls": "tcp"}
SECRETS = {"me": new_secret(), "alice": new_secret(), "bob": new_secret(), "carol": new_secret()}
CREDENTIALS = Credentials.from_secrets(SECRETS)


def _write(ca: trustme.CA, directory: Path, name: str, *hosts: str) -> TlsConfig:
    """``name``'s certificate from ``ca`` for ``hosts``, as files a TlsConfig reads."""
    leaf = ca.issue_cert(*hosts)
    ca_file, cert_file, key_file = (directory / f"{name}.{suffix}" for suffix in ("ca", "pem", "key"))
    ca.cert_pem.write_to_path(str(ca_file))
    for index, pem in enumerate(leaf.cert_chain_pems):
        pem.write_to_path(str(cert_file), append=index > 0)
    leaf.private_key_pem.write_to_path(str(key_file))
    return TlsConfig(ca_file, cert_file, key_file)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TlsConfig]:
    """Certificates from one CA for the leader and the workers, and some that must not get in:
    another CA's (trusting ours, so only the server's check stands in the way), and ours for a
    host that is not the one dialled."""
    directory = tmp_path_factory.mktemp("pki")
    ca, rogue = trustme.CA(), trustme.CA()
    configs = {name: _write(ca, directory, name, "127.0.0.1", "localhost") for name in SECRETS}
    configs["rogue"] = _write(rogue, directory, "rogue", "127.0.0.1", "localhost")
    configs["rogue-client"] = TlsConfig(configs["me"].ca, configs["rogue"].cert, configs["rogue"].key)
    configs["elsewhere"] = _write(ca, directory, "elsewhere", "worker.example.org")
    return configs


@pytest.fixture(autouse=True)
def no_tls_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (CA_ENV, CERT_ENV, KEY_ENV):
        monkeypatch.delenv(name, raising=False)


Serve = Callable[..., Awaitable[actors.Server]]


@pytest.fixture
async def served() -> AsyncIterator[Serve]:
    servers: list[actors.Server] = []

    async def serve(worker_id: str, transport: str, tls: TlsConfig | None) -> actors.Server:
        worker = actors.Worker(worker_id, credentials=CREDENTIALS, secret=SECRETS[worker_id])
        server = await actors.serve(worker, transport, tls=tls)
        servers.append(server)
        return server

    yield serve
    for server in servers:
        await server.close()


async def _leader(address: str, tls: TlsConfig | None) -> actors.RemoteWorker:
    return await actors.connect(address, identity="me", secret=SECRETS["me"], tls=tls, timeout=5)


def _plain(address: str) -> str:
    scheme, _, rest = address.partition("://")
    return f"{PLAIN[scheme]}://{rest}"


async def _still_serves(server: actors.Server, tls: TlsConfig) -> None:
    worker = await _leader(server.address, tls)
    assert (await worker.ping())["id"] == server.worker.id
    await worker.close()


# -- functional --------------------------------------------------------------------------------
@pytest.mark.parametrize("transport", NETWORK)
@bounded(10)
async def test_leader_round_trip_over_tls(served, pki, transport):
    server = await served("bob", transport, pki["bob"])
    assert server.address.startswith({"ws": "wss://", "tcp": "tls://"}[transport])
    bob = await _leader(server.address, pki["me"])
    x = actors.send(torch.arange(6.0).reshape(2, 3), bob)
    assert torch.equal(await (x * 2 + 1).get(), torch.arange(6.0).reshape(2, 3) * 2 + 1)
    await bob.close()


@bounded(10)
async def test_tcp_plus_tls_scheme_is_tls_over_tcp(served, pki):
    server = await served("bob", "tcp", pki["bob"])
    bob = await _leader(server.address.replace("tls://", "tcp+tls://"), pki["me"])
    assert (await bob.ping())["id"] == "bob"
    await bob.close()


@pytest.mark.parametrize("transport", NETWORK)
@bounded(10)
async def test_worker_to_worker_move_over_tls(served, pki, transport):
    """The same scenario on both transports: bob moves a tensor to alice on a link of its own,
    dialled with its own certificate."""
    bob_server = await served("bob", transport, pki["bob"])
    alice_server = await served("alice", transport, pki["alice"])
    bob, alice = await _leader(bob_server.address, pki["me"]), await _leader(alice_server.address, pki["me"])
    x = actors.send(torch.tensor([1.0, 2.0, 3.0]), bob)
    y = actors.move(x, alice)
    assert torch.equal(await (y + 1).get(), torch.tensor([2.0, 3.0, 4.0]))
    assert [address for _, address in bob_server.worker.peers] == [alice_server.address]
    await bob.close()
    await alice.close()


# -- hostile -----------------------------------------------------------------------------------
def _hello_for(transport: str, port: int) -> bytes:
    """What an aiosyft client sends first: a TCP handshake record, or a WebSocket upgrade."""
    if transport == "tcp":
        hello = msgpack.packb({"aiosyft": PROTOCOL_VERSION, "id": "me", "secret": SECRETS["me"]})
        return len(hello).to_bytes(4, "little") + hello
    return (
        f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        f"X-Aiosyft-Id: me\r\nAuthorization: Bearer {SECRETS['me']}\r\n\r\n"
    ).encode()


@pytest.mark.parametrize("transport", NETWORK)
@bounded(10)
async def test_client_without_certificate_is_refused(served, pki, transport):
    """A TLS client that trusts the CA but has no certificate of its own gets nothing back, even
    with the right secret; the worker opens no session and serves the next client."""
    server = await served("bob", transport, pki["bob"])
    port = int(server.address.rsplit(":", 1)[1])
    context = ssl.create_default_context(cafile=str(pki["me"].ca))
    answer = b""
    with contextlib.suppress(ssl.SSLError, ConnectionError, asyncio.IncompleteReadError):
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
        writer.write(_hello_for(transport, port))
        answer = await reader.read(4096)
        writer.close()
    assert answer == b"", "a client without a certificate was answered"
    assert server.worker.sessions == set()
    await _still_serves(server, pki["me"])


@pytest.mark.parametrize("transport", NETWORK)
@bounded(10)
async def test_client_from_another_ca_is_refused(served, pki, transport):
    server = await served("bob", transport, pki["bob"])
    with pytest.raises(WorkerLost):
        await _leader(server.address, pki["rogue-client"])
    assert server.worker.sessions == set()
    await _still_serves(server, pki["me"])


@pytest.mark.parametrize("transport", NETWORK)
@pytest.mark.parametrize("impostor", ["rogue", "elsewhere"])
@bounded(10)
async def test_server_not_certified_for_the_address_is_not_trusted(served, pki, transport, impostor):
    """The leader checks the server too, before its secret goes out: a certificate from another
    CA, or ours for another host, is refused with the reason."""
    server = await served("bob", transport, pki[impostor])
    with pytest.raises(WorkerLost, match=r"(?i)certificate"):
        await _leader(server.address, pki["me"])
    assert server.worker.sessions == set()


@pytest.mark.parametrize("transport", NETWORK)
@bounded(10)
async def test_plaintext_client_to_a_tls_port_fails_cleanly(served, pki, transport):
    server = await served("bob", transport, pki["bob"])
    with pytest.raises(WorkerLost):
        await actors.connect(_plain(server.address), identity="me", secret="not the real one", timeout=5)
    assert server.worker.sessions == set()
    await _still_serves(server, pki["me"])


@pytest.mark.parametrize("transport", NETWORK)
@bounded(10)
async def test_with_tls_on_plaintext_addresses_are_not_dialled(served, pki, transport):
    """A TLS worker told to forward to a plaintext peer refuses, naming why, and the peer never
    sees a connection from it (its secret would be in the first bytes); the leader refuses too."""
    bob_server = await served("bob", transport, pki["bob"])
    carol_server = await served("carol", transport, None)  # plaintext
    with pytest.raises(InsecureAddress, match="plaintext"):
        await _leader(carol_server.address, pki["me"])
    with pytest.raises(InsecureAddress):
        bob_server.worker.peer("carol", carol_server.address)
    bob, carol = await _leader(bob_server.address, pki["me"]), await _leader(carol_server.address, None)
    x = actors.send(torch.ones(3), bob)
    y = actors.move(x, carol)
    with pytest.raises(WorkerLost, match="TLS is on"):
        await y.get()
    assert {session.identity for session in carol_server.worker.sessions} == {"me"}
    await bob.close()
    await carol.close()


class _Recorder:
    """A TCP proxy that keeps every byte it passes on, both ways."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.seen = bytearray()
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.ensure_future(self._pump(source, sink))
            self.tasks.add(task)

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await source.read(1 << 16):
                self.seen += data
                sink.write(data)
                await sink.drain()
        sink.close()

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


@pytest.mark.parametrize("transport", NETWORK)
@pytest.mark.parametrize("secure", [True, False], ids=["tls", "plaintext-control"])
@bounded(10)
async def test_the_wire_carries_neither_secrets_nor_tensors(served, pki, transport, secure):
    """Everything alice receives, from the leader and from bob (who dials the address the leader
    used), passes a recorder: with TLS it holds no secret and no tensor bytes. The plaintext
    control shows the recorder would have seen them."""
    bob_server = await served("bob", transport, pki["bob"] if secure else None)
    alice_server = await served("alice", transport, pki["alice"] if secure else None)
    recorder = _Recorder(int(alice_server.address.rsplit(":", 1)[1]))
    proxied = alice_server.address.rsplit(":", 1)[0] + f":{await recorder.start()}"
    tls = pki["me"] if secure else None
    bob, alice = await _leader(bob_server.address, tls), await _leader(proxied, tls)
    known = torch.arange(1024, dtype=torch.float64) * 1.0000001 + 0.1234567
    x = actors.send(known, bob)
    y = actors.move(x, alice)
    assert torch.equal(await y.get(), known)
    await bob.close()
    await alice.close()
    await recorder.close()
    seen = bytes(recorder.seen)
    assert len(seen) > known.numel() * 8, "the recorder saw too little to judge"
    leaked = [
        name
        for name, needle in (
            ("the leader's secret", SECRETS["me"].encode()),
            ("bob's secret", SECRETS["bob"].encode()),
            ("the tensor", known.numpy().tobytes()[:64]),
        )
        if needle in seen
    ]
    assert leaked == ([] if secure else ["the leader's secret", "bob's secret", "the tensor"])


# -- configuration and launch ------------------------------------------------------------------
def test_partial_environment_is_an_error_not_plaintext(monkeypatch, pki):
    monkeypatch.setenv(CA_ENV, str(pki["me"].ca))
    with pytest.raises(ValueError, match=CERT_ENV):
        TlsConfig.from_environment()
    monkeypatch.setenv(CERT_ENV, str(pki["me"].cert))
    monkeypatch.setenv(KEY_ENV, str(pki["me"].key))
    assert TlsConfig.from_environment() is not None


@pytest.mark.parametrize(
    "options", [["--tls-ca", "ca.pem"], ["--tls-ca", "ca.pem", "--tls-cert", "c.pem", "--tls-key", "k.pem"]]
)
def test_worker_tls_options_are_checked_before_serving(options, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["worker", "--id", "bob", "--port", "0", *options])
    assert exit_.value.code == 2
    assert "TLS" in capsys.readouterr().err


@bounded(10)
async def test_throwaway_ca_certifies_workers_and_leader(tmp_path, served):
    """What ``aiosyft launch --tls`` makes: certificates for loopback from a fresh CA whose key
    is gone, keys readable by their owner alone, working both ways."""
    configs = issue_certificates(tmp_path, ["me", "bob", "alice"])
    assert sorted(p.name for p in tmp_path.iterdir() if "ca" in p.name) == ["ca.pem"]
    for config in configs.values():
        assert stat.S_IMODE(config.key.stat().st_mode) == 0o600
        cert = x509.load_pem_x509_certificate(config.cert.read_bytes())
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert "localhost" in names.get_values_for_type(x509.DNSName)
        assert "127.0.0.1" in {str(ip) for ip in names.get_values_for_type(x509.IPAddress)}
    bob_server = await served("bob", "ws", configs["bob"])
    alice_server = await served("alice", "tcp", configs["alice"])
    bob, alice = (
        await _leader(bob_server.address, configs["me"]),
        await _leader(alice_server.address, configs["me"]),
    )
    y = actors.move(actors.send(torch.ones(2), bob), alice)
    assert torch.equal(await y.get(), torch.ones(2))
    await bob.close()
    await alice.close()


@bounded(30)
async def test_launched_cluster_runs_over_tls():
    """``local_cluster(tls=True)``, as ``aiosyft launch --tls`` starts it: worker processes that
    serve TLS only and move objects among themselves over it."""
    async with local_cluster(["alice", "bob"], "tcp", tls=True) as cluster:
        assert all(address.startswith("tls://") for address in cluster.addresses.values())
        alice, bob = cluster["alice"], cluster["bob"]
        y = actors.move(actors.send(torch.arange(3.0), alice), bob)
        assert torch.equal(await (y * 2).get(), torch.arange(3.0) * 2)
        with pytest.raises(InsecureAddress):
            await actors.connect(_plain(cluster.addresses["bob"]), tls=cluster.tls)


# -- the TLS transport of tls:// itself ----------------------------------------------------------
@pytest.mark.parametrize("transport", NETWORK)
@bounded(30)
async def test_large_tensors_cross_tls_intact_both_ways(served, pki, transport):
    """Frames far larger than a TLS record and than the socket's buffers, both ways and between
    workers: records are decrypted into a frame's buffer as it grows, and writes the socket cannot
    take at once resume where they stopped, in order with the small frames sent behind them."""
    bob_server = await served("bob", transport, pki["bob"])
    alice_server = await served("alice", transport, pki["alice"])
    bob, alice = await _leader(bob_server.address, pki["me"]), await _leader(alice_server.address, pki["me"])
    big = torch.randn(3 << 20)  # 12 MiB
    x = actors.send(big, bob)
    await bob.drain()  # the socket cannot take it at once: the write pauses, then resumes
    small = [actors.send(torch.tensor([float(i)]), bob) for i in range(50)]  # queued behind it
    y = actors.move(x * 2, alice)
    assert torch.equal(await y.get(), big * 2)
    assert [float((await s.get()).item()) for s in small] == [float(i) for i in range(50)]
    assert torch.equal(await x.get(), big)
    await bob.close()
    await alice.close()


@bounded(10)
async def test_a_silent_peer_is_dropped_after_the_tls_handshake_timeout(served, pki, monkeypatch):
    """A peer that opens a connection to a tls:// worker and never completes the handshake is
    closed at the timeout; the worker serves others meanwhile and after."""
    monkeypatch.setattr(actors.tcp, "_HANDSHAKE_TIMEOUT", 0.5)
    server = await served("bob", "tcp", pki["bob"])
    port = int(server.address.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await _still_serves(server, pki["me"])
    started = asyncio.get_running_loop().time()
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed, with nothing said
    assert asyncio.get_running_loop().time() - started < 3
    writer.close()
    assert server.worker.sessions == set()
    await _still_serves(server, pki["me"])


@bounded(10)
async def test_a_server_that_never_answers_the_tls_handshake_fails_the_dial(pki, monkeypatch):
    monkeypatch.setattr(actors.tcp, "_HANDSHAKE_TIMEOUT", 0.5)
    accepted: list[asyncio.StreamWriter] = []
    mute = await asyncio.start_server(lambda r, w: accepted.append(w), "127.0.0.1", 0)
    port = mute.sockets[0].getsockname()[1]
    with pytest.raises(WorkerLost, match="TLS handshake"):
        await _leader(f"tls://127.0.0.1:{port}", pki["me"])
    for writer in accepted:
        writer.close()
    mute.close()
    await mute.wait_closed()
