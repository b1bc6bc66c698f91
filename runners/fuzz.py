"""Hostile peers at scale: ``aiosyft fuzz`` sends a live worker 100k random and mutated frames
per transport and reports what, if anything, broke.

Why a script and not only a test: a test can afford a few thousand frames; bugs that need a
particular mutation, or state piling up over a long run (a buffer nobody empties), show up in
the hundred thousands. The test suite (``tests/test_soak_fuzz.py``, ``tests/test_fuzz.py``) runs
the same machinery on a short budget.

The arena: one worker served in this process over the chosen transport (in-process, so its
store, its policy log and its tasks can be inspected directly; a process boundary would only
hide what broke). On it:

* the worker publishes its own dataset (``data/x``), releasing only *shares* of it;
* a second identity, the **victim**, keeps tensors there, has shared the dataset between the
  worker and a second party (SPDZ shares, made by ``mpc.share_from``), and has a flow in
  progress (a ``share_from`` run waiting for a share that never comes);
* a legitimate client (``me``) keeps an object whose value it checks after every batch.

Then the **fuzzer**, a third identity with valid credentials of its own, attacks in two phases:

(a) *before authentication*, on fresh connections: random bytes and mutations of a real
    handshake (the TCP hello record, the WebSocket upgrade request, the virtual transport's
    identity and secret). A handshake that gets in with credentials that do not verify is an
    authentication bypass.
(b) *authenticated*, pipelined on one link (re-dialled whenever the worker closes it): frames
    captured from its own real session, mutated (bits flipped, bytes set, inserted, deleted,
    duplicated, cut, spliced), and messages Hypothesis builds, aimed at the victim's object,
    flow and share ids and at the published dataset.

How the fuzzer knows the victim's ids: the published id is *guessed* the way any peer can (it is
derived from the dataset's name, :func:`~protocol.published_id`); its own ids are *captured*
from its own traffic; the victim's random object, share and flow ids (62-bit, not guessable)
are handed to it, as if leaked (a log, a compromised leader). That is the worst case: the
worker must hold without relying on ids being secret. Random ids are thrown in too.

After every batch: the worker answers the fuzzing link and the legitimate client; the victim's
objects are untouched (same ids, owners, labels and values) and its flow still waits; no
session task died and nothing reached the event loop's exception handler; nothing the fuzzer
got back is one of the protected values. A reply missing past a timeout is a hang. Every
``PermissionDenied`` reply must match a refusal the owner logged (``Policy.refuse``), and the
log count must equal ``worker.policy.refusals``. Memory is the process's RSS after a forced gc
(baseline after a warm-up batch, a leak is growth beyond :data:`RSS_BOUND_MIB`), and the state
the worker keeps for the fuzzer once it has left (objects, early flow messages, sessions).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import dataclasses
import gc
import itertools
import json
import logging
import os
import random
import re
import resource
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import torch
from aiohttp.http_exceptions import HttpProcessingError
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from tqdm import tqdm

import actors
import mpc
from actors.flows import FLOW_OPTION
from actors.identity import Credentials, derive_secret, new_secret
from actors.pointer import call
from actors.virtual import VirtualTransport
from actors.ws import ID_HEADER
from protocol import (
    PROTOCOL_VERSION,
    Codec,
    Command,
    Delete,
    Error,
    Expect,
    Flow,
    Forward,
    Get,
    ObjRef,
    Ping,
    Reply,
    Store,
    SyftError,
    published_id,
)
from protocol.allowlist import COMMANDS
from protocol.codec import MAGIC, PREFIX, FrameBuilder

#: Identities. The fuzzer attacks; the victim is the other identity whose things it targets; the
#: peer is a second worker (a party to the victim's shares, and where the fuzzer's moves go).
FUZZER = "fuzzer"
PEER = "fuzz-peer"
VICTIM = "victim"
ME = "me"
TARGET = "fuzzed"
#: The legitimate client's tensor; the fuzzer must never change what it gives.
LEGIT = torch.tensor([[1.5, -2.0, 3.25], [0.5, 4.0, -1.0]])
#: The worker's own dataset (released only as shares to the two parties).
DATASET = "data/x"
SECRET = torch.tensor([[1.5, -2.25], [3.0, 0.125]])
#: Process RSS growth (after a forced gc, from the warm-up baseline to the end) that counts as a
#: leak. A 100k-frame run moves about 40 MB of frames; growth past this means something is kept.
RSS_BOUND_MIB = 64.0
#: Seconds one batch (sending it and the checks after it) may take: a batch takes milliseconds
#: to a second; past this a reply is missing, which is a hang.
HANG_TIMEOUT = 15.0
TRANSPORT_NAMES = ("virtual", "ws", "tcp")
#: What this fuzzer found in the runtime and is not fixed yet, each pinned by a strict xfail test
#: in ``tests/test_fuzz.py`` (named here): the pattern the finding's lines in a report match. The
#: reports still count them as failures; the short fuzz in the tests fails only on anything else,
#: and a fix turns its xfail test into a failure until the entry here is removed.
KNOWN_FINDINGS: dict[str, str] = {}


# -- frames from a real run -------------------------------------------------------------------
@contextlib.contextmanager
def recording(worker: actors.RemoteWorker) -> Iterator[list[bytes]]:
    """Every frame this link writes while inside, as bytes: the seeds of the mutations."""
    frames: list[bytes] = []
    transport = worker.connection.transport
    write = transport.write

    def recorded(frame: Any) -> None:
        frames.append(bytes(frame))
        write(frame)

    transport.write = recorded  # type: ignore[method-assign]
    try:
        yield frames
    finally:
        del transport.write


async def capture(
    fuzzer: actors.RemoteWorker, peer: actors.RemoteWorker
) -> tuple[list[bytes], list[actors.PointerTensor]]:
    """A small but real session of the fuzzing client: sends, commands (pipelined, failing,
    with keyword arguments and slices), gets of each mode, a move to a peer, deletes, pings.
    Returns the frames and the pointers still alive (their objects stay on the worker)."""
    with recording(fuzzer) as frames:
        t = torch.arange(6.0).reshape(2, 3)
        x = actors.send(t, fuzzer)
        w = actors.send(torch.tensor([1, 0, 2]), fuzzer)
        y = (x * 2 + 1).sum(dim=1)
        z = torch.add(x, y.unsqueeze(1))[:, 1:]
        await y.fetch()
        await z
        expected = torch.add(t, (t * 2 + 1).sum(dim=1).unsqueeze(1))[:, 1:]
        if not torch.equal(await z.get(), expected):
            raise AssertionError("the captured run computed a wrong value")
        bad = call(fuzzer, "torch.mm", [x, x])
        try:
            await bad
        except RuntimeError:
            pass
        else:
            raise AssertionError("mm of a 2x3 by itself should fail")
        moving = actors.send(torch.ones(2), fuzzer)
        moving.move(peer)
        if not torch.equal(await moving.get(), torch.ones(2)):
            raise AssertionError("the moved object came back changed")
        gathered = call(fuzzer, "torch.index_select", [x, 1, w])
        await gathered.resolve()
        await fuzzer.ping()
        del bad, z
        gc.collect()
        await asyncio.sleep(0)  # the batched DELETE leaves now, and is captured
        await fuzzer.ping()
    return frames, [x, w, y, gathered]


def virtual_peer(secret_of: Callable[[str], str], credentials: Credentials) -> actors.VirtualWorker:
    """A second worker the fuzzing client moves objects to (a FORWARD to capture); virtual, so
    that a mutated address can only ever name nothing. Its handle is the fuzzer's."""
    return actors.VirtualWorker(
        PEER, local_id=FUZZER, local_secret=secret_of(FUZZER), credentials=credentials, secret=secret_of(PEER)
    )


