"""Training into a run directory: files, curves, resume after SIGKILL, damaged files, a full
disk, one trainer per run, provenance, and errors."""

import errno
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from grokhpc.config import RunConfig
from grokhpc.config import to_dict as config_to_dict
from conftest import TRY_LOCK
from grokhpc.checkpoints import NPY_HEADER_BYTES, append_checkpoint_row
from grokhpc.store import CHECKPOINTS, CURVE_COLUMNS, RUN_FILES, RunDir, RunDirError
from grokhpc.runtime import provenance_columns
from grokhpc.stack import Stack
from grokhpc.train import Trainer, run_training

TINY = dict(p=13, train_frac=0.5, d_model=32, n_heads=4, d_head=8, d_mlp=64, n_epochs=240,
            checkpoint_every=20, eval_every=10, lr=3e-3, device="cpu")
TINY_SET = [f"--set={k}={v}" for k, v in TINY.items()]


REFERENCE_THREADS: list[int] = []


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted tiny run, and the torch threads it trained under (other tests may
    change the process's own afterwards)."""
    out = tmp_path_factory.mktemp("ref") / "run"
    REFERENCE_THREADS[:] = [torch.get_num_threads()]
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


def _plain_torch_loop(cfg: RunConfig) -> tuple[dict[int, np.ndarray], dict[str, list]]:
    """``cfg`` trained by a plain loop: the model's own ``last_logits`` and loss, torch's own
    optimiser stepped once per (mini)batch, the lr set per epoch and the weight norm held as the
    run fields say, the test split scored every ``eval_every`` epochs. Returns the flat weights
    at each checkpoint epoch and the curves (NaN where not scored)."""
    from grokhpc.data import make_dataset
    from grokhpc.lastpos import accuracy, cross_entropy
    from grokhpc.model import build_model, flat_weights
    from grokhpc.optim import (batch_generator, epoch_batches, rescale_to_norm, set_lr,
                               weight_norm)
    from grokhpc.runtime import deterministic_kernels

    model, data = build_model(cfg), make_dataset(cfg)
    train_x, train_y, test_x, test_y = (data.train_tokens, data.train_labels, data.test_tokens,
                                        data.test_labels)
    opt = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam}.get(cfg.optimizer)
    opt = opt(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas) \
        if opt else torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                    weight_decay=cfg.weight_decay)
    trainable = [p for p in model.parameters() if p.requires_grad]
    norm = weight_norm(trainable) if cfg.fixed_weight_norm else None
    gen = None if cfg.full_batch else batch_generator(cfg)
    rows, nan = {0: flat_weights(model).numpy()}, float("nan")
    curves = {k: [nan] * (cfg.n_epochs + 1) for k in ("train_loss", "test_loss")}
    n = len(train_y)
    for epoch in range(cfg.n_epochs + 1):
        if epoch % cfg.eval_every == 0 or epoch == cfg.n_epochs:
            with torch.inference_mode():
                logits = model.last_logits(test_x)
                curves["test_loss"][epoch] = cross_entropy(logits, test_y).item()
        if epoch == cfg.n_epochs:
            break
        set_lr(opt, epoch, cfg)
        total = 0.0
        for idx in epoch_batches(n, cfg, gen):
            x, y = (train_x, train_y) if idx is None else (train_x[idx], train_y[idx])
            with deterministic_kernels(True):
                loss = cross_entropy(model.last_logits(x), y)
                loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if norm is not None:
                rescale_to_norm(trainable, norm)
            total = total + loss.detach() * (len(y) / n)
        curves["train_loss"][epoch] = float(loss.detach() if idx is None else total)
        if (epoch + 1) % cfg.checkpoint_every == 0:
            rows[epoch + 1] = flat_weights(model).numpy()
    return rows, curves


