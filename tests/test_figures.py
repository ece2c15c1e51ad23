"""grokhpc.figures: real PNGs rendered by kaleido + Chromium, decoded here and checked as images."""

from __future__ import annotations

import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import pytest

from grokhpc import figures

# tests that render take the ``chromium`` fixture (tests/conftest.py): a Chromium found or
# installed once, or they fail saying what to install
SCRIPT_SRC = re.compile(r"<script[^>]*\ssrc=[\"']([^\"']*)[\"']", re.I)


# ---- an independent PNG decoder (PNG spec, section 9: filters 0..4), for small images ----------
def decode_png(data: bytes):
    """-> (width, height, channels, rows as list of bytearrays); 8-bit RGB/RGBA/grey only."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "PNG signature"
    pos, idat, ihdr = 8, b"", None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        ctype = data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert zlib.crc32(ctype + body) & 0xFFFFFFFF == crc, f"CRC of {ctype!r}"
        if ctype == b"IHDR":
            ihdr = struct.unpack(">IIBBBBB", body)
        elif ctype == b"IDAT":
            idat += body
        elif ctype == b"IEND":
            break
        pos += 12 + length
    w, h, depth, colour, _, _, interlace = ihdr
    assert depth == 8 and interlace == 0, (depth, interlace)
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[colour]
    raw = zlib.decompress(idat)
    stride = w * channels
    assert len(raw) == h * (stride + 1)
    rows, prev = [], bytearray(stride)
    for y in range(h):
        ftype = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            left = line[i - channels] if i >= channels else 0
            up = prev[i]
            ul = prev[i - channels] if i >= channels else 0
            if ftype == 1:
                line[i] = (line[i] + left) & 0xFF
            elif ftype == 2:
                line[i] = (line[i] + up) & 0xFF
            elif ftype == 3:
                line[i] = (line[i] + (left + up) // 2) & 0xFF
            elif ftype == 4:
                p = left + up - ul
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - ul)
                pred = left if pa <= pb and pa <= pc else (up if pb <= pc else ul)
                line[i] = (line[i] + pred) & 0xFF
            else:
                assert ftype == 0, ftype
        rows.append(line)
        prev = line
    return w, h, channels, rows


def pixels(rows, channels):
    for line in rows:
        for i in range(0, len(line), channels):
            yield tuple(line[i:i + 3]) if channels >= 3 else (line[i],) * 3


def red_figure():
    import plotly.graph_objects as go

    fig = go.Figure(go.Scatter(x=[0, 1, 2, 3], y=[0, 3, 1, 2], mode="lines+markers",
                               line=dict(color="#ff0000", width=6), marker=dict(size=14)))
    return figures.paper_style(fig, width=240, height=160, title="Red")


def test_the_provided_chromium_is_what_a_fresh_process_finds(chromium):
    assert os.access(chromium, os.X_OK)
    out = subprocess.run([sys.executable, "-c", "from grokhpc.figures import find_browser; "
                          "print(find_browser())"], capture_output=True, text=True)
    assert out.stdout.strip() == chromium, out.stderr


def executable(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755)
    return path


def test_browser_path_env_wins_and_bad_value_falls_back(bare_machine, monkeypatch):
    system = executable(bare_machine / "usr-bin" / "chromium-headless-shell")
    monkeypatch.setattr(figures, "SYSTEM_BROWSERS", (str(system),))
    fake = executable(bare_machine / "my-chrome")
    monkeypatch.setenv("BROWSER_PATH", str(fake))
    assert figures.find_browser() == str(fake)
    monkeypatch.setenv("BROWSER_PATH", str(bare_machine / "missing"))
    assert figures.find_browser() == str(system)


def test_png_svg_pdf_html_rendered_and_checked(tmp_path, chromium):
    import plotly.graph_objects as go

    fig_a = red_figure()
    fig_b = figures.paper_style(go.Figure(go.Bar(x=["a", "b"], y=[1, 2])), width=300, height=200)
    out = figures.export({"red": fig_a, "bars": fig_b}, tmp_path / "figs",
                         formats="png,svg,pdf,html", scale=2, log=None, html_js="embed")
    assert {p.name for p in out["red"]} == {"red.png", "red.svg", "red.pdf", "red.html"}
    assert {p.name for p in out["bars"]} == {"bars.png", "bars.svg", "bars.pdf", "bars.html"}
    # nothing half-written left behind
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == sorted(
        f"{n}.{e}" for n in ("red", "bars") for e in ("png", "svg", "pdf", "html"))

    # the PNG, decoded independently: size = layout size x scale, a white page with red ink
    w, h, ch, rows = decode_png((tmp_path / "figs" / "red.png").read_bytes())
    assert (w, h) == (480, 320)
    px = list(pixels(rows, ch))
    white = sum(1 for p in px if p == (255, 255, 255))
    red = sum(1 for p in px if p[0] > 200 and p[1] < 60 and p[2] < 60)
    dark = sum(1 for p in px if max(p) < 80)  # axis lines, ticks and text
    assert white > 0.5 * len(px), "mostly white background"
    assert red > 500, f"the red trace is drawn ({red} red pixels)"
    assert dark > 200, "axes and labels are drawn"
    # and it is not a constant image: grey-level variance well above zero
    grey = [sum(p) / 3 for p in px]
    mean = sum(grey) / len(grey)
    assert sum((g - mean) ** 2 for g in grey) / len(grey) > 100

    bw, bh = figures.png_size((tmp_path / "figs" / "bars.png").read_bytes())
    assert (bw, bh) == (600, 400)
    assert (tmp_path / "figs" / "red.pdf").read_bytes().startswith(b"%PDF-")
    svg = (tmp_path / "figs" / "red.svg").read_text()
    assert "<svg" in svg and 'width="240"' in svg

    # HTML with html_js="embed": plotly.js inside byte for byte (the folder holds no
    # plotly.min.js: listed above), no script loaded from anywhere, no MathJax
    html = (tmp_path / "figs" / "red.html").read_text()
    js = plotly_js().decode()
    assert js[:2000] in html and js[-2000:] in html and len(html) > len(js)
    assert SCRIPT_SRC.findall(html) == []


def plotly_js() -> bytes:
    """plotly.js as the installed plotly package ships it."""
    import plotly

    return (Path(plotly.__file__).parent / "package_data" / "plotly.min.js").read_bytes()


def test_html_figures_share_one_plotlyjs_by_default(tmp_path):
    js = plotly_js()
    folder = tmp_path / "figs"
    out = figures.export({"one": red_figure(), "two": red_figure()}, folder, formats=["html"],
                         log=None)
    (folder / "plotly.min.js").write_bytes(b"// another plotly.js")   # replaced, not kept
    out |= figures.export({"three": red_figure()}, folder, formats="html", log=None)
    assert sorted(p.name for p in folder.iterdir()) == [
        "one.html", "plotly.min.js", "three.html", "two.html"]
    assert (folder / "plotly.min.js").read_bytes() == js
    for name, (path,) in out.items():
        html = path.read_bytes()
        assert SCRIPT_SRC.findall(html.decode()) == ["plotly.min.js"], name   # relative
        assert len(html) < len(js) // 100, (name, len(html))   # plotly.js not embedded
        assert js[:2000] not in html and js[-2000:] not in html
        assert b"Plotly.newPlot" in html


def screenshot(chromium: str, html: Path, png: Path) -> None:
    """Chromium's own --screenshot of an HTML file (virtual time: no race with the clock)."""
    r = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu",
                        "--hide-scrollbars", f"--user-data-dir={png.parent / 'profile'}",
                        "--window-size=320,240", "--virtual-time-budget=10000",
                        f"--screenshot={png}", html.as_uri()],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and png.exists(), r.stderr[-2000:]


