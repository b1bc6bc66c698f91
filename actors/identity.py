"""Who is on the other end of a connection: per-identity secrets and the worker's check of them.

Every connection authenticates as one identity, and that identity is the sender of everything
it carries. Each identity has its own secret, so knowing one peer's secret never lets anyone be
another. A worker checks secrets in one of two ways:

* a **credentials file** (``id sha256(secret)`` per line): the worker holds hashes only, so
  reading the file reveals no secret. Secrets are random 256-bit tokens (:func:`new_secret`), for
  which a fast hash is enough; they are not passwords.
* a **cluster secret**: each identity's secret is ``HMAC(cluster secret, identity)``
  (:func:`derive_secret`). Simpler to deploy, but whoever holds the cluster secret can derive
  everyone's, so only a launcher and workers it trusts should hold it.

``aiosyft launch`` writes a credentials file and hands each process its own secret through the
environment. Secrets never appear in logs, error messages or command lines.

What this does not do yet: a worker presents its secret to whatever address it dials, and does
not authenticate the server it reaches (TLS, with certificates, is what will).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Mapping
from pathlib import Path

#: This process's identity and secret, as a launcher hands them to its children.
IDENTITY_ENV = "AIOSYFT_IDENTITY"
SECRET_ENV = "AIOSYFT_SECRET"  # noqa: S105 - the variable's name, not a secret
#: The credentials file a worker checks connections against.
CREDENTIALS_ENV = "AIOSYFT_CREDENTIALS"
#: A cluster secret from which every identity's secret derives.
CLUSTER_SECRET_ENV = "AIOSYFT_CLUSTER_SECRET"  # noqa: S105


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def derive_secret(cluster_secret: str, identity: str) -> str:
    """``identity``'s secret in a cluster keyed by ``cluster_secret``."""
    return hmac.new(cluster_secret.encode(), identity.encode(), hashlib.sha256).hexdigest()


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class Credentials:
    """Checks that a secret belongs to the identity presented with it (constant time)."""

    def __init__(self, *, hashes: Mapping[str, str] | None = None, cluster_secret: str | None = None) -> None:
        if (hashes is None) == (cluster_secret is None):
            raise ValueError("credentials come from a file of hashes or from a cluster secret")
        self._hashes = dict(hashes) if hashes is not None else None
        self._cluster = cluster_secret

    @classmethod
    def derived(cls, cluster_secret: str) -> Credentials:
        return cls(cluster_secret=cluster_secret)

    @classmethod
    def from_secrets(cls, secrets_by_id: Mapping[str, str]) -> Credentials:
        return cls(hashes={identity: _digest(secret) for identity, secret in secrets_by_id.items()})

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Credentials:
        hashes = {}
        for number, raw in enumerate(Path(path).read_text().splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split()
            if len(parts) != 2 or len(parts[1]) != 64:
                raise ValueError(f"{path}:{number}: expected 'identity sha256-hex'")
            hashes[parts[0]] = parts[1]
        return cls(hashes=hashes)

    @staticmethod
    def write(path: str | os.PathLike[str], secrets_by_id: Mapping[str, str]) -> None:
        """Write a credentials file (hashes only), readable by its owner alone."""
        lines = [f"{identity} {_digest(secret)}" for identity, secret in sorted(secrets_by_id.items())]
        path = Path(path)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as file:
            file.write("# aiosyft credentials: identity sha256(secret)\n" + "\n".join(lines) + "\n")

    @property
    def identities(self) -> list[str] | None:
        """The identities a file lists (``None`` for a cluster secret: any may be derived)."""
        return sorted(self._hashes) if self._hashes is not None else None

    def verify(self, identity: object, secret: object) -> bool:
        if not isinstance(identity, str) or not isinstance(secret, str) or not secret:
            return False
        try:  # a header aiohttp could not decode carries surrogates: no identity of ours
            given = secret.encode()
            identity.encode()
        except UnicodeEncodeError:
            return False
        if self._cluster is not None:  # bytes: compare_digest takes str only when it is ASCII
            return hmac.compare_digest(derive_secret(self._cluster, identity).encode(), given)
        assert self._hashes is not None
        expected = self._hashes.get(identity)
        given = _digest(secret)
        if expected is None:
            hmac.compare_digest(given, given)  # the same work whether or not the identity exists
            return False
        return hmac.compare_digest(expected, given)


def from_environment() -> tuple[Credentials | None, str | None]:
    """A worker's credentials and own secret from the environment a launcher prepared."""
    credentials: Credentials | None = None
    path = os.environ.get(CREDENTIALS_ENV)
    cluster = os.environ.get(CLUSTER_SECRET_ENV)
    if path:
        credentials = Credentials.load(path)
    elif cluster:
        credentials = Credentials.derived(cluster)
    return credentials, os.environ.get(SECRET_ENV) or None
