"""Submitting a launch's jobs (jobs stage): submitit executors, SLURM arrays, the aggregation
job, and local runs.

* ``submit`` writes the manifest (a ``LaunchRecord``: each submission adds its jobs at once, so
  a launch cut short still lists every job it submitted) and the run directories' config.json,
  then hands one ``grokhpc.job.SweepJob`` per job to submitit.
* SLURM: the jobs go out as arrays cut below the cluster's MaxArraySize, then one small CPU job
  that aggregates the sweep once every live array of it has ended (``--dependency=afterany``);
  it replaces the previous aggregation job while that one is still queued.
* Locally: the jobs run here, ``local_parallelism`` at a time, with a progress bar over runs;
  they end with the launch (grokhpc.lifeline), and the sweep is aggregated here afterwards.
"""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Any, Sequence

import submitit
from tqdm.auto import tqdm

from . import lifeline as lifelines
from . import scheduler as sched
from . import tracking
from .aggregate import aggregate, stale_tables
from .clusters import DEFAULT_ARRAY_PARALLELISM, ClusterProfile
from .config import to_dict
from .job import AggregateJob, SweepJob, last_line
from .plan import local_parallelism
from .scheduler import JOBS_DIR, chunks, max_array_size, sbatch_preview
from .store import RunDir
from .sweep import LauncherSettings, Sweep, SweepRun

DEFAULT_TIME_MIN = 60
AGGREGATE_TIME_MIN = 60
AGGREGATE_MEM_GB = 4


def executor_parameters(kind: str, sweep: Sweep, launcher: LauncherSettings,
                        profile: ClusterProfile | None) -> dict[str, Any]:
    """The submitit (AutoExecutor) parameters for this launch."""
    time_min = launcher.time or DEFAULT_TIME_MIN
    if kind != "slurm":
        return {"timeout_min": time_min}
    p: dict[str, Any] = {"timeout_min": time_min, "slurm_job_name": f"grokhpc-{sweep.name}"}
    if launcher.partition:
        p["slurm_partition"] = launcher.partition
    if launcher.cpus_per_task:
        p["cpus_per_task"] = launcher.cpus_per_task
    if launcher.mem_gb:
        p["mem_gb"] = launcher.mem_gb
    p["slurm_array_parallelism"] = launcher.array_parallelism or DEFAULT_ARRAY_PARALLELISM
    extra: dict[str, Any] = {}
    gpus = launcher.gpus or 0
    if gpus:
        what = f"{launcher.gpu_type}:{gpus}" if launcher.gpu_type else str(gpus)
        if profile is not None and profile.gpu_request == "gres":
            extra["gres"] = f"gpu:{what}"
        else:
            extra["gpus"] = what
    extra["requeue"] = True   # preempted without notice (scavenge): SLURM requeues the job
    extra.update(dict(launcher.extra))
    p["slurm_additional_parameters"] = extra
    return p


def wandb_settings(plan: dict):
    """The sweep's W&B settings (its runs grouped under the sweep's name), or None."""
    wandb = plan["launcher"].wandb
    return wandb and wandb.with_group(plan["sweep"].name)


class LaunchRecord:
    """This launch in the manifest: each submission adds its jobs and rewrites the manifest
    atomically, so a launch cut short still lists every job it submitted."""

    def __init__(self, plan: dict):
        sweep, profile = plan["sweep"], plan["profile"]
        self.out = sweep.out
        self.manifest = sched.new_manifest(sweep, plan["launcher"], plan["old_manifest"])
        self.record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                       "executor": plan["executor"],
                       "cluster": profile.name if profile else None,
                       "parameters": _jsonable(plan["parameters"]), "jobs": []}

    def write(self) -> None:
        sched.write_manifest(self.out, self.manifest)

    def open(self) -> None:
        self.manifest["launches"].append(self.record)

    def add(self, jobs, groups) -> None:
        for job, g in zip(jobs, groups):
            self.record["jobs"].append({"job_id": str(job.job_id),
                                        "runs": [r.run_id for r in g]})
        self.write()


