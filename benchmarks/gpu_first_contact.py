"""A GPU's first contact with grokhpc, safe to run blind: prerequisites, then correctness (about
two minutes), then the speed table, then the fidelity of packed runs, under one time limit.

    python3 benchmarks/gpu_first_contact.py            # on the GPU machine; files into $OUT
    python3 benchmarks/gpu_first_contact.py --cpu      # dry run: the same parts, tiny, on a CPU

Each prerequisite is one line (torch with CUDA and a GPU it sees; numpy, pandas, pyarrow, yaml,
tqdm, submitit; transformer_lens, or a stand-in with identity hook points where it is missing:
the timed paths call no hooks). Then each part runs in its own process group with the time
left to it (``--limit-s``, default 540 s for a 600 s cap) and is killed at its end:

* check: benchmarks/gpu_checks.py (solo against packed exact, bit for bit; batched within
  tolerance; graph against fused; minibatch resumes; host syncs; a one-GPU device process);
* speed: benchmarks/gpu_batched.py --only speed (run-epochs/s per R and step mode, TF32, peak
  against estimated memory, the projection);
* fidelity: benchmarks/gpu_batched.py --only fidelity (16 runs alone and packed).

Files (at most 5, in one folder: ``--out``, else $OUT, else a new temporary folder):
summary.md (one screen: prerequisites, every check's verdict, the speed rows, the fidelity
rows, each part's time and whether it was cut), check.md, speed.md, fidelity.md and
first_contact.log (everything every part printed). Every file is rewritten as lines come, and
summary.md before and after each part, so whatever ends the run leaves what was measured.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PARTS = (  # name, command after the interpreter, CPU dry-run arguments, most seconds
    ("check", ["benchmarks/gpu_checks.py", "--out", "{out}/check.md"],
     ["--device", "cpu", "--small"], 180),
    ("speed", ["benchmarks/gpu_batched.py", "--only", "speed", "--out", "{out}/speed.md"],
     ["--smoke"], 240),
    ("fidelity", ["benchmarks/gpu_batched.py", "--only", "fidelity", "--out",
                  "{out}/fidelity.md"], ["--smoke"], 10_000),
)
RESERVE_S = 15     # kept back from each part for the summary after it
MIN_PART_S = 20    # a part is not started with less than this left
PACKAGES = ("numpy", "pandas", "pyarrow", "yaml", "tqdm", "submitit")
STAND_IN = {
    "__init__.py": '"""Stand-in for transformer_lens: HookPoint an identity module, '
                   'HookedRootModule a plain torch module; no hooks, no cache."""\n'
                   "import torch.nn as nn\n\nfrom .hook_points import HookPoint  # noqa: F401\n"
                   "\n\nclass HookedRootModule(nn.Module):\n    def setup(self):\n        pass\n"
                   "\n\nclass ActivationCache(dict):\n    pass\n",
    "hook_points.py": "import torch.nn as nn\n\n\nclass HookPoint(nn.Module):\n"
                      "    def forward(self, x):\n        return x\n"}


class Run:
    """The output folder, the log, the summary's pieces and the clock."""

    def __init__(self, out: Path, limit_s: float, cpu: bool):
        self.out, self.cpu, self.t0 = out, cpu, time.monotonic()
        self.deadline = self.t0 + limit_s
        self.limit_s = limit_s
        self.log_path = out / "first_contact.log"
        self.prereqs: list[str] = []
        self.parts: dict[str, str] = {}
        self.head = ""

    def say(self, text: str) -> None:
        print(text, flush=True)
        with open(self.log_path, "a") as f:
            f.write(text + "\n")

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def write_summary(self) -> None:
        used = time.monotonic() - self.t0
        lines = [self.head, "", f"limit {self.limit_s:.0f} s, used {used:.0f} s; parts: "
                 + ("; ".join(f"{k} {v}" for k, v in self.parts.items()) or "none yet"), ""]
        bad = [p for p in self.prereqs if not p.startswith("ok ")]
        lines += [f"prerequisites: {len(self.prereqs) - len(bad)} ok"] + bad + [""]
        for name, picker in (("check", check_lines), ("speed", speed_lines),
                             ("fidelity", fidelity_lines)):
            f = self.out / f"{name}.md"
            if f.exists():
                lines += [f"## {name} ({f.name})"] + picker(f.read_text().splitlines()) + [""]
        files = sorted(p.name for p in self.out.iterdir() if p.is_file())
        lines.append("files: " + ", ".join(files))
        (self.out / "summary.md").write_text("\n".join(lines) + "\n")


# ---- what the summary keeps of each part -------------------------------------------------------
def clip(line: str, width: int = 200) -> str:
    return line if len(line) <= width else line[:width - 3] + "..."


def check_lines(lines: list[str]) -> list[str]:
    return [clip(s) for s in lines if s.split(" ", 1)[0] in ("PASS", "FAIL", "WARN", "SKIP")
            or s.startswith("checks:")]


def speed_lines(lines: list[str]) -> list[str]:
    return [clip(s, 400) for s in lines
            if s.startswith(("|", "seed notebook", "PROJECTION", "(speed"))]


