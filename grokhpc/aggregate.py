"""Gather a sweep's run directories into Parquet tables and draw the cross-run figures.

``python -m grokhpc.aggregate SWEEP_DIR [--sweep DIR ...] [--format png,html] [--out DIR]``
(``--html-js embed``: self-contained HTML figures)

Tables (schema in docs/tables.md), written atomically into ``SWEEP_DIR/aggregate/``:

``runs.parquet``         one row per run: config, state, phase epochs, final metrics, wall time
``checkpoints.parquet``  one row per finished run x checkpoint: config fields, run_id, epoch and
                         every column of the run's measures.parquet
``curves/<run_id>.parquet``  one file per finished run: run_id, epoch, train/test loss and acc
``meta.json``            swept fields, sweeps, counts, table names
``index.json``           per run: sizes and mtimes of its files and its runs.parquet row, so a
                         rerun reads only the run directories that changed
``figures/``             the cross-run figures (grokhpc.sweep_figures), PNG/SVG/PDF/HTML through
                         grokhpc.figures (the HTML files share one plotly.min.js there)

A run's state is grokhpc.scheduler's, read from its files alone: *done* when progress.json says
done and summary.json exists (``grokked`` then says whether it grokked; a run that never did is
"censored" at its last epoch); only done runs enter checkpoints.parquet and curves/. Runs still
training or half-written (*running*), without progress yet (*pending*), with an error.txt
(*failed*) or with an unreadable file (*corrupt*) are listed in runs.parquet with their state and
reported one line each; they never put partial rows into the other tables.

A directory without run directories (an empty one, a run directory) is refused before anything
is written into it. The two tables are written side by side and put in place together, so a
disk that fills up, or a folder that cannot be written, leaves the previous tables whole; the
command then says so in one line.

Imports neither torch nor plotly at module level; ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from .scheduler import CORRUPT, DONE, FAILED, MANIFEST, PENDING, RUNNING, read_dir, read_manifest
from .store import RunDir, RunDirError

INDEX_VERSION = 2  # 2: entries record their run's config keys
AGG_DIR = "aggregate"
RUNS_TABLE = "runs.parquet"
CKPT_TABLE = "checkpoints.parquet"
CURVES_DIR = "curves"
INDEX = "index.json"
META = "meta.json"
FIG_DIR = "figures"
FINISHED = (DONE,)

# summary.json keys with fixed column types
SUMMARY_INT = ("grokking_epoch", "memorisation_end", "circuit_formation_end", "cleanup_end")
SUMMARY_FLOAT = ("final_train_loss", "final_test_loss", "final_train_acc", "final_test_acc",
                 "wall_time_s")
SUMMARY_SKIP = ("run_id", "p", "op")
MAX_REPORT_LINES = 40


# ---- small helpers ----------------------------------------------------------------------------
def _arrow():
    import pyarrow as pa

    return pa


def config_types() -> dict[str, Any]:
    """Arrow type of every RunConfig field (ints int64, floats float64, betas list<double>)."""
    pa = _arrow()
    from .config import FIELD_TYPES

    m = {int: pa.int64(), float: pa.float64(), str: pa.string(), tuple: pa.list_(pa.float64()),
         bool: pa.bool_(), "optional_int": pa.int64(),
         "batch": pa.string()}   # batch_size: "full", or the size as text ("64")
    return {k: m[t] for k, t in FIELD_TYPES.items()}


def write_parquet(path: Path, table, fsync: bool = True, dictionary: Iterable[str] | None = None,
                  tmp: Path | None = None, statistics: Iterable[str] | bool = True) -> None:
    """Write ``table`` as Parquet to ``path`` atomically (temporary file + rename).

    ``dictionary``: the columns to dictionary-encode (default: strings and integers; float
    measures are mostly distinct and only cost time to try). ``tmp``: write there and leave it
    (the caller renames), instead of renaming to ``path``."""
    import pyarrow.parquet as pq

    pa = _arrow()
    if dictionary is None:
        dictionary = [f.name for f in table.schema
                      if pa.types.is_string(f.type) or pa.types.is_integer(f.type)
                      or pa.types.is_boolean(f.type)]
    target = tmp or _tmp_name(path)
    try:
        pq.write_table(table, target, compression="zstd", use_dictionary=list(dictionary),
                       write_statistics=statistics if isinstance(statistics, bool)
                       else list(statistics))
        if fsync:
            fd = os.open(target, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        if tmp is None:
            os.replace(target, path)
    except BaseException as e:
        try:
            target.unlink()
        except FileNotFoundError:
            pass
        if isinstance(e, OSError) and e.filename is None and e.errno:   # pyarrow names no file
            raise OSError(e.errno, os.strerror(e.errno), str(path)) from e
        raise


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")


class WriteError(Exception):
    """Writing the aggregation's own files failed (a full disk, a folder that cannot be
    written): never a damaged run. ``args[0]`` is the OSError."""


def _sig(run_dir: Path) -> tuple[dict[str, list[int]], list[str]]:
    """{file: [mtime_ns, size]} of the run's files, and stray temporary files."""
    from .store import RUN_FILES

    sig: dict[str, list[int]] = {}
    stray: list[str] = []
    try:
        entries = list(os.scandir(run_dir))
    except OSError:
        return sig, stray
    for e in entries:
        if e.name in RUN_FILES:
            try:
                st = e.stat()
            except OSError:
                continue
            sig[e.name] = [st.st_mtime_ns, st.st_size]
        elif e.name.startswith(".") and e.name.endswith(".tmp"):
            stray.append(e.name)
    return sig, sorted(stray)


