"""Train one run into a run directory; resumable at any moment (the training stage).

``python -m grokhpc.train --out DIR [--set key=value ...]``

A ``Trainer`` is one run's state and files: its model, optimiser state, curves and checkpoint
rows, and how they reach the run directory (``open``, ``restore``, ``commit``, ``progress``,
``finish``). The training itself is the one loop of grokhpc.loop over a grokhpc.stack.Stack:
a solo run is a stack of one in exact mode (``Trainer.fit``), a packed group
(grokhpc.train_batched) a stack of many, so both leave the same files.

The training is the seed's -- full-batch AdamW, frozen zero biases, float64 cross-entropy --
made fast: only the last position's logits (``Transformer.last_logits``), the test set scored
every ``eval_every`` epochs, losses kept on the device, a checkpoint one row appended to
``checkpoints.npy``.

Curves row ``e`` holds the losses of the weights after ``e`` optimiser steps: row 0 is the
initial model (the seed's 4.7322 / 4.7346), row ``n_epochs`` the final one.

A run has one trainer at a time (``Trainer.open`` takes the run's lock, see grokhpc.store).
Each commit's checkpoint row and state carry checksums, which a resume checks before it writes
anything; each process that trains the run adds its provenance, with the job's settings
(``runtime.JobSettings``), to progress.json's attempts.

What is durable when: a checkpoint row, and progress.json listing it, every ``checkpoint_every``
epochs; ``state.pt`` (where a resume starts) and curves.parquet every ``state_every_s`` seconds
of the job's settings (default 10 minutes), on SLURM's USR2 warning, SIGTERM and Ctrl-C
(grokhpc.preempt), where ``fit`` stops and at the run's last epoch. A resume from an older
state.pt recomputes the same epochs and rows, bit for bit, and replaces the rows written after
it. progress.json's ``state_epoch`` says where a resume would start.

A run whose train loss or weights become non-finite is stopped at its next commit and marked
diverged instead of committed (grokhpc.divergence).
"""

from __future__ import annotations

import argparse
import errno
import io
import sys
import time
import traceback
import weakref
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from . import config as config_mod
from . import divergence, measures, preempt, tracking
from .config import GROK_ACC, ConfigError, RunConfig
from .divergence import RunDiverged, clear_diverged, mark_diverged, refuse_diverged_before
from .lastpos import accuracy
from .losses import loss, softmax_collapse
from .checkpoints import (append_checkpoint_row, check_checkpoints, checkpoint_checksums,
                          header_holds, truncate_checkpoints)
from .loop import fit_stack, losses_postfix
from .optim import batch_generator, make_optimizer, weight_norm
from .runtime import (DEFAULT_STATE_EVERY_S, MAX_ATTEMPTS_KEPT, JobSettings, changed_environment,
                      matmul_precision, provenance, provenance_columns, resolve_device)
from .stack import Stack, stop_epoch
from .store import (CHECKPOINTS, CURVE_COLUMNS, STATE, SUMMARY, RunDir, RunDirError,
                    RunLockedError, atomic_write_bytes, atomic_write_json, check_identity,
                    lock_run, refuse_sweep_root)

# The one loss (the run's loss_fn in its loss_dtype: float64 softmax cross-entropy by default,
# as the seed's loss_fn), under the name the trainer's callers use.
loss_fn = loss

NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)   # a full disk, a quota, a file size limit


def state_checksum(obj: Any, crc: int = 0) -> int:
    """CRC-32 over every tensor's bytes (with dtype and shape) and every other value's repr, in
    a fixed order: torch.load does not notice a damaged tensor, so state.pt carries this."""
    import torch

    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        crc = zlib.crc32(f"{t.dtype}{tuple(t.shape)}".encode(), crc)
        return zlib.crc32(t.reshape(-1).view(torch.uint8).numpy().tobytes(), crc)
    if isinstance(obj, dict):
        for k in sorted(obj, key=repr):
            crc = state_checksum(obj[k], zlib.crc32(repr(k).encode(), crc))
        return crc
    if isinstance(obj, (list, tuple)):
        for v in obj:
            crc = state_checksum(v, crc)
        return zlib.crc32(b"]", crc)
    return zlib.crc32(repr(obj).encode(), crc)


