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

Configuration: ``TlsConfig(ca, cert, key)`` (files, PEM), or from the environment
(:data:`CA_ENV`, :data:`CERT_ENV`, :data:`KEY_ENV`) as ``aiosyft launch --tls`` hands it to the
processes it starts. :func:`issue_certificates` makes a throwaway CA and certificates for that.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Protocol

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