# ---- discovery --------------------------------------------------------------------------------
@dataclass
class Sweep:
    path: Path
    run_dirs: list[Path]
    axes: list[str]
    manifest_error: str | None = None
    phase_pairs: list[tuple[str, str]] = field(default_factory=list)  # the spec's figures.phase


def discover(sweep_dir: str | os.PathLike) -> Sweep:
    """Run directories of a sweep: the manifest's, plus any folder holding config.json at
    depth 1 or 2 (``SWEEP/<run>/`` or ``SWEEP/runs/<run>/``)."""
    root = Path(sweep_dir).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"{sweep_dir}: not a directory")
    found: dict[Path, None] = {}
    axes: list[str] = []
    manifest_error = None
    phase_pairs: list[tuple[str, str]] = []
    mf = root / MANIFEST
    if mf.exists():
        try:
            man = read_manifest(root) or {}
            for r in man.get("runs", []):
                d = r.get("dir") if isinstance(r, dict) else None
                if d:
                    p = (root / d).resolve()
                    if (p / "config.json").exists():
                        found[p] = None
            for a in man.get("axes", []):
                if isinstance(a, str) and a not in axes:
                    axes.append(a)
                elif isinstance(a, (list, tuple)):  # a zip group of axes
                    axes.extend(x for x in a if isinstance(x, str) and x not in axes)
            for r in man.get("runs", []):  # axes may only be listed per run
                if isinstance(r, dict) and isinstance(r.get("swept"), dict):
                    axes.extend(k for k in r["swept"] if k not in axes)
            phase_pairs, manifest_error = _phase_pairs(man, str(mf))
        except RunDirError as e:
            manifest_error = f"{e}; runs found by directory scan"
        except (AttributeError, TypeError) as e:
            manifest_error = f"{mf}: unreadable manifest ({e}); runs found by directory scan"
    skip = {AGG_DIR}
    for e1 in sorted(os.scandir(root), key=lambda e: e.name):
        if not e1.is_dir() or e1.name in skip or e1.name.startswith("."):
            continue
        p1 = Path(e1.path)
        if (p1 / "config.json").exists():
            found[p1.resolve()] = None
            continue
        try:
            sub = sorted(os.scandir(p1), key=lambda e: e.name)
        except OSError:
            continue
        for e2 in sub:
            if e2.is_dir() and not e2.name.startswith(".") and \
                    os.path.exists(os.path.join(e2.path, "config.json")):
                found[Path(e2.path).resolve()] = None
    return Sweep(root, list(found), axes, manifest_error, phase_pairs)


def not_a_sweep(path: str | os.PathLike) -> str | None:
    """One line saying why ``path`` is no sweep to aggregate (no run directories in it; a run
    directory itself), or None. Reads only."""
    root = Path(path)
    if not root.is_dir():
        return f"{path}: not a directory"
    if discover(root).run_dirs:
        return None
    why = f"{path}: no run directories (folders with config.json) in it"
    if (root / "config.json").exists():
        why += (f"; it is a run directory: open it with grokhpc.open_run, draw its figures with "
                f"python -m grokhpc.analyze {path}")
    return why


def stale_tables(sweep_dir: str | os.PathLike) -> str | None:
    """Why SWEEP_DIR/aggregate/'s tables do not show the sweep's run directories as they are
    ("missing", "out of date (N runs changed)"), or None when they do. Reads only."""
    root = Path(sweep_dir).resolve()
    out_dir = root / AGG_DIR
    if not ((out_dir / RUNS_TABLE).exists() and (out_dir / CKPT_TABLE).exists()):
        return "missing"
    old = _load_index(out_dir)["runs"]
    dirs = {str(d) for d in discover(root).run_dirs}
    changed = [d for d in dirs if old.get(d, {}).get("sig") != _sig(Path(d))[0]]
    gone = [k for k in old if k.startswith(f"{root}{os.sep}") and k not in dirs]
    n = len(changed) + len(gone)
    return f"out of date ({n} run{'s' if n > 1 else ''} changed)" if n else None


def _phase_pairs(manifest: dict, source: str) -> tuple[list[tuple[str, str]], str | None]:
    """The phase-diagram pairs a manifest records (``figures: {phase: [[a, b], ...]}``), and a
    one-line note when they cannot be read."""
    figs = manifest.get("figures") or {}
    raw = figs.get("phase") if isinstance(figs, dict) else figs
    if not raw:
        return [], None
    pairs = raw if isinstance(raw, list) and raw and isinstance(raw[0], list) else [raw]
    if not all(isinstance(p, list) and len(p) == 2 and all(isinstance(f, str) for f in p)
               for p in pairs):
        return [], (f"{source}: figures.phase: expected pairs of run fields, got "
                    f"{json.dumps(raw)}; default phase diagram drawn")
    return [(a, b) for a, b in pairs], None


# ---- reading one run --------------------------------------------------------------------------
@dataclass
class RunRead:
    key: str                      # absolute run directory
    sig: dict[str, list[int]]
    row: dict[str, Any]           # the runs.parquet row
    message: str | None = None    # one line when the run is not finished / unreadable
    curves: Any = None            # pyarrow Table (finished runs, when not staged)
    curves_tmp: Path | None = None  # staged curves file (finished runs), renamed by the caller
    measures: Any = None          # pyarrow Table (finished runs)
    config_keys: list[str] = field(default_factory=list)  # the keys of its config.json


