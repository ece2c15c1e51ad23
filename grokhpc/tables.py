"""A sweep's run directories read into Arrow tables, and the tables' vocabulary.

Stage: tables. ``grokhpc.aggregate`` finds the run directories, decides which to reread and
writes the tables; this module reads one run directory into its rows (:func:`read_run`) and
builds the tables from them (:func:`build_runs_table`, :func:`build_checkpoints_table`), with
the schema vocabulary the figures share: the states that count as finished (``FINISHED``), the
Arrow type of every run field (:func:`config_types`, :func:`config_scalar_columns`) and which
fields a sweep varied (:func:`infer_swept`). Schemas: docs/tables.md.

A run's state is grokhpc.scheduler's, read from its files alone: *done* when progress.json says
done and summary.json exists; only done runs give checkpoint rows and curves. Runs still
training or half-written (*running*), without progress yet (*pending*), with an error.txt
(*failed*) or with an unreadable file or a damaged checkpoint row (*corrupt*) get a runs row
with their state and a one-line message, never partial rows.

pyarrow is imported inside the functions: importing this module is free.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from .config import FIELD_TYPES
from .runtime import provenance_columns
from .scheduler import CORRUPT, DONE, FAILED, PENDING, RUNNING, read_dir
from .status import last_error_line
from .store import (CONFIG, CURVE_COLUMNS, CURVES, MEASURES, RUN_FILES, SUMMARY, RunDir,
                    RunDirError, read_json, temp_beside, write_table)

FINISHED = (DONE,)

# summary.json keys with fixed column types
SUMMARY_INT = ("grokking_epoch", "memorisation_end", "circuit_formation_end", "cleanup_end")
SUMMARY_FLOAT = ("final_train_loss", "final_test_loss", "final_train_acc", "final_test_acc",
                 "wall_time_s")
SUMMARY_SKIP = ("run_id", "p", "op")


# ---- the vocabulary ---------------------------------------------------------------------------
def config_types() -> dict[str, Any]:
    """Arrow type of every RunConfig field (ints int64, floats float64, betas list<double>)."""
    import pyarrow as pa

    m = {int: pa.int64(), float: pa.float64(), str: pa.string(), tuple: pa.list_(pa.float64()),
         bool: pa.bool_(), "optional_int": pa.int64(),
         "batch": pa.string()}   # batch_size: "full", or the size as text ("64")
    return {k: m[t] for k, t in FIELD_TYPES.items()}


def config_scalar_columns() -> list[str]:
    """The run fields with one value per row (all but list-valued ones such as betas): the
    config columns of checkpoints.parquet."""
    import pyarrow as pa

    return [k for k, t in config_types().items() if not pa.types.is_list(t)]


def discrete_columns(table) -> list[str]:
    """The columns worth dictionary-encoding: strings, integers and booleans (float measures
    are mostly distinct and only cost time to try)."""
    import pyarrow as pa

    return [f.name for f in table.schema if pa.types.is_string(f.type)
            or pa.types.is_integer(f.type) or pa.types.is_boolean(f.type)]


class WriteError(Exception):
    """Writing the aggregation's own files failed (a full disk, a folder that cannot be
    written): never a damaged run. ``args[0]`` is the OSError."""


def run_signature(run_dir: Path) -> tuple[dict[str, list[int]], list[str]]:
    """{file: [mtime_ns, size]} of the run's files, and stray temporary files: what tells a
    changed run directory from one already in the tables."""
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
    sig, stray = run_signature(run_dir)
    try:
        rel = str(run_dir.relative_to(sweep))
    except ValueError:
        rel = str(run_dir)
    row: dict[str, Any] = {"run_id": run_dir.name, "sweep": str(sweep), "run_dir": rel}
    out = RunRead(str(run_dir), sig, row)
    try:
        cfg = read_json(run_dir / CONFIG)
        if not isinstance(cfg, dict):
            raise RunDirError(f"{CONFIG}: expected a JSON object")
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
            out.message = f"{row['run_id']} ({rel}): done but has no {MEASURES} " \
                          "(no checkpoint rows)"
    else:
        _unfinished_state(out, rel, prog, summary, error, stray)
    return out


def _read_finished(out: RunRead, run_dir: Path, stage_dir: Path | None) -> None:
    """A finished run's curves (staged into ``stage_dir`` when given) and measures."""
    row = out.row
    curves = _read_table(run_dir / CURVES)
    if "epoch" not in curves.column_names:
        raise ValueError(f"{CURVES}: no epoch column")
    out.curves = curves
    if stage_dir is not None:
        try:
            tmp = temp_beside(stage_dir / f"{row['run_id']}.parquet")
            write_table(tmp, _canonical_curves(curves, row["run_id"]), dictionary=["run_id"],
                        statistics=["run_id", "epoch"], fsync=False)
        except OSError as e:   # the run is fine: the aggregation's own folder is not
            raise WriteError(OSError(e.errno, e.strerror, str(stage_dir))) from e
        out.curves, out.curves_tmp = None, tmp
    if MEASURES in out.sig:
        m = _read_table(run_dir / MEASURES)
        if "epoch" not in m.column_names:
            raise ValueError(f"{MEASURES}: no epoch column")
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
            why.append(f"trained but no {SUMMARY} yet")
        if stray:
            more = f" (+{len(stray) - 1})" if len(stray) > 1 else ""
            why.append(f"temporary file {stray[0]}{more}")
        out.message = (f"{row['run_id']} ({rel}): running or interrupted ({', '.join(why)}); "
                       "not in the tables yet")


