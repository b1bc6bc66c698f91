"""Arithmetic modulo 2^128 on int64 tensors: the ring SPDZ2k's shares and MACs live in.

SPDZ2k (Cramer et al. 2018) authenticates values of Z_2^64 (the ring of :mod:`mpc.ring`) by
sharing them, and their MACs, modulo 2^(64+s); with s = 64 that is 2^128, wider than any torch
integer. A wide tensor here is one int64 tensor of shape ``(2, *shape)``: ``[0]`` the low 64 bits,
``[1]`` the high 64 bits, both as two's-complement bit patterns (so torch's wrapping int64
addition and multiplication are exact modulo 2^64 on each half).

Elementwise kernels. Torch has no 128-bit type and no unsigned 64-bit arithmetic, so an exact
product in torch ops takes some twenty kernels over memory (32-bit partial products combined as
in Hacker's Delight's ``mulhu``): about 20x one int64 product. C has ``unsigned __int128``, whose
arithmetic is defined to wrap modulo 2^128, so a dozen lines of C compiled once per process (in
well under a second, by the system's C compiler, into a private temporary directory) make one
pass over memory, about 2x an int64 product, which is the memory traffic's ratio. Without a
compiler, or with ``AIOSYFT_NO_COMPILE=1``, the same functions run as torch ops, processed in
cache-sized chunks with in-place temporaries. The compiled library must agree with the torch
ops on a known answer before it is used. ``torch.compile`` was measured and not used: 17 s for
a first compilation per graph (3 s from its disk cache) in each of three worker processes, for a
kernel no faster than the C one.

Matrix products sum over the inner dimension, and 64-bit limbs overflow any machine type. The
operands are cut into ``L``-bit limbs and multiplied in float64 by BLAS, exactly: a limb product
is below 2^(2L) and a sum of ``k`` of them stays at most 2^53 when ``k (2^L - 1)^2 <= 2^53``
(:func:`_limb_plan` takes the fewest limbs that allow it). With the C kernels, ``A B = A_lo B_lo
+ 2^64 (A_lo B_hi + A_hi B_lo)``: the cross terms need only their low 64 bits, which torch's
wrapping int64 matmul gives, and only the low halves go into limbs (3 of 22 bits up to k = 512,
4 of 16 bits up to about 2^21, 5 of 13 bits up to :data:`MAX_INNER`): 9 BLAS products at
k = 256, where 16-bit limbs of all 128 bits took 36. The C kernels cut the limbs and recombine
the products, summed by weight in 64 bits and carried limb to limb, one pass each. The torch-ops
fallback cuts all 128 bits into limbs (6 of 22 bits at k = 256: the 21 products of weight below
2^128).
"""

from __future__ import annotations

import ctypes
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from mpc import ring

#: The largest inner dimension a matrix product stays exact for (13-bit limbs, ten of them).
MAX_INNER = (1 << 53) // ((1 << 13) - 1) ** 2

_LOW32 = 0xFFFFFFFF
_SIGN = -(1 << 63)
#: Elements per slice of the torch-ops fallback: its temporaries stay in a core's L2 cache.
_CHUNK = 1 << 15


# ---------------------------------------------------------------------------------------------
# The compiled kernels.

