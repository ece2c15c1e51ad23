"""The scheduler module: array ids, squeue/sacct output recorded on a real SLURM (and edited to
hold the states an idle node does not produce), the run states status shows for them, what
launch leaves to the jobs in flight, and the manifest reader.

Expectations are written from SLURM's documented meanings of its job states (squeue(1),
sacct(1) "JOB STATE CODES"), not from the code: RUNNING/COMPLETING run the job now; PENDING,
SUSPENDED wait; REQUEUED, REQUEUE_HOLD, PREEMPTED (while still queued) mean the job was
stopped and queued again; FAILED, TIMEOUT, OUT_OF_MEMORY, NODE_FAIL, BOOT_FAIL and DEADLINE
end a job in failure; CANCELLED (by a user) and PREEMPTED (once over) end it from outside.
"""

from pathlib import Path

import pytest

from grokhpc import launch as launch_mod
from grokhpc import scheduler as sched
from grokhpc import status
from grokhpc.store import RunDir, RunDirError, atomic_write_json
from grokhpc.sweep import load_sweep

DATA = Path(__file__).parent / "data" / "slurm"


def recorded(name: str) -> tuple[str, str]:
    return (DATA / f"{name}.squeue").read_text(), (DATA / f"{name}.sacct").read_text()


def infos(name: str) -> dict[str, sched.JobInfo]:
    queue, history = recorded(name)
    return sched.job_infos(sched.parse_squeue(queue), sched.parse_sacct(history))


# ---- array ids ------------------------------------------------------------------------------
@pytest.mark.parametrize("job_id, tasks", [
    ("12_[3-7%2]", ["12_3", "12_4", "12_5", "12_6", "12_7"]),
    ("12_[1,3,5-6]", ["12_1", "12_3", "12_5", "12_6"]),
    ("12_[0-6:3]", ["12_0", "12_3", "12_6"]),
    ("12_[9]", ["12_9"]),
    ("12_4", ["12_4"]),
    ("12", ["12"]),
    ("12_[a-b]", ["12_[a-b]"]),          # not a range SLURM prints: names itself
])
def test_array_ids_expand(job_id, tasks):
    assert sched.expand_job_id(job_id) == tasks


def test_base_ids_and_the_exact_commands():
    assert [sched.base_job_id(j) for j in ("12_3", "12", "12_[3-7%2]")] == ["12", "12", "12"]
    ids = ["13_1", "12_3", "12_4", "14"]
    assert sched.squeue_command(ids) == ["squeue", "-h", "-r", "-o", "%i %T", "-j", "12,13,14"]
    assert sched.sacct_command(ids) == ["sacct", "-n", "-P", "-X", "--duplicates", "-o",
                                        "JobID,State", "-j", "12,13,14"]


# ---- recorded output ------------------------------------------------------------------------
def test_recorded_output_parses():
    queue, history = recorded("array_running")
    assert sched.parse_squeue(queue) == {"2_3": "RUNNING", "2_4": "RUNNING", "2_5": "PENDING",
                                         "2_6": "PENDING", "2_7": "PENDING", "4": "PENDING"}
    assert sched.parse_sacct(history) == {"3": ["CANCELLED"], "4": ["PENDING"],
                                          "2_3": ["RUNNING"], "2_4": ["RUNNING"],
                                          "2_5": ["PENDING"], "2_6": ["PENDING"],
                                          "2_7": ["PENDING"]}
    # sacct interleaves a requeued job's records with other jobs'; each job's stay in order
    assert sched.parse_sacct(recorded("requeue_later")[1]) == {"9": ["REQUEUED", "PENDING"],
                                                               "10": ["RUNNING"]}
    assert sched.parse_sacct(recorded("ended")[1]) == {"9": ["REQUEUED", "COMPLETED"],
                                                       "10": ["TIMEOUT"]}
    assert sched.parse_squeue(recorded("ended")[0]) == {}


# (recording, job, run state of an unfinished run, requeues)
RECORDED = [
    ("array_running", "2_3", "running", 0),
    ("array_running", "2_4", "running", 0),
    ("array_running", "2_6", "pending", 0),      # a throttled array task waits its turn
    ("array_running", "3", "cancelled", 0),      # scancel while pending; squeue forgot it
    ("array_running", "4", "pending", 0),
    ("finished", "2_5", "pending", 0),           # COMPLETED without finishing: resume it
    ("finished", "3", "cancelled", 0),
    ("finished", "4", "failed", 0),
    ("requeue_now", "9", "requeued", 1),         # COMPLETING on its way back to the queue
    ("requeue_now", "10", "running", 0),
    ("requeue_later", "9", "requeued", 1),       # queued again after a requeue
    ("ended", "9", "pending", 1),                # COMPLETED after a requeue, run unfinished
    ("ended", "10", "failed", 0),                # TIMEOUT: reached its time limit
]


