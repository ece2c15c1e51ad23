"""Planning a launch (plan stage): which runs share a job, how many one GPU holds, and what a
plan costs in wall time and GPU-hours.

* Packing: runs of one shape (``shape_key``: the fields a packed group must share) go into the
  same jobs, heaviest first (``by_shape``, ``pack``); a job of several GPUs splits its runs
  evenly over them (``split_even``).
* Sizing: one table of the GPU types the cluster profiles name (``GPUS``: memory, FP32 peak,
  memory bandwidth); ``bytes_per_run`` estimates what a run adds to a packed group, so
  ``gpu_memory_cap`` says how many runs one GPU holds.
* Forecast: a GPU job trains its runs as packed groups (grokhpc.train_batched), one group per
  GPU. A group's throughput grows with its size R up to a knee and hardly at all beyond, while
  a sweep's jobs run ``parallelism`` at a time (the array's throttle, cut to the partition's
  per-user caps). ``plan_auto`` picks the jobs that finish the sweep soonest with at most the
  knee's R per GPU (and what memory holds); ``forecast`` predicts the wall time and GPU-hours
  of any plan; ``plan_jobs`` chooses between them for a launch.

The model is an estimate, and every dry run says so:

* one epoch of r seed-config runs packed on one H200 takes the time measured in
  benchmarks/gpu_batched_table.md (``H200_SEED_TABLE``: run-epochs/s against R, batched mode,
  dense kernels), linear in r between measured sizes and at the largest size's rate beyond;
* another GPU type: that time divided by ``speed_vs_h200``, the lesser of its FP32 and memory
  bandwidth datasheet ratios to the H200's -- an estimate, not a measurement (the packed step
  runs far below the FP32 peak, so neither ratio alone governs it);
* another shape: in proportion to the products that dominate a step, the read-out over the
  train rows (forward and two backward products) and over the test rows every ``eval_every``
  epochs, ``d_mlp * n_classes * (3 n_train + n_test / eval_every)``, each group padded to its
  longest run's rows (as train_batched pads them);
* a job: ``JOB_OVERHEAD_S`` (start-up, opening the runs, end-of-run measures: an allowance, not
  a measurement) plus n_epochs times the epoch time of its slowest group; commit writes are
  not counted;
* a sweep: the array's jobs start in order, each when one of ``parallelism`` running jobs
  ends; GPU-hours are the sum of each job's time times its GPUs.

No torch import (``auto_runs_per_job`` asks the device here, importing it then).
"""

from __future__ import annotations

import heapq
import itertools
import math
import os
import sys
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from .clusters import DEFAULT_ARRAY_PARALLELISM, ClusterProfile, parallelism_cap
from .config import RunConfig, shape_fields
from .families import mlp_sizes
from .runtime import resolve_device
from .sweep import LauncherSettings, SweepRun, local_threads

# Run-epochs/s of R seed-config runs packed on one NVIDIA H200 (benchmarks/gpu_batched_table.md,
# "packed batched dense" rows).
H200_SEED_TABLE = ((1, 145.2), (2, 274.8), (4, 526.7), (8, 1268.5), (16, 1986.0),
                   (32, 3193.8), (64, 3576.3), (128, 3811.2), (256, 3982.5), (512, 4071.8))
REFERENCE_GPU = "h200"


@dataclass(frozen=True)
class GpuSpec:
    """One GPU type: memory (sizes jobs), FP32 peak and memory bandwidth (scale the H200's
    measured throughput to it)."""

    memory_gb: float
    tflops: float        # FP32 peak, TFLOP/s
    bandwidth: float     # memory bandwidth, TB/s