def red_pixels(png: Path) -> int:
    w, h, ch, rows = decode_png(png.read_bytes())
    return sum(1 for p in pixels(rows, ch) if p[0] > 200 and p[1] < 60 and p[2] < 60)


def test_a_copied_figures_folder_draws_in_chromium(tmp_path, chromium):
    made = tmp_path / "made" / "figs"
    figures.export({"red": red_figure()}, made, formats="html", log=None)
    copy = tmp_path / "elsewhere" / "figs"
    shutil.copytree(made, copy)
    shutil.rmtree(tmp_path / "made")             # nothing may point back at the original
    html = (copy / "red.html").read_text()
    for src in SCRIPT_SRC.findall(html):
        assert not re.match(r"^(/|[a-z]+:)", src, re.I), src
        assert (copy / src).is_file(), src
    screenshot(chromium, copy / "red.html", tmp_path / "shot.png")
    assert red_pixels(tmp_path / "shot.png") > 500, "the plot is drawn"
    # the same page without its plotly.min.js draws nothing: the check above can fail
    (copy / "plotly.min.js").unlink()
    screenshot(chromium, copy / "red.html", tmp_path / "blank.png")
    assert red_pixels(tmp_path / "blank.png") == 0


def test_bad_html_js_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match=r"--html-js: expected one of directory, embed, got 'cdn'"):
        figures.export({"red": red_figure()}, tmp_path / "figs", formats="html", html_js="cdn")
    assert not (tmp_path / "figs").exists()


