"""Fixed-point numbers in the ring Z_2^64: the form every value takes before it is shared.

SPDZ computes on integers mod 2^64, so a real number travels as ``round(v * 2^f)`` in an int64
tensor (:mod:`mpc.ring`). :class:`FixedPrecisionTensor` is that integer tensor with its number of
fractional bits ``f``, here (a torch tensor) or on a worker (a pointer), with the arithmetic that
keeps the scale right: sums and differences add the integers; a product of two fixed-point
values carries ``2f`` fractional bits and is truncated back to ``f`` by an arithmetic shift (a
floor division by ``2^f``: rounding toward minus infinity, an error below ``2^-f`` per product).
int64 arithmetic wraps, which is exactly arithmetic mod 2^64: an intermediate that overflows
still decodes to the right value as long as the true result is in range.

For a value on a worker every operation is a pipelined pointer command; encoding, decoding and
truncation run there as the plain commands ``mpc.encode``, ``mpc.decode``, ``mpc.truncate`` and
``mpc.mean`` of the ``mpc`` command set, so fixing or floating a remote tensor never brings its
data to the caller.

This module never logs, prints or formats a value (reprs show shapes and precision only), and it
never combines a value held here with one held on a worker: that would send the local one away.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from actors.hook import provide
from actors.pointer import ObjectPointer, PointerTensor, call
from actors.registry import command
from mpc.nn import SharedModule, share_module
from mpc.opening import check_ring
from mpc.ring import PRECISION, check_precision, decode, encode
from mpc.tensor import SharedTensor, share
from protocol.errors import BadArguments

if TYPE_CHECKING:
    from actors.remote import RemoteWorker

#: The command set whose commands a worker must serve for remote fixed-point values.
COMMAND_SET = "mpc"
#: Float types a decoded value may take (what ``float_precision(dtype=...)`` accepts).
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

Child = torch.Tensor | PointerTensor


# -- the worker-side commands (also the local implementations: one code path for both) --------
def _checked_precision(precision: Any, name: str) -> int:
    try:
        return check_precision(precision)
    except ValueError as exc:
        raise BadArguments(f"{name}: {exc}") from None


@command("mpc.encode", command_set=COMMAND_SET, context=False)
def encode_command(value: Any, precision: Any) -> torch.Tensor:
    """Encode on the worker, so that fixing a remote tensor's precision never moves its data."""
    precision = _checked_precision(precision, "mpc.encode")
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        kind = value.dtype if isinstance(value, torch.Tensor) else type(value).__name__
        raise BadArguments(f"mpc.encode: expected a float tensor, got {kind}")
    try:
        return encode(value.detach(), precision)
    except ValueError as exc:  # names the bound only, never a value
        raise BadArguments(f"mpc.encode: {exc}") from None


@command("mpc.decode", command_set=COMMAND_SET, context=False)
def decode_command(value: Any, precision: Any, dtype: Any = torch.float32) -> torch.Tensor:
    """Decode on the worker: ``float_precision()`` of a remote value stays on the worker."""
    precision = _checked_precision(precision, "mpc.decode")
    check_ring("mpc.decode", value)
    if dtype not in FLOAT_DTYPES:
        raise BadArguments(f"mpc.decode: dtype must be a float type, got {dtype!r}")
    return decode(value, precision, dtype)


@command("mpc.truncate", command_set=COMMAND_SET, context=False)
def truncate_command(value: Any, precision: Any) -> torch.Tensor:
    """Drop ``precision`` fractional bits of a plaintext ring tensor after a product.

    An arithmetic shift is a floor division by ``2^precision``, exact on the integer, so the
    decoded result is rounded toward minus infinity (off by less than ``2^-precision``).
    Only for plaintext values: a share needs :func:`mpc.ring.truncate_share` or a protocol."""
    precision = _checked_precision(precision, "mpc.truncate")
    return check_ring("mpc.truncate", value) >> precision


@command("mpc.mean", command_set=COMMAND_SET, context=False)
def mean_command(value: Any, dim: Any = None, keepdim: Any = False) -> torch.Tensor:
    """Mean of a plaintext ring tensor: the wrapping sum, then an exact floor division by the
    count. Computed where the value is, since only there is its shape sure to be known."""
    value = check_ring("mpc.mean", value)
    if not isinstance(keepdim, bool):
        raise BadArguments(f"mpc.mean: keepdim must be a bool, got {type(keepdim).__name__}")
    if dim is None:
        if keepdim:
            raise BadArguments("mpc.mean: keepdim needs a dim")
        dims: list[int] = list(range(value.dim()))
    elif isinstance(dim, int) and not isinstance(dim, bool):
        dims = [dim]
    elif isinstance(dim, list | tuple) and all(isinstance(d, int) and not isinstance(d, bool) for d in dim):
        dims = list(dim)
    else:
        raise BadArguments(f"mpc.mean: dim must be an int, a list of ints or None, got {dim!r}")
    try:
        count = math.prod(value.shape[d] for d in dims)
        total = value.sum() if dim is None else value.sum(dim=dims, keepdim=keepdim)
    except IndexError as exc:
        raise BadArguments(f"mpc.mean: {exc}") from None
    if count == 0:
        raise BadArguments("mpc.mean: the mean of no elements is undefined")
    return torch.div(total, count, rounding_mode="floor")


