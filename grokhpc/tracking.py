"""Optional experiment tracking with Weights & Biases (``pip install -e .[wandb]``).

Off unless asked for: ``launcher: {wandb: {project: NAME}}`` in a sweep spec, or
``python -m grokhpc.train --out DIR --wandb NAME`` for one run. Either way the setting reaches
the trainer in its job's settings (``runtime.JobSettings.wandb``, a plain mapping; read by
:func:`start`): a sweep's jobs carry it (the runs grouped under the sweep's name), the command
for one run builds it from its flags. Nothing imports wandb unless it is set.

Each grokhpc run is one W&B run (``resume="allow"``), written under the run directory
(``RUN/wandb/``), named by its ``run_id``; its id (``wandb_id``) is the run_id prefixed by its
group, a sweep's name unless ``launcher.wandb.group`` sets one: the same config in two sweeps
trains in two run directories, so it makes two W&B runs, each continued from its own
directory's logs (one W&B run fed from two directories would skip or repeat steps). At each commit the curve rows since the last logged
one go to W&B with step = epoch; at the end, one row per checkpoint with the progress measures
(``measures/*`` against ``measures/epoch``, steps ``n_epochs + 1 + k``) and the run's summary.
Every row has a fixed step, so a resumed attempt logs only the steps beyond those the run's
local W&B logs already hold (read with wandb's own reader, ``wandb leet inspect``); a requeued
job continues its W&B run and no epoch is logged twice.

Offline by default (compute nodes rarely reach the internet): each attempt leaves one
``RUN/wandb/offline-run-*`` folder, and ``wandb sync`` uploads them, those of one run in order
of start time, into one W&B run.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import subprocess
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Mapping

from .config import ConfigError, to_dict
from .store import MEASURES

MODES = ("offline", "online")
KEYS = ("project", "mode", "entity", "group", "tags")
CURVE_KEYS = ("train_loss", "train_acc", "test_loss", "test_acc")
INSTALL_HINT = "pip install -e '.[wandb]' (or pip install wandb)"
_BAD_NAME_CHARS = set("/\\#?%:")
_announced: list[str] = []   # the sync line this process printed (it prints one)


class TrackingError(RuntimeError):
    """Tracking was asked for but cannot be done (wandb missing, its logs unreadable)."""


# ---- the setting ------------------------------------------------------------------------------
@dataclass(frozen=True)
class WandbSettings:
    """Where a run's W&B record goes; ``mode`` offline writes locally for ``wandb sync``."""

    project: str
    mode: str = "offline"
    entity: str | None = None
    group: str | None = None
    tags: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tags"] = list(self.tags)
        return d

    def with_group(self, group: str) -> "WandbSettings":
        """The same, grouped under ``group`` unless a group was given."""
        return self if self.group else replace(self, group=group)


def _name(v: Any, where: str) -> str:
    if not (isinstance(v, str) and v.strip() and len(v) <= 128
            and not (_BAD_NAME_CHARS & set(v))):
        raise ConfigError(f"{where}: expected a W&B name (at most 128 characters, "
                          f"none of / \\ # ? % :), got {v!r}")
    return v.strip()


def parse_wandb(value: Any, source: str, key: str = "launcher.wandb") -> WandbSettings | None:
    """The ``wandb`` setting: null or false -> off; a string -> that project; a mapping with
    project, mode (offline | online), entity, group and tags."""
    if value is None or value is False:
        return None
    if isinstance(value, str):
        value = {"project": value}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{source}: {key}: expected a project name or a mapping with "
                          f"{', '.join(KEYS)}, got {value!r}")
    for k in value:
        if k not in KEYS:
            raise ConfigError(f"{source}: {key}.{k}: unknown key (expected one of "
                              f"{', '.join(KEYS)})")
    if value.get("project") is None:
        raise ConfigError(f"{source}: {key}.project: expected a W&B project name, got none")
    mode = "offline" if value.get("mode") is None else value["mode"]
    if mode not in MODES:
        raise ConfigError(f"{source}: {key}.mode: expected offline | online, got {mode!r}")
    tags = value.get("tags") or ()
    tags = [tags] if isinstance(tags, str) else tags
    if not isinstance(tags, (list, tuple)):
        raise ConfigError(f"{source}: {key}.tags: expected a list of tags, got {tags!r}")
    opt = {k: None if value.get(k) is None else _name(value[k], f"{source}: {key}.{k}")
           for k in ("entity", "group")}
    return WandbSettings(project=_name(value["project"], f"{source}: {key}.project"), mode=mode,
                         tags=tuple(_name(t, f"{source}: {key}.tags") for t in tags), **opt)


