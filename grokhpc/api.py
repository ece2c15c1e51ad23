"""Runs and sweeps for notebooks and scripts: ``grokhpc.open_run`` and ``grokhpc.open_sweep``.

::

    run = grokhpc.open_run("runs/seed")
    run.config, run.curves, run.measures, run.summary, run.checkpoint_epochs
    model = run.model(5000)        # the hooked Transformer with the weights of epoch 5000
    params = run.state_dict(5000)  # {TransformerLens name: torch tensor}

    sweep = grokhpc.open_sweep("runs/wd_sweep")
    sweep.runs, sweep.checkpoints  # aggregate/runs.parquet and checkpoints.parquet (pandas)
    run = sweep.run("2c3d4cea9af7")

Stage: on top of everything, for reading results: a run directory through ``grokhpc.store``
(and the measures reader), a sweep's tables through ``grokhpc.aggregate``.

Nothing here imports torch until a model, a state dict or a dataset is asked for: a run's
config, curves, measures and summary and a sweep's tables need only numpy, pyarrow and pandas.
A run's files are read on each access, so a run still training shows its latest epoch.
"""

from __future__ import annotations

import bisect
import json
import numbers
import os
import warnings
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .aggregate import AGG_DIR, CKPT_TABLE, META, RUNS_TABLE, aggregate, not_a_sweep
from .config import RunConfig, load_json, shown
from .measures import read_measures
from .store import CONFIG, SUMMARY, RunDir, RunDirError, check_identity


class NearestCheckpointWarning(UserWarning):
    """A model or state dict was asked for at an epoch with no checkpoint: the nearest was used."""


class SweepError(RuntimeError):
    """A sweep directory that cannot be opened; the message names the directory."""


# ---- one run ------------------------------------------------------------------------------------
class Run:
    """One run directory: its config, curves, measures, summary and checkpointed weights."""

    def __init__(self, path: str | os.PathLike):
        self.dir = RunDir(path)
        self.path = self.dir.path
        if not self.path.is_dir():
            raise RunDirError(f"{self.path}: no such directory")
        if not self.dir.exists():
            raise RunDirError(f"{self.path}: not a run directory (no {CONFIG})")
        self.config: RunConfig = load_json(self.dir.file(CONFIG))
        check_identity(self.dir)   # config, progress, summary and the name agree on the run

    def __repr__(self) -> str:
        prog = self.progress
        state = "done" if prog.get("done") else "pending" if not prog else "training"
        return (f"Run({str(self.path)!r}: {self.run_id}, p={self.config.p} {self.config.op}, "
                f"epoch {prog.get('epoch', 0)}/{self.config.n_epochs}, {state})")

    @property
    def run_id(self) -> str:
        return self.config.run_id

    @property
    def progress(self) -> dict[str, Any]:
        """progress.json (epoch, n_epochs, checkpoint_epochs, device, done, ...); {} before any."""
        return self.dir.read_progress() or {}

    @property
    def checkpoint_epochs(self) -> list[int]:
        return list(self.progress.get("checkpoint_epochs", []))

    @property
    def curves(self):
        """One row per epoch: epoch, train_loss, train_acc, test_loss, test_acc (pandas)."""
        return self.dir.read_curves()

    @property
    def measures(self):
        """One row per checkpoint: the progress measures of measures.parquet (pandas)."""
        return read_measures(self.dir)[0]

    @property
    def summary(self) -> dict[str, Any]:
        """summary.json: grokking epoch, phase boundaries, key frequencies, final losses."""
        summary = self.dir.read_summary()
        if summary is None:
            prog = self.progress
            raise RunDirError(f"{self.path}: no {SUMMARY} yet (written when the run finishes; "
                              f"trained {prog.get('epoch', 0)}/{self.config.n_epochs} epochs)")
        return summary

    # -- weights
    def _checkpoint(self, epoch: int | None) -> tuple[int, np.ndarray]:
        """(epoch, weights row) of the checkpoint nearest ``epoch`` (the last when None);
        warns, naming the epoch used, when there is no checkpoint at ``epoch`` itself."""
        epochs, rows = self.dir.checkpoints()
        if not epochs:
            raise RunDirError(f"{self.path}: no checkpoints yet (progress.json lists none)")
        if epoch is None:
            return epochs[-1], np.array(rows[-1])
        if isinstance(epoch, bool) or not isinstance(epoch, numbers.Integral):
            raise TypeError(f"{self.path}: epoch must be an integer, got {shown(epoch)}")
        epoch = int(epoch)
        if not epochs[0] <= epoch <= epochs[-1]:
            trained = self.progress.get("epoch", epochs[-1])
            raise ValueError(f"{self.path}: epoch {epoch} out of range: checkpoints span epochs "
                             f"{epochs[0]}..{epochs[-1]} ({trained}/{self.config.n_epochs} "
                             "epochs trained)")
        i = bisect.bisect_left(epochs, epoch)
        if epochs[i] != epoch:
            # the earlier one on a tie: weights that existed at ``epoch``
            i = i - 1 if epoch - epochs[i - 1] <= epochs[i] - epoch else i
            warnings.warn(f"{self.path}: no checkpoint at epoch {epoch}; using the nearest, "
                          f"epoch {epochs[i]}", NearestCheckpointWarning, stacklevel=3)
        return epochs[i], np.array(rows[i])

    def weights(self, epoch: int | None = None) -> dict[str, np.ndarray]:
        """The checkpoint's parameters as numpy float32 arrays, by TransformerLens name (no
        torch needed). ``epoch`` None: the last checkpoint; otherwise the nearest one."""
        _, row = self._checkpoint(epoch)
        return self.dir.unflatten(row)

    def state_dict(self, epoch: int | None = None) -> dict[str, Any]:
        """The checkpoint's parameters as float32 torch tensors, keyed by TransformerLens name
        (``embed.W_E``, ``blocks.0.attn.W_Q``, ...); buffers are not included, so load it with
        ``strict=False``. ``epoch`` None: the last checkpoint; otherwise the nearest one."""
        import torch

        _, row = self._checkpoint(epoch)
        return {name: torch.from_numpy(w) for name, w in self.dir.unflatten(row).items()}

    def model(self, epoch: int | None = None, device: str = "cpu"):
        """The hooked ``grokhpc.model.Transformer`` with the weights of the checkpoint at
        ``epoch`` (the last when None; the nearest, with a NearestCheckpointWarning, when
        there is none at ``epoch``), in eval mode on ``device``."""
        import torch

        from .model import load_flat
        from .models import build_model

        _, row = self._checkpoint(epoch)
        model = build_model(self.config, "cpu")
        load_flat(model, torch.from_numpy(row))
        return model.to(device).eval()

    def dataset(self):
        """The run's pairs, labels and train/test split (``grokhpc.data.Dataset``, torch)."""
        from .data import make_dataset

        return make_dataset(self.config)


