"""One exception hierarchy for everything that can go wrong between workers.

Errors travel as ERROR replies carrying a type name, a message and the remote traceback text;
:func:`from_wire` turns them back into these classes on the receiving side, so ``except
ObjectNotFound`` works the same whether the object was missing locally or three hops away. Remote
failures of builtin types (a torch shape mismatch is a ``RuntimeError``) become a
:class:`RemoteError` that is *also* an instance of that builtin, so ordinary PyTorch error handling
keeps working through pointers. Nothing here ever imports or instantiates a type named by the wire
beyond the fixed tables below.
"""

from __future__ import annotations

import builtins
import traceback as tb


class SyftError(Exception):
    """Base of every error aiosyft raises on purpose."""

    #: Remote traceback text, when the error happened on another worker.
    remote_traceback: str | None = None
    #: Id of the object whose command first failed, when the error reached a pointer through one
    #: of its inputs (the pointer's own id when it failed itself).
    failed_id: int | None = None


class ProtocolError(SyftError):
    """The bytes or the structure of a message broke the protocol."""

    #: Id of the offending message, when enough of it could be read to know it.
    msg_id: int | None = None


class MalformedFrame(ProtocolError):
    """A frame could not be decoded (bad magic, truncated, not msgpack, bad buffer offsets)."""


class FrameTooLarge(ProtocolError):
    """A frame is larger than the configured maximum; it is refused before it is read whole."""


class UnsupportedVersion(ProtocolError):
    """The peer speaks another protocol version."""


class UnknownMessage(ProtocolError):
    """The message kind is not one this protocol version defines."""


class MalformedMessage(ProtocolError):
    """The message kind is known but its fields are wrong (count or types)."""


class CommandNotAllowed(SyftError):
    """The command is not on the allowlist; remote workers run nothing else."""


class ObjectNotFound(SyftError, KeyError):
    """No object with that id is held by the worker (never stored, freed, or already fetched)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class BadArguments(SyftError, TypeError):
    """A command's arguments do not fit it (wrong count or type for the allowlisted operation)."""


class PermissionDenied(SyftError):
    """The sender may not do this to that object (the owner decides what leaves a worker)."""


class AuthenticationFailed(SyftError):
    """A connection presented a missing or wrong secret token."""


class PointerNotResolved(SyftError):
    """Pointer metadata (shape, dtype) was read before the pointer was awaited."""


class WorkerLost(SyftError):
    """The connection to a worker dropped or timed out; its pending results will never come.

    ``worker`` and ``address`` name the worker when the side that lost it knows them (the
    message always does), so a leader can tell which of its workers left."""

    worker: str | None = None
    address: str | None = None


class BudgetExhausted(PermissionDenied):
    """A data owner's privacy budget would be exceeded: the message names the budget, what was
    spent, and what is left."""


class InsecureAddress(PermissionDenied):
    """TLS is on, and an address would carry credentials or data in the clear: refused before
    anything is sent."""


class FlowAborted(SyftError):
    """Another party of the same protocol run failed or left: this party's part cannot finish.
    The message names that party and its error's type."""


class CheatingDetected(SyftError):
    """A party of an authenticated (SPDZ2k) run deviated from the protocol, and a check caught
    it before any value was revealed. The run and its session are aborted; the message names
    the check that failed (its subclass says which)."""


class MacCheckFailed(CheatingDetected):
    """Opened values do not match their MACs: a share, an opening, a MAC or a triple was
    changed by some party (which one, the check cannot tell)."""


class CommitmentBroken(CheatingDetected):
    """A party opened a value (a coin-toss seed, its MAC-check share) other than the one it
    committed to: it tried to choose it after seeing the others'."""


class OutputsDisagree(CheatingDetected):
    """The parties reported different values for one checked output."""


