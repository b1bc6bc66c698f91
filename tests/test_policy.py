"""The policy on a worker's own data: nothing derived from it leaves except through a release
its owner declared, and nobody writes into it or deletes it.

Worker "bob" publishes the same small matrix three times: ``mu/x`` releasing model updates
(``ModelUpdates()``), ``none/x`` releasing nothing, ``open/x`` as ``Public()``; ``train/x`` and
``train/y`` are a tiny regression set releasing model updates. The leader "me" is not the owner:
it computes on the data through pointers and tries every path it can think of to read it back,
to change it, or to send it to "eve", a second worker it controls. Every scenario runs over the
virtual, WebSocket and TCP transports; at the end of each the published data is unchanged.

These tests build their own workers (rather than use ``make_worker``) because publishing needs
the worker object behind the network handle.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F  # noqa: N812 - the name everyone reads

import actors
import privacy  # noqa: F401 - registers the label rules that make ModelUpdates releasable
from actors.identity import Credentials, derive_secret
from actors.pointer import PointerTensor, call, new_object_id
from actors.policy import ModelUpdates, Public
from protocol import (
    Codec,
    Delete,
    Expect,
    Forward,
    PermissionDenied,
    PointerNotResolved,
    RemoteError,
    published_id,
)
from tests.conftest import bounded

TRANSPORTS = ["virtual", "ws", "tcp"]
CLUSTER = "policy-tests-cluster-secret"
CREDENTIALS = Credentials.derived(CLUSTER)

#: The private matrix (its values are distinctive, to look for them in errors and logs).
DATA = torch.tensor([[3.25, -1.5, 7.75, 2.0], [0.5, 4.25, -2.0, 9.5]])
#: Datasets that release nothing but model updates, and nothing at all.
PRIVATE = ["mu/x", "none/x"]
PUBLIC = "open/x"
TRAIN_X = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.25, -0.5], [-1.0, 2.0, 0.75], [0.0, 1.0, 1.0]])
TRAIN_Y = torch.tensor([[1.0], [-2.0], [0.5], [3.0]])


def secret_of(identity: str) -> str:
    return derive_secret(CLUSTER, identity)


class Site:
    """bob (publishing its data) and eve over one transport: the worker objects (server side)
    and a handle to each connected as "me"."""

    def __init__(self, transport: str) -> None:
        self.transport = transport
        self.workers: dict[str, actors.Worker] = {}
        self.handles: dict[str, actors.RemoteWorker] = {}
        self._closers: list[Callable[[], Awaitable[None]]] = []

    async def start(self, worker_id: str) -> actors.RemoteWorker:
        options: dict[str, Any] = {"credentials": CREDENTIALS, "secret": secret_of(worker_id)}
        handle: actors.RemoteWorker
        if self.transport == "virtual":
            virtual = actors.VirtualWorker(worker_id, local_secret=secret_of("me"), **options)
            self._closers.append(virtual.close)
            self.workers[worker_id] = virtual.worker
            handle = virtual
        else:
            server = await actors.serve(actors.Worker(worker_id, **options), self.transport)
            self._closers.append(server.close)
            self.workers[worker_id] = server.worker
            handle = await actors.connect(server.address, identity="me", secret=secret_of("me"))
            self._closers.append(handle.close)
        self.handles[worker_id] = handle
        return handle

    @property
    def bob(self) -> actors.RemoteWorker:
        return self.handles["bob"]

    @property
    def eve(self) -> actors.RemoteWorker:
        return self.handles["eve"]

    def address(self, worker_id: str) -> str:
        return self.workers[worker_id].address

    async def connect(self, worker_id: str) -> actors.RemoteWorker:
        """One more link to ``worker_id`` as "me"."""
        client = await actors.connect(
            self.address(worker_id), identity="me", secret=secret_of("me"), timeout=5.0
        )
        self._closers.append(client.close)
        return client

    def mine(self, tensor: torch.Tensor) -> PointerTensor:
        """A tensor of the leader's own on bob."""
        return actors.send(tensor, self.bob)

    async def close(self) -> None:
        for close in reversed(self._closers):
            await close()


