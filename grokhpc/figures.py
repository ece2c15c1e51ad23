"""The one export path for every grokhpc figure, and the paper style they share.

Stage: figures, last of all: ``grokhpc.aggregate`` (a sweep's figures, drawn by
``grokhpc.sweep_figures``) and ``grokhpc.analyze`` (one run's) write through :func:`export`.

``export(figs, out_dir)`` writes each plotly figure as

* PNG / SVG / PDF through kaleido (>= 1) and a real Chromium -- one browser for the whole
  batch, MathJax off (no network), every file checked after rendering (PNG signature and the
  IHDR width/height, SVG/PDF headers);
* HTML that renders offline: by default (``html_js="directory"``) one ``plotly.min.js`` next to
  the HTML files, which load it by its relative name, so a figures folder opens anywhere it is
  copied whole and each file stays small (plotly.js alone is several MB); with
  ``html_js="embed"`` plotly.js inside each file, one self-contained file. Never the CDN build.

Every file is written atomically (temporary name, then rename): a reader sees the previous
figure or the new one, never half of one.

The browser is looked for in this order: ``$BROWSER_PATH``, ``/usr/bin/chromium-headless-shell``,
``/usr/bin/chromium``, the Chrome grokhpc fetched into the user's cache, the Chrome that
``kaleido_get_chrome`` downloads, any Chromium on ``$PATH``. When there is none, grokhpc fetches
Chrome for Testing once with kaleido's own helper into ``~/.cache/grokhpc/chrome`` (a message and
a progress bar; at most one try per process, and none with ``$GROKHPC_NO_BROWSER_FETCH`` set);
where that server cannot be reached (a compute node), HTML is still written and one line says
how to enable PNG.

plotly and kaleido are imported inside the functions only: importing this module is free.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

from .store import atomic_write_bytes

if TYPE_CHECKING:  # pragma: no cover
    import plotly.graph_objects as go

STATIC_FORMATS = ("png", "svg", "pdf")
FORMATS = STATIC_FORMATS + ("html",)
HTML_JS = ("directory", "embed")   # where an HTML figure's plotly.js lives (see export)
PLOTLY_JS = "plotly.min.js"       # the name plotly's include_plotlyjs="directory" loads

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

ENABLE_PNG_HINT = ("to enable PNG/SVG/PDF run the command once where there is network (a login "
                   "node: grokhpc then fetches Chromium into its cache), or run "
                   "`kaleido_get_chrome`, or `apt-get install chromium-headless-shell`, or set "
                   "BROWSER_PATH to a Chromium executable")
NO_BROWSER_LINE = ("figures: no Chromium found and none could be fetched ({why}), so only HTML "
                   "was written; " + ENABLE_PNG_HINT)

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


def wrap_title(text: str, width_px: int) -> str:
    """``text`` on two lines, its parenthesis on the second, when one line would be wider than
    the figure: plotly does not wrap a title, and cuts a long one at both edges."""
    fits = int(width_px / (0.6 * TITLE_SIZE))      # characters of the title's font per line
    if len(text) <= fits or "<br>" in text or " (" not in text:
        return text
    head, _, rest = text.partition(" (")
    return f"{head}<br>({rest}"


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
        fig.update_layout(title=dict(text=wrap_title(title, fig.layout.width)))
    if legend_title is not None:
        fig.update_layout(legend=dict(title=dict(text=legend_title)))
    return fig


# ---- the browser ----------------------------------------------------------------------------
SYSTEM_BROWSERS = ("/usr/bin/chromium-headless-shell", "/usr/bin/chromium")
PATH_BROWSERS = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome",
                 "chrome")
FETCH_TIMEOUT = 10        # seconds to reach the download server; beyond it: no network here
FETCH_STALL = 120         # seconds without a byte before a download is given up
NO_FETCH_ENV = "GROKHPC_NO_BROWSER_FETCH"
_fetch_failed: list[str] = []   # why this process's one fetch failed (it is not tried again)


class FetchError(RuntimeError):
    pass


def _is_exe(p: str | os.PathLike | None) -> bool:
    return bool(p) and Path(p).is_file() and os.access(p, os.X_OK)


def browser_cache() -> Path:
    """Where grokhpc keeps the Chromium it fetches: the user's cache directory
    (``~/.cache/grokhpc/chrome`` on Linux, ``$XDG_CACHE_HOME`` honoured)."""
    try:
        from platformdirs import user_cache_dir

        root = Path(user_cache_dir("grokhpc"))
    except ImportError:  # platformdirs comes with kaleido; a fallback all the same
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "grokhpc"
    return root / "chrome"


def _chrome_in(root: Path) -> str | None:
    """The Chrome for Testing that kaleido's helper unpacked into ``root``, if complete (the
    helper writes version_tag.txt last)."""
    try:
        from choreographer.cli._cli_utils import get_chrome_download_path

        exe = get_chrome_download_path(root, mkdir=False)
    except Exception:  # choreographer layout changed
        return None
    return str(exe) if _is_exe(exe) and (root / "version_tag.txt").is_file() else None


def _kaleido_download_dir() -> Path | None:
    """Where ``kaleido_get_chrome`` puts Chrome when run by hand."""
    try:
        from choreographer.cli.defaults import default_download_path

        return Path(default_download_path)
    except Exception:
        return None


def find_browser() -> str | None:
    """The Chromium to render with, or None. In order: ``$BROWSER_PATH``, Debian's
    chromium-headless-shell / chromium, the one grokhpc fetched into :func:`browser_cache`,
    the one ``kaleido_get_chrome`` downloaded, any Chromium on ``$PATH``."""
    env = os.environ.get("BROWSER_PATH")
    if _is_exe(env):
        return env
    for p in SYSTEM_BROWSERS:
        if _is_exe(p):
            return p
    for root in (browser_cache(), _kaleido_download_dir()):
        found = _chrome_in(root) if root is not None else None
        if found:
            return found
    for name in PATH_BROWSERS:
        p = shutil.which(name)
        if p:
            return p
    return None


def chrome_source() -> tuple[str, str]:
    """(version, URL) of the Chrome for Testing build kaleido's helper downloads here."""
    import json
    from importlib import resources

    from choreographer.cli._cli_utils import get_google_supported_platform_string

    known = json.loads((resources.files("choreographer") / "resources"
                        / "last_known_good_chrome.json").read_text())
    arch = get_google_supported_platform_string()
    url = next((d["url"] for d in known["downloads"]["chrome"] if d["platform"] == arch), None)
    if url is None:
        raise FetchError(f"no Chrome for Testing build for this platform ({arch})")
    return known["version"], url


