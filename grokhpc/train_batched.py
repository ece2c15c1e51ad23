"""Train a group of same-shaped runs in one process, as one stacked computation (the training
stage of a packed job).

``python -m grokhpc.train_batched RUN_DIR ...`` (run directories with their config.json, as
the launcher writes them) or ``train_group(cfgs, out_dirs, settings)``.

``train_group`` trains R runs that share the fields of ``config.shape_fields`` (the shapes, the
commit schedule, the optimiser's kind and the minibatch schedule) and may differ in everything
else (seeds, train_frac for full-batch runs, lr, weight_decay, betas, momentum, warmup and lr
schedule, init_scale, fixed_weight_norm, label_noise, stop_after_grok). Each run keeps its own
``grokhpc.train.Trainer`` (its state and files); the runs are stacked in a
``grokhpc.stack.Stack`` (exact on CPU: bit-identical to solo runs; batched on GPUs) and trained
by the one loop of ``grokhpc.loop``, the solo run's. So each run's directory ends up exactly as
``grokhpc.train.run_training`` leaves it -- same files, same ``state.pt`` contents -- and a
solo ``run_training`` can resume a packed run and ``train_group`` a solo one.

Early stop: a ``stop_after_grok`` run that reaches its stop epoch is evaluated and committed
there and finished (measures, summary) as a solo run would be; the others' state is synced
into their trainers and restacked without it, so the group shrinks as its runs finish -- unless
``refill`` gives it waiting runs of its sweep (grokhpc.refill), which catch up to the group's
epoch on their own and then join it.

Epoch alignment on resume: all runs of a group commit at the same epochs (same checkpoint_every
and n_epochs), so they normally resume at the same epoch. When a kill lands between two runs'
commits (or a run was advanced alone), the runs at the lowest epoch are stacked on their own
and trained up to the next epoch some other run sits at -- a commit epoch for both -- and
then the groups merge. Nothing is rolled back; every run goes on exactly from its own state.

Divergence (grokhpc.divergence): a run that goes non-finite is marked at its next commit, its
directory keeps its last finite commit, and the others go on without it. A later
``train_group`` call skips runs marked diverged (training is deterministic, they would diverge
again) unless ``retry_diverged=True``.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path
from typing import Callable, Sequence

from . import preempt
from .config import ConfigError, RunConfig, load_json, shape_fields
from .divergence import RunDiverged, clear_diverged, is_diverged
from .loop import fit_stack
from .runtime import DEFAULT_STATE_EVERY_S, STEP_MODES, JobSettings, matmul_precision, resolve_device
from .stack import Stack
from .step_mode import resolve
from .store import CONFIG, ERROR, RunDir, RunDirError, RunLockedError
from .train import Trainer, minutes_arg


class GroupError(ValueError):
    """Runs that cannot be trained as one group (shapes differ, duplicate runs or directories)."""


def check_group(cfgs: Sequence[RunConfig], out_dirs: Sequence) -> None:
    """Raise GroupError unless ``cfgs`` can be stacked and each has its own directory."""
    if len(cfgs) == 0:
        raise GroupError("train_group: expected at least one run, got none")
    if len(cfgs) != len(out_dirs):
        raise GroupError(f"train_group: {len(cfgs)} configs but {len(out_dirs)} out_dirs")
    first = cfgs[0]
    for i, cfg in enumerate(cfgs):
        for key in shape_fields(first):
            if getattr(cfg, key) != getattr(first, key):
                raise GroupError(
                    f"train_group: {key}: expected the same value in every run of a group, "
                    f"got {getattr(first, key)!r} (run 0, {first.run_id}) and "
                    f"{getattr(cfg, key)!r} (run {i}, {cfg.run_id})")
    ids = [c.run_id for c in cfgs]
    if len(set(ids)) != len(ids):
        dup = next(x for x in ids if ids.count(x) > 1)
        raise GroupError(f"train_group: run {dup} appears twice in one group")
    paths = [Path(d).resolve() for d in out_dirs]
    if len(set(paths)) != len(paths):
        dup = next(x for x in paths if paths.count(x) > 1)
        raise GroupError(f"train_group: out_dirs: {dup} is given to two runs")


def _finish(t, log) -> None:
    """The run's ``finish`` (measures, summary, done); a failure goes to its error.txt."""
    try:
        t.finish()
    except Exception:
        t.run.write_error(traceback.format_exc())
        log(f"run {t.cfg.run_id}: finishing failed; see {t.run.file(ERROR)}")
        return
    t.run.clear_error()


