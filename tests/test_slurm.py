"""Sweeps through a real SLURM (slurmctld + slurmd + slurmdbd on localhost, slurm/start_slurm.sh):
an array end to end with one failing run, a cancelled job relaunched to the same result as an
uninterrupted run, a requeued job resuming from its checkpoint, relaunching a finished sweep.

All sweeps are submitted at once by one module fixture, so their jobs share the node's two
CPUs while the tests look at them one after the other.
"""

import io
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

from conftest import TINY_RUN
from grokhpc import launch as launch_mod
from grokhpc import status
from grokhpc.config import RunConfig
from grokhpc.store import RunDir

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm_cluster")]

TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL"}
LAUNCHER = {"time": 10, "cpus_per_task": 1, "mem_gb": 1}
LONG = {**TINY_RUN, "p": 13, "n_epochs": 1000, "checkpoint_every": 20}


def wait(pred, timeout: float, what: str, every: float = 0.5):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(every)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def job_records(job_id: str) -> list[str]:
    """sacct's states of one job, oldest first (a requeued job has several records)."""
    out = subprocess.run(["sacct", "-n", "-P", "-X", "--duplicates", "-o", "JobID,State",
                          "-j", job_id.split("_")[0]], capture_output=True, text=True).stdout
    return [ln.split("|")[1].split()[0] for ln in out.splitlines()
            if ln.split("|")[0] == job_id]


def finished(job_id: str) -> bool:
    live = subprocess.run(["squeue", "-h", "-r", "-o", "%i", "-j", job_id.split("_")[0]],
                          capture_output=True, text=True).stdout.split()
    recs = job_records(job_id)
    return job_id not in live and bool(recs) and recs[-1] in TERMINAL


def epoch(run_dir) -> int:
    try:
        prog = RunDir(run_dir).read_progress()
    except Exception:  # mid-rename on a slow disk
        return 0
    return prog["epoch"] if prog else 0


def launch(spec) -> tuple[dict, str]:
    buf = io.StringIO()
    plan = launch_mod.launch(str(spec), executor="slurm", out=buf)
    return plan, buf.getvalue()


def last_job(out: Path) -> list[dict]:
    return json.loads((out / "manifest.json").read_text())["launches"][-1]["jobs"]


def job_log(out: Path, job_id: str) -> str:
    return "".join(f.read_text() for f in sorted((out / "jobs" / job_id).glob("*_log.out")))


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory):
    """Submit three sweeps, then interrupt two of their jobs once their runs pass epoch 40:
    ``scancel`` one, ``scontrol requeue`` the other. Returns what the tests check."""
    root = tmp_path_factory.mktemp("slurm")
    specs = {
        # one run each, long enough to be interrupted on the way
        "cancel": {"base": {**LONG, "model_seed": 5}, "grid": {"data_seed": [1]}},
        "requeue": {"base": {**LONG, "model_seed": 6}, "grid": {"data_seed": [2]}},
        # two runs in one array: the second asks for a GPU this node does not have
        "e2e": {"base": TINY_RUN, "zip": {"p": [11, 13], "device": ["cpu", "cuda:0"]}},
    }
    t0 = time.monotonic()
    out: dict = {"t0": t0}
    for name, spec in specs.items():
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump({**spec, "out": str(root / name),
                                        "launcher": LAUNCHER}))
        plan, printed = launch(path)
        out[name] = {"spec": path, "out": root / name, "plan": plan, "printed": printed,
                     "sweep": plan["sweep"]}
    c, r = out["cancel"], out["requeue"]
    c["job"], r["job"] = last_job(c["out"])[0]["job_id"], last_job(r["out"])[0]["job_id"]
    c_dir, r_dir = c["sweep"].runs[0].dir, r["sweep"].runs[0].dir
    end = time.monotonic() + 240
    while time.monotonic() < end and not ("cancelled_at" in c and "requeued_at" in r):
        if "cancelled_at" not in c and epoch(c_dir) >= 40:
            c["cancelled_at"] = epoch(c_dir)
            subprocess.run(["scancel", c["job"]], check=True)
        if "requeued_at" not in r and epoch(r_dir) >= 40:
            r["requeued_at"] = epoch(r_dir)
            subprocess.run(["scontrol", "requeue", r["job"]], check=True)
            r["status_after"] = wait(lambda: [x for x in status.collect(r["out"])
                                              if x.state == "requeued"], 30,
                                     "status to show the run requeued")[0]
        time.sleep(0.3)
    if not ("cancelled_at" in c and "requeued_at" in r):
        pytest.fail("the cancel/requeue runs never reached epoch 40 within 240 s")
    assert c["cancelled_at"] < LONG["n_epochs"] and r["requeued_at"] < LONG["n_epochs"], \
        "a run finished before it could be interrupted"
    return out


