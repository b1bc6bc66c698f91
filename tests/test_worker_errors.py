"""Bad input costs its sender a typed error and nothing else: the worker keeps serving everyone.

After every case the same worker runs a normal operation for this sender, and receives and uses a
tensor moved to it by a second sender (alice's worker, worker to worker), with exact results.
Hand-made frames follow ``protocol.codec``: the ``<2sBBII`` prefix (magic, version, flags, message
count, header length) and then back-to-back msgpack arrays ``[kind, msg_id, sender, ...]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
import torch

import actors
from actors.pointer import PointerTensor, call
from protocol import (
    PROTOCOL_VERSION,
    BadArguments,
    Codec,
    Command,
    CommandNotAllowed,
    Get,
    GetMode,
    Kind,
    MalformedFrame,
    MalformedMessage,
    ObjectNotFound,
    ObjRef,
    RemoteError,
    Store,
    SyftError,
    UnknownMessage,
    UnsupportedVersion,
    ref_ext,
)
from protocol.codec import MAGIC, PREFIX
from protocol.errors import remote_error_class

RemoteRuntimeError = remote_error_class("RuntimeError")
RemoteTypeError = remote_error_class("TypeError")
NEVER_RETRIEVED = "remote error never retrieved"


# -- helpers ----------------------------------------------------------------------------------
def frame_of(*messages: Any, count: int | None = None, version: int = PROTOCOL_VERSION) -> bytes:
    """A frame holding ``messages`` (wire arrays, or raw header bytes) back to back."""
    header = b"".join(m if isinstance(m, bytes) else msgpack.packb(m) for m in messages)
    count = len(messages) if count is None else count
    return PREFIX.pack(MAGIC, version, 0, count, len(header)) + header


def send_raw(worker: actors.RemoteWorker, frame: bytes) -> None:
    """Write a hand-made frame after everything already sent (no message id to answer)."""
    worker.connection.flush()
    worker.connection.transport.write(frame)


async def ask_raw(worker: actors.RemoteWorker, message: list[Any]) -> Any:
    """Send one hand-made message in its own frame; the answer to its msg_id (message[1])."""
    return await worker.connection.request_frame(frame_of(message), message[1])


def fresh_id(worker: actors.RemoteWorker) -> int:
    """A message id this connection will never use for anything else."""
    return worker.connection.next_id()


async def settle(*, collect: bool = False) -> None:
    await asyncio.sleep(0)
    if collect:  # a raised remote error's traceback holds a cycle with the awaited pointer
        gc.collect()
        await asyncio.sleep(0)


async def held(worker: actors.RemoteWorker, *, collect: bool = False) -> int:
    await settle(collect=collect)
    return int((await worker.ping())["objects"])


@contextlib.contextmanager
def no_automatic_gc() -> Iterator[None]:
    """Keep the collector from freeing cyclic garbage (pointers held by raised errors) midway."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


async def assert_serves(worker: actors.RemoteWorker, other: actors.RemoteWorker) -> None:
    """``worker`` still serves this sender, and a second sender (``other``'s worker)."""
    with no_automatic_gc():  # so that the counts before and after see the same garbage
        before = await held(worker)
        t = torch.tensor([1.0, -2.0, 3.5])
        x = actors.send(t, worker)
        assert torch.equal(await (x * 2 + 1).get(), t * 2 + 1)
        moved = actors.send(t * 10, other)
        moved.move(worker)  # other's worker stores it on worker: a second sender's session
        assert torch.equal(await (moved - x).get(), t * 10 - t)
        del x, moved
        status = await worker.ping()
    assert status["id"] == worker.id
    assert status["objects"] == before  # what this check made is gone again


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def aiosyft_log() -> Iterator[list[str]]:
    """What the runtime logs (stdlib logger "aiosyft", rendered by structlog) while inside."""
    logger = logging.getLogger("aiosyft")
    handler = _Records()
    level = logger.level
    logger.addHandler(handler)
    if not logger.isEnabledFor(logging.ERROR):
        logger.setLevel(logging.ERROR)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


# -- frames that cannot be read -------------------------------------------------------------------
def _valid_ping(msg_id: int) -> list[Any]:
    return [int(Kind.PING), msg_id, "me"]


