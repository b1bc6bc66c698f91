"""The CLI fails like a tool: one line on stderr naming the problem, status 2 for a bad argument
and 1 for a failure while running, never a traceback unless ``-v`` asks for one.

Argument errors run in this process (``main`` raising SystemExit). What needs a process of its
own (a port in use, what a worker does with its standard input, a lost worker, ``-v`` reaching the
workers a command starts) runs as one, each with a timeout.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import runners.cli
from actors.identity import CLUSTER_SECRET_ENV, CREDENTIALS_ENV, IDENTITY_ENV, SECRET_ENV, derive_secret
from actors.log import verbosity
from runners import datasets
from runners.cli import main
from runners.cluster import REPORT_ENV
from runners.datasets import DATA_ENV
from tests.conftest import bounded, needs_data, worker_pids

ROOT = Path(__file__).resolve().parent.parent
#: What a hand-started worker's environment must not inherit from the test's.
LAUNCHER_ENV = (CREDENTIALS_ENV, CLUSTER_SECRET_ENV, IDENTITY_ENV, SECRET_ENV, REPORT_ENV)


@pytest.fixture(autouse=True)
def _restore_logging_and_data_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """``main`` configures the ``aiosyft`` logger (``-v``: info) and points ``$AIOSYFT_DATA`` at
    ``--data-dir``, for the processes it starts; give the next test both back."""
    if DATA_ENV in os.environ:
        monkeypatch.setenv(DATA_ENV, os.environ[DATA_ENV])
    else:
        monkeypatch.delenv(DATA_ENV, raising=False)
    logger = logging.getLogger("aiosyft")
    level, handlers, propagate = logger.level, list(logger.handlers), logger.propagate
    yield
    logger.setLevel(level)
    logger.handlers[:] = handlers
    logger.propagate = propagate


def _fails(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Run ``aiosyft argv`` here; its exit status and its one line of stderr."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err
    return int(exit_.value.code or 0), lines[0]


# -- bad arguments: status 2 ---------------------------------------------------------------------
WORKER_DELTA, WORKER_EPS = ("aiosyft worker", "--delta"), ("aiosyft worker", "--epsilon")
BAD_VALUES = [
    (["train", "--epochs", "0"], "aiosyft train", "--epochs"),
    (["train", "--epochs", "-2"], "aiosyft train", "--epochs"),
    (["train", "--style", "fedavg", "--rounds", "0"], "aiosyft train", "--rounds"),
    (["train", "--style", "fedavg", "--min-workers", "0"], "aiosyft train", "--min-workers"),
    (["train", "--style", "fedavg", "--min-workers", "3"], "aiosyft train", "--min-workers"),  # of 2
    (["worker", "--id", "a", "--grace", "-1"], "aiosyft worker", "--grace"),
    (["train", "--workers", "0"], "aiosyft train", "--workers"),
    (["train", "--workers", "-1"], "aiosyft train", "--workers"),
    (["train", "--batch-size", "0"], "aiosyft train", "--batch-size"),
    (["train", "--lr", "0"], "aiosyft train", "--lr"),
    (["train", "--lr", "nan"], "aiosyft train", "--lr"),
    (["train", "--epochs", "two"], "aiosyft train", "--epochs"),
    (["train", "--transport", "pigeon"], "aiosyft train", "--transport"),
    (["worker", "--id", "a", "--threads", "0"], "aiosyft worker", "--threads"),
    (["worker", "--id", "a", "--port", "-1"], "aiosyft worker", "--port"),
    (["worker", "--id", "a", "--port", "65536"], "aiosyft worker", "--port"),
    (["worker", "--id", "a", "--spin-us", "-5"], "aiosyft worker", "--spin-us"),
    (["worker", "--id", "a", "--dataset", "boston", "--batch-size", "0"], "aiosyft worker", "--batch-size"),
    (["worker", "--id", "a", "--dataset", "boston", "--shard", "2/2"], "aiosyft worker", "--shard"),
    (["worker", "--id", "a", "--dataset", "boston", "--shard", "x"], "aiosyft worker", "--shard"),
    (["worker", "--id", "a", "--dataset", "boston", "--epsilon", "1"], "aiosyft worker", "--epsilon"),
    (["worker", "--id", "a", "--dataset", "boston", "--accountant", "pld"], "aiosyft worker", "--accountant"),
    (["worker", "--id", "a", "--release", "sanitized"], "aiosyft worker", "--release"),
    (["worker", "--id", "a", "--dataset", "boston", "--release", "sanitized", "--delta", "2"], *WORKER_DELTA),
    (["worker", "--id", "a", "--dataset", "boston", "--release", "sanitized", "--epsilon", "0"], *WORKER_EPS),
    (["worker", "--id", "a", "--enable", "nonsense"], "aiosyft worker", "--enable"),
    (["worker", "--id", "a", "--credentials", "/nonexistent/credentials"], "aiosyft worker", "--credentials"),
    (["worker"], "aiosyft worker", "--id"),
    (["table1", "--repeats", "0"], "aiosyft table1", "--repeats"),
    (["bench", "pointers", "--repeats", "0"], "aiosyft bench pointers", "--repeats"),
    (["bench", "transport", "--repeats", "-1"], "aiosyft bench transport", "--repeats"),
    (["launch", "--workers", "a,b", "--port", "-1"], "aiosyft launch", "--port"),
    (["launch", "--workers", "a,a"], "aiosyft launch", "--workers"),
    (["launch", "--workers", "me,b"], "aiosyft launch", "--workers"),
    (["launch", "--workers", ","], "aiosyft launch", "--workers"),
    (["launch", "--workers", "a,b", "--port", "65535"], "aiosyft launch", "--port"),
    (["launch", "--workers", "a", "--enable", "nonsense"], "aiosyft launch", "--enable"),
    (["frobnicate"], "aiosyft", "frobnicate"),
    ([], "aiosyft", "command"),
]


@pytest.mark.parametrize(
    ("argv", "prog", "named"), BAD_VALUES, ids=[" ".join(c[0]) or "-" for c in BAD_VALUES]
)
def test_a_bad_value_is_one_line_and_status_2(argv, prog, named, capsys) -> None:
    status, line = _fails(argv, capsys)
    assert status == 2
    assert line.startswith(f"{prog}: error: ")
    assert named in line


INAPPLICABLE = [
    (["train", "--rounds", "3"], "--rounds"),
    (["train", "--style", "walk", "--rounds", "3"], "--rounds"),
    (["worker", "--id", "a", "--shard", "0/2"], "--shard"),
    (["worker", "--id", "a", "--split", "iid"], "--split"),
    (["worker", "--id", "a", "--split-seed", "3", "--batch-size", "4"], "--split-seed, --batch-size"),
    (["train", "--min-workers", "1"], "--min-workers"),
]


@pytest.mark.parametrize(("argv", "named"), INAPPLICABLE, ids=[" ".join(c[0]) for c in INAPPLICABLE])
def test_an_option_that_does_not_apply_is_refused(argv, named, capsys) -> None:
    status, line = _fails(argv, capsys)
    assert status == 2
    assert line.startswith(f"aiosyft {argv[0]}: error: {named} ")
    assert " appl" in line  # applies, apply


# -- a worker beyond loopback needs credentials, or --insecure ----------------------------------
@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """``run_worker`` replaced by a stand-in: the arguments of every worker the CLI would start."""
    calls: list[dict[str, Any]] = []

    async def run_worker(worker_id: str, transport: str, host: str, port: int, **options: Any) -> None:
        calls.append({"id": worker_id, "host": host, **options})

    monkeypatch.setattr(runners.cli, "run_worker", run_worker)
    for name in LAUNCHER_ENV:
        monkeypatch.delenv(name, raising=False)
    return calls


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.7", "worker.example"])
def test_a_worker_beyond_loopback_without_credentials_refuses_to_start(host, started, capsys) -> None:
    status, line = _fails(["worker", "--id", "a", "--host", host], capsys)
    assert status == 2
    assert line.startswith(f"aiosyft worker: error: --host {host} listens beyond this machine")
    for way_out in ("--credentials", CREDENTIALS_ENV, CLUSTER_SECRET_ENV, "--insecure"):
        assert way_out in line
    assert started == []


def test_a_worker_beyond_loopback_starts_with_credentials_or_insecure(
    started, capsys, monkeypatch, tmp_path
) -> None:
    main(["worker", "--id", "a", "--host", "0.0.0.0", "--insecure"])
    assert started[-1]["credentials"] is None
    monkeypatch.setenv(CLUSTER_SECRET_ENV, "s3cret")
    main(["worker", "--id", "a", "--host", "0.0.0.0"])
    assert started[-1]["credentials"].verify("me", derive_secret("s3cret", "me"))
    monkeypatch.delenv(CLUSTER_SECRET_ENV)
    credentials = tmp_path / "credentials"
    credentials.write_text(f"me {'0' * 64}\n")
    main(["worker", "--id", "a", "--host", "0.0.0.0", "--credentials", str(credentials)])
    assert started[-1]["credentials"].identities == ["me"]
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.5"):  # loopback needs nothing
        main(["worker", "--id", "a", "--host", host])
        assert started[-1]["host"] == host
    assert len(started) == 7
    assert capsys.readouterr().err == ""


# -- failures while running: status 1, one line; -v adds the traceback --------------------------
@pytest.fixture
def no_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(source: object, path: object) -> None:
        raise OSError("no network in this test")

    monkeypatch.setattr(datasets, "_download", refuse)


def test_a_missing_dataset_is_one_line_and_status_1(tmp_path, no_downloads, capsys) -> None:
    status, line = _fails(["train", "--data-dir", str(tmp_path)], capsys)
    assert status == 1
    assert line.startswith("aiosyft train: error: DatasetError: dataset boston not found: ")
    assert str(tmp_path) in line


def test_verbose_adds_the_traceback(tmp_path, no_downloads, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["-v", "train", "--data-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_.value.code == 1
    assert "Traceback (most recent call last)" in err
    assert "runners/datasets.py" in err
    assert err.splitlines()[-1].startswith("aiosyft train: error: DatasetError: dataset boston not found: ")


def test_a_bug_keeps_its_traceback(monkeypatch) -> None:
    """Only aiosyft's and the OS's errors are failures to state in one line; anything else is a
    bug, and hiding it would hide where it is."""

    async def broken() -> None:
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(runners.cli, "demo", broken)
    with pytest.raises(ZeroDivisionError):
        main(["demo"])


# -- in processes of their own -------------------------------------------------------------------
def _environment(**extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in LAUNCHER_ENV}
    return {**env, **extra}


async def _aiosyft(
    *argv: str, stdin: int | None = asyncio.subprocess.DEVNULL, seconds: float = 60.0
) -> tuple[int, str, str]:
    """Run ``aiosyft argv`` to its end; status, stdout, stderr."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "runners.cli", *argv, cwd=ROOT, env=_environment(), stdin=stdin,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        async with asyncio.timeout(seconds):
            out, err = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@bounded(90)
