"""Identities: a connection is one identity, and nothing sent on it acts as another.

Every scenario runs over the virtual, WebSocket and TCP transports. Worker "bob" holds objects of
the leader "me"; "mallory" is a second, authenticated client of the same worker (a valid
identity, just not "me") who knows the ids of me's objects. Whatever mallory sends (pointer
operations, or hand-made messages whose ``sender`` field says "me"), it is refused and me's
objects keep their values and their owner. "alice" is a second worker, for moves.

These tests build their own workers (rather than use ``make_worker``) because they connect to
each worker under several identities and inspect the worker object behind the network handle.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import torch

import actors
from actors.identity import Credentials, derive_secret
from actors.pointer import PointerTensor, call, new_object_id
from protocol import (
    AuthenticationFailed,
    Codec,
    Command,
    Delete,
    Expect,
    Forward,
    Get,
    GetMode,
    ObjectNotFound,
    PermissionDenied,
    Ping,
    Store,
    WorkerLost,
    ref_ext,
)
from tests.conftest import bounded

TRANSPORTS = ["virtual", "ws", "tcp"]
CLUSTER = "identity-tests-cluster-secret"
CREDENTIALS = Credentials.derived(CLUSTER)
#: me's tensor on bob in every scenario.
MINE = torch.tensor([1.5, -2.0, 3.25, 8.0])


def secret_of(identity: str) -> str:
    return derive_secret(CLUSTER, identity)


class Site:
    """Workers over one transport: the worker objects (server side), a handle to each connected
    as "me", and further clients under any identity."""

    def __init__(self, transport: str) -> None:
        self.transport = transport
        self.workers: dict[str, actors.Worker] = {}
        self.handles: dict[str, actors.RemoteWorker] = {}
        self._closers: list[Callable[[], Awaitable[None]]] = []

    async def start(self, worker_id: str, **options: Any) -> actors.RemoteWorker:
        options = {"credentials": CREDENTIALS, "secret": secret_of(worker_id), **options}
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

    def address(self, worker_id: str) -> str:
        return self.workers[worker_id].address

    async def client(self, worker_id: str, identity: str, secret: str | None = None) -> actors.RemoteWorker:
        """Another link to ``worker_id``, authenticated as ``identity``."""
        client = await actors.connect(
            self.address(worker_id), identity=identity, secret=secret or secret_of(identity), timeout=5.0
        )
        self._closers.append(client.close)
        return client

    async def close(self) -> None:
        for close in reversed(self._closers):
            await close()


@pytest.fixture(params=TRANSPORTS)
async def site(request: pytest.FixtureRequest) -> AsyncIterator[Site]:
    site = Site(str(request.param))
    try:
        async with asyncio.timeout(10):
            await site.start("bob", expect_timeout=1.5)
            await site.start("alice")
        yield site
    finally:
        async with asyncio.timeout(10):
            await site.close()


# -- helpers ----------------------------------------------------------------------------------
class Foreign(PointerTensor):
    """A pointer to an object its link's identity does not own; dropping it sends nothing (the
    DELETE a dropped pointer sends is tested on its own)."""

    def __del__(self) -> None:
        pass


def foreign(client: actors.RemoteWorker, obj_id: int) -> PointerTensor:
    return Foreign(client, obj_id)


def ask_raw(client: actors.RemoteWorker, message: Any) -> asyncio.Future[Any]:
    """Send one hand-made message on ``client``'s link; the answer to its ``msg_id``."""
    return client.connection.request_frame(Codec().encode(message), message.msg_id)


async def tell_raw(client: actors.RemoteWorker, message: Any) -> None:
    """Send one hand-made message that is not answered, and wait until the worker has read it."""
    client.connection.flush()
    client.connection.transport.write(Codec().encode(message))
    await client.ping()


