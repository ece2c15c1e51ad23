"""Train a group of same-shaped runs in one process, as one stacked computation.

``train_group(cfgs, out_dirs)`` trains R runs that share the fields of ``config.SHAPE_FIELDS`` (the
shapes, the commit schedule, the optimiser's kind and the minibatch schedule) and may differ in
everything else (seeds, train_frac for full-batch runs, lr, weight_decay, betas, momentum,
warmup and lr schedule, init_scale, fixed_weight_norm, label_noise, stop_after_grok). Each
run's directory ends up exactly as ``grokhpc.train.run_training`` leaves it -- same files, same
``state.pt`` contents -- so a solo ``run_training`` can resume a packed run and ``train_group``
can resume a solo one.

How the runs are stacked:

* parameters: every weight is one leaf tensor with a leading run axis, ``(R, *shape)``, built
  from ``grokhpc.model.build_model(cfg)`` of each run (the solo initialisation, run by run);
* forward, two ways (``exact``):
  - batched (the default on GPUs): one computation over the stacked weights, the run axis
    carried through every kernel, so run ``r`` only ever touches its own weights and rows (one
    run turning NaN cannot reach another). For one layer without LayerNorm (ReLU) that is
    ``grokhpc.lastpos.last_logits`` -- the solo fast path's code -- with batched einsums,
    gathers offset per run and ``bmm``; for other shapes it is the readable hooked
    ``Transformer.forward`` called per run under ``torch.func.vmap``
    (:func:`hooked_last_logits`). It equals the solo logits and gradients up to float32
    rounding, not bit for bit: batched kernels sum in other orders. Full-batch runs' train
    (and test) rows are gathered in the solo order and padded at the end to the group's
    longest; padded rows are masked out of the loss and accuracy, which are each run's mean
    over its own rows (the solo ``mean``). Minibatch runs share n_train, so each step gathers
    every run's k-th minibatch (drawn from its own generator) without padding;
  - exact (the default on CPU): the model's own ``last_logits`` (its choice of fast path or
    hooked forward) called run by run through ``torch.func.functional_call`` with views of the
    stacked weights, each on its own unpadded rows, exactly as a solo run calls it.
    Bit-identical to solo runs (tests check whole runs file by file). On a CPU the cores are
    busy at R = 1 already, so batching the forward buys little there;
* optimiser (``grokhpc.stacked_optim``): ``StackedAdamW`` (adamw; adam with
  ``decoupled=False``) or ``StackedSGD`` holds the stacked state. In batched mode its step is
  torch's single-tensor math with per-run lr, weight decay, betas or momentum broadcast along
  the run axis, a few kernels per weight whatever R is; each elementwise operation is the one
  torch's CPU kernel performs, so it is bit-identical there (tests check this). In exact mode
  it calls torch's own functional optimiser once per run on views of the stacks, so it takes
  the solo optimiser's path on every device (foreach kernels on CUDA). Each epoch sets each
  run's lr from its own schedule (``grokhpc.optim.lr_factor``; where the optimiser's columns
  live on a GPU, the same formula is computed there, ``stacked_optim.LrSchedules``, so that no
  epoch copies from the host); after each step,
  ``fixed_weight_norm`` runs are rescaled to their own initial norm;
* step mode (batched mode, ``grokhpc.step_mode``): how the step is issued -- per weight
  (eager, the default), Adam(W) over one flat buffer (fused; bit-identical to eager on CPU),
  captured in CUDA graphs (graph) or compiled (compile);
* early stop: a ``stop_after_grok`` run that reaches its stop epoch is evaluated and committed
  there and finished (measures, summary) as a solo run would be; the others' state is synced
  into their shadows and restacked without it, so the group shrinks as its runs finish;
* bookkeeping: every run keeps a solo ``grokhpc.train.Trainer`` as its "shadow". At each commit
  the stacked weights, optimiser moments and curves are copied into the shadows and each
  shadow's own ``commit`` writes its directory, so files and state.pt are the solo ones by
  construction. A stack is (re)built from shadows: at a commit point (which is also how a
  killed job resumes), or synced in memory when a run leaves the group.

Epoch alignment on resume: all runs of a group commit at the same epochs (same checkpoint_every
and n_epochs), so they normally resume at the same epoch. When a kill lands between two runs'
commits (or a run was advanced alone), the runs at the lowest epoch are stacked on their own
and trained up to the next epoch some other run sits at -- a commit epoch for both -- and
then the groups merge. Nothing is rolled back; every run goes on exactly from its own state.

Divergence: after each commit interval the train losses of the interval are checked (one
device sync per commit). A run with a non-finite loss is not committed: its directory keeps its
last finite commit, ``error.txt`` says ``diverged: ...``, and the others go on without it.
A later ``train_group`` call skips runs marked diverged (training is deterministic, they would
diverge again) unless ``retry_diverged=True``.

Timing: ``wall_time_s`` of a packed run is the wall time of the group's training (each run
lived through all of it); a run's share of the device is ``wall_time_s / R``.
"""

