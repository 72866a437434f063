"""Benchmark: bootstrap replicates of one attack row against one plain metrics call.

For each shape (P members, Q non-members) the scores are two unit-variance Gaussians
``d`` apart (members higher; ``d = 1`` gives AUC 0.76). Timed, interleaved, median of
``--repeats``:

* ``metrics``: one :func:`fedmia.attacker.metrics.attack_metrics` call (what a row costs now);
* ``boot``: one :func:`fedmia.attacker.uncertainty.bootstrap_replicates` call with
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
from scipy.stats import beta as beta_dist
from scipy.stats import norm

from fedmia.attacker import metrics
from fedmia.attacker.uncertainty import (
    Stratum,
    _blocks,
    bootstrap_replicates,
    mean_interval,
    percentile_interval,
    run_replicate_means,
    stable_seed,
    stratified_replicates,
    t_interval,
)

HEADLINE = metrics.tpr_metric_name(0.001)

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
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap replicates B")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--separation", type=float, default=1.0, help="Gaussian shift d")
    p.add_argument(
        "--rows", type=int, default=21, help="attack rows per cell and target (rounds × attacks)"
    )
    p.add_argument("--targets", type=int, default=10)
    p.add_argument(
        "--coverage", action="store_true", help="estimate interval coverage instead of timing"
    )
    p.add_argument("--coverage-reps", type=int, default=200)
    p.add_argument("--coverage-shape", type=int, nargs=2, default=(500, 1000), metavar=("P", "Q"))
    p.add_argument(
        "--coverage-runs",
        type=int,
        default=200,
        help="simulated studies of the shared-pool simulation",
    )
    p.add_argument("--sim-seeds", type=int, default=3, help="runs S of a study (≥ 3)")
    p.add_argument("--sim-targets", type=int, default=10)
    p.add_argument("--sim-members", type=int, default=40)
    p.add_argument("--sim-heldout", type=int, default=1000)
    p.add_argument(
        "--sim-d",
        type=float,
        nargs=2,
        default=(0.5, 0.3),
        metavar=("A", "B"),
        help="member shifts of the two attacks",
    )
    p.add_argument("--sim-run-sd", type=float, default=0.1, help="σ of the run effect")
    p.add_argument("--sim-target-sd", type=float, default=0.2, help="σ of a target's effect")
    p.add_argument(
        "--sim-rho",
        type=float,
        default=0.6,
        help="weight of a sample's difficulty, shared by all targets' scores",
    )
    p.add_argument(
        "--sim-kappa", type=float, default=0.5, help="correlation of the two attacks' sample noise"
    )
    p.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat (for CI)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.smoke:
        args.n_boot, args.repeats, args.coverage_reps, args.rows = 50, 1, 5, 3
        args.coverage_runs, args.sim_targets, args.sim_members = 4, 4, 20
    return args


def gaussians(
    rng: np.random.Generator, n_pos: int, n_neg: int, d: float
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
    print(
        f"B = {args.n_boot}, d = {args.separation}, median of {args.repeats}; ms per row "
        f"(CPU time unless 'wall'); 'paired': {args.rows} rows of one target in one call"
    )
    print(
        f"{'shape':<22}{'P':>6}{'Q':>7}{'blocks':>7}{'metrics':>9}{'boot':>8}"
        f"{'boot wall':>11}{'ratio':>7}{'paired':>8}"
    )
    boot_ms, paired_ms = {}, {}
    for label, n_pos, n_neg in SHAPES:
        s, m = gaussians(rng, n_pos, n_neg, args.separation)
        batch = np.stack(
            [s, *(gaussians(rng, n_pos, n_neg, args.separation)[0] for _ in range(args.rows - 1))]
        )  # R×N, same samples
        plain, boot, paired = [], [], []
        for r in range(args.repeats):  # interleaved
            plain.append(timed(metrics.attack_metrics, s, m))
            boot.append(timed(bootstrap_replicates, s, m, n_boot=args.n_boot, seed=r))
            paired.append(timed(bootstrap_replicates, batch, m, n_boot=args.n_boot, seed=r))
        plain_ms = 1e3 * statistics.median(c for _, c in plain)
        wall_ms = 1e3 * statistics.median(w for w, _ in boot)
        boot_ms[label] = 1e3 * statistics.median(c for _, c in boot)
        paired_ms[label] = 1e3 * statistics.median(c for _, c in paired) / args.rows
        print(
            f"{label:<22}{n_pos:>6}{n_neg:>7}{_blocks(s, m).n_blocks:>7}{plain_ms:>9.2f}"
            f"{boot_ms[label]:>8.1f}{wall_ms:>11.1f}{boot_ms[label] / plain_ms:>7.0f}"
            f"{paired_ms[label]:>8.1f}"
        )
    rows = args.rows * args.targets
    cells = ("default iid", "default dirichlet")
    projected = rows * sum(boot_ms[c] for c in cells) / 1e3
    projected_paired = rows * sum(paired_ms[c] for c in cells) / 1e3
    print(
        f"default run: 2 cells × {args.targets} targets × {args.rows} rows = {2 * rows} rows"
        f" -> {projected:.2f} s of extra attack-stage CPU time "
        f"({projected_paired:.2f} s with one paired call per target)"
    )
    print(f"bootstrap_ms_default_iid={boot_ms['default iid']:.3f}")
    print(f"bootstrap_ms_paper={boot_ms['paper N=11000']:.3f}")
    print(f"projected_default_s={projected:.3f}")
    print(f"projected_default_paired_s={projected_paired:.3f}")


def bench_coverage(args: argparse.Namespace) -> None:
    """Print the coverage of 95 % percentile intervals on two Gaussians."""
    n_pos, n_neg = args.coverage_shape
    d = args.separation
    truth = {"auc": norm.cdf(d / np.sqrt(2))}
    truth |= {metrics.tpr_metric_name(a): norm.cdf(d - norm.ppf(1 - a)) for a in metrics.FPR_LEVELS}
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
    print(
        f"P = {n_pos}, Q = {n_neg}, d = {d}, B = {args.n_boot}, "
        f"{args.coverage_reps} samples; 95 % percentile intervals"
    )
    print(f"{'metric':<10}{'α·Q':>7}{'true':>8}{'coverage':>10}{'mean width':>12}")
    for k, v in truth.items():
        aq = "" if k == "auc" else f"{n_neg * float(k[4:-1]) / 100:g}"
        print(
            f"{k:<10}{aq:>7}{v:>8.4f}{hits[k] / args.coverage_reps:>10.3f}"
            f"{np.mean(width[k]):>12.4f}"
        )
    for k in truth:
        print(f"coverage_{k}={hits[k] / args.coverage_reps:.3f}")


# ------------------------------------------------------- runs that share a non-member pool


def expected_tpr(mu: np.ndarray, n_neg: int, alpha: float, points: int = 4000) -> np.ndarray:
    """E[TPR at FPR α] on Q = ``n_neg`` non-members N(0, 1) for members N(μ, 1) (at_most).

    The TPR is the share of members above the (m+1)-th highest non-member score,
    m = ⌊αQ⌋; U = Φ(that score) ~ Beta(Q − m, m + 1), so the expectation is
    E[Φ(μ − Φ⁻¹(U))], computed on ``points`` midpoint quantiles of U.
    """
    m = metrics.max_false_positives(n_neg, alpha, "at_most")
    u = beta_dist.ppf((np.arange(points) + 0.5) / points, n_neg - m, m + 1)
    return norm.cdf(np.asarray(mu)[..., None] - norm.ppf(u)).mean(axis=-1)


def expected_metrics(mu: np.ndarray, n_neg: int) -> dict[str, np.ndarray]:
    """E over evaluation draws of the AUC and TPR@0.1 % for members N(μ, 1)."""
    return {"auc": norm.cdf(np.asarray(mu) / np.sqrt(2)), HEADLINE: expected_tpr(mu, n_neg, 0.001)}


def simulate_run(
    rng: np.random.Generator, args: argparse.Namespace, shift: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One training run: T targets, their members, one held-out pool, two attacks' scores.

    The evaluation set holds T groups of P samples (group t: target t's members) and
    H held-out samples; target t's non-members are the held-out pool and the other
    groups (the "mix" protocol). Sample i has a difficulty z_i ~ N(0, 1) that enters
    its score under every target's model and both attacks (weight ρ: the shared pool);
    attack a's score of sample i under target t is
    ``ρ z_i + √(1 − ρ²) e_ati + μ_at · [i in group t]`` with e_A, e_B correlated κ, so
    every score is N(0, 1) for a non-member and N(μ_at, 1) for a member. The member
    shifts: ``μ_At = d_A + shift + w_t``, ``μ_Bt = d_B + w_t`` (``shift``: the run's
    effect on the difference; w_t ~ N(0, σ_w²): the target's).

    Returns:
        ``(scores, owner, mu)``: float T×2×N (target, attack, sample), int N (−1 held
        out), float T×2 (μ_At, μ_Bt).
    """
    t, p, h = args.sim_targets, args.sim_members, args.sim_heldout
    owner = np.r_[np.repeat(np.arange(t), p), np.full(h, -1)]
    w = rng.normal(0, args.sim_target_sd, size=t)
    mu = np.stack([args.sim_d[0] + shift + w, args.sim_d[1] + w], axis=1)  # T×2
    z = rng.normal(size=len(owner))
    e = rng.normal(size=(t, 2, len(owner)))
    e[:, 1] = args.sim_kappa * e[:, 0] + np.sqrt(1 - args.sim_kappa**2) * e[:, 1]
    rho = args.sim_rho
    member = owner[None, :] == np.arange(t)[:, None]  # T×N
    scores = rho * z + np.sqrt(1 - rho**2) * e + mu[:, :, None] * member[:, None, :]
    return scores, owner, mu


