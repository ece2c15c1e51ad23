"""grokhpc.aggregate: tables read back with pyarrow and pandas, incremental rereads, damaged
runs, cross-run figures, and one real (tiny) training run."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from grokhpc import aggregate as agg
from grokhpc import figures, sweep_axes, sweep_figures
from grokhpc.config import RunConfig, to_dict
from grokhpc.figures import png_size
from grokhpc.store import RunDir, atomic_write_json, atomic_write_table

N_EPOCHS = 100
CKPT_EVERY = 10
EVAL_EVERY = 5
WDS = (0.3, 1.0)
TFS = (0.3, 0.5)
SEEDS = (1, 2, 3)


def grok_epoch_for(wd: float, tf: float, seed: int) -> int | None:
    """The synthetic truth: when this run reaches test accuracy 1 (None = never)."""
    if wd == 0.3 and tf == 0.3 and seed != 1:
        return None  # two of three seeds never grok: the median is censored
    return min(95, int(60 / wd / (tf / 0.3) / 2) // EVAL_EVERY * EVAL_EVERY + 5 * seed)


def make_run(sweep: Path, cfg: RunConfig, grok: int | None, *, finish: bool = True,
             extra: dict | None = None) -> Path:
    """A run directory as the trainer would leave it, written with the store helpers.

    ``extra``: config fields RunConfig does not have (yet), e.g. init_scale; the run then gets
    a run_id of its own, as a RunConfig holding them would."""
    run_id = cfg.run_id
    if extra:
        run_id = hashlib.sha256(json.dumps([run_id, extra], sort_keys=True).encode()).hexdigest()[:12]
    run = RunDir(sweep / "runs" / run_id)
    conf = {**to_dict(cfg), **(extra or {})}
    conf["run_id"] = run_id
    run.create(conf)
    ep = np.arange(cfg.n_epochs + 1)
    ev = ep % cfg.eval_every == 0
    g = grok if grok is not None else 10 ** 9
    test_acc = np.where(ep >= g, 1.0, 0.05)
    test_loss = np.where(ep >= g, 1e-3, 5.0 + ep / 100)
    run.write_curves({"epoch": ep, "train_loss": np.exp(-ep / 10.0), "train_acc": np.minimum(
        1.0, ep / 20), "test_loss": np.where(ev, test_loss, np.nan),
        "test_acc": np.where(ev, test_acc, np.nan)})
    ck = ep[:: cfg.checkpoint_every]
    run.write_progress({"run_id": run_id, "epoch": int(ep[-1]), "n_epochs": cfg.n_epochs,
                        "checkpoint_epochs": ck.tolist(), "layout": [], "wall_time_s": 1.5,
                        "device": "cpu", "done": finish, "updated": "2026-01-01T00:00:00Z"})
    rng = np.random.default_rng(cfg.data_seed)
    atomic_write_table(run.file("measures.parquet"), pa.table({
        "epoch": pa.array(ck, pa.int64()),
        "restricted_loss": pa.array(np.where(ck >= g, 1e-3, 3.0) + rng.random(len(ck)) * 1e-4),
        "excluded_loss": pa.array(np.where(ck >= g, 9.0, 0.5)),
        "gini_embed": pa.array(np.linspace(0.1, 0.8, len(ck))),
        "n_key_freqs": pa.array(np.full(len(ck), 3), pa.int64()),
        "weight_norm_sq": pa.array(weight_norm_sq(ck, g)),
        "cos_sim": pa.array([list(rng.random(5)) for _ in ck], pa.list_(pa.float64())),
    }))
    if finish:
        atomic_write_json(run.file("summary.json"), {
            "run_id": run_id, "grokked": grok is not None,
            "grokking_epoch": grok if grok is not None else cfg.n_epochs,
            "memorisation_end": 20, "circuit_formation_end": None if grok is None else grok - 5,
            "cleanup_end": None if grok is None else grok, "key_freqs": [1, 4],
            "final_train_loss": float(np.exp(-cfg.n_epochs / 10.0)),
            "final_test_loss": float(test_loss[-1]), "final_train_acc": 1.0,
            "final_test_acc": float(test_acc[-1]), "wall_time_s": 1.5})
    return run.path


def weight_norm_sq(epochs, grok: int) -> np.ndarray:
    """The synthetic truth of a run's sum of squared weights: 400 falling to 100 after grokking."""
    return np.where(epochs >= grok, 100.0, 400.0 - epochs)


def cfg_for(wd, tf, seed, **kw) -> RunConfig:
    return RunConfig(**{**dict(p=11, d_model=32, d_head=8, d_mlp=64, weight_decay=wd,
                               train_frac=tf, data_seed=seed, n_epochs=N_EPOCHS,
                               checkpoint_every=CKPT_EVERY, eval_every=EVAL_EVERY), **kw})


def make_sweep(root: Path, manifest: bool = True) -> dict[str, tuple]:
    truth = {}
    runs = []
    for wd in WDS:
        for tf in TFS:
            for s in SEEDS:
                cfg = cfg_for(wd, tf, s)
                g = grok_epoch_for(wd, tf, s)
                make_run(root, cfg, g)
                truth[cfg.run_id] = (wd, tf, s, g)
                runs.append({"run_id": cfg.run_id, "dir": f"runs/{cfg.run_id}",
                             "swept": {"weight_decay": wd, "train_frac": tf, "data_seed": s}})
    if manifest:
        atomic_write_json(root / "manifest.json",
                          {"runs": runs, "axes": ["weight_decay", "train_frac", "data_seed"]})
    return truth


@pytest.fixture()
def sweep(tmp_path):
    root = tmp_path / "sweep"
    return root, make_sweep(root)