@pytest.fixture(params=TRANSPORTS)
async def site(request: pytest.FixtureRequest) -> AsyncIterator[Site]:
    site = Site(str(request.param))
    try:
        async with asyncio.timeout(10):
            bob = await site.start("bob")
            await site.start("eve")
        worker = site.workers["bob"]
        worker.publish("mu/x", DATA.clone(), releases=[ModelUpdates()])
        worker.publish("none/x", DATA.clone())
        worker.publish(PUBLIC, DATA.clone(), releases=[Public()])
        updates = [ModelUpdates()]  # one declaration for the dataset's two tensors
        worker.publish("train/x", TRAIN_X.clone(), releases=updates)
        worker.publish("train/y", TRAIN_Y.clone(), releases=updates)
        worker.publish("closed/x", TRAIN_X.clone())
        worker.publish("closed/y", TRAIN_Y.clone())
        assert bob.id == "bob"
        yield site
    finally:
        async with asyncio.timeout(10):
            await site.close()


# -- helpers ----------------------------------------------------------------------------------
def published_values(site: Site) -> dict[str, torch.Tensor]:
    store = site.workers["bob"].store
    return {name: store.objects[published_id(name)] for name in (*PRIVATE, PUBLIC)}


async def assert_intact(site: Site) -> None:
    """bob still holds every dataset, unchanged, as its own."""
    await site.bob.ping()
    store = site.workers["bob"].store
    for name, value in published_values(site).items():
        assert store.owners[published_id(name)] == "bob", name
        assert torch.equal(value, DATA), (name, value)
    assert torch.equal(store.objects[published_id("train/x")], TRAIN_X)
    assert torch.equal(store.objects[published_id("train/y")], TRAIN_Y)


async def assert_unreadable(pointer: Any, what: str) -> None:
    """Neither a copy nor the value itself reaches the leader."""
    with pytest.raises(PermissionDenied, match="may not"):
        await pointer.fetch()
    with pytest.raises(PermissionDenied, match="may not"):
        await pointer.get()
    assert what


def holds_data(worker: actors.Worker) -> bool:
    """Whether ``worker`` holds a tensor holding every one of the private values."""
    flat = set(DATA.flatten().tolist())
    return any(
        isinstance(value, torch.Tensor)
        and value.is_floating_point()
        and flat <= set(value.detach().flatten().tolist())
        for value in worker.store.objects.values()
    )


async def settle(*handles: actors.RemoteWorker) -> None:
    gc.collect()
    await asyncio.sleep(0)
    for handle in handles:
        await handle.ping()


# -- every derived path stays on bob ----------------------------------------------------------
def _setitem(p: PointerTensor, site: Site) -> PointerTensor:
    t = site.mine(torch.zeros(2, 4))
    t[0] = p[0]
    return t


def _out(p: PointerTensor, site: Site) -> PointerTensor:
    t = site.mine(torch.zeros(2, 4))
    torch.add(t, p, out=t)
    return t


def _through_alias(p: PointerTensor, site: Site) -> PointerTensor:
    t = site.mine(torch.zeros(2, 4))
    v = t.view(-1)
    v.copy_(p.reshape(-1))
    return t


def _through_data(p: PointerTensor, site: Site) -> PointerTensor:
    t = site.mine(torch.zeros(2, 4))
    t.data.copy_(p)
    return t


def _in_place(op: str, *extra: Any) -> Callable[[PointerTensor, Site], PointerTensor]:
    """``t.<op>(p, *extra)``; with ``extra`` naming "p" (and "index"), those are the arguments."""

    def attack(p: PointerTensor, site: Site) -> PointerTensor:
        t = site.mine(torch.zeros(2, 4))
        if "p" in extra:
            named = {"p": p, "index": site.mine(torch.tensor([1, 0]))}
            getattr(t, op)(*(named.get(a, a) if isinstance(a, str) else a for a in extra))
        else:
            getattr(t, op)(p, *extra)
        return t

    return attack