@pytest.mark.parametrize("name, job_id, expected, requeues", RECORDED)
def test_recorded_states(name, job_id, expected, requeues):
    info = infos(name)[job_id]
    assert info.requeues == requeues
    for files in ("pending", "running"):         # never started, or stopped part-way
        assert sched.run_state(files, info) == expected
    # a finished run is done whatever its job did; a corrupt one is corrupt
    assert sched.run_state("done", info) == "done"
    assert sched.run_state("corrupt", info) == "corrupt"


# (job, run state, requeues, error) for a run that has not started: the edited recording
EDITED = {
    "12_3": ("running", 0, None),
    "12_4": ("requeued", 1, None),               # COMPLETING, sacct REQUEUED
    "12_5": ("pending", 0, None),                # from the range 12_[5-7%2]
    "12_7": ("pending", 0, None),
    "13_0": ("requeued", 1, None),               # NODE_FAIL, then queued again
    "13_1": ("requeued", 1, None),               # PREEMPTED, still in the queue
    "13_2": ("running", 1, None),                # PREEMPTED, then running again
    "13_3": ("failed", 0, "job ran out of memory"),
    "13_4": ("failed", 0, "job reached its time limit"),
    "13_5": ("cancelled", 0, None),              # CANCELLED by 1000
    "13_6": ("cancelled", 0, None),              # PREEMPTED and over: not requeued
    "13_7": ("failed", 0, "job's node failed"),  # NODE_FAIL and over
    "13_8": ("requeued", 1, None),               # REQUEUE_HOLD
    "13_9": ("pending", 0, None),                # SUSPENDED: waits, holds nothing
    "14": ("pending", 0, None),                  # COMPLETED, run unfinished, no traceback
    "15_5": ("pending", 0, None),                # sacct range 15_[1,3,5-6], squeue silent
    "16": ("failed", 0, "job passed its deadline"),
    "17": ("failed", 0, "job's node failed to boot"),
}


def make_sweep(root: Path, job_ids: list[str]) -> dict[str, str]:
    """A sweep directory whose manifest gives run r<job> to SLURM job <job>; config only."""
    runs = {j: "r" + j.replace("_", "x") for j in job_ids}
    manifest = {"axes": [], "runs": [{"run_id": rid, "dir": f"runs/{rid}", "swept": {}}
                                     for rid in runs.values()],
                "launches": [{"executor": "slurm",
                              "jobs": [{"job_id": j, "runs": [rid]} for j, rid in runs.items()]}]}
    root.mkdir(parents=True, exist_ok=True)
    sched.write_manifest(root, manifest)
    for rid in runs.values():
        RunDir(root / "runs" / rid).create({"run_id": rid})
    return runs


@pytest.fixture
def scheduler_says(monkeypatch):
    """Make squeue/sacct answer with a recording; returns the commands asked."""
    asked: list[list[str]] = []

    def use(name: str):
        queue, history = recorded(name)
        monkeypatch.setattr(sched, "_ask", lambda cmd: asked.append(cmd) or
                            {"squeue": queue, "sacct": history}[cmd[0]])
        return asked
    return use


def test_edited_states_through_status(tmp_path, scheduler_says):
    asked = scheduler_says("edited")
    runs = make_sweep(tmp_path / "sweep", list(EDITED))
    rows = {r.run_id: r for r in status.collect(tmp_path / "sweep")}
    got = {j: (rows[rid].state, rows[rid].requeues, rows[rid].error) for j, rid in runs.items()}
    assert got == EDITED
    assert [c[0] for c in asked] == ["squeue", "sacct"]
    assert asked[0][-1] == "12,13,14,15,16,17"


def test_files_and_job_together(tmp_path, scheduler_says):
    """Done stands over a failed job; a live job stands over error.txt; a traceback in the log
    of a job that completed makes the run failed; a half-trained run whose job was cancelled
    is cancelled with its epochs shown."""
    scheduler_says("edited")
    runs = make_sweep(tmp_path / "s", ["13_3", "12_3", "14", "13_5", "12_5"])
    d = {j: RunDir(tmp_path / "s" / "runs" / rid) for j, rid in runs.items()}
    d["13_3"].write_progress({"epoch": 50, "n_epochs": 50, "done": True})
    atomic_write_json(d["13_3"].file("summary.json"), {"grokked": False, "grokking_epoch": 50})
    d["12_3"].write_error("Traceback ...\nRuntimeError: from an earlier try\n")
    log = tmp_path / "s" / "jobs" / "14"
    log.mkdir(parents=True)
    (log / "14_0_log.err").write_text("Traceback (most recent call last):\n  File ...\n"
                                      "ValueError: p must be prime\n")
    d["13_5"].write_progress({"epoch": 20, "n_epochs": 50, "done": False})
    d["12_5"].file("progress.json").write_bytes(b"\xff\xfe\x00")
    rows = {r.run_id: r for r in status.collect(tmp_path / "s")}
    by_job = {j: rows[rid] for j, rid in runs.items()}
    assert (by_job["13_3"].state, by_job["13_3"].grokked) == ("done", False)
    assert (by_job["12_3"].state, by_job["12_3"].error) == ("running", None)
    assert (by_job["14"].state, by_job["14"].error) == ("failed", "ValueError: p must be prime")
    assert (by_job["13_5"].state, by_job["13_5"].epoch) == ("cancelled", 20)
    assert by_job["12_5"].state == "corrupt" and "progress.json" in by_job["12_5"].error
    # without the scheduler the files speak alone: error.txt fails, progress means running
    rows = {r.run_id: r for r in status.collect(tmp_path / "s", use_scheduler=False)}
    assert [rows[runs[j]].state for j in ("13_3", "12_3", "14", "13_5", "12_5")] == \
        ["done", "failed", "pending", "running", "corrupt"]


