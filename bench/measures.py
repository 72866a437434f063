"""Benchmark: the per-sample measures of one observed round, four ways, in one process.

A CIFAR model of :data:`fedmia.federation.models.MODELS` (``--model``: AlexNet by default, or
the paper's GroupNorm ResNet18), 100 classes, 3×32×32 inputs, K client updates of
scale ``--update-scale``, N evaluation samples. Routes, timed interleaved per repeat:

(a) ``fedmia``: :func:`fedmia.attacker.measures.compute_round_measures` with the layer-wise
    route (loss, cos, grad_diff, grad_norm for all K clients);
(b) ``naive``: as the official code does it — for each client, batches of 10
    samples, one backward pass per sample (``autograd.grad`` of that sample's
    loss), then cosine, difference and norm against that client's update, plus
    the client's loss forward pass;
(c) ``floor``: one batched forward+backward over the same samples (in chunks of
    ``--chunk``) plus K batched forward passes (``--batch-size``): the same work
    without per-sample resolution;
(d) ``torch.func``: ``compute_round_measures`` with the vmap-of-grad route (for
    information).

(a) and (b) must agree (max over each measure of |a − b| / max |b| ≤ 1e-4, else
exit 1). ``--memory-check`` then runs route (a) alone in two subprocesses, on N
and 4N samples, to show that its peak memory is set by the chunk, not by N.

The last lines are machine-readable: ``speedup_vs_naive`` (naive time per sample
/ fedmia time per sample), ``cost_vs_floor`` (fedmia / floor time; on the CPU also
``cost_vs_floor_cpu``, the same in CPU time of the process, steadier where other work
shares the cores), ``peak_rss_mb``
(peak resident memory while route (a) ran) and ``device``.
"""

from __future__ import annotations

import argparse
import ctypes
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from fedmia.attacker.layerwise import layerwise_grad_products
from fedmia.attacker.measures import compute_round_measures, per_sample_grad_products
from fedmia.federation.models import MODELS, build_model
from fedmia.federation.state import FlatState
from fedmia.stages.compute import device_name, setup_compute

TOLERANCE = 1e-4


ROUTES = ("fedmia", "naive", "floor", "torch.func")


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is too small; give an integer >= 1")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--model",
        choices=MODELS.names(),
        default="alexnet",
        help="model architecture (fedmia.federation.models.MODELS)",
    )
    p.add_argument("--samples", type=positive_int, default=256, help="evaluation samples N")
    p.add_argument(
        "--naive-samples",
        type=int,
        default=64,
        help="samples for the naive route (at most --samples; 0: all): it costs "
        "K backward passes per sample, so its time is scaled per sample",
    )
    p.add_argument("--clients", type=positive_int, default=10, help="client updates K")
    p.add_argument("--classes", type=positive_int, default=100)
    p.add_argument(
        "--chunk",
        type=positive_int,
        default=128,
        help="samples per gradient chunk (the measure stage's default measure.chunk_size)",
    )
    p.add_argument(
        "--batch-size", type=positive_int, default=500, help="samples per loss forward pass"
    )
    p.add_argument("--update-scale", type=float, default=1e-2)
    p.add_argument("--repeats", type=positive_int, default=3)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (0: torch's default). 1 by default: per-core rates, "
        "and on a shared 2-core machine two OpenMP threads wait on each other "
        "for whole scheduler slices, slowing small ops 3-10x",
    )
    p.add_argument(
        "--routes",
        default=",".join(ROUTES),
        help=f"comma-separated routes to run, of {', '.join(ROUTES)}",
    )
    p.add_argument(
        "--memory-check",
        action="store_true",
        help="also run route (a) alone on N and 4N samples in subprocesses",
    )
    p.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat (for CI)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    unknown = sorted({r.strip() for r in args.routes.split(",") if r.strip()} - set(ROUTES))
    if unknown:
        p.error(f"argument --routes: unknown route(s) {unknown}; choose from {list(ROUTES)}")
    if args.smoke:
        args.samples, args.naive_samples, args.clients = 8, 4, 3
        args.chunk, args.batch_size, args.repeats = 4, 8, 1
    if args.naive_samples <= 0 or args.naive_samples > args.samples:
        args.naive_samples = args.samples
    return args


# ----------------------------------------------------------------------------- memory


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux ≥ 4.0); False if impossible.

    Memory the C allocator still holds from earlier work is handed back first
    (glibc ``malloc_trim``), so the mark starts from what is live.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (since the last reset, if any)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ----------------------------------------------------------------------------- routes