# -- the tensor ------------------------------------------------------------------------------
def _same_place(a: Child, b: Child) -> None:
    """Refuse to mix a local value with a remote one, which would send the local one away."""
    a_remote, b_remote = isinstance(a, ObjectPointer), isinstance(b, ObjectPointer)
    if a_remote != b_remote:
        raise ValueError(
            "cannot combine a local FixedPrecisionTensor with a remote one: send or get one first"
        )


class FixedPrecisionTensor:
    """Real numbers encoded as int64 with ``precision`` fractional bits, here or on a worker.

    ``child`` is an int64 ``torch.Tensor`` or a :class:`~actors.PointerTensor` to one. Operators
    take another FixedPrecisionTensor of the same precision, or a public value (a Python number or
    a float tensor, encoded on the fly; a Python ``int`` multiplies exactly, without truncation).
    Results are new FixedPrecisionTensors, at once also for remote children (nothing is awaited).
    Range: products are formed in int64 before truncation, so ``|a * b| * 2^(2f)`` (for ``@``, the
    sum of such terms) must stay below 2^63, i.e. below 2^31 in magnitude at ``f = 16``;
    beyond it the result wraps silently, as the ring does.
    """

    __slots__ = ("child", "precision")

    def __init__(self, child: Child, precision: int = PRECISION) -> None:
        check_precision(precision)
        if isinstance(child, torch.Tensor):
            if child.dtype != torch.int64:
                raise TypeError(f"a FixedPrecisionTensor holds an int64 tensor, got {child.dtype}")
        elif not isinstance(child, PointerTensor):
            raise TypeError(f"a FixedPrecisionTensor holds an int64 tensor or a pointer, got {type(child)}")
        self.child = child
        self.precision = precision

    # -- where it is --------------------------------------------------------------------------
    @property
    def is_remote(self) -> bool:
        return isinstance(self.child, PointerTensor)

    @property
    def location(self) -> RemoteWorker | None:
        return self.child.location if isinstance(self.child, PointerTensor) else None

    @property
    def shape(self) -> torch.Size:
        """The shape (for a remote child: once its pointer is resolved, ``await x.child``)."""
        return self.child.shape

    def size(self, dim: int | None = None) -> Any:
        return self.shape if dim is None else self.shape[dim]

    def dim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return len(self.child)

    def __repr__(self) -> str:
        where = repr(self.child) if self.is_remote else f"shape={tuple(self.child.shape)}"
        return f"<FixedPrecisionTensor precision={self.precision} {where}>"

    def _new(self, child: Child) -> FixedPrecisionTensor:
        return FixedPrecisionTensor(child, self.precision)

    def _truncated(self, child: Child) -> FixedPrecisionTensor:
        """A product's ``2f`` fractional bits brought back to ``f``."""
        if isinstance(child, PointerTensor):
            return self._new(call(child.location, "mpc.truncate", [child, self.precision]))
        return self._new(truncate_command(child, self.precision))

    def _operand(self, other: Any, op: str) -> Child | None:
        """``other``'s ring value at this precision, or ``None`` if it is no value we take."""
        if isinstance(other, FixedPrecisionTensor):
            if other.precision != self.precision:
                raise ValueError(
                    f"{op}: precisions differ ({self.precision} and {other.precision} fractional bits): "
                    "fix both at the same precision"
                )
            _same_place(self.child, other.child)
            return other.child
        if isinstance(other, ObjectPointer):
            raise TypeError(f"{op}: a pointer operand must be fixed first: fix_precision(pointer)")
        if isinstance(other, bool):
            return None
        if isinstance(other, int | float):  # as float64: torch would make a Python float float32
            return encode(torch.tensor(other, dtype=torch.float64), self.precision)
        if isinstance(other, torch.Tensor) and other.is_floating_point():
            return encode(other, self.precision)
        if isinstance(other, torch.Tensor):
            raise TypeError(f"{op}: public tensors must be float (encoded here), got {other.dtype}")
        return None

    # -- linear operations ------------------------------------------------------------------
    def __add__(self, other: Any) -> FixedPrecisionTensor:
        value = self._operand(other, "+")
        return NotImplemented if value is None else self._new(self.child + value)

    __radd__ = __add__

    def __sub__(self, other: Any) -> FixedPrecisionTensor:
        value = self._operand(other, "-")
        return NotImplemented if value is None else self._new(self.child - value)

    def __rsub__(self, other: Any) -> FixedPrecisionTensor:
        value = self._operand(other, "-")
        return NotImplemented if value is None else self._new(-self.child + value)

    def __neg__(self) -> FixedPrecisionTensor:
        return self._new(-self.child)

    # -- products -----------------------------------------------------------------------------
    def __mul__(self, other: Any) -> FixedPrecisionTensor:
        if isinstance(other, int) and not isinstance(other, bool):
            return self._new(self.child * other)  # an integer scales exactly: no fractional bits added
        value = self._operand(other, "*")
        return NotImplemented if value is None else self._truncated(self.child * value)

    __rmul__ = __mul__

    def __matmul__(self, other: Any) -> FixedPrecisionTensor:
        value = self._operand(other, "@")
        return NotImplemented if value is None else self._truncated(self.child @ value)

    def __rmatmul__(self, other: Any) -> FixedPrecisionTensor:
        value = self._operand(other, "@")
        return NotImplemented if value is None else self._truncated(value @ self.child)

    def matmul(self, other: Any) -> FixedPrecisionTensor:
        return self @ other

    def mul(self, other: Any) -> FixedPrecisionTensor:
        return self * other

    def add(self, other: Any) -> FixedPrecisionTensor:
        return self + other

    def sub(self, other: Any) -> FixedPrecisionTensor:
        return self - other

    def neg(self) -> FixedPrecisionTensor:
        return -self

    # -- reductions -----------------------------------------------------------------------------
    def sum(self, dim: int | tuple[int, ...] | None = None, keepdim: bool = False) -> FixedPrecisionTensor:
        """Exact: the integers add (wrapping mod 2^64, right whenever the true sum is in range)."""
        if dim is None:
            return self._new(self.child.sum())
        return self._new(self.child.sum(dim=dim, keepdim=keepdim))

    def mean(self, dim: int | tuple[int, ...] | None = None, keepdim: bool = False) -> FixedPrecisionTensor:
        """The exact sum, then an exact floor division of the integer by the count (not a
        product with an encoded ``1/n``, whose error grows with the sum): the result is the true
        mean of the encoded values rounded toward minus infinity, off by less than ``2^-f``."""
        if isinstance(self.child, PointerTensor):
            dims = list(dim) if isinstance(dim, tuple) else dim
            return self._new(call(self.child.location, "mpc.mean", [self.child, dims, keepdim]))
        return self._new(mean_command(self.child, dim, keepdim))

    # -- shapes ---------------------------------------------------------------------------------
    def t(self) -> FixedPrecisionTensor:
        return self._new(self.child.t())

    def transpose(self, dim0: int, dim1: int) -> FixedPrecisionTensor:
        return self._new(self.child.transpose(dim0, dim1))

    def reshape(self, *shape: Any) -> FixedPrecisionTensor:
        return self._new(self.child.reshape(*shape))

    def view(self, *shape: Any) -> FixedPrecisionTensor:
        return self._new(self.child.view(*shape))

    def __getitem__(self, key: Any) -> FixedPrecisionTensor:
        return self._new(self.child[key])

    # -- leaving fixed point ----------------------------------------------------------------
    def float_precision(self, dtype: torch.dtype = torch.float32) -> Child:
        """The real values: a float tensor here, or a pointer to one on the child's worker."""
        if isinstance(self.child, PointerTensor):
            if dtype not in FLOAT_DTYPES:
                raise ValueError(f"float_precision: dtype must be a float type, got {dtype}")
            return call(self.child.location, "mpc.decode", [self.child, self.precision, dtype])
        return decode_command(self.child, self.precision, dtype)

    def share(self, *parties: RemoteWorker, crypto_provider: RemoteWorker | None = None) -> SharedTensor:
        """Additive shares among ``parties``, in this tensor's precision (:func:`mpc.tensor.share`)."""
        return share(self, *parties, crypto_provider=crypto_provider)


