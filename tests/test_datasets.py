"""The two datasets: where their files come from, how they are checked, how they are prepared.

Tests that need the real files skip (with the reason) when ``runners.datasets.data_dir()`` does not
hold them; CI points ``$AIOSYFT_DATA`` at the shared folder. The preparation is checked against an
independent numpy reference: the split is recovered from the prepared tensors by matching rows
with the raw CSV, then the documented preparation is recomputed from the raw values.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from protocol.errors import SyftError
from runners import datasets
from runners.datasets import DATA_ENV, SOURCES, Dataset, DatasetError, data_dir, fetch, load

BOSTON = SOURCES["boston"]
PIMA = SOURCES["pima"]
PIMA_REPLACED = [PIMA.features.index(c) for c in datasets.PIMA_MISSING_AS_ZERO]  # 1..5
CHAS = BOSTON.features.index("CHAS")


def _real_file(name: str) -> Path:
    source = SOURCES[name]
    path = data_dir() / source.filename
    if not path.is_file():
        pytest.skip(f"{source.filename} not found in {data_dir()} (set ${DATA_ENV} to the datasets folder)")
    return path


@pytest.fixture(scope="module")
def boston_file() -> Path:
    return _real_file("boston")


@pytest.fixture(scope="module")
def pima_file() -> Path:
    return _real_file("pima")


@pytest.fixture(scope="module")
def boston(boston_file: Path) -> Dataset:
    return load("boston", download=False)


@pytest.fixture(scope="module")
def pima(pima_file: Path) -> Dataset:
    return load("pima", download=False)


def _raw(path: Path) -> np.ndarray:
    return np.loadtxt(path, delimiter=",", dtype=np.float64)


# -- an independent reference of the preparation ---------------------------------------------
def _recover_split(data: Dataset, raw: np.ndarray, replaced: list[int] = ()) -> tuple[np.ndarray, np.ndarray]:
    """Which raw rows went to train and test, found by matching rows: every column of the
    prepared features is an affine function of the (zero-replaced) raw column."""
    x = torch.cat([data.x_train, data.x_test]).double().numpy()
    features = raw[:, :-1]
    assert x.shape == features.shape
    values = np.empty_like(x)
    for j in range(x.shape[1]):
        ours, theirs = np.sort(x[:, j]), np.sort(features[:, j])
        if j in replaced:  # above the replacement median both sides hold the same raw values
            ours, theirs = ours[-150:], theirs[-150:]
        scale, shift = np.polyfit(ours, theirs, 1)
        values[:, j] = x[:, j] * scale + shift
    tolerance = 1e-3 * (np.abs(features) + 1)
    close = np.abs(values[:, None, :] - features[None, :, :]) <= tolerance[None, :, :]
    for j in replaced:  # a raw 0 there was replaced: any value matches it
        close[:, features[:, j] == 0, j] = True
    candidates = close.all(axis=2)
    assert (candidates.sum(axis=1) == 1).all(), "every prepared row is exactly one raw row"
    rows = candidates.argmax(axis=1)
    assert sorted(rows.tolist()) == list(range(len(raw))), "the split is a partition of the raw rows"
    n_train = len(data.x_train)
    return rows[:n_train], rows[n_train:]


def _reference(raw: np.ndarray, train: np.ndarray, test: np.ndarray, name: str) -> dict[str, np.ndarray]:
    """The documented preparation in numpy: median-replace Pima's missing zeros (training
    medians), standardize with the training mean and std (ddof 0), Boston's CHAS untouched."""
    x_train, x_test = raw[train, :-1].copy(), raw[test, :-1].copy()
    medians = {}
    if name == "pima":
        for j in PIMA_REPLACED:
            medians[j] = np.median(x_train[x_train[:, j] != 0, j])
            x_train[x_train[:, j] == 0, j] = medians[j]
            x_test[x_test[:, j] == 0, j] = medians[j]
    mean, std = x_train.mean(axis=0), x_train.std(axis=0)
    if name == "boston":
        mean[CHAS], std[CHAS] = 0.0, 1.0
    return {
        "x_train": (x_train - mean) / std,
        "x_test": (x_test - mean) / std,
        "y_train": raw[train, -1:],
        "y_test": raw[test, -1:],
        "filled_train": x_train,
        "filled_test": x_test,
        "mean": mean,
        "std": std,
        "medians": medians,
    }


