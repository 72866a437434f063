"""Reliability end to end: byte-identical reruns, and kills followed by a plain rerun."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import SNAKEMAKE, background_run, clone, run_clone
from fedmia import pipeline

pytestmark = pytest.mark.workflow

#: What a run writes that may differ between runs: logs, benchmarks, Snakemake's own state.
VOLATILE = ("logs", "benchmarks", "checkpoints")


def results(wd: Path) -> dict[str, bytes]:
    """Every file under ``results/`` but logs, benchmarks and checkpoints, by path."""
    root = wd / "results"
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.relative_to(root).parts[0] not in VOLATILE
    }


def assert_same_results(a: Path, b: Path) -> None:
    ra, rb = results(a), results(b)
    assert set(ra) == set(rb), (sorted(set(ra) - set(rb)), sorted(set(rb) - set(ra)))
    differ = [f for f in ra if ra[f] != rb[f]]
    assert not differ, f"files differ between the two runs: {differ}"


@pytest.fixture(scope="module")
def reference(tiny_workflow) -> Path:
    """The session's run of the tiny config in a clone (conftest), the uninterrupted run."""
    return tiny_workflow[0]


def test_two_clones_write_byte_identical_results(reference, second_clone):
    """Same config and seed in two separate clones (the session's two, conftest): every
    result file is byte-identical (Parquet, JSON, CSV, Markdown, LaTeX, safetensors, PNG
    and PDF)."""
    wd, r = second_clone
    assert r.returncode == 0, r.stderr[-3000:]
    kinds = {Path(f).suffix for f in results(wd)}
    assert {".parquet", ".json", ".csv", ".md", ".tex", ".safetensors", ".png", ".pdf"} <= kinds
    assert_same_results(reference, wd)


def _descendants(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True)
    children: dict[int, list[int]] = {}
    for line in out.stdout.splitlines():
        p, pp = map(int, line.split())
        children.setdefault(pp, []).append(p)
    found, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            found.append(c)
            todo.append(c)
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


def _wait_for(predicate, timeout: float = 600, what: str = "") -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)


def _log_says(wd: Path, pattern: str, text: str) -> bool:
    return (
        any(text in p.read_text(errors="replace") for p in (wd / "results" / "logs").glob(pattern))
        if (wd / "results" / "logs").exists()
        else False
    )


def _kill_snakemake_when(cmd: list[str], wd: Path, stage: str, pattern: str, text: str) -> None:
    """Start a plain run in ``wd``, SIGKILL snakemake itself once a log under
    ``results/logs/<pattern>`` says ``text``, and wait until its orphaned jobs end."""
    argv = [*cmd, "--cores", "2", "--configfile", ".test/config/config.yaml"]
    proc = subprocess.Popen(
        argv, cwd=wd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        _wait_for(lambda: _log_says(wd, pattern, text), what=f"{stage} to start")
        jobs = _descendants(proc.pid)
        assert jobs, f"no job process was running during {stage}"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        # the orphaned job processes notice and end within a few seconds
        _wait_for(
            lambda: not any(_alive(p) for p in jobs), timeout=30, what="the orphaned jobs to end"
        )
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


@background_run("snakemake_killed_twice")
def _snakemake_killed_twice(tmp: Path) -> tuple[Path, subprocess.CompletedProcess]:
    """A clone's plain run whose snakemake is SIGKILLed during training, its plain rerun
    killed in turn during the attacks, then the last plain rerun: ``(clone, the last
    completed snakemake)``."""
    cmd = list(SNAKEMAKE)
    wd = clone(tmp / "clone")
    _kill_snakemake_when(cmd, wd, "training", "train/**/*.log", "round 1/2")
    _kill_snakemake_when(cmd, wd, "the attacks", "attack/**/*.log", "fedmia.stages.attack")
    return wd, run_clone(cmd, wd)


@pytest.fixture
def snakemake_killed_twice(background_runs) -> tuple[Path, subprocess.CompletedProcess]:
    """:func:`_snakemake_killed_twice`, run in the session's background queue (conftest)."""
    return background_runs.result("snakemake_killed_twice")


def test_killing_snakemake_then_a_plain_rerun(snakemake_killed_twice, reference):
    """SIGKILL snakemake itself mid-run, during training; the plain rerun (no --unlock, no
    --rerun-incomplete: profiles/default holds them) is killed in turn during the attacks;
    a last plain rerun completes with results byte-identical to an uninterrupted run.
    (One clone for both kills: each rerun starts from what the kill before it left.)"""
    wd, r = snakemake_killed_twice
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_results(reference, wd)


@background_run("one_job_killed")
def _one_job_killed(tmp: Path) -> tuple[Path, int, str, subprocess.CompletedProcess]:
    """A clone's plain run with one training job SIGKILLed, then a plain rerun: ``(clone,
    exit code and output of the killed run, the rerun's completed snakemake)``."""
    cmd = list(SNAKEMAKE)
    wd = clone(tmp / "clone")
    argv = [*cmd, "--cores", "2", "--configfile", ".test/config/config.yaml"]
    proc = subprocess.Popen(
        argv,
        cwd=wd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        _wait_for(
            lambda: _log_says(wd, "train/**/*.log", "round 1/2"), what="a training job to start"
        )
        scripts = [
            p
            for p in _descendants(proc.pid)
            if "train.py" in Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")
        ]
        assert scripts, "no training job found"
        os.kill(scripts[0], signal.SIGKILL)
        out, _ = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return wd, proc.returncode, out, run_clone(cmd, wd)


@pytest.fixture
def one_job_killed(background_runs) -> tuple[Path, int, str, subprocess.CompletedProcess]:
    """:func:`_one_job_killed`, run in the session's background queue (conftest)."""
    return background_runs.result("one_job_killed")


def test_killing_one_job_then_a_plain_rerun(one_job_killed, reference):
    """SIGKILL one training job: Snakemake reports the failed job and stops; a plain
    rerun resumes and completes with byte-identical results."""
    wd, returncode, out, r = one_job_killed
    assert returncode != 0 and "Error in rule train" in out, out[-3000:]
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_results(reference, wd)


def test_different_seeds_give_different_partitions_and_models(digits_files, tmp_path):
    part = dict(
        kind="iid",
        num_clients=3,
        samples_per_client=20,
        eval_members_per_client=10,
        eval_nonmembers=30,
    )
    train = dict(rounds=1, local_epochs=1, batch_size=10, lr=0.05, observe_every=1)
    files = {}
    for seed in (0, 1):
        out = tmp_path / f"s{seed}"
        pipeline.partition(digits_files, part, seed, out / "p.parquet")
        outputs = {
            "history": out / "h.parquet",
            "final": out / "f.safetensors",
            "observed": out / "obs",
            "manifest": out / "m.json",
        }
        pipeline.train(
            data=digits_files,
            partition_file=out / "p.parquet",
            model={"kind": "alexnet"},
            defense={"kind": "none"},
            train_cfg=train,
            cell=dict(dataset="d", model="m", defense="n", partition="p", seed=seed),
            device="cpu",
            threads=1,
            outputs=outputs,
        )
        files[seed] = out
    for name in ("p.parquet", "f.safetensors"):
        assert (files[0] / name).read_bytes() != (files[1] / name).read_bytes(), name


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-v"]))
