"""The GPU check: a paper-shaped cell on the device, stage by stage, and what must hold there.

``python bench/gpu_check.py --out DIR`` on a machine with CUDA (``--device cuda``, the
default); ``--device cpu --smoke`` is the CI's smoke test of it (tests/test_bench.py).
Steps, each timed (wall clock), on ``--device``:

1. data: a synthetic CIFAR-100 release (random images, the real shapes: 50,000 + 10,000
   32×32 RGB, 100 classes) written as ``cifar-100-python/``, then the ``prepare`` and
   ``partition`` stages of ``config/paper.yaml``'s iid partition (10 clients × 5,000,
   evaluation set 10 × 5,000 members + 10,000 held-out = 60,000 samples);
2. ``train`` (AlexNet, the paper's settings, ``--rounds`` rounds instead of 300, rounds 1
   and every ``--observe-every``-th observed) and ``measure`` with
   ``deterministic: true``;
3. determinism: ``train`` and ``measure`` again; the final model, every observed round
   and the measure table must be byte-identical to the first run's;
4. device agreement: the measures of the last observed round again on the CPU, from
   the same observed models; every attack (aligned protocol, no bootstrap) on both
   tables; the AUCs must agree within ``--auc-tolerance`` (0.005);
5. ``attack``: the attack stage with the paper's options (both protocols, 5 official
   draws, 1,000 bootstrap replicates) on the device run's measures;
6. ``python bench/measures.py`` and ``python bench/train.py`` on the device;
7. on CUDA: the tests marked ``cuda`` (tests/test_cuda.py, the CUDA cases of
   tests/test_defenses.py) with ``FEDMIA_REQUIRE_CUDA=1``, so they fail, not skip,
   where CUDA is missing.

Exit status 1 if a check fails. The last lines are machine-readable:
``gpu_check_<step>_s`` per step, ``gpu_check_identical`` and ``gpu_check_auc_max_diff``,
the benchmarks' ratios, ``device``.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from attack_stage import attack_options  # bench/, the script's own folder

from fedmia.attacker.attacks import run_attacks
from fedmia.core.contracts import PREPARED_FILES
from fedmia.stages import io
from fedmia.workflow import Cell, load_workflow_config

REPO = Path(__file__).resolve().parents[1]
CELL = Cell("cifar100", "alexnet", "none", "iid", 0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    p.add_argument("--out", type=Path, required=True, help="working folder (emptied first)")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--observe-every", type=int, default=2)
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="CPU threads of the CPU-side runs (0: torch's default)",
    )
    p.add_argument("--auc-tolerance", type=float, default=0.005)
    p.add_argument(
        "--smoke", action="store_true", help="tiny data and benchmarks (CI, with --device cpu)"
    )
    args = p.parse_args(argv)
    if args.smoke:  # two rounds, both observed
        args.rounds, args.observe_every = 2, 1
    return args


class Steps:
    """Runs named steps, printing and recording their wall times."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str, fn: Callable[[], object]) -> object:
        """Run step ``name`` (``fn``); its result."""
        t0 = time.perf_counter()
        print(f"[{name}] ...", flush=True)
        result = fn()
        self.seconds[name] = time.perf_counter() - t0
        print(f"[{name}] {self.seconds[name]:.1f} s", flush=True)
        return result


def synthetic_cifar100(root: Path, n_train: int, n_test: int, seed: int = 0) -> None:
    """A ``cifar-100-python/`` folder of random images in the official pickle format."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for name, n in (("train", n_train), ("test", n_test)):
        split = {
            b"data": rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8),
            b"fine_labels": rng.integers(0, 100, n).tolist(),
        }
        (folder / name).write_bytes(pickle.dumps(split, protocol=4))
    names = [f"class{i:02d}".encode() for i in range(100)]
    (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": names}, protocol=4))


def plan(args: argparse.Namespace, data_root: Path) -> dict:
    """The cell's config, from ``config/paper.yaml`` with fewer rounds (smaller: smoke)."""
    config = yaml.safe_load((REPO / "config" / "paper.yaml").read_text())
    config["datasets"]["cifar100"].update(root=str(data_root), download=False)
    config["train"].update(
        rounds=args.rounds,
        observe_every=args.observe_every,
        observe_rounds=[1],
        test_every=args.rounds,
    )
    config["grid"] = [
        {
            "datasets": [CELL.dataset],
            "models": [CELL.model],
            "defenses": [CELL.defense],
            "partitions": [CELL.partition],
            "seeds": [CELL.seed],
        }
    ]
    if args.smoke:
        config["partitions"]["iid"].update(
            num_clients=3, samples_per_client=40, eval_members_per_client=20, eval_nonmembers=60
        )
        config["attack"]["official"].update(draws=1, test_slots=20, client_slots=10)
        config["attack"]["bootstrap"] = 20
        config["train"]["batch_size"] = 20
    spec = load_workflow_config(config)
    cfg = spec.config
    return {
        "config": cfg,
        "spec": spec,
        "cell": {
            "dataset": CELL.dataset,
            "model": CELL.model,
            "defense": CELL.defense,
            "partition": CELL.partition,
            "seed": CELL.seed,
        },
        "rounds": spec.observed_rounds(CELL),
    }


