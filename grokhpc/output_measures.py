"""The measures every model family has, read off the outputs and the weights alone.

Stage: the per-checkpoint measures (``grokhpc.measures`` writes them with the group measures of
the transformer). Losses and accuracies on the train, test and all rows (cross-entropy in
float64, as the seed's ``loss_fn``, whatever loss the run trained with, so that runs compare),
and ``weight_norm_sq``, the sum of squares of every parameter. :class:`OutputEvaluator`
measures a run of any family this way (the MLP: its group columns stay null, with the reason
``task_measures.run_no_lens_reason`` gives).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from .lastpos import eval_row_scores


def split_scores(logits, labels, train_idx, test_idx) -> dict[str, float]:
    """``{split}_loss`` and ``{split}_acc`` of ``logits`` (rows in dataset order) for the train,
    test and all rows."""
    row_loss, row_hit = eval_row_scores(logits, labels)     # once for all three splits
    out = {}
    for split, idx in (("train", train_idx), ("test", test_idx), ("all", None)):
        rows = slice(None) if idx is None else idx
        out[f"{split}_loss"] = float(row_loss[rows].mean())
        out[f"{split}_acc"] = float(row_hit[rows].mean())
    return out


def weight_norm_sq(W: Mapping[str, Any]) -> float:
    """The sum of squares of every parameter, in float64."""
    return float(sum(float(np.square(np.asarray(v, np.float64)).sum()) for v in W.values()))


def load_weights(model, W: Mapping[str, Any]):
    """``model`` holding the weights ``W`` ({parameter name: array}), copied in place."""
    import torch

    for name, value in W.items():
        model.get_parameter(name).copy_(torch.as_tensor(np.asarray(value)))
    return model


class OutputEvaluator:
    """The run's model and rows on one device; :meth:`measure` scores one checkpoint's weights
    through the model's own ``last_logits``."""

    CHUNK = 1 << 14   # rows per forward

    def __init__(self, cfg, device=None):
        import torch

        from .data import make_dataset
        from .models import build_model

        self.device = torch.device(device or "cpu")
        self.model = build_model(cfg, self.device).requires_grad_(False)
        data = make_dataset(cfg).to(self.device)
        self.rows, self.labels = data.tokens, data.labels
        self.train_idx, self.test_idx = data.train_idx, data.test_idx

    def measure(self, W: Mapping[str, Any]) -> dict[str, Any]:
        """The output measures of one model state ({parameter name: array}); group columns
        are left to the caller (null)."""
        import torch

        with torch.inference_mode():
            load_weights(self.model, W)
            logits = torch.cat([self.model.last_logits(x) for x in self.rows.split(self.CHUNK)])
            out = split_scores(logits, self.labels, self.train_idx, self.test_idx)
        out["weight_norm_sq"] = weight_norm_sq(W)
        return out
