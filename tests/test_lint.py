"""Style gates: ruff (with docstring rules), snakefmt and snakemake --lint."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BIN = str(Path(sys.executable).parent)


def tool(name: str) -> str | None:
    """The tool installed next to this interpreter (the venv), else on PATH."""
    return shutil.which(name, path=BIN) or shutil.which(name)


def run(*argv: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(tool("ruff") is None, reason="ruff not installed (pip install -e .[test])")
def test_ruff(repo):
    r = run(tool("ruff"), "check", "src", "tests", "bench", "workflow/scripts", cwd=repo)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.skipif(tool("ruff") is None, reason="ruff not installed (pip install -e .[test])")
def test_ruff_format(repo):
    """Every Python file as ``ruff format`` writes it (run ``ruff format .`` to fix)."""
    r = run(tool("ruff"), "format", "--check", ".", cwd=repo)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.skipif(
    tool("snakefmt") is None, reason="snakefmt not installed (pip install -e .[test])"
)
def test_snakefmt(repo):
    r = run(tool("snakefmt"), "--check", "Snakefile", "workflow/rules", cwd=repo)
    assert r.returncode == 0, r.stdout + r.stderr


def test_snakemake_lint(repo, snakemake_cmd, tmp_path):
    r = run(
        *snakemake_cmd,
        "--lint",
        "-s",
        str(repo / "Snakefile"),
        "-d",
        str(tmp_path),
        "--configfile",
        str(repo / "config" / "config.yaml"),
        cwd=repo,
    )
    assert r.returncode == 0 and "good condition" in r.stdout + r.stderr, r.stdout + r.stderr
