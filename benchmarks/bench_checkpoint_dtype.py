"""Checkpoint rows in float32, bfloat16 and float16: bytes per run, and how far the progress
measures computed from 16-bit rows are from those computed from float32 rows.

    python benchmarks/bench_checkpoint_dtype.py [--epochs 1500] [--threads 1] [--work DIR]

Bytes: the seed config (p = 113, 25,000 epochs, a row every 100 epochs), from the model's
parameter layout. Agreement: one small run that groks on CPU (p = 31) is trained with float32
rows, then copied with its rows stored as bfloat16 and as float16 -- what a run with that
``checkpoint_dtype`` stores, since training is float32 either way (tests/test_checkpoint_dtype.py
checks it) -- and each copy is measured as ``finalize_run`` measures a run. Prints one table per
part (markdown).
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

DTYPES = ("float32", "bfloat16", "float16")
SMALL = dict(p=31, d_model=64, d_head=16, n_heads=4, d_mlp=256, lr=1.0e-2, train_frac=0.7,
             weight_decay=1.0, model_seed=1, checkpoint_every=25, eval_every=10, device="cpu")


def seed_bytes() -> None:
    """Bytes per row and per run's checkpoints.npy of the seed config, per dtype."""
    from grokhpc.config import RunConfig
    from grokhpc.model import build_model, param_layout
    from grokhpc.checkpoints import NPY_HEADER_BYTES, row_itemsize

    cfg = RunConfig(device="cpu")
    n_cols = sum(math.prod(s) for _, s in param_layout(build_model(cfg, "cpu")))
    n_rows = len(range(0, cfg.n_epochs + 1, cfg.checkpoint_every))
    print(f"seed config: {n_cols:,} values per row, {n_rows} rows per run\n")
    print("| checkpoint_dtype | bytes per row | checkpoints.npy per run | vs float32 |")
    print("|---|---|---|---|")
    full = NPY_HEADER_BYTES + n_rows * n_cols * 4
    for d in DTYPES:
        size = NPY_HEADER_BYTES + n_rows * n_cols * row_itemsize(d)
        print(f"| {d} | {n_cols * row_itemsize(d):,} | {size:,} B ({size / 2 ** 20:.1f} MiB) | "
              f"{size / full:.3f} |")


def stored_as(src, dst: Path, dtype: str):
    """A copy of run ``src`` whose config says ``dtype`` and whose rows are stored so."""
    import json

    from grokhpc.config import from_dict
    from grokhpc.checkpoints import append_checkpoint_row
    from grokhpc.store import CHECKPOINTS, CONFIG, RunDir

    shutil.copytree(src.path, dst, ignore=shutil.ignore_patterns(CHECKPOINTS, "measures.*",
                                                                 "summary.*", "state.pt"))
    cfg = {k: v for k, v in src.read_config().items() if k != "run_id"}
    cfg["checkpoint_dtype"] = dtype
    (dst / CONFIG).write_text(json.dumps({**cfg, "run_id": from_dict(cfg).run_id}))
    run = RunDir(dst)
    _, rows = src.checkpoints()
    crcs = [append_checkpoint_row(run.file(CHECKPOINTS), rows[i], i, dtype)
            for i in range(len(rows))]
    prog = src.read_progress()
    run.write_progress({**prog, "checkpoint_crc32": crcs})
    return run


def measured(run):
    """(measures DataFrame, key_freqs, summary) as finalize_run computes them."""
    from grokhpc import measures, phases

    table, key = measures.compute_measures(run)
    return table.to_pandas(), key, phases.build_summary(run, table, key)


def first(epochs, hits) -> int | None:
    idx = np.nonzero(np.asarray(hits))[0]
    return int(epochs[idx[0]]) if len(idx) else None


def derived_epochs(df, summary, p: int) -> dict:
    """Epochs read off the curves (summary) and off the per-checkpoint measures."""
    ep = df["epoch"].to_numpy()
    out = {f"{k} (curves)": summary[k] for k in ("grokking_epoch", "memorisation_end",
                                                 "circuit_formation_end", "cleanup_end")}
    out["first checkpoint test_acc >= 0.99"] = first(ep, df["test_acc"] >= 0.99)
    out["first checkpoint restricted_loss < ln p"] = first(ep, df["restricted_loss"] < math.log(p))
    out["first checkpoint restricted_loss < 0.1"] = first(ep, df["restricted_loss"] < 0.1)
    out["first checkpoint cos_residual < 0.5"] = first(ep, df["cos_residual"] < 0.5)
    out["checkpoint of peak excluded_loss"] = int(ep[np.nanargmax(df["excluded_loss"])])
    out["checkpoint of peak test_loss"] = int(ep[np.nanargmax(df["test_loss"])])
    return out


def differences(ref, df) -> dict[str, tuple[float, float]]:
    """Per measure column: (max abs difference, max relative difference) over checkpoints
    (cos_sim: over every frequency too). Relative to the float32 value, where that is at least
    1% of the column's largest: near zero a relative difference says nothing."""
    from grokhpc.measures import SCALAR_COLUMNS

    out = {}
    for col in (*SCALAR_COLUMNS, "cos_sim"):
        a = np.stack(ref[col].to_numpy()).astype(float)
        b = np.stack(df[col].to_numpy()).astype(float)
        d, big = np.abs(a - b), np.abs(a) >= 0.01 * np.nanmax(np.abs(a))
        rel = d[big] / np.abs(a[big])
        out[col] = (float(np.nanmax(d)), float(np.nanmax(rel)) if rel.size else 0.0)
    return out


def agreement(epochs: int, work: Path) -> None:
    from grokhpc.config import from_dict
    from grokhpc.train import run_training

    base = run_training(from_dict({**SMALL, "n_epochs": epochs}), work / "float32",
                        progress_bar=False, log=lambda *_: None)
    runs = {"float32": base, **{d: stored_as(base, work / d, d) for d in DTYPES[1:]}}
    res = {d: measured(r) for d, r in runs.items()}
    (ref, key32, sum32) = res["float32"]
    print(f"\nrun: {SMALL | {'n_epochs': epochs}}; {len(ref)} checkpoints\n")
    print("| measure | bfloat16 max abs | bfloat16 max rel* | float16 max abs | float16 max rel* |")
    print("|---|---|---|---|---|")
    diffs = {d: differences(ref, res[d][0]) for d in DTYPES[1:]}
    for col in diffs["bfloat16"]:
        cells = [f"{x:.2e}" for d in DTYPES[1:] for x in diffs[d][col]]
        print(f"| {col} | " + " | ".join(cells) + " |")
    print("\n*relative to the float32 value, where that is >= 1% of the column's largest")
    print("\n| read off | float32 | bfloat16 | float16 |")
    print("|---|---|---|---|")
    print(f"| key_freqs | {key32} | {res['bfloat16'][1]} | {res['float16'][1]} |")
    eps = {d: derived_epochs(res[d][0], res[d][2], SMALL["p"]) for d in DTYPES}
    for k in eps["float32"]:
        print(f"| {k} | " + " | ".join(str(eps[d][k]) for d in DTYPES) + " |")
    for d in DTYPES:
        f = runs[d].file("checkpoints.npy")
        print(f"\n{d}: checkpoints.npy {f.stat().st_size:,} B", end="")
    print()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=1500, help="epochs of the small run")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--work", help="keep the run directories here (default: a temporary one)")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    seed_bytes()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench_ckdtype_"))
    try:
        agreement(args.epochs, work)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
