from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

# One OpenMP thread per process (torch here and in every job and script the tests start),
# set before anything imports torch: the session's background runs keep both cores busy,
# and on an oversubscribed 2-core machine two OpenMP threads wait on each other for whole
# scheduler slices (measured: test_layerwise + test_measures + test_attacks with one core
# busy, 72 and 91 s at 2 threads against 54 s at 1).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest

from fedmia import pipeline
from fedmia.core import contracts
from fedmia.stages.recording import import_recording
from slurm_cluster import SlurmSession

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


#: Snakemake of the interpreter running the tests (so scripts see the same fedmia).
SNAKEMAKE = (sys.executable, "-m", "snakemake")


@pytest.fixture(scope="session")
def snakemake_cmd(slurm_session) -> list[str]:
    """:data:`SNAKEMAKE`, once the session's SLURM cluster is up (``slurm_session``): a
    test that starts snakemake asks for it, and so never waits on a SLURM controller that
    is still starting (the tests before the first such test run while it starts)."""
    if slurm_session is not None:
        slurm_session.wait_until_up()
    return list(SNAKEMAKE)


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
    """The SLURM tests last (the order is otherwise the files'): their runs go on in the
    background from the session's first test (``slurm_session``) and are ready by then."""
    items.sort(key=lambda item: item.get_closest_marker("slurm") is not None)  # stable


@pytest.fixture(scope="session", autouse=True)
def slurm_session(request, tmp_path_factory) -> Iterator[SlurmSession | None]:
    """Where SLURM tests were collected: the one-node cluster, started in the background at
    the session's first test and stopped at its end, and then the tiny config through the
    SLURM profile in a clone, running in the background (:class:`slurm_cluster.
    SlurmSession`; what went wrong is raised in tests/test_slurm.py, not here). ``None``
    where none was collected.

    Every snakemake process imports the SLURM executor plugin, which asks ``scontrol
    show config`` at import: where SLURM is installed but its controller is not running,
    that waits 9-10 s, in every snakemake run of the session (not in its jobs). So what
    starts snakemake waits for the cluster first (``snakemake_cmd``, the tiny workflows'
    threads): ~11 s from the first test, which the tests that start none fill.
    """
    if not any(item.get_closest_marker("slurm") for item in request.session.items):
        yield None
        return
    session = SlurmSession(
        list(SNAKEMAKE),
        tmp_path_factory.mktemp("slurm-daemons"),
        clone(tmp_path_factory.mktemp("slurm") / "clone"),
    )
    session.start()
    try:
        yield session
    finally:
        session.stop()


#: What a clone of the workflow holds (tests/test_reliability.py compares runs of clones).
CLONE_TREE = ("Snakefile", "workflow", "config", ".test", "profiles", "envs")


def clone(where: Path) -> Path:
    """A copy of the workflow (as a separate clone would be), elsewhere on disk."""
    where.mkdir(parents=True)
    for part in CLONE_TREE:
        src = REPO / part
        (shutil.copytree if src.is_dir() else shutil.copy)(src, where / part)
    return where


def run_clone(
    cmd: list[str], wd: Path, *args: str, timeout: int = 900
) -> subprocess.CompletedProcess:
    """A plain ``snakemake --cores 2`` of the tiny config in clone ``wd``, as a user runs it
    there (the clone's Snakefile, its ``config/config.yaml`` under ``.test/config``'s)."""
    argv = [*cmd, "--cores", "2", "--configfile", ".test/config/config.yaml", *args]
    return subprocess.run(argv, cwd=wd, capture_output=True, text=True, timeout=timeout)


def start_tiny_workflow(
    slurm_session: SlurmSession | None, tmp_path_factory, name: str = "tiny_workflow"
) -> tuple[Path, Future[subprocess.CompletedProcess]]:
    """A new clone (in a temporary folder ``name``) and the run of the tiny config in it
    (:func:`run_clone`), going on in a thread once the session's SLURM cluster is up
    (``slurm_session``, where there is one): ``(clone, future of the completed
    snakemake)``."""
    wd = clone(tmp_path_factory.mktemp(name) / "clone")

    def run() -> subprocess.CompletedProcess:
        if slurm_session is not None:
            slurm_session.wait_until_up()
        return run_clone(list(SNAKEMAKE), wd)

    pool = ThreadPoolExecutor(1, thread_name_prefix="tiny-workflow")
    future = pool.submit(run)
    pool.shutdown(wait=False)  # its thread ends with the run
    return wd, future


@pytest.fixture(scope="session", autouse=True)
def tiny_workflow_started(
    request, tmp_path_factory, slurm_session
) -> Iterator[tuple[Path, Future[subprocess.CompletedProcess]] | None]:
    """Where a collected test uses ``tiny_workflow``: its run, started at the session's
    first test (its snakemake once the SLURM cluster is up, ``slurm_session``) and going on
    in the background while the tests before the first that reads it run. ``None``
    otherwise.

    A session that ends before the run does waits for it (about 30 s at most).
    """
    if not any("tiny_workflow" in item.fixturenames for item in request.session.items):
        yield None
        return
    wd, future = start_tiny_workflow(slurm_session, tmp_path_factory)
    yield wd, future
    wait([future])


