"""Train a group of same-shaped runs in one process, as one stacked computation.

``train_group(cfgs, out_dirs)`` trains R runs that share p, op, the model sizes, n_epochs,
checkpoint_every, eval_every and loss_dtype, and may differ in everything else (data_seed,
model_seed, train_frac, lr, weight_decay, betas). Each run's directory ends up exactly as
``grokhpc.train.run_training`` leaves it -- same files, same ``state.pt`` contents -- so a solo
``run_training`` can resume a packed run and ``train_group`` can resume a solo one.

How the runs are stacked:

* parameters: every weight is one leaf tensor with a leading run axis, ``(R, *shape)``, built
  from ``grokhpc.model.build_model(cfg)`` of each run (the solo initialisation, run by run);
* forward: ``stacked_last_logits`` is ``Transformer.last_logits`` with the run axis carried
  through every op (batched einsum/bmm, gathers offset per run), so run ``r`` only ever
  touches its own weights and rows: one run turning NaN cannot reach another;
* data: each run's train (and test) rows are gathered in the solo order and padded at the end
  to the longest run of the group; padded rows are masked out of the loss and accuracy, which
  are summed over a run's own rows and divided by its own row count (the solo ``mean``). Runs
  with equal train sizes need no padding and use the solo ``mean`` itself;
* optimiser: ``StackedAdamW`` is ``torch.optim.AdamW``'s single-tensor step (decoupled weight
  decay, bias corrections computed in Python floats per run) with per-run lr, weight decay and
  betas broadcast along the run axis; each elementwise operation is the one torch's kernel
  performs, in the same order, so it is bit-identical on CPU (tests check this);
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
from typing import Callable, Sequence

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


# ---- the stacked model ------------------------------------------------------------------------
def _tables(W_E, W_pos, W_Q, W_K, W_V, b_Q, b_K, b_V, n: int, vocab: int):
    """One run's per-(position, token) tables, exactly as ``Transformer.last_logits``."""
    import torch

    table = W_E[None, :, :] + W_pos[:n, None, :]                                 # (n, V, d)
    q_tab = torch.einsum("vd,hde->hve", table[-1], W_Q) + b_Q[:, None]
    k_tab = torch.einsum("pvd,hde->hpve", table, W_K) + b_K[:, None, None]
    v_tab = torch.einsum("pvd,hde->pvhe", table, W_V) + b_V                       # (n, V, h, e)
    s_tab = torch.einsum("hqe,hpve->qpvh", q_tab, k_tab).reshape(vocab, n * vocab, -1)
    return table, v_tab, s_tab


