"""Packed training on a GPU in one invocation (under 10 minutes on an H200): speed of the step
modes, TF32 against float32, a projection of a whole group's wall time, and the fidelity of
batched mode to runs trained alone.

    python benchmarks/gpu_batched.py                        # check, speed, fidelity
    python benchmarks/gpu_batched.py --only speed           # parts: check speed fidelity e2e
    python benchmarks/gpu_batched.py --device cpu --smoke   # every part, tiny, about a minute

Parts (``--only``, comma-separated):

* check: benchmarks/gpu_checks.py, one verdict line per check: 3 tiny runs (p = 17, add)
  alone twice, packed exact and packed batched in each step mode (the device's own
  determinism; exact == solo; batched within 1e-3 early on; graph == fused), minibatch runs
  resumed alone and packed, host syncs per epoch, a config naming cuda:1 in a one-GPU device
  process, process settings left as found (``--smoke``: its CPU sizes).
* speed: run-epochs/s of packed groups of R seed-config runs (different seeds, train
  fractions, lr, weight decay) in batched mode at R = --rs, the step modes of --modes side by
  side (eager: today's step; fused: flat Adam(W); graph: fused in CUDA graphs; compile:
  torch.compile), each the median of --repeats blocks of --epochs epochs after --warmup
  untimed ones (test scoring every eval_every epochs included, commits not); the --tf32-mode
  step at matmul_precision high at R in --tf32-rs; the seed notebook's way and one solo
  Trainer for scale; peak memory. Then one commit of all runs at R = --project-r is timed and
  R runs x --sweep-epochs epochs are PROJECTED from the measured rates plus one foreground
  commit per checkpoint_every epochs (a projection, not an end-to-end measurement).
* fidelity: --fid-runs runs of one config, different model seeds, trained alone (one solo run
  per process, --fid-workers at a time on the device) and packed in batched mode (--fid-mode)
  at matmul_precision highest and high; grokking epochs (median, spread, per-seed differences
  to the run alone), key frequencies, final losses, one row per seed.
* e2e: --e2e runs trained end to end for --e2e-epochs epochs with commits into run
  directories (foreground and background writes).

Everything printed is also written to --out (markdown), line by line: a part cut short by a
time limit leaves what it measured.
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

from gpu_checks import Lines  # noqa: E402  (beside this file)

PARTS = ("check", "speed", "fidelity", "e2e")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    a = ap.add_argument
    a("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if any)")
    a("--only", default="check,speed,fidelity", help=f"parts to run, of {','.join(PARTS)}")
    a("--smoke", action="store_true", help="tiny sizes for every part (CPU: about a minute)")
    a("--p", type=int, default=113, help="p of the speed part's runs (seed config: 113)")
    a("--rs", default="1,32,128,512", help="group sizes R of the speed table")
    a("--modes", default="eager,fused,graph", help="step modes side by side (also: compile)")
    a("--epochs", type=int, default=30, help="timed epochs per block")
    a("--warmup", type=int, default=45,
      help="untimed epochs first (graph captures after 3 eager calls: the 4th test scoring)")
    a("--repeats", type=int, default=3, help="timed blocks per R and mode (median)")
    a("--seed-epochs", type=int, default=100, help="timed epochs of the seed notebook's way")
    a("--tf32-rs", default="128,512", help="R at which matmul_precision high is timed too")
    a("--tf32-mode", default="graph", help="step mode timed at matmul_precision high")
    a("--project-r", type=int, default=128, help="R whose commit is timed and projected")
    a("--sweep-epochs", type=int, default=25_000, help="epochs of the projection")
    a("--fid-runs", type=int, default=16)
    a("--fid-workers", type=int, default=8, help="solo runs trained at once (processes)")
    a("--fid-mode", default="graph", help="step mode of the packed fidelity groups")
    a("--fid-set", action="append", default=[], metavar="KEY=VALUE",
      help="fidelity config: run fields over the seed config's (default: see FIDELITY)")
    a("--e2e", type=int, default=128, metavar="R", help="runs of the e2e part")
    a("--e2e-epochs", type=int, default=300)
    a("--out", default="benchmarks/gpu_batched_table.md", help="markdown file written")
    args = ap.parse_args(argv)
    if args.smoke:
        shrink_for_smoke(args)
    return args


# The fidelity part's config: the seed's (p = 113, wd 1, lr 1e-3, 30%) groks after 10-20k
# epochs (22,560 in benchmarks/RESULTS.md), too long for 16 solo runs in the time; with 50% of
# the pairs for training the same model (seed 999) memorises by epoch ~200 and reaches 99% test
# accuracy at epoch 1,030 (CPU). `--fid-set train_frac=0.3 --fid-set n_epochs=25000` runs the
# seed's own config (about an hour).
FIDELITY = {"train_frac": 0.5, "n_epochs": 2500, "checkpoint_every": 100, "eval_every": 10}
SMOKE_FIDELITY = {"p": 17, "op": "add", "d_model": 32, "n_heads": 4, "d_head": 8, "d_mlp": 64,
                  "train_frac": 0.8, "lr": 1e-2, "weight_decay": 2.0, "n_epochs": 250,
                  "checkpoint_every": 50, "eval_every": 10}


def shrink_for_smoke(args) -> None:
    args.device = args.device or "cpu"
    if args.only == "check,speed,fidelity":
        args.only = ",".join(PARTS)
    args.p, args.rs, args.tf32_rs, args.project_r = 23, "1,2", "2", 2
    args.epochs, args.warmup, args.repeats, args.seed_epochs = 2, 1, 1, 2
    args.fid_runs, args.fid_workers, args.e2e, args.e2e_epochs = 2, 2, 2, 20
    args.fid_set = [f"{k}={v}" for k, v in SMOKE_FIDELITY.items()] + args.fid_set


# ---- the device --------------------------------------------------------------------------------
class Device:
    """The torch device with its synchronisation and peak-memory counters (no-ops on CPU)."""

    def __init__(self, name: str | None):
        import torch

        self.torch = torch
        self.dev = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.cuda = self.dev.type == "cuda"
        if self.cuda:
            if self.dev.index is None:
                self.dev = torch.device("cuda", torch.cuda.current_device())
            torch.cuda.set_device(self.dev)
            self.name = torch.cuda.get_device_name(self.dev)
            self.free, self.total = torch.cuda.mem_get_info(self.dev)
        else:
            self.name, self.free, self.total = platform.processor() or platform.machine(), 0, 0

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize(self.dev)

    def reset(self) -> None:
        gc.collect()
        if self.cuda:
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats(self.dev)

    def peak_mib(self) -> float:
        return self.torch.cuda.max_memory_allocated(self.dev) / 2**20 if self.cuda else math.nan

    def timed(self, fn, n: int, repeats: int) -> float:
        """Median seconds of ``fn(n)`` over ``repeats`` blocks, synchronised."""
        times = []
        for _ in range(repeats):
            self.sync()
            t0 = time.perf_counter()
            fn(n)
            self.sync()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def group_configs(base, r: int):
    fracs = (0.3, 0.35, 0.4, 0.3)
    wds = (1.0, 0.5, 2.0, 0.3)
    return [base.replace(model_seed=999 + i, data_seed=598 + i, train_frac=fracs[i % 4],
                         weight_decay=wds[(i // 4) % 4], lr=1e-3 * (1 + 0.01 * (i % 50)))
            for i in range(r)]


# ---- check -------------------------------------------------------------------------------------
def check(dev: Device, args, out) -> None:
    """The correctness checks of benchmarks/gpu_checks.py (tiny runs alone and packed in each
    way, minibatch resumes, host syncs, a one-GPU device process, process settings)."""
    from gpu_checks import check_all

    check_all(dev.dev, args.smoke, out)
    out()


# ---- speed -------------------------------------------------------------------------------------
def seed_way_rate(base, dev: Device, args) -> float:
    """Epochs/s of the seed notebook's loop: the full hooked forward, float64 loss, ``.item()``
    each step, test loss every epoch, a deep copy of the state every 100 epochs."""
    from grokhpc.data import make_dataset
    from grokhpc.model import build_model
    from grokhpc.optim import make_optimizer
    from grokhpc.train import loss_fn

    torch = dev.torch
    model = build_model(base, dev.dev)
    opt = make_optimizer(model.parameters(), base)
    data = make_dataset(base).to(dev.dev)
    state = {"epoch": 0, "ckpts": [], "train": [], "test": []}

    def epochs(n):
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

    epochs(args.warmup)
    return args.seed_epochs / dev.timed(epochs, args.seed_epochs, 1)


def solo_rate(base, dev: Device, args) -> float:
    """Epochs/s of one grokhpc run trained alone: its stack of one in exact mode (the fast
    path; test scoring every eval_every)."""
    from grokhpc.stack import Stack
    from grokhpc.store import RunDir
    from grokhpc.train import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        epochs = epochs_of(Stack([Trainer(base, RunDir(tmp), dev.dev)], dev.dev, exact=True))
        epochs(args.warmup)
        return args.epochs / dev.timed(epochs, args.epochs, args.repeats)


def epochs_of(stack):
    """fn(n): n epochs of ``stack``, scoring the test set every eval_every epochs."""
    def run(n):
        for _ in range(n):
            stack.step()
            if stack.epoch % stack.cfg.eval_every == 0:
                stack.evaluate()
    return run


def packed_rate(trainers, dev: Device, mode: str, args, log, precision="highest"):
    """(run-epochs/s, peak MiB) of a batched Stack over ``trainers`` (weights from their
    shadows, so every mode starts from the same state) in step ``mode`` at matmul
    ``precision``; None when the device runs out of memory."""
    from grokhpc.runtime import matmul_precision
    from grokhpc.stack import Stack

    dev.reset()
    stack = None
    try:
        with matmul_precision(precision):
            stack = Stack(trainers, dev.dev, exact=False, step_mode=mode, log=log)
            run = epochs_of(stack)
            run(args.warmup)
            seconds = dev.timed(run, args.epochs, args.repeats)
        return stack.R * args.epochs / seconds, dev.peak_mib()
    except dev.torch.cuda.OutOfMemoryError:
        return None
    finally:
        del stack
        dev.reset()


def commit_seconds(trainers, dev: Device) -> float:
    """One commit of every run as train_group makes it each checkpoint_every epochs: sync
    into the shadows, then each run's checkpoint row, state.pt, progress and curves."""
    from grokhpc.loop import commit_all
    from grokhpc.stack import Stack

    for t in trainers:
        t.run.create({"run_id": t.cfg.run_id})
    stack = Stack(trainers, dev.dev, exact=False)
    dev.sync()
    t0 = time.perf_counter()
    for r in range(stack.R):
        stack.sync(r)
    commit_all([(t, True, True) for t in trainers])
    return time.perf_counter() - t0


