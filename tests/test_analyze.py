"""grokhpc.analyze on a tiny trained run: every figure as HTML and as a real PNG (kaleido +
Chromium), the phase lines where summary.json puts them, a fast --help, clear errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from grokhpc.config import RunConfig
from grokhpc.train import run_training

# tiny tensors on two shared cores: one intra-op thread avoids OpenMP spin-waits
torch.set_num_threads(1)
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}

# the seed's figures for one run, by file stem
EXPECTED = [
    "training_curves", "attention_mean_per_head", "attention_head0", "svd_singular_values",
    "svd_principal_components", "svd_top_components", "fourier_basis", "fourier_embedding",
    "fourier_embedding_norms", "neuron_freq_fraction", "wlogit_fourier_norms",
    "cos_sim_over_training", "restricted_excluded_loss", "restricted_test_ratio",
    "gini_weight_norm",
]
TINY = dict(p=13, d_model=32, d_head=8, n_heads=4, d_mlp=64, n_epochs=300, checkpoint_every=50,
            eval_every=10, device="cpu")


def png_dims(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "PNG signature"
    assert data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    return run_training(RunConfig(**TINY), out, progress_bar=False, log=lambda *_: None)


def test_analyze_writes_every_figure_as_png_and_html(tiny_run, tmp_path, chromium):
    out = tmp_path / "figs"
    r = subprocess.run([sys.executable, "-m", "grokhpc.analyze", str(tiny_run.path),
                        "--out", str(out)], capture_output=True, text=True,
                       env={**ONE_THREAD, "BROWSER_PATH": chromium}, timeout=300)
    assert r.returncode == 0, r.stderr
    js = (out / "plotly.min.js").read_bytes()     # one plotly.js for the folder, offline
    for name in EXPECTED:
        html = (out / f"{name}.html").read_text()
        assert "<html" in html and "Plotly.newPlot" in html, name
        assert re.findall(r'<script[^>]*\ssrc="([^"]*)"', html) == ["plotly.min.js"], name
        assert len(html) < len(js) // 20, name                  # not embedded again
        w, h = png_dims((out / f"{name}.png").read_bytes())
        assert w > 0 and h > 0, name
    assert len(list(out.glob("*.png"))) == len(EXPECTED)
    assert sorted(p.name for p in out.iterdir() if p.suffix not in (".png", ".html")) == \
        ["plotly.min.js"]


def test_html_js_embed_writes_self_contained_files(tiny_run, tmp_path):
    out = tmp_path / "figs"
    r = subprocess.run([sys.executable, "-m", "grokhpc.analyze", str(tiny_run.path), "--out",
                        str(out), "--format", "html", "--html-js", "embed"],
                       capture_output=True, text=True, env=ONE_THREAD, timeout=300)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{n}.html" for n in EXPECTED)
    for name in EXPECTED:
        html = (out / f"{name}.html").read_text()
        assert "plotly.js v" in html and not re.search(r"<script[^>]*\ssrc=", html), name
    bad = subprocess.run([sys.executable, "-m", "grokhpc.analyze", str(tiny_run.path),
                          "--html-js", "cdn"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "argument --html-js: invalid choice: 'cdn'" in bad.stderr


def test_phase_lines_sit_at_the_summary_epochs(tiny_run):
    from grokhpc.analyze import build_figures

    summary = json.loads(tiny_run.file("summary.json").read_text())
    figs = build_figures(tiny_run)
    assert sorted(figs) == sorted(EXPECTED)
    xs = sorted(s.x0 for s in figs["training_curves"].layout.shapes)
    want = sorted(summary[k] for k in ("memorisation_end", "circuit_formation_end", "cleanup_end")
                  if summary[k] is not None)
    if summary["grokked"]:
        want = sorted(want + [summary["grokking_epoch"]])
    assert xs == want and summary["memorisation_end"] in xs
    # the training-curve traces are the run's own curves
    tr = figs["training_curves"].data[0]
    assert list(tr.x)[-1] == TINY["n_epochs"] and figs["training_curves"].layout.yaxis.type == "log"
    # one cosine-similarity line per frequency 1..6, plus the residual
    assert len(figs["cos_sim_over_training"].data) == 13 // 2 + 1


def test_help_is_fast_and_imports_nothing_heavy():
    code = ("import sys, time; t = time.perf_counter(); from grokhpc import analyze\n"
            "try:\n    analyze.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(time.perf_counter() - t, [m for m in ('torch', 'transformer_lens', 'plotly') "
            "if m in sys.modules])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=ONE_THREAD, timeout=60)
    assert "RUN_DIR" in r.stdout.upper() and "--format" in r.stdout
    seconds, heavy = r.stdout.strip().splitlines()[-1].split(" ", 1)
    assert heavy == "[]"
    assert float(seconds) < 1.0


def test_not_a_run_directory_is_a_one_line_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "grokhpc.analyze", str(tmp_path)],
                       capture_output=True, text=True, env=ONE_THREAD, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "not a run directory" in r.stderr
    r = subprocess.run([sys.executable, "-m", "grokhpc.analyze", str(tmp_path), "--format", "gif"],
                       capture_output=True, text=True, env=ONE_THREAD, timeout=60)
    assert r.returncode == 2 and "gif" in r.stderr


def _analyze(*args, preexec=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "grokhpc.analyze", *map(str, args), "--format",
                           "html"], capture_output=True, text=True, env=ONE_THREAD, timeout=300,
                          preexec_fn=preexec)


def test_a_read_only_run_and_a_full_disk_are_one_line_whose_advice_works(tiny_run, tmp_path):
    """A read-only run raised PermissionError: one line saying --out DIR; followed onto a full
    disk, one line saying to free space; with space again the same command writes the
    figures. --out naming a file is refused before any work. The run is never changed."""
    from fs_faults import full_disk, read_only

    run_files = {f.name: f.read_bytes() for f in tiny_run.path.iterdir()}
    with read_only(tiny_run.path, tmp_path / "ro") as (ro, code):
        r = _analyze(ro)
        assert (r.returncode, r.stdout) == (1, "")
        assert r.stderr == (f"error: {ro / 'figures'}: {os.strerror(code)}; write the figures "
                            f"elsewhere: python -m grokhpc.analyze {ro} --out DIR\n")
        figs = tmp_path / "figs"
        figs.mkdir()
        with full_disk(figs, size_mb=256) as (free, code, preexec):   # room for 15 figures
            r = _analyze(ro, "--out", figs, preexec=preexec)
            assert (r.returncode, r.stderr.count("\n")) == (1, 1), r.stderr
            assert r.stderr.startswith(f"error: {figs}")
            assert r.stderr.endswith(f": {os.strerror(code)}; free some space and run it again\n")
            free()
            r = _analyze(ro, "--out", figs, preexec=preexec)
            assert r.returncode == 0, r.stderr
            assert sorted(f.stem for f in figs.glob("*.html")) == sorted(EXPECTED)
        note = tmp_path / "note.txt"
        note.write_text("keep\n")
        r = _analyze(ro, "--out", note)
        assert (r.returncode, r.stderr) == (2, f"error: --out {note}: expected a directory, "
                                               "got an existing file\n")
        assert note.read_text() == "keep\n"
    assert {f.name: f.read_bytes() for f in tiny_run.path.iterdir()} == run_files


def test_mul_run_draws_every_figure_over_the_discrete_log(tmp_path):
    """mul reads Z_7^* through log_3 (3 is the smallest generator mod 7): every figure, the
    basis figures' input axis titled log_3 a."""
    from grokhpc.analyze import analyze, build_figures

    cfg = RunConfig(**{**TINY, "p": 7, "op": "mul", "n_epochs": 20, "checkpoint_every": 10})
    run = run_training(cfg, tmp_path / "run", progress_bar=False, log=lambda *_: None)
    summary = json.loads(run.file("summary.json").read_text())
    assert summary["basis"] == "Z_p^*" and summary["generator"] == 3
    assert summary["key_freqs"] == summary["key_elements"]
    assert all(1 <= k <= 3 for k in summary["key_freqs"])      # frequencies of Z_6
    assert summary["final_restricted_loss"] is not None
    written = analyze(run.path, tmp_path / "figs", formats=("html",), log=lambda *_: None)
    assert sorted(written) == sorted(EXPECTED)
    figs = build_figures(run)
    assert figs["fourier_basis"].layout.xaxis.title.text == "log_3 a"
    assert "Z_6" in figs["fourier_basis"].layout.title.text
    assert "log_3 a + log_3 b - log_3 c" in figs["cos_sim_over_training"].layout.title.text