def _train_all(trainers: list, settings: JobSettings, dev, exact, background: bool, bar,
               log, more: Callable | None = None, slots: int = 0) -> tuple[list, list]:
    """Train ``trainers`` to their last epochs, the lowest-epoch runs stacked first; finish each
    run that stops early as soon as it does. ``more(n)``: up to n more opened trainers, asked
    whenever fewer than ``slots`` runs, but some, are active; they join ``trainers`` (catching
    up to the others' epoch first, as on resume). Returns (diverged, finished) trainers."""
    n_epochs = trainers[0].cfg.n_epochs
    active = [t for t in trainers if t.epoch < t.stop_epoch()]
    diverged: list = []
    finished: list = []
    while True:
        if more is not None and 0 < len(active) < slots:   # while the group trains
            new = more(slots - len(active))
            trainers += new
            active += [t for t in new if t.epoch < t.stop_epoch()]
            if bar is not None and new:
                bar.total += sum(t.cfg.n_epochs - t.epoch for t in new)
        if not active:
            break
        low = min(t.epoch for t in active)
        lag = [t for t in active if t.epoch == low]
        ahead = sorted({t.epoch for t in active if t.epoch > low})
        target = ahead[0] if ahead else n_epochs
        if ahead:
            log(f"{len(lag)} run(s) at epoch {low} catch up to epoch {target} first")
        stack = Stack(lag, dev, exact=exact, step_mode=settings.step_mode, log=log)
        try:
            with preempt.armed():
                dropped, done = fit_stack(stack, target, bar, log, background=background)
        except SystemExit:
            raise   # a requeue after SLURM's warning: every run's state is written
        except BaseException:
            tb = traceback.format_exc()
            for t in lag:
                t.run.write_error(tb)
            raise
        del stack
        diverged += [t for t, _ in dropped]
        for t in done:   # complete at its own last epoch, as a solo run leaves it
            if t.epoch < n_epochs:
                log(f"run {t.cfg.run_id}: stopped at epoch {t.epoch} ({t.cfg.stop_after_grok}"
                    f" epochs after grokking at {t.grok_epoch}); the others go on")
            _finish(t, log)
            finished.append(t)
        active = [t for t in active if t.epoch < t.stop_epoch() and t not in diverged]
    return diverged, finished


