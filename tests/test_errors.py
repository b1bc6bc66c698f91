"""Errors across the wire: aiosyft errors keep their class, builtins keep ``except`` working,
and nothing the wire names beyond the fixed tables is ever instantiated."""

import builtins

import pytest
import torch

import protocol.errors as errors
from protocol.codec import Codec
from protocol.errors import (
    AuthenticationFailed,
    BadArguments,
    CommandNotAllowed,
    FrameTooLarge,
    MalformedFrame,
    MalformedMessage,
    ObjectNotFound,
    PermissionDenied,
    PointerNotResolved,
    ProtocolError,
    RemoteError,
    SyftError,
    UnknownMessage,
    UnsupportedVersion,
    WireError,
    WorkerLost,
)
from protocol.messages import Reply

SYFT_ERRORS = [
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
]


def raised(exc):
    """``exc`` with a real traceback, as a worker would catch it."""

    def failing_operation():
        raise exc

    try:
        failing_operation()
    except BaseException as caught:
        return caught
    raise AssertionError("unreachable")  # pragma: no cover


def across(exc, failed_id=None, codec=False):
    """``exc`` as the other side sees it (optionally through a real frame)."""
    wire = WireError.from_exception(exc, failed_id)
    if codec:
        c = Codec()
        (reply,) = c.decode(c.encode(Reply(1, "bob", 2, wire)))
        wire = reply.value
    return wire.to_exception()


@pytest.mark.parametrize("through_codec", [False, True], ids=["direct", "codec"])
@pytest.mark.parametrize("cls", SYFT_ERRORS, ids=lambda c: c.__name__)
def test_aiosyft_errors_keep_their_class(cls, through_codec):
    back = across(raised(cls("object 0x2a is gone")), failed_id=42, codec=through_codec)
    assert type(back) is cls
    assert str(back) == "object 0x2a is gone"
    assert back.failed_id == 42
    assert "failing_operation" in back.remote_traceback
    assert "object 0x2a is gone" in back.remote_traceback


def test_object_not_found_is_still_a_key_error_with_a_readable_message():
    back = across(raised(ObjectNotFound("no object 0x5")))
    assert isinstance(back, KeyError)
    assert str(back) == "no object 0x5"  # not KeyError's "'no object 0x5'"
    with pytest.raises(KeyError):
        raise back


def test_bad_arguments_is_still_a_type_error():
    back = across(raised(BadArguments("torch.add takes tensors")))
    assert type(back) is BadArguments
    assert isinstance(back, TypeError)


BUILTINS = [
    RuntimeError("size mismatch"),
    ValueError("bad value"),
    TypeError("not a tensor"),
    IndexError("index 5 is out of bounds"),
    ZeroDivisionError("division by zero"),
    OverflowError("too big"),
    AttributeError("no attribute 'x'"),
    NotImplementedError("later"),
    AssertionError("invariant"),
    MemoryError("out of memory"),
    ArithmeticError("arithmetic"),
    LookupError("lookup"),
]


@pytest.mark.parametrize("through_codec", [False, True], ids=["direct", "codec"])
@pytest.mark.parametrize("exc", BUILTINS, ids=lambda e: type(e).__name__)
def test_builtin_errors_become_remote_errors_of_the_same_builtin(exc, through_codec):
    cls = type(exc)
    back = across(raised(exc), failed_id=7, codec=through_codec)
    assert isinstance(back, RemoteError)
    assert isinstance(back, cls)
    assert isinstance(back, SyftError)
    assert back.remote_type == cls.__name__
    assert back.args[0] == exc.args[0]
    assert str(back) == f"{cls.__name__}: {exc.args[0]}"
    assert back.failed_id == 7
    assert "failing_operation" in back.remote_traceback
    assert f"{cls.__name__}: {exc.args[0]}" in back.remote_traceback
    with pytest.raises(cls):
        raise back


def test_remote_key_error_message_is_the_key_not_its_repr():
    back = across(raised(KeyError("weight")))
    assert isinstance(back, KeyError)
    assert back.args[0] == "weight"


def test_builtin_subclasses_map_onto_their_nearest_allowed_ancestor():
    back = across(raised(UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")))
    assert isinstance(back, ValueError)
    assert back.remote_type == "ValueError"
    back = across(raised(ModuleNotFoundError("nope")))  # -> ImportError, not in the table
    assert type(back) is RemoteError
    assert back.remote_type == "ModuleNotFoundError"


def test_torch_specific_exceptions_map_onto_their_builtin_ancestor():
    try:
        torch.linalg.inv(torch.zeros(2, 2))
    except Exception as exc:  # torch's own LinAlgError
        linalg_error = exc
    assert type(linalg_error) is not RuntimeError
    assert isinstance(linalg_error, RuntimeError)
    back = across(linalg_error)
    assert isinstance(back, RuntimeError)
    assert isinstance(back, RemoteError)
    assert back.remote_type == "RuntimeError"
    assert back.args[0] == str(linalg_error)

    try:
        torch.ones(2) @ torch.ones(3)
    except Exception as exc:
        shape_error = exc
    back = across(shape_error, failed_id=9)
    assert isinstance(back, RuntimeError)
    assert back.args[0] == str(shape_error)
    assert back.failed_id == 9


def test_a_remote_error_keeps_its_identity_over_a_second_hop():
    """bob's failure reaches alice through carol: still the original type, text and traceback."""
    first = across(raised(ZeroDivisionError("division by zero")), failed_id=3)
    second = across(first)
    assert isinstance(second, ZeroDivisionError)
    assert second.remote_type == "ZeroDivisionError"
    assert second.args[0] == "division by zero"
    assert second.remote_traceback == first.remote_traceback
    assert second.failed_id == 3
    assert across(first, failed_id=11).failed_id == 11


def impostor(name):
    """A user exception class that merely carries a dangerous or unknown name."""
    return type(name, (Exception,), {})


@pytest.mark.parametrize(
    "cls",
    [impostor("Evil"), impostor("SystemExit"), impostor("KeyboardInterrupt"), OSError, StopIteration],
    ids=lambda c: c.__name__,
)
def test_unlisted_exception_types_become_plain_remote_errors(cls):
    back = across(raised(cls("payload")), failed_id=5)
    assert type(back) is RemoteError
    assert back.remote_type == cls.__name__
    assert back.args[0] == "payload"
    assert back.failed_id == 5
    assert not isinstance(back, getattr(builtins, cls.__name__, cls))


@pytest.mark.parametrize(
    "type_name",
    [
        "SystemExit",
        "KeyboardInterrupt",
        "GeneratorExit",
        "BaseException",
        "Exception",
        "OSError",
        "StopIteration",
        "RemoteError",
        "WireError",
        "builtins.RuntimeError",
        "os.system",
        "__import__",
        "Evil",
        "",
        "runtimeerror",
    ],
)
def test_wire_cannot_name_any_other_class(type_name):
    """Whatever a peer writes as the type name, only the fixed tables are honoured."""
    back = WireError(type_name, "msg", "tb", 1).to_exception()
    assert type(back) is RemoteError
    assert back.remote_type == type_name
    assert back.remote_traceback == "tb"


def test_remote_error_classes_are_shared():
    """One class per builtin, so ``type(a) is type(b)`` holds for two remote RuntimeErrors."""
    a = WireError("RuntimeError", "a").to_exception()
    b = WireError("RuntimeError", "b").to_exception()
    assert type(a) is type(b)
    assert type(a) is errors.remote_error_class("RuntimeError")


def test_empty_traceback_is_none():
    back = WireError("ValueError", "msg").to_exception()
    assert back.remote_traceback is None
    assert back.failed_id is None
