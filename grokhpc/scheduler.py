"""A sweep's scheduler side: the manifest, SLURM's job states, and the run states grokhpc shows.

Run states -- one vocabulary for ``grokhpc.status``, ``grokhpc.launch`` and the ``state`` column
of ``runs.parquet`` (``grokhpc.aggregate``). Whether a finished run grokked is a separate boolean
(``grokked``); a run that finished without grokking ("censored") is ``done`` with
``grokked`` false.

=============  ==========================================================================
``done``       trained, measured and summarised (progress.json done, summary.json present).
``running``    its job runs it now. Without the scheduler's word (``aggregate``,
               ``status --no-scheduler``): training has started and not finished.
``requeued``   its job was stopped and put back in the queue (preemption, ``scontrol
               requeue``, a time limit reached under submitit, a node failure); it resumes
               from its last checkpoint when the job runs again.
``pending``    not finished, and nothing runs it now: queued and never started, never
               launched, or its job ended without finishing or failing it (a killed local
               job). Launching the sweep starts or resumes it.
``cancelled``  its job was cancelled (``scancel``) or preempted without requeue before the
               run finished. Launching the sweep resumes it.
``failed``     ``error.txt`` holds its traceback, or its job ended FAILED, TIMEOUT,
               OUT_OF_MEMORY, NODE_FAIL, BOOT_FAIL or DEADLINE.
``corrupt``    one of its files cannot be read, its files name different runs, or (done) its
               last checkpoint row -- every row with ``status --verify`` -- differs from its
               checksum (whatever its job does): it needs a look.
=============  ==========================================================================

A run directory alone gives one of pending / running / failed / corrupt / done
(:func:`dir_state`); what the scheduler says of the run's latest job refines it
(:func:`run_state`). Job states are SLURM's, as ``squeue -o %T`` and ``sacct -o State`` print
them; array tasks are ``JOB_TASK`` (``12_3``), and sacct prints a pending array's tasks as one
range (``12_[3-7%2]``).

Imports neither torch nor submitit at module level: status answers in a blink.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from .config import to_dict
from .store import (PROGRESS, SUMMARY, RunDir, RunDirError, atomic_write_json, check_identity,
                    read_json)

# ---- run states -------------------------------------------------------------------------------
PENDING, RUNNING, REQUEUED, CANCELLED = "pending", "running", "requeued", "cancelled"
FAILED, CORRUPT, DONE = "failed", "corrupt", "done"
RUN_STATES = (DONE, RUNNING, REQUEUED, PENDING, CANCELLED, FAILED, CORRUPT)

# ---- SLURM job states -------------------------------------------------------------------------
ACTIVE_JOB_STATES = frozenset({"RUNNING", "COMPLETING", "SIGNALING", "STAGE_OUT", "RESIZING"})
WAITING_JOB_STATES = frozenset({"PENDING", "CONFIGURING", "SUSPENDED", "STOPPED",
                                "RESV_DEL_HOLD"})
REQUEUE_JOB_STATES = frozenset({"REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "PREEMPTED",
                                "SPECIAL_EXIT"})
INTERRUPTED_JOB_STATES = frozenset({"REQUEUED", "PREEMPTED", "NODE_FAIL"})  # a start cut short
LIVE_JOB_STATES = ACTIVE_JOB_STATES | WAITING_JOB_STATES | REQUEUE_JOB_STATES
FAILED_JOB_STATES = {"FAILED": "job failed", "TIMEOUT": "job reached its time limit",
                     "OUT_OF_MEMORY": "job ran out of memory",
                     "NODE_FAIL": "job's node failed", "BOOT_FAIL": "job's node failed to boot",
                     "DEADLINE": "job passed its deadline"}
CANCELLED_JOB_STATES = frozenset({"CANCELLED", "PREEMPTED"})   # PREEMPTED once it has ended
ENDED_JOB_STATES = frozenset(FAILED_JOB_STATES) | CANCELLED_JOB_STATES | {"COMPLETED"}

MANIFEST = "manifest.json"
JOBS_DIR = "jobs"
DEFAULT_MAX_ARRAY = 1000            # array tasks per submission when the cluster does not say
QUERY_TIMEOUT_S = 30


# ---- a run directory's own state --------------------------------------------------------------
def dir_state(progress: Mapping[str, Any] | None, has_summary: bool,
              error_text: str | None) -> str:
    """The run state a run directory's files give on their own (its job aside)."""
    if progress and progress.get("done") and has_summary:
        return DONE
    if error_text is not None:
        return FAILED
    if progress is None:
        return PENDING
    return RUNNING