async def mine_is_intact(site: Site, pointer: PointerTensor, value: torch.Tensor = MINE) -> None:
    """me's object still holds ``value``, still belongs to me, and me can still read it."""
    worker = site.workers["bob"]
    assert worker.store.owners.get(pointer.id) == "me"
    assert torch.equal(worker.store.objects[pointer.id], value)
    assert torch.equal(await pointer.fetch(), value)


def holds_value(worker: actors.Worker, value: torch.Tensor) -> bool:
    return any(
        isinstance(v, torch.Tensor) and v.shape == value.shape and torch.equal(v, value)
        for v in worker.store.objects.values()
    )


async def settle(*handles: actors.RemoteWorker) -> None:
    gc.collect()
    await asyncio.sleep(0)
    for handle in handles:
        await handle.ping()


# -- authentication -----------------------------------------------------------------------------
@bounded()
async def test_a_secret_proves_only_its_own_identity(site: Site) -> None:
    bob = site.handles["bob"]
    mine = actors.send(MINE, bob)
    sessions = (await bob.ping())["sessions"]
    wrong = {
        "mallory's secret": secret_of("mallory"),
        "bob's own secret": secret_of("bob"),
        "another cluster's": derive_secret("another-cluster", "me"),
        "a near miss": secret_of("me")[:-1] + ("0" if secret_of("me")[-1] != "0" else "1"),
    }
    for what, secret in wrong.items():
        with pytest.raises(AuthenticationFailed) as refused:
            await actors.connect(site.address("bob"), identity="me", secret=secret, timeout=5.0)
        assert secret not in str(refused.value), what
    with pytest.raises(AuthenticationFailed):
        await actors.connect(site.address("bob"), identity="me", secret=None, timeout=5.0)
    with pytest.raises(AuthenticationFailed):  # "mallory" with me's secret is not mallory either
        await actors.connect(site.address("bob"), identity="mallory", secret=secret_of("me"), timeout=5.0)
    assert (await bob.ping())["sessions"] == sessions  # none of them opened a session

    mallory = await site.client("bob", "mallory")  # the right secret for the right identity
    assert (await mallory.ping())["id"] == "bob"
    assert mallory.connection.local_id == "mallory"
    await mine_is_intact(site, mine)


@bounded()
async def test_a_message_naming_another_sender_is_refused_and_changes_nothing(site: Site) -> None:
    bob, alice = site.handles["bob"], site.handles["alice"]
    mine = actors.send(MINE, bob)
    await mine
    mallory = await site.client("bob", "mallory")
    worker = site.workers["bob"]
    before = dict(worker.store.owners)
    alice_before = dict(site.workers["alice"].store.owners)
    conn = mallory.connection
    fresh = [new_object_id() for _ in range(4)]
    spoofed = {
        "GET copy": Get(conn.next_id(), "me", mine.id, GetMode.COPY),
        "GET release": Get(conn.next_id(), "me", mine.id, GetMode.RELEASE),
        "GET meta": Get(conn.next_id(), "me", mine.id, GetMode.META),
        "DELETE": Delete(conn.next_id(), "me", [mine.id]),
        "STORE over it": Store(conn.next_id(), "me", mine.id, torch.zeros(4)),
        "STORE new": Store(conn.next_id(), "me", fresh[0], torch.zeros(4)),
        "COMMAND using it": Command(conn.next_id(), "me", fresh[1], "Tensor.clone", [ref_ext(mine.id)]),
        "COMMAND over it": Command(conn.next_id(), "me", mine.id, "torch.zeros_like", [ref_ext(mine.id)]),
        "COMMAND in place": Command(conn.next_id(), "me", fresh[2], "Tensor.zero_", [ref_ext(mine.id)]),
        "FORWARD": Forward(conn.next_id(), "me", [mine.id], "alice", site.address("alice"), [fresh[3]]),
        "EXPECT": Expect(conn.next_id(), "me", [fresh[3]], "alice"),
        "PING": Ping(conn.next_id(), "me"),
    }
    for what, message in spoofed.items():
        with pytest.raises(PermissionDenied, match="mallory") as refused:
            await ask_raw(mallory, message)
        assert "send a message as 'me'" in str(refused.value), what
    await settle(bob, alice)
    assert dict(worker.store.owners) == before
    assert dict(site.workers["alice"].store.owners) == alice_before
    assert not worker.dispatch.arrivals
    await mine_is_intact(site, mine)
    del mine


