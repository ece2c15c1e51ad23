"""Run directories and their files: the one place that knows the on-disk layout.

Stage: foundations. The trainers write a run directory through this module, and status,
measures, analyze, the tables and the API read it back; file names are spelled only here.
A run directory holds at most eight files, however many checkpoints it has (HPC file quotas):

===================  ==========================================================================
``config.json``      the resolved RunConfig, plus ``run_id``
``progress.json``    epoch reached, planned epochs, checkpoint epochs, parameter layout, state
``state.pt``         the latest resumable training state (model, optimiser, curves so far)
``checkpoints.npy``  one row of flattened weights per checkpoint (``n_ckpt x n_params``), float32
                     or 16-bit as config.json's ``checkpoint_dtype`` says (``grokhpc.checkpoints``)
``curves.parquet``   one row per epoch: epoch, train_loss, train_acc, test_loss, test_acc
``measures.parquet`` one row per checkpoint: progress measures (written by grokhpc.measures)
``summary.json``     phase epochs, grokking epoch, key frequencies (written at the end)
``error.txt``        the traceback of a run that failed (removed when it succeeds)
``llc.json``         LLC estimates per checkpoint, only where asked for (grokhpc.llc_run)
===================  ==========================================================================

Every file appears whole or not at all: each is written to a temporary name in the same
directory, flushed to disk and renamed over the old one (``atomic_write_bytes``, ``_json``,
``_table``: the one atomic Parquet writer, which the aggregated tables use too).
``checkpoints.npy`` is the exception that keeps writes linear in the run's length: rows are
appended, and only the first ``len(progress["checkpoint_epochs"])`` rows are valid
(``grokhpc.checkpoints``). The commit point of a training step is ``state.pt``;
``progress.json`` and ``curves.parquet`` are rewritten from it after each commit.

Integrity: each checkpoint row's CRC-32 is kept with the commit (``state.pt``) and its view
(``progress.json``, ``checkpoint_crc32``); resuming, measuring, analysing and aggregating check
the rows against it (``RunDir.verify_checkpoints``; the checks are ``grokhpc.checkpoints``').

One trainer per run: a trainer holds an exclusive POSIX record lock (``fcntl.lockf``) on the
run's ``config.json`` -- the one file written once and never replaced -- for as long as it
trains (``lock_run``). The kernel (or the NFS lock manager) drops it when its holder dies, so
there is never a stale lock to remove. The holder's host and pid are the last entry of
``progress.json``'s ``attempts``, one record per process that trained the run (its provenance).

This module imports neither torch nor plotly: aggregate and status read run directories fast.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import socket
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from .checkpoints import (CHECKPOINT_STORAGE, NPY_HEADER_BYTES, CheckpointRows, RunDirError,
                          check_checkpoints, check_storage, decode_rows, header_holds,
                          row_itemsize)
from .config import RunConfig, clip, from_run_dict, shown

CONFIG = "config.json"
PROGRESS = "progress.json"
STATE = "state.pt"
CHECKPOINTS = "checkpoints.npy"
CURVES = "curves.parquet"
MEASURES = "measures.parquet"
SUMMARY = "summary.json"
ERROR = "error.txt"
RUN_FILES = (CONFIG, PROGRESS, STATE, CHECKPOINTS, CURVES, MEASURES, SUMMARY, ERROR)

CURVE_COLUMNS = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "softmax_collapse")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---- atomic writes --------------------------------------------------------------------------
def temp_beside(path: str | os.PathLike) -> Path:
    """A new empty temporary file in ``path``'s directory (``.NAME.XXXXXXXX.tmp``, with the
    permissions the umask gives a new file), to write and then rename over ``path``."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        e.filename = str(path)   # name the file to be written, not a temporary never made
        raise
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
    except BaseException:
        os.unlink(tmp)
        raise
    return Path(tmp)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half."""
    path = Path(path)
    tmp = None
    try:
        tmp = temp_beside(path)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            e.filename = str(path)   # name the file being written, not its temporary
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Strict JSON, atomically: a non-finite float (which strict JSON readers refuse, and which
    means "no value" wherever grokhpc writes one) is written as null."""
    text = json.dumps(_finite_or_null(obj), indent=2, sort_keys=True, allow_nan=False)
    atomic_write_bytes(path, (text + "\n").encode())


def _finite_or_null(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_null(v) for v in obj]
    return obj


def atomic_write_table(path: str | os.PathLike, table, **options) -> None:
    """Write a pyarrow Table as Parquet to ``path`` atomically: into :func:`temp_beside`, then
    renamed over ``path``. ``options`` as :func:`write_table`'s."""
    tmp = temp_beside(path)
    write_table(tmp, table, name=path, **options)
    try:
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            e.filename = str(path)
        raise


