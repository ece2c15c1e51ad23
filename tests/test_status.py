"""Status: states read from real run directories (done, partly trained, failed, never started),
epochs done/planned, the error line of failed runs, and the command line table."""

import json
import shutil
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
        t.fit(progress_bar=False, until=40)
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


def _copy(sweep_dir, tmp_path):
    """A copy of the module's sweep to damage: (its directory, the sweep)."""
    out, sweep = sweep_dir
    shutil.copytree(out, tmp_path / "sweep")
    return tmp_path / "sweep", sweep


def _states(out, verify=False) -> list[tuple[str, str | None]]:
    return [(r.state, r.error) for r in status.collect(out, use_scheduler=False,
                                                      verify_all=verify)]


def test_a_done_run_with_a_flipped_checkpoint_byte_is_corrupt(sweep_dir, tmp_path):
    """The last row is checked by default, every row with --verify; restoring the file from a
    copy (the advice) makes the run done again."""
    out, sweep = _copy(sweep_dir, tmp_path)
    f = out / "runs" / sweep.runs[0].run_id / "checkpoints.npy"
    good = f.read_bytes()
    n = len(json.loads(f.with_name("progress.json").read_text())["checkpoint_epochs"])
    row = (len(good) - 128) // n
    damaged = bytearray(good)
    damaged[128 + (n - 1) * row + row // 2] ^= 0x01           # one bit of the last row
    f.write_bytes(bytes(damaged))
    state, error = _states(out)[0]
    assert state == "corrupt" and error == (
        f"checkpoints.npy: row {n - 1} of {n} damaged (their checksums differ from those "
        "written at commit); restore the file from a copy, or delete the run directory to "
        "train the run again")
    r = subprocess.run([sys.executable, "-m", "grokhpc.status", str(out), "--no-scheduler"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "1 corrupt" in r.stdout.splitlines()[-1]
    f.write_bytes(good)                                        # restored from a copy
    assert _states(out)[0] == ("done", None)
    damaged = bytearray(good)
    damaged[128 + row // 2] ^= 0x01                            # one bit of the first row
    f.write_bytes(bytes(damaged))
    assert _states(out)[0] == ("done", None)                   # the cheap check: last row only
    state, error = _states(out, verify=True)[0]
    assert state == "corrupt" and error.startswith(f"checkpoints.npy: row 0 of {n} damaged")
    r = subprocess.run([sys.executable, "-m", "grokhpc.status", str(out), "--no-scheduler",
                        "--verify"], capture_output=True, text=True)
    assert r.returncode == 0 and "1 corrupt" in r.stdout.splitlines()[-1]
    assert "row 0 of" in r.stdout


def test_a_run_directory_holding_another_run_is_corrupt_until_moved_back(sweep_dir, tmp_path):
    """The done run's directory moved to where the manifest expects a run never started:
    that entry is corrupt (its directory holds another run), the moved run pending; moving
    it back to a directory named for its run (the advice) mends both."""
    out, sweep = _copy(sweep_dir, tmp_path)
    done, never = sweep.runs[0].run_id, sweep.runs[3].run_id
    (out / "runs" / done).rename(out / "runs" / never)
    got = _states(out)
    assert got[0] == ("pending", None) and got[3] == (
        "corrupt", f"named for run {never} but holds run {done} (config.json); move it to a "
                   "directory named for its run")
    (out / "runs" / never).rename(out / "runs" / done)
    got = _states(out)
    assert got[0] == ("done", None) and got[3] == ("pending", None)


def test_a_run_directory_given_to_status_says_how_to_open_it(sweep_dir, capsys):
    import grokhpc

    out, sweep = sweep_dir
    run = sweep.runs[0].dir
    assert status.main([str(run)]) == 2
    assert capsys.readouterr().err == (f"error: {run}: not a sweep directory (no manifest.json); "
                                       "a run directory; open it with grokhpc.open_run\n")
    assert grokhpc.open_run(run).summary["run_id"] == sweep.runs[0].run_id   # the advice


def test_error_line_from_a_submitit_log(tmp_path):
    assert status.last_error_line(LOG_TAIL) == \
        "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    d = tmp_path / "jobs" / "12_3"
    d.mkdir(parents=True)
    (d / "12_3_0_log.err").write_text(LOG_TAIL)
    assert status.log_error(tmp_path, "12_3").startswith("torch.OutOfMemoryError")
    assert status.log_error(tmp_path, "99") is None


# ---- the aggregation job ----------------------------------------------------------------------
def with_aggregation(tmp_path, job_id="57", after=("55", "56")):
    """A sweep directory whose manifest's last launch submitted aggregation job ``job_id``."""
    manifest = {"runs": [], "axes": [],
                "launches": [{"executor": "slurm", "jobs": [], "aggregation":
                              {"job_id": "50", "after": ["49"]}},
                             {"executor": "slurm", "jobs": [],
                              "aggregation": {"job_id": job_id, "after": list(after)}},
                             {"executor": "slurm", "jobs": []}]}   # a relaunch with nothing new
    atomic_write_json(tmp_path / MANIFEST, manifest)
    return manifest


@pytest.mark.parametrize("queue, history, expected", [
    ("57 PENDING", "57|PENDING", "aggregation job 57 pending, after job(s) 55, 56"),
    ("57 RUNNING", "57|RUNNING", "aggregation job 57 running"),
    ("", "57|COMPLETED", "aggregation job 57 done: tables and figures in {dir}/aggregate"),
    ("", "57|OUT_OF_MEMORY", "aggregation job 57 failed: job ran out of memory; "
                             "rerun: python -m grokhpc.aggregate {dir}"),
    ("", "57|CANCELLED by 0", "aggregation job 57 cancelled"),
    ("", "", "aggregation job 57: state unknown (the scheduler has no record of it)"),
])
def test_aggregation_job_line(tmp_path, monkeypatch, queue, history, expected):
    """The latest launch's aggregation job in one line, from what squeue and sacct print."""
    from grokhpc import scheduler as sched

    manifest = with_aggregation(tmp_path)
    asked = []

    def ask(cmd):
        asked.append(cmd)
        return {"squeue": queue, "sacct": history}[cmd[0]]
    monkeypatch.setattr(sched, "_ask", ask)
    assert status.aggregation_line(tmp_path, manifest) == expected.format(dir=tmp_path)
    assert all(cmd[-1] == "57" for cmd in asked)     # asked about that job only


def test_failed_aggregation_names_the_error_in_its_log(tmp_path, monkeypatch):
    from grokhpc import scheduler as sched

    manifest = with_aggregation(tmp_path)
    log = tmp_path / "jobs" / "57"
    log.mkdir(parents=True)
    (log / "57_0_log.err").write_text(LOG_TAIL)
    monkeypatch.setattr(sched, "_ask", lambda cmd: "57|FAILED" if cmd[0] == "sacct" else "")
    assert status.aggregation_line(tmp_path, manifest) == (
        "aggregation job 57 failed: torch.OutOfMemoryError: CUDA out of memory. Tried to "
        f"allocate 2.00 GiB; rerun: python -m grokhpc.aggregate {tmp_path}")


def test_status_command_shows_the_aggregation_job_last(tmp_path):
    with_aggregation(tmp_path)
    r = subprocess.run([sys.executable, "-m", "grokhpc.status", str(tmp_path),
                        "--no-scheduler"], capture_output=True, text=True, check=True)
    assert r.stdout.splitlines()[-1] == "aggregation job 57: state unknown (--no-scheduler)"
    r = subprocess.run([sys.executable, "-m", "grokhpc.status", str(tmp_path), "--json",
                        "--no-scheduler"], capture_output=True, text=True, check=True)
    assert [json.loads(ln) for ln in r.stdout.splitlines()] == [
        {"aggregation_job": "57", "state": "unknown", "after": ["55", "56"],
         "line": "aggregation job 57: state unknown (--no-scheduler)"}]
    atomic_write_json(tmp_path / MANIFEST, {"runs": [], "launches": [{"jobs": []}]})
    r = subprocess.run([sys.executable, "-m", "grokhpc.status", str(tmp_path),
                        "--no-scheduler"], capture_output=True, text=True, check=True)
    assert "aggregation" not in r.stdout
