"""How a packed group's batched step is issued to the device: ``step_mode``.

The math is the same in every mode (the batched fast path of ``grokhpc.lastpos`` and the
stacked Adam(W) of ``grokhpc.stacked_optim``); the modes differ in how many kernels a step
launches and how:

* ``eager`` (the default): today's step -- the optimiser's few elementwise kernels per weight;
* ``fused``: Adam(W) over one flat (R, N) buffer of all weights (``FlatStackedAdamW``): about
  ten kernels per step for the whole group. Per element the same operations, so on a CPU
  its runs are bit-identical to ``eager``'s;
* ``graph``: ``fused``, with the whole full-batch training step (forward, backward, optimiser,
  fixed-norm rescale) and the test set's scoring each recorded once in a CUDA graph
  (``torch.cuda.graphs``) after a few eager calls, then replayed: one launch per step. The
  kernels are ``fused``'s (Adam's bias corrections computed on the device), so its runs should
  match ``fused``'s bit for bit (``benchmarks/gpu_batched.py --only check`` compares them on a
  GPU). CUDA and full-batch fast-path groups only;
* ``compile``: ``fused``, with the batched loss (forward) and the Adam(W) update compiled by
  ``torch.compile`` (generated kernels: equal to ``fused`` up to float32 rounding).

Batched mode only: exact mode calls each run's own solo forward and torch's own optimiser, so
it steps as it always did. A mode that cannot apply falls back with one log line. The mode is
the job's setting (``runtime.JobSettings.step_mode``: a sweep's ``launcher.step_mode``,
``python -m grokhpc.train_batched --step-mode``); ``GROKHPC_STEP_MODE`` overrides it for every
packed group of a process tree (SLURM jobs inherit the launcher's environment), and each group
says so in one line.
"""

from __future__ import annotations

import os
from typing import Callable

from .config import ConfigError, shown
from .lastpos import batched_fast_path
from .runtime import STEP_MODES

STEP_MODE_ENV = "GROKHPC_STEP_MODE"
WARMUP_CALLS = 3   # eager calls before a capture (on a side stream, as torch.cuda.graphs asks)


def requested(mode: str, log: Callable, source: str = "the job's step_mode") -> str:
    """``mode`` (the setting named ``source``), or $GROKHPC_STEP_MODE where it is set and says
    otherwise (one line saying it overrides the setting); ConfigError (one line) for a word of
    the environment that is no mode. The one rule: a launched job applies it before training,
    a group (``train_group``, its command) where its settings are resolved."""
    env = os.environ.get(STEP_MODE_ENV, "").strip()
    if not env:
        return mode
    if env not in STEP_MODES:
        raise ConfigError(f"${STEP_MODE_ENV}: expected one of {', '.join(STEP_MODES)}, "
                          f"got {shown(env)}")
    if env != mode:
        log(f"${STEP_MODE_ENV}={env} overrides {source} ({mode})")
    return env


def resolve(mode: str, cfg, device, exact: bool, log: Callable) -> str:
    """The step mode a group of runs shaped like ``cfg`` trains with on ``device``: the one
    asked for (:func:`requested`) where it applies, otherwise the nearest that does (one log
    line saying why)."""
    import torch

    mode = requested(mode, log)
    if mode == "eager":
        return mode
    if exact:
        log(f"step_mode {mode}: exact mode steps each run with the solo code; eager used")
        return "eager"
    if mode == "graph":
        why = None
        if device.type != "cuda" or not torch.cuda.is_available():
            why = f"CUDA graphs need a CUDA device, this group trains on {device}"
        elif not cfg.full_batch:
            why = "minibatches are drawn on the host each step"
        elif not batched_fast_path(cfg):
            why = "only the one-layer fast path is captured"
        if why is not None:
            log(f"step_mode graph: {why}; the fused step is used")
            return "fused"
    if mode == "compile" and not batched_fast_path(cfg):
        log("step_mode compile: only the one-layer fast path is compiled; the fused step is "
            "used")
        return "fused"
    return mode


class GraphStep:
    """A stack's calls, each kind (``key``) recorded once in a CUDA graph and replayed after:
    the first ``WARMUP_CALLS`` calls of a kind run eagerly on a side stream, the next is
    captured (and run by replaying it). The Python of a captured call runs only at capture, so
    ``on_replay`` (e.g. the optimiser's host-side step count) is called before each later
    replay. Every replay rewrites the same output tensors: the caller copies them out before
    the next call. A capture that fails is logged once and that kind runs eagerly from then on.
    """

    def __init__(self, counts: Callable, log: Callable):
        self.counts, self.log = counts, log   # counts(): the host state a capture advances
        self.graphs: dict = {}
        self.outputs: dict = {}
        self.calls: dict = {}
        self.failed: set = set()
        self.pool = None   # every graph of the stack shares one memory pool

    def __call__(self, key: str, fn: Callable, on_replay: Callable | None = None):
        import torch

        if key in self.graphs:
            if on_replay is not None:
                on_replay()
            self.graphs[key].replay()
            return self.outputs[key]
        self.calls[key] = n = self.calls.get(key, 0) + 1
        if key in self.failed:
            return fn()
        if n <= WARMUP_CALLS:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = fn()
            torch.cuda.current_stream().wait_stream(side)
            return out
        return self._capture(key, fn)

    def _capture(self, key: str, fn: Callable):
        import torch

        graph, undo = torch.cuda.CUDAGraph(), self.counts()
        try:   # thread_local: a commit writing in the background may copy meanwhile
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                out = fn()
        except Exception as e:   # nothing ran: put the host state back, run it eagerly
            undo()
            self.failed.add(key)
            first = (str(e).splitlines() or [""])[0]
            self.log(f"step_mode graph: capturing the {key} step failed ({type(e).__name__}: "
                     f"{first}); it runs eagerly")
            torch.cuda.synchronize()
            return fn()
        if self.pool is None:
            self.pool = graph.pool()
        self.graphs[key], self.outputs[key] = graph, out
        graph.replay()
        return out


def compiled(fn: Callable) -> Callable:
    """``fn`` through torch.compile for fixed shapes (one graph per shape it meets)."""
    import torch

    return torch.compile(fn, dynamic=False)
