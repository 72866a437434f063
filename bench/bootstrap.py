"""Benchmark: bootstrap replicates of one attack row against one plain metrics call.

For each shape (P members, Q non-members) the scores are two unit-variance Gaussians
``d`` apart (members higher; ``d = 1`` gives AUC 0.76). Timed, interleaved, median of
``--repeats``:

* ``metrics``: one :func:`fedmia.metrics.attack_metrics` call (what a row costs now);
* ``boot``: one :func:`fedmia.uncertainty.bootstrap_replicates` call with
  ``--n-boot`` replicates (AUC and TPR at the three FPR levels);
* ``paired``: one call on ``--rows`` score vectors of the same samples (R×N, as the
  rows of one target client), per row: the draws are shared;
* ``blocks``: the runs of the sorted samples the replicates are computed over.

Both are timed as wall clock and as this process's CPU time (on a shared machine
the CPU time is the steadier number). Shapes: the default run's per-target ones
(iid: 40 members of 1,400 evaluation samples; dirichlet: 20 of 1,200), the same
totals with 400 and 200 members, and the paper's (11,000 with 1,000 members;
15,000 with 5,000). The projection for the default run is ``--rows`` rows per cell
and target (rounds × attacks) × 10 targets, for each of its two cells.

``--coverage`` instead estimates how often the 95 % percentile interval of one
sample covers the population value (AUC = Φ(d/√2), TPR at FPR α = Φ(d − z₁₋α)) over
``--coverage-reps`` samples. The last lines are machine-readable: ``key=value``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
from scipy.stats import norm

from fedmia import metrics
from fedmia.uncertainty import _blocks, bootstrap_replicates, percentile_interval

#: (label, members P, non-members Q); the first two are the default run's cells.
SHAPES = (
    ("default iid", 40, 1360),
    ("default dirichlet", 20, 1180),
    ("N=1400, 400 members", 400, 1000),
    ("N=1200, 200 members", 200, 1000),
    ("paper N=11000", 1000, 10000),
    ("paper N=15000", 5000, 10000),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap replicates B")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--separation", type=float, default=1.0, help="Gaussian shift d")
    p.add_argument("--rows", type=int, default=21,
                   help="attack rows per cell and target (rounds × attacks)")
    p.add_argument("--targets", type=int, default=10)
    p.add_argument("--coverage", action="store_true",
                   help="estimate interval coverage instead of timing")
    p.add_argument("--coverage-reps", type=int, default=200)
    p.add_argument("--coverage-shape", type=int, nargs=2, default=(500, 1000),
                   metavar=("P", "Q"))
    p.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat (for CI)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.smoke:
        args.n_boot, args.repeats, args.coverage_reps, args.rows = 50, 1, 5, 3
    return args


def gaussians(rng: np.random.Generator, n_pos: int, n_neg: int, d: float
              ) -> tuple[np.ndarray, np.ndarray]:
    """Scores (float N) and membership (bool N) of members ~ N(d, 1), non-members ~ N(0, 1)."""
    is_member = np.r_[np.ones(n_pos, bool), np.zeros(n_neg, bool)]
    return rng.normal(size=n_pos + n_neg) + d * is_member, is_member


def timed(fn: Callable[..., object], *args: object, **kwargs: object) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one call ``fn(*args, **kwargs)``."""
    w, c = time.perf_counter(), time.process_time()
    fn(*args, **kwargs)
    return time.perf_counter() - w, time.process_time() - c


