"""Sweeps through a real SLURM (slurmctld + slurmd + slurmdbd on localhost, slurm/start_slurm.sh):
an array end to end with one failing run, a cancelled job relaunched to the same result as an
uninterrupted run, a requeued job resuming from its checkpoint, relaunching a finished sweep, and
each sweep aggregated by the job launch submits after its arrays, with no further command (the
relaunch replacing the queued one).

All sweeps are submitted at once by one module fixture, so their jobs share the node's CPUs
while the tests look at them one after the other. The two jobs to interrupt are held right
after the commit of epoch ``HOLD_EPOCH`` (tests/job_hold/sitecustomize.py) until the test has
cancelled or requeued them: whatever the machine's speed, they stop there with work left.
Time limits below only turn a hung cluster into a failure; no outcome depends on them.
"""

import contextlib
import io
import json
import os
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
# state.pt with every checkpoint row: the held commit is where a scancel'd or requeued job
# resumes (SLURM's USR2 warning, which writes the state too, is tested in test_launch.py)
LAUNCHER = {"time": 10, "cpus_per_task": 1, "mem_gb": 1, "state_every": 0}
LONG = {**TINY_RUN, "p": 13, "n_epochs": 300, "checkpoint_every": 20}
HOLD_EPOCH = 100                     # a checkpoint epoch, with 200 epochs left after it
GUARD_S = 600                        # a failure guard for a hung cluster, never a race
JOB_HOLD = Path(__file__).resolve().parent / "job_hold"


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


def ended_at(job_id: str) -> tuple[str, str]:
    """sacct's Start of a job's last record and the latest End of any of its records (all the
    tasks of an array when ``job_id`` is the array's), as ISO strings."""
    out = subprocess.run(["sacct", "-n", "-P", "-X", "--duplicates", "-o", "JobID,Start,End",
                          "-j", job_id], capture_output=True, text=True).stdout
    rows = [ln.split("|") for ln in out.splitlines() if ln.split("|")[0].split("_")[0] == job_id]
    return rows[-1][1], max(r[2] for r in rows)


def finished(job_id: str) -> bool:
    live = subprocess.run(["squeue", "-h", "-r", "-o", "%i", "-j", job_id.split("_")[0]],
                          capture_output=True, text=True).stdout.split()
    recs = job_records(job_id)
    return job_id not in live and bool(recs) and recs[-1] in TERMINAL


def epoch(run_dir) -> int:
    prog = RunDir(run_dir).read_progress()
    return prog["epoch"] if prog else 0


def launch(spec) -> tuple[dict, str]:
    buf = io.StringIO()
    plan = launch_mod.launch(str(spec), executor="slurm", out=buf)
    return plan, buf.getvalue()


@contextlib.contextmanager
def held_at(hold_dir: Path, hold_epoch: int):
    """Within: jobs submitted from here hold after the commit of ``hold_epoch`` (their
    environment puts tests/job_hold first on PYTHONPATH and names ``hold_dir``)."""
    hold_dir.mkdir(parents=True)
    old = {k: os.environ.get(k) for k in ("PYTHONPATH", "GROKHPC_TEST_HOLD_DIR",
                                          "GROKHPC_TEST_HOLD_EPOCH")}
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(JOB_HOLD), old["PYTHONPATH"])
                                               if p)
    os.environ["GROKHPC_TEST_HOLD_DIR"] = str(hold_dir)
    os.environ["GROKHPC_TEST_HOLD_EPOCH"] = str(hold_epoch)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def wait_held(s: dict) -> dict:
    """The held job's marker, once it holds; fails at once if the job ended instead."""
    reached = s["hold"] / "reached"

    def held():
        if reached.exists():
            return json.loads(reached.read_text())
        if finished(s["job"]):
            pytest.fail(f"job {s['job']} ended without holding at epoch {HOLD_EPOCH}:\n"
                        + job_log(s["out"], s["job"]), pytrace=False)
    return wait(held, GUARD_S, f"job {s['job']} to hold at epoch {HOLD_EPOCH}")