@bounded()
async def test_another_identity_cannot_read_my_objects(site: Site) -> None:
    bob = site.handles["bob"]
    mine = actors.send(MINE, bob)
    await mine
    mallory = await site.client("bob", "mallory")
    theirs = foreign(mallory, mine.id)
    with pytest.raises(PermissionDenied, match="mallory may not: read an object of me"):
        await theirs.fetch()
    with pytest.raises(PermissionDenied, match="mallory may not"):
        await theirs  # not even its shape
    for mode in (GetMode.COPY, GetMode.RELEASE, GetMode.META):
        with pytest.raises(PermissionDenied):
            await ask_raw(mallory, Get(mallory.connection.next_id(), "mallory", mine.id, mode))
    with pytest.raises(PermissionDenied):
        await foreign(mallory, mine.id).get()  # RELEASE: refused, and nothing dropped
    await mine_is_intact(site, mine)


@bounded()
async def test_another_identity_cannot_delete_my_objects(site: Site) -> None:
    bob = site.handles["bob"]
    mine = actors.send(MINE, bob)
    await mine
    mallory = await site.client("bob", "mallory")
    PointerTensor(mallory, mine.id).__del__()  # a dropped pointer's batched DELETE
    mallory.connection.release(mine.id)  # and an explicit one
    with pytest.raises(PermissionDenied, match="delete an object of me"):
        await ask_raw(mallory, Delete(mallory.connection.next_id(), "mallory", [mine.id]))
    await settle(mallory, bob)
    await mine_is_intact(site, mine)


@bounded()
async def test_another_identity_cannot_overwrite_my_objects(site: Site) -> None:
    bob = site.handles["bob"]
    mine = actors.send(MINE, bob)
    await mine
    mallory = await site.client("bob", "mallory")
    conn = mallory.connection
    hers = actors.send(torch.full((4,), 666.0), mallory)
    await hers
    for store in (
        Store(conn.next_id(), "mallory", mine.id, torch.zeros(4)),  # as her own object
        Store(conn.next_id(), "mallory", mine.id, torch.zeros(4), "me"),  # on me's behalf
        Store(conn.next_id(), "mallory", mine.id, torch.zeros(4), "bob"),  # as bob's own data
    ):
        await tell_raw(mallory, store)
        await mine_is_intact(site, mine)
    # A COMMAND whose result id is me's object, in every form that names it.
    with pytest.raises(PermissionDenied, match="replace an object of me"):
        await ask_raw(
            mallory, Command(conn.next_id(), "mallory", mine.id, "Tensor.clone", [ref_ext(hers.id)])
        )
    conn.command(mine.id, "Tensor.clone", [ref_ext(hers.id)], None)
    conn.command(mine.id, "torch.zeros_like", [ref_ext(hers.id)], None)
    await settle(mallory)
    await mine_is_intact(site, mine)
    # Writing into it in place, through an operation or through ``out=``.
    theirs = foreign(mallory, mine.id)
    for attempt in (
        theirs.add_(1),
        theirs.copy_(hers),
        theirs.zero_(),
        torch.add(hers, 1, out=theirs),
        call(mallory, "Tensor.__setitem__", [theirs, 0, hers[0]]),
    ):
        with pytest.raises(PermissionDenied, match="mallory may not"):
            await attempt
    await mine_is_intact(site, mine)
    assert torch.equal(await hers.get(), torch.full((4,), 666.0))


