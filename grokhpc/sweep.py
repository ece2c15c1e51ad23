"""Sweep specs: parse, validate and expand a YAML spec into runs (the config stage of a sweep).

A spec names a base run config, the axes to sweep and where the sweep goes::

    base: {p: 113, n_epochs: 25000}   # run fields (grokhpc.config.RunConfig); else the seed's
    grid:                       # Cartesian product over these axes (run fields -> lists)
      weight_decay: [0.1, 0.3, 1.0]
      model_seed: [1, 2, 3]
    zip: [{train_frac: [0.3, 0.5], lr: [1.0e-3, 3.0e-3]}]   # optional: axes varied together
    out: runs/wd_sweep          # sweep directory, relative to the current directory
    figures: {phase: [lr, weight_decay]}   # optional: phase diagrams (x, y; or a list of pairs)
    llc: {log_points: 12}       # optional: LLC per checkpoint after training (grokhpc.llc_run)
    published: {...}            # optional: a paper's numbers to compare with (grokhpc.reference)
    launcher:                   # how to run it (all optional)
      executor: auto            # auto | slurm | local | debug
      cluster: bouchet          # a profile in slurm/<name>.yaml
      time: 240                 # minutes per job
      gpus: 1                   # GPUs per job; each GPU trains one packed group of its runs
      gpu_type: [h100, a100, any]   # first one the cluster has wins (any: its profile's order)
      cpus_per_task: 2
      mem_gb: 16
      partition: gpu_h100       # optional: the profile picks the partition of the GPU type
      array_parallelism: 12
      runs_per_job: 1           # or "auto": sized for the shortest sweep (grokhpc.plan)
      max_timeouts: 3           # requeues after a time-out before giving up (preemption: no limit)
      state_every: 10           # minutes between writes of each run's state.pt (0: every row)
      step_mode: eager          # eager | fused | graph | compile (grokhpc.step_mode)
      refill: false             # true: freed slots of a packed job take waiting runs
      max_runs: 100000          # a bigger grid is refused before it is expanded
      extra: {account: my_lab}  # any other sbatch option
      wandb: {project: grokking}  # Weights & Biases (offline unless mode: online); off if unset

Every error is one line naming the file, the key and what was expected (a value it echoes is
cut to about ECHO_LIMIT characters). Each run gets its RunConfig, run_id and OUT/runs/<run_id>.

Cluster profiles (``slurm/<name>.yaml``) and the checks of the launcher against them are
grokhpc.clusters'; packing the runs into jobs is grokhpc.plan's. No torch import.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import math
import os
import reprlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from .config import FIELD_TYPES, ConfigError, RunConfig, from_dict, parse_overrides, to_dict
from .llc import checked_section
from .reference import parse_published
from .runtime import DEFAULT_STATE_EVERY_S, STEP_MODES, JobSettings
from .tracking import WandbSettings, parse_wandb

SPEC_KEYS = ("description", "base", "grid", "zip", "out", "launcher", "figures", "llc", "published")
FIGURE_KEYS = ("phase",)
EXECUTORS = ("auto", "slurm", "local", "debug")
LAUNCHER_KEYS = ("executor", "cluster", "time", "gpus", "gpu_type", "cpus_per_task", "mem_gb",
                 "partition", "array_parallelism", "runs_per_job", "max_timeouts", "extra",
                 "wandb", "state_every", "max_runs", "step_mode", "refill")
NEVER_NONE_KEYS = ("executor", "runs_per_job", "max_timeouts", "extra", "state_every", "max_runs",
                   "step_mode", "refill")   # null for these is refused, not "the default"
DEFAULT_MAX_RUNS = 100_000
ECHO_LIMIT = 200           # characters of a bad value an error line repeats
MAX_MAPPING_KEYS = 10_000  # keys of one YAML mapping, merge keys (<<) included


def cut_text(text: str, limit: int = ECHO_LIMIT) -> str:
    """``text`` cut to ``limit`` characters, an ellipsis where it was cut."""
    return text if len(text) <= limit else text[:limit - 1] + "\u2026"


def shown(value: Any, limit: int = ECHO_LIMIT) -> str:
    """repr of a value for an error line, cut to ``limit`` characters without building the
    whole repr of a huge one (a list nested through YAML aliases)."""
    r = reprlib.Repr()
    r.maxstring = r.maxother = r.maxlong = limit
    r.maxlist = r.maxtuple = r.maxdict = r.maxset = r.maxfrozenset = 12
    r.maxlevel = 4
    try:
        return cut_text(r.repr(value), limit)
    except ValueError:   # an integer beyond Python's int-to-text limit
        return f"<{type(value).__name__} too large to show>"


# ---- YAML with line numbers and duplicate-key detection -------------------------------------
def _loader():
    class Loader(yaml.SafeLoader):
        pass

    def construct_mapping(loader, node, deep=False):
        loader.flatten_mapping(node)
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(f"line {line}: duplicate key {shown(key)} (first at line "
                                  f"{seen[key]})")
            seen[key] = line
        return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)

    def flatten_mapping(loader, node):
        """Merge keys (``<<``), bounded: nested merges pass through here first, so a mapping
        that merges another twice per level stops growing at the first one too big."""
        yaml.SafeLoader.flatten_mapping(loader, node)
        if len(node.value) > MAX_MAPPING_KEYS:
            raise ConfigError(f"line {node.start_mark.line + 1}: a mapping of "
                              f"{len(node.value):,} keys (merge keys << included), over "
                              f"{MAX_MAPPING_KEYS:,}")

    def construct_int(loader, node):
        try:
            return yaml.SafeLoader.construct_yaml_int(loader, node)
        except ValueError:   # past Python's limit on digits of a decimal integer
            raise ConfigError(f"line {node.start_mark.line + 1}: an integer of "
                              f"{len(node.value):,} characters, too long to read") from None

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    Loader.add_constructor("tag:yaml.org,2002:int", construct_int)
    Loader.flatten_mapping = flatten_mapping
    return Loader


def load_yaml(text: str, source: str) -> Any:
    """Parse YAML text; errors name the source and the line."""
    try:
        return yaml.load(text, Loader=_loader())  # noqa: S506 (a SafeLoader subclass)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{source}: {where}invalid YAML ({what})") from None


# ---- launcher settings -------------------------------------------------------------------------
@dataclass(frozen=True)
class LauncherSettings:
    """The ``launcher`` section. ``None`` means: the cluster profile's default (or submitit's)."""

    executor: str = "auto"
    cluster: str | None = None
    time: int | None = None            # minutes per job
    gpus: int | None = None            # per job; a job trains one group of its runs per GPU
    gpu_type: str | tuple[str, ...] | None = None   # a type or preferences; resolved: one
    cpus_per_task: int | None = None
    mem_gb: float | None = None
    partition: str | None = None
    array_parallelism: int | None = None
    runs_per_job: int | str = 1        # an int >= 1 (per job, all its GPUs) or "auto"
    max_timeouts: int = 3
    extra: tuple[tuple[str, Any], ...] = ()
    wandb: WandbSettings | None = None  # experiment tracking, off when None
    state_every: float = DEFAULT_STATE_EVERY_S / 60  # minutes between state.pt writes; 0: each row
    max_runs: int = DEFAULT_MAX_RUNS   # a grid of more runs is refused before it is expanded
    step_mode: str = "eager"           # how a packed group issues its step (grokhpc.step_mode)
    refill: bool = False               # early-stopped slots take waiting runs (grokhpc.refill)

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in LAUNCHER_KEYS}
        d["extra"] = dict(self.extra)
        d["wandb"] = self.wandb.to_dict() if self.wandb else None
        return d

    def replace(self, **changes: Any) -> "LauncherSettings":
        return dataclasses.replace(self, **changes)

    def job_settings(self, kind: str, group: str) -> JobSettings:
        """What each job of a launch on executor ``kind`` needs beyond its runs: state.pt every
        ``state_every`` minutes, the step mode, torch threads (a local job's ``local_threads``;
        on SLURM None: the job's cpus-per-task) and W&B, its runs grouped under ``group``."""
        wandb = self.wandb.with_group(group).to_dict() if self.wandb else None
        return JobSettings(self.state_every * 60, self.step_mode, wandb=wandb, refill=self.refill,
                           threads=None if kind == "slurm" else local_threads(self))


def local_threads(launcher: LauncherSettings) -> int:
    """torch threads per local job: cpus_per_task, else 1 (small models gain little from more,
    and a busy machine makes extra threads spin)."""
    return launcher.cpus_per_task or 1


def _expect(cond: bool, source: str, key: str, expected: str, got: Any) -> None:
    if not cond:
        raise ConfigError(f"{source}: {cut_text(str(key))}: expected {expected}, got {shown(got)}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def parse_minutes(value: Any, source: str, key: str) -> int:
    """Minutes from an int or a SLURM time string (``MM``, ``HH:MM:SS``, ``D-HH:MM[:SS]``)."""
    bad = f"{key}", "minutes (an integer >= 1) or a time like 1-00:00:00"
    if _is_int(value):
        _expect(value >= 1, source, *bad, value)
        return value
    _expect(isinstance(value, str) and value.strip() != "", source, *bad, value)
    s = value.strip()
    days = 0
    try:
        if "-" in s:
            d, s = s.split("-", 1)
            days = int(d)
        parts = [int(x) for x in s.split(":")]
    except ValueError:
        raise ConfigError(f"{source}: {bad[0]}: expected {bad[1]}, got {shown(value)}") \
            from None
    if len(parts) == 1:
        h, m, sec = (parts[0], 0, 0) if days else (0, parts[0], 0)
    elif len(parts) == 2:
        h, m, sec = (parts[0], parts[1], 0) if days else (0, parts[0], parts[1])
    elif len(parts) == 3:
        h, m, sec = parts
    else:
        raise ConfigError(f"{source}: {bad[0]}: expected {bad[1]}, got {shown(value)}")
    minutes = days * 1440 + h * 60 + m + (1 if sec else 0)
    _expect(minutes >= 1, source, *bad, value)
    return minutes


def _launcher_value(key: str, v: Any, source: str, k: str) -> Any:
    """One launcher setting, validated (``k``: its name in an error line)."""
    if key == "executor":
        _expect(v in EXECUTORS, source, k, " | ".join(EXECUTORS), v)
    elif key in ("cluster", "partition"):
        _expect(isinstance(v, str) and v.strip() != "", source, k, "a name", v)
    elif key == "gpu_type":
        names = v if isinstance(v, list) else [v]
        _expect(len(names) > 0 and all(isinstance(t, str) and t.strip() != "" for t in names),
                source, k, "a GPU type or a list of them (any: the cluster's order)", v)
        v = tuple(t.strip().lower() for t in v) if isinstance(v, list) else v.strip().lower()
    elif key == "time":
        v = parse_minutes(v, source, k)
    elif key in ("gpus", "max_timeouts"):
        _expect(_is_int(v) and v >= 0, source, k, "an integer >= 0", v)
    elif key in ("cpus_per_task", "array_parallelism"):
        _expect(_is_int(v) and v >= 1, source, k, "an integer >= 1", v)
    elif key == "max_runs":
        _expect(_is_int(v) and v >= 1, source, k, "an integer >= 1 (runs in a sweep)", v)
    elif key == "state_every":
        _expect(_is_num(v) and 0 <= v < math.inf, source, k,
                "a number of minutes >= 0 (0: with every checkpoint row)", v)
        v = float(v)
    elif key == "mem_gb":
        _expect(_is_num(v) and v > 0, source, k, "a positive number of GB", v)
        v = float(v)
    elif key == "runs_per_job":
        _expect(v == "auto" or (_is_int(v) and v >= 1), source, k, 'an integer >= 1 or "auto"', v)
    elif key == "step_mode":
        _expect(v in STEP_MODES, source, k, " | ".join(STEP_MODES), v)
    elif key == "refill":
        _expect(isinstance(v, bool), source, k, "true or false", v)
    elif key == "extra":
        v = _extra(v, source, k)
    elif key == "wandb":
        v = parse_wandb(v, source, k)
    return v


def _extra(v: Any, source: str, k: str) -> tuple[tuple[str, Any], ...]:
    """``launcher.extra``: other sbatch options, none that grokhpc sets itself."""
    _expect(isinstance(v, Mapping), source, k, "a mapping of sbatch options", v)
    for ek, ev in v.items():
        _expect(isinstance(ek, str) and (isinstance(ev, (str, int, float)) or ev is True),
                source, f"{k}.{cut_text(str(ek))}", "a string, number or true", ev)
        _expect(ek.replace("-", "_") not in ("array", "output", "error", "signal", "open_mode"),
                source, f"{k}.{ek}", "an option grokhpc does not set itself", ek)
    return tuple(sorted(v.items()))


def parse_launcher(d: Any, source: str, base: LauncherSettings | None = None) -> LauncherSettings:
    """Validate a ``launcher`` mapping (or ``--set launcher.KEY=VALUE`` values)."""
    if d is None:
        d = {}
    _expect(isinstance(d, Mapping), source, "launcher", "a mapping of launcher settings",
            type(d).__name__)
    values: dict[str, Any] = {}
    dotted = {k[6:]: v for k, v in d.items() if isinstance(k, str) and k.startswith("wandb.")}
    for key, v in d.items():
        k = f"launcher.{cut_text(str(key))}"
        if isinstance(key, str) and key.startswith("wandb."):   # --set launcher.wandb.mode=...
            continue
        if key not in LAUNCHER_KEYS:
            raise ConfigError(f"{source}: {cut_text(str(k))}: unknown key (expected one of "
                              f"{', '.join(LAUNCHER_KEYS)})")
        values[key] = None if v is None and key not in NEVER_NONE_KEYS else \
            _launcher_value(key, v, source, k)
    if dotted:
        start = values.get("wandb", (base or LauncherSettings()).wandb)
        values["wandb"] = parse_wandb({**(start.to_dict() if start else {}), **dotted}, source)
    return (base or LauncherSettings()).replace(**values)


def _check_gpus_per_job(out: LauncherSettings, field, blame: str) -> None:
    """A job trains one packed group of its runs on each of its GPUs: a fixed runs_per_job
    below gpus would leave GPUs idle. ``field(key)`` names where a key was set; ``blame`` is
    the key the error names (the one set last)."""
    gpus, n = out.gpus or 0, out.runs_per_job
    if n == "auto" or gpus <= n:
        return
    if blame == "gpus":
        raise ConfigError(f"{field('gpus')}: expected at most launcher.runs_per_job ({n}) GPUs "
                          f"per job (each GPU trains a group of the job's runs), got {gpus}")
    raise ConfigError(f"{field('runs_per_job')}: expected at least launcher.gpus ({gpus}) runs "
                      f"per job (each GPU trains a group of the job's runs), got {n}")


# ---- the sweep ------------------------------------------------------------------------------
@dataclass(frozen=True)
class SweepRun:
    """One run of a sweep: its resolved config, directory and the values its axes took."""

    config: RunConfig
    dir: Path
    swept: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def run_id(self) -> str:
        return self.config.run_id


@dataclass(frozen=True)
class Sweep:
    spec: Path
    spec_hash: str
    out: Path
    base: RunConfig
    axes: tuple[str, ...]
    zip_groups: tuple[tuple[str, ...], ...]
    launcher: LauncherSettings
    runs: tuple[SweepRun, ...]
    description: str = ""
    phase_pairs: tuple[tuple[str, str], ...] = ()   # figures.phase: (x axis, y axis) pairs
    llc: Any = None                # the llc: section, checked by llc.LLCRequest (llc_run reads it)
    published: tuple = ()          # the paper's numbers (grokhpc.reference; aggregate compares)

    @property
    def name(self) -> str:
        return self.out.name


def split_overrides(items: Iterable[str], source: str = "--set") -> tuple[dict, dict, Any]:
    """``--set`` items as (run field values, launcher values, out or None). ``out`` is taken
    as typed (a directory named 2024 is a path, not a number); an empty one is refused."""
    items = list(items)
    values = parse_overrides(items, source)
    run_values, launcher_values, out = {}, {}, None
    for k, v in values.items():
        if k.startswith("launcher."):
            launcher_values[k[len("launcher."):]] = v
        elif k == "out":
            out = [i.split("=", 1)[1] for i in items if i.split("=", 1)[0].strip() == k][-1]
            _expect(out.strip() != "", source, "out", "a directory path", out)
        else:
            run_values[k] = v
    return run_values, launcher_values, out


def parse_figures(figs: Any, source: str, axes: Iterable[str]) -> tuple[tuple[str, str], ...]:
    """The spec's ``figures:`` mapping: ``phase`` is one pair of swept axes or a list of pairs."""
    if figs is None:
        return ()
    _expect(isinstance(figs, Mapping), source, "figures", "a mapping (phase: [axis, axis])",
            type(figs).__name__)
    for k in figs:
        if k not in FIGURE_KEYS:
            raise ConfigError(f"{source}: figures.{cut_text(str(k))}: unknown key (expected one of "
                              f"{', '.join(FIGURE_KEYS)})")
    raw = figs.get("phase") or []
    pairs = raw if raw and isinstance(raw, list) and isinstance(raw[0], list) else [raw]
    swept = list(axes)
    out = []
    for pair in pairs if raw else []:
        _expect(isinstance(pair, list) and len(pair) == 2 and pair[0] != pair[1], source,
                "figures.phase", "two different swept axes, e.g. [lr, weight_decay]", pair)
        for a in pair:
            if a not in swept:
                raise ConfigError(f"{source}: figures.phase: {cut_text(str(a))}: not a swept axis "
                                  f"(swept: {', '.join(swept)})")
        out.append((pair[0], pair[1]))
    return tuple(out)


def _spec_mapping(text: str, source: str) -> Mapping[str, Any]:
    """The spec's top-level mapping, with no unknown keys."""
    spec = load_yaml(text, source)
    spec = {} if spec is None else spec
    _expect(isinstance(spec, Mapping), source, "(top level)",
            "a mapping with base, grid, zip, out and launcher", type(spec).__name__)
    for k in spec:
        if k not in SPEC_KEYS:
            raise ConfigError(f"{source}: {cut_text(str(k))}: unknown key (expected one of "
                              f"{', '.join(SPEC_KEYS)})")
    return spec


def _grid_and_zips(spec: Mapping[str, Any], source: str) -> tuple[Mapping, list]:
    """The ``grid`` mapping and the list of ``zip`` groups; at least one axis between them."""
    grid = spec.get("grid")
    zips = spec.get("zip")
    if grid is None and zips is None:
        raise ConfigError(f"{source}: grid: expected at least one axis (run field: [values])")
    grid = {} if grid is None else grid
    _expect(isinstance(grid, Mapping), source, "grid", "a mapping of run fields to lists",
            type(grid).__name__)
    if zips is None:
        zips = []
    elif isinstance(zips, Mapping):
        zips = [zips]
    _expect(isinstance(zips, list), source, "zip", "a list of groups (field: [values])",
            type(zips).__name__)
    if not grid and not zips:
        raise ConfigError(f"{source}: grid: expected at least one axis (run field: [values]), "
                          "got an empty grid")
    return grid, zips


class _Axes:
    """The swept axes as they are read: each factor of the product is the list of its
    settings (one axis of the grid, or one zip group's axes varying together)."""

    def __init__(self, source: str, base: RunConfig):
        self.source, self.base = source, base
        self.seen: dict[str, str] = {}               # axis -> where it is swept
        self.names: list[str] = []
        self.factors: list[list[dict[str, Any]]] = []
        self.zip_groups: list[tuple[str, ...]] = []

    def values(self, where: str, axis: Any, values: Any, distinct: bool = True) -> list[Any]:
        """One axis's values, checked as run field values on the base (a zip's may repeat)."""
        source, key = self.source, f"{where}.{axis}"
        _expect(isinstance(axis, str) and axis in FIELD_TYPES, source, key,
                f"a run field ({', '.join(FIELD_TYPES)})", axis)
        if axis in self.seen:
            raise ConfigError(f"{source}: {key}: duplicate axis (already swept in "
                              f"{self.seen[axis]})")
        self.seen[axis] = where
        _expect(isinstance(values, list) and len(values) > 0, source, key,
                "a non-empty list of values", values)
        out = [getattr(from_dict({axis: v}, source=f"{source}: {where}", base=self.base), axis)
               for v in values]
        if distinct and len(set(map(repr, out))) != len(out):
            raise ConfigError(f"{source}: {key}: expected distinct values, got {shown(values)}")
        self.names.append(axis)
        return out

    def add_grid(self, grid: Mapping) -> None:
        for axis, values in grid.items():
            self.factors.append([{axis: v} for v in self.values("grid", axis, values)])

    def add_zip(self, gi: int, group: Any) -> None:
        where = f"zip[{gi}]"
        _expect(isinstance(group, Mapping) and len(group) >= 1, self.source, where,
                "a mapping of run fields to lists of equal length", group)
        cols = {axis: self.values(where, axis, values, False) for axis, values in group.items()}
        lengths = {a: len(v) for a, v in cols.items()}
        if len(set(lengths.values())) != 1:
            raise ConfigError(f"{self.source}: {where}: expected lists of equal length, got "
                              "lengths " + ", ".join(f"{a}={n}" for a, n in lengths.items()))
        n = next(iter(lengths.values()))
        self.factors.append([{a: cols[a][i] for a in cols} for i in range(n)])
        self.zip_groups.append(tuple(cols))


def _out_dir(spec: Mapping[str, Any], out_over: Any, source: str,
             spec_path: str | os.PathLike | None, cwd: str | os.PathLike | None) -> Path:
    """The sweep directory: ``--set out=``, else the spec's ``out``, else runs/<spec stem>.
    A path through an existing file (the file itself, or a file as a parent) is refused."""
    out_raw = out_over if out_over is not None else spec.get("out")
    source = "--set" if out_over is not None else source
    if out_raw is None:
        stem = Path(spec_path).stem if spec_path else "sweep"
        out_raw = f"runs/{stem}"
    _expect(isinstance(out_raw, str) and out_raw.strip() != "", source, "out",
            "a directory path", out_raw)
    out = Path(os.path.expanduser(out_raw))
    out = out if out.is_absolute() else Path(cwd or os.getcwd()) / out
    try:
        blocker = next((d for d in (out, *out.parents) if d.exists() or d.is_symlink()), None)
    except OSError:   # a parent that cannot be searched: the launch says so when it writes
        blocker = None
    if blocker is not None and not blocker.is_dir():
        what = "" if blocker == out else f"{cut_text(str(blocker))} is "
        raise ConfigError(f"{source}: out: expected a directory path, got {shown(out_raw)}: "
                          f"{what}an existing file")
    return out


def _expand(factors: list[list[dict[str, Any]]], base: RunConfig, out: Path,
            source: str) -> list[SweepRun]:
    """The product of the factors: one run per combination, each a distinct run_id."""
    runs: list[SweepRun] = []
    by_id: dict[str, int] = {}
    for combo in itertools.product(*factors):
        swept = {k: list(v) if isinstance(v, tuple) else v for part in combo
                 for k, v in part.items()}
        i = len(runs)
        label = ", ".join(f"{k}={v}" for k, v in swept.items())
        cfg = from_dict({**to_dict(base), **swept}, source=f"{source}: run {i} ({label})")
        if cfg.run_id in by_id:
            raise ConfigError(f"{source}: grid: runs {by_id[cfg.run_id]} and {i} are the same "
                              f"run ({label}); an axis only changes fields outside the run's "
                              "identity")
        by_id[cfg.run_id] = i
        runs.append(SweepRun(config=cfg, dir=out / "runs" / cfg.run_id, swept=swept))
    return runs


def _check_size(factors: list[list], launcher: LauncherSettings, source: str) -> None:
    """Refuse a sweep of more than launcher.max_runs runs before expanding it: the size is
    the product of the axis lengths."""
    n = math.prod(len(f) for f in factors)
    if n > launcher.max_runs:
        raise ConfigError(f"{source}: grid: expected at most launcher.max_runs "
                          f"({launcher.max_runs:,}) runs, got {n:,}; to launch that many, set "
                          f"launcher.max_runs: {n} in the spec (or --set launcher.max_runs={n})")


def parse_sweep(text: str, source: str, overrides: Iterable[str] = (),
                spec_path: str | os.PathLike | None = None,
                cwd: str | os.PathLike | None = None) -> Sweep:
    """Validate spec text and expand it into runs; ``overrides`` are ``--set key=value`` items
    (run fields go into ``base``, ``launcher.KEY`` into the launcher, ``out`` replaces ``out``)."""
    spec = _spec_mapping(text, source)
    run_over, launcher_over, out_over = split_overrides(overrides)
    base_d = spec.get("base") or {}
    _expect(isinstance(base_d, Mapping), source, "base", "a mapping of run fields",
            type(base_d).__name__)
    base = from_dict(base_d, source=f"{source}: base")
    grid, zips = _grid_and_zips(spec, source)
    axes = _Axes(source, base)
    axes.add_grid(grid)
    for gi, group in enumerate(zips):
        axes.add_zip(gi, group)
    for k in run_over:         # --set on run fields: base only, never an axis
        if k in axes.seen:
            raise ConfigError(f"--set: {k}: expected a base field, but {k} is swept in "
                              f"{source} {axes.seen[k]}; edit the spec instead")
    if run_over:
        base = from_dict(run_over, source="--set", base=base)
    out = _out_dir(spec, out_over, source, spec_path, cwd)
    launcher = parse_launcher(spec.get("launcher"), source)
    if launcher_over:
        launcher = parse_launcher(launcher_over, "--set", base=launcher)
    _check_gpus_per_job(launcher, lambda k: f"{'--set' if k in launcher_over else source}: "
                                            f"launcher.{k}",
                        "runs_per_job" if "runs_per_job" in launcher_over
                        and "gpus" not in launcher_over else "gpus")
    _check_size(axes.factors, launcher, source)
    runs = _expand(axes.factors, base, out, source)
    description = spec.get("description") or ""
    _expect(isinstance(description, str), source, "description", "a string", description)
    return Sweep(spec=Path(spec_path).resolve() if spec_path else Path(source),
                 spec_hash=hashlib.sha256(text.encode()).hexdigest()[:16],
                 out=out, base=base, axes=tuple(axes.names), zip_groups=tuple(axes.zip_groups),
                 launcher=launcher, runs=tuple(runs), description=description,
                 phase_pairs=parse_figures(spec.get("figures"), source, axes.names),
                 llc=checked_section(spec.get("llc"), source),
                 published=parse_published(spec.get("published"), source,
                                           [r.swept for r in runs]))


def read_spec_text(path: str | os.PathLike, what: str) -> str:
    """The text of a spec or profile file. Missing, unreadable or not UTF-8 (a binary file, a
    file saved as UTF-16): a one-line ConfigError naming the file."""
    source = str(path)
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{source}: no such {what}") from None
    except OSError as e:
        raise ConfigError(f"{source}: cannot read ({e.strerror})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{source}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset "
                          f"{e.start}); a {what} is a YAML text file") from None


def load_sweep(path: str | os.PathLike, overrides: Iterable[str] = (),
               cwd: str | os.PathLike | None = None) -> Sweep:
    """Read and expand the spec at ``path``."""
    text = read_spec_text(path, "sweep spec")
    return parse_sweep(text, str(path), overrides, spec_path=path, cwd=cwd)


__all__ = ["Sweep", "SweepRun", "LauncherSettings", "load_sweep", "parse_sweep",
           "parse_launcher", "local_threads", "EXECUTORS"]
