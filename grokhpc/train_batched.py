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

import functools
import time
import traceback
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

from . import preempt
from .config import RunConfig
from .stacked_optim import FlatStackedAdamW, StackedAdamW, StackedSGD, _b, stacked_optimizer
from .divergence import first_nonfinite, is_diverged, mark_diverged
from .config import GROK_ACC, shape_fields
from .runtime import (DEFAULT_STATE_EVERY_S, STEP_MODES, deterministic_for,
                      deterministic_kernels, matmul_precision, resolve_device)
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


# ---- the forward of a stack --------------------------------------------------------------------
def uses_fast_path(cfg: RunConfig) -> bool:
    """Whether the batched forward can call ``grokhpc.lastpos.last_logits`` on the stacked
    weights: one layer, no LayerNorm, the ReLU read-out it implements. Other shapes go through
    the readable hooked forward over the stacked weights (``torch.func.vmap``)."""
    return cfg.n_layers == 1 and cfg.normalization == "none" and cfg.act_fn == "relu"


def _solo_caller(template):
    """A module whose forward is ``template.last_logits`` (the model's own dispatch between the
    fast path and the hooked forward), for ``torch.func.functional_call`` with one run's
    weights as ``model.<name>``."""
    import torch

    class LastLogits(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, tokens):
            return self.model.last_logits(tokens)

    return LastLogits(template)


def hooked_last_logits(template, P: dict, tokens):
    """``forward(tokens)[:, -1]`` of R stacked runs (tokens (R, b, n) -> (R, b, p)): the hooked
    forward of ``template`` called with each run's weights under ``torch.func.vmap``."""
    from torch.func import functional_call, vmap

    def one(params, toks):
        return functional_call(template, params, (toks,))[:, -1]

    return vmap(one)(P, tokens)


# ---- a stack of runs at the same epoch ---------------------------------------------------------
def host_counts(opt) -> Callable:
    """A function that puts ``opt``'s host-side step counts (and its gradients) back as they
    are now: a failed capture ran its Python but none of its kernels."""
    saved = {k: list(getattr(opt, k)) for k in ("steps", "started") if hasattr(opt, k)}

    def undo() -> None:
        for k, v in saved.items():
            setattr(opt, k, v)
        opt.zero_grad()
    return undo


class Rows(NamedTuple):
    """The rows of R runs for the batched forward, padded to the longest run's."""

    tokens: Any        # (R, b, n) long
    labels: Any        # (R, b) long
    mask: Any          # (R, b) bool, real rows; None when no run is padded
    queries: Any       # grokhpc.lastpos.Queries of ``tokens`` (None off the fast path)

    def runs(self, a: int, b: int) -> "Rows":
        """Runs a..b-1 only."""
        q = self.queries
        return Rows(self.tokens[a:b], self.labels[a:b],
                    None if self.mask is None else self.mask[a:b],
                    None if q is None else type(q)(q.tokens, q.index[a:b], q.onehot[a:b]))


def fast_losses(P: dict, rows: Rows, dtype: str):
    """(per-run losses (R,), per-run accuracies (R,)) of stacked weights ``P`` on ``rows`` by
    the batched fast path (``grokhpc.lastpos.last_logits``)."""
    from .lastpos import accuracy, cross_entropy, last_logits

    logits = last_logits(P, rows.tokens, rows.queries)
    return (cross_entropy(logits, rows.labels, dtype, rows.mask),
            accuracy(logits.detach(), rows.labels, rows.mask))


