from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

from fedmia import pipeline
from fedmia.core import contracts

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def snakemake_cmd() -> list[str]:
    """Snakemake of the interpreter running the tests (so scripts see the same fedmia)."""
    return [sys.executable, "-m", "snakemake"]


@pytest.fixture(scope="session")
def digits_files(tmp_path_factory) -> dict[str, str]:
    """The prepared digits dataset (32×32), written once per test session."""
    files = contracts.prepared_paths(tmp_path_factory.mktemp("digits"))
    pipeline.prepare({"kind": "digits"}, files)
    return files


@pytest.fixture
def labels_split():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, size=2000)
    is_test = np.zeros(2000, dtype=bool)
    is_test[rng.permutation(2000)[:400]] = True
    return labels, is_test


os.environ.setdefault("OMP_NUM_THREADS", "2")