# -- mutations --------------------------------------------------------------------------------
#: Bytes that mean something to msgpack or to the frame prefix.
INTERESTING = [0x00, 0x01, 0x7F, 0x80, 0x90, 0x93, 0x9F, 0xC0, 0xC1, 0xC2, 0xC3, 0xC4, 0xC7, 0xCC, 0xCF,
               0xD0, 0xD3, 0xD4, 0xD8, 0xD9, 0xDC, 0xDD, 0xDE, 0xDF, 0xE0, 0xFF]  # fmt: skip
Mutation = tuple[str, int, Any]
mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 1 << 16), st.integers(0, 7)),
    st.tuples(st.just("set"), st.integers(0, 1 << 16), st.sampled_from(INTERESTING)),
    st.tuples(st.just("insert"), st.integers(0, 1 << 16), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("delete"), st.integers(0, 1 << 16), st.integers(1, 16)),
    st.tuples(st.just("duplicate"), st.integers(0, 1 << 16), st.integers(1, 32)),
    st.tuples(st.just("cut"), st.integers(0, 1 << 16), st.just(0)),
)


def random_mutation(rng: random.Random) -> Mutation:
    """One mutation as :data:`mutation` draws them, from a plain generator: the script makes
    hundreds of thousands, and Hypothesis's engine costs a millisecond a draw."""
    op = rng.choice(("flip", "set", "insert", "delete", "duplicate", "cut"))
    position = rng.randrange(1 << 16)
    if op == "flip":
        return op, position, rng.randrange(8)
    if op == "set":
        return op, position, rng.choice(INTERESTING)
    if op == "insert":
        return op, position, rng.randbytes(rng.randint(1, 8))
    if op == "delete":
        return op, position, rng.randint(1, 16)
    if op == "duplicate":
        return op, position, rng.randint(1, 32)
    return op, position, 0


def mutate(frame: bytes, mutations: list[Mutation], in_header: bool) -> bytes:
    """``frame`` with ``mutations`` applied in order, at positions taken modulo the header's end
    (``in_header``: where the structure is) or the frame's."""
    data = bytearray(frame)
    for op, position, arg in mutations:
        if not data:
            break
        end = len(data)
        if in_header and len(data) >= PREFIX.size:
            end = min(end, PREFIX.size + PREFIX.unpack_from(data)[4]) or end
        i = position % end
        if op == "flip":
            data[i] ^= 1 << arg
        elif op == "set":
            data[i] = arg
        elif op == "insert":
            data[i:i] = arg
        elif op == "delete":
            del data[i : i + arg]
        elif op == "duplicate":
            data[i:i] = data[i : i + arg]
        else:
            del data[i:]
    return bytes(data)


def mutate_randomly(rng: random.Random, corpus: list[bytes]) -> bytes:
    """A frame of ``corpus`` mutated as :func:`mutated_frames` would, from a plain generator."""
    frame = rng.choice(corpus)
    if rng.randrange(10) == 0:  # splice: the head of one frame on the tail of another
        other = rng.choice(corpus)
        return frame[: rng.randint(0, len(frame))] + other[rng.randint(0, len(other)) :]
    mutations = [random_mutation(rng) for _ in range(rng.randint(0, 4))]
    return mutate(frame, mutations, in_header=rng.randrange(5) > 0)


@st.composite
def mutated_frames(draw: st.DrawFn, corpus: list[bytes]) -> bytes:
    frame = draw(st.sampled_from(corpus))
    if draw(st.integers(0, 9)) == 0:  # splice: the head of one frame on the tail of another
        other = draw(st.sampled_from(corpus))
        return frame[: draw(st.integers(0, len(frame)))] + other[draw(st.integers(0, len(other))) :]
    mutations = draw(st.lists(mutation, min_size=0, max_size=4))
    return mutate(frame, mutations, in_header=draw(st.integers(0, 4)) > 0)


# -- messages Hypothesis builds ---------------------------------------------------------------
#: Operations for the messages Hypothesis builds: all take small arguments, so no random
#: argument can ask the worker for gigabytes (that is a resource limit, not what this tests).
OPS = sorted(
    op for op in COMMANDS
    if op.split(".")[-1] in {"add", "mul", "sub", "neg", "sum", "mean", "sigmoid", "relu", "t", "reshape",
                             "view", "getitem", "__getitem__", "index_select", "matmul", "float", "long",
                             "clone", "detach", "item", "tolist", "softmax", "add_", "zero_", "backward",
                             "requires_grad_", "cat", "stack", "where", "gather", "sgd_step", "zero_grad",
                             "grad", "set_grad", "clamp", "max", "argmax", "unsqueeze", "squeeze"}
)  # fmt: skip
#: Registered commands a hostile peer would aim at shares and flows (small arguments too).
MPC_OPS = [
    "mpc.share_from",
    "mpc.beaver",
    "mpc.truncate_shared",
    "mpc.encode",
    "mpc.decode",
    "mpc.truncate_share",
    "mpc.auth.key",
    "mpc.auth.material",
    "mpc.auth.local",
    "mpc.auth.add",
    "mpc.auth.add_public",
    "mpc.auth.mul_public",
    "mpc.auth.matmul_public",
    "mpc.auth.input",
    "mpc.auth.beaver",
    "mpc.auth.truncate",
    "mpc.auth.check",
    "mpc.auth.reveal",
    "provider.auth_key",
    "provider.auth_material",
]
small_tensors = st.builds(
    lambda values, dtype: torch.tensor(values, dtype=dtype),
    st.lists(st.floats(-4, 4, allow_nan=False, width=32), min_size=0, max_size=6),
    st.sampled_from([torch.float32, torch.float64, torch.int64, torch.bool]),
)