def stacked_last_logits(P: dict, tokens, d_vocab: int, per_run_tables: bool | None = None):
    """``Transformer.last_logits`` for R runs at once.

    ``P`` maps TransformerLens parameter names to (R, *shape) tensors, ``tokens`` is (R, b, n)
    long. Returns (R, b, d_vocab_out). Every row-sized operation (gathers, softmax, the
    attention output, MLP and unembedding) is batched over runs with bmm. The small
    per-(position, token) tables are built either run by run with the solo expressions
    (``per_run_tables=True``, the default on CPU: the solo einsums' memory layouts, hence
    their bits, are kept) or as batched einsums (the default elsewhere: a handful of kernels
    whatever R is; equal to the solo ones up to rounding).
    """
    import torch
    import torch.nn.functional as F

    W_E, W_pos = P["embed.W_E"], P["pos_embed.W_pos"]
    W_Q, W_K, W_V, W_O = (P[f"blocks.0.attn.W_{x}"] for x in "QKVO")
    b_Q, b_K, b_V, b_O = (P[f"blocks.0.attn.b_{x}"] for x in "QKVO")
    W_in, b_in = P["blocks.0.mlp.W_in"], P["blocks.0.mlp.b_in"]
    W_out, b_out = P["blocks.0.mlp.W_out"], P["blocks.0.mlp.b_out"]
    W_U, b_U = P["unembed.W_U"], P["unembed.b_U"]
    R, b, n = tokens.shape
    V = d_vocab
    h = W_Q.shape[1]
    scale = math.sqrt(W_Q.shape[-1])
    if per_run_tables is None:
        per_run_tables = tokens.device.type == "cpu"
    if per_run_tables:
        # fresh (allocator-aligned) copies: BLAS results can depend on operand alignment, and a
        # solo run's weights are allocations of their own, not views into a stack
        unb = [t.unbind(0) for t in (W_E, W_pos, W_Q, W_K, W_V, b_Q, b_K, b_V)]
        parts = [_tables(*(u[r].clone() for u in unb), n=n, vocab=V) for r in range(R)]
        table = torch.stack([x[0] for x in parts])                               # (R, n, V, d)
        v_tab = torch.stack([x[1] for x in parts])                               # (R,n,V,h,e)
    else:
        table = W_E[:, None, :, :] + W_pos[:, :n, None, :]                       # (R, n, V, d)
        q_tab = torch.einsum("rvd,rhde->rhve", table[:, -1], W_Q) + b_Q[:, :, None]
        k_tab = torch.einsum("rpvd,rhde->rhpve", table, W_K) + b_K[:, :, None, None]
        v_tab = torch.einsum("rpvd,rhde->rpvhe", table, W_V) + b_V[:, None, None]
        s_tab = torch.einsum("rhqe,rhpve->rqpvh", q_tab, k_tab).reshape(R * V, n * V, h)
    flat = tokens + torch.arange(n, device=tokens.device) * V                    # (R, b, n)
    last = tokens[:, :, -1]                                                      # (R, b)
    run_off = torch.arange(R, device=tokens.device)[:, None]
    if per_run_tables:
        # the gather's backward (an accumulating index_put) sums in a size-dependent order:
        # run by run it is the solo one
        scores = torch.stack([x[2][last[r][:, None], flat[r]] for r, x in enumerate(parts)])
    else:
        scores = s_tab[(last + run_off * V)[:, :, None], flat]                   # (R, b, n, h)
    scores = scores / scale
    pattern = F.softmax(scores, dim=2)
    v = F.embedding(flat + run_off[:, :, None] * (n * V),
                    v_tab.reshape(R * n * V, -1)).view(R, b, n, h, -1)
    z = (pattern[..., None] * v).sum(dim=2)                                      # (R, b, h, e)
    attn_out = torch.bmm(z.flatten(2), W_O.flatten(1, 2)) + b_O[:, None]         # (R, b, d)
    resid_mid = F.embedding(last + run_off * V, table[:, -1].reshape(R * V, -1)) + attn_out
    post = F.relu(torch.bmm(resid_mid, W_in) + b_in[:, None])
    resid_post = resid_mid + (torch.bmm(post, W_out) + b_out[:, None])
    return torch.bmm(resid_post, W_U) + b_U[:, None]


def stacked_loss(logits, labels, counts, mask, dtype: str):
    """Per-run mean cross-entropy (R,) in ``dtype``: ``grokhpc.train.loss_fn`` run by run.

    ``mask`` (R, b) marks real rows (None: no padding); ``counts`` (R,) is each run's row count.
    """
    import torch

    log_probs = logits.to(getattr(torch, dtype)).log_softmax(dim=-1)
    nll = -log_probs.gather(dim=-1, index=labels[..., None])[..., 0]             # (R, b)
    if mask is None:
        return nll.mean(dim=1)
    return torch.where(mask, nll, 0.0).sum(dim=1) / counts


def stacked_accuracy(logits, labels, counts, mask):
    hit = logits.argmax(dim=-1) == labels
    if mask is None:
        return hit.double().mean(dim=1)
    return (hit & mask).double().sum(dim=1) / counts


