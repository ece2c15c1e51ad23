"""The cross-run figures of a sweep, drawn from its aggregated tables (grokhpc.aggregate).

Stage: figures. ``grokhpc.aggregate`` calls :func:`cross_run_figures` with the tables
``grokhpc.tables`` built and writes each plotly figure through ``grokhpc.figures.export``
(PNG + offline HTML); how a swept field's values become axes, colours and ticks is
``grokhpc.sweep_axes``'. A figure with nothing to show is left out with a one-line note.

===============================  ================================================================
``grok_vs_<axis>``               grokking epoch against one swept field (any run field that varies
                                 and is not a seed): median over the other runs of each value,
                                 bars min-max; one series per value of the next swept field;
                                 categories as points (median and each run), never joined
``phase_<a>_x_<b>``              median grokking epoch over two swept fields (named in the spec's
                                 ``figures: {phase: [a, b]}``, else weight_decay x train_frac)
``test_loss_curves``             every finished run's test loss, coloured by a swept field
``measures_aligned``             progress measures against epochs since each run's grokking
``weight_norm_and_test_acc``     Omnigrok's view: total weight norm and test accuracy against
                                 log epoch, coloured by a swept field
===============================  ================================================================

A run that never grokked counts as later than every run that did: its grokking epoch is drawn
open at its last epoch. Numeric axes whose positive values span a decade or more are drawn on a
log axis; text and list values (op, betas) as categories.

plotly, pandas and pyarrow are imported inside the functions.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable

from .figures import paper_style
from .sweep_axes import (UNITS, Scale, axis_order, axis_scale, by_colour, colour_field,
                         colour_map, colours, fmt_value, is_seed, keyed, nice_ticks, tick_text,
                         varies)
from .tables import FINISHED, config_scalar_columns

DEFAULT_PHASE = ("weight_decay", "train_frac")
POINT_BUDGET = 120_000  # points per line figure: keeps HTML small and PNG rendering quick
GROK_AXIS = "grokking epoch (first test acc ≥ 99%, epochs)"
RUN_MARK = dict(symbol="line-ew-open", size=14, line=dict(width=2))   # one run on a category
ALIGNED_MEASURES = ("restricted_loss", "excluded_loss", "test_loss", "train_loss",
                    "weight_norm_sq", "gini_embed", "gini_logit", "cos_residual")


def _group_stats(values: list[float], censored: list[bool], censor_at: list[float]):
    """Median and min/max over runs, censored runs counted as 'later than any grokked run'.

    Returns (median, lo, hi, median_is_censored, n_censored)."""
    import numpy as np

    v = np.array([math.inf if c else float(x) for x, c in zip(values, censored)])
    if not len(v):
        return None
    med = float(np.quantile(v, 0.5, method="inverted_cdf"))
    cmax = max([c for c, cc in zip(censor_at, censored) if cc] or [float("nan")])
    lo, hi, med_c = float(v.min()), float(v.max()), math.isinf(med)
    med, lo, hi = (cmax if math.isinf(x) else x for x in (med, lo, hi))
    return med, lo, hi, med_c, int(sum(censored))


def _stats_of(g):
    return _group_stats(g["grokking_epoch"].tolist(), g["grokked"].eq(False).tolist(),
                        g["epoch"].fillna(g["grokking_epoch"]).tolist())


def truly_pooled(fin, by: list[str], fields: list[str]) -> list[str]:
    """The ``fields`` that take more than one value among runs sharing the values of ``by``
    (the figure's axes): a field zipped with an axis (weight_decay with optimizer) is set by
    it, so the figure's groups do not pool over it."""
    groups = [keyed(fin, b) for b in by if b]
    if not groups:
        return list(fields)
    return [f for f in fields
            if (keyed(fin, f).groupby(groups, dropna=False).nunique(dropna=False) > 1).any()]


def _over(seeds: list[str], pooled: list[str]) -> str:
    over = f" over {', '.join(seeds)}" if seeds else ""
    return over + (f"; pooled over {', '.join(pooled)}" if pooled else "")


# ---- grokking epoch against each swept field -----------------------------------------------
def grok_vs_figures(fin, swept: list[str]) -> tuple[dict, list[str]]:
    """``grok_vs_<axis>`` for each swept field that varies and is not a seed."""
    figs: dict[str, Any] = {}
    notes: list[str] = []
    axes = [a for a in swept if not is_seed(a) and a in fin.columns]
    for a in axes:
        if not varies(fin, a):
            notes.append(f"grok_vs_{a} skipped: {a} did not vary among the finished runs")
    axes = [a for a in axes if varies(fin, a)]
    if not axes:
        notes.append("grok_vs_<field> skipped: no swept field other than the seeds varied")
    seeds = [s for s in swept if is_seed(s) and varies(fin, s)]
    for i, x in enumerate(axes):
        others = axes[i + 1:] + axes[:i]
        series, pooled = (others[0], others[1:]) if others else (None, [])
        fig, note = grok_vs(fin, x, series, seeds, truly_pooled(fin, [x, series], pooled))
        figs[f"grok_vs_{x}"] = fig
        if note:
            notes.append(note)
    return figs, notes


def grok_vs(fin, x: str, series: str | None, seeds: list[str], pooled: list[str]):
    """Grokking epoch against field ``x``, one series per value of ``series``; and a note
    when runs had to be left out (non-positive values on a log axis)."""
    import plotly.graph_objects as go

    scale = axis_scale(keyed(fin, x))
    df, note = fin, None
    if scale.kind == "log":
        df = fin[fin[x] > 0]
        if len(df) < len(fin):
            note = f"grok_vs_{x}: runs with {x} <= 0 left out (log axis)"
    fig = go.Figure()
    svals = axis_order(keyed(df, series)) if series else [None]
    span = 0.0 if scale.kind != "linear" else float(df[x].max() - df[x].min())
    any_cens = False
    for i, (colour, sv) in enumerate(zip(colours(len(svals)), svals)):
        sub = df if sv is None else df[keyed(df, series) == sv]
        shift = (i - (len(svals) - 1) / 2) * 0.012  # equal values side by side, not hidden
        any_cens |= _grok_series(fig, sub, x, scale, shift, span, colour,
                                 fmt_value(sv) if series else "median")
    if scale.kind == "category":   # what the dashes across the min-max bars are
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name="each run (grokked)",
                                 marker=dict(RUN_MARK, color="black")))
    if any_cens:
        _censored_legend(fig)
    ys = df["grokking_epoch"].tolist() + df["epoch"].fillna(df["grokking_epoch"]).tolist()
    _grok_axes(fig, x, scale, axis_order(keyed(df, x)), (min(ys), max(ys)))
    runs = " and each run" if scale.kind == "category" else ""
    title = f"Grokking time vs {x} (median, min–max{runs}{_over(seeds, pooled)})"
    paper_style(fig, title=title, legend_title=series)
    if len(svals) <= 3:  # few series: the legend in one row below the plot, which keeps its width
        fig.update_layout(legend=dict(orientation="h", x=0, y=-0.22, yanchor="top"))
    elif len(svals) > 6:  # many series: a compact legend that still fits the paper height
        fig.update_layout(legend=dict(font=dict(size=11), tracegroupgap=0))
    return fig, note


