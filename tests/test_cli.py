"""The commands people run, run once each: they work end to end and say what they measured."""

from __future__ import annotations

import json

import pytest

from runners.cli import main
from runners.datasets import DatasetError, data_dir, fetch


def _have_data() -> bool:
    try:
        fetch("boston", download=False)
        fetch("pima", download=False)
    except DatasetError:
        return False
    return True


needs_data = pytest.mark.skipif(not _have_data(), reason=f"datasets not found in {data_dir()}")


def test_demo_checks_itself(capsys):
    main(["demo"])
    out = capsys.readouterr().out
    assert "identical to local training: True" in out
    assert "bob holds 0 objects" in out


@needs_data
@pytest.mark.parametrize(("argv", "says"), [
    (["train", "--dataset", "boston", "--epochs", "2"], "test MSE"),
    (["train", "--dataset", "pima", "--style", "fedavg", "--epochs", "1", "--rounds", "2"], "test accuracy"),
])  # fmt: skip
def test_train(argv, says, capsys):
    main(argv)
    assert says in capsys.readouterr().out


def test_bench_pointers_writes_every_figure(tmp_path, capsys):
    path = tmp_path / "pointers.json"
    main(["bench", "pointers", "--repeats", "1", "--json", str(path)])
    figures = json.loads(path.read_text())
    keys = {"local_op_us", "pipelined_op_us", "awaited_op_us", "floor_op_us", "pipelined_ops_per_s"}
    assert keys <= set(figures)
    assert all(figures[key] > 0 for key in keys)
    assert "pipelined pointer op" in capsys.readouterr().out


@needs_data
def test_table1_rows_chart_and_identical_models(tmp_path, capsys):
    path, chart = tmp_path / "table1.json", tmp_path / "table1.png"
    main(["table1", "--repeats", "1", "--json", str(path), "--png", str(chart)])
    rows = {row["mode"]: row for row in json.loads(path.read_text())["rows"]}
    assert set(rows) == {"pytorch", "virtual", "websocket", "tcp", "virtual+dp"}
    assert rows["pytorch"]["ratio"] == 1.0
    # every mode computes exactly what pure PyTorch computes, so the test error is the same
    assert rows["virtual"]["test_mse"] == rows["websocket"]["test_mse"] == rows["tcp"]["test_mse"]
    assert rows["virtual"]["test_mse"] == rows["pytorch"]["test_mse"] < 23.7
    assert rows["virtual+dp"]["seconds"] is None
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| virtual |" in capsys.readouterr().out