def structured(
    known_ids: list[int], flow_ids: list[int] | None = None, *, aborts: bool = True
) -> st.SearchStrategy[list[Any]]:
    """Messages of every kind a client sends, well formed but aimed anywhere: refs to objects
    that exist (some of them another identity's) or not, odd modes, owners and labels. With
    ``flow_ids``, FLOW messages into those runs too (``aborts``: with the reserved abort tag)."""
    ids = st.one_of(st.sampled_from(known_ids), st.integers(0, (1 << 64) - 1))
    leaves = st.one_of(
        st.integers(-3, 8), st.floats(-4, 4, allow_nan=False), st.booleans(), st.none(), st.text(max_size=4),
        ids.map(ObjRef), small_tensors, st.builds(slice, st.integers(-2, 3) | st.none(), st.integers(-2, 3)),
    )  # fmt: skip
    args = st.lists(st.recursive(leaves, lambda inner: st.lists(inner, max_size=3), max_leaves=6), max_size=4)
    kwargs = st.none() | st.dictionaries(
        st.sampled_from(["dim", "alpha", "lr", "out", "keepdim"]), leaves, max_size=2
    )
    msg_id, sender = st.integers(0, 1 << 40), st.sampled_from([FUZZER, FUZZER, FUZZER, ME, ""])
    labels = st.none() | st.lists(st.lists(st.text(max_size=6), max_size=3), max_size=2)
    kinds = [
        st.builds(Command, msg_id, sender, ids, st.sampled_from(OPS) | st.text(max_size=12), args, kwargs),
        st.builds(Store, msg_id, sender, ids, leaves, st.none() | st.sampled_from([ME, FUZZER, PEER]),
                  labels),
        st.builds(Get, msg_id, sender, ids, st.integers(-1, 3)),
        st.builds(Delete, msg_id, sender, st.lists(ids, min_size=1, max_size=4)),
        st.builds(Expect, msg_id, sender, st.lists(ids, max_size=3), st.sampled_from([PEER, ME, "nobody"])),
        st.builds(Forward, msg_id, sender, st.lists(ids, max_size=2), st.sampled_from([PEER, ME]),
                  st.sampled_from([f"virtual://{PEER}", "virtual://nobody", "nonsense"]),
                  st.lists(ids, max_size=2), st.booleans()),
        st.builds(Ping, msg_id, sender),
    ]  # fmt: skip
    if flow_ids:
        runs = st.one_of(st.sampled_from(flow_ids), st.integers(-(1 << 63), (1 << 64) - 1))
        tags = st.sampled_from(["share", "share", "!batch", *(["!abort"] if aborts else [])]) | st.text(
            max_size=6
        )
        party = st.sampled_from([TARGET, PEER])
        flow_kwargs = st.fixed_dictionaries(
            {"flow": st.tuples(runs, st.dictionaries(party, st.just(f"virtual://{PEER}"))).map(list)},
            optional={"owner": party, "parties": st.lists(party, max_size=3)},
        )
        kinds += [
            st.builds(Flow, msg_id, sender, runs, tags, leaves, labels),
            st.builds(Command, msg_id, sender, ids, st.sampled_from(MPC_OPS), args, flow_kwargs),
        ]
    return st.one_of(*kinds).map(lambda message: [message])


def encoded(messages: list[Any]) -> bytes | None:
    """The frame FrameBuilder makes of ``messages``; ``None`` where it refuses one (it only
    sends what it can encode, and that refusal is the codec's business, tested elsewhere)."""
    builder = FrameBuilder()
    try:
        for message in messages:
            builder.add(message)
        return bytes(builder.build())
    except Exception:
        return None


raw = st.one_of(
    st.binary(max_size=64),
    st.binary(max_size=48).map(lambda body: PREFIX.pack(MAGIC, PROTOCOL_VERSION, 0, 1, len(body)) + body),
)


def random_raw(rng: random.Random) -> bytes:
    """What :data:`raw` draws, from a plain generator."""
    if rng.randrange(2):
        return rng.randbytes(rng.randint(0, 64))
    body = rng.randbytes(rng.randint(0, 48))
    return PREFIX.pack(MAGIC, PROTOCOL_VERSION, 0, 1, len(body)) + body


