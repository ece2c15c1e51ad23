"""Published reference numbers of a sweep, and the "measured vs published" table.

A spec's ``published:`` section says what a paper reported for the setting the sweep runs::

    published:
      source: Lee et al. 2024 (Grokfast), github.com/ironjr/grokfast README, algorithmic data
      metric: grokking_epoch      # a column of runs.parquet (grokhpc.tables)
      threshold: 0.95             # grokking_epoch at this test accuracy (from the curves)
      unit: step                  # epoch (default) | step: the paper counts optimiser steps
      by: [grad_filter, weight_decay]   # the swept axes the values are keyed by (optional)
      values:                     # one axis: {value: number}; any: rows [[v1, v2, number], ...];
        - [none, 0.0, 39890]      # no axis: one number; left out: measured values only
        - [ema, 0.005, 910]
      note: one run per arm in the paper

or a list of such mappings (one per metric). It is never part of a run's identity: the spec
parser checks it (:func:`parse_published`) and the manifest records it; ``python -m
grokhpc.aggregate`` then writes ``aggregate/reference.parquet`` and ``reference.csv``
(:func:`measured_vs_published`): per arm (the runs that differ only in their seeds) the number
of seeds, how many reached the metric, its median and spread over the seeds, the published
number and their ratio. A run that never reached the metric (censored: never grokked, a phase
never ended) is counted and enters each statistic as a lower bound, its epochs trained; a
statistic that rests on one is marked ``*_lower``. Schema: docs/tables.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from .config import FIELD_TYPES, ConfigError, RunConfig, clip, is_seed, shown

KEYS = ("source", "metric", "threshold", "unit", "by", "values", "note")
UNITS = ("epoch", "step")
STATS = ("median", "q25", "q75", "min", "max")
QUANTILES = {"median": 0.5, "q25": 0.25, "q75": 0.75, "min": 0.0, "max": 1.0}
TABLE, CSV = "reference.parquet", "reference.csv"


def metric_columns() -> tuple[str, ...]:
    """The numeric per-run columns of runs.parquet a paper's number can be compared with."""
    from .tables import SUMMARY_FLOAT, SUMMARY_INT

    return (*SUMMARY_INT, *SUMMARY_FLOAT)


def epoch_metrics() -> tuple[str, ...]:
    """The metrics that count epochs (the grokking epoch, the phase ends): the ones a unit
    (epoch or step) applies to."""
    from .tables import SUMMARY_INT

    return tuple(SUMMARY_INT)


@dataclass(frozen=True)
class Published:
    """One published number set: a metric of the runs, keyed by swept axes."""

    source: str
    metric: str
    unit: str = "epoch"
    by: tuple[str, ...] = ()
    values: tuple[tuple[tuple[Any, ...], float], ...] = ()   # (axis values, number)
    note: str = ""
    threshold: float | None = None   # grokking_epoch at this test accuracy (curves), not 0.99

    def lookup(self, arm: Mapping[str, Any]) -> float | None:
        """The published number of the arm whose axes take ``arm``'s values, or None."""
        key = tuple(repr(plain(arm.get(a))) for a in self.by)
        return next((v for k, v in self.values if tuple(map(repr, k)) == key), None)

    def to_dict(self) -> dict[str, Any]:
        vals: Any = [[*k, v] for k, v in self.values]   # rows: JSON keys would be text
        if not self.by:
            vals = self.values[0][1] if self.values else None
        d = {"source": self.source, "metric": self.metric, "threshold": self.threshold,
             "unit": self.unit, "by": list(self.by), "values": vals, "note": self.note}
        return {k: v for k, v in d.items() if v not in (None, "", [])}


# ---- the spec section ------------------------------------------------------------------------
def _fail(where: str, expected: str, got: Any) -> None:
    raise ConfigError(f"{where}: expected {expected}, got {shown(got)}")


