"""Arithmetic modulo 2^128 on int64 halves (SPDZ2k's ring), against Python's integers."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mpc import wide

MOD = 1 << 128
WORDS = st.integers(-(1 << 63), (1 << 63) - 1)


def _wide(values: list[int]) -> torch.Tensor:
    """Python integers (taken modulo 2^128) as a wide tensor."""
    lows, highs = [], []
    for value in values:
        residue = value % MOD
        lows.append(_signed(residue & ((1 << 64) - 1)))
        highs.append(_signed(residue >> 64))
    return torch.tensor([lows, highs], dtype=torch.int64)


def _signed(word: int) -> int:
    return word - (1 << 64) if word >= 1 << 63 else word


def _ints(tensor: torch.Tensor) -> list[int]:
    lows, highs = tensor[0].reshape(-1).tolist(), tensor[1].reshape(-1).tolist()
    return [((h % (1 << 64)) << 64 | (lo % (1 << 64))) for lo, h in zip(lows, highs, strict=True)]


NUMBERS = st.lists(st.integers(0, MOD - 1), min_size=1, max_size=12)
EDGES = [0, 1, MOD - 1, 1 << 63, (1 << 64) - 1, 1 << 64, (1 << 127), MOD - (1 << 64)]


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_add_sub_neg_mul_equal_python_modulo_2_128(data: st.DataObject) -> None:
    a = data.draw(NUMBERS)
    b = data.draw(
        st.lists(st.integers(0, MOD - 1) | st.sampled_from(EDGES), min_size=len(a), max_size=len(a))
    )
    wa, wb = _wide(a), _wide(b)
    assert _ints(wide.add(wa, wb)) == [(x + y) % MOD for x, y in zip(a, b, strict=True)]
    assert _ints(wide.sub(wa, wb)) == [(x - y) % MOD for x, y in zip(a, b, strict=True)]
    assert _ints(wide.neg(wa)) == [(-x) % MOD for x in a]
    assert _ints(wide.mul(wa, wb)) == [(x * y) % MOD for x, y in zip(a, b, strict=True)]


@pytest.mark.parametrize("value", EDGES)
def test_edges_carry_and_borrow(value: int) -> None:
    w = _wide([value])
    for other in EDGES:
        assert _ints(wide.add(w, _wide([other]))) == [(value + other) % MOD]
        assert _ints(wide.mul(w, _wide([other]))) == [(value * other) % MOD]
    assert _ints(wide.neg(w)) == [(-value) % MOD]


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 5), st.integers(1, 6), st.integers(1, 5), st.data())
def test_matmul_equals_python_modulo_2_128(n: int, k: int, m: int, data: st.DataObject) -> None:
    entries = st.integers(0, MOD - 1) | st.sampled_from(EDGES)
    a = [data.draw(st.lists(entries, min_size=k, max_size=k)) for _ in range(n)]
    b = [data.draw(st.lists(entries, min_size=m, max_size=m)) for _ in range(k)]
    wa = _wide([x for row in a for x in row]).reshape(2, n, k)
    wb = _wide([x for row in b for x in row]).reshape(2, k, m)
    expected = [sum(a[i][t] * b[t][j] for t in range(k)) % MOD for i in range(n) for j in range(m)]
    assert _ints(wide.matmul(wa, wb)) == expected


def test_a_long_inner_dimension_of_extreme_limbs_stays_exact() -> None:
    """Every limb at its maximum over an inner dimension of 4096: the float64 sums must not round."""
    k = 4096
    a = torch.full((2, 2, k), -1, dtype=torch.int64)  # 2^128 - 1 everywhere
    b = torch.full((2, k, 3), -1, dtype=torch.int64)
    assert _ints(wide.matmul(a, b)) == [(k * (MOD - 1) ** 2) % MOD] * 6


@given(st.lists(WORDS, min_size=1, max_size=8))
def test_int64_embeds_sign_or_zero_extended_and_low_recovers_it(words: list[int]) -> None:
    values = torch.tensor(words, dtype=torch.int64)
    assert _ints(wide.from_int64(values)) == [w % MOD for w in words]
    assert _ints(wide.from_int64(values, signed=False)) == [w % (1 << 64) for w in words]
    assert torch.equal(wide.low(wide.from_int64(values)), values)