# ---- phase labels that never overlap -------------------------------------------------------------
# the seed run's boundaries: three of them within 3% of a 25,000-epoch axis
SEED_SUMMARY = {"memorisation_end": 1_460, "circuit_formation_end": 22_080, "cleanup_end": 22_760,
                "grokking_epoch": 22_560, "grokked": True}
QUICK_SUMMARY = {"memorisation_end": 150, "circuit_formation_end": 600, "cleanup_end": 760,
                 "grokking_epoch": 700, "grokked": True}
GLYPH_EM = 0.6       # Liberation Sans / Arial: average advance of lowercase text below 0.6 em
LINE_EM = 1.2        # line height of one label


def curves_figure(n_epochs: int, log_x: bool):
    import numpy as np
    import pandas as pd

    from grokhpc.analyze import training_figures

    ep = np.arange(n_epochs + 1)
    curves = pd.DataFrame({"epoch": ep, "train_loss": np.exp(-ep / n_epochs * 10) + 1e-6,
                           "test_loss": np.where(ep % 10 == 0, 5.0 - 4.9 * ep / n_epochs, np.nan)})
    summary = SEED_SUMMARY if n_epochs == 25_000 else QUICK_SUMMARY
    fig = training_figures(curves, None, summary, 113, "mul")["training_curves"]
    if log_x:  # the same lines and labels, drawn again on a log epoch axis
        fig.layout.annotations = ()
        fig.layout.shapes = ()
        fig.update_xaxes(type="log")
        from grokhpc.analyze import add_phase_lines

        add_phase_lines(fig, summary)
    return fig, summary


