"""Fixed precision (SPDZ issue, part 1): encoding into Z_2^64, arithmetic with truncation, wraparound,
exact decoding of negatives, and the same arithmetic on a worker through pipelined pointers.

Every bound below is the fixed-point error the module documents, with ``u = 2^-f``: encoding
rounds to nearest (``u/2`` per value), truncation floors (below ``u`` per product). Results are
decoded as float64 so that float32 rounding (``~1e-4`` at 1000) cannot hide a missing bit.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import actors
from actors.pointer import call
from mpc import ring
from mpc.fixed import (
    FixedPrecisionModule,
    FixedPrecisionTensor,
    fix_precision,
    float_precision,
    mean_command,
    truncate_command,
)
from protocol.errors import BadArguments, CommandNotAllowed
from tests.conftest import bounded

F = ring.PRECISION
U = 2.0**-F
F64 = torch.float64

values = st.floats(-1000, 1000, allow_nan=False, allow_infinity=False, width=64)
dims = st.integers(1, 5)
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def matrices(draw: st.DrawFn, rows: int | None = None, cols: int | None = None) -> torch.Tensor:
    rows = draw(dims) if rows is None else rows
    cols = draw(dims) if cols is None else cols
    flat = draw(st.lists(values, min_size=rows * cols, max_size=rows * cols))
    return torch.tensor(flat, dtype=F64).reshape(rows, cols)


@st.composite
def pairs(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor]:
    a = draw(matrices())
    return a, draw(matrices(*a.shape))


@st.composite
def chains(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor]:
    a = draw(matrices())
    return a, draw(matrices(rows=a.shape[1]))


def fixed(x: torch.Tensor, precision: int = F) -> FixedPrecisionTensor:
    return fix_precision(x, precision)


def floated(x: FixedPrecisionTensor) -> torch.Tensor:
    return x.float_precision(F64)


def assert_within(got: torch.Tensor, want: torch.Tensor, bound: torch.Tensor | float) -> None:
    error = (got - want).abs()
    assert bool((error <= bound).all()), f"error {error.max().item()} exceeds the bound"


# -- encoding and decoding -------------------------------------------------------------------
@SETTINGS
@given(x=matrices(), precision=st.integers(0, 30))
def test_roundtrip_within_half_a_unit(x: torch.Tensor, precision: int) -> None:
    got = fix_precision(x, precision).float_precision(F64)
    assert_within(got, x, 2.0**-precision / 2)


@pytest.mark.parametrize(
    "value", [-0.5, -1.25, -3.0000153, -1000.0, -(2.0**-16), -(1 + 2.0**-16), -7.99998474]
)
def test_negatives_decode_exactly(value: float) -> None:
    """A decoder that scales negatives differently (or adds the wrong offset) is off by 1.0 or
    by a power of two here; the exact value is ``round(v * 2^f) / 2^f``."""
    encoded = ring.encode(torch.tensor([value], dtype=F64))
    exact = round(value * 2**F) / 2**F
    assert fix_precision(torch.tensor([value], dtype=F64)).float_precision(F64).item() == exact
    assert ring.decode(encoded, F, F64).item() == exact
    assert ring.decode(torch.tensor([-1, -(2**F) - 1, -(2**62)]), F, F64).tolist() == [
        -(2.0**-F),
        -1 - 2.0**-F,
        -(2.0 ** (62 - F)),
    ]


def test_dyadic_values_are_exact() -> None:
    x = torch.tensor([-0.5, -1.25, 0.75, -3.0, 2.0**-16, -(2.0**-16)], dtype=F64)
    assert torch.equal(fixed(x).float_precision(F64), x)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), 2.0**46, -(2.0**46)])
def test_encode_refuses_nan_inf_and_too_large(bad: float) -> None:
    with pytest.raises(ValueError, match="cannot encode"):
        ring.encode(torch.tensor([1.0, bad], dtype=F64))
    with pytest.raises(ValueError, match="cannot encode"):
        fix_precision(torch.tensor([bad], dtype=F64))
    x = fixed(torch.ones(2))
    with pytest.raises(ValueError, match="cannot encode"):
        x + torch.tensor([0.0, bad], dtype=F64)


@pytest.mark.parametrize("precision", [-1, 31, 16.0, True, None])
def test_bad_precision_is_refused(precision: object) -> None:
    with pytest.raises(ValueError, match="precision"):
        fix_precision(torch.ones(2), precision)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="precision"):
        FixedPrecisionTensor(torch.zeros(2, dtype=torch.int64), precision)  # type: ignore[arg-type]


def test_mismatched_precisions_are_refused_naming_both() -> None:
    a, b = fixed(torch.ones(2), 16), fixed(torch.ones(2), 8)
    for op in (lambda: a + b, lambda: a - b, lambda: a * b, lambda: a @ b):
        with pytest.raises(ValueError, match="16 and 8"):
            op()


def test_wrong_kinds_are_refused() -> None:
    with pytest.raises(TypeError, match="float"):
        fix_precision(torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="int64"):
        FixedPrecisionTensor(torch.ones(2))
    with pytest.raises(TypeError, match="already"):
        fix_precision(fixed(torch.ones(2)))
    with pytest.raises(TypeError):
        float_precision(torch.ones(2))
    with pytest.raises(TypeError, match="float"):
        fixed(torch.ones(2)) + torch.tensor([1, 2])


# -- arithmetic against float PyTorch ----------------------------------------------------------
@SETTINGS
@given(ab=pairs())
def test_linear_operations(ab: tuple[torch.Tensor, torch.Tensor]) -> None:
    a, b = ab
    fa, fb = fixed(a), fixed(b)
    assert_within(floated(fa + fb), a + b, U)
    assert_within(floated(fa - fb), a - b, U)
    assert_within(floated(-fa), -a, U / 2)
    assert_within(floated(fa + b), a + b, U)  # a public float tensor, encoded on the fly
    assert_within(floated(b + fa), a + b, U)
    assert_within(floated(fa - 2.5), a - 2.5, U / 2)
    assert_within(floated(2.5 - fa), 2.5 - a, U / 2)
    assert_within(floated(fa.neg().add(fb).sub(fa)), b - 2 * a, 2 * U)


@SETTINGS
@given(ab=pairs(), scalar=values)
def test_products_are_truncated(ab: tuple[torch.Tensor, torch.Tensor], scalar: float) -> None:
    """Product error: ``(|a| + |b|) u/2`` from the encodings, ``< u`` from the floor."""
    a, b = ab
    fa, fb = fixed(a), fixed(b)
    assert_within(floated(fa * fb), a * b, (a.abs() + b.abs()) * U / 2 + 2 * U)
    assert_within(floated(fa * scalar), a * scalar, (a.abs() + abs(scalar)) * U / 2 + 2 * U)
    assert_within(floated(scalar * fa), a * scalar, (a.abs() + abs(scalar)) * U / 2 + 2 * U)
    assert_within(floated(fa * b), a * b, (a.abs() + b.abs()) * U / 2 + 2 * U)
    assert_within(floated(fa * -3), a * -3, 3 * U / 2)  # an int scales exactly, no truncation
    assert_within(floated(fa.mul(fb)), a * b, (a.abs() + b.abs()) * U / 2 + 2 * U)


@SETTINGS
@given(ab=chains())
def test_matmul(ab: tuple[torch.Tensor, torch.Tensor]) -> None:
    a, b = ab
    bound = (a.abs().sum(1, keepdim=True) + b.abs().sum(0, keepdim=True)) * U / 2 + 2 * U
    assert_within(floated(fixed(a) @ fixed(b)), a @ b, bound)
    assert_within(floated(fixed(a) @ b), a @ b, bound)  # public right operand
    assert_within(floated(a @ fixed(b)), a @ b, bound)  # public left operand
    assert_within(floated(fixed(a).matmul(fixed(b))), a @ b, bound)
    v, w = a[0], b[:, 0]  # 1-d @ 1-d: a dot product
    assert_within(floated(fixed(v) @ fixed(w)), v @ w, (v.abs().sum() + w.abs().sum()) * U / 2 + 2 * U)


@SETTINGS
@given(a=matrices())
def test_sum_and_mean(a: torch.Tensor) -> None:
    """A sum is exact on the integers (``n u/2`` from the encodings); a mean divides it exactly
    and floors, so it is within ``u/2 + u`` of the float mean."""
    fa = fixed(a)
    assert_within(floated(fa.sum()), a.sum(), a.numel() * U / 2)
    assert_within(floated(fa.sum(0)), a.sum(0), a.shape[0] * U / 2)
    assert_within(floated(fa.sum(1, keepdim=True)), a.sum(1, keepdim=True), a.shape[1] * U / 2)
    assert_within(floated(fa.sum((0, 1))), a.sum((0, 1)), a.numel() * U / 2)
    assert_within(floated(fa.mean()), a.mean(), 1.5 * U)
    assert_within(floated(fa.mean(0)), a.mean(0), 1.5 * U)
    assert_within(floated(fa.mean(1, keepdim=True)), a.mean(1, keepdim=True), 1.5 * U)
    assert_within(floated(fa.mean((0, 1))), a.mean(), 1.5 * U)


def test_truncation_floors_and_mean_floors() -> None:
    """The stated rounding: toward minus infinity, exactly (an arithmetic shift, a floor division)."""
    tiny, half = fixed(torch.tensor([U, -U], dtype=F64)), fixed(torch.tensor([0.5, 0.5], dtype=F64))
    assert floated(tiny * half).tolist() == [0.0, -U]
    assert truncate_command(torch.tensor([3 * 2**F + 1, -(3 * 2**F) - 1]), F).tolist() == [3, -4]
    assert mean_command(torch.tensor([1, 0, 0]), None).item() == 0
    assert mean_command(torch.tensor([-1, 0, 0]), None).item() == -1
    third = fixed(torch.tensor([1.0, 0.0, 0.0], dtype=F64)).mean()
    assert floated(third).item() == (2**F // 3) / 2**F


def test_shapes_and_indexing() -> None:
    a = torch.arange(-12.0, 12.0, dtype=F64).reshape(4, 6) / 4
    fa = fixed(a)
    assert fa.shape == (4, 6) and fa.size(1) == 6 and fa.dim() == 2 and len(fa) == 4
    assert torch.equal(floated(fa.t()), a.t())
    assert torch.equal(floated(fa.transpose(0, 1)), a.transpose(0, 1))
    assert torch.equal(floated(fa.reshape(3, 8)), a.reshape(3, 8))
    assert torch.equal(floated(fa.view(-1)), a.view(-1))
    assert torch.equal(floated(fa[1:3, ::2]), a[1:3, ::2])
    assert torch.equal(floated(fa[0]), a[0])
    assert "shape=(4, 6)" in repr(fa) and "-3" not in repr(fa)  # no values in a repr


# -- the ring wraps ----------------------------------------------------------------------------
def test_wraparound_sum_still_decodes() -> None:
    """Encodings near the limit overflow int64 when added; the true total is small, and the
    ring (int64 wrapping) gives it exactly whatever the order of additions."""
    big = 2**62 - 1  # just below the encoding limit, with an odd last bit that a float64 sum would lose
    fx = FixedPrecisionTensor(torch.tensor([big, big, big, -big, -big, -big + 98305]), F)
    partial = fx[0] + fx[1] + fx[2]
    assert partial.child.item() < 0  # really wrapped: three positives added to a negative int64
    assert floated(fx.sum()).item() == 1.5 + U
    assert floated(partial + fx[3] + fx[4] + fx[5]).item() == 1.5 + U
    assert floated(fx.mean()).item() == 0.25  # floor((1.5 * 2^16 + 1) / 6) = 2^14


def test_wraparound_in_products_still_decodes() -> None:
    """A product whose 2f-bit intermediate wraps is wrong, but a sum of products whose partial
    sums wrap and whose total is in range decodes right."""
    a = fixed(torch.tensor([[3.0e4, 3.0e4, -3.0e4, -3.0e4 + 0.5]], dtype=F64))  # a*b ~ 2^59.7 each
    b = fixed(torch.tensor([[5.0e4], [5.0e4], [5.0e4], [5.0e4]], dtype=F64))
    assert (a.child * b.child.t())[0, :2].sum().item() < 0  # the 2f-bit partial sum wrapped
    assert floated(a @ b).item() == 0.5 * 5.0e4


# -- modules and the hook -----------------------------------------------------------------------
def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2), nn.BatchNorm1d(2))
    model[2].weight.requires_grad_(False)
    return model


def test_module_fixes_each_parameter_in_order_and_floats_back() -> None:
    model = _model()
    fixed_model = fix_precision(model)
    assert isinstance(fixed_model, FixedPrecisionModule)
    names = [name for name, _ in fixed_model.named_fixed_parameters()]
    assert names == [name for name, _ in model.named_parameters()]
    assert all(isinstance(p, FixedPrecisionTensor) for p in fixed_model.fixed_parameters())
    back = float_precision(fixed_model, F64)
    assert type(back) is type(model) and back is not model
    for (name, p), (name2, q) in zip(model.named_parameters(), back.named_parameters(), strict=True):
        assert name == name2 and isinstance(q, nn.Parameter) and q.requires_grad == p.requires_grad
        assert_within(q.detach(), p.detach().to(F64), U / 2)
    for b, c in zip(model.buffers(), back.buffers(), strict=True):
        assert torch.equal(b, c)
    same = fixed_model.float_precision().eval()  # float32, like the model and its buffers
    x = torch.randn(5, 3)
    assert torch.allclose(same(x), model.eval()(x), atol=1e-3)


def test_module_keeps_tied_weights_tied() -> None:
    model = nn.Sequential(nn.Linear(3, 3, bias=False), nn.Linear(3, 3, bias=False))
    model[1].weight = model[0].weight
    fixed_model = fix_precision(model)
    assert [n for n, _ in fixed_model.named_fixed_parameters()] == ["0.weight"]
    back = fixed_model.float_precision()
    assert back[0].weight is back[1].weight


def test_hook_adds_fix_precision() -> None:
    actors.hook_torch()
    try:
        x = torch.tensor([-1.25, 0.5]).fix_precision()
        assert isinstance(x, FixedPrecisionTensor) and torch.equal(
            x.float_precision(), torch.tensor([-1.25, 0.5])
        )
        assert torch.tensor([1.0]).fix_precision(4).precision == 4
        assert isinstance(_model().fix_precision(), FixedPrecisionModule)
    finally:
        actors.unhook_torch()
    assert not hasattr(torch.Tensor, "fix_precision")


@bounded(20)
async def test_share_keeps_the_precision_and_the_values() -> None:
    """``x.fix_precision(p).share(...)`` and ``model.fix_precision().share(...)`` hand over to
    the shared tensor with the fixed precision, and reconstruct to the fixed values."""
    workers = [actors.VirtualWorker(name) for name in ("alice", "bob", "carol")]
    alice, bob, carol = workers
    try:
        x = fixed(torch.tensor([-1.25, 0.5, 3.0]), 8)
        shared = x.share(alice, bob, crypto_provider=carol)
        assert shared.precision == 8
        assert torch.equal(await shared.get(), torch.tensor([-1.25, 0.5, 3.0]))
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 4), nn.Sigmoid(), nn.Linear(4, 2))  # layers with a protocol
        encrypted = fix_precision(model).share(alice, bob, crypto_provider=carol)
        names = [name for name, _ in model.named_parameters()]
        got = dict(encrypted.named_parameters())
        assert len(got) == len(names)
        for (_, value), (_, reference) in zip(got.items(), model.named_parameters(), strict=True):
            assert torch.allclose(await value.get(), reference.detach(), atol=2**-16)
    finally:
        for worker in workers:
            await worker.close()


# -- on a worker ----------------------------------------------------------------------------
def _program(x: FixedPrecisionTensor, y: FixedPrecisionTensor, w: torch.Tensor) -> list[FixedPrecisionTensor]:
    """The same expressions for a local and a remote pair: integer arithmetic, so equal bits."""
    z = (x + y) * y - (-x) * 2.5
    return [
        z,
        x - 1.5,
        3 * x,
        (x @ y.t()).sum(1),
        w @ x,
        x.t() @ w.t(),
        x.transpose(0, 1).reshape(-1)[1:5],
        x.view(-1).mean(),
        z.mean(0),
        (x * y).sum(),
        x[0] * y[1],
    ]


@bounded()
async def test_remote_matches_local_bit_for_bit(bob: actors.RemoteWorker) -> None:
    torch.manual_seed(1)
    a, b = torch.randn(3, 4) * 100, torch.randn(3, 4) * 100
    a[0, 0], a[1, 1] = -0.5, -3.0000153
    w = torch.randn(2, 3)
    local = [floated(r) for r in _program(fixed(a), fixed(b), w)]
    pa, pb = actors.send(a, bob), actors.send(b, bob)
    remote = _program(fix_precision(pa), fix_precision(pb), w)  # all pipelined: nothing awaited
    assert all(r.is_remote and r.location is bob for r in remote)
    got = [await r.float_precision(F64).get() for r in remote]
    for g, want in zip(got, local, strict=True):
        assert torch.equal(g, want)
    assert torch.equal(await fix_precision(pa).float_precision().get(), fixed(a).float_precision())
    del pa, pb, remote


@bounded()
async def test_remote_with_the_hook(bob: actors.RemoteWorker) -> None:
    actors.hook_torch()
    try:
        p = torch.tensor([-1.25, 2.5]).send(bob)
        x = p.fix_precision(8)
        assert x.precision == 8 and x.is_remote
        assert torch.equal(await (x * x).float_precision().get(), torch.tensor([1.5625, 6.25]))
        del p, x
    finally:
        actors.unhook_torch()


@bounded()
async def test_remote_module(bob: actors.RemoteWorker) -> None:
    model = _model()
    want = fix_precision(model).float_precision()
    actors.send(model, bob)
    fixed_model = fix_precision(model)
    back = fixed_model.float_precision()
    assert actors.module.location_of(back) is bob
    await actors.get(back)
    for p, q in zip(want.parameters(), back.parameters(), strict=True):
        assert torch.equal(p, q)
    for b, c in zip(model.buffers(), back.buffers(), strict=True):
        assert b is not c  # each module has its own copies of the buffers
    await actors.get(model)
    for b, c in zip(model.buffers(), back.buffers(), strict=True):
        assert torch.equal(b, c)
    del model, back, fixed_model


@bounded()
async def test_remote_errors(bob: actors.RemoteWorker) -> None:
    p = actors.send(torch.tensor([1.0, float("nan")]), bob)
    q = actors.send(torch.tensor([1.0, 2.0]), bob)
    with pytest.raises(ValueError, match="precision"):
        fix_precision(q, 31)  # refused here, before anything is sent
    nan = fix_precision(p)
    with pytest.raises(BadArguments, match="cannot encode"):
        await nan.child
    with pytest.raises(BadArguments, match="cannot encode"):  # and what is computed from it
        await (nan + 1.0).float_precision().get()
    x8, x16 = fix_precision(q, 8), fix_precision(q, 16)
    with pytest.raises(ValueError, match="16 and 8"):
        x16 * x8
    with pytest.raises(ValueError, match="local"):
        x16 + fixed(torch.ones(2))
    with pytest.raises(TypeError, match="fixed first"):
        x16 + q
    # the commands check what reaches them (a caller need not be this module)
    with pytest.raises(BadArguments, match="int64"):
        await call(bob, "mpc.truncate", [q, 16]).get()
    with pytest.raises(BadArguments, match="precision"):
        await call(bob, "mpc.decode", [x16.child, 99]).get()
    with pytest.raises(BadArguments, match="precision"):
        await call(bob, "mpc.encode", [q, -1]).get()
    with pytest.raises(BadArguments, match="float tensor"):
        await call(bob, "mpc.encode", [x16.child, 16]).get()
    with pytest.raises(BadArguments, match="dtype"):
        await call(bob, "mpc.decode", [x16.child, 16, torch.int32]).get()
    with pytest.raises(BadArguments, match="dim"):
        await call(bob, "mpc.mean", [x16.child, "0"]).get()
    with pytest.raises(BadArguments, match="no elements"):
        await call(bob, "mpc.mean", [x16.child[:0]]).get()
    del p, q, x8, x16, nan


@bounded()
async def test_workers_serve_it_as_the_mpc_set(make_worker) -> None:
    carol = await make_worker("carol", enable=["mpc"])
    x = fix_precision(actors.send(torch.tensor([-0.5, 1.25]), carol))
    assert torch.equal(await (x - 1.0).float_precision().get(), torch.tensor([-1.5, 0.25]))
    del x
    dave = await make_worker("dave", enable=[])
    y = fix_precision(actors.send(torch.ones(1), dave))
    with pytest.raises(CommandNotAllowed, match=r"mpc\.encode.*not served"):
        await y.child
    del y