def _assert_matches_reference(data: Dataset, reference: dict[str, np.ndarray]) -> None:
    for key in ("x_train", "x_test", "y_train", "y_test"):
        ours = getattr(data, key)
        assert ours.dtype == torch.float32
        expected = torch.from_numpy(reference[key].astype(np.float32))
        assert ours.shape == expected.shape
        if key.startswith("y"):
            assert torch.equal(ours, expected), key
        else:
            torch.testing.assert_close(ours, expected, rtol=0, atol=2e-5, msg=key)


# -- Boston ----------------------------------------------------------------------------------
def test_boston_has_the_papers_shapes(boston: Dataset) -> None:
    assert (boston.name, boston.task) == ("boston", "regression")
    assert boston.features == BOSTON.features and len(boston.features) == 13
    assert boston.x_train.shape == (404, 13)
    assert boston.x_test.shape == (102, 13)
    assert boston.y_train.shape == (404, 1)
    assert boston.y_test.shape == (102, 1)
    for t in (boston.x_train, boston.x_test, boston.y_train, boston.y_test):
        assert t.dtype == torch.float32 and t.is_contiguous()


def test_boston_equals_the_numpy_reference(boston: Dataset, boston_file: Path) -> None:
    raw = _raw(boston_file)
    train, test = _recover_split(boston, raw)
    assert (len(train), len(test)) == (404, 102)
    assert set(train.tolist()).isdisjoint(test.tolist())
    _assert_matches_reference(boston, _reference(raw, train, test, "boston"))
    # MEDV stays raw, in $1000s: the targets are exactly the CSV's last column
    assert torch.equal(
        torch.sort(torch.cat([boston.y_train, boston.y_test]).flatten()).values,
        torch.sort(torch.from_numpy(raw[:, -1].astype(np.float32))).values,
    )


def test_boston_train_part_is_standardized_on_itself_and_chas_is_left_as_0_1(
    boston: Dataset, boston_file: Path
) -> None:
    scaled = [j for j in range(13) if j != CHAS]
    mean = boston.x_train[:, scaled].double().mean(dim=0)
    std = boston.x_train[:, scaled].double().std(dim=0, unbiased=False)
    torch.testing.assert_close(mean, torch.zeros(12, dtype=torch.float64), rtol=0, atol=1e-5)
    torch.testing.assert_close(std, torch.ones(12, dtype=torch.float64), rtol=0, atol=1e-5)
    # fitted on the training part only: the test part is not centred on its own mean
    test_mean = boston.x_test[:, scaled].double().mean(dim=0)
    assert (test_mean.abs() > 1e-3).all(), test_mean
    # CHAS is the raw dummy, in both parts, with the raw share of ones
    assert set(boston.x_train[:, CHAS].unique().tolist()) == {0.0, 1.0}
    assert set(boston.x_test[:, CHAS].unique().tolist()) == {0.0, 1.0}
    chas = torch.cat([boston.x_train[:, CHAS], boston.x_test[:, CHAS]])
    assert int(chas.sum()) == int(_raw(boston_file)[:, CHAS].sum()) == 35


def test_the_split_is_deterministic_per_seed_and_differs_across_seeds(
    boston: Dataset, boston_file: Path
) -> None:
    again = load("boston", download=False, seed=0)
    for key in ("x_train", "x_test", "y_train", "y_test"):
        assert torch.equal(getattr(again, key), getattr(boston, key)), key
    other = load("boston", download=False, seed=1)
    assert other.x_train.shape == (404, 13) and other.x_test.shape == (102, 13)
    raw = _raw(boston_file)
    _, test0 = _recover_split(boston, raw)
    train1, test1 = _recover_split(other, raw)
    assert set(test0.tolist()) != set(test1.tolist())
    assert not torch.equal(other.y_test, boston.y_test)
    # each seed's part is prepared with its own training statistics
    _assert_matches_reference(other, _reference(raw, train1, test1, "boston"))


def test_test_fraction_sets_the_size_of_the_test_part(boston_file: Path) -> None:
    half = load("boston", download=False, test_fraction=0.5)
    assert (len(half.x_train), len(half.x_test)) == (253, 253)
    tenth = load("boston", download=False, test_fraction=0.1)
    assert (len(tenth.x_train), len(tenth.x_test)) == (455, 51)


