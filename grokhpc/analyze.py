"""The seed notebook's figures for one run, as PNG and HTML.

``python -m grokhpc.analyze RUN_DIR [--out DIR] [--format png,html] [--html-js embed]
[--llc [KEY=VALUE,...]]`` (``--llc``: estimate the LLC at checkpoints first, resumably, with
``grokhpc.llc_run``'s settings; its figure is drawn whenever the run has estimates)

Stage: after a run, by hand (the per-run counterpart of ``grokhpc.aggregate``'s cross-run
figures): the run's weights, curves, measures and summary as figures.

Reads a finished run directory (config.json, curves.parquet, checkpoints.npy, measures.parquet,
summary.json -- the last two are computed first if missing) and writes, through
``grokhpc.figures.export`` (one browser for the batch; HTML always), into ``RUN_DIR/figures`` by
default (the HTML files share one plotly.min.js there; ``--html-js embed`` makes each file
self-contained):

===========================  ===================================================================
training_curves              train / test loss (log y) with the detected phase boundaries
softmax_collapse             the fraction of train rows in softmax collapse, with train / test
                             accuracy (only where some row collapsed: docs/run_fields.md)
attention_mean_per_head      mean attention of the last position to a, b, = per head
attention_head0              head 0's attention from = to a, over the a x b grid
svd_singular_values          singular values of W_E and of a random Gaussian control
svd_principal_components     left singular vectors of W_E and of the control
svd_top_components           the first 8 principal components of W_E
fourier_basis                the Fourier basis of Z_p (of Z_{p-1} over log_g for mul, div)
fourier_embedding            W_E in that basis
fourier_embedding_norms      the norm of each component of W_E (key frequencies marked); s5:
                             W_E's energy per irrep (bars, key irreps in red)
neuron_freq_fraction         each neuron's activation variance explained by each key
wlogit_fourier_norms         W_out W_U in the basis (s5: energy per irrep, bars)
cos_sim_over_training        cosine similarity with each key's logit pattern, and residual
restricted_excluded_loss     train, test, restricted and excluded loss over training (log y)
restricted_test_ratio        restricted / test loss over training (log y)
gini_weight_norm             Gini of the component norms of W_E and W_logit; sum of squared
                             weights
llc_over_training            the LLC at its estimated checkpoints (grokhpc.llc_run), with the
                             losses
===========================  ===================================================================

The weight figures are drawn from the last checkpoint; with several blocks the attention
figures show every block's heads (head 0 of block 0 over the grid) and the neuron and
W_logit figures the last block's MLP (the one the progress measures read). The basis figures
and the progress-measure figures are drawn in the task's own basis (``grokhpc.task_measures``):
the Fourier basis of Z_p for sub and add; for mul and div the Fourier basis of Z_{p-1} over
the discrete log, the axis titled ``log_g a`` with the generator g named (the zero operand left
out); for s5 bars of the energy per irrep and the neuron fraction per irrep (the Fourier basis
heatmaps are left out). Tasks without a group basis (s5conj, s5aba, the polynomial tasks,
mix1) get neither; that is one line of the log, with the reason. A run of another model family
(the MLP) has the curve figures only (one line of the log says so).

Heavy imports (torch, transformer_lens, plotly) happen after the arguments are parsed.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .config import DATA_OPS, GROUP_OPS
from .figures import ExportError, export, paper_style, parse_formats
from . import bases, task_measures
from .measures import finalize_run, read_measures
from .store import MEASURES, NO_SPACE, NOT_ALLOWED, SUMMARY, RunDir, RunDirError, out_problem
from .tasks import TASKS

FIGURES = ("training_curves", "softmax_collapse", "attention_mean_per_head", "attention_head0",
           "svd_singular_values", "svd_principal_components", "svd_top_components",
           "fourier_basis", "fourier_embedding", "fourier_embedding_norms",
           "neuron_freq_fraction", "wlogit_fourier_norms", "cos_sim_over_training",
           "restricted_excluded_loss", "restricted_test_ratio", "gini_weight_norm",
           "llc_over_training")
FOURIER_MEASURE_FIGURES = ("cos_sim_over_training", "restricted_excluded_loss",
                           "restricted_test_ratio", "gini_weight_norm")
FOURIER_WEIGHT_FIGURES = ("fourier_basis", "fourier_embedding", "fourier_embedding_norms",
                          "neuron_freq_fraction", "wlogit_fourier_norms")

PHASES = (("memorisation_end", "memorisation end", "dash"),
          ("circuit_formation_end", "circuit formation end", "dash"),
          ("cleanup_end", "cleanup end", "dash"),
          ("grokking_epoch", "grokking (test acc 99%)", "dot"))


LABEL_FONT = 11          # px, the phase labels
LABEL_EM = 0.62          # average glyph width in font sizes (above Liberation Sans' lowercase)
LABEL_PAD = 8            # px around a label
PLOT_SHARE = 0.65        # the plot area's share of the figure width (margins, legend) at least


# ---- helpers ----------------------------------------------------------------------------------
def _x_span(fig, log: bool) -> tuple[float, float]:
    """The data range of the x axis (log10 of it on a log axis)."""
    import numpy as np

    xs = [np.asarray(t.x, dtype=float) for t in fig.data if t.x is not None and len(t.x)]
    v = np.concatenate(xs) if xs else np.array([0.0, 1.0])
    v = v[np.isfinite(v)]
    if log:
        v = np.log10(v[v > 0])
    lo, hi = (float(v.min()), float(v.max())) if v.size else (0.0, 1.0)
    return lo, hi if hi > lo else lo + 1.0


def phase_label_rows(fracs: list[float], widths: list[float]) -> list[tuple[int, str]]:
    """(row, anchor) of each label, given its line's position and its width as fractions of
    the axis, in the lines' x order: to the right of its line (anchor 'left') unless that
    leaves the axis, on the first row (counted from the top) where it overlaps no label."""
    rows: list[list[tuple[float, float]]] = []
    out = []
    for f, w in zip(fracs, widths):
        right = f + w <= 1.0
        span = (f, f + w) if right else (f - w, f)
        for r, taken in enumerate(rows):
            if all(span[1] <= a or span[0] >= b for a, b in taken):
                taken.append(span)
                break
        else:
            r = len(rows)
            rows.append([span])
        out.append((r, "left" if right else "right"))
    return out


def add_phase_lines(fig, summary: dict, row=None, col=None):
    """Vertical lines at the detected phase boundaries (those that were found), labelled in
    rows at the top of the plot (of the first subplot when ``row`` is given) so that labels of
    close boundaries never overlap."""
    import math

    marks = sorted((summary[key], label, dash) for key, label, dash in PHASES
                   if summary.get(key) is not None
                   and (key != "grokking_epoch" or summary.get("grokked")))
    kw = {} if row is None else {"row": row, "col": col}
    for x, _, dash in marks:
        # width and opacity set here: the paper template's shape defaults draw no line
        fig.add_vline(x=x, line=dict(dash=dash, color="grey", width=1.5), opacity=0.9, **kw)
    log = fig.layout.xaxis.type == "log"
    lo, hi = _x_span(fig, log)
    plot_px = PLOT_SHARE * (fig.layout.width or 720)
    fracs = [((math.log10(max(x, 1e-300)) if log else x) - lo) / (hi - lo) for x, _, _ in marks]
    widths = [(len(label) * LABEL_EM * LABEL_FONT + LABEL_PAD) / plot_px for _, label, _ in marks]
    domain = fig.layout.yaxis.domain or (0.0, 1.0)
    plot_h = max((fig.layout.height or 480) - 130, 100) * (domain[1] - domain[0])
    step = 1.5 * LABEL_FONT / plot_h
    top = {} if row is None else {"row": 1, "col": col}
    for (x, label, _), (r, anchor) in zip(marks, phase_label_rows(fracs, widths)):
        fig.add_annotation(x=x, xref="x", y=1 - r * step, yref="y domain", text=label,
                           showarrow=False, xanchor=anchor, yanchor="top",
                           xshift=3 if anchor == "left" else -3,
                           font=dict(size=LABEL_FONT, color="#444"),
                           bgcolor="rgba(255,255,255,0.8)", **top)
    return fig


def _heatmap(z, title, x_title, y_title, x=None, y=None, zmid=0.0, colorscale="RdBu"):
    import plotly.graph_objects as go

    fig = go.Figure(go.Heatmap(z=z, x=x, y=y, colorscale=colorscale, zmid=zmid,
                               reversescale=colorscale == "RdBu"))
    fig.update_xaxes(title_text=x_title)
    fig.update_yaxes(title_text=y_title, autorange="reversed")
    return paper_style(fig, title=title)


def _lines(x, ys: dict, title, x_title, y_title, log_y=False):
    import plotly.graph_objects as go

    fig = go.Figure()
    for name, y in ys.items():
        fig.add_trace(go.Scatter(x=x, y=y, mode="lines", name=name))
    fig.update_xaxes(title_text=x_title)
    fig.update_yaxes(title_text=y_title, type="log" if log_y else "linear")
    return paper_style(fig, title=title)


# ---- the model state: attention, SVD, Fourier ------------------------------------------------
def final_state(run):
    """(cfg, epoch, weights dict, cache over every pair) at the last checkpoint."""
    import numpy as np
    import torch

    from .data import grid_tokens
    from .model import load_flat
    from .models import build_model

    cfg = run.run_config()
    epochs, ckpts = run.checkpoints()
    row = np.array(ckpts[-1])
    model = build_model(cfg, "cpu")
    load_flat(model, torch.from_numpy(row))
    n = cfg.n_classes
    with torch.inference_mode():
        _, cache = model.run_with_cache(grid_tokens(n))   # every (a, b), whatever the op
    return cfg, epochs[-1], run.unflatten(row), cache


def attention_figures(cfg, at: str, cache) -> dict:
    """Mean attention of the last position per (block, head), and head 0 of block 0 over the
    a x b grid."""
    import numpy as np

    n = cfg.n_classes
    patterns = [cache["pattern", i].numpy() for i in range(cfg.n_layers)]  # (n^2, h, q, k)
    mean = np.concatenate([pat.mean(0)[:, -1, :] for pat in patterns])
    heads = [f"head {h}" if cfg.n_layers == 1 else f"block {i} head {h}"
             for i in range(cfg.n_layers) for h in range(cfg.n_heads)]
    block = "" if cfg.n_layers == 1 else " (block 0)"
    return {
        "attention_mean_per_head": _heatmap(
            mean, "Average attention pattern per head" + at, "source", "head",
            x=["a", "b", "="], y=heads, zmid=None, colorscale="Viridis"),
        "attention_head0": _heatmap(
            patterns[0][:, 0, -1, 0].reshape(n, n), f"Attention of head 0{block} from = to a"
            + at, "b", "a", zmid=None, colorscale="Viridis")}


def svd_figures(W_E, at: str) -> dict:
    """Singular values and vectors of the operands' embedding, against a Gaussian control."""
    import numpy as np
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    rng = np.random.default_rng(0)
    control = rng.normal(0, W_E.std(), size=W_E.shape)  # same shape and scale as W_E
    U, S, _ = np.linalg.svd(W_E, full_matrices=False)
    Uc, Sc, _ = np.linalg.svd(control, full_matrices=False)
    figs = {"svd_singular_values": _lines(
        np.arange(1, len(S) + 1), {"W_E": S, "random Gaussian (control)": Sc},
        "Singular values of the embedding" + at, "index", "singular value")}
    fig = make_subplots(rows=1, cols=2, subplot_titles=("W_E", "random Gaussian (control)"),
                        horizontal_spacing=0.08)
    fig.add_trace(go.Heatmap(z=U, coloraxis="coloraxis"), 1, 1)
    fig.add_trace(go.Heatmap(z=Uc, coloraxis="coloraxis"), 1, 2)
    fig.update_layout(coloraxis=dict(colorscale="RdBu", cmid=0, reversescale=True))
    fig.update_yaxes(autorange="reversed", title_text="input token", row=1, col=1)
    fig.update_yaxes(autorange="reversed", row=1, col=2)
    fig.update_xaxes(title_text="principal component")
    figs["svd_principal_components"] = paper_style(
        fig, title="Principal components on the input" + at, width=960)
    figs["svd_top_components"] = _lines(
        np.arange(len(W_E)), {f"PC {i + 1}": U[:, i] for i in range(min(8, U.shape[1]))},
        "First 8 principal components of the embedding" + at, "input token", "value")
    return figs


