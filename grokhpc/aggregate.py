"""Gather a sweep's run directories into Parquet tables and draw the cross-run figures.

``python -m grokhpc.aggregate SWEEP_DIR [--sweep DIR ...] [--format png,html] [--out DIR]``

Tables (schema in docs/tables.md), written atomically into ``SWEEP_DIR/aggregate/``:

``runs.parquet``         one row per run: config, state, phase epochs, final metrics, wall time
``checkpoints.parquet``  one row per finished run x checkpoint: config fields, run_id, epoch and
                         every column of the run's measures.parquet
``curves/<run_id>.parquet``  one file per finished run: run_id, epoch, train/test loss and acc
``meta.json``            swept fields, sweeps, counts, table names
``index.json``           per run: sizes and mtimes of its files and its runs.parquet row, so a
                         rerun reads only the run directories that changed
``figures/``             the cross-run figures (PNG/SVG/PDF/HTML through grokhpc.figures)

A run is *done* (grokked) or *censored* (finished, never grokked) when progress.json says done
and summary.json exists; only those runs enter checkpoints.parquet and curves/. Runs still
training or half-written (*running*), without progress yet (*pending*), with an error.txt
(*failed*) or with an unreadable file (*corrupt*) are listed in runs.parquet with their state and
reported one line each; they never put partial rows into the other tables.

Imports neither torch nor plotly at module level; ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

INDEX_VERSION = 1
AGG_DIR = "aggregate"
RUNS_TABLE = "runs.parquet"
CKPT_TABLE = "checkpoints.parquet"
CURVES_DIR = "curves"
INDEX = "index.json"
META = "meta.json"
FIG_DIR = "figures"
MANIFEST = "manifest.json"

STATES = ("done", "censored", "running", "pending", "failed", "corrupt")
FINISHED = ("done", "censored")
SEED_FIELDS = ("data_seed", "model_seed")
# colour / series preference among swept fields
AXIS_PREFERENCE = ("weight_decay", "train_frac", "p", "lr", "op", "d_model", "d_mlp", "n_heads",
                   "betas", "n_epochs")

# summary.json keys with fixed column types
SUMMARY_INT = ("grokking_epoch", "memorisation_end", "circuit_formation_end", "cleanup_end")
SUMMARY_FLOAT = ("final_train_loss", "final_test_loss", "final_train_acc", "final_test_acc",
                 "wall_time_s")
SUMMARY_SKIP = ("run_id", "p", "op")
MAX_REPORT_LINES = 40
POINT_BUDGET = 120_000  # points per line figure: keeps HTML small and PNG rendering quick

UNITS = {
    "weight_decay": "weight decay λ (AdamW, decoupled)",
    "train_frac": "training fraction (of all p² pairs)",
    "p": "prime p (modulus)",
    "lr": "learning rate",
    "data_seed": "data seed",
    "model_seed": "model seed",
}
GROK_AXIS = "grokking epoch (first test acc ≥ 99%, epochs)"


# ---- small helpers ----------------------------------------------------------------------------
def _arrow():
    import pyarrow as pa

    return pa


def config_types() -> dict[str, Any]:
    """Arrow type of every RunConfig field (ints int64, floats float64, betas list<double>)."""
    pa = _arrow()
    from .config import FIELD_TYPES

    m = {int: pa.int64(), float: pa.float64(), str: pa.string(), tuple: pa.list_(pa.float64())}
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
    target = tmp or path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
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
    except BaseException:
        try:
            target.unlink()
        except FileNotFoundError:
            pass
        raise


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


def discover(sweep_dir: str | os.PathLike) -> Sweep:
    """Run directories of a sweep: the manifest's, plus any folder holding config.json at
    depth 1 or 2 (``SWEEP/<run>/`` or ``SWEEP/runs/<run>/``)."""
    root = Path(sweep_dir).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"{sweep_dir}: not a directory")
    found: dict[Path, None] = {}
    axes: list[str] = []
    manifest_error = None
    mf = root / MANIFEST
    if mf.exists():
        try:
            man = json.loads(mf.read_text())
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
        except (json.JSONDecodeError, AttributeError, TypeError) as e:
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
    return Sweep(root, list(found), axes, manifest_error)


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


def _first_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:200] if lines else "(empty)"


def _read_table(path: Path):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path).read(use_threads=False)
    except Exception as e:  # pyarrow raises several types for damaged files
        raise ValueError(f"{path.name}: unreadable Parquet ({type(e).__name__}: {e})") from None


def read_run(run_dir: Path, sweep: Path, stage_dir: Path | None = None) -> RunRead:
    """Read one run directory; never raises for a damaged run (state 'corrupt' instead).

    With ``stage_dir``, a finished run's curves are written there (as a hidden temporary
    Parquet file, ``curves_tmp``) by the calling thread, instead of kept in memory."""
    from .store import (ERROR, PROGRESS, SUMMARY, RunDir, RunDirError, provenance_columns,
                        read_json)

    sig, stray = _sig(run_dir)
    try:
        rel = str(run_dir.relative_to(sweep))
    except ValueError:
        rel = str(run_dir)
    row: dict[str, Any] = {"run_id": run_dir.name, "sweep": str(sweep), "run_dir": rel}
    out = RunRead(str(run_dir), sig, row)

    def corrupt(msg: str) -> RunRead:
        row["state"] = "corrupt"
        row["error"] = msg
        out.curves = out.measures = None
        out.message = f"{row['run_id']} ({rel}): corrupt, left out of the tables: {msg}"
        return out

    try:
        cfg = read_json(run_dir / "config.json")
        if not isinstance(cfg, dict):
            raise RunDirError("config.json: expected a JSON object")
    except (RunDirError, OSError) as e:
        return corrupt(str(e).replace(str(run_dir) + "/", ""))
    row["run_id"] = str(cfg.get("run_id") or run_dir.name)
    for k, v in cfg.items():
        if k != "run_id":
            row[k] = v
    try:
        prog = read_json(run_dir / PROGRESS) if PROGRESS in sig else None
        summary = read_json(run_dir / SUMMARY) if SUMMARY in sig else None
        RunDir(run_dir).verify_checkpoints(prog)   # every committed row against its checksum
    except (RunDirError, OSError) as e:
        return corrupt(str(e).replace(str(run_dir) + "/", ""))
    error = (run_dir / ERROR).read_text(errors="replace") if ERROR in sig else None
    if prog is not None:
        row["epoch"] = prog.get("epoch")
        row["n_checkpoints"] = len(prog.get("checkpoint_epochs") or [])
        row["wall_time_s"] = prog.get("wall_time_s")
        row["updated"] = prog.get("updated")
        if prog.get("device"):
            row["device"] = prog.get("device")
    done = bool(prog and prog.get("done")) and summary is not None
    if summary is not None and isinstance(summary, dict):
        for k, v in summary.items():
            if k in SUMMARY_SKIP:
                continue
            if k in row and k not in SUMMARY_INT + SUMMARY_FLOAT + ("wall_time_s",):
                k = f"summary_{k}"
            row[k] = v
    for k, v in provenance_columns(prog).items():   # host, versions, device_name, ...
        row.setdefault(k, v)
    if done:
        grokked = row.get("grokked")
        row["state"] = "censored" if grokked is False else "done"
        try:
            curves = _read_table(run_dir / "curves.parquet")
            if "epoch" not in curves.column_names:
                raise ValueError("curves.parquet: no epoch column")
            out.curves = curves
            if stage_dir is not None:
                tmp = stage_dir / f".{row['run_id']}.{abs(hash(out.key)):x}.tmp"
                write_parquet(tmp, _canonical_curves(curves, row["run_id"]), fsync=False,
                              dictionary=["run_id"], tmp=tmp, statistics=["run_id", "epoch"])
                out.curves, out.curves_tmp = None, tmp
            if "measures.parquet" in sig:
                m = _read_table(run_dir / "measures.parquet")
                if "epoch" not in m.column_names:
                    raise ValueError("measures.parquet: no epoch column")
                out.measures = m
        except (ValueError, OSError) as e:
            return corrupt(str(e))
        if out.measures is None:
            out.message = f"{row['run_id']} ({rel}): done but has no measures.parquet " \
                          "(no checkpoint rows)"
    elif error is not None:
        row["state"] = "failed"
        row["error"] = _first_line(error)
        out.message = f"{row['run_id']} ({rel}): failed: {row['error']}"
    elif prog is None:
        row["state"] = "pending"
        out.message = f"{row['run_id']} ({rel}): pending (config only, no progress yet)"
    else:
        row["state"] = "running"
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
    return out


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


def infer_swept(runs_table, axes_hint: Iterable[str] = ()) -> list[str]:
    """Swept fields: the manifests' axes, plus config fields that vary across runs."""
    out = [a for a in axes_hint if a in runs_table.column_names]
    for c in config_types():
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


