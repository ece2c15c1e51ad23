"""Bad inputs and faults of one run, each answered in one line with the right exit status and
nothing lost: divergence, an interrupt, an empty or a sweep's --out, a field given twice, files
of two runs, a deleted state.pt, damaged files -- and each error's advice, followed, works."""

import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from grokhpc import train
from grokhpc.config import RunConfig, to_dict
from grokhpc.store import NPY_HEADER_BYTES, RunDir, RunDirError
from grokhpc.train import Trainer, run_training

TINY = dict(p=13, train_frac=0.5, d_model=32, n_heads=4, d_head=8, d_mlp=64, n_epochs=240,
            checkpoint_every=20, eval_every=10, lr=3e-3, device="cpu")
SHORT = {**TINY, "n_epochs": 40}
JOB_HOLD = Path(__file__).resolve().parent / "job_hold"
# grokhpc.train imported as a module (not run as __main__), so tests/job_hold can hold it
HELD_MAIN = "import sys; from grokhpc.train import main; sys.exit(main(sys.argv[1:]))"


def sets(fields: dict) -> list[str]:
    return [f"--set={k}={list(v) if isinstance(v, tuple) else v}" for k, v in fields.items()]


def train_cmd(out, fields: dict = SHORT, *extra) -> list[str]:
    return [sys.executable, "-m", "grokhpc.train", "--out", str(out), "--no-progress",
            *sets(fields), *extra]


def run_cmd(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)