def hypothesis_pool(strategy: st.SearchStrategy[Any], size: int, seed: int) -> list[Any]:
    """``size`` examples of ``strategy``, drawn by Hypothesis's engine with ``seed`` (the same
    pool every run with that seed). Drawn once and reused: a draw costs about a millisecond."""
    pool: list[Any] = []

    @hypothesis_seed(seed)
    @settings(
        max_examples=size,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def collect(example: Any) -> None:
        pool.append(example)

    collect()
    return pool


# -- liveness ---------------------------------------------------------------------------------
#: Message ids for the checks' pings, far above the fuzz's (hypothesis draws them below 2**40,
#: the captured frames' are the link's own small ones).
CHECK_IDS = itertools.count(1 << 62)


async def ping_past(fuzzer: actors.RemoteWorker, worker_id: str) -> None:
    """The worker answers the fuzzing link after everything it sent.

    The ping goes as a hand-made frame with a message id from far above anything the fuzz
    sends: a fuzzed message reusing the id of the link's own next question would otherwise
    have its error taken for that question's answer (the sender's confusion, not the worker's).
    """
    msg_id = next(CHECK_IDS)
    frame = Codec().encode(Ping(msg_id, fuzzer.connection.local_id))
    status = await fuzzer.connection.request_frame(frame, msg_id)
    if status["id"] != worker_id:
        raise AssertionError(f"the ping was answered by {status['id']!r}, not {worker_id!r}")


async def check_serving(
    actor: actors.Worker,
    fuzzer: actors.RemoteWorker,
    legit: actors.PointerTensor,
    loop_errors: list[dict[str, Any]],
) -> None:
    """The worker answers the fuzzing link (after everything it sent), the legitimate client's
    object is intact and computes the right value, and nothing died unhandled."""
    await ping_past(fuzzer, actor.id)
    assert fuzzer.connection.lost is None, fuzzer.connection.lost
    assert torch.equal(await (legit * 2 + 1).get(), LEGIT * 2 + 1)
    assert torch.equal(await legit.fetch(), LEGIT)
    assert all(not session.task.done() for session in actor.sessions), "a session task died"
    assert loop_errors == [], loop_errors[:3]


# -- the arena --------------------------------------------------------------------------------
class Keys:
    """A cluster secret and the credentials derived from it (every identity its own secret)."""

    def __init__(self, cluster: str | None = None) -> None:
        self.cluster = cluster or new_secret()
        self.credentials = Credentials.derived(self.cluster)

    def secret(self, identity: str) -> str:
        return derive_secret(self.cluster, identity)


class _RefusalLog:
    """Stands in for the policy's logger: counts (and keeps the text of) every refusal the owner
    logs, and passes every event on to the real logger."""

    def __init__(self, inner: Any, worker_id: str) -> None:
        self.inner = inner
        self.worker_id = worker_id
        self.texts: collections.Counter[str] = collections.Counter()
        self.count = 0

    def warning(self, event: str, **fields: Any) -> Any:
        if event == "refused":
            self.count += 1
            obj_id = fields.get("obj_id")
            what = f"object {obj_id:#x}" if obj_id is not None else "request"
            self.texts[
                f"{what} on {self.worker_id}: {fields.get('requester')} may not: {fields.get('rule')}"
            ] += 1
        return self.inner.warning(event, **fields)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@dataclasses.dataclass
class Tally:
    """What came back to the fuzzing link: error replies by kind, and values that leaked."""

    errors: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    denials: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    replies: int = 0
    #: The first few messages of each kind of error, to say what was refused.
    samples: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    leaked: list[str] = dataclasses.field(default_factory=list)


def _tensors_in(value: Any, depth: int = 0) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif depth < 4 and isinstance(value, list | tuple):
        for item in value:
            yield from _tensors_in(item, depth + 1)
    elif depth < 4 and isinstance(value, dict):
        for item in value.values():
            yield from _tensors_in(item, depth + 1)


def rss_mib() -> float:
    """This process's resident set size, in MiB (the worker lives in this process)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:  # not Linux: the peak is the best there is
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _ServerErrors(logging.Handler):
    """What aiohttp's server logs as an error while handling a request, bar what it means to
    log (a malformed request it answers 400, a peer gone before its answer): an exception that
    escaped the worker's request handler, answered 500."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.found: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError | ConnectionError):
            self.found.append(f"a request handler raised {exc!r} (HTTP 500)")


@contextlib.contextmanager
def _watching_aiohttp(errors: _ServerErrors) -> Iterator[None]:
    """Collect aiohttp's server errors instead of printing a traceback each."""
    logger = logging.getLogger("aiohttp.server")
    propagate = logger.propagate
    logger.addHandler(errors)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(errors)
        logger.propagate = propagate


@dataclasses.dataclass
class Arena:
    """A live worker, the identities around it, and the fuzzing link."""

    transport: str
    keys: Keys
    actor: actors.Worker
    server: actors.Server | None
    me: actors.RemoteWorker
    victim: actors.RemoteWorker
    victim_at_peer: actors.RemoteWorker
    peer: actors.VirtualWorker
    fuzzer: actors.RemoteWorker
    legit: actors.PointerTensor
    #: The victim's pointers (kept alive: their objects are the targets), the pending run's.
    victim_held: list[Any]
    flow_id: int
    flow_ids: list[int]
    #: Ids a hostile peer aims at: its own (captured), the published one (guessed), the
    #: victim's objects and shares (leaked).
    target_ids: list[int]
    #: The victim's object and share ids, and the published dataset's.
    victim_ids: list[int]
    corpus: list[bytes]
    fuzzer_held: list[actors.PointerTensor]
    loop_errors: list[dict[str, Any]]
    refusal_log: _RefusalLog
    tally: Tally
    #: The victim's objects as they were: id -> (owner, label, value).
    snapshot: dict[int, tuple[str, Any, Any]] = dataclasses.field(default_factory=dict)
    protected: list[torch.Tensor] = dataclasses.field(default_factory=list)
    reconnects: int = 0
    server_errors: _ServerErrors = dataclasses.field(default_factory=_ServerErrors)

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.actor.address.split("://", 1)[1].rpartition(":")
        return host, int(port)

    def take_snapshot(self) -> None:
        store = self.actor.store
        watched = [*store.ids_owned_by(VICTIM), published_id(DATASET)]
        self.snapshot = {
            obj_id: (store.owners[obj_id], store.labels.get(obj_id), _frozen(store.objects[obj_id]))
            for obj_id in watched
            if obj_id in store.objects
        }
        self.protected = [
            v for _, _, v in self.snapshot.values() if isinstance(v, torch.Tensor) and v.numel()
        ]

    def violations(self) -> list[str]:
        """How the victim's things differ from the snapshot, and whether its flow still waits."""
        store, found = self.actor.store, []
        now = {*store.ids_owned_by(VICTIM), published_id(DATASET)}
        runs = {p.id for held in self.victim_held if isinstance(held, dict) for p in held.values()}
        for obj_id in now - set(self.snapshot) - runs:  # a run's result: its flow line says why
            found.append(f"a new object {obj_id:#x} owned by {store.owners.get(obj_id)} appeared")
        for obj_id, (owner, label, value) in self.snapshot.items():
            if obj_id not in store.objects:
                found.append(f"the victim's object {obj_id:#x} is gone")
            elif store.owners.get(obj_id) != owner or store.labels.get(obj_id) != label:
                found.append(f"the victim's object {obj_id:#x} changed owner or label")
            elif not _same(_frozen(store.objects[obj_id]), value):
                found.append(f"the victim's object {obj_id:#x} changed value")
        waiting = self.actor.flows._waiting.get((self.flow_id, PEER, "share"))
        if waiting is None or waiting.done():
            aborted = self.actor.flows._aborted.get(self.flow_id)
            found.append(f"the victim's flow {self.flow_id:#x} stopped waiting ({aborted or 'no waiter'})")
        return found

    def restart_flow(self) -> None:
        """A new pending run for the victim, after the fuzzer ended the last one (recorded)."""
        self.flow_id = actors.new_object_id()
        self.flow_ids.append(self.flow_id)
        parties = {TARGET: self.actor.address, PEER: self.peer.address}
        options = {"owner": PEER, "parties": [TARGET, PEER], FLOW_OPTION: [self.flow_id, parties]}
        self.victim_held.append({self.victim: call(self.victim, "mpc.share_from", [], options)})


def _frozen(value: Any) -> Any:
    return value.detach().clone() if isinstance(value, torch.Tensor) else repr(value)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    return a == b


def _count_replies(arena: Arena) -> None:
    """Count what comes back on the fuzzing link; pass on only answers someone awaits (the
    checks' pings), so unsolicited errors do not pile up in the link's failure table."""
    connection = arena.fuzzer.connection
    on_message = connection._on_message
    tally = arena.tally

    def counted(message: Any) -> None:
        kind = type(message)
        if kind is Error:
            tally.errors[message.type_name] += 1
            samples = tally.samples.setdefault(message.type_name, [])
            if len(samples) < 3:
                samples.append(str(message.message)[:200])
            if message.type_name == "PermissionDenied":
                tally.denials[message.message] += 1
        elif kind is Reply:
            tally.replies += 1
            for tensor in _tensors_in(message.value):
                for secret in arena.protected:
                    if (
                        tensor.shape == secret.shape
                        and tensor.dtype == secret.dtype
                        and torch.equal(tensor, secret)
                    ):
                        tally.leaked.append(f"reply to {message.in_reply_to} carried a protected value")
        if kind in (Reply, Error) and message.in_reply_to in connection._pending:
            on_message(message)

    connection._on_message = counted  # type: ignore[method-assign]


def _publish(actor: actors.Worker) -> _RefusalLog:
    """The worker publishes its dataset (only shares of it may leave, to the two parties);
    its policy's log is watched from now on."""
    refusal_log = _RefusalLog(actor.policy.log, actor.id)
    actor.policy.log = refusal_log
    actor.publish(DATASET, SECRET, releases=[mpc.Shares(to=[TARGET, PEER])])
    return refusal_log


async def _victims_things(
    victim: actors.RemoteWorker, victim_at_peer: actors.RemoteWorker
) -> tuple[actors.PointerTensor, actors.PointerTensor, mpc.SharedTensor]:
    """The victim's tensor, one computed from it, and SPDZ shares of the worker's dataset
    between the worker and the peer (split where the data lives, by ``mpc.share_from``)."""
    x = actors.send(torch.tensor([[2.0, -1.0], [0.5, 3.0]]), victim)
    y = x @ x.t() + 1
    encoded_data = mpc.fix_precision(victim.published(DATASET))
    shared = mpc.share(encoded_data, victim, victim_at_peer, shape=(2, 2))
    for pointer in (x, y, *shared.shares):
        await pointer
    return x, y, shared


async def _dial(arena_actor: actors.Worker, identity: str, keys: Keys) -> actors.RemoteWorker:
    return await actors.connect(arena_actor.address, identity=identity, secret=keys.secret(identity))


@contextlib.asynccontextmanager
async def arena(transport: str, *, keys: Keys | None = None, grace: float = 0.5) -> AsyncIterator[Arena]:  # noqa: PLR0915 - one setup, read top to bottom
    """The worker, its published data, the victim's objects, shares and pending flow, the
    legitimate client and the fuzzer's captured session; everything closed on exit."""
    keys = keys or Keys()
    loop = asyncio.get_running_loop()
    loop_errors: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: loop_errors.append(context))
    options: dict[str, Any] = {
        "credentials": keys.credentials, "secret": keys.secret(TARGET), "grace": grace, "expect_timeout": 5.0,
    }  # fmt: skip
    server: actors.Server | None = None
    me: actors.RemoteWorker
    peer = virtual_peer(keys.secret, keys.credentials)
    closing: list[actors.RemoteWorker] = []
    try:
        if transport == "virtual":
            handle = actors.VirtualWorker(TARGET, local_id=ME, local_secret=keys.secret(ME), **options)
            me, actor = handle, handle.worker
        else:
            server = await actors.serve(actors.Worker(TARGET, **options), transport)
            actor = server.worker
            me = await _dial(actor, ME, keys)
        closing.append(me)
        refusal_log = _publish(actor)
        victim = await _dial(actor, VICTIM, keys)
        victim_at_peer = await actors.connect(
            f"virtual://{PEER}", identity=VICTIM, secret=keys.secret(VICTIM)
        )
        closing += [victim, victim_at_peer]
        fuzzer = await _dial(actor, FUZZER, keys)
        async with asyncio.timeout(HANG_TIMEOUT):
            x, y, shared = await _victims_things(victim, victim_at_peer)
            corpus, fuzzer_held = await capture(fuzzer, peer)
            legit = actors.send(LEGIT, me)
            await legit
        victim_ids = [published_id(DATASET), x.id, y.id, *(share.id for share in shared.shares)]
        the_arena = Arena(
            transport, keys, actor, server, me, victim, victim_at_peer, peer, fuzzer, legit, [x, y, shared],
            # A share's id as a flow id: not a run, but one a mutation might pass off as one.
            0, [shared.shares[0].id], [], victim_ids, corpus, fuzzer_held, loop_errors, refusal_log, Tally(),
        )  # fmt: skip
        the_arena.restart_flow()
        await victim.ping()
        # Guessed (the published id), captured (its own), leaked (the victim's and the run's).
        run_ids = [p.id for p in the_arena.victim_held[-1].values()]
        the_arena.target_ids = [*(p.id for p in fuzzer_held), *victim_ids, legit.id, *run_ids]
        the_arena.take_snapshot()
        _count_replies(the_arena)
        with _watching_aiohttp(the_arena.server_errors):
            yield the_arena
        the_arena.victim_held = the_arena.fuzzer_held = []
        del legit, x, y, shared
        with contextlib.suppress(SyftError):
            await the_arena.fuzzer.close()
    finally:
        for handle_ in closing:
            with contextlib.suppress(SyftError):
                await handle_.close()
        if server is not None:
            await server.close()
        await peer.close()
        loop.set_exception_handler(previous)


