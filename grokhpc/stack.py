"""One stacked computation over R runs at the same epoch: the training stage's step and scoring.

A ``Stack`` is built from the runs' ``grokhpc.train.Trainer`` s (each run's state and files, its
"shadow") and written back into them at commits (``sync``); ``grokhpc.loop`` drives it epoch by
epoch. A solo run is a stack of one in exact mode.

* parameters: every weight is one leaf tensor with a leading run axis, ``(R, *shape)``, built
  from each run's model (the solo initialisation, run by run);
* forward, two ways (``exact``):
  - exact (the default on CPU, and always for a solo run): the model's own ``last_logits``
    (its choice of fast path or hooked forward) called run by run through
    ``torch.func.functional_call`` with views of the stacked weights, each on its own unpadded
    rows, exactly as a solo run calls it. Bit-identical to training the runs one by one (tests
    check whole runs file by file). On a CPU the cores are busy at R = 1 already, so batching
    the forward buys little there;
  - batched (the default on GPUs): one computation over the stacked weights, the run axis
    carried through every kernel, so run ``r`` only ever touches its own weights and rows (one
    run turning NaN cannot reach another). Where ``grokhpc.lastpos.batched_fast_path`` holds
    that is ``grokhpc.lastpos.last_logits`` -- the solo fast path's code -- with batched
    einsums, gathers offset per run and ``bmm``; for other shapes it is the readable hooked
    ``Transformer.forward`` called per run under ``torch.func.vmap``
    (:func:`hooked_last_logits`). It equals the solo logits and gradients up to float32
    rounding, not bit for bit: batched kernels sum in other orders. Full-batch runs' train
    (and test) rows are gathered in the solo order and padded at the end to the group's
    longest; padded rows are masked out of the loss and accuracy, which are each run's mean
    over its own rows (the solo ``mean``). Minibatch runs share n_train, so each step gathers
    every run's k-th minibatch (drawn from its own generator) without padding;
  - a model family is what the stack calls (``grokhpc.models``): ``last_logits`` of one run's
    rows (exact mode) and ``stacked_last_logits`` of R runs (batched mode; the MLP's is
    ``torch.func.vmap`` of its own forward);
* optimiser (``grokhpc.stacked_optim``): holds the stacked state. In batched mode its step is
  torch's single-tensor math with per-run lr, weight decay, betas or momentum broadcast along
  the run axis, a few kernels per weight whatever R is; each elementwise operation is the one
  torch's CPU kernel performs, so it is bit-identical there (tests check this). In exact mode
  it calls torch's own functional optimiser once per run on views of the stacks, so it takes
  the solo optimiser's path on every device (foreach kernels on CUDA). Each epoch sets each
  run's lr from its own schedule (``grokhpc.optim.lr_factor``; where the optimiser's columns
  live on a GPU, the same formula is computed there, ``stacked_optim.LrSchedules``, so that no
  epoch copies from the host); after each step, ``fixed_weight_norm`` runs are rescaled to
  their own initial norm;
* step mode (batched mode, ``grokhpc.step_mode``): how the step is issued -- per weight
  (eager, the default), Adam(W) over one flat buffer (fused; bit-identical to eager on CPU),
  captured in CUDA graphs (graph) or compiled (compile).
"""

from __future__ import annotations

import copy
import functools
from typing import Any, Callable, NamedTuple

from . import divergence
from .config import GROK_ACC
from .grad_filter import stacked_filter
from .lastpos import accuracy, batched_fast_path, last_logits, queries_of
from .losses import loss, softmax_collapse
from .optim import epoch_batches, has_schedule, lr_factor, rescale_to_norm, set_lr
from .runtime import deterministic_for, deterministic_kernels
from .stacked_optim import FlatStackedAdamW, LrSchedules, _b, stacked_optimizer
from .step_mode import GraphStep, compiled


def stop_epoch(cfg, grok_epoch: int | None) -> int:
    """The epoch a run ends at: n_epochs, or ``stop_after_grok`` epochs after its first logged
    test accuracy >= ``config.GROK_ACC`` (``grok_epoch``) when that comes sooner."""
    if grok_epoch is None:
        return cfg.n_epochs
    return min(cfg.n_epochs, grok_epoch + cfg.stop_after_grok)