_SOURCE = r"""
#include <stdint.h>
typedef unsigned __int128 u128;
typedef uint64_t u64;

#define LOAD(lo, hi, i) (((u128)(hi)[i] << 64) | (lo)[i])
#define STORE(i, z) do { u128 z_ = (z); o0[i] = (u64)z_; o1[i] = (u64)(z_ >> 64); } while (0)
/* Steps are 1 (an operand of the result's size) or 0 (one value broadcast); the common case
   gets a loop of its own, with constant steps. */
#define BINARY(EXPR) \
    if (sa == 1 && sb == 1) { \
        for (int64_t i = 0; i < n; i++) { \
            u128 x = LOAD(a0, a1, i), y = LOAD(b0, b1, i); STORE(i, EXPR); } \
    } else { \
        for (int64_t i = 0; i < n; i++) { \
            u128 x = LOAD(a0, a1, i * sa), y = LOAD(b0, b1, i * sb); STORE(i, EXPR); } \
    }
#define ARGS const u64 *a0, const u64 *a1, int64_t sa, const u64 *b0, const u64 *b1, int64_t sb, \
             u64 *o0, u64 *o1, int64_t n

void wide_add(ARGS) { BINARY(x + y) }
void wide_sub(ARGS) { BINARY(x - y) }
void wide_mul(ARGS) { BINARY(x * y) }

/* b1 is unused: the factor is one int64 word, sign- or zero-extended. */
void wide_mul_int64(ARGS, int64_t is_signed) {
    (void)b1;
    if (is_signed) {
        if (sa == 1 && sb == 1) {
            for (int64_t i = 0; i < n; i++) STORE(i, LOAD(a0, a1, i) * (u128)(__int128)(int64_t)b0[i]);
        } else {
            for (int64_t i = 0; i < n; i++)
                STORE(i, LOAD(a0, a1, i * sa) * (u128)(__int128)(int64_t)b0[i * sb]);
        }
    } else {
        if (sa == 1 && sb == 1) {
            for (int64_t i = 0; i < n; i++) STORE(i, LOAD(a0, a1, i) * (u128)b0[i]);
        } else {
            for (int64_t i = 0; i < n; i++) STORE(i, LOAD(a0, a1, i * sa) * (u128)b0[i * sb]);
        }
    }
}

void wide_neg(const u64 *a0, const u64 *a1, u64 *o0, u64 *o1, int64_t n) {
    for (int64_t i = 0; i < n; i++) STORE(i, -LOAD(a0, a1, i));
}

/* rows x length values, row-major: the sum of each row. The high halves simply wrap; the low
   halves' 32-bit limbs are summed apart in 64 bits (exact for 2^32 terms), loops the compiler
   can vectorize, and meet only at the end. */
void wide_sum_rows(const u64 *a0, const u64 *a1, u64 *o0, u64 *o1, int64_t rows, int64_t length) {
    for (int64_t r = 0; r < rows; r++) {
        const u64 *lo = a0 + r * length, *hi = a1 + r * length;
        u128 total = 0;
        for (int64_t start = 0; start < length; start += ((int64_t)1 << 31)) {
            int64_t stop = length - start < ((int64_t)1 << 31) ? length : start + ((int64_t)1 << 31);
            u64 low32 = 0, high32 = 0, upper = 0;
            for (int64_t j = start; j < stop; j++) {
                low32 += lo[j] & 0xFFFFFFFFu;
                high32 += lo[j] >> 32;
                upper += hi[j];
            }
            total += (u128)low32 + ((u128)high32 << 32) + ((u128)upper << 64);
        }
        STORE(r, total);
    }
}

/* The bits-wide limbs of outer x inner wide values (of their low halves alone when a1 is
   NULL), as doubles (exact: below 2^26), laid out as [outer][count][inner]: limb i of value
   (o, c) at (o * count + i) * inner + c. Loops over c with shifts fixed per limb, which the
   compiler vectorizes. */
void wide_limbs(const u64 *a0, const u64 *a1, double *out, int64_t outer, int64_t inner,
                int64_t bits, int64_t count) {
    const u64 mask = ((u64)1 << bits) - 1;
    for (int64_t o = 0; o < outer; o++) {
        const u64 *lo = a0 + o * inner, *hi = a1 ? a1 + o * inner : 0;
        for (int64_t i = 0; i < count; i++) {
            double *slot = out + (o * count + i) * inner;
            int64_t start = i * bits;
            if (start + bits <= 64 || (start < 64 && !hi)) {
                for (int64_t c = 0; c < inner; c++) slot[c] = (double)(int64_t)((lo[c] >> start) & mask);
            } else if (start >= 64) {
                if (!hi) {
                    for (int64_t c = 0; c < inner; c++) slot[c] = 0.0;
                } else {
                    for (int64_t c = 0; c < inner; c++)
                        slot[c] = (double)(int64_t)((hi[c] >> (start - 64)) & mask);
                }
            } else {
                for (int64_t c = 0; c < inner; c++)
                    slot[c] = (double)(int64_t)(((lo[c] >> start) | (hi[c] << (64 - start))) & mask);
            }
        }
    }
}

/* Products of limbs back into wide values. blocks[i] holds left limb i times right limbs
   j = 0 .. width_i - 1 side by side, rows x (width_i * cols) doubles (exact integers below
   2^53), each of weight 2^(bits * (i + j)); width_i is count (full) or count - i (only the
   products below 2^(bits * count)). Per row, the products of one weight are summed in 64 bits
   (below count * 2^53), the sums carried limb to limb, and the limbs, now disjoint, placed in
   the halves modulo 2^128. acc is scratch for (2 * count - 1) * cols words. */
void wide_combine(const double *const *blocks, int64_t count, int64_t full, int64_t bits,
                  int64_t rows, int64_t cols, u64 *o0, u64 *o1, u64 *acc) {
    const u64 mask = ((u64)1 << bits) - 1;
    const int64_t weights = full ? 2 * count - 1 : count;
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t x = 0; x < weights * cols; x++) acc[x] = 0;
        for (int64_t i = 0; i < count; i++) {
            const int64_t width = full ? count : count - i;
            const double *row = blocks[i] + r * width * cols;
            for (int64_t j = 0; j < width; j++) {
                u64 *sum = acc + (i + j) * cols;
                const double *product = row + j * cols;
                for (int64_t c = 0; c < cols; c++) sum[c] += (u64)(int64_t)product[c];
            }
        }
        u64 *lo = o0 + r * cols, *hi = o1 + r * cols;
        for (int64_t c = 0; c < cols; c++) lo[c] = hi[c] = 0;
        for (int64_t w = 0; w < weights; w++) {
            u64 *limb = acc + w * cols;
            int64_t start = w * bits;
            if (start >= 128) break;
            if (w + 1 < weights) {
                u64 *next = limb + cols;
                for (int64_t c = 0; c < cols; c++) {
                    next[c] += limb[c] >> bits;
                    limb[c] &= mask;
                }
            }
            /* the last limb keeps its carries: they shift out above 2^128 */
            if (start >= 64) {
                for (int64_t c = 0; c < cols; c++) hi[c] |= limb[c] << (start - 64);
            } else {
                for (int64_t c = 0; c < cols; c++) lo[c] |= limb[c] << start;
                if (start + bits > 64)
                    for (int64_t c = 0; c < cols; c++) hi[c] |= limb[c] >> (64 - start);
            }
        }
    }
}
"""

