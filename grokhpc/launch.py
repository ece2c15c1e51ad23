"""Launch a sweep: expand the spec, write the manifest, submit what is left with submitit.

``python -m grokhpc.launch SPEC [--dry-run] [--executor auto|slurm|local|debug]
[--cluster NAME] [--set key=value ...]``

* The spec is expanded into runs (grokhpc.sweep); each run lives in ``OUT/runs/<run_id>``.
* ``OUT/manifest.json`` records the spec, its runs and axes, the launcher settings and, per
  launch, the submitted job ids and the runs each job trains. It is rewritten atomically.
* Runs already complete are skipped, and so are runs whose job from an earlier launch is still
  queued or running, so launching twice never trains a run twice.
* Runs are packed into jobs by shape (``runs_per_job``); a job trains its runs with
  ``grokhpc.train_batched.train_group`` when it has more than one, else ``run_training``.
* ``auto`` executor: SLURM when ``sbatch`` is on PATH, else local. On SLURM the jobs form one
  array per launch (cut below the cluster's MaxArraySize), logs go to ``OUT/jobs/``, and a job
  that is preempted or times out is requeued and resumes from its last checkpoint (submitit's
  checkpointing; ``scontrol requeue`` works the same way). The command prints the job ids and
  returns. Locally it waits, with a progress bar over runs, and reports the runs that grokked.
* ``launcher.wandb``: each job trains its runs with W&B tracking on (grokhpc.tracking), grouped
  under the sweep's name; offline, the launch prints the ``wandb sync`` command for them.

torch is imported only inside jobs (and for ``runs_per_job: auto``).
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

import submitit

from . import tracking
from .config import ConfigError, from_dict, to_dict
from .store import RunDir, RunDirError, atomic_write_json, read_json
from .sweep import (ClusterProfile, LauncherSettings, Sweep, SweepRun, load_profile, load_sweep,
                    pack, resolve_launcher, shape_key)

MANIFEST = "manifest.json"
JOBS_DIR = "jobs"
DEFAULT_MAX_ARRAY = 1000           # array tasks per submission when the cluster does not say
DEFAULT_ARRAY_PARALLELISM = 64
DEFAULT_TIME_MIN = 60
LIVE_STATES = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD",
               "REQUEUE_FED", "RESIZING", "SUSPENDED", "SIGNALING", "STAGE_OUT", "PREEMPTED"}


# ---- inside a job ---------------------------------------------------------------------------
def _train_batched():
    """grokhpc.train_batched if it exists, else None."""
    try:
        return importlib.import_module("grokhpc.train_batched")
    except ModuleNotFoundError as e:
        if e.name in ("grokhpc.train_batched", "grokhpc"):
            return None
        raise


def _record_error(out_dir: str, text: str) -> None:
    """Write error.txt if the run directory can take it (it may be the thing that failed)."""
    run = RunDir(out_dir)
    try:
        if run.path.is_dir() and not run.read_error():
            run.write_error(text)
    except (OSError, RunDirError):
        pass


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def _set_threads(threads: int | None = None) -> None:
    """Use the CPUs the job was given (``threads``, else SLURM's cpus-per-task), not every core
    of the node: on a busy node, torch threads beyond the job's cores spin and crawl."""
    n = threads
    env = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if n is None and env.isdigit():
        n = int(env)
    if n:
        import torch

        torch.set_num_threads(int(n))


def train_runs(runs: Sequence[tuple[dict, str]], log: Callable[[str], Any] = print,
               threads: int | None = None) -> list[dict]:
    """Train a job's runs: [(RunConfig dict, run directory), ...]. One run failing does not stop
    the others; afterwards the job raises if any run failed (so the scheduler marks it failed)."""
    from .train import run_training

    _set_threads(threads)
    cfgs = [from_dict(c, source=f"{d}: config") for c, d in runs]
    dirs = [str(d) for _, d in runs]
    todo = [(c, d) for c, d in zip(cfgs, dirs) if not RunDir(d).is_complete()]
    errors: dict[str, str] = {}
    if len(todo) > 1 and len({shape_key(c) for c, _ in todo}) == 1:
        tb = _train_batched()
        if tb is not None:
            log(f"training {len(todo)} runs together: {', '.join(c.run_id for c, _ in todo)}")
            try:
                tb.train_group([c for c, _ in todo], [d for _, d in todo], device=None,
                               progress_bar=False, log=log)
            except Exception:
                log("batched training failed; training the unfinished runs one by one:\n"
                    + traceback.format_exc())
            todo = [(c, d) for c, d in todo if not RunDir(d).is_complete()]
    for cfg, d in todo:
        log(f"run {cfg.run_id} -> {d}")
        try:
            run_training(cfg, d, progress_bar=False, log=log)
        except Exception:
            text = traceback.format_exc()
            _record_error(d, text)
            errors[cfg.run_id] = _last_line(text)
            log(f"run {cfg.run_id} failed: {errors[cfg.run_id]}")
    results = []
    for cfg, d in zip(cfgs, dirs):
        run = RunDir(d)
        summary = (run.read_summary() if run.is_complete() else None) or {}
        results.append({"run_id": cfg.run_id, "dir": d, "complete": run.is_complete(),
                        "grokked": summary.get("grokked"),
                        "grokking_epoch": summary.get("grokking_epoch"),
                        "error": errors.get(cfg.run_id)})
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(runs)} runs failed: "
                           + "; ".join(f"{k}: {v}" for k, v in errors.items()))
    return results