# -- modules ---------------------------------------------------------------------------------
class FixedPrecisionModule:
    """A module's parameters in fixed point, with the module's structure to rebuild it.

    ``named_fixed_parameters()`` gives each distinct parameter once, in ``named_parameters()``
    order (tied weights once, as there); that is what sharing a model walks. The module itself
    is kept as a skeleton whose parameters are empty placeholders, so the original parameters
    (and, for a sent model, their remote copies) are not kept alive by this object. Buffers (e.g.
    running statistics) are not encoded: the skeleton keeps a copy of them (for a remote model,
    a copy made on the worker). ``float_precision()`` builds a fresh module equal to the original,
    with its own copies of the buffers.
    """

    __slots__ = ("skeleton", "parameters", "precision")

    def __init__(
        self, skeleton: nn.Module, parameters: dict[str, FixedPrecisionTensor], precision: int
    ) -> None:
        self.skeleton = skeleton
        self.parameters = parameters
        self.precision = precision

    def named_fixed_parameters(self) -> Iterator[tuple[str, FixedPrecisionTensor]]:
        yield from self.parameters.items()

    def fixed_parameters(self) -> Iterator[FixedPrecisionTensor]:
        yield from self.parameters.values()

    def __repr__(self) -> str:
        return f"<FixedPrecisionModule {type(self.skeleton).__name__} precision={self.precision}>"

    def float_precision(self, dtype: torch.dtype = torch.float32) -> nn.Module:
        """A new module: the skeleton's structure with decoded parameters (pointers to them on
        their worker, for a remote model, placed as ``actors.send`` places them)."""
        memo: dict[int, Any] = {}
        for placeholder, fixed in zip(self.skeleton.parameters(), self.parameters.values(), strict=True):
            value = fixed.float_precision(dtype)
            memo[id(placeholder)] = (
                value if isinstance(value, PointerTensor) else nn.Parameter(value, placeholder.requires_grad)
            )
        _copy_remote_buffers(self.skeleton, memo)
        return copy.deepcopy(self.skeleton, memo)

    def share(self, *parties: RemoteWorker, crypto_provider: RemoteWorker | None = None) -> SharedModule:
        """Every parameter shared among ``parties``: an encrypted model (:mod:`mpc.nn`)."""
        return share_module(self, *parties, crypto_provider=crypto_provider)


