"""Launch a sweep: expand the spec, write the manifest, submit what is left with submitit.

``python -m grokhpc.launch SPEC [--dry-run] [--executor auto|slurm|local|debug]
[--cluster NAME] [--set key=value ...]``

* The spec is expanded into runs (grokhpc.sweep); each run lives in ``OUT/runs/<run_id>``.
* ``OUT/manifest.json`` records the spec, its runs and axes, the launcher settings and, per
  launch, the submitted job ids and the runs each job trains. It is rewritten atomically.
* Runs already done are skipped, and so are runs whose job from an earlier launch is still
  queued or running, so launching twice never trains a run twice; a corrupt run (a file that
  cannot be read) is listed and left alone. Run states and the manifest are grokhpc.scheduler's.
* Runs are packed into jobs by shape (``runs_per_job``); a job trains its runs with
  ``grokhpc.train_batched.train_group`` when it has more than one, else ``run_training``.
  ``runs_per_job: auto`` on a GPU type with a throughput table sizes the jobs for the soonest
  finish of the sweep within the partition's caps (grokhpc.plan); every GPU plan's predicted
  wall time and GPU-hours are printed. ``gpus: N``: a job trains N groups of its runs at once,
  one per GPU, each in its own process (``train_on_devices``).
* ``auto`` executor: SLURM when ``sbatch`` is on PATH, else local. On SLURM the jobs form one
  array per launch (cut below the cluster's MaxArraySize), logs go to ``OUT/jobs/``, and a job
  that is preempted or times out is requeued and resumes from its last checkpoint (submitit's
  checkpointing; ``scontrol requeue`` works the same way). One more small CPU job, started
  once every live array of the sweep has ended (``--dependency=afterany``), aggregates the sweep
  (tables and figures, ``python -m grokhpc.aggregate OUT``); a relaunch replaces it if it is
  still queued. The command prints the job ids and returns. Locally it waits, with a progress
  bar over runs, reports the runs that grokked and aggregates the sweep; its jobs end with it
  (grokhpc.lifeline), each writing its runs' state first. A relaunch with nothing left to
  train aggregates a sweep whose tables are missing or out of date.
* ``launcher.wandb``: each job trains its runs with W&B tracking on (grokhpc.tracking), grouped
  under the sweep's name; offline, the launch prints the ``wandb sync`` command for them.

torch is imported only inside jobs (and for ``runs_per_job: auto`` on a GPU of unknown type,
sized on the device here).
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from typing import Any, Callable, Sequence

import submitit

from . import lifeline as lifelines
from . import scheduler as sched
from . import tracking
from .config import ConfigError, from_dict, to_dict
from .scheduler import (DEFAULT_MAX_ARRAY, JOBS_DIR, MANIFEST, chunks, max_array_size,
                        sbatch_preview)
from .plan import Forecast, forecast, plan_auto, split_even, throughput_for
from .store import RunDir, RunDirError, RunLockedError
from .sweep import (ClusterProfile, LauncherSettings, Sweep, SweepRun, cut_text,
                    fit_partition, load_profile, load_sweep, pack, parallelism_cap,
                    partition_limits, resolve_launcher, shape_key, shown)

DEFAULT_ARRAY_PARALLELISM = 64
DEFAULT_TIME_MIN = 60


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
               threads: int | None = None, state_every_s: float | None = None) -> list[dict]:
    """Train a job's runs: [(RunConfig dict, run directory), ...]. One run failing does not stop
    the others; afterwards the job raises if any run failed (so the scheduler marks it failed).
    ``state_every_s``: seconds between a run's state.pt writes (launcher.state_every)."""
    from .runtime import DEFAULT_STATE_EVERY_S, JobSettings
    from .train import run_training

    _set_threads(threads)
    wandb = tracking.settings_from_env()   # as the launch set it (tracking.enabled)
    settings = JobSettings(state_every_s=DEFAULT_STATE_EVERY_S if state_every_s is None
                           else state_every_s, wandb=wandb.to_dict() if wandb else None)
    cfgs = [from_dict(c, source=f"{d}: config") for c, d in runs]
    dirs = [str(d) for _, d in runs]
    todo = [(c, d) for c, d in zip(cfgs, dirs) if not RunDir(d).is_complete()]
    errors: dict[str, str] = {}
    if len(todo) > 1 and len({shape_key(c) for c, _ in todo}) == 1:
        tb = _train_batched()
        if tb is not None:
            log(f"training {len(todo)} runs together: {', '.join(c.run_id for c, _ in todo)}")
            try:
                tb.train_group([c for c, _ in todo], [d for _, d in todo], settings,
                               progress_bar=False, log=log)
            except Exception:
                log("batched training failed; training the unfinished runs one by one:\n"
                    + traceback.format_exc())
            todo = [(c, d) for c, d in todo if not RunDir(d).is_complete()]
    for cfg, d in todo:
        log(f"run {cfg.run_id} -> {d}")
        try:
            run_training(cfg, d, settings, progress_bar=False, log=log)
        except RunLockedError as e:   # another job trains it (a stale job beside its requeue)
            log(f"run {cfg.run_id} skipped, nothing written: {e}")
        except Exception:
            text = traceback.format_exc()
            _record_error(d, text)
            errors[cfg.run_id] = _last_line(text)
            log(f"run {cfg.run_id} failed: {errors[cfg.run_id]}")
    return job_results([c.run_id for c in cfgs], dirs, errors)


