"""Shared fixtures: tiny sweep specs, the single-node SLURM and a Chromium for kaleido (both
found or provided on demand)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent

# A shell's background job starts with SIGINT ignored, and children inherit that: the tests
# that press Ctrl-C on a trainer or a launch would find it deaf. Given a handler here instead,
# the processes the tests start get the default action, as from a terminal.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# A run small enough for a shared 2-core machine: p=11, d_model 32, a few hundred epochs.
TINY_RUN = {"p": 11, "d_model": 32, "d_head": 8, "n_heads": 4, "d_mlp": 64, "n_epochs": 200,
            "checkpoint_every": 20, "eval_every": 10, "train_frac": 0.5, "lr": 3.0e-3}


@pytest.fixture
def write_spec(tmp_path):
    """write_spec(dict or text, name="spec.yaml") -> path of a spec file under tmp_path."""
    def write(spec, name: str = "spec.yaml") -> Path:
        path = tmp_path / name
        path.write_text(spec if isinstance(spec, str) else yaml.safe_dump(spec, sort_keys=False))
        return path
    return write


def _sinfo_answers() -> bool:
    if not shutil.which("sinfo"):
        return False
    try:
        r = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True,
                           timeout=30)
    except subprocess.TimeoutExpired:
        return False
    return r.returncode == 0 and any(s.strip() in ("idle", "mixed", "allocated", "completing")
                                     for s in r.stdout.splitlines())


@pytest.fixture(scope="session")
def slurm_cluster():
    """A working SLURM on localhost: the one running, or one started by slurm/start_slurm.sh.
    Tests that need it fail (never skip) when it cannot be had."""
    if not _sinfo_answers():
        script = REPO / "slurm" / "start_slurm.sh"
        r = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=600)
        if r.returncode != 0 or not _sinfo_answers():
            pytest.fail(f"SLURM is not running and {script} could not start it "
                        f"(exit {r.returncode}; run it as root):\n{r.stdout[-2000:]}"
                        f"{r.stderr[-2000:]}", pytrace=False)
    for cmd in ("sbatch", "squeue", "sacct", "scontrol", "scancel"):
        if not shutil.which(cmd):
            pytest.fail(f"SLURM command {cmd} missing from PATH", pytrace=False)
    return True


# ---- a Chromium for PNG/SVG/PDF export ----------------------------------------------------------
# Debian's headless shell and the paper font (grokhpc.figures.FONT_FAMILY); no recommends.
CHROMIUM_PACKAGES = ("chromium-headless-shell", "fonts-liberation")
CHROMIUM_HINT = ("install one: `apt-get install chromium-headless-shell` (as root), or run "
                 "`kaleido_get_chrome` where there is network, or set BROWSER_PATH to a Chromium")
PROVIDED: list[str] = []    # what the fixtures found or installed, printed after the tests


def pytest_terminal_summary(terminalreporter):
    for line in PROVIDED:
        terminalreporter.write_line(line)


def apt_install(packages) -> str:
    """``apt-get install`` quietly and noninteractively, as slurm/start_slurm.sh does; '' on
    success, else why not (one line)."""
    if not shutil.which("apt-get") or os.geteuid() != 0:
        return "apt-get needs root" if shutil.which("apt-get") else "no apt-get"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    lock = ["-o", "DPkg::Lock::Timeout=600"]     # another apt-get (start_slurm.sh) may run
    for cmd in (["apt-get", *lock, "update", "-qq"],
                ["apt-get", *lock, "install", "-y", "-qq", "--no-install-recommends", *packages]):
        try:
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
        except subprocess.TimeoutExpired:
            return f"`{' '.join(cmd)}` timed out"
        if r.returncode != 0:
            tail = (r.stderr.strip().splitlines() or [""])[-1]
            return f"`{' '.join(cmd)}` exited {r.returncode}: {tail}"
    return ""


@pytest.fixture(scope="session")
def chromium() -> str:
    """The Chromium kaleido renders with, as SLURM is provided: the one grokhpc.figures finds
    (BROWSER_PATH, Debian's packages, kaleido's cache), else Debian's installed with apt-get
    (as root), else Chrome for Testing fetched with kaleido.get_chrome_sync. Tests that need it
    fail (never skip) with one line when none can be had."""
    from grokhpc import figures

    t0 = time.monotonic()
    found = figures.find_browser()
    if found:
        PROVIDED.append(f"chromium: found {found}")
        return found
    why = apt_install(CHROMIUM_PACKAGES)
    found = figures.find_browser()
    if found:
        PROVIDED.append(f"chromium: none found; installed {' '.join(CHROMIUM_PACKAGES)} "
                        f"with apt-get in {time.monotonic() - t0:.0f} s: {found}")
        return found
    if os.environ.get(figures.NO_FETCH_ENV):
        fetch_why = f"{figures.NO_FETCH_ENV} is set"
    else:
        try:
            found = figures.fetch_browser(log=None)
        except Exception as e:  # noqa: BLE001 -- no network, a changed kaleido
            fetch_why = f"{type(e).__name__}: {getattr(e, 'reason', None) or e}".splitlines()[0]
    if found:
        PROVIDED.append(f"chromium: none found, apt-get failed ({why}); fetched with "
                        f"kaleido in {time.monotonic() - t0:.0f} s: {found}")
        return found
    why = why or "installed, yet not found"
    pytest.fail(f"no Chromium for PNG/SVG/PDF export: none found, apt-get failed ({why}), "
                f"kaleido's fetch failed ({fetch_why[:160]}); {CHROMIUM_HINT}", pytrace=False)


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for a module (packed == solo comparisons), restored afterwards."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# A process that takes a run directory's lock and says whether it got it (exit 3: refused).
TRY_LOCK = """
import sys
from grokhpc.store import RunDir, RunLockedError, lock_run
try:
    lock_run(RunDir(sys.argv[1]))
except RunLockedError as e:
    print(e)
    sys.exit(3)
print("locked")
"""


def step_solo_and_stacked(opts, solo, opt, P, grads, it) -> None:
    """One step of three solo torch optimisers and of the stacked one on the same gradients;
    every run's weights must come out bit-identical."""
    import torch

    for r in range(len(opts)):
        for i in range(len(P)):
            solo[r][i].grad = grads[i][r].clone()
        opts[r].step()
    for i in range(len(P)):
        P[i].grad = grads[i].clone()
    opt.step()
    for r in range(len(opts)):
        for i in range(len(P)):
            assert torch.equal(P[i][r], solo[r][i]), (it, r, i)