def _jsonable(d: dict) -> dict:
    return {k: (_jsonable(v) if isinstance(v, dict) else v) for k, v in d.items()}



# ---- submitting ------------------------------------------------------------------------------
def submit(plan: dict, out) -> list[str] | None:
    """Write the manifest and the run directories' config.json, then submit the jobs (SLURM:
    arrays below MaxArraySize, returning at once; locally: run them here). Returns the failed
    jobs' last lines of a local launch that ran jobs, else None."""
    sweep, launcher, kind, groups = (plan["sweep"], plan["launcher"], plan["executor"],
                                     plan["groups"])
    sweep.out.mkdir(parents=True, exist_ok=True)
    record = LaunchRecord(plan)
    record.write()
    if not groups:
        print("nothing to submit", file=out)
        aggregate_if_stale(plan, record, out)
        return None
    for r in plan["todo"]:   # config.json up front: status can name every run from its directory
        RunDir(r.dir).create({**to_dict(r.config), "run_id": r.run_id})
    kwargs = {"slurm_max_num_timeout": launcher.max_timeouts} if kind == "slurm" else {}
    ex = submitit.AutoExecutor(folder=sweep.out / JOBS_DIR / "%j", cluster=kind, **kwargs)
    ex.update_parameters(**plan["parameters"])
    settings = launcher.job_settings(kind, sweep.name)
    wandb = wandb_settings(plan)
    line = plan["lifeline"] = lifelines.hold(sweep.out / JOBS_DIR) if kind == "local" else None
    fns = [SweepJob([(to_dict(r.config), str(r.dir)) for r in g], settings, launcher.gpus or 0,
                    str(line.path) if line else None) for g in groups]
    if wandb and wandb.mode == "offline":
        tracking.announce("W&B runs are written offline; after the jobs, upload them with: "
                          + tracking.sync_command(sweep.out / "runs" / "*" / "wandb" /
                                                  "offline-run-*"), file=out, always=True)
    record.open()
    if kind == "slurm":
        submit_arrays(ex, fns, plan, record, out)
        return None
    try:
        return run_locally(ex, fns, groups, plan, record.add, launcher)
    finally:
        if line is not None:
            line.release()


def submit_arrays(ex, fns: list, plan: dict, record: LaunchRecord, out) -> None:
    sweep, groups = plan["sweep"], plan["groups"]
    for idx in chunks(list(range(len(fns))), max_array_size()):
        jobs = ex.submit_array([fns[i] for i in idx])
        record.add(jobs, [groups[i] for i in idx])
        plan["jobs"] += jobs
    ids = sorted({sched.base_job_id(j.job_id) for j in plan["jobs"]})
    print(f"submitted {len(plan['jobs'])} job(s) as SLURM array(s) {', '.join(ids)} "
          f"(logs in {sweep.out / JOBS_DIR})", file=out)
    submit_aggregation(plan, record, out)
    print(f"follow with: python -m grokhpc.status {sweep.out}", file=out)



# ---- the aggregation job ---------------------------------------------------------------------
def aggregation_partition(launcher: LauncherSettings, profile: ClusterProfile | None,
                          n_jobs: int) -> str | None:
    """Where the aggregation job runs: the launch's partition when it is a CPU partition with
    room for one more job, else the profile's CPU partition; without a profile, the launch's
    partition for a CPU launch, else the cluster's default (None)."""
    if profile is None:
        return None if (launcher.gpus or 0) > 0 else launcher.partition
    part = profile.partition(launcher.partition) if launcher.partition else None
    if part is not None and not part.gpus and (part.max_submitted is None
                                               or n_jobs < part.max_submitted):
        return part.name
    return profile.cpu_partition


