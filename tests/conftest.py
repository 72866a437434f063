from __future__ import annotations

import os
import subprocess
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


#: Set to 1 where CUDA must be there (the GPU check, bench/gpu_check.py): the tests marked
#: ``cuda`` then fail without it instead of skipping.
REQUIRE_CUDA = "FEDMIA_REQUIRE_CUDA"


def pytest_runtest_setup(item) -> None:
    """A ``cuda`` test skips without CUDA, or fails where FEDMIA_REQUIRE_CUDA=1."""
    if item.get_closest_marker("cuda") is None:
        return
    import torch  # noqa: PLC0415 (only for CUDA tests)

    if not torch.cuda.is_available():
        reason = "CUDA is not available (torch.cuda.is_available() is False)"
        if os.environ.get(REQUIRE_CUDA) == "1":
            pytest.fail(f"{REQUIRE_CUDA}=1 but {reason}", pytrace=False)
        pytest.skip(reason)


def pytest_collection_modifyitems(config, items) -> None:
    """The SLURM tests first (the order is otherwise the files').

    Every snakemake process imports the SLURM executor plugin, which asks ``scontrol
    show config`` at import: where SLURM is installed but its controller is not running,
    that waits 9-10 s, in every snakemake run and job of the session. The SLURM tests
    start the controller for the session (``slurm_cluster``), so after them it answers
    at once.
    """
    items.sort(key=lambda item: item.get_closest_marker("slurm") is None)  # stable


@pytest.fixture(scope="session")
def tiny_workflow(
    snakemake_cmd, tmp_path_factory
) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """One real run of the tiny workflow (``.test/config``), shared by the tests that read
    its results or plan reruns from it: ``(workdir, configfile, completed snakemake)``.

    Run as ``snakemake -s <checkout>/Snakefile -d <workdir>``: the Snakefile's
    ``configfile: config/config.yaml`` is looked up in the workdir, which has none, so it
    is not the run of a clone (tests/test_reliability.py runs clones: their results differ,
    e.g. the digits test fraction).

    Its ``results/`` must stay as the run wrote them: a test may rerun jobs (they write
    the same bytes) and write elsewhere in the workdir, never change a result.
    """
    wd = tmp_path_factory.mktemp("tiny_workflow")
    cfg = REPO / ".test" / "config" / "config.yaml"
    argv = [
        *snakemake_cmd,
        "-s",
        str(REPO / "Snakefile"),
        "-d",
        str(wd),
        "--cores",
        "2",
        "--configfile",
        str(cfg),
    ]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return wd, cfg, r


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