class Trainer:
    """The state of one run between epochs: model, optimiser state, curves, checkpoints; and its
    files. ``Trainer.open`` takes the run's lock and builds a fresh run or picks up an
    interrupted one from ``state.pt``; ``fit`` trains it (a stack of one, grokhpc.loop);
    ``commit`` makes its state durable; ``finish`` ends it; ``close()`` (or the trainer's end)
    lets the lock go. ``settings``: the job's (``runtime.JobSettings``; None: the defaults).
    """

    def __init__(self, cfg: RunConfig, run: RunDir, device, settings: JobSettings | None = None):
        import torch

        from .data import make_dataset
        from .model import param_layout
        from .models import build_model

        self.cfg, self.run, self.device = cfg, run, device
        self.settings = JobSettings() if settings is None else settings
        self.data = make_dataset(cfg).to(device)
        self.train_tokens, self.train_labels = self.data.train_tokens, self.data.train_labels
        self.test_tokens, self.test_labels = self.data.test_tokens, self.data.test_labels
        self.model = build_model(cfg, device)
        # the state of the run's own optimiser (what state.pt holds); the stack steps it
        self.optimizer = make_optimizer(self.model.parameters(), cfg)
        self.layout = param_layout(self.model)
        n = cfg.n_epochs + 1
        self.curves = {k: torch.full((n,), float("nan"), dtype=torch.float64, device=device)
                       for k in CURVE_COLUMNS[1:]}
        self.epoch = 0
        self.checkpoint_epochs: list[int] = []
        self.checkpoint_crcs: list[int] = []   # CRC-32 of each committed checkpoint row
        self.wall_time = 0.0
        self.committed_epoch: int | None = None   # the epoch of the last state.pt
        self.state_written_at = time.monotonic()
        self.attempts: list[dict[str, Any]] = []   # provenance of each process that trained it
        self.notes: list[str] = []   # one line each, for the user: a changed environment, ...
        self.tracker = None   # the run's W&B run when tracking is on (grokhpc.tracking)
        self._release = lambda: None
        # the optional fields: minibatch order, the weight norm to hold, the epoch of the first
        # logged test accuracy >= GROK_ACC (stop_after_grok)
        self.batch_gen = None if cfg.full_batch else batch_generator(cfg)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.init_norm = weight_norm(trainable) if cfg.fixed_weight_norm else None
        self.grok_epoch: int | None = None
        self.filter_state: dict | None = None   # grad_filter's (grokhpc.grad_filter), if any

    # ---- scoring where the run stands (a new run's epoch 0; training scores in the stack) -----
    def evaluate(self, train_too: bool = False) -> None:
        """Score the test set (and with ``train_too`` the train set) at the current epoch."""
        import torch

        with torch.inference_mode():
            pairs = [("test", self.test_tokens, self.test_labels)]
            if train_too:
                pairs.append(("train", self.train_tokens, self.train_labels))
            for split, tokens, labels in pairs:
                logits = self.model.last_logits(tokens)
                self.curves[f"{split}_loss"][self.epoch] = loss_fn(
                    logits, labels, self.cfg.loss_dtype, loss_fn=self.cfg.loss_fn)
                self.curves[f"{split}_acc"][self.epoch] = accuracy(logits, labels)
            if train_too or not self.cfg.full_batch:   # a full-batch step logs its own
                logits = self.model.last_logits(self.train_tokens)
                self.curves["softmax_collapse"][self.epoch] = softmax_collapse(logits)
        self.note_grok()

    def note_grok(self) -> None:
        """Remember the first epoch whose logged test accuracy is >= 99% (``stop_after_grok``
        only: the default path never reads a value back from the device here)."""
        if self.cfg.stop_after_grok is not None and self.grok_epoch is None \
                and self.curves["test_acc"][self.epoch].item() >= GROK_ACC:
            self.grok_epoch = self.epoch

    def stop_epoch(self) -> int:
        """The epoch this run ends at (``grokhpc.stack.stop_epoch``)."""
        return stop_epoch(self.cfg, self.grok_epoch)

    @property
    def stopped_early(self) -> bool:
        return self.epoch < self.cfg.n_epochs and self.epoch >= self.stop_epoch()

    # ---- durability ---------------------------------------------------------------------
    def state_due(self) -> bool:
        return time.monotonic() - self.state_written_at >= self.settings.state_every_s

    def commit(self, checkpoint: bool, state: bool | None = None) -> None:
        """Append a checkpoint row (if ``checkpoint``), then write state.pt (if ``state``; None:
        when the settings' ``state_every_s`` has passed since the last) with curves.parquet,
        then progress.json. A write that fails (disk full, quota) leaves the last commit as it
        was and raises RunDirError saying so."""
        from .model import flat_weights

        state = self.state_due() if state is None else state
        epochs, crcs = list(self.checkpoint_epochs), list(self.checkpoint_crcs)
        row = flat_weights(self.model).cpu().numpy() if checkpoint else None
        try:
            if checkpoint:
                crcs.append(append_checkpoint_row(self.run.file(CHECKPOINTS), row, len(epochs),
                                                  self.cfg.checkpoint_dtype))
                epochs.append(self.epoch)
            if state:
                atomic_write_bytes(self.run.file(STATE), self.state_bytes(epochs, crcs))
        except OSError as e:
            if checkpoint and len(epochs) > len(self.checkpoint_epochs):
                try:   # the row is not committed: cut it (shrinking needs no space)
                    truncate_checkpoints(self.run.file(CHECKPOINTS), len(self.checkpoint_epochs),
                                         self.n_cols, self.cfg.checkpoint_dtype)
                except OSError:
                    pass
            raise self.commit_failure(e) from e
        self.checkpoint_epochs, self.checkpoint_crcs = epochs, crcs
        if state:
            self.committed_epoch, self.state_written_at = self.epoch, time.monotonic()
        try:
            self.write_views(curves=state)
        except OSError as e:
            raise self.commit_failure(e) from e
        tracking.log_commit(self)

    @property
    def n_cols(self) -> int:
        return sum(int(np.prod(s)) for _, s in self.layout)

    def commit_failure(self, e: OSError) -> RunDirError:
        """One line for a commit's failed write: which file, why, what the run keeps."""
        where = e.filename or self.run.path
        if self.committed_epoch is None:
            kept = "nothing was committed yet"
        elif self.committed_epoch == self.epoch:   # state.pt is written; only its views failed
            kept = f"the run is committed at epoch {self.epoch} (state.pt)"
        else:
            kept = f"the run keeps its last commit, epoch {self.committed_epoch}"
        fix = "free some space" if e.errno in NO_SPACE else "fix the cause"
        return RunDirError(f"{where}: {e.strerror or e} while committing epoch {self.epoch}; "
                           f"{kept}; {fix} and rerun the same command to resume")

    def state_bytes(self, epochs: list[int], crcs: list[int]) -> bytes:
        import torch

        state = {
            "run_id": self.cfg.run_id,
            "epoch": self.epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "curves": {k: v.cpu() for k, v in self.curves.items()},
            "checkpoint_epochs": epochs,
            "checkpoint_crc32": crcs,
            "wall_time": self.wall_time,
        }
        if self.batch_gen is not None:   # the optional fields' resumable state
            state["batch_gen"] = self.batch_gen.get_state()
        if self.cfg.stop_after_grok is not None:
            state["grok_epoch"] = self.grok_epoch
        if self.filter_state is not None:
            state["grad_filter"] = self.filter_state
        state["checksum"] = state_checksum(state)
        buf = io.BytesIO()
        torch.save(state, buf)
        return buf.getvalue()

    def write_views(self, done: bool = False, curves: bool = True) -> None:
        """curves.parquet (rows 0..epoch; if ``curves``) and progress.json."""
        if curves:
            e = self.epoch
            self.run.write_curves({"epoch": np.arange(e + 1),
                                   **{k: v[: e + 1].cpu().numpy() for k, v in self.curves.items()}})
        self.run.write_progress(self.progress(done))

    def progress(self, done: bool = False) -> dict[str, Any]:
        return {
            "run_id": self.cfg.run_id,
            "epoch": self.epoch,
            "n_epochs": self.cfg.n_epochs,
            "checkpoint_epochs": list(self.checkpoint_epochs),
            "checkpoint_crc32": list(self.checkpoint_crcs),
            "state_epoch": self.committed_epoch,
            "layout": self.layout,
            "wall_time_s": round(self.wall_time, 3),
            "device": str(self.device),
            "stopped_early": self.stopped_early,
            "attempts": self.attempts,
            "done": done,
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }

    def load_state(self) -> dict[str, Any] | None:
        """state.pt, checked against the checksum written with it; None when there is none."""
        import torch

        f = self.run.file(STATE)
        if not f.exists():
            return None
        try:
            # on the host: the batch generator's state must be a CPU tensor, and torch keeps
            # the optimiser's step counters on the host (reading one on a GPU is a sync);
            # restore moves the rest to the device
            state = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:
            raise RunDirError(f"{f}: unreadable training state ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}); delete the run "
                              "directory to start the run over") from None
        written = state.pop("checksum", None)   # absent in runs written before checksums
        if written is not None and state_checksum(state) != written:
            raise RunDirError(f"{f}: damaged (its contents differ from the checksum written with "
                              "them); delete the run directory to start the run over")
        if state.get("run_id") != self.cfg.run_id:
            raise RunDirError(f"{f}: state of run {state.get('run_id')}, not {self.cfg.run_id}")
        return state

    def restore(self) -> bool:
        """Load state.pt if there is one, after checking it and every committed checkpoint row
        (nothing is written before both hold); returns whether the run was resumed."""
        state = self.load_state()
        if state is None:
            self.note_start_over()
            return False
        epochs = list(state["checkpoint_epochs"])
        crcs = state.get("checkpoint_crc32")
        f, dtype = self.run.file(CHECKPOINTS), self.cfg.checkpoint_dtype
        check_checkpoints(f, len(epochs), self.n_cols, crcs, header=False, dtype=dtype)
        if crcs is None:   # a run from before checksums: adopt the rows as they are
            crcs = checkpoint_checksums(f, len(epochs), self.n_cols, dtype) if epochs else []
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        for k, v in state["curves"].items():
            self.curves[k] = v.to(self.device)
        self.epoch = self.committed_epoch = int(state["epoch"])
        self.checkpoint_epochs, self.checkpoint_crcs = epochs, list(crcs)
        self.wall_time = float(state["wall_time"])
        if self.batch_gen is not None:
            self.batch_gen.set_state(state["batch_gen"])
        self.grok_epoch = state.get("grok_epoch")
        self.filter_state = state.get("grad_filter")
        if epochs and not header_holds(f, len(epochs), self.n_cols, dtype):
            self.notes.append(f"note: {f}: .npy header damaged (rows intact); rewritten")
        truncate_checkpoints(f, len(epochs), self.n_cols, dtype)   # rewrites the header
        return True

    def note_start_over(self) -> None:
        """One line when a run that progress.json says was trained has no state.pt: it starts
        over from epoch 0, and its first commit replaces the rows and curves it had."""
        try:
            prog = self.run.read_progress() or {}
        except (RunDirError, OSError):
            prog = {}
        rows = len(prog.get("checkpoint_epochs") or [])
        if isinstance(prog.get("epoch"), int) and prog["epoch"] > 0 or rows > 1:
            self.notes.append(
                f"note: run {self.cfg.run_id}: {self.run.file(STATE)} is missing, but "
                f"progress.json lists {prog.get('epoch')}/{self.cfg.n_epochs} epochs trained; "
                f"the run starts over from epoch 0 (its {rows} checkpoint row(s) and curves are "
                "replaced)")

    def begin_attempt(self) -> None:
        """Add this process to the run's attempts (kept in progress.json); note when it trains
        under a different device, thread count or versions than the attempt before."""
        try:
            before = (self.run.read_progress() or {}).get("attempts") or []
        except (RunDirError, OSError):
            before = []
        before = [a for a in before if isinstance(a, dict)]
        now = {"attempt": int(before[-1].get("attempt", len(before))) + 1 if before else 1,
               "epoch": self.epoch, **provenance(self.device, self.settings)}
        changed = changed_environment(before[-1], now) if before else []
        if changed:
            self.notes.append(
                f"note: run {self.cfg.run_id} resumes with a different "
                + ", ".join(f"{k} ({before[-1].get(k)} -> {now.get(k)})" for k in changed)
                + ": it will not be bit-identical to an uninterrupted run")
        kept = before + [now]
        if len(kept) > MAX_ATTEMPTS_KEPT:
            kept = kept[:1] + kept[-(MAX_ATTEMPTS_KEPT - 1):]
        self.attempts = kept

    @classmethod
    def open(cls, cfg: RunConfig, out: str | Path, device=None,
             settings: JobSettings | None = None) -> "Trainer":
        """A trainer for ``cfg`` in ``out``, holding the run's lock: new (scored and committed
        at epoch 0), or resumed from its last commit. RunLockedError when another process
        trains the run; RunDiverged (the run marked) when a new run's weights are not finite.
        ``settings``: the job's (``runtime.JobSettings``; None: the defaults)."""
        run = RunDir(out)
        run.create({**config_mod.to_dict(cfg), "run_id": cfg.run_id})
        lock = lock_run(run)
        try:
            run.remove_stale_temp_files()   # only the lock's holder may: they may be its writes
            device = device if device is not None else resolve_device(cfg.device)
            trainer = cls(cfg, run, device, settings)
            trainer.notes += [lock.note] if lock.note else []
            resumed = trainer.restore()
            trainer.begin_attempt()
            trainer.tracker = tracking.start(trainer)
            if resumed:
                trainer.write_views()
            else:
                trainer.evaluate()
                trainer.refuse_nonfinite()
                trainer.commit(checkpoint=True, state=True)
        except BaseException:
            lock.release()
            raise
        trainer._release = weakref.finalize(trainer, lock.release)
        return trainer

    def refuse_nonfinite(self) -> None:
        """Before a new run's first commit: weights that are not finite (an init_scale past
        float32) mark the run diverged with nothing committed (grokhpc.divergence's rule, as at
        every later commit), and RunDiverged is raised."""
        bad = divergence.nonfinite(self.curves["train_loss"][None],
                                   [p.detach()[None] for p in self.model.parameters()],
                                   [0], [self.epoch], self.epoch)
        if bad:
            epoch, what = bad[0]
            line = mark_diverged(self.run, self.cfg, epoch, what, None, self.progress())
            raise RunDiverged(f"{self.run.path}: {line}")

    def close(self) -> None:
        """Let the run's lock go (also done when the trainer is garbage-collected)."""
        tracking.stop(self)
        self._release()

    # ---- training ---------------------------------------------------------------------------
    def fit(self, progress_bar: bool = True, until: int | None = None) -> None:
        """Train to the run's last epoch (or to epoch ``until``) as a stack of one in exact mode
        (grokhpc.loop: the packed group's loop): a checkpoint row every ``checkpoint_every``
        epochs, state.pt when due (``commit``), on USR2, SIGTERM or SIGINT (then the signal
        goes on, see grokhpc.preempt) and where it stops. A loss or weight gone non-finite
        stops it at the next commit: RunDiverged, the run marked. A progress bar over epochs
        shows the latest losses."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        stop = min(self.stop_epoch(), cfg.n_epochs if until is None else until)
        bar = tqdm(total=cfg.n_epochs, initial=self.epoch, unit="epoch", disable=not progress_bar,
                   desc=cfg.run_id, dynamic_ncols=True, mininterval=1.0)
        try:
            with preempt.armed():
                stack = Stack([self], self.device, exact=True)
                diverged, _ = fit_stack(stack, stop, bar, log=lambda *a: None,
                                        commit_at_target=True, postfix=losses_postfix)
        finally:
            bar.close()
        if diverged:
            raise RunDiverged(f"{self.run.path}: {diverged[0][1]}")

    def finish(self) -> dict[str, Any] | None:
        """After the last epoch: progress measures (always at float32's highest matmul
        precision, whatever the run trained at) and summary (with the run's provenance), then
        mark the run done."""
        with matmul_precision("highest"):
            summary = measures.finalize_run(self.run, device=self.device)
        if isinstance(summary, dict):
            summary.update(provenance_columns(self.progress()))
            atomic_write_json(self.run.file(SUMMARY), summary)
        tracking.log_finish(self, summary)
        self.write_views(done=True)
        return summary


def run_training(cfg: RunConfig, out: str | Path, settings: JobSettings | None = None,
                 progress_bar: bool = True, log=print, retry_diverged: bool = False) -> RunDir:
    """Train ``cfg`` into ``out`` (resuming if interrupted); a complete run is left alone.
    RunDirError for a directory that cannot be used as it is (another run's, a sweep's, with
    files of two runs, damaged, held by another trainer, a disk that filled up). RunDiverged
    when the run goes non-finite, or was marked so before (``retry_diverged``: train it again
    from its last finite commit). ``settings``: the job's (``runtime.JobSettings``: how often
    state.pt is written, W&B; None: the defaults); a solo run steps as exact mode always does
    (``step_mode`` eager)."""
    run = _usable_run_dir(cfg, out, retry_diverged)
    if run.exists() and run.read_config().get("run_id") == cfg.run_id and run.is_complete():
        run.verify_checkpoints()   # a run with damaged rows is never called complete
        prog = run.read_progress()
        log(f"run {cfg.run_id} in {out} is already complete "
            f"({prog['epoch']}/{prog['n_epochs']} epochs); nothing to do")
        return run
    trainer = None
    try:
        with matmul_precision(cfg.matmul_precision):   # recorded in the attempt's provenance
            settings = (settings or JobSettings()).replace(step_mode="eager")
            trainer = Trainer.open(cfg, out, settings=settings)
            clear_diverged(run)   # trained again (retry_diverged): a new divergence marks anew
            if trainer.epoch > 0:
                log(f"run {cfg.run_id}: resuming at epoch {trainer.epoch}/{cfg.n_epochs}")
            for note in trainer.notes:
                log(note)
            trainer.fit(progress_bar=progress_bar)
        trainer.finish()
        run.clear_error()
    except (RunLockedError, RunDiverged, SystemExit, KeyboardInterrupt):
        raise   # another trainer's run / marked diverged / a requeue or an interrupt: state kept
    except BaseException:
        _record_failure(run, cfg, traceback.format_exc())
        raise
    finally:
        if trainer is not None:
            trainer.close()
    return run


def _usable_run_dir(cfg: RunConfig, out: str | Path, retry_diverged: bool) -> RunDir:
    """``out`` as a RunDir, or RunDirError before anything is written: an empty path (the
    current directory), a sweep's directory, the files of two runs; RunDiverged for this run
    marked diverged before (unless ``retry_diverged``)."""
    if not str(out).strip():
        raise RunDirError("out: expected a run directory, got ''")
    run = RunDir(out)
    refuse_sweep_root(run.path)
    if not (run.exists() and run.read_config().get("run_id") == cfg.run_id):
        return run   # new, or another run's: Trainer.open says which
    check_identity(run)
    if not retry_diverged:
        refuse_diverged_before(run, cfg.run_id)
    return run


def _record_failure(run: RunDir, cfg: RunConfig, text: str) -> None:
    """Leave error.txt in the run's own directory (never in one holding another run)."""
    try:
        if run.exists() and run.read_config().get("run_id") == cfg.run_id:
            run.write_error(text)
    except (OSError, RunDirError):
        pass


