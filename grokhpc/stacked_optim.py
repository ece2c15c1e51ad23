"""The optimisers of a packed group: R runs' optimiser state stacked on a leading run axis.

* ``StackedAdamW`` (adamw; adam with ``decoupled=False``) and ``StackedSGD``: torch's
  single-tensor math with per-run lr, weight decay, betas or momentum broadcast along the run
  axis, a few kernels per weight whatever R is; each elementwise operation is the one torch's
  CPU kernel performs, so a run's weights come out bit-identical there. With
  ``per_run_torch`` they call torch's own functional optimiser once per run on views of the
  stacks instead (the solo optimiser's path on every device: exact mode).
* ``FlatStackedAdamW``: the same AdamW with every stacked weight, gradient and moment a view of
  one (R, N) buffer, so a step is the same handful of elementwise kernels for all weights at
  once instead of per weight; per element the same operations, hence the same bits as
  ``StackedAdamW``.
* ``perp``: ⊥AdamW (``grokhpc.optim.perp_grad`` on each weight's stacked gradient, run by run,
  then the AdamW step), in every mode.
* ``STACKED``: each optimiser of the registry (``grokhpc.optim.OPTIMIZERS``) with how its
  stacked optimiser is built; ``stacked_optimizer``: the group's, its state taken from each
  run's solo optimiser.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

ADAM_EPS = 1e-8  # torch.optim.AdamW's default, which grokhpc.optim.make_optimizer uses


def _col(values, like):
    import torch

    return torch.tensor(values, dtype=like.dtype, device=like.device)


def _b(t, like):
    """A per-run column ``t`` (R,) shaped to broadcast along ``like`` (R, ...)."""
    return t.view((-1,) + (1,) * (like.dim() - 1))


def flat_stack(tensors: list):
    """(one (R, N) buffer holding the stacked ``tensors`` (each (R, *shape)) side by side, a
    view of it shaped like each): every run's values of all of them in one row, so a per-run
    column (R, 1) broadcasts over all of them in one elementwise kernel."""
    import torch

    R = tensors[0].shape[0]
    flat = torch.cat([t.detach().reshape(R, -1) for t in tensors], dim=1)
    views, at = [], 0
    for t in tensors:
        n = t[0].numel()
        views.append(flat[:, at:at + n].view(t.shape))
        at += n
    return flat, views


def adam_update(p, g, m, v, cols, neg_step, bc2_sqrt, decoupled: bool, decay: bool,
                scratch=None) -> None:
    """One Adam(W) step in place of stacked weights ``p`` (R, ...) with gradient ``g`` and
    moments ``m``, ``v``: ``cols`` the per-run columns (1 - lr*wd, wd, 1 - b1, b2, 1 - b2), the
    step's (-lr / (1 - b1^t), sqrt(1 - b2^t)) columns, all (R,) and broadcast along the run
    axis. The one place of the stacked Adam(W) math, per weight or over a flat buffer.
    ``scratch``: two tensors shaped like ``p`` for the intermediates (the same kernels
    writing into them instead of fresh tensors)."""
    import torch

    one_minus_lr_wd, wd, w1, b2, w2 = cols
    a, b = (None, None) if scratch is None else scratch
    if decay and decoupled:
        p.mul_(_b(one_minus_lr_wd, p))
    elif decay:
        g = torch.addcmul(g, p, _b(wd, p))
    m.lerp_(g, _b(w1, p))
    v.mul_(_b(b2, p)).addcmul_(torch.mul(_b(w2, p), g, out=a), g)
    denom = torch.sqrt(v, out=b).div_(_b(bc2_sqrt, p)).add_(ADAM_EPS)
    p.addcdiv_(torch.mul(_b(neg_step, p), m, out=a), denom)


class StackedAdamW:
    """``torch.optim.AdamW`` (single-tensor path, amsgrad off) for R runs stacked on dim 0; with
    ``decoupled=False``, ``torch.optim.Adam`` (weight decay added to the gradient).

    Per-run scalars become float32 (R, 1, ...) tensors holding exactly the value torch's CPU
    kernel would cast the Python scalar to; every elementwise op then matches torch's kernels:
    ``mul_(1 - lr*wd)`` (or ``grad.add(param, alpha=wd)``, which ``addcmul(grad, param, wd)``
    computes with the same single rounding), ``lerp_(g, 1 - b1)``,
    ``mul_(b2).addcmul_((1 - b2)*g, g)``, ``sqrt / bc2_sqrt + eps``,
    ``addcdiv_((-step_size)*m, denom)`` -- addcmul/addcdiv with a scalar ``value`` compute
    ``value*t1`` first and then the fused kernel, so folding a per-run ``value`` into ``t1``
    gives the same bits.
    """

    def __init__(self, params: list, lrs, weight_decays, betas, steps, exp_avgs, exp_avg_sqs,
                 host_scalars: bool | None = None, per_run_torch: bool = False,
                 decoupled: bool = True, perp: bool = False):
        import torch

        self.params, self.perp = params, perp
        # per_run_torch: instead, call torch's own functional Adam(W) once per run on views of
        # the stacks (foreach on CUDA, single-tensor on CPU, as a solo run's optimiser decides):
        # the solo bits on every device, at ~10 kernels per run per step
        self.per_run_torch, self.decoupled = per_run_torch, bool(decoupled)
        self._step_ts = [[torch.tensor(float(s), dtype=torch.get_default_dtype())
                          for _ in params] for s in steps]
        self.host_scalars = (params[0].device.type == "cpu") if host_scalars is None \
            else bool(host_scalars)
        self.exp_avgs, self.exp_avg_sqs = exp_avgs, exp_avg_sqs
        self.wds = [float(x) for x in weight_decays]
        self.b1 = [float(b[0]) for b in betas]
        self.b2 = [float(b[1]) for b in betas]
        self.steps = [int(s) for s in steps]
        self._wd = _col(self.wds, params[0])
        self._wd64 = torch.tensor(self.wds, dtype=torch.float64, device=params[0].device)
        self._w1 = _col([1 - b for b in self.b1], params[0])
        self._b2 = _col(self.b2, params[0])
        self._w2 = _col([1 - b for b in self.b2], params[0])
        self._decays = any(wd != 0 for wd in self.wds)
        self.update = adam_update
        self._decay = None   # 1 - lr * wd per run, set by set_lrs (rewritten in place after)
        self._dev64 = None   # the device's float64 columns, made at the first device step
        self.set_lrs(lrs)

    def set_lrs(self, lrs, device_lrs=None) -> None:
        """Each run's lr for the coming steps (a schedule changes it once per epoch), as
        Python floats and, optionally, the same values already on the device (float64, from
        ``LrSchedules``): then the device columns are computed there, without a copy from the
        host. The device tensors are rewritten in place, so a captured step reads the new
        values."""
        import torch

        self.lrs = [float(x) for x in lrs]
        if device_lrs is None:
            decay = _col([1 - lr * wd for lr, wd in zip(self.lrs, self.wds)], self.params[0])
            lr64 = torch.tensor(self.lrs, dtype=torch.float64)
        else:   # 1 - lr * wd in float64, then rounded once: the host's arithmetic
            decay = (1 - device_lrs * self._wd64).to(self.params[0].dtype)
            lr64 = device_lrs
        if self._decay is None:
            self._decay = decay
        else:
            self._decay.copy_(decay)
        if self._dev64 is not None:
            self._dev64["lr"].copy_(lr64)

    def _corrections(self):
        """(-lr / (1 - b1^t), sqrt(1 - b2^t)) per run as float32 columns: from Python floats as
        torch's step computes them (``host_scalars``, the default on CPU), or in float64 on the
        device (the default elsewhere: no host-to-device copy per step; equal to the Python
        values up to float64 rounding)."""
        import torch

        if self.host_scalars:
            bc1 = [1 - b1 ** s for b1, s in zip(self.b1, self.steps)]
            bc2 = [1 - b2 ** s for b2, s in zip(self.b2, self.steps)]
            return (_col([-(lr / b) for lr, b in zip(self.lrs, bc1)], self.params[0]),
                    _col([b ** 0.5 for b in bc2], self.params[0]))
        c = self._dev64
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
                     decoupled_weight_decay=self.decoupled, amsgrad=False, beta1=self.b1[r],
                     beta2=self.b2[r], lr=self.lrs[r], weight_decay=self.wds[r], eps=ADAM_EPS,
                     maximize=False)

    def count_step(self) -> None:
        """Advance each run's step count (kept on the host for the solo optimiser's state)."""
        self.steps = [s + 1 for s in self.steps]

    @property
    def columns(self) -> tuple:
        return self._decay, self._wd, self._w1, self._b2, self._w2

    def _perp_grads(self) -> None:
        """⊥Grad in place of each weight's gradient (per run on views in exact mode, as a solo
        run computes it; over the stack otherwise: each run's sums are its own)."""
        import torch

        from .optim import perp_grad

        with torch.no_grad():
            for p in self.params:
                if self.per_run_torch:
                    for r in range(p.shape[0]):
                        p.grad[r].copy_(perp_grad(p[r][None], p.grad[r][None])[0])
                else:
                    p.grad.copy_(perp_grad(p, p.grad))

    def step(self) -> None:
        import torch

        self.count_step()
        if self.perp:
            self._perp_grads()
        if self.per_run_torch:
            return self._torch_step()
        neg_step, bc2_sqrt = self._corrections()
        with torch.no_grad():
            for p, m, v in zip(self.params, self.exp_avgs, self.exp_avg_sqs):
                self.update(p, p.grad, m, v, self.columns, neg_step, bc2_sqrt, self.decoupled,
                            self._decays)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def store(self, r: int, i: int, states, param) -> None:
        """Write run ``r``'s state of weight ``i`` into a solo optimiser's ``states[param]``."""
        import torch

        state = states[param]
        if not state:  # as torch.optim.Adam._init_group creates it
            state["step"] = torch.tensor(0.0, dtype=torch.get_default_dtype())
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["step"].fill_(float(self.steps[r]))
        state["exp_avg"].copy_(self.exp_avgs[i][r])
        state["exp_avg_sq"].copy_(self.exp_avg_sqs[i][r])


