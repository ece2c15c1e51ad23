"""The stacked Adam(W) step: per weight (StackedAdamW) against one flat buffer
(FlatStackedAdamW, optionally compiled), seed-config weight shapes, R runs; and a whole
batched Stack epoch in the eager and the fused step mode.

    python benchmarks/bench_stacked_optim.py [--rs 8,16,32] [--repeats 7] [--device cpu]
                                             [--compile] [--stack-r 8]

Each optimiser is stepped ``--steps`` times per timed block; blocks of the ways alternate
(side by side, so machine load hits each alike) and the table gives the median ms per step
over ``--repeats`` blocks, and the ratio per-weight / flat.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time


def weights(R: int, device, gen):
    """R runs' trainable weights of the seed config (p = 113, d_model 128, 4 heads, d_mlp 512)."""
    import torch

    from grokhpc.config import RunConfig
    from grokhpc.model import build_model

    model = build_model(RunConfig(device="cpu"))
    shapes = [p.shape for p in model.parameters() if p.requires_grad]
    return [torch.randn((R, *s), generator=gen).to(device) for s in shapes]


def optimiser(kind: str, R: int, device, gen):
    import torch

    from grokhpc.stacked_optim import FlatStackedAdamW, StackedAdamW

    W = weights(R, device, gen)
    args = ([w.clone().requires_grad_() for w in W], [1e-3] * R, [1.0] * R, [(0.9, 0.98)] * R,
            [0] * R, [torch.zeros_like(w) for w in W], [torch.zeros_like(w) for w in W])
    if kind == "per weight":
        opt = StackedAdamW(*args)
    else:
        opt = FlatStackedAdamW(*args, compiled=kind == "flat, compiled")
    grads = [torch.randn(w.shape, generator=gen).to(device) * 1e-3 for w in W]
    return opt, grads


def step_ms(opt, grads, steps: int, sync) -> float:
    for p, g in zip(opt.params, grads):
        p.grad = g
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.step()
    sync()
    return (time.perf_counter() - t0) * 1e3 / steps


def optimiser_table(args, device, sync) -> None:
    import torch

    kinds = ["per weight", "flat"] + (["flat, compiled"] if args.compile else [])
    print("| R | " + " | ".join(f"{k} ms/step" for k in kinds)
          + " | per weight / flat |" + (" per weight / compiled |" if args.compile else ""))
    print("|---:|" + "---:|" * (len(kinds) + 1 + bool(args.compile)))
    for R in [int(x) for x in args.rs.split(",")]:
        gen = torch.Generator().manual_seed(0)
        ways = {k: optimiser(k, R, device, gen) for k in kinds}
        for opt, grads in ways.values():   # first steps (compilation, allocation) untimed
            step_ms(opt, grads, 2, sync)
        times = {k: [] for k in kinds}
        for _ in range(args.repeats):
            for k, (opt, grads) in ways.items():
                times[k].append(step_ms(opt, grads, args.steps, sync))
        med = {k: statistics.median(v) for k, v in times.items()}
        cells = " | ".join(f"{med[k]:.2f}" for k in kinds)
        extra = f" {med['per weight'] / med['flat, compiled']:.2f} |" if args.compile else ""
        print(f"| {R} | {cells} | {med['per weight'] / med['flat']:.2f} |{extra}", flush=True)


def stack_table(args, device, sync) -> None:
    """Median ms per batched Stack epoch (seed config, test scoring every 10 epochs)."""
    import tempfile
    from pathlib import Path

    from grokhpc.config import RunConfig
    from grokhpc.store import RunDir
    from grokhpc.train import Trainer
    from grokhpc.stack import Stack

    R = args.stack_r
    base = RunConfig(device=str(device))
    with tempfile.TemporaryDirectory() as tmp:
        trainers = [Trainer(base.replace(model_seed=i, data_seed=i), RunDir(Path(tmp) / str(i)),
                            device) for i in range(R)]
        stacks = {m: Stack(trainers, device, exact=False, step_mode=m)
                  for m in ("eager", "fused")}
        times = {m: [] for m in stacks}
        for _ in range(args.repeats):
            for m, stack in stacks.items():
                sync()
                t0 = time.perf_counter()
                for _ in range(args.stack_epochs):
                    stack.step()
                    if stack.epoch % 10 == 0:
                        stack.evaluate()
                sync()
                times[m].append((time.perf_counter() - t0) * 1e3 / args.stack_epochs)
    med = {m: statistics.median(v) for m, v in times.items()}
    print(f"\nbatched Stack epoch, R = {R}, seed config: eager {med['eager']:.1f} ms, fused "
          f"{med['fused']:.1f} ms (eager / fused {med['eager'] / med['fused']:.2f}; median of "
          f"{args.repeats} blocks of {args.stack_epochs} epochs)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rs", default="8,16,32")
    ap.add_argument("--steps", type=int, default=5, help="optimiser steps per timed block")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch threads on CPU")
    ap.add_argument("--compile", action="store_true", help="also the torch.compile'd update")
    ap.add_argument("--stack-r", type=int, default=0, help="also time Stack epochs at this R")
    ap.add_argument("--stack-epochs", type=int, default=5)
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    print(f"torch {torch.__version__}, {device}, {torch.get_num_threads()} thread(s), "
          f"median of {args.repeats} side-by-side blocks of {args.steps} steps\n")
    optimiser_table(args, device, sync)
    if args.stack_r:
        stack_table(args, device, sync)
    return 0


if __name__ == "__main__":
    sys.exit(main())
