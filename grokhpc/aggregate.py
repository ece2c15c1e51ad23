"""Gather a sweep's run directories into Parquet tables and draw the cross-run figures.

``python -m grokhpc.aggregate SWEEP_DIR [--sweep DIR ...] [--format png,html] [--out DIR]``
(``--html-js embed``: self-contained HTML figures)

Stage: the last one of a sweep (after training; launch runs it, locally or as a SLURM job).
This module finds the run directories (:func:`discover`), plans which changed since the last
call (the index), has ``grokhpc.tables`` read them into rows and build the tables, writes the
tables and draws the figures (``grokhpc.sweep_figures`` through ``grokhpc.figures``).

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

A run's state is grokhpc.scheduler's, read from its files alone (``grokhpc.tables``): only done
runs enter checkpoints.parquet and curves/ (``grokked`` then says whether it grokked; a run
that never did is "censored" at its last epoch); the others are listed in runs.parquet with
their state and reported one line each; they never put partial rows into the other tables.

A directory without run directories (an empty one, a run directory) is refused before anything
is written into it. The two tables are written side by side and put in place together, so a
disk that fills up, or a folder that cannot be written, leaves the previous tables whole; the
command then says so in one line.

Imports neither torch nor plotly at module level; ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from .figures import export, parse_formats
from .scheduler import CORRUPT, DONE, FAILED, MANIFEST, PENDING, RUNNING, find_sweeps, read_manifest
from .store import (CONFIG, NO_SPACE, NOT_ALLOWED, RunDirError, atomic_write_json,
                    out_problem, temp_beside, write_table)
from .reference import manifest_published, write_reference
from .sweep_figures import cross_run_figures
from .tables import (FINISHED, DamagedTable, RunRead, WriteError, build_checkpoints_table,
                     build_runs_table, discrete_columns, infer_swept, measures_with_id,
                     previous_checkpoint_rows, read_run, run_signature)

INDEX_VERSION = 2  # 2: entries record their run's config keys
AGG_DIR = "aggregate"
RUNS_TABLE = "runs.parquet"
CKPT_TABLE = "checkpoints.parquet"
CURVES_DIR = "curves"
INDEX = "index.json"
META = "meta.json"
FIG_DIR = "figures"
MAX_REPORT_LINES = 40


# ---- discovery --------------------------------------------------------------------------------
@dataclass
class Sweep:
    path: Path
    run_dirs: list[Path]
    axes: list[str]
    manifest_error: str | None = None
    phase_pairs: list[tuple[str, str]] = field(default_factory=list)  # the spec's figures.phase
    published: tuple = ()   # the spec's published: section (grokhpc.reference)


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
    published: tuple = ()
    mf = root / MANIFEST
    if mf.exists():
        try:
            man = read_manifest(root) or {}
            for r in man.get("runs", []):
                d = r.get("dir") if isinstance(r, dict) else None
                if d:
                    p = (root / d).resolve()
                    if (p / CONFIG).exists():
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
            published, bad = manifest_published(man, str(mf))
            manifest_error = manifest_error or bad
        except RunDirError as e:
            manifest_error = f"{e}; runs found by directory scan"
        except (AttributeError, TypeError) as e:
            manifest_error = f"{mf}: unreadable manifest ({e}); runs found by directory scan"
    skip = {AGG_DIR}
    for e1 in sorted(os.scandir(root), key=lambda e: e.name):
        if not e1.is_dir() or e1.name in skip or e1.name.startswith("."):
            continue
        p1 = Path(e1.path)
        if (p1 / CONFIG).exists():
            found[p1.resolve()] = None
            continue
        try:
            sub = sorted(os.scandir(p1), key=lambda e: e.name)
        except OSError:
            continue
        for e2 in sub:
            if e2.is_dir() and not e2.name.startswith(".") and \
                    os.path.exists(os.path.join(e2.path, CONFIG)):
                found[Path(e2.path).resolve()] = None
    return Sweep(root, list(found), axes, manifest_error, phase_pairs, published)


def not_a_sweep(path: str | os.PathLike) -> str | None:
    """One line saying why ``path`` is no sweep to aggregate (no run directories in it; a run
    directory itself), or None. Reads only."""
    root = Path(path)
    if not root.is_dir():
        return f"{path}: not a directory"
    if discover(root).run_dirs:
        return None
    why = f"{path}: no run directories (folders with config.json) in it"
    if (root / CONFIG).exists():
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
    changed = [d for d in dirs if old.get(d, {}).get("sig") != run_signature(Path(d))[0]]
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
    reference: list[str] = field(default_factory=list)   # the measured-vs-published summary


def _load_index(out_dir: Path) -> dict[str, Any]:
    p = out_dir / INDEX
    try:
        idx = json.loads(p.read_text())
        if idx.get("version") == INDEX_VERSION and isinstance(idx.get("runs"), dict):
            return idx
    except (OSError, json.JSONDecodeError, AttributeError):
        pass
    return {"version": INDEX_VERSION, "runs": {}}


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
        sig, _ = run_signature(d)
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
        prev = previous_checkpoint_rows(ckpt_path, sorted(finished_ids - fresh_ids))
        if prev is not None:
            parts.append(prev)
    for k, r in new.items():
        if k in chosen and r.measures is not None and r.row.get("state") in FINISHED:
            parts.append(measures_with_id(r.measures, r.row["run_id"]))
    ckpt_table = build_checkpoints_table(parts, runs_table)
    swept = json.dumps(res.swept).encode()
    _put_in_place({plan.out_dir / CKPT_TABLE: (ckpt_table, b"checkpoints"),
                   plan.out_dir / RUNS_TABLE: (runs_table, b"runs")}, swept,
                  [r.curves_tmp for r in new.values() if r.curves_tmp])
    _place_curves(plan.cdir, new, chosen, finished_ids)
    return runs_table, ckpt_table


def _put_in_place(tables: dict[Path, tuple], swept: bytes, staged_curves: list[Path]) -> None:
    """Write each (table, name) beside its path with the swept fields in its metadata, then
    rename them all: every one is written before any replaces the previous one. On failure
    nothing is replaced and nothing staged is left to fill a disk."""
    staged: dict[Path, Path] = {}
    try:
        for path, (table, name) in tables.items():
            staged[path] = temp_beside(path)
            md = {b"grokhpc.swept": swept, b"grokhpc.table": name}
            write_table(staged[path], table.replace_schema_metadata(md), name=path,
                        dictionary=discrete_columns(table))
    except BaseException:
        for tmp in [*staged.values(), *staged_curves]:
            tmp.unlink(missing_ok=True)
        raise
    for path, tmp in staged.items():
        os.replace(tmp, path)


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
    only the run directories whose files changed since the last call (``force`` rereads all).
    Returns a :class:`Result`. A previous checkpoints table that cannot be read is rebuilt
    from every run, with a note saying so.
    """
    try:
        return _aggregate(sweeps, out, formats, force, log, workers, html_js)
    except DamagedTable as e:
        res = _aggregate(sweeps, out, formats, True, log, workers, html_js)
        res.notes.insert(0, f"{e}; rebuilt from all runs")
        return res