def weight_figures(cfg, epoch, W, cache, keys) -> dict:
    """The figures of the last checkpoint's weights; those in the task's basis where it has
    one (``task_measures.lens_of``)."""
    import numpy as np

    at = f" (epoch {epoch})"
    figs = attention_figures(cfg, at, cache)
    figs.update(svd_figures(np.asarray(W["embed.W_E"], np.float64)[:cfg.n_classes], at))
    basis = task_measures.lens_of(cfg.op, cfg.n_classes)
    if basis is not None:
        figs.update(basis_figures(cfg, basis, at, W, cache, keys))
    return figs


def basis_axis(basis) -> tuple[str, str]:
    """(the basis's name, the input axis's title): Z_p and a; Z_p^* over log_g a (g named);
    the irreps of S5 over a."""
    if basis.group == "Z_p^*":
        return (f"Fourier basis of Z_{basis.order} over log_{basis.generator} a "
                f"(g = {basis.generator})", f"log_{basis.generator} a")
    if basis.group == "S5":
        return "irreps of S5", "a (element of S5)"
    return f"Fourier basis of Z_{basis.p}", "a"


def basis_figures(cfg, basis, at: str, W, cache, keys) -> dict:
    """The embedding, the last block's neurons and its W_out W_U in the task's basis: Fourier
    components over Z_p and over log_g for Z_p^*, per-irrep energies (bars) over S5."""
    import numpy as np
    import plotly.graph_objects as go

    last, el = cfg.n_layers - 1, basis.elements()
    B, row_keys = basis.components()
    title, x_title = basis_axis(basis)
    cyclic = basis.group != "S5"
    names = bases.fourier_names(basis.order) if cyclic else [
        f"{task_measures.key_names(basis, [k])[0]}" for k in row_keys]
    proj = B @ np.asarray(W["embed.W_E"], np.float64)[el]
    W_logit = (np.asarray(W[f"blocks.{last}.mlp.W_out"], np.float64)
               @ np.asarray(W["unembed.W_U"], np.float64))[:, el]
    key_names = basis.key_names()
    figs = {}
    if cyclic:
        figs["fourier_basis"] = _heatmap(B, title, x_title, "component", y=names)
        figs["fourier_embedding"] = _heatmap(proj, f"Embedding in the {title}" + at,
                                             "residual stream", "component", y=names)
        norms = np.linalg.norm(proj, axis=1)
        fig = _lines(names, {"||F W_E||": norms}, "Embedding norms, " + title + at,
                     "Fourier component", "norm")
        sel = [i for i, k in enumerate(row_keys) if k in set(keys or ())]
        if sel:
            fig.add_trace(go.Scatter(x=[names[i] for i in sel], y=norms[sel], mode="markers",
                                     name="key frequencies " + ", ".join(map(str, keys))))
        figs["fourier_embedding_norms"] = fig
        figs["wlogit_fourier_norms"] = _lines(
            names, {"||W_logit F^T||": np.linalg.norm(B @ W_logit.T, axis=1)},
            f"W_logit in the {title}" + at, "Fourier component", "norm")
    else:
        energy = np.bincount(row_keys, weights=(proj ** 2).sum(1))
        colors = ["#d62728" if k in set(keys or ()) else "#1f77b4" for k in range(len(energy))]
        figs["fourier_embedding_norms"] = paper_style(go.Figure(go.Bar(
            x=key_names, y=energy, marker_color=colors)).update_layout(
            xaxis_title="irrep (key irreps in red)", yaxis_title="energy of W_E"),
            title="Embedding energy per irrep of S5" + at)
        energy = np.bincount(row_keys, weights=((B @ W_logit.T) ** 2).sum(1))
        figs["wlogit_fourier_norms"] = paper_style(go.Figure(go.Bar(
            x=key_names, y=energy, marker_color=colors)).update_layout(
            xaxis_title="irrep", yaxis_title="energy of W_logit"),
            title="W_logit energy per irrep of S5" + at)
    figs["neuron_freq_fraction"] = neuron_fraction(cfg, basis, at, cache)
    return figs