def _dodge(pos: float, shift: float, scale: Scale, span: float) -> float:
    if scale.kind == "log":
        return pos * 10 ** shift
    if scale.kind == "category":
        return pos + shift * 5
    return pos + shift * 0.5 * span


def _grok_series(fig, sub, x, scale: Scale, shift, span, colour, name) -> bool:
    """One series: medians with min-max bars, open medians and runs that never grokked; a
    line joins the medians of a numeric axis only (categories have no order between them), and
    a categorical axis shows each grokked run's point too. Returns whether any run of it never
    grokked."""
    import plotly.graph_objects as go

    xs, med, lo, hi, open_ = [], [], [], [], []
    for xv, g in sub.groupby(keyed(sub, x), sort=True):
        st = _stats_of(g)
        xs.append(_dodge(scale.position(xv), shift, scale, span))
        med.append(st[0])
        lo.append(st[0] - st[1])
        hi.append(st[2] - st[0])
        open_.append(st[3])
    cat = scale.kind == "category"
    fig.add_trace(go.Scatter(
        x=xs, y=med, mode="markers" if cat else "lines+markers", name=name, legendgroup=name,
        line=dict(color=colour, width=2), marker=dict(size=10, color=colour),
        error_y=dict(type="data", symmetric=False, array=hi, arrayminus=lo,
                     color=colour, thickness=1.5, width=4)))
    if any(open_):
        fig.add_trace(go.Scatter(
            x=[a for a, o in zip(xs, open_) if o], y=[b for b, o in zip(med, open_) if o],
            mode="markers", showlegend=False, legendgroup=name, hoverinfo="skip",
            marker=dict(size=12, color="white", line=dict(width=2, color=colour))))
    done = sub[sub["grokked"].eq(True)]
    if cat and len(done):
        fig.add_trace(go.Scatter(
            x=[_dodge(scale.position(v), shift, scale, span) for v in keyed(done, x)],
            y=done["grokking_epoch"], mode="markers", name=f"{name}: each run",
            legendgroup=name, showlegend=False, marker=dict(RUN_MARK, color=colour)))
    cens = sub[sub["grokked"].eq(False)]
    if len(cens):
        fig.add_trace(go.Scatter(
            x=[_dodge(scale.position(v), shift, scale, span) for v in keyed(cens, x)],
            y=cens["epoch"].fillna(cens["grokking_epoch"]), mode="markers",
            name="never grokked (at last epoch)", legendgroup="censored", showlegend=False,
            marker=dict(symbol="triangle-up-open", size=11, color=colour, line=dict(width=2))))
    return bool(any(open_) or len(cens))