def hashes(d: Path) -> dict[str, str]:
    return {f: hashlib.sha256((d / f).read_bytes()).hexdigest() for f in sorted(os.listdir(d))}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted TINY run (in this process: the thread count of the subprocesses)."""
    out = tmp_path_factory.mktemp("ref") / "run"
    run_training(RunConfig(**TINY), out, progress_bar=False, log=lambda *_: None)
    return RunDir(out)


@pytest.fixture(scope="module")
def short(tmp_path_factory):
    out = tmp_path_factory.mktemp("short") / "run"
    run_training(RunConfig(**SHORT), out, progress_bar=False, log=lambda *_: None)
    return RunDir(out)


def assert_same(a: RunDir, b: RunDir) -> None:
    ea, wa = a.checkpoints(mmap=False)
    eb, wb = b.checkpoints(mmap=False)
    assert ea == eb and np.array_equal(wa, wb)
    assert a.read_curves().equals(b.read_curves())


# ---- divergence ---------------------------------------------------------------------------------
DIVERGING = {**SHORT, "lr": 1e30, "weight_decay": 1e10}


def test_a_diverging_run_stops_is_marked_and_exits_non_zero_in_one_line(tmp_path):
    """lr 1e30: the first step sends the weights past float32 (an independent check below),
    so the train loss of epoch 1 is the first non-finite one. The run stops at its next commit
    (epoch 20), keeps its epoch-0 commit, and is marked in error.txt, progress.json and a
    summary.json with no final values."""
    cfg = RunConfig(**DIVERGING)
    from grokhpc.data import make_dataset
    from grokhpc.lastpos import cross_entropy
    from grokhpc.model import build_model

    model, data = build_model(cfg), make_dataset(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas,
                            weight_decay=cfg.weight_decay)
    for step in range(2):
        loss = cross_entropy(model.last_logits(data.train_tokens), data.train_labels)
        assert math.isfinite(loss.item()) == (step == 0)
        loss.backward()
        opt.step()
        opt.zero_grad()

    out = tmp_path / "run"
    line = (f"{out}: diverged: run {cfg.run_id}: non-finite train loss first at epoch 1 "
            "(lr=1e+30, weight_decay=10000000000.0, betas=[0.9, 0.98]); the run directory "
            "keeps its last finite commit, epoch 0")
    res = run_cmd(train_cmd(out, DIVERGING))
    assert res.returncode == 1 and res.stderr == f"error: {line}\n"
    run = RunDir(out)
    assert run.read_error() == line.split(": ", 1)[1] + "\n"
    prog = run.read_progress()
    assert (prog["epoch"], prog["state_epoch"], prog["checkpoint_epochs"], prog["done"],
            prog["diverged_epoch"]) == (0, 0, [0], False, 1)
    summary = run.read_summary()
    assert (summary["diverged"], summary["diverged_epoch"], summary["last_finite_epoch"]) == \
        (True, 1, 0)
    assert not [k for k in summary if k.startswith("final_")] and "grokked" not in summary
    assert np.isfinite(run.checkpoints(mmap=False)[1]).all()
    assert torch.load(out / "state.pt", weights_only=True)["epoch"] == 0
    # the same command again: one line, nothing touched (it would diverge again)
    before = hashes(out)
    again = run_cmd(train_cmd(out, DIVERGING))
    assert again.returncode == 1 and again.stderr == (
        f"error: {out}: run {cfg.run_id} diverged before (non-finite train loss first at epoch "
        "1) and would diverge again; --retry-diverged trains it again from its last finite "
        "commit\n")
    assert hashes(out) == before
    # the advice: it trains again from epoch 0 and diverges again, at the same epoch
    retry = run_cmd(train_cmd(out, DIVERGING, "--retry-diverged"))
    assert retry.returncode == 1 and retry.stderr == f"error: {line}\n", retry.stderr
    assert run.read_progress()["attempts"][-1]["epoch"] == 0
    assert len(run.read_progress()["attempts"]) == 2


def test_a_diverged_run_shows_as_such_in_status_and_runs_parquet(tmp_path):
    from grokhpc import aggregate, status
    from grokhpc.scheduler import MANIFEST
    from grokhpc.store import atomic_write_json

    cfg = RunConfig(**DIVERGING)
    sweep = tmp_path / "sweep"
    d = sweep / "runs" / cfg.run_id
    with pytest.raises(RunDirError) as e:
        run_training(cfg, d, progress_bar=False, log=lambda *_: None)
    assert type(e.value).__name__ == "RunDiverged"
    atomic_write_json(sweep / MANIFEST, {"runs": [{"run_id": cfg.run_id,
                                                   "dir": f"runs/{cfg.run_id}", "swept": {}}],
                                         "launches": []})
    (row,) = status.collect(sweep, use_scheduler=False)
    assert row.state == "failed" and row.error.startswith(f"diverged: run {cfg.run_id}: "
                                                          "non-finite train loss first at epoch 1")
    aggregate.aggregate([sweep], formats=None, log=None)
    import pandas as pd

    runs = pd.read_parquet(sweep / "aggregate" / "runs.parquet")
    assert runs["state"].tolist() == ["failed"] and bool(runs["diverged"].iloc[0])
    assert runs["error"].iloc[0] == row.error and runs["diverged_epoch"].iloc[0] == 1


def test_an_init_scale_past_float32_is_one_line_and_commits_nothing(tmp_path):
    cfg = RunConfig(**{**SHORT, "init_scale": 1e300})
    out = tmp_path / "run"
    res = run_cmd(train_cmd(out, {**SHORT, "init_scale": 1e300}))
    assert res.returncode == 1 and res.stderr == (
        f"error: {out}: diverged: run {cfg.run_id}: non-finite weights first at epoch 0 "
        "(lr=0.003, weight_decay=1.0, betas=[0.9, 0.98], init_scale=1e+300); nothing was "
        "committed\n")
    assert not (out / "checkpoints.npy").exists() and not (out / "state.pt").exists()
    assert RunDir(out).read_progress()["diverged_epoch"] == 0


def test_finiteness_is_checked_once_per_commit_never_per_epoch(tmp_path, monkeypatch):
    from grokhpc import divergence

    calls = []
    real = divergence.nonfinite
    monkeypatch.setattr(divergence, "nonfinite", lambda curve, weights, runs, starts, epoch,
                        *scored: calls.append(epoch) or real(curve, weights, runs, starts, epoch,
                                                             *scored))
    run_training(RunConfig(**SHORT), tmp_path / "run", progress_bar=False, log=lambda *_: None)
    assert calls == [0, 20, 40]          # the checkpoint commits: every 20 epochs of 40


# ---- signals ------------------------------------------------------------------------------------
def held_train(out, hold: Path, epoch: int, *extra) -> subprocess.Popen:
    """``grokhpc.train``'s main on TINY, holding after its commit of ``epoch`` until released."""
    hold.mkdir()
    env = {**os.environ, "GROKHPC_TEST_HOLD_DIR": str(hold), "GROKHPC_TEST_HOLD_EPOCH": str(epoch),
           "PYTHONPATH": os.pathsep.join(p for p in (str(JOB_HOLD),
                                                     os.environ.get("PYTHONPATH")) if p)}
    return subprocess.Popen([sys.executable, "-c", HELD_MAIN, "--out", str(out), "--no-progress",
                             *sets(TINY), "--state-every", "1000", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def wait_for(path: Path, proc: subprocess.Popen) -> None:
    """A guard against a hung process, never a race: the file appears when the run holds."""
    deadline = time.monotonic() + 300
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run never held"
        time.sleep(0.05)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupt_writes_the_state_at_the_next_epoch_and_the_same_command_resumes(
        tmp_path, reference, sig):
    """Ctrl-C (SIGINT) or SIGTERM while the run holds after its commit of epoch 40: the state
    is written at epoch 41; SIGINT ends in one line and exit status 130, SIGTERM by the signal,
    as before; no error.txt. The same command resumes at 41 and ends bit-identical."""
    out, hold = tmp_path / "run", tmp_path / "hold"
    proc = held_train(out, hold, 40)
    wait_for(hold / "reached", proc)
    proc.send_signal(sig)
    (hold / "release").touch()
    stdout, stderr = proc.communicate(timeout=300)
    assert torch.load(out / "state.pt", weights_only=True)["epoch"] == 41
    assert RunDir(out).read_progress()["state_epoch"] == 41 and not (out / "error.txt").exists()
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and stderr == (
            f"interrupted: {out}: its state is saved at epoch 41; rerun the same command to "
            "resume\n")
    else:
        assert proc.returncode == -signal.SIGTERM and "Traceback" not in stderr
    res = run_cmd(train_cmd(out, TINY, "--state-every", "1000"))
    assert res.returncode == 0 and "resuming at epoch 41/240" in res.stdout, res.stderr
    assert_same(reference, RunDir(out))


# ---- --out, --set -------------------------------------------------------------------------------
def test_an_empty_out_is_refused_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for out in ("", "  "):
        assert train.main(["--out", out, "--no-progress", *sets(SHORT)]) == 2
        assert capsys.readouterr().err == f"error: --out: expected a run directory, got {out!r}\n"
    with pytest.raises(RunDirError, match="out: expected a run directory"):
        run_training(RunConfig(**SHORT), "", progress_bar=False)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("markers", [("manifest.json",), ("runs",), ("manifest.json", "runs")])
def test_a_sweep_directory_is_refused_as_out_and_another_directory_works(
        tmp_path, capsys, markers):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    for m in markers:
        (sweep / m).mkdir() if m == "runs" else (sweep / m).write_text("{}")
    assert train.main(["--out", str(sweep), "--no-progress", *sets(SHORT)]) == 2
    held = " and ".join(m + "/" if m == "runs" else m for m in markers)
    assert capsys.readouterr().err == (f"error: {sweep}: a sweep directory (holds {held}), not a "
                                       "run directory; use another --out directory\n")
    assert sorted(os.listdir(sweep)) == sorted(markers)
    assert train.main(["--out", str(tmp_path / "solo"), "--no-progress",       # the advice
                       *sets({**SHORT, "n_epochs": 20})]) == 0


def test_a_field_set_twice_is_one_line_and_setting_it_once_works(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--out", str(out), "--no-progress", *sets({**SHORT, "n_epochs": 20})]
    assert train.main([*args, "--set", "weight_decay=0.1", "--set", "weight_decay=0.2"]) == 2
    assert capsys.readouterr().err == ("error: --set: weight_decay: given twice "
                                       "('weight_decay=0.1' and 'weight_decay=0.2'); give each "
                                       "field once\n")
    assert not out.exists()
    assert train.main([*args, "--set", "weight_decay=0.2"]) == 0              # the advice
    assert json.loads((out / "config.json").read_text())["weight_decay"] == 0.2


# ---- files of two runs --------------------------------------------------------------------------
def test_another_runs_config_in_a_finished_run_is_named_not_called_complete(tmp_path, short):
    """The advice has two ways: restoring the directory from a copy (then it is complete), or
    deleting it and training the run again."""
    mixed = tmp_path / "mixed"
    shutil.copytree(short.path, mixed)
    other = {**SHORT, "weight_decay": 0.5}
    oid = RunConfig(**other).run_id
    (mixed / "config.json").write_text(json.dumps({**to_dict(RunConfig(**other)), "run_id": oid}))
    before = hashes(mixed)
    res = run_cmd(train_cmd(mixed, other))
    sid = RunConfig(**SHORT).run_id
    assert res.returncode == 2 and res.stderr == (
        f"error: {mixed}/progress.json: belongs to run {sid}, but config.json holds run {oid}; "
        "restore the run directory from a copy, or delete it to train the run again\n")
    assert "already complete" not in res.stdout and hashes(mixed) == before
    shutil.copy(short.file("config.json"), mixed / "config.json")       # restored from a copy
    res = run_cmd(train_cmd(mixed, SHORT))
    assert res.returncode == 0 and "already complete" in res.stdout
    shutil.rmtree(mixed)                                                   # or deleted
    res = run_cmd(train_cmd(mixed, other))
    assert res.returncode == 0 and RunDir(mixed).is_complete()


def test_a_directory_named_for_another_run_is_refused_and_moving_it_works(tmp_path, short):
    sid, oid = RunConfig(**SHORT).run_id, RunConfig(**{**SHORT, "model_seed": 1}).run_id
    wrong = tmp_path / "runs" / oid
    shutil.copytree(short.path, wrong)
    res = run_cmd(train_cmd(wrong, SHORT))
    assert res.returncode == 2 and res.stderr == (
        f"error: {wrong}: named for run {oid} but holds run {sid} (config.json); move it to a "
        "directory named for its run\n")
    wrong.rename(tmp_path / "runs" / sid)                                  # the advice
    res = run_cmd(train_cmd(tmp_path / "runs" / sid, SHORT))
    assert res.returncode == 0 and "already complete" in res.stdout
    res = run_cmd(train_cmd(wrong, SHORT))                                  # a new one, misnamed
    assert res.returncode == 2 and res.stderr == (
        f"error: {wrong}: named for run {oid}, not {sid}; use another --out directory\n")
    assert not wrong.exists()
    res = run_cmd(train_cmd(tmp_path / "solo", {**SHORT, "n_epochs": 20}))   # the advice
    assert res.returncode == 0


# ---- a deleted state.pt -------------------------------------------------------------------------
def test_a_half_finished_run_without_state_starts_over_saying_so(tmp_path, reference):
    cfg = RunConfig(**TINY)
    out = tmp_path / "run"
    t = Trainer.open(cfg, out)
    t.fit(progress_bar=False, until=60)
    t.close()
    (out / "state.pt").unlink()
    said = []
    run_training(cfg, out, progress_bar=False, log=said.append)
    assert said[0] == (f"note: run {cfg.run_id}: {out / 'state.pt'} is missing, but progress.json "
                       "lists 60/240 epochs trained; the run starts over from epoch 0 (its 4 "
                       "checkpoint row(s) and curves are replaced)")
    assert not any("resuming" in s for s in said)
    assert [a["epoch"] for a in RunDir(out).read_progress()["attempts"]] == [0, 0]
    assert_same(reference, RunDir(out))      # no row of the first attempt kept


# ---- damaged files: each message's advice, followed -----------------------------------------
def test_a_damaged_npy_header_is_rewritten_by_the_same_command(tmp_path, short):
    run = RunDir(tmp_path / "run")
    shutil.copytree(short.path, run.path)
    f = run.file("checkpoints.npy")
    data = bytearray(f.read_bytes())
    data[40] ^= 0x20                                       # inside the header's dict text
    f.write_bytes(bytes(data))
    with pytest.raises(RunDirError, match=r"\.npy header damaged \(rows intact\); run its python "
                                          r"-m grokhpc.train command again"):
        run.verify_checkpoints()
    res = run_cmd(train_cmd(run.path, SHORT))              # the advice
    assert res.returncode == 0, res.stderr
    assert f"note: {f}: .npy header damaged (rows intact); rewritten" in res.stdout
    run.verify_checkpoints()
    assert np.array_equal(np.load(f), np.load(short.file("checkpoints.npy")))
    res = run_cmd(train_cmd(run.path, SHORT))
    assert res.returncode == 0 and "already complete" in res.stdout


def test_damaged_rows_restored_from_a_copy_or_trained_again(tmp_path, short):
    run = RunDir(tmp_path / "run")
    shutil.copytree(short.path, run.path)
    f = run.file("checkpoints.npy")
    data = bytearray(f.read_bytes())
    data[NPY_HEADER_BYTES + 5] ^= 0x01                     # row 0
    f.write_bytes(bytes(data))
    res = run_cmd(train_cmd(run.path, SHORT))
    assert res.returncode == 2 and "row 0 of 3 damaged" in res.stderr
    assert res.stderr.endswith("; restore the file from a copy, or delete the run directory to "
                               "train the run again\n")
    shutil.copy(short.file("checkpoints.npy"), f)          # restored from a copy
    res = run_cmd(train_cmd(run.path, SHORT))
    assert res.returncode == 0 and "already complete" in res.stdout
    f.write_bytes(bytes(data))
    shutil.rmtree(run.path)                                # or the directory deleted
    res = run_cmd(train_cmd(run.path, SHORT))
    assert res.returncode == 0 and "already complete" not in res.stdout
    assert_same(short, run)


@pytest.mark.parametrize("damage", ["cut", "flipped"])
def test_a_bad_state_is_one_line_and_deleting_the_directory_trains_the_run_again(
        tmp_path, short, damage):
    """state.pt of a half-finished run cut short (unreadable) or with a flipped byte inside a
    tensor (torch.load cannot tell; its checksum can): one line saying to delete the directory
    to start the run over; done, the same command trains it whole."""
    cfg = RunConfig(**SHORT)
    out = tmp_path / "run"
    t = Trainer.open(cfg, out)
    t.fit(progress_bar=False, until=20)
    t.close()
    state = out / "state.pt"
    good = state.read_bytes()
    if damage == "cut":
        state.write_bytes(good[:100])
        why = "unreadable training state ("
    else:
        w = torch.load(state, weights_only=True)["model"]["embed.W_E"].numpy().tobytes()
        at = good.index(w) + len(w) // 2
        state.write_bytes(good[:at] + bytes([good[at] ^ 0x10]) + good[at + 1:])
        why = "damaged (its contents differ from the checksum written with them)"
    res = run_cmd(train_cmd(out, SHORT))
    assert res.returncode == 2 and res.stderr.startswith(f"error: {state}: {why}")
    assert res.stderr.endswith("; delete the run directory to start the run over\n")
    assert res.stderr.count("\n") == 1
    shutil.rmtree(out)                                     # the advice
    res = run_cmd(train_cmd(out, SHORT))
    assert res.returncode == 0
    assert_same(short, RunDir(out))


def test_another_run_in_the_directory_and_another_out_works(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--no-progress", *sets({**SHORT, "n_epochs": 20})]
    assert train.main(["--out", str(out), *args]) == 0
    before = hashes(out)
    assert train.main(["--out", str(out), *args, "--set", "weight_decay=0.5"]) == 2
    assert capsys.readouterr().err.endswith("; use another --out directory\n")
    assert hashes(out) == before
    assert train.main(["--out", str(tmp_path / "other"), *args,                # the advice
                       "--set", "weight_decay=0.5"]) == 0


def test_a_config_replaced_while_being_locked_says_try_again_and_trying_again_works(
        tmp_path, monkeypatch):
    from grokhpc import store

    run = RunDir(tmp_path / "run")
    run.create({"run_id": "abc123"})
    seen = iter(range(10**6))
    monkeypatch.setattr(store, "_inode", lambda st: (0, next(seen)))   # a new file every look
    with pytest.raises(RunDirError) as e:
        store.lock_run(run)
    assert str(e.value) == f"{run.file('config.json')}: replaced while being locked; try again"
    monkeypatch.undo()
    store.lock_run(run).release()                          # the advice