def _module(trick: str) -> Callable[[PointerTensor, Site], PointerTensor]:
    def attack(p: PointerTensor, site: Site) -> PointerTensor:
        model = actors.send(torch.nn.Linear(4, 2), site.bob)
        weight = model.weight
        if trick == "copy":  # a parameter that requires grad refuses in-place writes: unless...
            weight.requires_grad_(False)
            weight.copy_(p)
        elif trick == "data":
            weight.data.copy_(p)
        elif trick == "detach":
            weight.detach().copy_(p)
        elif trick == "bias":
            model.bias.requires_grad_(False)
            model.bias.copy_(p[1, 2:])
            return model.bias
        return weight

    return attack


def _grad_of_product(p: PointerTensor, site: Site) -> PointerTensor:
    w = site.mine(torch.ones(2, 4, requires_grad=True))
    (w * p).sum().backward()
    return w.grad  # d/dw sum(w * p) = p


def _grad_set_then_step(zero_grad: bool, optimizer: type[torch.optim.Optimizer] = torch.optim.SGD) -> Any:
    def attack(p: PointerTensor, site: Site) -> PointerTensor:
        w = site.mine(torch.zeros(2, 4, requires_grad=True))
        w.grad = p
        actors.RemoteOptimizer(optimizer, [w], lr=1.0).step(zero_grad=zero_grad)
        return w  # w - 1.0 * p

    return attack


def _moved(p: PointerTensor, site: Site) -> PointerTensor:
    return (p + 0).move(site.eve)


PATHS: dict[str, Callable[[PointerTensor, Site], Any]] = {
    "p + 0": lambda p, s: p + 0,
    "p * 1": lambda p, s: p * 1,
    "0 + p": lambda p, s: 0 + p,
    "p.sum()": lambda p, s: p.sum(),
    "torch.add(p, 0)": lambda p, s: torch.add(p, 0),
    "p + mine": lambda p, s: p + s.mine(torch.zeros(2, 4)),
    "p.clone()": lambda p, s: p.clone(),
    "p[:]": lambda p, s: p[:],
    "p[0]": lambda p, s: p[0],
    "p[0, 1]": lambda p, s: p[0, 1],
    "p.view(-1)": lambda p, s: p.view(-1),
    "p.t()": lambda p, s: p.t(),
    "p.T": lambda p, s: p.T,
    "p.detach()": lambda p, s: p.detach(),
    "p.data": lambda p, s: p.data,
    "p.contiguous()": lambda p, s: p.contiguous(),
    "p.float()": lambda p, s: p.float(),
    "p.reshape(-1)": lambda p, s: p.reshape(-1),
    "p.unbind()[0]": lambda p, s: p.unbind(0)[0],
    "torch.split(p)[1]": lambda p, s: torch.split(p, 1)[1],
    "torch.cat([p])": lambda p, s: torch.cat([p]),
    "torch.where(c, p, 0)": lambda p, s: torch.where(s.mine(torch.ones(2, 4, dtype=torch.bool)), p, 0.0),
    "p.sort()": lambda p, s: p.sort(),
    "p.item()": lambda p, s: p[0, 0].item(),
    "p.sum().item()": lambda p, s: p.sum().item(),
    "p.tolist()": lambda p, s: p.tolist(),
    "p.max()": lambda p, s: p.max(),
    "p.max(dim=1).indices": lambda p, s: p.max(dim=1)[1],
    "t.copy_(p)": _in_place("copy_"),
    "t.add_(p)": _in_place("add_"),
    "t += p": _in_place("__iadd__"),
    "t.lerp_(p, 1)": _in_place("lerp_", 1.0),
    "t.index_add_(0, i, p)": _in_place("index_add_", 0, "index", "p"),
    "t[0] = p[0]": _setitem,
    "torch.add(t, p, out=t)": _out,
    "v = t.view(-1); v.copy_(p); t": _through_alias,
    "t.data.copy_(p); t": _through_data,
    "module weight.copy_(p)": _module("copy"),
    "module weight.data.copy_(p)": _module("data"),
    "module weight.detach().copy_(p)": _module("detach"),
    "module bias.copy_(p[1, 2:])": _module("bias"),
    "(p + 0).move(eve)": _moved,
    "p.move(eve)": lambda p, s: p.move(s.eve),
    "(w * p).sum().backward(); w.grad": _grad_of_product,
    "w.grad = p; SGD step": _grad_set_then_step(False),
    "w.grad = p; SGD step with zero_grad": _grad_set_then_step(True),
    "w.grad = p; Adam step with zero_grad": _grad_set_then_step(True, torch.optim.Adam),
}