def neuron_fraction(cfg, basis, at: str, cache):
    """Each neuron's activation variance over the group's pairs explained by each key (the
    components of key k in a and in b, with the constant)."""
    import numpy as np

    last, el, p = cfg.n_layers - 1, basis.elements(), cfg.n_classes
    B, row_keys = basis.components()
    acts = cache["post", last, "mlp"][:, -1, :].numpy().astype(np.float64)   # (p^2, d_mlp)
    grid = acts.T.reshape(-1, p, p)[:, el][:, :, el]                        # (neuron, i, j)
    four = B @ grid @ B.T
    four[:, 0, 0] = 0.0
    total = (four ** 2).sum(axis=(1, 2))
    n_keys = int(row_keys.max())
    frac = np.zeros((n_keys, grid.shape[0]))
    for k in range(1, n_keys + 1):
        idx = np.concatenate([[0], np.nonzero(row_keys == k)[0]])
        frac[k - 1] = (four[:, idx][:, :, idx] ** 2).sum(axis=(1, 2)) / np.maximum(total, 1e-30)
    order = np.lexsort((-frac.max(0), frac.argmax(0)))    # neurons grouped by their key
    block = "" if cfg.n_layers == 1 else f" (block {last})"
    what = "irrep" if basis.group == "S5" else "frequency"
    return _heatmap(frac[:, order], f"Neuron fraction explained by {what}{block}" + at,
                    f"neuron (grouped by dominant {what})", what,
                    y=basis.key_names()[1:], zmid=None, colorscale="Viridis")