def train_group(cfgs: Sequence[RunConfig], out_dirs: Sequence,
                settings: JobSettings | None = None, device=None, progress_bar: bool = True,
                log: Callable = print, retry_diverged: bool = False, exact: bool | None = None,
                background_commits: bool | None = None, refill: Callable | None = None,
                slots: int | None = None) -> list[RunDir]:
    """Train ``cfgs`` into ``out_dirs`` as one stacked computation; resumes each run from its
    own state; returns each run's RunDir (in order). Complete runs are left alone; a run that
    diverges is marked failed (error.txt) and the others go on. Raises GroupError for runs
    that cannot be stacked, RunDirError for a directory holding another run (before any
    training), and re-raises a failure of the stacked computation after writing error.txt into
    every run it was training.

    ``settings``: the job's (``runtime.JobSettings``; None: the defaults): how often each run's
    state.pt is written, W&B, and ``step_mode`` (batched mode): eager, fused, graph or compile
    -- how the step is issued to the device (``grokhpc.step_mode``; $GROKHPC_STEP_MODE
    overrides it, saying so in one line).

    ``exact``: run each run's forward with the solo code, one run after another, on views of
    the stacked weights (bit-identical to solo runs; the default on CPU), or as one batched
    computation over all runs (the default on GPUs). The optimiser step, evaluation
    bookkeeping and commits are stacked either way.

    ``background_commits`` (default: on for GPUs): a commit's file writes (checkpoint rows,
    state.pt, progress, curves of every run) overlap the next epochs' training in a thread;
    each commit still completes before the next one starts and before this returns.

    ``refill(n, taken)``: while fewer than ``slots`` (default: len(cfgs)) runs train, but some
    do (a group that ends as a whole ends there), up to n more runs of the group's shape as
    [(RunConfig, directory)], each locked by this process and none of ``taken`` (the run ids
    the group has had); they are opened and trained with the others (grokhpc.refill). The
    returned RunDirs are ``cfgs``' only. With ``refill``, a run of ``cfgs`` that another
    process trains (another job's refill may have claimed it) is skipped with one line.

    Training runs at the group's ``matmul_precision`` (the process's own is restored after).
    """
    import torch

    cfgs = list(cfgs)
    out_dirs = [Path(d) for d in out_dirs]
    check_group(cfgs, out_dirs)
    runs = [RunDir(d) for d in out_dirs]
    _refuse_foreign_dirs(cfgs, runs)
    dev = resolve_device(device if device is not None else cfgs[0].device) \
        if not isinstance(device, torch.device) else device
    exact = (dev.type == "cpu") if exact is None else bool(exact)
    background = (dev.type != "cpu") if background_commits is None else bool(background_commits)
    settings = _resolved(settings or JobSettings(), cfgs[0], dev, exact, log)
    with matmul_precision(cfgs[0].matmul_precision):   # recorded in each attempt's provenance
        trainers = _open_unfinished(cfgs, runs, dev, settings, retry_diverged, log,
                                    skip_locked=refill is not None)
        if not trainers:
            return runs
        more = None if refill is None else _opener(refill, trainers, dev, settings, log)
        bar = _run_epochs_bar(trainers) if progress_bar else None
        try:
            diverged, finished = _train_all(trainers, settings, dev, exact, background, bar, log,
                                            more, len(cfgs) if slots is None else slots)
        finally:
            if bar is not None:
                bar.close()
    for t in trainers:   # runs that were already at their last epoch when opened
        if t.epoch < t.stop_epoch() or any(t is d for d in diverged + finished):
            continue
        _finish(t, log)
    for t in trainers:   # each run's lock (on an exception, the trainers' end lets them go)
        t.close()
    return runs


def _opener(refill: Callable, trainers: list, dev, settings: JobSettings, log) -> Callable:
    """``more(n)`` of ``_train_all``: the runs ``refill`` claims, opened (resumed where they
    have state), none the group has had before."""
    shape = trainers[0].cfg

    def more(n: int) -> list:
        taken = {t.cfg.run_id for t in trainers}
        claimed = [(c, RunDir(d)) for c, d in refill(n, taken)]
        claimed = [(c, r) for c, r in claimed if c.run_id not in taken]
        check_group([shape] + [c for c, _ in claimed],
                    [trainers[0].run.path] + [r.path for _, r in claimed])
        if claimed:
            log(f"refill: {len(claimed)} waiting run(s) of the sweep take freed slots: "
                + ", ".join(c.run_id for c, _ in claimed))
        opened = []
        for c, r in claimed:   # a run that cannot be opened is its own failure, not the group's
            try:
                opened += _open_unfinished([c], [r], dev, settings, False, log, True)
            except Exception:
                r.write_error(traceback.format_exc())
                log(f"run {c.run_id}: opening it failed; see {r.file(ERROR)}")
        return opened
    return more


def _run_epochs_bar(trainers: list):
    """A progress bar over the run-epochs left to train."""
    from tqdm.auto import tqdm

    return tqdm(total=sum(t.cfg.n_epochs - t.epoch for t in trainers), unit="run-epoch",
                desc=f"{len(trainers)} runs", dynamic_ncols=True, mininterval=1.0)


def _resolved(settings: JobSettings, cfg: RunConfig, dev, exact: bool, log) -> JobSettings:
    """The settings with the step mode the group trains with (``grokhpc.step_mode.resolve``:
    $GROKHPC_STEP_MODE, then what applies here); GroupError naming the environment variable
    for a word that is no mode."""
    try:
        return settings.replace(step_mode=resolve(settings.step_mode, cfg, dev, exact, log))
    except ValueError as e:
        raise GroupError(f"train_group: {e}") from None


def _refuse_foreign_dirs(cfgs: list, runs: list) -> None:
    """RunDirError for a directory that holds another run, before anything is touched."""
    for cfg, run in zip(cfgs, runs):
        if run.exists() and run.read_config().get("run_id") != cfg.run_id:
            raise RunDirError(f"{run.file(CONFIG)}: holds run "
                              f"{run.read_config().get('run_id')}, not {cfg.run_id}; "
                              "use another directory")


