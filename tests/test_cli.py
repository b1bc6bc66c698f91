"""The commands people run, run once each: every value they print is parsed and checked, against
plain PyTorch computed here, against the JSON the same run wrote, or against the other printed
values it is a quotient of."""

from __future__ import annotations

import ast
import collections
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from runners.cli import main
from runners.datasets import Dataset, load
from runners.demo import demo
from tests.conftest import needs_data, plain_fedavg


# -- plain PyTorch: what the training commands compute, written out without the project's code ----
def _mlp(n_features: int) -> nn.Sequential:
    """The paper's MLP (features-32-24-1), initialised as seed 0 initialises it."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(n_features, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 1))


def _round_robin(data: Dataset) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Two shards: a seed-0 shuffle of the training rows cut into batches of 8, batch i to worker i mod 2."""
    batches = torch.randperm(len(data.x_train), generator=torch.Generator().manual_seed(0)).split(8)
    return [(data.x_train[torch.cat(batches[k::2])], data.y_train[torch.cat(batches[k::2])]) for k in (0, 1)]


def _plain_walk(data: Dataset, epochs: int) -> tuple[nn.Module, float]:
    """The walk (Boston defaults: SGD lr 0.001, batch 8, MSE). Each epoch each shard is shuffled by
    a generator seeded ``epoch * 1009 + shard``; round r takes batch r of shard 0, then of shard 1.
    Returns the model and the last epoch's mean batch loss."""
    model, shards = _mlp(data.x_train.shape[1]), _round_robin(data)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001)
    for epoch in range(epochs):
        batches = []
        for k, (x, y) in enumerate(shards):
            order = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch * 1_009 + k))
            batches.append(list(zip(x[order].split(8), y[order].split(8), strict=True)))
        losses = []
        for r in range(max(map(len, batches))):
            for x, y in (shard[r] for shard in batches if r < len(shard)):
                optimizer.zero_grad()
                loss = F.mse_loss(model(x), y)
                loss.backward()
                optimizer.step()
                losses.append(loss.detach())
    return model, float(torch.stack(losses).mean())


def _plain_fedavg(data: Dataset, rounds: int, epochs: int) -> tuple[nn.Module, float]:
    """FedAvg with Pima's defaults (SGD lr 0.01, batch 8, BCE on logits, seed 0) on the CLI's
    round-robin shards, weighted by shard size. Returns the model and the last round's loss."""
    model, shards = _mlp(data.x_train.shape[1]), _round_robin(data)
    weights = [len(x) / len(data.x_train) for x, _ in shards]
    losses = plain_fedavg(model, shards, weights, rounds=rounds, epochs=epochs, lr=0.01, batch_size=8, seed=0,
                          loss_fn=F.binary_cross_entropy_with_logits)  # fmt: skip
    return model, losses[-1]


def _test_output(model: nn.Module, data: Dataset) -> torch.Tensor:
    with torch.no_grad():
        return model(data.x_test)


# -- reading what was printed -------------------------------------------------------------------
TRAIN_LINE = re.compile(
    r"(?P<head>.+ workers: test \w+) (?P<value>[\d.]+%?) "
    r"\(training [\d.]+ s, final training loss (?P<loss>[\d.]+)\)"
)


def _train(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, str]:
    """Run ``aiosyft train``; its output must be exactly its one result line, returned parsed."""
    main(["train", *argv])
    line = TRAIN_LINE.fullmatch(capsys.readouterr().out.rstrip("\n"))
    assert line is not None
    return line.groupdict()


def _markdown_rows(out: str) -> dict[str, list[str]]:
    """The body rows of the markdown table in ``out``: first cell -> the other cells, stripped."""
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in out.splitlines()]
    body = [row for row in rows if len(row) > 1 and not row[1].startswith("---")][1:]  # no header
    return {row[0]: row[1:] for row in body}


def _quotient_range(a: float, b: float, half_unit: float = 0.005) -> tuple[float, float]:
    """Where a / b lies when a and b are known rounded to ``half_unit`` either side."""
    return (a - half_unit) / (b + half_unit), (a + half_unit) / (b - half_unit)