def job_results(run_ids: Sequence[str], dirs: Sequence[str], errors: dict[str, str]
                ) -> list[dict]:
    """One line per run of a job (complete, grokked, its error); raises if any run failed, so
    the scheduler marks the job failed."""
    results = []
    for run_id, d in zip(run_ids, dirs):
        run = RunDir(d)
        summary = (run.read_summary() if run.is_complete() else None) or {}
        results.append({"run_id": run_id, "dir": d, "complete": run.is_complete(),
                        "grokked": summary.get("grokked"),
                        "grokking_epoch": summary.get("grokking_epoch"),
                        "error": errors.get(run_id)})
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(dirs)} runs failed: "
                           + "; ".join(f"{k}: {v}" for k, v in errors.items()))
    return results


# ---- several GPUs in one job ----------------------------------------------------------------
# preemption and time-out (USR2: SLURM's warning, after the runs' state is written): runs resume
INTERRUPTIONS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2)
_GROUP_PROCS: list = []   # this job's training processes, one per device (train_on_devices)


def job_devices(gpus: int) -> list[str]:
    """The job's GPUs as CUDA_VISIBLE_DEVICES entries: the ones SLURM (or the user) made
    visible, else 0..gpus-1; at most ``gpus``."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    seen = [x.strip() for x in env.split(",") if x.strip()] if env is not None \
        else [str(i) for i in range(gpus)]
    return seen[:max(0, gpus)]


def _train_on_device(runs: Sequence[tuple[dict, str]], device: str, threads: int,
                     state_every_s: float | None = None) -> None:
    """One group of a several-GPU job, in its own process, seeing only ``device`` ("cpu" or
    "cpu:N": no GPU, the CPU). USR2 (SLURM's warning, passed on by the job's process) writes
    the runs' state, then ends this process."""
    signal.signal(signal.SIGUSR2, signal.SIG_DFL)
    on_cpu = device == "cpu" or str(device).startswith("cpu:")
    os.environ["CUDA_VISIBLE_DEVICES"] = "" if on_cpu else str(device)
    if not on_cpu:   # the one GPU this process sees is cuda:0, whichever a run's config names
        runs = [({**c, "device": "cuda"} if str(c.get("device", "")).startswith("cuda:") else c,
                 d) for c, d in runs]
    train_runs(runs, log=lambda m: print(f"[device {device}] {m}", flush=True), threads=threads,
               state_every_s=state_every_s)


def stop_groups(timeout_s: float = 60.0) -> None:
    """Pass SLURM's warning to each device's training process of this job: each writes its
    runs' state and ends. Waits up to ``timeout_s`` for them all."""
    live = [p for p in _GROUP_PROCS if p.is_alive()]
    for p in live:
        try:
            os.kill(p.pid, signal.SIGUSR2)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout_s
    for p in live:
        p.join(max(0.0, deadline - time.monotonic()))


