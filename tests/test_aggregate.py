"""grokhpc.aggregate: tables read back with pyarrow and pandas, incremental rereads, damaged
runs, cross-run figures, and one real (tiny) training run."""

from __future__ import annotations

import json
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


def make_run(sweep: Path, cfg: RunConfig, grok: int | None, *, finish: bool = True) -> Path:
    """A run directory as the trainer would leave it, written with the store helpers."""
    run = RunDir(sweep / "runs" / cfg.run_id)
    conf = to_dict(cfg)
    conf["run_id"] = cfg.run_id
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
    run.write_progress({"run_id": cfg.run_id, "epoch": int(ep[-1]), "n_epochs": cfg.n_epochs,
                        "checkpoint_epochs": ck.tolist(), "layout": [], "wall_time_s": 1.5,
                        "device": "cpu", "done": finish, "updated": "2026-01-01T00:00:00Z"})
    rng = np.random.default_rng(cfg.data_seed)
    atomic_write_table(run.file("measures.parquet"), pa.table({
        "epoch": pa.array(ck, pa.int64()),
        "restricted_loss": pa.array(np.where(ck >= g, 1e-3, 3.0) + rng.random(len(ck)) * 1e-4),
        "excluded_loss": pa.array(np.where(ck >= g, 9.0, 0.5)),
        "gini_embed": pa.array(np.linspace(0.1, 0.8, len(ck))),
        "n_key_freqs": pa.array(np.full(len(ck), 3), pa.int64()),
        "cos_sim": pa.array([list(rng.random(5)) for _ in ck], pa.list_(pa.float64())),
    }))
    if finish:
        atomic_write_json(run.file("summary.json"), {
            "run_id": cfg.run_id, "grokked": grok is not None,
            "grokking_epoch": grok if grok is not None else cfg.n_epochs,
            "memorisation_end": 20, "circuit_formation_end": None if grok is None else grok - 5,
            "cleanup_end": None if grok is None else grok, "key_freqs": [1, 4],
            "final_train_loss": float(np.exp(-cfg.n_epochs / 10.0)),
            "final_test_loss": float(test_loss[-1]), "final_train_acc": 1.0,
            "final_test_acc": float(test_acc[-1]), "wall_time_s": 1.5})
    return run.path


def cfg_for(wd, tf, seed, **kw) -> RunConfig:
    return RunConfig(p=11, d_model=32, d_head=8, d_mlp=64, weight_decay=wd, train_frac=tf,
                     data_seed=seed, n_epochs=N_EPOCHS, checkpoint_every=CKPT_EVERY,
                     eval_every=EVAL_EVERY, **kw)


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
    assert res.states == {"done": 12 - n_never, "censored": n_never}

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
        assert r["state"] == ("censored" if g is None else "done")
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


# ---- figures ----------------------------------------------------------------------------------
def test_cross_run_figures_medians_and_files(sweep):
    root, truth = sweep
    res = agg.aggregate([root], formats=("png", "html"), log=None)
    figdir = root / "aggregate" / "figures"
    names = {"grok_vs_weight_decay", "grok_vs_train_frac", "phase_diagram", "test_loss_curves",
             "measures_aligned"}
    assert set(res.figures) == names
    for n in names:
        w, h = png_size((figdir / f"{n}.png").read_bytes())
        assert w >= 1500 and h >= 900, (n, w, h)  # paper size x scale 3
        html = (figdir / f"{n}.html").read_text()
        assert "plotly.js v" in html and not re.search(r"<script[^>]+src=[\"']?https?:", html)

    # the medians drawn are the medians over seeds computed here from the truth
    runs = pq.read_table(root / "aggregate" / "runs.parquet")
    ck = pq.read_table(root / "aggregate" / "checkpoints.parquet")
    figs, notes = agg.cross_run_figures(runs, ck, root / "aggregate" / "curves", res.swept)
    fig = figs["grok_vs_weight_decay"]
    for tf in TFS:
        tr = next(t for t in fig.data if t.name == f"{tf:g}")
        for xv, y in zip(tr.x, tr.y):
            wd = min(WDS, key=lambda w: abs(np.log(w / xv)))
            assert abs(np.log10(wd / xv)) < 0.03  # only dodged a little off its value
            gs = [truth_g for (w, t, s, truth_g) in truth.values() if w == wd and t == tf]
            if sum(g is None for g in gs) >= 2:  # median run never grokked: drawn at last epoch
                assert y == N_EPOCHS
            else:
                assert y == sorted(gs)[1]
    assert fig.layout.xaxis.type == "log" and "weight decay" in fig.layout.xaxis.title.text
    assert fig.layout.legend.title.text == "train_frac"
    # censored runs drawn as their own markers at the last epoch
    cens = [t for t in fig.data if t.marker.symbol == "triangle-up-open" and t.showlegend is False]
    assert sum(len(t.x) for t in cens) == sum(1 for v in truth.values() if v[3] is None)
    # the phase diagram marks the cell whose median run never grokked
    ph = figs["phase_diagram"]
    never = next(t for t in ph.data if t.name == "median run never grokked")
    assert list(zip(never.x, never.y)) == [("0.3", "0.3")]
    hm = ph.data[0]
    assert np.isclose(10 ** hm.z[TFS.index(0.5)][WDS.index(1.0)],
                      sorted(v[3] for v in truth.values() if v[:2] == (1.0, 0.5))[1])
    assert notes == []


def test_figures_of_axes_that_did_not_vary_are_skipped(tmp_path):
    root = tmp_path / "s"
    for s in (1, 2):
        make_run(root, cfg_for(1.0, 0.3, s), 30 + s)
    lines: list[str] = []
    res = agg.aggregate([root], formats=("png",), log=lines.append)
    assert set(res.figures) == {"test_loss_curves", "measures_aligned"}
    skipped = [n for n in res.notes if "skipped" in n]
    assert len(skipped) == 3 and any("weight_decay did not vary" in n for n in skipped)
    # a second call with nothing changed neither reads nor redraws
    res2 = agg.aggregate([root], formats=("png",), log=None)
    assert res2.n_read == 0 and res2.figures == {}
    assert any("up to date" in n for n in res2.notes)


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
    assert row["state"] == ("done" if summary["grokked"] else "censored")
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

    from grokhpc.store import provenance_columns

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
