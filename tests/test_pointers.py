"""Pointers: pipelining, error propagation, freeing, isolation, the torch API and moves.

Every expected value is the same computation done on local tensors with plain PyTorch, compared
exactly (``torch.equal`` plus the dtype). Workers come from the ``make_worker``/``bob``/``alice``
fixtures, so these scenarios run over every transport the fixtures know.
"""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import pytest
import torch
import torch.nn.functional as F  # noqa: N812 - the name everyone reads

import actors
from actors.pointer import PointerTensor
from protocol import Expect, ObjectNotFound, PointerNotResolved, RemoteError, WorkerLost
from protocol.errors import remote_error_class

RemoteRuntimeError = remote_error_class("RuntimeError")


async def settle(*, collect: bool = True) -> None:
    """Let dropped pointers go: their batched deletes leave on the next turn of the loop.

    ``collect`` also breaks reference cycles, which only a raised remote error creates (its
    traceback holds the frame that awaited the pointer); a full collection costs ~0.1 s.
    """
    await asyncio.sleep(0)  # a callback that just raised into us may still hold a future
    if collect:
        gc.collect()
        await asyncio.sleep(0)


async def held(worker: actors.RemoteWorker, *, collect: bool = False) -> int:
    """How many objects ``worker`` holds once every dropped pointer has been freed."""
    await settle(collect=collect)
    status = await worker.ping()
    return int(status["objects"])


async def assert_value(ptr: Any, expected: torch.Tensor) -> None:
    """``ptr`` holds exactly ``expected`` (values, shape and dtype); the copy stays remote."""
    got = await ptr.fetch()
    assert isinstance(got, torch.Tensor)
    assert got.dtype == expected.dtype, (got.dtype, expected.dtype)
    assert got.shape == expected.shape, (got.shape, expected.shape)
    assert torch.equal(got, expected), (got, expected)


# -- 1. pipelining ------------------------------------------------------------------------------
def issue_chain(y: Any, a: Any, b: Any, steps: int) -> Any:
    """Plain function, no ``await`` possible: every operation is issued without waiting."""
    for _ in range(steps):
        y = y * a + b
    return y


async def test_ten_thousand_chained_ops_are_pipelined_and_exact(bob):
    a = torch.tensor([1.0001, 0.9999, -1.0, 0.5])
    b = torch.tensor([0.001, -0.002, 0.25, 1.0])
    start = torch.tensor([1.0, 2.0, 3.0, 4.0])
    ap, bp, yp = actors.send(a, bob), actors.send(b, bob), actors.send(start, bob)

    result = issue_chain(yp, ap, bp, 5_000)  # 10,000 operations, issued synchronously
    assert isinstance(result, PointerTensor)
    with pytest.raises(PointerNotResolved):
        _ = result.shape  # nothing has been waited for yet

    expected = issue_chain(start, a, b, 5_000)
    await result
    assert result.shape == expected.shape
    assert result.dtype == torch.float32
    # Every intermediate result was freed as the chain went: a, b, the start and the result remain.
    assert await held(bob) == 4
    assert torch.equal(await result.get(), expected)
    del ap, bp, yp
    assert await held(bob) == 0


async def test_ten_thousand_independent_ops_are_pipelined_and_exact(bob):
    t = torch.arange(5, dtype=torch.float64)
    x = actors.send(t, bob)
    pointers = [x + float(i) for i in range(10_000)]  # no await between them
    assert len({p.id for p in pointers}) == 10_000
    assert await held(bob) == 10_001  # all of them computed and alive
    values = await asyncio.gather(*(p.get() for p in pointers))
    for i, value in enumerate(values):
        assert torch.equal(value, t + float(i)), i
    del pointers, values
    assert await held(bob) == 1
    del x
    assert await held(bob) == 0