def test_launch_leaves_live_jobs_their_runs(tmp_path, write_spec, scheduler_says):
    """Only squeue is asked; runs whose job is queued, running or being requeued are left to
    it, the others (cancelled, completed) are submitted again."""
    asked = scheduler_says("edited")
    spec = write_spec({"base": {"p": 11, "n_epochs": 10}, "grid": {"model_seed": [1, 2, 3, 4]},
                       "out": str(tmp_path / "sweep")})
    sweep = load_sweep(spec)
    manifest = sched.new_manifest(sweep, sweep.launcher, None)
    jobs = ["12_3", "13_5", "13_1", "14"]
    manifest["launches"] = [{"executor": "slurm", "jobs": [
        {"job_id": j, "runs": [r.run_id]} for j, r in zip(jobs, sweep.runs)]}]
    state, action, todo = launch_mod.sort_runs(sweep, manifest)
    ids = [r.run_id for r in sweep.runs]
    assert [state[i] for i in ids] == ["running", "pending", "requeued", "pending"]
    assert [action[i] for i in ids] == ["job 12_3 has it", "submit", "job 13_1 has it", "submit"]
    assert todo == [sweep.runs[1], sweep.runs[3]]
    assert [c[0] for c in asked] == ["squeue"]


def test_no_squeue_answer_leaves_the_files_to_speak():
    """sacct alone saying PENDING/RUNNING (squeue gone quiet) is no proof the job is live."""
    for records in (["PENDING"], ["RUNNING"]):
        info = sched.job_info(None, records)
        assert not info.live and not info.ended
        assert [sched.run_state(f, info) for f in ("pending", "running", "failed")] == \
            ["pending", "running", "failed"]


# ---- a run directory's own state ------------------------------------------------------------
def test_dir_state():
    done = {"epoch": 9, "n_epochs": 9, "done": True}
    part = {"epoch": 3, "n_epochs": 9, "done": False}
    assert sched.dir_state(done, True, None) == "done"
    assert sched.dir_state(done, True, "Traceback") == "done"    # succeeded after a failure
    assert sched.dir_state(done, False, None) == "running"      # trained, summary not yet
    assert sched.dir_state(part, False, "Traceback") == "failed"
    assert sched.dir_state(None, False, "Traceback") == "failed"
    assert sched.dir_state(part, False, None) == "running"
    assert sched.dir_state(None, False, None) == "pending"


def test_read_dir_names_the_unreadable_file(tmp_path):
    run = RunDir(tmp_path / "r")
    run.create({"run_id": "r"})
    assert sched.read_dir(run).state == "pending"
    run.file("summary.json").write_text("[1, 2]")
    run.write_progress({"epoch": 1, "n_epochs": 1, "done": True})
    found = sched.read_dir(run)
    assert found.state == "corrupt" and found.error == "summary.json: expected a JSON object"


# ---- the manifest ---------------------------------------------------------------------------
def test_manifest_reader(tmp_path):
    assert sched.read_manifest(tmp_path) is None
    f = tmp_path / sched.MANIFEST
    for content, needle in ((b"\xff\xfe\x00\x01", "corrupt JSON"),
                            (b'{"runs": ', "corrupt JSON"),
                            (b"[1, 2]", "not a grokhpc manifest")):
        f.write_bytes(content)
        with pytest.raises(RunDirError) as e:
            sched.read_manifest(tmp_path)
        assert str(f) in str(e.value) and needle in str(e.value) and "\n" not in str(e.value)
    sched.write_manifest(tmp_path, {"runs": [], "launches": []})
    assert sched.read_manifest(tmp_path) == {"runs": [], "launches": []}


def test_latest_jobs_take_the_last_launch():
    manifest = {"launches": [
        {"executor": "slurm", "jobs": [{"job_id": "12_0", "runs": ["a", "b"]}]},
        {"executor": "local", "jobs": [{"job_id": 4711, "runs": ["b"]}]}]}
    assert sched.latest_jobs(manifest) == {
        "a": {"job_id": "12_0", "executor": "slurm", "launch": 0},
        "b": {"job_id": "4711", "executor": "local", "launch": 1}}
    assert sched.latest_jobs(None) == {}
