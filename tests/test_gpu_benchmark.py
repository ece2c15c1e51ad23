"""The GPU scripts on a CPU: benchmarks/gpu_batched.py's smoke runs every part to its end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


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