BAD_FRAMES = {
    "garbage": (b"this is not an aiosyft frame at all", MalformedFrame),
    "bad-magic": (b"XY" + frame_of(_valid_ping(1))[2:], MalformedFrame),
    "shorter-than-prefix": (b"\xa5\x1f\x01", MalformedFrame),
    "header-overruns-frame": (PREFIX.pack(MAGIC, PROTOCOL_VERSION, 0, 1, 500) + b"\x93", MalformedFrame),
    "not-msgpack": (frame_of(b"\xc1"), MalformedFrame),
    "fewer-messages-than-count": (frame_of(_valid_ping(1), count=3), MalformedFrame),
    # A real STORE of a tensor, cut short: the header is fine, the tensor's bytes are missing.
    "tensor-overruns-frame": (
        bytes(Codec().encode(Store(1, "me", 123, torch.ones(256))))[:-64],
        MalformedFrame,
    ),
    "unknown-extension-type": (
        frame_of([int(Kind.GET), 1, "me", msgpack.ExtType(99, b"x"), 1]),
        MalformedFrame,
    ),
    "unsupported-version": (frame_of(_valid_ping(1), version=PROTOCOL_VERSION + 7), UnsupportedVersion),
}


async def test_unreadable_frames_are_reported_and_worker_keeps_serving(bob, alice):
    errors = bob.connection.protocol_errors
    for case, (frame, expected) in BAD_FRAMES.items():
        errors.clear()
        send_raw(bob, frame)
        await bob.ping()  # answered after the error report for the bad frame
        assert [type(e) for e in errors] == [expected], (case, list(errors))
        assert errors[0].failed_id is None, case
        assert bob.connection.lost is None, case
        errors.clear()
        await assert_serves(bob, alice)
        assert list(errors) == [], case


async def test_frame_turning_bad_midway_serves_what_came_before(bob, alice):
    ping_id = fresh_id(bob)
    errors = bob.connection.protocol_errors
    errors.clear()
    answer = bob.connection.request_frame(frame_of(_valid_ping(ping_id), b"\xc1", count=2), ping_id)
    status = await answer  # the message before the bad bytes was served
    assert status["id"] == bob.id
    await bob.ping()
    assert [type(e) for e in errors] == [MalformedFrame]
    errors.clear()
    await assert_serves(bob, alice)


# -- messages that are readable but wrong ---------------------------------------------------------
async def test_unknown_message_kind_is_answered_to_its_msg_id(bob, alice):
    for kind in (99, 0, -3, "PING"):
        msg_id = fresh_id(bob)
        with pytest.raises(UnknownMessage) as refused:
            await ask_raw(bob, [kind, msg_id, "me"])
        assert type(refused.value) is UnknownMessage
        assert repr(kind) in str(refused.value)
    await assert_serves(bob, alice)


async def test_unknown_message_does_not_drop_its_neighbours(bob, alice):
    t = torch.tensor([0.5, -1.0, 2.0])
    x = actors.send(t, bob)
    before, after, source = actors.new_object_id(), actors.new_object_id(), ref_ext(x.id)

    def command(result_id: int, op: str) -> list[Any]:
        return [int(Kind.COMMAND), fresh_id(bob), "me", result_id, op, [source], None]

    bad_id = fresh_id(bob)
    frame = frame_of(command(before, "Tensor.neg"), [42, bad_id, "me"], command(after, "Tensor.exp"))
    with pytest.raises(UnknownMessage):
        await bob.connection.request_frame(frame, bad_id)
    # The commands on either side of the unknown message, in the same frame, both ran.
    assert torch.equal(await PointerTensor(bob, before).get(), -t)
    assert torch.equal(await PointerTensor(bob, after).get(), t.exp())
    del x
    await assert_serves(bob, alice)


