"""Run-directory integrity without training: checkpoint checksums and what they catch, writes
that fail for want of space, the one-trainer lock between real processes, provenance columns."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import zlib

import numpy as np
import pytest

from conftest import TRY_LOCK
from grokhpc.checkpoints import NPY_HEADER_BYTES, append_checkpoint_row, check_checkpoints
from grokhpc.config import ConfigError, RunConfig, to_dict
from grokhpc.store import RunDir, RunDirError, RunLockedError, lock_run, read_json
from grokhpc.runtime import provenance_columns

N_COLS = 50
ROW = N_COLS * 4


def write_rows(path, k: int, seed: int = 0):
    rows = np.random.default_rng(seed).standard_normal((k, N_COLS)).astype(np.float32)
    crcs = [append_checkpoint_row(path, r, i) for i, r in enumerate(rows)]
    return rows, crcs


def flip_byte(path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x40]))


# ---- checksums ----------------------------------------------------------------------------------
def test_checksum_is_the_crc32_of_the_rows_little_endian_bytes(tmp_path):
    f = tmp_path / "checkpoints.npy"
    rows, crcs = write_rows(f, 4)
    assert crcs == [zlib.crc32(r.astype("<f4").tobytes()) for r in rows]
    assert np.array_equal(np.load(f), rows)
    check_checkpoints(f, 4, N_COLS, crcs)       # intact: no error


def test_truncated_file_names_the_missing_rows_and_is_not_touched(tmp_path):
    f = tmp_path / "checkpoints.npy"
    _, crcs = write_rows(f, 5)
    cut = NPY_HEADER_BYTES + 2 * ROW + 10     # rows 0 and 1 whole, row 2 partly, 3-4 gone
    os.truncate(f, cut)
    with pytest.raises(RunDirError) as e:
        check_checkpoints(f, 5, N_COLS, crcs)
    need = NPY_HEADER_BYTES + 5 * ROW
    assert str(e.value).startswith(f"{f}: rows 2-4 of 5 damaged (the file ends at {cut} of "
                                   f"{need} bytes)")
    assert "\n" not in str(e.value)
    assert f.stat().st_size == cut              # checking only reads


def test_flipped_bits_name_each_damaged_row(tmp_path):
    f = tmp_path / "checkpoints.npy"
    _, crcs = write_rows(f, 5)
    flip_byte(f, NPY_HEADER_BYTES + 1 * ROW + 7)
    with pytest.raises(RunDirError, match=r"checkpoints.npy: row 1 of 5 damaged \(their "
                                          r"checksums differ from those written at commit\)"):
        check_checkpoints(f, 5, N_COLS, crcs)
    flip_byte(f, NPY_HEADER_BYTES + 3 * ROW + ROW - 1)
    flip_byte(f, NPY_HEADER_BYTES + 4 * ROW)
    with pytest.raises(RunDirError, match=r"rows 1, 3-4 of 5 damaged"):
        check_checkpoints(f, 5, N_COLS, crcs)


def test_header_is_checked_and_an_uncommitted_row_after_the_commit_is_fine(tmp_path):
    f = tmp_path / "checkpoints.npy"
    rows, crcs = write_rows(f, 4)
    check_checkpoints(f, 3, N_COLS, crcs[:3])   # 4 rows on disk, 3 committed: a kill mid-commit
    flip_byte(f, 30)                            # inside the header's dict text
    with pytest.raises(RunDirError, match=r"\.npy header damaged \(rows intact"):
        check_checkpoints(f, 4, N_COLS, crcs)
    check_checkpoints(f, 4, N_COLS, crcs, header=False)   # a resume rewrites the header


def test_runs_written_before_checksums_are_checked_for_presence_only(tmp_path):
    f = tmp_path / "checkpoints.npy"
    append_checkpoint_row(f, np.zeros(N_COLS, np.float32), 0)
    append_checkpoint_row(f, np.zeros(N_COLS, np.float32), 1)
    check_checkpoints(f, 2, N_COLS, None)
    with pytest.raises(RunDirError, match="row 2 of 3 damaged"):
        check_checkpoints(f, 3, N_COLS, None)


def make_run_dir(path, k: int = 3, done: bool = True) -> tuple[RunDir, np.ndarray]:
    run = RunDir(path)
    run.create({"run_id": "abc123", "p": 11})
    rows, crcs = write_rows(run.file("checkpoints.npy"), k)
    run.write_progress({"run_id": "abc123", "epoch": 10 * (k - 1), "n_epochs": 10 * (k - 1),
                        "checkpoint_epochs": [10 * i for i in range(k)],
                        "checkpoint_crc32": crcs, "layout": [["w", [5, N_COLS // 5]]],
                        "done": done})
    run.file("summary.json").write_text("{}")
    return run, rows


def test_run_dir_reads_verify_and_a_short_file_makes_the_run_incomplete(tmp_path):
    run, rows = make_run_dir(tmp_path / "run")
    assert run.is_complete()
    epochs, w = run.checkpoints(mmap=False)
    assert epochs == [0, 10, 20] and np.array_equal(w, rows)
    flip_byte(run.file("checkpoints.npy"), NPY_HEADER_BYTES + 2 * ROW + 3)
    assert run.is_complete()                    # the cheap check sees sizes only
    with pytest.raises(RunDirError, match="row 2 of 3 damaged"):
        run.checkpoints()
    with pytest.raises(RunDirError, match="row 2 of 3 damaged"):
        run.verify_checkpoints()
    assert run.checkpoints(verify=False)[1].shape == (3, N_COLS)
    os.truncate(run.file("checkpoints.npy"), NPY_HEADER_BYTES + 2 * ROW)
    assert not run.is_complete()


def test_the_cheap_check_reads_the_last_row_length_and_header_only(tmp_path):
    f = tmp_path / "checkpoints.npy"
    _, crcs = write_rows(f, 4)
    flip_byte(f, NPY_HEADER_BYTES + 1 * ROW + 5)            # row 1: only a full check sees it
    check_checkpoints(f, 4, N_COLS, crcs, last_only=True)
    with pytest.raises(RunDirError, match="row 1 of 4 damaged"):
        check_checkpoints(f, 4, N_COLS, crcs)
    flip_byte(f, NPY_HEADER_BYTES + 3 * ROW + 9)            # the last row: both see it
    with pytest.raises(RunDirError, match=r"checkpoints.npy: row 3 of 4 damaged \(their"):
        check_checkpoints(f, 4, N_COLS, crcs, last_only=True)
    os.truncate(f, NPY_HEADER_BYTES + 2 * ROW)              # cut short: every row is read
    with pytest.raises(RunDirError, match="rows 1-3 of 4 damaged .the file ends at"):
        check_checkpoints(f, 4, N_COLS, crcs, last_only=True)


def test_a_damaged_header_makes_a_run_incomplete_so_training_it_again_rewrites_it(tmp_path):
    run, _ = make_run_dir(tmp_path / "run")
    flip_byte(run.file("checkpoints.npy"), 30)
    assert not run.is_complete()                # launch and train take it up again
    with pytest.raises(RunDirError) as e:
        run.verify_checkpoints()
    assert str(e.value) == (f"{run.file('checkpoints.npy')}: .npy header damaged (rows intact); "
                            "run its python -m grokhpc.train command again (or the sweep's "
                            "launch) to rewrite it")


# ---- strict JSON, and what a run directory may be -------------------------------------------
def test_run_files_are_strict_json(tmp_path):
    """A non-finite float (numpy's too) is written as null: a strict JSON reader (here one
    that refuses NaN and Infinity) reads every file grokhpc writes."""
    from grokhpc.store import atomic_write_json

    f = tmp_path / "summary.json"
    atomic_write_json(f, {"a": float("nan"), "b": [1.5, float("inf"), (np.float64("-inf"),)],
                          "c": {"d": np.float64("nan"), "e": 2}, "g": "nan"})
    strict = json.loads(f.read_text(), parse_constant=lambda c: pytest.fail(f"non-strict {c}"))
    assert strict == {"a": None, "b": [1.5, None, [None]], "c": {"d": None, "e": 2}, "g": "nan"}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]   # no temporary left


@pytest.mark.parametrize("marker", ["manifest.json", "runs"])
def test_a_sweep_directory_is_not_a_run_directory(tmp_path, marker):
    sweep = tmp_path / "sweep"
    (sweep / "runs").mkdir(parents=True) if marker == "runs" else \
        (sweep.mkdir(), (sweep / marker).write_text("{}"))
    before = sorted(os.listdir(sweep))
    with pytest.raises(RunDirError) as e:
        RunDir(sweep).create({"run_id": "abc123"})
    held = "runs/" if marker == "runs" else "manifest.json"
    assert str(e.value) == (f"{sweep}: a sweep directory (holds {held}), not a run directory; "
                            "use another --out directory")
    assert sorted(os.listdir(sweep)) == before
    RunDir(tmp_path / "elsewhere").create({"run_id": "abc123"})   # the advice: another one


def test_files_naming_another_run_are_refused_naming_the_file(tmp_path):
    from grokhpc.store import check_identity

    run, _ = make_run_dir(tmp_path / "run")
    check_identity(run)                           # config, progress and summary agree
    prog = run.read_progress()
    run.write_progress({**prog, "run_id": "def456"})
    with pytest.raises(RunDirError) as e:
        check_identity(run)
    assert str(e.value) == (f"{run.file('progress.json')}: belongs to run def456, but "
                            "config.json holds run abc123; restore the run directory from a "
                            "copy, or delete it to train the run again")
    run.write_progress(prog)
    run.file("summary.json").write_text('{"run_id": "def456"}')
    with pytest.raises(RunDirError, match=r"summary.json: belongs to run def456"):
        check_identity(run)


def test_a_directory_named_for_another_run_is_refused(tmp_path):
    from grokhpc.store import check_identity

    named = tmp_path / "0123456789ab"
    with pytest.raises(RunDirError) as e:            # a new one
        RunDir(named).create({"run_id": "ba9876543210"})
    assert str(e.value) == (f"{named}: named for run 0123456789ab, not ba9876543210; use "
                            "another --out directory")
    assert not named.exists()
    run, _ = make_run_dir(tmp_path / "x")
    run.path.rename(named)                           # an existing one, moved under that name
    with pytest.raises(RunDirError) as e:
        check_identity(RunDir(named))
    assert str(e.value) == (f"{named}: named for run 0123456789ab but holds run abc123 "
                            "(config.json); move it to a directory named for its run")
    with pytest.raises(RunDirError, match="named for run 0123456789ab"):
        RunDir(named).create({"run_id": "abc123"})
    named.rename(tmp_path / "abc123")                # the advice (abc123: not 12 hex, any name)
    check_identity(RunDir(tmp_path / "abc123"))
    good = tmp_path / "ba9876543210"                 # a directory named for its own run
    RunDir(good).create({"run_id": "ba9876543210"})
    check_identity(RunDir(good))


# ---- writes that fail for want of space ---------------------------------------------------------
FULL_DISK = """
import errno, json, resource, signal, sys
import numpy as np
from grokhpc.checkpoints import append_checkpoint_row
from grokhpc.store import atomic_write_bytes
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)      # a write past the limit raises EFBIG
d, limit = sys.argv[1], int(sys.argv[2])
with open(d + "/state.pt", "wb") as f:
    f.write(b"old state")
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
out = {"crcs": []}
rows = np.random.default_rng(0).standard_normal((5, 50)).astype(np.float32)
for i, r in enumerate(rows):
    try:
        out["crcs"].append(append_checkpoint_row(d + "/checkpoints.npy", r, i))
    except OSError as e:
        out["append"] = [e.errno == errno.EFBIG, e.filename]
        break
