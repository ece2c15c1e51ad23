"""The local learning coefficient per checkpoint of trained runs: an opt-in measure, after training.

``python -m grokhpc.llc_run PATH [--every K | --log-points N] [--chains ...]``, PATH a run
directory, a sweep directory (every finished run in it) or a sweep spec (its ``out`` and its
``llc:`` section, e.g. ``llc: {log_points: 12, chains: 4, draws: 400}``; the command line's
settings win). The settings and their calibrated defaults are ``grokhpc.llc``'s
(:class:`~grokhpc.llc.LLCRequest`: which checkpoints; :class:`~grokhpc.llc.LLCSettings`: chains,
draws, burn-in, step size epsilon, localization gamma, nbeta, batch size, seed).

Stage: after a run is done (summary.json written), never part of it: a run is marked done
without any LLC, and an estimate that fails or is interrupted leaves the run as it was. Each
checkpoint's estimate is committed to the run's ``llc.json`` as soon as it is made (an atomic
rewrite), so a killed estimate loses at most the checkpoint it was on and the next call goes on
from there; estimates made with other settings are refused (``--restart`` drops them). After
each estimate the ``llc`` and ``llc_std`` (spread over chains) columns of measures.parquet are
rewritten from llc.json (null at checkpoints without an estimate); ``grokhpc.measures`` keeps
them when it recomputes the table, and the aggregate carries them into checkpoints.parquet.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .llc import LLCError, LLCRequest, LLCSettings
from .store import (CONFIG, MEASURES, SUMMARY, RunDir, RunDirError, atomic_write_json,
                    atomic_write_table, read_json)

LLC_FILE = "llc.json"
LLC_COLUMNS = ("llc", "llc_std")


# ---- llc.json ---------------------------------------------------------------------------------
def read_estimates(run: RunDir) -> dict[str, Any] | None:
    """llc.json: {"settings": {...}, "estimates": {epoch: {llc, llc_std, ...}}}, or None."""
    f = run.file(LLC_FILE)
    if not f.exists():
        return None
    data = read_json(f)
    if not isinstance(data, dict) or not isinstance(data.get("estimates"), dict):
        raise RunDirError(f"{f}: expected an object with settings and estimates; "
                          "pass --restart to estimate again")
    return data


def _settings_json(settings: LLCSettings) -> dict[str, Any]:
    return asdict(settings)


def _start(run: RunDir, settings: LLCSettings, restart: bool) -> dict[str, Any]:
    """The run's estimates so far, made with ``settings`` (an empty record when there are
    none, or with ``restart``); other settings are a one-line error."""
    old = None if restart else read_estimates(run)
    want = _settings_json(settings)
    if old is None:
        return {"settings": want, "estimates": {}}
    have = old.get("settings") or {}
    diff = [f"{k} {have.get(k)!r} there, {v!r} asked" for k, v in want.items()
            if have.get(k) != v]
    if diff:
        raise LLCError(f"{run.file(LLC_FILE)}: estimated with other settings "
                       f"({'; '.join(diff)}); run python -m grokhpc.llc_run {run.path} "
                       "--restart (with the settings) to drop those estimates")
    return old


# ---- the measures table -----------------------------------------------------------------------
def with_llc_columns(run: RunDir, table):
    """``table`` (measures.parquet's) with the ``llc`` and ``llc_std`` columns of the run's
    llc.json, null at epochs without an estimate; as it is when the run has no llc.json."""
    import pyarrow as pa

    data = read_estimates(run)
    if data is None:
        return table
    est = data["estimates"]
    meta = table.schema.metadata
    for name in LLC_COLUMNS:
        if name in table.column_names:
            table = table.drop([name])
    for name in LLC_COLUMNS:
        values = [(est.get(str(e)) or {}).get(name) for e in table.column("epoch").to_pylist()]
        table = table.append_column(name, pa.array(values, pa.float64()))
    return table.replace_schema_metadata(meta)


def _refresh_measures(run: RunDir) -> None:
    """Rewrite measures.parquet's LLC columns from llc.json (nothing when it does not exist)."""
    import pyarrow.parquet as pq

    f = run.file(MEASURES)
    if f.exists():
        atomic_write_table(f, with_llc_columns(run, pq.read_table(f)))


# ---- estimating -------------------------------------------------------------------------------
def estimate_run(run: RunDir, request: LLCRequest = LLCRequest(), device: str = "cpu",
                 restart: bool = False, log=print) -> dict[str, Any]:
    """Estimate the LLC at the requested checkpoints of a done run that llc.json does not hold
    yet, committing each; returns llc.json's record. An SGLD chain that diverges at a checkpoint
    is recorded there with its error (and left out of the columns) and the others go on."""
    from .llc import checkpoint_llc

    if not run.is_trained() or not run.file(SUMMARY).exists():
        raise RunDirError(f"{run.path}: not done yet (no summary.json): the LLC is estimated "
                          "after training")
    cfg = run.run_config()
    data = _start(run, request.settings, restart)
    epochs, rows = run.checkpoints()
    todo = [e for e in request.epochs(epochs) if str(e) not in data["estimates"]]
    if restart or not run.file(LLC_FILE).exists():
        atomic_write_json(run.file(LLC_FILE), data)
    for e in todo:
        t0 = time.perf_counter()
        try:
            est = checkpoint_llc(cfg, rows[epochs.index(e)], request.settings, device)
            rec = {"llc": est.llc_mean, "llc_std": est.llc_std,
                   "llc_per_chain": list(est.llc_per_chain), "init_loss": est.init_loss}
        except LLCError as err:
            rec = {"llc": None, "llc_std": None, "error": str(err)}
            log(f"{run.path}: epoch {e}: {err}")
        rec["seconds"] = round(time.perf_counter() - t0, 3)
        data["estimates"][str(e)] = rec
        atomic_write_json(run.file(LLC_FILE), data)
        _refresh_measures(run)
    if not todo:
        _refresh_measures(run)
    return data


def run_dirs(path: Path) -> list[RunDir]:
    """A run directory itself, or the finished runs of a sweep directory."""
    if (path / CONFIG).exists():
        return [RunDir(path)]
    found = sorted({c.parent for c in [*path.glob(f"*/{CONFIG}"), *path.glob(f"*/*/{CONFIG}")]
                    if not c.parent.name.startswith(".")})
    runs = [RunDir(p) for p in found]
    return [r for r in runs if r.is_trained() and r.file(SUMMARY).exists()]


def _target(path: str) -> tuple[Path, dict[str, Any]]:
    """(directory, the spec's llc section) for a run/sweep directory or a spec file."""
    p = Path(path)
    if p.is_file():
        from .sweep import load_sweep

        sweep = load_sweep(p)
        return sweep.out, dict(sweep.llc or {})
    if not p.is_dir():
        raise RunDirError(f"{path}: not a run directory, sweep directory or spec file")
    return p, {}


# ---- CLI --------------------------------------------------------------------------------------
SETTING_FLAGS = (("chains", int), ("draws", int), ("burn_in", int), ("epsilon", float),
                 ("gamma", float), ("nbeta", float), ("seed", int))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m grokhpc.llc_run",
        description="Estimate the LLC at checkpoints of done runs (resumable; after training).")
    ap.add_argument("path", help="a run directory, a sweep directory or a sweep spec (.yaml)")
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--every", type=int, default=None, metavar="K",
                       help="every K-th checkpoint (and the last)")
    which.add_argument("--log-points", type=int, default=None, metavar="N",
                       help="N checkpoints log-spaced in epoch (default 16)")
    for name, typ in SETTING_FLAGS:
        ap.add_argument("--" + name.replace("_", "-"), type=typ, default=None,
                        help=f"SGLD {name} (default: {getattr(LLCSettings, name)})")
    ap.add_argument("--batch-size", default=None, help="SGLD minibatch rows, or full (default)")
    ap.add_argument("--device", default="cpu", help="torch device (default cpu)")
    ap.add_argument("--restart", action="store_true",
                    help="drop the run's estimates made so far (e.g. with other settings)")
    return ap


def _request(args, section: dict[str, Any]) -> LLCRequest:
    values = dict(section)
    if args.every is not None or args.log_points is not None:
        values.pop("every", None)
        values.pop("log_points", None)
    for name in ("every", "log_points") + tuple(n for n, _ in SETTING_FLAGS):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    if args.batch_size is not None:
        values["batch_size"] = "full" if args.batch_size == "full" else _int_flag(args.batch_size)
    return LLCRequest.from_mapping(values, "llc" if not section else f"{args.path}: llc")


def _int_flag(text: str):
    try:
        return int(text)
    except ValueError:
        raise LLCError(f"--batch-size: expected full or an integer, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        root, section = _target(args.path)
        request = _request(args, section)
        runs = run_dirs(root)
        if not runs:
            raise RunDirError(f"{root}: no done run to estimate")
        print(f"LLC of {len(runs)} run(s): {request.describe()}")
        for run in runs:
            data = estimate_run(run, request, args.device, args.restart)
            est = data["estimates"]
            done = sorted(int(e) for e in est if est[e].get("llc") is not None)
            print(f"{run.path}: {len(done)} checkpoints estimated, in {LLC_FILE} and "
                  f"{MEASURES}")
    except (RunDirError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