WRONG_FIELDS = {
    "ping-extra-field": lambda i: [int(Kind.PING), i, "me", "extra"],
    "get-missing-field": lambda i: [int(Kind.GET), i, "me"],
    "command-extra-field": lambda i: [int(Kind.COMMAND), i, "me", 1, "torch.neg", [], None, 0],
    "store-missing-fields": lambda i: [int(Kind.STORE), i, "me"],
    "delete-extra-field": lambda i: [int(Kind.DELETE), i, "me", [1], 2],
    "get-string-id": lambda i: [int(Kind.GET), i, "me", "not-an-id", 1],
    "delete-not-a-list": lambda i: [int(Kind.DELETE), i, "me", 5],
    "expect-bad-ids": lambda i: [int(Kind.EXPECT), i, "me", ["a"], "x"],
    "forward-mismatched-ids": lambda i: [int(Kind.FORWARD), i, "me", [1, 2], "alice", "virtual://alice", [3]],
}


async def check_wrong_field_counts_and_types(bob, alice):
    for case, message in WRONG_FIELDS.items():
        with pytest.raises(MalformedMessage) as refused:
            await ask_raw(bob, message(fresh_id(bob)))
        assert type(refused.value) is MalformedMessage, case
        await assert_serves(bob, alice)


async def check_unknown_get_mode(bob, alice):
    x = actors.send(torch.ones(2), bob)
    with pytest.raises(MalformedMessage, match="mode"):
        await ask_raw(bob, [int(Kind.GET), fresh_id(bob), "me", x.id, 9])
    assert torch.equal(await x.get(), torch.ones(2))  # the object is untouched
    await assert_serves(bob, alice)


async def check_command_with_non_integer_result_id(bob, alice):
    x = actors.send(torch.tensor([1.0, 2.0]), bob)
    message = [int(Kind.COMMAND), fresh_id(bob), "me", "result", "Tensor.clone", [ref_ext(x.id)], None]
    with pytest.raises(MalformedMessage, match="result id"):
        await ask_raw(bob, message)
    del x
    assert await held(bob) == 0  # nothing was stored under a bogus id
    await assert_serves(bob, alice)


async def check_sender_that_is_not_a_string(bob, alice):
    errors = bob.connection.protocol_errors
    errors.clear()
    send_raw(bob, frame_of([int(Kind.PING), fresh_id(bob), 12345]))
    await bob.ping()
    assert [type(e) for e in errors] == [MalformedMessage]
    errors.clear()
    await assert_serves(bob, alice)


async def test_wrong_fields_are_a_malformed_message(bob, alice):
    await check_wrong_field_counts_and_types(bob, alice)
    await check_unknown_get_mode(bob, alice)
    await check_command_with_non_integer_result_id(bob, alice)
    await check_sender_that_is_not_a_string(bob, alice)


# -- commands that are refused --------------------------------------------------------------------
REFUSED_OPS = ["torch.load", "torch.save", "os.system", "eval", "builtins.open", "Tensor.data_ptr", "", 5]


async def check_unknown_commands_through_call(bob, alice, tmp_path):
    marker = tmp_path / "ran"
    x = actors.send(torch.ones(2), bob)
    for op in REFUSED_OPS:
        ptr = call(bob, op, [x, f"touch {marker}"])
        dependant = ptr + 1
        with pytest.raises(CommandNotAllowed) as refused:
            await ptr
        assert type(refused.value) is CommandNotAllowed
        assert refused.value.failed_id == ptr.id
        assert repr(op) in str(refused.value)
        with pytest.raises(CommandNotAllowed) as refused_too:
            await dependant
        assert refused_too.value.failed_id == ptr.id
        assert not marker.exists()
        await assert_serves(bob, alice)
    del ptr, dependant, refused, refused_too, x
    assert await held(bob, collect=True) == 0


async def check_hand_made_command_for_os_system(bob, alice, tmp_path):
    marker = tmp_path / "ran"
    connection = bob.connection
    result_id = actors.new_object_id()
    connection.tell(
        Command(connection.next_id(), connection.local_id, result_id, "os.system", [f"touch {marker}"])
    )
    ptr = PointerTensor(bob, result_id)
    with pytest.raises(CommandNotAllowed) as refused:
        await ptr
    assert refused.value.failed_id == result_id
    assert not marker.exists()
    del ptr, refused
    assert await held(bob, collect=True) == 0
    await assert_serves(bob, alice)