def _error_line(text: str) -> str:
    """The line of error.txt that says what went wrong, as ``status`` reports it: the last
    exception line of a traceback (not the hints some errors print after it), else the last
    line."""
    from .status import last_error_line

    line = last_error_line(text)
    return line[:200] if line else "(empty)"


def _read_table(path: Path):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path).read(use_threads=False)
    except Exception as e:  # pyarrow raises several types for damaged files
        raise ValueError(f"{path.name}: unreadable Parquet ({type(e).__name__}: {e})") from None


def _corrupt(out: RunRead, rel: str, msg: str) -> RunRead:
    row = out.row
    row["state"] = CORRUPT
    row["error"] = msg
    out.curves = out.measures = None
    out.message = f"{row['run_id']} ({rel}): corrupt, left out of the tables: {msg}"
    return out


def _progress_and_summary_columns(row: dict[str, Any], prog, summary) -> None:
    if prog is not None:
        row["epoch"] = prog.get("epoch")
        row["n_checkpoints"] = len(prog.get("checkpoint_epochs") or [])
        row["wall_time_s"] = prog.get("wall_time_s")
        row["updated"] = prog.get("updated")
        if prog.get("device"):
            row["device"] = prog.get("device")
    if summary is not None and isinstance(summary, dict):
        for k, v in summary.items():
            if k in SUMMARY_SKIP:
                continue
            if k in row and k not in SUMMARY_INT + SUMMARY_FLOAT + ("wall_time_s",):
                k = f"summary_{k}"
            row[k] = v


def read_run(run_dir: Path, sweep: Path, stage_dir: Path | None = None) -> RunRead:
    """Read one run directory; never raises for a damaged run (state 'corrupt' instead).

    With ``stage_dir``, a finished run's curves are written there (as a hidden temporary
    Parquet file, ``curves_tmp``) by the calling thread, instead of kept in memory."""
    from .runtime import provenance_columns
    from .store import read_json

    sig, stray = _sig(run_dir)
    try:
        rel = str(run_dir.relative_to(sweep))
    except ValueError:
        rel = str(run_dir)
    row: dict[str, Any] = {"run_id": run_dir.name, "sweep": str(sweep), "run_dir": rel}
    out = RunRead(str(run_dir), sig, row)
    try:
        cfg = read_json(run_dir / "config.json")
        if not isinstance(cfg, dict):
            raise RunDirError("config.json: expected a JSON object")
    except (RunDirError, OSError, ValueError) as e:   # ValueError: not UTF-8
        return _corrupt(out, rel, str(e).replace(str(run_dir) + "/", ""))
    row["run_id"] = str(cfg.get("run_id") or run_dir.name)
    for k, v in cfg.items():
        if k != "run_id":
            row[k] = v
    out.config_keys = [k for k in cfg if k != "run_id"]
    found = read_dir(RunDir(run_dir))
    if found.state == CORRUPT:
        return _corrupt(out, rel, found.error)
    prog, summary, error = found.progress, found.summary, found.error
    try:
        RunDir(run_dir).verify_checkpoints(prog)   # every committed row against its checksum
    except (RunDirError, OSError) as e:
        return _corrupt(out, rel, str(e).replace(str(run_dir) + "/", ""))
    _progress_and_summary_columns(row, prog, summary)
    for k, v in provenance_columns(prog).items():   # host, versions, device_name, ...
        row.setdefault(k, v)
    if found.state == DONE:
        row["state"] = DONE          # grokked or not: the grokked column says
        try:
            _read_finished(out, run_dir, stage_dir)
        except (ValueError, OSError) as e:
            return _corrupt(out, rel, str(e))
        if out.measures is None:
            out.message = f"{row['run_id']} ({rel}): done but has no measures.parquet " \
                          "(no checkpoint rows)"
    else:
        _unfinished_state(out, rel, prog, summary, error, stray)
    return out


def _read_finished(out: RunRead, run_dir: Path, stage_dir: Path | None) -> None:
    """A finished run's curves (staged into ``stage_dir`` when given) and measures."""
    row = out.row
    curves = _read_table(run_dir / "curves.parquet")
    if "epoch" not in curves.column_names:
        raise ValueError("curves.parquet: no epoch column")
    out.curves = curves
    if stage_dir is not None:
        tmp = stage_dir / f".{row['run_id']}.{abs(hash(out.key)):x}.tmp"
        try:
            write_parquet(tmp, _canonical_curves(curves, row["run_id"]), fsync=False,
                          dictionary=["run_id"], tmp=tmp, statistics=["run_id", "epoch"])
        except OSError as e:   # the run is fine: the aggregation's own folder is not
            raise WriteError(OSError(e.errno, e.strerror, str(stage_dir))) from e
        out.curves, out.curves_tmp = None, tmp
    if "measures.parquet" in out.sig:
        m = _read_table(run_dir / "measures.parquet")
        if "epoch" not in m.column_names:
            raise ValueError("measures.parquet: no epoch column")
        out.measures = m


def _unfinished_state(out: RunRead, rel: str, prog, summary, error, stray) -> None:
    """State and one-line message of a run that is not finished."""
    row = out.row
    if error is not None:
        row["state"] = FAILED
        row["error"] = _error_line(error)
        out.message = f"{row['run_id']} ({rel}): failed: {row['error']}"
    elif prog is None:
        row["state"] = PENDING
        out.message = f"{row['run_id']} ({rel}): pending (config only, no progress yet)"
    else:
        row["state"] = RUNNING
        why = []
        if not prog.get("done"):
            why.append(f"epoch {prog.get('epoch')}/{prog.get('n_epochs')}")
        elif summary is None:
            why.append("trained but no summary.json yet")
        if stray:
            why.append(f"temporary file {stray[0]}" + (f" (+{len(stray) - 1})" if len(stray) > 1
                                                        else ""))
        out.message = (f"{row['run_id']} ({rel}): running or interrupted ({', '.join(why)}); "
                       "not in the tables yet")