_NO_COMPILE = "AIOSYFT_NO_COMPILE"
_P = ctypes.c_void_p
_I = ctypes.c_int64
_SIGNATURES: dict[str, list[type]] = {
    "wide_add": [_P, _P, _I, _P, _P, _I, _P, _P, _I],
    "wide_sub": [_P, _P, _I, _P, _P, _I, _P, _P, _I],
    "wide_mul": [_P, _P, _I, _P, _P, _I, _P, _P, _I],
    "wide_mul_int64": [_P, _P, _I, _P, _P, _I, _P, _P, _I, _I],
    "wide_neg": [_P, _P, _P, _P, _I],
    "wide_sum_rows": [_P, _P, _P, _P, _I, _I],
    "wide_limbs": [_P, _P, _P, _I, _I, _I, _I],
    "wide_combine": [_P, _I, _I, _I, _I, _I, _P, _P, _P],
}
_library: ctypes.CDLL | None = None
_loaded = False
_lock = threading.Lock()


def _build() -> ctypes.CDLL | None:
    """The kernels compiled into a fresh private directory (nothing another user could have
    planted), or None without a working C compiler or 128-bit integers."""
    compiler = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None or sys.byteorder != "little":
        return None
    with tempfile.TemporaryDirectory(prefix="aiosyft-wide-", ignore_cleanup_errors=True) as tmp:
        source, target = Path(tmp) / "wide.c", Path(tmp) / "wide.so"
        source.write_text(_SOURCE)
        try:
            subprocess.run(  # noqa: S603  (a fixed argument list: the compiler found on PATH)
                [compiler, "-O3", "-shared", "-fPIC", "-o", str(target), str(source)],
                check=True, capture_output=True, timeout=120,
            )  # fmt: skip
            library = ctypes.CDLL(str(target))  # mapped: the file may go with the directory
        except (OSError, subprocess.SubprocessError):
            return None
    for name, arguments in _SIGNATURES.items():
        function = getattr(library, name)
        function.argtypes = arguments
        function.restype = None
    return library


def _kernels() -> ctypes.CDLL | None:
    """The compiled kernels, built on first use, if they may be and agree with the torch ops."""
    global _library, _loaded  # one library per process, built once
    if _loaded:
        return _library
    with _lock:
        if not _loaded:
            library = None if os.environ.get(_NO_COMPILE, "") not in ("", "0") else _build()
            if library is not None and not _agrees(library):
                library = None
            _library, _loaded = library, True
    return _library