@pytest.mark.parametrize("transport", ["ws", "tcp"])
async def test_a_port_in_use_is_one_line_and_status_1(transport, busy_port) -> None:
    argv = ["worker", "--id", "a", "--transport", transport, "--port", str(busy_port)]
    (status, out, err), (verbose_status, _, verbose_err) = await asyncio.gather(
        _aiosyft(*argv), _aiosyft("-v", *argv)
    )
    assert (status, out) == (1, "")
    assert err.count("\n") == 1, err
    assert err.startswith("aiosyft worker: error: ")
    assert str(busy_port) in err
    assert "address already in use" in err
    assert verbose_status == 1
    assert "Traceback (most recent call last)" in verbose_err
    assert verbose_err.splitlines()[-1] == err.strip()


@bounded(90)
async def test_a_launch_on_a_port_in_use_is_one_line_naming_the_worker(busy_port) -> None:
    status, out, err = await _aiosyft(
        "launch", "--workers", "a,b", "--transport", "tcp", "--port", str(busy_port)
    )
    assert (status, out) == (1, "")
    assert err.count("\n") == 1, err
    assert err.startswith("aiosyft launch: error: WorkerStartFailed: worker a could not start: ")
    assert "address already in use" in err


async def _ready_worker(
    *argv: str, stdin: Any, env: dict[str, str] | None = None
) -> asyncio.subprocess.Process:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "runners.cli", *argv, "worker", "--id", "a", "--transport", "tcp",
        "--port", "0", cwd=ROOT, env=env or _environment(), stdin=stdin, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stdout is not None
    line = await process.stdout.readline()
    assert line.startswith(b"READY tcp://"), line
    return process