from __future__ import annotations

import math
import time
import traceback
from pathlib import Path
from typing import Callable, Sequence

from . import preempt
from .config import RunConfig, shape_fields
from .divergence import first_nonfinite, is_diverged, mark_diverged
from .runtime import DEFAULT_STATE_EVERY_S, STEP_MODES, matmul_precision, resolve_device
from .stack import Stack
from .store import RunDir, RunDirError


class GroupError(ValueError):
    """Runs that cannot be trained as one group (shapes differ, duplicate runs or directories)."""


def check_group(cfgs: Sequence[RunConfig], out_dirs: Sequence) -> None:
    """Raise GroupError unless ``cfgs`` can be stacked and each has its own directory."""
    if len(cfgs) == 0:
        raise GroupError("train_group: expected at least one run, got none")
    if len(cfgs) != len(out_dirs):
        raise GroupError(f"train_group: {len(cfgs)} configs but {len(out_dirs)} out_dirs")
    first = cfgs[0]
    for i, cfg in enumerate(cfgs):
        for key in shape_fields(first):
            if getattr(cfg, key) != getattr(first, key):
                raise GroupError(
                    f"train_group: {key}: expected the same value in every run of a group, "
                    f"got {getattr(first, key)!r} (run 0, {first.run_id}) and "
                    f"{getattr(cfg, key)!r} (run {i}, {cfg.run_id})")
    ids = [c.run_id for c in cfgs]
    if len(set(ids)) != len(ids):
        dup = next(x for x in ids if ids.count(x) > 1)
        raise GroupError(f"train_group: run {dup} appears twice in one group")
    paths = [Path(d).resolve() for d in out_dirs]
    if len(set(paths)) != len(paths):
        dup = next(x for x in paths if paths.count(x) > 1)
        raise GroupError(f"train_group: out_dirs: {dup} is given to two runs")


def _mark_diverged(t, epoch_hint: int, window_start: int, curve) -> None:
    """The run marked diverged by the rule a solo run follows (grokhpc.divergence)."""
    mark_diverged(t.run, t.cfg, first_nonfinite(curve, window_start, epoch_hint), "train loss",
                  window_start)


def _commit_all(commits: list, max_workers: int = 8) -> None:
    """Each (trainer, checkpoint, state) as the trainer's solo ``commit``. The runs' files are
    independent, so their writes and fsyncs overlap in a few threads."""
    if len(commits) <= 1:
        for t, row, state in commits:
            t.commit(checkpoint=row, state=state)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(max_workers, len(commits))) as pool:
        for f in [pool.submit(t.commit, checkpoint=row, state=state)
                  for t, row, state in commits]:
            f.result()


def _epoch_end(stack: Stack) -> tuple[list[int], list[int]]:
    """After an epoch's steps, the solo loop's evaluation for every run (test every
    ``eval_every`` epochs; test and train at a run's last epoch, also when it has just grokked
    its way there); returns (runs that commit now, runs at their last epoch)."""
    cfg, e = stack.cfg, stack.epoch
    stops = stack.stop_epochs()
    last = [r for r in range(stack.R) if e == stops[r]]
    if e % cfg.eval_every == 0:
        stack.evaluate(None, last)
    elif last:
        stack.evaluate(last, last)
    stops = stack.stop_epochs()
    just = [r for r in range(stack.R) if r not in last and e == stops[r]]   # grokked just now
    if just:
        stack.evaluate(just, just)
        last = sorted(last + just)
    commit = list(range(stack.R)) if e % cfg.checkpoint_every == 0 else last
    return commit, last


