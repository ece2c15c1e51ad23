"""Run directories and their files: the one place that knows the on-disk layout.

A run directory holds at most eight files, however many checkpoints it has (HPC file quotas):

===================  ==========================================================================
``config.json``      the resolved RunConfig, plus ``run_id``
``progress.json``    epoch reached, planned epochs, checkpoint epochs, parameter layout, state
``state.pt``         the latest resumable training state (model, optimiser, curves so far)
``checkpoints.npy``  one float32 row of flattened weights per checkpoint (``n_ckpt x n_params``)
``curves.parquet``   one row per epoch: epoch, train_loss, train_acc, test_loss, test_acc
``measures.parquet`` one row per checkpoint: progress measures (written by grokhpc.measures)
``summary.json``     phase epochs, grokking epoch, key frequencies (written at the end)
``error.txt``        the traceback of a run that failed (removed when it succeeds)
===================  ==========================================================================

Every file appears whole or not at all: each is written to a temporary name in the same
directory, flushed to disk and renamed over the old one. ``checkpoints.npy`` is the exception
that keeps writes linear in the run's length: rows are appended, and only the first
``len(progress["checkpoint_epochs"])`` rows are valid -- the rest, left by a kill between an
append and the commit, are cut off when the run resumes. The commit point of a training step is
``state.pt``; ``progress.json`` and ``curves.parquet`` are rewritten from it after each commit.

This module imports neither torch nor plotly: aggregate and status read run directories fast.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

CONFIG = "config.json"
PROGRESS = "progress.json"
STATE = "state.pt"
CHECKPOINTS = "checkpoints.npy"
CURVES = "curves.parquet"
MEASURES = "measures.parquet"
SUMMARY = "summary.json"
ERROR = "error.txt"
RUN_FILES = (CONFIG, PROGRESS, STATE, CHECKPOINTS, CURVES, MEASURES, SUMMARY, ERROR)

CURVE_COLUMNS = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc")
NPY_HEADER_BYTES = 128  # fixed-size .npy header, rewritten in place as rows are appended


class RunDirError(RuntimeError):
    """A run directory that cannot be used as it is; the message names the directory and file."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---- atomic writes --------------------------------------------------------------------------
def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_write_table(path: str | os.PathLike, table) -> None:
    """Write a pyarrow Table as Parquet, atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    atomic_write_bytes(path, sink.getvalue().to_pybytes())


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise RunDirError(f"{path}: corrupt JSON ({e.msg} at line {e.lineno})") from None


# ---- checkpoints.npy: an appendable .npy ---------------------------------------------------
def _npy_header(n_rows: int, n_cols: int) -> bytes:
    d = "{'descr': '<f4', 'fortran_order': False, 'shape': (%d, %d), }" % (n_rows, n_cols)
    magic = b"\x93NUMPY\x01\x00"
    body = d.encode("latin1")
    pad = NPY_HEADER_BYTES - len(magic) - 2 - len(body) - 1
    header = body + b" " * pad + b"\n"
    return magic + len(header).to_bytes(2, "little") + header


def append_checkpoint_row(path: str | os.PathLike, row: np.ndarray, n_valid: int) -> None:
    """Append one float32 row after the first ``n_valid`` rows (dropping any stale tail)."""
    path = Path(path)
    row = np.ascontiguousarray(row, dtype="<f4").reshape(-1)
    n_cols = row.size
    start = NPY_HEADER_BYTES + n_valid * n_cols * 4
    mode = "r+b" if path.exists() else "w+b"
    with open(path, mode) as f:
        f.truncate(start)
        if n_valid == 0:
            f.seek(0)
            f.write(_npy_header(0, n_cols))
        f.seek(start)
        f.write(row.tobytes())
        f.seek(0)
        f.write(_npy_header(n_valid + 1, n_cols))
        f.flush()
        os.fsync(f.fileno())


def truncate_checkpoints(path: str | os.PathLike, n_valid: int, n_cols: int) -> None:
    """Cut ``checkpoints.npy`` back to its first ``n_valid`` rows (after a kill)."""
    path = Path(path)
    if not path.exists():
        return
    with open(path, "r+b") as f:
        f.truncate(NPY_HEADER_BYTES + n_valid * n_cols * 4)
        f.seek(0)
        f.write(_npy_header(n_valid, n_cols))
        f.flush()
        os.fsync(f.fileno())


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
        """Make the directory and write config.json; refuse a directory holding another run."""
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
                    f"{existing}: holds run {old.get('run_id')}, not {config.get('run_id')}; "
                    "use another --out directory")
            return
        atomic_write_json(existing, config)

    # -- reads
    def exists(self) -> bool:
        return self.file(CONFIG).exists()

    def read_config(self) -> dict[str, Any]:
        if not self.file(CONFIG).exists():
            raise RunDirError(f"{self.path}: not a run directory (no {CONFIG})")
        return read_json(self.file(CONFIG))

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
        """Trained, measured and summarised: nothing left to do for this run."""
        prog = self.read_progress()
        return bool(prog) and bool(prog.get("done")) and self.file(SUMMARY).exists()

    def checkpoints(self, mmap: bool = True) -> tuple[list[int], np.ndarray]:
        """(epochs, weights) of the committed checkpoints; weights is (n_ckpt, n_params)."""
        prog = self.read_progress()
        if not prog or not prog.get("checkpoint_epochs"):
            return [], np.zeros((0, 0), dtype=np.float32)
        epochs = list(prog["checkpoint_epochs"])
        n_cols = sum(int(np.prod(shape)) for _, shape in prog["layout"])
        f = self.file(CHECKPOINTS)
        need = NPY_HEADER_BYTES + len(epochs) * n_cols * 4
        if not f.exists() or f.stat().st_size < need:
            raise RunDirError(f"{f}: holds fewer rows than progress.json lists ({len(epochs)})")
        arr = np.memmap(f, dtype="<f4", mode="r", offset=NPY_HEADER_BYTES,
                        shape=(len(epochs), n_cols))
        return epochs, (arr if mmap else np.array(arr))

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
        try:
            self.file(ERROR).unlink()
        except FileNotFoundError:
            pass


def curves_table(columns: dict[str, np.ndarray]):
    """The curves schema: int64 epoch, float64 losses and accuracies, nulls where not evaluated."""
    import pyarrow as pa

    epoch = np.asarray(columns["epoch"], dtype=np.int64)
    arrays = [pa.array(epoch, pa.int64())]
    for name in CURVE_COLUMNS[1:]:
        v = np.asarray(columns[name], dtype=np.float64)
        arrays.append(pa.array(v, pa.float64(), mask=np.isnan(v)))
    return pa.Table.from_arrays(arrays, names=list(CURVE_COLUMNS))