@pytest.mark.parametrize("fields", [
    {},
    {"optimizer": "sgd", "momentum": 0.9, "lr": 0.05, "batch_size": 16, "warmup_epochs": 5,
     "lr_schedule": "cosine"},
    {"optimizer": "adam", "weight_decay": 0.1, "fixed_weight_norm": True, "init_scale": 2.0},
])
def test_a_solo_run_is_a_plain_torch_loop_bit_for_bit(tmp_path, fields, one_torch_thread):
    """A run trained alone (its stack of one) against a second implementation of the same
    training: every checkpoint row bit for bit, every train loss and every scored test loss
    exactly (the last epoch's train loss is scored after the last step: left out)."""
    cfg = RunConfig(**{**TINY, "n_epochs": 40, **fields})
    rows, curves = _plain_torch_loop(cfg)
    run = run_training(cfg, tmp_path / "run", progress_bar=False, log=lambda *_: None)
    epochs, weights = run.checkpoints(mmap=False)
    assert epochs == sorted(rows) == [0, 20, 40]
    for e, row in zip(epochs, weights):
        assert np.array_equal(row, rows[e]), e
    got = run.read_curves()
    assert got["train_loss"].tolist()[:-1] == curves["train_loss"][:-1]
    assert np.array_equal(got["test_loss"].to_numpy(), np.array(curves["test_loss"]),
                          equal_nan=True)


def _train_cmd(out, *extra):
    return [sys.executable, "-m", "grokhpc.train", "--out", str(out), "--no-progress", *TINY_SET,
            *extra]


def _wait_for_epoch(proc, out: Path, target: int) -> None:
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        prog = RunDir(out).read_progress() if (out / "progress.json").exists() else None
        if prog and prog["epoch"] >= target:
            return
        time.sleep(0.02)


