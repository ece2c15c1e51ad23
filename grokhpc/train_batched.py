"""Train a group of same-shaped runs in one process, as one stacked computation.

``train_group(cfgs, out_dirs)`` trains R runs that share p, op, the model sizes, n_epochs,
checkpoint_every, eval_every and loss_dtype, and may differ in everything else (data_seed,
model_seed, train_frac, lr, weight_decay, betas). Each run's directory ends up exactly as
``grokhpc.train.run_training`` leaves it -- same files, same ``state.pt`` contents -- so a solo
``run_training`` can resume a packed run and ``train_group`` can resume a solo one.

How the runs are stacked:

* parameters: every weight is one leaf tensor with a leading run axis, ``(R, *shape)``, built
  from ``grokhpc.model.build_model(cfg)`` of each run (the solo initialisation, run by run);
* forward, two ways (``exact``), both ``grokhpc.lastpos.last_logits`` -- the solo fast path's
  code:
  - batched (the default on GPUs): called once on the stacked weights, the run axis carried
    through every kernel (batched einsums for the tables, gathers offset per run, ``bmm`` for
    the row-sized products), so run ``r`` only ever touches its own weights and rows (one run
    turning NaN cannot reach another). It equals the solo logits and gradients up to float32
    rounding, not bit for bit: batched kernels sum in other orders. Each run's train (and
    test) rows are gathered in the solo order and padded at the end to the group's longest;
    padded rows are masked out of the loss and accuracy, which are each run's mean over its
    own rows (the solo ``mean``);
  - exact (the default on CPU): called run by run on views of the stacked weights, each on its
    own unpadded rows, exactly as a solo run calls it. Bit-identical to solo runs (tests check
    whole runs file by file). On a CPU the cores are busy at R = 1 already, so batching the
    forward buys little there;
* optimiser: ``StackedAdamW`` holds the stacked moments. In batched mode its step is
  ``torch.optim.AdamW``'s single-tensor math (decoupled weight decay, bias corrections per
  run) with per-run lr, weight decay and betas broadcast along the run axis, ~8 kernels per
  weight whatever R is; each elementwise operation is the one torch's CPU kernel performs, so
  it is bit-identical there (tests check this). In exact mode it calls torch's own functional
  AdamW once per run on views of the stacks, so it takes the solo optimiser's path on every
  device (foreach kernels on CUDA);
* bookkeeping: every run keeps a solo ``grokhpc.train.Trainer`` as its "shadow". At each commit
  the stacked weights, optimiser moments and curves are copied into the shadows and each
  shadow's own ``commit`` writes its directory, so files and state.pt are the solo ones by
  construction. A stack is always (re)built from shadows that are at a commit point, which is
  also how a killed job resumes.

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
from typing import Any, Callable, NamedTuple, Sequence

from .config import RunConfig
from .store import RunDir, RunDirError

# Fields that must be equal across a group: they fix tensor shapes and the commit schedule.
SHAPE_FIELDS = ("p", "op", "n_heads", "d_model", "d_head", "d_mlp", "n_epochs",
                "checkpoint_every", "eval_every", "loss_dtype")
DIVERGED_PREFIX = "diverged:"
ADAM_EPS = 1e-8  # torch.optim.AdamW's default, which grokhpc.train.make_optimizer uses


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
        for key in SHAPE_FIELDS:
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


class StackedAdamW:
    """``torch.optim.AdamW`` (single-tensor path, amsgrad off) for R runs stacked on dim 0.

    Per-run scalars become float32 (R, 1, ...) tensors holding exactly the value torch's CPU
    kernel would cast the Python scalar to; every elementwise op then matches torch's kernels:
    ``mul_(1 - lr*wd)``, ``lerp_(g, 1 - b1)``, ``mul_(b2).addcmul_((1 - b2)*g, g)``,
    ``sqrt / bc2_sqrt + eps``, ``addcdiv_((-step_size)*m, denom)`` -- addcmul/addcdiv with a
    scalar ``value`` compute ``value*t1`` first and then the fused kernel, so folding a per-run
    ``value`` into ``t1`` gives the same bits.
    """

    def __init__(self, params: list, lrs, weight_decays, betas, steps, exp_avgs, exp_avg_sqs,
                 host_scalars: bool | None = None, per_run_torch: bool = False):
        import torch

        self.params = params
        # per_run_torch: instead, call torch's own functional AdamW once per run on views of the
        # stacks (foreach on CUDA, single-tensor on CPU, as a solo run's optimiser decides):
        # the solo bits on every device, at ~10 kernels per run per step
        self.per_run_torch = per_run_torch
        self._step_ts = [[torch.tensor(float(s), dtype=torch.get_default_dtype())
                          for _ in params] for s in steps]
        self.host_scalars = (params[0].device.type == "cpu") if host_scalars is None \
            else bool(host_scalars)
        self.exp_avgs, self.exp_avg_sqs = exp_avgs, exp_avg_sqs
        self.lrs = [float(x) for x in lrs]
        self.wds = [float(x) for x in weight_decays]
        self.b1 = [float(b[0]) for b in betas]
        self.b2 = [float(b[1]) for b in betas]
        self.steps = [int(s) for s in steps]
        dev = params[0].device

        def col(values):
            return torch.tensor(values, dtype=params[0].dtype, device=dev)

        self._decay = col([1 - lr * wd for lr, wd in zip(self.lrs, self.wds)])
        self._w1 = col([1 - b for b in self.b1])
        self._b2 = col(self.b2)
        self._w2 = col([1 - b for b in self.b2])
        self._col = col

    @staticmethod
    def _b(t, like):
        return t.view((-1,) + (1,) * (like.dim() - 1))

    def _corrections(self):
        """(-lr / (1 - b1^t), sqrt(1 - b2^t)) per run as float32 columns: from Python floats as
        torch's step computes them (``host_scalars``, the default on CPU), or in float64 on the
        device (the default elsewhere: no host-to-device copy per step; equal to the Python
        values up to float64 rounding)."""
        import torch

        if self.host_scalars:
            bc1 = [1 - b1 ** s for b1, s in zip(self.b1, self.steps)]
            bc2 = [1 - b2 ** s for b2, s in zip(self.b2, self.steps)]
            return (self._col([-(lr / b) for lr, b in zip(self.lrs, bc1)]),
                    self._col([b ** 0.5 for b in bc2]))
        c = getattr(self, "_dev64", None)
        if c is None:  # first step: the counts already include it
            dev = self.params[0].device
            c = self._dev64 = {k: torch.tensor(v, dtype=torch.float64, device=dev) for k, v in
                               (("lr", self.lrs), ("b1", self.b1), ("b2", self.b2),
                                ("t", self.steps))}
        else:
            c["t"] += 1
        neg_step = -(c["lr"] / (1 - c["b1"] ** c["t"]))
        bc2_sqrt = (1 - c["b2"] ** c["t"]).sqrt()
        return neg_step.to(self.params[0].dtype), bc2_sqrt.to(self.params[0].dtype)

    def _torch_step(self) -> None:
        import torch
        from torch.optim.adam import adam

        with torch.no_grad():
            for r in range(len(self.steps)):
                adam([p[r] for p in self.params], [p.grad[r] for p in self.params],
                     [m[r] for m in self.exp_avgs], [v[r] for v in self.exp_avg_sqs], [],
                     self._step_ts[r], foreach=None, capturable=False, differentiable=False,
                     fused=None, grad_scale=None, found_inf=None, has_complex=False,
                     decoupled_weight_decay=True, amsgrad=False, beta1=self.b1[r],
                     beta2=self.b2[r], lr=self.lrs[r], weight_decay=self.wds[r], eps=ADAM_EPS,
                     maximize=False)

    def step(self) -> None:
        import torch

        self.steps = [s + 1 for s in self.steps]
        if self.per_run_torch:
            return self._torch_step()
        neg_step, bc2_sqrt = self._corrections()
        with torch.no_grad():
            for p, m, v in zip(self.params, self.exp_avgs, self.exp_avg_sqs):
                g = p.grad
                if any(wd != 0 for wd in self.wds):
                    p.mul_(self._b(self._decay, p))
                m.lerp_(g, self._b(self._w1, p))
                v.mul_(self._b(self._b2, p)).addcmul_(self._b(self._w2, p) * g, g)
                denom = (v.sqrt() / self._b(bc2_sqrt, p)).add_(ADAM_EPS)
                p.addcdiv_(self._b(neg_step, p) * m, denom)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None


# ---- a stack of runs at the same epoch ---------------------------------------------------------
class Rows(NamedTuple):
    """The rows of R runs for the batched forward, padded to the longest run's."""

    tokens: Any        # (R, b, n) long
    labels: Any        # (R, b) long
    mask: Any          # (R, b) bool, real rows; None when no run is padded
    queries: Any       # grokhpc.lastpos.Queries of ``tokens``

    def runs(self, a: int, b: int) -> "Rows":
        """Runs a..b-1 only."""
        q = self.queries
        return Rows(self.tokens[a:b], self.labels[a:b],
                    None if self.mask is None else self.mask[a:b],
                    type(q)(q.tokens, q.index[a:b], q.onehot[a:b]))


