"""Packed training on a GPU: run-epochs per second and memory for R = 1, 2, 4, ... runs per job,
against one solo run and against the seed's way of training, all in one invocation.

    python benchmarks/gpu_batched.py [--device cuda:0] [--max-r 512] [--epochs 50]
                                     [--out benchmarks/gpu_batched_table.md]
    python benchmarks/gpu_batched.py --device cpu --max-r 2 --epochs 3     # smoke test

Ways timed (seed config p = 113 unless --p; float32 matmuls at "highest" precision, as runs
train):

* seed: the notebook's loop -- full three-position hooked forward ``model(tokens)``, float64
  loss on the last position, ``.item()`` each step, test loss every epoch, and
  ``copy.deepcopy(model.state_dict())`` every 100 epochs;
* solo: one grokhpc ``Trainer`` (fast path, test every eval_every epochs), i.e. one run per job;
* packed R: ``grokhpc.train_batched.Stack`` over R runs (different seeds, train fractions, lr,
  weight decay), ``--mode batched`` (default on GPUs) or ``exact``.

Each way gets ``--warmup`` untimed epochs, then ``--epochs`` timed epochs between
``torch.cuda.synchronize()`` calls (commits excluded). For each R the table also gives
``torch.cuda.max_memory_allocated`` (reset per R), the estimate ``bytes_per_run * R`` that
``auto_runs_per_job`` sizes jobs with, the time of one commit of all R runs (checkpoint row,
state.pt, progress, curves for each), and the projected wall time of a sweep of R runs x
``--sweep-epochs`` epochs (training at the measured rate plus one commit per 100 epochs).
R doubles until --max-r or the device runs out of memory.
"""

from __future__ import annotations

import argparse
import copy
import gc
import math
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path