def _fit_stack(stack: Stack, target: int, bar, log, background: bool = False):
    """Train ``stack`` up to epoch ``target`` (where another run sits), committing each run on its solo
    schedule: a checkpoint row every ``checkpoint_every`` epochs and at its own last epoch,
    state.pt when due (``Trainer.commit``) and at its last epoch. On SLURM's USR2 warning,
    every run's state is written at the next epoch boundary, then the signal goes on
    (grokhpc.preempt).

    Returns (the trainers that diverged, the trainers that reached their last epoch). Diverged
    runs are left at their last commit. Stops right after a commit that finds a divergence or
    ends a run before ``target``; the other runs' shadows then hold this epoch's state (synced,
    committed or not) and the caller restacks them. With ``background``, each commit's file
    writes run in a thread while the stack trains on (the shadows are not touched again until
    that commit is done; every commit is complete when this returns).
    """
    stack.clock = [time.perf_counter()] * stack.R
    pool = pending = None
    if background:
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(max_workers=1)
    try:
        while stack.epoch < target:
            stack.step()
            rows, last = _epoch_end(stack)
            if bar is not None:
                bar.update(stack.R)
            signalled = preempt.requested()
            commit = list(range(stack.R)) if signalled else rows
            if not commit:
                continue
            bad = stack.diverged(commit, last)
            if pending is not None:
                pending.result()  # the previous commit is on disk; shadows are free
                pending = None
            good = [r for r in commit if r not in bad]
            done = [r for r in good if r in last]
            ends = bool(bad) or (bool(done) and stack.epoch < target)
            for r in (range(stack.R) if ends else good):
                if r not in bad:
                    _sync_timed(stack, r)
            runs = [(stack.trainers[r], r in rows, True if r in last or signalled else None)
                    for r in good]
            if pool is not None and not ends and not signalled and stack.epoch < target:
                pending = pool.submit(_commit_all, runs)
            else:
                _commit_all(runs)
            for r in good:
                stack.last_commit[r] = stack.epoch
            _drop_diverged(stack, bad, log)
            if signalled:
                preempt.hand_on()
            if bar is not None:
                bar.set_postfix(epoch=stack.epoch, refresh=False)
            if ends:
                return [stack.trainers[r] for r in bad], [stack.trainers[r] for r in done]
        if pending is not None:
            pending.result()
            pending = None
        for r in range(stack.R):   # a target between rows (a state written on USR2)
            if stack.trainers[r].epoch != stack.epoch:
                _sync_timed(stack, r)
        return [], [stack.trainers[r] for r in range(stack.R)
                    if stack.epoch >= stack.stop_epochs()[r]]
    finally:
        if pending is not None:
            pending.result()
        if pool is not None:
            pool.shutdown(wait=True)


def _drop_diverged(stack: Stack, bad: list[int], log) -> None:
    """error.txt in each diverged run (its directory keeps its last finite commit)."""
    for r in bad:
        t = stack.trainers[r]
        start = stack.last_commit[r]
        window = stack.curves["train_loss"][r, start:stack.epoch + 1]
        _mark_diverged(t, stack.epoch, start, window.cpu().numpy())
        log(f"run {t.cfg.run_id}: diverged (non-finite train loss); dropped from the group, "
            "error.txt written")


def _sync_timed(stack: Stack, r: int) -> None:
    """Sync run ``r`` into its shadow and add the time since its last sync to its wall time."""
    now = time.perf_counter()
    stack.sync(r)
    stack.trainers[r].wall_time += now - stack.clock[r]
    stack.clock[r] = now


def _finish(t, log) -> None:
    """The solo ``finish`` (measures, summary, done); a failure goes to the run's error.txt."""
    from .train import finish

    try:
        finish(t)
    except Exception:
        t.run.write_error(traceback.format_exc())
        log(f"run {t.cfg.run_id}: finishing failed; see {t.run.file('error.txt')}")
        return
    t.run.clear_error()


_is_diverged = is_diverged   # grokhpc.divergence's rule


