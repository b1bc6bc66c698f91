"""Arithmetic modulo 2^128 on int64 tensors: the ring SPDZ2k's shares and MACs live in.

SPDZ2k (Cramer et al. 2018) authenticates values of Z_2^64 (the ring of :mod:`mpc.ring`) by
sharing them, and their MACs, modulo 2^(64+s); with s = 64 that is 2^128, wider than any torch
integer. A wide tensor here is one int64 tensor of shape ``(2, *shape)``: ``[0]`` the low 64 bits,
``[1]`` the high 64 bits, both as two's-complement bit patterns (so torch's wrapping int64
addition and multiplication are exact modulo 2^64 on each half).

* Sums carry from the low half into the high half; the carry is an unsigned comparison, which
  int64 expresses by flipping the sign bit of both sides.
* An elementwise product needs the low halves' full 128-bit product: four 32-bit partial
  products (each below 2^64, so exact as bit patterns), combined as in Hacker's Delight's
  ``mulhu``; the cross terms only reach the high half, so wrapping products suffice there.
* A matrix product must sum over the inner dimension, and 64-bit limbs overflow any machine
  type. The operands are cut into 16-bit limbs and multiplied in float64, exactly: a limb product
  is below 2^32 and a sum of ``n`` of them below 2^53 for ``n`` < 2^21 (and float64 matmul is
  several times faster than int64's here). Limb products of one weight are summed in int64 and
  shifted into place with carries.
"""

from __future__ import annotations

import torch

#: Bits of one limb in matrix products, and the largest inner dimension they stay exact for.
LIMB = 16
LIMBS = 128 // LIMB
MAX_INNER = 1 << 21

_LOW32 = 0xFFFFFFFF
_LOW16 = 0xFFFF
_SIGN = -(1 << 63)


def from_int64(values: torch.Tensor, *, signed: bool = True) -> torch.Tensor:
    """``values`` (int64) as wide numbers: sign-extended (``signed``, the value ``x`` of Z_2^64 read as
    an integer in [-2^63, 2^63)) or zero-extended (its representative in [0, 2^64))."""
    if values.dtype != torch.int64:
        raise TypeError(f"wide numbers come from int64 tensors, not {values.dtype}")
    high = values >> 63 if signed else torch.zeros_like(values)
    return torch.stack([values, high])


def low(wide: torch.Tensor) -> torch.Tensor:
    """The value modulo 2^64 (an int64 tensor): what a SPDZ2k opening keeps."""
    return wide[0]


def _below(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a < b`` reading both int64 tensors as unsigned, as int64 0/1."""
    return ((a ^ _SIGN) < (b ^ _SIGN)).to(torch.int64)


def add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    total = a[0] + b[0]
    return torch.stack([total, a[1] + b[1] + _below(total, a[0])])


def neg(a: torch.Tensor) -> torch.Tensor:
    """``-a`` modulo 2^128: the complement plus one, carrying when the low half was zero."""
    return torch.stack([-a[0], ~a[1] + (a[0] == 0).to(torch.int64)])


def sub(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return add(a, neg(b))


def _mul_64x64(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The full 128-bit product of ``u`` and ``v`` read as unsigned 64-bit numbers."""
    u0, u1 = u & _LOW32, (u >> 32) & _LOW32
    v0, v1 = v & _LOW32, (v >> 32) & _LOW32
    p00, p01, p10, p11 = u0 * v0, u0 * v1, u1 * v0, u1 * v1
    t = p10 + ((p00 >> 32) & _LOW32)  # below 2^64: exact as an unsigned bit pattern
    w = p01 + (t & _LOW32)
    high = p11 + ((t >> 32) & _LOW32) + ((w >> 32) & _LOW32)
    return torch.stack([u * v, high])


def mul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise product modulo 2^128 (broadcasting as torch does)."""
    a, b = torch.broadcast_tensors(a, b)
    product = _mul_64x64(a[0], b[0])
    product[1] += a[0] * b[1] + a[1] * b[0]  # only their low 64 bits reach below 2^128
    return product


def _limbs(wide: torch.Tensor) -> list[torch.Tensor]:
    """The 16-bit limbs of a wide matrix, least significant first, as float64 (exact)."""
    parts = []
    for half in (wide[0], wide[1]):
        for shift in range(0, 64, LIMB):
            parts.append(((half >> shift) & _LOW16).to(torch.float64))
    return parts


def _shifted(values: torch.Tensor, bits: int) -> torch.Tensor:
    """The non-negative int64 ``values`` (below 2^63) times 2^bits, modulo 2^128, as wide."""
    if bits >= 64:
        return torch.stack([torch.zeros_like(values), values << (bits - 64)])
    if bits == 0:
        return torch.stack([values, torch.zeros_like(values)])
    return torch.stack([values << bits, values >> (64 - bits)])


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Matrix product modulo 2^128 of wide ``(2, n, k)`` and ``(2, k, m)`` tensors."""
    if a.dim() != 3 or b.dim() != 3 or a.shape[2] != b.shape[1]:
        raise ValueError(
            f"wide matmul takes (2, n, k) and (2, k, m), got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if a.shape[2] >= MAX_INNER:
        raise ValueError(f"an inner dimension of {a.shape[2]} would lose exactness (limit {MAX_INNER})")
    left, right = _limbs(a), _limbs(b)
    result = torch.zeros((2, a.shape[1], b.shape[2]), dtype=torch.int64)
    for weight in range(LIMBS):  # limb pairs whose product lands below 2^128
        # Each product is below 2^32 * k < 2^53, exact in float64; eight of them stay below 2^56
        # only once in int64.
        total = torch.mm(left[0], right[weight]).to(torch.int64)
        for i in range(1, weight + 1):
            total += torch.mm(left[i], right[weight - i]).to(torch.int64)
        result = add(result, _shifted(total, LIMB * weight))
    return result


__all__ = ["LIMB", "MAX_INNER", "add", "from_int64", "low", "matmul", "mul", "neg", "sub"]
