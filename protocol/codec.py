"""Frames: msgpack messages with out-of-band tensor buffers.

A frame is the unit every transport carries (queue item, WebSocket message, TCP record)::

    magic b"\\xa5\\x1f" | version u8 | flags u8 | header length u32 (little endian)
    header: the messages, one msgpack array each, back to back
    padding to a 64-byte boundary
    tensor bytes, each tensor 64-byte aligned, referenced from the header by offset

Tensor bytes never pass through msgpack: they are copied once from a memoryview of the tensor
into the frame when it is built (that copy is the snapshot that isolates the receiver from later
mutation by the sender), and decoded with :func:`torch.frombuffer` straight over the received
frame, so a writable frame (a ``bytearray``) gives writable tensors without another copy.

Only the types below can cross the wire; anything else is refused on encode and is a
:class:`~protocol.errors.MalformedFrame` on decode (msgpack's own timestamp extension, -1,
decodes natively to ``msgpack.Timestamp``: an inert value that no allowlisted operation takes).
Nesting is bounded, since every nested extension value is one more native unpack on the C
stack. Nothing is unpickled or evaluated.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterator
from typing import Any, NamedTuple, TypeAlias

import msgpack
import torch

from protocol.errors import (
    BadArguments,
    FrameTooLarge,
    MalformedFrame,
    MalformedMessage,
    ProtocolError,
    UnknownMessage,
    UnsupportedVersion,
    WireError,
)
from protocol.messages import CLASS_OF_KIND, KIND_OF_CLASS, PROTOCOL_VERSION

Buffer: TypeAlias = bytes | bytearray | memoryview

MAGIC = b"\xa5\x1f"
PREFIX = struct.Struct("<2sBBII")  # little endian
ALIGN = 64
#: Default largest frame: big enough for real models (issue: at least 256 MiB).
DEFAULT_MAX_FRAME = 1 << 30
#: How deep tuples, slices and other extension values may nest inside one another.
MAX_DEPTH = 32
_CONTAINERS = (list, dict, tuple)


def _check_structure(value: Any, depth: int) -> None:
    """Refuse what msgpack would pack but a receiver could not take back: maps with keys that
    are not strings, and nesting deeper than :data:`MAX_DEPTH`."""
    if depth > MAX_DEPTH:
        raise BadArguments(f"values nest deeper than {MAX_DEPTH} levels")
    if type(value) is dict:
        for key, item in value.items():
            if type(key) is not str and type(key) is not bytes:
                raise BadArguments(f"map keys must be strings, not {type(key).__name__}")
            if type(item) in _CONTAINERS:
                _check_structure(item, depth + 1)
    else:
        for item in value:
            if type(item) in _CONTAINERS:
                _check_structure(item, depth + 1)


# Extension type codes. Append only: a code's meaning never changes within a protocol version.
EXT_TENSOR = 1
EXT_REF = 2
EXT_TUPLE = 3
EXT_SLICE = 4
EXT_ELLIPSIS = 5
EXT_DTYPE = 6
EXT_ERROR = 7
EXT_POINTER = 8

DTYPES: tuple[torch.dtype, ...] = (
    torch.bool,
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
    torch.complex64,
    torch.complex128,
)
DTYPE_CODE: dict[torch.dtype, int] = {dtype: code for code, dtype in enumerate(DTYPES)}

#: Tensor header: dtype code, flags, number of dimensions, pad, offset of its bytes in the frame's
#: data region; then one u64 per dimension; then, with the gradient flag, the gradient's header.
TENSOR_HEAD = struct.Struct("<BBBxQ")
MAX_DIMS = 32
_FLAG_REQUIRES_GRAD = 1
_FLAG_PARAMETER = 2
_FLAG_GRAD = 4
_FLAGS = _FLAG_REQUIRES_GRAD | _FLAG_PARAMETER | _FLAG_GRAD
_REF = struct.Struct(">Q")
#: Shapes on the wire, by number of dimensions.
_SHAPES = tuple(struct.Struct(f"<{n}Q") for n in range(MAX_DIMS + 1))
#: Dtypes ``Tensor.numpy`` can view without a copy (bfloat16 has no numpy counterpart).
_NUMPY_DTYPES = frozenset(DTYPES) - {torch.bfloat16}


class ObjRef:
    """A reference to an object held by the worker that receives the message."""

    __slots__ = ("id",)

    def __init__(self, obj_id: int) -> None:
        self.id = obj_id

    def __eq__(self, other: object) -> bool:
        return type(other) is ObjRef and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    def __repr__(self) -> str:
        return f"ObjRef({self.id:#x})"


class PointerRef(NamedTuple):
    """A reference to an object on a third worker (a pointer handed to another worker)."""

    location: str
    address: str
    obj_id: int


def ref_ext(obj_id: int) -> msgpack.ExtType:
    """The wire form of a reference, cached by pointers so the hot path packs no payload.

    Built with ``tuple.__new__``: ``ExtType``'s own constructor re-validates code and payload
    in Python, which costs more than the rest of a pointer operation's encoding.
    """
    return tuple.__new__(msgpack.ExtType, (EXT_REF, _REF.pack(obj_id)))


def _align(n: int) -> int:
    return (n + ALIGN - 1) & ~(ALIGN - 1)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A byte view of a contiguous tensor, for any dtype (bfloat16 and bool included)."""
    if t.dtype in _NUMPY_DTYPES and t.is_contiguous():
        return memoryview(t.numpy())  # one call; the frame takes any contiguous buffer
    flat = t.reshape(-1)
    if flat.numel() and flat.stride(0) != 1:  # a one-element view keeps its odd stride
        flat = flat.clone(memory_format=torch.contiguous_format)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


