"""Status: states read from real run directories (done, partly trained, failed, never started),
epochs done/planned, the error line of failed runs, and the command line table."""

import json
import subprocess
import sys

import pytest
import yaml

from conftest import TINY_RUN
from grokhpc import status
from grokhpc.scheduler import MANIFEST, new_manifest
from grokhpc.store import RunDir, atomic_write_json
from grokhpc.sweep import load_sweep

LOG_TAIL = """\
submitit INFO (2026-01-01 00:00:00,000) - Starting with JobEnvironment(job_id=7)
Traceback (most recent call last):
  File "x.py", line 1, in <module>
    raise KeyError("p")
KeyError: 'p'

During handling of the above exception, another exception occurred:

Traceback (most recent call last):
  File "y.py", line 2, in f
    g()
torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB
srun: error: node1: task 0: Exited with exit code 1
"""


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    """A sweep of four runs: one complete, one stopped at epoch 40 of 60, one failed, one
    never started -- made with the real trainer and launcher code."""
    import torch

    from grokhpc.train import Trainer, run_training

    tmp = tmp_path_factory.mktemp("status")
    out = tmp / "sweep"
    spec = tmp / "spec.yaml"
    spec.write_text(yaml.safe_dump({"base": {**TINY_RUN, "n_epochs": 60},
                                    "grid": {"model_seed": [1, 2, 3, 4]}, "out": str(out)}))
    sweep = load_sweep(spec)
    out.mkdir()
    atomic_write_json(out / MANIFEST, new_manifest(sweep, sweep.launcher, None))
    done, partial, failed, _never = sweep.runs
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_training(done.config, done.dir, progress_bar=False, log=lambda m: None)
        t = Trainer.open(partial.config, partial.dir)
        for _ in range(40):
            t.step()
        t.commit(checkpoint=True)
    finally:
        torch.set_num_threads(threads)
    RunDir(failed.dir).create({"run_id": failed.run_id})
    RunDir(failed.dir).write_error("Traceback (most recent call last):\n  File ...\n"
                                   "RuntimeError: CUDA error: invalid device ordinal\n")
    return out, sweep


def test_states_epochs_and_errors(sweep_dir):
    out, sweep = sweep_dir
    rows = status.collect(out)
    assert [r.run_id for r in rows] == [r.run_id for r in sweep.runs]
    by_state = [(r.state, r.epoch, r.n_epochs) for r in rows]
    assert by_state == [("done", 60, 60), ("pending", 40, 60), ("failed", None, None),
                        ("pending", None, None)]
    assert rows[2].error == "RuntimeError: CUDA error: invalid device ordinal"
    assert rows[0].grokked is not None
    assert rows[0].swept == {"model_seed": 1}


def test_command_line_table(sweep_dir):
    out, sweep = sweep_dir
    r = subprocess.run([sys.executable, "-m", "grokhpc.status", str(out)], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split()[:3] == ["run_id", "model_seed", "state"]
    row = {ln.split()[0]: ln for ln in lines[1:-1]}
    assert "done" in row[sweep.runs[0].run_id] and "60/60" in row[sweep.runs[0].run_id]
    assert "40/60" in row[sweep.runs[1].run_id]
    assert "invalid device ordinal" in row[sweep.runs[2].run_id]
    assert lines[-1].startswith("4 runs: 1 done, 2 pending, 1 failed;")
    r = subprocess.run([sys.executable, "-m", "grokhpc.status", str(out), "--json"],
                       capture_output=True, text=True, check=True)
    states = [json.loads(ln)["state"] for ln in r.stdout.splitlines()]
    assert states == ["done", "pending", "failed", "pending"]


def test_not_a_sweep_dir(tmp_path, capsys):
    assert status.main([str(tmp_path)]) == 2
    assert "no manifest.json" in capsys.readouterr().err


def test_error_line_from_a_submitit_log(tmp_path):
    assert status.last_error_line(LOG_TAIL) == \
        "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    d = tmp_path / "jobs" / "12_3"
    d.mkdir(parents=True)
    (d / "12_3_0_log.err").write_text(LOG_TAIL)
    assert status.log_error(tmp_path, "12_3").startswith("torch.OutOfMemoryError")
    assert status.log_error(tmp_path, "99") is None
