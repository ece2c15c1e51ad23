"""A solo run's ``Trainer.fit`` in this checkout against another revision's, side by side.

    python benchmarks/bench_solo_fit.py --rev 777a1c7 [--epochs 200] [--repeats 3] [--threads 1]

Each trial is a fresh process that opens the seed config (p = 113) in a new run directory and
times ``fit(until=--epochs)`` (its commits included: a row every 100 epochs, state.pt where it
stops), with ``--threads`` torch threads. The trials alternate (before, now, before, now, ...)
so machine noise hits both alike; the result is the median over repeats of each one's seconds,
wall and the process's CPU time, and the median of the per-repeat ratios now / before.
``--rev`` is checked out with ``git archive`` into a temporary directory and imported from
there.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TRIAL = """
import json, sys, tempfile, time
import torch
torch.set_num_threads(int(sys.argv[2]))
from grokhpc.config import RunConfig
from grokhpc.train import Trainer
with tempfile.TemporaryDirectory() as tmp:
    t = Trainer.open(RunConfig(device="cpu"), tmp + "/run")
    t0, c0 = time.perf_counter(), time.process_time()
    t.fit(progress_bar=False, until=int(sys.argv[1]))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    t.close()
print(json.dumps({"wall": wall, "cpu": cpu, "epoch": t.epoch}))
"""


def trial(tree: Path, epochs: int, threads: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": str(threads)}
    r = subprocess.run([sys.executable, "-c", TRIAL, str(epochs), str(threads)], cwd=tree,
                       env=env, capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rev", required=True, help="git revision that is the 'before'")
    ap.add_argument("--epochs", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        before = Path(tmp) / "before"
        before.mkdir()
        archive = subprocess.run(["git", "-C", str(REPO), "archive", args.rev],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(before)], input=archive, check=True)
        trees = {f"before ({args.rev})": before, "now": REPO}
        got: dict[str, list[dict]] = {k: [] for k in trees}
        for i in range(args.repeats):
            for name, tree in trees.items():
                got[name].append(trial(tree, args.epochs, args.threads))
                print(f"repeat {i}: {name}: {got[name][-1]}", flush=True)
    print(f"seed config, {args.epochs} epochs of Trainer.fit, {args.threads} torch thread(s), "
          f"{args.repeats} repeats alternating")
    (b_name, b), (n_name, n) = got.items()
    for clock in ("wall", "cpu"):
        for name, runs in got.items():
            print(f"{name:<20} {clock:>4} s: median {statistics.median(r[clock] for r in runs):.2f}"
                  f" (each: {', '.join(f'{r[clock]:.2f}' for r in runs)})")
        ratios = [y[clock] / x[clock] for x, y in zip(b, n)]
        print(f"ratio now / before, {clock}: median {statistics.median(ratios):.3f} "
              f"(each: {', '.join(f'{x:.3f}' for x in ratios)})")


if __name__ == "__main__":
    main()