def from_command_line(project: str, mode: str = "offline",
                      entity: str | None = None) -> WandbSettings:
    """``--wandb PROJECT [--wandb-mode M] [--wandb-entity E]``, checked, wandb installed."""
    settings = WandbSettings(project=_name(project, "--wandb"), mode=mode,
                             entity=None if entity is None else _name(entity, "--wandb-entity"))
    check_installed("--wandb")
    return settings


def check_installed(where: str) -> None:
    """ConfigError when wandb cannot be imported here (checked without importing it)."""
    import importlib.util

    try:
        found = importlib.util.find_spec("wandb") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise ConfigError(f"{where}: wandb is not installed; {INSTALL_HINT}")


def sync_command(pattern: str | Path) -> str:
    return f"wandb sync {pattern}"


def announce(line: str, file=None, always: bool = False) -> None:
    """Print how to upload offline W&B runs, once per process (a job trains many runs); a
    launch says it ``always``, and its jobs run in this process then say nothing more."""
    if always or not _announced:
        _announced.append(line)
        print(line, file=file if file is not None else sys.stdout, flush=True)


def wandb_id(settings: WandbSettings, run_id: str) -> str:
    """The W&B run id of a grokhpc run: ``GROUP-RUN_ID`` (the group's characters other than
    letters, digits, ``_ . -`` made ``-``, at most 48 of them), the run_id alone ungrouped."""
    if not settings.group:
        return run_id
    return re.sub(r"[^A-Za-z0-9_.-]", "-", settings.group)[:48] + "-" + run_id


# ---- what a W&B run already holds -------------------------------------------------------------
def segments(run_dir: Path, run_id: str) -> list[Path]:
    """The local transaction logs of the W&B run ``run_id`` (``wandb_id``) under
    ``run_dir/wandb``, oldest first (one per attempt; the folder names carry the start time)."""
    found = (run_dir / "wandb").glob(f"*run-*-{run_id}/run-{run_id}.wandb")
    return sorted(found, key=lambda f: f.parent.name.rsplit("-", 1)[0][-15:])


def read_records(log: Path) -> list[dict]:
    """The records of one .wandb log as wandb's own reader prints them (one JSON object per
    record); a log cut short by a kill reads up to its last whole record."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_ERROR_REPORTING": "false",
           "WANDB_SILENT": "true"}
    cmd = [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(log)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    except (OSError, subprocess.SubprocessError) as e:
        raise TrackingError(f"{log}: cannot read the W&B log ({e})") from None
    if r.returncode != 0:
        why = (r.stderr.strip().splitlines() or ["no message"])[-1]
        raise TrackingError(f"{log}: cannot read the W&B log (wandb leet inspect: {why})")
    return [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]


def history_steps(records: list[dict]) -> list[int]:
    """The step of every history row in ``records``, in order."""
    out = []
    for rec in records:
        if rec.get("type") == "history":
            h = rec["history"]
            step = (h.get("step") or {}).get("num")
            out.append(int(step if step is not None else h["item"]["_step"]))
    return out


def next_step(run_dir: Path, run_id: str) -> int:
    """One past the last step in the run's local W&B logs (0 when there are none). Steps rise
    from attempt to attempt, so the newest log with a row has the last one."""
    for log in reversed(segments(run_dir, run_id)):
        steps = history_steps(read_records(log))
        if steps:
            return max(steps) + 1
    return 0


# ---- tracking a trainer -----------------------------------------------------------------------
class Tracker:
    """The W&B run of one trainer and the next step it has not logged yet."""

    def __init__(self, run: Any, settings: WandbSettings, step: int):
        self.run, self.settings, self.step = run, settings, step

    def log_curves(self, trainer) -> None:
        """The curve rows after the last logged one up to the epoch of the last commit (a row,
        or a state); that epoch's own row waits for its train loss (known after the next step)
        unless it is the last epoch. A resume from an older state recomputes the same rows and
        starts logging after the W&B run's last step (``next_step``)."""
        if trainer.committed_epoch is None:
            return
        e, n = trainer.epoch, trainer.cfg.n_epochs
        upto = e if e >= n else e - 1
        if upto < self.step:
            return
        cols = {k: trainer.curves[k][self.step: upto + 1].cpu().numpy() for k in CURVE_KEYS}
        for i, epoch in enumerate(range(self.step, upto + 1)):
            row = {k: float(c[i]) for k, c in cols.items() if math.isfinite(c[i])}
            self.run.log({"epoch": epoch, **row}, step=epoch)
        self.step = upto + 1

    def log_measures(self, trainer) -> None:
        """One row per checkpoint (its scalar measures), at steps after the last epoch."""
        import pyarrow.parquet as pq

        table = pq.read_table(trainer.run.file(MEASURES))
        names = [f.name for f in table.schema if f.name != "epoch"
                 and (str(f.type).startswith(("double", "float", "int")))]
        first = trainer.cfg.n_epochs + 1
        for k, row in enumerate(table.select(["epoch", *names]).to_pylist()):
            if first + k >= self.step:
                values = {f"measures/{m}": row[m] for m in names
                          if row[m] is not None and math.isfinite(row[m])}
                self.run.log({"measures/epoch": row["epoch"], **values}, step=first + k)
                self.step = first + k + 1

    def finish(self, exit_code: int) -> None:
        run, self.run = self.run, None
        if run is not None:
            run.finish(exit_code=exit_code)