@dataclass(frozen=True)
class DirRead:
    """What :func:`read_dir` found: the state and the files it was decided from."""

    state: str
    progress: dict | None = None
    summary: dict | None = None
    error: str | None = None      # error.txt (failed), or what could not be read (corrupt)


def _read_json_named(f: Path, what: str) -> Any:
    """store.read_json (whose RunDirError already names the file and says corrupt JSON or not
    UTF-8); a file that cannot be read at all is a RunDirError starting with ``what``."""
    try:
        return read_json(f)
    except OSError as e:
        raise RunDirError(f"{what} ({type(e).__name__}: {e})") from None


def _read_json_file(run: RunDir, name: str) -> dict | None:
    """A run's JSON file as a dict (None when absent); RunDirError naming it otherwise."""
    f = run.file(name)
    if not f.exists():
        return None
    obj = _read_json_named(f, f"{name}: unreadable")
    if not isinstance(obj, dict):
        raise RunDirError(f"{name}: expected a JSON object")
    return obj


def read_dir(run: RunDir, verify_all: bool = False) -> DirRead:
    """Read a run directory's progress, summary and error. It is ``corrupt`` when one cannot be
    read, when its files name different runs (``store.check_identity``), or when it is done
    and its last checkpoint row (``verify_all``: any row) differs from its checksum."""
    try:
        progress = _read_json_file(run, PROGRESS)
        summary = _read_json_file(run, SUMMARY)
        error = run.read_error()
        if run.exists():
            check_identity(run, progress=progress or {}, summary=summary or {})
        state = dir_state(progress, summary is not None, error)
        if state == DONE:   # no longer written: its rows can be read without a race
            run.verify_checkpoints(progress, last_only=not verify_all)
    except (RunDirError, OSError) as e:   # its row names the run: the file names suffice
        msg = str(e).replace(f"{run.path}{os.sep}", "")
        return DirRead(CORRUPT, error=msg.removeprefix(f"{run.path}: "))
    return DirRead(state, progress, summary, error if state == FAILED else None)


# ---- what the scheduler says of a job ---------------------------------------------------------
@dataclass(frozen=True)
class JobInfo:
    """The scheduler's word on one job (array task).

    ``live``: queued or running now. ``ended``: known to be over (``state`` then says how, or
    is None when there is no job or its outcome is unknown, as for a local job whose process is
    gone). Neither: the scheduler was not asked or has forgotten the job. ``requeues``: the
    times it was stopped and queued again. ``requeuing``: it is being requeued now."""

    state: str | None = None
    live: bool = False
    ended: bool = False
    requeues: int = 0
    requeuing: bool = False


UNKNOWN_JOB = JobInfo()
NO_JOB = JobInfo(ended=True)        # no job recorded for the run, or a local job that is gone


def job_info(queue_state: str | None, records: Sequence[str] = ()) -> JobInfo:
    """Combine squeue's state of a job (None if it does not list it) with sacct's records of
    it, oldest first (``--duplicates``: one record per start; a requeued job has several)."""
    current = records[-1] if records else None
    live = queue_state in LIVE_JOB_STATES
    state = queue_state or current
    # each record before the current one is a start that was cut short and queued again; a
    # live job whose current record is itself cut short is on its way back to the queue
    requeuing = live and (queue_state in REQUEUE_JOB_STATES or current in INTERRUPTED_JOB_STATES)
    requeues = max(0, len(records) - 1) + int(live and current in INTERRUPTED_JOB_STATES)
    return JobInfo(state=state, live=live, ended=not live and state in ENDED_JOB_STATES,
                   requeues=requeues, requeuing=requeuing)