# ---- table building ---------------------------------------------------------------------------
def _infer_type(values: list[Any]):
    pa = _arrow()
    vals = [v for v in values if v is not None]
    if not vals:
        return pa.null()
    if all(isinstance(v, bool) for v in vals):
        return pa.bool_()
    if all(isinstance(v, int) and not isinstance(v, bool) for v in vals):
        return pa.int64()
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
        return pa.float64()
    if all(isinstance(v, str) for v in vals):
        return pa.string()
    if all(isinstance(v, list) for v in vals):
        inner = [x for v in vals for x in v]
        t = _infer_type(inner) if inner else pa.int64()
        if pa.types.is_null(t) or not (pa.types.is_integer(t) or pa.types.is_floating(t)
                                       or pa.types.is_string(t) or pa.types.is_boolean(t)):
            return None
        return pa.list_(t)
    return None  # mixed: stored as JSON text


def runs_schema_fixed() -> list[tuple[str, Any]]:
    pa = _arrow()
    cols = [("run_id", pa.string()), ("state", pa.string()), ("sweep", pa.string()),
            ("run_dir", pa.string())]
    cols += list(config_types().items())
    cols += [("epoch", pa.int64()), ("n_checkpoints", pa.int64()), ("grokked", pa.bool_())]
    cols += [(k, pa.int64()) for k in SUMMARY_INT]
    cols += [(k, pa.float64()) for k in SUMMARY_FLOAT]
    cols += [("key_freqs", pa.list_(pa.int64())), ("updated", pa.string()),
             ("error", pa.string())]
    return cols


def _column(values: list[Any], typ):
    pa = _arrow()
    if typ is None:
        return pa.array([None if v is None else json.dumps(v) for v in values], pa.string())
    try:
        return pa.array(values, typ)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError):
        def conv(v):
            if v is None:
                return None
            try:
                if pa.types.is_integer(typ):
                    f = float(v)
                    return int(f) if f.is_integer() else None
                if pa.types.is_floating(typ):
                    return float(v)
                if pa.types.is_string(typ):
                    return v if isinstance(v, str) else json.dumps(v)
                if pa.types.is_list(typ):
                    return [float(x) if pa.types.is_floating(typ.value_type) else int(x)
                            for x in v]
            except (TypeError, ValueError):
                return None
            return None
        return pa.array([conv(v) for v in values], typ)


def build_runs_table(rows: list[dict[str, Any]]):
    """runs.parquet from row dicts: fixed columns with fixed types, then any extra keys."""
    pa = _arrow()
    fixed = runs_schema_fixed()
    names = [n for n, _ in fixed]
    extra: list[str] = []
    for r in rows:
        for k in r:
            if k not in names and k not in extra:
                extra.append(k)
    arrays, fields = [], []
    for n, t in fixed:
        arrays.append(_column([r.get(n) for r in rows], t))
        fields.append(pa.field(n, t))
    for n in sorted(extra):
        vals = [r.get(n) for r in rows]
        t = _infer_type(vals)
        arr = _column(vals, t)
        arrays.append(arr)
        fields.append(pa.field(n, arr.type))
    table = pa.Table.from_arrays(arrays, schema=pa.schema(fields))
    if table.num_rows:
        import pyarrow.compute as pc

        idx = pc.sort_indices(table, sort_keys=[("run_id", "ascending")])
        table = table.take(idx)
    return table


def _canonical_curves(t, run_id: str):
    pa = _arrow()
    from .store import CURVE_COLUMNS

    arrays, names = [pa.repeat(pa.scalar(run_id, pa.string()), t.num_rows)], ["run_id"]
    for n in CURVE_COLUMNS:
        typ = pa.int64() if n == "epoch" else pa.float64()
        if n in t.column_names:
            arrays.append(t.column(n).cast(typ))
        else:
            arrays.append(pa.nulls(t.num_rows, typ))
        names.append(n)
    for n in t.column_names:  # anything newer the trainer writes
        if n not in names:
            arrays.append(t.column(n))
            names.append(n)
    return pa.Table.from_arrays(arrays, names=names)


def _measures_with_id(t, run_id: str):
    pa = _arrow()
    t = t.replace_schema_metadata(None)
    if "run_id" in t.column_names:
        t = t.drop(["run_id"])
    if t.schema.field("epoch").type != pa.int64():
        t = t.set_column(t.schema.get_field_index("epoch"), "epoch", t.column("epoch").cast(pa.int64()))
    return t.add_column(0, "run_id", pa.repeat(pa.scalar(run_id, pa.string()), t.num_rows))


def config_scalar_columns() -> list[str]:
    pa = _arrow()
    return [k for k, t in config_types().items() if not pa.types.is_list(t)]