@pytest.fixture(scope="session", autouse=True)
def second_clone_started(
    request, tmp_path_factory, slurm_session, tiny_workflow_started
) -> Iterator[tuple[Path, Future[subprocess.CompletedProcess]] | None]:
    """Where a collected test uses ``second_clone``: a second run of the tiny config in a
    clone of its own, started at the session's first test (after ``tiny_workflow``'s, its
    snakemake once the SLURM cluster is up) and going on in the background. ``None``
    otherwise."""
    if not any("second_clone" in item.fixturenames for item in request.session.items):
        yield None
        return
    wd, future = start_tiny_workflow(slurm_session, tmp_path_factory, "second_clone")
    yield wd, future
    wait([future])


#: Work behind fixtures of the test modules, registered with :func:`background_run`:
#: ``{fixture name: function of a temporary folder}``.
BACKGROUND_RUNS: dict[str, Callable[[Path], Any]] = {}


def background_run(name: str) -> Callable[[Callable[[Path], Any]], Callable[[Path], Any]]:
    """Register the decorated ``fn(tmp)`` (``tmp`` an empty folder of its own) as the work
    behind the fixture ``name``: where a collected test uses that fixture, it runs in the
    session's background queue (``background_runs``), and the fixture asks for its result
    (:meth:`BackgroundRuns.result`). ``fn`` runs snakemake as :data:`SNAKEMAKE` (the queue
    waits for the SLURM cluster first)."""

    def register(fn: Callable[[Path], Any]) -> Callable[[Path], Any]:
        if name in BACKGROUND_RUNS:
            raise ValueError(f"two background runs named {name!r}")
        BACKGROUND_RUNS[name] = fn
        return fn

    return register


class BackgroundRuns:
    """The registered runs (:data:`BACKGROUND_RUNS`) that collected tests use, one after
    another in a thread of their own once ``after`` (the tiny workflows' runs) are done and
    the SLURM cluster is up (``slurm_session``, where there is one)."""

    def __init__(self, slurm_session: SlurmSession | None, tmp_path_factory) -> None:
        self.slurm_session = slurm_session
        self.tmp_path_factory = tmp_path_factory
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="background-runs")
        self.futures: dict[str, Future] = {}

    def start(self, names: list[str], after: list[Future]) -> None:
        """Queue the runs ``names`` (in this order), the first waiting for ``after``."""
        if names:
            self.pool.submit(wait, after)
        for name in names:
            self.futures[name] = self.pool.submit(self._run, name, self._tmp(name))

    def _tmp(self, name: str) -> Path:
        return self.tmp_path_factory.mktemp(name)

    def _run(self, name: str, tmp: Path) -> Any:
        if self.slurm_session is not None:
            self.slurm_session.wait_until_up()
        return BACKGROUND_RUNS[name](tmp)

    def result(self, name: str) -> Any:
        """The run's result once it is done (raising what it raised); a run that was not
        queued runs now."""
        if name not in self.futures:
            return self._run(name, self._tmp(name))
        return self.futures[name].result()

    def stop(self) -> None:
        """Drop the runs not started, wait for the one going on."""
        self.pool.shutdown(wait=True, cancel_futures=True)


@pytest.fixture(scope="session", autouse=True)
def background_runs(
    request, tmp_path_factory, slurm_session, tiny_workflow_started, second_clone_started
) -> Iterator[BackgroundRuns]:
    """The session's background queue: the registered runs (:func:`background_run`) that a
    collected test uses, in the order of their first tests, started once the tiny
    workflows' runs are done (until then they fill the second core) and going on while the
    unit tests run: a run takes the core the tests leave free, and its tests find it done."""
    runs = BackgroundRuns(slurm_session, tmp_path_factory)
    first_use: dict[str, int] = {}  # the queue's order: the tests'
    for i, item in enumerate(request.session.items):
        for name in BACKGROUND_RUNS.keys() & set(item.fixturenames):
            first_use.setdefault(name, i)
    after = [started[1] for started in (tiny_workflow_started, second_clone_started) if started]
    runs.start(sorted(first_use, key=first_use.get), after)
    try:
        yield runs
    finally:
        runs.stop()


@pytest.fixture(scope="session")
def second_clone(
    second_clone_started, slurm_session, tmp_path_factory
) -> tuple[Path, subprocess.CompletedProcess]:
    """A run of the tiny config in a clone other than ``tiny_workflow``'s (tests/
    test_reliability.py compares the two): ``(clone, completed snakemake)``, whatever its
    exit code."""
    started = second_clone_started or start_tiny_workflow(
        slurm_session, tmp_path_factory, "second_clone"
    )
    wd, future = started
    return wd, future.result()