class SweepJob(submitit.helpers.Checkpointable):
    """One scheduler job: trains its runs. Preempted or timed out, submitit calls
    ``checkpoint()`` and requeues the same job, which resumes every run from its run directory
    (``run_training`` picks up ``state.pt``)."""

    def __init__(self, runs: Sequence[tuple[dict, str]], threads: int | None = None,
                 wandb: dict | None = None):
        self.runs = [(dict(c), str(d)) for c, d in runs]
        self.threads = threads
        self.wandb = wandb   # launcher.wandb (grokhpc.tracking), None when off

    def __call__(self) -> list[dict]:
        env = submitit.JobEnvironment() if os.environ.get("SUBMITIT_EXECUTOR") else None
        if env is not None:
            print(f"job {env.job_id} on {env.hostname}: {len(self.runs)} run(s)", flush=True)
        with tracking.enabled(getattr(self, "wandb", None)):
            return train_runs(self.runs, log=lambda m: print(m, flush=True),
                              threads=self.threads)

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        print("checkpoint: requeueing; runs resume from their last checkpoint", flush=True)
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


# ---- planning -------------------------------------------------------------------------------
def resolve_executor(name: str, dry_run: bool = False, cluster: str | None = None) -> str:
    if name != "auto":
        return name
    if shutil.which("sbatch") or (dry_run and cluster):
        return "slurm"
    return "local"


# Memory of the GPU types the cluster profiles name (GB; the smaller model where there are two):
# sizes ``runs_per_job: auto`` when the launch host is not the GPU node.
GPU_MEMORY_GB = {"h200": 141, "h100": 80, "a100": 40, "a5000": 24, "rtx3090": 24,
                 "rtx5000": 16, "v100": 16, "rtx2080ti": 11}
AUTO_SAFETY = 0.7
AUTO_CAP = 1024