def write_table(target: str | os.PathLike, table, *, name: str | os.PathLike | None = None,
                dictionary: bool | Iterable[str] = True, statistics: bool | Iterable[str] = True,
                fsync: bool = True) -> None:
    """Write ``table`` as zstd Parquet into ``target`` itself, flushed to disk unless ``fsync``
    is False: the staging step of :func:`atomic_write_table`, and of a caller that puts several
    files in place together. ``dictionary`` and ``statistics``: every column (True) or these
    columns. On failure ``target`` is removed and the OSError names ``name`` (the file being
    written; default ``target``)."""
    import pyarrow.parquet as pq

    target = Path(target)

    def columns(option):
        return option if isinstance(option, bool) else list(option)
    try:
        pq.write_table(table, target, compression="zstd", use_dictionary=columns(dictionary),
                       write_statistics=columns(statistics))
        if fsync:
            fd = os.open(target, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    except BaseException as e:
        target.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno:   # pyarrow names no file
            raise OSError(e.errno, os.strerror(e.errno), str(name or target)) from e
        raise


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(_read_bytes(path))
    except json.JSONDecodeError as e:
        raise RunDirError(f"{path}: corrupt JSON ({e.msg} at line {e.lineno})") from None
    except UnicodeDecodeError:
        raise RunDirError(f"{path}: corrupt JSON (not UTF-8 text)") from None


def _read_bytes(path: Path) -> bytes:
    """A file's bytes; a config.json this process holds locked is read through the lock's own
    descriptor (closing any other descriptor of it would drop the lock: POSIX)."""
    fd = _held_fd(path)
    if fd is None:
        with open(path, "rb") as f:
            return f.read()
    size, chunks, offset = os.fstat(fd).st_size, [], 0
    while offset < size:
        chunk = os.pread(fd, size - offset, offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


# ---- one trainer per run: a POSIX record lock on config.json ----------------------------------
class RunLockedError(RunDirError):
    """Another process trains this run."""


_HELD: dict[tuple[int, int], list[int]] = {}   # (st_dev, st_ino) of a locked file -> [fd, users]
_HELD_GUARD = threading.Lock()


def _inode(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def _held_fd(path: Path) -> int | None:
    if not _HELD:
        return None
    try:
        return _HELD.get(_inode(os.stat(path)), [None])[0]
    except OSError:
        return None


class RunLock:
    """This process's hold on one run (``lock_run``); ``release`` is idempotent.

    POSIX record locks belong to the process, and closing *any* descriptor of the locked file
    drops them: so the process keeps one descriptor per locked file, shared by every holder in
    it (counted), and reads the file through that descriptor (``read_json``)."""

    def __init__(self, key: tuple[int, int] | None, note: str | None = None):
        self.key, self.released = key, False
        self.note = note   # why there is no lock (a file system without POSIX locks)

    def release(self) -> None:
        import fcntl

        with _HELD_GUARD:
            if self.released:
                return
            self.released = True
            entry = _HELD.get(self.key)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] == 0:
                del _HELD[self.key]
                try:
                    fcntl.lockf(entry[0], fcntl.LOCK_UN)
                finally:
                    os.close(entry[0])


def lock_run(run: "RunDir") -> RunLock:
    """Take the run's lock (an exclusive ``lockf`` on its config.json), or raise
    RunLockedError naming the holder. Several holders in one process share it. On a file
    system that takes no locks, a RunLock without one whose ``note`` says so."""
    import fcntl

    path = run.file(CONFIG)
    for _ in range(8):   # a config.json replaced under us (two first runs racing): lock the new one
        key = _inode(os.stat(path))
        with _HELD_GUARD:
            if key in _HELD:
                _HELD[key][1] += 1
                return RunLock(key)
            try:
                fd = os.open(path, os.O_RDWR)
            except OSError as e:
                raise RunDirError(f"{path}: cannot open to lock the run ({e.strerror})") from None
            try:
                if _inode(os.fstat(fd)) == key:
                    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    if _inode(os.stat(path)) == key:
                        _HELD[key] = [fd, 1]
                        return RunLock(key)
            except OSError as e:
                holder = _lock_holder(run, fd) if e.errno in (errno.EACCES, errno.EAGAIN) else None
                os.close(fd)
                if e.errno in NO_LOCKS:
                    return RunLock(None, f"note: {path}: this file system takes no locks "
                                         f"({e.strerror}); nothing stops a second trainer on "
                                         "this run")
                if holder is None:
                    raise RunDirError(f"{path}: cannot lock the run ({e.strerror})") from None
                raise RunLockedError(f"{run.path}: another trainer holds this run "
                                     f"({clip(holder)}); let it finish or stop it first") from None
            os.close(fd)
    raise RunDirError(f"{path}: replaced while being locked; try again")


# What a file system without POSIX locks answers (an NFS mount without a lock manager, a Lustre
# mount without -o flock): training goes on, unguarded, and says so.
NO_LOCKS = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)


def _lock_owner_pid(fd: int) -> int | None:
    """The pid the kernel reports for the conflicting lock (F_GETLK; Linux layout)."""
    import fcntl
    import struct
    import sys

    if not sys.platform.startswith("linux"):
        return None
    query = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
    try:
        l_type, _, _, _, pid = struct.unpack("hhqqi4x", fcntl.fcntl(fd, fcntl.F_GETLK, query))
    except OSError:
        return None
    return pid if l_type != fcntl.F_UNLCK and pid > 0 else None


def _lock_holder(run: "RunDir", fd: int) -> str:
    """'host H, pid P, since T, SLURM job J' of the lock's holder: its record in progress.json
    (the last attempt), checked against the pid the kernel reports where that is meaningful."""
    pid = _lock_owner_pid(fd)
    try:
        attempts = (run.read_progress() or {}).get("attempts") or []
    except (RunDirError, OSError):
        attempts = []
    last = attempts[-1] if attempts and isinstance(attempts[-1], dict) else {}
    here = socket.gethostname()
    if last.get("pid") and (pid is None or pid == last["pid"] or last.get("host") != here):
        text = f"host {last.get('host')}, pid {last['pid']}, since {last.get('started')}"
        return text + (f", SLURM job {last['slurm_job']}" if last.get("slurm_job") else "")
    if pid is not None:
        return f"pid {pid}, host not recorded yet"
    return "holder not recorded yet"


# ---- a run directory ------------------------------------------------------------------------
class RunDir:
    """One run's directory. Cheap to create; reads files lazily."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def file(self, name: str) -> Path:
        return self.path / name

    # -- creation
    def create(self, config: dict[str, Any]) -> None:
        """Make the directory and write config.json; refuse a sweep's directory, a directory
        holding another run or named for another run (``check_identity``)."""
        refuse_sweep_root(self.path)
        other = _named_for_another(self.path, config.get("run_id"))
        if other and not self.exists():
            raise RunDirError(f"{self.path}: named for run {other}, not {config.get('run_id')}; "
                              "use another --out directory")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunDirError(f"{self.path}: cannot create run directory ({e.strerror})") from None
        if not os.access(self.path, os.W_OK):
            raise RunDirError(f"{self.path}: run directory is not writable")
        existing = self.file(CONFIG)
        if existing.exists():
            old = self.read_config()
            if old.get("run_id") != config.get("run_id"):
                raise RunDirError(
                    f"{existing}: holds run {clip(old.get('run_id'))}, not "
                    f"{config.get('run_id')}; use another --out directory")
            check_identity(self, old)
            return
        atomic_write_json(existing, config)

    # -- reads
    def exists(self) -> bool:
        return self.file(CONFIG).exists()

    def read_config(self) -> dict[str, Any]:
        if not self.file(CONFIG).exists():
            raise RunDirError(f"{self.path}: not a run directory (no {CONFIG})")
        return read_json(self.file(CONFIG))

    def run_config(self) -> RunConfig:
        """config.json as a RunConfig (``config.from_run_dict``: its run_id must be the hash of
        its fields). Read through ``read_json``, so a trainer holding the run's lock keeps it:
        opening and closing config.json any other way (``config.load_json``) would drop it."""
        return from_run_dict(self.read_config(), source=str(self.file(CONFIG)))

    def read_progress(self) -> dict[str, Any] | None:
        f = self.file(PROGRESS)
        return read_json(f) if f.exists() else None

    def read_summary(self) -> dict[str, Any] | None:
        f = self.file(SUMMARY)
        return read_json(f) if f.exists() else None

    def read_error(self) -> str | None:
        f = self.file(ERROR)
        return f.read_text(errors="replace") if f.exists() else None

    def is_trained(self) -> bool:
        """All planned epochs done (measures may still be pending)."""
        prog = self.read_progress()
        return bool(prog) and (prog["epoch"] >= prog["n_epochs"] or bool(prog.get("stopped_early")))

    def is_complete(self) -> bool:
        """Trained, measured and summarised: nothing left to do for this run. Cheap (no read of
        the rows): a checkpoints.npy too short for its committed rows, or with a damaged .npy
        header (which training rewrites), makes a run incomplete; ``verify_checkpoints`` reads
        every row."""
        prog = self.read_progress()
        if not (prog and prog.get("done") and self.file(SUMMARY).exists()):
            return False
        dtype = self.checkpoint_dtype() if self.exists() else "float32"
        n_rows, n_cols = len(prog.get("checkpoint_epochs") or []), _n_cols(prog)
        need = NPY_HEADER_BYTES + n_rows * n_cols * row_itemsize(dtype)
        f = self.file(CHECKPOINTS)
        return need == NPY_HEADER_BYTES or (f.exists() and f.stat().st_size >= need
                                            and header_holds(f, n_rows, n_cols, dtype))

    def checkpoint_dtype(self) -> str:
        """How the run stores its checkpoint rows: config.json's ``checkpoint_dtype`` (float32
        for runs written before the field). It rules; the .npy header must agree."""
        dtype = self.read_config().get("checkpoint_dtype", "float32")
        if dtype not in CHECKPOINT_STORAGE:
            raise RunDirError(f"{self.file(CONFIG)}: checkpoint_dtype: expected one of "
                              f"{', '.join(CHECKPOINT_STORAGE)}, got {shown(dtype)}")
        return dtype

    def verify_checkpoints(self, progress: dict[str, Any] | None = None,
                           last_only: bool = False) -> None:
        """Check every committed checkpoint row (``last_only``: the last one, the file's length
        and header) against the checksum written with it (see ``check_checkpoints``); raises
        RunDirError naming the file and the damaged rows."""
        prog = self.read_progress() if progress is None else progress
        if not prog or not prog.get("checkpoint_epochs"):
            return
        check_checkpoints(self.file(CHECKPOINTS), len(prog["checkpoint_epochs"]), _n_cols(prog),
                          prog.get("checkpoint_crc32"), dtype=self.checkpoint_dtype(),
                          last_only=last_only)

    def checkpoints(self, mmap: bool = True, verify: bool = True) -> tuple[list[int], np.ndarray]:
        """(epochs, weights) of the committed checkpoints; weights is (n_ckpt, n_params),
        float32 whatever the stored dtype (16-bit rows: a ``CheckpointRows`` read on indexing
        when ``mmap``). ``verify``: check the rows' checksums first (one read of the file)."""
        prog = self.read_progress()
        if not prog or not prog.get("checkpoint_epochs"):
            return [], np.zeros((0, 0), dtype=np.float32)
        epochs = list(prog["checkpoint_epochs"])
        n_cols, dtype = _n_cols(prog), self.checkpoint_dtype()
        f = self.file(CHECKPOINTS)
        if f.exists():
            check_storage(f, dtype)
        if verify:
            self.verify_checkpoints(prog)
        need = NPY_HEADER_BYTES + len(epochs) * n_cols * row_itemsize(dtype)
        if not f.exists() or f.stat().st_size < need:
            raise RunDirError(f"{f}: holds fewer rows than progress.json lists ({len(epochs)})")
        raw = np.memmap(f, dtype=CHECKPOINT_STORAGE[dtype], mode="r", offset=NPY_HEADER_BYTES,
                        shape=(len(epochs), n_cols))
        if dtype == "float32":
            return epochs, (raw if mmap else np.array(raw))
        return epochs, (CheckpointRows(raw, dtype) if mmap else decode_rows(raw, dtype))

    def unflatten(self, row: np.ndarray) -> dict[str, np.ndarray]:
        """A checkpoint row as {parameter name: array} (keys as in the model's state_dict)."""
        prog = self.read_progress()
        out, offset = {}, 0
        for name, shape in prog["layout"]:
            n = int(np.prod(shape))
            out[name] = np.asarray(row[offset:offset + n]).reshape(shape)
            offset += n
        return out

    def read_curves(self):
        """curves.parquet as a pandas DataFrame."""
        import pyarrow.parquet as pq

        f = self.file(CURVES)
        if not f.exists():
            raise RunDirError(f"{self.path}: no {CURVES} yet")
        try:
            return pq.read_table(f).to_pandas()
        except Exception as e:  # pyarrow raises several types for damaged files
            raise RunDirError(f"{f}: unreadable Parquet ({e})") from None

    # -- writes
    def write_progress(self, progress: dict[str, Any]) -> None:
        atomic_write_json(self.file(PROGRESS), progress)

    def write_curves(self, columns: dict[str, np.ndarray]) -> None:
        atomic_write_table(self.file(CURVES), curves_table(columns))

    def write_error(self, text: str) -> None:
        atomic_write_bytes(self.file(ERROR), text.encode())

    def remove_stale_temp_files(self) -> list[str]:
        """Delete ``.NAME.*.tmp`` files left by a kill mid-write (only the run's owner, when it
        resumes, may: a reader cannot tell them from a write in progress)."""
        removed = []
        for f in self.path.glob(".*.tmp"):
            try:
                f.unlink()
                removed.append(f.name)
            except FileNotFoundError:
                pass
        return removed

    def clear_error(self) -> None:
        self.file(ERROR).unlink(missing_ok=True)


