"""The one export path for every grokhpc figure, and the paper style they share.

``export(figs, out_dir)`` writes each plotly figure as

* PNG / SVG / PDF through kaleido (>= 1) and a real Chromium -- one browser for the whole
  batch, MathJax off (no network), every file checked after rendering (PNG signature and the
  IHDR width/height, SVG/PDF headers);
* standalone HTML that renders offline: plotly.js embedded in each file (``html_js="embed"``,
  the default) or, with ``html_js="directory"``, one ``plotly.min.js`` next to the HTML files.
  Never the CDN build.

Every file is written atomically (temporary name, then rename): a reader sees the previous
figure or the new one, never half of one.

The browser is looked for in this order: ``$BROWSER_PATH``, ``/usr/bin/chromium-headless-shell``,
``/usr/bin/chromium``, then the Chrome that ``kaleido_get_chrome`` downloads (and any Chromium
on ``$PATH``). Without one, HTML is still written and one line says how to enable PNG.

plotly and kaleido are imported inside the functions only: importing this module is free.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

from .store import atomic_write_bytes

if TYPE_CHECKING:  # pragma: no cover
    import plotly.graph_objects as go

STATIC_FORMATS = ("png", "svg", "pdf")
FORMATS = STATIC_FORMATS + ("html",)

# Paper style: sizes are CSS pixels; PNGs are rendered at ``scale`` x these (scale 3 of a
# 720 px wide figure = 2160 px, 300 dpi over 7.2 in -- a two-column figure).
PAPER_WIDTH = 720
PAPER_HEIGHT = 480
PAPER_SCALE = 3
FONT_FAMILY = "Liberation Sans, Arial, Helvetica, DejaVu Sans, sans-serif"
FONT_SIZE = 16
TITLE_SIZE = 18
# Okabe & Ito (2008), distinguishable with the common colour-vision deficiencies.
COLORWAY = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000")
TEMPLATE_NAME = "grokhpc_paper"

ENABLE_PNG_HINT = ("no Chromium found, so only HTML was written; to enable PNG/SVG/PDF run "
                   "`kaleido_get_chrome` once (on a login node), or `apt-get install "
                   "chromium-headless-shell`, or set BROWSER_PATH to a Chromium executable")

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class ExportError(RuntimeError):
    """A figure that could not be written or whose file failed its check; names the file."""


# ---- style ----------------------------------------------------------------------------------
def paper_template():
    """The plotly template of every grokhpc figure (registered as ``grokhpc_paper``)."""
    import plotly.graph_objects as go
    import plotly.io as pio

    if TEMPLATE_NAME in pio.templates:
        return pio.templates[TEMPLATE_NAME]
    axis = dict(showline=True, linewidth=1, linecolor="black", mirror=True, ticks="outside",
                ticklen=5, showgrid=True, gridcolor="#e5e5e5", zeroline=False,
                title=dict(font=dict(size=FONT_SIZE)), tickfont=dict(size=FONT_SIZE - 2),
                automargin=True)
    tpl = go.layout.Template(pio.templates["simple_white"])
    tpl.layout.update(
        font=dict(family=FONT_FAMILY, size=FONT_SIZE, color="black"),
        title=dict(font=dict(size=TITLE_SIZE), x=0.5, xanchor="center"),
        colorway=list(COLORWAY),
        xaxis=axis, yaxis=axis,
        legend=dict(font=dict(size=FONT_SIZE - 2), title=dict(font=dict(size=FONT_SIZE - 2)),
                    bgcolor="rgba(255,255,255,0.8)"),
        margin=dict(l=80, r=30, t=60, b=70),
        width=PAPER_WIDTH, height=PAPER_HEIGHT,
        paper_bgcolor="white", plot_bgcolor="white",
    )
    pio.templates[TEMPLATE_NAME] = tpl
    return tpl


def paper_style(fig: "go.Figure", *, width: int | None = None, height: int | None = None,
                title: str | None = None, legend_title: str | None = None) -> "go.Figure":
    """Apply the paper template, fonts and size to ``fig`` (in place) and return it."""
    fig.update_layout(template=paper_template())
    fig.update_xaxes(showline=True, linewidth=1, linecolor="black", mirror=True, ticks="outside",
                     showgrid=True, gridcolor="#e5e5e5", zeroline=False, automargin=True)
    fig.update_yaxes(showline=True, linewidth=1, linecolor="black", mirror=True, ticks="outside",
                     showgrid=True, gridcolor="#e5e5e5", zeroline=False, automargin=True)
    fig.update_layout(width=width or fig.layout.width or PAPER_WIDTH,
                      height=height or fig.layout.height or PAPER_HEIGHT)
    if title is not None:
        fig.update_layout(title=dict(text=title))
    if legend_title is not None:
        fig.update_layout(legend=dict(title=dict(text=legend_title)))
    return fig


# ---- the browser ----------------------------------------------------------------------------
def _is_exe(p: str | os.PathLike | None) -> bool:
    return bool(p) and Path(p).is_file() and os.access(p, os.X_OK)


def find_browser() -> str | None:
    """The Chromium to render with, or None (see the module docstring for the order)."""
    env = os.environ.get("BROWSER_PATH")
    if _is_exe(env):
        return env
    for p in ("/usr/bin/chromium-headless-shell", "/usr/bin/chromium"):
        if _is_exe(p):
            return p
    try:  # the Chrome downloaded by `kaleido_get_chrome` / choreographer
        from choreographer.cli._cli_utils import get_chrome_download_path

        p = get_chrome_download_path(mkdir=False)
        if _is_exe(p):
            return str(p)
    except Exception:  # choreographer layout changed: fall through to PATH
        pass
    for name in ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome",
                 "chrome"):
        p = shutil.which(name)
        if p:
            return p
    return None


# ---- checks ---------------------------------------------------------------------------------
def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk; ExportError when ``data`` is not a PNG."""
    if len(data) < 33 or data[:8] != PNG_SIGNATURE or data[12:16] != b"IHDR":
        raise ExportError("not a PNG (bad signature or no IHDR chunk)")
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def _check(fmt: str, data: bytes, expect: tuple[int, int] | None, where: Path) -> None:
    if not data:
        raise ExportError(f"{where}: the renderer returned no bytes")
    if fmt == "png":
        try:
            size = png_size(data)
        except ExportError as e:
            raise ExportError(f"{where}: {e}") from None
        if expect is not None and size != expect:
            raise ExportError(f"{where}: PNG is {size[0]}x{size[1]} px, expected "
                              f"{expect[0]}x{expect[1]}")
    elif fmt == "svg":
        if b"<svg" not in data[:2000]:
            raise ExportError(f"{where}: not an SVG document")
    elif fmt == "pdf":
        if not data.startswith(b"%PDF-"):
            raise ExportError(f"{where}: not a PDF (no %PDF- header)")