# Every GPU type the cluster profiles name. Memory: the "vRAM/GPU (GB)" column of the partition
# tables on docs.ycrc.yale.edu/clusters/{bouchet,grace,mccleary}/ (August 2026), the smaller
# model where a type comes in two (a100: 40 and 80); b200: the page says 193, NVIDIA's HGX/DGX
# B200 gives 180 usable, the smaller is kept. FP32 peak and bandwidth: datasheets, SXM/HGX parts
# where a type comes in several (h100: H100 SXM; a100: A100 40 GB; v100: V100 SXM2).
GPUS = {"b200": GpuSpec(180, 80.0, 8.0), "h200": GpuSpec(141, 67.0, 4.8),
        "rtx_pro_6000_blackwell": GpuSpec(96, 125.0, 1.792), "h100": GpuSpec(80, 67.0, 3.35),
        "l40s": GpuSpec(48, 91.6, 0.864), "a40": GpuSpec(48, 37.4, 0.696),
        "rtx8000": GpuSpec(48, 16.3, 0.672), "a100": GpuSpec(40, 19.5, 1.555),
        "rtx_5000_ada": GpuSpec(32, 65.3, 0.576), "a5000": GpuSpec(24, 27.8, 0.768),
        "rtx3090": GpuSpec(24, 35.6, 0.936), "rtx5000": GpuSpec(16, 11.2, 0.448),
        "v100": GpuSpec(16, 15.7, 0.9), "rtx2080ti": GpuSpec(11, 13.4, 0.616),
        "rtx2080": GpuSpec(8, 10.1, 0.448)}
KNEE_FRACTION = 0.9     # the knee: the smallest measured R reaching 90% of the best rate
JOB_OVERHEAD_S = 120.0  # per job: start-up, opening the runs, end-of-run measures (allowance)
WALL_TOLERANCE = 0.05   # plans this much slower than the soonest may win on GPU-hours
SEED = RunConfig()
AUTO_SAFETY = 0.7       # of a GPU's memory that runs_per_job auto fills
AUTO_CAP = 1024         # runs per GPU at most


# ---- packing runs into jobs -------------------------------------------------------------------
def shape_key(cfg: RunConfig) -> tuple:
    """Runs with equal keys can be trained together as one batched computation: the device
    and the fields a packed group must share (``grokhpc.config.shape_fields``)."""
    return (cfg.device,) + tuple((f, getattr(cfg, f)) for f in shape_fields(cfg))


def by_shape(runs: Iterable[SweepRun]) -> list[list[SweepRun]]:
    """Runs grouped by shape (groups in first-seen order), each group ordered by train fraction,
    largest first (otherwise in sweep order): a packed group pads every run's rows to its
    longest, so runs of like size packed together waste the least work, and an array's first
    jobs are its longest."""
    groups: dict[tuple, list[SweepRun]] = {}
    for r in runs:
        groups.setdefault(shape_key(r.config), []).append(r)
    return [sorted(g, key=lambda r: -r.config.train_frac) for g in groups.values()]


def pack(runs: Iterable[SweepRun], size_for) -> list[list[SweepRun]]:
    """Group runs by shape (``by_shape``), then cut each group into jobs of
    ``size_for(first_config_of_group)`` runs."""
    jobs: list[list[SweepRun]] = []
    for members in by_shape(runs):
        n = max(1, int(size_for(members[0].config)))
        jobs += [members[i:i + n] for i in range(0, len(members), n)]
    return jobs


def _even_bounds(a: int, b: int, k: int) -> list[tuple[int, int]]:
    """Index ranges cutting a..b-1 in order into k (at most b - a) parts whose sizes differ by
    at most one, the larger first."""
    k = max(1, min(k, b - a))
    q, extra = divmod(b - a, k)
    bounds, i = [], a
    for j in range(k):
        n = q + (j < extra)
        bounds.append((i, i + n))
        i += n
    return bounds


def split_even(items: Sequence, k: int) -> list[list]:
    """``items`` cut in order into ``k`` (at most len(items)) parts whose sizes differ by at
    most one, the larger first."""
    items = list(items)
    return [items[a:b] for a, b in _even_bounds(0, len(items), k) if b > a]


# ---- sizing: the runs one GPU holds -----------------------------------------------------------
def padded_rows(cfgs: Sequence[RunConfig]) -> tuple[int, int]:
    """(train rows, test rows) every run of a group of ``cfgs`` holds: a batched group pads
    each split to its longest run's (``Stack._rows``), whichever run comes first."""
    return max(c.n_train for c in cfgs), max(c.n_test for c in cfgs)


def group_bytes(cfgs: Sequence[RunConfig]) -> int:
    """Estimated device bytes of a batched group of ``cfgs``: each run at the group's padded
    rows (``bytes_per_run(cfg, padded_rows(cfgs))``)."""
    cfgs = list(cfgs)
    return len(cfgs) * bytes_per_run(cfgs[0], padded_rows(cfgs))