# ---- tables -----------------------------------------------------------------------------------
def test_tables_hold_every_run_and_read_back_in_pyarrow_and_pandas(sweep):
    import pandas as pd

    root, truth = sweep
    res = agg.aggregate([root], formats=None, log=None)
    out = root / "aggregate"
    assert res.n_runs == res.n_read == 12
    assert res.swept == ["weight_decay", "train_frac", "data_seed"]
    n_never = sum(1 for v in truth.values() if v[3] is None)
    assert res.states == {"done": 12}

    runs = pq.read_table(out / "runs.parquet")
    sch = runs.schema
    for c in ("grokking_epoch", "memorisation_end", "circuit_formation_end", "cleanup_end",
              "epoch", "p", "data_seed", "n_epochs"):
        assert sch.field(c).type == pa.int64(), c
    for c in ("weight_decay", "train_frac", "final_test_loss", "wall_time_s"):
        assert sch.field(c).type == pa.float64(), c
    assert sch.field("key_freqs").type == pa.list_(pa.int64())
    assert sch.field("grokked").type == pa.bool_()
    assert json.loads(sch.metadata[b"grokhpc.swept"]) == res.swept

    df = pd.read_parquet(out / "runs.parquet", dtype_backend="numpy_nullable")
    assert str(df["circuit_formation_end"].dtype) == "Int64"  # ints with nulls stay ints
    assert df["circuit_formation_end"].isna().sum() == n_never
    for _, r in df.iterrows():
        wd, tf, s, g = truth[r["run_id"]]
        assert (r["weight_decay"], r["train_frac"], r["data_seed"]) == (wd, tf, s)
        # censored runs are done and did not grok: told apart by the grokked column
        assert (r["state"], r["grokked"]) == ("done", g is not None)
        assert r["grokking_epoch"] == (N_EPOCHS if g is None else g)
        assert list(r["key_freqs"]) == [1, 4]

    ck = pq.read_table(out / "checkpoints.parquet")
    n_ck = N_EPOCHS // CKPT_EVERY + 1
    assert ck.num_rows == 12 * n_ck
    assert ck.schema.field("epoch").type == pa.int64()
    assert ck.schema.field("n_key_freqs").type == pa.int64()
    assert ck.schema.field("cos_sim").type == pa.list_(pa.float64())
    ckdf = ck.to_pandas()
    for rid, (wd, tf, s, g) in truth.items():
        mine = ckdf[ckdf["run_id"] == rid]
        src = pq.read_table(root / "runs" / rid / "measures.parquet").to_pandas()
        assert mine["epoch"].tolist() == src["epoch"].tolist()
        assert np.array_equal(mine["restricted_loss"].to_numpy(), src["restricted_loss"].to_numpy())
        assert (mine["weight_decay"] == wd).all() and (mine["data_seed"] == s).all()
        assert [list(x) for x in mine["cos_sim"]] == [list(x) for x in src["cos_sim"]]

    curves = ds.dataset(out / "curves", format="parquet").to_table()
    assert curves.num_rows == 12 * (N_EPOCHS + 1)
    assert curves.schema.field("run_id").type == pa.string()
    cdf = pd.read_parquet(out / "curves")
    for rid in truth:
        src = RunDir(root / "runs" / rid).read_curves()
        mine = cdf[cdf["run_id"] == rid].sort_values("epoch")
        assert mine["epoch"].tolist() == src["epoch"].tolist()
        assert np.allclose(mine["test_loss"].to_numpy(), src["test_loss"].to_numpy(),
                           equal_nan=True)
    # nothing temporary left behind
    assert not [p for p in out.rglob(".*") if p.is_file()]


def test_swept_fields_inferred_without_manifest(tmp_path):
    root = tmp_path / "s"
    make_sweep(root, manifest=False)
    res = agg.aggregate([root], formats=None, log=None)
    assert sorted(res.swept) == sorted(["weight_decay", "train_frac", "data_seed"])


def test_incremental_rereads_only_changed_runs(sweep):
    root, truth = sweep
    out = root / "aggregate"
    assert agg.aggregate([root], formats=None, log=None).n_read == 12
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")}
    r2 = agg.aggregate([root], formats=None, log=None)
    assert r2.n_read == 0 and not r2.changed
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")} == before

    # rewrite one run's summary with another grokking epoch: exactly that run is reread
    rid = sorted(truth)[0]
    summ = json.loads((root / "runs" / rid / "summary.json").read_text())
    summ["grokking_epoch"] = 77
    summ["grokked"] = True
    time.sleep(0.01)
    atomic_write_json(root / "runs" / rid / "summary.json", summ)
    r3 = agg.aggregate([root], formats=None, log=None)
    assert r3.n_read == 1
    df = pq.read_table(out / "runs.parquet").to_pandas().set_index("run_id")
    assert df.loc[rid, "grokking_epoch"] == 77 and len(df) == 12
    assert pq.read_metadata(out / "checkpoints.parquet").num_rows == 12 * 11

    # touching (mtime only) also counts as a change of that one run
    os.utime(root / "runs" / sorted(truth)[1] / "config.json")
    assert agg.aggregate([root], formats=None, log=None).n_read == 1

    # a run that disappears leaves every table
    gone = sorted(truth)[2]
    import shutil

    shutil.rmtree(root / "runs" / gone)
    r4 = agg.aggregate([root], formats=None, log=None)
    assert r4.n_read == 0 and r4.n_runs == 11
    assert gone not in pq.read_table(out / "runs.parquet").column("run_id").to_pylist()
    assert gone not in set(pq.read_table(out / "checkpoints.parquet").column("run_id").to_pylist())
    assert not (out / "curves" / f"{gone}.parquet").exists()


