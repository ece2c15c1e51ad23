"""Seed-way training vs grokhpc's trainer on the seed config, side by side in one invocation.

    python benchmarks/bench_train.py [--repeats 5] [--seed-block 10] [--fast-block 100]
                                     [--before REF] [--threads N] [--clock wall|cpu]

The seed's way (as the notebook trains): the full three-position hooked forward
``model(tokens)``, the test loss every epoch, a ``.item()`` sync each step, and
``copy.deepcopy(model.state_dict())`` every 100 epochs. grokhpc's way: ``Trainer.fit`` as a run
uses it (last-position logits, test every ``eval_every`` epochs, checkpoint row + state commit
every 100 epochs, to a temporary run directory).

Blocks of each alternate, so machine noise hits both alike; the ratio is the median over
repeats of (seed ms/epoch) / (grokhpc ms/epoch). ``--before REF`` adds a third way, grokhpc's
trainer with ``grokhpc/lastpos.py`` of git revision REF swapped in (``bench_floor.swapped``),
timed in the same blocks. Peak memory: a fresh child process per way
samples its resident set while training a few epochs and reports the peak above what it held
once model, optimiser and data were built. ``--clock cpu`` times the blocks in this process's CPU
time rather than wall time (on a shared machine the wall time counts waits for a core).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


CLOCK = {"wall": time.perf_counter, "cpu": time.process_time}


def seed_way(n_epochs: int, state: dict) -> None:
    import torch

    from grokhpc.train import loss_fn

    model, opt, d = state["model"], state["opt"], state["data"]
    for _ in range(n_epochs):
        train_loss = loss_fn(model(d.train_tokens)[:, -1], d.train_labels)
        train_loss.backward()
        state["train_losses"].append(train_loss.item())
        opt.step()
        opt.zero_grad()
        with torch.inference_mode():
            test_loss = loss_fn(model(d.test_tokens)[:, -1], d.test_labels)
            state["test_losses"].append(test_loss.item())
        state["epoch"] += 1
        if state["epoch"] % 100 == 0:
            state["checkpoints"].append(copy.deepcopy(model.state_dict()))


def make_seed_state():
    from grokhpc.config import RunConfig
    from grokhpc.data import make_dataset
    from grokhpc.model import build_model
    from grokhpc.optim import make_optimizer

    cfg = RunConfig(device="cpu")
    model = build_model(cfg)
    return {"model": model, "opt": make_optimizer(model.parameters(), cfg), "data": make_dataset(cfg),
            "train_losses": [], "test_losses": [], "checkpoints": [], "epoch": 0}


def make_trainer(tmp: str, name: str = "run"):
    from grokhpc.config import RunConfig
    from grokhpc.train import Trainer

    return Trainer.open(RunConfig(device="cpu"), f"{tmp}/{name}")


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def child(mode: str, epochs: int) -> None:
    """Run one way for a few epochs; print as JSON the peak resident memory above what the
    process held once its model, optimiser and data were built (imports alone take more than
    either way's training), sampled every 2 ms."""
    import threading

    if mode == "seed":
        state = make_seed_state()
        run = lambda: seed_way(epochs, state)  # noqa: E731
    else:
        tmp = tempfile.mkdtemp()
        t = make_trainer(tmp)
        run = lambda: t.fit(progress_bar=False, until=t.epoch + epochs)  # noqa: E731
    base = _rss_mib()
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mib())
            time.sleep(0.002)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    run()
    done.set()
    th.join()
    print(json.dumps({"peak_rss_mib": peak[0] - base, "before_mib": base}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed-block", type=int, default=10, help="seed-way epochs per block")
    ap.add_argument("--fast-block", type=int, default=100, help="grokhpc epochs per block")
    ap.add_argument("--before", metavar="REF", default=None,
                    help="also time grokhpc's trainer with grokhpc/lastpos.py of this git "
                         "revision")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--clock", choices=sorted(CLOCK), default="wall")
    ap.add_argument("--child", choices=["seed", "grokhpc"], help=argparse.SUPPRESS)
    ap.add_argument("--child-epochs", type=int, default=20, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.child_epochs)
        return

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    clock = CLOCK[args.clock]
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_floor import old_lastpos, swapped

    old = old_lastpos(args.before) if args.before else None
    seed_state = make_seed_state()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = make_trainer(tmp)
        seed_way(2, seed_state)                      # warm-up both
        trainer.fit(progress_bar=False, until=trainer.epoch + 2)
        if old is not None:
            with swapped(old):
                before = make_trainer(tmp, "before")
                before.fit(progress_bar=False, until=before.epoch + 2)
        seed_ms, fast_ms, before_ms = [], [], []
        for _ in range(args.repeats):
            t0 = clock()
            seed_way(args.seed_block, seed_state)
            t1 = clock()
            trainer.fit(progress_bar=False, until=trainer.epoch + args.fast_block)
            t2 = clock()
            seed_ms.append((t1 - t0) * 1000 / args.seed_block)
            fast_ms.append((t2 - t1) * 1000 / args.fast_block)
            if old is not None:
                with swapped(old):
                    t2 = clock()
                    before.fit(progress_bar=False, until=before.epoch + args.fast_block)
                    before_ms.append((clock() - t2) * 1000 / args.fast_block)
    ratios = [s / f for s, f in zip(seed_ms, fast_ms)]

    mem = {}
    for mode in ("seed", "grokhpc"):
        out = subprocess.run([sys.executable, __file__, "--child", mode], capture_output=True,
                             text=True, check=True).stdout
        mem[mode] = json.loads(out.strip().splitlines()[-1])["peak_rss_mib"]

    print(f"machine: {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} torch threads, torch {torch.__version__}, "
          f"{args.clock} time")
    print(f"{'way':<10}{'ms/epoch (median)':>20}{'epochs/s':>12}{'training peak MiB':>19}")
    for name, ms in (("seed", seed_ms), ("grokhpc", fast_ms)):
        med = statistics.median(ms)
        print(f"{name:<10}{med:>20.1f}{1000 / med:>12.2f}{mem[name]:>19.0f}")
    print(f"ratio (seed ms / grokhpc ms per epoch): median {statistics.median(ratios):.1f}x "
          f"over {args.repeats} repeats (each: {', '.join(f'{r:.1f}' for r in ratios)})")
    if before_ms:
        old_ratios = [s / b for s, b in zip(seed_ms, before_ms)]
        print(f"grokhpc with lastpos.py of {args.before}: {statistics.median(before_ms):.1f} "
              f"ms/epoch; ratio (seed ms / its ms): median {statistics.median(old_ratios):.1f}x "
              f"(each: {', '.join(f'{r:.1f}' for r in old_ratios)})")
    print("load average (1/5/15 min) at the end: "
          + "/".join(f"{x:.2f}" for x in os.getloadavg()))


if __name__ == "__main__":
    main()
