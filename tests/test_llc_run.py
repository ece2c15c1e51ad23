"""The LLC per checkpoint as an opt-in measure after training: which checkpoints, the spec's
llc section, resuming after a kill (the moment chosen by a file, not a clock), the columns it
writes into measures.parquet, and the sweep figure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest

from grokhpc.config import ConfigError, from_dict
from grokhpc.llc import LLCError, LLCRequest
from grokhpc.store import RunDir

ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}
TINY = dict(p=7, n_heads=2, d_model=16, d_head=8, d_mlp=24, n_epochs=4, checkpoint_every=1,
            eval_every=1, device="cpu")

# A stand-in for the SGLD estimate: a known function of the checkpoint row; each call drops a
# file in CALLS, and the call numbered in KILL_AT (when that file exists) kills the process.
FAKE = textwrap.dedent("""
    import os, signal, sys, types
    import numpy as np
    import grokhpc.llc as llc
    from grokhpc.llc_run import main

    calls, kill_at = sys.argv[1], sys.argv[2]

    def fake(cfg, row, settings, device="cpu", progress=False):
        n = len(os.listdir(calls)) + 1
        open(os.path.join(calls, str(n)), "w").close()
        if os.path.exists(kill_at) and int(open(kill_at).read()) == n:
            os.kill(os.getpid(), signal.SIGKILL)
        v = float(np.square(np.asarray(row, np.float64)).sum())
        return types.SimpleNamespace(llc_mean=v, llc_std=v / 100, llc_per_chain=(v, v),
                                     init_loss=1.0)

    llc.checkpoint_llc = fake
    sys.exit(main(sys.argv[3:]))
""")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from grokhpc.train import run_training

    path = tmp_path_factory.mktemp("llc") / "run"
    run_training(from_dict(TINY), path, progress_bar=False, log=lambda *_: None)
    return RunDir(path)


def fake_llc(tmp_path, run_path, *args, kill_at=None):
    calls = tmp_path / "calls"
    calls.mkdir(exist_ok=True)
    kill = tmp_path / "kill_at"
    if kill_at is None:
        kill.unlink(missing_ok=True)
    else:
        kill.write_text(str(kill_at))
    before = len(os.listdir(calls))
    r = subprocess.run([sys.executable, "-c", FAKE, str(calls), str(kill), str(run_path), *args],
                       capture_output=True, text=True, env=ONE_THREAD)
    return r, len(os.listdir(calls)) - before


def expected(run: RunDir) -> dict[int, float]:
    epochs, rows = run.checkpoints(mmap=False)
    return {e: float(np.square(rows[i].astype(np.float64)).sum()) for i, e in enumerate(epochs)}


def test_which_checkpoints():
    epochs = [0, 10, 20, 30, 40, 50]
    assert LLCRequest(every=2).epochs(epochs) == [0, 20, 40, 50]        # the last always
    assert LLCRequest(every=1).epochs(epochs) == epochs
    ep = list(range(0, 10_001, 10))
    # 4 points evenly in log epoch from the first positive epoch to the last, and epoch 0
    assert LLCRequest(log_points=4).epochs(ep) == [0, 10, 100, 1000, 10_000]
    # targets 10, 56.2, 316, 1778, 10000 land on the nearest checkpoint in log epoch
    assert LLCRequest(log_points=5).epochs(ep) == [0, 10, 60, 320, 1780, 10_000]


@pytest.mark.parametrize("section, match", [
    ("{every: 0}", "llc: every: expected an integer >= 1, got 0"),
    ("{log_points: 1}", "llc: log_points: expected an integer >= 2, got 1"),
    ("{every: 2, log_points: 5}", "llc: every, log_points: expected one of the two"),
    ("{chains: two}", "llc: chains: expected an integer >= 1, got 'two'"),
    ("{epsilon: -1}", "llc: epsilon: expected a positive step size, got -1"),
    ("{draws: 400, temperature: 1}", "llc: temperature: unknown LLC setting"),
    ("[1, 2]", "llc: expected a mapping of LLC settings, got list"),
])
def test_bad_llc_section_is_one_line_naming_the_spec_and_field(section, match):
    from grokhpc.sweep import parse_sweep

    text = f"base: {{p: 7}}\ngrid: {{lr: [0.001]}}\nout: x\nllc: {section}\n"
    with pytest.raises(ConfigError) as e:
        parse_sweep(text, "spec.yaml")
    assert str(e.value).startswith("spec.yaml: ") and match in str(e.value)
    assert "\n" not in str(e.value)


def test_llc_section_leaves_run_ids_as_they_were():
    from grokhpc.sweep import parse_sweep

    text = "base: {p: 7}\ngrid: {lr: [0.001, 0.003]}\nout: x\n"
    plain = parse_sweep(text, "spec.yaml")
    with_llc = parse_sweep(text + "llc: {log_points: 8, chains: 2}\n", "spec.yaml")
    assert [r.config.run_id for r in plain.runs] == [r.config.run_id for r in with_llc.runs]
    assert with_llc.llc == {"log_points": 8, "chains": 2} and plain.llc is None


def test_a_killed_estimate_resumes_where_it_stopped(tmp_path, tiny_run):
    """Killed (SIGKILL) on the 3rd checkpoint: the first two stay committed in llc.json and in
    measures.parquet; the rerun estimates only the three left, and the values are the
    stand-in's of each checkpoint."""
    want = expected(tiny_run)
    r, n = fake_llc(tmp_path, tiny_run.path, "--every", "1", kill_at=3)
    assert r.returncode == -9 and n == 3
    est = json.loads(tiny_run.file("llc.json").read_text())["estimates"]
    assert sorted(map(int, est)) == [0, 1]
    m = pd.read_parquet(tiny_run.file("measures.parquet")).set_index("epoch")
    assert m["llc"].notna().tolist() == [True, True, False, False, False]
    r, n = fake_llc(tmp_path, tiny_run.path, "--every", "1")
    assert r.returncode == 0, r.stderr
    assert n == 3
    est = json.loads(tiny_run.file("llc.json").read_text())["estimates"]
    assert {int(e): v["llc"] for e, v in est.items()} == pytest.approx(want, rel=1e-12)
    m = pd.read_parquet(tiny_run.file("measures.parquet")).set_index("epoch")
    assert m["llc"].to_dict() == pytest.approx(want, rel=1e-12)
    assert m["llc_std"].to_dict() == pytest.approx({e: v / 100 for e, v in want.items()})
    r, n = fake_llc(tmp_path, tiny_run.path, "--every", "1")       # all there: nothing to do
    assert r.returncode == 0 and n == 0

    # other settings are refused in one line, and --restart starts over
    r, n = fake_llc(tmp_path, tiny_run.path, "--every", "1", "--chains", "2")
    assert r.returncode == 2 and n == 0
    assert r.stderr.count("\n") == 1 and "chains 4 there, 2 asked" in r.stderr
    assert "--restart" in r.stderr
    r, n = fake_llc(tmp_path, tiny_run.path, "--every", "2", "--chains", "2", "--restart")
    assert r.returncode == 0 and n == 3                              # epochs 0, 2, 4

    # recomputing the measures keeps the LLC columns
    from grokhpc import measures

    measures.finalize_run(tiny_run)
    m = pd.read_parquet(tiny_run.file("measures.parquet")).set_index("epoch")
    assert m["llc"].notna().tolist() == [True, False, True, False, True]
    assert m.loc[2, "llc"] == pytest.approx(want[2], rel=1e-12)

    # analyze draws the estimated checkpoints, with their spread over chains
    from grokhpc.analyze import build_figures

    fig = build_figures(tiny_run)["llc_over_training"]
    assert list(fig.data[0].x) == [0, 2, 4]
    assert list(fig.data[0].error_y.array) == pytest.approx([want[e] / 100 for e in (0, 2, 4)])