# ---- the forward of a stack --------------------------------------------------------------------
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


def _template(model):
    """A copy of ``model`` to call with other weights (``functional_call`` swaps a module's
    weights while it runs, and a commit may read the runs' own models meanwhile), sharing its
    cache of the rows' query tokens, which a copy would find again."""
    cache = model.__dict__.get("_query_cache")
    return copy.deepcopy(model, {} if cache is None else {id(cache): cache})


def hooked_last_logits(template, P: dict, tokens):
    """The logits of R stacked runs (rows (R, b, ...) -> (R, b, p)) by the model family's own
    batched form (``stacked_last_logits``: the transformer's hooked forward, the MLP, each
    under ``torch.func.vmap``)."""
    return template.stacked_last_logits(P, tokens)


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


def fast_losses(P: dict, rows: Rows, dtype: str, loss_fn: str = "softmax", sc: bool = False):
    """(per-run losses (R,), per-run accuracies (R,), per-run softmax collapse (R,) or None
    without ``sc``) of stacked weights ``P`` on ``rows`` by the batched fast path
    (``grokhpc.lastpos.last_logits``)."""

    logits = last_logits(P, rows.tokens, rows.queries)
    return scores(logits, rows.labels, dtype, loss_fn, rows.mask, sc)


def scores(logits, labels, dtype: str, loss_fn: str, mask=None, sc: bool = False):
    """(loss, accuracy, softmax collapse or None) of ``logits`` (``grokhpc.losses``)."""
    return (loss(logits, labels, dtype, mask, loss_fn), accuracy(logits.detach(), labels, mask),
            softmax_collapse(logits, mask) if sc else None)