def runs_per_job_for(launcher: LauncherSettings, log=None) -> Callable:
    """size_for(cfg) for grokhpc.sweep.pack. ``auto``: for a GPU job of a known type, as many
    runs as fit 70% of its memory (grokhpc.train_batched.bytes_per_run); otherwise
    grokhpc.train_batched.auto_runs_per_job on the device here; 1 when neither can say."""
    if launcher.runs_per_job != "auto":
        n = int(launcher.runs_per_job)
        return lambda cfg: n
    gpus = launcher.gpus or 0
    device = "cuda" if gpus > 0 else "cpu"
    log = log or (lambda m: print(m, file=sys.stderr))

    def auto(cfg) -> int:
        tb = _train_batched()
        if tb is None:
            return 1
        mem = GPU_MEMORY_GB.get((launcher.gpu_type or "").lower()) if gpus else None
        if mem and hasattr(tb, "bytes_per_run"):
            return int(max(1, min(AUTO_CAP, AUTO_SAFETY * mem * 1e9 // tb.bytes_per_run(cfg))))
        try:
            return max(1, int(tb.auto_runs_per_job(cfg, device)))
        except Exception as e:  # no such device here (a login node): one run per job
            log(f"warning: runs_per_job auto: {type(e).__name__}: {e}; "
                "set launcher.gpu_type or a number; using 1")
            return 1
    return auto


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


def max_array_size() -> int:
    """Array tasks per submission: below ``MaxArraySize`` from ``scontrol show config``."""
    try:
        out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True,
                             timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return DEFAULT_MAX_ARRAY
    for line in out.splitlines():
        k, _, v = line.partition("=")
        if k.strip() == "MaxArraySize" and v.strip().isdigit():
            return max(1, int(v.strip()) - 1)
    return DEFAULT_MAX_ARRAY


def chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def scheduler_live(job_ids: Sequence[str]) -> dict[str, str]:
    """{job id: state} of the given jobs still known to squeue (array tasks one per line)."""
    if not job_ids or not shutil.which("squeue"):
        return {}
    bases = sorted({j.split("_")[0] for j in job_ids})
    try:
        r = subprocess.run(["squeue", "-h", "-r", "-o", "%i %T", "-j", ",".join(bases)],
                           capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return {}
    out = {}
    for line in r.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2:
            out[parts[0]] = parts[1]
    return out


def read_manifest(out: Path) -> dict | None:
    f = out / MANIFEST
    return read_json(f) if f.exists() else None


def run_jobs(manifest: dict | None) -> dict[str, dict]:
    """{run_id: {job_id, executor, launch}} from the latest launch that included each run."""
    latest: dict[str, dict] = {}
    for i, launch in enumerate((manifest or {}).get("launches", [])):
        for job in launch.get("jobs", []):
            for rid in job.get("runs", []):
                latest[rid] = {"job_id": str(job["job_id"]), "executor": launch.get("executor"),
                               "launch": i}
    return latest


def in_flight(manifest: dict | None) -> dict[str, str]:
    """{run_id: scheduler state} for runs whose latest SLURM job is still queued or running."""
    latest = {rid: j for rid, j in run_jobs(manifest).items() if j["executor"] == "slurm"}
    live = scheduler_live([j["job_id"] for j in latest.values()])
    return {rid: live[j["job_id"]] for rid, j in latest.items()
            if live.get(j["job_id"]) in LIVE_STATES}


def manifest_base(sweep: Sweep, launcher: LauncherSettings, old: dict | None) -> dict:
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
        "base": to_dict(sweep.base),
        "launcher": launcher.to_dict(),
        # run directories relative to the sweep directory, so a copied sweep still reads
        "runs": [{"run_id": r.run_id, "dir": os.path.relpath(r.dir, sweep.out), "swept": r.swept}
                 for r in sweep.runs],
        "launches": list((old or {}).get("launches", [])),
    }


# ---- output ---------------------------------------------------------------------------------
def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def runs_table(sweep: Sweep, state: dict[str, str]) -> str:
    axes = list(sweep.axes)
    head = ["#", "run_id", *axes, "state"]
    rows = [[str(i), r.run_id, *[_fmt(r.swept.get(a)) for a in axes], state[r.run_id]]
            for i, r in enumerate(sweep.runs)]
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa
    return "\n".join([line(head)] + [line(r) for r in rows])


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


# ---- the launch -----------------------------------------------------------------------------
def launch(spec: str, executor: str | None = None, cluster: str | None = None,
           overrides: Sequence[str] = (), dry_run: bool = False,
           out=None) -> dict:
    """Expand, plan and (unless dry_run) submit. Returns the plan with the submitted jobs."""
    out = out if out is not None else sys.stdout
    sweep = load_sweep(spec, overrides)
    cluster = cluster or sweep.launcher.cluster
    profile = load_profile(cluster) if cluster else None
    launcher = resolve_launcher(sweep.launcher.replace(cluster=cluster), profile, str(spec))
    kind = resolve_executor(executor or launcher.executor, dry_run, cluster)
    if kind not in ("slurm", "local", "debug"):
        raise ConfigError(f"--executor: expected auto, slurm, local or debug, got {kind!r}")
    wandb = launcher.wandb and launcher.wandb.with_group(sweep.name)
    if wandb:
        tracking.check_installed(f"{spec}: launcher.wandb")
    if kind == "slurm" and not dry_run and not shutil.which("sbatch"):
        raise ConfigError("--executor: slurm: expected sbatch on PATH (no SLURM here); "
                          "use --executor local")

    old = read_manifest(sweep.out)
    if old and old.get("spec_hash") != sweep.spec_hash:
        print(f"note: {sweep.out / MANIFEST} was written from another version of the spec; "
              "updating it (run directories are kept)", file=out)
    flying = in_flight(old)
    state: dict[str, str] = {}
    todo: list[SweepRun] = []
    for r in sweep.runs:
        run = RunDir(r.dir)
        if run.exists() and run.read_config().get("run_id") != r.run_id:
            raise RunDirError(f"{r.dir}: holds run {run.read_config().get('run_id')}, "
                              f"not {r.run_id}")
        if run.is_complete():
            state[r.run_id] = "complete"
        elif r.run_id in flying:
            state[r.run_id] = f"in flight ({flying[r.run_id].lower()})"
        else:
            state[r.run_id] = "to run"
            todo.append(r)
    groups = pack(todo, runs_per_job_for(launcher))
    params = executor_parameters(kind, sweep, launcher, profile)
    plan = {"sweep": sweep, "launcher": launcher, "executor": kind, "profile": profile,
            "todo": todo, "groups": groups, "parameters": params, "jobs": []}

    n_done = sum(v == "complete" for v in state.values())
    print(f"sweep {sweep.spec} -> {sweep.out}", file=out)
    print(f"{len(sweep.runs)} runs over {', '.join(sweep.axes)}: {n_done} complete, "
          f"{len(sweep.runs) - n_done - len(todo)} in flight, {len(todo)} to run in "
          f"{len(groups)} job(s) of up to {max((len(g) for g in groups), default=0)} run(s)",
          file=out)
    if dry_run:
        print(runs_table(sweep, state), file=out)
        print(f"\nexecutor: {kind}" + (f", cluster {profile.name} ({profile.path})"
                                      if profile else ""), file=out)
        if profile and launcher.partition and profile.partition(launcher.partition):
            part = profile.partition(launcher.partition)
            print(f"partition {part.name}: limit {part.max_time} min"
                  + (", preemptable (jobs requeue and resume)" if part.preemptable else ""),
                  file=out)
        if wandb:
            print(f"W&B: project {wandb.project}, group {wandb.group}, {wandb.mode}", file=out)
        print("submitit parameters:", file=out)
        for k in sorted(params):
            print(f"  {k} = {params[k]!r}", file=out)
        if kind == "slurm":
            print(f"  slurm_max_num_timeout = {launcher.max_timeouts!r}", file=out)
            size = max_array_size() if shutil.which("scontrol") else DEFAULT_MAX_ARRAY
            arrays = chunks(groups, size) or [[]]
            n0 = len(arrays[0])
            print("sbatch script header " + (f"({len(arrays)} array(s), the first of {n0} tasks):"
                                             if n0 > 1 else "(a single job, no array):"),
                  file=out)
            try:
                print(sbatch_preview(params, sweep.out / JOBS_DIR, max(1, len(arrays[0]))),
                      file=out)
            except Exception as e:  # the preview uses submitit internals
                print(f"  (preview unavailable: {type(e).__name__}: {e})", file=out)
        print("dry run: nothing written, nothing submitted", file=out)
        return plan

    sweep.out.mkdir(parents=True, exist_ok=True)
    manifest = manifest_base(sweep, launcher, old)
    atomic_write_json(sweep.out / MANIFEST, manifest)
    if not groups:
        print("nothing to submit", file=out)
        return plan
    for r in todo:   # config.json up front: status can name every run from its directory
        RunDir(r.dir).create({**to_dict(r.config), "run_id": r.run_id})

    folder = sweep.out / JOBS_DIR / "%j"
    kwargs = {"slurm_max_num_timeout": launcher.max_timeouts} if kind == "slurm" else {}
    ex = submitit.AutoExecutor(folder=folder, cluster=kind, **kwargs)
    ex.update_parameters(**params)
    threads = None if kind == "slurm" else local_threads(launcher)
    fns = [SweepJob([(to_dict(r.config), str(r.dir)) for r in g], threads,
                    wandb and wandb.to_dict()) for g in groups]
    if wandb and wandb.mode == "offline":
        tracking.announce("W&B runs are written offline; after the jobs, upload them with: "
                          + tracking.sync_command(sweep.out / "runs" / "*" / "wandb" /
                                                  "offline-run-*"), file=out, always=True)
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "executor": kind,
              "cluster": profile.name if profile else None, "parameters": _jsonable(params),
              "jobs": []}
    manifest["launches"].append(record)

    def save_jobs(jobs, gs):
        for job, g in zip(jobs, gs):
            record["jobs"].append({"job_id": str(job.job_id), "runs": [r.run_id for r in g]})
        atomic_write_json(sweep.out / MANIFEST, manifest)

    if kind == "slurm":
        for idx in chunks(list(range(len(fns))), max_array_size()):
            jobs = ex.submit_array([fns[i] for i in idx])
            save_jobs(jobs, [groups[i] for i in idx])
            plan["jobs"] += jobs
        ids = sorted({str(j.job_id).split("_")[0] for j in plan["jobs"]})
        print(f"submitted {len(plan['jobs'])} job(s) as SLURM array(s) {', '.join(ids)} "
              f"(logs in {sweep.out / JOBS_DIR})", file=out)
        print(f"follow with: python -m grokhpc.status {sweep.out}", file=out)
        return plan
    run_locally(ex, fns, groups, plan, save_jobs, launcher, out)
    return plan


def _jsonable(d: dict) -> dict:
    return {k: (_jsonable(v) if isinstance(v, dict) else v) for k, v in d.items()}


def local_threads(launcher: LauncherSettings) -> int:
    """torch threads per local job: cpus_per_task, else 1 (small models gain little from more,
    and a busy machine makes extra threads spin)."""
    return launcher.cpus_per_task or 1


def local_parallelism(launcher: LauncherSettings) -> int:
    """Local jobs at once: as many as the cores hold at ``local_threads`` each, at most
    array_parallelism."""
    cap = max(1, (os.cpu_count() or 1) // local_threads(launcher))
    return max(1, min(launcher.array_parallelism or cap, cap))


def run_locally(ex, fns, groups, plan, save_jobs, launcher, out) -> None:
    """Run the jobs here, ``local_parallelism`` at a time, with a progress bar over runs."""
    from tqdm.auto import tqdm

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
                        failures.append(_last_line(str(e)) or type(e).__name__)
                else:
                    still.append((job, g))
            running = still
            tick()
            if running:
                time.sleep(1.0)
    except KeyboardInterrupt:
        for job, _ in running:
            job.cancel()
        raise
    finally:
        bar.close()
    report(plan["sweep"], failures, out)


def report(sweep: Sweep, failures: list[str], out) -> None:
    complete, grokked = 0, []
    for r in sweep.runs:
        run = RunDir(r.dir)
        if run.is_complete():
            complete += 1
            s = run.read_summary() or {}
            if s.get("grokked"):
                grokked.append((r, s.get("grokking_epoch")))
    print(f"{complete}/{len(sweep.runs)} runs complete, {len(grokked)} grokked "
          "(test accuracy >= 99%)", file=out)
    for r, e in grokked:
        label = ", ".join(f"{k}={_fmt(v)}" for k, v in r.swept.items())
        print(f"  {r.run_id}  {label}: grokked at epoch {e}", file=out)
    for f in failures:
        print(f"  failed job: {f}", file=out)
    if failures:
        print(f"details: python -m grokhpc.status {sweep.out}", file=out)


# ---- command line ---------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m grokhpc.launch",
        description="Expand a sweep spec into runs and submit the unfinished ones "
                    "(SLURM when available, else locally).")
    ap.add_argument("spec", help="sweep spec (YAML), e.g. sweeps/quickstart.yaml")
    ap.add_argument("--dry-run", action="store_true",
                    help="print the runs and the sbatch parameters; write and submit nothing")
    ap.add_argument("--executor", choices=["auto", "slurm", "local", "debug"], default=None,
                    help="where jobs run (default: the spec's launcher.executor, else auto: "
                         "SLURM if sbatch is on PATH, else local)")
    ap.add_argument("--cluster", default=None,
                    help="cluster profile from slurm/<NAME>.yaml (bouchet, mccleary, grace)")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    metavar="KEY=VALUE",
                    help="override a base run field (n_epochs=500), a launcher setting "
                         "(launcher.time=30) or out=DIR; repeatable")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        plan = launch(args.spec, executor=args.executor, cluster=args.cluster,
                      overrides=args.overrides, dry_run=args.dry_run)
    except (ConfigError, RunDirError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except submitit.core.utils.FailedJobError as e:  # pragma: no cover - submission failure
        print(f"error: submission failed: {_last_line(str(e))}", file=sys.stderr)
        return 1
    if plan["executor"] in ("local", "debug") and not args.dry_run:
        return 0 if all(RunDir(r.dir).is_complete() for r in plan["sweep"].runs) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