@pytest.fixture(scope="session")
def tiny_workflow(
    tiny_workflow_started, slurm_session, tmp_path_factory
) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """One real run of the tiny workflow in a clone (:func:`clone`, :func:`run_clone`),
    shared by the tests that read its results, plan reruns from it or compare other runs
    with it (tests/test_reliability.py, tests/test_slurm.py, tests/test_workflow.py):
    ``(clone, configfile, completed snakemake)``. Started at the session's first test
    (``tiny_workflow_started``): here it is waited for.

    A later ``snakemake -s <checkout>/Snakefile -d <clone> --configfile <configfile>``
    plans from the same config: the Snakefile's ``configfile: config/config.yaml`` is
    looked up in the working directory, the clone, which has it.

    Its ``results/`` must stay as the run wrote them: a test may rerun jobs (they write
    the same bytes) and write elsewhere in the clone, never change a result.
    """
    started = tiny_workflow_started or start_tiny_workflow(slurm_session, tmp_path_factory)
    wd, future = started
    r = future.result()
    assert r.returncode == 0, r.stderr[-3000:]
    return wd, wd / ".test" / "config" / "config.yaml", r


@pytest.fixture(scope="session")
def digits_files(tmp_path_factory) -> dict[str, str]:
    """The prepared digits dataset (32×32), written once per test session."""
    files = contracts.prepared_paths(tmp_path_factory.mktemp("digits"))
    pipeline.prepare({"kind": "digits"}, files)
    return files


#: The tiny digits cell of the pipeline tests (test_pipeline.py, test_recording.py,
#: test_participation.py): 3 iid clients of 20 samples, 10 of each and 30 held-out samples
#: evaluated; 4 rounds of one local epoch, rounds 1, 2 and 4 observed, tested every 2.
TINY_PART = dict(
    kind="iid", num_clients=3, samples_per_client=20, eval_members_per_client=10, eval_nonmembers=30
)
TINY_TRAIN = dict(
    rounds=4,
    local_epochs=1,
    batch_size=10,
    lr=0.05,
    observe_every=2,
    observe_rounds=[1],
    test_every=2,
)
TINY_CELL = dict(dataset="digits", model="alexnet", defense="none", partition="iid", seed=0)


def train_outputs(out: Path) -> dict[str, Path]:
    """The train stage's outputs in the cell folder ``out``: its history and the recorded
    view (:data:`fedmia.core.contracts.VIEW_FILES`)."""
    view = {key: out / name for key, name in contracts.VIEW_FILES.items()}
    return {"history": out / "history.parquet", **view}


def import_outputs(out: Path) -> dict[str, Path]:
    """The import stage's outputs in the cell folder ``out``: the recorded view read back
    and the partition it gives."""
    view = {key: out / name for key, name in contracts.VIEW_FILES.items()}
    return {**view, "partition": out / "partition.parquet"}


def train_arguments(
    data: dict[str, str], out: Path, train: dict, cell: dict, defense=None, **stage
) -> dict:
    """The arguments of :func:`fedmia.pipeline.train` for a tiny cell in the folder ``out``
    (its partition ``out/partition.parquet``, :func:`train_outputs` there): ``cell["model"]``
    trained on the CPU with the ``train`` settings and ``defense`` (default: none);
    ``stage`` (e.g. ``checkpoint_dir``) added as it is."""
    return dict(
        data=data,
        partition_file=out / "partition.parquet",
        model={"kind": cell["model"]},
        defense=defense or {"kind": "none"},
        train_cfg=train,
        cell=cell,
        device="cpu",
        threads=1,
        outputs=train_outputs(out),
        **stage,
    )


@pytest.fixture(scope="session")
def train_cell(digits_files):
    """Train a tiny digits cell as the partition and train stages do:
    ``train_cell(out, part, train, cell, defense=None, **stage)`` deals ``part`` with the
    seed ``cell["seed"]`` into ``out/partition.parquet``, trains with
    :func:`train_arguments` and returns :func:`train_outputs` of ``out``."""

    def run(out: Path, part: dict, train: dict, cell: dict, defense=None, **stage):
        out.mkdir(parents=True, exist_ok=True)
        pipeline.partition(digits_files, part, cell["seed"], out / "partition.parquet")
        kw = train_arguments(digits_files, out, train, cell, defense, **stage)
        pipeline.train(**kw)
        return kw["outputs"]

    return run


@pytest.fixture(scope="session")
def import_cell(digits_files):
    """Import a recording as a cell on the CPU, as the import stage does:
    ``import_cell(recording, out, part, cell)`` reads the folder ``recording`` with the
    partition settings ``part`` (its evaluation set where the recording names none) and
    returns :func:`import_outputs` of ``out``."""

    def run(recording: Path, out: Path, part: dict, cell: dict) -> dict[str, Path]:
        outputs = import_outputs(out)
        import_recording(
            recording=recording,
            data=digits_files,
            model={"kind": cell["model"]},
            partition=part,
            cell=cell,
            device="cpu",
            threads=1,
            outputs=outputs,
        )
        return outputs

    return run


@pytest.fixture
def labels_split():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, size=2000)
    is_test = np.zeros(2000, dtype=bool)
    is_test[rng.permutation(2000)[:400]] = True
    return labels, is_test