def aggregate(sweeps: list[str | os.PathLike], out: str | os.PathLike | None = None,
              formats: Iterable[str] | str | None = ("png", "html"), force: bool = False,
              log: Callable[[str], None] | None = print, workers: int = 4) -> Result:  # noqa: C901
    """Aggregate ``sweeps`` into ``out`` (default: the first sweep's ``aggregate/``).

    ``formats`` None draws no figures. Reads only the run directories whose files changed
    since the last call (``force`` rereads all). Returns a :class:`Result`.
    """
    import pyarrow.parquet as pq

    from .store import atomic_write_json

    pa = _arrow()
    t0 = time.perf_counter()
    say = log or (lambda s: None)
    found = [discover(s) for s in sweeps]
    out_dir = Path(out) if out is not None else found[0].path / AGG_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CURVES_DIR).mkdir(exist_ok=True)
    res = Result(out_dir)
    for s in found:
        if s.manifest_error:
            res.notes.append(s.manifest_error)
    run_dirs: list[tuple[Path, Path]] = []
    seen: set[Path] = set()
    for s in found:
        for d in s.run_dirs:
            if d not in seen:
                seen.add(d)
                run_dirs.append((s.path, d))
    axes_hint: list[str] = []
    for s in found:
        axes_hint.extend(a for a in s.axes if a not in axes_hint)

    index = {"version": INDEX_VERSION, "runs": {}} if force else _load_index(out_dir)
    old = index["runs"]
    tables_ok = (out_dir / RUNS_TABLE).exists() and (out_dir / CKPT_TABLE).exists()
    if not tables_ok:
        old = {}
    # what changed
    to_read: list[tuple[Path, Path]] = []
    for sweep, d in run_dirs:
        sig, _ = _sig(d)
        key = str(d)
        if key not in old or old[key].get("sig") != sig:
            to_read.append((sweep, d))
    present = {str(d) for _, d in run_dirs}
    removed = [k for k in old if k not in present]
    res.timings["scan_s"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    cdir = out_dir / CURVES_DIR
    if workers > 1 and len(to_read) > 8:
        with ThreadPoolExecutor(max_workers=workers) as ex:
            reads = list(ex.map(lambda a: read_run(a[1], a[0], cdir), to_read))
    else:
        reads = [read_run(d, s, cdir) for s, d in to_read]
    res.n_read = len(reads)
    res.timings["read_s"] = time.perf_counter() - t1
    new = {r.key: r for r in reads}

    entries: dict[str, dict[str, Any]] = {}
    for sweep, d in run_dirs:
        key = str(d)
        if key in new:
            r = new[key]
            entries[key] = {"sig": r.sig, "row": r.row, "message": r.message}
        else:
            entries[key] = old[key]
    # one row per run_id: a finished copy wins, then the most recently updated
    rank = {s: i for i, s in enumerate(("done", "censored", "failed", "running", "pending",
                                        "corrupt"))}
    by_id: dict[str, str] = {}
    for key, e in entries.items():
        rid = e["row"]["run_id"]
        if rid in by_id:
            other = entries[by_id[rid]]["row"]
            a, b = e["row"], other
            better = (rank.get(a.get("state"), 9), -(a.get("epoch") or 0)) < \
                     (rank.get(b.get("state"), 9), -(b.get("epoch") or 0))
            res.notes.append(f"run {rid} appears in {key} and {by_id[rid]}; using "
                             f"{key if better else by_id[rid]}")
            if not better:
                continue
        by_id[rid] = key
    chosen = set(by_id.values())
    # a run held twice whose chosen copy was not reread while the other copy changed: reread
    # the chosen copy too, so its checkpoint rows and curves are the ones in the tables
    dup_ids = {e["row"]["run_id"] for k, e in entries.items() if k not in chosen}
    if dup_ids:
        sweep_of = {str(d): s for s, d in run_dirs}
        changed_ids = {new[k].row["run_id"] for k in new}
        for rid in dup_ids & changed_ids:
            k = by_id[rid]
            if k not in new:
                r = read_run(Path(k), sweep_of[k], cdir)
                new[k] = r
                entries[k] = {"sig": r.sig, "row": r.row, "message": r.message}
                res.n_read += 1
    changed_keys = set(new) | set(removed)
    res.changed = bool(changed_keys) or not tables_ok or force
    rows = [entries[k]["row"] for k in entries if k in chosen]
    res.n_runs = len(rows)
    for r in rows:
        res.states[r.get("state", "?")] = res.states.get(r.get("state", "?"), 0) + 1
    res.messages = [entries[k]["message"] for k in entries
                    if k in chosen and entries[k].get("message")]

    runs_path, ckpt_path = out_dir / RUNS_TABLE, out_dir / CKPT_TABLE
    t2 = time.perf_counter()
    if res.changed:
        runs_table = build_runs_table(rows)
        res.swept = infer_swept(runs_table, axes_hint)
        finished_ids = {r["run_id"] for r in rows if r.get("state") in FINISHED}
        # checkpoint rows: unchanged runs from the previous table, changed runs from disk
        fresh_ids = {new[k].row["run_id"] for k in new if k in chosen}
        parts = []
        if tables_ok and not force and ckpt_path.exists():
            try:
                prev = pq.read_table(ckpt_path)
                keep_ids = pa.array(sorted(finished_ids - fresh_ids), pa.string())
                import pyarrow.compute as pc

                prev = prev.filter(pc.is_in(prev.column("run_id"), value_set=keep_ids))
                drop = [c for c in config_scalar_columns() if c in prev.column_names]
                prev = prev.drop(drop)
                prev = prev.rename_columns([c[len("measure_"):] if c.startswith("measure_") and
                                            c[len("measure_"):] in drop else c
                                            for c in prev.column_names])
                if prev.num_rows:
                    parts.append(prev)
            except Exception as e:  # damaged previous table: rebuild from every run
                res.notes.append(f"{ckpt_path}: unreadable ({e}); rebuilt from all runs")
                return aggregate(sweeps, out, formats, True, log, workers)
        for k, r in new.items():
            if k in chosen and r.measures is not None and r.row.get("state") in FINISHED:
                parts.append(_measures_with_id(r.measures, r.row["run_id"]))
        ckpt_table = build_checkpoints_table(parts, runs_table)
        md = {b"grokhpc.swept": json.dumps(res.swept).encode(),
              b"grokhpc.table": b"checkpoints"}
        write_parquet(ckpt_path, ckpt_table.replace_schema_metadata(md))
        md[b"grokhpc.table"] = b"runs"
        write_parquet(runs_path, runs_table.replace_schema_metadata(md))
        # curves: one file per finished run, staged by the readers, renamed here
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
        res.timings["write_s"] = time.perf_counter() - t2
        meta = {"swept": res.swept, "sweeps": [str(s.path) for s in found],
                "n_runs": res.n_runs, "states": res.states,
                "n_checkpoint_rows": ckpt_table.num_rows,
                "tables": {"runs": RUNS_TABLE, "checkpoints": CKPT_TABLE,
                           "curves": f"{CURVES_DIR}/<run_id>.parquet"},
                "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        atomic_write_json(out_dir / META, meta)
    else:
        try:
            res.swept = json.loads((out_dir / META).read_text())["swept"]
        except (OSError, KeyError, json.JSONDecodeError):
            res.swept = infer_swept(pq.read_table(runs_path), axes_hint)
        runs_table = ckpt_table = None
    res.tables = {"runs": runs_path, "checkpoints": ckpt_path, "curves": out_dir / CURVES_DIR}

    # figures
    if formats:
        from .figures import parse_formats

        fmts = parse_formats(formats)
        prev_figs = index.get("figures", {}) if not force else {}
        up_to_date = (not res.changed and prev_figs.get("formats") == list(fmts)
                      and all(Path(p).exists() for p in prev_figs.get("files", [])))
        if up_to_date:
            res.notes.append("figures up to date (no run changed)")
            res.figures = {}
        else:
            t3 = time.perf_counter()
            if runs_table is None:
                runs_table = pq.read_table(runs_path)
                ckpt_table = pq.read_table(ckpt_path)
            figs, notes = cross_run_figures(runs_table, ckpt_table, out_dir / CURVES_DIR,
                                            res.swept)
            res.notes.extend(notes)
            from .figures import export

            res.figures = export(figs, out_dir / FIG_DIR, formats=fmts, log=say)
            index["figures"] = {"formats": list(fmts),
                                "files": [str(p) for ps in res.figures.values() for p in ps]}
            res.timings["figures_s"] = time.perf_counter() - t3

    # the index goes last: if anything above failed, the next call redoes the work
    index["runs"] = entries
    if res.changed or res.figures:
        atomic_write_json(out_dir / INDEX, index)
    res.timings["total_s"] = time.perf_counter() - t0
    return res


# ---- cross-run figures ------------------------------------------------------------------------
def _fmt_val(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _group_stats(values: list[float], censored: list[bool], censor_at: list[float]):
    """Median and min/max over seeds, censored runs counted as 'later than any grokked run'.

    Returns (median, lo, hi, median_is_censored, n_censored)."""
    import numpy as np

    v = np.array([math.inf if c else float(x) for x, c in zip(values, censored)])
    if not len(v):
        return None
    med = float(np.quantile(v, 0.5, method="inverted_cdf"))
    cmax = max([c for c, cc in zip(censor_at, censored) if cc] or [float("nan")])
    lo = float(v.min())
    hi = float(v.max())
    med_c = math.isinf(med)
    if med_c:
        med = cmax
    if math.isinf(lo):
        lo = cmax
    if math.isinf(hi):
        hi = cmax
    return med, lo, hi, med_c, int(sum(censored))


def _colours(n: int) -> list[str]:
    from plotly.colors import sample_colorscale

    if n <= 1:
        return ["#0072B2"]
    return sample_colorscale("Viridis", [i / (n - 1) * 0.9 for i in range(n)])


def _primary(swept: list[str], df) -> str | None:
    cand = [s for s in swept if s not in SEED_FIELDS and s in df.columns]
    for a in AXIS_PREFERENCE:
        if a in cand:
            return a
    return cand[0] if cand else None


def _grok_vs(df, x: str, series: str | None, title: str, log_x: bool):
    import plotly.graph_objects as go

    from .figures import paper_style

    fig = go.Figure()
    series_vals = sorted(df[series].dropna().unique()) if series else [None]
    span = float(df[x].max() - df[x].min()) if len(df) else 0.0
    cols = _colours(len(series_vals))
    any_cens = False
    n_s = len(series_vals)
    for i_s, (colour, sv) in enumerate(zip(cols, series_vals)):
        sub = df if sv is None else df[df[series] == sv]
        # dodge the series sideways a little so equal values do not hide each other
        shift = (i_s - (n_s - 1) / 2) * 0.012

        def dodge(v, shift=shift):
            return v * 10 ** shift if log_x else v + shift * 0.5 * span
        xs, med, lo, hi, open_ = [], [], [], [], []
        for xv, g in sub.groupby(x, sort=True):
            st = _group_stats(g["grokking_epoch"].tolist(), (g["state"] == "censored").tolist(),
                              g["epoch"].fillna(g["grokking_epoch"]).tolist())
            if st is None:
                continue
            xs.append(dodge(xv))
            med.append(st[0])
            lo.append(st[0] - st[1])
            hi.append(st[2] - st[0])
            open_.append(st[3])
        name = _fmt_val(sv) if series else "median over seeds"
        fig.add_trace(go.Scatter(
            x=xs, y=med, mode="lines+markers", name=name, legendgroup=str(sv),
            line=dict(color=colour, width=2), marker=dict(size=10, color=colour),
            error_y=dict(type="data", symmetric=False, array=hi, arrayminus=lo,
                         color=colour, thickness=1.5, width=4)))
        if any(open_):
            any_cens = True
            fig.add_trace(go.Scatter(
                x=[a for a, o in zip(xs, open_) if o], y=[b for b, o in zip(med, open_) if o],
                mode="markers", showlegend=False, legendgroup=str(sv), hoverinfo="skip",
                marker=dict(size=12, color="white", line=dict(width=2, color=colour))))
        cens = sub[sub["state"] == "censored"]
        if len(cens):
            any_cens = True
            fig.add_trace(go.Scatter(
                x=[dodge(v) for v in cens[x]], y=cens["epoch"].fillna(cens["grokking_epoch"]),
                mode="markers",
                name="never grokked (at last epoch)", legendgroup="censored",
                showlegend=False, marker=dict(symbol="triangle-up-open", size=11, color=colour,
                                              line=dict(width=2))))
    if any_cens:
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers",
                                 name="run never grokked (at its last epoch)",
                                 marker=dict(symbol="triangle-up-open", size=11, color="black",
                                             line=dict(width=2))))
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers",
                                 name="median never grokked (open)",
                                 marker=dict(size=12, color="white",
                                             line=dict(width=2, color="black"))))
    fig.update_xaxes(title_text=UNITS.get(x, x), type="log" if log_x else "linear")
    fig.update_yaxes(title_text=GROK_AXIS, type="log")
    paper_style(fig, title=title, legend_title=series if series else None)
    if n_s > 6:  # many series: a compact legend that still fits the paper height
        fig.update_layout(legend=dict(font=dict(size=11), tracegroupgap=0))
    return fig


