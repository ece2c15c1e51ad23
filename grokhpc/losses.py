"""The training losses a run may name (``RunConfig.loss_fn``) and the softmax-collapse measure.

* ``softmax``: the seed's cross-entropy, log-softmax in the run's ``loss_dtype``
  (``grokhpc.lastpos.cross_entropy``, with its fused CPU kernel for one run).
* ``stablemax``: Prieto et al. (2025)'s StableMax cross-entropy. ``s(x) = x + 1`` for x >= 0,
  ``1 / (1 - x)`` for x < 0; ``p_i = s(x_i) / sum_j s(x_j)``; the loss ``-log p_label``, all in
  the run's ``loss_dtype`` (the authors' code casts the logits to float64, the default
  loss_dtype; its ``1e-30`` added to ``1 - x`` is absorbed by ``1 - x >= 1`` in float32 and
  float64 alike, so it is left out). The x < 0 branch is evaluated at ``min(x, 0)``, so that
  the branch ``torch.where`` discards has a finite gradient (at x = 1, ``1 / (1 - x)`` would
  put 0 * inf = NaN into the backward).
* ``mse``: Omnigrok's (Liu et al. 2022) mean squared error between the logits and the one-hot
  target, averaged over the classes and the rows (``torch.nn.MSELoss()`` on one-hot targets),
  in the run's ``loss_dtype``. Accuracy is the argmax of the logits, as for the others.
* :func:`softmax_collapse`: Prieto et al.'s SC, the fraction of rows whose float32 softmax
  denominator ``sum_j exp(x_j - max x)`` is exactly 1: every other term is absorbed, the top
  probability is exactly 1 and, for a correctly classified row, its loss and gradient are
  exactly zero (their code's ``(sum_exp == 1).mean()`` on the train logits in float32).

A new loss is one entry of ``LOSS_FNS`` and one branch of :func:`loss`. torch is imported inside the
functions, so config can import ``LOSS_FNS``.
"""

from __future__ import annotations

LOSS_FNS = ("softmax", "stablemax", "mse")


def stablemax_s(x):
    """StableMax's ``s(x)``: x + 1 for x >= 0, 1 / (1 - x) for x < 0 (elementwise)."""
    import torch

    return torch.where(x < 0, 1.0 / (1.0 - x.clamp(max=0.0)), x + 1.0)


def stablemax_row_losses(logits, labels, dtype: str):
    """``-log(s(x_label) / sum_j s(x_j))`` per row, in ``dtype``, (..., b)."""
    import torch

    s = stablemax_s(logits.to(getattr(torch, dtype)))
    picked = s.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return -torch.log(picked / s.sum(dim=-1))


def mse_row_losses(logits, labels, dtype: str):
    """Each row's mean over the classes of ``(x - onehot(label))^2``, in ``dtype``, (..., b)."""
    import torch

    x = logits.to(getattr(torch, dtype))
    classes = torch.arange(x.shape[-1], device=x.device)
    target = (classes == labels.unsqueeze(-1)).to(x.dtype)
    return (x - target).square().mean(dim=-1)


def row_losses(logits, labels, dtype: str = "float64", loss_fn: str = "softmax"):
    """Each row's loss ``loss_fn``, (..., b), in ``dtype`` (what :func:`loss` averages)."""
    if loss_fn == "stablemax":
        return stablemax_row_losses(logits, labels, dtype)
    if loss_fn == "mse":
        return mse_row_losses(logits, labels, dtype)
    from .lastpos import row_losses as cross_entropy_rows

    return cross_entropy_rows(logits, labels, dtype)


def _row_mean(nll, mask):
    """Each run's mean over its real rows (``mask`` None: all rows), as lastpos's loss."""
    import torch

    if mask is None:
        return nll.mean(dim=-1)
    return torch.where(mask, nll, 0.0).sum(dim=-1) / mask.sum(dim=-1)


def loss(logits, labels, dtype: str = "float64", mask=None, loss_fn: str = "softmax"):
    """Mean loss ``loss_fn`` over the rows of ``logits`` (..., b, p) against ``labels``
    (..., b): a scalar for one run, (R,) for stacked runs; ``mask`` as
    ``grokhpc.lastpos.cross_entropy``."""
    if loss_fn == "softmax":
        from .lastpos import cross_entropy

        return cross_entropy(logits, labels, dtype, mask)
    if loss_fn == "stablemax":
        return _row_mean(stablemax_row_losses(logits, labels, dtype), mask)
    if loss_fn == "mse":
        return _row_mean(mse_row_losses(logits, labels, dtype), mask)
    raise ValueError(f"loss_fn: expected one of {', '.join(LOSS_FNS)}, got {loss_fn!r}")


def softmax_collapse(logits, mask=None):
    """The fraction of rows (each run's own, ``mask`` as :func:`loss`) whose float32 softmax
    denominator ``sum_j exp(x_j - max_j x)`` is exactly 1 (float64, (...))."""
    import torch

    x = logits.detach().float()
    total = torch.exp(x - x.amax(dim=-1, keepdim=True)).sum(dim=-1)
    return _row_mean((total == 1.0).double(), mask)
