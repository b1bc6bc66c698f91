"""structlog loggers for the runtime: quiet by default, bound to a worker id.

Events go through the standard ``logging`` logger ``"aiosyft"``, so an application decides where
they land and at which level; without configuration only warnings and errors reach stderr. Hot
paths check :func:`tracing` once instead of paying for a filtered call per message.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

_stdlib = logging.getLogger("aiosyft")

_PROCESSORS: list[Any] = [
    structlog.stdlib.filter_by_level,
    structlog.stdlib.add_log_level,
    structlog.processors.TimeStamper(fmt="iso"),
    structlog.processors.format_exc_info,
    structlog.processors.KeyValueRenderer(
        key_order=["timestamp", "level", "event", "worker", "msg_id"], drop_missing=True
    ),
]


def get_logger(**context: Any) -> structlog.stdlib.BoundLogger:
    """A logger carrying ``context`` (``worker=...``) on every event."""
    logger = structlog.wrap_logger(
        _stdlib, processors=_PROCESSORS, wrapper_class=structlog.stdlib.BoundLogger
    )
    return logger.bind(**context)


def tracing() -> bool:
    """Whether per-message debug events are wanted (checked once per session, not per message)."""
    return _stdlib.isEnabledFor(logging.DEBUG)


def verbosity() -> int:
    """How many ``-v`` reproduce this process's level in a child: worker processes a launcher
    starts log what it logs."""
    if _stdlib.isEnabledFor(logging.DEBUG):
        return 2
    return 1 if _stdlib.isEnabledFor(logging.INFO) else 0


def configure(level: int | str = logging.WARNING) -> None:
    """Send aiosyft events at ``level`` and above to stderr (for the CLI and scripts)."""
    if not _stdlib.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        _stdlib.addHandler(handler)
        _stdlib.propagate = False
    _stdlib.setLevel(level)