def test_without_a_browser_html_is_written_and_one_line_says_how(tmp_path):
    lines: list[str] = []
    out = figures.export({"red": red_figure()}, tmp_path, formats=("png", "html"),
                         browser=str(tmp_path / "no-such-chromium"), log=lines.append)
    assert [p.name for p in out["red"]] == ["red.html"]
    assert not (tmp_path / "red.png").exists()
    assert len(lines) == 1 and "kaleido_get_chrome" in lines[0] and "chromium" in lines[0]


def test_without_any_chromium_the_cli_path_says_one_line(tmp_path):
    # a machine where the search finds no Chromium and the download server cannot be reached
    # (a port bound but not listening refuses at once): exactly one line on stdout
    code = textwrap.dedent(f"""
        import socket, grokhpc.figures as f, plotly.graph_objects as go
        closed = socket.socket(); closed.bind(("127.0.0.1", 0))
        f.find_browser = lambda: None
        f.chrome_source = lambda: ("0", "http://127.0.0.1:%d/chrome.zip" % closed.getsockname()[1])
        f.export({{"x": go.Figure(go.Scatter(y=[1, 2]))}}, {str(tmp_path)!r})
        """)
    env = {k: v for k, v in os.environ.items() if k not in ("BROWSER_PATH", figures.NO_FETCH_ENV)}
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("\n") == 1 and "kaleido_get_chrome" in out.stdout
    assert "none could be fetched (URLError" in out.stdout
    assert (tmp_path / "x.html").exists() and not (tmp_path / "x.png").exists()


# ---- fetching a Chromium into the cache, and finding it there ----------------------------------
@pytest.fixture
def bare_machine(tmp_path, monkeypatch):
    """No Chromium anywhere: no BROWSER_PATH, no Debian package, nothing on PATH, an empty cache
    under tmp_path, no kaleido_get_chrome download; the process has not tried a fetch yet."""
    monkeypatch.delenv("BROWSER_PATH", raising=False)
    monkeypatch.delenv(figures.NO_FETCH_ENV, raising=False)
    monkeypatch.setattr(figures, "SYSTEM_BROWSERS", ())
    (tmp_path / "empty-bin").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(figures, "_kaleido_download_dir", lambda: tmp_path / "kaleido-deps")
    monkeypatch.setattr(figures, "_fetch_failed", [])
    assert figures.find_browser() is None
    assert figures.browser_cache() == tmp_path / "cache" / "grokhpc" / "chrome"
    return tmp_path


def place_chrome(root: Path, target: str) -> Path:
    """A Chrome for Testing layout in ``root`` whose executable links to ``target``."""
    exe = root / "chrome-linux64" / "chrome"
    exe.parent.mkdir(parents=True, exist_ok=True)
    exe.symlink_to(os.path.realpath(target))
    (root / "version_tag.txt").write_text("142.0.7444.175\n1522585")
    return exe


def test_no_browser_and_no_network_writes_html_and_one_line(bare_machine, monkeypatch):
    closed = socket.socket()          # bound, never listening: connections are refused
    closed.bind(("127.0.0.1", 0))
    asked = []

    def source():
        asked.append(1)
        return "0", f"http://127.0.0.1:{closed.getsockname()[1]}/chrome-linux64.zip"

    monkeypatch.setattr(figures, "chrome_source", source)
    monkeypatch.setattr(figures, "download_chrome", lambda root: pytest.fail("no download"))
    for attempt in range(2):
        lines: list[str] = []
        out = figures.export({"red": red_figure()}, bare_machine / "figs", log=lines.append)
        assert [p.name for p in out["red"]] == ["red.html"]
        assert not (bare_machine / "figs" / "red.png").exists()
        assert len(lines) == 1 and "none could be fetched (URLError" in lines[0]
        assert "kaleido_get_chrome" in lines[0] and "chromium-headless-shell" in lines[0]
    assert len(asked) == 1, "one try per process"
    closed.close()


def test_a_server_that_never_answers_is_given_up_after_the_timeout(bare_machine, monkeypatch):
    mute = socket.socket()            # listening, never accepting: the request gets no answer
    mute.bind(("127.0.0.1", 0))
    mute.listen(1)
    monkeypatch.setattr(figures, "chrome_source",
                        lambda: ("0", f"http://127.0.0.1:{mute.getsockname()[1]}/c.zip"))
    monkeypatch.setattr(figures, "FETCH_TIMEOUT", 0.5)
    browser, why = figures.obtain_browser(log=None)
    assert browser is None and "timed out" in why
    mute.close()


def test_no_fetch_when_switched_off(bare_machine, monkeypatch):
    monkeypatch.setenv(figures.NO_FETCH_ENV, "1")
    monkeypatch.setattr(figures, "chrome_source", lambda: pytest.fail("no fetch"))
    assert figures.obtain_browser(log=None) == (None, f"{figures.NO_FETCH_ENV} is set")


