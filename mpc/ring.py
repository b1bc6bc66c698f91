"""The ring Z_2^64 that shares live in, fixed-point encoding into it, and the secure generator.

Everything secret is an int64 tensor whose arithmetic wraps (torch's int64 add, mul and matmul
wrap on CPU, which is exactly arithmetic mod 2^64). A real number ``v`` is encoded as
``round(v * 2^f)`` with ``f`` fractional bits (:data:`PRECISION`), and decoded as
``float64(v) / 2^f``: the division by the one scale is exact for negative values too (a widely
used library returns some negatives off by exactly 1.0).

Randomness that hides a secret comes from AES-128 in counter mode keyed from ``os.urandom``
(:func:`random_ring`), never from torch's or numpy's generators: a party that knew the state of
a Mersenne Twister would read every share it made. A 16-byte seed expands to as many ring
elements as needed (:func:`expand`), so the crypto provider can send seeds instead of tensors.
This module never logs, prints or formats a value.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

#: Fractional bits of the fixed-point encoding (CrypTen's and PySyft's default).
PRECISION = 16
#: Encoded magnitudes stay below this, so that sums of a few products cannot wrap.
ENCODE_LIMIT = 2**62
SEED_BYTES = 16
_NONCE = bytes(16)
_ZEROS = bytes(1 << 22)  # encrypted in place of a buffer the size of the output


def check_precision(precision: int) -> int:
    if not isinstance(precision, int) or isinstance(precision, bool) or not 0 <= precision <= 30:
        raise ValueError(f"precision is a number of fractional bits from 0 to 30, got {precision!r}")
    return precision


def check_shift(bits: int) -> int:
    """A truncation's shift: fractional bits of a product (a precision plus a public factor's)."""
    if not isinstance(bits, int) or isinstance(bits, bool) or not 0 <= bits <= 62:
        raise ValueError(f"a truncation shifts by 0 to 62 bits, got {bits!r}")
    return bits


def encode(value: torch.Tensor | float, precision: int = PRECISION) -> torch.Tensor:
    """``round(value * 2^precision)`` as int64; refuses values whose encoding would not fit
    (rather than wrapping them silently into other numbers). Public factors may use more
    fractional bits than a tensor's precision (up to 46)."""
    if not isinstance(precision, int) or isinstance(precision, bool) or not 0 <= precision <= 46:
        raise ValueError(f"precision is a number of fractional bits from 0 to 46, got {precision!r}")
    tensor = (
        torch.as_tensor(value, dtype=torch.float64)
        if isinstance(value, int | float)
        else torch.as_tensor(value)
    )
    scaled = torch.round(tensor.to(torch.float64) * 2.0**precision)
    if scaled.numel() and not bool((scaled.abs() < ENCODE_LIMIT).all()):  # NaN compares False
        bound = ENCODE_LIMIT / 2.0**precision
        raise ValueError(f"cannot encode values of magnitude {bound:.3g} or more (or NaN/inf) "
                         f"with {precision} fractional bits")  # fmt: skip
    return scaled.to(torch.int64)


def decode(
    value: torch.Tensor, precision: int = PRECISION, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The real numbers an int64 ring tensor encodes (as ``dtype``)."""
    check_precision(precision)
    if value.dtype != torch.int64:
        raise TypeError(f"a ring tensor is int64, got {value.dtype}")
    return (value.to(torch.float64) / 2.0**precision).to(dtype)


def new_seed() -> bytes:
    return os.urandom(SEED_BYTES)


def expand(seed: bytes, shapes: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """Uniform int64 tensors of ``shapes``, from one AES-CTR stream keyed by ``seed``: whoever
    holds the seed gets the same tensors, anyone else learns nothing about them."""
    if len(seed) != SEED_BYTES:
        raise ValueError(f"a seed is {SEED_BYTES} bytes")
    sizes = [math.prod(shape) for shape in shapes]
    flat = torch.empty(sum(sizes), dtype=torch.int64)
    if flat.numel():
        stream = Cipher(algorithms.AES(seed), modes.CTR(_NONCE)).encryptor()
        out = memoryview(flat.numpy()).cast("B")
        for start in range(0, len(out), len(_ZEROS)):  # the keystream, written in place
            chunk = out[start : start + len(_ZEROS)]
            stream.update_into(_ZEROS[: len(chunk)], chunk)
    tensors, offset = [], 0
    for shape, size in zip(shapes, sizes, strict=True):
        tensors.append(flat[offset : offset + size].view(tuple(shape)))
        offset += size
    return tensors


def random_ring(shape: Sequence[int]) -> torch.Tensor:
    """A fresh uniform int64 tensor from the secure generator."""
    return expand(new_seed(), [shape])[0]


def split(secret: torch.Tensor, parties: int) -> list[torch.Tensor]:
    """Additive shares of an int64 tensor: ``parties - 1`` uniform tensors and the difference.
    Any ``parties - 1`` of them are uniform and independent of the secret."""
    if secret.dtype != torch.int64:
        raise TypeError(f"only ring (int64) tensors are shared, got {secret.dtype}: encode it first")
    if parties < 2:
        raise ValueError("sharing needs at least two parties")
    shares = [random_ring(secret.shape) for _ in range(parties - 1)]
    last = secret.clone()
    for share in shares:
        last -= share
    return [*shares, last]


def reconstruct(shares: Sequence[torch.Tensor]) -> torch.Tensor:
    total = shares[0].clone()
    for share in shares[1:]:
        total += share
    return total


def truncate_share(share: torch.Tensor, precision: int, index: int) -> torch.Tensor:
    """Two-party local truncation (SecureML): party 0 shifts its share, party 1 the negation of
    its own. The result is off by at most 1 in the last bit, except with probability about
    ``|x| / 2^63`` per element (the shares wrap), when it is off by about ``2^(64 - f)``."""
    if index == 0:
        return share >> precision
    return -((-share) >> precision)


def truncate_share_(share: torch.Tensor, precision: int, index: int) -> torch.Tensor:
    """:func:`truncate_share` in place (the flows own their intermediate products)."""
    if index == 0:
        return share.bitwise_right_shift_(precision)
    return share.neg_().bitwise_right_shift_(precision).neg_()