def _copy_remote_buffers(module: nn.Module, memo: dict[int, Any]) -> None:
    """A deepcopy cannot copy a pointer; a copy made on its worker gives each module its own
    (sharing one would let ``get`` on one module break the other)."""
    for buffer in module.buffers():
        if isinstance(buffer, PointerTensor):
            memo[id(buffer)] = buffer.copy()


def _fix_module(module: nn.Module, precision: int) -> FixedPrecisionModule:
    memo: dict[int, Any] = {}
    parameters: dict[str, FixedPrecisionTensor] = {}
    for name, parameter in module.named_parameters():
        parameters[name] = fix_precision(parameter, precision)
        memo[id(parameter)] = nn.Parameter(torch.empty(0), requires_grad=parameter.requires_grad)
    _copy_remote_buffers(module, memo)
    return FixedPrecisionModule(copy.deepcopy(module, memo), parameters, precision)


# -- entry points ----------------------------------------------------------------------------
def fix_precision(x: Any, precision: int = PRECISION) -> Any:
    """Encode ``x`` with ``precision`` fractional bits: a float tensor or a pointer to one gives a
    :class:`FixedPrecisionTensor` (a remote one is encoded on its worker), a module a
    :class:`FixedPrecisionModule`. Values of magnitude ``2^(62 - precision)`` or more, NaN and
    infinities are refused (ValueError here, BadArguments from a worker) rather than wrapped."""
    check_precision(precision)
    if isinstance(x, FixedPrecisionTensor | FixedPrecisionModule):
        raise TypeError("this value is already in fixed precision")
    if isinstance(x, PointerTensor):
        return FixedPrecisionTensor(call(x.location, "mpc.encode", [x, precision]), precision)
    if isinstance(x, torch.Tensor):
        if not x.is_floating_point():
            raise TypeError(f"fix_precision encodes float tensors, got {x.dtype}")
        return FixedPrecisionTensor(encode(x.detach(), precision), precision)
    if isinstance(x, nn.Module):
        return _fix_module(x, precision)
    raise TypeError(
        f"cannot fix the precision of a {type(x).__name__}: give a float tensor, pointer or module"
    )


def float_precision(x: Any, dtype: torch.dtype = torch.float32) -> Any:
    """The real values of a fixed-point tensor or module (see their ``float_precision``)."""
    if isinstance(x, FixedPrecisionTensor | FixedPrecisionModule):
        return x.float_precision(dtype)
    raise TypeError(
        f"float_precision takes a FixedPrecisionTensor or FixedPrecisionModule, not {type(x).__name__}"
    )


provide(torch.Tensor, "fix_precision", fix_precision)
provide(PointerTensor, "fix_precision", fix_precision)
provide(nn.Module, "fix_precision", fix_precision)

__all__ = [
    "COMMAND_SET",
    "FixedPrecisionModule",
    "FixedPrecisionTensor",
    "fix_precision",
    "float_precision",
]
