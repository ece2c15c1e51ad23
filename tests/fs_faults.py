"""File-system faults for the tests, made for real: a folder that cannot be written and a disk
that is full.

As root (who writes through permission bits) both are mounts: a read-only bind mount, a small
tmpfs filled up. Otherwise a copy without write permission, and RLIMIT_FSIZE in the process
that writes (a write past it fails with EFBIG, as a full disk or quota fails with ENOSPC).
Each context manager yields what it made and the errno that a write there fails with.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import shutil
import signal
import stat
import subprocess
from pathlib import Path

AS_ROOT = os.geteuid() == 0


def _mount(*args: str) -> None:
    r = subprocess.run(["mount", *args], capture_output=True, text=True)
    assert r.returncode == 0, f"mount {' '.join(args)}: {r.stderr.strip()} (root needs mounts)"


def _umount(path: Path) -> None:
    subprocess.run(["umount", str(path)], check=True)


@contextlib.contextmanager
def read_only(src: Path, at: Path):
    """``src`` seen read-only at ``at``: yields (at, errno of a write there)."""
    if AS_ROOT:
        at.mkdir(parents=True)
        _mount("--bind", str(src), str(at))
        try:
            _mount("-o", "remount,ro,bind", str(at))
            yield at, errno.EROFS
        finally:
            _umount(at)
        return
    shutil.copytree(src, at)
    dirs = [at] + [p for p in at.rglob("*") if p.is_dir()]
    for d in dirs:
        d.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        yield at, errno.EACCES
    finally:
        for d in dirs:
            d.chmod(stat.S_IRWXU)


@contextlib.contextmanager
def full_disk(at: Path, size_mb: int = 1):
    """``at`` (a folder, kept as it is) on a disk of ``size_mb`` with no space left. Yields
    (free, errno, preexec): ``free()`` makes the room again; run the writing process with
    ``preexec_fn=preexec`` (the RLIMIT_FSIZE stand-in off root; None as root)."""
    if not AS_ROOT:
        limit = 4096   # bytes per file

        room = {"made": False}

        def preexec() -> None:   # runs in the child: the limit holds until free() is called
            if not room["made"]:
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        yield (lambda: room.update(made=True)), errno.EFBIG, preexec
        return
    keep = at.with_name(f".{at.name}.kept")
    shutil.copytree(at, keep)
    _mount("-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(at))
    try:
        shutil.copytree(keep, at, dirs_exist_ok=True)
        filler = at / "filler"
        with open(filler, "wb", buffering=0) as f:
            try:
                while True:
                    f.write(bytes(1 << 16))
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
        yield (lambda: filler.unlink()), errno.ENOSPC, None
    finally:
        _umount(at)
        shutil.rmtree(keep)