def effective_modes(base, dev: Device, wanted: list[str], log) -> dict[str, str]:
    """Each requested step mode -> the one that applies here (a fallback is said once)."""
    from grokhpc.step_mode import resolve

    return {m: resolve(m, base, dev.dev, False, log) for m in wanted}


def fmt_rate(v) -> str:
    return "OOM" if v is None else f"{v[0]:,.0f}"


def speed(base, dev: Device, args, out) -> None:
    """The speed table: run-epochs/s per R and step mode, TF32, memory; then the projection."""
    from grokhpc.store import RunDir
    from grokhpc.train import Trainer
    from grokhpc.plan import group_bytes

    modes = effective_modes(base, dev, args.modes.split(","), out)
    tf32 = effective_modes(base, dev, [args.tf32_mode], out)[args.tf32_mode]
    out(f"seed notebook's way: {seed_way_rate(base, dev, args):,.1f} epochs/s; one solo "
        f"grokhpc Trainer: {solo_rate(base, dev, args):,.1f} epochs/s")
    out()
    names = [m if m == e else f"{m} (= {e})" for m, e in modes.items()]
    out("| R | " + " | ".join(f"{n} run-epochs/s" for n in names)
        + f" | best / eager | {args.tf32_mode} at TF32 | TF32 / highest | peak MiB "
        "(eager, best) | est. MiB |")
    out("|---:|" + "---:|" * (len(names) + 5))
    projected = None
    for r in ints(args.rs):
        with tempfile.TemporaryDirectory() as tmp:
            trainers = [Trainer(c, RunDir(Path(tmp) / f"r{i}"), dev.dev)
                        for i, c in enumerate(group_configs(base, r))]
            rates = {m: packed_rate(trainers, dev, e, args, out) for m, e in modes.items()}
            high = packed_rate(trainers, dev, tf32, args, out, "high") \
                if r in ints(args.tf32_rs) else None
            if r == args.project_r:
                projected = (r, rates, commit_seconds(trainers, dev))
            est = group_bytes([t.cfg for t in trainers])
            del trainers
        speed_row(r, rates, high, args, est, out)
        if all(v is None for v in rates.values()):
            break
    if projected is not None:
        projection(*projected, base, args, dev, out)
    out()