def test_runs_killed_mid_write_are_reported_not_tabled(sweep):
    root, truth = sweep
    base = agg.aggregate([root], formats=None, log=None)
    assert base.messages == []
    # killed while training: progress.done false and a stray temporary file
    c1 = cfg_for(3.0, 0.5, 7)
    d1 = make_run(root, c1, 40, finish=False)
    (d1 / ".curves.parquet.abc123.tmp").write_bytes(b"PAR1 half")
    # trained, but killed before summary.json
    c2 = cfg_for(3.0, 0.5, 8)
    d2 = make_run(root, c2, 40, finish=False)
    prog = json.loads((d2 / "progress.json").read_text())
    prog["done"] = True
    atomic_write_json(d2 / "progress.json", prog)
    # a pending run (config only) and a failed one
    c3 = cfg_for(3.0, 0.5, 9)
    RunDir(root / "runs" / c3.run_id).create({**to_dict(c3), "run_id": c3.run_id})
    c4 = cfg_for(3.0, 0.5, 10)
    d4 = make_run(root, c4, None, finish=False)
    (d4 / "error.txt").write_text("Traceback ...\nRuntimeError: CUDA out of memory\n")

    res = agg.aggregate([root], formats=None, log=None)
    assert res.n_read == 4 and res.n_runs == 16
    by_id = {c.run_id: s for c, s in ((c1, "running"), (c2, "running"), (c3, "pending"),
                                      (c4, "failed"))}
    runs = pq.read_table(root / "aggregate" / "runs.parquet").to_pandas().set_index("run_id")
    for rid, state in by_id.items():
        assert runs.loc[rid, "state"] == state
        lines = [m for m in res.messages if rid in m]
        assert len(lines) == 1, (rid, res.messages)
    assert "CUDA out of memory" in next(m for m in res.messages if c4.run_id in m)
    assert ".curves.parquet.abc123.tmp" in next(m for m in res.messages if c1.run_id in m)
    assert "no summary.json" in next(m for m in res.messages if c2.run_id in m)
    # no partial rows: checkpoint and curve tables hold exactly the 12 finished runs
    ck_ids = set(pq.read_table(root / "aggregate" / "checkpoints.parquet")
                 .column("run_id").to_pylist())
    assert ck_ids == set(truth)
    assert {p.stem for p in (root / "aggregate" / "curves").glob("*.parquet")} == set(truth)

    # the interrupted run finishes: only it is reread, and it enters the tables
    os.unlink(d1 / ".curves.parquet.abc123.tmp")
    make_run(root, c1, 40, finish=True)
    res2 = agg.aggregate([root], formats=None, log=None)
    assert res2.n_read == 1
    assert c1.run_id in set(pq.read_table(root / "aggregate" / "checkpoints.parquet")
                            .column("run_id").to_pylist())
    assert not any(c1.run_id in m for m in res2.messages)
    # the CLI prints one line per unfinished run
    out = subprocess.run([sys.executable, "-m", "grokhpc.aggregate", str(root), "--no-figures"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for rid in (c2.run_id, c3.run_id, c4.run_id):
        assert sum(rid in ln for ln in out.stdout.splitlines()) == 1


def test_corrupt_files_name_the_run_and_leave_the_others(sweep):
    root, truth = sweep
    agg.aggregate([root], formats=None, log=None)
    bad, bad_cfg = sorted(truth)[3], sorted(truth)[4]
    f = root / "runs" / bad / "measures.parquet"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] + b"\0" * 64 + data[-200:])  # damaged middle
    (root / "runs" / bad_cfg / "config.json").write_text('{"p": 11, "run_id": ')
    res = agg.aggregate([root], formats=None, log=None)
    assert res.n_read == 2
    lines = [m for m in res.messages if bad in m]
    assert len(lines) == 1 and "corrupt" in lines[0] and "measures.parquet" in lines[0]
    lines = [m for m in res.messages if bad_cfg in m]
    assert len(lines) == 1 and "config.json" in lines[0]
    runs = pq.read_table(root / "aggregate" / "runs.parquet").to_pandas().set_index("run_id")
    assert runs.loc[bad, "state"] == "corrupt" and "measures.parquet" in runs.loc[bad, "error"]
    ck_ids = set(pq.read_table(root / "aggregate" / "checkpoints.parquet")
                 .column("run_id").to_pylist())
    assert ck_ids == set(truth) - {bad, bad_cfg}
    assert len(runs) == 12
    # repaired: back in the tables
    make_run(root, cfg_for(*truth[bad][:3]), truth[bad][3])
    res2 = agg.aggregate([root], formats=None, log=None)
    assert res2.n_read == 1 and not any(bad in m for m in res2.messages)


def test_non_utf8_manifest_and_progress_are_reported_not_raised(sweep):
    """Binary bytes where JSON belongs: the manifest is noted (runs found by the directory
    scan), the run is corrupt naming its file, every other run stays."""
    root, truth = sweep
    (root / "manifest.json").write_bytes(b"\xff\xfe\x00\x01")
    bad = sorted(truth)[5]
    (root / "runs" / bad / "progress.json").write_bytes(b"\xff\xfe\x00\x01")
    res = agg.aggregate([root], formats=None, log=None)
    assert any(n.startswith(f"{root / 'manifest.json'}: corrupt JSON") and
               "directory scan" in n for n in res.notes)
    assert res.n_runs == 12 and res.states == {"done": 11, "corrupt": 1}
    (line,) = [m for m in res.messages if bad in m]
    assert "corrupt" in line and "progress.json" in line


