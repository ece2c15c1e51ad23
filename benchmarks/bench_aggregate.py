"""Time ``grokhpc.aggregate`` on a synthetic sweep: N runs x 250 checkpoints.

    python benchmarks/bench_aggregate.py [--n 1000] [--checkpoints 250] [--repeats 3]
                                         [--dir DIR] [--figures]

Each synthetic run directory holds what a finished run writes: config.json, progress.json,
curves.parquet (one row per epoch, test columns every 10 epochs), measures.parquet (one row per
checkpoint: 13 scalar measures and a 56-long cos_sim list, as for p = 113) and summary.json.
Swept: weight_decay x train_frac x data_seed. Times (median of --repeats): aggregate from
scratch (index and tables removed first) and again with nothing changed, then after touching
one run. Prints the tables' sizes. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from grokhpc.aggregate import aggregate  # noqa: E402
from grokhpc.config import RunConfig, to_dict  # noqa: E402
from grokhpc.store import atomic_write_json, curves_table  # noqa: E402

P = 113


def synth_run(root: Path, cfg: RunConfig, n_ckpt: int, rng: np.random.Generator) -> None:
    d = root / "runs" / cfg.run_id
    d.mkdir(parents=True, exist_ok=True)
    conf = to_dict(cfg)
    conf["run_id"] = cfg.run_id
    atomic_write_json(d / "config.json", conf)
    n_epochs = cfg.n_epochs
    ep = np.arange(n_epochs + 1)
    # a grokking-shaped trajectory: memorise by ~1k, grok at t_g depending on wd and frac
    t_g = int(min(n_epochs * 1.5, 3000 / cfg.weight_decay / cfg.train_frac * rng.uniform(.7, 1.3)))
    grokked = t_g <= n_epochs
    train_loss = 4.7 * np.exp(-ep / 300) + 1e-7
    test_loss = np.where(ep < t_g, 4.7 + 20 * (1 - np.exp(-ep / 800)),
                         24.7 * np.exp(-(ep - t_g) / 200) + 1e-6)
    test_acc = np.where(ep < t_g, 0.01, 1.0)
    train_acc = np.minimum(1.0, ep / 1000)
    ev = (ep % cfg.eval_every) == 0
    cols = {"epoch": ep, "train_loss": train_loss, "train_acc": train_acc,
            "test_loss": np.where(ev, test_loss, np.nan), "test_acc": np.where(ev, test_acc, np.nan)}
    pq.write_table(curves_table(cols), d / "curves.parquet", compression="zstd")
    ck = np.arange(n_ckpt) * cfg.checkpoint_every
    m = {"epoch": pa.array(ck, pa.int64())}
    for name in ("train_loss", "train_acc", "test_loss", "test_acc"):
        m[name] = pa.array(cols[name][ck] if "train" in name else
                           np.interp(ck, ep, np.nan_to_num(cols[name], nan=0.0)))
    for name in ("all_loss", "all_acc", "weight_norm_sq", "gini_embed", "gini_logit",
                 "restricted_loss", "excluded_loss", "cos_residual", "n_key"):
        m[name] = pa.array(rng.random(n_ckpt)) if name != "n_key" else \
            pa.array(np.full(n_ckpt, 3), pa.int64())
    m["cos_sim"] = pa.array(list(rng.random((n_ckpt, (P - 1) // 2))), pa.list_(pa.float64()))
    pq.write_table(pa.table(m), d / "measures.parquet", compression="zstd")
    atomic_write_json(d / "progress.json", {
        "run_id": cfg.run_id, "epoch": n_epochs, "n_epochs": n_epochs,
        "checkpoint_epochs": ck.tolist(), "layout": [], "wall_time_s": 1000.0, "device": "cuda",
        "done": True, "updated": "2026-01-01T00:00:00Z"})
    atomic_write_json(d / "summary.json", {
        "run_id": cfg.run_id, "grokking_epoch": t_g if grokked else n_epochs, "grokked": grokked,
        "memorisation_end": 900, "circuit_formation_end": (t_g - 300) if grokked else None,
        "cleanup_end": t_g if grokked else None, "key_freqs": [1, 5, 34],
        "final_train_loss": float(train_loss[-1]), "final_test_loss": float(test_loss[-1]),
        "final_train_acc": 1.0, "final_test_acc": float(test_acc[-1]), "wall_time_s": 1000.0})


def synth_sweep(root: Path, n: int, n_ckpt: int) -> None:
    rng = np.random.default_rng(0)
    n_seeds = 10
    n_grid = max(1, n // n_seeds)
    n_wd = max(1, int(round(n_grid ** 0.5)))
    n_tf = max(1, n_grid // n_wd)
    wds = np.geomspace(0.1, 3.0, n_wd)
    tfs = np.linspace(0.2, 0.8, n_tf)
    axes, runs, k = ["weight_decay", "train_frac", "data_seed"], [], 0
    for wd in wds:
        for tf in tfs:
            for s in range(n_seeds):
                if k >= n:
                    break
                cfg = RunConfig(weight_decay=float(round(wd, 4)), train_frac=float(round(tf, 3)),
                                data_seed=s, n_epochs=(n_ckpt - 1) * 100, checkpoint_every=100)
                synth_run(root, cfg, n_ckpt, rng)
                runs.append({"run_id": cfg.run_id, "dir": f"runs/{cfg.run_id}",
                             "swept": {"weight_decay": cfg.weight_decay,
                                       "train_frac": cfg.train_frac, "data_seed": s}})
                k += 1
    while k < n:  # n not a product of the grid: fill with more seeds
        cfg = RunConfig(data_seed=1000 + k, n_epochs=(n_ckpt - 1) * 100, checkpoint_every=100)
        synth_run(root, cfg, n_ckpt, rng)
        runs.append({"run_id": cfg.run_id, "dir": f"runs/{cfg.run_id}", "swept": {}})
        k += 1
    atomic_write_json(root / "manifest.json", {"runs": runs, "axes": axes})


def du(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1000, help="runs (default 1000)")
    ap.add_argument("--checkpoints", type=int, default=250, help="checkpoints per run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", help="keep the synthetic sweep here (default: a temporary dir)")
    ap.add_argument("--figures", action="store_true", help="also time the PNG+HTML figures")
    args = ap.parse_args()

    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench_aggregate_"))
    if not (root / "manifest.json").exists():
        t = time.perf_counter()
        synth_sweep(root, args.n, args.checkpoints)
        print(f"synthesised {args.n} runs x {args.checkpoints} checkpoints in "
              f"{time.perf_counter() - t:.1f} s under {root} ({du(root / 'runs') / 1e6:.0f} MB)")
    if args.repeats < 1:
        return 0
    fmts = ("png", "html") if args.figures else None
    agg = root / "aggregate"
    scratch, unchanged, one, cpu = [], [], [], []
    for i in range(args.repeats):
        shutil.rmtree(agg, ignore_errors=True)
        c0 = time.process_time()
        r = aggregate([root], formats=fmts, log=None)
        cpu.append(time.process_time() - c0)
        scratch.append(r.timings["total_s"])
        assert r.n_read == args.n, r.n_read
        r2 = aggregate([root], formats=fmts, log=None)
        unchanged.append(r2.timings["total_s"])
        assert r2.n_read == 0
        some = next((root / "runs").iterdir()) / "summary.json"
        os.utime(some, None)
        r3 = aggregate([root], formats=None, log=None)
        assert r3.n_read == 1
        one.append(r3.timings["total_s"])
        print(f"  repeat {i + 1}: scratch {scratch[-1]:.2f} s ({ {k: round(v, 2) for k, v in r.timings.items()} }), "
              f"unchanged {unchanged[-1]:.2f} s, one run touched {one[-1]:.2f} s")
    print(f"runs: {args.n}, checkpoints per run: {args.checkpoints}, figures: {bool(fmts)}")
    print(f"from scratch  median {statistics.median(scratch):6.2f} s  (target <= 30 s); "
          f"CPU time of this process (all threads) median {statistics.median(cpu):.2f} s; "
          f"load average now {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"nothing changed median {statistics.median(unchanged):6.2f} s  (target: a few s)")
    print(f"one run touched median {statistics.median(one):6.2f} s  (tables only)")
    rows = pq.read_metadata(agg / "checkpoints.parquet").num_rows
    print(f"runs.parquet        {du(agg / 'runs.parquet') / 1e3:10.1f} kB")
    print(f"checkpoints.parquet {du(agg / 'checkpoints.parquet') / 1e6:10.1f} MB ({rows} rows)")
    n_curves = len(list((agg / "curves").glob("*.parquet")))
    print(f"curves/             {du(agg / 'curves') / 1e6:10.1f} MB ({n_curves} files)")
    print(f"index.json          {du(agg / 'index.json') / 1e6:10.2f} MB")
    if not args.dir:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