# -- 2. an error in the middle of a chain -------------------------------------------------------
async def test_error_mid_chain_fails_exactly_its_dependants(bob):
    t = torch.arange(6.0).reshape(2, 3)
    x = actors.send(t, bob)
    before = []
    c, local = x, t
    for _ in range(5):
        c, local = c * 2 + 1, local * 2 + 1
        before.append((c, local))

    bad = c @ x  # (2x3) @ (2x3): fails on bob
    dependants = [bad + 1, (bad + 1).sum(), bad.t(), x - bad, torch.cat([x, bad]), F.linear(x, weight=bad)]
    d = bad
    for _ in range(20):
        d = d * 2
        dependants.append(d)
    pipelined_after = (c - x).sum(dim=1)  # independent, issued in the same burst after the failure

    for ptr, value in before:  # everything issued before the failure is fine
        await assert_value(ptr, value)
    await assert_value(pipelined_after, (local - t).sum(dim=1))

    with pytest.raises(RuntimeError) as failure:
        await bad
    assert type(failure.value) is RemoteRuntimeError
    assert failure.value.failed_id == bad.id
    assert "2x3 and 2x3" in str(failure.value)

    results = await asyncio.gather(*(p.resolve() for p in dependants), return_exceptions=True)
    assert len(results) == 26
    for result in results:
        assert type(result) is RemoteRuntimeError, result
        assert result.failed_id == bad.id
        assert str(result) == str(failure.value)

    later = (x * 3 - 1).mean(dim=0)  # issued after the failure was observed
    await assert_value(later, (t * 3 - 1).mean(dim=0))
    await assert_value(before[-1][0] + x, before[-1][1] + t)  # results from before still usable

    del before, bad, dependants, d, c, results, result, failure, pipelined_after, later, ptr
    assert await held(bob, collect=True) == 1  # the failures were freed with their pointers; x remains
    del x
    assert await held(bob, collect=True) == 0


# -- 3. freeing -----------------------------------------------------------------------------------
async def check_dropped_pointers_free_their_objects(bob):
    t = torch.tensor([1.0, 2.0, 3.0])
    x = actors.send(t, bob)
    y = x + 1
    many = [x * i for i in range(50)]
    assert await held(bob) == 52
    del many
    assert await held(bob) == 2
    del y
    assert await held(bob) == 1
    c = x.copy()
    assert await held(bob) == 2
    del c, x
    assert await held(bob) == 0


async def check_get_frees_and_fetch_keeps(bob):
    t = torch.tensor([[1.0, -1.0], [2.0, 5.0]])
    x = actors.send(t, bob)
    assert torch.equal(await x.fetch(), t)
    assert await held(bob) == 1
    assert torch.equal(await x.get(), t)
    assert await held(bob) == 0  # get() freed it while the pointer object is still alive
    with pytest.raises(PointerNotResolved):
        await x.fetch()
    with pytest.raises(PointerNotResolved):
        await x
    with pytest.raises(PointerNotResolved):
        x.get()
    del x
    assert await held(bob) == 0


async def check_intermediate_results_of_expressions_are_freed(bob):
    t = torch.arange(12.0).reshape(3, 4)
    x = actors.send(t, bob)
    z = (((x + 1) * 2 - 3).relu() @ x.t()).sum(dim=0).exp().mean()
    await z
    assert await held(bob) == 2  # x and z; the six intermediates are gone
    assert torch.equal(await z.get(), (((t + 1) * 2 - 3).relu() @ t.t()).sum(dim=0).exp().mean())
    assert await held(bob) == 1
    del x
    assert await held(bob) == 0


async def test_dropped_pointers_free_their_objects(bob):
    await check_dropped_pointers_free_their_objects(bob)
    await check_get_frees_and_fetch_keeps(bob)
    await check_intermediate_results_of_expressions_are_freed(bob)


async def check_failed_results_are_freed_too(bob):
    x = actors.send(torch.ones(2, 3), bob)
    bad = x @ x
    dependant = bad + 1
    assert await held(bob) == 3  # failures stand in the store like values
    with pytest.raises(RuntimeError):
        await dependant
    del bad, dependant
    assert await held(bob, collect=True) == 1
    del x
    assert await held(bob, collect=True) == 0


# -- 4. isolation ---------------------------------------------------------------------------------
async def check_mutating_the_local_tensor_after_send_does_not_reach_the_remote(bob):
    t = torch.tensor([1.0, 2.0, 3.0])
    x = actors.send(t, bob)
    t.add_(100)  # same turn of the loop, before anything was awaited
    t[0] = -7.0
    y = x * 1
    operand = torch.tensor([10.0, 20.0, 30.0])
    z = x + operand  # a local tensor argument is captured when the operation is called
    operand.mul_(0)
    await assert_value(x, torch.tensor([1.0, 2.0, 3.0]))
    await assert_value(y, torch.tensor([1.0, 2.0, 3.0]))
    await assert_value(z, torch.tensor([11.0, 22.0, 33.0]))
    assert torch.equal(t, torch.tensor([-7.0, 102.0, 103.0]))