def test_a_browser_placed_in_the_cache_is_found_and_renders(bare_machine, chromium):
    root = figures.browser_cache()
    exe = place_chrome(root, chromium)
    assert figures.find_browser() == str(exe)
    tag = (root / "version_tag.txt").read_text()
    (root / "version_tag.txt").unlink()           # a download cut short is not used
    assert figures.find_browser() is None
    (root / "version_tag.txt").write_text(tag)
    lines: list[str] = []
    out = figures.export({"red": red_figure()}, bare_machine / "figs", formats="png", scale=1,
                         log=lines.append)
    assert lines == [] and [p.name for p in out["red"]] == ["red.png"]
    w, h, ch, rows = decode_png((bare_machine / "figs" / "red.png").read_bytes())
    assert (w, h) == (240, 160)
    assert sum(1 for p in pixels(rows, ch) if p[0] > 200 and p[1] < 60 and p[2] < 60) > 50


def test_fetched_once_with_a_message_and_a_progress_bar_then_used(bare_machine, monkeypatch,
                                                                   capsys):
    import http.server
    import threading

    served = bare_machine / "served"
    served.mkdir()
    zip_bytes = b"PK" + bytes(300_000)
    (served / "chrome-linux64.zip").write_bytes(zip_bytes)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **k):
            super().__init__(*a, directory=str(served), **k)

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/chrome-linux64.zip"
    monkeypatch.setattr(figures, "chrome_source", lambda: ("142.0.7444.175", url))
    downloads = []

    def download(root):               # what kaleido's helper does: zip in, unpacked, tag last
        downloads.append(root)
        with open(root / "chrome.zip", "wb") as f:
            for i in range(0, len(zip_bytes), 100_000):
                f.write(zip_bytes[i:i + 100_000])
                f.flush()
        place_chrome(root, str(executable(bare_machine / "unzipped" / "chrome")))
        (root / "chrome.zip").unlink()

    monkeypatch.setattr(figures, "download_chrome", download)
    lines: list[str] = []
    browser, why = figures.obtain_browser(log=lines.append)
    server.shutdown()
    root = figures.browser_cache()
    assert (browser, why) == (str(root / "chrome-linux64" / "chrome"), "")
    assert downloads == [root]
    assert lines[0] == (f"figures: no Chromium found; fetching Chrome for Testing 142.0.7444.175,"
                        f" 0 MB once into {root} (kaleido.get_chrome_sync)")
    assert lines[1].startswith(f"figures: Chromium ready at {browser}")
    bar = capsys.readouterr().err.replace("\r", "\n").splitlines()
    assert any(ln.startswith("Chromium: 100%") and "300k/300k" in ln for ln in bar), bar
    # from then on: found in the cache, here and in a fresh process, with no second download
    assert figures.obtain_browser(log=lines.append) == (browser, "") and len(downloads) == 1
    env = {**os.environ, "XDG_CACHE_HOME": str(bare_machine / "cache")}
    code = ("import grokhpc.figures as f; f.SYSTEM_BROWSERS = (); "
            "f._kaleido_download_dir = lambda: None; print(f.find_browser())")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.stdout.strip() == browser, r.stderr


def test_png_header_check_rejects_wrong_size_and_non_png(tmp_path):
    ihdr = struct.pack(">IIBBBBB", 10, 20, 8, 6, 0, 0, 0)
    png = (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr
           + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr)))
    assert figures.png_size(png) == (10, 20)
    with pytest.raises(figures.ExportError, match="expected 11x20"):
        figures._check("png", png, (11, 20), tmp_path / "x.png")
    with pytest.raises(figures.ExportError, match="not a PNG"):
        figures._check("png", b"GIF89a" + b"\0" * 40, None, tmp_path / "x.png")


def test_bad_arguments_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="--format.*'gif'"):
        figures.parse_formats("png,gif")
    assert figures.parse_formats(" PNG, html,png ") == ("png", "html")
    with pytest.raises(ValueError, match="figure name"):
        figures.export({"../evil": red_figure()}, tmp_path, formats="html")


def test_paper_style_sets_fonts_and_size():
    import plotly.graph_objects as go

    fig = figures.paper_style(go.Figure(go.Scatter(y=[1, 2])), legend_title="weight decay")
    assert (fig.layout.width, fig.layout.height) == (figures.PAPER_WIDTH, figures.PAPER_HEIGHT)
    assert fig.layout.template.layout.font.size == figures.FONT_SIZE
    assert "Liberation Sans" in fig.layout.template.layout.font.family
    assert fig.layout.legend.title.text == "weight decay"


def test_import_is_light():
    code = ("import sys, grokhpc.figures; "
            "print(sorted(m for m in ('torch', 'plotly', 'kaleido', 'transformer_lens') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
