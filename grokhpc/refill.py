"""Refill (jobs stage): a packed group whose runs stop early takes waiting runs of its sweep.

With ``stop_after_grok`` a packed group shrinks as its runs grok; the slots they free would
idle through the rest of the job while runs of the sweep wait for jobs of their own. A job
with ``JobSettings.refill`` on (a sweep's ``launcher.refill``; off by default) gives its group
a ``SweepRefill``: whenever the group, still training, has fewer runs than the job was given,
it claims waiting runs of the same shape from the sweep's manifest and trains them with the
others (``grokhpc.train_batched``: a claimed run starts as a stack of its own and catches up to
the group's epoch while the group waits, then joins it; in exact mode every run stays
bit-identical to its solo run). The catch-up is the price: a job that refills runs longer, and
a small group, whose epoch costs about the same at any size, takes more device steps than it
would without refill; what it saves is the claimed runs' wait in the queue.

A waiting run: listed in ``SWEEP_DIR/manifest.json``, its directory holding its config.json
(written at submission), not complete, no error.txt (a failed or diverged run waits for a
relaunch), of the group's shape (``plan.shape_key``), with no more train or test rows than the
group's longest (the job's memory and epoch time were planned for those), and not locked.
The claim *is* the run's lock (``store.lock_run``, the one that keeps two trainers off one
run): taken here, checked again under it, and held until the job ends. So the job a claimed
run was assigned to finds it locked or complete and skips it, never waits for it and never
trains it twice; a claimed run left incomplete by a killed job is unlocked when the process
dies and is picked up by a requeue's refill or a relaunch, like any interrupted run. On a
file system without POSIX locks nothing guards a claim, so nothing is claimed there.

Runs with state (an interrupted run) are claimed first, then the sweep's last runs first
(their jobs start last).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

from .config import RunConfig
from .plan import padded_rows, shape_key
from .scheduler import MANIFEST, read_manifest
from .store import RunDir, RunDirError, RunLock, RunLockedError, lock_run


def _shape(cfg: RunConfig) -> tuple:
    """``plan.shape_key`` with any one CUDA device as ``cuda`` (a job's device process trains
    on the one GPU it sees, whichever a run names)."""
    key = shape_key(cfg)
    return (("cuda" if str(key[0]).startswith("cuda") else key[0]),) + key[1:]


class SweepRefill:
    """The waiting runs a group of ``cfgs`` (a job's runs) may claim from the sweep in
    ``sweep_dir``; call it as ``refill(n, taken)`` (grokhpc.train_batched.train_group)."""

    def __init__(self, sweep_dir: str | Path, cfgs: Sequence[RunConfig],
                 log: Callable[[str], Any] = print):
        self.sweep_dir = Path(sweep_dir)
        self.shape = _shape(cfgs[0])
        self.rows = padded_rows(cfgs)
        self.log = log
        self.locks: list[RunLock] = []
        self.unguarded = False

    @classmethod
    def for_job(cls, cfgs: Sequence[RunConfig], dirs: Sequence[str | Path],
                log: Callable[[str], Any] = print) -> "SweepRefill | None":
        """The refill of a job whose run directories lie in one sweep (``OUT/runs/<run_id>``
        beside ``OUT/manifest.json``); None for runs outside a sweep."""
        roots = {Path(d).resolve().parent.parent for d in dirs}
        if len(roots) != 1 or not (next(iter(roots)) / MANIFEST).is_file():
            return None
        return cls(next(iter(roots)), cfgs, log)

    def __call__(self, n: int, taken: set[str]) -> list[tuple[RunConfig, Path]]:
        """Up to ``n`` waiting runs (none of ``taken``), each locked by this process."""
        if n <= 0 or self.unguarded:
            return []
        claimed: list[tuple[RunConfig, Path]] = []
        for cfg, d in self.candidates(taken):
            if len(claimed) >= n:
                break
            if self.claim(cfg, RunDir(d)):
                claimed.append((cfg, d))
            if self.unguarded:
                break
        return claimed

    def candidates(self, taken: set[str]) -> list[tuple[RunConfig, Path]]:
        """The manifest's waiting runs of this shape, in the order they are claimed (read
        anew each time: a relaunch may have added runs)."""
        try:
            manifest = read_manifest(self.sweep_dir) or {}
        except RunDirError as e:
            self.log(f"refill: {e}; no runs claimed")
            return []
        found = []
        for i, entry in enumerate(manifest.get("runs", [])):
            if not isinstance(entry, dict) or entry.get("run_id") in taken:
                continue
            d = self.sweep_dir / str(entry.get("dir", ""))
            cfg = self._waiting(RunDir(d), entry.get("run_id"))
            if cfg is not None:
                epoch = (RunDir(d).read_progress() or {}).get("epoch", 0)
                found.append((epoch > 0, i, cfg, d))
        found.sort(key=lambda x: (not x[0], -x[1]))
        return [(cfg, d) for _, _, cfg, d in found]

    def _waiting(self, run: RunDir, run_id: Any) -> RunConfig | None:
        """The run's config if it may be claimed (before its lock: a cheap first look)."""
        try:
            if not run.exists() or run.is_complete() or run.read_error() is not None:
                return None
            cfg = run.run_config()
        except (OSError, ValueError, RunDirError):   # unreadable: not ours (status says so)
            return None
        if cfg.run_id != run_id or _shape(cfg) != self.shape:
            return None
        if any(a > b for a, b in zip(padded_rows([cfg]), self.rows)):
            return None
        return cfg

    def claim(self, cfg: RunConfig, run: RunDir) -> bool:
        """Lock the run and look again under the lock; True when it is this job's now."""
        try:
            lock = lock_run(run)
        except RunLockedError:
            return False   # another job trains it
        except RunDirError as e:
            self.log(f"refill: {e}; run {cfg.run_id} not claimed")
            return False
        if lock.key is None:
            lock.release()
            self.unguarded = True
            self.log(f"refill: off, {lock.note}")
            return False
        if run.is_complete() or run.read_error() is not None:
            lock.release()
            return False
        self.locks.append(lock)
        return True

    def release(self) -> None:
        """Let every claim go (the job's end; the trainers hold their own locks while open)."""
        for lock in self.locks:
            lock.release()
        self.locks.clear()


__all__ = ["SweepRefill"]
