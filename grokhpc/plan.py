"""Packing a sweep for time to result: how many runs each GPU job trains, and what a plan costs.

A GPU job trains its runs as packed groups (grokhpc.train_batched), one group per GPU. A
group's throughput grows with its size R up to a knee and hardly at all beyond, while a sweep's
jobs run ``parallelism`` at a time (the array's throttle, cut to the partition's per-user caps).
``plan_auto`` picks the jobs that finish the sweep soonest with at most the knee's R per GPU
(and what memory holds); ``forecast`` predicts the wall time and GPU-hours of any plan.

The model is an estimate, and every dry run says so:

* one epoch of r seed-config runs packed on one H200 takes the time measured in
  benchmarks/gpu_batched_table.md (``H200_SEED_TABLE``: run-epochs/s against R, batched mode,
  dense kernels), linear in r between measured sizes and at the largest size's rate beyond;
* another GPU type: that time divided by ``speed_vs_h200``, the lesser of its FP32 and memory
  bandwidth datasheet ratios to the H200's -- an estimate, not a measurement (the packed step
  runs far below the FP32 peak, so neither ratio alone governs it);
* another shape: in proportion to the products that dominate a step, the read-out over the
  train rows (forward and two backward products) and over the test rows every ``eval_every``
  epochs, ``d_mlp * p * (3 n_train + n_test / eval_every)``, each group padded to its longest
  run's rows (as train_batched pads them);
* a job: ``JOB_OVERHEAD_S`` (start-up, opening the runs, end-of-run measures: an allowance, not
  a measurement) plus n_epochs times the epoch time of its slowest group; commit writes are
  not counted;
* a sweep: the array's jobs start in order, each when one of ``parallelism`` running jobs
  ends; GPU-hours are the sum of each job's time times its GPUs.

No torch import.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from .config import RunConfig, shape_fields
from .sweep import SweepRun

# Run-epochs/s of R seed-config runs packed on one NVIDIA H200 (benchmarks/gpu_batched_table.md,
# "packed batched dense" rows).
H200_SEED_TABLE = ((1, 145.2), (2, 274.8), (4, 526.7), (8, 1268.5), (16, 1986.0),
                   (32, 3193.8), (64, 3576.3), (128, 3811.2), (256, 3982.5), (512, 4071.8))
REFERENCE_GPU = "h200"
# Datasheet peaks per GPU type: (FP32 TFLOPS, memory bandwidth TB/s); SXM/HGX parts where a
# type comes in several (h100: H100 SXM; a100: A100 40 GB; v100: V100 SXM2).
GPU_DATASHEET = {"b200": (80.0, 8.0), "h200": (67.0, 4.8), "h100": (67.0, 3.35),
                 "rtx_pro_6000_blackwell": (125.0, 1.792), "l40s": (91.6, 0.864),
                 "a40": (37.4, 0.696), "rtx8000": (16.3, 0.672), "a100": (19.5, 1.555),
                 "rtx_5000_ada": (65.3, 0.576), "a5000": (27.8, 0.768),
                 "rtx3090": (35.6, 0.936), "rtx5000": (11.2, 0.448), "v100": (15.7, 0.9),
                 "rtx2080ti": (13.4, 0.616), "rtx2080": (10.1, 0.448)}
KNEE_FRACTION = 0.9     # the knee: the smallest measured R reaching 90% of the best rate
JOB_OVERHEAD_S = 120.0  # per job: start-up, opening the runs, end-of-run measures (allowance)
WALL_TOLERANCE = 0.05   # plans this much slower than the soonest may win on GPU-hours
SEED = RunConfig()


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


# ---- throughput and forecast ------------------------------------------------------------------
def speed_vs_h200(gpu_type: str) -> float | None:
    """A GPU type's speed on packed training relative to the H200's: the lesser of its FP32 and
    memory-bandwidth datasheet ratios (an estimate); None for a type not in the table."""
    spec = GPU_DATASHEET.get((gpu_type or "").lower())
    if spec is None:
        return None
    ref = GPU_DATASHEET[REFERENCE_GPU]
    return min(spec[0] / ref[0], spec[1] / ref[1])


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
    """Train and test rows of a run (the seed's split: the first int(n * train_frac) train)."""
    n = cfg.p * (cfg.p - 1 if cfg.op == "div" else cfg.p)
    n_train = int(n * cfg.train_frac)
    return n_train, n - n_train


def _epoch_work(cfg: RunConfig, n_train: int, n_test: int) -> float:
    return cfg.d_mlp * cfg.p * (3 * n_train + n_test / cfg.eval_every)


def work_scale(cfgs: Sequence[RunConfig]) -> float:
    """One epoch of a packed group per run, relative to a seed-config run's: the group's
    shape, its rows padded to its longest run's."""
    rows = [_rows(c) for c in cfgs]
    n_train, n_test = max(r[0] for r in rows), max(r[1] for r in rows)
    return _epoch_work(cfgs[0], n_train, n_test) / _epoch_work(SEED, *_rows(SEED))


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
    a bisection on the job-time budget, each shape cut greedily under it."""
    def count(budget: float) -> int:
        return sum(len(s.cut(budget)) for s in shapes)

    lo, hi = 0.0, longest
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


__all__ = ["shape_key", "by_shape", "pack", "H200_SEED_TABLE", "GPU_DATASHEET", "Throughput", "Forecast", "throughput_for",
           "speed_vs_h200", "work_scale", "split_even", "job_seconds", "makespan", "forecast",
           "plan_auto", "JOB_OVERHEAD_S", "KNEE_FRACTION", "WALL_TOLERANCE"]
