"""Correctness of solo and packed training on a device, about two minutes on a GPU: one line
per check (PASS, FAIL, WARN or SKIP), written to --out as each finishes.

    python benchmarks/gpu_checks.py --out check.md                 # on the GPU
    python benchmarks/gpu_checks.py --device cpu --small --out x.md  # the same code, tiny, on a CPU

* ways: 3 tiny runs (p = 17, add) trained alone twice (the device's own run-to-run
  determinism, without torch's deterministic algorithms), packed in exact mode (must equal
  the runs alone bit for bit) and packed in batched mode in each step mode (the first 10
  epochs within 1e-3 relative of the runs alone; graph equal to fused bit for bit, both of
  its graphs captured);
* minibatch resume: a minibatch run stopped halfway and resumed from its state.pt, alone and
  packed (exact, then batched): it resumes (the batch generator's state and the optimiser's
  step counters stay on the host) and ends as the run trained in one go (exact: bit for bit);
* host syncs: per epoch without a commit of a solo run and of packed groups (eager; graph; an
  lr schedule in the group), counted by torch.cuda's sync debug mode (none expected), and
  per commit of the packed divergence check (one);
* cuda:1 seen as cuda:0: a run whose config names cuda:1, trained by the device process of a
  several-GPU job, which sees one GPU;
* process settings: deterministic algorithms as before training.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

QUIET = lambda *a: None  # noqa: E731


def curve_and_weight_gaps(dirs, ref) -> tuple[float, float, float, list]:
    """(max |d loss|, max relative d loss, max |d weight|, [(grokking epoch, reference's)])."""
    import numpy as np

    from grokhpc.store import RunDir

    d_abs = d_rel = d_w = 0.0
    groks = []
    for d, s in zip(dirs, ref):
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
    return d_abs, d_rel, d_w, groks


def early_gap(dirs, ref, epochs: int = 10) -> float:
    """Max relative difference of the train losses over the first ``epochs`` epochs."""
    import numpy as np

    from grokhpc.store import RunDir

    gap = 0.0
    for d, s in zip(dirs, ref):
        x = RunDir(d).read_curves()["train_loss"].to_numpy()[:epochs]
        y = RunDir(s).read_curves()["train_loss"].to_numpy()[:epochs]
        gap = max(gap, float((np.abs(x - y) / np.abs(y)).max()))
    return gap


def tiny_configs(base, epochs: int) -> list:
    """Three tiny runs (p = 17, add; each its own seeds, fraction, lr, decay) that grok within
    a few hundred epochs."""
    tiny = base.replace(p=17, op="add", d_model=32, n_heads=4, d_head=8, d_mlp=64,
                        n_epochs=epochs, checkpoint_every=max(1, epochs // 6), eval_every=10)
    return [tiny.replace(model_seed=1, data_seed=2, train_frac=0.9, lr=1e-2, weight_decay=1.0),
            tiny.replace(model_seed=3, data_seed=4, train_frac=0.7, lr=5e-3, weight_decay=0.3,
                         betas=(0.85, 0.99)),
            tiny.replace(model_seed=5, data_seed=6, train_frac=0.8, lr=1e-2, weight_decay=2.0)]


class Lines:
    """Lines printed as they come and kept, ``path`` rewritten with each (a run cut short by a
    time limit leaves what it wrote)."""

    def __init__(self, path: str | None = None):
        self.lines: list[str] = []
        self.path = Path(path) if path else None

    def __call__(self, s: str = "") -> None:
        print(s, flush=True)
        self.lines.append(s)
        if self.path is not None:
            self.path.write_text("\n".join(self.lines) + "\n")


class Checks:
    """Each check's verdict line, said (``say``: a ``Lines``) as it comes; a check that raises
    is a FAIL with its exception (traceback on stderr)."""

    def __init__(self, say):
        self.line = say
        self.counts: dict[str, int] = {}

    def verdict(self, status: str, name: str, text: str, seconds: float | None = None) -> None:
        self.counts[status] = self.counts.get(status, 0) + 1
        took = "" if seconds is None else f" ({seconds:.0f} s)"
        self.line(f"{status} {name}{took}: {text}")

    def run(self, name: str, fn) -> None:
        """``fn()`` -> [(status, name suffix, text), ...] or raises."""
        t0 = time.perf_counter()
        try:
            results = fn()
        except Exception as e:
            traceback.print_exc()
            first = (str(e).splitlines() or [""])[0]
            self.verdict("FAIL", name, f"{type(e).__name__}: {first}",
                         time.perf_counter() - t0)
            return
        dt = time.perf_counter() - t0
        for i, (status, sub, text) in enumerate(results):
            self.verdict(status, f"{name}{', ' + sub if sub else ''}", text,
                         dt if i == 0 else None)


# ---- packed against solo -----------------------------------------------------------------------
def ways(base, dev, epochs: int, modes=("eager", "fused", "graph")) -> list:
    """The tiny runs alone twice, packed exact, packed batched in each step mode."""
    from grokhpc.runtime import JobSettings
    from grokhpc.train import run_training
    from grokhpc.train_batched import train_group

    cfgs, said, out = tiny_configs(base, epochs), [], []
    names = ["solo again", "exact"] + [f"batched {m}" for m in modes]
    with tempfile.TemporaryDirectory() as tmp:
        dirs = {w: [Path(tmp) / w.replace(" ", "_") / str(i) for i in range(3)]
                for w in ["solo"] + names}
        for way in ["solo", "solo again"]:
            for c, d in zip(cfgs, dirs[way]):
                run_training(c, d, progress_bar=False, log=QUIET)
        for way in names[1:]:
            mode = None if way == "exact" else way.split()[-1]
            log = said.append if mode == "graph" else QUIET
            train_group(cfgs, dirs[way], JobSettings(step_mode=mode or "eager"), device=dev,
                        progress_bar=False, log=log, exact=way == "exact")
        gap = {w: curve_and_weight_gaps(dirs[w], dirs["solo"]) for w in names}
        same = gap["solo again"][:3] == (0, 0, 0)
        out.append(("PASS" if same else "WARN", "solo twice", "bit-identical" if same else
                    f"differ run to run on this device: {gap_text(gap['solo again'])}"))
        exact = gap["exact"][:3] == (0, 0, 0)
        out.append(("PASS" if exact else "FAIL", "exact vs solo",
                    "bit-identical" if exact else gap_text(gap["exact"])))
        for m in modes:
            early = early_gap(dirs[f"batched {m}"], dirs["solo"])
            out.append(("PASS" if early <= 1e-3 else "FAIL", f"batched {m} vs solo",
                        f"first 10 epochs max rel {early:.2g} (<= 1e-3); all {epochs}: "
                        + gap_text(gap[f"batched {m}"])))
        if "graph" in modes and "fused" in modes:
            out.append(graph_verdict(dirs, said, dev))
    return out


def gap_text(g) -> str:
    a, r, w, groks = g
    return (f"max |d loss| {a:.3g}, max rel {r:.3g}, max |d weight| {w:.3g}, grokking epochs "
            f"(this, solo) {groks}")


def graph_verdict(dirs, said, dev) -> tuple:
    g = curve_and_weight_gaps(dirs["batched graph"], dirs["batched fused"])
    if dev.type != "cuda":
        return ("SKIP", "graph vs fused", f"no CUDA here: {said[0] if said else 'fused used'}")
    failed = [s for s in said if "failed" in s]
    same = g[:3] == (0, 0, 0)
    text = ("bit-identical" if same else gap_text(g).replace("solo", "fused")) + \
        ("; " + "; ".join(failed) if failed else "; train and test steps captured")
    return ("PASS" if same and not failed else "FAIL", "graph vs fused", text)


# ---- minibatch resume --------------------------------------------------------------------------
def minibatch_resume(base, dev, epochs: int) -> list:
    """Minibatch runs stopped halfway and resumed from state.pt, alone and packed."""
    from grokhpc.runtime import JobSettings
    from grokhpc.train import Trainer, run_training
    from grokhpc.train_batched import train_group

    cfgs = [c.replace(batch_size=32, train_frac=0.8, n_epochs=epochs,
                      checkpoint_every=max(1, epochs // 4))
            for c in tiny_configs(base, epochs)[:2]]
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for i, c in enumerate(cfgs):
            run_training(c, root / "whole" / str(i), progress_bar=False, log=QUIET)
        ways = {"alone": None, "packed exact": True, "packed batched": False}
        for way, exact in ways.items():
            dirs = [root / way.replace(" ", "_") / str(i) for i in range(len(cfgs))]
            for c, d in zip(cfgs, dirs):
                t = Trainer.open(c, d, dev, JobSettings(state_every_s=0))
                t.fit(progress_bar=False, until=epochs // 2)
                t.close()
            host = steps_on_host(cfgs[0], dirs[0], dev)
            if exact is None:
                for c, d in zip(cfgs, dirs):
                    run_training(c, d, progress_bar=False, log=QUIET)
            else:
                train_group(cfgs, dirs, device=dev, progress_bar=False, log=QUIET, exact=exact)
            g = curve_and_weight_gaps(dirs, [root / "whole" / str(i) for i in range(2)])
            same = g[:3] == (0, 0, 0)
            want = "bit-identical to the run in one go" if exact is not False else "resumed"
            ok = host and (same or exact is False)
            out.append(("PASS" if ok else ("FAIL" if exact or not host else "WARN"), way,
                        f"{want}: {'yes' if same else gap_text(g)}; optimiser step counters "
                        f"and batch generator on the host after the resume: {host}"))
    return out


def steps_on_host(cfg, d, dev) -> bool:
    """Whether a resumed trainer keeps its optimiser's step counters and its minibatch
    generator's state on the host (where torch reads them without a sync)."""
    from grokhpc.train import Trainer

    t = Trainer.open(cfg, d, dev)
    try:
        steps = [s["step"] for s in t.optimizer.state.values()]
        return bool(steps) and all(s.device.type == "cpu" for s in steps) \
            and t.batch_gen.get_state().device.type == "cpu"
    finally:
        t.close()


# ---- host syncs --------------------------------------------------------------------------------
@contextlib.contextmanager
def counting_syncs(dev):
    """A list that fills with one entry per call that makes the host wait for the device
    (torch.cuda's sync debug mode, as warnings) while the block runs; None on a CPU, where
    nothing waits (tests/test_host_syncs.py counts the same calls there)."""
    import torch

    if dev.type != "cuda":
        yield None
        return
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield seen
        finally:
            torch.cuda.set_sync_debug_mode("default")


def n_syncs(seen) -> str:
    return "-" if seen is None else str(sum("synchroniz" in str(w.message) for w in seen))


def sync_text(seen, what: str) -> str:
    if seen is None:
        return f"ran ({what}); a GPU counts its syncs, tests/test_host_syncs.py the calls on a CPU"
    return f"{n_syncs(seen)} host syncs in {what}"


def host_syncs(base, dev, epochs: int = 20) -> list:
    """Syncs over ``epochs`` epochs without a commit (test scored every 5), after a warm-up
    that lets graph mode capture both of its steps; then one divergence check."""
    from grokhpc.loop import epoch_end
    from grokhpc.stack import Stack
    from grokhpc.step_mode import resolve
    from grokhpc.store import RunDir
    from grokhpc.train import Trainer

    cfgs = [c.replace(n_epochs=200, checkpoint_every=200, eval_every=5)
            for c in tiny_configs(base, 200)]
    cfgs[1] = cfgs[1].replace(warmup_epochs=50, lr_schedule="cosine")
    warm, out = 25, []
    with tempfile.TemporaryDirectory() as tmp:
        solo = Stack([Trainer(cfgs[0], RunDir(Path(tmp) / "solo"), dev)], dev, exact=True)
        groups = {"solo": lambda: (solo.step(), epoch_end(solo))}   # a run trained alone
        for mode in ("eager", "graph"):
            here = resolve(mode, cfgs[0], dev, False, QUIET)
            trainers = [Trainer(c, RunDir(Path(tmp) / mode / str(i)), dev)
                        for i, c in enumerate(cfgs)]
            stack = Stack(trainers, dev, exact=False, step_mode=here, log=QUIET)
            groups[f"packed {mode}{'' if here == mode else f' (= {here})'} (R = 3, one run "
                   "with an lr schedule)"] = lambda s=stack: (s.step(), epoch_end(s))
        for name, epoch in groups.items():
            for _ in range(warm):
                epoch()
            with counting_syncs(dev) as seen:
                for _ in range(epochs):
                    epoch()
            bad = seen is not None and n_syncs(seen) != "0"
            out.append(("FAIL" if bad else ("PASS" if seen is not None else "SKIP"), name,
                        sync_text(seen, f"{epochs} epochs without a commit")))
        with counting_syncs(dev) as seen:
            stack.diverged(list(range(stack.R)), [])
        ok = seen is None or n_syncs(seen) == "1"
        out.append(("PASS" if ok and seen is not None else ("SKIP" if ok else "FAIL"),
                    "divergence check at a commit", sync_text(seen, "one check of 3 runs")))
    return out


# ---- a device process of a several-GPU job -----------------------------------------------------
def _narrowed_child(cfg: dict, out: str) -> None:
    from grokhpc.job import _train_on_device
    from grokhpc.runtime import JobSettings

    _train_on_device([(cfg, out)], "0", JobSettings(threads=1))


def narrowed_device(base, dev) -> list:
    """A run whose config names cuda:1, trained by ``job._train_on_device`` in a spawned
    process that sees one GPU (CUDA_VISIBLE_DEVICES=0)."""
    from grokhpc.config import to_dict
    from grokhpc.store import RunDir

    if dev.type != "cuda":
        return [("SKIP", "", "needs a GPU (tests/test_gpu_paths.py checks the config it gets)")]
    cfg = to_dict(tiny_configs(base, 20)[0].replace(device="cuda:1"))
    with tempfile.TemporaryDirectory() as tmp:
        proc = multiprocessing.get_context("spawn").Process(
            target=_narrowed_child, args=(cfg, str(Path(tmp) / "run")))
        proc.start()
        proc.join(120)
        done = RunDir(Path(tmp) / "run").is_complete()
        if proc.is_alive():
            proc.kill()
        return [("PASS" if done else "FAIL", "",
                 f"run complete: {done} (exit code {proc.exitcode})")]


def settings_left_alone(before: bool) -> list:
    import torch

    now = torch.are_deterministic_algorithms_enabled()
    return [("PASS" if now == before else "FAIL", "",
             f"deterministic algorithms {'on' if now else 'off'} after training, as before")]


def run_checks(dev, small: bool, out: Checks) -> None:
    """Every check on ``dev`` (``small``: CPU sizes, the same code)."""
    import torch

    from grokhpc.config import RunConfig

    before = torch.are_deterministic_algorithms_enabled()
    base = RunConfig(device=str(dev))
    epochs = 40 if small else 300
    out.run("ways", lambda: ways(base, dev, epochs))
    out.run("minibatch resume", lambda: minibatch_resume(base, dev, 12 if small else 40))
    out.run("host syncs", lambda: host_syncs(base, dev, 10 if small else 20))
    out.run("cuda:1 in a one-GPU process", lambda: narrowed_device(base, dev))
    out.run("process settings", lambda: settings_left_alone(before))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if any)")
    ap.add_argument("--small", action="store_true", help="tiny sizes (a CPU dry run)")
    ap.add_argument("--out", default=None, help="markdown file written line by line")
    args = ap.parse_args(argv)
    import torch

    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    if args.small and dev.type == "cpu":
        torch.set_num_threads(1)   # tiny ops on a shared CPU: threads only contend
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    say = Lines(args.out)
    say(f"# Checks on {name} ({dev}), torch {torch.__version__}")
    say()
    return 1 if check_all(dev, args.small, say) else 0


def check_all(dev, small: bool, say) -> int:
    """Every check, then a count line; returns the number of failures."""
    out, t0 = Checks(say), time.perf_counter()
    run_checks(dev, small, out)
    c = out.counts
    say(f"checks: {c.get('PASS', 0)} pass, {c.get('FAIL', 0)} fail, {c.get('WARN', 0)} warn, "
        f"{c.get('SKIP', 0)} skipped in {time.perf_counter() - t0:.0f} s")
    return c.get("FAIL", 0)


if __name__ == "__main__":
    sys.exit(main())