async def reconnect(arena: Arena) -> None:
    """The worker closed the fuzzing link (as it may on a malformed frame): dial again."""
    with contextlib.suppress(SyftError):
        await arena.fuzzer.close()
    arena.fuzzer = await _dial(arena.actor, FUZZER, arena.keys)
    arena.reconnects += 1
    _count_replies(arena)


# -- phase (a): before authentication ----------------------------------------------------------
def _record(payload: bytes) -> bytes:
    return len(payload).to_bytes(4, "little") + payload


def _hello(keys: Keys) -> bytes:
    return msgpack.packb({"aiosyft": PROTOCOL_VERSION, "id": FUZZER, "secret": keys.secret(FUZZER)})


def _upgrade(host: str, port: int, keys: Keys) -> bytes:
    key = base64.b64encode(b"aiosyft-fuzz-key").decode()
    return (
        f"GET /ws HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{ID_HEADER}: {FUZZER}\r\n"
        f"Authorization: Bearer {keys.secret(FUZZER)}\r\n\r\n"
    ).encode()


@dataclasses.dataclass
class PreauthTally:
    refused: int = 0  #: answered no (a refusal record, an HTTP error status) or closed
    accepted: int = 0  #: let in with credentials that verify (a mutation that kept them intact)
    bypasses: list[str] = dataclasses.field(default_factory=list)  #: let in with credentials that do not
    silent: int = 0  #: no answer before the client gave up (the worker's own timeout closes these)
    crashes: list[str] = dataclasses.field(default_factory=list)  #: the worker's check raised
    silent_frames: list[bytes] = dataclasses.field(default_factory=list)