class FrameBuilder:
    """Collects messages into one frame: a burst of pipelined commands crosses as one unit.

    ``add`` packs a message at once (so its arguments are captured when the operation is
    called); ``build`` joins what was added into a frame and starts over. A message that carries
    tensor bytes only holds views of them, so ``add`` says so and its caller builds right away.
    """

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME) -> None:
        self.max_frame_size = max_frame_size
        self._packer = msgpack.Packer(default=self._default, strict_types=True, autoreset=True)
        self._headers: list[bytes] = []
        self._header_len = 0
        self._buffers: list[tuple[int, torch.Tensor]] = []
        self._data_len = 0
        self._depth = 0

    def __len__(self) -> int:
        return len(self._headers)

    @property
    def header_bytes(self) -> int:
        return self._header_len

    def add(self, message: tuple[Any, ...]) -> bool:
        """Pack ``message`` into the frame; True if it holds tensor views (build before they change)."""
        kind = KIND_OF_CLASS.get(type(message))
        if kind is None:
            raise BadArguments(f"not a protocol message: {type(message).__name__}")
        return self.add_wire([kind, *message])

    def add_wire(self, fields: list[Any]) -> bool:
        """``add`` for a message already in wire order ``[kind, msg_id, sender, ...]``: the
        per-operation path builds this list directly instead of a message tuple."""
        buffers, data_len = len(self._buffers), self._data_len
        try:
            for field in fields:
                if type(field) in _CONTAINERS:
                    _check_structure(field, 0)
            self._depth = 0
            packed = self._packer.pack(fields)
        except Exception as exc:  # nothing of a refused message may stay in the frame
            del self._buffers[buffers:]
            self._data_len = data_len
            if isinstance(exc, ProtocolError):
                raise
            raise BadArguments(f"cannot encode message of kind {fields[0]}: {exc}") from exc
        self._headers.append(packed)
        self._header_len += len(packed)
        return len(self._buffers) > buffers

    def build(self) -> bytes | bytearray:
        """The frame of every message added since the last build (``bytearray`` if it has tensors)."""
        headers, buffers, data_len = self._headers, self._buffers, self._data_len
        self._headers, self._buffers, self._header_len, self._data_len = [], [], 0, 0
        header_len = sum(map(len, headers))
        prefix = PREFIX.pack(MAGIC, PROTOCOL_VERSION, 0, len(headers), header_len)
        if not buffers:
            size = PREFIX.size + header_len
            if size > self.max_frame_size:
                raise FrameTooLarge(f"frame of {size} bytes exceeds the limit of {self.max_frame_size}")
            return b"".join([prefix, *headers])
        data_start = _align(PREFIX.size + header_len)
        size = data_start + data_len
        if size > self.max_frame_size:
            raise FrameTooLarge(f"frame of {size} bytes exceeds the limit of {self.max_frame_size}")
        parts: list[Buffer] = [prefix, *headers, bytes(data_start - PREFIX.size - header_len)]
        position = 0
        for offset, tensor in buffers:
            if offset > position:
                parts.append(bytes(offset - position))
            view = tensor_bytes(tensor)
            parts.append(view)
            position = offset + view.nbytes
        return bytearray().join(parts)

    def _default(self, obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            return tuple.__new__(msgpack.ExtType, (EXT_TENSOR, self._tensor_payload(obj, with_grad=True)))
        to_wire = getattr(obj, "__wire__", None)  # pointers know their own wire form
        if to_wire is not None:
            return to_wire()
        kind = type(obj)
        if kind is PointerRef:
            return msgpack.ExtType(EXT_POINTER, self._pack_nested(list(obj)))
        if isinstance(obj, tuple):  # tuple, torch.Size, torch.return_types, NamedTuples
            return msgpack.ExtType(EXT_TUPLE, self._pack_nested(list(obj)))
        if kind is ObjRef:
            if type(obj.id) is not int or not 0 <= obj.id < 1 << 64:
                raise BadArguments(f"object ids are unsigned 64-bit integers, not {obj.id!r}")
            return msgpack.ExtType(EXT_REF, _REF.pack(obj.id))
        if kind is slice:
            return msgpack.ExtType(EXT_SLICE, self._pack_nested([obj.start, obj.stop, obj.step]))
        if obj is Ellipsis:
            return msgpack.ExtType(EXT_ELLIPSIS, b"")
        if kind is torch.dtype:
            code = DTYPE_CODE.get(obj)
            if code is None:
                raise TypeError(f"dtype {obj} is not supported on the wire")
            return msgpack.ExtType(EXT_DTYPE, bytes([code]))
        if kind is WireError:
            fields = [obj.type_name, obj.message, obj.traceback, obj.failed_id]
            return msgpack.ExtType(EXT_ERROR, self._pack_nested(fields))
        if isinstance(obj, bool):
            return bool(obj)
        if isinstance(obj, int):  # IntEnum and other int subclasses
            return int(obj)
        if isinstance(obj, float):
            return float(obj)
        if isinstance(obj, str):
            return str(obj)
        raise TypeError(f"cannot send an object of type {kind.__module__}.{kind.__qualname__}")

    def _pack_nested(self, obj: Any) -> bytes:
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise BadArguments(f"values nest deeper than {MAX_DEPTH} levels")
        try:
            return msgpack.packb(obj, default=self._default, strict_types=True)
        finally:
            self._depth -= 1

    def _tensor_payload(self, t: torch.Tensor, *, with_grad: bool) -> bytes:
        """The tensor's fixed binary header (see :data:`TENSOR_HEAD`); its bytes go out of band."""
        if t.layout is not torch.strided:
            raise TypeError(f"only dense tensors can be sent, not {t.layout}")
        if not t.is_cpu:
            raise TypeError(f"only CPU tensors can be sent, not {t.device}")
        code = DTYPE_CODE.get(t.dtype)
        if code is None:
            raise TypeError(f"dtype {t.dtype} is not supported on the wire")
        if t.ndim > MAX_DIMS:
            raise TypeError(f"tensors of more than {MAX_DIMS} dimensions cannot be sent")
        requires_grad = t.requires_grad
        data = t.detach() if requires_grad else t  # the bytes are read before the frame leaves
        if data.is_conj():
            data = data.resolve_conj()
        if data.is_neg():
            data = data.resolve_neg()
        data = data.contiguous()
        offset = _align(self._data_len)
        self._buffers.append((offset, data))
        self._data_len = offset + data.nbytes
        grad = t.grad if with_grad and t.is_leaf else None
        flags = (
            (_FLAG_REQUIRES_GRAD if requires_grad else 0)
            | (_FLAG_PARAMETER if type(t) is not torch.Tensor and isinstance(t, torch.nn.Parameter) else 0)
            | (_FLAG_GRAD if grad is not None else 0)
        )
        ndim = t.ndim
        payload = TENSOR_HEAD.pack(code, flags, ndim, offset) + _SHAPES[ndim].pack(*t.shape)
        if grad is not None:
            payload += self._tensor_payload(grad, with_grad=False)
        return payload


class Codec:
    """Decodes frames into messages, and encodes single messages."""

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME) -> None:
        self.max_frame_size = max_frame_size
        self._builder = FrameBuilder(max_frame_size)

    def encode(self, message: tuple[Any, ...]) -> bytes | bytearray:
        """A frame holding just ``message``."""
        self._builder.add(message)
        return self._builder.build()

    def decode(self, frame: Buffer) -> Iterator[Any]:
        """The messages in ``frame``, in order, decoded one at a time as they are consumed.

        A frame whose prefix is wrong raises a :class:`ProtocolError` subclass here; bytes that
        stop making sense midway raise :class:`MalformedFrame` from the iterator, after the
        messages before them. A message that is readable but wrong (unknown kind, wrong fields)
        is yielded as its :class:`ProtocolError`, so the messages around it are still served.
        Decoding lazily keeps a long burst from piling up objects that the garbage collector
        would have to walk.

        Tensors decoded from a writable frame share its memory; from a read-only one they are
        copied so that the receiver can always mutate what it owns.
        """
        size = len(memoryview(frame))
        if size > self.max_frame_size:
            raise FrameTooLarge(f"frame of {size} bytes exceeds the limit of {self.max_frame_size}")
        if size < PREFIX.size:
            raise MalformedFrame(f"frame of {size} bytes is shorter than its {PREFIX.size}-byte prefix")
        magic, version, _flags, count, header_len = PREFIX.unpack_from(frame)
        if magic != MAGIC:
            raise MalformedFrame(f"bad magic {magic!r}: not an aiosyft frame")
        if version != PROTOCOL_VERSION:
            raise UnsupportedVersion(f"protocol version {version}, this worker speaks {PROTOCOL_VERSION}")
        header_end = PREFIX.size + header_len
        if header_end > size:
            raise MalformedFrame(f"header of {header_len} bytes overruns a frame of {size} bytes")
        reader = _FrameReader(frame, _align(header_end))
        if count == 1:  # a lone request or reply: one call, no streaming machinery
            return iter((_single_message(memoryview(frame)[PREFIX.size : header_end], reader),))
        unpacker = msgpack.Unpacker(
            ext_hook=reader.ext_hook,
            raw=False,
            strict_map_key=True,
            max_buffer_size=max(header_len, 1024),
        )
        unpacker.feed(memoryview(frame)[PREFIX.size : header_end])
        return _messages(unpacker, header_len, count)


