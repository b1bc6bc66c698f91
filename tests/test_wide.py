"""Arithmetic modulo 2^128 on int64 halves (SPDZ2k's ring), against Python's integers."""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Iterator

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


# --- Both implementations: the compiled kernels and the torch ops they fall back to. ---------


@pytest.fixture(autouse=True, scope="module", params=["compiled", "torch ops"])
def implementation(request: pytest.FixtureRequest) -> Iterator[str]:
    """Every test runs against both implementations (the module's choice is process-wide)."""
    if request.param == "compiled" and not wide.compiled():
        pytest.skip("no C compiler: only the torch ops run here")
    with pytest.MonkeyPatch.context() as patch:
        if request.param == "torch ops":
            patch.setattr(wide, "_library", None)
            patch.setattr(wide, "_loaded", True)
        yield request.param


SHAPES = st.lists(st.integers(1, 3), min_size=0, max_size=3)
ENTRIES = st.integers(0, MOD - 1) | st.sampled_from(EDGES)


def _values(data: st.DataObject, shape: list[int]) -> list[int]:
    return data.draw(st.lists(ENTRIES, min_size=math.prod(shape), max_size=math.prod(shape)))


def _broadcast_pair(data: st.DataObject) -> tuple[list[int], list[int]]:
    """Two value shapes that broadcast: each dimension kept or set to 1 on one side."""
    shape = data.draw(SHAPES)
    left = [d if data.draw(st.booleans()) else 1 for d in shape]
    right = [d if data.draw(st.booleans()) else 1 for d in shape]
    return left, right[data.draw(st.integers(0, len(right))) :]


def _python(values: list[int], shape: list[int], target: torch.Size) -> list[int]:
    """Python integers of ``shape`` broadcast to ``target``, flattened."""
    grid = torch.arange(math.prod(shape)).reshape(shape).expand(target).reshape(-1).tolist()
    return [values[i] for i in grid]


@settings(max_examples=120, deadline=None)
@given(st.data())
def test_elementwise_operations_broadcast_like_torch(data: st.DataObject) -> None:
    left, right = _broadcast_pair(data)
    a, b = _values(data, left), _values(data, right)
    wa, wb = _wide(a).reshape(2, *left), _wide(b).reshape(2, *right)
    target = torch.broadcast_shapes(torch.Size(left), torch.Size(right))
    xs, ys = _python(a, left, target), _python(b, right, target)
    for op, expected in [
        (wide.add, [(x + y) % MOD for x, y in zip(xs, ys, strict=True)]),
        (wide.sub, [(x - y) % MOD for x, y in zip(xs, ys, strict=True)]),
        (wide.mul, [(x * y) % MOD for x, y in zip(xs, ys, strict=True)]),
    ]:
        result = op(wa, wb)
        assert result.shape == (2, *target)
        assert _ints(result) == expected


def test_long_operands_cross_the_chunk_boundaries_exactly() -> None:
    """The torch-ops fallback works in slices of ``_CHUNK``: lengths around them, and one value
    broadcast over them, must come out element for element."""
    size = 2 * wide._CHUNK + 3
    numbers = [(i * 0x9E3779B97F4A7C15_F39CC0605CEDC835 + EDGES[i % len(EDGES)]) % MOD for i in range(size)]
    a, b = _wide(numbers), _wide(numbers[::-1])
    reversed_numbers = numbers[::-1]
    assert _ints(wide.mul(a, b)) == [(x * y) % MOD for x, y in zip(numbers, reversed_numbers, strict=True)]
    assert _ints(wide.sub(a, b)) == [(x - y) % MOD for x, y in zip(numbers, reversed_numbers, strict=True)]
    one = _wide([MOD - 3]).reshape(2, 1)
    assert _ints(wide.mul(one, a)) == [(x * (MOD - 3)) % MOD for x in numbers]
    assert _ints(wide.neg(a)) == [(-x) % MOD for x in numbers]
    assert _ints(wide.sum(a)) == [sum(numbers) % MOD]


FACTORS = WORDS | st.sampled_from([0, 1, -1, -(1 << 63), (1 << 63) - 1, 1 << 32, (1 << 32) - 1, -(1 << 32)])


