"""A CPU-sized frac_sweep trained packed with and without ``stop_after_grok``, side by side.

    python benchmarks/bench_stop_after_grok.py [--n-epochs 3000] [--stop-after 200]

The grid of sweeps/frac_sweep.yaml (train_frac 0.2-0.7 x model_seed 999, 1, 2) on the
CPU-sized model of sweeps/tasks_cpu.yaml (p = 31, d_model 64, lr 1e-2), each run set trained as
one packed group (``train_group``): once to ``--n-epochs``, once with ``stop_after_grok``. The
table gives each run's grokking epoch (summary.json) and epochs trained in both, and the
totals: run-epochs trained and wall time.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

FRACS = (0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7)
SEEDS = (999, 1, 2)
BASE = dict(p=31, d_model=64, d_head=16, n_heads=4, d_mlp=256, lr=1e-2, checkpoint_every=100,
            eval_every=10, device="cpu")


def train(cfgs, root: Path) -> tuple[float, list[dict]]:
    from grokhpc.store import RunDir
    from grokhpc.train_batched import train_group

    dirs = [root / c.run_id for c in cfgs]
    t0 = time.perf_counter()
    train_group(cfgs, dirs, device="cpu", progress_bar=False, log=lambda m: None)
    secs = time.perf_counter() - t0
    out = []
    for d in dirs:
        run = RunDir(d)
        s, p = run.read_summary(), run.read_progress()
        out.append({"epochs": p["epoch"], "grokking_epoch": s.get("grokking_epoch")})
    return secs, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-epochs", type=int, default=3000)
    ap.add_argument("--stop-after", type=int, default=200)
    args = ap.parse_args(argv)
    from grokhpc.config import RunConfig

    grid = [(f, s) for f in FRACS for s in SEEDS]
    full = [RunConfig(**BASE, n_epochs=args.n_epochs, train_frac=f, model_seed=s) for f, s in grid]
    early = [c.replace(stop_after_grok=args.stop_after) for c in full]
    with tempfile.TemporaryDirectory() as d:
        t_full, r_full = train(full, Path(d) / "full")
        t_early, r_early = train(early, Path(d) / "early")
    print(f"{len(grid)} runs, p = 31, n_epochs {args.n_epochs}, stop_after_grok "
          f"{args.stop_after}, one packed group each way\n")
    print("| train_frac | model_seed | grokking epoch (full / stop) | epochs trained "
          "(full / stop) |\n|---:|---:|---|---|")
    for (f, s), a, b in zip(grid, r_full, r_early):
        print(f"| {f} | {s} | {a['grokking_epoch']} / {b['grokking_epoch']} | "
              f"{a['epochs']} / {b['epochs']} |")
    same = all(a["grokking_epoch"] == b["grokking_epoch"] for a, b in zip(r_full, r_early))
    n_full, n_early = sum(r["epochs"] for r in r_full), sum(r["epochs"] for r in r_early)
    print(f"\nrun-epochs trained: {n_full:,} without, {n_early:,} with stop_after_grok "
          f"({n_early / n_full:.1%}); grokking epochs identical: {same}")
    print(f"wall time: {t_full:.0f} s without, {t_early:.0f} s with "
          f"(ratio {t_full / t_early:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