@pytest.mark.parametrize("path", list(PATHS))
@bounded()
async def test_no_derived_path_lets_private_data_leave(site: Site, path: str) -> None:
    for name in PRIVATE:
        result = PATHS[path](site.bob.published(name), site)
        await assert_unreadable(result, f"{path} of {name}")
        del result
    await settle(site.bob, site.eve)
    assert not holds_data(site.workers["eve"])
    await assert_intact(site)


@pytest.mark.parametrize("name", PRIVATE)
@bounded()
async def test_a_model_loaded_with_private_data_cannot_be_fetched(site: Site, name: str) -> None:
    model = actors.send(torch.nn.Linear(4, 2), site.bob)
    model.weight.data.copy_(site.bob.published(name))
    with pytest.raises(PermissionDenied):
        await actors.get(model)
    await assert_intact(site)


@pytest.mark.parametrize("name", PRIVATE)
@bounded()
async def test_errors_on_private_data_do_not_quote_it(
    site: Site, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="aiosyft")
    logger = logging.getLogger("aiosyft")
    if not logger.propagate:  # the CLI's configure() keeps aiosyft's events to itself
        logger.addHandler(caplog.handler)
    p = site.bob.published(name)
    table = site.mine(torch.arange(4.0))
    failing = {
        "take out of range": torch.take(table, (p * 1111).long()),  # index 3611 on 4 elements
        "gather out of range": torch.gather(table, 0, (p.reshape(-1) * 1111).long()),
        "index out of range": table[(p * 1111).long()],
        "one_hot of negatives": F.one_hot((p * 1111).long()),
        "cholesky-free inverse": torch.inverse(p[:, :2] * 0),  # singular: the message has no values
    }
    quoted = {f"{v:g}" for v in (DATA * 1111).long().flatten().tolist()} | {"3611", "8610", "10554"}
    for what, result in failing.items():
        with pytest.raises(RemoteError) as raised:
            await result
        message = str(raised.value)
        assert "details withheld" in message, (what, message)
        assert not any(q in message for q in quoted), (what, message)
    logger.removeHandler(caplog.handler)
    for record in caplog.records:
        assert not any(q in record.getMessage() for q in quoted)
    await assert_intact(site)


# -- data-dependent shapes ----------------------------------------------------------------------
SHAPE_DEPENDENT: dict[str, Callable[[PointerTensor, Site], PointerTensor]] = {
    "torch.nonzero(p > c)": lambda p, s: torch.nonzero(p > 2.5),
    "p[p > c]": lambda p, s: p[p > 2.5],
    "torch.unique(p)": lambda p, s: torch.unique(p),
    "torch.masked_select(p, p > c)": lambda p, s: torch.masked_select(p, p > 2.5),
    "torch.where(p > c)[0]": lambda p, s: torch.where(p > 2.5)[0],
    "a mask from the data": lambda p, s: s.mine(torch.arange(8.0))[(p > 2.5).reshape(-1)],
    "repeat_interleave by the data": lambda p, s: torch.repeat_interleave(
        s.mine(torch.ones(8)), p.reshape(-1).abs().long()
    ),
    "derived from a nonzero": lambda p, s: torch.nonzero(p > 2.5).float() * 2,
    "unique counts": lambda p, s: torch.unique(p.round(), return_counts=True)[1],
    "one_hot's width": lambda p, s: F.one_hot(p.abs().long()),
}


@pytest.mark.parametrize("path", list(SHAPE_DEPENDENT))
@bounded()
async def test_a_shape_that_depends_on_private_values_is_not_learnable(site: Site, path: str) -> None:
    for name in PRIVATE:
        result = SHAPE_DEPENDENT[path](site.bob.published(name), site)
        await result  # it exists...
        with pytest.raises(PointerNotResolved):
            _ = result.shape  # ...but its shape is not told
        with pytest.raises(PointerNotResolved):
            len(result)
        await assert_unreadable(result, path)
    # the shape of a public dataset's count is no secret
    public = SHAPE_DEPENDENT[path](site.bob.published(PUBLIC), site)
    await public
    assert isinstance(public.shape, torch.Size)
    await assert_intact(site)