async def test_unknown_command_is_not_allowed(bob, alice, tmp_path):
    await check_unknown_commands_through_call(bob, alice, tmp_path)
    await check_hand_made_command_for_os_system(bob, alice, tmp_path)


# -- objects that do not exist --------------------------------------------------------------------
async def check_get_of_an_unknown_id(bob, alice):
    connection = bob.connection
    for mode in (GetMode.META, GetMode.COPY, GetMode.RELEASE):
        unknown = actors.new_object_id()
        with pytest.raises(ObjectNotFound) as missing:
            await connection.ask(Get(connection.next_id(), connection.local_id, unknown, mode))
        assert type(missing.value) is ObjectNotFound
        assert isinstance(missing.value, KeyError)
        assert str(unknown) in str(missing.value)
    ghost = PointerTensor(bob, actors.new_object_id())
    with pytest.raises(ObjectNotFound):
        await ghost.get()
    with pytest.raises(ObjectNotFound):
        await PointerTensor(bob, actors.new_object_id()).fetch()
    await assert_serves(bob, alice)


async def check_command_using_an_unknown_object(bob, alice):
    unknown = actors.new_object_id()
    x = actors.send(torch.ones(3), bob)
    for ptr in (
        call(bob, "torch.neg", [ObjRef(unknown)]),
        call(bob, "torch.add", [x, ObjRef(unknown)]),
        call(bob, "torch.cat", [[x, ObjRef(unknown)]]),
        call(bob, "torch.add", [x], {"other": ObjRef(unknown)}),
    ):
        with pytest.raises(ObjectNotFound) as missing:
            await ptr
        assert missing.value.failed_id == ptr.id
        assert str(unknown) in str(missing.value)
    # A pointer whose object was fetched with get() points at nothing any more.
    gone = actors.send(torch.ones(1), bob)
    stale_id = gone.id
    await gone.get()
    with pytest.raises(ObjectNotFound):
        await call(bob, "torch.neg", [ObjRef(stale_id)])
    del ptr, missing, x
    assert await held(bob, collect=True) == 0
    await assert_serves(bob, alice)


async def test_missing_objects_are_object_not_found(bob, alice):
    await check_get_of_an_unknown_id(bob, alice)
    await check_command_using_an_unknown_object(bob, alice)


# -- commands whose arguments do not fit ----------------------------------------------------------
async def test_wrong_shapes_are_a_remote_runtime_error_naming_them(bob, alice):
    x = actors.send(torch.ones(2, 3), bob)
    y = actors.send(torch.ones(4), bob)
    for ptr, text in (
        (x @ x, "2x3 and 2x3"),
        (x + y, "size of tensor a (3) must match the size of tensor b (4)"),
        (x.view(4), "shape '[4]' is invalid for input of size 6"),
        (torch.cat([x, y]), "Tensors must have same number of dimensions"),
    ):
        with pytest.raises(RuntimeError) as failure:
            await ptr
        error = failure.value
        assert type(error) is RemoteRuntimeError
        assert isinstance(error, RemoteError) and isinstance(error, SyftError)
        assert error.remote_type == "RuntimeError"
        assert text in str(error)
        assert error.failed_id == ptr.id
        assert "Traceback" in error.remote_traceback
    del ptr, failure, error
    await assert_serves(bob, alice)


async def check_arguments_that_are_not_a_list(bob, alice):
    connection = bob.connection
    x = actors.send(torch.ones(2), bob)
    cases = [
        ("torch.neg", 5, None, "arguments must be a list"),
        ("torch.neg", {"input": 1}, None, "arguments must be a list"),
        ("torch.neg", [ObjRef(x.id)], [1, 2], "keyword arguments must be a map"),
        ("optim.SGD", [5], {"lr": 0.1}, "takes a list of parameter tensors"),
    ]
    for op, args, kwargs, text in cases:
        result_id = actors.new_object_id()
        connection.tell(Command(connection.next_id(), connection.local_id, result_id, op, args, kwargs))
        ptr = PointerTensor(bob, result_id)
        with pytest.raises(BadArguments) as bad:
            await ptr
        assert type(bad.value) is BadArguments
        assert isinstance(bad.value, TypeError)
        assert bad.value.failed_id == result_id
        assert text in str(bad.value)
    with pytest.raises(TypeError) as wrong_type:
        await call(bob, "torch.neg", ["text"])
    assert type(wrong_type.value) is RemoteTypeError
    del ptr, bad, wrong_type
    assert torch.equal(await x.get(), torch.ones(2))
    assert await held(bob, collect=True) == 0
    await assert_serves(bob, alice)