class Stack:
    """Runs at the same epoch, stacked on one device; built from (and written back into) their
    solo ``Trainer`` shadows."""

    def __init__(self, trainers: list, device, exact: bool | None = None):
        import torch

        self.trainers, self.device = trainers, device
        self.exact = (torch.device(device).type == "cpu") if exact is None else bool(exact)
        cfg = trainers[0].cfg
        self.cfg = cfg
        epochs = {t.epoch for t in trainers}
        if len(epochs) != 1:
            raise RuntimeError(f"Stack: runs at different epochs {sorted(epochs)}")
        self.epoch = epochs.pop()
        R = len(trainers)
        self.R = R
        models = [t.model for t in trainers]
        self.names = [n for n, _ in models[0].named_parameters()]
        self.trainable = [n for n, p in models[0].named_parameters() if p.requires_grad]
        with torch.no_grad():
            self.P = {n: torch.stack([m.get_parameter(n).detach() for m in models]).clone()
                      for n in self.names}
        for n in self.trainable:
            self.P[n].requires_grad_(True)
        # optimiser moments from each shadow's torch.optim.AdamW (zeros and step 0 when fresh)
        steps, ms, vs = [], {n: [] for n in self.trainable}, {n: [] for n in self.trainable}
        for t, m in zip(trainers, models):
            st = [t.optimizer.state.get(m.get_parameter(n), {}) for n in self.trainable]
            steps.append(int(st[0]["step"].item()) if st[0] else 0)
            for n, s in zip(self.trainable, st):
                p = m.get_parameter(n)
                ms[n].append(s["exp_avg"] if s else torch.zeros_like(p))
                vs[n].append(s["exp_avg_sq"] if s else torch.zeros_like(p))
        with torch.no_grad():
            self.opt = StackedAdamW(
                [self.P[n] for n in self.trainable],
                [t.cfg.lr for t in trainers], [t.cfg.weight_decay for t in trainers],
                [t.cfg.betas for t in trainers], steps,
                [torch.stack(ms[n]).to(device) for n in self.trainable],
                [torch.stack(vs[n]).to(device) for n in self.trainable],
                per_run_torch=self.exact)
        self.curves = {k: torch.stack([t.curves[k] for t in trainers]).to(device)
                       for k in trainers[0].curves}
        if self.exact:
            self.train = [(t.train_tokens, t.train_labels) for t in trainers]
            self.test = [(t.test_tokens, t.test_labels) for t in trainers]
        else:
            self.train = self._rows([t.data.train_idx for t in trainers], trainers[0].data)
            self.test = self._rows([t.data.test_idx for t in trainers], trainers[0].data)
        self.last_commit = self.epoch

    def _rows(self, idx_list, data) -> Rows:
        """Each run's rows in the solo order, padded at the end to the longest."""
        import torch

        from .lastpos import queries_of

        sizes = [len(i) for i in idx_list]
        b = max(sizes)
        idx = torch.zeros((self.R, b), dtype=torch.long, device=self.device)
        for r, i in enumerate(idx_list):
            idx[r, : len(i)] = i.to(self.device)
        mask = None
        if min(sizes) != b:
            mask = torch.arange(b, device=self.device)[None, :] < torch.tensor(
                sizes, device=self.device)[:, None]
        tokens = data.tokens.to(self.device)[idx]
        return Rows(tokens, data.labels.to(self.device)[idx], mask,
                    queries_of(tokens, self.P[self.names[0]].dtype))

    # -- one epoch
    def _losses(self, rows):
        """(per-run losses (R,), per-run accuracies (R,)) of the current weights on ``rows``."""
        import torch

        from .lastpos import accuracy, cross_entropy, last_logits

        dtype = self.cfg.loss_dtype
        if not self.exact:
            logits = last_logits(self.P, rows.tokens, rows.queries)
            return (cross_entropy(logits, rows.labels, dtype, rows.mask),
                    accuracy(logits.detach(), rows.labels, rows.mask))
        # the solo forward, run by run, on each run's own weights (views of the stack: the
        # backward writes every run's gradient into its slice of the stacked .grad)
        views = {n: self.P[n].unbind(0) for n in self.names}
        losses, accs = [], []
        for r, (tokens, labels) in enumerate(rows):
            logits = last_logits({n: v[r] for n, v in views.items()}, tokens)
            losses.append(cross_entropy(logits, labels, dtype))
            accs.append(accuracy(logits.detach(), labels))
        return torch.stack(losses), torch.stack(accs)

    def step(self) -> None:
        losses, accs = self._losses(self.train)
        losses.sum().backward()
        self.opt.step()
        self.opt.zero_grad()
        e = self.epoch
        self.curves["train_loss"][:, e] = losses.detach()
        self.curves["train_acc"][:, e] = accs
        self.epoch += 1

    def _scored(self, rows):
        """``_losses`` in inference mode; the batched way goes through the runs in chunks so
        that scoring the (larger) test split needs no more memory than a training step."""
        import torch

        if self.exact:
            return self._losses(rows)
        n_train, n_rows = self.train.tokens.shape[1], rows.tokens.shape[1]
        chunk = max(1, (self.R * n_train) // max(n_rows, 1))
        if chunk >= self.R:
            return self._losses(rows)
        P, out = self.P, []
        try:
            for a in range(0, self.R, chunk):
                b = min(a + chunk, self.R)
                self.P = {k: v[a:b] for k, v in P.items()}
                out.append(self._losses(rows.runs(a, b)))
        finally:
            self.P = P
        return torch.cat([o[0] for o in out]), torch.cat([o[1] for o in out])

    def evaluate(self, train_too: bool = False) -> None:
        import torch

        with torch.inference_mode():
            splits = [("test", self.test)] + ([("train", self.train)] if train_too else [])
            for split, rows in splits:
                losses, accs = self._scored(rows)
                self.curves[f"{split}_loss"][:, self.epoch] = losses
                self.curves[f"{split}_acc"][:, self.epoch] = accs

    # -- durability
    def diverged(self) -> list[int]:
        """Runs with a non-finite train loss since the last commit (epochs last_commit..epoch)."""
        import torch

        hi = self.epoch + (1 if self.epoch == self.cfg.n_epochs else 0)
        window = self.curves["train_loss"][:, self.last_commit:hi]
        bad = ~torch.isfinite(window).all(dim=1)
        return [int(i) for i in torch.nonzero(bad).flatten().tolist()]

    def sync(self, r: int) -> None:
        """Copy run ``r``'s stacked state into its shadow Trainer (same epoch, same values)."""
        import torch

        t = self.trainers[r]
        with torch.no_grad():
            for n in self.names:
                t.model.get_parameter(n).copy_(self.P[n][r])
            for i, n in enumerate(self.trainable):
                p = t.model.get_parameter(n)
                st = t.optimizer.state[p]
                if not st:  # as torch.optim.Adam._init_group creates it
                    st["step"] = torch.tensor(0.0, dtype=torch.get_default_dtype())
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["step"].fill_(float(self.opt.steps[r]))
                st["exp_avg"].copy_(self.opt.exp_avgs[i][r])
                st["exp_avg_sq"].copy_(self.opt.exp_avg_sqs[i][r])
            for k, v in self.curves.items():
                t.curves[k] = v[r].to(t.curves[k].device).clone()
        t.epoch = self.epoch


def _mark_diverged(t, epoch_hint: int, window_start: int, curve) -> None:
    import numpy as np

    vals = np.asarray(curve)
    bad = np.nonzero(~np.isfinite(vals))[0]
    first = window_start + int(bad[0]) if len(bad) else epoch_hint
    cfg = t.cfg
    t.run.write_error(
        f"{DIVERGED_PREFIX} run {cfg.run_id}: non-finite train loss first at epoch {first} "
        f"(lr={cfg.lr}, weight_decay={cfg.weight_decay}, betas={list(cfg.betas)}); the run "
        f"directory keeps its last finite commit, epoch {window_start}\n")


def _commit_all(trainers: list, max_workers: int = 8) -> None:
    """Each trainer's solo ``commit`` (checkpoint row, state.pt, progress, curves). The runs'
    files are independent, so their writes and fsyncs overlap in a few threads."""
    if len(trainers) <= 1:
        for t in trainers:
            t.commit(checkpoint=True)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(max_workers, len(trainers))) as pool:
        for f in [pool.submit(t.commit, checkpoint=True) for t in trainers]:
            f.result()


