"""grokhpc's CPU training against the floor that this machine's sgemm sets, side by side.

    python benchmarks/bench_floor.py [--threads 1 2] [--repeats 5] [--before REF] [--clock cpu]

The floor of an epoch is the work it cannot avoid: the MLP read-out ``act(pre) @ (W_out W_U)``
of the train rows and its two backward products, plus the test rows' read-out every
``eval_every`` epochs. Each of those four products is timed as one ``torch.mm`` at the current
thread count (its sgemm throughput), and their sum is the floor in ms per epoch. grokhpc's
ms per epoch is the solo trainer's (``Trainer.open`` on a fresh directory, then ``fit`` in
blocks of epochs, commits included). ``--before REF`` also times the trainer with the
``grokhpc/lastpos.py`` of git revision REF swapped in for every reference grokhpc's modules
hold to its functions (the kernels of that revision), block after block with the current ones;
``--before-module kernels`` swaps in REF's ``grokhpc/kernels.py`` instead.

``--clock cpu`` times everything in this process's CPU time (every thread's, user and system)
instead of wall time: on a machine shared with other work the wall time counts the waits for a
core, which fall on either side by chance, while CPU time counts the work done (at 2 threads,
also the time a thread spins waiting for the other).

Configs: the seed's (p = 113, d_model 128, d_mlp 512, 30% train) and the quickstart's model
(sweeps/quickstart.yaml's base at train_frac 0.6). Each figure is a median over repeats; the
load average before and after is printed with the table.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def configs():
    from grokhpc.config import RunConfig
    from grokhpc.sweep import load_sweep

    quick = next(r.config for r in load_sweep(ROOT / "sweeps" / "quickstart.yaml").runs
                 if r.config.train_frac == 0.6)
    return {"seed": RunConfig(device="cpu"),
            "quickstart": quick.replace(device="cpu", stop_after_grok=None, n_epochs=100_000)}


def floor_products(cfg):
    """The (rows, inner, cols) of the epoch's unavoidable products and how often each runs per
    epoch: train read-out forward, its two backward products, the test read-out."""
    n_train, n_test = cfg.n_train, cfg.n_test
    m, p = cfg.d_mlp, cfg.n_classes
    return [((n_train, m, p), 1.0), ((n_train, p, m), 1.0), ((m, n_train, p), 1.0),
            ((n_test, m, p), 1.0 / cfg.eval_every)]


CLOCK = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCK["wall"]


def time_mm(shape, repeats: int = 7) -> float:
    """Median seconds (on ``clock``) of one (rows x inner) @ (inner x cols) float32 product."""
    import torch

    r, k, c = shape
    a, b = torch.randn(r, k), torch.randn(k, c)
    out = torch.empty(r, c)
    torch.mm(a, b, out=out)
    ts = []
    for _ in range(repeats):
        t0 = clock()
        torch.mm(a, b, out=out)
        ts.append(clock() - t0)
    return statistics.median(ts)


def floor_ms(cfg) -> tuple[float, float]:
    """(floor ms per epoch, sgemm GFLOP/s over the epoch's products)."""
    secs = flops = 0.0
    for (r, k, c), per_epoch in floor_products(cfg):
        secs += time_mm((r, k, c)) * per_epoch
        flops += 2.0 * r * k * c * per_epoch
    return secs * 1e3, flops / secs / 1e9


def old_lastpos(ref: str, name: str = "lastpos") -> types.ModuleType:
    """``grokhpc/NAME.py`` as it was at git revision ``ref``, as a module of its own (its
    relative imports find today's modules)."""
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{ref}:grokhpc/{name}.py"],
                         capture_output=True, text=True, check=True).stdout
    mod = types.ModuleType(f"{name}_before")
    mod.__dict__.update(__name__=f"grokhpc.{name}_before", __package__="grokhpc")
    exec(compile(src, f"{ref}:grokhpc/{name}.py", "exec"), mod.__dict__)
    return mod