SIZE_FROM_VALUES: dict[str, Callable[[PointerTensor, Site], PointerTensor]] = {
    "t.new_zeros(k)": lambda k, s: call(s.bob, "Tensor.new_zeros", [s.mine(torch.zeros(1)), [k]]),
    "t.expand(k)": lambda k, s: s.mine(torch.zeros(1)).expand(k),
    "t.repeat(k)": lambda k, s: s.mine(torch.zeros(1)).repeat(k),
    "torch.narrow(t, 0, 0, k)": lambda k, s: torch.narrow(s.mine(torch.zeros(20)), 0, 0, k),
    "torch.diff(t, n=k)": lambda k, s: torch.diff(s.mine(torch.zeros(20)), n=k),
}


@pytest.mark.parametrize("path", list(SIZE_FROM_VALUES))
@bounded()
async def test_a_size_taken_from_private_values_is_not_learnable(site: Site, path: str) -> None:
    k = site.bob.published("none/x")[0, 2].long()  # 7
    result = SIZE_FROM_VALUES[path](k, site)
    await result
    with pytest.raises(PointerNotResolved):
        _ = result.shape


# -- writing into the data, deleting it ---------------------------------------------------------
def _writes(p: PointerTensor, site: Site) -> dict[str, Any]:
    t = site.mine(torch.ones(2, 4))
    return {
        "p.add_(1)": p.add_(1),
        "p += 1": call(site.bob, "Tensor.__iadd__", [p, 1]),
        "p.view(-1).add_(1)": p.view(-1).add_(1),
        "p.contiguous().add_(1)": p.contiguous().add_(1),
        "p.float().add_(1)": p.float().add_(1),
        "p.detach().add_(1)": p.detach().add_(1),
        "p.data.add_(1)": p.data.add_(1),
        "p.t().mul_(0)": p.t().mul_(0),
        "p[0].zero_()": p[0].zero_(),
        "p[:, 1:].fill_(0)": p[:, 1:].fill_(0),
        "p.unbind()[0].zero_()": p.unbind(0)[0].zero_(),
        "torch.split(p)[0].zero_()": torch.split(p, 1)[0].zero_(),
        "torch.atleast_2d(p).zero_()": torch.atleast_2d(p).zero_(),
        "p[0] = 0": call(site.bob, "Tensor.__setitem__", [p, 0, 0.0]),
        "p.copy_(t)": p.copy_(t),
        "torch.add(t, 1, out=p)": torch.add(t, 1, out=p),
        "torch.add(t, 1, out=p.view(-1))": torch.add(t.view(-1), 1, out=p.view(-1)),
        "F.relu(p, inplace=True)": F.relu(p, inplace=True),
        "F.hardtanh(p, 0, 1, True)": F.hardtanh(p, 0.0, 1.0, True),
        "p.requires_grad_()": p.requires_grad_(),
        "p.grad = t": call(site.bob, "Tensor.set_grad", [p, t]),
        "SGD step on p": call(site.bob, "optim.sgd_step", [[p]], {"lr": 1.0}),
        "an optimizer over p": call(
            site.bob, "Optimizer.step", [call(site.bob, "optim.SGD", [[p]], {"lr": 1.0})]
        ),
        "clip_grad_norm_ on p": call(site.bob, "nn.utils.clip_grad_norm_", [[p], 0.1]),
    }


@pytest.mark.parametrize("name", [*PRIVATE, PUBLIC])
@bounded()
async def test_published_data_cannot_be_written_through_any_alias(site: Site, name: str) -> None:
    for what, result in _writes(site.bob.published(name), site).items():
        with pytest.raises(PermissionDenied, match="may not"):
            await result
        await assert_intact(site)
        assert what


@bounded()
async def test_reusing_a_view_s_id_does_not_detach_it_from_the_data(site: Site) -> None:
    p = site.bob.published("none/x")
    d = p.view(-1)
    site.bob.connection.command(d.id, "Tensor.view", [d, -1], None)  # d := d.view(-1)
    written = d.add_(100)
    with pytest.raises(PermissionDenied):
        await written
    await assert_intact(site)