def _verifies(keys: Keys, identity: Any, secret: Any) -> bool:
    return isinstance(identity, str) and bool(identity) and keys.credentials.verify(identity, secret)


def _hello_fields(data: bytes) -> tuple[Any, Any]:
    try:
        hello = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception:
        return None, None
    return (hello.get("id"), hello.get("secret")) if isinstance(hello, dict) else (None, None)


def _upgrade_fields(data: bytes) -> tuple[Any, Any]:
    identity = secret = None
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name, value = name.strip().lower(), value.strip()
        if name == ID_HEADER.lower().encode():
            identity = value.decode("utf-8", "replace")
        elif name == b"authorization" and value[:7].lower() == b"bearer ":
            secret = value[7:].strip().decode("utf-8", "replace")
    return identity, secret


async def _knock(host: str, port: int, data: bytes, wait: float) -> bytes | None:
    """Write ``data`` on a fresh connection, end it, and return the first answer (``b""``:
    closed without one; ``None``: none within ``wait``)."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(data)
        with contextlib.suppress(OSError):
            writer.write_eof()
        async with asyncio.timeout(wait):
            return await reader.read(1 << 16)
    except TimeoutError:
        return None
    except OSError:
        return b""
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def preauth_frame(arena: Arena, rng: random.Random) -> bytes:
    """A mutated handshake (nine in ten) or random bytes, for the arena's transport."""
    if rng.randrange(10) == 0:
        return rng.randbytes(rng.randint(0, 96))
    if arena.transport == "ws":
        template = _upgrade(*arena.host_port, arena.keys)
    elif arena.transport == "tcp":
        template = _record(_hello(arena.keys))
    else:
        template = _hello(arena.keys)
    mutations = [random_mutation(rng) for _ in range(rng.randint(1, 4))]
    return mutate(template, mutations, in_header=False)


async def knock(arena: Arena, frame: bytes, tally: PreauthTally, wait: float = 1.0) -> None:
    """One pre-authentication attempt with ``frame``, tallied."""
    keys = arena.keys
    if arena.transport == "virtual":
        identity, secret = _hello_fields(frame)
        try:
            transport = VirtualTransport(arena.actor, identity, secret)
        except SyftError:
            tally.refused += 1
            return
        except Exception as exc:  # the check itself failed: what a network transport would not catch
            tally.crashes.append(f"authenticating {identity!r} raised {exc!r}")
            return
        await transport.close()
        if _verifies(keys, identity, secret):
            tally.accepted += 1
        else:
            tally.bypasses.append(f"virtual: let in as {identity!r} with a secret that does not verify")
        return
    answer = await _knock(*arena.host_port, frame, wait)
    if answer is None:
        tally.silent += 1
        tally.silent_frames.append(frame)
    elif arena.transport == "tcp":
        ok = False
        if len(answer) >= 4:
            with contextlib.suppress(Exception):
                ok = msgpack.unpackb(answer[4 : 4 + int.from_bytes(answer[:4], "little")]).get("ok") is True
        if not ok:
            tally.refused += 1
        elif _verifies(keys, *_hello_fields(frame[4 : 4 + int.from_bytes(frame[:4], "little")])):
            tally.accepted += 1
        else:
            tally.bypasses.append(f"tcp: hello {frame[:80]!r} let in")
    elif answer.startswith((b"HTTP/1.1 101", b"HTTP/1.0 101")):
        if _verifies(keys, *_upgrade_fields(frame)):
            tally.accepted += 1
        else:
            tally.bypasses.append(f"ws: upgrade {frame[:120]!r} let in")
    else:
        tally.refused += 1


# -- phase (b): authenticated ------------------------------------------------------------------
def targeted(rng: random.Random, victim_ids: list[int], flow_ids: list[int], *, aborts: bool = True) -> bytes:
    """One well-formed message at one of the victim's ids, from a plain generator: every way a
    hostile peer could read, use, overwrite, delete, move, announce or interfere with it. The
    Hypothesis pool reaches these too, but leans towards small examples (empty id lists, the
    first id of a list); these keep the policy's refusals coming at volume."""
    target, msg_id = rng.choice(victim_ids), rng.randrange(1 << 40)
    ref = ObjRef(target)
    pick = rng.randrange(9 if flow_ids else 7)
    message: Any
    if pick == 0:
        message = Get(msg_id, FUZZER, target, rng.randrange(3))
    elif pick == 1:
        message = Delete(msg_id, FUZZER, [target, *rng.sample(victim_ids, rng.randint(0, 2))])
    elif pick == 2:
        op = rng.choice(
            ["torch.add", "Tensor.add_", "Tensor.zero_", "torch.neg", "Tensor.backward", "Tensor.t"]
        )
        message = Command(msg_id, FUZZER, rng.choice([actors.new_object_id(), target]), op, [ref, 1.0], None)
    elif pick == 3:
        message = Store(msg_id, FUZZER, target, torch.zeros(2), rng.choice([None, VICTIM, FUZZER]), None)
    elif pick == 4:
        message = Forward(
            msg_id, FUZZER, [target], PEER, f"virtual://{PEER}", [actors.new_object_id()], rng.random() < 0.5
        )
    elif pick == 5:
        message = Expect(msg_id, FUZZER, [target], rng.choice([PEER, VICTIM]))
    elif pick == 6:
        op = rng.choice(MPC_OPS)
        message = Command(
            msg_id, FUZZER, actors.new_object_id(), op, [ref], {"owner": TARGET, "parties": [TARGET, PEER]}
        )
    else:
        tags = ["share", "!batch", *(["!abort"] if aborts else [])]
        message = Flow(
            msg_id,
            FUZZER,
            rng.choice(flow_ids),
            rng.choice(tags),
            rng.choice([torch.zeros(2), "x", None]),
            None,
        )
    return encoded([message]) or b""


@dataclasses.dataclass
class Sources:
    """Where the authenticated phase's frames come from."""

    corpus: list[bytes]
    pool: list[bytes]
    victim_ids: list[int]
    flow_ids: list[int]
    aborts: bool = True

    def next(self, rng: random.Random) -> tuple[str, bytes]:
        """A frame, and which source it came from."""
        pick = rng.randrange(20)
        if pick < 8:
            return "mutated captured", mutate_randomly(rng, self.corpus)
        if pick < 13 and self.pool:
            return "hypothesis", rng.choice(self.pool)
        if pick < 15 and self.pool:
            return "mutated hypothesis", mutate_randomly(rng, self.pool)
        if pick < 18 and self.victim_ids:
            return "targeted", targeted(rng, self.victim_ids, self.flow_ids, aborts=self.aborts)
        return "raw", random_raw(rng)


