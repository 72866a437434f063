"""Benchmark: the start-up of each kind of job, the wall time of a job that does nothing.

A job of the workflow is a Snakemake ``script:``: Python starts, Snakemake's preamble
unpickles the job's ``snakemake`` object (importing Snakemake's containers), and the
script's prologue imports what it needs (its stage module, :mod:`fedmia.core.logs`)
before any work. For every script of ``workflow/scripts/`` this runs exactly that, in a
fresh process: the preamble of a real pickled ``snakemake`` object, then the script's own
top-level import statements, and nothing else. For reference, bare Python and the
preamble alone. Runs are interleaved; medians and the spread are printed, with the
heavy libraries each job kind imports.

The last lines are machine-readable: ``startup_s_<script>`` (without ``.py``),
``startup_s_python``, ``startup_s_preamble``.
"""

from __future__ import annotations

import argparse
import ast
import pickle
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: Libraries whose import is reported per job kind.
HEAVY = ("torch", "matplotlib", "pandas", "pyarrow", "scipy", "sklearn", "dp_accounting")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--scripts", type=Path, default=REPO / "workflow" / "scripts")
    p.add_argument("--smoke", action="store_true", help="one repeat (for CI)")
    args = p.parse_args(argv)
    if args.smoke:
        args.repeats = 1
    return args


def prologue(script: Path) -> str:
    """The script's top-level import statements, in order (what runs before its work)."""
    tree = ast.parse(script.read_text(), filename=str(script))
    imports = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
    return "\n".join(ast.unparse(n) for n in imports)


def preamble() -> str:
    """Snakemake's script preamble for a job with a realistic ``snakemake`` object.

    As ``snakemake.script.PythonScript.generate_preamble`` writes it: unpickle the
    object, import the logger and the container class.
    """
    from snakemake.iocontainers import (  # noqa: PLC0415 (only the parent needs Snakemake)
        InputFiles,
        Log,
        OutputFiles,
        Params,
        ResourceList,
        Snakemake,
        Wildcards,
    )

    cell = {
        "dataset": "digits",
        "model": "alexnet",
        "defense": "none",
        "partition": "iid",
        "seed": 0,
    }
    job = Snakemake(
        InputFiles(fromdict={"mdm": "results/mdm/digits/alexnet/none/iid/seed0.parquet"}),
        OutputFiles(fromdict={"loss": "results/attacks/loss.parquet"}),
        Params(fromdict={"cell": cell, "code": "0" * 16, "plugins": []}),
        Wildcards(fromdict={k: str(v) for k, v in cell.items()}),
        1,
        ResourceList(),
        Log(["results/logs/attack.log"]),
        {},
        "attack",
        None,
    )
    blob = pickle.dumps(job, protocol=4)
    return (
        f"import pickle; snakemake = pickle.loads({blob!r}); "
        "from snakemake.logging import logger; "
        "from snakemake.iocontainers import Snakemake"
    )


def report_modules() -> str:
    """Code printing which of :data:`HEAVY` the process imported."""
    return f"import sys; print('imported=' + ','.join(m for m in {HEAVY!r} if m in sys.modules))"


def timed(code: str) -> tuple[float, str]:
    """Wall seconds of a fresh ``python -c code`` and its last line."""
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"the job's prologue failed:\n{code[-500:]}\n{r.stderr[-3000:]}")
    return seconds, (r.stdout.strip().splitlines() or [""])[-1]


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; return the exit status."""
    args = parse_args(argv)
    pre = preamble()
    jobs = {"python": "pass", "preamble": pre}
    for script in sorted(args.scripts.glob("*.py")):
        jobs[script.stem] = pre + "\n" + prologue(script)
    times: dict[str, list[float]] = {name: [] for name in jobs}
    imported: dict[str, str] = {}
    for _ in range(args.repeats):
        for name, code in jobs.items():
            seconds, last = timed(code + "\n" + report_modules())
            times[name].append(seconds)
            imported[name] = last.removeprefix("imported=")
    print(f"{'job':<18}{'median s':>10}{'min s':>8}{'max s':>8}  imports")
    for name, t in times.items():
        print(
            f"{name:<18}{statistics.median(t):>10.3f}{min(t):>8.3f}{max(t):>8.3f}  "
            f"{imported[name] or '-'}"
        )
    print()
    for name, t in times.items():
        print(f"startup_s_{name}={statistics.median(t):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