try:
    atomic_write_bytes(d + "/state.pt", b"x" * (limit + 1))
except OSError as e:
    out["state"] = [e.errno == errno.EFBIG, e.filename]
print(json.dumps(out))
"""


def test_a_write_past_the_file_size_limit_keeps_the_committed_rows_and_the_old_file(tmp_path):
    limit = NPY_HEADER_BYTES + 3 * ROW + ROW // 2     # room for three rows and half a fourth
    res = subprocess.run([sys.executable, "-c", FULL_DISK, str(tmp_path), str(limit)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    f = tmp_path / "checkpoints.npy"
    assert len(out["crcs"]) == 3
    assert out["append"] == [True, str(f)]
    assert f.stat().st_size == NPY_HEADER_BYTES + 3 * ROW      # the half row is cut back
    assert np.load(f).shape == (3, N_COLS)
    check_checkpoints(f, 3, N_COLS, out["crcs"])
    assert out["state"] == [True, str(tmp_path / "state.pt")]  # named as itself, not its temp
    assert (tmp_path / "state.pt").read_bytes() == b"old state"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints.npy", "state.pt"]


FULL_DISK_TABLE = """
import errno, json, os, resource, signal, sys
import pyarrow as pa
from grokhpc.store import atomic_write_table
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)      # a write past the limit raises EFBIG
d, limit = sys.argv[1], int(sys.argv[2])
f = d + "/measures.parquet"
atomic_write_table(f, pa.table({"epoch": [0, 100]}))
old = open(f, "rb").read()
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
out = {}
try:
    atomic_write_table(f, pa.table({"x": [float(i) for i in range(100_000)]}))