async def check_mutating_a_fetched_value_does_not_reach_the_remote(bob):
    x = actors.send(torch.tensor([1.0, 2.0, 3.0]), bob)
    fetched = await x.fetch()
    fetched.add_(5)
    fetched[0] = 99.0
    await assert_value(x, torch.tensor([1.0, 2.0, 3.0]))
    again = await x.fetch()
    again.zero_()
    assert torch.equal(await x.get(), torch.tensor([1.0, 2.0, 3.0]))


async def check_remote_in_place_ops_do_not_reach_the_local_original(bob):
    t = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    x = actors.send(t, bob)
    same = x.add_(1)  # in place on bob
    x.mul_(2)
    x[0, 0] = -1.0
    await assert_value(x, torch.tensor([[-1.0, 6.0], [8.0, 10.0]]))
    await assert_value(same, torch.tensor([[-1.0, 6.0], [8.0, 10.0]]))  # the same remote tensor
    assert torch.equal(t, torch.tensor([[1.0, 2.0], [3.0, 4.0]]))


async def check_copy_is_independent(bob):
    x = actors.send(torch.tensor([1.0, 2.0]), bob)
    c = x.copy()
    c.mul_(10)
    x.sub_(1)
    await assert_value(x, torch.tensor([0.0, 1.0]))
    await assert_value(c, torch.tensor([10.0, 20.0]))


async def test_isolation_between_local_and_remote(bob):
    await check_mutating_the_local_tensor_after_send_does_not_reach_the_remote(bob)
    await check_mutating_a_fetched_value_does_not_reach_the_remote(bob)
    await check_remote_in_place_ops_do_not_reach_the_local_original(bob)
    await check_copy_is_independent(bob)


