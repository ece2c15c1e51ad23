"""Cluster profiles (``slurm/<name>.yaml``): partitions, their per-user limits and the GPU
request syntax; the launcher settings filled in and checked against them (spec stage).

``load_profile`` finds and validates a profile; ``resolve_launcher`` fills the launcher values a
spec leaves unset from the profile's defaults, picks the GPU type and partition (``choose_gpu``:
the spec states its preferences, the profile's type order and partitions decide) and checks them
against the partition (one line naming the spec's or the profile's field); ``access_notes`` says
where a cluster or partition is closed to most users; ``fit_partition`` keeps a launch inside the
partition's per-user caps (running and queued jobs, GPUs, submissions per hour). No torch
import.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from .config import ConfigError
from .sweep import (LauncherSettings, _check_gpus_per_job, _expect, _is_int, cut_text,
                    load_yaml, parse_launcher, parse_minutes, read_spec_text, shown)

PROFILE_KEYS = ("name", "description", "gpu_request", "cpu_partition", "gpu_partition",
                "gpu_types", "access", "instead", "submissions_per_hour", "defaults",
                "partitions", "notes")
PROFILE_DEFAULT_KEYS = ("time", "cpus_per_task", "mem_gb", "gpus", "gpu_type",
                        "array_parallelism")
PARTITION_KEYS = ("max_time", "gpus", "gpu_types", "preemptable", "max_running",
                  "max_submitted", "max_gpus", "reserved", "description")
ANY_GPU = "any"   # in a spec's gpu_type list: the profile's type order
PARTITION_CAPS = ("max_running", "max_submitted", "max_gpus")   # per user
GPU_REQUESTS = ("gpus", "gres")
DEFAULT_ARRAY_PARALLELISM = 64   # array tasks at once when neither the spec nor a cap says


@dataclass(frozen=True)
class Partition:
    """One SLURM partition of a cluster profile and its per-user limits (None: no limit)."""

    name: str
    max_time: int | None = None       # minutes
    gpus: bool = False
    gpu_types: tuple[str, ...] = ()
    preemptable: bool = False
    max_running: int | None = None    # running jobs per user
    max_submitted: int | None = None  # pending + running jobs per user (each array task counts)
    max_gpus: int | None = None       # GPUs per user, all jobs together
    reserved: str = ""                # who may use it, where not everyone may
    description: str = ""


@dataclass(frozen=True)
class ClusterProfile:
    """A cluster's partitions, limits and GPU request syntax (``slurm/<name>.yaml``)."""

    name: str
    path: Path
    description: str = ""
    gpu_request: str = "gpus"          # gpus: --gpus=TYPE:N ; gres: --gres=gpu:TYPE:N
    cpu_partition: str | None = None
    gpu_partition: str | None = None
    gpu_types: tuple[tuple[str, str], ...] = ()   # (type, its partition), preferred first
    access: str = ""                   # who may still use the cluster, where not everyone may
    instead: str = ""                  # the cluster the others use
    defaults: tuple[tuple[str, Any], ...] = ()
    partitions: tuple[Partition, ...] = ()
    submissions_per_hour: int | None = None   # sbatch calls per user and hour (an array is one)

    def partition(self, name: str) -> Partition | None:
        return next((p for p in self.partitions if p.name == name), None)

    def default(self, key: str) -> Any:
        return dict(self.defaults).get(key)

    def type_order(self) -> list[tuple[str, str]]:
        """(GPU type, its partition), preferred first: ``gpu_types``, else the default GPU
        partition's types."""
        if self.gpu_types:
            return list(self.gpu_types)
        part = self.partition(self.gpu_partition) if self.gpu_partition else None
        return [(t, part.name) for t in part.gpu_types] if part else []


def profile_dirs() -> list[Path]:
    """Where profiles are looked for: $GROKHPC_CLUSTERS, ./slurm, the source tree's slurm/."""
    dirs = []
    if os.environ.get("GROKHPC_CLUSTERS"):
        dirs.append(Path(os.environ["GROKHPC_CLUSTERS"]))
    dirs += [Path.cwd() / "slurm", Path(__file__).resolve().parent.parent / "slurm"]
    out: list[Path] = []
    for d in dirs:
        if d not in out:
            out.append(d)
    return out