class RemoteError(SyftError):
    """A command failed on the remote worker with an exception that is not an aiosyft error.

    ``remote_type`` names the remote exception type (``"RuntimeError"``), ``failed_id`` the
    object id of the command that first failed when this error reached a pointer through one of
    its inputs.
    """

    remote_type: str = "Exception"

    def __init__(self, message: str, remote_type: str | None = None) -> None:
        super().__init__(message)
        if remote_type is not None:
            self.remote_type = remote_type

    def __str__(self) -> str:
        return f"{self.remote_type}: {self.args[0] if self.args else ''}"


#: aiosyft error classes by wire name: the only classes an ERROR message can name directly.
_SYFT_ERRORS: dict[str, type[SyftError]] = {
    cls.__name__: cls
    for cls in (
        SyftError,
        ProtocolError,
        MalformedFrame,
        FrameTooLarge,
        UnsupportedVersion,
        UnknownMessage,
        MalformedMessage,
        CommandNotAllowed,
        ObjectNotFound,
        BadArguments,
        PermissionDenied,
        AuthenticationFailed,
        WorkerLost,
        PointerNotResolved,
        FlowAborted,
        BudgetExhausted,
        InsecureAddress,
        CheatingDetected,
        MacCheckFailed,
        CommitmentBroken,
        OutputsDisagree,
    )
}

#: Builtin exception types a RemoteError may also be an instance of (no other name is honoured).
_BUILTIN_BASES = frozenset(
    {
        "ArithmeticError",
        "AssertionError",
        "AttributeError",
        "IndexError",
        "KeyError",
        "LookupError",
        "MemoryError",
        "NotImplementedError",
        "OverflowError",
        "RuntimeError",
        "TypeError",
        "ValueError",
        "ZeroDivisionError",
    }
)
_remote_classes: dict[str, type[RemoteError]] = {}


def remote_error_class(remote_type: str) -> type[RemoteError]:
    """The RemoteError subclass that also derives from the builtin named ``remote_type``."""
    cls = _remote_classes.get(remote_type)
    if cls is None:
        if remote_type not in _BUILTIN_BASES:
            return RemoteError
        base = getattr(builtins, remote_type)
        cls = type(f"Remote{remote_type}", (RemoteError, base), {"remote_type": remote_type})
        _remote_classes[remote_type] = cls
    return cls


class WireError:
    """An error as it travels: enough to rebuild the exception, nothing executable."""

    __slots__ = ("type_name", "message", "traceback", "failed_id")

    def __init__(
        self, type_name: str, message: str, traceback: str = "", failed_id: int | None = None
    ) -> None:
        self.type_name = type_name
        self.message = message
        self.traceback = traceback
        self.failed_id = failed_id

    @classmethod
    def from_exception(cls, exc: BaseException, failed_id: int | None = None) -> WireError:
        if isinstance(exc, RemoteError):
            message = str(exc.args[0]) if exc.args else ""
            return cls(
                exc.remote_type,
                message,
                exc.remote_traceback or "",
                exc.failed_id if failed_id is None else failed_id,
            )
        name = type(exc).__name__ if isinstance(exc, SyftError) else _builtin_name(exc)
        text = "".join(tb.format_exception(exc))
        message = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
        return cls(name, message, text, failed_id)

    def to_exception(self) -> SyftError:
        cls = _SYFT_ERRORS.get(self.type_name)
        exc: SyftError
        if cls is not None:
            exc = cls(self.message)
        else:
            exc = remote_error_class(self.type_name)(self.message, self.type_name)
        exc.failed_id = self.failed_id
        exc.remote_traceback = self.traceback or None
        return exc

    def __repr__(self) -> str:
        return f"WireError({self.type_name}: {self.message})"


def _builtin_name(exc: BaseException) -> str:
    """The nearest builtin ancestor's name, so torch's own exception types map onto it."""
    for klass in type(exc).__mro__:
        if klass.__name__ in _BUILTIN_BASES and getattr(builtins, klass.__name__, None) is klass:
            return klass.__name__
    return type(exc).__name__