def _fit_stack(stack: Stack, target: int, bar, log, background: bool = False) -> list:
    """Train ``stack`` up to epoch ``target`` (a commit epoch), committing on the solo schedule.

    Returns the trainers that diverged (they are left at their last commit); stops right after
    a commit that finds any, so the caller restacks the others. With ``background``, each
    commit's file writes run in a thread while the stack trains on (the shadows are not
    touched again until that commit is done; every commit is complete when this returns).
    """
    cfg = stack.cfg
    t0 = time.perf_counter()
    pool = pending = None
    if background:
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(max_workers=1)
    try:
        while stack.epoch < target:
            stack.step()
            last = stack.epoch == cfg.n_epochs
            if stack.epoch % cfg.eval_every == 0 or last:
                stack.evaluate(train_too=last)
            if bar is not None:
                bar.update(stack.R)
            if stack.epoch % cfg.checkpoint_every == 0 or last:
                now = time.perf_counter()
                elapsed, t0 = now - t0, now
                bad = stack.diverged()
                start = stack.last_commit
                if pending is not None:
                    pending.result()  # the previous commit is on disk; shadows are free
                    pending = None
                good = [t for r, t in enumerate(stack.trainers) if r not in bad]
                for r, t in enumerate(stack.trainers):
                    if r not in bad:
                        stack.sync(r)
                        t.wall_time += elapsed
                if pool is not None and not bad and stack.epoch < target:
                    pending = pool.submit(_commit_all, good)
                else:
                    _commit_all(good)
                stack.last_commit = stack.epoch
                if bad:
                    out = []
                    for r in bad:
                        t = stack.trainers[r]
                        window = stack.curves["train_loss"][r, start:stack.epoch + 1]
                        _mark_diverged(t, stack.epoch, start, window.cpu().numpy())
                        log(f"run {t.cfg.run_id}: diverged (non-finite train loss); dropped "
                            f"from the group, error.txt written")
                        out.append(t)
                    return out
                if bar is not None:
                    bar.set_postfix(epoch=stack.epoch, refresh=False)
        return []
    finally:
        if pending is not None:
            pending.result()
        if pool is not None:
            pool.shutdown(wait=True)