def _single_message(header: memoryview, reader: _FrameReader) -> Any:
    try:
        raw = msgpack.unpackb(header, ext_hook=reader.ext_hook, raw=False, strict_map_key=True)
    except ProtocolError:
        raise
    except Exception as exc:  # msgpack reports bad input with several exception types
        raise MalformedFrame(f"undecodable header: {type(exc).__name__}: {exc}") from exc
    return _message_from_wire(raw)


def _messages(unpacker: msgpack.Unpacker, header_len: int, count: int) -> Iterator[Any]:
    for _ in range(count):
        try:
            raw = unpacker.unpack()
        except msgpack.OutOfData:
            raise MalformedFrame(f"header ends before its {count} messages") from None
        except ProtocolError:
            raise
        except Exception as exc:  # msgpack reports bad input with several exception types
            raise MalformedFrame(f"undecodable header: {type(exc).__name__}: {exc}") from exc
        yield _message_from_wire(raw)
    if unpacker.tell() != header_len:
        raise MalformedFrame(f"{header_len - unpacker.tell()} bytes left after {count} messages")


class _FrameReader:
    """Decodes the extension types of one frame; tensors are views of that frame's bytes."""

    __slots__ = ("data_start", "depth", "frame")

    def __init__(self, frame: Buffer, data_start: int) -> None:
        self.frame = frame
        self.data_start = data_start
        self.depth = 0

    def ext_hook(self, code: int, data: bytes) -> Any:
        try:
            if code == EXT_REF:
                (obj_id,) = _REF.unpack(data)
                return ObjRef(obj_id)
            if code == EXT_TENSOR:
                return self._decode_tensor(data)
            if code == EXT_TUPLE:
                return tuple(self._unpack_nested(data, list))
            if code == EXT_SLICE:
                start, stop, step = self._unpack_nested(data, list)
                return slice(start, stop, step)
            if code == EXT_ELLIPSIS:
                return Ellipsis
            if code == EXT_DTYPE:
                if len(data) != 1 or data[0] >= len(DTYPES):
                    raise MalformedFrame(f"unknown dtype code {bytes(data)!r}")
                return DTYPES[data[0]]
            if code == EXT_ERROR:
                type_name, message, tb, failed_id = self._unpack_nested(data, list)
                return WireError(str(type_name), str(message), str(tb), failed_id)
            if code == EXT_POINTER:
                location, address, obj_id = self._unpack_nested(data, list)
                return PointerRef(str(location), str(address), int(obj_id))
        except ProtocolError:
            raise
        except Exception as exc:
            raise MalformedFrame(f"bad extension {code}: {type(exc).__name__}: {exc}") from exc
        raise MalformedFrame(f"unknown extension type {code}")

    def _unpack_nested(self, data: bytes, expected: type) -> Any:
        # Each level is a C-level unpack on the native stack: bound it (deep nesting crashed it).
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise MalformedFrame(f"extension values nest deeper than {MAX_DEPTH} levels")
        try:
            value = msgpack.unpackb(data, ext_hook=self.ext_hook, raw=False, strict_map_key=True)
        finally:
            self.depth -= 1
        if not isinstance(value, expected):
            raise MalformedFrame(f"expected {expected.__name__}, got {type(value).__name__}")
        return value

    def _decode_tensor(self, data: bytes, *, with_grad: bool = True) -> torch.Tensor:
        if len(data) < TENSOR_HEAD.size:
            raise MalformedFrame(f"tensor header of {len(data)} bytes is too short")
        code, flags, ndim, offset = TENSOR_HEAD.unpack_from(data)
        if code >= len(DTYPES):
            raise MalformedFrame(f"unknown tensor dtype code {code}")
        if ndim > MAX_DIMS or flags & ~_FLAGS:
            raise MalformedFrame(f"bad tensor header: {ndim} dimensions, flags {flags:#x}")
        end = TENSOR_HEAD.size + 8 * ndim
        if len(data) < end:
            raise MalformedFrame("tensor header ends inside its shape")
        shape = _SHAPES[ndim].unpack_from(data, TENSOR_HEAD.size)
        dtype = DTYPES[code]
        count = math.prod(shape)
        start = self.data_start + offset
        nbytes = count * dtype.itemsize
        frame = self.frame
        view = memoryview(frame)
        if start + nbytes > view.nbytes:
            raise MalformedFrame(f"tensor of {nbytes} bytes at {start} overruns the frame")
        if count == 0:
            tensor = torch.empty(shape, dtype=dtype)
        elif view.readonly:
            chunk = bytearray(view[start : start + nbytes])
            tensor = torch.frombuffer(chunk, dtype=dtype, count=count).view(shape)
        else:
            tensor = torch.frombuffer(frame, dtype=dtype, count=count, offset=start)
            if ndim != 1:
                tensor = tensor.view(shape)
        requires_grad = bool(flags & _FLAG_REQUIRES_GRAD)
        if flags & _FLAG_PARAMETER:
            tensor = torch.nn.Parameter(tensor, requires_grad=requires_grad)
        elif requires_grad:
            tensor.requires_grad_(True)
        if flags & _FLAG_GRAD:
            if not with_grad:
                raise MalformedFrame("a gradient cannot carry a gradient")
            tensor.grad = self._decode_tensor(data[end:], with_grad=False)
        elif len(data) != end:
            raise MalformedFrame(f"{len(data) - end} stray bytes after a tensor header")
        return tensor