# -- the commands --------------------------------------------------------------------------------
def test_demo_prints_what_plain_pytorch_computes(capsys) -> None:
    main(["demo"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 7
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    expected = torch.sigmoid(x @ x.t() + 1).sum(dim=0)
    at_bob, at_alice = r"<PointerTensor bob:0x[0-9a-f]+", r"<PointerTensor alice:0x[0-9a-f]+>"
    assert re.fullmatch(rf"sent a tensor to bob: {at_bob} shape=\(2, 2\) dtype=torch.float32>", lines[0])
    assert re.fullmatch(rf"pipelined five operations: {at_bob}> \(not resolved yet\)", lines[1])
    assert lines[2] == f"resolved: shape={tuple(expected.shape)} dtype={expected.dtype}"
    got = re.fullmatch(r"got (\[.*\]); plain PyTorch gives (\[.*\])", lines[3])
    assert got is not None
    # float reprs round-trip: the printed lists are the very floats
    assert ast.literal_eval(got[1]) == ast.literal_eval(got[2]) == expected.tolist()
    assert re.fullmatch(rf"moved bob -> alice worker to worker: {at_alice}", lines[4])
    assert lines[5] == "5 SGD steps on bob, model fetched back: identical to local training: True"
    held = re.fullmatch(r"bob holds (\d+) objects after the pointers were dropped", lines[6])
    assert held is not None
    assert int(held[1]) == 0


@needs_data
def test_train_boston_prints_the_mse_plain_pytorch_reaches(capsys) -> None:
    line = _train(["--dataset", "boston", "--epochs", "2"], capsys)
    assert line["head"] == "boston, walk over 2 virtual workers: test MSE"
    data = load("boston")
    model, last_loss = _plain_walk(data, epochs=2)
    mse = float(F.mse_loss(_test_output(model, data), data.y_test))
    assert (line["value"], line["loss"]) == (f"{mse:.2f}", f"{last_loss:.4f}")
    # and training did something: better than predicting the training mean
    assert mse < float(F.mse_loss(data.y_train.mean().expand_as(data.y_test), data.y_test))


@needs_data
def test_train_pima_fedavg_prints_the_accuracy_plain_pytorch_reaches(capsys) -> None:
    line = _train(["--dataset", "pima", "--style", "fedavg", "--epochs", "10", "--rounds", "2"], capsys)
    assert line["head"] == "pima, fedavg over 2 virtual workers: test accuracy"
    data = load("pima")
    model, last_loss = _plain_fedavg(data, rounds=2, epochs=10)
    accuracy = float(((_test_output(model, data) > 0).float() == data.y_test).float().mean())
    assert (line["value"], line["loss"]) == (f"{100 * accuracy:.1f}%", f"{last_loss:.4f}")
    # and training did something: better than always answering the training set's majority class
    majority = float(data.y_train.mean() > 0.5)
    assert accuracy > float((data.y_test == majority).float().mean())


POINTER_ROWS = {
    "local tensor op (x = x + 1)": "local_op_us",
    "floor: queue hop + msgpack + the op": "floor_op_us",
    "queue hop + msgpack alone": "floor_hop_us",
    "pipelined pointer op": "pipelined_op_us",
    "of which runtime overhead": "overhead_op_us",
    "awaited pointer op (round trip)": "awaited_op_us",
}


def test_bench_pointers_prints_the_figures_it_writes(tmp_path, capsys) -> None:
    path = tmp_path / "pointers.json"
    main(["bench", "pointers", "--repeats", "1", "--json", str(path)])
    figures, out = json.loads(path.read_text()), capsys.readouterr().out
    assert set(figures) == {*POINTER_ROWS.values(), "pipelined_ops_per_s"}
    assert figures["overhead_op_us"] == figures["pipelined_op_us"] - figures["local_op_us"]
    assert figures["pipelined_ops_per_s"] == 1e6 / figures["pipelined_op_us"]

    rows = _markdown_rows(out)
    assert set(rows) == set(POINTER_ROWS)
    assert {name: cells[0] for name, cells in rows.items()} == {
        name: f"{figures[key]:.2f}" for name, key in POINTER_ROWS.items()
    }
    us = {key: float(rows[name][0]) for name, key in POINTER_ROWS.items()}
    assert abs(us["overhead_op_us"] - (us["pipelined_op_us"] - us["local_op_us"])) <= 0.015
    # each printed ratio: the JSON's quotient to printed precision, and the printed figures' quotient
    ratios = [
        ("pipelined pointer op", r"([\d.]+)x floor, ([\d.]+)x local", 2,
         [("pipelined_op_us", "floor_op_us"), ("pipelined_op_us", "local_op_us")]),
        ("of which runtime overhead", r"([\d.]+)x the hop alone", 2, [("overhead_op_us", "floor_hop_us")]),
        ("awaited pointer op (round trip)", r"([\d.]+)x floor", 1, [("awaited_op_us", "floor_op_us")]),
    ]  # fmt: skip
    for name, pattern, digits, quotients in ratios:
        printed = re.fullmatch(pattern, rows[name][1])
        assert printed is not None, rows[name]
        for value, (a, b) in zip(printed.groups(), quotients, strict=True):
            assert value == f"{figures[a] / figures[b]:.{digits}f}"
            low, high = _quotient_range(us[a], us[b])
            assert low - 0.5 * 10**-digits <= float(value) <= high + 0.5 * 10**-digits
    assert [rows[name][1] for name in list(POINTER_ROWS)[:3]] == ["-", "-", "-"]

    ops = re.search(r"^pipelined: ([\d,]+) ops/s on one virtual worker$", out, re.MULTILINE)
    assert ops is not None
    assert ops[1] == f"{figures['pipelined_ops_per_s']:,.0f}"
    low, high = _quotient_range(1e6, us["pipelined_op_us"])
    assert low - 0.5 <= int(ops[1].replace(",", "")) <= high + 0.5


#: The paper's columns as printed: Table 1's seconds, and each over its pure-PyTorch 0.22 s.
PAPER_CELLS = {"pytorch": ["0.22", "1x"], "virtual": ["10.1", "46x"], "websocket": ["14.6", "66x"],
               "tcp": ["-", "-"], "virtual+dp": ["15.3", "70x"]}  # fmt: skip


@needs_data
def test_table1_rows_chart_and_identical_models(tmp_path, capsys) -> None:
    path, chart = tmp_path / "table1.json", tmp_path / "table1.png"
    main(["table1", "--repeats", "1", "--json", str(path), "--png", str(chart)])
    result, out = json.loads(path.read_text()), capsys.readouterr().out
    assert result["repeats"] == 1
    rows = {row["mode"]: row for row in result["rows"]}
    assert list(rows) == ["pytorch", "virtual", "websocket", "tcp", "virtual+dp"]
    assert rows["pytorch"]["ratio"] == 1.0
    for row in result["rows"]:  # each mode beside the reference runs taken alongside it
        assert row["ratio"] == row["seconds"] / row["reference_seconds"]
    alongside = sorted(
        rows[mode]["reference_seconds"] for mode in ("virtual", "websocket", "tcp", "virtual+dp")
    )
    assert rows["pytorch"]["seconds"] == (alongside[1] + alongside[2]) / 2  # one run each: their median
    # every mode computes exactly what pure PyTorch computes: 10 epochs of the walk, written out here
    model, _ = _plain_walk(data := load("boston"), epochs=10)
    mse = float(F.mse_loss(_test_output(model, data), data.y_test))
    assert rows["virtual"]["test_mse"] == rows["websocket"]["test_mse"] == rows["tcp"]["test_mse"]
    assert rows["virtual"]["test_mse"] == rows["pytorch"]["test_mse"] == mse < 23.7
    assert rows["virtual+dp"]["test_mse"] > mse  # DP-SGD, noise 1 and clip 4 on lots of 8: it costs utility

    printed = _markdown_rows(out)
    assert list(printed) == list(rows)
    for mode, row in rows.items():
        if row["seconds"] is None:
            assert printed[mode] == [row["note"], "", "", "", *PAPER_CELLS[mode]]
        else:
            ours = [f"{row['seconds']:.3f}", f"{row['reference_seconds']:.3f}", f"{row['ratio']:.2f}x",
                    f"{row['test_mse']:.2f}"]  # fmt: skip
            assert printed[mode] == [*ours, *PAPER_CELLS[mode]]
    assert out.rstrip("\n").rpartition("\n")[2] == f"chart: {chart}"
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- what the README and the demo say is sent is what is sent ------------------------------------
NUMBER_WORDS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8}


@pytest.fixture
def commands_by_line(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], collections.Counter[int]]:
    """Every COMMAND any connection sends, counted by the line of ``filename`` that sent it."""
    from actors.connection import Connection  # noqa: PLC0415
    from protocol import Command  # noqa: PLC0415

    sent: list[tuple[str, int]] = []

    def sender() -> None:  # the innermost frame outside the runtime: the line that was run
        frame = sys._getframe(2)
        while frame is not None and Path(frame.f_code.co_filename).parent.name in ("actors", "protocol"):
            frame = frame.f_back
        if frame is not None:
            sent.append((frame.f_code.co_filename, frame.f_lineno))

    command, tell, tell_all = Connection.command, Connection.tell, Connection.tell_all

    def counted_command(self: Connection, *args: object) -> None:
        sender()
        command(self, *args)

    def counted_tell(self: Connection, message: object) -> None:
        if isinstance(message, Command):
            sender()
        tell(self, message)

    def counted_tell_all(self: Connection, messages: list[object]) -> None:
        for message in messages:
            if isinstance(message, Command):
                sender()
        tell_all(self, messages)

    monkeypatch.setattr(Connection, "command", counted_command)
    monkeypatch.setattr(Connection, "tell", counted_tell)
    monkeypatch.setattr(Connection, "tell_all", counted_tell_all)
    return lambda filename: collections.Counter(line for name, line in sent if name == filename)