# -- Pima ------------------------------------------------------------------------------------
def test_pima_has_the_expected_shapes_and_binary_targets(pima: Dataset, pima_file: Path) -> None:
    assert (pima.name, pima.task) == ("pima", "binary")
    assert pima.features == PIMA.features and len(pima.features) == 8
    assert pima.x_train.shape == (614, 8) and pima.x_test.shape == (154, 8)
    assert pima.y_train.shape == (614, 1) and pima.y_test.shape == (154, 1)
    targets = torch.cat([pima.y_train, pima.y_test])
    assert set(targets.unique().tolist()) == {0.0, 1.0}
    assert int(targets.sum()) == 268  # 500 / 268, as the file's description says


def test_pima_equals_the_numpy_reference(pima: Dataset, pima_file: Path) -> None:
    raw = _raw(pima_file)
    train, test = _recover_split(pima, raw, PIMA_REPLACED)
    assert (len(train), len(test)) == (614, 154)
    reference = _reference(raw, train, test, "pima")
    _assert_matches_reference(pima, reference)
    torch.testing.assert_close(pima.x_train.double().mean(0), torch.zeros(8, dtype=torch.float64),
                               rtol=0, atol=1e-5)  # fmt: skip
    torch.testing.assert_close(pima.x_train.double().std(0, unbiased=False),
                               torch.ones(8, dtype=torch.float64), rtol=0, atol=1e-5)  # fmt: skip
    assert (pima.x_test.double().mean(0).abs() > 1e-3).all()


def test_pima_missing_zeros_are_replaced_by_training_medians(pima: Dataset, pima_file: Path) -> None:
    raw = _raw(pima_file)
    train, test = _recover_split(pima, raw, PIMA_REPLACED)
    reference = _reference(raw, train, test, "pima")
    mean, std = reference["mean"], reference["std"]
    for part, rows in (("x_train", train), ("x_test", test)):
        before_scaling = getattr(pima, part).double().numpy() * std + mean  # undo our scaling
        for j in PIMA_REPLACED:
            zeros = raw[rows, j] == 0
            # no raw zero is left: every value is a real measurement or the training median
            assert before_scaling[:, j].min() > 5.0, (part, PIMA.features[j])
            np.testing.assert_allclose(before_scaling[zeros, j], reference["medians"][j], atol=1e-3)
            np.testing.assert_allclose(before_scaling[~zeros, j], raw[rows, j][~zeros], atol=1e-3)
        # pregnancies keeps its real zeros
        pregnancies = PIMA.features.index("pregnancies")
        np.testing.assert_allclose(before_scaling[:, pregnancies], raw[rows, pregnancies], atol=1e-3)
        assert (raw[rows, pregnancies] == 0).any()
    # the medians are those of the measured training values, not of all rows
    insulin = PIMA.features.index("insulin")
    measured = raw[train, insulin][raw[train, insulin] != 0]
    assert reference["medians"][insulin] == np.median(measured) != np.median(raw[train, insulin])