def build_pool(arena: Arena, size: int, seed: int, *, aborts: bool = True) -> list[bytes]:
    """Frames of messages Hypothesis builds at the arena's targets."""
    strategy = structured(arena.target_ids, arena.flow_ids, aborts=aborts)
    frames = (encoded(messages) for messages in hypothesis_pool(strategy, size, seed))
    return [frame for frame in frames if frame is not None]


# -- one run ----------------------------------------------------------------------------------
@dataclasses.dataclass
class Report:
    """The figures of one transport's run (what ``--json`` writes, per transport)."""

    transport: str
    frames: dict[str, int]
    seconds: float
    crashes: list[str]
    hangs: list[str]
    violations: list[str]
    leaks: list[str]
    data_leaks: list[str]
    auth_bypasses: list[str]
    preauth: dict[str, int]
    refusals: dict[str, int]
    samples: dict[str, list[str]]
    policy: dict[str, int]
    memory: dict[str, float]
    left_behind: dict[str, int]
    reconnects: int

    @property
    def ok(self) -> bool:
        return not (
            self.crashes
            or self.hangs
            or self.violations
            or self.leaks
            or self.data_leaks
            or self.auth_bypasses
        )

    def problems(self) -> list[str]:
        """Every line that makes this run a failure."""
        return [
            *self.crashes, *self.hangs, *self.violations, *self.leaks, *self.data_leaks, *self.auth_bypasses
        ]  # fmt: skip

    def unexplained(self) -> list[str]:
        """The problems no known finding (:data:`KNOWN_FINDINGS`) explains: new bugs."""
        return [p for p in self.problems() if not any(re.search(k, p) for k in KNOWN_FINDINGS.values())]

    @property
    def total(self) -> int:
        return sum(self.frames.values())


def _crashes(arena: Arena) -> list[str]:
    found = [f"session task of {s.identity} died" for s in arena.actor.sessions if s.task.done()]
    found += arena.server_errors.found
    arena.server_errors.found = []
    for context in arena.loop_errors:
        exc = context.get("exception")
        found.append(f"{context.get('message')}: {exc!r}" if exc is not None else str(context.get("message")))
    arena.loop_errors.clear()
    return found


class _Fuzz:
    """One run's state: the arena, the frame sources and what has been found so far."""

    def __init__(self, the: Arena, rng: random.Random, sources: Sources, hang_timeout: float) -> None:
        self.the = the
        self.rng = rng
        self.sources = sources
        self.hang_timeout = hang_timeout
        self.crashes: list[str] = []
        self.hangs: list[str] = []
        self.violations: list[str] = []
        self.preauth = PreauthTally()
        self.sent = collections.Counter[str]()
        self.refusals_before = the.actor.policy.refusals
        self.logged_before = the.refusal_log.count
        gc.collect()
        self.memory = {"rss_start_mib": rss_mib()}

    async def check(self, label: str) -> None:
        """Everything that must hold after a batch; what does not is recorded under ``label``."""
        the = self.the
        try:
            async with asyncio.timeout(self.hang_timeout):
                if the.fuzzer.connection.lost is not None:
                    await reconnect(the)
                await check_serving(the.actor, the.fuzzer, the.legit, [])  # loop errors: _crashes
        except TimeoutError:
            self.hangs.append(f"{label}: no answer within {self.hang_timeout:g} s")
        except AssertionError as exc:
            self.crashes.append(f"{label}: {exc}")
        except SyftError as exc:
            if the.fuzzer.connection.lost is None:  # else closed by the worker: dial again next time
                self.crashes.append(f"{label}: {type(exc).__name__}: {exc}")
        self.crashes.extend(f"{label}: {c}" for c in [*self.preauth.crashes, *_crashes(the)])
        self.preauth.crashes.clear()
        found = the.violations()
        if found:
            self.violations.extend(f"{label}: {v}" for v in found)
            if any("flow" in v for v in found):
                the.restart_flow()
                await the.victim.ping()
            the.take_snapshot()

    async def before_authentication(self, frames: int, batch: int, progress: Callable[[int], None]) -> None:
        """Phase (a): each frame on a fresh connection, 32 connections at a time."""
        sent = 0
        while sent < frames:
            n = min(batch, frames - sent)
            attempts = [knock(self.the, preauth_frame(self.the, self.rng), self.preauth) for _ in range(n)]
            for i in range(0, n, 32):
                await asyncio.gather(*attempts[i : i + 32])
            sent += n
            self.sent["pre-auth"] += n
            await self.check(f"pre-auth frames {sent - n}-{sent}")
            progress(n)

    async def authenticated(self, frames: int, batch: int, progress: Callable[[int], None]) -> None:
        """Phase (b): batches pipelined on the fuzzing link, re-dialled when the worker closes it."""
        sent, baseline_at = 0, min(frames, 2 * batch)
        while sent < frames:
            n = min(batch, frames - sent)
            connection = self.the.fuzzer.connection
            for _ in range(n):
                kind, frame = self.sources.next(self.rng)
                try:
                    connection.transport.write(frame)
                except SyftError:  # the link is gone: the check re-dials
                    break
                self.sent[kind] += 1
            sent += n
            await self.check(f"frames {sent - n}-{sent}")
            if sent == baseline_at:  # warmed up: every code path has allocated what it keeps
                gc.collect()
                self.memory["rss_baseline_mib"] = rss_mib()
            progress(n)

    async def finish(self) -> tuple[list[str], dict[str, int], dict[str, int]]:
        """Memory, what the worker keeps once the fuzzer has left, and the refusals' ledger."""
        the, memory = self.the, self.memory
        gc.collect()
        await asyncio.sleep(0.05)
        gc.collect()
        memory["rss_end_mib"] = rss_mib()
        memory["rss_growth_mib"] = memory["rss_end_mib"] - memory.get(
            "rss_baseline_mib", memory["rss_start_mib"]
        )
        memory["bound_mib"] = RSS_BOUND_MIB
        leaks = []
        if memory["rss_growth_mib"] > RSS_BOUND_MIB:
            leaks.append(
                f"RSS grew {memory['rss_growth_mib']:.1f} MiB after warm-up (bound {RSS_BOUND_MIB:g})"
            )
        await the.fuzzer.close()
        the.fuzzer_held.clear()
        await asyncio.sleep(the.actor.grace + 0.2)  # its grace period is short here
        left = left_behind(the)
        leaks += [f"{count} {what} kept after the fuzzer left" for what, count in left.items() if count]
        # The refusals: each PermissionDenied the fuzzer got is one the owner logged.
        refusals = the.actor.policy.refusals - self.refusals_before
        logged = the.refusal_log.count - self.logged_before
        unlogged = the.tally.denials - the.refusal_log.texts
        policy = {
            "permission_denied_replies": sum(the.tally.denials.values()),
            "refusals_logged": logged,
            "policy.refusals": refusals,
            "denials_not_logged": sum(unlogged.values()),
        }
        for reason, texts in _by_reason(unlogged).items():
            examples = "; ".join(texts[:2])
            self.violations.append(
                f"{len(texts)} PermissionDenied replies the owner never logged ({reason}), e.g. {examples}"
            )
        if logged != refusals:
            self.violations.append(f"the owner logged {logged} refusals but counted {refusals}")
        return leaks, left, policy