# ---- curves and measures over training ---------------------------------------------------------
def training_figures(curves, measures, summary, task: str, op: str) -> dict:
    """The training curves; over training, the group measures where the task has them."""
    import plotly.graph_objects as go

    tr = curves.dropna(subset=["train_loss"])
    te = curves.dropna(subset=["test_loss"])
    fig = _lines(tr["epoch"], {"train": tr["train_loss"]}, f"Training curve ({task}, {op})",
                 "epoch", "loss", log_y=True)
    fig.add_trace(go.Scatter(x=te["epoch"], y=te["test_loss"], mode="lines", name="test"))
    figs = {"training_curves": add_phase_lines(fig, summary)}
    if "softmax_collapse" in curves and (curves["softmax_collapse"] > 0).any():
        sc = curves.dropna(subset=["softmax_collapse"])
        figs["softmax_collapse"] = add_phase_lines(_lines(
            sc["epoch"], {"softmax collapse": sc["softmax_collapse"],
                          "train accuracy": sc["train_acc"], "test accuracy": sc["test_acc"]},
            f"Softmax collapse ({task}, {op})", "epoch", "fraction of rows"), summary)
    if measures is not None and measures["cos_sim"].notna().all():
        figs.update(fourier_measure_figures(measures, summary, op))
    if measures is not None and "llc" in measures and measures["llc"].notna().any():
        figs["llc_over_training"] = llc_figure(measures, summary)
    return figs


