"""A run's phases and its summary: when it memorised, formed its circuit, cleaned up, grokked.

Stage: after training (``grokhpc.measures.finalize_run`` writes summary.json through
:func:`build_summary` once the checkpoints are measured). The phases are read off the curves
alone (:func:`detect_phases`; rules in its docstring), after Nanda et al. (2023): memorisation
ends at the test-loss peak, circuit formation when the test loss falls below a uniform guess's,
cleanup when the test loss comes within ten times the train loss, and grokking at the first
epoch with test accuracy >= ``config.GROK_ACC``. summary.json adds the final losses, accuracies
and measures, the key frequencies, the wall time and whether the run stopped early.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .config import GROK_ACC, to_dict
from .store import RunDir
from .task_measures import basis_summary


def _num(x):
    """A number as summary.json holds it: None for a missing or NaN value."""
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


# the cleanup rule reads train loss and test accuracy through a running median over this
# fraction of the run's epochs
CLEANUP_WINDOW = 0.04


def running_median(curves, column: str, epochs: np.ndarray) -> np.ndarray:
    """``column`` at ``epochs``, as a centred running median over ``CLEANUP_WINDOW`` of the
    run (over the epochs where the column has values).

    A median keeps a monotone curve, and the epoch of a lasting step, as they are, but removes
    a spike or blip shorter than half the window (a brief jump of the train loss late in
    training; one evaluation at 100% test accuracy among 99.7%s)."""
    tr = curves.dropna(subset=[column]).sort_values("epoch")
    ep = tr["epoch"].to_numpy(np.int64)
    step = float(np.median(np.diff(ep))) if len(ep) > 1 else 1.0
    rows = max(1, int(round(CLEANUP_WINDOW * float(ep[-1] - ep[0]) / step))) | 1  # odd
    smooth = tr[column].rolling(rows, center=True, min_periods=1).median()
    return np.interp(epochs, ep, smooth.to_numpy(float))


def detect_phases(curves, n_classes: int) -> dict[str, Any]:
    """Phase epochs from a curves table (pandas: epoch, train_loss, train_acc, test_loss,
    test_acc; NaN where not evaluated). Rules, over the epochs where the test set
    was scored:

    * memorisation_end: the epoch of the test-loss peak; ``memorised`` says whether the train
      accuracy was 100% there (False flags a peak before memorisation was complete);
    * circuit_formation_end: the first epoch after the peak with test loss < ln n_classes
      (the loss of a uniform guess: ln p over Z_p, ln 120 over S5);
    * cleanup_end: from circuit_formation_end on, the first epoch where test loss <= 10 x train
      loss, or test accuracy 100%, with train loss and test accuracy read through
      :func:`running_median` (so neither a brief train-loss spike, which puts train loss
      within a tenth of test loss, nor one evaluation at 100% ends cleanup);
    * grokking_epoch: the first epoch with test accuracy >= GROK_ACC (0.99); when never
      reached, the last epoch, with ``grokked`` False (censored).

    A boundary not reached is None.
    """
    c = curves.dropna(subset=["test_loss"]).sort_values("epoch")
    if c.empty:
        raise ValueError("curves: no epoch with a test loss")
    ep = c["epoch"].to_numpy(np.int64)
    test_loss = c["test_loss"].to_numpy(float)
    test_acc = c["test_acc"].to_numpy(float)
    train_acc = c["train_acc"].to_numpy(float)
    i_peak = int(np.argmax(test_loss))
    out: dict[str, Any] = {
        "test_loss_peak_epoch": int(ep[i_peak]),
        "test_loss_peak": float(test_loss[i_peak]),
        "memorisation_end": int(ep[i_peak]),
        "memorised": bool(train_acc[i_peak] >= 1.0),
        "circuit_formation_end": None,
        "cleanup_end": None,
    }
    after = np.nonzero((np.arange(len(ep)) > i_peak) & (test_loss < math.log(n_classes)))[0]
    if len(after):
        i_c = int(after[0])
        out["circuit_formation_end"] = int(ep[i_c])
        train_smooth = running_median(curves, "train_loss", ep)
        acc_smooth = running_median(curves, "test_acc", ep)
        clean = np.nonzero((np.arange(len(ep)) >= i_c)
                           & ((test_loss <= 10 * train_smooth) | (acc_smooth >= 1.0)))[0]
        if len(clean):
            out["cleanup_end"] = int(ep[clean[0]])
    hit = np.nonzero(test_acc >= GROK_ACC)[0]
    out["grokked"] = bool(len(hit))
    out["grokking_epoch"] = int(ep[hit[0]]) if len(hit) else int(curves["epoch"].max())
    return out


def _last(curves, col):
    """The last value of a curve where it was scored, or None."""
    s = curves.dropna(subset=[col])
    return float(s[col].iloc[-1]) if len(s) else None


def build_summary(run: RunDir, table, keys, curves=None) -> dict[str, Any]:
    """summary.json of a measured run: its id and task (``p`` as config.json has it: none for the
    S5 tasks), its basis and key elements (``task_measures.basis_summary``), phases, final
    values of the curves and of the last row of the measures ``table``, wall time and whether it
    stopped early."""
    cfg = run.run_config()
    curves = run.read_curves() if curves is None else curves
    summary: dict[str, Any] = {"run_id": cfg.run_id, "p": to_dict(cfg).get("p"), "op": cfg.op}
    summary.update(basis_summary(cfg.op, cfg.n_classes, keys, cfg.model))
    summary.update(detect_phases(curves, cfg.n_classes))
    for col in ("train_loss", "train_acc", "test_loss", "test_acc"):
        summary[f"final_{col}"] = _last(curves, col)
    last = table.slice(table.num_rows - 1).to_pylist()[0]
    summary["final_epoch"] = int(last["epoch"])
    for col in ("restricted_loss", "excluded_loss", "cos_residual", "gini_embed", "gini_logit",
                "all_loss"):
        summary[f"final_{col}"] = _num(last.get(col))
    prog = run.read_progress() or {}
    summary["wall_time_s"] = prog.get("wall_time_s")
    summary["stopped_early"] = bool(prog.get("stopped_early"))
    return summary
