"""Launch a sweep (the command at the top): expand the spec, plan the jobs, print the plan or
submit it. ``python -m grokhpc.launch SPEC [--dry-run] [--executor auto|slurm|local|debug]
[--cluster NAME] [--set key=value ...]``

One run, top to bottom: the spec is expanded into runs (grokhpc.sweep; each run lives in
``OUT/runs/<run_id>``) and its launcher settings are filled in and checked against the cluster
profile, which picks the GPU type and partition from the spec's preferences (grokhpc.clusters;
a closed cluster or reserved partition is one note line); the runs are packed into jobs and, on GPUs, the plan's wall time
and GPU-hours forecast (grokhpc.plan); the jobs are submitted (grokhpc.submit); each job trains
its runs (grokhpc.job -> grokhpc.train_batched / grokhpc.train); the sweep is aggregated into
tables and figures (grokhpc.aggregate).

* ``OUT/manifest.json`` records the spec, its runs and axes, the launcher settings and, per
  launch, the submitted job ids and the runs each job trains. It is rewritten atomically.
* Runs already done are skipped, and so are runs whose job from an earlier launch is still
  queued or running, so launching twice never trains a run twice; a corrupt run (a file that
  cannot be read) is listed and left alone. Run states and the manifest are grokhpc.scheduler's.
* Runs are packed into jobs by shape (``runs_per_job``); a job trains its runs as one packed
  group when it has more than one, else one by one. ``runs_per_job: auto`` on a GPU type with
  a throughput table sizes the jobs for the soonest finish of the sweep within the partition's
  caps; every GPU plan's predicted wall time and GPU-hours are printed. ``gpus: N``: a job
  trains N groups of its runs at once, one per GPU, each in its own process. A packed job
  whose runs stop after grokking takes waiting runs into the freed slots (``refill``,
  grokhpc.refill); the dry run says so where runs wait. Runs on device cpu ask for no GPU.
* ``auto`` executor: SLURM when its controller answers (``scontrol ping``), else local. On SLURM the jobs form one
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
import shutil
import sys
from typing import Any, Sequence

import submitit

from . import scheduler as sched
from . import tracking
from .aggregate import stale_tables
from .clusters import (DEFAULT_ARRAY_PARALLELISM, ClusterProfile, access_notes, fit_partition,
                       load_profile, partition_limits, resolve_launcher)
from .config import GROK_ACC, ConfigError
from .job import last_line
from .plan import launch_parallelism, plan_jobs
from .scheduler import (DEFAULT_MAX_ARRAY, JOBS_DIR, MANIFEST, chunks, controller_answers,
                        max_array_size, sbatch_preview)
from .store import CONFIG, RunDir, RunDirError
from .submit import (DEFAULT_TIME_MIN, aggregate_here, executor_parameters,
                     print_aggregation_preview, submit, wandb_settings)
from .sweep import LauncherSettings, Sweep, SweepRun, cut_text, load_sweep, shown


# ---- planning -------------------------------------------------------------------------------
def resolve_executor(name: str, dry_run: bool = False, cluster: str | None = None) -> str:
    """``auto``: SLURM when its controller answers (or for a named cluster's dry run), else
    local. sbatch on PATH with no controller behind it runs locally, saying so on stderr."""
    if name != "auto":
        return name
    if dry_run and cluster or controller_answers():
        return "slurm"
    if shutil.which("sbatch"):
        print("executor auto: sbatch is on PATH but no SLURM controller answers (scontrol "
              "ping): running here with the local executor (--executor slurm insists)",
              file=sys.stderr)
    return "local"


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
    launcher = sweep.launcher.replace(cluster=cluster)
    if launcher.gpus is None and all(r.config.device == "cpu" for r in sweep.runs):
        launcher = launcher.replace(gpus=0)   # runs on the CPU: no GPU from the profile
    launcher = resolve_launcher(launcher, profile, str(spec))
    kind = resolve_executor(executor or launcher.executor, dry_run, cluster)
    if kind not in ("slurm", "local", "debug"):
        raise ConfigError(f"--executor: expected auto, slurm, local or debug, got {kind!r}")
    if kind == "slurm" and not dry_run and not shutil.which("sbatch"):
        raise ConfigError("--executor: slurm: expected sbatch on PATH (no SLURM here); "
                          "use --executor local")
    if launcher.wandb:
        tracking.check_installed(f"{spec}: launcher.wandb")
    return sweep, launcher, profile, kind


def held_run_id(run: RunDir) -> str | None:
    """The run_id in a run directory's config.json; an unreadable config.json is a RunDirError
    naming it (the directory is never trained over)."""
    try:
        cfg = run.read_config()
    except ValueError as e:       # not UTF-8
        raise RunDirError(f"{run.file(CONFIG)}: unreadable ({e})") from None
    if not isinstance(cfg, dict):
        raise RunDirError(f"{run.file(CONFIG)}: expected a JSON object")
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
            "groups": groups, "forecast": outlook,
            "notes": access_notes(launcher, profile) + list(fit.notes if fit else ()),
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
    for line in refill_note(plan):
        print(line, file=out)


def refill_note(plan: dict) -> list[str]:
    """A line where packed jobs of runs that stop after grokking take the runs of jobs still
    waiting to start into the slots those free (launcher.refill, grokhpc.refill): those runs
    wait for no job of their own, and the jobs that take them run longer than planned."""
    groups, launcher = plan["groups"], plan["launcher"]
    waiting = len(groups) > launch_parallelism(plan["executor"], launcher, plan["profile"])
    if not (launcher.refill and waiting and any(len(g) > 1 for g in groups)
            and any(r.config.stop_after_grok is not None for g in groups for r in g)):
        return []
    return ["  refill: runs stop after grokking (stop_after_grok) and each packed job takes "
            "waiting runs of its shape into the slots they free (launcher.refill): those runs "
            "wait for no job of their own, but each first trains alone up to its group's "
            "epoch, so a job that takes runs lasts longer than planned"]


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
        why = stale_tables(sweep.out)
        if why:
            print(f"nothing to train; the sweep's tables are {why}: a launch aggregates it",
                  file=out)
    print("dry run: nothing written, nothing submitted", file=out)


def launch(spec: str, executor: str | None = None, cluster: str | None = None,
           overrides: Sequence[str] = (), dry_run: bool = False,
           out=None) -> dict:
    """Expand, plan and (unless dry_run) submit. Returns the plan with the submitted jobs."""
    out = out if out is not None else sys.stdout
    plan = make_plan(spec, executor, cluster, overrides, dry_run, out)
    print_summary(plan, out)
    if dry_run:
        print_dry_run(plan, out)
        return plan
    from .datasets import require_fetched   # before any job: a dataset not yet in the cache

    require_fetched({r.config.op for r in plan["sweep"].runs})
    failures = submit(plan, out)
    if failures is not None:   # the jobs ran here
        report(plan["sweep"], failures, out)
        aggregate_here(plan["sweep"], out)
    return plan


def report(sweep: Sweep, failures: list[str], out) -> None:
    """After a local launch: runs complete, those that grokked (and when), the failed jobs."""
    complete, grokked = 0, []
    for r in sweep.runs:
        run = RunDir(r.dir)
        if run.is_complete():
            complete += 1
            s = run.read_summary() or {}
            if s.get("grokked"):
                grokked.append((r, s.get("grokking_epoch")))
    print(f"{complete}/{len(sweep.runs)} runs complete, {len(grokked)} grokked "
          f"(test accuracy >= {GROK_ACC:.0%})", file=out)
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
                         "SLURM if its controller answers here, else local)")
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
        print(f"error: submission failed: {last_line(str(e))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: launch the same command again to resume", file=sys.stderr)
        return 130
    if plan["executor"] in ("local", "debug") and not args.dry_run:
        return 0 if all(RunDir(r.dir).is_complete() for r in plan["sweep"].runs) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