def speed_row(r, rates, high, args, est_bytes, out) -> None:
    """One row of the speed table; ``est_bytes``: the group's estimate at its padded rows."""
    ok = {m: v for m, v in rates.items() if v is not None}
    best = max(ok, key=lambda m: ok[m][0]) if ok else None
    eager = rates.get("eager")
    ratio = f"{ok[best][0] / eager[0]:.2f}" if best and eager else "-"
    at_mode = rates.get(args.tf32_mode)
    tf = fmt_rate(high) if r in ints(args.tf32_rs) else "-"
    tf_ratio = f"{high[0] / at_mode[0]:.2f}" if high and at_mode else "-"
    mem = f"{eager[1]:,.0f}, {ok[best][1]:,.0f}" if best and eager else "-"
    out(f"| {r} | " + " | ".join(fmt_rate(v) for v in rates.values())
        + f" | {ratio} | {tf} | {tf_ratio} | {mem} | {est_bytes / 2**20:,.0f} |")


def projection(r, rates, commit_s, base, args, dev: Device, out) -> None:
    n_commits = math.ceil(args.sweep_epochs / base.checkpoint_every)
    commits_min = n_commits * commit_s / 60
    parts = []
    for mode, v in rates.items():
        if v is not None:
            train_min = args.sweep_epochs * r / v[0] / 60
            parts.append(f"{mode} {train_min + commits_min:.1f} min ({train_min:.1f} training"
                         f" + {commits_min:.1f} commits)")
    out()
    out(f"PROJECTION, not measured end to end: {r} runs x {args.sweep_epochs:,} epochs on "
        f"{dev.name}, training at the rates above plus {n_commits} foreground commits of all "
        f"{r} runs at {commit_s:.2f} s each (one timed here; background writes hide part of "
        f"it): " + "; ".join(parts))