def config_from_args(overrides: list[str]) -> RunConfig:
    """The run's config: the seed's defaults with the --set values on top."""
    return config_mod.from_dict(config_mod.parse_overrides(overrides), source="--set")


def minutes_arg(text: str) -> float:
    """argparse type of --state-every: minutes >= 0."""
    try:
        v = float(text)
    except ValueError:
        v = -1.0
    if not v >= 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of minutes >= 0, got "
                                         f"{config_mod.shown(text)}")
    return v


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m grokhpc.train",
        description="Train one grokking run into a run directory (resumes if interrupted).")
    ap.add_argument("--out", required=True, help="run directory (created if missing)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a run field, e.g. --set weight_decay=0.3 (repeatable, each "
                         "field once); the fields, defaults and checks are in docs/run_fields.md")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("--state-every", type=minutes_arg, default=DEFAULT_STATE_EVERY_S / 60,
                    metavar="MINUTES",
                    help="minutes between writes of the resumable state, state.pt (default "
                         "%(default)g; 0: with every checkpoint row); it is also written on "
                         "SIGUSR2, SIGTERM and SIGINT (Ctrl-C; then the process ends, or a "
                         "handler before grokhpc's acts) and at the end")
    ap.add_argument("--retry-diverged", action="store_true",
                    help="train a run marked diverged (error.txt) again from its last finite "
                         "commit")
    ap.add_argument("--wandb", metavar="PROJECT", default=None,
                    help="log curves, measures and summary to this Weights & Biases project "
                         "(needs pip install -e '.[wandb]')")
    ap.add_argument("--wandb-mode", choices=tracking.MODES, default="offline",
                    help="offline (default: written under OUT/wandb for `wandb sync`) or online")
    ap.add_argument("--wandb-entity", metavar="ENTITY", default=None, help="W&B entity (team)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.out.strip():
        print(f"error: --out: expected a run directory, got {config_mod.shown(args.out)}",
              file=sys.stderr)
        return 2
    try:
        cfg = config_from_args(args.overrides)
        wandb = args.wandb and tracking.from_command_line(args.wandb, args.wandb_mode,
                                                          args.wandb_entity).to_dict()
        settings = JobSettings(state_every_s=args.state_every * 60, wandb=wandb or None)
        run_training(cfg, args.out, settings, progress_bar=not args.no_progress,
                     retry_diverged=args.retry_diverged)
    except RunDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (ConfigError, RunDirError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:   # e.g. no space for config.json itself; the traceback is in error.txt
        print(f"error: {e.filename or args.out}: {e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(interrupted_line(args.out), file=sys.stderr)
        return 130
    return 0


def interrupted_line(out: str) -> str:
    """What an interrupted ``train`` leaves: where a rerun of the same command resumes."""
    try:
        prog = RunDir(out).read_progress() or {}
    except (RunDirError, OSError):
        prog = {}
    at = prog.get("state_epoch")
    kept = f"its state is saved at epoch {at}" if at is not None else "no state saved yet"
    return f"interrupted: {out}: {kept}; rerun the same command to resume"


if __name__ == "__main__":
    sys.exit(main())