def _import_wandb():
    try:
        import wandb
    except ImportError:
        raise TrackingError("the job's settings ask for W&B tracking but wandb is not installed; "
                            f"{INSTALL_HINT}") from None
    return wandb


def start(trainer) -> Tracker | None:
    """The trainer's W&B run (new, or continued) as its job's settings ask
    (``trainer.settings.wandb``), or None when tracking is off. Tracking that cannot start
    (wandb missing on this node, its logs unreadable, no server) is reported in one line and
    the run trains untracked; a later attempt picks the W&B run up again."""
    wanted = trainer.settings.wandb
    if not wanted:
        return None
    try:
        settings = parse_wandb(wanted, "job settings", "wandb")
        return _start(trainer, settings)
    except Exception as e:
        _warn(trainer, "could not start", e)
        return None


def _start(trainer, settings: WandbSettings) -> Tracker:
    wandb = _import_wandb()

    cfg, run_dir = trainer.cfg, Path(trainer.run.path)
    wid = wandb_id(settings, cfg.run_id)
    done = next_step(run_dir, wid)
    offline = settings.mode == "offline"
    run = wandb.init(
        project=settings.project, entity=settings.entity, group=settings.group,
        tags=list(settings.tags) or None, id=wid, name=cfg.run_id, resume="allow",
        mode=settings.mode, dir=str(run_dir), config={**to_dict(cfg), "run_id": cfg.run_id},
        settings=wandb.Settings(console="off", reinit="create_new", silent=offline,
                                x_save_requirements=False))
    for k in CURVE_KEYS:
        run.define_metric(k, step_metric="epoch")
    run.define_metric("measures/*", step_metric="measures/epoch")
    tracker = Tracker(run, settings, max(done, 0 if offline else int(run.step)))
    if offline:
        announce(f"W&B run {cfg.run_id} is written offline to {run_dir / 'wandb'}; upload "
                 "with: " + sync_command(run_dir / "wandb" / "offline-run-*"))
    return tracker


def _warn(trainer, what: str, e: BaseException) -> None:
    print(f"warning: run {trainer.cfg.run_id}: W&B tracking {what} ({type(e).__name__}: "
          f"{str(e).splitlines()[0] if str(e) else ''}); training goes on untracked",
          file=sys.stderr, flush=True)


def _give_up(trainer, e: BaseException) -> None:
    """Tracking failed: say so in one line and train on without it (a later attempt resumes
    the W&B run where its logs end)."""
    _warn(trainer, "stopped", e)
    tracker, trainer.tracker = trainer.tracker, None
    with contextlib.suppress(Exception):
        tracker.finish(exit_code=1)


def log_commit(trainer) -> None:
    """After a commit: the new curve rows."""
    if trainer.tracker is None:
        return
    try:
        trainer.tracker.log_curves(trainer)
    except Exception as e:
        _give_up(trainer, e)


def log_finish(trainer, summary: Mapping | None) -> None:
    """After the measures: any curve rows left, the measures rows and the summary; then the
    W&B run ends (before the run is marked done, so a done run has its W&B record whole)."""
    tracker = trainer.tracker
    if tracker is None:
        return
    try:
        tracker.log_curves(trainer)
        tracker.log_measures(trainer)
        if summary:
            tracker.run.summary.update(dict(summary))
        tracker.finish(exit_code=0)
    except Exception as e:
        _give_up(trainer, e)
    trainer.tracker = None


def stop(trainer) -> None:
    """The trainer closes before its run is finished (interrupted, or trained part way): end
    the W&B run as failed; a resume continues it."""
    tracker, trainer.tracker = trainer.tracker, None
    if tracker is not None:
        with contextlib.suppress(Exception):
            tracker.finish(exit_code=1)


__all__ = ["WandbSettings", "parse_wandb", "from_command_line", "check_installed", "announce",
           "start", "wandb_id", "log_commit", "log_finish", "stop", "segments", "read_records",
           "history_steps", "next_step", "sync_command", "TrackingError"]