def download_chrome(root: Path) -> None:
    """kaleido's own helper: fetch Chrome for Testing into ``root`` (unzipped there)."""
    import kaleido

    kaleido.get_chrome_sync(path=root)


def _reachable(url: str, timeout: float) -> int | None:
    """The download's size in bytes (None if the server does not say); OSError when the
    server cannot be reached within ``timeout`` seconds (no network: a compute node)."""
    import urllib.request

    with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"),
                                timeout=timeout) as r:
        size = r.headers.get("Content-Length")
    return int(size) if size and size.isdigit() else None


def _download_with_progress(root: Path, size: int | None) -> None:
    """Run :func:`download_chrome` on a thread while a progress bar follows the zip it writes."""
    from tqdm.auto import tqdm

    box: dict[str, BaseException] = {}

    def target():
        try:
            download_chrome(root)
        except BaseException as e:  # noqa: BLE001 -- re-raised below
            box["error"] = e

    t = threading.Thread(target=target, name="grokhpc-get-chrome", daemon=True)
    t.start()
    zip_path, seen, last_change = root / "chrome.zip", 0, time.monotonic()
    with tqdm(total=size, unit="B", unit_scale=True, desc="Chromium", file=sys.stderr) as bar:
        while t.is_alive():
            t.join(0.25)
            now = zip_path.stat().st_size if zip_path.exists() else seen
            if now > seen:
                bar.update(now - seen)
                seen, last_change = now, time.monotonic()
            elif (size is None or seen < size) and time.monotonic() - last_change > FETCH_STALL:
                raise FetchError(f"the download stalled for {FETCH_STALL} s")
        if size:
            bar.update(max(0, size - seen))
    if "error" in box:
        raise box["error"]


def fetch_browser(log: Callable[[str], None] | None = print,
                  timeout: float | None = None) -> str:
    """Fetch Chromium once into :func:`browser_cache` with kaleido's helper (a message and a
    progress bar) and return it; later calls, here or in any process, find it there. Raises
    FetchError or OSError where the download server cannot be reached."""
    root = browser_cache()
    root.mkdir(parents=True, exist_ok=True)
    with _cache_lock(root):   # one download at a time, even across processes
        found = _chrome_in(root)
        if found:
            return found
        version, url = chrome_source()
        size = _reachable(url, timeout or FETCH_TIMEOUT)
        if log:
            mb = f", {size / 1e6:.0f} MB" if size else ""
            log(f"figures: no Chromium found; fetching Chrome for Testing {version}{mb} once "
                f"into {root} (kaleido.get_chrome_sync)")
        _download_with_progress(root, size)
        found = _chrome_in(root)
        if not found:
            raise FetchError(f"the download left no Chromium in {root}")
    if log:
        log(f"figures: Chromium ready at {found}; PNG/SVG/PDF use it from now on")
    return found