def available_profiles() -> list[str]:
    names: set[str] = set()
    for d in profile_dirs():
        if d.is_dir():
            names.update(f.stem for f in d.glob("*.yaml"))
    return sorted(names)


def load_profile(name: str, source: str = "--cluster") -> ClusterProfile:
    """Find and validate the cluster profile ``name``."""
    for d in profile_dirs():
        f = d / f"{name}.yaml"
        if f.is_file():
            return parse_profile(read_spec_text(f, "cluster profile"), str(f), name, f)
    known = ", ".join(available_profiles()) or "none found"
    raise ConfigError(f"{source}: cluster: expected a cluster profile name ({known}), got "
                      f"{shown(name)}")


def _positive_int(d: Mapping, key: str, source: str, where: str) -> int | None:
    v = d.get(key)
    _expect(v is None or (_is_int(v) and v >= 1), source, where, "an integer >= 1", v)
    return v


def _parse_partition(name: Any, pd: Any, source: str) -> Partition:
    key = f"partitions.{name}"
    _expect(isinstance(pd, Mapping), source, key, "a mapping", pd)
    for k in pd:
        if k not in PARTITION_KEYS:
            raise ConfigError(f"{source}: {key}.{cut_text(str(k))}: unknown key (expected one of "
                              f"{', '.join(PARTITION_KEYS)})")
    types = pd.get("gpu_types") or []
    _expect(isinstance(types, list) and all(isinstance(t, str) and t for t in types), source,
            f"{key}.gpu_types", "a list of GPU type names", types)
    mt = pd.get("max_time")
    return Partition(
        name=str(name),
        max_time=None if mt is None else parse_minutes(mt, source, f"{key}.max_time"),
        gpus=bool(pd.get("gpus", False)), gpu_types=tuple(types),
        preemptable=bool(pd.get("preemptable", False)),
        **{c: _positive_int(pd, c, source, f"{key}.{c}") for c in PARTITION_CAPS},
        reserved=str(pd.get("reserved", "")), description=str(pd.get("description", "")))


def _parse_type_order(d: Mapping, parts: list[Partition], source: str) -> tuple:
    """``gpu_types``: GPU type -> the partition it is taken from, preferred first; each
    partition a GPU partition of the profile that has that type."""
    order = d.get("gpu_types") or {}
    _expect(isinstance(order, Mapping), source, "gpu_types",
            "a mapping of GPU types to their partitions, preferred first", order)
    by_name = {p.name: p for p in parts}
    for t, pname in order.items():
        p = by_name.get(pname)
        _expect(p is not None and p.gpus and (not p.gpu_types or t in p.gpu_types), source,
                f"gpu_types.{cut_text(str(t))}", f"a GPU partition with {t}", pname)
    return tuple((str(t), str(pname)) for t, pname in order.items())