def aggregation_parameters(plan: dict, after: Sequence[str]) -> dict[str, Any]:
    """submitit parameters of the aggregation job: one CPU, a little memory and time, started
    once every job in ``after`` has ended, whatever its outcome (``afterany``)."""
    sweep, launcher, profile = plan["sweep"], plan["launcher"], plan["profile"]
    partition = aggregation_partition(launcher, profile, len(plan["groups"]))
    part = profile.partition(partition) if profile and partition else None
    p: dict[str, Any] = {"timeout_min": min(AGGREGATE_TIME_MIN, (part and part.max_time)
                                            or AGGREGATE_TIME_MIN),
                         "slurm_job_name": f"grokhpc-{sweep.name}-aggregate",
                         "cpus_per_task": 1, "mem_gb": AGGREGATE_MEM_GB}
    if after:
        p["slurm_dependency"] = "afterany:" + ":".join(after)
    if partition:
        p["slurm_partition"] = partition
    account = dict(launcher.extra).get("account")
    if account:
        p["slurm_additional_parameters"] = {"account": account}
    return p


def cancel_pending(job: dict | None) -> str | None:
    """scancel the recorded aggregation job if it is still queued; its id if it was."""
    if not job:
        return None
    info = sched.query_jobs([job["job_id"]], history=False).get(job["job_id"])
    if info is None or not info.live or info.state not in sched.WAITING_JOB_STATES:
        return None
    subprocess.run(["scancel", job["job_id"]], capture_output=True,
                   timeout=sched.QUERY_TIMEOUT_S)
    return job["job_id"]


def submit_aggregation(plan: dict, record: "LaunchRecord", out) -> None:
    """Submit the job that aggregates the sweep after all its live arrays (this launch's and
    earlier ones') end; it replaces the previous aggregation job if that one is still queued.
    A refused submission is a warning: the arrays are in and aggregation can be run by hand."""
    sweep = plan["sweep"]
    ours = [sched.base_job_id(j.job_id) for j in plan["jobs"]]
    after = list(dict.fromkeys(sched.live_arrays(plan["old_manifest"]) + ours))
    params = aggregation_parameters(plan, after)
    ex = submitit.AutoExecutor(folder=sweep.out / JOBS_DIR / "%j", cluster="slurm")
    ex.update_parameters(**params)
    try:
        job = ex.submit(AggregateJob(sweep.out))
    except (submitit.core.utils.FailedJobError, submitit.core.utils.FailedSubmissionError) as e:
        print(f"warning: aggregation job not submitted ({last_line(str(e))}); aggregate by "
              f"hand once the jobs end: python -m grokhpc.aggregate {sweep.out}", file=out)
        return
    replaced = cancel_pending(sched.latest_aggregation(plan["old_manifest"]))
    record.record["aggregation"] = {"job_id": str(job.job_id), "after": after,
                                    "partition": params.get("slurm_partition"),
                                    "replaces": replaced}
    record.write()
    plan["aggregation"] = record.record["aggregation"]
    print(f"aggregation job {job.job_id} ({params.get('slurm_partition', 'default partition')})"
          f" aggregates the sweep and draws its figures "
          + (f"once job(s) {', '.join(after)} end" if after else "as soon as it starts")
          + (f"; it replaces queued aggregation job {replaced}, cancelled" if replaced else ""),
          file=out)


def print_aggregation_preview(plan: dict, out) -> None:
    """Dry run: the aggregation job a launch would submit, and the one it would replace."""
    sweep, old = plan["sweep"], plan["old_manifest"]
    after = sched.live_arrays(old) + ["ARRAY_IDS"]
    params = aggregation_parameters(plan, after)
    print(f"aggregation job, once job(s) {', '.join(after)} end (ARRAY_IDS: this launch's): "
          f"python -m grokhpc.aggregate {sweep.out}", file=out)
    previous = sched.latest_aggregation(old)
    if previous:
        print(f"  it replaces aggregation job {previous['job_id']} if that one is still queued",
              file=out)
    try:
        print(sbatch_preview(params, sweep.out / JOBS_DIR, 1), file=out)
    except Exception as e:  # the preview uses submitit internals
        print(f"  (preview unavailable: {type(e).__name__}: {e})", file=out)


