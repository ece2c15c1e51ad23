"""Bytes a run writes per 1,000 epochs at the seed config, from the kernel's own count.

    python benchmarks/bench_commit_io.py [--epochs 1000] [--runs 1] [--state-every-min 10]
                                         [--checkpoint-dtype float32]

Trains the seed config (p = 113, checkpoint row every 100 epochs) for ``--epochs`` epochs into
a temporary run directory -- one run with ``Trainer.fit``, or ``--runs R`` packed with
``train_group`` -- and reads ``/proc/self/io`` before and after: ``wchar`` counts every byte
handed to write(2) (whatever the file system), ``write_bytes`` what reached the block layer
(0 on tmpfs). The run's creation (config, first commit) is outside the window for one run and
inside it for a group; the table gives bytes per run per 1,000 epochs and the files left.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path


def io_counters() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/io").read_text().splitlines():
        k, v = line.split(":")
        out[k.strip()] = int(v)
    return out


def settings(state_every_s: float | None):
    from grokhpc.runtime import JobSettings

    return JobSettings() if state_every_s is None else JobSettings(state_every_s=state_every_s)


def solo(cfg, root: Path, epochs: int, state_every_s: float | None) -> dict[str, int]:
    from grokhpc.train import Trainer

    t = Trainer.open(cfg, root / "run0", settings=settings(state_every_s))
    before = io_counters()
    t.fit(progress_bar=False, until=epochs)
    after = io_counters()
    t.close()
    return {k: after[k] - before[k] for k in after}


def packed(cfgs, root: Path, epochs: int, state_every_s: float | None) -> dict[str, int]:
    from grokhpc.train_batched import train_group

    before = io_counters()
    train_group(cfgs, [root / f"run{i}" for i in range(len(cfgs))], settings(state_every_s),
                device="cpu", progress_bar=False, log=lambda m: None)
    after = io_counters()
    return {k: after[k] - before[k] for k in after}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=1000)
    ap.add_argument("--runs", type=int, default=1, help="1: solo Trainer; R > 1: packed group")
    ap.add_argument("--checkpoint-dtype", default="float32")
    ap.add_argument("--state-every-min", type=float, default=None,
                    help="minutes between state.pt writes (default: the trainer's own)")
    args = ap.parse_args(argv)
    import torch

    from grokhpc.config import RunConfig

    torch.set_num_threads(2)
    every = None if args.state_every_min is None else args.state_every_min * 60
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        t0 = time.perf_counter()
        if args.runs == 1:
            cfg = RunConfig(device="cpu")
            if args.checkpoint_dtype != "float32":
                cfg = cfg.replace(checkpoint_dtype=args.checkpoint_dtype)
            delta = solo(cfg, root, args.epochs, every)
        else:   # n_epochs = the window: a group trains to the end
            extra = {} if args.checkpoint_dtype == "float32" else \
                {"checkpoint_dtype": args.checkpoint_dtype}
            cfgs = [RunConfig(device="cpu", n_epochs=args.epochs, model_seed=999 + i, **extra)
                    for i in range(args.runs)]
            delta = packed(cfgs, root, args.epochs, every)
        secs = time.perf_counter() - t0
        scale = 1000 / args.epochs / args.runs
        print(f"{args.runs} run(s) x {args.epochs} epochs, seed config, checkpoint_dtype "
              f"{args.checkpoint_dtype}, {secs:.0f} s")
        print("| counter | bytes per run per 1,000 epochs |\n|---|---:|")
        for k in ("wchar", "write_bytes", "syscw"):
            print(f"| {k} | {delta[k] * scale:,.0f} |")
        print("\n| file (run0) | bytes |\n|---|---:|")
        for f in sorted((root / "run0").iterdir()):
            if f.is_file():
                print(f"| {f.name} | {f.stat().st_size:,} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
