"""Training into a run directory: files, curves, resume after SIGKILL, and errors."""

import json
import math
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from grokhpc.config import RunConfig
from grokhpc.store import (CHECKPOINTS, CURVE_COLUMNS, RUN_FILES, RunDir, RunDirError,
                           append_checkpoint_row)
from grokhpc.train import Trainer, run_training

TINY = dict(p=13, train_frac=0.5, d_model=32, n_heads=4, d_head=8, d_mlp=64, n_epochs=240,
            checkpoint_every=20, eval_every=10, lr=3e-3, device="cpu")
TINY_SET = [f"--set={k}={v}" for k, v in TINY.items()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted tiny run."""
    out = tmp_path_factory.mktemp("ref") / "run"
    run_training(RunConfig(**TINY), out, progress_bar=False, log=lambda *_: None)
    return RunDir(out)


def _snapshot(run: RunDir):
    curves = pq.read_table(run.file("curves.parquet")).to_pandas()
    epochs, weights = run.checkpoints(mmap=False)
    state = torch.load(run.file("state.pt"), weights_only=True)
    return curves, epochs, weights, state


def test_run_directory_layout(reference):
    files = sorted(os.listdir(reference.path))
    assert len(files) <= 8 and set(files) <= set(RUN_FILES)
    for must in ("config.json", "progress.json", "state.pt", "checkpoints.npy", "curves.parquet"):
        assert must in files
    assert not [f for f in files if f.startswith(".")]  # no temp files left behind
    cfg = json.loads(reference.file("config.json").read_text())
    assert cfg["run_id"] == RunConfig(**TINY).run_id and cfg["p"] == 13
    prog = reference.read_progress()
    assert prog["epoch"] == prog["n_epochs"] == 240 and prog["done"] is True
    assert prog["checkpoint_epochs"] == list(range(0, 241, 20))


def test_curves_schema_and_cadence(reference):
    table = pq.read_table(reference.file("curves.parquet"))
    assert table.column_names == list(CURVE_COLUMNS)
    assert str(table.schema.field("epoch").type) == "int64"
    df = table.to_pandas()
    assert df["epoch"].tolist() == list(range(241))
    assert df["train_loss"].notna().all() and df["train_acc"].notna().all()
    tested = df.loc[df["test_loss"].notna(), "epoch"].tolist()
    assert tested == list(range(0, 241, 10))
    # row 0 is the untrained model: near the uniform loss ln p
    assert abs(df["train_loss"].iloc[0] - math.log(13)) < 0.05
    assert df["train_loss"].iloc[-1] < df["train_loss"].iloc[0] / 10


def test_curves_and_checkpoints_agree_with_an_independent_evaluation(reference):
    """Reload checkpoint rows into a fresh model and recompute the logged losses."""
    from grokhpc.data import make_dataset
    from grokhpc.model import build_model, load_flat
    from grokhpc.train import loss_fn

    cfg = RunConfig(**TINY)
    d = make_dataset(cfg)
    model = build_model(cfg)
    curves = reference.read_curves().set_index("epoch")
    epochs, weights = reference.checkpoints()
    assert weights.shape == (len(epochs), sum(p.numel() for p in model.parameters()))
    for i in (0, len(epochs) // 2, len(epochs) - 1):
        load_flat(model, torch.from_numpy(np.array(weights[i])))
        with torch.no_grad():
            test = loss_fn(model(d.test_tokens)[:, -1], d.test_labels).item()
            train = loss_fn(model(d.train_tokens)[:, -1], d.train_labels).item()
        assert test == pytest.approx(curves.loc[epochs[i], "test_loss"], rel=1e-5, abs=1e-9)
        assert train == pytest.approx(curves.loc[epochs[i], "train_loss"], rel=1e-5, abs=1e-9)


def _train_cmd(out):
    return [sys.executable, "-m", "grokhpc.train", "--out", str(out), "--no-progress", *TINY_SET]


def test_sigkill_at_random_moments_then_resume_is_bit_identical(tmp_path, reference):
    out = tmp_path / "run"
    rng = random.Random(0)
    kills = 0
    for target in (30, 110, 190):
        proc = subprocess.Popen(_train_cmd(out), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            prog = RunDir(out).read_progress() if (out / "progress.json").exists() else None
            if prog and prog["epoch"] >= target:
                break
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.15))   # land anywhere: mid-epoch, mid-commit
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills >= 2
    resumed_epoch = RunDir(out).read_progress()["epoch"]
    assert 0 < resumed_epoch < 240
    done = subprocess.run(_train_cmd(out), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"resuming at epoch {resumed_epoch}/240" in done.stdout

    c1, e1, w1, s1 = _snapshot(reference)
    c2, e2, w2, s2 = _snapshot(RunDir(out))
    assert e1 == e2
    assert np.array_equal(w1, w2)                       # every checkpoint, bit for bit
    assert c1.equals(c2)                                # every logged number, NaNs in place
    for k in s1["model"]:
        assert torch.equal(s1["model"][k], s2["model"][k])


def test_finished_run_restarted_does_nothing_and_says_so(tmp_path):
    out = tmp_path / "run"
    cfg = RunConfig(**{**TINY, "n_epochs": 40})
    run_training(cfg, out, progress_bar=False, log=lambda *_: None)
    before = {f: (out / f).stat().st_mtime_ns for f in os.listdir(out)}
    res = subprocess.run([*_train_cmd(out)[:-len(TINY_SET)],
                          *[s for s in TINY_SET if "n_epochs" not in s], "--set", "n_epochs=40"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0
    assert "already complete" in res.stdout and "40/40" in res.stdout
    assert {f: (out / f).stat().st_mtime_ns for f in os.listdir(out)} == before


def test_stale_checkpoint_tail_is_cut_on_resume(tmp_path):
    """A kill between appending a checkpoint row and committing state.pt leaves a tail."""
    out = tmp_path / "run"
    cfg = RunConfig(**{**TINY, "n_epochs": 60})
    t = Trainer.open(cfg, out)
    for _ in range(20):
        t.step()
    t.evaluate()
    t.commit(checkpoint=True)                       # epochs 0 and 20 committed
    n_cols = sum(math.prod(s) for _, s in t.layout)
    append_checkpoint_row(out / CHECKPOINTS, np.full(n_cols, 7.0, np.float32), 2)  # orphan
    (out / ".state.pt.k1ll3d.tmp").write_bytes(b"half a state")        # a kill mid-rename
    t2 = Trainer.open(cfg, out)
    assert not list(out.glob(".*.tmp"))
    assert t2.epoch == 20 and t2.checkpoint_epochs == [0, 20]
    size = (out / CHECKPOINTS).stat().st_size
    assert size == 128 + 2 * n_cols * 4
    assert np.load(out / CHECKPOINTS).shape == (2, n_cols)   # a valid .npy for numpy too


def test_other_run_in_directory_is_refused(tmp_path):
    out = tmp_path / "run"
    run_training(RunConfig(**{**TINY, "n_epochs": 20}), out, progress_bar=False,
                 log=lambda *_: None)
    before = (out / "curves.parquet").read_bytes()
    res = subprocess.run(_train_cmd(out) + ["--set", "weight_decay=0.5"], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 2
    assert "config.json: holds run" in res.stderr and res.stderr.count("\n") == 1
    assert (out / "curves.parquet").read_bytes() == before
    assert not (out / "error.txt").exists()   # the other run's directory is left untouched


def test_corrupt_state_names_the_file_and_keeps_it(tmp_path):
    out = tmp_path / "run"
    cfg = RunConfig(**{**TINY, "n_epochs": 40})
    t = Trainer.open(cfg, out)
    (out / "state.pt").write_bytes(b"\x00garbage")
    with pytest.raises(RunDirError, match="state.pt: unreadable training state"):
        Trainer.open(cfg, out)
    assert (out / "state.pt").read_bytes() == b"\x00garbage"
    # through run_training, the failure is also left in the run's error.txt
    with pytest.raises(RunDirError):
        run_training(cfg, out, progress_bar=False, log=lambda *_: None)
    assert "state.pt: unreadable training state" in (out / "error.txt").read_text()
    assert (out / "state.pt").read_bytes() == b"\x00garbage"


def test_unusable_out_directory_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    res = subprocess.run([*_train_cmd(blocker / "run")], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 2
    assert res.stderr.startswith("error: ") and "cannot create run directory" in res.stderr


def test_bad_set_value_is_one_line(tmp_path):
    res = subprocess.run([sys.executable, "-m", "grokhpc.train", "--out", str(tmp_path / "r"),
                          "--set", "p=100"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert res.stderr.strip() == "error: --set: p: expected a prime >= 3, got 100"
    assert not (tmp_path / "r").exists()


HELP_PROBE = """
import runpy, sys
sys.argv = ["grokhpc.train", "--help"]
try:
    runpy.run_module("grokhpc.train", run_name="__main__")
except SystemExit:
    pass
print("HEAVY", sorted(m for m in ("torch", "transformer_lens") if m in sys.modules))
"""


def test_help_imports_nothing_heavy():
    res = subprocess.run([sys.executable, "-c", HELP_PROBE], capture_output=True, text=True,
                         timeout=60)
    assert "--out" in res.stdout and "--set" in res.stdout
    assert "HEAVY []" in res.stdout
