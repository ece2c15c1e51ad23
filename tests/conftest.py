"""Shared fixtures: tiny sweep specs and the single-node SLURM (started on demand)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent

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