def _downsample(n: int, k: int = 150):
    import numpy as np

    if n <= k:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, k).round().astype(int))


def _join(xs: list, ys: list):
    """Concatenate several lines into one trace, separated by NaN gaps."""
    import numpy as np

    gap = np.array([np.nan])
    x = np.concatenate([p for a in xs for p in (a, gap)][:-1])
    y = np.concatenate([p for a in ys for p in (a, gap)][:-1])
    return x, y


def _by_colour(fin, colour_by: str | None):
    if colour_by is None:
        return [(None, fin)]
    return [(cv, g) for cv, g in fin.groupby(colour_by, sort=True)]


def cross_run_figures(runs_table, ckpt_table, curves_dir: Path, swept: list[str]):
    """The cross-run figures as {name: plotly Figure}, and one note per figure skipped."""
    import numpy as np
    import plotly.graph_objects as go
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    from plotly.subplots import make_subplots

    from .figures import paper_style

    runs = runs_table.to_pandas()
    notes: list[str] = []
    figs: dict[str, Any] = {}
    fin = runs[runs["state"].isin(FINISHED) & runs["grokking_epoch"].notna()].copy()
    if fin.empty:
        return figs, ["figures skipped: no finished run with a grokking epoch yet"]

    def varied(c: str) -> bool:
        return c in fin.columns and fin[c].nunique(dropna=True) > 1

    others = [s for s in swept if s not in SEED_FIELDS]
    seeds = [s for s in swept if s in SEED_FIELDS]
    seed_note = f" over {', '.join(seeds)}" if seeds else ""

    # 1. grokking epoch vs weight decay, one series per train fraction
    if varied("weight_decay"):
        d = fin[fin["weight_decay"] > 0]
        if len(d) < len(fin):
            notes.append("grok_vs_weight_decay: runs with weight_decay = 0 left out (log axis)")
        series = "train_frac" if varied("train_frac") else next(
            (s for s in others if s not in ("weight_decay",) and varied(s)), None)
        figs["grok_vs_weight_decay"] = _grok_vs(
            d, "weight_decay", series, f"Grokking time vs weight decay (median, min–max{seed_note})",
            log_x=True)
    else:
        notes.append("grok_vs_weight_decay skipped: weight_decay did not vary")

    # 2. grokking epoch vs train fraction, one series per prime
    if varied("train_frac"):
        series = "p" if varied("p") else next(
            (s for s in others if s not in ("train_frac",) and varied(s)), None)
        figs["grok_vs_train_frac"] = _grok_vs(
            fin, "train_frac", series,
            f"Grokking time vs training fraction (median, min–max{seed_note})", log_x=False)
    else:
        notes.append("grok_vs_train_frac skipped: train_frac did not vary")

    # 3. phase diagram weight decay x train fraction
    if varied("weight_decay") and varied("train_frac"):
        wds = sorted(fin["weight_decay"].unique())
        tfs = sorted(fin["train_frac"].unique())
        z = np.full((len(tfs), len(wds)), np.nan)
        text = [["" for _ in wds] for _ in tfs]
        never_x, never_y, part_x, part_y, part_t = [], [], [], [], []
        for (tf, wd), g in fin.groupby(["train_frac", "weight_decay"]):
            i, j = tfs.index(tf), wds.index(wd)
            st = _group_stats(g["grokking_epoch"].tolist(), (g["state"] == "censored").tolist(),
                              g["epoch"].fillna(g["grokking_epoch"]).tolist())
            n, nc = len(g), st[4]
            frac = f"<br>({n - nc}/{n} grokked)" if nc else ""
            if st[3]:
                never_x.append(_fmt_val(wd))
                never_y.append(_fmt_val(tf))
                part_x.append(j)  # category positions (annotations take indices)
                part_y.append(i)
                part_t.append(f"{n - nc}/{n} grokked")
            else:
                z[i, j] = math.log10(max(st[0], 1))
                text[i][j] = f"{st[0]:.0f}{frac}"
        xs, ys = [_fmt_val(w) for w in wds], [_fmt_val(t) for t in tfs]
        finite = z[np.isfinite(z)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        if hi - lo < 1e-9:
            hi = lo + 1
        ticks = np.arange(math.floor(lo), math.ceil(hi) + 1)
        fig = go.Figure(go.Heatmap(
            x=xs, y=ys, z=z, text=text, texttemplate="%{text}", zmin=lo, zmax=hi,
            colorscale="Viridis", hoverongaps=False,
            colorbar=dict(title=dict(text="median grokking<br>epoch", side="right"),
                          tickvals=ticks, ticktext=[f"{10 ** t:g}" for t in ticks])))
        if never_x:
            fig.add_trace(go.Scatter(x=never_x, y=never_y, mode="markers",
                                     name="median run never grokked",
                                     marker=dict(symbol="x-thin", size=22, color="black",
                                                 line=dict(width=3))))
        for px_, py_, pt_ in zip(part_x, part_y, part_t):  # under the cross
            fig.add_annotation(x=px_, y=py_, text=pt_, showarrow=False, yshift=-24,
                               font=dict(size=12, color="black"))
        pooled = [s for s in others if s not in ("weight_decay", "train_frac") and varied(s)]
        title = "Phase diagram: median grokking epoch"
        if pooled:
            title += f" (pooled over {', '.join(pooled)})"
        paper_style(fig, title=title)
        fig.update_xaxes(title_text=UNITS["weight_decay"], type="category", showgrid=False)
        fig.update_yaxes(title_text=UNITS["train_frac"], type="category", showgrid=False)
        fig.update_layout(legend=dict(orientation="h", y=-0.25, x=0), showlegend=bool(never_x))
        figs["phase_diagram"] = fig
    else:
        notes.append("phase_diagram skipped: weight_decay and train_frac did not both vary")

    colour_by = _primary(swept, fin) or next((s for s in seeds if varied(s)), None)
    if colour_by and not varied(colour_by):
        colour_by = None
    cvals = sorted(fin[colour_by].dropna().unique()) if colour_by else [None]
    cmap = dict(zip(cvals, _colours(len(cvals))))

    # 4. overlaid test-loss curves: one trace per colour value (runs joined by gaps)
    have = [rid for rid in fin["run_id"] if (curves_dir / f"{rid}.parquet").exists()]
    if have:
        ct = pq.read_table(str(curves_dir), columns=["run_id", "epoch", "test_loss"])
        ct = ct.filter(pc.is_valid(ct.column("test_loss"))).to_pandas()
        groups = dict(tuple(ct.groupby("run_id", sort=False)))
        per_line = max(20, min(150, POINT_BUDGET // max(1, len(have))))
        fig = go.Figure()
        for cv, sub in _by_colour(fin, colour_by):
            xs, ys = [], []
            for rid in sub["run_id"]:
                g = groups.get(rid)
                if g is None or g.empty:
                    continue
                g = g.sort_values("epoch")
                idx = _downsample(len(g), per_line)
                xs.append(g["epoch"].to_numpy(dtype=float)[idx])
                ys.append(g["test_loss"].to_numpy(dtype=float)[idx])
            if not xs:
                continue
            x, y = _join(xs, ys)
            fig.add_trace(go.Scatter(
                x=x, y=y, mode="lines", connectgaps=False, opacity=0.75,
                line=dict(color=cmap.get(cv, "#0072B2"), width=1.2),
                name=_fmt_val(cv) if colour_by else f"{len(xs)} runs",
                showlegend=len(cmap) <= 20))
        fig.update_xaxes(title_text="epoch (full-batch steps)")
        fig.update_yaxes(title_text="test loss (cross-entropy, nats)", type="log",
                         exponentformat="power")
        figs["test_loss_curves"] = paper_style(
            fig, title=f"Test loss of {len(have)} runs", legend_title=colour_by)
    else:
        notes.append("test_loss_curves skipped: no curves of finished runs")

    # 5. progress measures aligned on the grokking epoch
    if ckpt_table is not None and ckpt_table.num_rows:
        skip = set(config_scalar_columns()) | {"run_id", "epoch"}
        numeric = [f.name for f in ckpt_table.schema
                   if f.name not in skip and (pa.types.is_floating(f.type)
                                              or pa.types.is_integer(f.type))]
        prefer = ["restricted_loss", "excluded_loss", "test_loss", "train_loss",
                  "weight_norm_sq", "gini_embed", "gini_logit", "cos_residual"]
        chosen = ([m for m in prefer if m in numeric] or numeric)[:6]
        if chosen:
            ck = ckpt_table.select(["run_id", "epoch"] + chosen).to_pandas()
            grok = dict(zip(fin["run_id"], fin["grokking_epoch"]))
            ck = ck[ck["run_id"].isin(grok)]
            ck["since"] = ck["epoch"] - ck["run_id"].map(grok)
            ckg = dict(tuple(ck.groupby("run_id", sort=False)))
            per_line = max(20, min(250, POINT_BUDGET // max(1, len(ckg) * len(chosen))))
            ncol = 2 if len(chosen) > 1 else 1
            nrow = math.ceil(len(chosen) / ncol)
            fig = make_subplots(rows=nrow, cols=ncol, subplot_titles=chosen,
                                horizontal_spacing=0.12, vertical_spacing=0.12)
            for cv, sub in _by_colour(fin, colour_by):
                for cens in (False, True):
                    part = sub[(sub["state"] == "censored") == cens]
                    gs = [ckg[r].sort_values("epoch") for r in part["run_id"] if r in ckg]
                    gs = [g.iloc[_downsample(len(g), per_line)] for g in gs]
                    if not gs:
                        continue
                    for i, m in enumerate(chosen):
                        x, y = _join([g["since"].to_numpy(dtype=float) for g in gs],
                                     [g[m].to_numpy(dtype=float) for g in gs])
                        fig.add_trace(go.Scatter(
                            x=x, y=y, mode="lines", connectgaps=False, opacity=0.75,
                            line=dict(color=cmap.get(cv, "#0072B2"), width=1.2,
                                      dash="dot" if cens else "solid"),
                            name=(_fmt_val(cv) if colour_by else "runs")
                            + (" (never grokked)" if cens else ""),
                            legendgroup=f"{cv}{cens}",
                            showlegend=(i == 0 and len(cmap) <= 20)),
                            row=i // ncol + 1, col=i % ncol + 1)
            paper_style(fig, width=900, height=300 * nrow + 100,
                        title="Progress measures aligned on each run's grokking epoch",
                        legend_title=colour_by)
            for i, m in enumerate(chosen):
                r, c = i // ncol + 1, i % ncol + 1
                if "loss" in m:
                    fig.update_yaxes(type="log", exponentformat="power", row=r, col=c)
                fig.add_vline(x=0, line=dict(color="grey", dash="dash", width=1), row=r, col=c)
                if r == nrow or i + ncol >= len(chosen):
                    fig.update_xaxes(title_text="epochs since grokking", row=r, col=c)
            figs["measures_aligned"] = fig
        else:
            notes.append("measures_aligned skipped: no numeric measure columns")
    else:
        notes.append("measures_aligned skipped: no checkpoint rows (no measures.parquet)")
    return figs, notes


# ---- command line -----------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m grokhpc.aggregate",
        description="Gather a sweep's run directories into Parquet tables (SWEEP_DIR/aggregate/) "
                    "and draw cross-run grokking figures. Rereads only runs that changed.")
    ap.add_argument("sweep_dir", metavar="SWEEP_DIR", help="a sweep directory (holds run dirs)")
    ap.add_argument("--sweep", action="append", default=[], metavar="DIR",
                    help="another sweep to combine with SWEEP_DIR (repeatable)")
    ap.add_argument("--format", default="png,html", metavar="LIST",
                    help="figure formats, a comma list of png, svg, pdf, html (default png,html)")
    ap.add_argument("--out", metavar="DIR", help="output directory (default SWEEP_DIR/aggregate)")
    ap.add_argument("--no-figures", action="store_true", help="write the tables only")
    ap.add_argument("--force", action="store_true", help="reread every run and redraw")
    args = ap.parse_args(argv)

    if not args.no_figures:
        from .figures import parse_formats

        try:
            formats = parse_formats(args.format)
        except ValueError as e:
            ap.error(str(e))
    else:
        formats = None
    sweeps = [args.sweep_dir] + args.sweep
    for s in sweeps:
        if not Path(s).is_dir():
            print(f"aggregate: {s}: not a directory", file=sys.stderr)
            return 2
    res = aggregate(sweeps, args.out, formats, force=args.force)
    if res.n_runs == 0:
        print(f"aggregate: no run directories (folders with config.json) under "
              f"{', '.join(sweeps)}", file=sys.stderr)
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
