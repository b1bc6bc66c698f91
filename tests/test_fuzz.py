"""``aiosyft fuzz`` on a short budget, and what its long runs found.

The short version runs the same machinery as ``aiosyft fuzz`` (``runners/fuzz.py``): a worker
with a victim's objects, shares and pending flow, a fuzzer that knocks before authentication
and then pipelines mutated captured frames and Hypothesis-built messages at the victim's ids.
It asserts what the script reports: no crash, no hang, no leak, no data leaked, no
authentication bypass, the victim untouched, and every PermissionDenied the fuzzer got logged
by the owner. Below, one test per bug the long runs found (all fixed): each failed before its fix.
Findings not fixed yet would go in ``runners.fuzz.KNOWN_FINDINGS``, each pinned by a strict
xfail test; the short fuzz fails on anything else.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest
import torch

import actors
from actors.flows import FLOW_OPTION
from actors.pointer import call
from protocol import PROTOCOL_VERSION, Codec, Flow, PermissionDenied, Store
from runners import fuzz
from runners.cli import main
from tests.conftest import CREDENTIALS, bounded, connect_as, secret_of, worker_in_hand

#: Frames per transport in the short version (a tenth of them before authentication).
SHORT = 3000


@pytest.fixture(autouse=True)
def _quiet() -> Iterator[None]:
    """The worker logs a warning per bad frame; thousands of them would drown the output."""
    logger = logging.getLogger("aiosyft")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    yield
    logger.setLevel(level)


@bounded(40)
@pytest.mark.parametrize("transport", fuzz.TRANSPORT_NAMES)
async def test_a_short_fuzz_finds_nothing_new(transport: str) -> None:
    report = await fuzz.run(transport, SHORT, seed=3, batch=300, pool_size=150, hang_timeout=10.0)
    assert report.total == SHORT
    assert report.unexplained() == [], report.unexplained()[:5]
    assert report.hangs == []
    assert report.data_leaks == [] and report.auth_bypasses == []
    assert report.memory["rss_growth_mib"] <= fuzz.RSS_BOUND_MIB
    assert report.left_behind["objects"] == report.left_behind["sessions"] == 0
    # The fuzz did reach the policy: refusals of each kind, each counted where it was logged.
    assert report.refusals.get("PermissionDenied", 0) > 0
    assert report.refusals.get("MalformedFrame", 0) > 0
    policy = report.policy
    assert policy["refusals_logged"] == policy["policy.refusals"] > 0
    assert policy["permission_denied_replies"] - policy["denials_not_logged"] <= policy["refusals_logged"]
    assert report.preauth["refused"] > 0


def test_aiosyft_fuzz_prints_the_table_and_writes_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The command end to end, briefly; its exit status is 1 only if the run found something."""
    out = tmp_path / "fuzz.json"
    status = 0
    try:
        main(["fuzz", "--transport", "virtual", "--frames", "400", "--seed", "1", "--json", str(out)])
    except SystemExit as exc:
        status = int(exc.code or 0)
    (report,) = json.loads(out.read_text())
    assert report["transport"] == "virtual" and report["total"] == 400
    assert status == (0 if report["ok"] else 1)
    assert "frames/s" in capsys.readouterr().out


def test_every_known_finding_has_its_xfail_test() -> None:
    names = {name for name in globals() if name.startswith("test_")}
    assert set(fuzz.KNOWN_FINDINGS) <= names


def test_the_report_is_a_table_and_json_ready() -> None:
    report = fuzz.Report(
        "tcp", {"raw": 2}, 1.0, [], [], [], [], [], [], {"refused": 1, "accepted": 0, "silent": 0},
        {"MalformedFrame": 2}, {}, {"permission_denied_replies": 0}, {"rss_growth_mib": 0.0}, {}, 0,
    )  # fmt: skip
    table = fuzz.format_reports([report])
    assert "MalformedFrame" in table and "ok" in table.splitlines()[-1]
    assert report.ok and report.unexplained() == []


# -- what the long runs found, fixed ----------------------------------------------------------
@bounded(10)
async def test_a_secret_with_non_ascii_characters_is_refused_not_raised() -> None:
    loop = asyncio.get_running_loop()
    errors: list[dict[str, object]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: errors.append(context))
    try:
        assert CREDENTIALS.verify("fuzzer", "sécret") is False
        async with worker_in_hand("tcp", "tcp-ascii") as (me, actor):
            host, port = actor.address.removeprefix("tcp://").split(":")
            reader, writer = await asyncio.open_connection(host, int(port))
            hello = msgpack.packb({"aiosyft": PROTOCOL_VERSION, "id": "fuzzer", "secret": "sécret"})
            writer.write(len(hello).to_bytes(4, "little") + hello)
            answer = await reader.read(1 << 12)
            writer.close()
            assert msgpack.unpackb(answer[4:])["ok"] is False
            assert errors == []
            await me.ping()
    finally:
        loop.set_exception_handler(previous)