def _aggregate(sweeps, out, formats, force: bool, log, workers: int,
               html_js: str = "directory") -> Result:
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
    res.reference = write_reference(plan.out_dir, tuple(dict.fromkeys(
        p for s in plan.sweeps for p in s.published)), res.swept)
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
def _refuse(sweeps: list[str], out: str | None) -> tuple[str, int] | None:
    """(one line, exit code) for sweep directories that hold no runs and an --out that cannot
    be a directory: refused before anything is written."""
    for s in sweeps:
        why = not_a_sweep(s)
        if why:
            return why, 2 if not Path(s).is_dir() else 1
    why = out_problem(out)
    return (why, 2) if why else None


def write_failure(e: OSError | WriteError, out_dir) -> str:
    """One line for an OSError while aggregating (a full disk, a folder that cannot be
    written), and what to do; the tables are never left half-written (see the module doc)."""
    e = e.args[0] if isinstance(e, WriteError) else e   # an OSError either way
    what = os.strerror(e.errno) if e.errno else str(e)
    todo = ("; free some space and run the same command again" if e.errno in NO_SPACE else
            "; write them elsewhere with --out DIR" if e.errno in NOT_ALLOWED else "")
    return f"{e.filename or out_dir}: {what}; no table was left half-written{todo}"


def _every_sweep_under_runs(args, argv: list[str] | None) -> int:
    """Bare ``python -m grokhpc.aggregate``: each sweep under ./runs on its own, saying which."""
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


def build_parser() -> argparse.ArgumentParser:
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
    return ap


def _report(res: Result) -> None:
    """What the command prints: the runs not finished (at most MAX_REPORT_LINES), the notes,
    the counts and where the tables and figures are."""
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
    for line in res.reference:
        print(line)
    if res.figures:
        n = sum(len(v) for v in res.figures.values())
        print(f"figures: {n} files in {res.out_dir / FIG_DIR}")


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.sweep_dir is None:
        return _every_sweep_under_runs(args, argv)
    formats = None
    if not args.no_figures:
        try:
            formats = parse_formats(args.format)
        except ValueError as e:
            ap.error(str(e))
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
    _report(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
