"""Frames: msgpack messages with out-of-band tensor buffers.

A frame is the unit every transport carries (queue item, WebSocket message, TCP record)::

    magic b"\\xa5\\x1f" | version u8 | flags u8 | header length u32 (little endian)
    header: the msgpack message
    padding to a 64-byte boundary
    tensor bytes, each tensor 64-byte aligned, referenced from the header by offset

Tensor bytes never pass through msgpack: they are copied once from a memoryview of the tensor
into the frame when it is built (that copy is the snapshot that isolates the receiver from later
mutation by the sender), and decoded with :func:`torch.frombuffer` straight over the received
frame, so a writable frame (a ``bytearray``) gives writable tensors without another copy.

Only the types below can cross the wire; anything else is refused on encode and is a
:class:`~protocol.errors.MalformedFrame` on decode. Nothing is unpickled or evaluated.
"""

from __future__ import annotations

import math
import struct
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
PREFIX = struct.Struct("<2sBBI")
ALIGN = 64
#: Default largest frame: big enough for real models (issue: at least 256 MiB).
DEFAULT_MAX_FRAME = 1 << 30

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

_FLAG_REQUIRES_GRAD = 1
_FLAG_PARAMETER = 2
_REF = struct.Struct(">Q")


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
    """The wire form of a reference, cached by pointers so the hot path packs no payload."""
    return msgpack.ExtType(EXT_REF, _REF.pack(obj_id))


