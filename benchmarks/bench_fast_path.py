"""Solo training ms/epoch of this checkout's fast path against another revision's, side by side.

    python benchmarks/bench_fast_path.py --rev bec8f11 [--epochs 30] [--repeats 7]

Both trainers are ``grokhpc.train.Trainer`` on the seed config (p = 113), stepping and scoring
the test set every ``eval_every`` epochs as ``fit`` does, without commits; one of them has its
model replaced by the ``Transformer`` of ``grokhpc/model.py`` at ``--rev`` (that file alone,
loaded from git as a separate module; it must need nothing newer than this checkout's
``grokhpc.config``). Both start from the same weights. Blocks alternate so machine noise hits
both alike; the result is the median over repeats of each one's ms/epoch and of their ratio,
in wall time and in the process's CPU time (all threads; on a loaded machine the steadier).
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def model_module_at(rev: str, tmp: str):
    """``grokhpc/model.py`` as it was at ``rev``, imported as ``grokhpc._model_at_rev``."""
    src = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:grokhpc/model.py"],
                         capture_output=True, text=True, check=True).stdout
    path = Path(tmp) / "model_at_rev.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("grokhpc._model_at_rev", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def epochs_of(trainer):
    """fn(n): n epochs of ``trainer``'s run as it trains alone (its stack of one, exact mode;
    the stack calls the trainer's model's own ``last_logits``)."""
    import torch

    from grokhpc.stack import Stack

    stack = Stack([trainer], torch.device("cpu"), exact=True)

    def run(n):
        for _ in range(n):
            stack.step()
            if stack.epoch % trainer.cfg.eval_every == 0:
                stack.evaluate()
    return run


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rev", required=True, help="git revision whose model.py is the 'before'")
    ap.add_argument("--epochs", type=int, default=30, help="epochs per timed block")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    args = ap.parse_args(argv)

    import torch

    from grokhpc.config import RunConfig
    from grokhpc.store import RunDir
    from grokhpc.optim import make_optimizer
    from grokhpc.train import Trainer

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = RunConfig(device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        old = model_module_at(args.rev, tmp)
        now = Trainer(cfg, RunDir(f"{tmp}/now"), torch.device("cpu"))
        before = Trainer(cfg, RunDir(f"{tmp}/before"), torch.device("cpu"))
        before.model = old.build_model(cfg)
        before.optimizer = make_optimizer(before.model.parameters(), cfg)
        with torch.no_grad():
            a = now.model.last_logits(now.train_tokens)
            b = before.model.last_logits(before.train_tokens)
        print(f"initial logits, max |now - before| = {(a - b).abs().max().item():.3g}")
        ways = {"before": epochs_of(before), "now": epochs_of(now)}
        for run in ways.values():
            run(2)  # warm-up
        ms = {(k, clock): [] for k in ways for clock in ("wall", "cpu")}
        for _ in range(args.repeats):
            for k, run in ways.items():
                t0, c0 = time.perf_counter(), time.process_time()
                run(args.epochs)
                ms[k, "wall"].append((time.perf_counter() - t0) * 1000 / args.epochs)
                ms[k, "cpu"].append((time.process_time() - c0) * 1000 / args.epochs)
    print(f"machine: {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} torch threads, torch {torch.__version__}; seed config, "
          f"{args.epochs} epochs per block, {args.repeats} repeats")
    for clock in ("wall", "cpu"):
        for k in ways:
            v = ms[k, clock]
            print(f"{k + (' (' + args.rev + ')' if k == 'before' else ''):<20} {clock:>4} "
                  f"ms/epoch median {statistics.median(v):8.1f}  "
                  f"(each: {', '.join(f'{x:.0f}' for x in v)})")
        ratios = [n / b for n, b in zip(ms["now", clock], ms["before", clock])]
        print(f"ratio now / before, {clock} ms per epoch: median "
              f"{statistics.median(ratios):.3f} (each: {', '.join(f'{r:.2f}' for r in ratios)})")


if __name__ == "__main__":
    main()
