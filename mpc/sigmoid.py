"""The sigmoid on shares: an odd polynomial, a few Beaver rounds instead of ~50.

``sigmoid(x) ~ 1/2 + c1 x + c3 x^3 + ... + cd x^d``, the least-squares fit of odd degree ``d``
over [-8, 8] (2001 evenly spaced points). The powers come from products of products, so the
rounds are the depth of that tree: degree 3 takes 2 rounds, 5 and 7 take 3, 9 takes 4, each
round's products issued together (one more round, for ``x / 8``, among three or more parties).
Largest error on [-8, 8] (fit, before fixed-point error):

=========  ======  ======
degree     rounds  error
=========  ======  ======
3          2       0.114
5          3       0.061
7          3       0.032
9          4       0.017
=========  ======  ======

Outside [-8, 8] a polynomial does not saturate: it leaves [0, 1] fast (degree 7 gives 0.55 at
9, -0.90 at 10 and -12.6 at 12). Keep inputs in range: normalized features and small weights
keep a layer's pre-activations there; :func:`approx` computes the same function in plain
PyTorch, so a model can be trained and checked with exactly the activation it will run under
encryption.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from mpc.tensor import SharedTensor

RANGE = 8.0
DEGREE = 7


@functools.cache
def coefficients(degree: int = DEGREE) -> tuple[float, ...]:
    """``(c1, c3, ..., cd)`` of the odd least-squares fit of ``sigmoid - 1/2`` on [-8, 8]."""
    if degree < 1 or degree % 2 == 0:
        raise ValueError(f"the sigmoid approximation has odd degree, got {degree}")
    x = np.linspace(-RANGE, RANGE, 2001)
    powers = np.stack([x**k for k in range(1, degree + 1, 2)], axis=1)
    fit, *_ = np.linalg.lstsq(powers, 1.0 / (1.0 + np.exp(-x)) - 0.5, rcond=None)
    return tuple(float(c) for c in fit)


def approx(x: torch.Tensor, degree: int = DEGREE) -> torch.Tensor:
    """The same polynomial in plain PyTorch (what the shared sigmoid computes, up to rounding)."""
    out = torch.full_like(x, 0.5)
    for k, c in zip(range(1, degree + 1, 2), coefficients(degree), strict=True):
        out = out + c * x**k
    return out


def odd_powers(x: SharedTensor, degree: int) -> dict[int, SharedTensor]:
    """``x^k`` for odd ``k <= degree``, each from two lower powers, by a tree of depth
    ~log2(degree): nothing waits here, so the products of one depth go out together."""
    powers: dict[int, SharedTensor] = {1: x}
    if degree >= 2:
        powers[2] = x * x
    k = 2
    while 2 * k <= degree - 1:  # the even powers 4, 8, ... by squaring
        powers[2 * k] = powers[k] * powers[k]
        k *= 2
    for odd in range(3, degree + 1, 2):
        if odd in powers:
            continue
        high = max(p for p in powers if p % 2 == 0 and p < odd)  # odd = even + a smaller odd
        powers[odd] = powers[high] * powers[odd - high] if odd - high in powers else powers[odd - 1] * x
    return {k: v for k, v in powers.items() if k % 2 == 1}


def sigmoid(x: SharedTensor, degree: int = DEGREE) -> SharedTensor:
    """The polynomial in ``y = x / 8``: the powers of ``y`` stay within [-1, 1] on the range and
    the coefficients ``c_k 8^k`` near 1, where ``c_k`` themselves (down to 1e-6) would round
    to nothing in 16 fractional bits."""
    y = x * (1.0 / RANGE)
    powers = odd_powers(y, degree)
    scaled = [c * RANGE**k for k, c in zip(range(1, degree + 1, 2), coefficients(degree), strict=True)]
    return y.combine([(c, powers[k]) for k, c in zip(range(1, degree + 1, 2), scaled, strict=True)], 0.5)
