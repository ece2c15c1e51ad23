"""checkpoints.npy: one row of flattened weights per checkpoint, appended in place.

Stage: foundations (run files). ``grokhpc.store`` knows the run directory and its other files;
this module knows only the rows of its checkpoint file: how each ``checkpoint_dtype`` stores a
row (``CHECKPOINT_STORAGE``), the fixed-size .npy header rewritten as rows are appended, the
CRC-32 of each row, and the checks that find a damaged row or header.

Rows are appended, and only the first ``len(progress["checkpoint_epochs"])`` are valid: the
rest, left by a kill between an append and the commit, are cut off when the run resumes
(``truncate_checkpoints``). Integrity: each row's CRC-32 is taken as the row is written
(``append_checkpoint_row`` returns it) and kept with the commit; ``check_checkpoints`` holds
the file to those checksums and names the damaged rows, so a file cut short by a full disk or
damaged later is reported, never used or extended.

``RunDirError`` is defined here, the lowest layer of the run directory's files, and used
through ``grokhpc.store`` everywhere else.
"""

from __future__ import annotations

import os
import re
import zlib
from pathlib import Path

import numpy as np

NPY_HEADER_BYTES = 128  # fixed-size .npy header, rewritten in place as rows are appended


class RunDirError(RuntimeError):
    """A run directory that cannot be used as it is; the message names the directory and file."""


# How each ``checkpoint_dtype`` stores its rows (the .npy header's descr). numpy has no
# bfloat16: its rows hold the raw 16-bit patterns, the top half of the float32 rounded to
# nearest even, so ``np.load`` gives them as uint16 (``decode_rows`` makes them float32).
CHECKPOINT_STORAGE = {"float32": "<f4", "bfloat16": "<u2", "float16": "<f2"}


def row_itemsize(dtype: str) -> int:
    """Bytes per stored value of a ``checkpoint_dtype``."""
    return np.dtype(CHECKPOINT_STORAGE[dtype]).itemsize


def encode_row(row: np.ndarray, dtype: str = "float32") -> bytes:
    """A row of weights as the little-endian bytes ``dtype`` stores: float32 as it is, float16
    and bfloat16 rounded to nearest even (as torch's ``.to(dtype)`` rounds)."""
    x = np.ascontiguousarray(row, dtype="<f4").reshape(-1)
    if dtype == "float16":
        return x.astype("<f2").tobytes()
    if dtype == "bfloat16":
        return _bfloat16_bits(x).tobytes()
    return x.tobytes()


def _bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns: add half an ulp of the kept half (ties to even) and
    keep the top 16 bits; a NaN stays a NaN (0x7FC0; torch may keep another NaN pattern)."""
    bits = x.view("<u4")
    kept = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    return np.where(np.isnan(x), np.uint16(0x7FC0), kept.astype("<u2")).astype("<u2")


def decode_rows(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Stored values of ``dtype`` (as ``np.memmap`` reads them) as float32, exactly."""
    if dtype == "bfloat16":
        return (np.asarray(raw, dtype="<u2").astype("<u4") << np.uint32(16)).view("<f4")
    return np.asarray(raw).astype(np.float32)


class CheckpointRows:
    """16-bit checkpoint rows on disk, read as float32 on indexing (``rows[i]``, ``rows[a:b]``)
    so that a run's rows are never all in memory at once; ``np.array(rows)`` reads them all."""

    def __init__(self, raw: np.ndarray, dtype: str):
        self.raw, self.stored = raw, dtype
        self.shape, self.dtype, self.ndim = raw.shape, np.dtype(np.float32), raw.ndim

    def __len__(self) -> int:
        return len(self.raw)

    def __getitem__(self, key) -> np.ndarray:
        return decode_rows(self.raw[key], self.stored)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = decode_rows(self.raw, self.stored)
        return out if dtype is None else out.astype(dtype)


def _npy_header(n_rows: int, n_cols: int, dtype: str = "float32") -> bytes:
    d = "{'descr': '%s', 'fortran_order': False, 'shape': (%d, %d), }" % (
        CHECKPOINT_STORAGE[dtype], n_rows, n_cols)
    magic = b"\x93NUMPY\x01\x00"
    body = d.encode("latin1")
    pad = NPY_HEADER_BYTES - len(magic) - 2 - len(body) - 1
    header = body + b" " * pad + b"\n"
    return magic + len(header).to_bytes(2, "little") + header


def row_checksum(data: bytes) -> int:
    """The CRC-32 a checkpoint row is committed with (of its stored little-endian bytes)."""
    return zlib.crc32(data)


def append_checkpoint_row(path: str | os.PathLike, row: np.ndarray, n_valid: int,
                          dtype: str = "float32") -> int:
    """Append one row, stored as ``dtype``, after the first ``n_valid`` rows (dropping any stale
    tail); returns the row's checksum. A failed write (disk full) leaves the first ``n_valid``
    rows."""
    path = Path(path)
    data = encode_row(row, dtype)
    n_cols = len(data) // row_itemsize(dtype)
    start = NPY_HEADER_BYTES + n_valid * len(data)
    mode = "r+b" if path.exists() else "w+b"
    try:
        with open(path, mode) as f:
            f.truncate(start)
            if n_valid == 0:
                f.seek(0)
                f.write(_npy_header(0, n_cols, dtype))
            f.seek(start)
            f.write(data)
            f.seek(0)
            f.write(_npy_header(n_valid + 1, n_cols, dtype))
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        e.filename = str(path)
        try:   # shrinking needs no space: back to the committed rows
            truncate_checkpoints(path, n_valid, n_cols, dtype)
        except OSError:
            pass
        raise
    return row_checksum(data)