def test_array_end_to_end_with_one_failed_run(sweeps):
    s = sweeps["e2e"]
    good, bad = s["sweep"].runs
    jobs = last_job(s["out"])
    assert [j["runs"] for j in jobs] == [[good.run_id], [bad.run_id]]
    ids = [j["job_id"] for j in jobs]
    base = ids[0].split("_")[0]
    assert ids == [f"{base}_0", f"{base}_1"]           # one array for the sweep
    assert f"SLURM array(s) {base}" in s["printed"]
    assert f"python -m grokhpc.status {s['out']}" in s["printed"]
    wait(lambda: all(finished(j) for j in ids), 240, "the e2e array to finish")
    assert job_records(ids[0])[-1] == "COMPLETED"
    assert job_records(ids[1])[-1] == "FAILED"

    rows = {r.run_id: r for r in status.collect(s["out"])}
    assert (rows[good.run_id].state, rows[good.run_id].epoch) == ("done", TINY_RUN["n_epochs"])
    assert rows[bad.run_id].state == "failed"
    assert "CUDA" in rows[bad.run_id].error or "cuda" in rows[bad.run_id].error
    # the good run's results, read back with pyarrow and pandas
    f = Path(good.dir) / "curves.parquet"
    assert pq.read_table(f).num_rows == TINY_RUN["n_epochs"] + 1
    assert pd.read_parquet(f)["epoch"].iloc[-1] == TINY_RUN["n_epochs"]
    assert RunDir(good.dir).is_complete()
    assert good.run_id in job_log(s["out"], ids[0])
    # the table names the failure
    table = subprocess.run([sys.executable, "-m", "grokhpc.status", str(s["out"])],
                           capture_output=True, text=True, check=True).stdout
    assert re.search(rf"{bad.run_id}.*failed.*(CUDA|cuda)", table)
    assert "1 done, 1 failed" in table


def test_cancelled_job_relaunched_matches_an_uninterrupted_run(sweeps, tmp_path):
    import torch

    from grokhpc.train import run_training

    s = sweeps["cancel"]
    (run,) = s["sweep"].runs
    wait(lambda: finished(s["job"]), 60, "the cancelled job to end")
    assert job_records(s["job"])[-1] == "CANCELLED"
    stopped_at = epoch(run.dir)
    assert s["cancelled_at"] <= stopped_at < LONG["n_epochs"]
    assert status.collect(s["out"])[0].state == "cancelled"

    plan, printed = launch(s["spec"])                     # relaunch: resumes the run
    assert len(plan["jobs"]) == 1 and "1 to run" in printed
    (job2,) = last_job(s["out"])
    assert job2["job_id"] != s["job"]
    # meanwhile, the same config trained here without interruption
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = run_training(RunConfig(**{**LONG, "model_seed": 5, "data_seed": 1}),
                           tmp_path / "ref", progress_bar=False, log=lambda m: None)
    finally:
        torch.set_num_threads(threads)
    wait(lambda: finished(job2["job_id"]), 240, "the relaunched job to finish")
    assert job_records(job2["job_id"])[-1] == "COMPLETED"
    log = job_log(s["out"], job2["job_id"])
    assert f"resuming at epoch {stopped_at}/{LONG['n_epochs']}" in log
    got = RunDir(run.dir)
    assert got.is_complete()
    a, b = got.read_curves(), ref.read_curves()
    assert len(a) == LONG["n_epochs"] + 1
    for col in a.columns:   # bit-identical, NaN where not evaluated
        assert np.array_equal(a[col].to_numpy(), b[col].to_numpy(), equal_nan=True), col
    ea, wa = got.checkpoints(mmap=False)
    eb, wb = ref.checkpoints(mmap=False)
    assert ea == eb and np.array_equal(wa, wb)


def test_requeued_job_resumes_from_its_checkpoint(sweeps):
    s = sweeps["requeue"]
    (run,) = s["sweep"].runs
    jid = s["job"]
    assert (s["status_after"].state, s["status_after"].requeues) == ("requeued", 1)
    wait(lambda: finished(jid), 240, "the requeued job to finish")
    records = job_records(jid)
    assert records[0] == "REQUEUED" and records[-1] == "COMPLETED"
    log = job_log(s["out"], jid)
    resumed = [int(m) for m in re.findall(r"resuming at epoch (\d+)/", log)]
    assert len(resumed) == 1 and resumed[0] >= s["requeued_at"], log   # not started over
    assert log.count(f"run {run.run_id} -> ") == 2           # the same job ran twice
    rows = status.collect(s["out"])
    assert (rows[0].state, rows[0].epoch, rows[0].requeues) == ("done", LONG["n_epochs"], 1)
    assert len(RunDir(run.dir).read_curves()) == LONG["n_epochs"] + 1

    # relaunching the finished sweep submits nothing and leaves the manifest's launches alone
    n_launches = len(json.loads((s["out"] / "manifest.json").read_text())["launches"])
    plan, printed = launch(s["spec"])
    assert plan["jobs"] == [] and "nothing to submit" in printed and "1 complete" in printed
    assert len(json.loads((s["out"] / "manifest.json").read_text())["launches"]) == n_launches
    print(f"\nslurm sweeps done {time.monotonic() - sweeps['t0']:.0f} s after submission; "
          f"requeued job {jid} at epoch {s['requeued_at']} "
          f"(status then: {s['status_after'].state}, requeues {s['status_after'].requeues}); "
          f"sacct {records}; resumed at epoch {resumed[0]}")


def test_array_size_limit_read_from_the_cluster():
    conf = (Path(__file__).resolve().parent.parent / "slurm" / "slurm.conf.in").read_text()
    limit = int(re.search(r"^MaxArraySize=(\d+)", conf, re.M).group(1))
    assert launch_mod.max_array_size() == limit - 1