def test_a_run_not_done_is_refused_and_left_alone(tmp_path):
    from grokhpc.train import run_training

    run_training(from_dict({**TINY, "n_epochs": 2}), tmp_path / "run", progress_bar=False,
                 log=lambda *_: None)
    run = RunDir(tmp_path / "run")
    run.file("summary.json").unlink()
    r, n = fake_llc(tmp_path, run.path)
    assert r.returncode == 2 and n == 0 and "not done yet" in r.stderr
    assert not run.file("llc.json").exists()


def test_devinterp_estimate_lands_in_the_columns(tmp_path, tiny_run):
    """One real (tiny) SGLD estimate through devinterp: finite, one value per chain, their
    population std in llc_std."""
    from grokhpc.llc import LLCSettings
    from grokhpc.llc_run import estimate_run

    run = RunDir(tmp_path / "copy")
    import shutil

    shutil.copytree(tiny_run.path, run.path)
    run.file("llc.json").unlink(missing_ok=True)
    req = LLCRequest(LLCSettings(chains=2, draws=4, burn_in=2), every=4)
    data = estimate_run(run, req, log=lambda *_: None)
    assert sorted(map(int, data["estimates"])) == [0, 4]
    for rec in data["estimates"].values():
        chains = rec["llc_per_chain"]
        assert len(chains) == 2 and np.isfinite(chains).all()
        assert rec["llc_std"] == pytest.approx(float(np.std(chains)), rel=1e-12)
    m = pd.read_parquet(run.file("measures.parquet")).set_index("epoch")
    assert m.loc[4, "llc"] == pytest.approx(data["estimates"]["4"]["llc"])


def test_llc_aligned_figure_draws_only_estimated_checkpoints():
    import pyarrow as pa

    from grokhpc.sweep_figures import llc_aligned_figure

    fin = pd.DataFrame({"run_id": ["a", "b"], "grokking_epoch": [100, 300],
                        "grokked": [True, False]})
    ck = pa.table({"run_id": ["a"] * 3 + ["b"] * 3, "epoch": [0, 100, 200] * 2,
                   "llc": [1.0, None, 3.0, 4.0, 5.0, None],
                   "llc_std": [0.1] * 6, "test_loss": [1.0] * 6})
    fig = llc_aligned_figure(fin, ck, None)
    xs = sorted(x for t in fig.data if t.yaxis in ("y", None) and t.x is not None
                for x in t.x if x is not None and not np.isnan(x))
    assert xs == [-300, -200, -100, 100]              # since grokking: a at 0, 200; b at 0, 100
    assert llc_aligned_figure(fin, ck.drop(["llc"]), None) is None
    with pytest.raises(LLCError):
        LLCRequest.from_mapping({"every": 1.5})


@pytest.mark.parametrize("flag, said", [("chains=0", "--llc: chains: expected an integer >= 1"),
                                        ("chain", "--llc: expected KEY=VALUE items"),
                                        ("every=2,log_points=3", "expected one of the two")])
def test_analyze_llc_flag_refuses_bad_settings_in_one_line(tiny_run, capsys, flag, said):
    from grokhpc.analyze import main

    assert main([str(tiny_run.path), "--llc", flag, "--format", "html"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and said in err
