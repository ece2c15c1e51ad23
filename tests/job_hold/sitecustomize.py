"""Holds a SLURM job of the tests at a chosen commit, so the test interrupts it when it decides.

The test puts this directory first on PYTHONPATH of the environment it submits from (sbatch
hands that environment to the job) and sets

  GROKHPC_TEST_HOLD_DIR    a directory for the two marker files
  GROKHPC_TEST_HOLD_EPOCH  the epoch whose commit holds

When ``grokhpc.train`` is imported, ``Trainer.commit`` is wrapped: after the commit of that
epoch is complete (checkpoint row, state.pt, progress.json, curves.parquet), the process writes
``HOLD_DIR/reached`` ({"epoch", "pid"}) and waits until ``HOLD_DIR/release`` exists -- or
until the scheduler kills it. Only the first attempt holds: once ``reached`` exists the wrapper
passes, so a resumed or requeued attempt runs to the end.

Without GROKHPC_TEST_HOLD_DIR nothing is installed, and nothing is imported at interpreter
start beyond the standard library. A ``sitecustomize`` that this one shadows still runs.
"""

import importlib.machinery
import importlib.util
import os
import sys

HOLD_DIR = "GROKHPC_TEST_HOLD_DIR"
HOLD_EPOCH = "GROKHPC_TEST_HOLD_EPOCH"
TARGET = "grokhpc.train"


def hold_commits(train_module, hold_dir: str, hold_epoch: int) -> None:
    """Wrap ``train_module.Trainer.commit`` to hold after the commit of ``hold_epoch``."""
    import functools
    import json
    import threading
    import time

    commit = train_module.Trainer.commit
    reached = os.path.join(hold_dir, "reached")
    release = os.path.join(hold_dir, "release")

    @functools.wraps(commit)
    def held_commit(self, checkpoint: bool, state=None) -> None:
        commit(self, checkpoint, state)
        if self.epoch != hold_epoch or os.path.exists(reached):
            return
        # packed runs commit in threads: each writes its own temporary name
        tmp = f"{reached}.{os.getpid()}.{threading.get_ident()}.tmp"
        with open(tmp, "w") as f:
            json.dump({"epoch": self.epoch, "pid": os.getpid()}, f)
        os.replace(tmp, reached)
        print(f"held after the commit of epoch {self.epoch}", flush=True)
        while not os.path.exists(release):
            time.sleep(0.05)

    train_module.Trainer.commit = held_commit


class HoldFinder:
    """A meta path finder that only acts on ``grokhpc.train``: it finds the module as usual and
    wraps its loader so that ``hold_commits`` runs right after the module body."""

    def __init__(self, hold_dir: str, hold_epoch: int):
        self.hold_dir, self.hold_epoch = hold_dir, hold_epoch

    def find_spec(self, name, path, target=None):
        if name != TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        exec_body = spec.loader.exec_module

        def exec_module(module):
            exec_body(module)
            hold_commits(module, self.hold_dir, self.hold_epoch)

        spec.loader.exec_module = exec_module
        return spec


def run_shadowed_sitecustomize() -> None:
    """Run the next ``sitecustomize`` on sys.path (the one this file hides), if any."""
    here = os.path.dirname(os.path.abspath(__file__))
    rest = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is not None and spec.loader is not None:
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


run_shadowed_sitecustomize()
if os.environ.get(HOLD_DIR):
    sys.meta_path.insert(0, HoldFinder(os.environ[HOLD_DIR], int(os.environ[HOLD_EPOCH])))
