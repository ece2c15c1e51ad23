"""Runs that diverge: the one rule every training loop follows (grokhpc.loop drives a solo run
and a packed group alike).

At each commit of a run, before anything is written, its train losses since its last commit
(and the one scored at its last epoch) must be finite, and then its weights now (the row the
commit writes): its values are read back there anyway, so no epoch pays a device sync for the
check (:func:`nonfinite`). A run that breaks it is stopped there and marked:

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
from .store import ERROR, SUMMARY, RunDir, RunDirError, atomic_write_json, read_json

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
             if "diverged_epoch" in summary and "diverged_value" in summary else f"see {ERROR}")
    raise RunDiverged(f"{run.path}: run {run_id} diverged before ({where}) and would diverge "
                      "again; --retry-diverged trains it again from its last finite commit")


def _summary_or_empty(run: RunDir) -> dict:
    try:
        summary = read_json(run.file(SUMMARY)) if run.file(SUMMARY).exists() else {}
    except RunDirError:
        summary = {}
    return summary if isinstance(summary, dict) else {}


def nonfinite(curve, weights: list, runs: list, starts: list, epoch: int,
              scored=()) -> dict[int, tuple[int, str]]:
    """The rule, for ``runs`` of a stack at ``epoch`` about to commit: run ``r``'s train losses
    of epochs ``starts[i]`` (its last commit) to ``epoch - 1`` -- to ``epoch`` for the runs in
    ``scored``, whose train split was scored at this epoch, their last -- then its weights.
    ``curve``: the train-loss curves, (R, n_epochs + 1); ``weights``: every weight, (R, ...)
    each. Returns {r: (epoch, what)} for the runs that broke it: the first non-finite train
    loss's epoch, or this epoch and "weights". One read from the device when all is finite,
    one more to find where otherwise."""
    import torch

    windows = [(lo, epoch + (r in scored)) for r, lo in zip(runs, starts)]
    per_weight = torch.stack([torch.isfinite(w).flatten(1).all(1) for w in weights])
    weights_ok = per_weight.all(0)                                          # (R,)
    losses = {w: torch.isfinite(curve[:, w[0]:w[1]]).all(1) for w in set(windows)}
    loss_ok = torch.stack([losses[w][r] for r, w in zip(runs, windows)])
    runs_ok = torch.stack([weights_ok[r] for r in runs])
    if bool((loss_ok & runs_ok).all()):
        return {}
    found = {}
    for r, (lo, hi), l_ok, w_ok in zip(runs, windows, loss_ok.tolist(), runs_ok.tolist()):
        if not l_ok:
            found[r] = (first_nonfinite(curve[r, lo:hi].cpu().numpy(), lo, epoch), "train loss")
        elif not w_ok:
            found[r] = (epoch, "weights")
    return found
