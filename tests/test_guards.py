"""Guards for features whose breaking once left the whole suite green.

Each test here fails when its one feature breaks, checked against something the project does not
compute itself: FedAvg against a plain PyTorch loop written below, the remote SGD step against
``torch.optim.SGD``, the freeing of dropped pointers by looking at the worker's own store, the
reply timeout against a worker that never answers, the allowlist against torch's process-global
switches, and worker-to-worker moves by counting the bytes the leader's links carry.
"""

from __future__ import annotations

import asyncio
import copy
import gc
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import msgpack
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from aiohttp import web
from torch import nn

import actors
from actors.pointer import ObjectPointer, call

# Importing privacy.federated registers the train command set: part of what a worker serves.
from privacy.federated import FederatedDataset, Settings, publish_shard, train_fedavg
from protocol import CommandNotAllowed, WorkerLost
from protocol.allowlist import COMMANDS
from tests.conftest import CREDENTIALS, bounded, connect_as, plain_fedavg, secret_of, worker_in_hand

NETWORK = ["ws", "tcp"]


# -- 1. FedAvg averages by shard size ----------------------------------------------------------
def _toy(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=generator)
    y = x @ torch.tensor([[2.0], [-1.0], [0.5]]) + 0.3 + 0.1 * torch.randn(n, 1, generator=generator)
    return x, y


def _seeded_mlp(seed: int) -> nn.Sequential:
    """A small MLP initialised from its own generator (the global RNG is left alone)."""
    model = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 1))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=generator))
    return model


@bounded(30)
async def test_fedavg_equals_a_plain_pytorch_loop_weighted_by_shard_size() -> None:
    """Three virtual workers holding 36, 9 and 3 rows: the average must weight them 36:9:3.
    The same loop averaging them equally gives a clearly different model, so a FedAvg that
    ignored the shard sizes (or swapped them between workers) cannot pass."""
    x, y = _toy(48, seed=21)
    shards = [
        (x[:36].clone(), y[:36].clone()),
        (x[36:45].clone(), y[36:45].clone()),
        (x[45:].clone(), y[45:].clone()),
    ]
    sizes = [len(sx) for sx, _ in shards]
    options = Settings(epochs=2, lr=0.05, batch_size=4, seed=5, hidden=(6,))
    rounds = 3
    workers: list[actors.VirtualWorker] = []
    try:
        for k, (sx, sy) in enumerate(shards):
            worker_id = f"guard-owner{k}"
            worker = actors.VirtualWorker(
                worker_id, local_secret=secret_of("me"), credentials=CREDENTIALS, secret=secret_of(worker_id)
            )
            workers.append(worker)
            publish_shard(worker.worker, "guard", sx, sy)
        dataset = await FederatedDataset.from_workers(list(workers), "guard")
        assert [shard.size for shard in dataset.shards] == sizes
        trained = _seeded_mlp(seed=13)
        history = await train_fedavg(trained, dataset, options, rounds=rounds)
        del dataset
    finally:
        for worker in workers:
            await worker.close()

    hand = {
        "epochs": options.epochs,
        "lr": options.lr,
        "batch_size": options.batch_size,
        "seed": options.seed,
    }
    weighted, unweighted = _seeded_mlp(seed=13), _seeded_mlp(seed=13)
    expected_losses = plain_fedavg(weighted, shards, [s / sum(sizes) for s in sizes], rounds=rounds, **hand)
    plain_fedavg(unweighted, shards, [1 / len(sizes)] * len(sizes), rounds=rounds, **hand)

    ours, by_size, equal = trained.state_dict(), weighted.state_dict(), unweighted.state_dict()
    gap = max((by_size[name] - equal[name]).abs().max().item() for name in by_size)
    assert gap > 1e-2, "the shards must be uneven enough for an unweighted mean to show"
    for name, value in by_size.items():
        assert torch.allclose(ours[name], value, rtol=1e-5, atol=1e-6), (
            name,
            (ours[name] - value).abs().max(),
        )
    assert history.epoch_loss == pytest.approx(expected_losses, rel=1e-6, abs=1e-9)