def parse_profile(text: str, source: str, name: str, path: Path) -> ClusterProfile:
    d = load_yaml(text, source)
    _expect(isinstance(d, Mapping), source, "(top level)", "a mapping", type(d).__name__)
    for k in d:
        if k not in PROFILE_KEYS:
            raise ConfigError(f"{source}: {cut_text(str(k))}: unknown key (expected one of "
                              f"{', '.join(PROFILE_KEYS)})")
    gpu_request = d.get("gpu_request", "gpus")
    _expect(gpu_request in GPU_REQUESTS, source, "gpu_request", " | ".join(GPU_REQUESTS),
            gpu_request)
    parts_d = d.get("partitions") or {}
    _expect(isinstance(parts_d, Mapping) and len(parts_d) > 0, source, "partitions",
            "a mapping of partition names to their limits", parts_d)
    parts = [_parse_partition(pname, pd, source) for pname, pd in parts_d.items()]
    names = {p.name for p in parts}
    for k in ("cpu_partition", "gpu_partition"):
        v = d.get(k)
        _expect(v is None or v in names, source, k, f"one of the partitions ({', '.join(names)})",
                v)
    defaults = d.get("defaults") or {}
    _expect(isinstance(defaults, Mapping), source, "defaults", "a mapping", defaults)
    for k in defaults:
        if k not in PROFILE_DEFAULT_KEYS:
            raise ConfigError(f"{source}: defaults.{cut_text(str(k))}: unknown key (expected "
                              f"one of {', '.join(PROFILE_DEFAULT_KEYS)})")
    # the defaults obey the launcher's rules
    parse_launcher(dict(defaults), source)
    if "time" in defaults:
        defaults = {**defaults, "time": parse_minutes(defaults["time"], source, "defaults.time")}
    return ClusterProfile(name=d.get("name", name), path=path,
                          description=str(d.get("description", "")), gpu_request=gpu_request,
                          cpu_partition=d.get("cpu_partition"),
                          gpu_partition=d.get("gpu_partition"),
                          gpu_types=_parse_type_order(d, parts, source),
                          access=str(d.get("access", "")), instead=str(d.get("instead", "")),
                          defaults=tuple(sorted(defaults.items())), partitions=tuple(parts),
                          submissions_per_hour=_positive_int(d, "submissions_per_hour", source,
                                                             "submissions_per_hour"))


def resolve_launcher(launcher: LauncherSettings, profile: ClusterProfile | None,
                     source: str) -> LauncherSettings:
    """Fill unset launcher values from the profile and check them against its partitions. A
    limit broken by a profile default names the profile's field, one set in the spec the
    spec's."""
    if profile is None:   # preferences without a profile: the first type named
        prefs = [t for t in _prefs(launcher.gpu_type) if t != ANY_GPU]
        return launcher.replace(gpu_type=prefs[0] if prefs else None)
    filled = {k: profile.default(k) for k in PROFILE_DEFAULT_KEYS
              if getattr(launcher, k) is None and profile.default(k) is not None}
    out = launcher.replace(**filled)
    if (out.gpus or 0) > 0:
        out = choose_gpu(out, profile, source, set(filled))
    elif out.partition is None:
        out = out.replace(partition=profile.cpu_partition)
    part = profile.partition(out.partition) if out.partition else None
    if out.partition is not None and part is None:
        known = ", ".join(p.name for p in profile.partitions)
        raise ConfigError(f"{source}: launcher.partition: expected a partition of {profile.name} "
                          f"({known}), got {shown(out.partition)}")
    if part is not None:
        _check_partition(out, part, profile, source, set(filled))
    return out


def _prefs(gpu_type: str | tuple[str, ...] | None) -> tuple[str, ...]:
    return gpu_type if isinstance(gpu_type, tuple) else (gpu_type or ANY_GPU,)


def _expand(prefs: tuple[str, ...], order: list[str]) -> list[str]:
    """The preferences with ``any`` replaced by ``order``, each type once."""
    out = [t for p in prefs for t in (order if p == ANY_GPU else [p])]
    return list(dict.fromkeys(out))