#: kind -> (message class, number of fields): the fast path's whole check.
_FULL_SHAPE: dict[int, tuple[type[Any], int]] = {
    kind: (cls, len(cls._fields) + 1) for kind, cls in CLASS_OF_KIND.items()
}


def _message_from_wire(raw: Any) -> Any:
    """The message for one decoded array, or the ProtocolError saying what is wrong with it."""
    if type(raw) is list and len(raw) > 2 and type(raw[0]) is int:
        shape = _FULL_SHAPE.get(raw[0])
        if shape is not None and len(raw) == shape[1] and type(raw[1]) is int and type(raw[2]) is str:
            return tuple.__new__(shape[0], raw[1:])  # every field present and typed: no more to do
    try:
        return _checked_message(raw)
    except ProtocolError as exc:
        return exc


def _checked_message(raw: Any) -> tuple[Any, ...]:
    if type(raw) is not list or not raw:
        raise MalformedMessage(f"a message is a non-empty array, got {type(raw).__name__}")
    kind = raw[0]
    cls = CLASS_OF_KIND.get(kind) if type(kind) is int else None
    if cls is None:
        error: ProtocolError = UnknownMessage(f"unknown message kind {kind!r}")
        error.msg_id = _known_id(raw)
        raise error
    fields = len(raw) - 1
    if not (len(cls._fields) - len(cls._field_defaults) <= fields <= len(cls._fields)):
        error = MalformedMessage(f"{cls.__name__} takes {len(cls._fields)} fields, got {fields}")
        error.msg_id = _known_id(raw)
        raise error
    if type(raw[1]) is not int or type(raw[2]) is not str:
        raise MalformedMessage(f"{cls.__name__} needs an integer id and a sender name")
    return cls(*raw[1:])


def _known_id(raw: Any) -> int | None:
    if isinstance(raw, list) and len(raw) > 1 and type(raw[1]) is int:
        return raw[1]
    return None
