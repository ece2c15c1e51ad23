"""How a sweep's fields are drawn: their values as axis positions, colours and ticks.

Stage: figures (``grokhpc.sweep_figures`` draws the cross-run figures with these). A swept
field's values become hashable (lists such as betas become text, :func:`keyed`), are ordered
(numbers in order, text alphabetically, :func:`axis_order`) and scaled (log when the positive
values span a decade or more, categories for text and lists, :func:`axis_scale`); one field
colours the curve figures (:func:`colour_field`), one colour per value; log axes get ticks at
1, 2, 5 x 10^k (:func:`nice_ticks`). Seeds are repeats, never an axis (:func:`is_seed`).

pandas and plotly are imported inside the functions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .config import is_seed

# colour / series preference among swept fields
AXIS_PREFERENCE = ("weight_decay", "train_frac", "p", "lr", "op", "d_model", "d_mlp", "n_heads",
                   "betas", "n_epochs")
UNITS = {
    "weight_decay": "weight decay λ (AdamW, decoupled)",
    "train_frac": "training fraction (of all p² pairs)",
    "p": "prime p (modulus)",
    "lr": "learning rate",
    "op": "operation",
    "d_model": "residual width d_model",
    "batch_size": "batch size (pairs per step)",
    "init_scale": "initialisation scale α",
    "data_seed": "data seed",
    "model_seed": "model seed",
    "grad_filter": "gradient filter (Grokfast)",
    "loss_fn": "loss (softmax or StableMax cross-entropy)",
    "optimizer": "optimiser",
}


def value_key(v: Any) -> Any:
    """A hashable, printable stand-in for a config value (lists such as betas become text)."""
    import numpy as np

    if isinstance(v, (list, tuple, np.ndarray)):
        return "(" + ", ".join(fmt_value(x) for x in list(v)) + ")"
    return v


def fmt_value(v: Any) -> str:
    """A value as a label shows it (floats in ``%g``)."""
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def keyed(df, field: str):
    """``df[field]`` with hashable values (see :func:`value_key`)."""
    col = df[field]
    if col.dtype == object:
        return col.map(value_key)
    return col


def varies(df, field: str) -> bool:
    """Whether ``field`` takes more than one value among the rows of ``df``."""
    return field in df.columns and keyed(df, field).nunique(dropna=True) > 1


@dataclass(frozen=True)
class Scale:
    """How a swept field is drawn: 'log', 'linear' or 'category' (``order``: the categories)."""

    kind: str
    order: tuple = ()

    def position(self, v: Any) -> float:
        return float(self.order.index(v)) if self.kind == "category" else float(v)


def axis_order(values) -> list:
    """The distinct values of a (keyed) column, numbers in order, text alphabetically."""
    return sorted(values.dropna().unique(), key=lambda v: (isinstance(v, str), v))


def axis_scale(values) -> Scale:
    """Log when the positive values span a decade or more, categories for non-numbers."""
    from pandas.api.types import is_bool_dtype, is_numeric_dtype

    if not is_numeric_dtype(values) or is_bool_dtype(values):
        return Scale("category", tuple(axis_order(values)))
    pos = [float(v) for v in values.dropna().unique() if v > 0]
    if len(pos) >= 2 and max(pos) / min(pos) >= 10:
        return Scale("log")
    return Scale("linear")


def colours(n: int) -> list[str]:
    """``n`` colours along Viridis (one blue for a single series)."""
    from plotly.colors import sample_colorscale

    if n <= 1:
        return ["#0072B2"]
    return sample_colorscale("Viridis", [i / (n - 1) * 0.9 for i in range(n)])


def colour_field(swept: list[str], fin) -> str | None:
    """The swept field that colours the curve figures: the first of AXIS_PREFERENCE (then of
    the sweep's own order) that varies, else a seed that varies, else None."""
    cand = [s for s in swept if not is_seed(s) and varies(fin, s)]
    for a in AXIS_PREFERENCE:
        if a in cand:
            return a
    if cand:
        return cand[0]
    return next((s for s in swept if is_seed(s) and varies(fin, s)), None)


def by_colour(fin, colour_by: str | None):
    """[(value, rows)] per value of ``colour_by`` in axis order; [(None, all rows)] without."""
    if colour_by is None:
        return [(None, fin)]
    return list(fin.groupby(keyed(fin, colour_by), sort=True))


def colour_map(fin, colour_by: str | None) -> dict:
    """{value of ``colour_by``: its colour}."""
    vals = axis_order(keyed(fin, colour_by)) if colour_by else [None]
    return dict(zip(vals, colours(len(vals))))


def nice_ticks(lo: float, hi: float) -> list[float]:
    """Values 1, 2, 5 x 10^k from ``lo`` to ``hi`` (positive), for labelled ticks on a log
    axis; every digit when that gives fewer than three."""
    if not (lo > 0 and hi >= lo):
        return []
    ks = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
    for mantissas in ((1, 2, 5), range(1, 10)):
        out = [m * 10.0 ** k for k in ks for m in mantissas if lo <= m * 10.0 ** k <= hi]
        if len(out) >= 3:
            break
    return out


def tick_text(v: float) -> str:
    """A tick's label: thousands separated, small values in ``%g``."""
    return f"{v:,.0f}" if v >= 1 else f"{v:g}"
