"""The SLURM profile on a real one-node SLURM cluster, against the same run made locally.

The cluster and the runs through the profile are tests/slurm_cluster.py's
:class:`SlurmSession`: conftest's ``slurm_session`` starts them at the session's first
test, in the background, and these tests run last.

Where SLURM is not installed or cannot start, the tests skip with the reason, unless
FEDMIA_REQUIRE_SLURM=1 (set by ``.ci/run``): then they fail. Select or deselect them
with ``pytest -m slurm`` / ``pytest -m "not slurm"``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pandas as pd
import pytest

from slurm_cluster import TARGET, ClusterError, RunTimeout

pytestmark = [pytest.mark.slurm, pytest.mark.workflow]

REQUIRE = "FEDMIA_REQUIRE_SLURM"


def unavailable(reason: str):
    """Skip, or fail where SLURM is required (CI)."""
    if os.environ.get(REQUIRE) == "1":
        pytest.fail(f"{REQUIRE}=1 but {reason}", pytrace=False)
    pytest.skip(reason)


# --- the workflow through the profile ---------------------------------------------


def job_counts(out: str) -> dict[str, int]:
    """The 'Job stats' table of a run."""
    table = out.split("Job stats:")[1].split("total")[0]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M)}


@pytest.fixture(scope="module")
def slurm_runs(slurm_session, tiny_workflow):
    """The tiny config locally (the session's run in a clone, conftest: --cores 2, one torch
    thread as the config says) and through the profile, in a clone of its own (the same
    config), broken then fixed (:class:`slurm_cluster.SlurmSession`, started at the session's
    first test)."""
    try:
        runs = slurm_session.result()
    except ClusterError as e:
        unavailable(str(e))
    except RunTimeout as e:
        pytest.fail(str(e), pytrace=False)
    local_wd, _, local = tiny_workflow
    return {
        "local": local,
        "broken": runs["broken"],
        "fixed": runs["fixed"],
        "local_wd": local_wd,
        "slurm_wd": slurm_session.slurm_wd,
    }


def submissions(out: str) -> list[tuple[str, Path]]:
    """``(SLURM job id, SLURM log file)`` of every job the plugin submitted."""
    return [
        (m[1], Path(m[2]))
        for m in re.finditer(r"has been submitted with SLURM jobid (\d+) \(log: (\S+)\)\.", out)
    ]


def test_cluster_error_names_the_rule_and_the_rerun_continues(slurm_runs):
    broken, fixed = slurm_runs["broken"], slurm_runs["fixed"]
    assert broken.returncode != 0, broken.out[-5000:]
    assert "Error in rule partition" in broken.out, broken.out[-5000:]
    assert "SLURM sbatch failed" in broken.out and "Invalid partition" in broken.out
    assert re.search(r"Finished jobid: \d+ \(Rule: prepare\)", broken.out), broken.out[-5000:]
    assert fixed.returncode == 0, fixed.out[-5000:]
    assert job_counts(fixed.out) == {
        "partition": 2,
        "train": 2,
        "measure": 2,
        "attack": 2,
        "table": 1,
    }


def test_every_job_ran_as_a_slurm_job(slurm_runs):
    """Every job went through sbatch except the report's, which run locally (localrules)."""
    broken, fixed = slurm_runs["broken"], slurm_runs["fixed"]
    subs = submissions(fixed.out)
    counts = job_counts(fixed.out)
    assert len(subs) == sum(counts.values()) - counts["table"] == 8, fixed.out[-5000:]
    assert re.search(r"^localrule table:", fixed.out, re.M), fixed.out[-5000:]
    subs += submissions(broken.out)
    assert len({job_id for job_id, _ in subs}) == len(subs) == 9
    for job_id, log in subs:
        # SLURM writes the job's output there (sbatch --output); the plugin names it by id.
        assert log.name == f"{job_id}.log"
        text = log.read_text()
        rule = re.search(r"rule_(\w+)", str(log))[1]
        assert f"(Rule: {rule})" in text and "1 of 1 steps (100%) done" in text, text[-3000:]


def test_slurm_run_matches_the_local_run(slurm_runs):
    local = slurm_runs["local"]
    out = local.stdout + local.stderr
    assert local.returncode == 0, out[-5000:]
    assert not submissions(out)
    ours = slurm_runs["slurm_wd"] / TARGET
    theirs = slurm_runs["local_wd"] / TARGET
    # Same code, same seeds, one torch thread on the same CPU: the same bytes, so the
    # comparison is exact (no float formatting or tolerance to argue about).
    if ours.read_bytes() != theirs.read_bytes():
        a, b = pd.read_csv(ours), pd.read_csv(theirs)
        diff = a.compare(b) if a.shape == b.shape and list(a) == list(b) else (a.shape, b.shape)
        pytest.fail(f"{TARGET} differs between SLURM and local runs:\n{diff}")