def bytes_per_run(cfg: RunConfig, rows: tuple[int, int] | None = None) -> int:
    """Estimated device bytes one run adds to a batched group (float32 weights), in floats x 4,
    its rows padded to ``rows`` (the group's ``padded_rows``; default: its own split), with
    ``n`` positions, ``L`` blocks and ``c`` classes; it errs high (every gradient counted live
    at once), benchmarks/bench_memory_estimate.py sets it beside the measured peak:

    * weights: stacked params + grads + two Adam moments + the shadow Trainer's params and two
      moments = ``7 * n_params`` (every block's weights, biases and LayerNorms);
    * an MLP (``grokhpc.mlp``): per row its input, each hidden layer's pre-activation,
      activation and gradient, and the loss terms ``6 c``; no tables;
    * the fast path (one ReLU block, no LayerNorm, ``grokhpc.lastpos``): its tables, kept for
      the backward with their gradients, ``3 x`` (embeddings ``n V d``, keys and values
      ``2 (n-1) V h e``, scores ``(n-1) V h``, ``W_out @ W_U``); per train row the scores and
      pattern, gathered values and their mix, the last token's terms, the MLP's input and ReLU
      and the read-out and logits (float32 and float64, log-softmax: ``6 c``);
    * the hooked forward (any other shape): per train row and block, at every position, the
      MLP's input and activation (GELU: one more), the residual stream twice, queries, keys,
      values and mix, scores and pattern, and with LayerNorm its input and scale; plus the
      embedding, the logits at every position and the last one's loss terms;
    * train rows, saved for the backward and doubled for its transient gradients: a step's
      rows (the padded train split, or one minibatch of ``batch_size``);
    * scoring rows, in inference mode (nothing saved): the test split and the train split at
      evaluation, a chunk of runs at a time of no more rows than the train split; the peak is
      the larger of the two terms.
    """
    n, h, e, d, m, c, V, L = (3, cfg.n_heads, cfg.d_head, cfg.d_model, cfg.d_mlp,
                              cfg.n_classes, cfg.d_vocab, cfg.n_layers)
    ln = cfg.normalization == "LN"
    n_train, n_test = (cfg.n_train, cfg.n_test) if rows is None else rows
    step_rows = n_train if cfg.full_batch else min(cfg.batch_size, n_train)
    if cfg.model == "mlp":   # per row: its input, each hidden layer's input and activation
        sizes = mlp_sizes(cfg)
        per_row = score_row = sizes[0] + 3 * sum(sizes[1:-1]) + 6 * c
        tables = 0
    elif L == 1 and not ln and cfg.act_fn == "relu":
        tables = n * V * d + 2 * (n - 1) * V * h * e + (n - 1) * V * h + m * c
        per_row = 3 * n * h + 2 * (n - 1) * h * e + 2 * h * e + d + h + 2 * d + 2 * m + 6 * c
        score_row = 2 * (n - 1) * h * e + 2 * m + 6 * c
    else:
        tables, act = 0, 3 if cfg.act_fn == "gelu" else 2
        layer = n * (act * m + 2 * d + 4 * h * e) + 2 * h * n * n + (4 * n * d if ln else 0)
        per_row = n * d + n * c + 6 * c + L * layer + (2 * n * d if ln else 0)
        score_row = L * n * (act * m + 2 * d + 2 * h * e) + n * c + 6 * c
    train = step_rows * 2 * per_row
    score = min(n_test, n_train) * score_row
    return 4 * (7 * param_count(cfg) + 3 * tables + max(train, score))


def param_count(cfg: RunConfig) -> int:
    """The model's parameters (grokhpc.model): embeddings, each block's attention and MLP
    weights and biases (and LayerNorms), the final LayerNorm and the unembedding."""
    if cfg.model == "mlp":   # grokhpc.mlp: each Linear layer's weight and bias
        sizes = mlp_sizes(cfg)
        return sum(a * b + b for a, b in zip(sizes, sizes[1:]))
    n, h, e, d, m, c, V = (3, cfg.n_heads, cfg.d_head, cfg.d_model, cfg.d_mlp, cfg.n_classes,
                           cfg.d_vocab)
    ln = cfg.normalization == "LN"
    block = 4 * h * d * e + 3 * h * e + 2 * d + 2 * d * m + m + (4 * d if ln else 0)
    return V * d + n * d + cfg.n_layers * block + (2 * d if ln else 0) + d * c + c