def _number(v: Any, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf:
        _fail(where, "a positive number (the paper's value)", v)
    return float(v)


def plain(v: Any) -> Any:
    """A table or YAML value as the plain Python value a run field holds (numpy scalars
    unboxed, NaN/NA as None)."""
    if getattr(v, "ndim", None) is not None:   # a numpy scalar or array
        v = v.item() if v.ndim == 0 else v.tolist()
    if v is None or (isinstance(v, float) and math.isnan(v)) or type(v).__name__ == "NAType":
        return None
    return v


def _axis_value(axis: str, v: Any, where: str, taken: Mapping[str, set]) -> Any:
    """``v`` as the run field ``axis`` holds it; it must be a value the sweep gives the axis."""
    if FIELD_TYPES.get(axis) is float and isinstance(v, int) and not isinstance(v, bool):
        v = float(v)
    if taken and repr(v) not in taken.get(axis, set()):
        _fail(where, f"a value the sweep gives {axis} "
                     f"({', '.join(sorted(taken.get(axis, ())))})", v)
    return v


def _by(raw: Any, where: str, taken: Mapping[str, set]) -> tuple[str, ...]:
    by = [raw] if isinstance(raw, str) else raw if raw is not None else []
    if not isinstance(by, list) or not all(isinstance(a, str) for a in by):
        _fail(f"{where}.by", "a swept axis or a list of them", raw)
    for a in by:
        if a not in FIELD_TYPES or is_seed(a) or (taken and a not in taken):
            arms = [x for x in taken if not is_seed(x)]
            _fail(f"{where}.by", f"a swept axis other than the seeds ({', '.join(arms)})"
                  if taken else "a run field other than the seeds", a)
    if len(set(by)) != len(by):
        _fail(f"{where}.by", "distinct axes", raw)
    return tuple(by)


def _values(raw: Any, by: tuple[str, ...], where: str, taken) -> tuple:
    """The ``values`` entry as ((axis values), number) pairs."""
    w = f"{where}.values"
    if raw is None:
        return ()
    if not by:
        return (((), _number(raw, w)),)
    if len(by) == 1 and not isinstance(raw, list):
        if not isinstance(raw, Mapping) or not raw:
            _fail(w, f"a mapping of {by[0]} values to numbers (or [{by[0]}, number] rows)", raw)
        rows = [[k, v] for k, v in raw.items()]
    else:
        if not isinstance(raw, list) or not raw or not all(
                isinstance(r, list) and len(r) == len(by) + 1 for r in raw):
            _fail(w, f"a list of [{', '.join(by)}, number] rows", raw)
        rows = raw
    out, seen = [], set()
    for i, r in enumerate(rows):
        key = tuple(_axis_value(a, v, f"{w}[{i}].{a}", taken) for a, v in zip(by, r))
        if repr(key) in seen:
            _fail(f"{w}[{i}]", "one number per arm", r)
        seen.add(repr(key))
        out.append((key, _number(r[-1], f"{w}[{i}]")))
    return tuple(out)


def _entry(raw: Any, where: str, taken: Mapping[str, set]) -> Published:
    if not isinstance(raw, Mapping):
        _fail(where, "a mapping (source, metric, unit, by, values, note)", raw)
    for k in raw:
        if k not in KEYS:
            raise ConfigError(f"{where}.{clip(k, 60)}: unknown key (expected one of "
                              f"{', '.join(KEYS)})")
    src, metric = raw.get("source"), raw.get("metric")
    if not isinstance(src, str) or not src.strip():
        _fail(f"{where}.source", "the paper, its figure or table (text)", src)
    if metric not in metric_columns():
        _fail(f"{where}.metric", f"a column of runs.parquet ({', '.join(metric_columns())})",
              metric)
    counts_epochs = metric in epoch_metrics()
    unit = raw.get("unit", "epoch" if counts_epochs else "")
    if raw.get("unit") not in (None, "") and not counts_epochs:
        _fail(f"{where}.unit", f"no unit for {metric} (a unit is for {', '.join(epoch_metrics())})",
              unit)
    if counts_epochs and unit not in UNITS:
        _fail(f"{where}.unit", " | ".join(UNITS), unit)
    note, thr = raw.get("note", ""), raw.get("threshold")
    if not isinstance(note, str):
        _fail(f"{where}.note", "text", note)
    if thr is not None and (metric != "grokking_epoch" or isinstance(thr, bool)
                            or not isinstance(thr, (int, float)) or not 0 < thr <= 1):
        _fail(f"{where}.threshold", "a test accuracy in (0, 1], with metric grokking_epoch", thr)
    by = _by(raw.get("by"), where, taken)
    return Published(src.strip(), metric, unit, by, _values(raw.get("values"), by, where, taken),
                     note, None if thr is None else float(thr))


def parse_published(raw: Any, source: str,
                    swept: Iterable[Mapping[str, Any]] = ()) -> tuple[Published, ...]:
    """A ``published:`` section (a mapping or a list of them), checked against the axes the
    runs sweep (``swept``: each run's {axis: value}; none: axes are not checked). Every error
    is one ConfigError line naming ``source`` and the key."""
    if raw is None:
        return ()
    taken: dict[str, set] = {}
    for s in swept:
        for k, v in s.items():
            taken.setdefault(k, set()).add(repr(tuple(v) if isinstance(v, list) else v))
    items = raw if isinstance(raw, list) else [raw]
    if not items:
        _fail(f"{source}: published", "a mapping or a non-empty list of them", raw)
    many = isinstance(raw, list)
    return tuple(_entry(e, f"{source}: published" + (f"[{i}]" if many else ""), taken)
                 for i, e in enumerate(items))


def manifest_published(manifest: Mapping[str, Any], source: str) -> tuple[tuple, str | None]:
    """The ``published`` entries a manifest records, checked again (a manifest is a file
    anyone can edit), and a one-line note instead when they are not valid."""
    runs = [r for r in manifest.get("runs") or [] if isinstance(r, Mapping)]
    swept = [r["swept"] for r in runs if isinstance(r.get("swept"), Mapping)]
    try:
        return parse_published(manifest.get("published") or None, source, swept), None
    except ConfigError as e:
        return (), f"{e}; no measured-vs-published table"


# ---- the table -------------------------------------------------------------------------------
def steps_per_epoch(row: Mapping[str, Any]) -> int:
    """Optimiser steps in one epoch of the run in ``row`` (1 with full batches)."""
    bs = row.get("batch_size")
    if bs in (None, "full"):
        return 1
    fields = {"p": int, "op": str, "train_frac": float, "model": str, "n_samples": int,
              "n_bits": int, "k_bits": int}          # what sets n_train, and what checks it
    cfg = RunConfig(**{k: cast(row[k]) for k, cast in fields.items() if row.get(k) is not None})
    return math.ceil(cfg.n_train / int(bs))


def _reached(row: Mapping[str, Any], metric: str) -> bool:
    v = row.get(metric)
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return False
    return bool(row.get("grokked")) if metric == "grokking_epoch" else True


def quantile(reached: list[float], censored: list[float], q: float) -> tuple[float, bool]:
    """The ``q`` quantile (linear between order statistics) of values of which ``censored``
    are only known to be at least what they hold: (value, True) when it rests on a censored
    value, the value then a lower bound (the quantile with each censored value at its bound)."""
    import numpy as np

    keys = sorted(reached) + [math.inf] * len(censored)
    h = (len(keys) - 1) * q
    lo, hi = math.floor(h), math.ceil(h)
    if math.isinf(keys[hi]):
        return float(np.quantile(reached + censored, q)), True
    return keys[lo] + (keys[hi] - keys[lo]) * (h - lo), False


def at_threshold(rows: list[dict], threshold: float, curves_dir: Path) -> list[dict]:
    """``rows`` with grokking_epoch and grokked read at ``threshold`` from each done run's
    curves (``curves_dir/<run_id>.parquet``): the first logged epoch at that test accuracy. A
    done run whose curves are missing is left out of the statistics (state "no curves")."""
    import pyarrow.parquet as pq

    out = []
    for r in rows:
        f = curves_dir / f"{r['run_id']}.parquet"
        if r.get("state") == "done" and not f.exists():
            r = {**r, "state": "no curves"}
        elif r.get("state") == "done":
            t = pq.read_table(f, columns=["epoch", "test_acc"]).to_pydict()
            hit = [e for e, a in zip(t["epoch"], t["test_acc"]) if a is not None and a >= threshold]
            r = {**r, "grokked": bool(hit), "grokking_epoch": hit[0] if hit else r["epoch"]}
        out.append(r)
    return out


def _arm_stats(rows: list[Mapping[str, Any]], pub: Published) -> dict[str, Any]:
    done = [r for r in rows if r.get("state") == "done"]
    unit = [steps_per_epoch(r) if pub.unit == "step" else 1 for r in done]
    reached = [float(r[pub.metric]) * u for r, u in zip(done, unit) if _reached(r, pub.metric)]
    censored = [float(r["epoch"]) * u for r, u in zip(done, unit)
                if not _reached(r, pub.metric)]
    out: dict[str, Any] = {"n_runs": len(rows), "n_seeds": len(done),
                           "n_reached": len(reached), "n_censored": len(censored)}
    for s in STATS:
        v, low = quantile(reached, censored, QUANTILES[s]) if done else (None, False)
        out[s], out[f"{s}_lower"] = v, low
    return out


def measured_vs_published(runs, entries: Iterable[Published], swept: Iterable[str],
                          curves_dir: Path | None = None):
    """The measured-vs-published table (pandas): one row per published entry x arm, the arms
    being the runs that share every swept axis but the seeds (an entry with a ``threshold``
    reads the runs' curves in ``curves_dir``)."""
    import pandas as pd

    axes = [a for a in swept if not is_seed(a) and a in runs.columns]
    records = [{k: plain(v) for k, v in r.items()} for r in runs.to_dict("records")]
    arms: dict[str, list] = {}
    for r in records:
        arms.setdefault(repr(tuple(r.get(a) for a in axes)), []).append(r)
    try:
        order = sorted(arms.values(), key=lambda rs: [(rs[0].get(a) is None, rs[0].get(a) or 0)
                                                      for a in axes])
    except TypeError:   # values of mixed types: the runs table's order
        order = list(arms.values())
    out = []
    for pub in entries:
        for rows in order:
            arm = {a: rows[0].get(a) for a in axes}
            stats = _arm_stats(at_threshold(rows, pub.threshold, curves_dir)
                               if pub.threshold else rows, pub)
            published = pub.lookup(arm) if pub.by or pub.values else None
            ratio = None if published is None or stats["median"] is None else \
                stats["median"] / published
            out.append({"metric": pub.metric, "threshold": pub.threshold, "unit": pub.unit,
                        "arm": ", ".join(f"{a}={v}" for a, v in arm.items()) or "all",
                        **stats, "published": published, "ratio": ratio,
                        "ratio_lower": stats["median_lower"] if ratio is not None else False,
                        "source": pub.source, "note": pub.note})
    return pd.DataFrame(out)


def _shown_value(v: Any, lower: bool) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    text = f"{v:.3g}" if abs(v) < 100 else f"{v:,.0f}"
    return f">={text}" if lower else text


def summary_lines(table) -> list[str]:
    """The table as printed by ``python -m grokhpc.aggregate``: one block per metric."""
    lines: list[str] = []
    keys = ["metric", "threshold", "unit", "source"]
    for (metric, thr, unit, source), part in table.groupby(keys, sort=False, dropna=False):
        at = "" if thr is None or thr != thr else f" (test accuracy >= {thr:g})"
        lines.append(f"measured vs published: {metric}{at}{f' in {unit}s' if unit else ''}; "
                     f"{source}")
        rows = [["arm", "seeds", "reached", "median", "IQR", "min..max", "published", "ratio"]]
        for r in part.to_dict("records"):
            rows.append([r["arm"], str(r["n_seeds"]), str(r["n_reached"]),
                         _shown_value(r["median"], r["median_lower"]),
                         f"{_shown_value(r['q25'], r['q25_lower'])}.."
                         f"{_shown_value(r['q75'], r['q75_lower'])}",
                         f"{_shown_value(r['min'], r['min_lower'])}.."
                         f"{_shown_value(r['max'], r['max_lower'])}",
                         _shown_value(r["published"], False),
                         _shown_value(r["ratio"], r["ratio_lower"])])
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines.extend("  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                      for i, (c, w) in enumerate(zip(row, widths)))
                     for row in rows)
        notes = {n for n in part["note"] if n}
        lines.extend(f"  note: {n}" for n in notes)
    return lines


def write_reference(out_dir: Path, entries: tuple[Published, ...], swept: list[str]) -> list[str]:
    """Write reference.parquet and reference.csv beside runs.parquet in ``out_dir`` (each
    whole or not at all) and return the printed summary; without entries, remove old ones."""
    import pandas as pd
    import pyarrow as pa

    from .store import atomic_write_bytes, atomic_write_table

    if not entries:
        for name in (TABLE, CSV):
            (out_dir / name).unlink(missing_ok=True)
        return []
    table = measured_vs_published(pd.read_parquet(out_dir / "runs.parquet"), entries, swept,
                                  out_dir / "curves")
    atomic_write_table(out_dir / TABLE, pa.Table.from_pandas(table, preserve_index=False))
    atomic_write_bytes(out_dir / CSV, table.to_csv(index=False).encode())
    return summary_lines(table)


__all__ = ["Published", "parse_published", "measured_vs_published", "write_reference",
           "summary_lines", "quantile", "steps_per_epoch"]