# ---- rendering ------------------------------------------------------------------------------
def _run_async(coro_fn: Callable[[], Any]) -> Any:
    """Run a coroutine to completion in a fresh event loop on its own thread (works inside
    Jupyter, whose loop is already running)."""
    box: dict[str, Any] = {}

    def target():
        try:
            box["value"] = asyncio.run(coro_fn())
        except BaseException as e:  # noqa: BLE001 -- re-raised in the caller's thread
            box["error"] = e

    t = threading.Thread(target=target, name="grokhpc-kaleido", daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box.get("value")


class BrowserStartError(RuntimeError):
    pass


def render_static(jobs: list[tuple[dict, dict]], browser: str, timeout: float = 120) -> list[Any]:
    """Render ``[(figure dict, opts), ...]`` with one Chromium; a list of bytes or exceptions."""
    import kaleido

    async def main():
        try:
            k = kaleido.Kaleido(n=1, timeout=timeout, mathjax=False, path=browser)
            await k.open()
        except Exception as e:  # noqa: BLE001
            raise BrowserStartError(f"{browser}: cannot start Chromium ({e})") from e
        out: list[Any] = []
        try:
            for fig, opts in jobs:
                try:
                    out.append(await k.calc_fig(fig, opts=opts))
                except Exception as e:  # noqa: BLE001 -- reported per figure by the caller
                    out.append(e)
        finally:
            await k.close()
        return out

    return _run_async(main)


def _html_bytes(fig: "go.Figure", html_js: str) -> bytes:
    include = True if html_js == "embed" else "directory"
    html = fig.to_html(include_plotlyjs=include, full_html=True, include_mathjax=False,
                       config={"displaylogo": False,
                               "toImageButtonOptions": {"format": "png", "scale": PAPER_SCALE}})
    return html.encode("utf-8")


def _write_plotlyjs(out_dir: Path) -> Path:
    from plotly.offline import get_plotlyjs

    js = get_plotlyjs().encode("utf-8")
    target = out_dir / "plotly.min.js"
    if not (target.exists() and target.stat().st_size == len(js)):
        atomic_write_bytes(target, js)
    return target


def parse_formats(spec: str | Iterable[str]) -> tuple[str, ...]:
    """``"png,html"`` or ``["png", "html"]`` -> ``("png", "html")``; ValueError names a bad one."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for f in items:
        f = f.strip().lower().lstrip(".")
        if not f:
            continue
        if f not in FORMATS:
            raise ValueError(f"--format: expected a comma list of {', '.join(FORMATS)}, got {f!r}")
        if f not in out:
            out.append(f)
    if not out:
        raise ValueError(f"--format: expected a comma list of {', '.join(FORMATS)}, got nothing")
    return tuple(out)


def export(figs: Mapping[str, "go.Figure"], out_dir: str | os.PathLike,
           formats: str | Iterable[str] = ("png", "html"), width: int | None = None,
           height: int | None = None, scale: float = PAPER_SCALE, *, html_js: str = "embed",
           browser: str | None = None, log: Callable[[str], None] | None = print
           ) -> dict[str, list[Path]]:
    """Write every figure of ``figs`` ({file stem: plotly figure}) into ``out_dir``.

    ``formats``: any of png, svg, pdf, html. ``width``/``height`` (CSS px) default to each
    figure's layout size, else the paper size; PNGs are ``scale`` times that in pixels.
    ``html_js``: "embed" (plotly.js inside each HTML, one self-contained file) or "directory"
    (one plotly.min.js beside them). Returns {name: [paths written]}. Static formats need a
    Chromium (``browser`` or :func:`find_browser`); without one the HTML is written and one
    line is logged. A figure whose render or check fails raises ExportError naming the file,
    after every other file has been written.
    """
    formats = parse_formats(formats)
    if html_js not in ("embed", "directory"):
        raise ValueError(f"html_js: expected 'embed' or 'directory', got {html_js!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in figs:
        if not _NAME_RE.match(name):
            raise ValueError(f"figure name {name!r}: expected letters, digits, '_', '-', '.'")
    written: dict[str, list[Path]] = {name: [] for name in figs}
    errors: list[str] = []

    if "html" in formats and figs:
        if html_js == "directory":
            _write_plotlyjs(out_dir)
        for name, fig in figs.items():
            path = out_dir / f"{name}.html"
            atomic_write_bytes(path, _html_bytes(fig, html_js))
            written[name].append(path)

    static = [f for f in formats if f in STATIC_FORMATS]
    if static and figs:
        browser = browser or find_browser()
        if browser is None:
            if log:
                log(f"figures: {ENABLE_PNG_HINT}")
        else:
            jobs, where = [], []
            for name, fig in figs.items():
                w = int(width or fig.layout.width or PAPER_WIDTH)
                h = int(height or fig.layout.height or PAPER_HEIGHT)
                spec = fig.to_dict()
                for fmt in static:
                    jobs.append((spec, {"format": fmt, "width": w, "height": h, "scale": scale}))
                    where.append((name, fmt, (round(w * scale), round(h * scale))))
            try:
                results = render_static(jobs, browser)
            except BrowserStartError as e:
                if log:
                    log(f"figures: {e}; only HTML was written. {ENABLE_PNG_HINT.split('; ', 1)[1]}")
                results = None
            if results is not None:
                for (name, fmt, expect), data in zip(where, results):
                    path = out_dir / f"{name}.{fmt}"
                    if isinstance(data, BaseException):
                        errors.append(f"{path}: render failed ({type(data).__name__}: {data})")
                        continue
                    try:
                        _check(fmt, data, expect if fmt == "png" else None, path)
                    except ExportError as e:
                        errors.append(str(e))
                        continue
                    atomic_write_bytes(path, data)
                    with open(path, "rb") as f:  # read back: what is on disk is what was checked
                        head = f.read(64)
                    try:
                        _check(fmt, head if fmt != "pdf" else head, None, path)
                        if fmt == "png" and png_size(head) != expect:
                            raise ExportError(f"{path}: PNG on disk has the wrong size")
                    except ExportError as e:
                        errors.append(str(e))
                        continue
                    written[name].append(path)
    if errors:
        raise ExportError("; ".join(errors))
    return written