def _claimed(source: str, pattern: str) -> tuple[int, int]:
    """(line number, count) of the one line of ``source`` whose comment claims a count."""
    claims = [(number, match[1]) for number, line in enumerate(source.splitlines(), 1)
              if (match := re.search(pattern, line))]  # fmt: skip
    assert len(claims) == 1, claims
    number, word = claims[0]
    return number, NUMBER_WORDS[word]


def test_the_readme_example_sends_the_commands_it_says(commands_by_line, capsys) -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = re.search(r"```python\n(.*?)```", readme, re.DOTALL)
    assert block is not None
    line, claimed = _claimed(block[1], r"# (\w+) commands sent")
    exec(compile(block[1], "<README.md>", "exec"), {"__name__": "readme"})  # it runs asyncio.run(main())
    assert commands_by_line("<README.md>")[line] == claimed
    printed = float(capsys.readouterr().out.strip().removeprefix("tensor(").rstrip(")"))  # 4 decimals
    assert printed == pytest.approx(
        float(torch.sigmoid(torch.tensor([1.0, 2.0, 3.0]) * 2 + 1).sum()), abs=5e-5
    )


def test_the_demo_sends_the_commands_it_says(commands_by_line, capsys) -> None:
    source = Path(demo.__code__.co_filename)
    line, claimed = _claimed(source.read_text(), r"# (\w+) commands, no waiting")
    main(["demo"])
    assert commands_by_line(str(source))[line] == claimed
    printed = re.search(r"^pipelined (\w+) operations: ", capsys.readouterr().out, re.MULTILINE)
    assert printed is not None
    assert NUMBER_WORDS[printed[1]] == claimed