def _censored_legend(fig) -> None:
    import plotly.graph_objects as go

    fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers",
                             name="run never grokked (at last epoch)",
                             marker=dict(symbol="triangle-up-open", size=11, color="black",
                                         line=dict(width=2))))
    fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers",
                             name="median never grokked (open)",
                             marker=dict(size=12, color="white",
                                         line=dict(width=2, color="black"))))


def _grok_axes(fig, x: str, scale: Scale, values: list, y_span: tuple[float, float]) -> None:
    """x: categories, or ticks at the swept values when there are at most ten; y: log."""
    title = UNITS.get(x, x)
    if scale.kind == "category":
        fig.update_xaxes(title_text=title, tickvals=list(range(len(scale.order))),
                         ticktext=[fmt_value(v) for v in scale.order],
                         range=[-0.5, len(scale.order) - 0.5])
    elif len(values) <= 10:
        fig.update_xaxes(title_text=title, type=scale.kind, tickvals=list(values),
                         ticktext=[fmt_value(v) for v in values])
    else:
        fig.update_xaxes(title_text=title, type=scale.kind)
    ticks = nice_ticks(y_span[0] / 1.2, y_span[1] * 1.2)
    fig.update_yaxes(title_text=GROK_AXIS, type="log", tickvals=ticks,
                     ticktext=[tick_text(v) for v in ticks])


# ---- phase diagrams -----------------------------------------------------------------------------
def phase_figures(fin, swept: list[str], pairs: Iterable[tuple[str, str]] = ()):
    """``phase_<a>_x_<b>`` for each pair (default: weight_decay x train_frac)."""
    figs: dict[str, Any] = {}
    notes: list[str] = []
    for a, b in list(pairs) or [DEFAULT_PHASE]:
        name = f"phase_{a}_x_{b}"
        still = [f for f in dict.fromkeys((a, b)) if not varies(fin, f)]
        if a == b:
            notes.append(f"{name} skipped: the two fields are the same")
        elif still:
            notes.append(f"{name} skipped: {' and '.join(still)} did not vary")
            continue
        pooled = [s for s in swept if s not in (a, b) and not is_seed(s) and varies(fin, s)]
        figs[name] = phase_diagram(fin, a, b, truly_pooled(fin, [a, b], pooled))
    return figs, notes