def build_checkpoints_table(measure_tables: list, runs_table):
    """Concatenate per-run measures (with run_id) and attach the scalar config columns."""
    pa = _arrow()
    import pyarrow.compute as pc

    cfg_cols = config_scalar_columns()
    if not measure_tables:
        fields = [pa.field("run_id", pa.string()), pa.field("epoch", pa.int64())]
        fields += [pa.field(c, config_types()[c]) for c in cfg_cols]
        return pa.schema(fields).empty_table()
    m = pa.concat_tables(measure_tables, promote_options="permissive")
    # drop measure columns that shadow config names (config wins; they are the same values)
    clash = [c for c in m.column_names if c in cfg_cols]
    if clash:
        m = m.rename_columns([f"measure_{c}" if c in clash else c for c in m.column_names])
    cfg = runs_table.select(["run_id"] + cfg_cols)
    # row i of m -> row of cfg with the same run_id (run ids are unique in runs_table)
    pos = pc.index_in(m.column("run_id"), value_set=cfg.column("run_id"))
    cols = [m.column("run_id"), m.column("epoch")]
    names = ["run_id", "epoch"]
    for c in cfg_cols:
        cols.append(cfg.column(c).take(pos))
        names.append(c)
    for c in m.column_names:
        if c not in ("run_id", "epoch"):
            cols.append(m.column(c))
            names.append(c)
    t = pa.Table.from_arrays(cols, names=names)
    idx = pc.sort_indices(t, sort_keys=[("run_id", "ascending"), ("epoch", "ascending")])
    return t.take(idx)


def infer_swept(runs_table, axes_hint: Iterable[str] = (),
                config_keys: Iterable[str] = ()) -> list[str]:
    """Swept fields: the manifests' axes, plus config fields that vary across runs (the
    RunConfig fields and any other ``config_keys`` the runs' config.json files hold)."""
    out = [a for a in axes_hint if a in runs_table.column_names]
    for c in dict.fromkeys([*config_types(), *config_keys]):
        if c in out or c not in runs_table.column_names or c == "device":
            continue
        col = runs_table.column(c).to_pylist()
        vals = {json.dumps(v) for v in col if v is not None}
        if len(vals) > 1:
            out.append(c)
    return out


# ---- the whole aggregation --------------------------------------------------------------------
@dataclass
class Result:
    out_dir: Path
    n_runs: int = 0
    n_read: int = 0
    states: dict[str, int] = field(default_factory=dict)
    messages: list[str] = field(default_factory=list)
    swept: list[str] = field(default_factory=list)
    changed: bool = False
    tables: dict[str, Path] = field(default_factory=dict)
    figures: dict[str, list[Path]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


def _load_index(out_dir: Path) -> dict[str, Any]:
    p = out_dir / INDEX
    try:
        idx = json.loads(p.read_text())
        if idx.get("version") == INDEX_VERSION and isinstance(idx.get("runs"), dict):
            return idx
    except (OSError, json.JSONDecodeError, AttributeError):
        pass
    return {"version": INDEX_VERSION, "runs": {}}


class DamagedTable(Exception):
    """The previous checkpoints.parquet cannot be read: the tables are rebuilt from every run."""


@dataclass
class Plan:
    """What one aggregation reads and where it writes."""

    sweeps: list[Sweep]
    out_dir: Path
    run_dirs: list[tuple[Path, Path]]       # (sweep, run directory); the first sweep's wins
    axes_hint: list[str]                    # the manifests' axes
    phase_pairs: list[tuple[str, str]]      # the manifests' figures.phase
    index: dict[str, Any]
    old: dict[str, Any]                     # the previous index's entries (when tables exist)
    tables_ok: bool
    force: bool

    @property
    def cdir(self) -> Path:
        return self.out_dir / CURVES_DIR


def make_plan(sweeps: list[str | os.PathLike], out, force: bool) -> Plan:
    found = [discover(s) for s in sweeps]
    out_dir = Path(out) if out is not None else found[0].path / AGG_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CURVES_DIR).mkdir(exist_ok=True)
    run_dirs: list[tuple[Path, Path]] = []
    seen: set[Path] = set()
    axes_hint: list[str] = []
    pairs: list[tuple[str, str]] = []
    for s in found:
        run_dirs.extend((s.path, d) for d in s.run_dirs if d not in seen)
        seen.update(s.run_dirs)
        axes_hint.extend(a for a in s.axes if a not in axes_hint)
        pairs.extend(p for p in s.phase_pairs if p not in pairs)
    index = {"version": INDEX_VERSION, "runs": {}} if force else _load_index(out_dir)
    tables_ok = (out_dir / RUNS_TABLE).exists() and (out_dir / CKPT_TABLE).exists()
    return Plan(found, out_dir, run_dirs, axes_hint, pairs, index,
                index["runs"] if tables_ok else {}, tables_ok, force)


def _changed_runs(plan: Plan) -> list[tuple[Path, Path]]:
    """The (sweep, run directory) pairs whose files changed since the index was written."""
    out = []
    for sweep, d in plan.run_dirs:
        sig, _ = _sig(d)
        prev = plan.old.get(str(d))
        if prev is None or prev.get("sig") != sig:
            out.append((sweep, d))
    return out


def _read_runs(to_read: list[tuple[Path, Path]], cdir: Path, workers: int) -> dict[str, RunRead]:
    if workers > 1 and len(to_read) > 8:
        with ThreadPoolExecutor(max_workers=workers) as ex:
            reads = list(ex.map(lambda a: read_run(a[1], a[0], cdir), to_read))
    else:
        reads = [read_run(d, s, cdir) for s, d in to_read]
    return {r.key: r for r in reads}


def _entry(r: RunRead) -> dict[str, Any]:
    return {"sig": r.sig, "row": r.row, "message": r.message, "config_keys": r.config_keys}


