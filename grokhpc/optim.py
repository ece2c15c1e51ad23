"""Optimisers, learning-rate schedules and minibatch order of a run, from its config.

* ``OPTIMIZERS``: the registry of the optimisers a run may name (``RunConfig.optimizer``, which
  config checks against it), each with how its solo torch optimiser is built; a packed group's
  stacked step for each is in ``grokhpc.stacked_optim.STACKED`` (adding an optimiser touches
  these two files). ``adamw`` (the seed's: decoupled weight decay), ``adam`` (weight decay
  added to the gradient as an L2 term, torch.optim.Adam's meaning; Power et al. 2022 used it
  with no decay), ``sgd`` (with ``momentum``; weight decay as an L2 term), ``perp_adamw``
  (Prieto et al. 2025's ⊥AdamW: each weight tensor's gradient loses its component along the
  weights and is rescaled to its own norm, :func:`perp_grad`, then AdamW with its decay).
* ``lr_factor``: the multiplier of ``lr`` during an epoch: a linear warmup over the first
  ``warmup_epochs`` epochs (epoch e of the warmup runs at (e + 1) / warmup_epochs), then
  constant or a cosine decay to zero at ``n_epochs``. Every optimiser step of an epoch uses
  the epoch's factor.
* ``epoch_batches``: with an integer ``batch_size``, an epoch is one pass over the train rows
  in an order drawn from a seeded generator (its state is part of the run's resumable state),
  cut into ``ceil(n_train / batch_size)`` minibatches, the last one possibly smaller.

``cfg`` is a ``grokhpc.config.RunConfig`` throughout; this module imports nothing of grokhpc
(config imports its registry) and no torch at module level.
"""

from __future__ import annotations

import math
from typing import Callable


def _adamw(params, cfg):
    import torch

    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                             betas=tuple(cfg.betas))


def _adam(params, cfg):
    import torch

    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                            betas=tuple(cfg.betas))


def _sgd(params, cfg):
    import torch

    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                           weight_decay=cfg.weight_decay)


# Added to the denominators of perp_grad, as the authors' code does: a zero weight tensor or a
# gradient all along the weights leaves the gradient finite.
PERP_EPS = 1e-30


def perp_grad(w, g):
    """⊥Grad of stacked weights ``w`` and gradients ``g`` (R, ...), run by run: ``g`` less its
    projection on ``w``, ``g - (w.g / (w.w + eps)) w``, rescaled to ``|g|``, ``* |g| /
    (|g_perp| + eps)``; a new tensor shaped like ``g``."""
    R = w.shape[0]
    wf, gf = w.detach().reshape(R, -1), g.reshape(R, -1)
    proj = (wf * gf).sum(dim=1) / ((wf * wf).sum(dim=1) + PERP_EPS)
    g_perp = gf - proj[:, None] * wf
    scale = gf.norm(dim=1) / (g_perp.norm(dim=1) + PERP_EPS)
    return (g_perp * scale[:, None]).view_as(g)


def _perp_adamw(params, cfg):
    import torch

    class PerpAdamW(torch.optim.AdamW):
        """AdamW on the ⊥Grad of each weight's gradient (:func:`perp_grad`)."""

        @torch.no_grad()
        def step(self, closure=None):
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad.copy_(perp_grad(p[None], p.grad[None])[0])
            return super().step(closure)

    return PerpAdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=tuple(cfg.betas))


# name -> the solo torch optimiser over a run's parameters (params, cfg) -> torch.optim.Optimizer
OPTIMIZERS: dict[str, Callable] = {"adamw": _adamw, "adam": _adam, "sgd": _sgd,
                                   "perp_adamw": _perp_adamw}


def unknown_optimizer(name) -> str:
    """The one line for an optimiser name the registry does not hold."""
    return f"optimizer: expected one of {', '.join(OPTIMIZERS)}, got {name!r}"


def make_optimizer(params, cfg):
    """The run's optimiser over ``params`` (an iterable of tensors or param groups); ValueError
    (one line) for a name that is not in ``OPTIMIZERS``."""
    build = OPTIMIZERS.get(cfg.optimizer)
    if build is None:
        raise ValueError(unknown_optimizer(cfg.optimizer))
    return build(params, cfg)


def has_schedule(cfg) -> bool:
    return cfg.warmup_epochs > 0 or cfg.lr_schedule != "constant"


def lr_factor(epoch: int, cfg) -> float:
    """Multiplier of ``cfg.lr`` for the optimiser steps of ``epoch`` (0-based)."""
    w = cfg.warmup_epochs
    if epoch < w:
        return (epoch + 1) / w
    if cfg.lr_schedule == "cosine":
        span = max(cfg.n_epochs - w, 1)
        return 0.5 * (1.0 + math.cos(math.pi * (epoch - w) / span))
    return 1.0


def set_lr(optimizer, epoch: int, cfg) -> None:
    """Set every param group's lr for ``epoch`` (a no-op without a schedule, so the default
    path keeps the exact lr the optimiser was built with)."""
    if not has_schedule(cfg):
        return
    lr = cfg.lr * lr_factor(epoch, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr


def batch_generator(cfg):
    """The seeded generator that orders minibatches (on CPU; its state is saved with the run)."""
    import torch

    return torch.Generator().manual_seed(cfg.model_seed * 1_000_003 + cfg.data_seed)


def epoch_batches(n_train: int, cfg, gen) -> list:
    """Index tensors of one epoch's minibatches (None for full batch: all rows, in order)."""
    import torch

    if cfg.full_batch:
        return [None]
    order = torch.randperm(n_train, generator=gen)
    return list(order.split(int(cfg.batch_size)))


def weight_norm(params):
    """The total L2 norm of ``params``, a float64 tensor."""
    import torch

    return torch.sqrt(sum((p.detach().double() ** 2).sum() for p in params))


def rescale_to_norm(params, target) -> None:
    """Scale ``params`` in place so that their total norm is ``target`` (Omnigrok's constrained
    training at a fixed weight norm)."""
    import torch

    with torch.no_grad():
        factor = (target / weight_norm(params)).to(torch.float32)
        for p in params:
            p.mul_(factor.to(p.device))
