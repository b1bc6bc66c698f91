"""The paper's two datasets: Boston Housing (regression) and Pima Indians Diabetes (binary).

Files come from a data directory: the ``--data-dir`` option, else ``$AIOSYFT_DATA``, else a
per-user cache (``$XDG_CACHE_HOME/aiosyft`` or ``~/.cache/aiosyft``). Every file is checked against
its sha256 before use. A missing file is downloaded from its public mirror when the network allows;
otherwise the error says exactly which file to put where. The data files are never committed.

Preparation is deterministic and fitted on the training part only, as the paper's notebook did: a
seeded 80/20 split, then standardization with the training mean and standard deviation.

* Boston: 13 features, target MEDV in $1000s, kept raw (so MSE reads in the paper's units). CHAS is
  a 0/1 dummy and is left as is.
* Pima: 8 features, target 0/1. In glucose, blood pressure, skin thickness, insulin and BMI a 0
  means "not measured" (a living patient has none of these at 0): those zeros are replaced by the
  median of the measured training values of that column, then everything is standardized.
  Pregnancies (0 is real) and the rest are left as they are.
"""

from __future__ import annotations

import hashlib
import math
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from protocol.errors import SyftError

DATA_ENV = "AIOSYFT_DATA"


class DatasetError(SyftError):
    """A dataset file is missing or is not the file it should be."""


@dataclass(frozen=True)
class Source:
    name: str
    filename: str
    sha256: str
    url: str
    features: tuple[str, ...]
    task: str  # "regression" or "binary"


SOURCES: dict[str, Source] = {
    "boston": Source(
        "boston",
        "boston_housing.csv",
        "2682ca02e83b89467d7d0cdcbde7c0cc4d2566119be8ce8d84dad4f0fa20859a",
        "https://raw.githubusercontent.com/jbrownlee/Datasets/master/housing.csv",
        ("CRIM", "ZN", "INDUS", "CHAS", "NOX", "RM", "AGE", "DIS", "RAD", "TAX", "PTRATIO", "B", "LSTAT"),
        "regression",
    ),
    "pima": Source(
        "pima",
        "pima_indians_diabetes.csv",
        "6bfe5d0f379d17a0e0819b996407e3c09bf80febd4287f2ed212190dfff154af",
        "https://raw.githubusercontent.com/jbrownlee/Datasets/master/pima-indians-diabetes.csv",
        (
            "pregnancies",
            "glucose",
            "blood_pressure",
            "skin_thickness",
            "insulin",
            "bmi",
            "pedigree",
            "age",
        ),
        "binary",
    ),
}
#: Pima columns where 0 means "missing".
PIMA_MISSING_AS_ZERO = ("glucose", "blood_pressure", "skin_thickness", "insulin", "bmi")
#: Boston's binary dummy, left unscaled like the paper's notebook.
BOSTON_UNSCALED = ("CHAS",)


def data_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """Where dataset files live: the option, else ``$AIOSYFT_DATA``, else the user cache."""
    if explicit is not None:
        return Path(explicit)
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV])
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "aiosyft"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fetch(name: str, directory: str | os.PathLike[str] | None = None, *, download: bool = True) -> Path:
    """The verified path of dataset ``name``'s file, downloading it if it is missing."""
    source = SOURCES.get(name)
    if source is None:
        raise DatasetError(f"unknown dataset {name!r}; known: {', '.join(SOURCES)}")
    folder = data_dir(directory)
    path = folder / source.filename
    if not path.exists():
        if not download:
            raise _missing(source, path, "downloads are off")
        try:
            _download(source, path)
        except OSError as exc:
            raise _missing(source, path, f"downloading {source.url} failed: {exc}") from exc
    actual = _sha256(path)
    if actual != source.sha256:
        raise DatasetError(
            f"{path} is not the expected {source.name} file: sha256 {actual}, expected {source.sha256}. "
            f"Replace it with the file from {source.url}"
        )
    return path


def _missing(source: Source, path: Path, why: str) -> DatasetError:
    return DatasetError(
        f"dataset {source.name} not found: put {source.filename} (sha256 {source.sha256}) in "
        f"{path.parent} ({why}); it is {source.url}. Choose the folder with --data-dir or ${DATA_ENV}."
    )


def _download(source: Source, path: Path) -> None:
    with urllib.request.urlopen(source.url, timeout=30) as response:  # noqa: S310 - fixed https URL
        content = response.read()
    if hashlib.sha256(content).hexdigest() != source.sha256:
        raise OSError(f"the file at {source.url} does not have the expected sha256")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".part")
    partial.write_bytes(content)
    partial.replace(path)


@dataclass(frozen=True)
class Dataset:
    """A prepared dataset: float32 features, targets of shape (n, 1), train and test parts."""

    name: str
    task: str
    features: tuple[str, ...]
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load(name: str, directory: str | os.PathLike[str] | None = None, *, seed: int = 0,
         test_fraction: float = 0.2, download: bool = True) -> Dataset:  # fmt: skip
    """Dataset ``name``, split 80/20 with ``seed`` and standardized on the training part."""
    source = SOURCES.get(name)
    path = fetch(name, directory, download=download)
    assert source is not None
    table = np.loadtxt(path, delimiter=",", dtype=np.float64)
    expected_columns = len(source.features) + 1
    if table.ndim != 2 or table.shape[1] != expected_columns:
        raise DatasetError(f"{path} has {table.shape} values, expected {expected_columns} columns")
    x, y = table[:, :-1], table[:, -1:]
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed)).numpy()
    n_test = math.ceil(len(x) * test_fraction)  # Boston: 404 train / 102 test, as in the paper
    test, train = order[:n_test], order[n_test:]
    x_train, x_test = x[train].copy(), x[test].copy()
    scaled = np.ones(x.shape[1], dtype=bool)
    if name == "pima":
        for column in PIMA_MISSING_AS_ZERO:
            j = source.features.index(column)
            median = np.median(x_train[x_train[:, j] != 0, j])
            x_train[x_train[:, j] == 0, j] = median
            x_test[x_test[:, j] == 0, j] = median
    if name == "boston":
        for column in BOSTON_UNSCALED:
            scaled[source.features.index(column)] = False
    mean = np.where(scaled, x_train.mean(axis=0), 0.0)
    std = np.where(scaled, x_train.std(axis=0), 1.0)
    std[std == 0] = 1.0

    def tensor(values: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))

    return Dataset(
        name=name,
        task=source.task,
        features=source.features,
        x_train=tensor((x_train - mean) / std),
        y_train=tensor(y[train]),
        x_test=tensor((x_test - mean) / std),
        y_test=tensor(y[test]),
    )