def _open_unfinished(cfgs: list, runs: list, dev, settings: JobSettings, retry_diverged: bool,
                     log, skip_locked: bool = False) -> list:
    """A Trainer (new or resumed) for each run still to train; complete runs, runs marked
    diverged (unless ``retry_diverged``), new runs whose weights are not finite and, with
    ``skip_locked`` (a refilling sweep's group: another job may have claimed a run), runs
    another process trains are left alone with one line each."""
    trainers = []
    for cfg, run in zip(cfgs, runs):
        if run.exists() and run.is_complete():
            prog = run.read_progress()
            log(f"run {cfg.run_id} in {run.path} is already complete "
                f"({prog['epoch']}/{prog['n_epochs']} epochs); nothing to do")
            continue
        if run.exists() and is_diverged(run) and not retry_diverged:
            log(f"run {cfg.run_id} in {run.path} diverged before (see {ERROR}); skipped")
            continue
        try:
            t = Trainer.open(cfg, run.path, dev, settings)
        except RunDiverged as e:
            log(f"{e}; the others go on")
            continue
        except RunLockedError as e:
            if not skip_locked:
                raise
            log(f"run {cfg.run_id} skipped, nothing written: {e}")
            continue
        clear_diverged(run)   # trained again (retry_diverged): a new divergence marks anew
        if t.epoch > 0:
            log(f"run {cfg.run_id}: resuming at epoch {t.epoch}/{cfg.n_epochs}")
        trainers.append(t)
    return trainers


# ---- command line ------------------------------------------------------------------------------
def configs_from_dirs(dirs: Sequence) -> list[RunConfig]:
    """The RunConfig of each run directory's config.json (as the launcher writes them)."""
    cfgs = []
    for d in dirs:
        run = RunDir(d)
        if not run.exists():
            raise RunDirError(f"{run.path}: not a run directory (no {CONFIG})")
        cfgs.append(load_json(run.file(CONFIG)))
    return cfgs


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m grokhpc.train_batched",
        description="Train the runs of existing run directories (each with its config.json) "
                    "as one stacked group; resumes each from its own state.")
    ap.add_argument("run_dirs", nargs="+", help="run directories of same-shaped runs")
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: the runs' own)")
    ap.add_argument("--mode", choices=("auto", "exact", "batched"), default="auto",
                    help="exact: solo forward run by run (bit-identical to solo runs); "
                         "batched: one batched computation; auto: exact on CPU, else batched")
    ap.add_argument("--step-mode", choices=STEP_MODES, default="eager",
                    help="batched mode: how each step is issued (default: eager; "
                         "$GROKHPC_STEP_MODE overrides it, saying so); fused: Adam(W) over one "
                         "flat buffer; graph: fused, the step captured in a CUDA graph; "
                         "compile: fused, with torch.compile")
    ap.add_argument("--retry-diverged", action="store_true",
                    help="train runs marked diverged (error.txt) again")
    ap.add_argument("--state-every", type=minutes_arg, default=DEFAULT_STATE_EVERY_S / 60,
                    metavar="MINUTES",
                    help="minutes between writes of each run's resumable state.pt (default "
                         "%(default)g; 0: with every checkpoint row); also on SIGUSR2 and at "
                         "each run's end")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfgs = configs_from_dirs(args.run_dirs)
        settings = JobSettings(state_every_s=args.state_every * 60, step_mode=args.step_mode)
        runs = train_group(cfgs, args.run_dirs, settings, device=args.device,
                           progress_bar=not args.no_progress,
                           retry_diverged=args.retry_diverged,
                           exact=None if args.mode == "auto" else args.mode == "exact")
    except (ConfigError, RunDirError, GroupError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    failed = [r for r in runs if r.read_error() is not None]
    for r in failed:
        print(f"error: {r.path}: {r.read_error().splitlines()[0]}", file=sys.stderr)
    return 1 if failed else 0


__all__ = ["train_group", "check_group", "GroupError", "configs_from_dirs", "main"]


if __name__ == "__main__":
    sys.exit(main())
