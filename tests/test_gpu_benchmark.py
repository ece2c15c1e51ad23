"""The GPU scripts on a CPU: benchmarks/gpu_batched.py's smoke runs every part to its end, and
benchmarks/gpu_first_contact.py keeps its time limit and its files."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_the_cpu_smoke_of_the_gpu_benchmark_runs_every_part(tmp_path):
    """``gpu_batched.py --device cpu --smoke``: check, speed, fidelity and e2e each end, and the
    table file holds their rows."""
    table = tmp_path / "table.md"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "benchmarks/gpu_batched.py", "--device", "cpu",
                        "--smoke", "--out", str(table)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    text = table.read_text()
    for part in ("check", "speed", "fidelity", "e2e"):
        assert f"\n({part}: " in text, part
    lines = text.splitlines()
    count = next(s for s in lines if s.startswith("checks: "))
    assert " 0 fail" in count and not count.startswith("checks: 0 pass"), count
    assert not any(s.startswith("FAIL ") for s in lines)
    rows = [s for s in lines if s.startswith("| 1 |") or s.startswith("| 2 |")]
    assert len(rows) == 2 and all("nan" not in s.split("|")[2] for s in rows), rows
    assert any(s.startswith("PROJECTION") for s in lines)
    for way in ("alone", "packed graph", "packed graph, TF32"):
        assert any(s.startswith(f"| {way} |") for s in lines), way
    for mode in ("eager", "graph"):
        assert any(s.startswith(f"end to end, R=2, step {mode}") for s in lines), mode


HANGS = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
print("measured so far; grandchild pid", child.pid, flush=True)
time.sleep(600)
"""


def test_first_contact_cuts_a_part_at_its_limit_and_keeps_what_it_wrote(
        tmp_path, monkeypatch):
    """A part that never ends is stopped at its limit with every process it started (its
    process group), the log keeps what it printed, and the summary says it was cut."""
    fc = _load("gpu_first_contact")
    monkeypatch.setattr(fc, "RESERVE_S", 0)
    monkeypatch.setattr(fc, "MIN_PART_S", 0)
    run = fc.Run(tmp_path, limit_s=3.0, cpu=True)
    run.head = "# test"
    fc.run_part(run, "hangs", [sys.executable, "-c", HANGS], 100, dict(os.environ))
    assert run.parts["hangs"].startswith("CUT at its limit")
    log = (tmp_path / "first_contact.log").read_text()
    pid = int(re.search(r"grandchild pid (\d+)", log).group(1))
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and "Z" not in _state(pid):
        assert time.monotonic() < deadline, "the part's child outlived its cut"
        time.sleep(0.1)
    summary = (tmp_path / "summary.md").read_text()
    assert "hangs CUT at its limit" in summary
    fc.run_part(run, "late", [sys.executable, "-c", "print(1)"], 100, dict(os.environ))
    assert run.parts["late"] == "not run (no time left)"


def _state(pid: int) -> str:
    try:
        return next(s for s in Path(f"/proc/{pid}/status").read_text().splitlines()
                    if s.startswith("State:"))
    except (OSError, StopIteration):
        return "Z"


def test_first_contact_without_a_gpu_stops_after_the_prerequisites(
        tmp_path, monkeypatch, capsys):
    """Run blind where torch sees no GPU (and not as a dry run): one line says so, no part
    runs, exit 2, and the summary and log are the only files."""
    import torch

    fc = _load("gpu_first_contact")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert fc.main(["--out", str(tmp_path)]) == 2
    summary = (tmp_path / "summary.md").read_text()
    assert "MISSING GPU: none visible to torch; --cpu runs the dry run" in summary
    assert "not run: a prerequisite is missing" in summary
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first_contact.log", "summary.md"]
    assert "ok numpy" in capsys.readouterr().out   # one line per prerequisite