@bounded(10)
async def test_a_refused_label_is_logged_by_the_owner() -> None:
    async with worker_in_hand("virtual", "labels") as (_, actor):
        mallory = await connect_as(actor, "mallory")
        try:
            connection, before = mallory.connection, actor.policy.refusals
            msg_id = connection.next_id()
            frame = Codec().encode(Store(msg_id, "mallory", actors.new_object_id(), 1.0, None, [["x"]]))
            with pytest.raises(PermissionDenied, match="bad label entry"):
                await connection.request_frame(frame, msg_id)
            assert actor.policy.refusals == before + 1
        finally:
            connection._failures.clear()
            await mallory.close()


@bounded(10)
async def test_a_departed_identitys_early_flow_messages_are_let_go() -> None:
    async with worker_in_hand("virtual", "early", grace=0.0) as (me, actor):
        mallory = await connect_as(actor, "mallory")
        connection = mallory.connection
        for flow_id in range(1, 101):
            connection.tell(Flow(connection.next_id(), "mallory", flow_id, "share", torch.ones(64), None))
        await mallory.ping()
        await mallory.close()
        await asyncio.sleep(0.05)
        await me.ping()
        kept = sum(len(q) for (_, sender, _), q in actor.flows._early.items() if sender == "mallory")
        assert kept == 0, f"{kept} of mallory's flow messages are still kept after she left"


@bounded(10)
async def test_only_a_party_of_a_run_can_abort_it() -> None:
    peer = actors.VirtualWorker(
        "early-party", local_secret=secret_of("me"), credentials=CREDENTIALS, secret=secret_of("early-party")
    )
    try:
        async with worker_in_hand("virtual", "aborted") as (victim, actor):
            run = actors.new_object_id()
            parties = {actor.id: actor.address, peer.id: peer.address}
            options = {"owner": peer.id, "parties": list(parties), FLOW_OPTION: [run, parties]}
            pending = call(victim, "mpc.share_from", [], options)  # waits for the owner's share
            await victim.ping()
            assert (run, peer.id, "share") in actor.flows._waiting
            mallory = await connect_as(actor, "mallory")
            try:
                connection = mallory.connection
                connection.tell(Flow(connection.next_id(), "mallory", run, "!abort", "stop", None))
                await mallory.ping()
            finally:
                await mallory.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.2):
                    await pending  # it must still be waiting: only a party may end the run
                pytest.fail("mallory, no party of the run, ended it")
            assert not pending.location.connection.lost
            del pending
    finally:
        await peer.close()


async def _upgrade_answer(address: str, key: bytes, secret: bytes) -> bytes:
    """The first line a worker answers a raw WebSocket upgrade request with."""
    host, port = address.removeprefix("ws://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"GET /ws HTTP/1.1\r\nHost: " + host.encode() + b"\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\nX-Aiosyft-Id: fuzzer\r\n"
        b"Authorization: Bearer " + secret + b"\r\n\r\n"
    )
    try:
        return (await reader.readline()).strip()
    finally:
        writer.close()


@bounded(10)
async def test_an_upgrade_with_a_non_ascii_key_is_answered_400() -> None:
    async with worker_in_hand("ws", "ws-key") as (me, actor):
        answer = await _upgrade_answer(actor.address, "dGhlIHNhbXBsZSBub25jZQ=\xe9".encode("latin-1"),
                                       secret_of("fuzzer").encode())  # fmt: skip
        assert answer.startswith(b"HTTP/1.1 400"), answer
        await me.ping()


@bounded(10)
async def test_a_non_ascii_bearer_secret_is_answered_401_over_websocket() -> None:
    async with worker_in_hand("ws", "ws-bearer") as (me, actor):
        answer = await _upgrade_answer(actor.address, b"dGhlIHNhbXBsZSBub25jZQ==", "sécret".encode("latin-1"))
        assert answer.startswith((b"HTTP/1.1 401", b"HTTP/1.1 403")), answer
        await me.ping()


@bounded(10)
async def test_no_identity_can_store_under_a_sessions_barrier_id() -> None:
    async with worker_in_hand("virtual", "barrier") as (_, actor):
        (session,) = [s for s in actor.sessions if s.identity == "me"]
        mallory = await connect_as(actor, "mallory")
        try:
            connection = mallory.connection
            msg_id = connection.next_id()
            frame = Codec().encode(Store(msg_id, "mallory", session.barrier, torch.zeros(1), None, None))
            connection.request_frame(frame, msg_id).add_done_callback(lambda f: f.exception())
            await mallory.ping()
            assert session.barrier not in actor.store.owners, "mallory owns the session's barrier id"
        finally:
            connection._failures.clear()
            await mallory.close()


@bounded(10)
async def test_an_identity_header_that_is_not_utf8_is_answered_401() -> None:
    async with worker_in_hand("ws", "ws-id") as (me, actor):
        host, port = actor.address.removeprefix("ws://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            b"GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            b"X-Aiosyft-Id: \xdffuzzer\r\nAuthorization: Bearer x\r\n\r\n"
        )
        try:
            answer = (await reader.readline()).strip()
        finally:
            writer.close()
        assert answer.startswith(b"HTTP/1.1 401"), answer
        await me.ping()


def test_known_findings_are_patterns() -> None:
    for pattern in fuzz.KNOWN_FINDINGS.values():
        re.compile(pattern)