def choose_gpu(out: LauncherSettings, profile: ClusterProfile, source: str,
               from_profile: set[str]) -> LauncherSettings:
    """The GPU type and partition of a GPU launch: the first of the spec's preferences
    (``any``, or no gpu_type: the profile's type order) that the named partition has or, with
    none named, that the profile takes from one of its partitions. A single type named with a
    partition named is left to ``_check_partition`` (its one-line error)."""
    field = (f"{profile.path}: defaults.gpu_type" if "gpu_type" in from_profile
             else f"{source}: launcher.gpu_type")
    if out.gpu_type == ANY_GPU:
        out = out.replace(gpu_type=None)
    prefs, named = _prefs(out.gpu_type), out.partition
    order = profile.type_order()
    if named is not None:
        part = profile.partition(named)
        if part is None or isinstance(out.gpu_type, str):
            return out
        if not part.gpu_types:   # a partition that lists no types: the first one named
            return out.replace(gpu_type=next((t for t in prefs if t != ANY_GPU), None))
        have = [t for t, _ in order if t in part.gpu_types] + list(part.gpu_types)
        pick = next((t for t in _expand(prefs, have) if t in part.gpu_types), None)
        if pick is None:
            raise ConfigError(f"{field}: expected one of {', '.join(part.gpu_types)} on "
                              f"{part.name} (or any), got {shown(list(prefs))}")
        return out.replace(gpu_type=pick)
    where = dict(order)
    if not order:
        return out.replace(partition=profile.gpu_partition,
                           gpu_type=next((t for t in prefs if t != ANY_GPU), None))
    pick = next((t for t in _expand(prefs, list(where)) if t in where), None)
    if pick is None:
        got = shown(out.gpu_type if isinstance(out.gpu_type, str) else list(prefs))
        raise ConfigError(f"{field}: expected one of {', '.join(where)} on {profile.name} "
                          f"(or any, or set launcher.partition), got {got}")
    return out.replace(partition=where[pick], gpu_type=pick)


def access_notes(launcher: LauncherSettings, profile: ClusterProfile | None) -> list[str]:
    """One line each where the cluster, or the launch's partition, is closed to most users,
    with what the others use instead."""
    if profile is None:
        return []
    notes = []
    if profile.access:
        notes.append(f"note: {profile.name}: {profile.access}"
                     + (f"; others: --cluster {profile.instead}" if profile.instead else ""))
    part = profile.partition(launcher.partition) if launcher.partition else None
    if part is not None and part.reserved:
        alt = profile.gpu_partition if part.gpus else profile.cpu_partition
        notes.append(f"note: {profile.name} {part.name}: reserved to {part.reserved}"
                     + (f"; others: launcher.partition={alt}" if alt else ""))
    return notes


def _check_partition(out: LauncherSettings, part: Partition, profile: ClusterProfile,
                     source: str, from_profile: set[str]) -> None:
    """One-line errors for launcher values the partition cannot take, naming the field the
    value came from: the spec's launcher.KEY, or the profile's defaults.KEY."""
    def field(k: str) -> str:
        return f"{profile.path}: defaults.{k}" if k in from_profile else f"{source}: launcher.{k}"

    def hint(k: str) -> str:
        return f"; set launcher.{k} in {source}" if k in from_profile else ""

    on, gpus = f"{profile.name} {part.name}", out.gpus or 0
    if gpus > 0 and not part.gpus:
        raise ConfigError(f"{source}: launcher.partition: expected a GPU partition for "
                          f"gpus={gpus} ({', '.join(p.name for p in profile.partitions if p.gpus)})"
                          f", got {shown(part.name)}")
    if part.max_time is not None and out.time is not None and out.time > part.max_time:
        raise ConfigError(f"{field('time')}: expected at most {part.max_time} minutes on {on}, "
                          f"got {out.time}{hint('time')}")
    if out.gpu_type is not None and part.gpu_types and out.gpu_type not in part.gpu_types:
        raise ConfigError(f"{field('gpu_type')}: expected one of {', '.join(part.gpu_types)} on "
                          f"{part.name}, got {shown(out.gpu_type)}{hint('gpu_type')}")
    if part.max_gpus is not None and gpus > part.max_gpus:
        raise ConfigError(f"{field('gpus')}: expected at most {part.max_gpus} GPUs per job on "
                          f"{on} (its limit per user), got {gpus}{hint('gpus')}")
    _check_gpus_per_job(out, field, "gpus")


def _jobs(n: int) -> str:
    return f"{n} job" if n == 1 else f"{n} jobs"


def partition_limits(part: Partition) -> str:
    """The partition's limits in words, for a dry run."""
    words = [f"limit {part.max_time} min" if part.max_time else "no time limit"]
    per_user = [f"{part.max_running} running" if part.max_running else "",
                f"{part.max_submitted} queued or running" if part.max_submitted else "",
                f"{part.max_gpus} GPUs" if part.max_gpus else ""]
    per_user = [w for w in per_user if w]
    if per_user:
        words.append("per user at most " + ", ".join(per_user))
    return ", ".join(words)


