"""The MLP family (``model: mlp``): ``depth`` Linear layers of ``width`` with ``act_fn`` between.

Omnigrok's (Liu et al. 2022) model: ``depth`` counts the Linear layers (depth 3, width 200 is
Linear(n_in, 200), act, Linear(200, 200), act, Linear(200, n_out)); every weight and bias is
trained. Initialisation is torch's ``nn.Linear`` default, U(-1/sqrt(fan_in), 1/sqrt(fan_in))
for weights and biases, drawn layer by layer (weight, then bias) from a generator seeded by
``model_seed``; ``build_model`` then multiplies every parameter by ``init_scale`` (Omnigrok's
alpha) as it does for the transformer.

Inputs:

* a binary operation's rows ``[a, b, =]`` (long) are encoded as ``encoding`` says: ``onehot``
  concatenates one-hot(a) and one-hot(b) (2n inputs), ``twohot`` sums them (n inputs; Prieto
  et al. 2025). The first layer of a one-hot input is a gather of its weight's columns, equal
  to the matmul with the explicit one-hot vector (tests hold it to that) without forming it;
* a dataset's rows (sparse parity, images: float features) go through the first layer as they
  are.

``last_logits(x)`` is the training path, as the transformer's: (rows, n_out) logits.
``stacked_last_logits`` is the batched form of R runs: the same code under ``torch.func.vmap``
over ``functional_call`` with the stacked weights.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import RunConfig
from .families import mlp_sizes
from .tasks import task


class MLP(nn.Module):
    """Linear layers of ``sizes`` (input to output, ``families.mlp_sizes``); ``encoding`` None
    for float features."""

    def __init__(self, sizes: list[int], act_fn: str = "relu", encoding: str | None = None,
                 n_operands: int = 0):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(a, b) for a, b in zip(sizes, sizes[1:])])
        self.act_fn, self.encoding, self.n_operands = act_fn, encoding, n_operands

    def first_layer(self, x: torch.Tensor) -> torch.Tensor:
        """The first Linear layer of rows ``x``: a gather of its weight's columns for one-hot
        encoded operands, the matmul for features."""
        lin = self.layers[0]
        if self.encoding is None:
            return F.linear(x, lin.weight, lin.bias)
        cols = lin.weight.t()                       # (n_in, width): row i is input i's column
        shift = self.n_operands if self.encoding == "onehot" else 0
        return cols[x[..., 0]] + cols[x[..., 1] + shift] + lin.bias

    def last_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(rows, n_out) logits of rows ``x``."""
        act = F.relu if self.act_fn == "relu" else F.gelu
        h = self.first_layer(x)
        for lin in self.layers[1:]:
            h = lin(act(h))
        return h

    forward = last_logits

    def stacked_last_logits(self, P: dict, x: torch.Tensor) -> torch.Tensor:
        """Logits of R runs at once: weights ``P`` (R, *shape) by name, rows ``x`` (R, b, ...)
        -> (R, b, n_out), one batched computation (``vmap`` of :meth:`last_logits`)."""
        from torch.func import functional_call, vmap

        def one(params, rows):
            return functional_call(self, params, (rows,))

        return vmap(one)(P, x)


def init_weights(model: MLP, seed: int) -> None:
    """torch's ``nn.Linear`` default distribution, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), for each
    weight then bias in layer order, from a generator seeded by ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lin in model.layers:
            bound = 1.0 / math.sqrt(lin.in_features)
            for p in (lin.weight, lin.bias):
                p.copy_(torch.rand(p.shape, generator=gen) * (2 * bound) - bound)


def build_mlp(cfg: RunConfig) -> MLP:
    """A freshly initialised MLP for ``cfg`` (on CPU, unscaled)."""
    binary = task(cfg.op).kind == "binary_op"
    model = MLP(mlp_sizes(cfg), cfg.act_fn, cfg.encoding if binary else None,
                cfg.n_classes if binary else 0)
    init_weights(model, cfg.model_seed)
    return model