@settings(max_examples=150, deadline=None)
@given(st.data(), st.booleans())
def test_mul_int64_sign_or_zero_extends_the_factor(data: st.DataObject, signed: bool) -> None:
    left, right = _broadcast_pair(data)
    a = _values(data, left)
    words = data.draw(st.lists(FACTORS, min_size=math.prod(right), max_size=math.prod(right)))
    target = torch.broadcast_shapes(torch.Size(left), torch.Size(right))
    factor = torch.tensor(words, dtype=torch.int64).reshape(right)
    cs = [w if signed else w % (1 << 64) for w in _python(words, right, target)]
    result = wide.mul_int64(_wide(a).reshape(2, *left), factor, signed=signed)
    assert result.shape == (2, *target)
    assert _ints(result) == [(x * c) % MOD for x, c in zip(_python(a, left, target), cs, strict=True)]


@settings(max_examples=60, deadline=None)
@given(st.lists(ENTRIES, min_size=1, max_size=6), FACTORS, st.booleans())
def test_mul_int64_by_a_python_int(a: list[int], c: int, signed: bool) -> None:
    value = c if signed or c >= 0 else c + (1 << 64)  # an unsigned factor is given as such
    assert _ints(wide.mul_int64(_wide(a), value, signed=signed)) == [(x * value) % MOD for x in a]


def test_mul_int64_refuses_what_is_not_one_word() -> None:
    w = _wide([1, 2])
    with pytest.raises(ValueError, match="factor lies in"):
        wide.mul_int64(w, 1 << 63)
    with pytest.raises(ValueError, match="factor lies in"):
        wide.mul_int64(w, -1, signed=False)
    with pytest.raises(TypeError):
        wide.mul_int64(w, torch.ones(2, dtype=torch.int32))
    with pytest.raises(TypeError):
        wide.mul_int64(w, 1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        wide.mul_int64(w, torch.ones(2, dtype=torch.int64, device="meta"))


@settings(max_examples=120, deadline=None)
@given(st.data())
def test_sum_over_any_value_dimensions(data: st.DataObject) -> None:
    shape = data.draw(st.lists(st.integers(0, 4), min_size=1, max_size=3))
    values = _values(data, shape)
    dims = data.draw(st.none() | st.lists(st.integers(0, len(shape) - 1), min_size=1, unique=True))
    keepdim = data.draw(st.booleans())
    negative = data.draw(st.booleans())
    reference = torch.arange(len(values)).reshape(shape)
    chosen = range(len(shape)) if dims is None else dims
    kept = [d for d in range(len(shape)) if d not in chosen]
    # The expected sums, by the kept coordinates of each element's index.
    rows, length = math.prod(shape[d] for d in kept), math.prod(shape[d] for d in chosen)
    order = reference.permute(*kept, *chosen).reshape(rows, length).tolist()
    expected = [sum(values[i] for i in row) % MOD for row in order]
    argument = dims if dims is None else [d - len(shape) if negative else d for d in dims]
    result = wide.sum(_wide(values).reshape(2, *shape), argument, keepdim)
    assert result.shape[1:] == reference.sum(dim=tuple(chosen), keepdim=keepdim).shape
    assert _ints(result) == expected


def test_sum_of_many_extreme_values_carries_exactly() -> None:
    count = 100_003
    every_bit = torch.full((2, count), -1, dtype=torch.int64)  # 2^128 - 1 everywhere
    assert _ints(wide.sum(every_bit)) == [(count * (MOD - 1)) % MOD]
    top = _wide([(1 << 64) - 1]).expand(2, count)  # carries out of the low half only
    assert _ints(wide.sum(top, 0, keepdim=True)) == [(count * ((1 << 64) - 1)) % MOD]
    assert wide.sum(_wide([5])).shape == (2,)
    assert _ints(wide.sum(_wide([5]).reshape(2))) == [5]  # a scalar value sums to itself


def test_sum_refuses_the_halves_axis_and_repeats() -> None:
    w = _wide([1, 2, 3, 4]).reshape(2, 2, 2)
    with pytest.raises(IndexError):
        wide.sum(w, 2)
    with pytest.raises(ValueError, match="repeated"):
        wide.sum(w, [0, -2])


def test_random_comes_from_the_secure_generator() -> None:
    state = torch.get_rng_state()
    torch.manual_seed(0)
    first = wide.random([3, 4])
    torch.manual_seed(0)
    second = wide.random([3, 4])
    assert first.shape == (2, 3, 4)
    assert first.dtype == torch.int64
    assert not torch.equal(first, second)  # torch's seed does not reach it
    assert wide.random([]).shape == (2,)
    # Uniform: each of 128 bit positions is set in about half of 4096 draws.
    bits = torch.stack([(wide.random([4096]) >> s) & 1 for s in range(64)]).float().mean(dim=-1)
    assert bool(((bits - 0.5).abs() < 0.05).all())
    torch.set_rng_state(state)


@settings(max_examples=80, deadline=None)
@given(st.lists(ENTRIES, min_size=1, max_size=6), st.data())
def test_is_zero_and_equal_read_the_residue(a: list[int], data: st.DataObject) -> None:
    b = data.draw(st.lists(ENTRIES, min_size=len(a), max_size=len(a)))
    wa, wb = _wide(a), _wide(b)
    assert wide.equal(wa, wb) == (a == b)
    assert wide.equal(wa, _wide([x + MOD for x in a]))
    assert wide.is_zero(wide.sub(wa, wa))
    assert wide.is_zero(wa) == all(x == 0 for x in a)
    assert wide.is_zero(_wide([MOD] * len(a)))


def test_is_zero_sees_a_difference_in_either_half() -> None:
    assert not wide.is_zero(_wide([0, 1 << 64]))
    assert not wide.is_zero(_wide([1 << 63, 0]))
    assert not wide.equal(_wide([1 << 64]), _wide([0]))
    assert wide.equal(_wide([7]), _wide([7, 7]).reshape(2, 2))  # broadcast
    with pytest.raises(RuntimeError):
        wide.equal(_wide([1, 2, 3]), _wide([1, 2]))


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 3), st.data())
def test_batched_matmul_broadcasts_leading_dimensions(n: int, k: int, m: int, data: st.DataObject) -> None:
    batch_a, batch_b = data.draw(st.sampled_from([([2], [2]), ([2], [1]), ([], [3]), ([2, 1], [3])]))
    a = _values(data, [*batch_a, n, k])
    b = _values(data, [*batch_b, k, m])
    wa, wb = _wide(a).reshape(2, *batch_a, n, k), _wide(b).reshape(2, *batch_b, k, m)
    batch = torch.broadcast_shapes(torch.Size(batch_a), torch.Size(batch_b))
    result = wide.matmul(wa, wb)
    assert result.shape == (2, *batch, n, m)
    index_a = torch.arange(len(a)).reshape(*batch_a, n, k).expand(*batch, n, k)
    index_b = torch.arange(len(b)).reshape(*batch_b, k, m).expand(*batch, k, m)
    expected = []
    for ia, ib in zip(index_a.reshape(-1, n, k).tolist(), index_b.reshape(-1, k, m).tolist(), strict=True):
        for i in range(n):
            for j in range(m):
                expected.append(sum(a[ia[i][t]] * b[ib[t][j]] for t in range(k)) % MOD)
    assert _ints(result) == expected