except OSError as e:
    out["error"] = [e.errno == errno.EFBIG, e.filename]
out["kept"] = open(f, "rb").read() == old
out["files"] = sorted(os.listdir(d))
print(json.dumps(out))
"""


def test_a_table_write_past_the_file_size_limit_names_the_table_and_keeps_the_old_one(tmp_path):
    """store's one atomic Parquet writer on a full disk: the OSError names the table (not its
    temporary), the previous file is whole and no temporary is left."""
    res = subprocess.run([sys.executable, "-c", FULL_DISK_TABLE, str(tmp_path), "4096"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out == {"error": [True, str(tmp_path / "measures.parquet")], "kept": True,
                   "files": ["measures.parquet"]}


# ---- one trainer per run directory --------------------------------------------------------------

HOLD_LOCK = """
import sys
from grokhpc.store import RunDir, lock_run
lock = lock_run(RunDir(sys.argv[1]))
print("holding", flush=True)
sys.stdin.readline()
"""


def try_lock(run: RunDir) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", TRY_LOCK, str(run.path)], capture_output=True,
                          text=True, timeout=120)


def test_second_process_is_refused_naming_the_holder_until_it_lets_go(tmp_path):
    run, _ = make_run_dir(tmp_path / "run", done=False)
    prog = run.read_progress()
    prog["attempts"] = [{"attempt": 1, "host": socket.gethostname(), "pid": os.getpid(),
                         "started": "2026-01-02T03:04:05+0000", "slurm_job": "77_3"}]
    run.write_progress(prog)
    first, second = lock_run(run), lock_run(run)    # two holders in one process share it
    res = try_lock(run)
    assert res.returncode == 3, res.stdout + res.stderr
    assert res.stdout.strip() == (
        f"{run.path}: another trainer holds this run (host {socket.gethostname()}, pid "
        f"{os.getpid()}, since 2026-01-02T03:04:05+0000, SLURM job 77_3); let it finish or "
        "stop it first")
    # reading config.json here must not drop the lock (closing any descriptor of a POSIX-locked
    # file would): reads go through the lock's descriptor
    assert run.read_config()["run_id"] == "abc123"
    assert read_json(run.file("config.json"))["p"] == 11
    first.release()
    first.release()                                  # idempotent: still one holder left
    assert try_lock(run).returncode == 3
    second.release()
    assert try_lock(run).stdout.strip() == "locked"


def test_run_config_read_by_the_lock_holder_keeps_the_lock_and_checks_the_run_id(tmp_path):
    """RunDir.run_config reads config.json into a RunConfig through the lock's descriptor: the
    holder keeps the lock after it. A config.json whose run_id is not the hash of its fields
    is refused in one line naming the file."""
    cfg = RunConfig(p=7, d_model=8, n_epochs=10)
    run = RunDir(tmp_path / "run")
    run.create({**to_dict(cfg), "run_id": cfg.run_id})
    lock = lock_run(run)
    try:
        assert run.run_config() == cfg
        assert try_lock(run).returncode == 3          # still held by this process
    finally:
        lock.release()
    assert try_lock(run).stdout.strip() == "locked"
    other = RunDir(tmp_path / "edited")
    other.create({**to_dict(cfg), "p": 11, "run_id": cfg.run_id})
    with pytest.raises(ConfigError) as e:
        other.run_config()
    assert str(e.value) == (f"{other.file('config.json')}: run_id: expected "
                            f"{cfg.replace(p=11).run_id} (the hash of its fields), got "
                            f"'{cfg.run_id}'")


def test_the_lock_dies_with_its_holder_no_stale_lock(tmp_path):
    run, _ = make_run_dir(tmp_path / "run", done=False)
    prog = run.read_progress()    # a record left by an earlier holder that is gone
    prog["attempts"] = [{"attempt": 1, "host": socket.gethostname(), "pid": 2 ** 22 + 1,
                         "started": "2026-01-01T00:00:00+0000"}]
    run.write_progress(prog)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run.path)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"     # the moment: it holds
        with pytest.raises(RunLockedError) as e:
            lock_run(run)
        # the record is stale; the kernel names the real holder
        assert f"(pid {holder.pid}, host not recorded yet)" in str(e.value)
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
        lock = lock_run(run)    # no stale lock to delete
        lock.release()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def test_a_file_system_without_locks_trains_unguarded_and_says_so(tmp_path, monkeypatch):
    run, _ = make_run_dir(tmp_path / "run")

    def no_locks(fd, cmd, *a):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
    monkeypatch.setattr(fcntl, "lockf", no_locks)
    lock = lock_run(run)
    assert lock.note == (f"note: {run.file('config.json')}: this file system takes no locks "
                         f"({os.strerror(errno.ENOLCK)}); nothing stops a second trainer on "
                         "this run")
    lock.release()


# ---- provenance ---------------------------------------------------------------------------------
def test_provenance_columns_take_the_latest_attempt_and_flag_changed_environments():
    base = {"host": "n1", "slurm_job": "5_1", "device": "cpu", "device_name": "Xeon",
            "torch_threads": 4, "python": "3.11.7", "torch": "2.13.0", "numpy": "2.1.0",
            "transformer_lens": "4.0", "grokhpc": "0.1.0", "grokhpc_commit": "ab" * 20}
    same = {"attempts": [{**base, "attempt": 1}, {**base, "attempt": 2, "host": "n2"}]}
    cols = provenance_columns(same)
    assert cols == {"host": "n2", "slurm_job": "5_1", "device_name": "Xeon", "torch_threads": 4,
                    "python_version": "3.11.7", "torch_version": "2.13.0",
                    "transformer_lens_version": "4.0", "numpy_version": "2.1.0",
                    "grokhpc_version": "0.1.0", "grokhpc_commit": "ab" * 20, "n_attempts": 2,
                    "attempts_differ": None}                 # another host alone changes nothing
    moved = {"attempts": [{**base, "attempt": 1},
                          {**base, "attempt": 7, "device": "cuda:0", "device_name": "H200"}]}
    cols = provenance_columns(moved)
    assert cols["n_attempts"] == 7 and cols["device_name"] == "H200"
    assert cols["attempts_differ"] == "device, device_name"
    # GPUs: another index of the same model, or another CPU thread count, changes nothing
    gpu = {**base, "device": "cuda:0", "device_name": "H200"}
    cols = provenance_columns({"attempts": [gpu, {**gpu, "device": "cuda:3",
                                                   "torch_threads": 16}]})
    assert cols["attempts_differ"] is None
    cols = provenance_columns({"attempts": [base, {**base, "torch_threads": 1}, base]})
    assert cols["attempts_differ"] == "torch_threads"      # on CPU it does, in any attempt
    assert provenance_columns({"epoch": 3}) == {} and provenance_columns(None) == {}