class FlatStackedAdamW(StackedAdamW):
    """``StackedAdamW`` whose weights, gradients and moments are views of one (R, N) buffer
    each (:func:`flat_stack`): a step copies the R runs' gradients into the flat gradient (one
    ``cat``) and runs :func:`adam_update` once over all weights -- about ten elementwise
    kernels for the whole group instead of about ten per weight. Per element the operations
    are ``StackedAdamW``'s, hence its bits. ``params`` are copied into the flat buffer; use
    the optimiser's ``params`` (leaf views that take gradients) from then on. ``compiled``:
    the update runs through ``torch.compile`` (one generated kernel; rounding may differ)."""

    def __init__(self, params: list, lrs, weight_decays, betas, steps, exp_avgs, exp_avg_sqs,
                 host_scalars: bool | None = None, decoupled: bool = True,
                 compiled: bool = False, perp: bool = False):
        import torch

        self.flat, views = flat_stack(params)
        for view in views:
            view.requires_grad_(True)
        self.flat_m, m_views = flat_stack(exp_avgs)
        self.flat_v, v_views = flat_stack(exp_avg_sqs)
        self.flat_grad = torch.zeros_like(self.flat)
        super().__init__(views, lrs, weight_decays, betas, steps, m_views, v_views,
                         host_scalars=host_scalars, decoupled=decoupled, perp=perp)
        self.scratch = None
        if compiled:   # one generated kernel, no intermediates to keep
            self.update = torch.compile(adam_update, dynamic=False)
        else:
            self.scratch = (torch.empty_like(self.flat), torch.empty_like(self.flat))

    def step(self) -> None:
        import torch

        self.count_step()
        if self.perp:
            self._perp_grads()
        neg_step, bc2_sqrt = self._corrections()
        with torch.no_grad():
            torch.cat([p.grad.reshape(p.shape[0], -1) for p in self.params], dim=1,
                      out=self.flat_grad)
            self.update(self.flat, self.flat_grad, self.flat_m, self.flat_v, self.columns,
                        neg_step, bc2_sqrt, self.decoupled, self._decays, self.scratch)