def last_job(out: Path) -> list[dict]:
    return json.loads((out / "manifest.json").read_text())["launches"][-1]["jobs"]


def last_aggregation(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())["launches"][-1]["aggregation"]


def job_log(out: Path, job_id: str) -> str:
    return "".join(f.read_text() for f in sorted((out / "jobs" / job_id).glob("*_log.out")))


def submit(root: Path) -> dict:
    """Submit the three sweeps; the two to interrupt hold at HOLD_EPOCH."""
    specs = {
        # one run each, held on the way so that the test interrupts it with work left
        "cancel": {"base": {**LONG, "model_seed": 5}, "grid": {"data_seed": [1]}},
        "requeue": {"base": {**LONG, "model_seed": 6}, "grid": {"data_seed": [2]}},
        # two runs in one array: the second asks for a GPU this node does not have
        "e2e": {"base": TINY_RUN, "zip": {"p": [11, 13], "device": ["cpu", "cuda:0"]}},
    }
    out: dict = {"t0": time.monotonic()}
    for name, spec in specs.items():
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump({**spec, "out": str(root / name),
                                        "launcher": LAUNCHER}))
        hold = root / "hold" / name
        with held_at(hold, HOLD_EPOCH) if name != "e2e" else contextlib.nullcontext():
            plan, printed = launch(path)
        out[name] = {"spec": path, "out": root / name, "plan": plan, "printed": printed,
                     "sweep": plan["sweep"], "hold": hold,
                     "job": last_job(root / name)[0]["job_id"],
                     "agg": last_aggregation(root / name)["job_id"]}
        if name == "cancel":   # queued until the relaunch replaces it (its job holds till then)
            subprocess.run(["scontrol", "hold", out[name]["agg"]], check=True)
    return out


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory):
    """Submit three sweeps; once the held jobs hold, ``scancel`` one and ``scontrol
    requeuehold`` the other, see the status say "requeued", then release it. Returns what the
    tests check. Afterwards, cancels whatever of them still runs."""
    out = submit(tmp_path_factory.mktemp("slurm"))
    try:
        c, r = out["cancel"], out["requeue"]
        c["held"] = wait_held(c)
        subprocess.run(["scancel", c["job"]], check=True)
        r["held"] = wait_held(r)
        # held in the queue after the requeue, so the test sees "requeued" for sure
        subprocess.run(["scontrol", "requeuehold", r["job"]], check=True)
        r["status_after"] = wait(lambda: [x for x in status.collect(r["out"])
                                          if x.state == "requeued"], GUARD_S,
                                 "status to show the run requeued")[0]
        subprocess.run(["scontrol", "release", r["job"]], check=True)
        yield out
    finally:
        for s in (out["cancel"], out["requeue"]):
            (s["hold"] / "release").touch()
        launches = [launched for s in (out["cancel"], out["requeue"], out["e2e"])
                    for launched in json.loads((s["out"] / "manifest.json").read_text())
                    ["launches"]]
        ids = [j["job_id"] for launched in launches
               for j in launched["jobs"] + [launched.get("aggregation")] if j]
        subprocess.run(["scancel", *ids], capture_output=True)


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
    assert last_aggregation(s["out"])["after"] == [base]   # aggregation after this array
    assert f"aggregation job {s['agg']} (default partition) aggregates the sweep and draws its " \
           f"figures once job(s) {base} end" in s["printed"]
    wait(lambda: all(finished(j) for j in ids), GUARD_S, "the e2e array to finish")
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
    assert s["held"]["epoch"] == HOLD_EPOCH
    wait(lambda: finished(s["job"]), GUARD_S, "the cancelled job to end")
    assert job_records(s["job"])[-1] == "CANCELLED"
    assert epoch(run.dir) == HOLD_EPOCH                   # stopped where it was held
    assert status.collect(s["out"])[0].state == "cancelled"

    plan, printed = launch(s["spec"])                     # relaunch: resumes the run
    assert len(plan["jobs"]) == 1 and "1 to run" in printed
    (job2,) = last_job(s["out"])
    assert job2["job_id"] != s["job"]
    # ... and replaces the queued aggregation job by one after the new job
    assert f"it replaces queued aggregation job {s['agg']}, cancelled" in printed
    agg = last_aggregation(s["out"])
    assert (agg["after"], agg["replaces"]) == ([job2["job_id"]], s["agg"])
    wait(lambda: finished(s["agg"]), GUARD_S, "the replaced aggregation job to end")
    assert job_records(s["agg"]) == ["CANCELLED"]
    # meanwhile, the same config trained here without interruption
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = run_training(RunConfig(**{**LONG, "model_seed": 5, "data_seed": 1}),
                           tmp_path / "ref", progress_bar=False, log=lambda m: None)
    finally:
        torch.set_num_threads(threads)
    wait(lambda: finished(job2["job_id"]), GUARD_S, "the relaunched job to finish")
    assert job_records(job2["job_id"])[-1] == "COMPLETED"
    log = job_log(s["out"], job2["job_id"])
    resumed = [int(m) for m in re.findall(r"resuming at epoch (\d+)/", log)]
    assert resumed == [HOLD_EPOCH], log
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
    wait(lambda: finished(jid), GUARD_S, "the requeued job to finish")
    records = job_records(jid)
    assert records[0] == "REQUEUED" and records[-1] == "COMPLETED"
    log = job_log(s["out"], jid)
    resumed = [int(m) for m in re.findall(r"resuming at epoch (\d+)/", log)]
    assert s["held"]["epoch"] == HOLD_EPOCH
    assert resumed == [HOLD_EPOCH], log                     # not started over
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
          f"requeued job {jid} held at epoch {s['held']['epoch']} "
          f"(status then: {s['status_after'].state}, requeues {s['status_after'].requeues}); "
          f"sacct {records}; resumed at epoch {resumed[0]}")


