"""Run-epochs per second of packed training (grokhpc.train_batched) for R = 1, 2, 4, 8 runs,
side by side with one solo ``Trainer`` in the same invocation, on the seed config (p = 113).

    python benchmarks/bench_batched.py [--runs 1,2,4,8] [--epochs 20] [--repeats 3]
                                       [--modes exact,batched] [--p 113]
                                       [--shape seed|quickstart] [--clock wall|cpu]

Each measurement is ``--epochs`` epochs of the training loop as ``fit`` runs it (one step per
epoch, the test set scored every ``eval_every`` epochs), without the commits (file writes are
the same per run either way). The R runs of a group differ in seeds, train fraction, lr and
weight decay like a sweep's. Blocks alternate (solo, then every R and mode) within a repeat so
machine noise hits all alike; the table gives medians over repeats and the ratio of each
group's run-epochs/s to the solo trainer's epochs/s. Modes: ``exact`` (the CPU default:
solo forward run by run, stacked optimiser and bookkeeping) and ``batched`` (one batched
computation over all runs; the GPU default). ``--shape quickstart``: the model of
sweeps/quickstart.yaml (p = 37, d_model 64, d_mlp 256, lr 1e-2) instead of the seed's.
``--clock cpu``: this process's CPU time instead of wall time (on a shared machine the wall
time counts waits for a core; CPU time counts the work, and at 2 threads a thread's spinning).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time


def group_configs(base, r: int):
    """R same-shaped runs differing as a sweep's do."""
    fracs = (0.3, 0.35, 0.4, 0.3)
    wds = (1.0, 0.5, 2.0, 0.3)
    return [base.replace(model_seed=999 + i, data_seed=598 + i, train_frac=fracs[i % 4],
                         weight_decay=wds[(i // 4) % 4], lr=1e-3 * (1 + 0.1 * i))
            for i in range(r)]


CLOCK = {"wall": time.perf_counter, "cpu": time.process_time}
QUICKSTART = dict(p=37, d_model=64, d_head=16, n_heads=4, d_mlp=256, lr=1e-2, weight_decay=1.0)


def timed(fn, epochs: int, clock=time.perf_counter) -> float:
    t0 = clock()
    fn(epochs)
    return clock() - t0


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default="1,2,4,8", help="comma-separated group sizes R")
    ap.add_argument("--epochs", type=int, default=20, help="epochs per timed block")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--modes", default="exact,batched", help="exact, batched")
    ap.add_argument("--p", type=int, default=None, help="default: the shape's")
    ap.add_argument("--shape", choices=["seed", "quickstart"], default="seed")
    ap.add_argument("--clock", choices=sorted(CLOCK), default="wall")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    args = ap.parse_args(argv)

    import torch

    from grokhpc.config import RunConfig
    from grokhpc.store import RunDir
    from grokhpc.train import Trainer
    from grokhpc.stack import Stack

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_float32_matmul_precision("highest")
    dev = torch.device("cpu")
    base = RunConfig(device="cpu", **(QUICKSTART if args.shape == "quickstart" else {}))
    if args.p is not None:
        base = base.replace(p=args.p)
    clock = CLOCK[args.clock]
    sizes = [int(x) for x in args.runs.split(",")]
    modes = [m for m in args.modes.split(",") if m]
    with tempfile.TemporaryDirectory() as tmp:
        solo = Stack([Trainer(base, RunDir(f"{tmp}/solo"), dev)], dev, exact=True)   # alone
        stacks = {}
        for r in sizes:
            cfgs = group_configs(base, r)
            trainers = [Trainer(c, RunDir(f"{tmp}/R{r}_{i}"), dev) for i, c in enumerate(cfgs)]
            for mode in modes:
                stacks[(r, mode)] = Stack(trainers, dev, exact=(mode == "exact"))

        def group_epochs(stack):
            def run(n):
                for _ in range(n):
                    stack.step()
                    if stack.epoch % base.eval_every == 0:
                        stack.evaluate()
            return run

        solo_epochs = group_epochs(solo)
        solo_epochs(2)  # warm-up
        for s in stacks.values():
            group_epochs(s)(2)
        times = {"solo": []}
        times.update({k: [] for k in stacks})
        for _ in range(args.repeats):
            times["solo"].append(timed(solo_epochs, args.epochs, clock))
            for k, s in stacks.items():
                times[k].append(timed(group_epochs(s), args.epochs, clock))

    solo_rate = statistics.median(args.epochs / t for t in times["solo"])
    print(f"machine: {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} torch threads, torch {torch.__version__}; "
          f"{args.shape} shape, p={base.p}, {args.clock} time, {args.epochs} epochs per block, "
          f"median of {args.repeats} repeats; load average {os.getloadavg()[0]:.1f}")
    print(f"{'way':<22}{'R':>4}{'run-epochs/s':>15}{'ratio to solo':>15}{'ms/epoch':>11}")
    print(f"{'solo (a stack of one)':<22}{1:>4}{solo_rate:>15.2f}{1.0:>15.2f}"
          f"{1000 / solo_rate:>11.1f}")
    for mode in modes:
        for r in sizes:
            rate = statistics.median(r * args.epochs / t for t in times[(r, mode)])
            print(f"{'train_group ' + mode:<22}{r:>4}{rate:>15.2f}{rate / solo_rate:>15.2f}"
                  f"{1000 * r / rate:>11.1f}")


if __name__ == "__main__":
    main()