def run_state(files: str, job: JobInfo = UNKNOWN_JOB, job_log_error: str | None = None) -> str:
    """A run's state from its directory's state (:func:`dir_state`) and its latest job.

    done and corrupt stand whatever the job does; a live job comes before error.txt (a job
    that runs again clears it when the run succeeds); an ended job decides an unfinished run
    (``job_log_error``: a traceback in the job's log turns an ended job into a failure)."""
    if files in (DONE, CORRUPT):
        return files
    if job.live:
        if job.requeuing:
            return REQUEUED
        if job.state in ACTIVE_JOB_STATES:
            return RUNNING
        return REQUEUED if job.requeues else PENDING
    if files == FAILED:
        return FAILED
    if not job.ended:
        return files          # no word from the scheduler: the files say what they can
    if job.state in FAILED_JOB_STATES:
        return FAILED
    if job.state in CANCELLED_JOB_STATES:
        return CANCELLED
    return FAILED if job_log_error else PENDING


def job_failure(job: JobInfo) -> str | None:
    """One line for a job that ended in a failure state, e.g. "job ran out of memory"."""
    return FAILED_JOB_STATES.get(job.state or "")


# ---- array ids --------------------------------------------------------------------------------
_ARRAY_RANGE = re.compile(r"(\d+)_\[([^\]]+)\]")
_RANGE_PART = re.compile(r"(\d+)(?:-(\d+)(?::(\d+))?)?")


def base_job_id(job_id: str) -> str:
    """``12_3`` -> ``12``; ``12`` -> ``12``."""
    return str(job_id).split("_")[0]


def expand_job_id(job_id: str) -> list[str]:
    """The array tasks an id names: ``12_[3-7%2]`` -> 12_3 .. 12_7 (``%2``, the throttle, is
    dropped); ``12_[1,3,5-6]`` -> 12_1, 12_3, 12_5, 12_6; ``12_[0-6:3]`` -> 12_0, 12_3, 12_6.
    Any other id (``12_4``, ``12``) names itself."""
    m = _ARRAY_RANGE.fullmatch(job_id.strip())
    if not m:
        return [job_id.strip()]
    base, spec = m.group(1), m.group(2).split("%")[0]
    out: list[str] = []
    for part in spec.split(","):
        r = _RANGE_PART.fullmatch(part.strip())
        if r is None:
            return [job_id.strip()]       # not an array range SLURM prints: leave it whole
        first = int(r.group(1))
        last = int(r.group(2)) if r.group(2) else first
        out += [f"{base}_{i}" for i in range(first, last + 1, int(r.group(3) or 1))]
    return out


# ---- squeue and sacct -------------------------------------------------------------------------
def squeue_command(job_ids: Iterable[str]) -> list[str]:
    bases = ",".join(sorted({base_job_id(j) for j in job_ids}))
    return ["squeue", "-h", "-r", "-o", "%i %T", "-j", bases]


def sacct_command(job_ids: Iterable[str]) -> list[str]:
    bases = ",".join(sorted({base_job_id(j) for j in job_ids}))
    return ["sacct", "-n", "-P", "-X", "--duplicates", "-o", "JobID,State", "-j", bases]


def parse_squeue(text: str) -> dict[str, str]:
    """``squeue -h -r -o "%i %T"`` output -> {task id: state}."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2:
            for jid in expand_job_id(parts[0]):
                out[jid] = parts[1]
    return out


def parse_sacct(text: str) -> dict[str, list[str]]:
    """``sacct -n -P -X --duplicates -o JobID,State`` output -> {task id: states, oldest
    first}. "CANCELLED by 1000" is CANCELLED; a pending array's range line is each task's."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) < 2 or not parts[0] or not parts[1].strip():
            continue
        state = parts[1].split()[0]
        for jid in expand_job_id(parts[0]):
            out.setdefault(jid, []).append(state)
    return out