def test_array_size_limit_read_from_the_cluster():
    conf = (Path(__file__).resolve().parent.parent / "slurm" / "slurm.conf.in").read_text()
    limit = int(re.search(r"^MaxArraySize=(\d+)", conf, re.M).group(1))
    assert launch_mod.max_array_size() == limit - 1


def test_each_sweep_aggregated_itself_after_its_arrays(sweeps):
    """No aggregate command anywhere: the job launch submitted after each sweep's arrays (the
    relaunch's, for the cancelled sweep; for the requeued one, after its requeued job ran
    again) wrote aggregate/runs.parquet with every run and its state."""
    e2e = sweeps["e2e"]
    good, bad = e2e["sweep"].runs
    expected = {"e2e": {good.run_id: "done", bad.run_id: "failed"},
                "cancel": {sweeps["cancel"]["sweep"].runs[0].run_id: "done"},
                "requeue": {sweeps["requeue"]["sweep"].runs[0].run_id: "done"}}
    for name, states in expected.items():
        s = sweeps[name]
        agg = last_aggregation(s["out"])
        wait(lambda: finished(agg["job_id"]), GUARD_S, f"the {name} aggregation job to end")
        assert job_records(agg["job_id"])[-1] == "COMPLETED", job_log(s["out"], agg["job_id"])
        started, _ = ended_at(agg["job_id"])
        for after in agg["after"]:               # it started once those jobs had ended
            assert started >= ended_at(after)[1], (name, after)
        runs = pd.read_parquet(s["out"] / "aggregate" / "runs.parquet")
        assert dict(zip(runs["run_id"], runs["state"])) == states, name
        assert pq.read_table(s["out"] / "aggregate" / "runs.parquet").num_rows == len(states)
    table = subprocess.run([sys.executable, "-m", "grokhpc.status", str(e2e["out"])],
                           capture_output=True, text=True, check=True).stdout
    assert table.splitlines()[-1] == (f"aggregation job {e2e['agg']} done: tables and figures "
                                      f"in {e2e['out'] / 'aggregate'}")
    print(f"\n{table.splitlines()[-1]}; "
          f"all sweeps aggregated {time.monotonic() - sweeps['t0']:.0f} s after submission")
