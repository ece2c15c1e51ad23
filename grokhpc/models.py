"""The model families a run may name (``RunConfig.model``): one builder each.

Stage: model & data. Every family's module has the interface the trainers call
(``grokhpc.stack``, ``grokhpc.train``): ``last_logits(rows)`` -> (rows, n_classes) logits of one
run, and ``stacked_last_logits(P, rows)`` -> (R, rows, n_classes) of R runs' stacked weights in
one batched computation. Weights are plain named parameters, so checkpoints, optimisers and
resumes are the same for every family. A third family is one entry of :data:`FAMILIES`.

* ``transformer``: the seed's (``grokhpc.model.Transformer``);
* ``mlp``: Omnigrok's MLP (``grokhpc.mlp.MLP``).
"""

from __future__ import annotations

from typing import Callable


def _transformer(cfg):
    from .model import build_model

    return build_model(cfg, "cpu")


def _mlp(cfg):
    from .mlp import build_mlp
    from .model import scale_init

    model = build_mlp(cfg)
    scale_init(model, cfg.init_scale)
    return model


# Each family's builder: a freshly initialised model for a config, on the CPU.
FAMILIES: dict[str, Callable] = {"transformer": _transformer, "mlp": _mlp}


def build_model(cfg, device="cpu"):
    """A freshly initialised model of ``cfg``'s family (built on the CPU, then moved: the
    initialisation is device-independent)."""
    return FAMILIES[cfg.model](cfg).to(device)