async def _ended(process: asyncio.subprocess.Process, seconds: float) -> bool:
    try:
        await asyncio.wait_for(process.wait(), seconds)
    except TimeoutError:
        return False
    return True


@bounded(90)
async def test_a_worker_without_a_launchers_pipe_keeps_serving() -> None:
    """Standard input from /dev/null (systemd, nohup, containers), a file, or closed: no launcher
    is watching, so the worker serves until it is signalled, and stops cleanly then."""
    read_fd, write_fd = os.pipe()  # a launcher's pipe, for comparison: its end stops the worker
    closed = [
        "sh",
        "-c",
        f'exec "{sys.executable}" -m runners.cli worker --id a --transport tcp --port 0 <&-',
    ]
    with Path(__file__).open("rb") as a_file:
        started = await asyncio.gather(
            _ready_worker(stdin=asyncio.subprocess.DEVNULL),
            _ready_worker(stdin=a_file),
            asyncio.create_subprocess_exec(
                *closed, cwd=ROOT, env=_environment(), stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            ),
            _ready_worker("-v", stdin=read_fd),
        )  # fmt: skip
    os.close(read_fd)
    *hand_started, launched = started
    closed_process = hand_started[2]
    assert closed_process.stdout is not None
    assert (await closed_process.stdout.readline()).startswith(b"READY tcp://")
    try:
        os.close(write_fd)  # the "launcher" goes away
        assert await _ended(launched, 10), "a worker whose launcher's pipe closed kept running"
        assert launched.returncode == 0
        assert launched.stderr is not None
        assert b"standard input closed: the launcher is gone" in await launched.stderr.read()
        await asyncio.sleep(1.0)
        assert [process.returncode for process in hand_started] == [None, None, None]
    finally:
        for process in hand_started:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
    for process in hand_started:
        assert await _ended(process, 10)
        assert process.returncode == 0
        assert process.stderr is not None
        err = (await process.stderr.read()).decode()
        assert "Traceback" not in err
        assert "Error" not in err