def aggregate_if_stale(plan: dict, record: "LaunchRecord", out) -> None:
    """Nothing to train: aggregate a sweep whose tables are missing or out of date (it ended
    without its aggregation) as a launch does: here locally; on SLURM with the aggregation
    job, unless one is queued or running."""
    sweep, job = plan["sweep"], sched.latest_aggregation(plan["old_manifest"])
    why = stale_tables(sweep.out)
    if why is None:
        return
    if plan["executor"] != "slurm":
        print(f"the sweep's tables are {why}: aggregating", file=out)
        aggregate_here(sweep, out)
        return
    info = sched.query_jobs([job["job_id"]], history=False).get(job["job_id"]) if job else None
    if info is not None and info.live:
        print(f"the sweep's tables are {why}; aggregation job {job['job_id']} ({info.state}) "
              "aggregates it", file=out)
        return
    print(f"the sweep's tables are {why}: submitting its aggregation job", file=out)
    record.open()
    submit_aggregation(plan, record, out)


def aggregate_here(sweep: Sweep, out) -> None:
    """After a local launch: aggregate the sweep here (tables and figures), one line saying
    where; a failure says how to rerun it and leaves the runs as they are."""
    try:
        res = aggregate([sweep.out], log=lambda m: print(m, file=out))
    except Exception as e:
        print(f"aggregation failed ({type(e).__name__}: {last_line(str(e))}); rerun: "
              f"python -m grokhpc.aggregate {sweep.out}", file=out)
        return
    figures = sorted({p.parent for ps in res.figures.values() for p in ps})
    print(f"aggregated {res.n_runs} runs: tables in {res.out_dir}"
          + (f", figures in {', '.join(map(str, figures))}" if figures else ""), file=out)
    for line in res.reference:   # the measured-vs-published table (grokhpc.reference)
        print(line, file=out)



# ---- local runs ------------------------------------------------------------------------------
def run_locally(ex, fns, groups, plan, save_jobs, launcher) -> list[str]:
    """Run the jobs here, ``local_parallelism`` at a time, with a progress bar over runs; the
    failed jobs' last lines."""
    width = local_parallelism(launcher) if plan["executor"] == "local" else 1
    queue = list(zip(fns, groups))
    running: list[tuple[Any, list[SweepRun]]] = []
    failures: list[str] = []
    all_runs = [r for g in groups for r in g]
    bar = tqdm(total=len(all_runs), unit="run", desc="runs", dynamic_ncols=True, file=sys.stderr)
    counted: set[str] = set()

    def tick():
        for r in all_runs:
            if r.run_id not in counted and RunDir(r.dir).is_complete():
                counted.add(r.run_id)
                bar.update(1)

    try:
        while queue or running:
            while queue and len(running) < width:
                fn, g = queue.pop(0)
                job = ex.submit(fn)
                save_jobs([job], [g])
                plan["jobs"].append(job)
                running.append((job, g))
                if plan["executor"] == "debug":
                    break
            still = []
            for job, g in running:
                if plan["executor"] == "debug" or job.done():
                    try:
                        job.result()
                    except Exception as e:
                        failures.append(last_line(str(e)) or type(e).__name__)
                else:
                    still.append((job, g))
            running = still
            tick()
            if running:
                time.sleep(1.0)
    except KeyboardInterrupt:
        bar.close()
        stop_local_jobs([job for job, _ in running], plan.get("lifeline"))
        raise
    finally:
        bar.close()
    return failures


def stop_local_jobs(jobs: list, line: "lifelines.Lifeline | None") -> None:
    """Ctrl-C: let the running jobs go (each writes its runs' state and ends, see
    grokhpc.lifeline) and wait for them; Ctrl-C again, or no lifeline, stops them at once."""
    if line is not None:
        line.release()
        print(f"interrupted: {len(jobs)} running job(s) write their runs' state and stop "
              "(Ctrl-C again: at once)", file=sys.stderr, flush=True)
        try:
            while any(not job.done() for job in jobs):
                time.sleep(0.2)
            return
        except KeyboardInterrupt:
            pass
    for job in jobs:
        job.cancel()


__all__ = ["submit", "executor_parameters", "wandb_settings", "LaunchRecord",
           "aggregation_partition", "aggregation_parameters", "submit_aggregation",
           "print_aggregation_preview", "aggregate_if_stale", "aggregate_here", "run_locally",
           "stop_local_jobs", "DEFAULT_TIME_MIN"]
