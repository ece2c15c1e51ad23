"""Runs that diverge: the one rule a solo run (grokhpc.train) and a packed group
(grokhpc.train_batched) follow.

A run whose train loss or weights become non-finite is stopped where it is checked (at a
commit: its values are read back there anyway, so no epoch pays a device sync for it) and
marked, before anything non-finite is committed:

* ``error.txt`` starts with ``diverged:`` (the marker; status and runs.parquet show the run
  failed with this line),
* ``progress.json`` gets ``diverged_epoch``,
* ``summary.json`` says ``diverged`` and gives no final values (never the last finite ones).

Its other files keep its last finite commit. Training is deterministic, so a run marked diverged
is not trained again unless asked to (it would diverge again at the same epoch).

Imports neither torch nor plotly.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .runtime import provenance_columns
from .store import (SUMMARY, RunDir, RunDirError, atomic_write_json,
                    read_json)

DIVERGED_PREFIX = "diverged:"


class RunDiverged(RunDirError):
    """A run went non-finite (and is marked so), or was marked so before."""


def is_diverged(run: RunDir) -> bool:
    err = run.read_error()
    return bool(err) and err.startswith(DIVERGED_PREFIX)


def first_nonfinite(values, start: int, default: int) -> int:
    """The epoch of the first non-finite value of ``values`` (epochs ``start``, ``start + 1``,
    ...), or ``default`` when all are finite."""
    bad = np.nonzero(~np.isfinite(np.asarray(values, dtype=np.float64)))[0]
    return start + int(bad[0]) if len(bad) else default


def mark_diverged(run: RunDir, cfg, epoch: int, what: str, kept: int | None,
                  progress: dict[str, Any] | None = None) -> str:
    """Record that ``cfg``'s run in ``run`` diverged: its ``what`` (train loss, weights) was
    first non-finite at ``epoch``; ``kept``: the epoch of its last finite commit (None: none).
    ``progress``: what progress.json says when there is none yet. Returns the error line."""
    fields = f"lr={cfg.lr}, weight_decay={cfg.weight_decay}, betas={list(cfg.betas)}"
    fields += f", init_scale={cfg.init_scale}" if cfg.init_scale != 1.0 else ""
    keeps = ("nothing was committed" if kept is None
             else f"the run directory keeps its last finite commit, epoch {kept}")
    line = (f"{DIVERGED_PREFIX} run {cfg.run_id}: non-finite {what} first at epoch {epoch} "
            f"({fields}); {keeps}")
    run.write_error(line + "\n")
    prog = run.read_progress() or progress
    if prog is not None:
        run.write_progress({**prog, "diverged_epoch": epoch})
    atomic_write_json(run.file(SUMMARY), {
        "run_id": cfg.run_id, "diverged": True, "diverged_epoch": epoch, "diverged_value": what,
        "last_finite_epoch": kept, **provenance_columns(prog)})
    return line


def clear_diverged(run: RunDir) -> None:
    """Take a diverged run's marks away (error.txt, its summary.json) as it is trained again;
    progress.json's mark goes with the next commit."""
    if not is_diverged(run):
        return
    run.clear_error()
    try:
        summary = read_json(run.file(SUMMARY)) if run.file(SUMMARY).exists() else None
    except RunDirError:
        summary = None
    if isinstance(summary, dict) and summary.get("diverged"):
        run.file(SUMMARY).unlink(missing_ok=True)


def refuse_diverged_before(run: RunDir, run_id: str) -> None:
    """RunDiverged when ``run`` is marked diverged: one line saying where, and how to train it
    again anyway."""
    if not is_diverged(run):
        return
    summary = _summary_or_empty(run)
    where = (f"non-finite {summary['diverged_value']} first at epoch {summary['diverged_epoch']}"
             if "diverged_epoch" in summary and "diverged_value" in summary else "see error.txt")
    raise RunDiverged(f"{run.path}: run {run_id} diverged before ({where}) and would diverge "
                      "again; --retry-diverged trains it again from its last finite commit")


def _summary_or_empty(run: RunDir) -> dict:
    try:
        summary = read_json(run.file(SUMMARY)) if run.file(SUMMARY).exists() else {}
    except RunDirError:
        summary = {}
    return summary if isinstance(summary, dict) else {}


def check_trainer(trainer, row: np.ndarray | None) -> None:
    """Before a solo trainer's commit: a run gone non-finite since its last commit is marked
    diverged (its files keep that commit) and RunDiverged raised instead. ``row``: the weights
    the commit is about to write (already read back), or None (then read here)."""
    bad = nonfinite(trainer, row)
    if bad is None:
        return
    line = mark_diverged(trainer.run, trainer.cfg, bad[0], bad[1], last_commit_epoch(trainer),
                         progress=trainer.progress())
    raise RunDiverged(f"{trainer.run.path}: {line}")


def nonfinite(trainer, row: np.ndarray | None) -> tuple[int, str] | None:
    """(epoch, what) where ``trainer``'s run first went non-finite since its last commit: its
    train loss, else its weights now; None when all is finite. One device read."""
    import torch

    from .model import flat_weights

    lo = last_commit_epoch(trainer) or 0
    losses = trainer.curves["train_loss"][lo:trainer.epoch]
    if losses.numel() and not bool(torch.isfinite(losses).all()):
        return first_nonfinite(losses.cpu().numpy(), lo, trainer.epoch), "train loss"
    finite = np.isfinite(row).all() if row is not None \
        else bool(torch.isfinite(flat_weights(trainer.model)).all())
    return None if finite else (trainer.epoch, "weights")


def last_commit_epoch(trainer) -> int | None:
    """The epoch of a trainer's last commit (a checkpoint row or state.pt); None before any."""
    done = trainer.checkpoint_epochs[-1:] + \
        ([trainer.committed_epoch] if trainer.committed_epoch is not None else [])
    return max(done) if done else None