@bounded()
async def test_reusing_a_view_s_id_does_not_unlabel_what_shares_its_storage(site: Site) -> None:
    p = site.bob.published("none/x")
    t = site.mine(torch.zeros(8))
    v = t.view(-1)
    site.bob.connection.command(v.id, "Tensor.view", [v, -1], None)  # v := v.view(-1)
    v.copy_(p.reshape(-1))
    with pytest.raises(PermissionDenied):
        leaked = await t.get()
        assert not torch.equal(leaked, DATA.reshape(-1)), "t came back holding the private data"


@pytest.mark.parametrize("form", ["tuple", "list"])
@bounded()
async def test_a_tuple_holding_the_data_does_not_hand_out_a_writable_alias(site: Site, form: str) -> None:
    p = site.bob.published("none/x")
    t = site.mine(torch.zeros(2, 4))
    both = call(site.bob, "torch.atleast_1d", [p, t] if form == "tuple" else [[p, t]])
    written = both[0].add_(1000)
    with pytest.raises(PermissionDenied):
        await written
    await assert_intact(site)


@bounded()
async def test_published_data_cannot_be_deleted(site: Site) -> None:
    bob = site.bob
    for name in [*PRIVATE, PUBLIC]:
        pointer = await bob.published(name)
        assert pointer.shape == DATA.shape  # its shape is public
        del pointer  # a dropped pointer's batched DELETE
        gc.collect()
        bob.connection.release(published_id(name))  # an explicit one
        conn = bob.connection
        conn.flush()
        conn.transport.write(Codec().encode(Delete(conn.next_id(), conn.local_id, [published_id(name)])))
    await settle(bob)
    await assert_intact(site)
    for name in PRIVATE:  # and it still serves: its shape, computations on it
        assert (await bob.published(name)).shape == DATA.shape
    assert torch.equal(await (bob.published(PUBLIC) * 2).get(), DATA * 2)


# -- forwards ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", PRIVATE)
@bounded()
async def test_private_data_is_not_forwarded_to_a_worker_the_leader_controls(site: Site, name: str) -> None:
    bob, eve = site.bob, site.eve
    moves = [
        bob.published(name).move(eve),
        (bob.published(name) + 0).move(eve),
        bob.published(name)[1].move(eve),
        (bob.published(name) * 1).move(eve).move(bob),  # and back: still refused
    ]
    for moved in moves:
        with pytest.raises(PermissionDenied):
            await moved
        with pytest.raises(PermissionDenied):
            await moved.get()
    # by hand, as a move (release) to an id announced from bob
    new_id = new_object_id()
    eve.connection.tell(Expect(eve.connection.next_id(), "me", [new_id], "bob"))
    await eve.ping()
    conn = bob.connection
    conn.tell(Forward(conn.next_id(), "me", [published_id(name)], "eve", site.address("eve"), [new_id], True))
    with pytest.raises(PermissionDenied):
        await PointerTensor(eve, new_id).get()
    await settle(bob, eve)
    assert not holds_data(site.workers["eve"])
    await assert_intact(site)


@pytest.mark.parametrize("name", PRIVATE)
@bounded()
async def test_a_forward_cannot_send_private_data_to_an_address_under_another_name(
    site: Site, name: str
) -> None:
    """Naming bob itself as the destination (what bob holds may stay with bob) with eve's
    address is refused outright, and naming another worker is checked against who answers."""
    bob, eve = site.bob, site.eve
    conn = bob.connection
    conn.tell(
        Forward(conn.next_id(), "me", [published_id(name)], "bob", site.address("eve"), [new_object_id()])
    )
    await bob.ping()
    assert any(isinstance(e, PermissionDenied) and "itself" in str(e) for e in conn.protocol_errors)
    public = new_object_id()  # even data anyone may see goes only to the worker it was meant for
    conn.tell(Forward(conn.next_id(), "me", [published_id(PUBLIC)], "alice", site.address("eve"), [public]))
    await bob.ping()
    await asyncio.sleep(0.2)
    await settle(bob, eve)
    assert public not in site.workers["eve"].store.objects
    assert not holds_data(site.workers["eve"])
    await assert_intact(site)


