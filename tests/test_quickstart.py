"""The quickstart keeps the promise of its header comment (sweeps/quickstart.yaml).

Its runs are trained as the local launcher trains them (``grokhpc.job.train_runs``, the code
of one job): one run per job at 1 torch thread, one run per job at 2 threads, and all four
packed into one job at the spec's own thread count. In every mode the train_frac 0.6 runs must
reach test accuracy >= 99% well before the budget ends and stay there, and the 0.3 runs must
memorise their training pairs without ever reaching it. The expected outcome is the spec's
comment written out below, not anything grokhpc computes; the grokking epoch is read straight
from each run's curves.parquet.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from grokhpc.config import to_dict
from grokhpc.job import train_runs
from grokhpc.runtime import JobSettings
from grokhpc.store import RunDir
from grokhpc.plan import pack
from grokhpc.sweep import load_sweep, local_threads

pytestmark = pytest.mark.slow

SPEC = Path(__file__).resolve().parent.parent / "sweeps" / "quickstart.yaml"
GROK_ACC = 0.99        # the grokking threshold on test accuracy
GROKS = {0.3: False, 0.6: True}   # train_frac -> reaches GROK_ACC within the budget
GROK_BY = 600          # epoch by which a grokking run must have crossed (budget: 1,000)
MEMORISED_BY = 200     # epoch by which every run fits its training pairs
NEVER_ABOVE = 0.5      # test accuracy a run that does not grok never reaches
STOP_AFTER = 200       # the spec's stop_after_grok: a grokked run ends this many epochs later
MODES = ("1 thread", "2 threads", "packed")


@pytest.fixture(scope="module")
def sweep():
    return load_sweep(SPEC)


@pytest.fixture
def keep_threads():
    """train_runs sets torch's thread count for the process; put it back afterwards."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def first_epoch(epochs: np.ndarray, values: np.ndarray, at_least: float) -> int | None:
    hit = np.flatnonzero(values >= at_least)
    return int(epochs[hit[0]]) if len(hit) else None


def outcome(run_dir: Path) -> dict:
    """Grokking epoch, memorisation epoch, last logged epoch and its test accuracy, best test
    accuracy: from the run's curves (test accuracy is logged every eval_every epochs)."""
    c = RunDir(run_dir).read_curves()
    test = c[c["test_acc"].notna()]
    ep, acc = test["epoch"].to_numpy(), test["test_acc"].to_numpy()
    train = c[c["train_acc"].notna()]
    return {"grok": first_epoch(ep, acc, GROK_ACC), "last": int(ep[-1]),
            "final_acc": float(acc[-1]), "best_acc": float(acc.max()),
            "memorised": first_epoch(train["epoch"].to_numpy(), train["train_acc"].to_numpy(),
                                     GROK_ACC)}


def test_spec_is_the_one_the_comment_describes(sweep):
    """Two training fractions x two seeds of one base: the header's numbers are about these."""
    assert {(r.config.train_frac, r.config.model_seed) for r in sweep.runs} == {
        (0.3, 1), (0.3, 2), (0.6, 1), (0.6, 2)}
    for r in sweep.runs:
        assert (r.config.p, r.config.op, r.config.n_epochs) == (37, "add", 1000)
        assert r.config.stop_after_grok == STOP_AFTER
    assert local_threads(sweep.launcher) == 1


@pytest.mark.parametrize("mode", MODES)
def test_quickstart_keeps_its_promise(sweep, mode, tmp_path, keep_threads):
    threads = {"1 thread": 1, "2 threads": 2}.get(mode, local_threads(sweep.launcher))
    per_job = len(sweep.runs) if mode == "packed" else 1
    jobs = pack(sweep.runs, lambda cfg: per_job)
    assert [len(j) for j in jobs] == ([4] if mode == "packed" else [1, 1, 1, 1])
    lines: list[str] = []
    for job in jobs:
        train_runs([(to_dict(r.config), str(tmp_path / r.run_id)) for r in job],
                   JobSettings(threads=threads), log=lines.append)
    if mode == "packed":   # trained as one group, not one by one after a failed group
        assert any(ln.startswith("training 4 runs together") for ln in lines), lines
        assert not any("batched training failed" in ln for ln in lines), lines

    for r in sweep.runs:
        got = outcome(tmp_path / r.run_id)
        where = f"{mode}: train_frac {r.config.train_frac}, model_seed {r.config.model_seed}: {got}"
        assert got["memorised"] is not None and got["memorised"] <= MEMORISED_BY, where
        if GROKS[r.config.train_frac]:
            assert got["grok"] is not None and got["grok"] <= GROK_BY, where
            assert got["last"] == got["grok"] + STOP_AFTER, where   # stopped, as promised
            assert got["final_acc"] >= GROK_ACC, where              # and still grokked there
        else:
            assert got["grok"] is None, where
            assert got["last"] == r.config.n_epochs, where
            assert got["best_acc"] < NEVER_ABOVE, where