def auto_runs_per_job(cfg: RunConfig | Sequence[RunConfig], device=None, safety: float = 0.7,
                      cpu_default: int = 4, cap: int = 1024) -> int:
    """How many runs of ``cfg``'s shape to stack in one job on ``device``; ``cfg`` may be the
    runs to be cut into jobs, a job then sized for their longest splits (``padded_rows``).

    CUDA: ``floor(safety * free_bytes / bytes_per_run(cfg, rows))``, clamped to [1, cap], with
    ``free_bytes`` from ``torch.cuda.mem_get_info``. The estimate errs high (it counts every
    gradient as live at once; ``benchmarks/gpu_batched.py`` prints it beside the measured
    peak). CPU (or anything else): ``cpu_default`` -- on a CPU the stacked step already keeps
    the cores busy at R = 1, so packing saves per-job overhead, not compute.
    """
    import torch

    cfgs = [cfg] if isinstance(cfg, RunConfig) else list(cfg)
    dev = resolve_device(device if device is not None else cfgs[0].device) \
        if not isinstance(device, torch.device) else device
    if dev.type != "cuda":
        return cpu_default
    free, _total = torch.cuda.mem_get_info(dev)
    per_run = bytes_per_run(cfgs[0], padded_rows(cfgs))
    return int(max(1, min(cap, math.floor(safety * free / per_run))))