@needs_data
def test_mpc_prints_encrypted_results_beside_a_plain_pytorch_run(capsys, tmp_path) -> None:
    """``aiosyft mpc``: the plaintext row is what a plain PyTorch loop written here computes; the
    encrypted inference and training land within 1% of it (the paper's claim)."""
    figures_path = tmp_path / "mpc.json"
    main(["mpc", "--dataset", "boston", "--epochs", "2", "--lr", "0.05", "--json", str(figures_path)])
    rows = _markdown_rows(capsys.readouterr().out)
    figures = json.loads(figures_path.read_text())
    data = load("boston", seed=0)
    torch.manual_seed(0)
    import mpc  # noqa: PLC0415 - the activation the parties compute, in plain PyTorch

    model = nn.Sequential(nn.Linear(13, 32), mpc.ApproxSigmoid(), nn.Linear(32, 24), mpc.ApproxSigmoid(),
                          nn.Linear(24, 1))  # fmt: skip
    with torch.no_grad():
        model[4].bias.fill_(float(data.y_train.mean()))
    for _ in range(2):
        for i in range(0, len(data.x_train), 32):
            model.zero_grad()
            F.mse_loss(model(data.x_train[i : i + 32]), data.y_train[i : i + 32]).backward()
            with torch.no_grad():
                for p in model.parameters():
                    p.sub_(0.05 * p.grad)
    with torch.no_grad():
        plain = float(F.mse_loss(model(data.x_test), data.y_test))
    assert float(rows["plaintext training and inference"][0]) == pytest.approx(plain, abs=5e-4)
    assert figures["plaintext"] == pytest.approx(plain, rel=1e-5)
    for key, row in (("inference", "encrypted inference (plaintext-trained model)"),
                     ("training", "encrypted training, then plaintext evaluation")):  # fmt: skip
        assert figures[key] == pytest.approx(plain, rel=0.01)
        assert float(rows[row][0]) == pytest.approx(figures[key], abs=5e-4)
        change = 100 * (figures[key] - figures["plaintext"]) / figures["plaintext"]
        assert rows[row][1] == f"{change:+.2f}%"
    assert figures["inference_rounds"] == 9  # a round per Linear, three per sigmoid (its powers)