@bounded()
async def test_another_identity_cannot_move_my_objects(site: Site) -> None:
    bob = site.handles["bob"]
    mine = actors.send(MINE, bob)
    await mine
    mallory = await site.client("bob", "mallory")
    mallory_at_alice = await site.client("alice", "mallory")
    moved = foreign(mallory, mine.id).move(mallory_at_alice)
    with pytest.raises(PermissionDenied, match="move an object of me"):
        await moved
    PointerTensor(mallory_at_alice, moved.id)  # its Failure at alice is mallory's: let it go
    # by hand, releasing it (a move, not a copy) and to an id mallory did not announce
    conn = mallory.connection
    with pytest.raises(PermissionDenied, match="move an object of me"):
        await ask_raw(
            mallory,
            Forward(conn.next_id(), "mallory", [mine.id], "alice", site.address("alice"), [new_object_id()]),
        )
    del moved
    await settle(mallory, mallory_at_alice, bob)
    assert not holds_value(site.workers["alice"], MINE)
    await mine_is_intact(site, mine)


@bounded()
async def test_another_identity_cannot_use_my_objects_in_commands(site: Site) -> None:
    bob = site.handles["bob"]
    mine = actors.send(MINE, bob)
    index = actors.send(torch.tensor([0, 2]), bob)
    await mine
    mallory = await site.client("bob", "mallory")
    hers = actors.send(torch.ones(4), mallory)
    leaf = actors.send(torch.ones(4, requires_grad=True), mallory)
    theirs, their_index = foreign(mallory, mine.id), foreign(mallory, index.id)
    attempts = {
        "positional": theirs + 1,
        "reflected": 1 - theirs,
        "both": torch.add(hers, theirs),
        "nested in a list": torch.cat([hers, theirs]),
        "nested in a tuple": torch.stack((hers, theirs)),
        "as an index": hers[their_index],
        "as a keyword": call(mallory, "torch.add", [hers], {"other": theirs}),
        "as a gradient": call(mallory, "Tensor.set_grad", [leaf, theirs]),
        "as optimizer parameters": call(mallory, "optim.sgd_step", [[theirs]], {"lr": 1.0}),
        "in an optimizer": call(mallory, "optim.SGD", [[theirs]], {"lr": 1.0}),
        "copied from": hers.copy_(theirs),
        "where": torch.where(hers > 0, theirs, hers),
    }
    for what, result in attempts.items():
        with pytest.raises(PermissionDenied, match="mallory may not: use an object of me"):
            await result
        assert what
    await mine_is_intact(site, mine)
    assert torch.equal(await hers.get(), torch.ones(4))  # hers was not written by the refused copy
    assert torch.equal(await index.fetch(), torch.tensor([0, 2]))