def _agrees(library: ctypes.CDLL) -> bool:
    """A known-answer check: a compiler that miscompiled 128-bit arithmetic must not be trusted
    with MACs."""
    words = [0, 1, -1, _SIGN, -_SIGN - 1, 0x1234_5678_9ABC_DEF0, -0x0FED_CBA9_8765_4321, _LOW32]
    a = torch.tensor([words, words[::-1]], dtype=torch.int64)
    b = torch.tensor([words[3:] + words[:3], words[5:] + words[:5]], dtype=torch.int64)
    c = b[0]
    checks = [
        (_binary_compiled(library.wide_add, a, b), _add_eager(a, b)),
        (_binary_compiled(library.wide_sub, a, b), _sub_eager(a, b)),
        (_binary_compiled(library.wide_mul, a, b), _mul_eager(a, b)),
        (_mul_int64_compiled(library, a, c, True), _mul_int64_eager(a, c, True)),
        (_mul_int64_compiled(library, a, c, False), _mul_int64_eager(a, c, False)),
        (_neg_compiled(library, a), _neg_eager(a)),
        (_sum_compiled(library, a, [1], False), _sum_eager(a, [1], False)),
    ]
    return all(torch.equal(got, expected) for got, expected in checks)


def compiled() -> bool:
    """Whether the elementwise functions run the compiled kernels (else torch ops)."""
    return _kernels() is not None


# ---------------------------------------------------------------------------------------------
# Shapes.


def _check(wide: torch.Tensor, what: str = "a wide tensor") -> None:
    """The compiled kernels read raw memory: a wrong dtype or layout must fail here, loudly."""
    if not isinstance(wide, torch.Tensor) or wide.dtype != torch.int64 or wide.dim() < 1:
        raise TypeError(f"{what} is an int64 tensor of shape (2, *shape)")
    if wide.shape[0] != 2:
        raise ValueError(f"{what} has shape (2, *shape), got {tuple(wide.shape)}")
    if wide.device.type != "cpu":
        raise ValueError(f"{what} lives in CPU memory, not on {wide.device}")


def _broadcast(a: torch.Size, b: torch.Size) -> torch.Size:
    """``torch.broadcast_shapes``, whose Python costs about 30 us, skipped for equal shapes (the
    common case, where a small tensor's kernel takes less)."""
    return a if a == b else torch.broadcast_shapes(a, b)


def _flat(wide: torch.Tensor, shape: torch.Size) -> tuple[torch.Tensor, int]:
    """``wide`` as a contiguous ``(2, N)`` tensor for the value shape ``shape``, and its step:
    0 when it holds one value to broadcast (not copied out to the full size), else 1."""
    if math.prod(wide.shape[1:]) == 1:
        return wide.reshape(2, 1).contiguous(), 0
    if wide.shape[1:] != shape:  # align the value shapes from the right, past the halves' axis
        wide = wide.reshape(2, *[1] * (len(shape) + 1 - wide.dim()), *wide.shape[1:]).expand(2, *shape)
    return wide.contiguous().reshape(2, -1), 1


def _flat_words(words: torch.Tensor, shape: torch.Size) -> tuple[torch.Tensor, int]:
    """:func:`_flat` for a plain int64 tensor: contiguous ``(N,)``, and its step."""
    if words.numel() == 1:
        return words.reshape(1), 0
    if words.shape != shape:
        words = words.expand(shape)
    return words.contiguous().reshape(-1), 1


def _halves(flat: torch.Tensor) -> tuple[int, int]:
    """Addresses of the low and high halves of a contiguous ``(2, N)`` tensor."""
    return flat.data_ptr(), flat[1].data_ptr()


# ---------------------------------------------------------------------------------------------
# Conversions.


def from_int64(values: torch.Tensor, *, signed: bool = True) -> torch.Tensor:
    """``values`` (int64) as wide numbers: sign-extended (``signed``, the value ``x`` of Z_2^64 read as
    an integer in [-2^63, 2^63)) or zero-extended (its representative in [0, 2^64))."""
    if values.dtype != torch.int64:
        raise TypeError(f"wide numbers come from int64 tensors, not {values.dtype}")
    out = torch.empty((2, *values.shape), dtype=torch.int64)
    out[0] = values
    if signed:
        torch.bitwise_right_shift(values, 63, out=out[1])
    else:
        out[1] = 0
    return out


def low(wide: torch.Tensor) -> torch.Tensor:
    """The value modulo 2^64 (an int64 tensor): what a SPDZ2k opening keeps."""
    return wide[0]


def random(shape: Sequence[int]) -> torch.Tensor:
    """A uniform wide tensor of value shape ``shape`` from the secure generator (AES-CTR keyed
    from ``os.urandom``): masks and MAC keys must not come from a predictable generator."""
    return ring.random_ring((2, *shape))


def is_zero(wide: torch.Tensor) -> bool:
    """Whether every element is 0 modulo 2^128 (a MAC check's verdict): each residue has one
    representation, so this is whether every bit is clear."""
    _check(wide)
    return not bool(wide.any())


def equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` (broadcast together) agree modulo 2^128 everywhere."""
    _check(a)
    _check(b)
    torch.broadcast_shapes(a.shape, b.shape)  # refuse shapes that do not go together
    return bool((a == b).all())


# ---------------------------------------------------------------------------------------------
# Elementwise arithmetic.


def _binary_compiled(function: Callable[..., None], a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    shape = _broadcast(a.shape[1:], b.shape[1:])
    (fa, sa), (fb, sb) = _flat(a, shape), _flat(b, shape)
    out = torch.empty((2, *shape), dtype=torch.int64)
    if out.numel():
        function(*_halves(fa), sa, *_halves(fb), sb, *_halves(out.view(2, -1)), out[0].numel())
    return out


def _chunks(
    kernel: Callable[..., None], out: torch.Tensor, *operands: torch.Tensor
) -> torch.Tensor:  # fmt: skip
    """``kernel(out_slice, *operand_slices)`` over cache-sized slices of flat ``(2, N)`` tensors
    (an operand of one value is passed whole, to broadcast)."""
    flat_out = out.view(2, -1)
    size = flat_out.shape[1]
    for start in range(0, size, _CHUNK):
        stop = min(start + _CHUNK, size)
        kernel(
            flat_out[:, start:stop],
            *(x if x.shape[1] == 1 else x[:, start:stop] for x in operands),
        )  # fmt: skip
    return out


def _eager_operands(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Size, torch.Tensor, torch.Tensor]:
    shape = _broadcast(a.shape[1:], b.shape[1:])
    return shape, _flat(a, shape)[0], _flat(b, shape)[0]


def _below(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a < b`` reading both int64 tensors as unsigned (bool): flip both sign bits."""
    return torch.lt(a ^ _SIGN, b ^ _SIGN)


def _add_chunk(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    torch.add(a[0], b[0], out=out[0])
    torch.add(a[1], b[1], out=out[1])
    out[1] += _below(out[0], a[0])  # the low half wrapped: carry one


def _sub_chunk(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    torch.sub(a[0], b[0], out=out[0])
    torch.sub(a[1], b[1], out=out[1])
    out[1] -= _below(a[0], b[0]).to(torch.int64)  # the low half wrapped: borrow one


def _add_eager(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    shape, fa, fb = _eager_operands(a, b)
    return _chunks(_add_chunk, torch.empty((2, *shape), dtype=torch.int64), fa, fb)


def _sub_eager(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    shape, fa, fb = _eager_operands(a, b)
    return _chunks(_sub_chunk, torch.empty((2, *shape), dtype=torch.int64), fa, fb)


def _neg_eager(a: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(a, memory_format=torch.contiguous_format)
    torch.neg(a[0], out=out[0])
    torch.bitwise_not(a[1], out=out[1])
    out[1] += a[0] == 0  # the complement plus one carries only out of a zero low half
    return out


def _mulhu(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The high 64 bits of the 128-bit product of ``u`` and ``v`` read as unsigned (a fresh
    tensor): 32-bit partial products, each below 2^64 so exact as bit patterns."""
    u0, u1 = u & _LOW32, (u >> 32).bitwise_and_(_LOW32)
    v0, v1 = v & _LOW32, (v >> 32).bitwise_and_(_LOW32)
    # Products come first out of place: either side may be one value broadcast.
    t = (u0 * v0).bitwise_right_shift_(32).bitwise_and_(_LOW32)
    t += u1 * v0  # p10 + the carry out of p00: below 2^64
    w = u0 * v1  # p01
    w += t & _LOW32
    high = u1 * v1  # p11
    high += t.bitwise_right_shift_(32).bitwise_and_(_LOW32)
    high += w.bitwise_right_shift_(32).bitwise_and_(_LOW32)
    return high


def _mul_chunk(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    high = _mulhu(a[0], b[0])
    high += a[0] * b[1]  # the cross terms reach only the high half: wrapping products suffice
    high += a[1] * b[0]
    out[1] = high
    torch.mul(a[0], b[0], out=out[0])


def _mul_eager(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    shape, fa, fb = _eager_operands(a, b)
    return _chunks(_mul_chunk, torch.empty((2, *shape), dtype=torch.int64), fa, fb)


def _mul_int64_chunk(out: torch.Tensor, a: torch.Tensor, c: torch.Tensor, signed: bool) -> None:
    word = c[0]
    high = _mulhu(a[0], word)
    high += a[1] * word
    if signed:  # a negative c is c + 2^64 - 2^64: take a's low half off the high half
        high -= a[0] & (word >> 63)
    out[1] = high
    torch.mul(a[0], word, out=out[0])


def _mul_int64_eager(a: torch.Tensor, c: torch.Tensor, signed: bool) -> torch.Tensor:
    shape = _broadcast(a.shape[1:], c.shape)
    fa, fc = _flat(a, shape)[0], _flat_words(c, shape)[0].unsqueeze(0)

    def kernel(out: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> None:
        _mul_int64_chunk(out, x, y, signed)

    return _chunks(kernel, torch.empty((2, *shape), dtype=torch.int64), fa, fc)


def _mul_int64_compiled(library: ctypes.CDLL, a: torch.Tensor, c: torch.Tensor, signed: bool) -> torch.Tensor:
    shape = _broadcast(a.shape[1:], c.shape)
    fa, sa = _flat(a, shape)
    word, sc = _flat_words(c, shape)
    out = torch.empty((2, *shape), dtype=torch.int64)
    if out.numel():
        library.wide_mul_int64(
            *_halves(fa), sa, word.data_ptr(), word.data_ptr(), sc, *_halves(out.view(2, -1)),
            out[0].numel(), int(signed),
        )  # fmt: skip
    return out


def _neg_compiled(library: ctypes.CDLL, a: torch.Tensor) -> torch.Tensor:
    flat = a.contiguous().reshape(2, -1)
    out = torch.empty(a.shape, dtype=torch.int64)
    if out.numel():
        library.wide_neg(*_halves(flat), *_halves(out.view(2, -1)), flat.shape[1])
    return out


def add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a + b`` modulo 2^128 (broadcasting as torch does)."""
    _check(a)
    _check(b)
    library = _kernels()
    return _add_eager(a, b) if library is None else _binary_compiled(library.wide_add, a, b)


def sub(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a - b`` modulo 2^128 (broadcasting as torch does)."""
    _check(a)
    _check(b)
    library = _kernels()
    return _sub_eager(a, b) if library is None else _binary_compiled(library.wide_sub, a, b)


def neg(a: torch.Tensor) -> torch.Tensor:
    """``-a`` modulo 2^128."""
    _check(a)
    library = _kernels()
    return _neg_eager(a) if library is None else _neg_compiled(library, a)


def mul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise product modulo 2^128 (broadcasting as torch does)."""
    _check(a)
    _check(b)
    library = _kernels()
    return _mul_eager(a, b) if library is None else _binary_compiled(library.wide_mul, a, b)


def mul_int64(wide: torch.Tensor, c: torch.Tensor | int, *, signed: bool = True) -> torch.Tensor:
    """``wide`` times the int64 words ``c`` (a tensor, broadcast), each read as signed
    (sign-extended) or, with ``signed=False``, as unsigned (zero-extended): a public fixed-point
    factor or a MAC key times a share, without building a wide operand for it. A Python int is
    one such word: in [-2^63, 2^63) when signed, in [0, 2^64) when not."""
    _check(wide)
    if isinstance(c, bool) or not isinstance(c, int | torch.Tensor):
        raise TypeError(f"the factor is an int64 tensor or an int, got {type(c).__name__}")
    if isinstance(c, int):
        lowest, limit = (-(1 << 63), 1 << 63) if signed else (0, 1 << 64)
        if not lowest <= c < limit:
            raise ValueError(f"an int factor lies in [{lowest}, {limit}) here (use mul for wider ones)")
        c = torch.tensor(c - (1 << 64) if c >= 1 << 63 else c, dtype=torch.int64)
    elif c.dtype != torch.int64 or c.device.type != "cpu":
        raise TypeError(f"the factor is an int64 CPU tensor, not {c.dtype} on {c.device}")
    library = _kernels()
    if library is None:
        return _mul_int64_eager(wide, c, signed)
    return _mul_int64_compiled(library, wide, c, signed)


# ---------------------------------------------------------------------------------------------
# Sums.


def _sum_dims(wide: torch.Tensor, dim: int | Sequence[int] | None) -> list[int]:
    """The value dimensions to sum over, as dimensions of ``wide`` (never its leading 2)."""
    rank = wide.dim() - 1
    if dim is None:
        return list(range(1, rank + 1))
    dims = [dim] if isinstance(dim, int) else list(dim)
    resolved = []
    for d in dims:
        if not -rank <= d < rank:
            raise IndexError(f"dimension {d} is out of range for a value of rank {rank}")
        resolved.append(d % rank + 1)
    if len(set(resolved)) != len(resolved):
        raise ValueError(f"dimension repeated in {dims}")
    return sorted(resolved)


def _sum_compiled(library: ctypes.CDLL, wide: torch.Tensor, dims: list[int], keepdim: bool) -> torch.Tensor:
    kept = [d for d in range(1, wide.dim()) if d not in dims]
    rows = math.prod(wide.shape[d] for d in kept)
    length = math.prod(wide.shape[d] for d in dims)
    flat = wide.permute(0, *kept, *dims).contiguous()  # no copy when summing trailing dims
    out = torch.empty((2, rows), dtype=torch.int64)
    if rows:
        library.wide_sum_rows(*_halves(flat), *_halves(out), rows, length)
    return _reduced_shape(out, wide, dims, keepdim)


def _reduced_shape(out: torch.Tensor, wide: torch.Tensor, dims: list[int], keepdim: bool) -> torch.Tensor:
    shape = [1 if d in dims else wide.shape[d] for d in range(1, wide.dim())]
    out = out.reshape(2, *shape)
    return out if keepdim else out.reshape(2, *(s for d, s in enumerate(shape, 1) if d not in dims))


def _sum_eager(wide: torch.Tensor, dims: list[int], keepdim: bool) -> torch.Tensor:
    """32-bit limbs summed in int64 (exact below 2^31 summands), then the carries."""
    if math.prod(wide.shape[d] for d in dims) >= 1 << 31:
        raise ValueError("the torch-ops sum is exact for fewer than 2^31 summands")
    lows = (wide & _LOW32).sum(dim=dims, keepdim=True)
    highs = (wide >> 32).bitwise_and_(_LOW32).sum(dim=dims, keepdim=True)
    limbs = [lows[0], highs[0], lows[1], highs[1]]  # 32-bit limbs of the result, plus carries
    for i in range(3):
        limbs[i + 1] += limbs[i] >> 32
        limbs[i] &= _LOW32
    out = torch.stack([limbs[0] | (limbs[1] << 32), limbs[2] | (limbs[3] << 32)])
    return _reduced_shape(out, wide, dims, keepdim)


def sum(wide: torch.Tensor, dim: int | Sequence[int] | None = None, keepdim: bool = False) -> torch.Tensor:
    """The sum modulo 2^128 over dimensions ``dim`` of the value shape (all of them for None;
    dimension 0 is the value's first, not the halves' axis), like ``torch.sum``."""
    _check(wide)
    dims = _sum_dims(wide, dim)
    if not dims:  # a scalar value: torch would read an empty list as every dimension
        return wide.clone()
    library = _kernels()
    if library is None:
        return _sum_eager(wide, dims, keepdim)
    return _sum_compiled(library, wide, dims, keepdim)


# ---------------------------------------------------------------------------------------------
# Matrix products.


def _limb_plan(inner: int, width: int) -> tuple[int, int]:
    """``(bits, count)``: the fewest limbs of equal width covering ``width`` bits whose
    products, summed over ``inner`` terms in float64, stay exact (``inner (2^bits - 1)^2 <=
    2^53``, so every partial sum BLAS forms is an integer float64 holds)."""
    for count in range(-(-width // 26), -(-width // 13) + 1):  # 26- down to 13-bit limbs
        bits = -(-width // count)
        if max(inner, 1) * ((1 << bits) - 1) ** 2 <= 1 << 53:
            return bits, count
    raise ValueError(f"an inner dimension of {inner} would lose exactness (limit {MAX_INNER})")


def _limbs_into(out: torch.Tensor, wide: torch.Tensor, bits: int, count: int) -> None:
    """The ``bits``-bit limbs of ``wide``, least significant first, into ``out[i]`` (float64,
    exact: each limb is below 2^26)."""
    mask = (1 << bits) - 1
    lo, hi = wide[0], wide[1]
    for i in range(count):
        start = i * bits
        if start + bits <= 64:
            limb = (lo >> start).bitwise_and_(mask)
        elif start >= 64:
            limb = (hi >> (start - 64)).bitwise_and_(mask)
        else:  # straddles the halves: the arithmetic shift's sign bits are masked off first
            limb = (lo >> start).bitwise_and_((1 << (64 - start)) - 1)
            limb |= (hi << (64 - start)).bitwise_and_(mask)
        out[i] = limb


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Matrix product modulo 2^128 of wide ``(2, *batch, n, k)`` and ``(2, *batch, k, m)``
    tensors (batch dimensions broadcast as in ``torch.matmul``; no 1-D operands)."""
    _check(a)
    _check(b)
    if a.dim() < 3 or b.dim() < 3 or a.shape[-1] != b.shape[-2]:
        raise ValueError(
            f"wide matmul takes (2, ..., n, k) and (2, ..., k, m), got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if a.shape[-1] > MAX_INNER:
        raise ValueError(f"an inner dimension of {a.shape[-1]} would lose exactness (limit {MAX_INNER})")
    library = _kernels()
    if library is None:
        return _matmul_eager(a, b, *_limb_plan(a.shape[-1], 128))
    return _matmul_compiled(library, a, b)


def _matmul_compiled(library: ctypes.CDLL, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``A B = A_lo B_lo + 2^64 (A_lo B_hi + A_hi B_lo)`` modulo 2^128: the cross terms only
    need their low 64 bits, which torch's wrapping int64 matmul gives exactly; only the low
    halves' product needs all 128 bits, from limbs of 64 bits (3 of 22 bits up to k = 512: 9
    BLAS products where 128-bit limbs would take 21). The C kernels cut the limbs and
    recombine the products, one pass each."""
    n, inner, m = a.shape[-2], a.shape[-1], b.shape[-1]
    batch = torch.broadcast_shapes(a.shape[1:-2], b.shape[1:-2])
    out = torch.empty((2, *batch, n, m), dtype=torch.int64)
    if out.numel() == 0:
        return out
    bits, count = _limb_plan(inner, 64)
    a, b = a.contiguous(), b.contiguous()
    left = torch.empty((count, *a.shape[1:]), dtype=torch.float64)  # left[i]: limb i, (..., n, k)
    library.wide_limbs(a.data_ptr(), None, left.data_ptr(), 1, a[0].numel(), bits, count)
    # The right limbs side by side, (..., k, count * m): one BLAS call per left limb.
    right = torch.empty((*b.shape[1:-1], count * m), dtype=torch.float64)
    library.wide_limbs(b.data_ptr(), None, right.data_ptr(), b[0].numel() // m, m, bits, count)
    blocks = [torch.matmul(left[i], right).expand(*batch, n, count * m).contiguous() for i in range(count)]
    pointers = (ctypes.c_void_p * count)(*(block.data_ptr() for block in blocks))
    scratch = torch.empty((2 * count - 1) * m, dtype=torch.int64)
    library.wide_combine(
        ctypes.cast(pointers, ctypes.c_void_p), count, 1, bits, out[0].numel() // m, m,
        *_halves(out.view(2, -1)), scratch.data_ptr(),
    )  # fmt: skip
    out[1] += torch.matmul(a[0], b[1])
    out[1] += torch.matmul(a[1], b[0])
    return out


def _matmul_eager(a: torch.Tensor, b: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The torch-ops matrix product: limb products summed by weight in int64, then carried."""
    inner = a.shape[-1]
    n, m = a.shape[-2], b.shape[-1]
    left = torch.empty((count, *a.shape[1:]), dtype=torch.float64)
    _limbs_into(left, a, bits, count)
    # The right limbs side by side, (..., k, count, m): a left limb's BLAS call takes a prefix.
    right = torch.empty((count, *b.shape[1:]), dtype=torch.float64)
    _limbs_into(right, b, bits, count)
    right = right.movedim(0, -2).contiguous()
    batch = torch.broadcast_shapes(a.shape[1:-2], b.shape[1:-2])
    sums = torch.zeros((*batch, n, count, m), dtype=torch.int64)  # by weight i + j
    for i in range(count):
        width = count - i  # right limbs j with i + j < count land below 2^128
        block = torch.matmul(left[i], right[..., :width, :].reshape(*right.shape[:-3], inner, width * m))
        sums[..., i:, :] += block.view(*block.shape[:-1], width, m).to(torch.int64)
    # Each weight's sum is below count * 2^53; carry what exceeds its limb into the next.
    mask = (1 << bits) - 1
    limbs = [sums[..., w, :] for w in range(count)]
    for w in range(count - 1):
        limbs[w + 1] += limbs[w] >> bits
        limbs[w] &= mask
    result = torch.zeros((2, *batch, n, m), dtype=torch.int64)
    for w, limb in enumerate(limbs):
        start = w * bits
        if start < 64:
            result[0] |= limb << start
            if start + bits > 64:
                result[1] |= limb >> (64 - start)
        else:
            result[1] |= limb << (start - 64)  # the last limb's carry is above 2^128: shifted out
    return result


__all__ = [
    "MAX_INNER",
    "add",
    "compiled",
    "equal",
    "from_int64",
    "is_zero",
    "low",
    "matmul",
    "mul",
    "mul_int64",
    "neg",
    "random",
    "sub",
    "sum",
]