def job_infos(queue: Mapping[str, str], history: Mapping[str, Sequence[str]]) -> dict[str, JobInfo]:
    """{task id: JobInfo} from parsed squeue and sacct output."""
    return {jid: job_info(queue.get(jid), history.get(jid, ()))
            for jid in sorted(set(queue) | set(history))}


def _ask(cmd: list[str]) -> str:
    """stdout of a SLURM command; empty when it is missing, fails or hangs."""
    if not shutil.which(cmd[0]):
        return ""
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=QUERY_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError):
        return ""
    return r.stdout if r.returncode == 0 else ""


def query_jobs(job_ids: Sequence[str], history: bool = True) -> dict[str, JobInfo]:
    """{task id: JobInfo} of the given jobs from squeue and (``history``) sacct. Jobs neither
    knows are left out (their state is unknown, not ended)."""
    if not job_ids:
        return {}
    queue = parse_squeue(_ask(squeue_command(job_ids)))
    past = parse_sacct(_ask(sacct_command(job_ids))) if history else {}
    return job_infos(queue, past)


def pid_alive(job_id: str) -> bool:
    """Whether a local job's process (submitit's local job id is its pid) is alive."""
    try:
        pid = int(job_id)
        os.kill(pid, 0)
    except (ValueError, ProcessLookupError, PermissionError, OverflowError):
        return False
    return Path(f"/proc/{pid}").exists()


def chunks(items: list, size: int) -> list[list]:
    """``items`` cut into submissions of at most ``size`` (an array's task limit)."""
    return [items[i:i + size] for i in range(0, len(items), size)]


def controller_answers() -> bool:
    """Whether a SLURM controller answers here (``scontrol ping`` says UP). sbatch on PATH alone
    is not enough: a machine may carry SLURM's commands with no controller behind them."""
    return bool(shutil.which("sbatch")) and " is UP" in _ask(["scontrol", "ping"])


def max_array_size() -> int:
    """Array tasks per submission: below ``MaxArraySize`` from ``scontrol show config``; the
    default where no controller answers (asking one that is down takes seconds a call)."""
    if not controller_answers():
        return DEFAULT_MAX_ARRAY
    for line in _ask(["scontrol", "show", "config"]).splitlines():
        k, _, v = line.partition("=")
        if k.strip() == "MaxArraySize" and v.strip().isdigit():
            return max(1, int(v.strip()) - 1)
    return DEFAULT_MAX_ARRAY


# ---- the manifest -----------------------------------------------------------------------------
def read_manifest(sweep_dir: str | os.PathLike) -> dict | None:
    """``SWEEP_DIR/manifest.json``, or None when there is none. An unreadable manifest raises
    RunDirError naming it."""
    f = Path(sweep_dir) / MANIFEST
    if not f.exists():
        return None
    manifest = _read_json_named(f, f"{f}: unreadable manifest")
    if not isinstance(manifest, dict) or not isinstance(manifest.get("runs", []), list):
        raise RunDirError(f"{f}: not a grokhpc manifest (expected an object with a runs list)")
    return manifest


def find_sweeps(root: str | os.PathLike) -> list[Path]:
    """The sweep directories (holding manifest.json) at or below ``root``, sorted; a sweep's
    own subdirectories (its run directories) are not searched."""
    found: list[Path] = []
    for here, dirs, files in os.walk(root):
        if MANIFEST in files:
            found.append(Path(here))
            dirs.clear()
        else:
            dirs.sort()
    return sorted(found)


def write_manifest(sweep_dir: str | os.PathLike, manifest: dict) -> None:
    atomic_write_json(Path(sweep_dir) / MANIFEST, manifest)