# -- announcements and stores on another's behalf ---------------------------------------------
@bounded()
async def test_a_store_naming_another_owner_is_not_accepted_without_their_announcement(site: Site) -> None:
    bob, alice = site.handles["bob"], site.handles["alice"]
    worker = site.workers["bob"]
    mallory = await site.client("bob", "mallory")
    conn = mallory.connection
    forged = torch.full((4,), 666.0)

    # 1. An id me never announced: not stored (at most held, unclaimed, for an announcement).
    unannounced = new_object_id()
    await tell_raw(mallory, Store(conn.next_id(), "mallory", unannounced, forged, "me"))
    assert unannounced not in worker.store.objects
    with pytest.raises(ObjectNotFound):
        await PointerTensor(bob, unannounced).fetch()

    # 2. An id me announced from alice: only alice may deliver it; mallory's STORE is refused...
    real = actors.send(MINE, alice)
    arriving = new_object_id()
    bob.connection.tell(Expect(bob.connection.next_id(), "me", [arriving], "alice"))
    await bob.ping()
    with pytest.raises(PermissionDenied, match="mallory may not: deliver an object me announced from alice"):
        await ask_raw(mallory, Store(conn.next_id(), "mallory", arriving, forged, "me"))
    with pytest.raises(PermissionDenied, match="deliver an object me announced"):  # nor as her own
        await ask_raw(mallory, Store(conn.next_id(), "mallory", arriving, forged))
    # ...and alice's delivery, when it comes, is what me gets.
    alice.connection.tell(
        Forward(alice.connection.next_id(), "me", [real.id], "bob", site.address("bob"), [arriving])
    )
    real._released = True
    delivered = PointerTensor(bob, arriving)
    assert torch.equal(await delivered.fetch(), MINE)
    assert worker.store.owners[arriving] == "me"

    # 3. A STORE held before me's announcement is checked against it when it comes: refused.
    early = new_object_id()
    await tell_raw(mallory, Store(conn.next_id(), "mallory", early, forged, "me"))
    real2 = actors.send(MINE * 2, alice)
    await real2
    bob.connection.tell(Expect(bob.connection.next_id(), "me", [early], "alice"))
    await bob.ping()
    assert early not in worker.store.objects
    alice.connection.tell(
        Forward(alice.connection.next_id(), "me", [real2.id], "bob", site.address("bob"), [early])
    )
    real2._released = True
    delivered_early = PointerTensor(bob, early)
    assert torch.equal(await delivered_early.fetch(), MINE * 2)
    assert worker.store.owners[early] == "me"

    # 4. An id me announced from mallory herself: that is how a peer delivers (accepted).
    from_her = new_object_id()
    bob.connection.tell(Expect(bob.connection.next_id(), "me", [from_her], "mallory"))
    await bob.ping()
    await tell_raw(mallory, Store(conn.next_id(), "mallory", from_her, forged, "me"))
    assert torch.equal(await PointerTensor(bob, from_her).get(), forged)

    await settle(alice)
    assert not holds_value(worker, forged)


@bounded()
async def test_an_announced_id_cannot_be_taken_by_a_command_of_another_identity(site: Site) -> None:
    bob, alice = site.handles["bob"], site.handles["alice"]
    worker = site.workers["bob"]
    mallory = await site.client("bob", "mallory")
    real = actors.send(MINE, alice)
    await real
    arriving = new_object_id()
    bob.connection.tell(Expect(bob.connection.next_id(), "me", [arriving], "alice"))
    await bob.ping()
    hers = actors.send(torch.full((4,), 666.0), mallory)
    mallory.connection.command(arriving, "Tensor.clone", [ref_ext(hers.id)], None)  # parked
    await mallory.ping()
    alice.connection.tell(
        Forward(alice.connection.next_id(), "me", [real.id], "bob", site.address("bob"), [arriving])
    )
    real._released = True
    await alice.ping()
    for _ in range(50):  # until alice's delivery is in
        if arriving not in worker.dispatch.arrivals:
            break
        await asyncio.sleep(0.01)
    await settle(mallory, bob)
    assert worker.store.owners.get(arriving) == "me"
    assert torch.equal(await PointerTensor(bob, arriving).get(), MINE)


@bounded()
async def test_a_held_forward_cannot_be_displaced_by_another_identity(site: Site) -> None:
    bob, alice = site.handles["bob"], site.handles["alice"]
    worker = site.workers["bob"]
    mallory = await site.client("bob", "mallory")
    real = actors.send(MINE, alice)
    await real
    arriving = new_object_id()
    # alice's delivery outruns me's announcement (they travel on different links)
    alice.connection.tell(
        Forward(alice.connection.next_id(), "me", [real.id], "bob", site.address("bob"), [arriving])
    )
    real._released = True
    await alice.ping()
    for _ in range(100):
        if (arriving, "alice") in worker.dispatch.unclaimed:
            break
        await asyncio.sleep(0.01)
    assert (arriving, "alice") in worker.dispatch.unclaimed
    await tell_raw(mallory, Store(mallory.connection.next_id(), "mallory", arriving, torch.zeros(4), "me"))
    bob.connection.tell(Expect(bob.connection.next_id(), "me", [arriving], "alice"))
    assert torch.equal(await PointerTensor(bob, arriving).get(), MINE)


