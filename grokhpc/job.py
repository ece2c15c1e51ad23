"""What runs inside a job (jobs stage): a scheduler job trains its runs, or aggregates a sweep.

``SweepJob`` is the function submitit pickles for each job of a sweep: it trains the job's runs
(``train_runs``: one packed group when they share a shape, else one by one; a run that fails
leaves its error.txt and the others go on; a packed group whose runs stop early takes waiting
runs of its shape from the sweep, grokhpc.refill), or, for a job of several GPUs, one group per GPU,
each in a process of its own (``train_on_devices``). Preempted or timed out, submitit calls its
``checkpoint()`` and requeues it; every run resumes from its run directory. A local launch's
jobs end with the launch (grokhpc.lifeline). ``AggregateJob`` is the small CPU job that
aggregates the sweep once its arrays have ended.

A job's settings beyond its runs (state.pt interval, step mode, torch threads, W&B) travel as
one ``grokhpc.runtime.JobSettings``, from the spec's ``launcher:`` to the trainers;
``$GROKHPC_STEP_MODE``, where set, overrides its step mode and says so in the job's log. A
setting that makes no sense fails the job in one line before anything trains
(``checked_settings``), never runs trained one by one with the error only in the log.

torch is imported only by the trainers, inside the job.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
import traceback
from typing import Any, Callable, Sequence

import submitit

from . import lifeline as lifelines
from . import tracking
from .aggregate import main as aggregate_main
from .config import from_dict
from .plan import shape_key, split_even
from .refill import SweepRefill
from .runtime import JobSettings
from .step_mode import requested
from .store import RunDir, RunDirError, RunLockedError
from .train import run_training
from .train_batched import train_group



def _record_error(out_dir: str, text: str) -> None:
    """Write error.txt if the run directory can take it (it may be the thing that failed)."""
    run = RunDir(out_dir)
    try:
        if run.path.is_dir() and not run.read_error():
            run.write_error(text)
    except (OSError, RunDirError):
        pass


def last_line(text: str) -> str:
    """The last non-blank line of ``text`` (an exception's message, a traceback), stripped."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


# ---- one group of runs ------------------------------------------------------------------------
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


def train_runs(runs: Sequence[tuple[dict, str]], settings: JobSettings = JobSettings(),
               log: Callable[[str], Any] = print) -> list[dict]:
    """Train a job's runs: [(RunConfig dict, run directory), ...], as ``settings`` say. One run
    failing does not stop the others; afterwards the job raises if any run failed (so the
    scheduler marks it failed). A bad setting is a ConfigError before anything trains."""
    settings = checked_settings(settings, log)
    _set_threads(settings.threads)
    cfgs = [from_dict(c, source=f"{d}: config") for c, d in runs]
    dirs = [str(d) for _, d in runs]
    todo = [(c, d) for c, d in zip(cfgs, dirs) if not RunDir(d).is_complete()]
    errors: dict[str, str] = {}
    packed = len(cfgs) > 1 and len({shape_key(c) for c in cfgs}) == 1   # planned as a group
    refill = SweepRefill.for_job(cfgs, dirs, log) if packed and settings.refill else None
    one_shape = len({shape_key(c) for c, _ in todo}) == 1
    if (len(todo) > 1 and one_shape) or (todo and refill is not None):
        log(f"training {len(todo)} runs together: {', '.join(c.run_id for c, _ in todo)}")
        try:
            train_group([c for c, _ in todo], [d for _, d in todo], settings,
                        progress_bar=False, log=log, refill=refill, slots=len(cfgs))
        except Exception:
            log("batched training failed; training the unfinished runs one by one:\n"
                + traceback.format_exc())
        finally:
            if refill is not None:
                refill.release()
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
            errors[cfg.run_id] = last_line(text)
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


def _train_on_device(runs: Sequence[tuple[dict, str]], device: str,
                     settings: JobSettings) -> None:
    """One group of a several-GPU job, in its own process, seeing only ``device`` ("cpu" or
    "cpu:N": no GPU, the CPU). USR2 (SLURM's warning, passed on by the job's process) writes
    the runs' state, then ends this process."""
    signal.signal(signal.SIGUSR2, signal.SIG_DFL)
    on_cpu = device == "cpu" or str(device).startswith("cpu:")
    os.environ["CUDA_VISIBLE_DEVICES"] = "" if on_cpu else str(device)
    if not on_cpu:   # the one GPU this process sees is cuda:0, whichever a run's config names
        runs = [({**c, "device": "cuda"} if str(c.get("device", "")).startswith("cuda:") else c,
                 d) for c, d in runs]
    train_runs(runs, settings=settings,
               log=lambda m: print(f"[device {device}] {m}", flush=True))


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
                     settings: JobSettings = JobSettings(), log: Callable[[str], Any] = print,
                     worker: Callable | None = None) -> list[dict]:
    """Train a job's runs as one group per device (split_even, in order), all at once, each
    group in its own process that sees only its device and trains and resumes as a one-GPU job
    does (``train_runs``), on its share of the job's threads. A group that fails leaves
    error.txt in its unfinished runs (written here for a process that died without one, unless
    SLURM interrupted it) and the others go on; afterwards the job raises if any run failed."""
    groups = split_even(list(runs), len(devices))
    ctx = multiprocessing.get_context("spawn")
    share = settings.replace(threads=max(1, (settings.threads or _job_cpus()) // len(groups)))
    procs = []
    for group, dev in zip(groups, devices):
        log(f"device {dev}: {len(group)} run(s)")
        proc = ctx.Process(target=worker or _train_on_device,
                           args=(group, dev, share), daemon=True)
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
            errors[ids[str(d)]] = (last_line(RunDir(d).read_error() or "")
                                   or f"interrupted: device {dev} {ended}")
    return job_results(list(ids.values()), list(ids), errors)


def checked_settings(settings: JobSettings, log: Callable[[str], Any]) -> JobSettings:
    """The job's settings with $GROKHPC_STEP_MODE applied, every one checked (an unpickled
    JobSettings was never validated): a one-line ConfigError before anything trains."""
    settings.check("the job's settings")
    settings = step_mode_override(settings, log)
    if settings.wandb is not None:
        tracking.parse_wandb(dict(settings.wandb), "the job's settings", "wandb")
    return settings


def step_mode_override(settings: JobSettings, log: Callable[[str], Any]) -> JobSettings:
    """``settings`` with $GROKHPC_STEP_MODE's step mode where it is set (grokhpc.step_mode's
    rule: one line says so); a word that is no step mode is a one-line ConfigError, before
    anything trains."""
    return settings.replace(step_mode=requested(settings.step_mode, log,
                                                "the spec's launcher.step_mode"))


class SweepJob(submitit.helpers.Checkpointable):
    """One scheduler job: trains its runs on ``gpus`` GPUs (one group of them per GPU) as
    ``settings`` say. Preempted or timed out, submitit calls ``checkpoint()`` and requeues the
    same job, which resumes every run from its run directory (``state.pt``)."""

    def __init__(self, runs: Sequence[tuple[dict, str]], settings: JobSettings = JobSettings(),
                 gpus: int = 0, lifeline: str | None = None):
        self.runs = [(dict(c), str(d)) for c, d in runs]
        self.settings = settings
        self.gpus = gpus
        self.lifeline = lifeline   # a local launch's lifeline file: the job ends with the launch
        self.orphaned = False

    def __call__(self) -> list[dict]:
        env = submitit.JobEnvironment() if os.environ.get("SUBMITIT_EXECUTOR") else None
        if env is not None:
            print(f"job {env.job_id} on {env.hostname}: {len(self.runs)} run(s)", flush=True)
        log = lambda m: print(m, flush=True)  # noqa: E731
        settings = checked_settings(self.settings, log)
        if self.lifeline:
            lifelines.watch(self.lifeline, self.launch_ended)
        devices = job_devices(self.gpus) if self.gpus > 1 else []
        if len(devices) > 1 and len(self.runs) > 1:
            if len(devices) < self.gpus:
                log(f"{len(devices)} of the job's {self.gpus} GPUs are visible; using those")
            return train_on_devices(self.runs, devices, settings, log=log)
        return train_runs(self.runs, settings, log=log)

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
        if self.orphaned:
            print("the runs' state is written; launch again to resume them", flush=True)
            raise SystemExit(1)
        print("checkpoint: requeueing; runs resume from their last state", flush=True)
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


# ---- the aggregation job ---------------------------------------------------------------------
class AggregateJob(submitit.helpers.Checkpointable):
    """The job that aggregates a sweep once its arrays have ended, as ``python -m
    grokhpc.aggregate SWEEP_DIR`` does: tables and figures. Requeued, it simply runs again
    (aggregation rereads only what changed)."""

    def __init__(self, sweep_dir: str | os.PathLike):
        self.sweep_dir = str(sweep_dir)

    def __call__(self) -> int:
        print(f"python -m grokhpc.aggregate {self.sweep_dir}", flush=True)
        code = aggregate_main([self.sweep_dir])
        if code:
            raise RuntimeError(f"python -m grokhpc.aggregate {self.sweep_dir} exited {code}")
        return code


__all__ = ["SweepJob", "AggregateJob", "train_runs", "train_on_devices", "job_devices",
           "stop_groups", "job_results", "step_mode_override", "checked_settings", "last_line"]