def _train_all(trainers: list, dev, exact, background: bool, bar, log,
               step_mode: str = "eager") -> tuple[list, list]:
    """Train ``trainers`` to their last epochs, the lowest-epoch runs stacked first; finish each
    run that stops early as soon as it does. Returns (diverged, finished) trainers."""
    n_epochs = trainers[0].cfg.n_epochs
    active = [t for t in trainers if t.epoch < t.stop_epoch()]
    diverged: list = []
    finished: list = []
    while active:
        low = min(t.epoch for t in active)
        lag = [t for t in active if t.epoch == low]
        ahead = sorted({t.epoch for t in active if t.epoch > low})
        target = ahead[0] if ahead else n_epochs
        if ahead:
            log(f"{len(lag)} run(s) at epoch {low} catch up to epoch {target} first")
        stack = Stack(lag, dev, exact=exact, step_mode=step_mode, log=log)
        try:
            with preempt.armed():
                dropped, done = _fit_stack(stack, target, bar, log, background=background)
        except SystemExit:
            raise   # a requeue after SLURM's warning: every run's state is written
        except BaseException:
            tb = traceback.format_exc()
            for t in lag:
                t.run.write_error(tb)
            raise
        del stack
        diverged += dropped
        for t in done:   # complete at its own last epoch, as a solo run leaves it
            if t.epoch < n_epochs:
                log(f"run {t.cfg.run_id}: stopped at epoch {t.epoch} ({t.cfg.stop_after_grok}"
                    f" epochs after grokking at {t.grok_epoch}); the others go on")
            _finish(t, log)
            finished.append(t)
        active = [t for t in active if t.epoch < t.stop_epoch() and t not in dropped]
    return diverged, finished


def train_group(cfgs: Sequence[RunConfig], out_dirs: Sequence, device=None,
                progress_bar: bool = True, log: Callable = print,
                retry_diverged: bool = False, exact: bool | None = None,
                background_commits: bool | None = None,
                state_every_s: float | None = None,
                step_mode: str | None = None) -> list[RunDir]:
    """Train ``cfgs`` into ``out_dirs`` as one stacked computation; resumes each run from its
    own state; returns each run's RunDir (in order). Complete runs are left alone; a run that
    diverges is marked failed (error.txt) and the others go on. Raises GroupError for runs
    that cannot be stacked, RunDirError for a directory holding another run (before any
    training), and re-raises a failure of the stacked computation after writing error.txt into
    every run it was training.

    ``exact``: run each run's forward with the solo code, one run after another, on views of
    the stacked weights (bit-identical to solo runs; the default on CPU), or as one batched
    computation over all runs (the default on GPUs). The optimiser step, evaluation
    bookkeeping and commits are stacked either way.

    ``background_commits`` (default: on for GPUs): a commit's file writes (checkpoint rows,
    state.pt, progress, curves of every run) overlap the next epochs' training in a thread;
    each commit still completes before the next one starts and before this returns.
    ``state_every_s``: seconds between a run's state.pt writes (``run_training``'s).

    ``step_mode`` (batched mode): eager (the default), fused, graph or compile -- how the
    step is issued to the device (``grokhpc.step_mode``); None: $GROKHPC_STEP_MODE or eager.

    Training runs at the group's ``matmul_precision`` (the process's own is restored after).
    """

    cfgs = list(cfgs)
    out_dirs = [Path(d) for d in out_dirs]
    check_group(cfgs, out_dirs)
    runs = [RunDir(d) for d in out_dirs]
    _refuse_foreign_dirs(cfgs, runs)
    import torch

    dev = resolve_device(device if device is not None else cfgs[0].device) \
        if not isinstance(device, torch.device) else device
    background = (dev.type != "cpu") if background_commits is None else bool(background_commits)
    mode = _step_mode(step_mode, cfgs[0], dev, exact, log)
    with matmul_precision(cfgs[0].matmul_precision):   # recorded in each attempt's provenance
        trainers = _open_unfinished(cfgs, runs, dev, retry_diverged, log, state_every_s)
        if not trainers:
            return runs
        bar = _run_epochs_bar(trainers) if progress_bar else None
        try:
            diverged, finished = _train_all(trainers, dev, exact, background, bar, log, mode)
        finally:
            if bar is not None:
                bar.close()
    for t in trainers:   # runs that were already at their last epoch when opened
        if t.epoch < t.stop_epoch() or any(t is d for d in diverged + finished):
            continue
        _finish(t, log)
    for t in trainers:   # each run's lock (on an exception, the trainers' end lets them go)
        t.close()
    return runs


def _run_epochs_bar(trainers: list):
    """A progress bar over the run-epochs left to train."""
    from tqdm.auto import tqdm

    return tqdm(total=sum(t.cfg.n_epochs - t.epoch for t in trainers), unit="run-epoch",
                desc=f"{len(trainers)} runs", dynamic_ncols=True, mininterval=1.0)