def truncate_checkpoints(path: str | os.PathLike, n_valid: int, n_cols: int,
                         dtype: str = "float32") -> None:
    """Cut ``checkpoints.npy`` back to its first ``n_valid`` rows (after a kill)."""
    path = Path(path)
    if not path.exists():
        return
    with open(path, "r+b") as f:
        f.truncate(NPY_HEADER_BYTES + n_valid * n_cols * row_itemsize(dtype))
        f.seek(0)
        f.write(_npy_header(n_valid, n_cols, dtype))
        f.flush()
        os.fsync(f.fileno())


def _row_ranges(rows: list[int]) -> str:
    """[1, 2, 3, 7] -> "1-3, 7"."""
    parts, i = [], 0
    while i < len(rows):
        j = i
        while j + 1 < len(rows) and rows[j + 1] == rows[j] + 1:
            j += 1
        parts.append(f"{rows[i]}-{rows[j]}" if j > i else f"{rows[i]}")
        i = j + 1
    return ", ".join(parts)


def checkpoint_checksums(path: str | os.PathLike, n_rows: int, n_cols: int,
                         dtype: str = "float32", first: int = 0) -> list[int | None]:
    """The checksum of each of rows ``first``..``n_rows - 1`` as the file holds them now (None
    for a row the file is too short to hold), reading one row at a time."""
    out: list[int | None] = []
    size = n_cols * row_itemsize(dtype)
    with open(path, "rb") as f:
        f.seek(NPY_HEADER_BYTES + first * size)
        for _ in range(first, n_rows):
            data = f.read(size)
            out.append(row_checksum(data) if len(data) == size else None)
    return out


def check_checkpoints(path: str | os.PathLike, n_rows: int, n_cols: int,
                      checksums: list[int] | None, header: bool = True,
                      dtype: str = "float32", last_only: bool = False) -> None:
    """Raise RunDirError naming the file and its damaged rows (0-based, as numpy indexes them)
    unless ``path`` holds ``n_rows`` rows of ``dtype`` matching ``checksums`` (only their
    presence is checked for runs written before checksums were kept). ``header``: also check
    that the .npy header describes at least those rows (a resume rewrites it). ``last_only``:
    read only the last row (with the file's length and header: a cheap check)."""
    path = Path(path)
    if n_rows == 0 or n_cols == 0:   # no weights to check
        return
    need = NPY_HEADER_BYTES + n_rows * n_cols * row_itemsize(dtype)
    size = path.stat().st_size if path.exists() else None
    if size is None:
        raise RunDirError(f"{path}: missing; progress lists {n_rows} checkpoint rows")
    check_storage(path, dtype)
    if checksums is not None and len(checksums) != n_rows:
        raise RunDirError(f"{path}: {len(checksums)} checksums recorded for {n_rows} rows")
    first = n_rows - 1 if last_only and size >= need else 0
    found = checkpoint_checksums(path, n_rows, n_cols, dtype, first)
    bad = [first + i for i, c in enumerate(found)
           if c is None or (checksums is not None and c != checksums[first + i])]
    if bad:
        why = (f"the file ends at {size} of {need} bytes" if size < need
               else "their checksums differ from those written at commit")
        rows = f"row {bad[0]}" if len(bad) == 1 else f"rows {_row_ranges(bad)}"
        raise RunDirError(f"{path}: {rows} of {n_rows} damaged ({why}); "
                          "restore the file from a copy, or delete the run directory to "
                          "train the run again")
    if header and not header_holds(path, n_rows, n_cols, dtype):
        raise RunDirError(HEADER_DAMAGED.format(path=path))


# How a user trains a run again (to resume it, finish it, or repair what training rewrites).
RERUN_TRAINING = "its python -m grokhpc.train command again (or the sweep's launch)"
# A damaged .npy header (rows intact): training the run again (resumed, or complete: then
# RunDir.is_complete says no) rewrites the header from progress.json before anything else.
HEADER_DAMAGED = "{path}: .npy header damaged (rows intact); run " + RERUN_TRAINING + \
    " to rewrite it"


def _read_header(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(NPY_HEADER_BYTES)


def check_storage(path: str | os.PathLike, dtype: str) -> None:
    """Raise RunDirError when the .npy header holds rows of another ``checkpoint_dtype`` than
    ``dtype`` (config.json's, which rules); a header too damaged to say is left to the checks
    of rows and header."""
    m = re.search(rb"'descr': '([<>|][a-z]\d)'", _read_header(Path(path)))
    held = m and m.group(1).decode()
    if held in CHECKPOINT_STORAGE.values() and held != CHECKPOINT_STORAGE[dtype]:
        name = next(k for k, v in CHECKPOINT_STORAGE.items() if v == held)
        raise RunDirError(f"{path}: holds {name} rows ('{held}') but config.json says "
                          f"checkpoint_dtype {dtype}; the file is not this run's")


def header_holds(path: Path, n_rows: int, n_cols: int, dtype: str = "float32") -> bool:
    """Whether the .npy header is ours, for ``n_cols`` columns of ``dtype`` and at least
    ``n_rows`` rows (rows appended after the last commit may follow the committed ones)."""
    head = _read_header(path)
    m = re.search(rb"'shape': \((\d+), ", head)
    return bool(m) and int(m.group(1)) >= n_rows \
        and head == _npy_header(int(m.group(1)), n_cols, dtype)