def label_boxes(fig, plot_px: float, plot_h: float, log_x: bool):
    """Each label's box in pixels, from its anchor, text and font with generous glyph widths."""
    import math

    xs = [x for t in fig.data for x in t.x if x is not None and (x > 0 or not log_x)]
    f = (lambda v: math.log10(v)) if log_x else (lambda v: v)
    lo, hi = f(min(xs)), f(max(xs))
    boxes = []
    for a in fig.layout.annotations:
        w = len(a.text) * GLYPH_EM * a.font.size
        x = (f(a.x) - lo) / (hi - lo) * plot_px + (a.xshift or 0)
        x0 = x if a.xanchor == "left" else x - w
        y1 = (1 - a.y) * plot_h                         # from the top, yanchor top
        boxes.append((x0, x0 + w, y1, y1 + LINE_EM * a.font.size, a.text))
    return boxes


@pytest.mark.parametrize("n_epochs", [25_000, 1_500], ids=["seed", "quick"])
@pytest.mark.parametrize("log_x", [False, True], ids=["linear", "log"])
def test_phase_labels_of_close_boundaries_never_overlap(n_epochs, log_x):
    fig, summary = curves_figure(n_epochs, log_x)
    labels = sorted(a.text for a in fig.layout.annotations)
    assert labels == sorted(["memorisation end", "circuit formation end", "cleanup end",
                             "grokking (test acc 99%)"])
    # the plot area: the 720 px figure less its margins and the legend (~540 px), 350 px high
    boxes = label_boxes(fig, 540, 350, log_x)
    for i, a in enumerate(boxes):
        assert 0 <= a[0] and a[1] <= 540 + 3, a           # inside the axis
        for b in boxes[i + 1:]:
            apart = a[1] <= b[0] or b[1] <= a[0] or a[3] <= b[2] or b[3] <= a[2]
            assert apart, (a, b)
    # the three boundaries within 3% of the seed's axis sit on three different rows
    if n_epochs == 25_000 and not log_x:
        close = {"circuit formation end", "cleanup end", "grokking (test acc 99%)"}
        assert len({a.y for a in fig.layout.annotations if a.text in close}) == 3
    # and every label names the line it belongs to
    at = {a.text: a.x for a in fig.layout.annotations}
    assert at["cleanup end"] == summary["cleanup_end"]
    assert at["memorisation end"] == summary["memorisation_end"]