# ---- what a run directory is, and whose ------------------------------------------------------
RUN_ID_NAME = re.compile(r"[0-9a-f]{12}")   # a directory named like a run id, as sweeps name them
MANIFEST = "manifest.json"                  # a sweep's record of its runs (grokhpc.scheduler)
SWEEP_MARKERS = (MANIFEST, "runs")          # what a sweep's own directory holds


def refuse_sweep_root(path: str | os.PathLike) -> None:
    """RunDirError when ``path`` is a sweep's directory (it holds manifest.json or runs/): a
    run trained there would mix its files into the sweep's."""
    path = Path(path)
    held = [m + ("/" if m == "runs" else "") for m in SWEEP_MARKERS if (path / m).exists()]
    if held:
        raise RunDirError(f"{path}: a sweep directory (holds {' and '.join(held)}), not a run "
                          "directory; use another --out directory")


def check_identity(run: "RunDir", config: dict[str, Any] | None = None,
                   progress: dict[str, Any] | None = None,
                   summary: dict[str, Any] | None = None) -> None:
    """RunDirError naming the file that disagrees unless progress.json, summary.json and -- when
    it is named like a run id (12 hex digits, as sweeps name run directories) -- the directory
    all name the run config.json holds. Files not given are read (``{}``: leave it out)."""
    cfg = run.read_config() if config is None else config
    rid = cfg.get("run_id")
    name = _named_for_another(run.path, rid)
    if name:
        raise RunDirError(f"{run.path}: named for run {name} but holds run {clip(rid)} "
                          "(config.json); move it to a directory named for its run")
    for fname, given in ((PROGRESS, progress), (SUMMARY, summary)):
        obj = given if given is not None else _read_if_readable(run.file(fname))
        other = obj.get("run_id") if isinstance(obj, dict) else None
        if other is not None and other != rid:
            raise RunDirError(f"{run.file(fname)}: belongs to run {clip(other)}, but config.json "
                              f"holds run {clip(rid)}; restore the run directory from a copy, or "
                              "delete it to train the run again")