@contextlib.contextmanager
def _cache_lock(root: Path):
    """An exclusive lock file in the cache (POSIX flock; nothing where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(root / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield     # closing the file releases the lock


def obtain_browser(log: Callable[[str], None] | None = print) -> tuple[str | None, str]:
    """(browser, "") -- found, or fetched once per process -- or (None, why not)."""
    found = find_browser()
    if found:
        return found, ""
    if os.environ.get(NO_FETCH_ENV):
        return None, f"{NO_FETCH_ENV} is set"
    if not _fetch_failed:
        try:
            return fetch_browser(log), ""
        except Exception as e:  # noqa: BLE001 -- no network, no space, a changed helper
            reason = getattr(e, "reason", None) or e
            _fetch_failed.append(f"{type(e).__name__}: {reason}".splitlines()[0][:160])
    return None, _fetch_failed[0]


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
    include = True if html_js == "embed" else "directory"   # "directory": src="plotly.min.js"
    html = fig.to_html(include_plotlyjs=include, full_html=True, include_mathjax=False,
                       config={"displaylogo": False,
                               "toImageButtonOptions": {"format": "png", "scale": PAPER_SCALE}})
    return html.encode("utf-8")


def _write_plotlyjs(out_dir: Path) -> Path:
    """The folder's one plotly.min.js, rewritten only when it is not this plotly's."""
    from plotly.offline import get_plotlyjs

    js = get_plotlyjs().encode("utf-8")
    target = out_dir / PLOTLY_JS
    if not (target.is_file() and target.stat().st_size == len(js) and target.read_bytes() == js):
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
           height: int | None = None, scale: float = PAPER_SCALE, *, html_js: str = "directory",
           browser: str | None = None, log: Callable[[str], None] | None = print
           ) -> dict[str, list[Path]]:
    """Write every figure of ``figs`` ({file stem: plotly figure}) into ``out_dir``.

    ``formats``: any of png, svg, pdf, html. ``width``/``height`` (CSS px) default to each
    figure's layout size, else the paper size; PNGs are ``scale`` times that in pixels.
    ``html_js``: "directory" (one plotly.min.js beside the HTML files, the default) or "embed"
    (plotly.js inside each HTML, one self-contained file). Returns {name: [paths written]}.
    Static formats need a Chromium (``browser``, else one found or fetched:
    :func:`obtain_browser`); without one the HTML is written and one line is logged. A figure
    whose render or check fails raises ExportError naming the file, after every other file has
    been written.
    """
    formats = parse_formats(formats)
    if html_js not in HTML_JS:
        raise ValueError(f"--html-js: expected one of {', '.join(HTML_JS)}, got {html_js!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in figs:
        if not _NAME_RE.match(name):
            raise ValueError(f"figure name {name!r}: expected letters, digits, '_', '-', '.'")
    written: dict[str, list[Path]] = {name: [] for name in figs}
    errors: list[str] = []
    if "html" in formats and figs:
        _write_html(figs, out_dir, html_js, written)
    static = [f for f in formats if f in STATIC_FORMATS]
    if static and figs:
        browser, why = (browser, "") if browser else obtain_browser(log)
        if browser is None:
            if log:
                log(NO_BROWSER_LINE.format(why=why))
        else:
            errors = _write_static(figs, out_dir, static, (width, height, scale), browser, log,
                                   written)
    if errors:
        raise ExportError("; ".join(errors))
    return written


def _write_html(figs: Mapping[str, "go.Figure"], out_dir: Path, html_js: str,
                written: dict[str, list[Path]]) -> None:
    """Every figure as HTML (with the folder's one plotly.min.js, unless embedded)."""
    if html_js == "directory":
        _write_plotlyjs(out_dir)
    for name, fig in figs.items():
        path = out_dir / f"{name}.html"
        atomic_write_bytes(path, _html_bytes(fig, html_js))
        written[name].append(path)


def _write_static(figs: Mapping[str, "go.Figure"], out_dir: Path, static: list[str],
                  size: tuple, browser: str, log, written: dict[str, list[Path]]) -> list[str]:
    """Every figure in each static format, rendered by one Chromium, checked, written and read
    back; returns one line per file that failed (none written for it)."""
    width, height, scale = size
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
            log(f"figures: {e}; only HTML was written; {ENABLE_PNG_HINT}")
        return []
    errors = []
    for (name, fmt, expect), data in zip(where, results):
        path = out_dir / f"{name}.{fmt}"
        try:
            if isinstance(data, BaseException):
                raise ExportError(f"{path}: render failed ({type(data).__name__}: {data})")
            _save_checked(path, fmt, data, expect)
        except ExportError as e:
            errors.append(str(e))
            continue
        written[name].append(path)
    return errors


def _save_checked(path: Path, fmt: str, data: bytes, expect: tuple[int, int]) -> None:
    """Check a rendered file, write it atomically and check what is on disk; ExportError
    naming the file when either check fails."""
    _check(fmt, data, expect if fmt == "png" else None, path)
    atomic_write_bytes(path, data)
    with open(path, "rb") as f:  # read back: what is on disk is what was checked
        head = f.read(64)
    _check(fmt, head, None, path)
    if fmt == "png" and png_size(head) != expect:
        raise ExportError(f"{path}: PNG on disk has the wrong size")