# ---- keeping a launch inside a partition's per-user limits --------------------------------
def parallelism_cap(launcher: LauncherSettings, part: Partition | None,
                    default_parallelism: int = DEFAULT_ARRAY_PARALLELISM) -> tuple[int, str]:
    """Jobs of this launch that may run at once on ``part``: the array parallelism asked (or the
    default), cut by the partition's running jobs and GPUs per user (at ``launcher.gpus`` per
    job); with the cap that cut it in words, or "" where nothing did."""
    width = launcher.array_parallelism or default_parallelism
    if part is None:
        return width, ""
    caps = [(part.max_running, f"at most {part.max_running} running jobs per user")]
    if part.max_gpus is not None and (launcher.gpus or 0) > 0:
        caps.append((max(1, part.max_gpus // launcher.gpus),
                     f"{part.max_gpus} GPUs per user at {launcher.gpus} per job"))
    cap, why = min(((c, w) for c, w in caps if c is not None), default=(width, ""))
    return (cap, why) if cap < width else (width, "")


@dataclass(frozen=True)
class PartitionFit:
    """What a SLURM launch may submit now: the launcher (array parallelism cut to the caps),
    how many of its jobs go out now (the rest wait for a later launch) and one line per cut."""

    launcher: LauncherSettings
    jobs_now: int
    notes: tuple[str, ...] = ()


def fit_partition(launcher: LauncherSettings, profile: ClusterProfile | None, n_jobs: int,
                  max_array: int, source: str,
                  default_parallelism: int = DEFAULT_ARRAY_PARALLELISM) -> PartitionFit:
    """Keep ``n_jobs`` jobs, sent as arrays of at most ``max_array`` tasks, inside the
    partition's per-user caps: running jobs and GPUs cut the array parallelism; a partition
    that takes fewer submitted jobs than the launch makes refuses it (one line naming the
    spec field); the cluster's hourly submission limit, which the launch's aggregation job
    counts toward too, defers whole arrays to a later launch."""
    part = profile.partition(launcher.partition) if profile and launcher.partition else None
    if part is None:
        return PartitionFit(launcher, n_jobs)
    on, notes = f"{profile.name} {part.name}", []
    if part.max_submitted is not None and n_jobs > part.max_submitted:
        raise ConfigError(
            f"{source}: launcher.partition: {on} takes {_jobs(part.max_submitted)} per user "
            f"queued or running (an array counts each task), this launch makes {n_jobs}; set "
            f"launcher.runs_per_job to train the runs together, or use another partition")
    asked = launcher.array_parallelism
    width, why = parallelism_cap(launcher, part, default_parallelism)
    if why and asked is not None and n_jobs > width:   # said only where the cut changes the array
        notes.append(f"{on}: {why}: array parallelism {asked} -> {width}")
    jobs_now = n_jobs
    per_hour = profile.submissions_per_hour
    n_arrays = -(-n_jobs // max(1, max_array))
    if per_hour is not None and n_arrays + 1 > per_hour:   # + 1: the aggregation job
        now = max(1, per_hour - 1)
        jobs_now = min(n_jobs, now * max_array)
        notes.append(
            f"{profile.name}: at most {per_hour} submissions per hour, the aggregation job one "
            f"of them: submitting {now} of {n_arrays} arrays ({jobs_now} of {n_jobs} jobs) now; "
            f"launch again in an hour for the rest (runs in flight are skipped), "
            f"{-(-(n_arrays + 1) // per_hour)} hours in all")
    return PartitionFit(launcher.replace(array_parallelism=width), jobs_now, tuple(notes))


__all__ = ["ClusterProfile", "Partition", "PartitionFit", "load_profile", "available_profiles",
           "resolve_launcher", "choose_gpu", "access_notes", "ANY_GPU", "fit_partition", "parallelism_cap", "partition_limits",
           "DEFAULT_ARRAY_PARALLELISM"]