def _named_for_another(path: Path, run_id: Any) -> str | None:
    """The directory's name when it is a run id other than ``run_id``; else None."""
    name = Path(path).resolve().name
    return name if RUN_ID_NAME.fullmatch(name) and name != run_id else None


def _read_if_readable(f: Path) -> Any:
    """A JSON file's contents; None when absent or unreadable (reported where it is read)."""
    try:
        return read_json(f) if f.exists() else None
    except (RunDirError, OSError):
        return None


def _n_cols(progress: dict[str, Any]) -> int:
    """Values per checkpoint row, from progress.json's parameter layout."""
    return sum(int(np.prod(shape)) for _, shape in progress.get("layout") or [])


def curves_table(columns: dict[str, np.ndarray]):
    """The curves schema: int64 epoch, float64 curves, nulls where not evaluated (all of a
    column the writer does not have)."""
    import pyarrow as pa

    epoch = np.asarray(columns["epoch"], dtype=np.int64)
    arrays = [pa.array(epoch, pa.int64())]
    for name in CURVE_COLUMNS[1:]:
        v = np.asarray(columns.get(name, np.full(len(epoch), np.nan)), dtype=np.float64)
        arrays.append(pa.array(v, pa.float64(), mask=np.isnan(v)))
    return pa.Table.from_arrays(arrays, names=list(CURVE_COLUMNS))


# ---- where a command may write ---------------------------------------------------------------
# What a failed write's errno says: no room (a full disk, a quota, a file size limit), or no
# right to write there (permissions, a read-only mount). The commands' one-line advice uses it.
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
NOT_ALLOWED = (errno.EACCES, errno.EPERM, errno.EROFS)


def out_problem(out: str | os.PathLike | None) -> str | None:
    """One line when ``--out`` cannot be a directory (an existing file, or a path through
    one), else None."""
    if not out:
        return None
    p = Path(out).absolute()
    found = next((d for d in (p, *p.parents) if d.exists() or d.is_symlink()), None)
    if found is None or found.is_dir():
        return None
    return f"--out {out}: expected a directory, got " + (
        "an existing file" if found == p else f"a path under the file {found}")