def _step_mode(step_mode: str | None, cfg: RunConfig, dev, exact: bool | None, log) -> str:
    """The group's step mode (``grokhpc.step_mode.resolve_step_mode``); GroupError naming the
    argument or the environment variable for a word that is none."""
    from .step_mode import resolve_step_mode

    exact = (dev.type == "cpu") if exact is None else bool(exact)
    try:
        return resolve_step_mode(step_mode, cfg, dev, exact, log)
    except ValueError as e:
        raise GroupError(f"train_group: {e}") from None


def _refuse_foreign_dirs(cfgs: list, runs: list) -> None:
    """RunDirError for a directory that holds another run, before anything is touched."""
    for cfg, run in zip(cfgs, runs):
        if run.exists() and run.read_config().get("run_id") != cfg.run_id:
            raise RunDirError(f"{run.file('config.json')}: holds run "
                              f"{run.read_config().get('run_id')}, not {cfg.run_id}; "
                              "use another directory")


def _open_unfinished(cfgs: list, runs: list, dev, retry_diverged: bool, log,
                     state_every_s: float | None = None) -> list:
    """A solo Trainer (new or resumed) for each run still to train; complete runs and runs
    marked diverged (unless ``retry_diverged``) are left alone with one line each."""
    from .train import Trainer

    trainers = []
    for cfg, run in zip(cfgs, runs):
        if run.exists() and run.is_complete():
            prog = run.read_progress()
            log(f"run {cfg.run_id} in {run.path} is already complete "
                f"({prog['epoch']}/{prog['n_epochs']} epochs); nothing to do")
            continue
        if run.exists() and _is_diverged(run) and not retry_diverged:
            log(f"run {cfg.run_id} in {run.path} diverged before (see error.txt); skipped")
            continue
        t = Trainer.open(cfg, run.path, dev, state_every_s)
        if t.epoch > 0:
            log(f"run {cfg.run_id}: resuming at epoch {t.epoch}/{cfg.n_epochs}")
        trainers.append(t)
    return trainers


# ---- sizing a job ------------------------------------------------------------------------------
def split_rows(cfg: RunConfig) -> tuple[int, int]:
    """(train rows, test rows) of a run, rounded as ``bytes_per_run`` counts them (up)."""
    n_all = cfg.p * (cfg.p - 1) if cfg.op == "div" else cfg.p * cfg.p
    return math.ceil(n_all * cfg.train_frac), n_all - int(n_all * cfg.train_frac)


def padded_rows(cfgs: Sequence[RunConfig]) -> tuple[int, int]:
    """(train rows, test rows) every run of a group of ``cfgs`` holds: a batched group pads
    each split to its longest run's (``Stack._rows``), whichever run comes first."""
    rows = [split_rows(c) for c in cfgs]
    return max(r[0] for r in rows), max(r[1] for r in rows)


def group_bytes(cfgs: Sequence[RunConfig]) -> int:
    """Estimated device bytes of a batched group of ``cfgs``: each run at the group's padded
    rows (``bytes_per_run(cfg, padded_rows(cfgs))``)."""
    cfgs = list(cfgs)
    return len(cfgs) * bytes_per_run(cfgs[0], padded_rows(cfgs))