def test_sigkill_at_random_moments_then_resume_is_bit_identical(tmp_path, reference):
    """The first process writes state.pt with every checkpoint row, the later ones only at
    their start (state by time, with an interval no test reaches): the last one killed has
    written rows past the last state. The resume starts from that state, recomputes those
    epochs and rows, and ends bit-identical to the uninterrupted run."""
    out = tmp_path / "run"
    rng = random.Random(0)
    kills = 0
    for target, every in ((30, "0"), (110, "1000"), (190, "1000")):
        proc = subprocess.Popen(_train_cmd(out, "--state-every", every), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
        _wait_for_epoch(proc, out, target)
        time.sleep(rng.uniform(0.0, 0.15))   # land anywhere: mid-epoch, mid-commit
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills >= 2
    prog = RunDir(out).read_progress()
    resumed_epoch = prog["state_epoch"]
    assert 20 <= resumed_epoch < 110 <= prog["epoch"] < 240   # rows past the state
    assert len(prog["checkpoint_epochs"]) > resumed_epoch // 20 + 1
    done = subprocess.run(_train_cmd(out), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"resuming at epoch {resumed_epoch}/240" in done.stdout

    assert_bit_identical(reference, RunDir(out))
    # one record per process that trained the run, numbered, each from where it started
    attempts = RunDir(out).read_progress()["attempts"]
    assert [a["attempt"] for a in attempts] == list(range(1, len(attempts) + 1))
    assert 2 <= len(attempts) <= kills + 1   # a process killed while starting leaves none
    assert attempts[0]["epoch"] == 0 and attempts[-1]["epoch"] == resumed_epoch
    assert [a["epoch"] for a in attempts] == sorted(a["epoch"] for a in attempts)
    assert RunDir(out).read_summary()["n_attempts"] == len(attempts)


def test_usr2_writes_the_state_then_ends_the_process(tmp_path, reference):
    """SLURM's warning (USR2) to a plain ``python -m grokhpc.train``: the state is written at
    the next epoch boundary, then the signal ends the process as it would have; the resume
    starts exactly there and ends bit-identical."""
    out = tmp_path / "run"
    proc = subprocess.Popen(_train_cmd(out, "--state-every", "1000"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    _wait_for_epoch(proc, out, 50)
    proc.send_signal(signal.SIGUSR2)
    assert proc.wait(timeout=120) == -signal.SIGUSR2
    prog = RunDir(out).read_progress()
    state = torch.load(out / "state.pt", weights_only=True)
    assert prog["state_epoch"] == prog["epoch"] == state["epoch"] >= 50
    assert not (out / "error.txt").exists()
    done = subprocess.run(_train_cmd(out), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"resuming at epoch {state['epoch']}/240" in done.stdout
    assert_bit_identical(reference, RunDir(out))


def assert_bit_identical(a: RunDir, b: RunDir) -> None:
    c1, e1, w1, s1 = _snapshot(a)
    c2, e2, w2, s2 = _snapshot(b)
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
    t.fit(progress_bar=False, until=20)             # epochs 0 and 20 committed
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


# ---- damaged files ------------------------------------------------------------------------------
def _copy(reference: RunDir, dest) -> RunDir:
    shutil.copytree(reference.path, dest)
    return RunDir(dest)


def _hashes(run: RunDir) -> dict[str, str]:
    return {f: hashlib.sha256((run.path / f).read_bytes()).hexdigest()
            for f in sorted(os.listdir(run.path))}


def _n_cols(run: RunDir) -> int:
    return sum(math.prod(s) for _, s in run.read_progress()["layout"])


def _set_done(run: RunDir, done: bool) -> None:
    prog = run.read_progress()
    prog["done"] = done
    run.file("progress.json").write_text(json.dumps(prog))


def _quiet_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def test_truncated_checkpoints_are_reported_by_rows_and_never_extended(tmp_path, reference):
    """A finished run's checkpoints.npy cut to 5,000 bytes, done set false, the same command."""
    run = _copy(reference, tmp_path / "run")
    n, row = len(run.read_progress()["checkpoint_epochs"]), _n_cols(run) * 4
    os.truncate(run.file(CHECKPOINTS), 5000)
    _set_done(run, False)
    before = _hashes(run)
    res = subprocess.run(_train_cmd(run.path), capture_output=True, text=True, timeout=300,
                         env=_quiet_env())
    assert res.returncode == 2
    first = (5000 - NPY_HEADER_BYTES) // row          # the first row the file does not hold whole
    line = (f"{run.file(CHECKPOINTS)}: rows {first}-{n - 1} of {n} damaged (the file ends at "
            f"5000 of {NPY_HEADER_BYTES + n * row} bytes); restore the file from a copy, or "
            "delete the run directory to train the run again")
    assert res.stderr == f"error: {line}\n"
    assert "resuming" not in res.stdout
    after = _hashes(run)
    assert line in run.read_error()                   # the failure is recorded beside the run,
    del after["error.txt"]
    assert after == before                            # and nothing else is touched
    from grokhpc import analyze                       # nor drawn from
    with pytest.raises(RunDirError, match="rows .* damaged"):
        analyze.analyze(run.path, tmp_path / "figs", formats=("html",), log=lambda *_: None)


def test_flipped_bits_in_a_complete_run_are_found_not_called_complete(tmp_path, reference):
    run = _copy(reference, tmp_path / "run")
    n, row = len(run.read_progress()["checkpoint_epochs"]), _n_cols(run) * 4
    f = run.file(CHECKPOINTS)
    data = bytearray(f.read_bytes())
    data[NPY_HEADER_BYTES + (n - 1) * row + row // 2] ^= 0x01   # one bit of the last row
    f.write_bytes(bytes(data))
    res = subprocess.run(_train_cmd(run.path), capture_output=True, text=True, timeout=300,
                         env=_quiet_env())
    assert res.returncode == 2 and "already complete" not in res.stdout
    assert res.stderr.startswith(f"error: {f}: row {n - 1} of {n} damaged (their checksums "
                                 "differ from those written at commit)")
    assert res.stderr.count("\n") == 1


def test_damaged_or_truncated_state_is_one_line_and_kept(tmp_path, reference):
    run = _copy(reference, tmp_path / "run")
    _set_done(run, False)
    f = run.file("state.pt")
    good = f.read_bytes()
    w_e = torch.load(f, weights_only=True)["model"]["embed.W_E"].numpy().tobytes()
    at = good.index(w_e) + len(w_e) // 2              # inside a tensor: torch.load cannot tell
    f.write_bytes(good[:at] + bytes([good[at] ^ 0x10]) + good[at + 1:])
    torch.load(f, weights_only=True)                  # (loads without complaint)
    with pytest.raises(RunDirError) as e:
        Trainer.open(RunConfig(**TINY), run.path)
    assert str(e.value).startswith(f"{f}: damaged (its contents differ from the checksum")
    f.write_bytes(good[: len(good) // 2])             # a state.pt cut short
    with pytest.raises(RunDirError) as e:
        Trainer.open(RunConfig(**TINY), run.path)
    assert str(e.value).startswith(f"{f}: unreadable training state") and "\n" not in str(e.value)
    assert f.read_bytes() == good[: len(good) // 2]


# ---- a disk that fills up -----------------------------------------------------------------------
def test_full_disk_mid_commit_keeps_the_last_commit_and_the_same_command_resumes(
        tmp_path, reference):
    """RLIMIT_FSIZE stands in for a full disk or quota: a write past it raises EFBIG. The limit
    leaves room for state.pt and for k checkpoint rows, so the commit of row k fails (state.pt
    with every row here, so the last commit is the row before)."""
    row = _n_cols(reference) * 4
    k = math.ceil(1.2 * reference.file("state.pt").stat().st_size / row)
    limit = NPY_HEADER_BYTES + k * row + row // 2
    every, n = TINY["checkpoint_every"], TINY["n_epochs"]
    assert k * every < n

    def full_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    out = tmp_path / "run"
    res = subprocess.run(_train_cmd(out, "--state-every", "0"), capture_output=True, text=True,
                         timeout=300, preexec_fn=full_disk, env=_quiet_env())
    assert res.returncode == 2, res.stderr
    last = (k - 1) * every
    assert res.stderr == (f"error: {out / CHECKPOINTS}: {os.strerror(errno.EFBIG)} while "
                          f"committing epoch {k * every}; the run keeps its last commit, epoch "
                          f"{last}; free some space and rerun the same command to resume\n")
    run = RunDir(out)                                 # every file as the last commit left it
    prog = run.read_progress()
    assert prog["epoch"] == last and prog["checkpoint_epochs"] == list(range(0, last + 1, every))
    assert torch.load(run.file("state.pt"), weights_only=True)["epoch"] == last
    assert run.file(CHECKPOINTS).stat().st_size == NPY_HEADER_BYTES + k * row
    run.verify_checkpoints()
    assert run.read_curves()["epoch"].tolist() == list(range(last + 1))
    assert not list(out.glob(".*"))
    # space is back: the same command, now in a SLURM array task, resumes and ends bit-identical
    res = subprocess.run(_train_cmd(out), capture_output=True, text=True, timeout=300,
                         env=_quiet_env(SLURM_ARRAY_JOB_ID="77", SLURM_ARRAY_TASK_ID="3",
                                        SLURM_JOB_ID="80"))
    assert res.returncode == 0, res.stderr
    assert f"resuming at epoch {last}/{n}" in res.stdout
    assert_bit_identical(reference, run)
    attempts = run.read_progress()["attempts"]
    assert [(a["attempt"], a["epoch"], a["slurm_job"]) for a in attempts] == \
        [(1, 0, None), (2, last, "77_3")]
    assert run.read_summary()["slurm_job"] == "77_3" and run.read_summary()["n_attempts"] == 2


# ---- one trainer per run directory --------------------------------------------------------------
HOLDER = """
import json, sys
from grokhpc.config import RunConfig
from grokhpc.config import to_dict as config_to_dict
from grokhpc.train import Trainer
t = Trainer.open(RunConfig(**json.loads(sys.argv[2])), sys.argv[1])
print("open", flush=True)
sys.stdin.readline()
if sys.argv[3] == "train":
    t.fit(progress_bar=False)
    t.finish()                      # reads config.json in this process: the lock must survive
    print("finished", flush=True)
    sys.stdin.readline()
t.close()
print("closed", flush=True)
sys.stdin.readline()
"""

def test_resuming_with_another_thread_count_is_noted_and_recorded(tmp_path):
    """On CPU the result depends on torch's thread count: a resume under another one says so."""
    threads = torch.get_num_threads()
    cfg = RunConfig(**SHORT)
    try:
        torch.set_num_threads(1)
        Trainer.open(cfg, tmp_path / "run").close()
        torch.set_num_threads(2)
        t = Trainer.open(cfg, tmp_path / "run")
        t.close()
    finally:
        torch.set_num_threads(threads)
    assert t.notes == [f"note: run {cfg.run_id} resumes with a different torch_threads (1 -> 2): "
                       "it will not be bit-identical to an uninterrupted run"]
    cols = provenance_columns(RunDir(tmp_path / "run").read_progress())
    assert cols["n_attempts"] == 2 and cols["attempts_differ"] == "torch_threads"



SHORT = {**TINY, "n_epochs": 20}
SHORT_SET = [f"--set={k}={v}" for k, v in SHORT.items()]


def _holder(out, cfg: dict, mode: str) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(out), json.dumps(cfg), mode],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                         env=_quiet_env())
    return p


def _step(p: subprocess.Popen, expect: str) -> None:
    """Let the holder go on to its next stop, and wait until it is there."""
    if expect != "open":
        p.stdin.write("\n")
        p.stdin.flush()
    assert p.stdout.readline().strip() == expect


def _holder_line(run: RunDir, pid: int) -> str:
    rec = run.read_progress()["attempts"][-1]
    assert rec["pid"] == pid and rec["host"] == socket.gethostname()
    return (f"error: {run.path}: another trainer holds this run (host {socket.gethostname()}, "
            f"pid {pid}, since {rec['started']}); let it finish or stop it first\n")


def test_a_second_trainer_on_the_same_run_is_refused_naming_the_holder(tmp_path):
    run = RunDir(tmp_path / "run")
    cmd = [*_train_cmd(run.path)[:-len(TINY_SET)], *SHORT_SET]
    holder = _holder(run.path, SHORT, "train")
    try:
        _step(holder, "open")
        before = _hashes(run)
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_quiet_env())
        assert res.returncode == 2
        assert res.stderr == _holder_line(run, holder.pid)
        assert _hashes(run) == before                 # no error.txt, nothing rewritten
        _step(holder, "finished")   # complete now (a trainer would leave it alone), still held
        res = subprocess.run([sys.executable, "-c", TRY_LOCK, str(run.path)], capture_output=True,
                             text=True, timeout=300, env=_quiet_env())
        assert res.returncode == 3 and f"error: {res.stdout}" == _holder_line(run, holder.pid)
        _step(holder, "closed")
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_quiet_env())
        assert res.returncode == 0 and "already complete" in res.stdout
    finally:
        holder.kill()
        holder.wait()


PACKED_HOLDER = """
import json, sys
from grokhpc import measures, train_batched
from grokhpc.config import RunConfig
from grokhpc.config import to_dict as config_to_dict
real, stops = measures.finalize_run, []
def finalize_run(run, **kw):        # the first finish: every run of the group is still held
    if not stops:
        stops.append(1)
        print("finishing", flush=True)
        sys.stdin.readline()
    return real(run, **kw)
measures.finalize_run = finalize_run
cfgs = [RunConfig(**c) for c in json.loads(sys.argv[2])]
train_batched.train_group(cfgs, sys.argv[1].split(","), progress_bar=False, log=lambda *a: None)
print("done", flush=True)
"""


def test_the_packed_trainer_takes_each_runs_lock(tmp_path):
    cfgs = [SHORT, {**SHORT, "model_seed": 2}]
    dirs = [tmp_path / "a", tmp_path / "b"]
    for c, d in zip(cfgs, dirs):
        RunDir(d).create({**config_to_dict(RunConfig(**c)), "run_id": RunConfig(**c).run_id})
    solo_b = [*_train_cmd(dirs[1])[:-len(TINY_SET)],
              *[f"--set={k}={v}" for k, v in cfgs[1].items()]]
    # a solo trainer holds b: the packed trainer is refused
    holder = _holder(dirs[1], cfgs[1], "hold")
    try:
        _step(holder, "open")
        res = subprocess.run([sys.executable, "-m", "grokhpc.train_batched", *map(str, dirs),
                              "--no-progress"], capture_output=True, text=True, timeout=300,
                             env=_quiet_env())
        assert res.returncode == 2
        assert res.stderr == _holder_line(RunDir(dirs[1]), holder.pid)
        _step(holder, "closed")
    finally:
        holder.kill()
        holder.wait()
    # the packed trainer holds both: a solo trainer is refused
    packed = subprocess.Popen([sys.executable, "-c", PACKED_HOLDER, ",".join(map(str, dirs)),
                               json.dumps(cfgs)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env=_quiet_env())
    try:
        assert packed.stdout.readline().strip() == "finishing"
        res = subprocess.run(solo_b, capture_output=True, text=True, timeout=300,
                             env=_quiet_env())
        assert res.returncode == 2
        assert res.stderr == _holder_line(RunDir(dirs[1]), packed.pid)
        _step(packed, "done")
        assert packed.wait(timeout=300) == 0
    finally:
        packed.kill()
        packed.wait()
    assert all(RunDir(d).is_complete() for d in dirs)


# ---- provenance ---------------------------------------------------------------------------------
def test_provenance_of_each_attempt_in_progress_and_summary(reference):
    import grokhpc

    (rec,) = reference.read_progress()["attempts"]
    assert rec["attempt"] == 1 and rec["epoch"] == 0 and rec["pid"] == os.getpid()
    assert rec["host"] == socket.gethostname() and rec["device"] == "cpu"
    assert rec["python"] == platform.python_version() and rec["torch"] == torch.__version__
    assert rec["numpy"] == np.__version__
    assert rec["transformer_lens"] == importlib.metadata.version("transformer_lens")
    assert rec["grokhpc"] == importlib.metadata.version("grokhpc")
    assert rec["torch_threads"] == REFERENCE_THREADS[0]
    assert rec["matmul_precision"] == "highest"   # the run's field, at its default
    models = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text()
              .splitlines() if ln.startswith("model name")]
    assert rec["device_name"] == (models[0] if models else rec["device_name"]) and \
        rec["device_name"]
    root = Path(grokhpc.__file__).resolve().parent.parent
    if (root / ".git").exists() and shutil.which("git"):   # a checkout: git itself agrees
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                              text=True).stdout.strip()
        assert rec["grokhpc_commit"] == head
    else:
        assert rec["grokhpc_commit"] is None
    summary = reference.read_summary()
    cols = provenance_columns(reference.read_progress())
    assert cols["n_attempts"] == 1 and cols["attempts_differ"] is None
    assert {k: summary[k] for k in cols} == cols


@pytest.mark.parametrize("precision", ["high", "highest"])
def test_training_runs_at_the_runs_matmul_precision(tmp_path, monkeypatch, precision):
    """Every step and evaluation sees the run's matmul_precision (read from inside them), the
    attempt records it, the measures run at highest, and the process's own setting (here
    "medium") is back afterwards."""
    import grokhpc.measures

    seen: dict[str, set] = {"step": set(), "evaluate": set(), "measures": set()}

    def spy(name, fn):
        def inner(*a, **kw):
            seen[name].add(torch.get_float32_matmul_precision())
            return fn(*a, **kw)
        return inner

    monkeypatch.setattr(Stack, "_update", spy("step", Stack._update))
    monkeypatch.setattr(Stack, "evaluate", spy("evaluate", Stack.evaluate))
    monkeypatch.setattr(Trainer, "evaluate", spy("evaluate", Trainer.evaluate))
    monkeypatch.setattr(grokhpc.measures, "finalize_run",
                        spy("measures", grokhpc.measures.finalize_run))
    cfg = RunConfig(**{**TINY, "n_epochs": 40, "matmul_precision": precision})
    torch.set_float32_matmul_precision("medium")
    try:
        run_training(cfg, tmp_path / "run", progress_bar=False, log=lambda *_: None)
        after = torch.get_float32_matmul_precision()
    finally:
        torch.set_float32_matmul_precision("highest")
    assert seen == {"step": {precision}, "evaluate": {precision}, "measures": {"highest"}}
    assert after == "medium"
    (rec,) = RunDir(tmp_path / "run").read_progress()["attempts"]
    assert rec["matmul_precision"] == precision


def test_matmul_precision_enters_run_id_only_when_high():
    assert RunConfig(matmul_precision="highest").run_id == "2c3d4cea9af7"   # the seed's id
    high = RunConfig(matmul_precision="high")
    assert high.run_id != "2c3d4cea9af7" and high.identity()["matmul_precision"] == "high"
    assert "matmul_precision" not in RunConfig().identity()


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
