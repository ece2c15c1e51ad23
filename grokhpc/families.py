"""Which run fields each model family and each dataset reads: the checks ``config.validate``
runs for them.

Stage: foundations (``config`` imports this module; it imports only ``tasks``). A field that a
run's family or dataset does not read must stay at its default: set, it would change run_id and
nothing else. The MLP reads ``depth``, ``width``, ``encoding`` (the transformer none of them);
the transformer reads its sizes, ``n_layers`` and ``normalization`` (the MLP none of them);
both read ``act_fn`` and ``init_scale``. The datasets that are no binary operation
(:data:`DATA_OPS`) need ``model: mlp``, take no ``p`` and read their own fields
(:data:`DATASET_FIELDS`).
"""

from __future__ import annotations

from typing import Any, Mapping

from .tasks import TASKS

MODELS = ("transformer", "mlp")          # the model families (grokhpc.models)
ENCODINGS = ("onehot", "twohot")         # an MLP's input for a binary operation (grokhpc.mlp)
TRANSFORMER_FIELDS = ("n_heads", "d_model", "d_head", "d_mlp", "n_layers", "normalization")
MLP_FIELDS = ("depth", "width", "encoding")
# Datasets that are no binary operation (sparse parity, images): p does not apply to them.
DATA_OPS = tuple(name for name, t in TASKS.items() if t.kind != "binary_op")
# The dataset fields and the ops that read them.
DATASET_FIELDS = {"n_bits": ("sparse_parity",), "k_bits": ("sparse_parity",),
                  "n_samples": ("sparse_parity", "digits", "mnist")}
MAX_BITS = 4096

Check = tuple[bool, str, str]   # (holds, field, what was expected)


def mlp_sizes(cfg) -> list[int]:
    """An MLP's layer sizes, input to output: its first layer's inputs (2n for onehot, n for
    twohot over a binary operation of n operands; a dataset's features: sparse parity's
    n_bits, an image's pixels), ``depth - 1`` hidden layers of ``width``, the classes."""
    task = TASKS[cfg.op]
    if task.kind == "binary_op":
        n_in = cfg.n_classes * (2 if cfg.encoding == "onehot" else 1)
    else:
        n_in = cfg.n_bits if task.kind == "sparse_parity" else task.inputs
    return [n_in] + [cfg.width] * (cfg.depth - 1) + [cfg.n_classes]


def family_checks(cfg, defaults: Mapping[str, Any]) -> list[Check]:
    """The model family's and the dataset's checks of ``cfg`` (``defaults``: every field's)."""
    return _model_checks(cfg, defaults) + _dataset_checks(cfg, defaults)


def _model_checks(cfg, d: Mapping[str, Any]) -> list[Check]:
    """The family's fields: each family's own, the other's left at their defaults."""
    other = MLP_FIELDS if cfg.model != "mlp" else TRANSFORMER_FIELDS
    checks = [(cfg.model in MODELS, "model", f"one of {', '.join(MODELS)}"),
              (cfg.depth >= 1, "depth", "an integer >= 1"),
              (cfg.width >= 1, "width", "an integer >= 1"),
              (cfg.encoding in ENCODINGS, "encoding", f"one of {', '.join(ENCODINGS)}")]
    checks += [(getattr(cfg, k) == d[k], k, f"its default {d[k]!r} unless model is "
                f"{'mlp' if k in MLP_FIELDS else 'transformer'}") for k in other]
    checks += [(cfg.op not in DATA_OPS or cfg.model == "mlp", "model",
                f"mlp for op {cfg.op} (a dataset, not a sequence of tokens)"),
               (cfg.op not in DATA_OPS or cfg.encoding == d["encoding"], "encoding",
                f"{d['encoding']} for op {cfg.op} (it encodes the operands of a binary "
                "operation)")]
    return checks


def _dataset_checks(cfg, d: Mapping[str, Any]) -> list[Check]:
    """The datasets' own fields, each left at its default for the ops that do not read it."""
    task = TASKS.get(cfg.op) if isinstance(cfg.op, str) else None
    checks = [(getattr(cfg, k) == d[k] or cfg.op in ops, k,
               f"{d[k]} unless op is {' or '.join(ops)}") for k, ops in DATASET_FIELDS.items()]
    checks += [(cfg.op not in DATA_OPS or cfg.p == d["p"], "p",
                f"left out for op {cfg.op} (p does not apply to it)"),
               (1 <= cfg.n_bits <= MAX_BITS, "n_bits", f"an integer in 1..{MAX_BITS}"),
               (1 <= cfg.k_bits <= cfg.n_bits, "k_bits", "an integer in 1..n_bits"),
               (cfg.n_samples >= 2, "n_samples", "an integer >= 2")]
    if task is not None and task.kind == "image":
        checks.append((cfg.n_samples <= task.pool[0], "n_samples",
                       f"at most {task.pool[0]} (the training images of {cfg.op})"))
        checks.append((cfg.train_frac == d["train_frac"], "train_frac",
                       f"left out for op {cfg.op} (n_samples sets its training images)"))
    return checks