async def run(
    transport: str,
    frames: int = 100_000,
    *,
    seed: int = 0,
    batch: int = 500,
    preauth_share: float = 0.1,
    pool_size: int | None = None,
    aborts: bool = True,
    progress: Callable[[int], None] | None = None,
    hang_timeout: float = HANG_TIMEOUT,
) -> Report:
    """Fuzz a live worker over ``transport`` with ``frames`` frames (``preauth_share`` of them
    before authentication) and report. ``aborts``: let Hypothesis build FLOW messages with the
    reserved abort tag (the known finding; see ``tests/test_fuzz.py``)."""
    started = time.perf_counter()
    progress = progress or (lambda _: None)
    async with arena(transport) as the:
        pool = build_pool(the, pool_size or max(200, min(3000, frames // 30)), seed, aborts=aborts)
        sources = Sources(the.corpus, pool, the.victim_ids, the.flow_ids, aborts)
        fuzz = _Fuzz(the, random.Random(seed), sources, hang_timeout)
        preauth_frames = int(frames * preauth_share)
        await fuzz.before_authentication(preauth_frames, batch, progress)
        await fuzz.authenticated(frames - preauth_frames, batch, progress)
        leaks, left, policy = await fuzz.finish()
        preauth = fuzz.preauth
        return Report(
            transport=transport,
            frames=dict(fuzz.sent),
            seconds=time.perf_counter() - started,
            crashes=fuzz.crashes,
            hangs=fuzz.hangs,
            violations=fuzz.violations,
            leaks=leaks,
            data_leaks=list(the.tally.leaked),
            auth_bypasses=list(preauth.bypasses),
            preauth={"refused": preauth.refused, "accepted": preauth.accepted, "silent": preauth.silent},
            refusals=dict(the.tally.errors.most_common()),
            samples=the.tally.samples,
            policy=policy,
            memory={k: round(v, 1) for k, v in fuzz.memory.items()},
            left_behind=left,
            reconnects=the.reconnects,
        )


def _by_reason(denials: collections.Counter[str]) -> dict[str, list[str]]:
    """Unlogged denials grouped by what they refused: a malformed label, or anything else."""
    groups: dict[str, list[str]] = {}
    for text, count in denials.items():
        reason = "a malformed label" if "label" in text or "audience" in text else "other"
        groups.setdefault(reason, []).extend([text] * count)
    return groups


def left_behind(the: Arena) -> dict[str, int]:
    """State the worker still holds on the fuzzer's account after it left (each should be 0)."""
    actor = the.actor
    flows = actor.flows
    return {
        "objects": sum(1 for _ in actor.store.ids_owned_by(FUZZER)),
        "sessions": sum(1 for s in actor.sessions if s.identity == FUZZER),
        "early flow messages": sum(len(q) for (_, sender, _), q in flows._early.items() if sender == FUZZER),
        "parked messages": sum(len(s.parked) for s in actor.sessions if s.identity == FUZZER),
    }


# -- reporting --------------------------------------------------------------------------------
def format_reports(reports: list[Report]) -> str:
    """The runs as one table, a column per transport."""
    if not reports:
        return ""
    rows: list[tuple[str, list[str]]] = []

    def row(name: str, values: list[Any]) -> None:
        rows.append((name, [str(v) for v in values]))

    row("frames", [r.total for r in reports])
    for kind in sorted({k for r in reports for k in r.frames}):
        row(f"  {kind}", [r.frames.get(kind, 0) for r in reports])
    row("seconds", [f"{r.seconds:.1f}" for r in reports])
    row("frames/s", [f"{r.total / r.seconds:,.0f}" for r in reports])
    row("crashes", [len(r.crashes) for r in reports])
    row("hangs", [len(r.hangs) for r in reports])
    row("leaks", [len(r.leaks) for r in reports])
    row("violations", [len(r.violations) for r in reports])
    row("data leaked", [len(r.data_leaks) for r in reports])
    row("auth bypasses", [len(r.auth_bypasses) for r in reports])
    for kind in ("refused", "accepted", "silent"):
        row(f"pre-auth {kind}", [r.preauth[kind] for r in reports])
    row("error replies", [sum(r.refusals.values()) for r in reports])
    for kind in sorted({k for r in reports for k in r.refusals}):
        row(f"  {kind}", [r.refusals.get(kind, 0) for r in reports])
    for kind in reports[0].policy:
        row(kind, [r.policy[kind] for r in reports])
    for kind in reports[0].memory:
        row(kind, [r.memory.get(kind, "") for r in reports])
    row("reconnects", [r.reconnects for r in reports])
    row("verdict", ["ok" if r.ok else "FAILED" for r in reports])
    width = max(len(name) for name, _ in rows)
    columns = [max(len(r.transport), *(len(values[i]) for _, values in rows)) for i, r in enumerate(reports)]
    lines = [
        " " * width + "  " + "  ".join(r.transport.rjust(c) for r, c in zip(reports, columns, strict=True))
    ]
    lines += [
        name.ljust(width) + "  " + "  ".join(v.rjust(c) for v, c in zip(values, columns, strict=True))
        for name, values in rows
    ]
    for r in reports:
        for what in ("crashes", "hangs", "leaks", "violations", "data_leaks", "auth_bypasses"):
            found = getattr(r, what)
            for item in collections.Counter(found).most_common(5):
                lines.append(f"{r.transport} {what}: {item[0]}" + (f" (x{item[1]})" if item[1] > 1 else ""))
    return "\n".join(lines)


async def fuzz_command(
    transports: list[str], frames: int, seed: int, json_path: Path | None, *, show_progress: bool = True
) -> list[Report]:
    """``aiosyft fuzz``: run each transport in turn, print the table, write the JSON."""
    reports = []
    for transport in transports:
        with tqdm(total=frames, desc=f"fuzz {transport}", unit="frame", disable=not show_progress) as bar:
            reports.append(await run(transport, frames, seed=seed, progress=bar.update))
    print(format_reports(reports))
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        payload = [{**dataclasses.asdict(r), "ok": r.ok, "total": r.total} for r in reports]
        json_path.write_text(json.dumps(payload, indent=2) + "\n")
    return reports