def naive(
    state: FlatState, w: torch.Tensor, uploads: torch.Tensor, x: torch.Tensor, y: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The official code's way: per client, batches of 10, one backward per sample."""
    model = state.module.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    mask = state.layout.param_mask().to(w.device)
    k, n = uploads.shape[0], len(y)
    out = {m: torch.empty(k, n, device=w.device) for m in ("loss", "cos", "grad_diff")}
    out["grad_norm"] = torch.empty(n, device=w.device)
    for c in range(k):
        state.load(w - uploads[c])
        with torch.no_grad():
            for s in range(0, n, 10):
                out["loss"][c, s : s + 10] = F.cross_entropy(
                    model(x[s : s + 10]), y[s : s + 10], reduction="none"
                )
        state.load(w)
        # float64 reductions: the check then measures fedmia's error, not this route's own
        # (a float32 dot over ResNet18's 11M terms is off by ~6e-4; grad_diff cancels)
        d = uploads[c][mask].double()
        for s in range(0, n, 10):
            losses = F.cross_entropy(model(x[s : s + 10]), y[s : s + 10], reduction="none")
            for j in range(len(losses)):
                grads = torch.autograd.grad(losses[j], params, retain_graph=True)
                g = torch.cat([t.reshape(-1) for t in grads]).double()
                i = s + j
                out["grad_norm"][i] = g @ g
                out["cos"][c, i] = (g @ d) / (g.norm() * d.norm())
                out["grad_diff"][c, i] = d @ d - (d - g) @ (d - g)  # ‖Δ‖² ≫ |grad_diff|
    return {m: v.cpu() for m, v in out.items()}


def floor(
    state: FlatState,
    w: torch.Tensor,
    uploads: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    chunk: int,
    batch_size: int,
) -> None:
    """One batched forward+backward over the samples, plus K batched forward passes."""
    model = state.module.eval()
    state.load(w)
    for s in range(0, len(y), chunk):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[s : s + chunk]), y[s : s + chunk]).backward()
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        for c in range(uploads.shape[0]):
            state.load(w - uploads[c])
            for s in range(0, len(y), batch_size):
                model(x[s : s + batch_size])
    state.load(w)


def fedmia_route(state, w, uploads, x, y, chunk, batch_size, grad_products=None):
    """``compute_round_measures`` (layer-wise route unless another is given)."""
    m = compute_round_measures(
        state,
        w,
        uploads,
        x,
        y,
        chunk_size=chunk,
        batch_size=batch_size,
        grad_products=grad_products or layerwise_grad_products,
    )
    return {"loss": m.loss, "cos": m.cos, "grad_diff": m.grad_diff, "grad_norm": m.grad_norm}


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, float, float, object]:
    """Seconds, CPU seconds of this process, peak RSS (MiB) and result of one call."""
    reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0, c0 = time.perf_counter(), time.process_time()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0, time.process_time() - c0, peak_rss_mb(), result


def max_rel_error(
    got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], n: int
) -> dict[str, float]:
    """Per measure, max |got − want| / max |want| over the first n samples."""
    errs = {}
    for m, w in want.items():
        g = got[m][..., :n].double()
        w = w.double()
        errs[m] = float((g - w).abs().max() / w.abs().max().clamp_min(1e-30))
    return errs


# ----------------------------------------------------------------------------- main