def fidelity_lines(lines: list[str]) -> list[str]:
    out, table = [], 0
    for s in lines:
        if s.startswith("|"):
            table += s.startswith("| way") or s.startswith("| model seed")
            if table == 1:
                out.append(s)
        elif s.startswith(("## Fidelity", "runs alone", "(fidelity")):
            out.append(clip(s, 400))
    return out


# ---- prerequisites -----------------------------------------------------------------------------
def prerequisites(run: Run, env: dict) -> bool:
    """One line per prerequisite into the log; False when training cannot start at all."""
    ok = True

    def line(good: bool, text: str) -> None:
        run.prereqs.append(f"{'ok' if good else 'MISSING'} {text}")
        run.say(run.prereqs[-1])

    line(True, f"python {platform.python_version()} ({sys.executable})")
    try:
        import torch
    except ImportError as e:
        line(False, f"torch: {e}")
        return False
    cuda = torch.cuda.is_available()
    line(True, f"torch {torch.__version__} (built with CUDA {torch.version.cuda})")
    if cuda:
        free, total = torch.cuda.mem_get_info()
        line(True, f"GPU: {torch.cuda.get_device_name()} ({torch.cuda.device_count()} visible),"
                   f" {free / 2**30:.1f} of {total / 2**30:.1f} GiB free")
    else:
        why = " (a CPU dry run)" if run.cpu else "; --cpu runs the dry run"
        line(run.cpu, "GPU: none visible to torch" + why)
        ok = ok and run.cpu
    for name in PACKAGES:
        try:
            mod = importlib.import_module(name)
            line(True, f"{name} {getattr(mod, '__version__', '')}".rstrip())
        except ImportError as e:
            line(False, f"{name}: {e}" + ("; the cuda:1 check fails" if name == "submitit"
                                          else ""))
            ok = ok and name == "submitit"
    line(True, transformer_lens(env))
    return ok


def transformer_lens(env: dict) -> str:
    """transformer_lens's version, or a stand-in put on the children's path."""
    try:
        import transformer_lens  # noqa: F401
        from importlib.metadata import version
        return f"transformer_lens {version('transformer_lens')}"
    except ImportError:
        root = Path(tempfile.mkdtemp(prefix="tl_stand_in_"))
        (root / "transformer_lens").mkdir()
        for name, text in STAND_IN.items():
            (root / "transformer_lens" / name).write_text(text)
        env["PYTHONPATH"] += os.pathsep + str(root)
        return "transformer_lens: not installed; a stand-in with identity hook points is used"


# ---- the parts ---------------------------------------------------------------------------------
def run_part(run: Run, name: str, argv: list[str], most_s: float, env: dict) -> None:
    """One part in its own process group, killed when its time is up."""
    budget = min(most_s, run.left() - RESERVE_S)
    if budget < MIN_PART_S:
        run.parts[name] = "not run (no time left)"
        run.say(f"== {name}: not run, {run.left():.0f} s left")
        return
    run.parts[name] = f"running (limit {budget:.0f} s)"
    run.write_summary()
    run.say(f"== {name}: {' '.join(argv[1:])} (limit {budget:.0f} s)")
    t0 = time.monotonic()
    with open(run.log_path, "a") as log:
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=budget)
            what = f"{time.monotonic() - t0:.0f} s, exit {code}"
        except subprocess.TimeoutExpired:
            stop_group(proc)
            what = f"CUT at its limit, {time.monotonic() - t0:.0f} s (kept what it wrote)"
    run.parts[name] = what
    run.say(f"== {name}: {what}")
    run.write_summary()


def stop_group(proc) -> None:
    """SIGTERM to the part's process group, SIGKILL 5 s later if anything is left."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="dry run: every part, tiny, on the CPU")
    ap.add_argument("--out", default=None, help="output folder (default: $OUT, else a new one)")
    ap.add_argument("--limit-s", type=float, default=540.0,
                    help="seconds the whole run may take (default %(default)g)")
    ap.add_argument("--only", default=",".join(p[0] for p in PARTS),
                    help="parts to run, of " + ",".join(p[0] for p in PARTS))
    args = ap.parse_args(argv)
    out = Path(args.out or os.environ.get("OUT") or tempfile.mkdtemp(prefix="first_contact_"))
    out.mkdir(parents=True, exist_ok=True)
    run = Run(out, args.limit_s, args.cpu)
    paths = [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(paths))
    run.head = (f"# GPU first contact{' (CPU dry run)' if args.cpu else ''}: "
                f"{platform.node()}, {time.strftime('%Y-%m-%d %H:%M')}")
    ready = prerequisites(run, env)
    if not ready:
        run.parts["all"] = "not run: a prerequisite is missing (see above)"
    for name, cmd, dry, most in PARTS if ready else ():
        if name in args.only.split(","):
            argv = [sys.executable] + [c.format(out=out) for c in cmd] + (dry if args.cpu
                                                                          else [])
            run_part(run, name, argv, most, env)
    run.write_summary()
    print("\n" + (out / "summary.md").read_text(), end="")
    return 0 if ready else 2


if __name__ == "__main__":
    sys.exit(main())