# -- effects of another identity's computation ------------------------------------------------
@bounded()
async def test_another_identitys_backward_does_not_touch_my_tensors(site: Site) -> None:
    bob = site.handles["bob"]
    site.workers["bob"].publish("private/x", torch.tensor([1.0, 2.0, 3.0, 4.0]))
    weights = actors.send(MINE.clone().requires_grad_(), bob)
    await weights
    mallory = await site.client("bob", "mallory")
    hers = actors.send(torch.ones(4, requires_grad=True), mallory)
    (hers * mallory.published("private/x")).sum().backward()
    await mallory.ping()
    assert torch.equal(await weights.fetch(), MINE)


# -- credentials ------------------------------------------------------------------------------
@bounded()
async def test_credentials_never_appear_in_errors_or_logs(
    site: Site, caplog: pytest.LogCaptureFixture
) -> None:
    logger = logging.getLogger("aiosyft")
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="aiosyft")
    if not logger.propagate:  # the CLI's configure() keeps aiosyft's events to itself
        logger.addHandler(caplog.handler)
    try:
        secrets = {CLUSTER, *(secret_of(i) for i in ("me", "mallory", "bob", "alice", "nobody"))}
        errors: list[str] = []
        for identity, secret in (
            ("me", secret_of("mallory")),
            ("nobody", secret_of("nobody") + "x"),
            ("mallory", secret_of("alice")),
            ("bob", secret_of("me")),
        ):
            with pytest.raises(AuthenticationFailed) as refused:
                await actors.connect(site.address("bob"), identity=identity, secret=secret, timeout=5.0)
            errors += [str(refused.value), repr(refused.value)]
        # refusals of an authenticated client, a worker dialling a peer, their errors
        bob = site.handles["bob"]
        mine = actors.send(MINE, bob)
        await mine
        mallory = await site.client("bob", "mallory")
        for attempt in (foreign(mallory, mine.id).fetch(), foreign(mallory, mine.id) + 1):
            with pytest.raises(PermissionDenied) as refused:
                await attempt
            errors.append(str(refused.value))
        with pytest.raises(PermissionDenied) as refused:
            await ask_raw(mallory, Ping(mallory.connection.next_id(), "me"))
        errors.append(str(refused.value))
        moved = actors.send(MINE, site.handles["alice"]).move(bob)  # alice dials bob with her secret
        assert torch.equal(await moved.get(), MINE)
        errors += [repr(h) for h in (*site.handles.values(), mallory)]
        errors += [repr(w) + str(w.status()) for w in site.workers.values()]
        await settle(bob)
    finally:
        logger.removeHandler(caplog.handler)
    logged = caplog.text + "".join(str(r.__dict__) for r in caplog.records)
    assert caplog.records, "the refusals were logged"
    for secret in secrets:
        assert secret not in logged
        assert not any(secret in error for error in errors)
    del mine


@bounded()
async def test_a_refused_connection_leaves_the_worker_serving_everyone(site: Site) -> None:
    bob = site.handles["bob"]
    mine = actors.send(MINE, bob)
    for _ in range(3):
        with pytest.raises(AuthenticationFailed):
            await actors.connect(site.address("bob"), identity="me", secret="guess", timeout=5.0)
    mallory = await site.client("bob", "mallory")
    hers = actors.send(torch.ones(2), mallory)
    assert torch.equal(await (hers * 3).get(), torch.full((2,), 3.0))
    assert torch.equal(await (mine * 2).get(), MINE * 2)
    await mine_is_intact(site, mine)
    with pytest.raises(WorkerLost):  # a closed client is gone, and so is only it
        await mallory.close()
        await mallory.ping()
    assert torch.equal(await mine.get(), MINE)