class LrSchedules:
    """Each run's lr, epoch after epoch, computed on ``device`` in float64 as
    ``grokhpc.optim.lr_factor`` computes it on the host (warmup ``(e + 1) / w``, then constant
    or ``0.5 (1 + cos(pi (e - w) / span))``; runs without a schedule keep their lr): an epoch's
    lrs reach a device optimiser without a copy from the host, which waits for the device. Equal
    to the host's values up to the device's rounding of cos. ``next()`` gives the lrs of the
    epoch it is at (``epoch`` first) and moves to the next."""

    def __init__(self, cfgs: list, epoch: int, device):
        import torch

        def col(values, dtype=torch.float64):
            return torch.tensor(values, dtype=dtype, device=device)

        self.lr = col([c.lr for c in cfgs])
        self.warmup = col([float(c.warmup_epochs) for c in cfgs])
        self.span = col([float(max(c.n_epochs - c.warmup_epochs, 1)) for c in cfgs])
        self.cosine = col([c.lr_schedule == "cosine" for c in cfgs], torch.bool)
        self.epoch = col(float(epoch))

    def next(self):
        import torch

        e, w = self.epoch, self.warmup
        warm = (e + 1) / w.clamp(min=1)
        cosine = 0.5 * (1.0 + torch.cos(math.pi * (e - w) / self.span))
        factor = torch.where(e < w, warm, torch.where(self.cosine, cosine, 1.0))
        self.epoch += 1
        return self.lr * factor