def test_combined_sweeps_on_the_command_line(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    make_run(a, cfg_for(1.0, 0.3, 1), 30)
    make_run(b, cfg_for(1.0, 0.3, 2), 35)
    make_run(b, cfg_for(1.0, 0.3, 1), 30)  # the same run in both sweeps: kept once
    out = subprocess.run([sys.executable, "-m", "grokhpc.aggregate", str(a), "--sweep", str(b),
                          "--no-figures"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    runs = pq.read_table(a / "aggregate" / "runs.parquet").to_pandas()
    assert sorted(runs["data_seed"]) == [1, 2]
    assert set(runs["sweep"]) == {str(a.resolve()), str(b.resolve())}
    assert "2 runs" in out.stdout and "appears in" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "grokhpc.aggregate", str(a), "--format", "gif"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "gif" in bad.stderr
    bad = subprocess.run([sys.executable, "-m", "grokhpc.aggregate", str(a), "--html-js", "cdn"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "argument --html-js: invalid choice: 'cdn'" in bad.stderr
    assert not (a / "aggregate" / "figures").exists()


def test_html_js_embed_makes_self_contained_figures_and_redraws(tmp_path):
    root = tmp_path / "s"
    for wd in WDS:
        make_run(root, cfg_for(wd, 0.3, 1), 30)
    cli = [sys.executable, "-m", "grokhpc.aggregate", str(root), "--format", "html"]
    assert subprocess.run(cli, capture_output=True, timeout=120).returncode == 0
    figdir = root / "aggregate" / "figures"
    light = (figdir / "grok_vs_weight_decay.html").stat().st_size
    js = (figdir / "plotly.min.js").stat().st_size
    out = subprocess.run(cli + ["--html-js", "embed"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr                  # no run changed, yet redrawn
    html = (figdir / "grok_vs_weight_decay.html").read_text()
    assert "plotly.js v" in html and not re.search(r"<script[^>]*\ssrc=", html)
    assert len(html.encode()) > js > 100 * light


# ---- figures ----------------------------------------------------------------------------------
DEFAULT_FIGURES = {"grok_vs_weight_decay", "grok_vs_train_frac", "phase_weight_decay_x_train_frac",
                   "test_loss_curves", "measures_aligned", "weight_norm_and_test_acc"}


def median_of(gs: list) -> int:
    """The median grokking epoch of an odd number of seeds, a run that never grokked (None)
    counting as later than any that did; a median that never grokked is drawn at the last
    epoch."""
    m = sorted(math.inf if g is None else g for g in gs)[(len(gs) - 1) // 2]
    return N_EPOCHS if m == math.inf else m


def figures_of(root: Path, swept: list[str], pairs=()):
    runs = pq.read_table(root / "aggregate" / "runs.parquet")
    ck = pq.read_table(root / "aggregate" / "checkpoints.parquet")
    return sweep_figures.cross_run_figures(runs, ck, root / "aggregate" / "curves", swept, pairs)


def joined(trace) -> list[np.ndarray]:
    """The runs' lines of a trace that joins them with NaN gaps."""
    y = np.asarray(trace.y, dtype=float)
    cuts = np.flatnonzero(np.isnan(y))
    parts = [part[~np.isnan(part)] for part in np.split(y, cuts)]
    return [part for part in parts if len(part)]


def test_cross_run_figures_medians_and_files(sweep, chromium):
    root, truth = sweep
    res = agg.aggregate([root], formats=("png", "html"), log=None)
    figdir = root / "aggregate" / "figures"
    assert set(res.figures) == DEFAULT_FIGURES
    # the HTML files share the folder's one plotly.js, loaded by its relative name
    assert "plotly.js v" in (figdir / "plotly.min.js").read_text()[:500]
    assert sorted(figdir.glob("*.js")) == [figdir / "plotly.min.js"]
    for n in DEFAULT_FIGURES:
        w, h = png_size((figdir / f"{n}.png").read_bytes())
        assert w >= 1500 and h >= 900, (n, w, h)  # paper size x scale 3
        html = (figdir / f"{n}.html").read_text()
        assert re.findall(r"<script[^>]*\ssrc=\"([^\"]*)\"", html) == ["plotly.min.js"], n
        assert "plotly.js v" not in html and "Plotly.newPlot" in html, n

    # the medians drawn are the medians over seeds computed here from the truth
    figs, notes = figures_of(root, res.swept)
    assert notes == []
    fig = figs["grok_vs_weight_decay"]
    for tf in TFS:
        tr = next(t for t in fig.data if t.name == f"{tf:g}")
        for xv, y in zip(tr.x, tr.y):
            wd = min(WDS, key=lambda w: abs(np.log(w / xv)))
            assert abs(np.log10(wd / xv)) < 0.03  # only dodged a little off its value
            assert y == median_of([v[3] for v in truth.values() if v[:2] == (wd, tf)])
    # 0.3 to 1.0 spans less than a decade: a linear axis
    assert fig.layout.xaxis.type == "linear" and "weight decay" in fig.layout.xaxis.title.text
    assert fig.layout.legend.title.text == "train_frac"
    # censored runs drawn as their own markers at the last epoch
    cens = [t for t in fig.data if t.marker.symbol == "triangle-up-open" and t.showlegend is False]
    assert sum(len(t.x) for t in cens) == sum(1 for v in truth.values() if v[3] is None)
    # the other axis: series by weight decay, linear (0.3 to 0.5 is less than a decade)
    assert figs["grok_vs_train_frac"].layout.legend.title.text == "weight_decay"
    assert figs["grok_vs_train_frac"].layout.xaxis.type == "linear"
    # the phase diagram marks the cell whose median run never grokked, with k/n grokked
    ph = figs["phase_weight_decay_x_train_frac"]
    never = next(t for t in ph.data if t.name == "median run never grokked")
    assert list(zip(never.x, never.y)) == [("0.3", "0.3")]
    assert [a.text for a in ph.layout.annotations] == ["1/3 grokked"]
    hm = ph.data[0]
    assert np.isclose(10 ** hm.z[TFS.index(0.5)][WDS.index(1.0)],
                      median_of([v[3] for v in truth.values() if v[:2] == (1.0, 0.5)]))


def test_weight_norm_view_draws_each_runs_norm_on_a_log_epoch_axis(sweep):
    root, truth = sweep
    res = agg.aggregate([root], formats=None, log=None)
    fig = figures_of(root, res.swept)[0]["weight_norm_and_test_acc"]
    assert fig.layout.xaxis.type == fig.layout.xaxis2.type == "log"
    assert fig.layout.legend.title.text == "weight_decay"    # coloured by the swept value
    for wd in WDS:
        norm, acc = [t for t in fig.data if t.name == f"{wd:g}"]
        assert norm.xaxis == "x" and acc.xaxis == "x2" and acc.showlegend is False
        ids = sorted(rid for rid, v in truth.items() if v[0] == wd)
        ck = np.arange(CKPT_EVERY, N_EPOCHS + 1, CKPT_EVERY)       # epoch 0 has no log
        want = [np.sqrt(weight_norm_sq(ck, truth[r][3] or 10 ** 9)) for r in ids]
        got = joined(norm)
        assert len(got) == len(ids)
        assert sorted(map(tuple, got)) == sorted(map(tuple, want))
        # test accuracy at the evaluated epochs: 1 from the grokking epoch on
        assert {tuple(np.unique(a)) for a in joined(acc)} <= {(0.05,), (0.05, 1.0)}


def test_figures_of_axes_that_did_not_vary_are_skipped(tmp_path, chromium):
    root = tmp_path / "s"
    for s in (1, 2):
        make_run(root, cfg_for(1.0, 0.3, s), 30 + s)
    lines: list[str] = []
    res = agg.aggregate([root], formats=("png",), log=lines.append)
    assert set(res.figures) == {"test_loss_curves", "measures_aligned", "weight_norm_and_test_acc"}
    skipped = [n for n in res.notes if "skipped" in n]
    assert len(skipped) == 2, skipped
    assert any(n.startswith("grok_vs_") and "other than the seeds" in n for n in skipped)
    assert any("phase_weight_decay_x_train_frac skipped: weight_decay and train_frac did not "
               "vary" in n for n in skipped)
    # a second call with nothing changed neither reads nor redraws
    res2 = agg.aggregate([root], formats=("png",), log=None)
    assert res2.n_read == 0 and res2.figures == {}
    assert any("up to date" in n for n in res2.notes)


def one_axis_sweep(root: Path, field: str, values: list) -> dict[str, tuple]:
    """Runs over one field x three seeds; the second value's median run never groks. Fields
    RunConfig lacks (init_scale) go into config.json as extra fields."""
    truth = {}
    for i, v in enumerate(values):
        for s in SEEDS:
            g = None if i == 1 and s != 1 else 20 + 15 * i + 5 * s
            if field in RunConfig.__dataclass_fields__:
                d = make_run(root, cfg_for(1.0, 0.5, s, **{field: v}), g)
            else:
                d = make_run(root, cfg_for(1.0, 0.5, s), g, extra={field: v})
            truth[d.name] = (v, s, g)
    return truth


@pytest.mark.parametrize("field, values, kind", [
    ("p", [11, 13, 17], "linear"),
    ("lr", [1e-4, 1e-3, 1e-2], "log"),
    ("init_scale", [0.5, 1.0, 2.0, 5.0, 10.0], "log"),   # not a RunConfig field yet
    ("op", ["add", "sub", "mul"], "category"),
])
def test_grokking_epoch_against_any_swept_field(tmp_path, field, values, kind):
    root = tmp_path / field
    truth = one_axis_sweep(root, field, values)
    res = agg.aggregate([root], formats=None, log=None)     # no manifest: swept is inferred
    assert sorted(res.swept) == sorted([field, "data_seed"])
    figs, notes = figures_of(root, res.swept)
    assert [n for n in figs if n.startswith("grok_vs_")] == [f"grok_vs_{field}"]
    fig = figs[f"grok_vs_{field}"]
    med = next(t for t in fig.data if t.name == "median")
    order = sorted(values)                                  # categories: add, mul, sub
    for i, v in enumerate(order):
        at = i if kind == "category" else v
        y = dict(zip(med.x, med.y))[at]
        assert y == median_of([g for (w, s, g) in truth.values() if w == v])
    if kind == "category":
        assert list(fig.layout.xaxis.ticktext) == order
        assert list(fig.layout.xaxis.tickvals) == [0, 1, 2]
        # points, never a line from one category to the next; each grokked run is a point
        assert [t.mode for t in fig.data if "lines" in (t.mode or "")] == []
        each = next(t for t in fig.data if t.name == "median: each run")
        assert sorted(zip(each.x, each.y)) == sorted(
            (order.index(w), g) for (w, s, g) in truth.values() if g is not None)
        for i, v in enumerate(order):              # the spread: min-max bars on the median
            gs = [N_EPOCHS if g is None else g for (w, s, g) in truth.values() if w == v]
            m, j = median_of([g for (w, s, g) in truth.values() if w == v]), list(med.x).index(i)
            assert (med.error_y.arrayminus[j], med.error_y.array[j]) == (m - min(gs), max(gs) - m)
    else:
        assert fig.layout.xaxis.type == kind
        assert med.mode == "lines+markers"       # a numeric axis keeps its line
        assert not any("each run" in t.name for t in fig.data if t.name)
    # the value whose median run never grokked is drawn open, its two censored runs as triangles
    opened = next(t for t in fig.data if t.marker.color == "white" and t.showlegend is False)
    assert list(opened.x) == [order.index(values[1]) if kind == "category" else values[1]]
    cens = next(t for t in fig.data if t.marker.symbol == "triangle-up-open" and t.showlegend is False)
    assert len(cens.x) == 2 and set(cens.y) == {N_EPOCHS}
    assert not any(n.startswith(f"grok_vs_{field} skipped") for n in notes)


def test_a_text_axis_is_points_and_a_numeric_axis_keeps_its_lines(tmp_path):
    root = tmp_path / "op_wd"
    for op in ("add", "sub"):
        for wd in WDS:
            for s in (1, 2):
                make_run(root, cfg_for(wd, 0.5, s, op=op), 20 + 5 * s + 30 * (op == "sub"))
    res = agg.aggregate([root], formats=None, log=None)
    figs, _ = figures_of(root, res.swept)
    by_op, by_wd = figs["grok_vs_op"], figs["grok_vs_weight_decay"]
    # op on x, one series per weight decay: no trace draws a line
    assert [t.mode for t in by_op.data] == ["markers"] * 5
    assert [t.name for t in by_op.data] == ["0.3", "0.3: each run", "1", "1: each run",
                                            "each run (grokked)"]
    # weight decay on x, one series per op: each series is still a line over weight decay
    assert [(t.name, t.mode) for t in by_wd.data] == [("add", "lines+markers"),
                                                      ("sub", "lines+markers")]


def test_a_field_zipped_with_an_axis_is_not_called_pooled_and_long_titles_wrap(tmp_path):
    """optimizer zipped with weight_decay, both swept with train_frac: a grok_vs figure whose
    series is one of the pair is not 'pooled over' the other (each series holds one value of
    it); train_frac, which varies within each series, still is. A title wider than the figure
    is cut in two at its parenthesis, each line within the width at the title's font size."""
    root = tmp_path / "zipped"
    for opt, wd in (("adam", 0.0), ("adamw", 1.0)):
        for tf in (0.3, 0.5):
            for s in (1, 2):
                make_run(root, cfg_for(wd, tf, s, optimizer=opt), 20 + 5 * s + 30 * (wd == 0))
    res = agg.aggregate([root], formats=None, log=None)
    figs, _ = figures_of(root, res.swept)
    titles = {n: f.layout.title.text.replace("<br>", " ") for n, f in figs.items()}
    assert "pooled" not in titles["grok_vs_train_frac"], titles["grok_vs_train_frac"]
    assert "pooled over train_frac" in titles["grok_vs_weight_decay"] + titles["grok_vs_optimizer"]
    for n, f in figs.items():
        for line in f.layout.title.text.split("<br>"):
            assert len(line) * 0.6 * figures.TITLE_SIZE <= f.layout.width, (n, line)
    long = "Grokking time vs train_frac (median, min–max over model_seed; pooled over weight_decay)"
    head, tail = figures.wrap_title(long, 720).split("<br>")
    assert head == "Grokking time vs train_frac" and tail.startswith("(median")
    assert figures.wrap_title("Test loss of 4 runs", 720) == "Test loss of 4 runs"


SPEC = """
description: lr x weight decay
base: {p: 11, d_model: 32, d_head: 8, d_mlp: 64, n_epochs: 100, checkpoint_every: 10,
       eval_every: 5}
grid:
  lr: [1.0e-3, 1.0e-2]
  weight_decay: [0.1, 1.0]
  data_seed: [1, 2, 3]
figures:
  phase: [lr, weight_decay]
"""


def lr_wd_grok(lr: float, wd: float, seed: int) -> int | None:
    """The synthetic truth: faster with more of either; the slow corner groks once in three."""
    if (lr, wd) == (1e-3, 0.1) and seed != 1:
        return None
    return {(1e-3, 0.1): 80, (1e-3, 1.0): 60, (1e-2, 0.1): 40, (1e-2, 1.0): 20}[lr, wd] + 5 * seed


def test_phase_diagram_over_the_pair_the_spec_names(tmp_path):
    from grokhpc.scheduler import new_manifest as manifest_base
    from grokhpc.sweep import parse_sweep

    root = tmp_path / "lr_wd"
    sw = parse_sweep(SPEC, "lr_wd.yaml", cwd=tmp_path, spec_path=tmp_path / "lr_wd.yaml")
    assert sw.phase_pairs == (("lr", "weight_decay"),)
    truth = {}
    for r in sw.runs:
        g = lr_wd_grok(r.config.lr, r.config.weight_decay, r.config.data_seed)
        make_run(root, r.config, g)
        truth[r.run_id] = (r.config.lr, r.config.weight_decay, g)
    atomic_write_json(root / "manifest.json", manifest_base(sw, sw.launcher, None))
    res = agg.aggregate([root], formats=("html",), log=None)
    assert set(res.figures) == {"grok_vs_lr", "grok_vs_weight_decay", "phase_lr_x_weight_decay",
                                "test_loss_curves", "measures_aligned", "weight_norm_and_test_acc"}
    figs, _ = figures_of(root, res.swept, [("lr", "weight_decay")])
    ph = figs["phase_lr_x_weight_decay"]
    hm = ph.data[0]
    assert list(hm.x) == ["0.001", "0.01"] and list(hm.y) == ["0.1", "1"]
    for i, wd in enumerate((0.1, 1.0)):
        for j, lr in enumerate((1e-3, 1e-2)):
            m = median_of([g for (a, b, g) in truth.values() if (a, b) == (lr, wd)])
            if (lr, wd) == (1e-3, 0.1):
                assert np.isnan(hm.z[i][j])                 # never grokked: a cross instead
            else:
                assert np.isclose(10 ** hm.z[i][j], m)
    assert [a.text for a in ph.layout.annotations] == ["1/3 grokked"]
    assert "learning rate" in ph.layout.xaxis.title.text
    assert figs["grok_vs_lr"].layout.legend.title.text == "weight_decay"

    # a pair added to the manifest later redraws (no run changed); a field that did not vary
    # is skipped with one line, and the figure files of a dropped pair are removed
    man = json.loads((root / "manifest.json").read_text())
    man["figures"]["phase"] = [["weight_decay", "lr"], ["lr", "p"]]
    atomic_write_json(root / "manifest.json", man)
    res2 = agg.aggregate([root], formats=("html",), log=None)
    assert res2.n_read == 0 and "phase_weight_decay_x_lr" in res2.figures
    assert [n for n in res2.notes if "skipped" in n] == ["phase_lr_x_p skipped: p did not vary"]
    figdir = root / "aggregate" / "figures"
    assert not (figdir / "phase_lr_x_weight_decay.html").exists()


@pytest.mark.parametrize("figures, error", [
    ("{phase: [lr, p]}", "lr_wd.yaml: figures.phase: p: not a swept axis (swept: lr, "
                         "weight_decay, data_seed)"),
    ("{phase: [lr]}", "lr_wd.yaml: figures.phase: expected two different swept axes"),
    ("{phase: [lr, lr]}", "lr_wd.yaml: figures.phase: expected two different swept axes"),
    ("{bars: [lr]}", "lr_wd.yaml: figures.bars: unknown key (expected one of phase)"),
    ("[lr, weight_decay]", "lr_wd.yaml: figures: expected a mapping"),
])
def test_spec_figures_errors_are_one_line(figures, error):
    from grokhpc.config import ConfigError
    from grokhpc.sweep import parse_sweep

    text = SPEC.replace("figures:\n  phase: [lr, weight_decay]", f"figures: {figures}")
    with pytest.raises(ConfigError) as e:
        parse_sweep(text, "lr_wd.yaml")
    assert str(e.value).startswith(error) and "\n" not in str(e.value)


# ---- defects seen while reading ------------------------------------------------------------------
def test_damaged_previous_checkpoint_table_is_rebuilt_and_said(sweep):
    root, truth = sweep
    agg.aggregate([root], formats=None, log=None)
    (root / "aggregate" / "checkpoints.parquet").write_bytes(b"PAR1 not a table PAR1")
    summ = root / "runs" / sorted(truth)[0] / "summary.json"
    os.utime(summ, ns=(summ.stat().st_atime_ns, summ.stat().st_mtime_ns + 10**9))
    res = agg.aggregate([root], formats=None, log=None)
    said = [n for n in res.notes if "checkpoints.parquet" in n]
    assert len(said) == 1 and "unreadable" in said[0] and "rebuilt from all runs" in said[0]
    assert res.n_read == 12
    ck_ids = set(pq.read_table(root / "aggregate" / "checkpoints.parquet")
                 .column("run_id").to_pylist())
    assert ck_ids == set(truth)


def test_failed_run_reports_the_exception_line_not_the_hints_after_it(tmp_path):
    root = tmp_path / "s"
    d = make_run(root, cfg_for(1.0, 0.3, 1), None, finish=False)
    (d / "error.txt").write_text(
        "Traceback (most recent call last):\n  File \"train.py\", line 1, in <module>\n"
        "RuntimeError: CUDA error: device-side assert triggered\n"
        "CUDA kernel errors might be asynchronously reported at some other API call.\n"
        "For debugging consider passing CUDA_LAUNCH_BLOCKING=1\n"
        "Compile with `TORCH_USE_CUDA_DSA` to enable device-side assertions.\n\n")
    res = agg.aggregate([root], formats=None, log=None)
    row = pq.read_table(root / "aggregate" / "runs.parquet").to_pylist()[0]
    assert row["state"] == "failed"
    assert row["error"] == "RuntimeError: CUDA error: device-side assert triggered"
    assert res.messages == [f"{d.name} (runs/{d.name}): failed: {row['error']}"]


# ---- the real trainer ---------------------------------------------------------------------------
def test_reads_what_the_trainer_writes(tmp_path):
    from grokhpc.train import run_training

    cfg = RunConfig(p=11, d_model=32, d_head=8, n_heads=4, d_mlp=64, n_epochs=80,
                    checkpoint_every=20, eval_every=10, train_frac=0.5, device="cpu")
    root = tmp_path / "real"
    run = run_training(cfg, root / "runs" / cfg.run_id, progress_bar=False, log=lambda *a: None)
    res = agg.aggregate([root], formats=None, log=None)
    assert res.n_runs == 1 and res.messages == []
    summary = run.read_summary()
    prog = run.read_progress()
    row = pq.read_table(root / "aggregate" / "runs.parquet").to_pylist()[0]
    assert row["run_id"] == cfg.run_id and row["p"] == 11 and row["d_model"] == 32
    assert (row["state"], row["grokked"]) == ("done", summary["grokked"])
    assert row["grokking_epoch"] == summary["grokking_epoch"]
    assert row["epoch"] == 80 and row["n_checkpoints"] == len(prog["checkpoint_epochs"])
    ck = pq.read_table(root / "aggregate" / "checkpoints.parquet")
    src = pq.read_table(run.file("measures.parquet"))
    assert ck.num_rows == src.num_rows == len(prog["checkpoint_epochs"])
    assert set(src.column_names) <= set(ck.column_names)
    assert ck.column("epoch").to_pylist() == prog["checkpoint_epochs"]
    curves = pq.read_table(root / "aggregate" / "curves" / f"{cfg.run_id}.parquet")
    assert curves.num_rows == 81 and curves.column("epoch").to_pylist() == list(range(81))
    assert np.allclose(curves.column("train_loss").to_numpy(),
                       run.read_curves()["train_loss"].to_numpy())
    # provenance: the environment of the run's (latest) attempt, one column each
    import platform
    import socket

    from grokhpc.runtime import provenance_columns

    assert row["host"] == socket.gethostname() and row["python_version"] == \
        platform.python_version() and row["n_attempts"] == 1
    assert {k: row[k] for k in provenance_columns(prog)} == provenance_columns(prog)
    # checkpoint rows cut short: the run is listed as corrupt, every other run is kept
    other = cfg_for(1.0, 0.3, 1)
    make_run(root, other, 30)
    os.truncate(run.file("checkpoints.npy"), 5000)
    res = agg.aggregate([root], formats=None, log=None)
    runs = pq.read_table(root / "aggregate" / "runs.parquet").to_pandas().set_index("run_id")
    assert runs.loc[cfg.run_id, "state"] == "corrupt"
    # 5 rows (epochs 0-80) of 9,259 float32s: 5,000 bytes hold none of them whole
    assert runs.loc[cfg.run_id, "error"].startswith("checkpoints.npy: rows 0-4 of 5 damaged")
    assert [m for m in res.messages if cfg.run_id in m and "checkpoints.npy: rows" in m]
    assert runs.loc[other.run_id, "state"] == "done" and len(runs) == 2
    ck = pq.read_table(root / "aggregate" / "checkpoints.parquet")
    assert set(ck.column("run_id").to_pylist()) == {other.run_id}


def test_import_and_help_are_light():
    code = ("import sys, grokhpc.aggregate; "
            "print(sorted(m for m in ('torch', 'plotly', 'kaleido', 'transformer_lens', "
            "'pyarrow', 'pandas') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
    h = subprocess.run([sys.executable, "-m", "grokhpc.aggregate", "--help"],
                       capture_output=True, text=True)
    assert h.returncode == 0 and "--sweep" in h.stdout and "--format" in h.stdout


# ---- the documented example ---------------------------------------------------------------------
def test_docs_example_reproduces_the_medians_from_the_tables_alone(sweep, tmp_path):
    root, truth = sweep
    agg.aggregate([root], formats=None, log=None)
    doc = (Path(__file__).resolve().parents[1] / "docs" / "tables.md").read_text()
    code = re.search(r"```python\n(.*?)```", doc, re.S).group(1)
    script = tmp_path / "grok_vs_wd.py"
    script.write_text(code)
    html = tmp_path / "fig.html"
    assert "grokhpc" not in code  # the tables alone (pandas, numpy, plotly) are enough
    out = subprocess.run([sys.executable, str(script), str(root / "aggregate"), str(html)],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    for tf in TFS:
        line = next(ln for ln in out.stdout.splitlines() if ln.startswith(f"train_frac={tf:g}:"))
        for wd in WDS:
            gs = [v[3] for v in truth.values() if v[:2] == (wd, tf)]
            med = N_EPOCHS if sum(g is None for g in gs) >= 2 else sorted(gs)[1]
            assert f"wd={wd:g}: {med}" in line, (line, wd, med)
    assert "plotly.js v" in html.read_text()


def test_log_axis_ticks_are_labelled_one_two_five():
    assert sweep_axes.nice_ticks(150, 6000) == [200, 500, 1000, 2000, 5000]
    # a range narrower than one 1-2-5 step: every digit
    assert sweep_axes.nice_ticks(1250, 6000) == [2000, 3000, 4000, 5000, 6000]
    assert sweep_axes.nice_ticks(0, 10) == []


def test_runs_with_the_newer_fields_aggregate_with_their_types(tmp_path):
    """batch_size is 'full' or an integer, stop_after_grok off or an integer, S5 runs have no
    p: runs.parquet keeps each in one typed column."""
    from grokhpc.config import from_dict

    SMALL = dict(p=11, d_model=32, d_head=8, d_mlp=64, n_epochs=N_EPOCHS,
                 checkpoint_every=CKPT_EVERY, eval_every=EVAL_EVERY)
    sweep = tmp_path / "sweep"
    cfgs = [from_dict({**SMALL, "batch_size": 16}), from_dict({**SMALL, "stop_after_grok": 5}),
            from_dict({**{k: v for k, v in SMALL.items() if k != "p"}, "op": "s5",
                       "optimizer": "sgd", "fixed_weight_norm": True})]
    for cfg in cfgs:
        make_run(sweep, cfg, grok=40)
    res = agg.aggregate([sweep], formats=None, log=None)
    assert res.n_runs == 3 and res.states == {"done": 3}
    t = pq.read_table(sweep / "aggregate" / "runs.parquet")
    assert str(t.schema.field("batch_size").type) == "string"
    assert str(t.schema.field("stop_after_grok").type) == "int64"
    assert str(t.schema.field("fixed_weight_norm").type) == "bool"
    rows = {r["run_id"]: r for r in t.to_pylist()}
    got = [(rows[c.run_id]["batch_size"], rows[c.run_id]["stop_after_grok"], rows[c.run_id]["p"],
            rows[c.run_id]["op"]) for c in cfgs]
    assert got == [("16", None, SMALL["p"], "sub"), ("full", 5, SMALL["p"], "sub"),
                   ("full", None, None, "s5")]


# ---- bad inputs and a file system that fails: one line, nothing damaged ------------------------
def _cli(*args, preexec=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "grokhpc.aggregate", *map(str, args)],
                          capture_output=True, text=True, timeout=300, preexec_fn=preexec)


def test_a_directory_without_runs_is_refused_and_left_untouched(tmp_path):
    """An empty directory and a run directory got empty tables (aggregate/ written into them)
    and exit 1: now one line, exit 1, nothing written."""
    empty = tmp_path / "empty"
    empty.mkdir()
    run = make_run(tmp_path / "s", cfg_for(1.0, 0.3, 1), 30)
    for d, why in ((empty, ""),
                   (run, f"; it is a run directory: open it with grokhpc.open_run, draw its "
                         f"figures with python -m grokhpc.analyze {run}")):
        before = sorted(p.name for p in d.iterdir())
        r = _cli(d, "--no-figures")
        assert (r.returncode, r.stdout) == (1, "")
        assert r.stderr == f"aggregate: {d}: no run directories (folders with config.json) " \
                           f"in it{why}\n"
        assert sorted(p.name for p in d.iterdir()) == before


def test_out_naming_a_file_is_one_line(sweep, tmp_path):
    root, _ = sweep
    f = tmp_path / "tables.parquet"
    f.write_bytes(b"keep")
    for out, got in ((f, "an existing file"), (f / "sub", f"a path under the file {f}")):
        r = _cli(root, "--out", out, "--no-figures")
        assert (r.returncode, r.stdout) == (2, "")
        assert r.stderr == f"aggregate: --out {out}: expected a directory, got {got}\n"
    assert f.read_bytes() == b"keep" and not (root / "aggregate").exists()


def test_a_full_disk_keeps_the_previous_tables_whole(sweep):
    """``aggregate --force`` with its folder on a full disk (tests/fs_faults.py): one line,
    exit 1, the previous tables byte for byte and no temporary file left; the advice (free
    space, the same command again) writes them."""
    from fs_faults import full_disk

    root, truth = sweep
    out = root / "aggregate"
    assert _cli(root, "--no-figures").returncode == 0
    before = {p.name: p.read_bytes() for p in out.glob("*.parquet")}
    assert sorted(before) == ["checkpoints.parquet", "runs.parquet"]
    with full_disk(out) as (free, code, preexec):
        r = _cli(root, "--no-figures", "--force", preexec=preexec)
        assert (r.returncode, r.stderr.count("\n")) == (1, 1), r.stderr
        assert r.stderr.startswith(f"aggregate: {out}")
        assert r.stderr.endswith(f": {os.strerror(code)}; no table was left half-written; "
                                 "free some space and run the same command again\n")
        assert {p.name: p.read_bytes() for p in out.glob("*.parquet")} == before
        assert not list(out.rglob(".*.tmp"))
        free()
        r = _cli(root, "--no-figures", "--force", preexec=preexec)
        assert r.returncode == 0, r.stderr
        runs = pq.read_table(out / "runs.parquet").to_pandas()
        assert sorted(runs["run_id"]) == sorted(truth) and set(runs["state"]) == {"done"}
        assert pq.read_table(out / "checkpoints.parquet").num_rows == \
            len(truth) * (N_EPOCHS // CKPT_EVERY + 1)


def test_a_sweep_that_cannot_be_written_says_to_use_out(sweep, tmp_path):
    """A read-only sweep: one line naming the folder, and the advice (--out DIR) works."""
    from fs_faults import read_only

    root, truth = sweep
    with read_only(root, tmp_path / "ro") as (ro, code):
        r = _cli(ro, "--no-figures")
        assert (r.returncode, r.stdout) == (1, "")
        assert r.stderr == (f"aggregate: {ro / 'aggregate'}: {os.strerror(code)}; no table was "
                            "left half-written; write them elsewhere with --out DIR\n")
        r = _cli(ro, "--no-figures", "--out", tmp_path / "tables")
        assert r.returncode == 0, r.stderr
    runs = pq.read_table(tmp_path / "tables" / "runs.parquet").to_pandas()
    assert sorted(runs["run_id"]) == sorted(truth)