# -- the declared releases work ---------------------------------------------------------------
@bounded()
async def test_public_data_and_everything_derived_from_it_can_be_fetched(site: Site) -> None:
    bob, eve = site.bob, site.eve
    assert torch.equal(await bob.published(PUBLIC).fetch(), DATA)
    assert torch.equal(await bob.published(PUBLIC).get(), DATA)  # the owner's data is not dropped
    assert torch.equal(await (bob.published(PUBLIC) * 2 + 1).get(), DATA * 2 + 1)
    assert torch.equal(await bob.published(PUBLIC).view(-1).get(), DATA.view(-1))
    assert await bob.published(PUBLIC)[1, 3].item().get() == DATA[1, 3].item()
    t = site.mine(torch.zeros(2, 4))
    t.copy_(bob.published(PUBLIC))
    assert torch.equal(await t.get(), DATA)
    nonzero = torch.nonzero(bob.published(PUBLIC) > 2.5)
    await nonzero
    assert nonzero.shape == torch.nonzero(DATA > 2.5).shape
    assert torch.equal(await nonzero.get(), torch.nonzero(DATA > 2.5))
    assert torch.equal(await bob.published(PUBLIC).move(eve).get(), DATA)
    await assert_intact(site)


@bounded(30)
async def test_model_updates_release_a_trained_model_and_its_loss_and_nothing_else(site: Site) -> None:
    bob = site.bob
    torch.manual_seed(0)
    reference = torch.nn.Linear(3, 1)
    model = torch.nn.Linear(3, 1)
    model.load_state_dict(reference.state_dict())
    actors.send(model, bob)
    x, y = bob.published("train/x"), bob.published("train/y")
    optimizer = actors.RemoteOptimizer(torch.optim.SGD, list(model.parameters()), lr=0.1)
    losses = []
    for _ in range(2):
        loss = F.mse_loss(model(x), y)
        loss.backward()
        optimizer.step(zero_grad=True)
        losses.append(loss)
    # the same two steps here
    local = torch.optim.SGD(reference.parameters(), lr=0.1)
    expected = []
    for _ in range(2):
        local_loss = F.mse_loss(reference(TRAIN_X), TRAIN_Y)
        local_loss.backward()
        local.step()
        local.zero_grad()
        expected.append(local_loss.detach())
    for got, want in zip(losses, expected, strict=True):
        torch.testing.assert_close(await got.get(), want)
    await actors.get(model)
    torch.testing.assert_close(model.weight.detach(), reference.weight.detach())
    torch.testing.assert_close(model.bias.detach(), reference.bias.detach())
    # parameters sent as plain tensors, fetched with their gradients still on them: the
    # gradients of a training loss are part of the update
    w = actors.send(torch.zeros(3, 1, requires_grad=True), bob)
    loss = F.mse_loss(x @ w, y)
    loss.backward()
    actors.RemoteOptimizer(torch.optim.SGD, [w], lr=0.1).step()
    local_w = torch.zeros(3, 1, requires_grad=True)
    local_loss = F.mse_loss(TRAIN_X @ local_w, TRAIN_Y)
    local_loss.backward()
    with torch.no_grad():
        local_w -= 0.1 * local_w.grad
    torch.testing.assert_close(await loss.get(), local_loss.detach())
    fetched = await w.get()
    torch.testing.assert_close(fetched.detach(), local_w.detach())
    torch.testing.assert_close(fetched.grad, local_w.grad)
    # what is not a model update stays
    product = x @ x.t()
    for raw in (x + 0, y.sum(), F.mse_loss(x, x + 1), F.mse_loss(product, product * 2)):
        await assert_unreadable(raw, "raw")
    await assert_intact(site)