def _is_diverged(run: RunDir) -> bool:
    err = run.read_error()
    return bool(err) and err.startswith(DIVERGED_PREFIX)


def train_group(cfgs: Sequence[RunConfig], out_dirs: Sequence, device=None,
                progress_bar: bool = True, log: Callable = print,
                retry_diverged: bool = False, exact: bool | None = None,
                background_commits: bool | None = None) -> list[RunDir]:
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
    """
    from .train import Trainer, resolve_device

    cfgs = list(cfgs)
    out_dirs = [Path(d) for d in out_dirs]
    check_group(cfgs, out_dirs)
    runs = [RunDir(d) for d in out_dirs]
    for cfg, run in zip(cfgs, runs):  # refuse foreign directories before touching anything
        if run.exists() and run.read_config().get("run_id") != cfg.run_id:
            raise RunDirError(f"{run.file('config.json')}: holds run "
                              f"{run.read_config().get('run_id')}, not {cfg.run_id}; "
                              "use another directory")
    import torch

    torch.set_float32_matmul_precision("highest")
    dev = resolve_device(device if device is not None else cfgs[0].device) \
        if not isinstance(device, torch.device) else device
    background = (dev.type != "cpu") if background_commits is None else bool(background_commits)
    trainers = []
    for cfg, run in _runs_to_train(cfgs, runs, log, retry_diverged):
        t = Trainer.open(cfg, run.path, dev)
        if t.epoch > 0:
            log(f"run {cfg.run_id}: resuming at epoch {t.epoch}/{cfg.n_epochs}")
        trainers.append(t)
    if not trainers:
        return runs
    bar = None
    if progress_bar:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(cfgs[0].n_epochs - t.epoch for t in trainers), unit="run-epoch",
                   desc=f"{len(trainers)} runs", dynamic_ncols=True, mininterval=1.0)
    try:
        diverged = _train_stacks(trainers, dev, exact, bar, log, background)
    finally:
        if bar is not None:
            bar.close()
    _finish_all([t for t in trainers if not any(t is d for d in diverged)], log)
    for t in trainers:   # each run's lock (on an exception, the trainers' end lets them go)
        t.close()
    return runs


def _runs_to_train(cfgs, runs, log, retry_diverged: bool) -> list:
    """(cfg, run) of the runs neither complete nor (unless retried) marked diverged."""
    pending = []
    for cfg, run in zip(cfgs, runs):
        if run.exists() and run.is_complete():
            prog = run.read_progress()
            log(f"run {cfg.run_id} in {run.path} is already complete "
                f"({prog['epoch']}/{prog['n_epochs']} epochs); nothing to do")
            continue
        if run.exists() and _is_diverged(run) and not retry_diverged:
            log(f"run {cfg.run_id} in {run.path} diverged before (see error.txt); skipped")
            continue
        pending.append((cfg, run))
    return pending


def _train_stacks(trainers: list, dev, exact, bar, log, background: bool) -> list:
    """Train every trainer to n_epochs: the runs at the lowest epoch are stacked and trained
    up to the next epoch another run sits at, until all meet. Returns the runs that diverged.
    A failure of the stacked computation is written into each of its runs' error.txt."""
    n_epochs = trainers[0].cfg.n_epochs
    active = [t for t in trainers if t.epoch < n_epochs]
    diverged: list = []
    while active:
        low = min(t.epoch for t in active)
        lag = [t for t in active if t.epoch == low]
        ahead = sorted({t.epoch for t in active if t.epoch > low})
        target = ahead[0] if ahead else n_epochs
        if ahead:
            log(f"{len(lag)} run(s) at epoch {low} catch up to epoch {target} first")
        stack = Stack(lag, dev, exact=exact)
        try:
            dropped = _fit_stack(stack, target, bar, log, background=background)
        except BaseException:
            tb = traceback.format_exc()
            for t in lag:
                t.run.write_error(tb)
            raise
        del stack
        diverged += dropped
        active = [t for t in active if t.epoch < n_epochs and t not in dropped]
    return diverged


