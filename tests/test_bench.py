"""The benchmark scripts run (--smoke) and end with their machine-readable lines."""

from __future__ import annotations

import subprocess
import sys

import pytest

LINES = {
    "measures.py": ["speedup_vs_naive", "cost_vs_floor", "peak_rss_mb"],
    "train.py": ["fl_overhead", "fedavg_samples_per_s", "central_samples_per_s"],
}


@pytest.mark.parametrize("script", sorted(LINES))
def test_bench_smoke(repo, script):
    r = subprocess.run([sys.executable, str(repo / "bench" / script), "--smoke", "--device",
                        "cpu"], cwd=repo, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    values = dict(line.split("=", 1) for line in r.stdout.splitlines()
                  if "=" in line and " " not in line.split("=", 1)[0])
    for key in LINES[script]:
        assert key in values, r.stdout
        assert float(values[key]) > -1, (key, values[key])
    assert values["device"] == "cpu"