@pytest.mark.parametrize("k", [512, 513, 32768, 32769, (1 << 21) + 100])
def test_matmul_exact_at_the_limb_bounds(k: int) -> None:
    """At each inner dimension where fewer limbs stop being exact, and just past it: every limb
    at its maximum makes each float64 sum the largest the bound allows (an odd number, which
    float64 would round if it passed 2^53)."""
    every_bit = torch.full((2, 1, k), -1, dtype=torch.int64)
    assert _ints(wide.matmul(every_bit, every_bit.reshape(2, k, 1))) == [(k * (MOD - 1) ** 2) % MOD]
    low_only = _wide([(1 << 64) - 1]).reshape(2, 1, 1).expand(2, 1, k)
    high_ones = _wide([MOD - (1 << 64) + (1 << 64) - 1]).reshape(2, 1, 1).expand(2, k, 1)
    expected = (k * ((1 << 64) - 1) * (MOD - 1)) % MOD
    assert _ints(wide.matmul(low_only, high_ones)) == [expected]


def test_matmul_random_near_the_bound_equals_python() -> None:
    k = 513
    numbers = [(i * 0x9E3779B97F4A7C15_F39CC0605CEDC835) % MOD for i in range(2 * k * 2)]
    a, b = numbers[: 2 * k], numbers[2 * k :]
    result = wide.matmul(_wide(a).reshape(2, 2, k), _wide(b).reshape(2, k, 2))
    expected = [sum(a[i * k + t] * b[t * 2 + j] for t in range(k)) % MOD for i in range(2) for j in range(2)]
    assert _ints(result) == expected