def _finish_all(trainers: list, log) -> None:
    """``grokhpc.train.finish`` (measures, summary, done) for each run trained to the end; a
    failure is written into that run's error.txt and the others go on."""
    from .train import finish

    for t in trainers:
        if t.epoch < t.cfg.n_epochs:
            continue
        try:
            finish(t)
        except Exception:
            t.run.write_error(traceback.format_exc())
            log(f"run {t.cfg.run_id}: finishing failed; see {t.run.file('error.txt')}")
            continue
        t.run.clear_error()


# ---- sizing a job ------------------------------------------------------------------------------
def bytes_per_run(cfg: RunConfig) -> int:
    """Estimated device bytes one run adds to a batched group (float32 weights), in floats x 4:

    * weights: stacked params + grads + two Adam moments + the shadow Trainer's params and two
      moments = ``7 * n_params``;
    * tables (``grokhpc.lastpos.tables``, kept for the backward, with their gradients): the
      embeddings ``n V d``, keys and values ``2 (n-1) V h e``, scores ``(n-1) V h`` and
      ``W_out @ W_U``: ``3 x`` their sum;
    * train rows (padded to the group's longest; here ``p^2 * train_frac``), saved for the
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
    n_all = p * (p - 1) if cfg.op == "div" else p * p
    n_train = math.ceil(n_all * cfg.train_frac)
    n_test = n_all - int(n_all * cfg.train_frac)
    tables = n * V * d + 2 * (n - 1) * V * h * e + (n - 1) * V * h + m * p
    per_row = 3 * n * h + 2 * (n - 1) * h * e + 2 * h * e + d + h + 2 * d + 2 * m + 6 * p
    train = n_train * 2 * per_row
    test = min(n_test, n_train) * (2 * (n - 1) * h * e + 2 * m + 6 * p)
    return 4 * (7 * n_params + 3 * tables + max(train, test))


def auto_runs_per_job(cfg: RunConfig, device=None, safety: float = 0.7,
                      cpu_default: int = 4, cap: int = 1024) -> int:
    """How many runs of ``cfg``'s shape to stack in one job on ``device``.

    CUDA: ``floor(safety * free_bytes / bytes_per_run(cfg))``, clamped to [1, cap], with
    ``free_bytes`` from ``torch.cuda.mem_get_info``. The estimate errs high (it counts every
    gradient as live at once; ``benchmarks/gpu_batched.py`` prints it beside the measured
    peak). CPU (or anything else): ``cpu_default`` -- on a CPU the stacked step already keeps
    the cores busy at R = 1, so packing saves per-job overhead, not compute.
    """
    import torch

    from .train import resolve_device

    dev = resolve_device(device if device is not None else cfg.device) \
        if not isinstance(device, torch.device) else device
    if dev.type != "cuda":
        return cpu_default
    free, _total = torch.cuda.mem_get_info(dev)
    return int(max(1, min(cap, math.floor(safety * free / bytes_per_run(cfg)))))


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

    ap = argparse.ArgumentParser(
        prog="python -m grokhpc.train_batched",
        description="Train the runs of existing run directories (each with its config.json) "
                    "as one stacked group; resumes each from its own state.")
    ap.add_argument("run_dirs", nargs="+", help="run directories of same-shaped runs")
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: the runs' own)")
    ap.add_argument("--mode", choices=("auto", "exact", "batched"), default="auto",
                    help="exact: solo forward run by run (bit-identical to solo runs); "
                         "batched: one batched computation; auto: exact on CPU, else batched")
    ap.add_argument("--retry-diverged", action="store_true",
                    help="train runs marked diverged (error.txt) again")
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
                           exact=None if args.mode == "auto" else args.mode == "exact")
    except (ConfigError, RunDirError, GroupError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    failed = [r for r in runs if r.read_error() is not None]
    for r in failed:
        print(f"error: {r.path}: {r.read_error().splitlines()[0]}", file=sys.stderr)
    return 1 if failed else 0


__all__ = ["train_group", "auto_runs_per_job", "bytes_per_run", "check_group", "GroupError",
           "StackedAdamW", "Stack", "Rows", "SHAPE_FIELDS", "configs_from_dirs", "main"]


if __name__ == "__main__":
    import sys

    sys.exit(main())
