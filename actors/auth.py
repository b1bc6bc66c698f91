"""The shared secret that lets a peer talk to a worker.

One token per cluster, given as an option or in ``AIOSYFT_TOKEN``. It is checked before any
message is read, compared in constant time, and a refusal is logged. A worker started without a
token accepts anyone, which is only sensible on loopback; per-object permissions build on the
owner recorded for every stored object, not on this.
"""

from __future__ import annotations

import hmac
import os
from typing import Any

TOKEN_ENV = "AIOSYFT_TOKEN"  # noqa: S105 - the variable's name, not a secret


def resolve_token(token: str | None) -> str | None:
    """The explicit token, else the environment's, else none."""
    return token if token is not None else os.environ.get(TOKEN_ENV) or None


def token_matches(expected: str | None, given: Any) -> bool:
    """Constant-time comparison; with no expected token every peer is accepted."""
    if expected is None:
        return True
    if not isinstance(given, str):
        return False
    return hmac.compare_digest(expected.encode(), given.encode())