def memory_check(args: argparse.Namespace) -> None:
    """Run route (a) alone on N and 4N samples in fresh processes; print their peaks."""
    peaks = {}
    for n in (args.samples, 4 * args.samples):
        cmd = [
            sys.executable,
            __file__,
            "--model",
            args.model,
            "--routes",
            "fedmia",
            "--repeats",
            "1",
            "--samples",
            str(n),
            "--chunk",
            str(args.chunk),
            "--clients",
            str(args.clients),
            "--classes",
            str(args.classes),
            "--batch-size",
            str(args.batch_size),
            "--device",
            args.device,
            "--threads",
            str(args.threads),
        ]
        r = subprocess.run(cmd, capture_output=True, text=True, check=True)
        vals = dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)
        peaks[n] = float(vals["peak_rss_mb"])
        print(f"memory check: route (a) alone, N={n:5d}: peak RSS {peaks[n]:8.1f} MiB")
    n1, n4 = args.samples, 4 * args.samples
    data_mb = 3 * n1 * (3 * 32 * 32 * 4 + 8) / 2**20
    print(
        f"memory check: 4N − N = {peaks[n4] - peaks[n1]:+.1f} MiB for {3 * n1} more samples "
        f"(their inputs alone: {data_mb:.1f} MiB; chunk = {args.chunk})"
    )
    print(f"memory_peak_rss_mb_N={peaks[n1]:.1f}")
    print(f"memory_peak_rss_mb_4N={peaks[n4]:.1f}")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; return the exit status."""
    args = parse_args(argv)
    device = setup_compute(args.device, args.threads)
    name = device_name(device)
    routes = [r.strip() for r in args.routes.split(",") if r.strip()]

    model = build_model(args.model, args.classes, seed=args.seed).to(device)
    state = FlatState(model)
    w = state.snapshot()
    g = torch.Generator().manual_seed(args.seed)
    mask = state.layout.param_mask()
    uploads = (args.update_scale * torch.randn(args.clients, w.numel(), generator=g) * mask).to(
        device
    )
    x = torch.randn(args.samples, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, args.classes, (args.samples,), generator=g).to(device)
    nn_ = args.naive_samples
    print(
        f"{args.model}/{args.classes} classes, {int(mask.sum()):,} parameters; K={args.clients} "
        f"updates; N={args.samples} samples (naive: {nn_}); chunk={args.chunk}; "
        f"device={name}; torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    if nn_ < args.samples:
        print(f"naive route runs on {nn_} of {args.samples} samples; its time is scaled per sample")

    jobs: dict[str, Callable[[int], object]] = {  # each on the first n samples
        "fedmia": lambda n: fedmia_route(
            state, w, uploads, x[:n], y[:n], args.chunk, args.batch_size
        ),
        "naive": lambda n: naive(state, w, uploads, x[:n], y[:n]),
        "floor": lambda n: floor(state, w, uploads, x[:n], y[:n], args.chunk, args.batch_size),
        "torch.func": lambda n: fedmia_route(
            state,
            w,
            uploads,
            x[:n],
            y[:n],
            args.chunk,
            args.batch_size,
            grad_products=per_sample_grad_products,
        ),
    }
    samples = {r: (nn_ if r == "naive" else args.samples) for r in routes}
    for r in routes:  # warm-up (allocator, oneDNN primitives), untimed
        jobs[r](min(2 if r == "naive" else args.chunk, samples[r]))
    times: dict[str, list[float]] = {r: [] for r in routes}
    cpu: dict[str, list[float]] = {r: [] for r in routes}
    peaks: dict[str, float] = {r: 0.0 for r in routes}
    results: dict[str, object] = {}
    for rep in range(args.repeats):
        for r in routes:
            sec, cpu_sec, peak, res = timed(lambda r=r: jobs[r](samples[r]), device)
            times[r].append(sec)
            cpu[r].append(cpu_sec)
            peaks[r] = max(peaks[r], peak)
            results[r] = res
        print(
            f"repeat {rep + 1}/{args.repeats}: "
            + ", ".join(f"{r} {times[r][-1]:.2f} s" for r in routes),
            flush=True,
        )

    med = {r: statistics.median(t) for r, t in times.items()}
    per = {r: med[r] / samples[r] for r in routes}
    print(
        f"\n{'route':<12}{'samples':>8}{'median s':>10}{'min s':>9}{'max s':>9}"
        f"{'ms/sample':>11}{'samples/s':>11}{'peak RSS MiB':>14}"
    )
    for r in routes:
        print(
            f"{r:<12}{samples[r]:>8}{med[r]:>10.3f}{min(times[r]):>9.3f}{max(times[r]):>9.3f}"
            f"{1e3 * per[r]:>11.2f}{1 / per[r]:>11.1f}{peaks[r]:>14.1f}"
        )
    if device.type == "cuda":
        print(
            f"peak CUDA memory (last route): "
            f"{torch.cuda.max_memory_allocated(device) / 2**20:.1f} MiB"
        )
    print(f"process peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.1f} MiB")

    status = 0
    if "fedmia" in routes and "naive" in routes:
        errs = max_rel_error(results["fedmia"], results["naive"], nn_)
        worst = max(errs.values())
        print(
            "fedmia vs naive, max |a−b|/max|b|: "
            + ", ".join(f"{m} {e:.2e}" for m, e in errs.items())
        )
        if worst > TOLERANCE:
            print(f"ERROR: fedmia and naive disagree ({worst:.2e} > {TOLERANCE:.0e})")
            status = 1
    if args.memory_check:
        memory_check(args)
    print()
    if "naive" in per and "fedmia" in per:
        print(f"speedup_vs_naive={per['naive'] / per['fedmia']:.3f}")
    if "floor" in per and "fedmia" in per:
        print(f"cost_vs_floor={per['fedmia'] / per['floor']:.3f}")
        if device.type == "cpu":  # one thread: the work itself, whatever else shares the cores
            ratio = statistics.median(cpu["fedmia"]) / statistics.median(cpu["floor"])
            print(f"cost_vs_floor_cpu={ratio:.3f}")
    if "fedmia" in per:
        print(f"peak_rss_mb={peaks['fedmia']:.1f}")
    print(f"device={name}")
    return status


if __name__ == "__main__":
    sys.exit(main())