class Stack:
    """Runs at the same epoch, stacked on one device; built from (and written back into) their
    solo ``Trainer`` shadows. ``step_mode`` (batched mode): how the step is issued, see
    ``grokhpc.step_mode`` (resolved there; here it is taken as it comes)."""

    def __init__(self, trainers: list, device, exact: bool | None = None,
                 step_mode: str = "eager", log: Callable = print):
        import copy

        import torch

        self.trainers, self.device = trainers, device
        self.exact = (torch.device(device).type == "cpu") if exact is None else bool(exact)
        self.deterministic = deterministic_for(device)   # as each run's solo step
        self.cfg = cfg = trainers[0].cfg
        self.cfgs = [t.cfg for t in trainers]
        epochs = {t.epoch for t in trainers}
        if len(epochs) != 1:
            raise RuntimeError(f"Stack: runs at different epochs {sorted(epochs)}")
        self.epoch = epochs.pop()
        self.R = len(trainers)
        models = [t.model for t in trainers]
        self.names = [n for n, _ in models[0].named_parameters()]
        self.trainable = [n for n, p in models[0].named_parameters() if p.requires_grad]
        with torch.no_grad():
            self.P = {n: torch.stack([m.get_parameter(n).detach() for m in models]).clone()
                      for n in self.names}
        for n in self.trainable:
            self.P[n].requires_grad_(True)
        self._set_step_mode(trainers, "eager" if self.exact else step_mode, log)
        self.curves = {k: torch.stack([t.curves[k] for t in trainers]).to(device)
                       for k in trainers[0].curves}
        # the group's own copies of the runs' minibatch generators, handed back at each sync
        # (a commit written in the background reads the shadows' while the stack draws on)
        self.gens = [None if t.batch_gen is None else torch.Generator().manual_seed(0)
                     for t in trainers]
        for g, t in zip(self.gens, trainers):
            if g is not None:
                g.set_state(t.batch_gen.get_state())
        self.init_norms = [t.init_norm for t in trainers]
        self.grok = [t.grok_epoch for t in trainers]
        self.fast = uses_fast_path(cfg)
        self.template = copy.deepcopy(models[0]) if self.exact or not self.fast else None
        self._solo = _solo_caller(self.template) if self.exact else None
        self._set_rows(trainers)
        self.last_commit = [self.epoch if t.committed_epoch is None else t.committed_epoch
                            for t in trainers]
        self.clock = None

    def _set_step_mode(self, trainers: list, mode: str, log: Callable) -> None:
        """The optimiser (flat in every mode but eager: its buffer then holds the weights), the
        batched loss (compiled or not) and the CUDA graphs of ``mode``."""
        from .step_mode import GraphStep, compiled

        self.step_mode = mode
        self.opt = stacked_optimizer(trainers, self.P, self.trainable, self.device, self.exact,
                                     flat=mode != "eager", compiled=mode == "compile")
        if isinstance(self.opt, FlatStackedAdamW):
            self.P.update(zip(self.trainable, self.opt.params))
        self._fast_losses = compiled(fast_losses) if mode == "compile" else fast_losses
        # the optimiser's, not a method of the stack: a stack must not hold itself in a
        # cycle, or its graphs' memory pool would outlive it until the next garbage collection
        self.capture = GraphStep(functools.partial(host_counts, self.opt), log) \
            if mode == "graph" else None
        if self.capture is not None and hasattr(self.opt, "host_scalars"):
            self.opt.host_scalars = False   # bias corrections on the device, inside the graph

    def _set_rows(self, trainers: list) -> None:
        import torch

        if self.exact:
            self.train = [(t.train_tokens, t.train_labels) for t in trainers]
            self.test = [(t.test_tokens, t.test_labels) for t in trainers]
            return
        self.test = self._rows([(t.test_tokens, t.test_labels) for t in trainers])
        if self.cfg.full_batch:
            self.train = self._rows([(t.train_tokens, t.train_labels) for t in trainers])
        else:   # same n_train in every run (SHAPE_FIELDS): minibatches are gathered per step
            self.train_all = (torch.stack([t.train_tokens for t in trainers]).to(self.device),
                              torch.stack([t.train_labels for t in trainers]).to(self.device))

    def _rows(self, pairs) -> Rows:
        """Each run's rows in the solo order, padded at the end (with its own first row) to the
        longest."""
        import torch

        sizes = [len(y) for _, y in pairs]
        b = max(sizes)
        pad = [torch.cat([torch.arange(s), torch.zeros(b - s, dtype=torch.long)]) for s in sizes]
        tokens = torch.stack([x[i.to(x.device)] for (x, _), i in zip(pairs, pad)]).to(self.device)
        labels = torch.stack([y[i.to(y.device)] for (_, y), i in zip(pairs, pad)]).to(self.device)
        mask = None
        if min(sizes) != b:
            mask = torch.arange(b, device=self.device)[None, :] < torch.tensor(
                sizes, device=self.device)[:, None]
        return self._with_queries(tokens, labels, mask)

    def _with_queries(self, tokens, labels, mask) -> Rows:
        from .lastpos import queries_of

        q = queries_of(tokens, self.P[self.names[0]].dtype) if self.fast else None
        return Rows(tokens, labels, mask, q)

    # -- one epoch
    def _losses(self, rows):
        """(per-run losses (R,), per-run accuracies (R,)) of the current weights on ``rows``."""
        from .lastpos import accuracy, cross_entropy

        dtype = self.cfg.loss_dtype
        if self.exact:
            return self._solo_losses(rows, range(len(rows)))
        if self.fast:
            return self._fast_losses(self.P, rows, dtype)
        logits = hooked_last_logits(self.template, self.P, rows.tokens)
        return (cross_entropy(logits, rows.labels, dtype, rows.mask),
                accuracy(logits.detach(), rows.labels, rows.mask))

    def _solo_losses(self, rows, runs):
        """The solo forward (the model's ``last_logits``), run by run, on each run's own weights
        (views of the stack: the backward writes every run's gradient into its slice of the
        stacked .grad)."""
        import torch
        from torch.func import functional_call

        from .lastpos import accuracy, cross_entropy

        views = {n: self.P[n].unbind(0) for n in self.names}
        losses, accs = [], []
        for r in runs:
            tokens, labels = rows[r]
            logits = functional_call(self._solo, {f"model.{n}": v[r] for n, v in views.items()},
                                     (tokens,))
            losses.append(cross_entropy(logits, labels, self.cfg.loss_dtype))
            accs.append(accuracy(logits.detach(), labels))
        return torch.stack(losses), torch.stack(accs)

    def _update(self, rows):
        """One optimiser step of every run on its ``rows``; (losses, accuracies) detached."""
        with deterministic_kernels(self.deterministic):   # forward too: a compiled
            losses, accs = self._losses(rows)                # backward is made with it
            losses.sum().backward()
        self.opt.step()
        self.opt.zero_grad()
        self._hold_norms()
        return losses.detach(), accs

    def _hold_norms(self) -> None:
        """``fixed_weight_norm``: each such run's weights rescaled to their norm at init (the
        solo ``rescale_to_norm`` on views in exact mode; one stacked rescale otherwise)."""
        import torch

        from .optim import rescale_to_norm

        if all(n is None for n in self.init_norms):
            return
        params = [self.P[n] for n in self.trainable]
        if self.exact:
            for r, norm in enumerate(self.init_norms):
                if norm is not None:
                    rescale_to_norm([p[r] for p in params], norm)
            return
        with torch.no_grad():
            sq = sum((p.detach().double() ** 2).flatten(1).sum(1) for p in params)
            if getattr(self, "_norm_targets", None) is None:   # once: a captured step copies
                self._norm_targets = torch.stack(                # nothing from the host
                    [sq.new_tensor(float("nan")) if n is None else n.to(sq)
                     for n in self.init_norms])
            target = self._norm_targets
            factor = torch.where(target.isnan(), 1.0, target / sq.sqrt()).to(params[0].dtype)
            for p in params:
                p.mul_(_b(factor, p))

    def _batches(self):
        """The rows of each minibatch of this epoch: run r's k-th minibatch from its own
        generator, as the solo ``Trainer.step`` draws it."""
        import torch

        from .optim import epoch_batches

        n = len(self.trainers[0].train_labels)
        orders = [epoch_batches(n, c, g) for c, g in zip(self.cfgs, self.gens)]
        for k in range(len(orders[0])):
            idx = [o[k] for o in orders]
            if self.exact:
                rows = [(x[i.to(self.device)], y[i.to(self.device)])
                        for (x, y), i in zip(self.train, idx)]
            else:
                i = torch.stack(idx).to(self.device)
                runs = torch.arange(self.R, device=self.device)[:, None]
                tokens, labels = self.train_all
                rows = self._with_queries(tokens[runs, i], labels[runs, i], None)
            yield rows, len(idx[0]) / n

    def _set_lrs(self) -> None:
        """Each run's lr for this epoch, where a schedule changes it: on the host as Python
        floats and, where the optimiser's columns live on a device, computed there as well
        (``LrSchedules``: no host-to-device copy, which would wait for the device)."""
        from .optim import has_schedule, lr_factor
        from .stacked_optim import LrSchedules

        if not any(has_schedule(c) for c in self.cfgs):
            return
        lrs = [c.lr * lr_factor(self.epoch, c) if has_schedule(c) else c.lr for c in self.cfgs]
        if getattr(self.opt, "host_scalars", self.device.type == "cpu"):
            return self.opt.set_lrs(lrs)
        if getattr(self, "_schedules", None) is None:
            self._schedules = LrSchedules(self.cfgs, self.epoch, self.opt.params[0].device)
        self.opt.set_lrs(lrs, self._schedules.next())

    def step(self) -> None:
        """One epoch of every run (the solo ``Trainer.step``)."""
        self._set_lrs()
        if self.cfg.full_batch and self.capture is not None:
            losses, accs = self.capture("train", lambda: self._update(self.train),
                                        on_replay=self.opt.count_step)
        elif self.cfg.full_batch:
            losses, accs = self._update(self.train)
        else:
            losses = accs = 0.0
            for rows, w in self._batches():
                b_loss, b_acc = self._update(rows)
                losses, accs = losses + b_loss * w, accs + b_acc * w
        e = self.epoch
        self.curves["train_loss"][:, e] = losses
        self.curves["train_acc"][:, e] = accs
        self.epoch += 1

    def _scored(self, rows, runs, sel):
        """``_losses`` in inference mode of ``runs`` (exact) or of all runs (batched: a chunk
        of runs at a time, so that scoring the larger test split needs no more memory than a
        training step), then those at ``sel``."""
        if self.exact:
            return self._solo_losses(rows, runs)
        if self.capture is not None and rows is self.test:
            losses, accs = self.capture("test", lambda: self._scored_all(rows))
        else:
            losses, accs = self._scored_all(rows)
        return losses[sel], accs[sel]

    def _scored_all(self, rows):
        """``_losses`` of every run on ``rows``, a chunk of runs at a time when ``rows`` has
        more rows than the train split."""
        import torch

        n_train = self.train.tokens.shape[1] if self.cfg.full_batch else \
            self.train_all[0].shape[1]
        n_rows = rows.tokens.shape[1]
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

    def evaluate(self, runs=None, train_runs=()) -> None:
        """Score the test set of ``runs`` (default: all) and the train set of ``train_runs`` at
        the current epoch, then note each run's first grokked epoch."""
        import torch

        runs = list(range(self.R)) if runs is None else list(runs)
        with torch.inference_mode():
            for split, which in (("test", runs), ("train", list(train_runs))):
                if not which:
                    continue
                rows = self.test if split == "test" else self._train_rows()
                # every run (an eval epoch): a slice; some runs (at their ends): an index
                # made from host data, a copy the device waits for
                sel = slice(None) if which == list(range(self.R)) else \
                    torch.tensor(which, device=self.device)
                losses, accs = self._scored(rows, which, sel)
                self.curves[f"{split}_loss"][sel, self.epoch] = losses.to(torch.float64)
                self.curves[f"{split}_acc"][sel, self.epoch] = accs
        self.note_grok()

    def _train_rows(self):
        """The whole train split of every run (minibatch runs: all have n_train rows)."""
        if self.exact or self.cfg.full_batch:
            return self.train
        tokens, labels = self.train_all
        return self._with_queries(tokens, labels, None)

    def note_grok(self) -> None:
        """Each ``stop_after_grok`` run's first epoch with a logged test accuracy >= 99% (one
        read from the device, only for such runs that have not grokked yet)."""
        watch = [r for r, c in enumerate(self.cfgs)
                 if c.stop_after_grok is not None and self.grok[r] is None]
        if not watch:
            return
        accs = self.curves["test_acc"][watch, self.epoch].tolist()
        for r, acc in zip(watch, accs):
            if acc >= GROK_ACC:
                self.grok[r] = self.epoch

    def stop_epochs(self) -> list[int]:
        """Each run's last epoch (``Trainer.stop_epoch``)."""
        return [c.n_epochs if g is None else min(c.n_epochs, g + c.stop_after_grok)
                for c, g in zip(self.cfgs, self.grok)]

    # -- durability
    def diverged(self, runs, last) -> list[int]:
        """``runs`` with a non-finite train loss since their last commit (up to this epoch,
        and this epoch's too for the runs in ``last``, scored on the train set just now).
        One read from the device for all of them: each distinct window (runs that committed
        together share one) is checked for every run, and each run's own is picked out."""
        import torch

        windows: dict[tuple[int, int], list[int]] = {}
        for r in runs:
            hi = self.epoch + (1 if r in last else 0)
            windows.setdefault((self.last_commit[r], hi), []).append(r)
        if not windows:
            return []
        curve = self.curves["train_loss"]
        finite = torch.stack([torch.isfinite(curve[:, lo:hi]).all(1)
                              for lo, hi in windows]).tolist()
        return sorted(r for ok, rs in zip(finite, windows.values()) for r in rs if not ok[r])

    def sync(self, r: int) -> None:
        """Copy run ``r``'s stacked state into its shadow Trainer (same epoch, same values)."""
        import torch

        from .optim import set_lr

        t = self.trainers[r]
        with torch.no_grad():
            for n in self.names:
                t.model.get_parameter(n).copy_(self.P[n][r])
            for i, n in enumerate(self.trainable):
                p = t.model.get_parameter(n)
                self.opt.store(r, i, t.optimizer.state, p)
            for k, v in self.curves.items():
                t.curves[k] = v[r].to(t.curves[k].device).clone()
        if self.gens[r] is not None:
            t.batch_gen.set_state(self.gens[r].get_state())
        if t.epoch != self.epoch:   # the lr the solo optimiser holds after this epoch's steps
            set_lr(t.optimizer, self.epoch - 1, t.cfg)
        t.grok_epoch = self.grok[r]
        t.epoch = self.epoch


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


__all__ = ["train_group", "check_group", "GroupError",
           "StackedAdamW", "StackedSGD", "Stack", "Rows", 
           "uses_fast_path", "hooked_last_logits", "configs_from_dirs", "main"]


if __name__ == "__main__":
    import sys

    sys.exit(main())