def test_phase_labels_of_subplots_sit_in_the_top_one():
    from plotly.subplots import make_subplots
    import plotly.graph_objects as go

    from grokhpc.analyze import add_phase_lines
    from grokhpc.figures import paper_style

    fig = make_subplots(rows=2, cols=1, shared_xaxes=True)
    for r in (1, 2):
        fig.add_trace(go.Scatter(x=[0, 25_000], y=[1, 2]), r, 1)
    add_phase_lines(paper_style(fig, height=640), SEED_SUMMARY, row="all", col=1)
    assert {a.yref for a in fig.layout.annotations} == {"y domain"}
    assert len(fig.layout.shapes) == 8                   # four lines in each subplot
    # drawn with a width of their own: the paper template's shape default is width 0
    assert all(s.line.width >= 1 for s in fig.layout.shapes)


@pytest.mark.parametrize("fields,left_out", [
    ({"p": 7, "n_layers": 2, "normalization": "LN", "act_fn": "gelu"}, set()),
    ({"op": "s5", "train_frac": 0.2}, {"fourier_basis", "fourier_embedding"}),
    ({"op": "s5conj", "train_frac": 0.2},
     {"cos_sim_over_training", "restricted_excluded_loss", "restricted_test_ratio",
      "gini_weight_norm", "fourier_basis", "fourier_embedding", "fourier_embedding_norms",
      "neuron_freq_fraction", "wlogit_fourier_norms"}),
])
def test_analyze_writes_the_figures_each_shape_and_task_defines(tmp_path, fields, left_out):
    """A 2-block LayerNorm GELU run gets every figure (its neurons and W_logit are the last
    block's); an s5 run its figures per irrep but no Fourier-basis heatmap; an s5conj run, not
    the group's product, no basis figure, and one log line says so."""
    from grokhpc.analyze import analyze
    from grokhpc.config import from_dict

    base = {k: v for k, v in TINY.items() if k != "p"}
    cfg = from_dict({**base, "n_epochs": 20, "checkpoint_every": 10, **fields})
    run = run_training(cfg, tmp_path / "run", progress_bar=False, log=lambda *_: None)
    lines = []
    written = analyze(run.path, tmp_path / "figs", formats=("html",), log=lines.append)
    assert sorted(written) == sorted(set(EXPECTED) - left_out)
    assert all((tmp_path / "figs" / f"{n}.html").exists() for n in written)
    skipped = [line for line in lines if "left out" in line]
    assert len(skipped) == (1 if "gini_weight_norm" in left_out else 0)
    if cfg.n_layers == 2:
        from grokhpc.analyze import build_figures
        figs = build_figures(run)
        assert "block 1" in figs["neuron_freq_fraction"].layout.title.text
        assert len(figs["attention_mean_per_head"].data[0].y) == 2 * cfg.n_heads