# -- 2. weight decay in the remote SGD step ------------------------------------------------------
def _sgd_round(model: nn.Module, x: Any, y: Any, optimizer: Any, *, fused_zero_grad: bool) -> Any:
    """One training step, written once for a local model and a remote one."""
    if not fused_zero_grad:
        optimizer.zero_grad()
    loss = F.mse_loss(model(x), y)
    loss.backward()
    if fused_zero_grad:
        optimizer.step(zero_grad=True)
    else:
        optimizer.step()
    return loss


@bounded(30)
@pytest.mark.parametrize("fused_zero_grad", [False, True], ids=["step", "step-zero-grad"])
async def test_remote_sgd_with_weight_decay_equals_torch_sgd(bob, fused_zero_grad) -> None:
    """Plain SGD with ``weight_decay`` runs as the stateless ``optim.sgd_step``; four steps must
    give exactly ``torch.optim.SGD(weight_decay=...)``'s weights, which differ from the weights
    without decay (so a step that dropped the decay fails)."""
    generator = torch.Generator().manual_seed(3)
    x, y = torch.randn(16, 4, generator=generator), torch.randn(16, 2, generator=generator)
    hyper = {"lr": 0.1, "weight_decay": 0.3}
    start = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))
    local, no_decay = copy.deepcopy(start), copy.deepcopy(start)
    remote = actors.send(copy.deepcopy(start), bob)
    optimizer = actors.RemoteOptimizer(torch.optim.SGD, remote.parameters(), **hyper)
    assert optimizer._stateless, "SGD with lr and weight_decay must take the stateless remote step"
    xp, yp = actors.send(x, bob), actors.send(y, bob)
    local_opt = torch.optim.SGD(local.parameters(), **hyper)
    plain_opt = torch.optim.SGD(no_decay.parameters(), lr=hyper["lr"])
    remote_losses, local_losses = [], []
    for _ in range(4):
        local_losses.append(_sgd_round(local, x, y, local_opt, fused_zero_grad=False).item())
        _sgd_round(no_decay, x, y, plain_opt, fused_zero_grad=False)
        remote_losses.append(_sgd_round(remote, xp, yp, optimizer, fused_zero_grad=fused_zero_grad))
    values = await asyncio.gather(*(loss.get() for loss in remote_losses))
    await actors.get(remote)
    assert [v.item() for v in values] == local_losses
    for got, expected, undecayed in zip(
        remote.parameters(), local.parameters(), no_decay.parameters(), strict=True
    ):
        assert torch.equal(got.detach(), expected.detach()), (got - expected).abs().max()
        assert (expected - undecayed).abs().max() > 1e-3, "weight decay must change the weights here"
    del xp, yp, optimizer


@bounded(20)
async def test_the_sgd_step_wire_op_decays_the_weights(bob) -> None:
    """``optim.sgd_step`` on one parameter with a known gradient: ``p - lr * (g + wd * p)``."""
    p0, g = torch.tensor([1.0, -2.0, 4.0]), torch.tensor([0.5, 0.5, -1.0])
    p = actors.send(p0.clone().requires_grad_(True), bob)
    grad = actors.send(g, bob)
    call(bob, "Tensor.set_grad", [p, grad], None, ObjectPointer)
    step = call(bob, "optim.sgd_step", [[p]], {"lr": 0.25, "weight_decay": 0.5}, ObjectPointer)
    await step
    got = await p.get()
    expected = torch.optim.SGD([q := p0.clone().requires_grad_(True)], lr=0.25, weight_decay=0.5)
    q.grad = g.clone()
    expected.step()
    assert torch.equal(got.detach(), q.detach())
    assert torch.equal(got.detach(), p0 - 0.25 * (g + 0.5 * p0))
    del grad, step