class StackedAdamW:
    """``torch.optim.AdamW`` (single-tensor path, amsgrad off) for R runs stacked on dim 0.

    Per-run scalars become float32 (R, 1, ...) tensors holding exactly the value torch's CPU
    kernel would cast the Python scalar to; every elementwise op then matches torch's kernels:
    ``mul_(1 - lr*wd)``, ``lerp_(g, 1 - b1)``, ``mul_(b2).addcmul_((1 - b2)*g, g)``,
    ``sqrt / bc2_sqrt + eps``, ``addcdiv_((-step_size)*m, denom)`` -- addcmul/addcdiv with a
    scalar ``value`` compute ``value*t1`` first and then the fused kernel, so folding a per-run
    ``value`` into ``t1`` gives the same bits.
    """

    def __init__(self, params: list, lrs, weight_decays, betas, steps, exp_avgs, exp_avg_sqs):
        import torch

        self.params = params
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

    def step(self) -> None:
        import torch

        self.steps = [s + 1 for s in self.steps]
        bc1 = [1 - b1 ** s for b1, s in zip(self.b1, self.steps)]
        bc2 = [1 - b2 ** s for b2, s in zip(self.b2, self.steps)]
        neg_step = self._col([-(lr / b) for lr, b in zip(self.lrs, bc1)])
        bc2_sqrt = self._col([b ** 0.5 for b in bc2])
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
class Stack:
    """Runs at the same epoch, stacked on one device; built from (and written back into) their
    solo ``Trainer`` shadows."""

    def __init__(self, trainers: list, device):
        import torch

        self.trainers, self.device = trainers, device
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
                [torch.stack(vs[n]).to(device) for n in self.trainable])
        self.curves = {k: torch.stack([t.curves[k] for t in trainers]).to(device)
                       for k in trainers[0].curves}
        self.train = self._rows([t.data.train_idx for t in trainers], trainers[0].data)
        self.test = self._rows([t.data.test_idx for t in trainers], trainers[0].data)
        self.last_commit = self.epoch

    def _rows(self, idx_list, data):
        """(tokens (R,b,3), labels (R,b), counts (R,) float64, mask (R,b) or None), solo order."""
        import torch

        sizes = [len(i) for i in idx_list]
        b = max(sizes)
        idx = torch.zeros((self.R, b), dtype=torch.long, device=self.device)
        for r, i in enumerate(idx_list):
            idx[r, : len(i)] = i.to(self.device)
        mask = None
        if min(sizes) != b:
            mask = torch.arange(b, device=self.device)[None, :] < torch.tensor(
                sizes, device=self.device)[:, None]
        counts = torch.tensor(sizes, dtype=torch.float64, device=self.device)
        tokens = data.tokens.to(self.device)[idx]
        labels = data.labels.to(self.device)[idx]
        return tokens, labels, counts, mask

    # -- one epoch
    def step(self) -> None:
        tokens, labels, counts, mask = self.train
        logits = stacked_last_logits(self.P, tokens, self.cfg.d_vocab)
        losses = stacked_loss(logits, labels, counts, mask, self.cfg.loss_dtype)
        losses.sum().backward()
        self.opt.step()
        self.opt.zero_grad()
        e = self.epoch
        self.curves["train_loss"][:, e] = losses.detach()
        self.curves["train_acc"][:, e] = stacked_accuracy(logits.detach(), labels, counts, mask)
        self.epoch += 1

    def evaluate(self, train_too: bool = False) -> None:
        import torch

        with torch.inference_mode():
            splits = [("test", self.test)] + ([("train", self.train)] if train_too else [])
            for split, (tokens, labels, counts, mask) in splits:
                logits = stacked_last_logits(self.P, tokens, self.cfg.d_vocab)
                self.curves[f"{split}_loss"][:, self.epoch] = stacked_loss(
                    logits, labels, counts, mask, self.cfg.loss_dtype)
                self.curves[f"{split}_acc"][:, self.epoch] = stacked_accuracy(
                    logits, labels, counts, mask)

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


def _fit_stack(stack: Stack, target: int, bar, log) -> list:
    """Train ``stack`` up to epoch ``target`` (a commit epoch), committing on the solo schedule.

    Returns the trainers that diverged (they are left at their last commit); stops right after
    a commit that finds any, so the caller restacks the others.
    """
    cfg = stack.cfg
    t0 = time.perf_counter()
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
            for r, t in enumerate(stack.trainers):
                if r in bad:
                    continue
                stack.sync(r)
                t.wall_time += elapsed
                t.commit(checkpoint=True)
            stack.last_commit = stack.epoch
            if bad:
                out = []
                for r in bad:
                    t = stack.trainers[r]
                    window = stack.curves["train_loss"][r, start:stack.epoch + 1]
                    _mark_diverged(t, stack.epoch, start, window.cpu().numpy())
                    log(f"run {t.cfg.run_id}: diverged (non-finite train loss); dropped from "
                        f"the group, error.txt written")
                    out.append(t)
                return out
            if bar is not None:
                bar.set_postfix(epoch=stack.epoch, refresh=False)
    return []


def _is_diverged(run: RunDir) -> bool:
    err = run.read_error()
    return bool(err) and err.startswith(DIVERGED_PREFIX)