def bench_timing(args: argparse.Namespace) -> None:
    """Print the timing table and the projection for the default run."""
    rng = np.random.default_rng(args.seed)
    print(f"B = {args.n_boot}, d = {args.separation}, median of {args.repeats}; ms per row "
          f"(CPU time unless 'wall'); 'paired': {args.rows} rows of one target in one call")
    print(f"{'shape':<22}{'P':>6}{'Q':>7}{'blocks':>7}{'metrics':>9}{'boot':>8}"
          f"{'boot wall':>11}{'ratio':>7}{'paired':>8}")
    boot_ms, paired_ms = {}, {}
    for label, n_pos, n_neg in SHAPES:
        s, m = gaussians(rng, n_pos, n_neg, args.separation)
        batch = np.stack([s, *(gaussians(rng, n_pos, n_neg, args.separation)[0]
                               for _ in range(args.rows - 1))])  # R×N, same samples
        plain, boot, paired = [], [], []
        for r in range(args.repeats):  # interleaved
            plain.append(timed(metrics.attack_metrics, s, m))
            boot.append(timed(bootstrap_replicates, s, m, n_boot=args.n_boot, seed=r))
            paired.append(timed(bootstrap_replicates, batch, m, n_boot=args.n_boot, seed=r))
        plain_ms = 1e3 * statistics.median(c for _, c in plain)
        wall_ms = 1e3 * statistics.median(w for w, _ in boot)
        boot_ms[label] = 1e3 * statistics.median(c for _, c in boot)
        paired_ms[label] = 1e3 * statistics.median(c for _, c in paired) / args.rows
        print(f"{label:<22}{n_pos:>6}{n_neg:>7}{_blocks(s, m).n_blocks:>7}{plain_ms:>9.2f}"
              f"{boot_ms[label]:>8.1f}{wall_ms:>11.1f}{boot_ms[label] / plain_ms:>7.0f}"
              f"{paired_ms[label]:>8.1f}")
    rows = args.rows * args.targets
    cells = ("default iid", "default dirichlet")
    projected = rows * sum(boot_ms[c] for c in cells) / 1e3
    projected_paired = rows * sum(paired_ms[c] for c in cells) / 1e3
    print(f"default run: 2 cells × {args.targets} targets × {args.rows} rows = {2 * rows} rows"
          f" -> {projected:.2f} s of extra attack-stage CPU time "
          f"({projected_paired:.2f} s with one paired call per target)")
    print(f"bootstrap_ms_default_iid={boot_ms['default iid']:.3f}")
    print(f"bootstrap_ms_paper={boot_ms['paper N=11000']:.3f}")
    print(f"projected_default_s={projected:.3f}")
    print(f"projected_default_paired_s={projected_paired:.3f}")


def bench_coverage(args: argparse.Namespace) -> None:
    """Print the coverage of 95 % percentile intervals on two Gaussians."""
    n_pos, n_neg = args.coverage_shape
    d = args.separation
    truth = {"auc": norm.cdf(d / np.sqrt(2))}
    truth |= {metrics.tpr_metric_name(a): norm.cdf(d - norm.ppf(1 - a))
              for a in metrics.FPR_LEVELS}
    hits = dict.fromkeys(truth, 0)
    width = {k: [] for k in truth}
    rng = np.random.default_rng(args.seed)
    for rep in range(args.coverage_reps):
        s, m = gaussians(rng, n_pos, n_neg, d)
        reps = bootstrap_replicates(s, m, n_boot=args.n_boot, seed=rep)
        for k, v in truth.items():
            low, high = percentile_interval(reps[k])
            hits[k] += bool(low <= v <= high)
            width[k].append(high - low)
    print(f"P = {n_pos}, Q = {n_neg}, d = {d}, B = {args.n_boot}, "
          f"{args.coverage_reps} samples; 95 % percentile intervals")
    print(f"{'metric':<10}{'α·Q':>7}{'true':>8}{'coverage':>10}{'mean width':>12}")
    for k, v in truth.items():
        aq = "" if k == "auc" else f"{n_neg * float(k[4:-1]) / 100:g}"
        print(f"{k:<10}{aq:>7}{v:>8.4f}{hits[k] / args.coverage_reps:>10.3f}"
              f"{np.mean(width[k]):>12.4f}")
    for k in truth:
        print(f"coverage_{k}={hits[k] / args.coverage_reps:.3f}")


def main(argv: list[str] | None = None) -> None:
    """Run the timing (default) or the coverage benchmark."""
    args = parse_args(argv)
    (bench_coverage if args.coverage else bench_timing)(args)


if __name__ == "__main__":
    main()