# -- 3. dropped pointers are freed without waiting for the next message --------------------------
async def _until(condition: Callable[[], bool], seconds: float) -> bool:
    """Poll ``condition`` for up to ``seconds``, sending nothing."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.005)
    return True


@bounded(20)
@pytest.mark.parametrize("transport", ["virtual", *NETWORK])
async def test_a_dropped_pointer_is_freed_with_nothing_else_sent(transport) -> None:
    """The leader sends nothing after dropping the pointers; the worker's own store must still
    empty: the batched DELETE leaves by itself on the next turn of the event loop."""
    async with worker_in_hand(transport, "guard-freed") as (bob, actor):
        pointers = [actors.send(torch.full((4,), float(i)), bob) for i in range(3)]
        await asyncio.gather(*(p.resolve() for p in pointers))
        assert len(actor.store) == 3
        await asyncio.sleep(0)  # nothing of the pings' turn is pending any more
        written: list[int] = []
        write = bob.connection.transport.write

        def recorded(frame: Any) -> None:
            written.append(len(frame))
            write(frame)

        bob.connection.transport.write = recorded
        del pointers
        gc.collect()
        assert await _until(lambda: len(actor.store) == 0, 3.0), f"{len(actor.store)} objects still held"
        assert len(written) == 1, "the deletes go in one frame, and nothing else is sent"
        del bob.connection.transport.write


# -- 4. connect(reply_timeout=...) declares a silent worker lost ---------------------------------
async def _silent_tcp_server() -> tuple[asyncio.Server, str]:
    """Accepts the TCP handshake like a worker, then never answers anything."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        size = int.from_bytes(await reader.readexactly(4), "little")
        await reader.readexactly(size)
        answer = msgpack.packb({"ok": True, "id": "silent"})
        writer.write(len(answer).to_bytes(4, "little") + answer)
        await writer.drain()
        try:
            while await reader.read(1 << 16):  # read everything, answer nothing
                pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, f"tcp://127.0.0.1:{server.sockets[0].getsockname()[1]}"