async def check_unsendable_argument_is_refused_locally(bob, alice):
    x = actors.send(torch.ones(2), bob)
    with pytest.raises(BadArguments):
        x + object()
    with pytest.raises(BadArguments):
        call(bob, "torch.add", [x, {1: 2}])  # map keys must be strings
    y = x * 3  # the frame being built was not spoiled
    assert torch.equal(await y.get(), torch.full((2,), 3.0))
    await assert_serves(bob, alice)


async def test_arguments_that_do_not_fit_are_bad_arguments(bob, alice):
    await check_arguments_that_are_not_a_list(bob, alice)
    await check_unsendable_argument_is_refused_locally(bob, alice)


# -- errors nobody awaited --------------------------------------------------------------------------
async def test_unretrieved_error_is_logged_once_when_its_pointer_is_dropped(bob, alice):
    x = actors.send(torch.ones(2, 3), bob)
    bad = x @ x
    bad_id = bad.id
    dependants = [bad + 1, bad.sum(), (bad * 2).t()]
    await bob.ping()  # the failure has been reported by now; nobody asked for it
    with aiosyft_log() as messages:
        del bad, dependants
        await settle(collect=True)
        await bob.ping()
        gc.collect()
        await bob.ping()
    never = [m for m in messages if NEVER_RETRIEVED in m]
    assert len(never) == 1, messages
    assert f"obj_id={bad_id}" in never[0]
    assert "2x3 and 2x3" in never[0]
    del x
    assert await held(bob) == 0
    await assert_serves(bob, alice)


async def test_retrieved_error_is_not_logged(bob, alice):
    x = actors.send(torch.ones(2, 3), bob)
    bad = x @ x
    await bob.ping()  # reported first, then awaited: retrieved
    with pytest.raises(RuntimeError):
        await bad
    with aiosyft_log() as messages:
        del bad
        await settle(collect=True)
        await bob.ping()
    assert [m for m in messages if NEVER_RETRIEVED in m] == []
    await assert_serves(bob, alice)


async def test_error_awaited_right_after_the_command_is_not_logged(bob):
    x = actors.send(torch.ones(2, 3), bob)
    bad = x @ x
    raised = None
    try:
        await bad  # the usual pattern: issue, then await at once
    except RuntimeError as exc:
        raised = type(exc)
    with aiosyft_log() as messages:
        del bad
        await settle(collect=True)
        await bob.ping()
    del x
    await settle()
    assert raised is RemoteRuntimeError
    assert [m for m in messages if NEVER_RETRIEVED in m] == []


# -- backpressure -------------------------------------------------------------------------------------
async def test_backpressure_with_a_tiny_mailbox(make_worker, alice):
    dave = await make_worker("dave", mailbox_size=2)
    y = actors.send(torch.zeros(4), dave)
    local = torch.zeros(4)
    for i in range(2_500):  # 5,000 operations and 2,500 tensors: thousands of frames
        v = torch.full((4,), float(i)) + torch.arange(4.0)
        y = (y + actors.send(v, dave)) * 0.5
        local = (local + v) * 0.5
    await asyncio.wait_for(dave.drain(), 30)
    await y
    assert y.shape == torch.Size([4])
    assert torch.equal(await y.get(), local)
    assert await held(dave) == 0
    # A second burst, every operation with its own tensor, goes through the full mailbox too.
    pointers = [actors.send(torch.tensor([float(i)]), dave) * 2 for i in range(500)]
    await dave.drain()
    values = await asyncio.gather(*(p.get() for p in pointers))
    assert [v.item() for v in values] == [2.0 * i for i in range(500)]
    del pointers
    await assert_serves(dave, alice)