class StackedSGD:
    """``torch.optim.SGD`` (single-tensor path; dampening 0, no Nesterov) for R runs stacked on
    dim 0, per-run lr, weight decay and momentum. Its elementwise ops are torch's:
    ``grad.add(param, alpha=wd)`` and ``param.add_(grad, alpha=-lr)`` as ``addcmul`` with a
    per-run column (the same single rounding on CPU), ``buf.mul_(momentum).add_(grad)``. A
    run's first step starts its buffer at zero, which gives torch's ``clone(grad)``. With
    ``per_run_torch``, torch's own functional ``sgd`` is called run by run on views."""

    def __init__(self, params: list, lrs, weight_decays, momenta, bufs, started,
                 per_run_torch: bool = False):
        self.params, self.bufs, self.per_run_torch = params, bufs, per_run_torch
        self.wds = [float(x) for x in weight_decays]
        self.momenta = [float(x) for x in momenta]
        self.started = [bool(s) for s in started]   # a run's buffers hold its last step's
        self._wd = _col(self.wds, params[0])
        self._m = _col(self.momenta, params[0])
        # lrs from Python floats (the default on CPU) or computed on the device (set_lrs)
        self.host_scalars = params[0].device.type == "cpu"
        self._neg_lr = None
        self.set_lrs(lrs)

    def set_lrs(self, lrs, device_lrs=None) -> None:
        """Each run's lr for the coming steps, rewritten in place (a captured step reads it);
        ``device_lrs``: the same values on the device (see ``StackedAdamW.set_lrs``)."""
        self.lrs = [float(x) for x in lrs]
        neg_lr = _col([-lr for lr in self.lrs], self.params[0]) if device_lrs is None \
            else (-device_lrs).to(self.params[0].dtype)
        if self._neg_lr is None:
            self._neg_lr = neg_lr
        else:
            self._neg_lr.copy_(neg_lr)

    def count_step(self) -> None:
        """After a step every run's buffers hold its last step's (kept on the host)."""
        self.started = [True] * len(self.started)

    def _torch_step(self) -> None:
        import torch
        from torch.optim.sgd import sgd

        with torch.no_grad():
            for r in range(len(self.lrs)):
                use = self.momenta[r] != 0
                bufs = [b[r] if use and self.started[r] else None for b in self.bufs]
                sgd([p[r] for p in self.params], [p.grad[r] for p in self.params], bufs,
                    weight_decay=self.wds[r], momentum=self.momenta[r], lr=self.lrs[r],
                    dampening=0.0, nesterov=False, maximize=False, foreach=None)
                for b, new in zip(self.bufs, bufs):
                    if use and new is not None and new is not b[r]:
                        b[r].copy_(new)

    def step(self) -> None:
        import torch

        if self.per_run_torch:
            self._torch_step()
        else:
            decay, momentum = any(self.wds), any(self.momenta)
            with torch.no_grad():
                for p, buf in zip(self.params, self.bufs):
                    g = torch.addcmul(p.grad, p, _b(self._wd, p)) if decay else p.grad
                    if momentum:
                        g = buf.mul_(_b(self._m, p)).add_(g)
                    p.addcmul_(g, _b(self._neg_lr, p))
        self.count_step()

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def store(self, r: int, i: int, states, param) -> None:
        """Write run ``r``'s momentum buffer of weight ``i`` into a solo SGD's ``states[param]``
        (torch keeps no state at all without momentum)."""
        if self.momenta[r] == 0 or not self.started[r]:
            return
        state = states[param]
        if "momentum_buffer" in state:
            state["momentum_buffer"].copy_(self.bufs[i][r])
        else:
            state["momentum_buffer"] = self.bufs[i][r].clone()