# -- 5. the torch API through pointers ------------------------------------------------------------
async def check_arithmetic_and_reverse_operators(bob):
    t = torch.tensor([[1.5, -2.0, 3.0], [4.0, 0.5, -6.0]])
    u = torch.tensor([[2.0, 3.0, -1.0], [0.25, 4.0, 2.0]])
    x, y = actors.send(t, bob), actors.send(u, bob)
    cases = [
        (x + y, t + u),
        (x - y, t - u),
        (x * y, t * u),
        (x / y, t / u),
        (x + 2, t + 2),
        (2 + x, 2 + t),
        (x - 2, t - 2),
        (2 - x, 2 - t),
        (x * 3, t * 3),
        (3 * x, 3 * t),
        (x / 4, t / 4),
        (4 / x, 4 / t),
        (x**2, t**2),
        (2**x, 2**t),
        (x // 2, t // 2),
        (7 // y, 7 // u),
        (x % 2, t % 2),
        (-x, -t),
        (abs(x), abs(t)),
        (x + u, t + u),  # pointer and local tensor, both orders
        (u + x, u + t),
        (u - x, u - t),
        (x - u, t - u),
        (u * x, u * t),
        (u / x, u / t),
        (x ** y.abs(), t ** u.abs()),
        (torch.add(x, y, alpha=2), torch.add(t, u, alpha=2)),
        (torch.mul(x, u), torch.mul(t, u)),
        ((x + 1) * (y - 1) / 2, (t + 1) * (u - 1) / 2),
    ]
    for ptr, expected in cases:
        await assert_value(ptr, expected)


async def check_integer_and_bitwise_operators(bob):
    t = torch.tensor([5, -3, 12, 7])
    u = torch.tensor([3, 2, 5, 1])
    x, y = actors.send(t, bob), actors.send(u, bob)
    for ptr, expected in [
        (x & y, t & u),
        (x | y, t | u),
        (x ^ y, t ^ u),
        (~x, ~t),
        (x // y, t // u),
        (x % y, t % u),
        (x << 1, t << 1),
        (x * 2 + y, t * 2 + u),
    ]:
        await assert_value(ptr, expected)


async def check_matmul(bob):
    a = torch.arange(6.0).reshape(2, 3)
    b = torch.arange(12.0).reshape(3, 4) - 5
    x, y = actors.send(a, bob), actors.send(b, bob)
    await assert_value(x @ y, a @ b)
    await assert_value(a @ y, a @ b)  # local @ pointer
    await assert_value(x @ b, a @ b)  # pointer @ local
    await assert_value(torch.matmul(x, y), torch.matmul(a, b))
    await assert_value(x.mm(y), a.mm(b))
    await assert_value(y.t() @ x.t(), b.t() @ a.t())


async def check_indexing_and_slicing(bob):
    t = torch.arange(24.0).reshape(4, 6)
    x = actors.send(t, bob)
    mask = t > 10
    m = actors.send(mask, bob)
    idx = torch.tensor([3, 0, 2])
    for ptr, expected in [
        (x[0], t[0]),
        (x[-1], t[-1]),
        (x[:, 1], t[:, 1]),
        (x[1:3], t[1:3]),
        (x[1:, ::2], t[1:, ::2]),
        (x[..., -1], t[..., -1]),
        (x[None, 2], t[None, 2]),
        (x[2, 3], t[2, 3]),
        (x[idx], t[idx]),
        (x[actors.send(idx, bob)], t[idx]),
        (x[[0, 1], [5, 4]], t[[0, 1], [5, 4]]),
        (x[m], t[mask]),
        (x[x > 20], t[t > 20]),
    ]:
        await assert_value(ptr, expected)


async def check_setitem(bob):
    t = torch.zeros(3, 4)
    x = actors.send(t, bob)
    expected = t.clone()
    x[0] = 5.0
    expected[0] = 5.0
    x[:, 1] = torch.tensor([1.0, 2.0, 3.0])
    expected[:, 1] = torch.tensor([1.0, 2.0, 3.0])
    x[2, 2:] = actors.send(torch.tensor([7.0, 8.0]), bob)
    expected[2, 2:] = torch.tensor([7.0, 8.0])
    x[x > 6] = -1.0
    expected[expected > 6] = -1.0
    await assert_value(x, expected)
    assert torch.equal(t, torch.zeros(3, 4))  # the local original is untouched


async def test_indexing_matches_torch(bob):
    await check_indexing_and_slicing(bob)
    await check_setitem(bob)


async def check_comparisons(bob):
    t = torch.tensor([1.0, 5.0, 3.0, -2.0])
    u = torch.tensor([1.0, 4.0, 6.0, -2.0])
    x, y = actors.send(t, bob), actors.send(u, bob)
    eq = x == y
    assert isinstance(eq, PointerTensor)  # comparisons are remote too
    for ptr, expected in [
        (eq, t == u),
        (x != y, t != u),
        (x < y, t < u),
        (x <= y, t <= u),
        (x > y, t > u),
        (x >= y, t >= u),
        (x > 2, t > 2),
        (x == 3.0, t == 3.0),
        (u < x, u < t),  # local tensor on the left
        (torch.eq(x, u), torch.eq(t, u)),
        (torch.where(x > y, x, y), torch.where(t > u, t, u)),
        ((x > 0) & (y > 0), (t > 0) & (u > 0)),
    ]:
        await assert_value(ptr, expected)


async def test_operators_match_torch(bob):
    await check_arithmetic_and_reverse_operators(bob)
    await check_integer_and_bitwise_operators(bob)
    await check_matmul(bob)
    await check_comparisons(bob)


async def check_reductions_with_dims(bob):
    t = torch.arange(24.0).reshape(2, 3, 4) / 7
    x = actors.send(t, bob)
    for ptr, expected in [
        (x.sum(), t.sum()),
        (x.sum(dim=1), t.sum(dim=1)),
        (x.sum(2, keepdim=True), t.sum(2, keepdim=True)),
        (x.sum(dim=(0, 2)), t.sum(dim=(0, 2))),
        (x.mean(), t.mean()),
        (x.mean(dim=0), t.mean(dim=0)),
        (x.mean(-1, keepdim=True), t.mean(-1, keepdim=True)),
        (torch.sum(x, 1), torch.sum(t, 1)),
        (torch.mean(x, dim=[1, 2]), torch.mean(t, dim=[1, 2])),
        (x.prod(dim=2), t.prod(dim=2)),
        (x.std(dim=1), t.std(dim=1)),
        (x.argmax(dim=2), t.argmax(dim=2)),
    ]:
        await assert_value(ptr, expected)
    total = x.sum().item()
    assert await total.get() == t.sum().item()


async def check_shape_operations(bob):
    t = torch.arange(6.0).reshape(2, 3)
    x = actors.send(t, bob)
    for ptr, expected in [
        (x.view(3, 2), t.view(3, 2)),
        (x.view(-1), t.view(-1)),
        (x.reshape(1, 6), t.reshape(1, 6)),
        (torch.reshape(x, (6,)), torch.reshape(t, (6,))),
        (x.t(), t.t()),
        (x.T, t.T),
        (x.transpose(0, 1), t.transpose(0, 1)),
        (torch.transpose(x, 1, 0), torch.transpose(t, 1, 0)),
        (x.permute(1, 0), t.permute(1, 0)),
        (x.unsqueeze(1), t.unsqueeze(1)),
        (x.flatten(), t.flatten()),
        (x.t().contiguous().view(6), t.t().contiguous().view(6)),
        (x.long(), t.long()),
        (x.to(torch.float64), t.to(torch.float64)),
    ]:
        await assert_value(ptr, expected)


async def check_cat_and_stack_of_pointers(bob):
    t = torch.arange(6.0).reshape(2, 3)
    u = -torch.arange(6.0).reshape(2, 3)
    x, y = actors.send(t, bob), actors.send(u, bob)
    await assert_value(torch.cat([x, y]), torch.cat([t, u]))
    await assert_value(torch.cat([x, y, x], dim=1), torch.cat([t, u, t], dim=1))
    await assert_value(torch.cat((x, u), 0), torch.cat((t, u), 0))  # a local tensor among them
    await assert_value(torch.stack([x, y]), torch.stack([t, u]))
    await assert_value(torch.stack([x, y], dim=2), torch.stack([t, u], dim=2))


async def test_functional_ops(bob):
    torch.manual_seed(0)
    t = torch.randn(4, 5)
    w, b = torch.randn(3, 5), torch.randn(3)
    img = torch.randn(2, 3, 6, 6)
    kernel, kbias = torch.randn(4, 3, 3, 3), torch.randn(4)
    target = torch.randn(4, 3)
    labels = torch.tensor([0, 2, 1, 2])
    x, wp, bp, ip = (actors.send(v, bob) for v in (t, w, b, img))
    kp, kbp, tp, lp = (actors.send(v, bob) for v in (kernel, kbias, target, labels))
    logits = F.linear(x, wp, bp)
    for ptr, expected in [
        (F.relu(x), F.relu(t)),
        (torch.relu(x), torch.relu(t)),
        (F.sigmoid(x), F.sigmoid(t)),
        (torch.sigmoid(x), torch.sigmoid(t)),
        (F.softmax(x, dim=1), F.softmax(t, dim=1)),
        (F.softmax(x, dim=0), F.softmax(t, dim=0)),
        (logits, F.linear(t, w, b)),
        (F.linear(x, w), F.linear(t, w)),  # local weight, remote input
        (F.conv2d(ip, kp, kbp, padding=1), F.conv2d(img, kernel, kbias, padding=1)),
        (F.conv2d(ip, kp, stride=2), F.conv2d(img, kernel, stride=2)),
        (F.avg_pool2d(ip, 2), F.avg_pool2d(img, 2)),
        (F.avg_pool2d(ip, kernel_size=3, stride=1), F.avg_pool2d(img, kernel_size=3, stride=1)),
        (F.mse_loss(logits, tp), F.mse_loss(F.linear(t, w, b), target)),
        (F.mse_loss(logits, target, reduction="sum"), F.mse_loss(F.linear(t, w, b), target, reduction="sum")),
        (F.cross_entropy(logits, lp), F.cross_entropy(F.linear(t, w, b), labels)),
        (F.cross_entropy(logits, labels), F.cross_entropy(F.linear(t, w, b), labels)),
    ]:
        await assert_value(ptr, expected)


async def check_multi_output_ops_indexed(bob):
    t = torch.tensor([[3.0, -1.0, 7.0], [2.0, 9.0, 0.5], [4.0, 4.5, -3.0]])
    x = actors.send(t, bob)
    by_dim = torch.max(x, dim=0)
    await assert_value(by_dim[0], torch.max(t, dim=0)[0])
    await assert_value(by_dim[1], torch.max(t, dim=0)[1])
    await assert_value(torch.max(x), torch.max(t))
    await assert_value(x.min(dim=1)[1], t.min(dim=1)[1])
    await assert_value(torch.sort(x, dim=1, descending=True)[0], torch.sort(t, dim=1, descending=True)[0])
    await assert_value(torch.sort(x, dim=1, descending=True)[1], torch.sort(t, dim=1, descending=True)[1])
    await assert_value(torch.topk(x, 2)[1], torch.topk(t, 2)[1])
    await assert_value(by_dim[0] + by_dim[1], torch.max(t, dim=0)[0] + torch.max(t, dim=0)[1])
    values, indices = await by_dim.get()
    assert torch.equal(values, torch.max(t, dim=0).values)
    assert torch.equal(indices, torch.max(t, dim=0).indices)


async def test_reductions_shapes_and_multi_output_ops_match_torch(bob):
    await check_reductions_with_dims(bob)
    await check_shape_operations(bob)
    await check_cat_and_stack_of_pointers(bob)
    await check_multi_output_ops_indexed(bob)


async def check_metadata_known_after_await_or_at_once_when_sent(bob):
    t = torch.zeros(2, 3, 4)
    x = actors.send(t, bob)
    # A sent tensor knows its metadata at once.
    assert x.shape == torch.Size([2, 3, 4])
    assert x.dtype == torch.float32
    assert x.requires_grad is False
    assert (x.ndim, x.dim(), x.numel(), len(x), x.size(1), x.size()) == (3, 3, 24, 2, 3, t.size())
    w = actors.send(torch.ones(3, requires_grad=True), bob)
    assert w.requires_grad is True

    y = (x > 0).sum(dim=1)
    for read in (
        lambda: y.shape,
        lambda: y.dtype,
        lambda: y.requires_grad,
        lambda: y.ndim,
        y.size,
        lambda: len(y),
        y.numel,
    ):
        with pytest.raises(PointerNotResolved):
            read()
    assert await y is y
    assert y.shape == torch.Size([2, 4])
    assert y.dtype == torch.int64
    assert len(y) == 2
    z = x.double().transpose(0, 2)
    with pytest.raises(PointerNotResolved):
        _ = z.dtype
    await z
    assert (z.shape, z.dtype) == (torch.Size([4, 3, 2]), torch.float64)
    scalar = await x.sum()
    assert scalar.shape == torch.Size([])
    with pytest.raises(TypeError):
        len(scalar)


async def check_pointer_has_no_truth_value_and_is_not_iterable(bob):
    x = actors.send(torch.tensor([1.0]), bob)
    with pytest.raises(TypeError):
        bool(x)
    with pytest.raises(TypeError):
        bool(x > 0)
    with pytest.raises(TypeError):
        if x == 1:
            pass
    with pytest.raises(TypeError):
        list(x)


async def test_metadata_and_truth_value(bob):
    await check_metadata_known_after_await_or_at_once_when_sent(bob)
    await check_pointer_has_no_truth_value_and_is_not_iterable(bob)


async def test_pointers_on_different_workers_refuse_to_mix(bob, alice):
    xa = actors.send(torch.ones(2, 2), alice)
    xb = actors.send(torch.ones(2, 2), bob)
    for mix in (
        lambda: xa + xb,
        lambda: xb * xa,
        lambda: xa @ xb,
        lambda: torch.add(xa, xb),
        lambda: torch.matmul(xb, xa),
        lambda: F.linear(xa, xb),
        lambda: F.linear(xa, weight=xb),
        lambda: torch.where(xa > 0, xa, xb),
    ):
        with pytest.raises(ValueError, match="move it there first"):
            mix()
    # Nothing was sent: each worker still holds only its own tensor.
    assert await held(alice) == 1
    assert await held(bob) == 1


def refusals(xa: Any, xb: Any) -> list[bool]:
    """For each way of mixing pointers on two workers: was it refused at call time?"""
    refused = []
    for mix in (
        lambda: torch.cat([xa, xb]),
        lambda: torch.stack((xb, xa)),
        lambda: F.linear(input=xa, weight=xb),
        lambda: torch.add(input=xb, other=xa),
    ):
        try:
            mix()  # the pointer it returns, if any, is dropped at once
        except ValueError:
            refused.append(True)
        else:  # sent to one worker naming the other's object: ObjectNotFound when awaited
            refused.append(False)
    return refused


async def test_pointers_on_different_workers_refuse_to_mix_inside_lists_and_kwargs(bob, alice):
    xa = actors.send(torch.ones(2, 2), alice)
    xb = actors.send(torch.ones(2, 2), bob)
    refused = refusals(xa, xb)
    del xa, xb
    await settle()
    assert refused == [True, True, True, True]


# -- 6. moves -------------------------------------------------------------------------------------
async def check_move_to_another_worker(bob, alice):
    t = torch.tensor([[1.0, 2.0], [3.0, -4.0]])
    x = actors.send(t, bob)
    old_id = x.id
    y = x.move(alice)
    assert y is x  # the pointer follows the object
    assert x.location is alice
    assert x.id != old_id
    assert x.shape == t.shape  # the metadata survives the move
    z = x @ x + 1
    await assert_value(z, t @ t + 1)
    assert await held(bob) == 0
    del z
    assert await held(alice) == 1
    assert torch.equal(await x.get(), t)
    assert await held(alice) == 0


async def test_chained_moves_bob_alice_bob(bob, alice):
    t = torch.tensor([1.0, -2.0, 3.0])
    x = actors.send(t, bob)
    x.move(alice).move(bob).move(alice)  # pipelined: no waiting between the hops
    assert x.location is alice
    await assert_value(x * 2, t * 2)
    x = x + 1  # computed on alice
    x.move(bob)
    x = x * 3  # computed on bob
    assert x.location is bob
    x.move(alice)
    x = x - 0.5
    assert x.location is alice
    expected = (t + 1) * 3 - 0.5
    await assert_value(x, expected)
    assert await held(bob) == 0
    assert await held(alice) == 1
    x.move(bob)
    assert torch.equal(await x.get(), expected)
    assert await held(alice) == 0
    assert await held(bob) == 0


async def check_chained_moves_through_three_workers(make_worker, bob, alice):
    carol = await make_worker("carol")
    t = torch.tensor([[1.0, 2.0], [-3.0, 0.5]])
    x = actors.send(t, bob)
    x.move(alice)
    x = x @ x  # on alice
    x.move(carol)
    x = x.sum(dim=0) - 1  # on carol
    assert x.location is carol
    await assert_value(x, (t @ t).sum(dim=0) - 1)
    assert (await held(bob), await held(alice), await held(carol)) == (0, 0, 1)
    assert torch.equal(await x.get(), (t @ t).sum(dim=0) - 1)


async def check_move_same_worker_is_a_no_op(bob):
    x = actors.send(torch.tensor([1.0]), bob)
    old_id = x.id
    assert x.move(bob) is x
    assert x.id == old_id
    assert torch.equal(await x.get(), torch.tensor([1.0]))


async def test_move_to_another_worker(bob, alice):
    await check_move_to_another_worker(bob, alice)
    await check_move_same_worker_is_a_no_op(bob)


async def test_moving_a_failed_pointer_keeps_its_error(bob, alice):
    x = actors.send(torch.ones(2, 3), bob)
    bad = x @ x
    failed_id = bad.id
    bad.move(alice)
    dependant = bad.sum()  # on alice, using the moved failure
    with pytest.raises(RuntimeError) as failure:
        await bad
    assert type(failure.value) is RemoteRuntimeError
    assert failure.value.failed_id == failed_id
    assert "2x3 and 2x3" in str(failure.value)
    with pytest.raises(RuntimeError) as failure_of_dependant:
        await dependant
    assert type(failure_of_dependant.value) is RemoteRuntimeError
    assert failure_of_dependant.value.failed_id == failed_id
    # alice keeps serving.
    await assert_value(actors.send(torch.tensor([2.0]), alice) * 4, torch.tensor([8.0]))
    del bad, dependant, failure, failure_of_dependant
    assert await held(alice, collect=True) == 0
    assert await held(bob, collect=True) == 1


async def check_moved_tensors_mix_with_pointers_on_destination(bob, alice):
    t, u = torch.arange(4.0), torch.arange(4.0) * 10
    x = actors.send(t, bob)
    y = actors.send(u, alice)
    x.move(alice)
    await assert_value(torch.stack([x, y]).sum(dim=0), t + u)
    await assert_value(torch.cat([y, x]), torch.cat([u, t]))


async def test_chained_moves_through_three_workers(make_worker, bob, alice):
    await check_chained_moves_through_three_workers(make_worker, bob, alice)
    await check_moved_tensors_mix_with_pointers_on_destination(bob, alice)


async def test_expect_timeout_fails_dependants_with_worker_lost(make_worker, bob):
    carol = await make_worker("carol", expect_timeout=0.2)
    connection = carol.connection
    ghost_id = actors.new_object_id()
    connection.tell(Expect(connection.next_id(), connection.local_id, [ghost_id], "nobody"))
    ghost = PointerTensor(carol, ghost_id)
    y = ghost * 2
    # Meanwhile another sender (bob's worker) delivers x to carol.
    x = actors.send(torch.tensor([5.0]), bob)
    x.move(carol)
    with pytest.raises(WorkerLost) as lost:
        await y
    assert type(lost.value) is WorkerLost
    assert lost.value.failed_id == ghost_id
    assert "did not arrive" in str(lost.value)
    with pytest.raises(WorkerLost):
        await ghost
    assert carol.connection.lost is None  # the connection itself is fine
    # carol keeps serving this sender, with what the other sender delivered meanwhile.
    await assert_value(x * 2, torch.tensor([10.0]))
    await assert_value(actors.send(torch.tensor([1.0, 2.0]), carol) + 1, torch.tensor([2.0, 3.0]))
    del ghost, y, lost
    assert await held(carol, collect=True) == 1
    assert await held(bob, collect=True) == 0


@pytest.mark.parametrize("spin", [0.0, 0.05], ids=["sleeping", "polling"])
async def test_announced_objects_that_never_come_run_out_at_one_deadline(make_worker, transport, spin):
    """An announcement has one deadline, counted from the EXPECT, however many messages wait on
    it; one watchdog serves them all; a worker that polls while a message waits stops polling
    once nothing is parked; and a message parked on a missing object holds up nothing else."""
    carol = await make_worker("carol", expect_timeout=0.3, spin=spin)
    connection = carol.connection
    first, second = actors.new_object_id(), actors.new_object_id()
    connection.tell(Expect(connection.next_id(), connection.local_id, [first, second], "nobody"))
    loop = asyncio.get_running_loop()
    start = loop.time()
    waiting = PointerTensor(carol, first) * 2
    meanwhile = actors.send(torch.tensor([1.0]), carol) + 1  # touches neither: not held up
    assert torch.equal(await meanwhile.get(), torch.tensor([2.0]))
    assert loop.time() - start < 0.2
    if transport == "virtual":  # the worker is in this process: watch it wait
        assert carol.worker._spinning is (spin > 0) and len(carol.worker._deadlines) == 2
    with pytest.raises(WorkerLost, match="did not arrive"):
        await waiting
    del waiting
    first_failed = loop.time() - start
    with pytest.raises(WorkerLost, match="did not arrive"):
        await (PointerTensor(carol, second) + 1)
    second_failed = loop.time() - start
    assert 0.3 <= first_failed < 0.6 and second_failed - first_failed < 0.1
    await assert_value(actors.send(torch.tensor([1.0]), carol) + 1, torch.tensor([2.0]))
    if transport == "virtual":
        assert carol.worker._deadlines == {} and not carol.worker._spinning
    assert await held(carol, collect=True) == 0


async def check_remote_errors_keep_builtin_types(bob):
    x = actors.send(torch.ones(2), bob)
    with pytest.raises(IndexError) as index_error:
        await x[5]
    assert isinstance(index_error.value, RemoteError)
    assert index_error.value.remote_type == "IndexError"
    assert index_error.value.remote_traceback
    missing = PointerTensor(bob, actors.new_object_id())
    with pytest.raises(ObjectNotFound):
        await (missing + x)


async def test_failures_keep_their_types_and_are_freed(bob):
    await check_failed_results_are_freed_too(bob)
    await check_remote_errors_keep_builtin_types(bob)