def llc_figure(measures, summary):
    """The LLC at its estimated checkpoints (bars: spread over chains) with the test loss, and
    the phase boundaries."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    m = measures[measures["llc"].notna()]
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                        subplot_titles=("LLC (± std over chains)", "test and train loss"))
    fig.add_trace(go.Scatter(x=m["epoch"], y=m["llc"], mode="lines+markers", name="LLC",
                             error_y=dict(type="data", array=m["llc_std"])), 1, 1)
    for col in ("test_loss", "train_loss"):
        fig.add_trace(go.Scatter(x=measures["epoch"], y=measures[col], name=col), 2, 1)
    fig.update_yaxes(title_text="LLC", row=1, col=1)
    fig.update_yaxes(title_text="loss", type="log", row=2, col=1)
    fig.update_xaxes(title_text="epoch", row=2, col=1)
    return add_phase_lines(paper_style(fig, title="Local learning coefficient over training",
                                       height=640), summary, row="all", col=1)


def pattern_name(op: str, n_classes: int) -> str:
    """The logit pattern of key k, as the cos_sim figure's title says it."""
    basis = task_measures.lens_of(op, n_classes)
    if basis.group == "S5":
        return "chi_rho(a b c^-1)"
    sign = "-" if TASKS[op].sign < 0 else "+"
    if basis.group == "Z_p^*":
        g = basis.generator
        return f"cos(w_k (log_{g} a {sign} log_{g} b - log_{g} c))"
    return f"cos(w_k (a {sign} b - c))"