PARAMETER_PATHS: dict[str, Callable[[PointerTensor, torch.nn.Module], PointerTensor]] = {
    "(weight * p).sum().backward(); weight.grad": lambda p, m: _backward_then(p, m, "grad"),
    "(weight * p).sum().backward(); SGD step; weight": lambda p, m: _backward_then(p, m, "step"),
    "bias.requires_grad_(False).copy_(p); bias": lambda p, m: _alias_of_parameter(p, m, "requires_grad_"),
    "bias.contiguous().copy_(p); bias": lambda p, m: _alias_of_parameter(p, m, "contiguous"),
}


def _backward_then(p: PointerTensor, model: torch.nn.Module, then: str) -> PointerTensor:
    (model.weight * p).sum().backward()
    if then == "grad":
        return model.weight.grad  # = p
    actors.RemoteOptimizer(torch.optim.SGD, [model.weight], lr=1.0).step(zero_grad=True)
    return model.weight  # = weight - p


def _alias_of_parameter(p: PointerTensor, model: torch.nn.Module, op: str) -> PointerTensor:
    model.bias.requires_grad_(False)
    getattr(model.bias, op)(*((False,) if op == "requires_grad_" else ())).copy_(p[1, 2:])
    return model.bias


@pytest.mark.parametrize("path", list(PARAMETER_PATHS))
@bounded()
async def test_what_flows_into_a_module_parameter_is_labelled(site: Site, path: str) -> None:
    model = actors.send(torch.nn.Linear(4, 2), site.bob)
    result = PARAMETER_PATHS[path](site.bob.published("none/x"), model)
    with pytest.raises(PermissionDenied):
        leaked = await result.get()
        assert leaked is None, f"{path} came back: {leaked}"


@bounded()
async def test_without_a_release_a_model_trained_on_the_data_stays(site: Site) -> None:
    model = torch.nn.Linear(3, 1)
    actors.send(model, site.bob)
    x, y = site.bob.published("closed/x"), site.bob.published("closed/y")
    F.mse_loss(model(x), y).backward()
    actors.RemoteOptimizer(torch.optim.SGD, list(model.parameters()), lr=0.1).step(zero_grad=True)
    with pytest.raises(PermissionDenied):
        await actors.get(model)


@bounded()
async def test_a_loss_of_the_data_itself_is_not_a_training_loss(site: Site) -> None:
    """A copy of the data made to require grad is a leaf, not a model's output: its loss stays
    raw. (A computation that only passes the data through, ``w * 0 + x``, cannot be told apart
    from a model: the release checks form, not content; the README says so.)"""
    q = site.bob.published("mu/x").clone().requires_grad_()
    loss = F.l1_loss(q, site.mine(torch.full((2, 4), -1000.0)), reduction="sum")
    with pytest.raises(PermissionDenied):
        await loss.get()


@bounded()
async def test_updates_released_to_anyone_carry_no_label_and_to_some_keep_theirs(site: Site) -> None:
    """A taint its owner lets go to anyone restricts nothing, so the store drops it where it
    arises (a walk then pays nothing for labels after each step); a release to named
    identities keeps its taint, and the trained model still cannot go anywhere else."""
    worker = site.workers["bob"]
    only_me = [ModelUpdates(to=["me"])]
    worker.publish("mine/x", TRAIN_X.clone(), releases=only_me)
    worker.publish("mine/y", TRAIN_Y.clone(), releases=only_me)
    trained = {}
    for dataset in ("train", "mine"):
        w = actors.send(torch.zeros(3, 1, requires_grad=True), site.bob)
        x, y = site.bob.published(f"{dataset}/x"), site.bob.published(f"{dataset}/y")
        loss = F.mse_loss(x @ w, y)
        loss.backward()
        actors.RemoteOptimizer(torch.optim.SGD, [w], lr=0.1).step(zero_grad=True)
        await w
        trained[dataset] = (w, loss)
    labels = worker.store.labels
    w, loss = trained["train"]
    assert w.id not in labels and loss.id not in labels
    w, loss = trained["mine"]
    assert {t.form for t in labels[w.id]} == {"update"} and {t.form for t in labels[loss.id]} == {"update"}
    torch.testing.assert_close(await loss.get(), await trained["train"][1].get())  # same data, same loss
    moved = w.move(site.eve)  # to "me" only: not to a worker the leader controls
    with pytest.raises(PermissionDenied):
        await moved.get()
    await assert_intact(site)