def train_and_measure(
    job: dict, data: dict[str, str], part: Path, folder: Path, device: str, threads: int | None
) -> dict[str, Path]:
    """The train and measure stages of the cell into ``folder``; their files."""
    from fedmia.stages.measure import measure  # noqa: PLC0415 (torch: after the plan)
    from fedmia.stages.train import train  # noqa: PLC0415

    cfg, spec = job["config"], job["spec"]
    out = {
        "history": folder / "history.parquet",
        "final": folder / "final.safetensors",
        "observed": folder / "observed",
        "manifest": folder / "manifest.json",
    }
    train(
        data=data,
        partition_file=part,
        model=cfg["models"][CELL.model],
        defense=cfg["defenses"][CELL.defense],
        train_cfg=spec.train_for(CELL),
        cell=job["cell"],
        device=device,
        threads=threads,
        deterministic=True,
        outputs=out,
    )
    out["mdm"] = folder / "mdm.parquet"
    measure(
        data=data,
        partition_file=part,
        observed_dir=out["observed"],
        rounds=job["rounds"],
        manifest_file=out["manifest"],
        device=device,
        threads=threads,
        deterministic=True,
        config=cfg["measure"],
        output=out["mdm"],
    )
    return out


def same_bytes(a: dict[str, Path], b: dict[str, Path]) -> list[str]:
    """The files of two runs that differ (final model, observed rounds, measures)."""
    differ = []
    for key in ("final", "mdm"):
        if a[key].read_bytes() != b[key].read_bytes():
            differ.append(a[key].name)
    for f in sorted(a["observed"].glob("*.safetensors")):
        if f.read_bytes() != (b["observed"] / f.name).read_bytes():
            differ.append(f"observed/{f.name}")
    return differ


def aucs(mdm: pd.DataFrame, part: pd.DataFrame, attacks: list[str], rnd: int) -> pd.Series:
    """Every attack's AUC per (attack, target, round) on one round's table, aligned."""
    ev = part[part["eval"]]
    owner = pd.Series(ev["client_id"].to_numpy(), index=ev["sample_id"].to_numpy())
    tables = run_attacks(attacks, mdm, owner, protocols=["aligned"], attack_rounds=[rnd], n_boot=0)
    return pd.concat({name: t.set_index(["target", "round"])["auc"] for name, t in tables.items()})


def bench_lines(script: str, *args: str) -> dict[str, str]:
    """Run ``bench/<script>``; its ``key=value`` lines."""
    r = subprocess.run(
        [sys.executable, str(REPO / "bench" / script), *args], capture_output=True, text=True
    )
    print(r.stdout[-3000:], end="")
    if r.returncode != 0:
        raise SystemExit(f"bench/{script} failed:\n{r.stderr[-3000:]}")
    return dict(
        line.split("=", 1)
        for line in r.stdout.splitlines()
        if "=" in line and " " not in line.split("=", 1)[0]
    )