def _job_cpus() -> int:
    env = os.environ.get("SLURM_CPUS_PER_TASK", "")
    return int(env) if env.isdigit() else (os.cpu_count() or 1)


def _ended(code: int | None) -> str:
    if code is not None and code < 0:
        return f"ended by signal {-code} ({signal.Signals(-code).name})"
    return f"ended with exit code {code}"


def train_on_devices(runs: Sequence[tuple[dict, str]], devices: Sequence[str],
                     log: Callable[[str], Any] = print, threads: int | None = None,
                     worker: Callable | None = None,
                     state_every_s: float | None = None) -> list[dict]:
    """Train a job's runs as one group per device (split_even, in order), all at once, each
    group in its own process that sees only its device and trains and resumes as a one-GPU job
    does (``train_runs``). A group that fails leaves error.txt in its unfinished runs (written
    here for a process that died without one, unless SLURM interrupted it) and the others go
    on; afterwards the job raises if any run failed."""
    import multiprocessing

    groups = split_even(list(runs), len(devices))
    ctx = multiprocessing.get_context("spawn")
    share = max(1, (threads or _job_cpus()) // len(groups))
    procs = []
    for group, dev in zip(groups, devices):
        log(f"device {dev}: {len(group)} run(s)")
        proc = ctx.Process(target=worker or _train_on_device,
                           args=(group, dev, share, state_every_s), daemon=True)
        proc.start()
        procs.append(proc)
    _GROUP_PROCS[:] = procs
    for proc in procs:
        proc.join()
    _GROUP_PROCS.clear()
    ids = {str(d): from_dict(c, source=f"{d}: config").run_id for c, d in runs}
    errors: dict[str, str] = {}
    for group, dev, proc in zip(groups, devices, procs):
        ended = _ended(proc.exitcode)
        if proc.exitcode != 0:
            log(f"device {dev}: training process {ended}")
        for _, d in group:
            if RunDir(d).is_complete():
                continue
            if -(proc.exitcode or 0) not in INTERRUPTIONS:
                _record_error(d, f"training process on device {dev} {ended} before the run "
                                 "was complete")
            errors[ids[str(d)]] = (_last_line(RunDir(d).read_error() or "")
                                   or f"interrupted: device {dev} {ended}")
    return job_results(list(ids.values()), list(ids), errors)


class SweepJob(submitit.helpers.Checkpointable):
    """One scheduler job: trains its runs. Preempted or timed out, submitit calls
    ``checkpoint()`` and requeues the same job, which resumes every run from its run directory
    (``run_training`` picks up ``state.pt``)."""

    def __init__(self, runs: Sequence[tuple[dict, str]], threads: int | None = None,
                 gpus: int = 0, wandb: dict | None = None, state_every_s: float | None = None,
                 lifeline: str | None = None):
        self.runs = [(dict(c), str(d)) for c, d in runs]
        self.threads = threads
        self.gpus = gpus
        self.wandb = wandb   # launcher.wandb (grokhpc.tracking), None when off
        self.state_every_s = state_every_s   # launcher.state_every, in seconds
        self.lifeline = lifeline   # a local launch's lifeline file: the job ends with the launch
        self.orphaned = False

    def __call__(self) -> list[dict]:
        env = submitit.JobEnvironment() if os.environ.get("SUBMITIT_EXECUTOR") else None
        if env is not None:
            print(f"job {env.job_id} on {env.hostname}: {len(self.runs)} run(s)", flush=True)
        log = lambda m: print(m, flush=True)  # noqa: E731
        if getattr(self, "lifeline", None):
            lifelines.watch(self.lifeline, self.launch_ended)
        devices = job_devices(self.gpus) if self.gpus > 1 else []
        every = getattr(self, "state_every_s", None)
        with tracking.enabled(getattr(self, "wandb", None)):
            if len(devices) > 1 and len(self.runs) > 1:
                if len(devices) < self.gpus:
                    log(f"{len(devices)} of the job's {self.gpus} GPUs are visible; using those")
                return train_on_devices(self.runs, devices, log=log, threads=self.threads,
                                        state_every_s=every)
            return train_runs(self.runs, log=log, threads=self.threads, state_every_s=every)

    def launch_ended(self) -> None:
        """The local launch that started this job has ended: stop as on SLURM's warning (USR2:
        the runs' state is written at the next epoch), but end instead of requeueing."""
        self.orphaned = True
        os.kill(os.getpid(), signal.SIGUSR2)
        print("the launch that started this job has ended: the job stops once its runs' state "
              "is written", flush=True)

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """submitit's answer to SLURM's USR2 warning (a training loop in this process has
        written its runs' state first, see grokhpc.preempt; device processes do it now)."""
        stop_groups()
        if getattr(self, "orphaned", False):
            print("the runs' state is written; launch again to resume them", flush=True)
            raise SystemExit(1)
        print("checkpoint: requeueing; runs resume from their last state", flush=True)
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


# ---- planning -------------------------------------------------------------------------------
def resolve_executor(name: str, dry_run: bool = False, cluster: str | None = None) -> str:
    if name != "auto":
        return name
    if shutil.which("sbatch") or (dry_run and cluster):
        return "slurm"
    return "local"


# Memory of every GPU type the cluster profiles name, in GB: the "vRAM/GPU (GB)" column of the
# partition tables on docs.ycrc.yale.edu/clusters/{bouchet,grace,mccleary}/ (August 2026), the
# smaller model where a type comes in two (a100: 40 and 80). b200: the page says 193; NVIDIA's
# HGX/DGX B200 gives 180 usable, the smaller is kept. Sizes ``runs_per_job: auto`` when the
# launch host is not the GPU node.
GPU_MEMORY_GB = {"b200": 180, "h200": 141, "rtx_pro_6000_blackwell": 96, "h100": 80,
                 "l40s": 48, "a40": 48, "rtx8000": 48, "a100": 40, "rtx_5000_ada": 32,
                 "a5000": 24, "rtx3090": 24, "rtx5000": 16, "v100": 16, "rtx2080ti": 11,
                 "rtx2080": 8}
AUTO_SAFETY = 0.7
AUTO_CAP = 1024


def gpu_memory_cap(launcher: LauncherSettings) -> Callable[[list], int] | None:
    """cap(configs): the runs of these configs one GPU of the launcher's type holds, a group
    padded to its largest run (AUTO_SAFETY of its memory, grokhpc.train_batched.bytes_per_run,
    at most AUTO_CAP); None for a GPU type of unknown memory."""
    mem = GPU_MEMORY_GB.get((launcher.gpu_type or "").lower()) if launcher.gpus else None
    tb = _train_batched()
    if not mem or tb is None or not hasattr(tb, "bytes_per_run"):
        return None
    return lambda cfgs: int(max(1, min(AUTO_CAP, AUTO_SAFETY * mem * 1e9
                                       // max(tb.bytes_per_run(c) for c in cfgs))))


def runs_per_job_for(launcher: LauncherSettings, log=None) -> Callable:
    """size_for(cfg) for grokhpc.sweep.pack: a number as it is; ``auto`` where there is no
    throughput table (plan_jobs): for a GPU of known memory, as many runs as fit it
    (gpu_memory_cap), else grokhpc.train_batched.auto_runs_per_job on the device here; 1 when
    neither can say."""
    if launcher.runs_per_job != "auto":
        n = int(launcher.runs_per_job)
        return lambda cfg: n
    gpus = launcher.gpus or 0
    device = "cuda" if gpus > 0 else "cpu"
    log = log or (lambda m: print(m, file=sys.stderr))
    cap = gpu_memory_cap(launcher)

    def auto(cfg) -> int:
        tb = _train_batched()
        if tb is None:
            return 1
        if cap is not None:
            return cap([cfg])
        try:
            return max(1, int(tb.auto_runs_per_job(cfg, device)))
        except Exception as e:  # no such device here (a login node): one run per job
            log(f"warning: runs_per_job auto: {type(e).__name__}: {e}; "
                "set launcher.gpu_type or a number; using 1")
            return 1
    return auto


def launch_parallelism(kind: str, launcher: LauncherSettings,
                       profile: ClusterProfile | None) -> int:
    """Jobs of this launch that run at once: the partition's caps on SLURM, the cores here
    locally, one in the debug executor."""
    if kind == "slurm":
        part = profile.partition(launcher.partition) if profile and launcher.partition else None
        return parallelism_cap(launcher, part, DEFAULT_ARRAY_PARALLELISM)[0]
    return local_parallelism(launcher) if kind == "local" else 1


def plan_jobs(todo: Sequence[SweepRun], launcher: LauncherSettings,
              profile: ClusterProfile | None, kind: str
              ) -> tuple[list[list[SweepRun]], Forecast | None]:
    """The jobs of this launch and, for GPU jobs of a type with a throughput table, their
    forecast (grokhpc.plan). ``auto`` with a table: the plan that finishes soonest over the
    jobs the partition lets run at once (grokhpc.plan.plan_auto); otherwise ``pack``."""
    gpus = launcher.gpus or 0
    tp = throughput_for(launcher.gpu_type) if gpus > 0 else None
    width = launch_parallelism(kind, launcher, profile)
    cap = gpu_memory_cap(launcher)
    if launcher.runs_per_job == "auto" and tp is not None and cap is not None:
        part = profile.partition(launcher.partition) if profile and launcher.partition else None
        max_jobs = part.max_submitted if part is not None and kind == "slurm" else None
        return plan_auto(todo, gpus, width, tp, cap, max_jobs)
    groups = pack(todo, runs_per_job_for(launcher))
    return groups, (forecast(groups, gpus, width, tp) if tp is not None else None)


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


def array_size(dry_run: bool = False) -> int:
    """Array tasks per submission here: the cluster's, or the default in a dry run off-cluster."""
    return max_array_size() if shutil.which("scontrol") or not dry_run else DEFAULT_MAX_ARRAY


# ---- output ---------------------------------------------------------------------------------
def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def runs_table(sweep: Sweep, state: dict[str, str], action: dict[str, str]) -> str:
    """One line per run: its axis values, its state (grokhpc.scheduler's vocabulary) and what
    this launch does with it."""
    axes = list(sweep.axes)
    head = ["#", "run_id", *axes, "state", "launch"]
    rows = [[str(i), r.run_id, *[_fmt(r.swept.get(a)) for a in axes], state[r.run_id],
             action[r.run_id]] for i, r in enumerate(sweep.runs)]
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa
    return "\n".join([line(head)] + [line(r) for r in rows])


# ---- the launch -----------------------------------------------------------------------------
def settle(spec: str, executor: str | None, cluster: str | None, overrides: Sequence[str],
           dry_run: bool) -> tuple[Sweep, LauncherSettings, ClusterProfile | None, str]:
    """The expanded sweep, its launcher settings (profile defaults filled in), the profile and
    the executor kind; every input error is a one-line ConfigError."""
    sweep = load_sweep(spec, overrides)
    cluster = cluster or sweep.launcher.cluster
    profile = load_profile(cluster) if cluster else None
    launcher = resolve_launcher(sweep.launcher.replace(cluster=cluster), profile, str(spec))
    kind = resolve_executor(executor or launcher.executor, dry_run, cluster)
    if kind not in ("slurm", "local", "debug"):
        raise ConfigError(f"--executor: expected auto, slurm, local or debug, got {kind!r}")
    if kind == "slurm" and not dry_run and not shutil.which("sbatch"):
        raise ConfigError("--executor: slurm: expected sbatch on PATH (no SLURM here); "
                          "use --executor local")
    if launcher.wandb:
        tracking.check_installed(f"{spec}: launcher.wandb")
    return sweep, launcher, profile, kind


def wandb_settings(plan: dict):
    """The sweep's W&B settings (its runs grouped under the sweep's name), or None."""
    wandb = plan["launcher"].wandb
    return wandb and wandb.with_group(plan["sweep"].name)


def held_run_id(run: RunDir) -> str | None:
    """The run_id in a run directory's config.json; an unreadable config.json is a RunDirError
    naming it (the directory is never trained over)."""
    try:
        cfg = run.read_config()
    except ValueError as e:       # not UTF-8
        raise RunDirError(f"{run.file('config.json')}: unreadable ({e})") from None
    if not isinstance(cfg, dict):
        raise RunDirError(f"{run.file('config.json')}: expected a JSON object")
    return cfg.get("run_id")


def sort_runs(sweep: Sweep, manifest: dict | None) -> tuple[dict, dict, list[SweepRun]]:
    """Each run's state and what this launch does with it, and the runs to submit: not done,
    not corrupt, and not held by a SLURM job of an earlier launch that is queued or running."""
    flying = sched.in_flight(manifest)
    jobs = sched.latest_jobs(manifest)
    state: dict[str, str] = {}
    action: dict[str, str] = {}
    todo: list[SweepRun] = []
    for r in sweep.runs:
        run = RunDir(r.dir)
        held = held_run_id(run) if run.exists() else r.run_id
        if held != r.run_id:
            raise RunDirError(f"{r.dir}: holds run {shown(held)}, not {r.run_id}")
        found = sched.read_dir(run)
        job = flying.get(r.run_id, sched.NO_JOB)   # not live: this launch takes the run over
        state[r.run_id] = sched.run_state(found.state, job)
        if state[r.run_id] == sched.CORRUPT:
            action[r.run_id] = "left alone"
        elif state[r.run_id] == sched.DONE:
            action[r.run_id] = "-"
        elif job.live:
            action[r.run_id] = f"job {jobs[r.run_id]['job_id']} has it"
        else:
            action[r.run_id] = "submit"
            todo.append(r)
    return state, action, todo


def make_plan(spec: str, executor: str | None, cluster: str | None, overrides: Sequence[str],
              dry_run: bool, out) -> dict:
    """What a launch would do: the sweep, settings, each run's state, the runs to submit and
    their packing into jobs."""
    sweep, launcher, profile, kind = settle(spec, executor, cluster, overrides, dry_run)
    old = sched.read_manifest(sweep.out)
    if old and old.get("spec_hash") != sweep.spec_hash:
        print(f"note: {sweep.out / MANIFEST} was written from another version of the spec; "
              "updating it (run directories are kept)", file=out)
    state, action, todo = sort_runs(sweep, old)
    groups, outlook = plan_jobs(todo, launcher, profile, kind)
    fit = fit_partition(launcher, profile, len(groups), array_size(dry_run), str(spec),
                        DEFAULT_ARRAY_PARALLELISM) if kind == "slurm" else None
    if fit is not None:   # the partition's per-user caps; deferred jobs go out on a relaunch
        launcher, groups = fit.launcher, groups[:fit.jobs_now]
    return {"sweep": sweep, "launcher": launcher, "executor": kind, "profile": profile,
            "old_manifest": old, "state": state, "action": action, "todo": todo,
            "groups": groups, "notes": fit.notes if fit else [], "forecast": outlook,
            "parameters": executor_parameters(kind, sweep, launcher, profile), "jobs": []}


def print_summary(plan: dict, out) -> None:
    sweep, groups, todo = plan["sweep"], plan["groups"], plan["todo"]
    n_done = sum(v == sched.DONE for v in plan["state"].values())
    n_corrupt = sum(v == sched.CORRUPT for v in plan["state"].values())
    n_flying = len(sweep.runs) - n_done - n_corrupt - len(todo)
    print(f"sweep {sweep.spec} -> {sweep.out}", file=out)
    print(f"{len(sweep.runs)} runs over {', '.join(sweep.axes)}: {n_done} complete, "
          f"{n_flying} in flight, {len(todo)} to run in "
          f"{len(groups)} job(s) of up to {max((len(g) for g in groups), default=0)} run(s)"
          + (f"; {n_corrupt} corrupt, left alone" if n_corrupt else ""), file=out)
    for r in sweep.runs:
        if plan["state"][r.run_id] == sched.CORRUPT:
            print(f"  {r.run_id} is corrupt: {sched.read_dir(RunDir(r.dir)).error}", file=out)
    for note in plan.get("notes", ()):
        print(note, file=out)
    if plan.get("forecast") is not None and groups:
        for line in plan["forecast"].lines(groups) + idle_gpus_note(plan) + time_note(plan):
            print(line, file=out)


def time_note(plan: dict) -> list[str]:
    """A line where the longest job is predicted to outlast its time limit (it times out and
    resumes, at most max_timeouts times)."""
    launcher, longest = plan["launcher"], max(plan["forecast"].job_seconds, default=0) / 60
    limit = launcher.time or DEFAULT_TIME_MIN
    if longest <= limit:
        return []
    return [f"  note: the longest job is predicted to take {longest:.0f} min, over launcher.time "
            f"({limit} min): it times out and resumes, at most launcher.max_timeouts "
            f"({launcher.max_timeouts}) times"]


def idle_gpus_note(plan: dict) -> list[str]:
    """A line where the partition's cap on running jobs leaves GPUs a user may hold idle, with
    the ``gpus`` per job that would hold more of them."""
    launcher, profile, groups = plan["launcher"], plan["profile"], plan["groups"]
    part = profile.partition(launcher.partition) if profile and launcher.partition else None
    gpus, width = launcher.gpus or 0, launcher.array_parallelism or 0
    if (plan["executor"] != "slurm" or part is None or part.max_gpus is None or gpus < 1
            or part.max_running is None or width < part.max_running or len(groups) < width):
        return []
    held = width * gpus
    better = next((g for g in range(gpus + 1, part.max_gpus + 1)
                   if min(part.max_running, part.max_gpus // g) * g > held), None)
    if better is None:
        return []
    more = min(part.max_running, part.max_gpus // better) * better
    return [f"  note: {width} jobs x {gpus} GPU(s) hold {held} of the {part.max_gpus} GPUs per "
            f"user on {part.name}; launcher.gpus: {better} would hold {more}"]


def print_dry_run(plan: dict, out) -> None:
    """The runs table, the executor and partition, the submitit parameters and, for SLURM, the
    sbatch script header of the first array."""
    sweep, launcher, profile, params = (plan["sweep"], plan["launcher"], plan["profile"],
                                        plan["parameters"])
    print(runs_table(sweep, plan["state"], plan["action"]), file=out)
    print(f"\nexecutor: {plan['executor']}" + (f", cluster {profile.name} ({profile.path})"
                                               if profile else ""), file=out)
    part = profile.partition(launcher.partition) if profile and launcher.partition else None
    if part:
        print(f"partition {part.name}: {partition_limits(part)}"
              + (", preemptable (jobs requeue and resume)" if part.preemptable else ""),
              file=out)
    wandb = wandb_settings(plan)
    if wandb:
        print(f"W&B: project {wandb.project}, group {wandb.group}, {wandb.mode}", file=out)
    print("submitit parameters:", file=out)
    for k in sorted(params):
        print(f"  {k} = {params[k]!r}", file=out)
    if plan["executor"] == "slurm":
        print(f"  slurm_max_num_timeout = {launcher.max_timeouts!r}", file=out)
        arrays = chunks(plan["groups"], array_size(dry_run=True)) or [[]]
        n0 = len(arrays[0])
        print("sbatch script header " + (f"({len(arrays)} array(s), the first of {n0} tasks):"
                                         if n0 > 1 else "(a single job, no array):"), file=out)
        try:
            print(sbatch_preview(params, sweep.out / JOBS_DIR, max(1, n0)), file=out)
        except Exception as e:  # the preview uses submitit internals
            print(f"  (preview unavailable: {type(e).__name__}: {e})", file=out)
    if plan["executor"] == "slurm" and plan["groups"]:
        print_aggregation_preview(plan, out)
    if not plan["groups"]:
        from .aggregate import stale_tables

        why = stale_tables(sweep.out)
        if why:
            print(f"nothing to train; the sweep's tables are {why}: a launch aggregates it",
                  file=out)
    print("dry run: nothing written, nothing submitted", file=out)


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


def submit(plan: dict, out) -> None:
    """Write the manifest and the run directories' config.json, then submit the jobs (SLURM:
    arrays below MaxArraySize, returning at once; locally: run them here)."""
    sweep, launcher, kind, groups = (plan["sweep"], plan["launcher"], plan["executor"],
                                     plan["groups"])
    sweep.out.mkdir(parents=True, exist_ok=True)
    record = LaunchRecord(plan)
    record.write()
    if not groups:
        print("nothing to submit", file=out)
        aggregate_if_stale(plan, record, out)
        return
    for r in plan["todo"]:   # config.json up front: status can name every run from its directory
        RunDir(r.dir).create({**to_dict(r.config), "run_id": r.run_id})
    kwargs = {"slurm_max_num_timeout": launcher.max_timeouts} if kind == "slurm" else {}
    ex = submitit.AutoExecutor(folder=sweep.out / JOBS_DIR / "%j", cluster=kind, **kwargs)
    ex.update_parameters(**plan["parameters"])
    threads = None if kind == "slurm" else local_threads(launcher)
    wandb = wandb_settings(plan)
    line = plan["lifeline"] = lifelines.hold(sweep.out / JOBS_DIR) if kind == "local" else None
    fns = [SweepJob([(to_dict(r.config), str(r.dir)) for r in g], threads, launcher.gpus or 0,
                    wandb and wandb.to_dict(), launcher.state_every * 60,
                    str(line.path) if line else None) for g in groups]
    if wandb and wandb.mode == "offline":
        tracking.announce("W&B runs are written offline; after the jobs, upload them with: "
                          + tracking.sync_command(sweep.out / "runs" / "*" / "wandb" /
                                                  "offline-run-*"), file=out, always=True)
    record.open()
    if kind == "slurm":
        submit_arrays(ex, fns, plan, record, out)
        return
    try:
        run_locally(ex, fns, groups, plan, record.add, launcher, out)
    finally:
        if line is not None:
            line.release()
    aggregate_here(sweep, out)


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


# ---- the aggregation job --------------------------------------------------------------------
AGGREGATE_TIME_MIN = 60
AGGREGATE_MEM_GB = 4


class AggregateJob(submitit.helpers.Checkpointable):
    """The job that aggregates a sweep once its arrays have ended, as ``python -m
    grokhpc.aggregate SWEEP_DIR`` does: tables and figures. Requeued, it simply runs again
    (aggregation rereads only what changed)."""

    def __init__(self, sweep_dir: str | os.PathLike):
        self.sweep_dir = str(sweep_dir)

    def __call__(self) -> int:
        from .aggregate import main as aggregate_main

        print(f"python -m grokhpc.aggregate {self.sweep_dir}", flush=True)
        code = aggregate_main([self.sweep_dir])
        if code:
            raise RuntimeError(f"python -m grokhpc.aggregate {self.sweep_dir} exited {code}")
        return code


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
        print(f"warning: aggregation job not submitted ({_last_line(str(e))}); aggregate by "
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
    from .aggregate import stale_tables

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
    from .aggregate import aggregate

    try:
        res = aggregate([sweep.out], log=lambda m: print(m, file=out))
    except Exception as e:
        print(f"aggregation failed ({type(e).__name__}: {_last_line(str(e))}); rerun: "
              f"python -m grokhpc.aggregate {sweep.out}", file=out)
        return
    figures = sorted({p.parent for ps in res.figures.values() for p in ps})
    print(f"aggregated {res.n_runs} runs: tables in {res.out_dir}"
          + (f", figures in {', '.join(map(str, figures))}" if figures else ""), file=out)


def launch(spec: str, executor: str | None = None, cluster: str | None = None,
           overrides: Sequence[str] = (), dry_run: bool = False,
           out=None) -> dict:
    """Expand, plan and (unless dry_run) submit. Returns the plan with the submitted jobs."""
    out = out if out is not None else sys.stdout
    plan = make_plan(spec, executor, cluster, overrides, dry_run, out)
    print_summary(plan, out)
    if dry_run:
        print_dry_run(plan, out)
    else:
        submit(plan, out)
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
        bar.close()
        stop_local_jobs([job for job, _ in running], plan.get("lifeline"))
        raise
    finally:
        bar.close()
    report(plan["sweep"], failures, out)


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
        print(f"  failed job: {cut_text(f)}", file=out)
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
    except KeyboardInterrupt:
        print("interrupted: launch the same command again to resume", file=sys.stderr)
        return 130
    if plan["executor"] in ("local", "debug") and not args.dry_run:
        return 0 if all(RunDir(r.dir).is_complete() for r in plan["sweep"].runs) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