def gpu_memory_cap(launcher: LauncherSettings) -> Callable[[list], int] | None:
    """cap(configs): the runs of these configs one GPU of the launcher's type holds, a group
    padded to its largest run (AUTO_SAFETY of its memory, ``bytes_per_run``, at most
    AUTO_CAP); None for a GPU type of unknown memory."""
    spec = GPUS.get((launcher.gpu_type or "").lower()) if launcher.gpus else None
    if spec is None:
        return None
    mem = spec.memory_gb
    return lambda cfgs: int(max(1, min(AUTO_CAP, AUTO_SAFETY * mem * 1e9
                                       // max(bytes_per_run(c) for c in cfgs))))


def runs_per_job_for(launcher: LauncherSettings, log=None) -> Callable:
    """size_for(cfg) for ``pack``: a number as it is; ``auto`` where there is no throughput
    table (``plan_jobs``): for a GPU of known memory, as many runs as fit it
    (``gpu_memory_cap``), else ``auto_runs_per_job`` on the device here; 1 when neither can
    say."""
    if launcher.runs_per_job != "auto":
        n = int(launcher.runs_per_job)
        return lambda cfg: n
    device = "cuda" if (launcher.gpus or 0) > 0 else "cpu"
    log = log or (lambda m: print(m, file=sys.stderr))
    cap = gpu_memory_cap(launcher)

    def auto(cfg) -> int:
        if cap is not None:
            return cap([cfg])
        try:
            return max(1, int(auto_runs_per_job(cfg, device)))
        except Exception as e:  # no such device here (a login node): one run per job
            log(f"warning: runs_per_job auto: {type(e).__name__}: {e}; "
                "set launcher.gpu_type or a number; using 1")
            return 1
    return auto


# ---- throughput and forecast ------------------------------------------------------------------
def speed_vs_h200(gpu_type: str) -> float | None:
    """A GPU type's speed on packed training relative to the H200's: the lesser of its FP32 and
    memory-bandwidth datasheet ratios (an estimate); None for a type not in the table."""
    spec = GPUS.get((gpu_type or "").lower())
    if spec is None:
        return None
    ref = GPUS[REFERENCE_GPU]
    return min(spec.tflops / ref.tflops, spec.bandwidth / ref.bandwidth)


@dataclass(frozen=True)
class Throughput:
    """Packed training speed of one GPU type: the H200 table scaled by ``speed``."""

    gpu_type: str
    speed: float
    table: tuple[tuple[int, float], ...] = H200_SEED_TABLE

    @property
    def measured(self) -> bool:
        return self.gpu_type == REFERENCE_GPU

    def epoch_seconds(self, r: float) -> float:
        """Seconds for one epoch of ``r`` seed-config runs packed on one GPU (r may be a
        fraction: runs smaller than the seed's). Never less than a smaller group's: where the
        table has a larger group faster than a smaller one (R = 8 vs 4, noise of a short
        timing), the smaller group's time holds."""
        points = list(itertools.accumulate(((n, n / rate) for n, rate in self.table),
                                           lambda a, b: (b[0], max(a[1], b[1]))))
        last_n, last_t = points[-1]
        if r >= last_n:
            return r * last_t / last_n / self.speed
        if r <= points[0][0]:
            return points[0][1] / self.speed
        (n0, t0), (n1, t1) = next((a, b) for a, b in zip(points, points[1:]) if r < b[0])
        return (t0 + (r - n0) * (t1 - t0) / (n1 - n0)) / self.speed

    def rate(self, r: int) -> float:
        """Run-epochs/s of ``r`` seed-config runs packed on one GPU."""
        return r / self.epoch_seconds(r)

    @property
    def knee(self) -> int:
        """The smallest measured R whose rate reaches KNEE_FRACTION of the best: beyond it a
        larger group buys little throughput and lengthens every job."""
        best = max(rate for _, rate in self.table)
        return next(n for n, rate in self.table if rate >= KNEE_FRACTION * best)

    def describe(self) -> str:
        if self.measured:
            return f"{self.gpu_type}: measured (benchmarks/gpu_batched_table.md)"
        return (f"{self.gpu_type}: estimated, the H200's measured rates x {self.speed:.2f} "
                "(datasheet FP32 and memory-bandwidth ratios, the lesser)")


def throughput_for(gpu_type: str | None) -> Throughput | None:
    speed = speed_vs_h200(gpu_type or "")
    return None if speed is None else Throughput(gpu_type.lower(), speed)


def _rows(cfg: RunConfig) -> tuple[int, int]:
    """Train and test rows of a run."""
    return cfg.n_train, cfg.n_test


def _epoch_work(cfg: RunConfig, n_train: int, n_test: int) -> float:
    """Multiply-adds of an epoch, in the dominant product per row (the transformer's neuron
    read-out ``d_mlp * n_classes``; an MLP's weights)."""
    per_row = param_count(cfg) if cfg.model == "mlp" else cfg.d_mlp * cfg.n_classes
    return per_row * (3 * n_train + n_test / cfg.eval_every)


def work_scale(cfgs: Sequence[RunConfig]) -> float:
    """One epoch of a packed group per run, relative to a seed-config run's: the group's
    shape, its rows padded to its longest run's."""
    rows = [_rows(c) for c in cfgs]
    n_train, n_test = max(r[0] for r in rows), max(r[1] for r in rows)
    return _epoch_work(cfgs[0], n_train, n_test) / _epoch_work(SEED, *_rows(SEED))


def job_seconds(runs: Sequence[SweepRun], gpus: int, tp: Throughput) -> float:
    """A job's predicted time: its runs split over its GPUs as the job splits them
    (split_even), the slowest group's epochs, plus JOB_OVERHEAD_S. A group of n runs does the
    work of n x work_scale seed-config runs."""
    slowest = 0.0
    for group in split_even(runs, max(1, gpus)):
        cfgs = [r.config for r in group]
        epoch = tp.epoch_seconds(len(group) * work_scale(cfgs))
        slowest = max(slowest, cfgs[0].n_epochs * epoch)
    return JOB_OVERHEAD_S + slowest


def makespan(seconds: Sequence[float], parallelism: int) -> float:
    """When the last of an array's jobs ends: the jobs start in order, each as soon as one of
    ``parallelism`` slots is free."""
    slots = [0.0] * max(1, min(parallelism, len(seconds)))
    end = 0.0
    for s in seconds:
        done = heapq.heappop(slots) + s
        end = max(end, done)
        heapq.heappush(slots, done)
    return end


@dataclass(frozen=True)
class Forecast:
    """A plan's predicted cost: each job's time, the sweep's wall time and GPU-hours."""

    throughput: Throughput
    gpus: int
    parallelism: int
    job_seconds: tuple[float, ...]
    wall_s: float
    gpu_hours: float

    def lines(self, jobs: Sequence[Sequence]) -> list[str]:
        sizes = sorted({len(j) for j in jobs})
        per_gpu = max((math.ceil(len(j) / max(1, self.gpus)) for j in jobs), default=0)
        span = f"{sizes[0]}-{sizes[-1]}" if len(sizes) > 1 else f"{sizes[0] if sizes else 0}"
        head = (f"plan: {len(jobs)} job(s) of {span} run(s), {self.gpus} GPU(s) each (up to "
                f"{per_gpu} runs per GPU), {min(self.parallelism, len(jobs))} at once: "
                f"predicted {self.wall_s / 60:.1f} min to the last job's end, "
                f"{self.gpu_hours:.2f} GPU-hours")
        tp = self.throughput
        model = (f"  model: {tp.describe()}; knee R = {tp.knee}; + {JOB_OVERHEAD_S:.0f} s per "
                 "job (start-up and end-of-run measures, an allowance); commits not counted")
        return [head, model]


def forecast(jobs: Sequence[Sequence[SweepRun]], gpus: int, parallelism: int,
             tp: Throughput) -> Forecast:
    secs = tuple(job_seconds(j, gpus, tp) for j in jobs)
    return Forecast(tp, max(1, gpus), parallelism, secs, makespan(secs, parallelism),
                    sum(secs) * max(1, gpus) / 3600)


class _Shape:
    """One shape's runs, heaviest first (by_shape), and what a job of runs[a:b] costs: O(1)
    per GPU, since a slice's longest train rows are its first run's and its longest test rows
    its last run's."""

    def __init__(self, runs: Sequence[SweepRun], gpus: int, tp: Throughput, memory_cap: int):
        self.runs, self.gpus, self.tp, self.memory_cap = list(runs), max(1, gpus), tp, memory_cap
        self.rows = [_rows(r.config) for r in self.runs]
        self.seed_work = _epoch_work(SEED, *_rows(SEED))

    def _scale(self, a: int, b: int) -> float:
        n_test = max(self.rows[a][1], self.rows[b - 1][1])
        return _epoch_work(self.runs[a].config, self.rows[a][0], n_test) / self.seed_work

    def seconds(self, a: int, b: int) -> float:
        """job_seconds(runs[a:b])."""
        epochs = self.runs[a].config.n_epochs
        return JOB_OVERHEAD_S + max(epochs * self.tp.epoch_seconds((y - x) * self._scale(x, y))
                                    for x, y in _even_bounds(a, b, self.gpus))

    def fits(self, a: int, b: int) -> bool:
        """Every GPU's group of runs[a:b] within memory and the knee (in seed-config runs)."""
        return all(y - x <= min(self.memory_cap, self.tp.knee / self._scale(x, y))
                   for x, y in _even_bounds(a, b, self.gpus))

    def cut(self, budget: float) -> list[tuple[int, int]]:
        """Jobs in order, each the longest slice that fits and takes at most ``budget`` s
        (a run alone always makes a job)."""
        jobs, a, n = [], 0, len(self.runs)
        while a < n:
            lo, hi = a + 1, n
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if self.fits(a, mid) and self.seconds(a, mid) <= budget:
                    lo = mid
                else:
                    hi = mid - 1
            jobs.append((a, lo))
            a = lo
        return jobs


def _plan_for(shapes: list[_Shape], k: int, longest: float) -> list[list[SweepRun]]:
    """At most ``k`` jobs (fewer where the caps allow no fewer) with the smallest longest job:
    a bisection on the job-time budget, each shape cut greedily under it, from the longest run
    alone (no budget below it cuts any finer)."""
    def count(budget: float) -> int:
        return sum(len(s.cut(budget)) for s in shapes)

    lo = max(s.seconds(i, i + 1) for s in shapes for i in range(len(s.runs)))
    if count(lo) <= k:
        return [s.runs[a:b] for s in shapes for a, b in s.cut(lo)]
    hi = longest
    while hi - lo > 1e-4 * hi:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if count(mid) <= k else (mid, hi)
    return [s.runs[a:b] for s in shapes for a, b in s.cut(hi)]


def plan_auto(runs: Sequence[SweepRun], gpus: int, parallelism: int, tp: Throughput,
              cap_for: Callable[[list[RunConfig]], int], max_jobs: int | None = None
              ) -> tuple[list[list[SweepRun]], Forecast]:
    """The jobs that finish ``runs`` soonest, at most the knee's work (and what memory holds,
    ``cap_for``) on each GPU. For each number of jobs k -- the fewest the caps allow, every k up
    to ``parallelism``, and the jobs of as many full waves as the fewest need -- the k jobs with
    the shortest longest job (each shape's runs, heaviest first, cut in order); among the plans
    within WALL_TOLERANCE of the soonest, the fewest GPU-hours win (then the fewest jobs).
    The jobs go out longest first. ``max_jobs``: the partition's cap on queued jobs, kept where
    any plan can."""
    groups = by_shape(runs)
    if not groups:
        return [], forecast([], gpus, parallelism, tp)
    shapes = [_Shape(g, gpus, tp, cap_for([r.config for r in g])) for g in groups]
    cuts = [(s, a, b) for s in shapes for a, b in s.cut(math.inf)]
    fewest, longest = len(cuts), max(s.seconds(a, b) for s, a, b in cuts)
    waves = math.ceil(fewest / max(1, parallelism))
    ks = sorted(set(range(fewest, parallelism + 1))
                | {fewest, min(len(runs), waves * parallelism)})
    options = []
    for k in ks:
        jobs = _plan_for(shapes, k, longest)
        jobs = sorted(jobs, key=lambda j: -job_seconds(j, gpus, tp))
        options.append((jobs, forecast(jobs, gpus, parallelism, tp)))
    allowed = [o for o in options if max_jobs is None or len(o[0]) <= max_jobs] or options[:1]
    soonest = min(f.wall_s for _, f in allowed)
    near = [o for o in allowed if o[1].wall_s <= soonest * (1 + WALL_TOLERANCE)]
    return min(near, key=lambda o: (o[1].gpu_hours, len(o[0])))


# ---- the jobs of a launch ---------------------------------------------------------------------
def local_parallelism(launcher: LauncherSettings) -> int:
    """Local jobs at once: as many as the cores hold at ``local_threads`` each, at most
    array_parallelism."""
    cap = max(1, (os.cpu_count() or 1) // local_threads(launcher))
    return max(1, min(launcher.array_parallelism or cap, cap))


def launch_parallelism(kind: str, launcher: LauncherSettings,
                       profile: ClusterProfile | None) -> int:
    """Jobs of this launch that run at once: the partition's caps on SLURM, the cores here
    locally, one in the debug executor."""
    if kind == "slurm":
        part = profile.partition(launcher.partition) if profile and launcher.partition else None
        return parallelism_cap(launcher, part, DEFAULT_ARRAY_PARALLELISM)[0]
    return local_parallelism(launcher) if kind == "local" else 1


def plan_jobs(todo: Sequence[SweepRun], launcher: LauncherSettings,
              profile: ClusterProfile | None, kind: str
              ) -> tuple[list[list[SweepRun]], Forecast | None]:
    """The jobs of this launch and, for GPU jobs of a type with a throughput table, their
    forecast. ``auto`` with a table: the plan that finishes soonest over the jobs the partition
    lets run at once (``plan_auto``); otherwise ``pack``."""
    gpus = launcher.gpus or 0
    tp = throughput_for(launcher.gpu_type) if gpus > 0 else None
    width = launch_parallelism(kind, launcher, profile)
    cap = gpu_memory_cap(launcher)
    if launcher.runs_per_job == "auto" and tp is not None and cap is not None:
        part = profile.partition(launcher.partition) if profile and launcher.partition else None
        max_jobs = part.max_submitted if part is not None and kind == "slurm" else None
        return plan_auto(todo, gpus, width, tp, cap, max_jobs)
    groups = pack(todo, runs_per_job_for(launcher))
    return groups, (forecast(groups, gpus, width, tp) if tp is not None else None)


__all__ = ["shape_key", "by_shape", "pack", "split_even", "GPUS", "GpuSpec", "bytes_per_run",
           "param_count",
           "group_bytes", "padded_rows", "auto_runs_per_job", "gpu_memory_cap",
           "runs_per_job_for", "H200_SEED_TABLE", "Throughput", "Forecast", "throughput_for",
           "speed_vs_h200", "work_scale", "job_seconds", "makespan", "forecast", "plan_auto",
           "plan_jobs", "launch_parallelism", "local_parallelism", "JOB_OVERHEAD_S",
           "KNEE_FRACTION", "WALL_TOLERANCE"]
