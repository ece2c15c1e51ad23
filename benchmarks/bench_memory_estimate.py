"""plan.bytes_per_run (the memory estimate behind ``runs_per_job: auto``) against the memory a
packed group takes on a CPU, for several shapes: depth, LayerNorm, activation, batch size.

Each measurement is a fresh process: after the imports its peak RSS is reset
(``/proc/self/clear_refs``), R runs' trainers and their batched Stack (``exact=False``, the
GPU's path) are built and stepped ``--steps`` epochs with the test split scored every epoch,
and the peak RSS above the start is read (``VmHWM``). A run's share is the difference between
R = ``--big`` and R = ``--small`` divided by their difference, which cancels what a group
costs whatever its size. Linux only.

    python benchmarks/bench_memory_estimate.py [--small 2 --big 8 --steps 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

SHAPES = {
    "seed (1 layer, ReLU, full batch)": {},
    "2 layers": {"n_layers": 2},
    "LayerNorm": {"normalization": "LN"},
    "GELU": {"act_fn": "gelu"},
    "batch_size 256": {"batch_size": 256},
    "2 layers, LN, GELU, batch 512": {"n_layers": 2, "normalization": "LN", "act_fn": "gelu",
                                      "batch_size": 512},
}


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith(key + ":"))


def measure(fields: dict, r: int, steps: int) -> int:
    """Peak bytes above the start of building and stepping a packed group of ``r`` runs."""
    import torch

    from grokhpc.config import RunConfig
    from grokhpc.loop import epoch_end
    from grokhpc.stack import Stack
    from grokhpc.store import RunDir
    from grokhpc.train import Trainer

    torch.set_num_threads(1)
    cfgs = [RunConfig(**{**fields, "eval_every": 1, "model_seed": i}) for i in range(r)]
    with tempfile.TemporaryDirectory() as tmp, open("/proc/self/clear_refs", "w") as f:
        f.write("5")
        f.flush()
        start = _status("VmRSS")
        trainers = [Trainer(c, RunDir(f"{tmp}/{i}"), torch.device("cpu")) for i, c in
                    enumerate(cfgs)]
        stack = Stack(trainers, torch.device("cpu"), exact=False, step_mode="eager",
                      log=lambda m: None)
        for _ in range(steps):
            stack.step()
            epoch_end(stack)
        return _status("VmHWM") - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", type=int, default=2)
    ap.add_argument("--big", type=int, default=8)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)   # child: fields,R
    args = ap.parse_args()
    if args.one:
        fields, r = json.loads(args.one)
        print(measure(fields, r, args.steps))
        return
    from grokhpc.config import RunConfig
    from grokhpc.plan import bytes_per_run

    print(f"| shape | estimate MB/run | measured MB/run (R={args.big} - R={args.small}) | "
          "estimate / measured |\n| --- | --- | --- | --- |")
    for name, fields in SHAPES.items():
        peaks = []
        for r in (args.small, args.big):
            out = subprocess.run([sys.executable, __file__, "--steps", str(args.steps),
                                  "--one", json.dumps([fields, r])],
                                 capture_output=True, text=True, check=True).stdout
            peaks.append(int(out.split()[-1]))
        measured = (peaks[1] - peaks[0]) / (args.big - args.small)
        est = bytes_per_run(RunConfig(**fields))
        print(f"| {name} | {est / 1e6:.1f} | {measured / 1e6:.1f} | {est / measured:.2f} |",
              flush=True)


if __name__ == "__main__":
    main()
