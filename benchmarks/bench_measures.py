"""Time the progress measures per checkpoint on the seed config (p = 113): grokhpc's fast path
against the seed notebook's formulation, side by side in one run, on randomly initialised and on
lightly trained weights; then the end-of-run pass (``finalize_run``) over 250 checkpoints.

    python benchmarks/bench_measures.py [--threads N] [--train-epochs 300] [--repeats 7]

The seed's formulation is the notebook's per-checkpoint work: a hooked forward for each metric
(get_restricted_loss, get_excluded_loss, get_cos_sim, get_residual_cos_sim, the train/test
losses), with the 56 x p^3 cos_cube built once beforehand (not timed, as in the notebook).
The floor of a checkpoint, timed in the same process: one (p^2 x d_mlp) @ (d_mlp x 128)
product, the read-out that no formulation avoids. Reports medians; the load average is printed
because the machine may be shared.
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


def median_ms(fn, repeats: int) -> tuple[float, float]:
    """(median wall ms, median CPU ms of this process) over ``repeats`` calls after a warm-up.
    On a shared machine the CPU time is the steadier number: it does not count the time the
    process waited for a core."""
    fn()
    wall, cpu = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return statistics.median(wall) * 1000, statistics.median(cpu) * 1000


class SeedFormulation:
    """The notebook's progress-measure code for one checkpoint (state_dict loaded per call)."""

    def __init__(self, cfg, key_freqs):
        import torch

        from grokhpc.data import make_dataset
        from grokhpc.model import build_model

        self.p, self.key_freqs = cfg.p, key_freqs
        self.model = build_model(cfg, "cpu")
        data = make_dataset(cfg)
        self.dataset, self.labels = data.tokens, data.labels
        self.train_indices, self.test_indices = data.train_idx, data.test_idx
        p = self.p
        cos_cube = []
        for freq in range(1, p // 2 + 1):
            a = torch.arange(p)[:, None, None]
            b = torch.arange(p)[None, :, None]
            c = torch.arange(p)[None, None, :]
            cube_predicted_logits = torch.cos(freq * 2 * torch.pi / p * (a - b - c))
            cube_predicted_logits /= cube_predicted_logits.norm()
            cos_cube.append(cube_predicted_logits)
        self.cos_cube = torch.stack(cos_cube, dim=0)          # (56, p, p, p): 323 MB at p=113

    @staticmethod
    def loss_fn(logits, labels):
        if len(logits.shape) == 3:
            logits = logits[:, -1]
        logits = logits.to(__import__("torch").float64)
        log_probs = logits.log_softmax(dim=-1)
        return -log_probs.gather(dim=-1, index=labels[:, None])[:, 0].mean()

    def _approx(self, neuron_acts):
        import torch

        p = self.p
        approx_neuron_acts = torch.zeros_like(neuron_acts)
        a = torch.arange(p)[:, None]
        b = torch.arange(p)[None, :]
        for freq in self.key_freqs:
            cos_apb_vec = torch.cos(freq * 2 * torch.pi / p * (a - b))
            cos_apb_vec /= cos_apb_vec.norm()
            cos_apb_vec = cos_apb_vec.reshape(p * p, 1)
            approx_neuron_acts += (neuron_acts * cos_apb_vec).sum(dim=0) * cos_apb_vec
            sin_apb_vec = torch.sin(freq * 2 * torch.pi / p * (a - b))
            sin_apb_vec /= sin_apb_vec.norm()
            sin_apb_vec = sin_apb_vec.reshape(p * p, 1)
            approx_neuron_acts += (neuron_acts * sin_apb_vec).sum(dim=0) * sin_apb_vec
        return approx_neuron_acts

    def measure(self, row):
        import torch

        from grokhpc.model import load_flat

        model, p = self.model, self.p
        load_flat(model, row)
        out = {}
        with torch.no_grad():
            logits = model(self.dataset)[:, -1]
            out["train_loss"] = self.loss_fn(logits[self.train_indices],
                                             self.labels[self.train_indices]).item()
            out["test_loss"] = self.loss_fn(logits[self.test_indices],
                                            self.labels[self.test_indices]).item()
            # get_cos_sim
            logits = model(self.dataset)[:, -1].reshape(p, p, p)
            vals = (self.cos_cube * logits[None, :, :, :]).sum([-3, -2, -1])
            out["cos_sim"] = (vals / logits.norm()).tolist()
            # get_residual_cos_sim
            logits = model(self.dataset)[:, -1].reshape(p, p, p)
            vals = (self.cos_cube * logits[None, :, :, :]).sum([-3, -2, -1])
            residual = logits - (vals[:, None, None, None] * self.cos_cube).sum(dim=0)
            out["cos_residual"] = (residual.norm() / logits.norm()).item()
            # get_restricted_loss
            logits, cache = model.run_with_cache(self.dataset)
            logits = logits[:, -1, :]
            neuron_acts = cache["post", 0, "mlp"][:, -1, :]
            approx = self._approx(neuron_acts)
            restricted_logits = approx @ model.blocks[0].mlp.W_out @ model.unembed.W_U
            restricted_logits += (logits.mean(dim=0, keepdim=True)
                                  - restricted_logits.mean(dim=0, keepdim=True))
            out["restricted_loss"] = self.loss_fn(restricted_logits[self.test_indices],
                                                  self.labels[self.test_indices]).item()
            # get_excluded_loss
            logits, cache = model.run_with_cache(self.dataset)
            neuron_acts = cache["post", 0, "mlp"][:, -1, :]
            approx = self._approx(neuron_acts)
            resid = ((neuron_acts - approx) @ model.blocks[0].mlp.W_out
                     + cache["resid_mid", 0][:, -1, :])
            excluded_logits = resid @ model.unembed.W_U
            out["excluded_loss"] = self.loss_fn(excluded_logits[self.train_indices],
                                                self.labels[self.train_indices]).item()
        return out


def make_250_checkpoint_run(src, dst: Path, n: int = 250):
    """A run directory with ``n`` checkpoints (every 100 epochs, as the seed's 25,000-epoch run),
    interpolating between the source run's first and last weights; curves copied."""
    import numpy as np

    from grokhpc.checkpoints import append_checkpoint_row
    from grokhpc.store import CHECKPOINTS, CONFIG, CURVES

    dst.mkdir(parents=True)
    for f in (CONFIG, CURVES):
        shutil.copy(src.file(f), dst / f)
    _, rows = src.checkpoints()
    first, last = np.array(rows[0]), np.array(rows[-1])
    for i in range(n):
        t = i / (n - 1)
        append_checkpoint_row(dst / CHECKPOINTS, (1 - t) * first + t * last, i)
    prog = src.read_progress()
    prog["checkpoint_epochs"] = [100 * i for i in range(n)]
    (dst / "progress.json").write_text(json.dumps(prog))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--train-epochs", type=int, default=300,
                    help="epochs of seed-config training for the 'lightly trained' weights")
    ap.add_argument("--repeats", type=int, default=7, help="timed repeats (fast path)")
    ap.add_argument("--seed-repeats", type=int, default=3, help="timed repeats (seed formulation)")
    ap.add_argument("--checkpoints", type=int, default=250, help="end-of-run pass size")
    ap.add_argument("--parts", default="per-checkpoint,finalize",
                    help="which timings: per-checkpoint, finalize (comma list)")
    ap.add_argument("--work", default=None,
                    help="keep the lightly trained run here and reuse it next time")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)

    import numpy as np
    import torch

    from grokhpc import measures
    from grokhpc.config import RunConfig
    from grokhpc.model import build_model, flat_weights
    from grokhpc.store import RunDir
    from grokhpc.train import run_training

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_float32_matmul_precision("highest")
    res = {"threads": torch.get_num_threads(), "loadavg_start": os.getloadavg()[0],
           "cpu": next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
                        if l.startswith("model name")), "?"), "nproc": os.cpu_count()}
    print(f"torch threads {res['threads']} on {res['nproc']} CPUs ({res['cpu']}); "
          f"load average {res['loadavg_start']:.1f}")
    parts = set(args.parts.split(","))
    tmp = Path(tempfile.mkdtemp(prefix="bench_measures_"))
    work = Path(args.work) if args.work else tmp
    try:
        cfg = RunConfig(device="cpu")
        key = [1, 5, 34]
        init = flat_weights(build_model(cfg)).numpy()
        t0 = time.perf_counter()
        light_cfg = cfg.replace(n_epochs=args.train_epochs, checkpoint_every=args.train_epochs,
                                eval_every=10)
        run = run_training(light_cfg, work / f"light{args.train_epochs}", progress_bar=False,
                           log=lambda *_: None)
        res["train_s"] = time.perf_counter() - t0
        _, rows = run.checkpoints()
        trained = np.array(rows[-1])
        print(f"trained {args.train_epochs} seed-config epochs in {res['train_s']:.1f} s")

        ev = measures.Evaluator(cfg, key)
        seed = SeedFormulation(cfg, key) if "per-checkpoint" in parts else None
        if seed:
            a, b = torch.randn(cfg.p ** 2, cfg.d_mlp), torch.randn(cfg.d_mlp, 128)
            out = torch.empty(cfg.p ** 2, 128)
            res["floor_wall_ms"], res["floor_cpu_ms"] = median_ms(
                lambda: torch.mm(a, b, out=out), args.repeats)
            print(f"floor, one ({cfg.p}^2 x {cfg.d_mlp}) @ ({cfg.d_mlp} x 128) product: "
                  f"{res['floor_wall_ms']:.1f} ms wall {res['floor_cpu_ms']:.1f} ms CPU")
        states = (("random init", init), (f"{args.train_epochs} epochs", trained))
        for label, row in states if seed else ():
            W = run.unflatten(row)
            fast = ev.measure(W)
            ref = seed.measure(torch.from_numpy(row))
            diff = max(abs(fast[k] - ref[k]) / max(abs(ref[k]), 1e-12)
                       for k in ("train_loss", "test_loss", "restricted_loss", "excluded_loss"))
            # the notebook sums p^3 float32 terms for the cube: ~1e-4 off (residual > 1 at init)
            diff_cube = max(abs(fast["cos_residual"] - ref["cos_residual"]),
                            max(abs(x - y) for x, y in zip(fast["cos_sim"], ref["cos_sim"])))
            w_fast, c_fast = median_ms(lambda: ev.measure(W), args.repeats)
            w_seed, c_seed = median_ms(lambda: seed.measure(torch.from_numpy(row)),
                                       args.seed_repeats)
            res[label] = {"fast_wall_ms": w_fast, "fast_cpu_ms": c_fast, "seed_wall_ms": w_seed,
                          "seed_cpu_ms": c_seed, "speedup_wall": w_seed / w_fast,
                          "loss_max_rel_diff": diff, "cube_max_abs_diff": diff_cube,
                          "test_loss": fast["test_loss"],
                          "restricted_loss": fast["restricted_loss"]}
            print(f"{label:>14}: fast {w_fast:7.1f} ms wall {c_fast:7.1f} ms CPU "
                  f"({w_fast / res['floor_wall_ms']:.2f}x the floor, wall) | seed "
                  f"formulation {w_seed:8.1f} ms wall {c_seed:8.1f} ms CPU | x{w_seed / w_fast:5.1f}"
                  f" wall | losses agree to {diff:.1e} (rel), cube to {diff_cube:.1e} (abs)")
        seed = None   # its cos cube is large: freed before the end-of-run pass

        if "finalize" not in parts:
            return 0
        big = tmp / "ckpt250"
        make_250_checkpoint_run(run, big, args.checkpoints)
        t0, c0 = time.perf_counter(), time.process_time()
        summary = measures.finalize_run(RunDir(big))
        res["finalize_s"] = time.perf_counter() - t0
        res["finalize_cpu_s"] = time.process_time() - c0
        n = args.checkpoints
        print(f"end-of-run pass (finalize_run) over {n} checkpoints: {res['finalize_s']:.1f} s "
              f"wall, {res['finalize_cpu_s']:.1f} s CPU ({res['finalize_s'] * 1000 / n:.1f} / "
              f"{res['finalize_cpu_s'] * 1000 / n:.1f} ms per checkpoint; "
              f"key_freqs {summary['key_freqs']})")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        res["loadavg_end"] = os.getloadavg()[0]
        print(f"load average at the end {res['loadavg_end']:.1f}")
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