class Stack:
    """Runs at the same epoch, stacked on one device; built from (and written back into) their
    solo ``Trainer`` shadows. ``step_mode`` (batched mode): how the step is issued, see
    ``grokhpc.step_mode`` (resolved there; here it is taken as it comes)."""

    def __init__(self, trainers: list, device, exact: bool | None = None,
                 step_mode: str = "eager", log: Callable = print):
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
        self.fast = batched_fast_path(cfg)
        self.template = _template(models[0]) if self.exact or not self.fast else None
        self._solo = _solo_caller(self.template) if self.exact else None
        self._set_rows(trainers)
        self.last_commit = [self.epoch if t.committed_epoch is None else t.committed_epoch
                            for t in trainers]
        self.clock = None
        self._norm_targets = None   # fixed_weight_norm's targets on the device, made once
        self._schedules = None      # the lr schedules on the device (LrSchedules), made once

    def _set_step_mode(self, trainers: list, mode: str, log: Callable) -> None:
        """The optimiser (flat in every mode but eager: its buffer then holds the weights), the
        batched loss (compiled or not) and the CUDA graphs of ``mode``."""
        if mode == "graph" and trainers[0].cfg.grad_filter != "none":
            log("step_mode graph: a grad_filter's step depends on the host's step count; "
                "the fused step is used")
            mode = "fused"
        self.step_mode = mode
        self.opt = stacked_optimizer(trainers, self.P, self.trainable, self.device, self.exact,
                                     flat=mode != "eager", compiled=mode == "compile")
        if isinstance(self.opt, FlatStackedAdamW):
            self.P.update(zip(self.trainable, self.opt.params))
        self.filter = stacked_filter(trainers, [self.P[n] for n in self.trainable])
        self._fast_losses = compiled(fast_losses) if mode == "compile" else fast_losses
        # the optimiser's, not a method of the stack: a stack must not hold itself in a
        # cycle, or its graphs' memory pool would outlive it until the next garbage collection
        self.capture = GraphStep(functools.partial(host_counts, self.opt), log) \
            if mode == "graph" else None
        if self.capture is not None:   # lrs and bias corrections on the device, in the graph
            self.opt.host_scalars = False

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
        q = queries_of(tokens, self.P[self.names[0]].dtype) if self.fast else None
        return Rows(tokens, labels, mask, q)

    # -- one epoch
    def _losses(self, rows, sc: bool = False):
        """(per-run losses (R,), per-run accuracies (R,), per-run softmax collapse (R,) or None
        without ``sc``) of the current weights on ``rows``."""
        dtype, loss_fn = self.cfg.loss_dtype, self.cfg.loss_fn
        if self.exact:
            return self._solo_losses(rows, range(len(rows)), sc)
        if self.fast:
            return self._fast_losses(self.P, rows, dtype, loss_fn, sc)
        logits = hooked_last_logits(self.template, self.P, rows.tokens)
        return scores(logits, rows.labels, dtype, loss_fn, rows.mask, sc)

    def _solo_losses(self, rows, runs, sc: bool = False):
        """The solo forward (the model's ``last_logits``), run by run, on each run's own weights
        (views of the stack: the backward writes every run's gradient into its slice of the
        stacked .grad)."""
        import torch
        from torch.func import functional_call

        views = {n: self.P[n].unbind(0) for n in self.names}
        out = []
        for r in runs:
            tokens, labels = rows[r]
            logits = functional_call(self._solo, {f"model.{n}": v[r] for n, v in views.items()},
                                     (tokens,))
            out.append(scores(logits, labels, self.cfg.loss_dtype, self.cfg.loss_fn, sc=sc))
        losses, accs, collapse = zip(*out)
        return torch.stack(losses), torch.stack(accs), torch.stack(collapse) if sc else None

    def _update(self, rows, sc: bool = False):
        """One optimiser step of every run on its ``rows`` (the gradients through the runs'
        ``grad_filter`` first); (losses, accuracies, softmax collapse or None) detached."""
        with deterministic_kernels(self.deterministic):   # forward too: a compiled
            losses, accs, collapse = self._losses(rows, sc)   # backward is made with it
            losses.sum().backward()
        if self.filter is not None:
            self.filter.apply([self.P[n] for n in self.trainable])
        self.opt.step()
        self.opt.zero_grad()
        self._hold_norms()
        return losses.detach(), accs, collapse

    def _hold_norms(self) -> None:
        """``fixed_weight_norm``: each such run's weights rescaled to their norm at init (the
        solo ``rescale_to_norm`` on views in exact mode; one stacked rescale otherwise)."""
        import torch

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
            if self._norm_targets is None:   # once: a captured step copies
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
        if not any(has_schedule(c) for c in self.cfgs):
            return
        lrs = [c.lr * lr_factor(self.epoch, c) if has_schedule(c) else c.lr for c in self.cfgs]
        if self.opt.host_scalars:
            return self.opt.set_lrs(lrs)
        if self._schedules is None:
            self._schedules = LrSchedules(self.cfgs, self.epoch, self.opt.params[0].device)
        self.opt.set_lrs(lrs, self._schedules.next())

    def step(self) -> None:
        """One epoch of every run (the solo ``Trainer.step``). A full-batch epoch that starts
        at an evaluation epoch logs the softmax collapse of its forward's logits (a captured
        step computes it every epoch: its kernels are fixed)."""
        self._set_lrs()
        e = self.epoch
        sc = self.cfg.full_batch and (e % self.cfg.eval_every == 0 or self.capture is not None)
        collapse = None
        if self.cfg.full_batch and self.capture is not None:
            losses, accs, collapse = self.capture("train", lambda: self._update(self.train, sc),
                                                  on_replay=self.opt.count_step)
        elif self.cfg.full_batch:
            losses, accs, collapse = self._update(self.train, sc)
        else:
            losses = accs = 0.0
            for rows, w in self._batches():
                b_loss, b_acc, _ = self._update(rows)
                losses, accs = losses + b_loss * w, accs + b_acc * w
        self.curves["train_loss"][:, e] = losses
        self.curves["train_acc"][:, e] = accs
        if collapse is not None and e % self.cfg.eval_every == 0:
            self.curves["softmax_collapse"][:, e] = collapse
        self.epoch += 1

    def _scored(self, rows, runs, sel, sc: bool = False):
        """``_losses`` in inference mode of ``runs`` (exact) or of all runs (batched: a chunk
        of runs at a time, so that scoring the larger test split needs no more memory than a
        training step), then those at ``sel``."""
        if self.exact:
            return self._solo_losses(rows, runs, sc)
        if self.capture is not None and rows is self.test:
            out = self.capture("test", lambda: self._scored_all(rows, sc))
        else:
            out = self._scored_all(rows, sc)
        return tuple(None if o is None else o[sel] for o in out)

    def _scored_all(self, rows, sc: bool = False):
        """``_losses`` of every run on ``rows``, a chunk of runs at a time when ``rows`` has
        more rows than the train split."""
        import torch

        n_train = self.train.tokens.shape[1] if self.cfg.full_batch else \
            self.train_all[0].shape[1]
        n_rows = rows.tokens.shape[1]
        chunk = max(1, (self.R * n_train) // max(n_rows, 1))
        if chunk >= self.R:
            return self._losses(rows, sc)
        P, out = self.P, []
        try:
            for a in range(0, self.R, chunk):
                b = min(a + chunk, self.R)
                self.P = {k: v[a:b] for k, v in P.items()}
                out.append(self._losses(rows.runs(a, b), sc))
        finally:
            self.P = P
        return tuple(None if parts[0] is None else torch.cat(parts) for parts in zip(*out))

    def evaluate(self, runs=None, train_runs=(), collapse_runs=()) -> None:
        """Score the test set of ``runs`` (default: all) and the train set of ``train_runs``
        (with its softmax collapse) at the current epoch, and the softmax collapse alone of
        ``collapse_runs`` (minibatch runs at an evaluation epoch), then note each run's first
        grokked epoch."""
        import torch

        runs = list(range(self.R)) if runs is None else list(runs)
        collapse_runs = [r for r in collapse_runs if r not in train_runs]
        with torch.inference_mode():
            for split, which in (("test", runs), ("train", list(train_runs)),
                                 ("collapse", collapse_runs)):
                if not which:
                    continue
                rows = self.test if split == "test" else self._train_rows()
                # every run (an eval epoch): a slice; some runs (at their ends): an index
                # made from host data, a copy the device waits for
                sel = slice(None) if which == list(range(self.R)) else \
                    torch.tensor(which, device=self.device)
                losses, accs, collapse = self._scored(rows, which, sel, sc=split != "test")
                if collapse is not None:
                    self.curves["softmax_collapse"][sel, self.epoch] = collapse
                if split != "collapse":
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
        """Each run's last epoch (:func:`stop_epoch`)."""
        return [stop_epoch(c, g) for c, g in zip(self.cfgs, self.grok)]

    # -- durability
    def diverged(self, runs, last) -> dict[int, tuple[int, str]]:
        """Those of ``runs`` that broke the divergence rule (``grokhpc.divergence.nonfinite``)
        since their last commit, ``last`` their last epoch: {r: (epoch, what)}. One read from
        the device for all of them when all is finite."""
        runs = list(runs)
        return divergence.nonfinite(self.curves["train_loss"], [self.P[n] for n in self.names],
                                    runs, [self.last_commit[r] for r in runs], self.epoch,
                                    set(last))

    def sync(self, r: int) -> None:
        """Copy run ``r``'s stacked state into its shadow Trainer (same epoch, same values)."""
        import torch

        t = self.trainers[r]
        with torch.no_grad():
            for n in self.names:
                t.model.get_parameter(n).copy_(self.P[n][r])
            for i, n in enumerate(self.trainable):
                p = t.model.get_parameter(n)
                self.opt.store(r, i, t.optimizer.state, p)
            for k, v in self.curves.items():
                t.curves[k] = v[r].to(t.curves[k].device).clone()
            if self.filter is not None:
                t.filter_state = self.filter.state(r)
        if self.gens[r] is not None:
            t.batch_gen.set_state(self.gens[r].get_state())
        if t.epoch != self.epoch:   # the lr the solo optimiser holds after this epoch's steps
            set_lr(t.optimizer, self.epoch - 1, t.cfg)
        t.grok_epoch = self.grok[r]
        t.epoch = self.epoch