def group_configs(base, r: int):
    fracs = (0.3, 0.35, 0.4, 0.3)
    wds = (1.0, 0.5, 2.0, 0.3)
    return [base.replace(model_seed=999 + i, data_seed=598 + i, train_frac=fracs[i % 4],
                         weight_decay=wds[(i // 4) % 4], lr=1e-3 * (1 + 0.01 * (i % 50)))
            for i in range(r)]


def check(base, dev, out) -> None:
    """Three tiny runs (p = 17, add, 300 epochs) trained packed -- batched and exact -- and
    alone on ``dev``; prints the largest curve and weight differences and grokking epochs."""
    import numpy as np

    from grokhpc.store import RunDir
    from grokhpc.train import run_training
    from grokhpc.train_batched import train_group

    tiny = base.replace(p=17, op="add", d_model=32, n_heads=4, d_head=8, d_mlp=64, n_epochs=300,
                        checkpoint_every=50, eval_every=10)
    cfgs = [tiny.replace(model_seed=1, data_seed=2, train_frac=0.9, lr=1e-2, weight_decay=1.0),
            tiny.replace(model_seed=3, data_seed=4, train_frac=0.7, lr=5e-3, weight_decay=0.3,
                         betas=(0.85, 0.99)),
            tiny.replace(model_seed=5, data_seed=6, train_frac=0.8, lr=1e-2, weight_decay=2.0)]
    quiet = lambda *a: None  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        solo = [Path(tmp) / f"solo{i}" for i in range(3)]
        for c, d in zip(cfgs, solo):
            run_training(c, d, progress_bar=False, log=quiet)
        for mode in ("solo again", "exact", "batched"):
            dirs = [Path(tmp) / f"{mode.replace(' ', '_')}{i}" for i in range(3)]
            t0 = time.perf_counter()
            if mode == "solo again":  # the device's own run-to-run spread
                for c, d in zip(cfgs, dirs):
                    run_training(c, d, progress_bar=False, log=quiet)
            else:
                train_group(cfgs, dirs, device=dev, progress_bar=False, log=quiet,
                            exact=(mode == "exact"))
            wall = time.perf_counter() - t0
            d_abs = d_rel = d_w = 0.0
            groks = []
            for d, s in zip(dirs, solo):
                a, b = RunDir(d).read_curves(), RunDir(s).read_curves()
                for col in ("train_loss", "test_loss"):
                    x, y = a[col].to_numpy(), b[col].to_numpy()
                    m = ~np.isnan(y)
                    d_abs = max(d_abs, float(np.abs(x[m] - y[m]).max()))
                    d_rel = max(d_rel, float((np.abs(x[m] - y[m]) / np.abs(y[m])).max()))
                wa, wb = RunDir(d).checkpoints(mmap=False)[1], RunDir(s).checkpoints(mmap=False)[1]
                d_w = max(d_w, float(np.abs(wa - wb).max()))
                groks.append((RunDir(d).read_summary()["grokking_epoch"],
                              RunDir(s).read_summary()["grokking_epoch"]))
            out(f"check on {dev}, {mode} vs solo (3 tiny runs, 300 epochs, {wall:.1f} s): "
                f"max |d loss| {d_abs:.3g}, max rel {d_rel:.3g}, max |d weight| {d_w:.3g}, "
                f"grokking epochs (this, solo) {groks}")
    out()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if any)")
    ap.add_argument("--max-r", type=int, default=512)
    ap.add_argument("--epochs", type=int, default=50, help="timed epochs per way and R")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--seed-epochs", type=int, default=None,
                    help="timed epochs of the seed's way (default: 100 on GPU, --epochs on CPU)")
    ap.add_argument("--repeats", type=int, default=1, help="timed blocks per R (median)")
    ap.add_argument("--mode", choices=("batched", "exact"), default="batched")
    ap.add_argument("--p", type=int, default=113)
    ap.add_argument("--sweep-epochs", type=int, default=25_000)
    ap.add_argument("--e2e", type=int, default=0, metavar="R",
                    help="also time R runs end to end with commits, foreground vs background")
    ap.add_argument("--e2e-epochs", type=int, default=300)
    ap.add_argument("--check", action="store_true",
                    help="first train 3 tiny runs packed and alone on the device and compare")
    ap.add_argument("--out", default="benchmarks/gpu_batched_table.md",
                    help="file the table is written to")
    args = ap.parse_args(argv)

    import torch

    from grokhpc.config import RunConfig
    from grokhpc.data import make_dataset
    from grokhpc.model import build_model
    from grokhpc.store import RunDir
    from grokhpc.train import Trainer, loss_fn, make_optimizer
    from grokhpc.train_batched import Stack, _commit_all, auto_runs_per_job, bytes_per_run

    torch.set_float32_matmul_precision("highest")
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = dev.type == "cuda"
    if cuda:
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(dev)
        name = torch.cuda.get_device_name(dev)
        free, total = torch.cuda.mem_get_info(dev)
    else:
        name, free, total = platform.processor() or platform.machine(), 0, 0
    base = RunConfig(p=args.p, device=str(dev))
    seed_epochs = args.seed_epochs or (100 if cuda else args.epochs)

    def sync():
        if cuda:
            torch.cuda.synchronize(dev)

    def mem_reset():
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)

    def mem_peak():
        return torch.cuda.max_memory_allocated(dev) if cuda else float("nan")

    def time_block(fn, n):
        times = []
        for _ in range(args.repeats):
            sync()
            t0 = time.perf_counter()
            fn(n)
            sync()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    lines = []

    def out(s=""):
        print(s, flush=True)
        lines.append(s)

    out(f"# Packed training on {name} ({dev})")
    out()
    out(f"torch {torch.__version__}, p={args.p}, mode={args.mode}, {args.epochs} timed epochs "
        f"per R after {args.warmup} warm-up, median of {args.repeats}; "
        f"free/total memory {free / 2**30:.1f}/{total / 2**30:.1f} GiB; "
        f"auto_runs_per_job -> {auto_runs_per_job(base, dev)}; command: "
        f"`python {' '.join(sys.argv)}`")
    out()

    if args.check:
        check(base, dev, out)

    # ---- the seed's way ------------------------------------------------------------------------
    mem_reset()
    model = build_model(base, dev)
    opt = make_optimizer(model, base)
    data = make_dataset(base).to(dev)
    state = {"epoch": 0, "ckpts": [], "train": [], "test": []}

    def seed_way(n):
        for _ in range(n):
            loss = loss_fn(model(data.train_tokens)[:, -1], data.train_labels)
            loss.backward()
            state["train"].append(loss.item())
            opt.step()
            opt.zero_grad()
            with torch.inference_mode():
                state["test"].append(loss_fn(model(data.test_tokens)[:, -1],
                                             data.test_labels).item())
            state["epoch"] += 1
            if state["epoch"] % 100 == 0:
                state["ckpts"].append(copy.deepcopy(model.state_dict()))

    seed_way(args.warmup)
    t = time_block(seed_way, seed_epochs)
    seed_rate, seed_mem = seed_epochs / t, mem_peak()
    del model, opt, data, state
    gc.collect()

    # ---- one solo grokhpc Trainer --------------------------------------------------------------
    mem_reset()
    with tempfile.TemporaryDirectory() as tmp:
        solo = Trainer(base, RunDir(tmp), dev)

        def solo_way(n):
            for _ in range(n):
                solo.step()
                if solo.epoch % base.eval_every == 0:
                    solo.evaluate()

        solo_way(args.warmup)
        t = time_block(solo_way, args.epochs)
    solo_rate, solo_mem = args.epochs / t, mem_peak()
    del solo
    gc.collect()

    out(f"| way | R | run-epochs/s | x R=1 | x solo | x seed | peak MiB | est. MiB "
        f"| commit s | {args.sweep_epochs} epochs, min |")
    out("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")

    def row(way, r, rate, r1, mem, est, commit_s):
        per_run = rate / r
        sweep_min = (args.sweep_epochs / per_run
                     + commit_s * math.ceil(args.sweep_epochs / base.checkpoint_every)) / 60
        r1s = f"{rate / r1:.2f}" if r1 else "-"
        out(f"| {way} | {r} | {rate:.1f} | {r1s} | {rate / solo_rate:.2f} | "
            f"{rate / seed_rate:.2f} | {mem / 2**20:.0f} | "
            f"{est / 2**20 if est == est else float('nan'):.0f} | {commit_s:.2f} | "
            f"{sweep_min:.1f} |")

    row("seed", 1, seed_rate, None, seed_mem, float("nan"), 0.0)
    row("solo", 1, solo_rate, None, solo_mem, float("nan"), 0.0)

    # ---- packed groups -------------------------------------------------------------------------
    r, rate1 = 1, None
    while r <= args.max_r:
        trainers = stack = None
        results = []
        try:
            with tempfile.TemporaryDirectory() as tmp:
                cfgs = group_configs(base, r)
                trainers = [Trainer(c, RunDir(Path(tmp) / f"r{i}"), dev)
                            for i, c in enumerate(cfgs)]
                gc.collect()
                mem_reset()
                stack = Stack(trainers, dev, exact=(args.mode == "exact"))

                def packed(n):
                    for _ in range(n):
                        stack.step()
                        if stack.epoch % base.eval_every == 0:
                            stack.evaluate()

                packed(args.warmup)
                t = time_block(packed, args.epochs)
                results.append((r * args.epochs / t, mem_peak()))
                # one commit of every run, as train_group does at each checkpoint
                for tr in trainers:
                    tr.run.create({"run_id": tr.cfg.run_id})
                sync()
                t0 = time.perf_counter()
                for i in range(len(trainers)):
                    stack.sync(i)
                _commit_all(trainers)
                commit_s = time.perf_counter() - t0
        except torch.cuda.OutOfMemoryError:
            out(f"| packed | {r} | out of memory | | | | | | | |")
            break
        finally:
            del trainers, stack
            gc.collect()
        for rate, peak in results:
            rate1 = rate if rate1 is None else rate1
            row(f"packed {args.mode}", r, rate, rate1, peak, bytes_per_run(base) * r, commit_s)
        r *= 2

    # ---- end to end with commits: foreground vs background writes --------------------------
    if args.e2e:
        from grokhpc.train_batched import _fit_stack

        r = args.e2e
        out()
        for background in (False, True):
            gc.collect()
            mem_reset()
            with tempfile.TemporaryDirectory() as tmp:
                cfgs = group_configs(base, r)
                t0 = time.perf_counter()
                trainers = [Trainer.open(c, Path(tmp) / f"r{i}", dev) for i, c in enumerate(cfgs)]
                t_open = time.perf_counter() - t0
                stack = Stack(trainers, dev, exact=False)
                n = args.e2e_epochs
                sync()
                t0 = time.perf_counter()
                _fit_stack(stack, n, None, lambda *a: None, background=background)
                sync()
                wall = time.perf_counter() - t0
                del stack, trainers
            rate = r * n / wall
            sweep = args.sweep_epochs * r / rate / 60
            out(f"end to end, R={r}, {n} epochs with a commit every "
                f"{base.checkpoint_every} ({'background' if background else 'foreground'} "
                f"writes): {rate:.0f} run-epochs/s incl. commits -> {args.sweep_epochs} epochs "
                f"of {r} runs in {sweep:.1f} min (+ {t_open:.0f} s to open the {r} runs)")

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"table written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
