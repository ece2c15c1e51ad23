"""A local launch's jobs end with the launch: however it ends (done, Ctrl-C, SIGTERM, SIGKILL).

submitit starts each local job as a process of its own that outlives the launching command on
purpose. The launch holds a lifeline while it runs: an exclusive ``flock`` on a file of its
own in the sweep's ``jobs/`` folder, which the kernel drops when the launch's process ends,
however it ends. Each job watches that file from a thread and, once the lock is free (or the
file is gone), calls back: the job writes its runs' state and stops, and a relaunch resumes
them. Where the file system takes no locks there is no lifeline and the jobs run on as before.
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading
import time
from pathlib import Path
from typing import Callable

PREFIX = "launch."
SUFFIX = ".lifeline"
POLL_S = 0.5


class Lifeline:
    """The lock a launch holds while it runs (``hold``); ``release`` lets its jobs go."""

    def __init__(self, path: Path, fd: int):
        self.path, self._fd = path, fd

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(fd)   # the lock goes with the last descriptor


def _free(path: Path) -> bool:
    """Whether no process holds ``path``'s lock (so its launch has ended)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def hold(folder: str | os.PathLike) -> Lifeline | None:
    """Take this launch's lifeline in ``folder`` (removing those of launches that ended);
    None where the file system takes no locks."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob(f"{PREFIX}*{SUFFIX}"):
        if _free(old):
            old.unlink(missing_ok=True)
    path = folder / f"{PREFIX}{os.getpid()}{SUFFIX}"
    tmp = path.with_name(f".{path.name}.tmp")   # locked before it shows under its name
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.replace(tmp, path)
    except OSError as e:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        if e.errno in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
            return None
        raise
    return Lifeline(path, fd)


def watch(path: str | os.PathLike, ended: Callable[[], None],
          every_s: float = POLL_S) -> threading.Thread:
    """Call ``ended()`` once, from a daemon thread, when the launch holding ``path`` has
    ended (at once if it already has). A file system that stops answering ends the watch."""
    path = Path(path)

    def run() -> None:
        while True:
            try:
                if _free(path):
                    break
            except OSError:
                return
            time.sleep(every_s)
        ended()

    thread = threading.Thread(target=run, name="grokhpc-lifeline", daemon=True)
    thread.start()
    return thread