def _choose_copies(entries: dict[str, dict], notes: list[str]) -> dict[str, str]:
    """{run_id: run directory} with one copy per run_id: a finished copy wins, then the
    most trained one; one note per run held twice."""
    rank = {s: i for i, s in enumerate((DONE, FAILED, RUNNING, PENDING, CORRUPT))}
    by_id: dict[str, str] = {}
    for key, e in entries.items():
        rid = e["row"]["run_id"]
        if rid in by_id:
            a, b = e["row"], entries[by_id[rid]]["row"]
            better = (rank.get(a.get("state"), 9), -(a.get("epoch") or 0)) < \
                     (rank.get(b.get("state"), 9), -(b.get("epoch") or 0))
            notes.append(f"run {rid} appears in {key} and {by_id[rid]}; using "
                         f"{key if better else by_id[rid]}")
            if not better:
                continue
        by_id[rid] = key
    return by_id


def _reread_chosen_copies(plan: Plan, entries, new, by_id, res: "Result") -> None:
    """A run held twice whose chosen copy was not reread while the other copy changed: reread
    the chosen copy too, so its checkpoint rows and curves are the ones in the tables."""
    chosen = set(by_id.values())
    dup_ids = {e["row"]["run_id"] for k, e in entries.items() if k not in chosen}
    changed_ids = {r.row["run_id"] for r in new.values()}
    sweep_of = {str(d): s for s, d in plan.run_dirs}
    for rid in dup_ids & changed_ids:
        k = by_id[rid]
        if k not in new:
            new[k] = read_run(Path(k), sweep_of[k], plan.cdir)
            entries[k] = _entry(new[k])
            res.n_read += 1