def fourier_measure_figures(measures, summary, op: str) -> dict:
    """The group's progress measures over training, with the phase boundaries."""
    import numpy as np
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    ep = measures["epoch"].to_numpy()
    sims = np.stack(measures["cos_sim"].to_numpy())                 # (n_ckpt, K)
    key = set(summary.get("key_elements") or summary.get("key_freqs") or [])
    n_classes = 120 if summary.get("basis") == "S5" else summary.get("p")
    names = task_measures.lens_of(op, n_classes).key_names()
    what = "irrep" if summary.get("basis") == "S5" else "freq"
    fig = go.Figure()
    for k in range(1, sims.shape[1] + 1):
        is_key = k in key
        fig.add_trace(go.Scatter(
            x=ep, y=sims[:, k - 1], mode="lines", name=f"{what} {names[k]}", showlegend=is_key,
            line=dict(width=2 if is_key else 0.7, color=None if is_key else "#bbbbbb"),
            opacity=1.0 if is_key else 0.7))
    fig.add_trace(go.Scatter(x=ep, y=measures["cos_residual"], mode="lines", name="residual",
                             line=dict(color="black", width=2, dash="dash")))
    fig.update_xaxes(title_text="epoch")
    fig.update_yaxes(title_text="cosine similarity")
    figs = {"cos_sim_over_training": add_phase_lines(paper_style(
        fig, title=f"Cosine similarity with {pattern_name(op, n_classes)} and residual"),
        summary)}

    fig = _lines(ep, {"train": measures["train_loss"], "test": measures["test_loss"],
                      "excluded": measures["excluded_loss"],
                      "restricted": measures["restricted_loss"]},
                 "Excluded and restricted loss (key %ss %s)"
                 % (what, ", ".join(names[k] for k in sorted(key))), "epoch", "loss", log_y=True)
    figs["restricted_excluded_loss"] = add_phase_lines(fig, summary)
    ratio = measures["restricted_loss"] / measures["test_loss"]
    figs["restricted_test_ratio"] = add_phase_lines(_lines(
        ep, {"restricted / test": ratio}, "Restricted loss to test loss ratio", "epoch",
        "ratio", log_y=True), summary)

    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                        subplot_titles=("Gini of the component norms", "Sum of squared weights"))
    fig.add_trace(go.Scatter(x=ep, y=measures["gini_embed"], name="Gini W_E"), 1, 1)
    fig.add_trace(go.Scatter(x=ep, y=measures["gini_logit"], name="Gini W_logit"), 1, 1)
    fig.add_trace(go.Scatter(x=ep, y=measures["weight_norm_sq"], name="sum of squared weights"),
                  2, 1)
    fig.update_xaxes(title_text="epoch", row=2, col=1)
    fig.update_yaxes(title_text="Gini", row=1, col=1)
    fig.update_yaxes(title_text="sum w^2", row=2, col=1)
    figs["gini_weight_norm"] = add_phase_lines(
        paper_style(fig, title="Gini coefficients and total weight norm", height=640), summary,
        row="all", col=1)
    return figs


def build_figures(run, log=lambda *_: None) -> dict:
    """Every figure of the run (see the module docstring) that its task defines,
    {name: plotly Figure}; one line to ``log`` for each group left out."""
    summary = run.read_summary()
    cfg = run.run_config()
    measures, key = read_measures(run)
    task = "S5" if cfg.op in GROUP_OPS else cfg.op if cfg.op in DATA_OPS else f"p={cfg.p}"
    figs = training_figures(run.read_curves(), measures, summary, task, cfg.op)
    if cfg.model != "transformer":
        log(f"{run.path}: model {cfg.model}: the transformer's weight figures (attention, "
            f"embedding, basis) left out")
        return {name: figs[name] for name in FIGURES if name in figs}
    _, epoch, W, cache = final_state(run)
    keys = summary.get("key_elements") or summary.get("key_freqs")
    figs.update(weight_figures(cfg, epoch, W, cache, keys))
    why = task_measures.no_lens_reason(bases.task_basis(cfg.op, cfg.n_classes))
    if why:
        log(f"{run.path}: op {cfg.op} has no group basis ({why}): basis figures left out")
    return {name: figs[name] for name in FIGURES if name in figs}