@contextlib.contextmanager
def swapped(old: types.ModuleType | None):
    """Every grokhpc module's reference to a function of grokhpc.lastpos that ``old`` also
    defines points at ``old``'s for the block; an old grokhpc.kernels takes the place of
    today's (lastpos imports it where it is used)."""
    import grokhpc
    import grokhpc.lastpos as now

    if old is None:
        yield
        return
    if old.__name__ == "grokhpc.kernels_before":
        import grokhpc.kernels as today

        sys.modules["grokhpc.kernels"], grokhpc.kernels = old, old
        try:
            yield
        finally:
            sys.modules["grokhpc.kernels"], grokhpc.kernels = today, today
        return
    names = [n for n, v in vars(now).items() if callable(v) and hasattr(old, n)
             and getattr(v, "__module__", "") == now.__name__]
    saved = []
    for mod in [m for k, m in list(sys.modules.items()) if k.startswith("grokhpc") and m]:
        for attr, v in list(vars(mod).items()):
            hit = next((n for n in names if v is getattr(now, n)), None)
            if hit is not None:
                saved.append((mod, attr, v))
                setattr(mod, attr, getattr(old, hit))
    try:
        yield
    finally:
        for mod, attr, v in saved:
            setattr(mod, attr, v)


def open_trainer(cfg, where: str):
    """A solo trainer on a fresh run directory (the driving code in one place)."""
    from grokhpc.train import Trainer

    return Trainer.open(cfg, where)


def train_ms(trainer, epochs: int) -> float:
    t0 = clock()
    trainer.fit(progress_bar=False, until=trainer.epoch + epochs)
    return (clock() - t0) * 1e3 / epochs


def measure(cfg, threads: int, repeats: int, block: int, before) -> dict:
    """Medians over ``repeats`` of the floor, the current trainer and (``before``) the old."""
    import torch

    torch.set_num_threads(threads)
    ways = {"after": None} if before is None else {"before": before, "after": None}
    out: dict[str, list] = {"floor": [], "gflops": [], **{k: [] for k in ways}}
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {}
        for k, mod in ways.items():
            with swapped(mod):
                trainers[k] = open_trainer(cfg, f"{tmp}/{k}")
                train_ms(trainers[k], 3)   # warm-up
        for _ in range(repeats):
            f, g = floor_ms(cfg)
            out["floor"].append(f)
            out["gflops"].append(g)
            for k, mod in ways.items():
                with swapped(mod):
                    out[k].append(train_ms(trainers[k], block))
        for t in trainers.values():
            t.close()
    return {k: statistics.median(v) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--block", type=int, default=40, help="epochs per timed block")
    ap.add_argument("--configs", nargs="+", default=["seed", "quickstart"],
                    choices=["seed", "quickstart"])
    ap.add_argument("--before", metavar="REF", default=None,
                    help="also time grokhpc/lastpos.py of this git revision")
    ap.add_argument("--before-module", choices=["lastpos", "kernels"], default="lastpos",
                    help="which module --before takes from REF")
    ap.add_argument("--clock", choices=sorted(CLOCK), default="wall",
                    help="wall time, or this process's CPU time (see the module)")
    args = ap.parse_args()
    global clock
    clock = CLOCK[args.clock]

    import torch

    before = old_lastpos(args.before, args.before_module) if args.before else None
    load0 = os.getloadavg()
    rows = []
    for name in args.configs:
        cfg = configs()[name]
        for threads in args.threads:
            rows.append((name, threads, measure(cfg, threads, args.repeats, args.block, before)))
    load1 = os.getloadavg()
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, {args.clock} time; load average (1/5/15 min) "
          f"before {load0[0]:.2f}/{load0[1]:.2f}/{load0[2]:.2f}, "
          f"after {load1[0]:.2f}/{load1[1]:.2f}/{load1[2]:.2f}")
    head = "| config | threads | sgemm GFLOP/s | floor ms/epoch |"
    if before is not None:
        head += f" {args.before} ms/epoch | x floor |"
    head += " now ms/epoch | x floor |"
    print(head)
    print("|---" * (head.count("|") - 1) + "|")
    for name, threads, r in rows:
        line = f"| {name} | {threads} | {r['gflops']:.0f} | {r['floor']:.2f} |"
        if before is not None:
            line += f" {r['before']:.1f} | {r['before'] / r['floor']:.1f} |"
        print(line + f" {r['after']:.1f} | {r['after'] / r['floor']:.1f} |")
    print(f"medians over {args.repeats} repeats; trainer blocks of {args.block} epochs")


if __name__ == "__main__":
    main()