def _phase_cells(fin, a: str, b: str):
    """Per (b, a) cell: colour (log10 median), text, and the cells whose median never grokked."""
    import numpy as np

    xs = axis_order(keyed(fin, a))
    ys = axis_order(keyed(fin, b))
    z = np.full((len(ys), len(xs)), np.nan)
    text = [["" for _ in xs] for _ in ys]
    never: list[tuple[int, int, str]] = []
    for (bv, av), g in fin.groupby([keyed(fin, b), keyed(fin, a)]):
        i, j = ys.index(bv), xs.index(av)
        med, _, _, med_never, n_cens = _stats_of(g)
        n = len(g)
        if med_never:
            never.append((j, i, f"{n - n_cens}/{n} grokked"))
        else:
            z[i, j] = math.log10(max(med, 1))
            text[i][j] = f"{med:.0f}" + (f"<br>({n - n_cens}/{n} grokked)" if n_cens else "")
    return xs, ys, z, text, never


def phase_diagram(fin, a: str, b: str, pooled: list[str]):
    """Median grokking epoch over fields ``a`` (x) and ``b`` (y), as a categorical heatmap."""
    import numpy as np
    import plotly.graph_objects as go

    xs, ys, z, text, never = _phase_cells(fin, a, b)
    finite = z[np.isfinite(z)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    hi = hi if hi - lo > 1e-9 else lo + 1
    ticks = np.log10(nice_ticks(10 ** lo, 10 ** hi) or [10 ** lo])
    xl, yl = [fmt_value(v) for v in xs], [fmt_value(v) for v in ys]
    fig = go.Figure(go.Heatmap(
        x=xl, y=yl, z=z, text=text, texttemplate="%{text}", zmin=lo, zmax=hi,
        colorscale="Viridis", hoverongaps=False,
        colorbar=dict(title=dict(text="median grokking<br>epoch", side="right"),
                      tickvals=ticks, ticktext=[tick_text(10 ** t) for t in ticks])))
    if never:
        fig.add_trace(go.Scatter(x=[xl[j] for j, _, _ in never], y=[yl[i] for _, i, _ in never],
                                 mode="markers", name="median run never grokked",
                                 marker=dict(symbol="x-thin", size=22, color="black",
                                             line=dict(width=3))))
    for j, i, t in never:  # under the cross (annotations take category indices)
        fig.add_annotation(x=j, y=i, text=t, showarrow=False, yshift=-24,
                           font=dict(size=12, color="black"))
    title = "Phase diagram: median grokking epoch"
    if pooled:
        title += f" (pooled over {', '.join(pooled)})"
    paper_style(fig, title=title)
    fig.update_xaxes(title_text=UNITS.get(a, a), type="category", showgrid=False)
    fig.update_yaxes(title_text=UNITS.get(b, b), type="category", showgrid=False)
    fig.update_layout(legend=dict(orientation="h", y=-0.25, x=0), showlegend=bool(never))
    return fig


# ---- curves -------------------------------------------------------------------------------------
def _thin(epochs, k: int, log: bool = False):
    """At most about ``k`` indices of a sorted epoch array, even in epoch (or log epoch)."""
    import numpy as np

    n = len(epochs)
    if n <= k:
        return np.arange(n)
    if not log:
        return np.unique(np.linspace(0, n - 1, k).round().astype(int))
    e = np.log10(np.maximum(np.asarray(epochs, float), 1.0))
    want = np.linspace(e[0], e[-1], k)
    return np.unique(np.clip(np.searchsorted(e, want), 0, n - 1))


def _join(xs: list, ys: list):
    """Concatenate several lines into one trace, separated by NaN gaps."""
    import numpy as np

    gap = np.array([np.nan])
    x = np.concatenate([p for a in xs for p in (a, gap)][:-1])
    y = np.concatenate([p for a in ys for p in (a, gap)][:-1])
    return x, y


def read_test_curves(curves_dir: Path, run_ids: Iterable[str]):
    """{run_id: pandas frame of epoch, test_loss, test_acc} at the evaluated epochs."""
    import pyarrow.dataset as ds

    have = [r for r in run_ids if (curves_dir / f"{r}.parquet").exists()]
    if not have:
        return {}
    data = ds.dataset([str(curves_dir / f"{r}.parquet") for r in have], format="parquet")
    t = data.to_table(columns=["run_id", "epoch", "test_loss", "test_acc"],
                      filter=ds.field("test_loss").is_valid())
    return {rid: g.sort_values("epoch") for rid, g in t.to_pandas().groupby("run_id", sort=False)}


def _line_traces(fin, colour_by, cmap, lines_of, per_line: int, log_x: bool = False):
    """One trace per colour value: the runs' lines joined by gaps. ``lines_of(frame)`` gives a
    run's (x, y) arrays, or None."""
    import plotly.graph_objects as go

    traces = []
    for cv, sub in by_colour(fin, colour_by):
        xs, ys = [], []
        for rid in sub["run_id"]:
            xy = lines_of(rid)
            if xy is None or not len(xy[0]):
                continue
            idx = _thin(xy[0], per_line, log_x)
            xs.append(xy[0][idx])
            ys.append(xy[1][idx])
        if not xs:
            continue
        x, y = _join(xs, ys)
        traces.append(go.Scatter(
            x=x, y=y, mode="lines", connectgaps=False, opacity=0.75,
            line=dict(color=cmap.get(cv, "#0072B2"), width=1.2), legendgroup=str(cv),
            name=fmt_value(cv) if colour_by else f"{len(xs)} runs", showlegend=len(cmap) <= 20))
    return traces


def test_loss_figure(fin, curves: dict, colour_by: str | None):
    """Every finished run's test loss (log y), coloured by ``colour_by``; or why not."""
    import plotly.graph_objects as go

    if not curves:
        return "no curves of finished runs"
    cmap = colour_map(fin, colour_by)
    per_line = max(20, min(150, POINT_BUDGET // max(1, len(curves))))

    def lines_of(rid):
        g = curves.get(rid)
        return None if g is None else (g["epoch"].to_numpy(float), g["test_loss"].to_numpy(float))

    fig = go.Figure(_line_traces(fin, colour_by, cmap, lines_of, per_line))
    fig.update_xaxes(title_text="epoch (full-batch steps)")
    fig.update_yaxes(title_text="test loss (cross-entropy, nats)", type="log",
                     exponentformat="power")
    return paper_style(fig, title=f"Test loss of {len(curves)} runs", legend_title=colour_by)


def weight_norm_figure(fin, ckpt_table, curves: dict, colour_by: str | None):
    """Omnigrok's view: total weight norm (sqrt of weight_norm_sq) and test accuracy against
    log epoch, side by side, coloured by ``colour_by``; or why not."""
    import numpy as np
    from plotly.subplots import make_subplots

    if ckpt_table is None or "weight_norm_sq" not in ckpt_table.column_names:
        return "no weight_norm_sq in the checkpoint rows"
    ck = ckpt_table.select(["run_id", "epoch", "weight_norm_sq"]).to_pandas()
    ck = ck[(ck["epoch"] > 0) & ck["weight_norm_sq"].notna()]
    norms = {rid: g.sort_values("epoch") for rid, g in ck.groupby("run_id", sort=False)}
    if not norms:
        return "no weight_norm_sq after epoch 0 in the checkpoint rows"
    cmap = colour_map(fin, colour_by)
    per_line = max(20, min(200, POINT_BUDGET // max(1, 2 * len(norms))))

    def norm_of(rid):
        g = norms.get(rid)
        return None if g is None else (g["epoch"].to_numpy(float),
                                       np.sqrt(g["weight_norm_sq"].to_numpy(float)))

    def acc_of(rid):
        g = curves.get(rid)
        g = None if g is None else g[g["epoch"] > 0]
        return None if g is None else (g["epoch"].to_numpy(float), g["test_acc"].to_numpy(float))

    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.14,
                        subplot_titles=("total weight norm ‖θ‖₂", "test accuracy"))
    for t in _line_traces(fin, colour_by, cmap, norm_of, per_line, log_x=True):
        fig.add_trace(t, 1, 1)
    for t in _line_traces(fin, colour_by, cmap, acc_of, per_line, log_x=True):
        fig.add_trace(t.update(showlegend=False), 1, 2)
    fig.update_xaxes(type="log", title_text="epoch (log)")
    lo, hi = np.sqrt(ck["weight_norm_sq"].min()), np.sqrt(ck["weight_norm_sq"].max())
    log_y = lo > 0 and hi / lo >= 10
    ticks = nice_ticks(lo, hi) if log_y else None
    fig.update_yaxes(title_text="‖θ‖₂ (sqrt of sum of squared weights)", row=1, col=1,
                     type="log" if log_y else "linear", tickvals=ticks,
                     ticktext=[tick_text(v) for v in ticks] if ticks else None)
    fig.update_yaxes(title_text="test accuracy", range=[0, 1.02], row=1, col=2)
    return paper_style(fig, width=1000, legend_title=colour_by,
                       title=f"Weight norm and test accuracy of {len(norms)} runs")


def measures_aligned_figure(fin, ckpt_table, colour_by: str | None):
    """Up to six progress measures against epochs since each run's grokking epoch; or why
    not."""
    import pyarrow as pa

    if ckpt_table is None or not ckpt_table.num_rows:
        return "no checkpoint rows (no measures.parquet)"
    skip = set(config_scalar_columns()) | {"run_id", "epoch"}
    numeric = [f.name for f in ckpt_table.schema
               if f.name not in skip and (pa.types.is_floating(f.type)
                                          or pa.types.is_integer(f.type))]
    chosen = ([m for m in ALIGNED_MEASURES if m in numeric] or numeric)[:6]
    if not chosen:
        return "no numeric measure columns"
    ck = ckpt_table.select(["run_id", "epoch"] + chosen).to_pandas()
    grok = dict(zip(fin["run_id"], fin["grokking_epoch"]))
    ck = ck[ck["run_id"].isin(grok)]
    ck["since"] = ck["epoch"] - ck["run_id"].map(grok)
    ckg = {rid: g.sort_values("epoch") for rid, g in ck.groupby("run_id", sort=False)}
    return _aligned_grid(fin, ckg, chosen, colour_by)


def llc_aligned_figure(fin, ckpt_table, colour_by: str | None):
    """The LLC (``grokhpc.llc_run``) and the test loss at the estimated checkpoints of every
    run, against epochs since its grokking epoch; or why not; None (no figure, no note) where
    no run has an LLC, an opt-in measure."""
    if ckpt_table is None or "llc" not in ckpt_table.column_names:
        return None
    ck = ckpt_table.select(["run_id", "epoch", "llc", "llc_std", "test_loss"]).to_pandas()
    ck = ck[ck["llc"].notna()]
    grok = dict(zip(fin["run_id"], fin["grokking_epoch"]))
    ck = ck[ck["run_id"].isin(grok)]
    if ck.empty:
        return "no finished run has an LLC estimate"
    ck["since"] = ck["epoch"] - ck["run_id"].map(grok)
    ckg = {rid: g.sort_values("epoch") for rid, g in ck.groupby("run_id", sort=False)}
    fig = _aligned_grid(fin, ckg, ["llc", "test_loss"], colour_by)
    fig.update_traces(mode="lines+markers", marker=dict(size=4))
    return fig.update_layout(title_text="LLC and test loss aligned on each run's grokking epoch")


def _aligned_grid(fin, ckg: dict, chosen: list[str], colour_by: str | None):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    cmap = colour_map(fin, colour_by)
    per_line = max(20, min(250, POINT_BUDGET // max(1, len(ckg) * len(chosen))))
    ncol = 2 if len(chosen) > 1 else 1
    nrow = math.ceil(len(chosen) / ncol)
    fig = make_subplots(rows=nrow, cols=ncol, subplot_titles=chosen,
                        horizontal_spacing=0.12, vertical_spacing=0.12)
    for cv, sub in by_colour(fin, colour_by):
        for cens in (False, True):
            part = sub[sub["grokked"].eq(False) == cens]
            gs = [ckg[r] for r in part["run_id"] if r in ckg]
            gs = [g.iloc[_thin(g["epoch"].to_numpy(), per_line)] for g in gs]
            for i, m in enumerate(chosen if gs else []):
                x, y = _join([g["since"].to_numpy(dtype=float) for g in gs],
                             [g[m].to_numpy(dtype=float) for g in gs])
                fig.add_trace(go.Scatter(
                    x=x, y=y, mode="lines", connectgaps=False, opacity=0.75,
                    line=dict(color=cmap.get(cv, "#0072B2"), width=1.2,
                              dash="dot" if cens else "solid"),
                    name=(fmt_value(cv) if colour_by else "runs")
                    + (" (never grokked)" if cens else ""), legendgroup=f"{cv}{cens}",
                    showlegend=(i == 0 and len(cmap) <= 20)), row=i // ncol + 1, col=i % ncol + 1)
    paper_style(fig, width=900, height=300 * nrow + 100, legend_title=colour_by,
                title="Progress measures aligned on each run's grokking epoch")
    for i, m in enumerate(chosen):
        r, c = i // ncol + 1, i % ncol + 1
        if "loss" in m:
            fig.update_yaxes(type="log", exponentformat="power", row=r, col=c)
        fig.add_vline(x=0, line=dict(color="grey", dash="dash", width=1), row=r, col=c)
        if r == nrow or i + ncol >= len(chosen):
            fig.update_xaxes(title_text="epochs since grokking", row=r, col=c)
    return fig


# ---- all of them --------------------------------------------------------------------------------
def finished_runs(runs_table):
    """The runs.parquet rows of finished runs with a grokking epoch, as pandas."""
    runs = runs_table.to_pandas()
    return runs[runs["state"].isin(FINISHED) & runs["grokking_epoch"].notna()].copy()


def cross_run_figures(runs_table, ckpt_table, curves_dir: Path, swept: list[str],
                      phase_pairs: Iterable[tuple[str, str]] = ()):
    """The cross-run figures as {name: plotly Figure}, and one note per figure skipped."""
    fin = finished_runs(runs_table)
    if fin.empty:
        return {}, ["figures skipped: no finished run with a grokking epoch yet"]
    figs, notes = grok_vs_figures(fin, swept)
    more, more_notes = phase_figures(fin, swept, phase_pairs)
    figs.update(more)
    notes.extend(more_notes)
    colour_by = colour_field(swept, fin)
    curves = read_test_curves(curves_dir, fin["run_id"])
    drawn = {"test_loss_curves": test_loss_figure(fin, curves, colour_by),
             "measures_aligned": measures_aligned_figure(fin, ckpt_table, colour_by),
             "llc_aligned": llc_aligned_figure(fin, ckpt_table, colour_by),
             "weight_norm_and_test_acc": weight_norm_figure(fin, ckpt_table, curves, colour_by)}
    for name, fig in drawn.items():
        if fig is None:
            continue
        if isinstance(fig, str):
            notes.append(f"{name} skipped: {fig}")
        else:
            figs[name] = fig
    return figs, notes
