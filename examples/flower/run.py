"""Run the Flower app in Flower's simulation (10 clients) and record the server's view.

    python examples/flower/run.py [--out results/recordings/flower_digits]

then audit the recording: snakemake --cores all --configfile examples/flower/audit.yaml
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

# nothing phones home: no Flower telemetry, no Ray usage statistics (before Flower loads)
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from digits_app.client_app import app as client_app  # noqa: E402
from digits_app.server_app import server_app  # noqa: E402
from digits_app.task import NUM_CLIENTS  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402


def main() -> None:
    """Parse the output folder, run the simulation, say where the recording is."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("results/recordings/flower_digits"),
        help="the recording's folder (made absolute)",
    )
    parser.add_argument(
        "--cpus",
        type=int,
        default=os.cpu_count() or 1,
        help="CPUs Ray may use (one per client at a time)",
    )
    args = parser.parse_args()
    out = args.out.resolve()
    handler = logging.StreamHandler()  # fedmia's log lines (Flower logs its own)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.getLogger("fedmia").addHandler(handler)
    logging.getLogger("fedmia").setLevel(logging.INFO)
    t0 = time.perf_counter()
    run_simulation(
        server_app=server_app(out),
        client_app=client_app,
        num_supernodes=NUM_CLIENTS,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"include_dashboard": False, "num_cpus": args.cpus},
        },
    )
    if not (out / "manifest.json").exists():
        sys.exit(f"the simulation wrote no recording in {out}; see the log above")
    print(
        f"recorded the server's view in {out} in {time.perf_counter() - t0:.0f}s; audit it "
        "with: snakemake --cores all --configfile examples/flower/audit.yaml"
    )


if __name__ == "__main__":
    main()