def test_the_limb_plan_keeps_float64_sums_exact() -> None:
    for width in (64, 128):
        for inner in (1, 13, 256, 512, 513, 4096, 1 << 21, wide.MAX_INNER):
            bits, count = wide._limb_plan(inner, width)
            assert bits * count >= width
            assert inner * ((1 << bits) - 1) ** 2 <= 1 << 53
        with pytest.raises(ValueError, match="exactness"):
            wide._limb_plan(wide.MAX_INNER + 1, width)
    assert wide._limb_plan(256, 128) == (22, 6)  # 21 limb products, not 36
    assert wide._limb_plan(256, 64) == (22, 3)
    too_long = torch.zeros(2, 1, 1, dtype=torch.int64).expand(2, 1, wide.MAX_INNER + 1)
    with pytest.raises(ValueError, match="exactness"):
        wide.matmul(too_long, too_long.transpose(1, 2))


def test_matmul_of_empty_and_mismatched_shapes() -> None:
    assert wide.matmul(
        torch.zeros(2, 0, 3, dtype=torch.int64), torch.zeros(2, 3, 4, dtype=torch.int64)
    ).shape == (2, 0, 4)
    assert wide.is_zero(
        wide.matmul(torch.zeros(2, 2, 0, dtype=torch.int64), torch.zeros(2, 0, 3, dtype=torch.int64))
    )
    with pytest.raises(ValueError, match="matmul"):
        wide.matmul(_wide([1, 2]).reshape(2, 1, 2), _wide([1, 2]).reshape(2, 1, 2))


def test_malformed_wide_tensors_are_refused_before_any_kernel_reads_them() -> None:
    good = _wide([1, 2])
    meta = torch.zeros(2, 2, dtype=torch.int64, device="meta")  # no CPU memory behind it
    for bad in (torch.zeros(3, 2, dtype=torch.int64), torch.zeros(2, 2, dtype=torch.int32), meta):
        for op in (wide.add, wide.sub, wide.mul, wide.equal):
            with pytest.raises((TypeError, ValueError)):
                op(good, bad)
        with pytest.raises((TypeError, ValueError)):
            wide.neg(bad)
        with pytest.raises((TypeError, ValueError)):
            wide.sum(bad)


def test_non_contiguous_operands() -> None:
    numbers = list(range(1, 13))
    base = _wide([x * (MOD // 7) for x in numbers]).reshape(2, 3, 4)
    view = base.transpose(1, 2)  # (2, 4, 3), not contiguous
    expected = [
        ((x * (MOD // 7)) ** 2) % MOD for x in torch.tensor(numbers).reshape(3, 4).T.reshape(-1).tolist()
    ]
    assert _ints(wide.mul(view, view)) == expected
    assert _ints(wide.sum(view, 0)) == [
        sum(x * (MOD // 7) for x in numbers[4 * i : 4 * i + 4]) % MOD for i in range(3)
    ]


def test_compiled_kernels_can_be_switched_off_and_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIOSYFT_NO_COMPILE", "1")
    monkeypatch.setattr(wide, "_loaded", False)
    monkeypatch.setattr(wide, "_library", None)
    assert not wide.compiled()
    assert _ints(wide.mul(_wide([3]), _wide([MOD - 1]))) == [MOD - 3]

    class Miscompiled:  # kernels that write nothing: the known answers must catch them
        def __getattr__(self, name: str) -> object:
            return lambda *arguments: None

    assert not wide._agrees(Miscompiled())  # type: ignore[arg-type]


def test_kernels_compile_where_a_compiler_exists() -> None:
    """A kernel that failed its known answers falls back silently at run time; here it must not
    go unnoticed."""
    if shutil.which("cc") is None and shutil.which("gcc") is None and shutil.which("clang") is None:
        pytest.skip("no C compiler here")
    if os.environ.get("AIOSYFT_NO_COMPILE", "") not in ("", "0"):
        pytest.skip("compiled kernels switched off")
    assert wide._build() is not None
    assert wide._agrees(wide._build())  # type: ignore[arg-type]