def train_group(cfgs: Sequence[RunConfig], out_dirs: Sequence, device=None,
                progress_bar: bool = True, log: Callable = print,
                retry_diverged: bool = False) -> list[RunDir]:
    """Train ``cfgs`` into ``out_dirs`` as one stacked computation; resumes each run from its
    own state; returns each run's RunDir (in order). Complete runs are left alone; a run that
    diverges is marked failed (error.txt) and the others go on. Raises GroupError for runs
    that cannot be stacked, RunDirError for a directory holding another run (before any
    training), and re-raises a failure of the stacked computation after writing error.txt into
    every run it was training."""
    from .train import Trainer, finish, resolve_device

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
    if not pending:
        return runs

    trainers = []
    for cfg, run in pending:
        t = Trainer.open(cfg, run.path, dev)
        if t.epoch > 0:
            log(f"run {cfg.run_id}: resuming at epoch {t.epoch}/{cfg.n_epochs}")
        trainers.append(t)

    n_epochs = cfgs[0].n_epochs
    bar = None
    if progress_bar:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(n_epochs - t.epoch for t in trainers), unit="run-epoch",
                   desc=f"{len(trainers)} runs", dynamic_ncols=True, mininterval=1.0)
    active = [t for t in trainers if t.epoch < n_epochs]
    try:
        while active:
            low = min(t.epoch for t in active)
            lag = [t for t in active if t.epoch == low]
            ahead = sorted({t.epoch for t in active if t.epoch > low})
            target = ahead[0] if ahead else n_epochs
            if ahead:
                log(f"{len(lag)} run(s) at epoch {low} catch up to epoch {target} first")
            stack = Stack(lag, dev)
            try:
                dropped = _fit_stack(stack, target, bar, log)
            except BaseException:
                tb = traceback.format_exc()
                for t in lag:
                    t.run.write_error(tb)
                raise
            del stack
            active = [t for t in active if t.epoch < n_epochs and t not in dropped]
    finally:
        if bar is not None:
            bar.close()

    for t in trainers:
        if t.epoch < n_epochs or _is_diverged(t.run):
            continue
        try:
            finish(t)
        except Exception:
            t.run.write_error(traceback.format_exc())
            log(f"run {t.cfg.run_id}: finishing failed; see {t.run.file('error.txt')}")
            continue
        t.run.clear_error()
    return runs


# ---- sizing a job ------------------------------------------------------------------------------
def bytes_per_run(cfg: RunConfig) -> int:
    """Estimated device bytes one run adds to a stacked group (float32 weights).

    weights: stacked params + grads + two Adam moments + the shadow Trainer's params and two
    moments = 7 copies of n_params; plus per row of the larger split (train rows are padded to
    the group's longest, test rows are scored in inference mode) the activations the backward
    keeps, counted in floats: scores and pattern (2*n*h), gathered values and their product
    with the pattern (2*n*h*e), z (h*e), attention/MLP residuals (4*d), MLP pre/post (2*m),
    logits in float32 plus float64 copy and log-softmax (5*p); doubled for the backward's
    transient gradients. Per-run tables (n*V*(h*e*3 + V*h)) are added once.
    """
    n, h, e, d, m, p, V = 3, cfg.n_heads, cfg.d_head, cfg.d_model, cfg.d_mlp, cfg.p, cfg.d_vocab
    n_params = V * d + n * d + 4 * h * d * e + 2 * d * m + d * p
    n_rows = p * p
    rows = math.ceil(n_rows * max(cfg.train_frac, 1 - cfg.train_frac))
    per_row = 2 * n * h + 2 * n * h * e + h * e + 4 * d + 2 * m + 5 * p
    tables = n * V * (3 * h * e + V * h)
    return 4 * (7 * n_params + 2 * rows * per_row + 2 * tables) + 3 * rows * 8 * 2


def auto_runs_per_job(cfg: RunConfig, device=None, safety: float = 0.7,
                      cpu_default: int = 4, cap: int = 1024) -> int:
    """How many runs of ``cfg``'s shape to stack in one job on ``device``.

    CUDA: ``floor(safety * free_bytes / bytes_per_run(cfg))``, clamped to [1, cap], with
    ``free_bytes`` from ``torch.cuda.mem_get_info``. CPU (or anything else): ``cpu_default``
    -- on a CPU the stacked step already keeps the cores busy at R = 1, so packing saves
    per-job overhead, not compute.
    """
    import torch

    from .train import resolve_device

    dev = resolve_device(device if device is not None else cfg.device) \
        if not isinstance(device, torch.device) else device
    if dev.type != "cuda":
        return cpu_default
    free, _total = torch.cuda.mem_get_info(dev)
    return int(max(1, min(cap, math.floor(safety * free / bytes_per_run(cfg)))))


__all__ = ["train_group", "auto_runs_per_job", "bytes_per_run", "check_group", "GroupError",
           "stacked_last_logits", "StackedAdamW", "Stack", "SHAPE_FIELDS"]
