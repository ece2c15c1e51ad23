"""The one epoch loop of training: a solo run (a stack of one) and a packed group alike.

``fit_stack`` trains a ``grokhpc.stack.Stack`` epoch by epoch and commits each run on the
solo schedule, through its own ``grokhpc.train.Trainer``:

* evaluation: the test split every ``eval_every`` epochs; test and train at a run's last epoch,
  also when it has just grokked its way there (``stop_after_grok``, :func:`epoch_end`);
* commits: a checkpoint row every ``checkpoint_every`` epochs and at a run's last epoch;
  state.pt when due (``Trainer.commit``), at a run's last epoch, on USR2, SIGTERM or SIGINT
  (every run's, at the next epoch, then the signal goes on: grokhpc.preempt) and, for a solo
  ``fit(until=...)``, where it stops. At each commit the stacked weights, optimiser moments
  and curves are copied into the runs' trainers (``Stack.sync``) and each trainer's own
  ``commit`` writes its directory, so the files are the solo ones by construction;
* divergence (grokhpc.divergence): checked at each commit before anything is written; a run
  that breaks the rule is marked and dropped, the others go on;
* a run that reaches its last epoch before the others (``stop_after_grok``) ends the call, so
  the caller can finish it and restack the rest.

Timing: ``wall_time_s`` of a packed run is the wall time of the group's training (each run
lived through all of it); a run's share of the device is ``wall_time_s / R``.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from . import preempt
from .divergence import mark_diverged
from .stack import Stack
from .store import ERROR


def epoch_end(stack: Stack) -> tuple[list[int], list[int]]:
    """After an epoch's steps, the evaluation of every run (test every ``eval_every`` epochs,
    with the softmax collapse of minibatch runs, whose step saw only part of the train split;
    test and train at a run's last epoch, also when it has just grokked its way there);
    returns (runs with a checkpoint row now, runs at their last epoch)."""
    cfg, e = stack.cfg, stack.epoch
    stops = stack.stop_epochs()
    last = [r for r in range(stack.R) if e == stops[r]]
    if e % cfg.eval_every == 0:   # minibatch runs: the collapse on the whole train split
        stack.evaluate(None, last, () if cfg.full_batch else range(stack.R))
    elif last:
        stack.evaluate(last, last)
    stops = stack.stop_epochs()
    just = [r for r in range(stack.R) if r not in last and e == stops[r]]   # grokked just now
    if just:
        stack.evaluate(just, just)
        last = sorted(last + just)
    rows = list(range(stack.R)) if e % cfg.checkpoint_every == 0 else last
    return rows, last


def commit_all(commits: list, max_workers: int = 8) -> None:
    """Each (trainer, checkpoint, state) as the trainer's ``commit``. The runs' files are
    independent, so their writes and fsyncs overlap in a few threads."""
    if len(commits) <= 1:
        for t, row, state in commits:
            t.commit(checkpoint=row, state=state)
        return
    with ThreadPoolExecutor(max_workers=min(max_workers, len(commits))) as pool:
        for f in [pool.submit(t.commit, checkpoint=row, state=state)
                  for t, row, state in commits]:
            f.result()


class Writer:
    """Where commits are written: here, or (``background``) in a thread while the stack trains
    on; each commit completes before the next starts (``wait``) and the shadows are not
    touched meanwhile."""

    def __init__(self, background: bool):
        self.pool = ThreadPoolExecutor(max_workers=1) if background else None
        self.pending = None

    def write(self, commits: list, later: bool) -> None:
        if self.pool is not None and later:
            self.pending = self.pool.submit(commit_all, commits)
        else:
            commit_all(commits)

    def wait(self) -> None:
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self.pool is not None:
                self.pool.shutdown(wait=True)


def fit_stack(stack: Stack, target: int, bar=None, log: Callable = print,
              background: bool = False, commit_at_target: bool = False,
              postfix: Callable | None = None) -> tuple[list, list]:
    """Train ``stack`` up to epoch ``target``, committing each run on its solo schedule (see
    the module). ``commit_at_target``: every run's state is written at ``target`` too (a solo
    ``fit(until=...)``; a group catching up to another run's epoch does not). ``bar``: a
    progress bar advanced by R each epoch, ``postfix(stack)`` shown on it after each commit.
    ``background``: commits are written in a thread (:class:`Writer`).

    Returns (the runs that diverged, as (trainer, its error line); the trainers that reached
    their last epoch). Stops right after a commit that finds a divergence or ends a run before
    ``target``; the other runs' trainers then hold this epoch's state (synced, committed or
    not) and the caller restacks them.
    """
    stack.clock = [time.perf_counter()] * stack.R
    writer = Writer(background)
    try:
        while stack.epoch < target:
            stack.step()
            rows, last = epoch_end(stack)
            if bar is not None:
                bar.update(stack.R)
            signalled = preempt.requested()
            states = signalled or (commit_at_target and stack.epoch >= target)
            commit = list(range(stack.R)) if states else rows
            if not commit:
                continue
            ended = _commit(stack, commit, rows, last, states, writer, target, log)
            if signalled:
                preempt.hand_on()
            if bar is not None:
                bar.set_postfix(postfix(stack) if postfix else {"epoch": stack.epoch},
                                refresh=False)
            if ended is not None:
                return ended
        writer.wait()
        for r in range(stack.R):   # a target between rows: every trainer holds this epoch
            if stack.trainers[r].epoch != stack.epoch:
                sync_timed(stack, r)
        stops = stack.stop_epochs()
        return [], [t for r, t in enumerate(stack.trainers) if stack.epoch >= stops[r]]
    finally:
        writer.close()


def _commit(stack: Stack, commit: list, rows: list, last: list, states: bool, writer: Writer,
            target: int, log: Callable):
    """Commit ``commit`` (runs with a row: ``rows``; at their last epoch: ``last``; every
    run's state: ``states``) after the divergence check; (diverged, done) when the call ends
    here, else None."""
    bad = stack.diverged(commit, last)
    writer.wait()   # the previous commit is on disk: the shadows are free
    good = [r for r in commit if r not in bad]
    done = [r for r in good if r in last]
    ends = bool(bad) or (bool(done) and stack.epoch < target)
    for r in (range(stack.R) if ends else good):
        if r not in bad:
            sync_timed(stack, r)
    writer.write([(stack.trainers[r], r in rows, True if r in last or states else None)
                  for r in good], later=not ends and not states and stack.epoch < target)
    for r in good:
        stack.last_commit[r] = stack.epoch
    dropped = drop_diverged(stack, bad, log)
    return (dropped, [stack.trainers[r] for r in done]) if ends else None


def drop_diverged(stack: Stack, bad: dict, log: Callable) -> list:
    """Mark each run of ``bad`` ({r: (epoch, what)}) diverged: its directory keeps its last
    commit. Returns [(trainer, error line)]."""
    out = []
    for r, (epoch, what) in sorted(bad.items()):
        t = stack.trainers[r]
        line = mark_diverged(t.run, t.cfg, epoch, what, stack.last_commit[r], t.progress())
        log(f"run {t.cfg.run_id}: diverged (non-finite {what}); dropped from the group, "
            f"{ERROR} written")
        out.append((t, line))
    return out


def losses_postfix(stack: Stack) -> dict[str, str]:
    """A solo run's progress bar: the latest logged train and test loss of run 0, read back in
    one copy: train at this epoch (scored at a run's end) or the last step's, test at this epoch
    or the last multiple of ``eval_every``."""
    import torch

    e, train, test = stack.epoch, stack.curves["train_loss"][0], stack.curves["test_loss"][0]
    at = [train[e], train[max(e - 1, 0)], test[e], test[e - e % stack.cfg.eval_every]]
    t_now, t_step, s_now, s_eval = torch.stack(at).tolist()

    def fmt(*values: float) -> str:
        return next((f"{v:.3g}" for v in values if not math.isnan(v)), "-")
    return {"train": fmt(t_now, t_step), "test": fmt(s_now, s_eval)}


def sync_timed(stack: Stack, r: int) -> None:
    """Sync run ``r`` into its trainer and add the time since its last sync to its wall time."""
    now = time.perf_counter()
    stack.sync(r)
    stack.trainers[r].wall_time += now - stack.clock[r]
    stack.clock[r] = now