def open_run(path: str | os.PathLike) -> Run:
    """Open a run directory (one written by ``python -m grokhpc.train`` or a sweep)."""
    return Run(path)


# ---- a sweep ------------------------------------------------------------------------------------
class Sweep:
    """A sweep directory and its aggregated tables (``SWEEP_DIR/aggregate/``)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).resolve()
        self.tables_dir = self.path / AGG_DIR

    def __repr__(self) -> str:
        counts = self.runs["state"].value_counts()
        states = ", ".join(f"{n} {s}" for s, n in counts.items())
        return f"Sweep({str(self.path)!r}: {len(self.runs)} runs, {states})"

    def _table(self, name: str, **kwargs):
        import pandas as pd

        f = self.tables_dir / name
        try:
            return pd.read_parquet(f, **kwargs)
        except FileNotFoundError:
            raise SweepError(f"{f}: missing; run `python -m grokhpc.aggregate {self.path}`") \
                from None

    @cached_property
    def runs(self):
        """runs.parquet: one row per run (integers as nullable Int64; docs/tables.md)."""
        return self._table(RUNS_TABLE, dtype_backend="numpy_nullable")

    @cached_property
    def checkpoints(self):
        """checkpoints.parquet: one row per finished run x checkpoint (docs/tables.md)."""
        return self._table(CKPT_TABLE)

    @property
    def swept(self) -> list[str]:
        """The config fields that vary across the sweep."""
        return json.loads((self.tables_dir / META).read_text())["swept"]

    def run(self, run_id: str) -> Run:
        """Open one of the sweep's runs by its run_id (or a unique prefix of it)."""
        ids = self.runs["run_id"].astype(str)
        hits = self.runs[ids == run_id]
        if hits.empty:
            hits = self.runs[ids.str.startswith(str(run_id))]
        if len(hits) != 1:
            what = "no run" if hits.empty else f"{len(hits)} runs match"
            raise SweepError(f"{self.path}: {what} {run_id!r} in {self.tables_dir / RUNS_TABLE}")
        row = hits.iloc[0]
        # the sweep's own copy first (a sweep copied from a cluster), then the recorded path
        for base in (self.path, Path(str(row["sweep"]))):
            d = base / str(row["run_dir"])
            if (d / CONFIG).exists():
                run = Run(d)
                if run.run_id == row["run_id"]:
                    return run
        raise SweepError(f"{self.path}: run {row['run_id']}: its directory {row['run_dir']} is "
                         f"gone (looked under {self.path} and {row['sweep']})")


def _lists_runs(sweep: Sweep) -> bool:
    """Whether the sweep's tables list any run (meta.json's count)."""
    try:
        return json.loads((sweep.tables_dir / META).read_text()).get("n_runs", 0) > 0
    except (OSError, ValueError, AttributeError, TypeError):
        return False


def open_sweep(path: str | os.PathLike, log: Callable[[str], None] | None = print) -> Sweep:
    """Open a sweep directory's aggregated tables.

    A sweep never aggregated is aggregated here, tables only, saying so in one line. Tables
    that exist are read as they are: ``python -m grokhpc.aggregate SWEEP_DIR`` brings them and
    the figures up to date (rereading only the runs that changed). A directory that is no
    sweep (a run directory, one without run directories) raises SweepError in the words of
    ``python -m grokhpc.aggregate``, and nothing is written into it."""
    root = Path(path)
    if not root.is_dir():
        raise SweepError(f"{root}: no such directory")
    sweep = Sweep(root)
    tables = all((sweep.tables_dir / t).exists() for t in (RUNS_TABLE, CKPT_TABLE))
    if tables and not (root / CONFIG).exists() and _lists_runs(sweep):
        return sweep          # tables of runs (their directories may have been left behind)
    why = not_a_sweep(root)
    if why:
        raise SweepError(why)
    if tables:
        return sweep
    if log:
        log(f"{root}: not aggregated yet; writing its tables now (no figures: "
            f"`python -m grokhpc.aggregate {root}` draws them)")
    aggregate([root], formats=None, log=None)
    return sweep