def _align(n: int) -> int:
    return (n + ALIGN - 1) & ~(ALIGN - 1)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A flat byte view of a contiguous tensor, for any dtype (bfloat16 and bool included)."""
    flat = t.reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


class Codec:
    """Encodes messages into frames and back. One per connection end; not re-entrant."""

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME) -> None:
        self.max_frame_size = max_frame_size
        self._packer = msgpack.Packer(default=self._default, strict_types=True, autoreset=True)
        self._buffers: list[tuple[int, torch.Tensor]] = []
        self._data_len = 0
        self._frame: Buffer = b""
        self._data_start = 0

    # -- encoding ---------------------------------------------------------------------------
    def encode(self, message: tuple[Any, ...]) -> bytes | bytearray:
        """One frame for ``message``, a contiguous buffer (``bytearray`` when it has tensors)."""
        parts = self.encode_parts(message)
        if len(parts) == 2:
            return parts[0] + parts[1]
        return bytearray().join(parts)

    def encode_parts(self, message: tuple[Any, ...]) -> list[Buffer]:
        """The frame as a list of buffers, for transports that can write them without joining.

        The tensor parts are views of the tensors: write them before the tensors can change.
        """
        self._buffers = []
        self._data_len = 0
        try:
            kind = KIND_OF_CLASS[type(message)]
        except KeyError:
            raise BadArguments(f"not a protocol message: {type(message).__name__}") from None
        try:
            header = self._packer.pack([kind, *message])
        except (TypeError, ValueError, OverflowError) as exc:
            raise BadArguments(f"cannot encode {type(message).__name__}: {exc}") from exc
        finally:
            buffers, self._buffers = self._buffers, []
        header_len = len(header)
        prefix = PREFIX.pack(MAGIC, PROTOCOL_VERSION, 0, header_len)
        if not buffers:
            size = PREFIX.size + header_len
            if size > self.max_frame_size:
                raise FrameTooLarge(f"frame of {size} bytes exceeds {self.max_frame_size}")
            return [prefix, header]
        data_start = _align(PREFIX.size + header_len)
        size = data_start + self._data_len
        if size > self.max_frame_size:
            raise FrameTooLarge(f"frame of {size} bytes exceeds {self.max_frame_size}")
        parts: list[Buffer] = [prefix, header, bytes(data_start - PREFIX.size - header_len)]
        position = 0
        for offset, tensor in buffers:
            if offset > position:
                parts.append(bytes(offset - position))
            view = tensor_bytes(tensor)
            parts.append(view)
            position = offset + view.nbytes
        return parts

    def _default(self, obj: Any) -> Any:
        kind = type(obj)
        if isinstance(obj, torch.Tensor):
            return self._encode_tensor(obj)
        if isinstance(obj, tuple):  # tuple, torch.Size, torch.return_types, NamedTuples
            return msgpack.ExtType(EXT_TUPLE, self._pack_nested(list(obj)))
        if kind is ObjRef:
            return msgpack.ExtType(EXT_REF, _REF.pack(obj.id))
        to_wire = getattr(obj, "__wire__", None)  # pointers know their own wire form
        if to_wire is not None:
            return to_wire()
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
        return msgpack.packb(obj, default=self._default, strict_types=True)

    def _encode_tensor(self, t: torch.Tensor) -> msgpack.ExtType:
        if t.layout is not torch.strided:
            raise TypeError(f"only dense tensors can be sent, not {t.layout}")
        if t.device.type != "cpu":
            raise TypeError(f"only CPU tensors can be sent, not {t.device}")
        code = DTYPE_CODE.get(t.dtype)
        if code is None:
            raise TypeError(f"dtype {t.dtype} is not supported on the wire")
        data = t.detach()
        if data.is_conj():
            data = data.resolve_conj()
        if data.is_neg():
            data = data.resolve_neg()
        data = data.contiguous()
        offset = _align(self._data_len)
        self._buffers.append((offset, data))
        self._data_len = offset + data.numel() * data.element_size()
        flags = (_FLAG_REQUIRES_GRAD if t.requires_grad else 0) | (
            _FLAG_PARAMETER if isinstance(t, torch.nn.Parameter) else 0
        )
        grad = t.grad if t.is_leaf else None
        payload = self._pack_nested([code, list(t.shape), offset, flags, grad])
        return msgpack.ExtType(EXT_TENSOR, payload)

    # -- decoding ---------------------------------------------------------------------------
    def decode(self, frame: Buffer) -> tuple[Any, ...]:
        """The message in ``frame``; raises a :class:`ProtocolError` subclass if it is bad.

        Tensors decoded from a writable frame share its memory; from a read-only one they are
        copied so that the receiver can always mutate what it owns.
        """
        size = len(memoryview(frame))
        if size > self.max_frame_size:
            raise FrameTooLarge(f"frame of {size} bytes exceeds {self.max_frame_size}")
        if size < PREFIX.size:
            raise MalformedFrame(f"frame of {size} bytes is shorter than its {PREFIX.size}-byte prefix")
        magic, version, _flags, header_len = PREFIX.unpack_from(frame)
        if magic != MAGIC:
            raise MalformedFrame(f"bad magic {magic!r}: not an aiosyft frame")
        if version != PROTOCOL_VERSION:
            raise UnsupportedVersion(f"protocol version {version}, this worker speaks {PROTOCOL_VERSION}")
        header_end = PREFIX.size + header_len
        if header_end > size:
            raise MalformedFrame(f"header of {header_len} bytes overruns a frame of {size} bytes")
        self._frame = frame
        self._data_start = _align(header_end)
        try:
            raw = msgpack.unpackb(
                memoryview(frame)[PREFIX.size : header_end],
                ext_hook=self._ext_hook,
                raw=False,
                strict_map_key=True,
                use_list=True,
            )
        except ProtocolError:
            raise
        except Exception as exc:  # msgpack reports bad input with several exception types
            raise MalformedFrame(f"undecodable header: {type(exc).__name__}: {exc}") from exc
        finally:
            self._frame = b""
        return _message_from_wire(raw)

    def _ext_hook(self, code: int, data: bytes) -> Any:
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
        value = msgpack.unpackb(data, ext_hook=self._ext_hook, raw=False, strict_map_key=True)
        if not isinstance(value, expected):
            raise MalformedFrame(f"expected {expected.__name__}, got {type(value).__name__}")
        return value

    def _decode_tensor(self, data: bytes) -> torch.Tensor:
        code, shape, offset, flags, grad = self._unpack_nested(data, list)
        dtype = DTYPES[code]
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise MalformedFrame(f"bad tensor shape {shape!r}")
        if type(offset) is not int or offset < 0:
            raise MalformedFrame(f"bad tensor offset {offset!r}")
        count = math.prod(shape)
        start = self._data_start + offset
        nbytes = count * dtype.itemsize
        frame = self._frame
        if start + nbytes > len(memoryview(frame)):
            raise MalformedFrame(f"tensor of {nbytes} bytes at {start} overruns the frame")
        if count == 0:
            tensor = torch.empty(shape, dtype=dtype)
        elif memoryview(frame).readonly:
            chunk = bytearray(memoryview(frame)[start : start + nbytes])
            tensor = torch.frombuffer(chunk, dtype=dtype, count=count).view(shape)
        else:
            tensor = torch.frombuffer(frame, dtype=dtype, count=count, offset=start).view(shape)
        requires_grad = bool(flags & _FLAG_REQUIRES_GRAD)
        if flags & _FLAG_PARAMETER:
            tensor = torch.nn.Parameter(tensor, requires_grad=requires_grad)
        elif requires_grad:
            tensor.requires_grad_(True)
        if grad is not None:
            if not isinstance(grad, torch.Tensor):
                raise MalformedFrame("a tensor's gradient must be a tensor")
            tensor.grad = grad
        return tensor


def _message_from_wire(raw: Any) -> tuple[Any, ...]:
    if not isinstance(raw, list) or not raw:
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