async def _silent_ws_server() -> tuple[web.AppRunner, str]:
    """Upgrades to WebSocket like a worker, then never answers anything."""

    async def protocol(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for _ in ws:
            pass
        return ws

    app = web.Application()
    app.router.add_get("/ws", protocol)
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"ws://127.0.0.1:{runner.addresses[0][1]}"


REPLY_TIMEOUT = 0.3


@bounded(15)
@pytest.mark.parametrize("transport", NETWORK)
async def test_connect_to_a_worker_that_never_answers_fails_within_the_reply_timeout(transport) -> None:
    """The link comes up but no answer ever comes: with ``reply_timeout`` the connect's ping is
    declared lost after about that long, well before ``timeout`` (30 s). The outer bound makes
    a broken timeout fail here instead of hanging."""
    server: Any
    server, address = await (_silent_tcp_server() if transport == "tcp" else _silent_ws_server())
    try:
        started = time.monotonic()
        with pytest.raises(WorkerLost, match="did not answer"):
            async with asyncio.timeout(5):
                await actors.connect(
                    address, identity="me", secret="x", timeout=30, reply_timeout=REPLY_TIMEOUT
                )
        elapsed = time.monotonic() - started
        assert REPLY_TIMEOUT * 0.9 <= elapsed < REPLY_TIMEOUT + 2.0, elapsed
    finally:
        if isinstance(server, asyncio.Server):
            server.close()
            await server.wait_closed()
        else:
            await server.cleanup()


@bounded(15)
@pytest.mark.parametrize("transport", ["virtual", *NETWORK])
async def test_a_worker_that_stops_answering_is_lost_within_the_reply_timeout(transport) -> None:
    """A worker that answered the connect and then drops every message (its decoding stubbed
    out): the pointer awaited next raises WorkerLost after about ``reply_timeout``, and the
    link counts as lost afterwards."""
    async with worker_in_hand(transport, "guard-silent") as (_, actor):
        worker = await connect_as(actor, "me", reply_timeout=REPLY_TIMEOUT)
        try:
            x = actors.send(torch.ones(3), worker)
            await asyncio.wait_for(x.resolve(), 5)  # answers so far
            actor.decode = lambda session, frame: iter(())  # from now on, nothing is read
            started = time.monotonic()
            with pytest.raises(WorkerLost, match="did not answer"):
                async with asyncio.timeout(5):
                    await (x + 1).get()
            elapsed = time.monotonic() - started
            assert REPLY_TIMEOUT * 0.9 <= elapsed < REPLY_TIMEOUT + 2.0, elapsed
            assert worker.connection.lost is not None
            with pytest.raises(WorkerLost):
                x + 1
            del x
        finally:
            await worker.close()


# -- 5. no process-global switch is on the allowlist ---------------------------------------------
#: Callables in these torch modules that match GLOBAL_SETTERS change the whole worker process
#: (every sender's computations) rather than a tensor of the caller's.
_GLOBAL_MODULES = {
    "torch": torch,
    "torch.autograd": torch.autograd,
    "torch.autograd.grad_mode": torch.autograd.grad_mode,
    "torch.autograd.anomaly_mode": torch.autograd.anomaly_mode,
    "torch.autograd.graph": torch.autograd.graph,
    "torch.random": torch.random,
    "torch.backends.cudnn": torch.backends.cudnn,
    "torch.backends.mkldnn": torch.backends.mkldnn,
    "torch.backends.opt_einsum": torch.backends.opt_einsum,
    "torch.backends.cpu": torch.backends.cpu,
    "torch.nn.functional": F,
}
GLOBAL_SETTERS = re.compile(
    r"^(set_|use_deterministic|manual_seed$|seed$|fork_rng$|enable_grad$|no_grad$|inference_mode$"
    r"|detect_anomaly$|flags$|disable_saved_tensors_hooks$|saved_tensors_hooks$|save_on_cpu$)"
)
#: A wire name is suspect when any of its dotted parts looks like a global switch; the one
#: setter that only touches a tensor of the caller's is named here.
_WIRE_SUSPECT = re.compile(
    r"(^|\.)(set_(?!grad$)|use_|manual_seed$|seed$|fork_rng$|enable_grad$|no_grad$|inference_mode$"
    r"|grad_enabled|anomaly|deterministic|flush_denormal|num_threads|num_interop|printoptions"
    r"|default_dtype|default_device|default_tensor_type|matmul_precision|warn_always|rng_state|flags$)"
    r"|(^|\.)(autograd|backends|random|cuda|mps)\.",
    re.IGNORECASE,
)


def _global_setters() -> dict[int, str]:
    """id -> qualified name of every process-global setter torch has under the modules above."""
    found: dict[int, str] = {}
    for prefix, module in _GLOBAL_MODULES.items():
        wrapped = getattr(module, "m", None)  # torch.backends.* wrap their module; dir() hides its functions
        for name in {*dir(module), *(dir(wrapped) if wrapped is not None else ())}:
            if GLOBAL_SETTERS.match(name):
                fn = getattr(module, name, None)
                if callable(fn):
                    found.setdefault(id(fn), f"{prefix}.{name}")
    return found


def _served_surface() -> dict[str, Any]:
    """Wire name -> callable of everything a worker serves: the torch allowlist and every
    registered command set (the worker's own tables, so nothing is missed)."""
    worker = actors.Worker("guard-surface")
    surface: dict[str, Any] = dict(worker.dispatch.fast)
    surface.update({name: spec.fn for name, spec in worker.dispatch.commands.items()})
    return surface


def test_the_global_setter_list_knows_the_usual_suspects() -> None:
    """The scan below is only as good as what it finds: it must find these."""
    setters = _global_setters()
    for fn in (
        torch.set_grad_enabled,
        torch.manual_seed,
        torch.set_num_threads,
        torch.set_default_dtype,
        torch.set_default_device,
        torch.set_printoptions,
        torch.use_deterministic_algorithms,
        torch.autograd.set_detect_anomaly,
        torch.random.set_rng_state,
        torch.set_flush_denormal,
        torch.set_anomaly_enabled,
        torch.backends.mkldnn.set_flags,
    ):
        assert id(fn) in setters, fn


def test_no_served_command_is_a_process_global_switch() -> None:
    """By identity: no wire name, whatever it is called, runs one of torch's global setters."""
    setters = _global_setters()
    surface = _served_surface()
    assert set(COMMANDS) <= set(surface)
    leaked = {name: setters[id(fn)] for name, fn in surface.items() if id(fn) in setters}
    assert leaked == {}


def test_no_served_command_is_named_like_a_process_global_switch() -> None:
    """By name: catches wrappers that the identity check cannot see."""
    suspect = sorted(name for name in _served_surface() if _WIRE_SUSPECT.search(name))
    assert suspect == []
    assert _WIRE_SUSPECT.search("torch.set_grad_enabled") and not _WIRE_SUSPECT.search("Tensor.set_grad")


def _process_state() -> dict[str, Any]:
    """The process-global torch state a command could change, as comparable values."""
    keeps_denormals = bool((torch.tensor([1e-310], dtype=torch.float64) * 1.0).item() != 0.0)
    return {
        "grad_enabled": torch.is_grad_enabled(),
        "inference_mode": torch.is_inference_mode_enabled(),
        "num_threads": torch.get_num_threads(),
        "default_dtype": torch.get_default_dtype(),
        "default_device": str(torch.get_default_device()),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "deterministic_warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
        "anomaly": (torch.is_anomaly_enabled(), torch.is_anomaly_check_nan_enabled()),
        "rng": bytes(torch.random.get_rng_state().numpy()),
        "print_options": dict(vars(torch._tensor_str.PRINT_OPTS)),
        "matmul_precision": torch.get_float32_matmul_precision(),
        "denormals": keeps_denormals,
        "mkldnn": torch.backends.mkldnn.enabled,
        "opt_einsum": torch.backends.opt_einsum.enabled,
        "warn_always": torch.is_warn_always_enabled(),
    }


def _restore(state: dict[str, Any]) -> None:
    """Put back whatever a leaked command changed, so one failure does not poison later tests."""
    torch.set_grad_enabled(state["grad_enabled"])
    torch.set_num_threads(state["num_threads"])
    torch.set_default_dtype(state["default_dtype"])
    torch.set_default_device(None if state["default_device"] == "cpu" else state["default_device"])
    torch.use_deterministic_algorithms(state["deterministic"], warn_only=state["deterministic_warn_only"])
    torch.autograd.set_detect_anomaly(*state["anomaly"])
    torch.random.set_rng_state(torch.frombuffer(bytearray(state["rng"]), dtype=torch.uint8))
    torch.set_printoptions(**{k: v for k, v in state["print_options"].items() if k != "float_format"})
    torch.set_float32_matmul_precision(state["matmul_precision"])
    torch.set_flush_denormal(not state["denormals"])
    torch.backends.mkldnn.enabled = state["mkldnn"]
    torch.backends.opt_einsum.enabled = state["opt_einsum"]
    torch.set_warn_always(state["warn_always"])


@pytest.fixture
def process_state() -> Iterator[dict[str, Any]]:
    state = _process_state()
    try:
        yield state
    finally:
        if _process_state() != state:
            _restore(state)


def _probes(state: dict[str, Any], rng_state: Any) -> list[tuple[str, list[Any], dict[str, Any] | None]]:
    """Each global switch under the wire names it could be given, with arguments that would
    visibly change ``state`` if it ran."""
    calls: list[tuple[str, list[Any], dict[str, Any] | None]] = [
        ("set_grad_enabled", [not state["grad_enabled"]], None),
        ("manual_seed", [987654321], None),
        ("seed", [], None),
        ("set_num_threads", [state["num_threads"] + 1], None),
        ("set_default_dtype", [torch.float64], None),
        ("set_default_device", ["meta"], None),
        ("set_printoptions", [], {"precision": 1, "threshold": 3}),
        ("use_deterministic_algorithms", [not state["deterministic"]], None),
        ("set_detect_anomaly", [True], None),
        ("set_anomaly_enabled", [True], None),
        ("set_rng_state", [rng_state], None),
        ("set_flush_denormal", [state["denormals"]], None),
        (
            "set_float32_matmul_precision",
            ["medium" if state["matmul_precision"] != "medium" else "high"],
            None,
        ),
        ("set_flags", [not state["mkldnn"]], None),
        ("set_warn_always", [not state["warn_always"]], None),
    ]
    prefixes = ("torch.", "torch.autograd.", "torch.random.", "torch.backends.mkldnn.", "Tensor.", "F.", "")
    return [(prefix + name, args, kwargs) for name, args, kwargs in calls for prefix in prefixes]


@bounded(20)
async def test_global_switches_sent_to_a_worker_are_refused_and_change_nothing(bob, process_state) -> None:
    """Behaviourally: each switch, under every plausible wire name, with arguments that would
    change this process (where the worker runs) is CommandNotAllowed, and afterwards the
    process state is exactly what it was."""
    rng = actors.send(torch.zeros_like(torch.random.get_rng_state()), bob)
    probes = _probes(process_state, rng)
    pointers = [call(bob, op, list(args), kwargs) for op, args, kwargs in probes]
    outcomes = await asyncio.gather(*(p.resolve() for p in pointers), return_exceptions=True)
    ran = [
        op
        for (op, _, _), outcome in zip(probes, outcomes, strict=True)
        if not isinstance(outcome, CommandNotAllowed)
    ]
    assert ran == []
    assert (await bob.ping())["id"] == bob.id
    assert _process_state() == process_state
    del rng, probes, pointers, outcomes


# -- 6. move goes worker to worker -----------------------------------------------------------------
class _Traffic:
    """Bytes of the frames one leader link writes and receives: its transport's ``write`` and
    its codec's ``decode`` (every received frame passes through it) are wrapped."""

    def __init__(self, worker: actors.RemoteWorker) -> None:
        self.sent = 0
        self.received = 0
        connection = worker.connection
        write, decode = connection.transport.write, connection.codec.decode

        def counted_write(frame: Any) -> None:
            self.sent += memoryview(frame).nbytes
            write(frame)

        def counted_decode(frame: Any) -> Any:
            self.received += memoryview(frame).nbytes
            return decode(frame)

        connection.transport.write = counted_write
        connection.codec.decode = counted_decode

    @property
    def total(self) -> int:
        return self.sent + self.received


MOVED_BYTES = 16 << 20


@bounded(30)
@pytest.mark.parametrize("transport", NETWORK)
async def test_move_carries_the_tensor_worker_to_worker_not_through_the_leader(transport) -> None:
    """A 16 MiB tensor moved from bob to alice over real sockets: while it moves, the leader's
    two links carry a few hundred bytes of control messages, and alice then holds exactly the
    tensor. A move relayed through the leader (get, then send) would carry 32 MiB here."""
    tensor = torch.randn(MOVED_BYTES // 4, generator=torch.Generator().manual_seed(11))
    async with (
        worker_in_hand(transport, "guard-bob") as (bob, bob_actor),
        worker_in_hand(transport, "guard-alice") as (alice, alice_actor),
    ):
        x = actors.send(tensor, bob)
        await x  # the 16 MiB send itself is over before counting starts
        to_bob, to_alice = _Traffic(bob), _Traffic(alice)
        x.move(alice)
        assert x.location is alice
        await asyncio.wait_for(x.resolve(), 20)  # alice answers once the tensor is there
        assert len(bob_actor.store) == 0 and len(alice_actor.store) == 1
        leader_bytes = to_bob.total + to_alice.total
        assert leader_bytes < 64 << 10, f"the leader's links carried {leader_bytes} bytes during the move"
        assert [peer for peer, _ in bob_actor.peers] == [alice_actor.id], "bob dialled alice itself"
        assert x.shape == tensor.shape
        assert torch.equal(await x.get(), tensor)
        assert to_alice.received >= MOVED_BYTES  # the check itself brought it home: counting works
        assert len(alice_actor.store) == 0