def _states(trainers: list, names: list) -> list:
    """Each run's solo optimiser state of each weight in ``names`` (empty when fresh)."""
    return [[t.optimizer.state.get(t.model.get_parameter(n), {}) for n in names]
            for t in trainers]


def _stacked_state(states: list, P: dict, names: list, device):
    """``stack(key, i)``: the runs' ``key`` state of weight ``i`` stacked on the run axis
    (zeros for a run that has none yet)."""
    import torch

    def stack(key: str, i: int):
        return torch.stack([st[i][key] if key in st[i] else torch.zeros_like(P[names[i]][r])
                            for r, st in enumerate(states)]).to(device)
    return stack


def _stacked_adam(trainers: list, P: dict, names: list, device, per_run_torch: bool,
                  flat: bool, compiled: bool, decoupled: bool, perp: bool = False):
    cfgs = [t.cfg for t in trainers]
    states = _states(trainers, names)
    stack = _stacked_state(states, P, names, device)
    steps = [int(st[0]["step"].item()) if st[0] else 0 for st in states]
    args = ([P[n] for n in names], [t.optimizer.param_groups[0]["lr"] for t in trainers],
            [c.weight_decay for c in cfgs], [c.betas for c in cfgs], steps,
            [stack("exp_avg", i) for i in range(len(names))],
            [stack("exp_avg_sq", i) for i in range(len(names))])
    if flat and not per_run_torch:
        return FlatStackedAdamW(*args, decoupled=decoupled, compiled=compiled, perp=perp)
    return StackedAdamW(*args, per_run_torch=per_run_torch, decoupled=decoupled, perp=perp)


def _stacked_sgd(trainers: list, P: dict, names: list, device, per_run_torch: bool,
                 flat: bool, compiled: bool):
    cfgs = [t.cfg for t in trainers]
    states = _states(trainers, names)
    stack = _stacked_state(states, P, names, device)
    return StackedSGD([P[n] for n in names], [t.optimizer.param_groups[0]["lr"] for t in trainers],
                      [c.weight_decay for c in cfgs], [c.momentum for c in cfgs],
                      [stack("momentum_buffer", i) for i in range(len(names))],
                      ["momentum_buffer" in st[0] for st in states], per_run_torch)


# name (grokhpc.optim.OPTIMIZERS) -> the stacked optimiser of a group of runs that use it:
# (trainers, P, names, device, per_run_torch, flat, compiled) -> its stacked optimiser
STACKED: dict[str, Callable] = {
    "adamw": functools.partial(_stacked_adam, decoupled=True),
    "adam": functools.partial(_stacked_adam, decoupled=False),
    "sgd": _stacked_sgd,
    "perp_adamw": functools.partial(_stacked_adam, decoupled=True, perp=True),
}


def stacked_optimizer(trainers: list, P: dict, names: list, device, per_run_torch: bool,
                      flat: bool = False, compiled: bool = False):
    """The group's stacked optimiser over ``P[names]``, its state taken from each shadow's own
    torch optimiser (zeros and step 0 when fresh). ``flat``: Adam(W) as ``FlatStackedAdamW``
    (``compiled``: its update through torch.compile), whose ``params`` replace ``P[names]``;
    SGD and ``per_run_torch`` keep their per-weight steps. ValueError (one line) for an
    optimiser without a stacked step."""
    name = trainers[0].cfg.optimizer
    build = STACKED.get(name)
    if build is None:
        raise ValueError(f"optimizer: no stacked step for {name!r} (grokhpc.stacked_optim "
                         f"knows {', '.join(STACKED)})")
    return build(trainers, P, names, device, per_run_torch, flat, compiled)