def analyze(run_dir, out=None, formats=("png", "html"), log=print, html_js="directory",
            llc=None) -> dict:
    """Write the run's figures; returns {name: [paths]}. ``html_js``: see figures.export.
    ``llc``: an ``LLCRequest`` to estimate first (``grokhpc.llc_run``, resumable)."""
    run = RunDir(run_dir)
    run.read_config()
    if not run.is_trained():
        raise RunDirError(f"{run.path}: training is not finished (progress.json)")
    out = Path(out) if out is not None else run.path / "figures"
    out.mkdir(parents=True, exist_ok=True)   # a folder that cannot be written fails here, early
    if not run.file(MEASURES).exists() or not run.file(SUMMARY).exists():
        log(f"{run.path}: computing measures first")
        finalize_run(run)
    if llc is not None:
        from .llc_run import estimate_run

        log(f"{run.path}: LLC at {llc.describe()}")
        estimate_run(run, llc, log=log)
    figs = build_figures(run, log)
    return export(figs, out, formats=formats, log=log, html_js=html_js)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m grokhpc.analyze",
        description="The seed notebook's figures for one run (PNG and HTML).")
    ap.add_argument("run_dir", help="a trained run directory")
    ap.add_argument("--out", default=None, help="output directory (default RUN_DIR/figures)")
    ap.add_argument("--format", default="png,html",
                    help="comma list of png, svg, pdf, html (default png,html)")
    ap.add_argument("--html-js", choices=("directory", "embed"), default="directory",
                    help="HTML figures load one plotly.min.js beside them (directory, the "
                         "default) or each embeds plotly.js (embed: self-contained files)")
    ap.add_argument("--llc", nargs="?", const="", default=None, metavar="K=V,...",
                    help="estimate the LLC at checkpoints first (resumable; the settings of "
                         "python -m grokhpc.llc_run, e.g. --llc log_points=8,chains=2)")
    return ap


def parse_llc_flag(text: str | None):
    """``--llc`` as an LLCRequest: comma-separated KEY=VALUE (numbers or ``full``)."""
    if text is None:
        return None
    from .llc import LLCRequest

    values = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"--llc: expected KEY=VALUE items, got {item!r}")
        try:
            values[key.strip()] = float(value) if "." in value or "e" in value else int(value)
        except ValueError:
            values[key.strip()] = value.strip()
    return LLCRequest.from_mapping(values, "--llc")


def os_error_line(e: OSError, args) -> str:
    """One line for a file operation that failed, with what to do: --out for a folder that
    cannot be written (a read-only run), space for a full disk."""
    where = e.filename or args.out or Path(args.run_dir) / "figures"
    what = os.strerror(e.errno) if e.errno else str(e)
    todo = (f"; write the figures elsewhere: python -m grokhpc.analyze {args.run_dir} --out DIR"
            if e.errno in NOT_ALLOWED else "; free some space and run it again"
            if e.errno in NO_SPACE else "")
    return f"{where}: {what}{todo}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        formats = parse_formats(args.format)
        if out_problem(args.out):   # a file: refused before any work
            raise ValueError(out_problem(args.out))
        written = analyze(args.run_dir, args.out, formats, html_js=args.html_js,
                          llc=parse_llc_flag(args.llc))
    except (RunDirError, ValueError, ExportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:   # a run directory that cannot be written, a full disk
        print(f"error: {os_error_line(e, args)}", file=sys.stderr)
        return 1
    n = sum(len(v) for v in written.values())
    where = {p.parent for v in written.values() for p in v}
    print(f"{len(written)} figures, {n} files written to {', '.join(map(str, sorted(where)))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