def bytes_per_run(cfg: RunConfig, rows: tuple[int, int] | None = None) -> int:
    """Estimated device bytes one run adds to a batched group (float32 weights), in floats x 4,
    its rows padded to ``rows`` (the group's ``padded_rows``; default: its own split):

    * weights: stacked params + grads + two Adam moments + the shadow Trainer's params and two
      moments = ``7 * n_params``;
    * tables (``grokhpc.lastpos.tables``, kept for the backward, with their gradients): the
      embeddings ``n V d``, keys and values ``2 (n-1) V h e``, scores ``(n-1) V h`` and
      ``W_out @ W_U``: ``3 x`` their sum;
    * train rows (padded to the group's longest, ``rows``), saved for the
      backward and doubled for its transient gradients: per row the scores and pattern
      (``3 n h``), the gathered values and their pattern-weighted product (``2 (n-1) h e``),
      the last token's spread terms and the mix (``2 h e + d + h``), attention output and
      residual (``2 d``), the MLP's input and ReLU (``2 d_mlp``), and the direct read-out and
      logits in float32, the logits in float64 and their log-softmax (``6 p``);
    * test rows, scored in inference mode (nothing saved) and, in a batched group, a chunk of
      runs at a time whose rows number no more than the group's train rows:
      ``2 (n-1) h e + 2 d_mlp + 6 p`` per row; the peak is the larger of the two terms.
    """
    n, h, e, d, m, p, V = 3, cfg.n_heads, cfg.d_head, cfg.d_model, cfg.d_mlp, cfg.p, cfg.d_vocab
    n_params = V * d + n * d + 4 * h * d * e + 2 * d * m + d * p
    n_train, n_test = split_rows(cfg) if rows is None else rows
    tables = n * V * d + 2 * (n - 1) * V * h * e + (n - 1) * V * h + m * p
    per_row = 3 * n * h + 2 * (n - 1) * h * e + 2 * h * e + d + h + 2 * d + 2 * m + 6 * p
    train = n_train * 2 * per_row
    test = min(n_test, n_train) * (2 * (n - 1) * h * e + 2 * m + 6 * p)
    return 4 * (7 * n_params + 3 * tables + max(train, test))


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


# ---- command line ------------------------------------------------------------------------------
def configs_from_dirs(dirs: Sequence) -> list[RunConfig]:
    """The RunConfig of each run directory's config.json (as the launcher writes them)."""
    from .config import ConfigError, from_dict

    cfgs = []
    for d in dirs:
        run = RunDir(d)
        if not run.exists():
            raise RunDirError(f"{run.path}: not a run directory (no config.json)")
        raw = dict(run.read_config())
        run_id = raw.pop("run_id", None)
        cfg = from_dict(raw, source=str(run.file("config.json")))
        if run_id is not None and run_id != cfg.run_id:
            raise ConfigError(f"{run.file('config.json')}: run_id: expected {cfg.run_id} "
                              f"(the hash of its fields), got {run_id!r}")
        cfgs.append(cfg)
    return cfgs


def build_parser():
    import argparse

    from .train import minutes_arg

    ap = argparse.ArgumentParser(
        prog="python -m grokhpc.train_batched",
        description="Train the runs of existing run directories (each with its config.json) "
                    "as one stacked group; resumes each from its own state.")
    ap.add_argument("run_dirs", nargs="+", help="run directories of same-shaped runs")
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: the runs' own)")
    ap.add_argument("--mode", choices=("auto", "exact", "batched"), default="auto",
                    help="exact: solo forward run by run (bit-identical to solo runs); "
                         "batched: one batched computation; auto: exact on CPU, else batched")
    ap.add_argument("--step-mode", choices=STEP_MODES, default=None,
                    help="batched mode: how each step is issued (default: $GROKHPC_STEP_MODE "
                         "or eager); fused: Adam(W) over one flat buffer; graph: fused, the "
                         "step captured in a CUDA graph; compile: fused, with torch.compile")
    ap.add_argument("--retry-diverged", action="store_true",
                    help="train runs marked diverged (error.txt) again")
    ap.add_argument("--state-every", type=minutes_arg, default=DEFAULT_STATE_EVERY_S / 60,
                    metavar="MINUTES",
                    help="minutes between writes of each run's resumable state.pt (default "
                         "%(default)g; 0: with every checkpoint row); also on SIGUSR2 and at "
                         "each run's end")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def main(argv: list[str] | None = None) -> int:
    import sys

    from .config import ConfigError

    args = build_parser().parse_args(argv)
    try:
        cfgs = configs_from_dirs(args.run_dirs)
        runs = train_group(cfgs, args.run_dirs, device=args.device,
                           progress_bar=not args.no_progress,
                           retry_diverged=args.retry_diverged,
                           exact=None if args.mode == "auto" else args.mode == "exact",
                           step_mode=args.step_mode, state_every_s=args.state_every * 60)
    except (ConfigError, RunDirError, GroupError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    failed = [r for r in runs if r.read_error() is not None]
    for r in failed:
        print(f"error: {r.path}: {r.read_error().splitlines()[0]}", file=sys.stderr)
    return 1 if failed else 0


__all__ = ["train_group", "auto_runs_per_job", "bytes_per_run", "group_bytes", "padded_rows",
           "split_rows", "check_group", "GroupError", "configs_from_dirs", "main"]


if __name__ == "__main__":
    import sys

    sys.exit(main())