# -- where the files come from ---------------------------------------------------------------
def test_data_dir_prefers_the_option_then_the_environment_then_the_cache(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data_dir(tmp_path / "option") == tmp_path / "option"
    assert data_dir(str(tmp_path / "option")) == tmp_path / "option"
    assert data_dir() == tmp_path / "env"
    monkeypatch.setenv(DATA_ENV, "")  # set but empty counts as unset
    assert data_dir() == tmp_path / "xdg" / "aiosyft"
    monkeypatch.delenv(DATA_ENV)
    assert data_dir() == tmp_path / "xdg" / "aiosyft"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data_dir() == tmp_path / "home" / ".cache" / "aiosyft"


def test_load_reads_from_the_folder_data_dir_chooses(monkeypatch, tmp_path, boston_file, boston) -> None:
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(boston_file, copy / BOSTON.filename)
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv(DATA_ENV, str(copy))
    assert torch.equal(load("boston", download=False).x_train, boston.x_train)
    with pytest.raises(DatasetError) as info:  # the option wins over the environment
        load("boston", empty, download=False)
    assert str(empty) in str(info.value)
    monkeypatch.setenv(DATA_ENV, str(empty))
    assert torch.equal(load("boston", copy, download=False).y_test, boston.y_test)
    monkeypatch.delenv(DATA_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    (tmp_path / "aiosyft").mkdir()
    shutil.copy(boston_file, tmp_path / "aiosyft" / BOSTON.filename)
    assert fetch("boston", download=False) == tmp_path / "aiosyft" / BOSTON.filename


def test_a_missing_file_without_downloads_names_file_folder_and_hash(tmp_path) -> None:
    with pytest.raises(DatasetError) as info:
        load("pima", tmp_path, download=False)
    message = str(info.value)
    assert PIMA.filename in message
    assert str(tmp_path) in message
    assert PIMA.sha256 in message
    assert "downloads are off" in message
    assert isinstance(info.value, SyftError)
    assert list(tmp_path.iterdir()) == []


def test_a_missing_file_without_network_is_the_same_clear_error(monkeypatch, tmp_path) -> None:
    calls = []

    def offline(url, *args, **kwargs):
        calls.append(url)
        raise OSError("Network is unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    folder = tmp_path / "not" / "yet"
    with pytest.raises(DatasetError) as info:
        load("boston", folder, download=True)
    message = str(info.value)
    assert calls == [BOSTON.url]
    assert BOSTON.filename in message
    assert str(folder) in message
    assert BOSTON.sha256 in message
    assert "Network is unreachable" in message
    assert isinstance(info.value.__cause__, OSError)
    assert not (folder / BOSTON.filename).exists()


def test_an_unknown_dataset_is_refused_by_name(tmp_path) -> None:
    with pytest.raises(DatasetError, match=r"unknown dataset 'mnist'; known: boston, pima"):
        load("mnist", tmp_path)
    with pytest.raises(DatasetError, match="unknown dataset 'mnist'"):
        fetch("mnist", tmp_path)


@pytest.mark.parametrize("name", ["boston", "pima"])
def test_a_corrupted_file_names_the_expected_and_actual_hash(tmp_path, name) -> None:
    source = SOURCES[name]
    content = bytearray(_real_file(name).read_bytes())
    at = content.index(b"1")
    content[at : at + 1] = b"2"  # one byte changed: still a perfectly parsable CSV
    path = tmp_path / source.filename
    path.write_bytes(bytes(content))
    actual = hashlib.sha256(bytes(content)).hexdigest()
    assert actual != source.sha256
    with pytest.raises(DatasetError) as info:
        load(name, tmp_path, download=True)  # a present but wrong file is not silently replaced
    message = str(info.value)
    assert source.sha256 in message
    assert actual in message
    assert str(path) in message
    assert path.read_bytes() == bytes(content)


class _Response(io.BytesIO):
    """What ``urlopen`` returns: a readable context manager."""


def test_a_missing_file_is_downloaded_verified_and_loaded(monkeypatch, tmp_path, pima_file, pima) -> None:
    calls = []

    def serve(url, *args, **kwargs):
        calls.append(url)
        return _Response(pima_file.read_bytes())

    monkeypatch.setattr(urllib.request, "urlopen", serve)
    folder = tmp_path / "cache" / "aiosyft"  # created on the way
    data = load("pima", folder)
    assert calls == [PIMA.url]
    written = folder / PIMA.filename
    assert written.read_bytes() == pima_file.read_bytes()
    assert sorted(p.name for p in folder.iterdir()) == [PIMA.filename]  # no partial file left
    for key in ("x_train", "x_test", "y_train", "y_test"):
        assert torch.equal(getattr(data, key), getattr(pima, key)), key
    load("pima", folder)  # present and verified: not downloaded again
    assert calls == [PIMA.url]


def test_a_download_with_the_wrong_content_leaves_nothing_behind(monkeypatch, tmp_path, boston_file) -> None:
    wrong = boston_file.read_bytes().replace(b"24.00", b"25.00", 1)
    assert wrong != boston_file.read_bytes()
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, *a, **k: _Response(wrong))
    folder = tmp_path / "data"
    with pytest.raises(DatasetError) as info:
        load("boston", folder)
    message = str(info.value)
    assert BOSTON.filename in message and BOSTON.sha256 in message and str(folder) in message
    assert "sha256" in str(info.value.__cause__)
    assert not folder.exists() or list(folder.iterdir()) == []
