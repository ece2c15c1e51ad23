"""Progress measures per checkpoint and phase detection (placeholder: phases only)."""

from __future__ import annotations

from .store import SUMMARY, RunDir, atomic_write_json


def finalize_run(run: RunDir, device=None) -> dict:
    curves = run.read_curves()
    test = curves.dropna(subset=["test_acc"])
    hit = test[test["test_acc"] >= 0.99]
    summary = {
        "run_id": run.read_config()["run_id"],
        "grokking_epoch": int(hit["epoch"].iloc[0]) if len(hit) else int(test["epoch"].iloc[-1]),
        "grokked": bool(len(hit)),
    }
    atomic_write_json(run.file(SUMMARY), summary)
    return summary