def new_manifest(sweep, launcher, old: dict | None) -> dict:
    """The manifest of ``sweep`` (a grokhpc.sweep.Sweep), keeping ``old``'s launches."""
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return {
        "spec": str(sweep.spec),
        "spec_hash": sweep.spec_hash,
        "description": sweep.description,
        "out": str(sweep.out),
        "created": (old or {}).get("created", now),
        "updated": now,
        "axes": list(sweep.axes),
        "zip_groups": [list(g) for g in sweep.zip_groups],
        "figures": {"phase": [list(pair) for pair in sweep.phase_pairs]},
        "published": [entry.to_dict() for entry in sweep.published],   # grokhpc.reference
        "base": to_dict(sweep.base),
        "launcher": launcher.to_dict(),
        # run directories relative to the sweep directory, so a copied sweep still reads
        "runs": [{"run_id": r.run_id, "dir": os.path.relpath(r.dir, sweep.out), "swept": r.swept}
                 for r in sweep.runs],
        "launches": list((old or {}).get("launches", [])),
    }


def latest_jobs(manifest: dict | None) -> dict[str, dict]:
    """{run_id: {job_id, executor, launch}} from the latest launch that included each run."""
    latest: dict[str, dict] = {}
    for i, launch in enumerate((manifest or {}).get("launches", [])):
        for job in launch.get("jobs", []):
            for rid in job.get("runs", []):
                latest[rid] = {"job_id": str(job["job_id"]), "executor": launch.get("executor"),
                               "launch": i}
    return latest


def in_flight(manifest: dict | None) -> dict[str, JobInfo]:
    """{run_id: JobInfo} for runs whose latest SLURM job is queued or running now (squeue)."""
    latest = {rid: j for rid, j in latest_jobs(manifest).items() if j["executor"] == "slurm"}
    live = query_jobs([j["job_id"] for j in latest.values()], history=False)
    return {rid: live[j["job_id"]] for rid, j in latest.items()
            if j["job_id"] in live and live[j["job_id"]].live}


# ---- the aggregation job ----------------------------------------------------------------------
def latest_aggregation(manifest: dict | None) -> dict | None:
    """The manifest entry of the sweep's aggregation job (``{job_id, after, ...}``), the one the
    latest launch that submitted one recorded; None when there is none."""
    for launch in reversed((manifest or {}).get("launches", [])):
        if launch.get("aggregation"):
            return launch["aggregation"]
    return None


def live_arrays(manifest: dict | None) -> list[str]:
    """The ids of the sweep's SLURM arrays (and single jobs) that squeue lists as queued or
    running, in submission order."""
    ids = [str(j["job_id"]) for launch in (manifest or {}).get("launches", [])
           if launch.get("executor") == "slurm" for j in launch.get("jobs", [])]
    live = {base_job_id(jid) for jid, info in query_jobs(ids, history=False).items()
            if info.live}
    return sorted(live, key=lambda b: (len(b), b))


def job_outcome(job: JobInfo) -> str:
    """A job of its own (the aggregation job) in the run states' words: pending, running,
    requeued, done, failed or cancelled; ``unknown`` when the scheduler has no word of it."""
    if job.ended and job.state == "COMPLETED":
        return DONE
    if not job.live and not job.ended:
        return "unknown"
    return run_state(PENDING, job)


# ---- the sbatch preview -----------------------------------------------------------------------
def sbatch_preview(params: dict[str, Any], folder: Path, n_tasks: int) -> str:
    """The #SBATCH lines submitit would write for one array of ``n_tasks`` jobs."""
    from submitit.slurm import slurm as sl

    kw: dict[str, Any] = {}
    for k, v in params.items():
        if k == "timeout_min":
            kw["time"] = v
        elif k == "mem_gb":
            kw["mem"] = sl._convert_mem(v)
        elif k.startswith("slurm_"):
            name = k[len("slurm_"):]
            kw["additional_parameters" if name == "additional_parameters" else name] = v
        else:
            kw[k] = v
    # submitit sends a single job as a plain job, more as an array
    text = sl._make_sbatch_string(command="python -u -m submitit.core._submit ...",
                                  folder=str(folder / "%j"),
                                  map_count=n_tasks if n_tasks > 1 else None, **kw)
    return "\n".join(ln for ln in text.splitlines() if ln.startswith("#SBATCH"))