def joint_differences(
    scores: np.ndarray, owner: np.ndarray, n_boot: int, seed: int
) -> dict[str, np.ndarray]:
    """Paired differences A − B per target and replicate from one shared resample.

    One stratum per owner group (held-out pool, each target's group), seeded by the
    group alone, so every target's rows use the same draw of each group: the resample
    of :func:`fedmia.attacker.attacks.run_attacks`. Returns metric → float T×B.
    """
    out: dict[str, list[np.ndarray]] = {"auc": [], HEADLINE: []}
    groups = np.unique(owner)
    strata = [Stratum(stable_seed(seed, int(g)), np.flatnonzero(owner == g)) for g in groups]
    for t in range(scores.shape[0]):
        reps = stratified_replicates(scores[t], owner == t, strata, n_boot=n_boot, alphas=(0.001,))
        for k in out:
            out[k].append(reps[k][0] - reps[k][1])
    return {k: np.stack(v) for k, v in out.items()}


def bench_runs(args: argparse.Namespace) -> None:
    """Coverage of the findings' intervals when targets of one run share a pool.

    Estimands. A *study* is S runs (seeds). For S ≥ 3 the estimand is the population
    mean of the paired difference (attack A − attack B, mean over a run's targets of
    the expected metric over evaluation draws) over runs: over the run effect
    ``shift ~ N(0, σ_run²)`` and the targets' ``w_t ~ N(0, σ_w²)``. For S = 1 it is the
    *within-run* estimand: the run (its shift and its targets' w_t: the trained
    models) fixed, the mean over its T targets of E[metric_A − metric_B] over draws of
    the evaluation samples (members and the held-out pool). Both are computed exactly
    (:func:`expected_metrics`: AUC Φ(μ/√2); for TPR@0.1 % the expectation of the
    estimator on Q non-members, not the population TPR, which it is biased against).

    Methods. ``old``: the previous findings interval, (seed, target) units resampled as
    independent (:func:`fedmia.attacker.uncertainty.mean_interval`). ``t``: the t-interval over
    the S per-seed means (:func:`fedmia.attacker.uncertainty.t_interval`). ``joint``: one run,
    a resample shared by the targets, per replicate the mean over all targets
    (:func:`fedmia.attacker.uncertainty.run_replicate_means`; the findings' S = 1 interval).
    ``joint+targets``: the same with the targets drawn with replacement per replicate.
    """
    n_neg = args.sim_heldout + (args.sim_targets - 1) * args.sim_members
    sd2 = args.sim_run_sd**2 + args.sim_target_sd**2
    x, wq = np.polynomial.hermite_e.hermegauss(80)
    wq = wq / wq.sum()  # E over N(0, 1) as a weighted sum on the nodes
    pop = {
        k: float(
            wq @ expected_metrics(args.sim_d[0] + np.sqrt(sd2) * x, n_neg)[k]
            - wq @ expected_metrics(args.sim_d[1] + args.sim_target_sd * x, n_neg)[k]
        )
        for k in ("auc", HEADLINE)
    }
    metrics_ = ("auc", HEADLINE)
    hits = {
        (m, s, k): 0
        for m, s in (("old", 3), ("t", 3), ("old", 1), ("joint", 1), ("joint+targets", 1))
        for k in metrics_
    }
    width = {key: [] for key in hits}
    rng = np.random.default_rng(args.seed)
    for rep in range(args.coverage_runs):
        runs = [
            simulate_run(rng, args, rng.normal(0, args.sim_run_sd)) for _ in range(args.sim_seeds)
        ]
        per_target = []  # per run: metric → T differences
        for scores, owner, _ in runs:
            vals = {k: [] for k in metrics_}
            for t in range(args.sim_targets):
                m = owner == t
                for k in metrics_:
                    a, b = (
                        metrics.roc_auc(scores[t, i], m)
                        if k == "auc"
                        else metrics.tpr_at_fpr(scores[t, i], m, 0.001)
                        for i in (0, 1)
                    )
                    vals[k].append(a - b)
            per_target.append({k: np.array(v) for k, v in vals.items()})
        joint = joint_differences(*runs[0][:2], args.n_boot, stable_seed("sim", rep))
        truth1 = {
            k: float(
                np.mean(
                    expected_metrics(runs[0][2][:, 0], n_neg)[k]
                    - expected_metrics(runs[0][2][:, 1], n_neg)[k]
                )
            )
            for k in metrics_
        }
        for k in metrics_:
            units = np.concatenate([d[k] for d in per_target])
            intervals = {
                ("old", 3): (mean_interval(units, n_boot=args.n_boot, seed=rep), pop[k]),
                ("t", 3): (t_interval(np.array([d[k].mean() for d in per_target])), pop[k]),
                ("old", 1): (
                    mean_interval(per_target[0][k], n_boot=args.n_boot, seed=rep),
                    truth1[k],
                ),
                ("joint", 1): (percentile_interval(run_replicate_means(joint[k])), truth1[k]),
                ("joint+targets", 1): (
                    percentile_interval(
                        run_replicate_means(joint[k], draw_targets=stable_seed("targets", rep))
                    ),
                    truth1[k],
                ),
            }
            for (method, s), ((lo, hi), true) in intervals.items():
                hits[method, s, k] += bool(lo <= true <= hi)
                width[method, s, k].append(hi - lo)
    n = args.coverage_runs
    print(
        f"\nruns sharing a non-member pool: {n} studies; T = {args.sim_targets} targets × "
        f"P = {args.sim_members} members, {args.sim_heldout} held out (Q = {n_neg}); "
        f"d = {args.sim_d}, σ_run = {args.sim_run_sd}, σ_w = {args.sim_target_sd}, "
        f"ρ = {args.sim_rho}, κ = {args.sim_kappa}, B = {args.n_boot}; 95 % intervals "
        "of the paired difference A − B (the S = 3 rows use the first run's seeds too)"
    )
    print(f"{'method':<15}{'S':>3}{'estimand':>12}{'metric':>10}{'coverage':>10}{'mean width':>12}")
    for (method, s, k), h in hits.items():
        est = "population" if s == 3 else "within-run"
        print(
            f"{method:<15}{s:>3}{est:>12}{k:>10}{h / n:>10.3f}{np.mean(width[method, s, k]):>12.4f}"
        )
    for (method, s, k), h in hits.items():
        print(f"coverage_runs_{method}_s{s}_{k}={h / n:.3f}")


def main(argv: list[str] | None = None) -> None:
    """Run the timing (default) or the coverage benchmark."""
    args = parse_args(argv)
    if args.coverage:
        bench_coverage(args)
        bench_runs(args)
    else:
        bench_timing(args)


if __name__ == "__main__":
    main()