# ---- fidelity ----------------------------------------------------------------------------------
def fidelity_configs(args, dev: Device) -> list:
    """--fid-runs runs of the fidelity config (FIDELITY and --fid-set over the seed's), model
    seeds 999, 1000, ... (the data split is the same for all)."""
    from grokhpc.config import from_dict, parse_overrides

    fields = {**FIDELITY, **parse_overrides(args.fid_set, source="--fid-set"),
              "device": str(dev.dev)}
    base = from_dict(fields, source="--fid-set")
    return [base.replace(model_seed=999 + i) for i in range(args.fid_runs)]


def _train_alone(cfg: dict, out: str) -> float:
    """One run trained alone by ``grokhpc.train.run_training`` (in a worker process)."""
    import torch

    from grokhpc.config import from_dict
    from grokhpc.train import run_training

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    run_training(from_dict(cfg), out, progress_bar=False, log=lambda *a: None)
    return time.perf_counter() - t0


def train_alone(cfgs, dirs, workers: int) -> None:
    """Each run alone in its own process, ``workers`` at a time on the same device."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from grokhpc.config import to_dict

    with ProcessPoolExecutor(max_workers=workers,
                             mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(_train_alone, [to_dict(c) for c in cfgs], [str(d) for d in dirs]))


def fidelity(dev: Device, args, out) -> None:
    """The runs alone and packed (batched, at highest and at high precision): summaries."""
    from grokhpc.runtime import JobSettings
    from grokhpc.store import RunDir
    from grokhpc.train_batched import train_group

    cfgs = fidelity_configs(args, dev)
    c = cfgs[0]
    out(f"## Fidelity of batched mode: {len(cfgs)} runs, model seeds {c.model_seed}.."
        f"{cfgs[-1].model_seed}, p={c.p} {c.op}, train_frac {c.train_frac}, lr {c.lr}, wd "
        f"{c.weight_decay}, d_model {c.d_model}, {c.n_epochs} epochs")
    out()
    ways = {"alone": None, f"packed {args.fid_mode}": "highest",
            f"packed {args.fid_mode}, TF32": "high"}
    sums, walls = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for way, precision in ways.items():
            dirs = [Path(tmp) / f"{len(walls)}" / f"s{c.model_seed}" for c in cfgs]
            t0 = time.perf_counter()
            if precision is None:
                train_alone(cfgs, dirs, args.fid_workers)
            else:
                train_group([c.replace(matmul_precision=precision) for c in cfgs], dirs,
                            JobSettings(step_mode=args.fid_mode), device=dev.dev, exact=False,
                            progress_bar=False, log=out)
            walls[way] = time.perf_counter() - t0
            sums[way] = [RunDir(d).read_summary() for d in dirs]
    fidelity_table(cfgs, sums, walls, out)
    fidelity_per_seed(cfgs, sums, out)


def _med_range(x) -> str:
    import numpy as np

    x = np.asarray(x, dtype=float)
    return f"{np.median(x):,.4g} [{x.min():,.4g}, {x.max():,.4g}]"


def fidelity_table(cfgs, sums, walls, out) -> None:
    """One row per way: grokking epochs, per-seed differences to the run alone, key
    frequencies, final losses."""
    import numpy as np

    alone = sums["alone"]
    g0 = np.array([s["grokking_epoch"] for s in alone])
    out("| way | wall s | grokked | grokking epoch, median [min, max] | per-seed d vs alone, "
        "median [min, max] | median abs d | same key freqs as alone | final train loss | final "
        "test loss | final test loss / alone's |")
    out("|---|---:|---:|---|---|---:|---:|---|---|---|")
    for way, ss in sums.items():
        g = np.array([s["grokking_epoch"] for s in ss])
        d = g - g0
        same = sum(sorted(s["key_freqs"]) == sorted(a["key_freqs"]) for s, a in zip(ss, alone))
        ratio = [s["final_test_loss"] / a["final_test_loss"] for s, a in zip(ss, alone)]
        out(f"| {way} | {walls[way]:.0f} | {sum(s['grokked'] for s in ss)}/{len(ss)} | "
            f"{_med_range(g)} | {_med_range(d)} | {np.median(np.abs(d)):,.4g} | "
            f"{same}/{len(ss)} | {_med_range([s['final_train_loss'] for s in ss])} | "
            f"{_med_range([s['final_test_loss'] for s in ss])} | {_med_range(ratio)} |")
    pairs = [abs(a - b) for i, a in enumerate(g0) for b in g0[i + 1:]]
    if pairs:
        out(f"\nruns alone, seed against seed: median |d grokking epoch| "
            f"{np.median(pairs):,.4g} over {len(pairs)} pairs (the scale a packed run's own "
            "difference is to be read against)")
    out()


def fidelity_per_seed(cfgs, sums, out) -> None:
    ways = list(sums)
    out("| model seed | " + " | ".join(f"{w}: grokking epoch, key freqs" for w in ways) + " |")
    out("|---:|" + "---|" * len(ways))
    for i, c in enumerate(cfgs):
        cells = []
        for w in ways:
            s = sums[w][i]
            star = "" if s["grokked"] else "*"
            cells.append(f"{s['grokking_epoch']}{star}, {sorted(s['key_freqs'])}")
        out(f"| {c.model_seed} | " + " | ".join(cells) + " |")
    out("(* not grokked by the last epoch: censored)")
    out()


# ---- end to end --------------------------------------------------------------------------------
def e2e(base, dev: Device, args, out) -> None:
    """R runs trained with commits into run directories (background writes, the GPU
    default), in the eager step and in --fid-mode."""
    from grokhpc.loop import fit_stack
    from grokhpc.stack import Stack
    from grokhpc.train import Trainer

    r, n = args.e2e, args.e2e_epochs
    for mode in dict.fromkeys(["eager", args.fid_mode]):
        mode_here = effective_modes(base, dev, [mode], out)[mode]
        dev.reset()
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            trainers = [Trainer.open(c, Path(tmp) / f"r{i}", dev.dev)
                        for i, c in enumerate(group_configs(base, r))]
            t_open = time.perf_counter() - t0
            stack = Stack(trainers, dev.dev, exact=False, step_mode=mode_here, log=out)
            dev.sync()
            t0 = time.perf_counter()
            fit_stack(stack, n, None, lambda *a: None, background=True)
            dev.sync()
            wall = time.perf_counter() - t0
            for t in trainers:
                t.close()
            del stack, trainers
        rate = r * n / wall
        out(f"end to end, R={r}, step {mode}, {n} epochs with a commit every "
            f"{base.checkpoint_every} (background writes): {rate:,.0f} run-epochs/s incl. "
            f"commits -> {args.sweep_epochs:,} epochs of {r} runs in "
            f"{args.sweep_epochs * r / rate / 60:.1f} min (+ {t_open:.0f} s to open the runs)")
    out()


# ---- main --------------------------------------------------------------------------------------
def main(argv=None) -> int:
    args = parse_args(argv)
    parts = [p for p in args.only.split(",") if p]
    bad = [p for p in parts if p not in PARTS]
    if bad:
        print(f"error: --only: expected parts of {', '.join(PARTS)}, got {', '.join(bad)}",
              file=sys.stderr)
        return 2
    dev = Device(args.device)
    dev.torch.set_float32_matmul_precision("highest")
    if args.smoke and not dev.cuda:   # tiny ops on a shared CPU: threads only contend
        dev.torch.set_num_threads(1)
    from grokhpc.config import RunConfig

    base = RunConfig(p=args.p, device=str(dev.dev))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    out = Lines(args.out)
    out(f"# Packed training on {dev.name} ({dev.dev})")
    out()
    out(f"torch {dev.torch.__version__}; free/total memory {dev.free / 2**30:.1f}/"
        f"{dev.total / 2**30:.1f} GiB; {time.strftime('%Y-%m-%d %H:%M')}; command: "
        f"`python {' '.join(sys.argv)}`")
    out()
    t0 = time.perf_counter()
    for part in parts:
        t = time.perf_counter()
        if part == "check":
            check(dev, args, out)
        elif part == "speed":
            speed(base, dev, args, out)
        elif part == "fidelity":
            fidelity(dev, args, out)
        else:
            e2e(base, dev, args, out)
        out(f"({part}: {time.perf_counter() - t:.0f} s)")
        out()
    out(f"total {time.perf_counter() - t0:.0f} s")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