@bounded(90)
async def test_a_lost_worker_ends_a_launch_in_one_line_and_status_1() -> None:
    tag = uuid.uuid4().hex[:8]
    ids = [f"gina-{tag}", f"hugo-{tag}"]
    launcher = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "runners.cli", "launch", "--workers", ",".join(ids), "--transport", "tcp",
        "--port", "0", cwd=ROOT, env=_environment(), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert launcher.stdout is not None and launcher.stderr is not None
    try:
        while not (await launcher.stdout.readline()).startswith(b"ready"):
            assert launcher.returncode is None
        (pid,) = worker_pids(f"--id {ids[1]}")
        os.kill(pid, signal.SIGKILL)
        assert await _ended(launcher, 20)
    finally:
        if launcher.returncode is None:
            launcher.kill()
            await launcher.wait()
    err = (await launcher.stderr.read()).decode()
    assert launcher.returncode == 1
    assert err.count("\n") == 1, err
    lost = f"worker {ids[1]} exited with status -9; stopping every worker"
    assert err == f"aiosyft launch: error: WorkerLost: {lost}\n"
    for _ in range(100):  # and the other worker went with it
        if not worker_pids(f"--id {ids[0]}"):
            break
        await asyncio.sleep(0.05)
    assert worker_pids(f"--id {ids[0]}") == []


def test_verbosity_is_what_the_children_get() -> None:
    logger = logging.getLogger("aiosyft")
    for level, count in ((logging.WARNING, 0), (logging.INFO, 1), (logging.DEBUG, 2)):
        logger.setLevel(level)
        assert verbosity() == count


@needs_data
@bounded(120)
async def test_verbose_reaches_the_worker_processes() -> None:
    status, out, err = await _aiosyft("-v", "train", "--transport", "tcp", "--epochs", "1", seconds=110)
    assert status == 0, err
    assert out.startswith("boston, walk over 2 tcp workers: test MSE ")
    for worker in ("bob", "alice"):  # each child's own info events
        assert f"level='info' event='serving' worker='{worker}'" in err
    assert "Traceback" not in err
