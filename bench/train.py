"""Benchmark: one FedAvg round of K clients against centralized training on the same samples.

AlexNet (CIFAR variant, 100 classes) on random uint8 images of CIFAR shape held
on the device (:class:`fedmia.federation.fedavg.DeviceData`). Both sides process the same
K × n samples once, with the same model, batch size and SGD settings (momentum,
weight decay, learning rate of rounds 1 and 2), and end with the same evaluation pass
over ``--test-samples`` samples. Each side is timed in steady state, on the second of
two rounds (epochs): a run allocates its buffers once (the server's K×P uploads, the
optimizer's momentum), which 300 rounds amortise.

* ``fedavg``: the second, unobserved round of :func:`fedmia.federation.fedavg.run_fedavg`
  (``rounds=2``, no defense; 270 of the paper's 300 rounds are unobserved): per client,
  reload the global model, a fresh optimizer, one local epoch, its upload; then the
  weighted aggregate, its divergence probe and the test pass;
* ``fedavg_observed``: the same round observed (the server's view is saved by the train
  stage, not here; the divergence probe also runs each uploaded model);
* ``central``: the second epoch of a plain SGD loop over all K × n samples (one
  optimizer, a new shuffled order per epoch), then the test pass.

Repeats are interleaved; medians are reported, with the wall time and this process's
CPU time (on a shared machine the CPU time is the steadier number). The last lines are
machine-readable: ``fl_overhead`` (unobserved FedAvg round time / centralized time − 1,
wall clock), ``fl_overhead_observed``, ``fl_overhead_cpu`` (the same ratio in CPU time),
``fedavg_samples_per_s``, ``central_samples_per_s`` and ``device``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from fedmia.core.config import TrainConfig
from fedmia.federation.defenses import Defense
from fedmia.federation.fedavg import DeviceData, evaluate, run_fedavg
from fedmia.federation.models import build_model
from fedmia.federation.state import FlatState
from fedmia.stages.compute import device_name, setup_compute

CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--clients", type=int, default=10, help="clients K")
    p.add_argument("--samples-per-client", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--test-samples", type=int, default=100)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (0: torch's default); see bench/measures.py",
    )
    p.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat (for CI)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.smoke:
        args.clients, args.samples_per_client, args.batch_size = 3, 8, 4
        args.test_samples, args.repeats = 4, 1
    return args


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (timing)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def central_epoch(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    data: DeviceData,
    idx: torch.Tensor,
    test_idx: torch.Tensor,
    cfg: TrainConfig,
    gen: torch.Generator,
) -> None:
    """One epoch of plain SGD over samples ``idx`` (one shuffled order), then a test pass."""
    model.train()
    order = idx[torch.randperm(idx.numel(), generator=gen).to(idx.device)]
    for start in range(0, order.numel(), cfg.batch_size):
        x, y = data.batch(order[start : start + cfg.batch_size])
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    evaluate(model, data, test_idx, cfg.eval_batch_size)


def sgd(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer FedAvg's clients use, for the centralized side."""
    return torch.optim.SGD(
        model.parameters(), lr=cfg.lr_at(1), momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )


def clock() -> tuple[float, float]:
    """(wall, process CPU) seconds."""
    return time.perf_counter(), time.process_time()


ROUTES = ("fedavg", "fedavg_observed", "central")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; return the exit status."""
    args = parse_args(argv)
    device = setup_compute(args.device, args.threads)
    name = device_name(device)

    k, n = args.clients, args.samples_per_client
    total = k * n
    rng = np.random.default_rng(args.seed)
    images = rng.integers(0, 256, size=(total + args.test_samples, 3, 32, 32), dtype=np.uint8)
    labels = rng.integers(0, args.classes, size=total + args.test_samples)
    data = DeviceData.from_arrays(images, labels, CIFAR100_MEAN, CIFAR100_STD, args.classes, device)
    all_idx = torch.arange(total, device=device)
    client_idx = list(all_idx.split(n))
    test_idx = torch.arange(total, total + args.test_samples, device=device)
    # two rounds (the second is timed); observe_every beyond them: only observe_rounds
    cfgs = {
        "fedavg": TrainConfig(
            rounds=2, batch_size=args.batch_size, test_every=1, observe_every=3, observe_rounds=()
        ),
        "fedavg_observed": TrainConfig(
            rounds=2, batch_size=args.batch_size, test_every=1, observe_every=3, observe_rounds=(2,)
        ),
    }
    cfg = cfgs["fedavg"]
    assert cfg.lr_at(1) == cfg.lr_at(2) and cfg.observed() == []

    fl_state = FlatState(build_model("alexnet", args.classes, seed=args.seed).to(device))
    fl_init = fl_state.snapshot()
    central = build_model("alexnet", args.classes, seed=args.seed).to(device)
    central_init = {name: t.clone() for name, t in central.state_dict().items()}
    print(
        f"AlexNet/{args.classes} classes; K={k} clients × {n} samples = {total}; "
        f"batch {args.batch_size}; test pass {args.test_samples}; device={name}; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )

    # warm-up (allocator, oneDNN primitives), untimed: both sides on one client's samples
    for _ in run_fedavg(fl_state, data, client_idx[:1], test_idx, cfg, Defense(), args.seed):
        pass
    central_epoch(central, sgd(central, cfg), data, client_idx[0], test_idx, cfg, torch.Generator())
    wall: dict[str, list[float]] = {r: [] for r in ROUTES}
    cpu: dict[str, list[float]] = {r: [] for r in ROUTES}
    for rep in range(args.repeats):
        for route in ("fedavg", "fedavg_observed"):
            fl_state.load(fl_init)
            marks = []
            sync(device)
            for _ in run_fedavg(
                fl_state, data, client_idx, test_idx, cfgs[route], Defense(), args.seed
            ):
                sync(device)
                marks.append(clock())
            wall[route].append(marks[1][0] - marks[0][0])
            cpu[route].append(marks[1][1] - marks[0][1])

        central.load_state_dict(central_init)
        opt = sgd(central, cfg)
        gen = torch.Generator().manual_seed(args.seed + rep)
        marks = []
        for _ in range(2):
            central_epoch(central, opt, data, all_idx, test_idx, cfg, gen)
            sync(device)
            marks.append(clock())
        wall["central"].append(marks[1][0] - marks[0][0])
        cpu["central"].append(marks[1][1] - marks[0][1])
        print(
            f"repeat {rep + 1}/{args.repeats}: "
            + ", ".join(f"{r} {t[-1]:.2f} s" for r, t in wall.items()),
            flush=True,
        )

    med = {r: statistics.median(t) for r, t in wall.items()}
    med_cpu = {r: statistics.median(t) for r, t in cpu.items()}
    print(
        f"\n{'route':<16}{'median s':>10}{'min s':>9}{'max s':>9}{'samples/s':>11}"
        f"{'median CPU s':>14}"
    )
    for r, t in wall.items():
        print(
            f"{r:<16}{med[r]:>10.4f}{min(t):>9.3f}{max(t):>9.3f}{total / med[r]:>11.1f}"
            f"{med_cpu[r]:>14.4f}"
        )
    print()
    print(f"fl_overhead={med['fedavg'] / med['central'] - 1:.4f}")
    print(f"fl_overhead_observed={med['fedavg_observed'] / med['central'] - 1:.4f}")
    print(f"fl_overhead_cpu={med_cpu['fedavg'] / med_cpu['central'] - 1:.4f}")
    print(f"fedavg_samples_per_s={total / med['fedavg']:.2f}")
    print(f"central_samples_per_s={total / med['central']:.2f}")
    print(f"device={name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