def main(argv: list[str] | None = None) -> int:
    """Run the check; return the exit status."""
    args = parse_args(argv)
    if args.out.exists() and any(args.out.iterdir()):
        raise SystemExit(f"--out {args.out} is not empty; give a new or empty folder")
    args.out.mkdir(parents=True, exist_ok=True)
    threads = args.threads or None
    step = Steps()
    n_train, n_test = (1_000, 200) if args.smoke else (50_000, 10_000)
    step("data", lambda: synthetic_cifar100(args.out / "cifar100", n_train, n_test))
    job = plan(args, args.out / "cifar100")
    cfg = job["config"]
    data = {k: str(args.out / "data" / name) for k, name in PREPARED_FILES.items()}
    part_file = args.out / "partition.parquet"

    def prepare_and_partition() -> None:
        from fedmia.stages.partition import partition  # noqa: PLC0415
        from fedmia.stages.prepare import prepare  # noqa: PLC0415

        prepare(cfg["datasets"][CELL.dataset], data)
        partition(data, cfg["partitions"][CELL.partition], CELL.seed, part_file)

    step("prepare", prepare_and_partition)
    first = step(
        "train_measure",
        lambda: train_and_measure(job, data, part_file, args.out / "run1", args.device, threads),
    )
    second = step(
        "train_measure_again",
        lambda: train_and_measure(job, data, part_file, args.out / "run2", args.device, threads),
    )
    differ = same_bytes(first, second)
    print(f"deterministic reruns: {'byte-identical' if not differ else f'DIFFER: {differ}'}")

    from fedmia.stages.measure import measure  # noqa: PLC0415

    last = job["rounds"][-1]
    cpu_mdm = args.out / "mdm_cpu.parquet"
    step(
        "measure_cpu",
        lambda: measure(
            data=data,
            partition_file=part_file,
            observed_dir=first["observed"],
            rounds=[last],
            manifest_file=first["manifest"],
            device="cpu",
            threads=threads,
            config=cfg["measure"],
            output=cpu_mdm,
        ),
    )
    part = io.read_parquet(part_file, "partition")
    dev_mdm = io.read_parquet(first["mdm"], "measures")
    attacks = list(cfg["attack"]["attacks"])
    diff = step(
        "agreement",
        lambda: (
            aucs(dev_mdm[dev_mdm["round"] == last], part, attacks, last)
            - aucs(io.read_parquet(cpu_mdm, "measures"), part, attacks, last)
        ).abs(),
    )
    print(
        f"AUC, {args.device} vs cpu measures of round {last}: max |difference| "
        f"{diff.max():.2e} over {len(diff)} (attack, target) rows"
    )

    def attack_stage() -> None:
        from fedmia.stages.attack import attack  # noqa: PLC0415

        options = attack_options(job["spec"], CELL)
        outputs = {
            name: args.out / "attacks" / f"{name}.parquet" for name in options["config"]["attacks"]
        }
        attack(
            measures_file=first["mdm"],
            partition_file=part_file,
            cell=job["cell"],
            rounds=job["rounds"],
            manifest_file=first["manifest"],
            **options,
            outputs=outputs,
        )

    step("attack", attack_stage)
    smoke = ["--smoke"] if args.smoke else []
    dev = ["--device", "cuda" if args.device.startswith("cuda") else "cpu"]
    gpu_threads = ["--threads", "0"] if args.device.startswith("cuda") else []
    measures = step(
        "bench_measures",
        lambda: bench_lines(
            "measures.py",
            *dev,
            *gpu_threads,
            *smoke,
            *(
                []
                if args.smoke or not args.device.startswith("cuda")
                else ["--samples", "4096", "--chunk", "256", "--naive-samples", "64"]
            ),
        ),
    )
    trained = step("bench_train", lambda: bench_lines("train.py", *dev, *gpu_threads, *smoke))
    cuda_tests = 0
    if args.device.startswith("cuda"):
        cuda_tests = step(
            "cuda_tests",
            lambda: (
                subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "pytest",
                        "-q",
                        "-m",
                        "cuda",
                        "tests/test_cuda.py",
                        "tests/test_defenses.py",
                    ],
                    cwd=REPO,
                    env={**os.environ, "FEDMIA_REQUIRE_CUDA": "1"},
                ).returncode
            ),
        )

    manifest = json.loads(first["manifest"].read_text())
    print(
        f"\ncell {CELL.path} (synthetic CIFAR-100 of the real shape), {args.rounds} rounds, "
        f"observed {job['rounds']}, device {args.device}; final test accuracy "
        f"{manifest.get('final_test_accuracy', float('nan'))}"
    )
    print(f"{'step':<22}{'s':>9}")
    for name, s in step.seconds.items():
        print(f"{name:<22}{s:>9.1f}")
    ok = not differ and bool(diff.max() <= args.auc_tolerance) and cuda_tests == 0
    print()
    for name, s in step.seconds.items():
        print(f"gpu_check_{name}_s={s:.2f}")
    print(f"gpu_check_identical={int(not differ)}")
    print(f"gpu_check_auc_max_diff={diff.max():.6f}")
    for key in ("speedup_vs_naive", "cost_vs_floor"):
        print(f"{key}={measures.get(key)}")
    for key in ("fl_overhead", "fl_overhead_observed"):
        print(f"{key}={trained.get(key)}")
    print(f"device={measures.get('device')}")
    if not ok:
        print(
            "GPU CHECK FAILED: "
            + (
                "; ".join(
                    ([f"reruns differ in {differ}"] if differ else [])
                    + (
                        [f"AUC differs by {diff.max():.2e} > {args.auc_tolerance}"]
                        if diff.max() > args.auc_tolerance
                        else []
                    )
                    + (["the cuda tests failed"] if cuda_tests else [])
                )
            )
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