def _previous_checkpoint_rows(path: Path, keep_ids: list[str]):
    """The previous checkpoints.parquet rows of the runs that were not reread, without the
    config columns (attached again from the new runs table); None when there are none."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    pa = _arrow()
    try:
        prev = pq.read_table(path)
        prev = prev.filter(pc.is_in(prev.column("run_id"), value_set=pa.array(keep_ids,
                                                                              pa.string())))
    except Exception as e:  # pyarrow raises several types for damaged files
        raise DamagedTable(f"{path}: unreadable ({e})") from None
    drop = [c for c in config_scalar_columns() if c in prev.column_names]
    prev = prev.drop(drop)
    prev = prev.rename_columns([c[len("measure_"):] if c.startswith("measure_") and
                                c[len("measure_"):] in drop else c for c in prev.column_names])
    return prev if prev.num_rows else None


def _write_tables(plan: Plan, res: "Result", rows, new, chosen, config_keys):
    """runs.parquet, checkpoints.parquet and curves/ (unchanged runs' checkpoint rows from the
    previous table, changed runs' from their directories); returns the two tables."""
    runs_table = build_runs_table(rows)
    res.swept = infer_swept(runs_table, plan.axes_hint, config_keys)
    finished_ids = {r["run_id"] for r in rows if r.get("state") in FINISHED}
    fresh_ids = {new[k].row["run_id"] for k in new if k in chosen}
    ckpt_path = plan.out_dir / CKPT_TABLE
    parts = []
    if plan.tables_ok and not plan.force and ckpt_path.exists():
        prev = _previous_checkpoint_rows(ckpt_path, sorted(finished_ids - fresh_ids))
        if prev is not None:
            parts.append(prev)
    for k, r in new.items():
        if k in chosen and r.measures is not None and r.row.get("state") in FINISHED:
            parts.append(_measures_with_id(r.measures, r.row["run_id"]))
    ckpt_table = build_checkpoints_table(parts, runs_table)
    md = {b"grokhpc.swept": json.dumps(res.swept).encode(), b"grokhpc.table": b"checkpoints"}
    runs_path = plan.out_dir / RUNS_TABLE
    staged = {ckpt_path: _tmp_name(ckpt_path), runs_path: _tmp_name(runs_path)}
    try:   # both written before either replaces the previous one
        write_parquet(ckpt_path, ckpt_table.replace_schema_metadata(md), tmp=staged[ckpt_path])
        md[b"grokhpc.table"] = b"runs"
        write_parquet(runs_path, runs_table.replace_schema_metadata(md), tmp=staged[runs_path])
    except BaseException:   # nothing replaced; nothing staged left to fill a disk
        for tmp in [*staged.values(), *(r.curves_tmp for r in new.values() if r.curves_tmp)]:
            tmp.unlink(missing_ok=True)
        raise
    for path, tmp in staged.items():
        os.replace(tmp, path)
    _place_curves(plan.cdir, new, chosen, finished_ids)
    return runs_table, ckpt_table


def _place_curves(cdir: Path, new: dict[str, RunRead], chosen, finished_ids) -> None:
    """Curves: one file per finished run, staged by the readers, renamed here."""
    for k, r in new.items():
        if r.curves_tmp is None:
            continue
        if k in chosen and r.row.get("state") in FINISHED:
            os.replace(r.curves_tmp, cdir / f"{r.row['run_id']}.parquet")
        else:
            r.curves_tmp.unlink(missing_ok=True)
    for f in cdir.glob("*.parquet"):
        if f.stem not in finished_ids:
            f.unlink()
    for f in cdir.glob(".*.tmp"):  # left by an interrupted earlier call
        f.unlink(missing_ok=True)


def _write_meta(plan: Plan, res: "Result", n_checkpoint_rows: int) -> None:
    from .store import atomic_write_json

    atomic_write_json(plan.out_dir / META, {
        "swept": res.swept, "sweeps": [str(s.path) for s in plan.sweeps],
        "n_runs": res.n_runs, "states": res.states, "n_checkpoint_rows": n_checkpoint_rows,
        "phase": [list(p) for p in plan.phase_pairs],
        "tables": {"runs": RUNS_TABLE, "checkpoints": CKPT_TABLE,
                   "curves": f"{CURVES_DIR}/<run_id>.parquet"},
        "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})


def _previous_swept(plan: Plan, config_keys) -> list[str]:
    import pyarrow.parquet as pq

    try:
        return json.loads((plan.out_dir / META).read_text())["swept"]
    except (OSError, KeyError, json.JSONDecodeError):
        return infer_swept(pq.read_table(plan.out_dir / RUNS_TABLE), plan.axes_hint, config_keys)


def _draw_figures(plan: Plan, res: "Result", formats, runs_table, ckpt_table, say,
                  html_js: str = "directory") -> None:
    """The cross-run figures, unless no run changed and the same ones are on disk."""
    import pyarrow.parquet as pq

    from .figures import export, parse_formats
    from .sweep_figures import cross_run_figures

    fmts = parse_formats(formats)
    record = {"formats": list(fmts), "phase": [list(p) for p in plan.phase_pairs],
              "html_js": html_js}
    prev = plan.index.get("figures", {}) if not plan.force else {}
    if (not res.changed and all(prev.get(k) == v for k, v in record.items())
            and all(Path(p).exists() for p in prev.get("files", []))):
        res.notes.append("figures up to date (no run changed)")
        return
    t0 = time.perf_counter()
    if runs_table is None:
        runs_table = pq.read_table(plan.out_dir / RUNS_TABLE)
        ckpt_table = pq.read_table(plan.out_dir / CKPT_TABLE)
    figs, notes = cross_run_figures(runs_table, ckpt_table, plan.cdir, res.swept,
                                    plan.phase_pairs)
    res.notes.extend(notes)
    res.figures = export(figs, plan.out_dir / FIG_DIR, formats=fmts, log=say, html_js=html_js)
    files = [str(p) for ps in res.figures.values() for p in ps]
    for old in set(prev.get("files", [])) - set(files):  # figures no longer drawn
        Path(old).unlink(missing_ok=True)
    plan.index["figures"] = {**record, "files": files}
    res.timings["figures_s"] = time.perf_counter() - t0


def aggregate(sweeps: list[str | os.PathLike], out: str | os.PathLike | None = None,
              formats: Iterable[str] | str | None = ("png", "html"), force: bool = False,
              log: Callable[[str], None] | None = print, workers: int = 4,
              html_js: str = "directory") -> Result:
    """Aggregate ``sweeps`` into ``out`` (default: the first sweep's ``aggregate/``).

    ``formats`` None draws no figures; ``html_js`` as in :func:`grokhpc.figures.export`. Reads
    only the run directories whose files changed since the last call (``force`` rereads all). Returns a :class:`Result`. A previous
    checkpoints table that cannot be read is rebuilt from every run, with a note saying so.
    """
    try:
        return _aggregate(sweeps, out, formats, force, log, workers, html_js)
    except DamagedTable as e:
        res = _aggregate(sweeps, out, formats, True, log, workers, html_js)
        res.notes.insert(0, f"{e}; rebuilt from all runs")
        return res


def _aggregate(sweeps, out, formats, force: bool, log, workers: int,
               html_js: str = "directory") -> Result:
    from .store import atomic_write_json

    t0 = time.perf_counter()
    plan = make_plan(sweeps, out, force)
    res = Result(plan.out_dir)
    res.notes.extend(s.manifest_error for s in plan.sweeps if s.manifest_error)
    to_read = _changed_runs(plan)
    present = {str(d) for _, d in plan.run_dirs}
    removed = [k for k in plan.old if k not in present]
    res.timings["scan_s"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    try:
        new = _read_runs(to_read, plan.cdir, workers)
    except WriteError:
        for f in plan.cdir.glob(".*.tmp"):   # the curves staged before the write failed
            f.unlink(missing_ok=True)
        raise
    res.n_read = len(new)
    res.timings["read_s"] = time.perf_counter() - t1
    entries = {str(d): _entry(new[str(d)]) if str(d) in new else plan.old[str(d)]
               for _, d in plan.run_dirs}
    by_id = _choose_copies(entries, res.notes)
    _reread_chosen_copies(plan, entries, new, by_id, res)
    chosen = set(by_id.values())
    res.changed = bool(new) or bool(removed) or not plan.tables_ok or force
    rows = [entries[k]["row"] for k in entries if k in chosen]
    res.n_runs = len(rows)
    for r in rows:
        res.states[r.get("state", "?")] = res.states.get(r.get("state", "?"), 0) + 1
    res.messages = [entries[k]["message"] for k in entries
                    if k in chosen and entries[k].get("message")]
    config_keys = {k for e in entries.values() for k in e.get("config_keys", ())}

    t2 = time.perf_counter()
    runs_table = ckpt_table = None
    if res.changed:
        runs_table, ckpt_table = _write_tables(plan, res, rows, new, chosen, config_keys)
        res.timings["write_s"] = time.perf_counter() - t2
        _write_meta(plan, res, ckpt_table.num_rows)
    else:
        res.swept = _previous_swept(plan, config_keys)
    res.tables = {"runs": plan.out_dir / RUNS_TABLE, "checkpoints": plan.out_dir / CKPT_TABLE,
                  "curves": plan.cdir}
    if formats:
        _draw_figures(plan, res, formats, runs_table, ckpt_table, log or (lambda s: None),
                      html_js)
    # the index goes last: if anything above failed, the next call redoes the work
    plan.index["runs"] = entries
    if res.changed or res.figures:
        atomic_write_json(plan.out_dir / INDEX, plan.index)
    res.timings["total_s"] = time.perf_counter() - t0
    return res


# ---- command line -----------------------------------------------------------------------------
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
NOT_ALLOWED = (errno.EACCES, errno.EPERM, errno.EROFS)


def out_problem(out: str | os.PathLike | None) -> str | None:
    """One line when ``--out`` cannot be a directory (an existing file, or a path through
    one), else None."""
    if not out:
        return None
    p = Path(out).absolute()
    found = next((d for d in (p, *p.parents) if d.exists() or d.is_symlink()), None)
    if found is None or found.is_dir():
        return None
    return f"--out {out}: expected a directory, got " + (
        "an existing file" if found == p else f"a path under the file {found}")


def _refuse(sweeps: list[str], out: str | None) -> tuple[str, int] | None:
    """(one line, exit code) for sweep directories that hold no runs and an --out that cannot
    be a directory: refused before anything is written."""
    for s in sweeps:
        why = not_a_sweep(s)
        if why:
            return why, 2 if not Path(s).is_dir() else 1
    why = out_problem(out)
    return (why, 2) if why else None


def write_failure(e: BaseException, out_dir) -> str:
    """One line for an OSError while aggregating (a full disk, a folder that cannot be
    written), and what to do; the tables are never left half-written (see the module doc)."""
    e = e.args[0] if isinstance(e, WriteError) else e
    code = getattr(e, "errno", None)
    what = os.strerror(code) if code else str(e)
    todo = ("; free some space and run the same command again" if code in NO_SPACE else
            "; write them elsewhere with --out DIR" if code in NOT_ALLOWED else "")
    return (f"{getattr(e, 'filename', None) or out_dir}: {what}; no table was left "
            f"half-written{todo}")


def _every_sweep_under_runs(args, argv: list[str] | None) -> int:
    """Bare ``python -m grokhpc.aggregate``: each sweep under ./runs on its own, saying which."""
    from .scheduler import find_sweeps

    found = find_sweeps("runs") if not (args.sweep or args.out) else []
    if not found:
        print("aggregate: " + ("--sweep and --out need SWEEP_DIR" if args.sweep or args.out
                               else f"no sweeps under {Path('runs').resolve()} (directories "
                                    f"with {MANIFEST}); give SWEEP_DIR"), file=sys.stderr)
        return 2
    rest = list(sys.argv[1:] if argv is None else argv)
    codes = []
    for i, d in enumerate(found):
        print(f"sweep {d} ({i + 1} of {len(found)})", flush=True)
        codes.append(main([*rest, str(d)]))
    return max(codes)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m grokhpc.aggregate",
        description="Gather a sweep's run directories into Parquet tables (SWEEP_DIR/aggregate/) "
                    "and draw cross-run grokking figures. Rereads only runs that changed.")
    ap.add_argument("sweep_dir", metavar="SWEEP_DIR", nargs="?",
                    help="a sweep directory (holds run dirs); default: every sweep (a directory "
                         "with manifest.json) under ./runs, each on its own")
    ap.add_argument("--sweep", action="append", default=[], metavar="DIR",
                    help="another sweep to combine with SWEEP_DIR (repeatable)")
    ap.add_argument("--format", default="png,html", metavar="LIST",
                    help="figure formats, a comma list of png, svg, pdf, html (default png,html)")
    ap.add_argument("--html-js", choices=("directory", "embed"), default="directory",
                    help="HTML figures load one plotly.min.js beside them (directory, the "
                         "default) or each embeds plotly.js (embed: self-contained files)")
    ap.add_argument("--out", metavar="DIR", help="output directory (default SWEEP_DIR/aggregate)")
    ap.add_argument("--no-figures", action="store_true", help="write the tables only")
    ap.add_argument("--force", action="store_true", help="reread every run and redraw")
    args = ap.parse_args(argv)
    if args.sweep_dir is None:
        return _every_sweep_under_runs(args, argv)
    if not args.no_figures:
        from .figures import parse_formats

        try:
            formats = parse_formats(args.format)
        except ValueError as e:
            ap.error(str(e))
    else:
        formats = None
    sweeps = [args.sweep_dir] + args.sweep
    refused = _refuse(sweeps, args.out)
    if refused:
        print(f"aggregate: {refused[0]}", file=sys.stderr)
        return refused[1]
    try:
        res = aggregate(sweeps, args.out, formats, force=args.force, html_js=args.html_js)
    except (OSError, WriteError) as e:
        print(f"aggregate: {write_failure(e, args.out or Path(sweeps[0]) / AGG_DIR)}",
              file=sys.stderr)
        return 1
    for m in res.messages[:MAX_REPORT_LINES]:
        print(m)
    if len(res.messages) > MAX_REPORT_LINES:
        print(f"... and {len(res.messages) - MAX_REPORT_LINES} more runs not finished "
              f"(see the state column of {res.tables['runs']})")
    for n in res.notes:
        print(n)
    states = ", ".join(f"{v} {k}" for k, v in sorted(res.states.items()))
    swept = ", ".join(res.swept) or "nothing"
    print(f"{res.n_runs} runs ({states}); read {res.n_read}; swept: {swept}; "
          f"{res.timings.get('total_s', 0):.1f} s")
    print(f"tables: {res.out_dir}/{RUNS_TABLE}, {CKPT_TABLE}, {CURVES_DIR}/")
    if res.figures:
        n = sum(len(v) for v in res.figures.values())
        print(f"figures: {n} files in {res.out_dir / FIG_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