# ---- table building ---------------------------------------------------------------------------
def _infer_type(values: list[Any]):
    import pyarrow as pa

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
    import pyarrow as pa

    cols = [("run_id", pa.string()), ("state", pa.string()), ("sweep", pa.string()),
            ("run_dir", pa.string())]
    cols += list(config_types().items())
    cols += [("epoch", pa.int64()), ("n_checkpoints", pa.int64()), ("grokked", pa.bool_())]
    cols += [(k, pa.int64()) for k in SUMMARY_INT]
    cols += [(k, pa.float64()) for k in SUMMARY_FLOAT]
    cols += [("key_freqs", pa.list_(pa.int64())), ("basis", pa.string()),
             ("generator", pa.int64()), ("key_elements", pa.list_(pa.int64())),
             ("key_names", pa.list_(pa.string())), ("updated", pa.string()),
             ("error", pa.string())]
    return cols


def _column(values: list[Any], typ):
    import pyarrow as pa

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
    import pyarrow as pa

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
    """A run's curves as the curves/ table holds them: run_id, then the curve columns in their
    order and types, then anything newer."""
    import pyarrow as pa

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


def measures_with_id(t, run_id: str):
    """A run's measures table with its run_id in front and int64 epochs: its part of
    checkpoints.parquet before the config columns are attached."""
    import pyarrow as pa

    t = t.replace_schema_metadata(None)
    if "run_id" in t.column_names:
        t = t.drop(["run_id"])
    if t.schema.field("epoch").type != pa.int64():
        t = t.set_column(t.schema.get_field_index("epoch"), "epoch",
                         t.column("epoch").cast(pa.int64()))
    return t.add_column(0, "run_id", pa.repeat(pa.scalar(run_id, pa.string()), t.num_rows))


def build_checkpoints_table(measure_tables: list, runs_table):
    """Concatenate per-run measures (with run_id) and attach the scalar config columns."""
    import pyarrow as pa
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


class DamagedTable(Exception):
    """The previous checkpoints.parquet cannot be read: the tables are rebuilt from every run."""


def previous_checkpoint_rows(path: Path, keep_ids: list[str]):
    """The rows of a previous checkpoints.parquet of the runs in ``keep_ids``, as
    :func:`build_checkpoints_table` takes them: without the config columns (attached again
    from the new runs table; measure columns renamed for a clash get their names back); None
    when there are none. DamagedTable when the file cannot be read."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    try:
        prev = pq.read_table(path)
        keep = pa.array(keep_ids, pa.string())
        prev = prev.filter(pc.is_in(prev.column("run_id"), value_set=keep))
    except Exception as e:  # pyarrow raises several types for damaged files
        raise DamagedTable(f"{path}: unreadable ({e})") from None
    drop = [c for c in config_scalar_columns() if c in prev.column_names]
    prev = prev.drop(drop)
    prev = prev.rename_columns([c[len("measure_"):] if c.startswith("measure_") and
                                c[len("measure_"):] in drop else c for c in prev.column_names])
    return prev if prev.num_rows else None
