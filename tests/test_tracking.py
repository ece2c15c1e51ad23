"""Weights & Biases tracking, offline: off unless asked for (wandb never imported), the setting's
one-line errors, one W&B run per grokhpc run across a SIGKILL and resume with every epoch
logged once, a resume that logs only what its W&B run lacks, and packed runs launched with the
launcher setting.

W&B's own reader (``wandb leet inspect --json``) reads the offline logs; the expected values come
from the run's curves.parquet, measures.parquet and summary.json."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import TINY_RUN
from grokhpc import launch as launch_mod
from grokhpc import tracking
from grokhpc.config import ConfigError, RunConfig
from grokhpc.runtime import JobSettings
from grokhpc.store import RunDir
from grokhpc.sweep import LauncherSettings, parse_launcher, parse_sweep
from grokhpc.train import Trainer, run_training

RUN = {**TINY_RUN, "n_epochs": 120, "device": "cpu"}   # checkpoints every 20 epochs: 7 rows
RUN_SET = [f"--set={k}={v}" for k, v in RUN.items()]
N_CKPT = RUN["n_epochs"] // RUN["checkpoint_every"] + 1


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """Offline, silent, every W&B file under tmp_path; returned as an environment too."""
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_ERROR_REPORTING": "false",
           "WANDB_DIR": str(tmp_path / "wandb-dir"), "WANDB_CONFIG_DIR": str(tmp_path / "wb-cfg"),
           "WANDB_CACHE_DIR": str(tmp_path / "wb-cache"),
           "WANDB_DATA_DIR": str(tmp_path / "wb-data")}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("GROKHPC_WANDB", raising=False)
    return {**os.environ, **env}


def read_log(log: Path) -> list[dict]:
    """Every record of one .wandb log, as wandb's own reader prints them."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_ERROR_REPORTING": "false"}
    r = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(log)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    return [json.loads(ln) for ln in r.stdout.splitlines() if ln.startswith("{")]


def wandb_record(run_dir: Path, run_id: str) -> list[dict]:
    """Per offline folder under run_dir/wandb, oldest first: its run record and history rows;
    ``run_id``: the W&B run's id."""
    out = []
    for folder in sorted((run_dir / "wandb").glob("offline-run-*")):
        (log,) = folder.glob("*.wandb")
        recs = read_log(log)
        runs = [r["run"] for r in recs if r["type"] == "run"]
        rows = [r["history"] for r in recs if r["type"] == "history"]
        summary = {}
        for r in recs:
            if r["type"] == "summary":
                summary.update(r["summary"].get("update", {}))
        out.append({"folder": folder.name, "runs": runs, "summary": summary,
                    "steps": [h["step"]["num"] for h in rows], "items": [h["item"] for h in rows]})
    assert out, f"no offline W&B folder under {run_dir / 'wandb'}"
    for seg in out:   # every folder is the same W&B run
        assert seg["folder"].endswith("-" + run_id)
        assert [r["run_id"] for r in seg["runs"]] == [run_id]
    return out


def assert_history_is_the_run(run_dir: Path, segments: list[dict]) -> None:
    """Every step once over all attempts: epochs 0..n with curves.parquet's values, then one
    row per checkpoint with measures.parquet's; the last attempt has summary.json."""
    run = RunDir(run_dir)
    steps = [s for seg in segments for s in seg["steps"]]
    items = {s: it for seg in segments for s, it in zip(seg["steps"], seg["items"])}
    curves = run.read_curves()
    n = int(curves["epoch"].iloc[-1])
    measures = pq.read_table(run.file("measures.parquet")).to_pylist()
    assert sorted(steps) == steps                                 # attempts follow each other
    assert steps == list(range(n + 1 + len(measures)))           # each step once, none missing
    for e, row in curves.set_index("epoch").iterrows():
        got = items[e]
        assert got["epoch"] == e
        for k in ("train_loss", "train_acc", "test_loss", "test_acc"):
            if math.isnan(row[k]):
                assert k not in got
            else:
                assert got[k] == pytest.approx(row[k], rel=1e-12, abs=0)
    for k, m in enumerate(measures):
        got = items[n + 1 + k]
        assert got["measures/epoch"] == m["epoch"]
        for name in ("restricted_loss", "excluded_loss", "gini_embed", "all_loss"):
            assert got[f"measures/{name}"] == pytest.approx(m[name], rel=1e-12)
    summary = run.read_summary()
    last = segments[-1]["summary"]
    for k in ("final_test_acc", "final_train_loss", "grokked", "key_freqs", "run_id"):
        assert last[k] == summary[k]


# ---- off by default ---------------------------------------------------------------------------
NO_WANDB = """
import io, sys
from grokhpc.config import RunConfig
from grokhpc.train import run_training
from grokhpc import launch
run_training(RunConfig(**{cfg}), sys.argv[1], progress_bar=False, log=lambda *a: None)
launch.launch(sys.argv[2], dry_run=True, executor="local", out=io.StringIO())
print("WANDB", sorted(m for m in sys.modules if m.split(".")[0] == "wandb"))
"""


def test_an_untracked_run_never_imports_wandb(tmp_path, write_spec):
    """Training a run, and even planning a sweep whose launcher names W&B, import no wandb."""
    spec = write_spec({"base": TINY_RUN, "grid": {"model_seed": [1, 2]},
                       "out": str(tmp_path / "sweep"), "launcher": {"wandb": {"project": "grok"}}})
    env = {k: v for k, v in os.environ.items() if k != "GROKHPC_WANDB"}
    code = NO_WANDB.format(cfg={**TINY_RUN, "n_epochs": 20})
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run"), str(spec)],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr
    assert "WANDB []" in r.stdout
    assert RunDir(tmp_path / "run").is_complete() and not (tmp_path / "run" / "wandb").exists()


# ---- the setting -------------------------------------------------------------------------------
def test_the_setting_and_its_one_line_errors(tmp_path):
    spec = "grid: {model_seed: [1]}\nout: sweep\nlauncher:\n  wandb: {project: grok, tags: [wd]}\n"
    sweep = parse_sweep(spec, "s.yaml", cwd=tmp_path)
    assert sweep.launcher.wandb == tracking.WandbSettings("grok", "offline", tags=("wd",))
    assert sweep.launcher.to_dict()["wandb"] == {"project": "grok", "mode": "offline",
                                                 "entity": None, "group": None, "tags": ["wd"]}
    # --set: a whole project, one field of it, or off
    over = parse_sweep(spec, "s.yaml", ["launcher.wandb.mode=online",
                                        "launcher.wandb.entity=lab"], cwd=tmp_path)
    assert over.launcher.wandb == tracking.WandbSettings("grok", "online", "lab", tags=("wd",))
    assert parse_sweep(spec, "s.yaml", ["launcher.wandb=other"],
                       cwd=tmp_path).launcher.wandb == tracking.WandbSettings("other")
    assert parse_sweep(spec, "s.yaml", ["launcher.wandb=null"], cwd=tmp_path).launcher.wandb \
        is None
    assert LauncherSettings().wandb is None and parse_launcher({}, "x").wandb is None
    assert tracking.WandbSettings("grok").with_group("wd_sweep").group == "wd_sweep"
    # the same config in two sweeps: two W&B runs; one run alone: its run_id
    a, b = (tracking.WandbSettings("grok").with_group(g) for g in ("wd_sweep", "my sweep/2"))
    assert tracking.wandb_id(a, "0123abcd") == "wd_sweep-0123abcd"
    assert tracking.wandb_id(b, "0123abcd") == "my-sweep-2-0123abcd"
    assert tracking.wandb_id(tracking.WandbSettings("grok"), "0123abcd") == "0123abcd"
    assert tracking.WandbSettings("grok", group="mine").with_group("wd_sweep").group == "mine"

    bad = {
        "{wandb: {project: grok, mode: cloud}}":
            "s.yaml: launcher.wandb.mode: expected offline | online, got 'cloud'",
        "{wandb: {mode: online}}": "s.yaml: launcher.wandb.project: expected a W&B project "
                                   "name, got none",
        "{wandb: {project: grok, team: x}}":
            "s.yaml: launcher.wandb.team: unknown key (expected one of project, mode, entity, "
            "group, tags)",
        "{wandb: 3}": "s.yaml: launcher.wandb: expected a project name or a mapping with "
                      "project, mode, entity, group, tags, got 3",
        "{wandb: 'a/b'}": "s.yaml: launcher.wandb.project: expected a W&B name (at most 128 "
                          "characters, none of / \\ # ? % :), got 'a/b'",
    }
    for launcher, message in bad.items():
        with pytest.raises(ConfigError) as e:
            parse_sweep(f"grid: {{model_seed: [1]}}\nlauncher: {launcher}\n", "s.yaml",
                        cwd=tmp_path)
        assert str(e.value) == message
    with pytest.raises(ConfigError) as e:
        parse_sweep(spec, "s.yaml", ["launcher.wandb.mode=cloud"], cwd=tmp_path)
    assert str(e.value) == "--set: launcher.wandb.mode: expected offline | online, got 'cloud'"


MISSING = ("import sys; sys.modules['wandb'] = None; from grokhpc.train import main; "
           "sys.exit(main(sys.argv[1:]))")


def test_command_line_errors_are_one_line_and_create_nothing(tmp_path):
    out = tmp_path / "run"
    cases = [
        ([sys.executable, "-m", "grokhpc.train", "--out", str(out), "--wandb", "a/b"],
         "error: --wandb: expected a W&B name (at most 128 characters, none of / \\ # ? % :), "
         "got 'a/b'\n"),
        ([sys.executable, "-c", MISSING, "--out", str(out), "--wandb", "grok"],
         "error: --wandb: wandb is not installed; pip install -e '.[wandb]' (or pip install "
         "wandb)\n"),
    ]
    for cmd, message in cases:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert (r.returncode, r.stderr) == (2, message)
        assert not out.exists()


# ---- one W&B run per grokhpc run, across a SIGKILL ---------------------------------------------
HOLDER = """
import sys, time
from grokhpc import train, tracking
commit = train.Trainer.commit
def flushed(self):                     # wandb writes its log in the background: wait until the
    for _ in range(600):               # run record is on disk, so the kill finds this attempt
        for log in tracking.segments(self.run.path, self.cfg.run_id):   # named in its log
            if any(r.get("type") == "run" for r in tracking.read_records(log)):
                return
        time.sleep(0.2)
def held(self, checkpoint, state=None):  # after the commit at epoch 60 (and its W&B rows): wait
    commit(self, checkpoint, state)
    if self.epoch == 60:
        flushed(self)
        print("committed", self.epoch, flush=True)
        sys.stdin.readline()
train.Trainer.commit = held
sys.exit(train.main(sys.argv[1:]))
"""


def test_sigkill_then_resume_continues_the_same_wandb_run(tmp_path, wandb_env):
    out = tmp_path / "run"
    run_id = RunConfig(**RUN).run_id
    args = ["--out", str(out), "--no-progress", "--wandb", "grokhpc-test", *RUN_SET]
    sync = f"upload with: wandb sync {out / 'wandb' / 'offline-run-*'}"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, *args, "--state-every", "0"],
                              stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=wandb_env)
    try:
        lines = []
        while not lines or not lines[-1].startswith("committed"):
            line = holder.stdout.readline()
            assert line, f"the trainer ended early: {''.join(lines)}"
            lines.append(line)
        assert lines[-1] == "committed 60\n"
        assert sum(sync in ln for ln in lines) == 1        # the sync command, printed once
    finally:
        holder.kill()                                      # SIGKILL, mid-run
        holder.wait()
    assert RunDir(out).read_progress()["epoch"] == 60

    done = subprocess.run([sys.executable, "-m", "grokhpc.train", *args], capture_output=True,
                          text=True, timeout=600, env=wandb_env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "resuming at epoch 60/120" in done.stdout and done.stdout.count(sync) == 1
    assert RunDir(out).read_config()["run_id"] == run_id   # the run_id did not change

    segments = wandb_record(out, run_id)
    assert len(segments) == 2                              # one folder per attempt, one run
    assert segments[0]["runs"][0]["project"] == "grokhpc-test"
    assert_history_is_the_run(out, segments)
    # the resumed attempt starts right after the last row the killed one got to its log
    first = segments[0]["steps"]
    assert segments[1]["steps"][0] == (first[-1] + 1 if first else 0) <= 60
    print(f"killed attempt's W&B log: {len(first)} rows; resumed attempt: steps "
          f"{segments[1]['steps'][0]}..{segments[1]['steps'][-1]}")


def test_an_unreadable_wandb_log_leaves_the_run_untracked_with_one_warning(tmp_path,
                                                                          wandb_env):
    out = tmp_path / "run"
    cfg = {**RUN, "n_epochs": 20}
    run_id = RunConfig(**cfg).run_id
    damaged = out / "wandb" / f"offline-run-20260101_000000-{run_id}" / f"run-{run_id}.wandb"
    damaged.parent.mkdir(parents=True)
    damaged.write_bytes(b"not a W&B log" * 10)
    r = subprocess.run([sys.executable, "-m", "grokhpc.train", "--out", str(out), "--no-progress",
                        "--wandb", "grokhpc-test", *[f"--set={k}={v}" for k, v in cfg.items()]],
                       capture_output=True, text=True, timeout=600, env=wandb_env)
    assert r.returncode == 0 and RunDir(out).is_complete()
    warnings = [ln for ln in r.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1, r.stderr
    assert warnings[0].startswith(f"warning: run {run_id}: W&B tracking could not start "
                                  f"(TrackingError: {damaged}: cannot read the W&B log")
    assert warnings[0].endswith("training goes on untracked")
    assert [p.name for p in (out / "wandb").iterdir()] == [damaged.parent.name]


def test_a_resume_logs_only_the_epochs_its_wandb_run_lacks(tmp_path, wandb_env, monkeypatch):
    """Tracked to epoch 40, untracked to 80, tracked to the end: the last attempt logs 40 on
    (not from 80, which would leave a gap, nor from 0, which would log epochs twice)."""
    out = tmp_path / "run"
    cfg = RunConfig(**RUN)
    tracked = JobSettings(wandb=tracking.WandbSettings("grokhpc-test").to_dict())
    t = Trainer.open(cfg, out, settings=tracked)
    t.fit(progress_bar=False, until=40)
    t.close()
    t = Trainer.open(cfg, out)
    assert t.tracker is None
    t.fit(progress_bar=False, until=80)
    t.close()
    run_training(cfg, out, tracked, progress_bar=False, log=lambda *a: None)
    assert "GROKHPC_WANDB" not in os.environ

    segments = wandb_record(out, cfg.run_id)
    assert [s["steps"][0] for s in segments] == [0, 40]
    assert segments[0]["steps"] == list(range(40))
    assert_history_is_the_run(out, segments)


# ---- the launcher setting, packed runs -------------------------------------------------------
def test_packed_runs_launched_with_the_setting_are_tracked_run_by_run(tmp_path, wandb_env,
                                                                      write_spec, capsys):
    out = tmp_path / "sweep"
    spec = write_spec({"base": {**TINY_RUN, "n_epochs": 60}, "grid": {"model_seed": [1, 2]},
                       "out": str(out), "launcher": {"executor": "local", "runs_per_job": 2,
                                                     "time": 20,
                                                     "wandb": {"project": "grokhpc-test"}}})
    assert launch_mod.main([str(spec)]) == 0
    printed = capsys.readouterr().out
    sync = f"wandb sync {out / 'runs' / '*' / 'wandb' / 'offline-run-*'}"
    assert printed.count(sync) == 1
    assert "GROKHPC_WANDB" not in os.environ                 # the launch left the environment be
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["launcher"]["wandb"]["project"] == "grokhpc-test"
    ids = [r["run_id"] for r in manifest["runs"]]
    (log,) = (out / "jobs").glob("*/*_log.out")
    text = log.read_text()
    assert "training 2 runs together" in text             # packed: grokhpc.train_batched
    assert text.count("upload with: wandb sync") == 1     # once per job, not per run
    for rid in ids:   # the W&B id: the sweep's name, then the run_id
        segments = wandb_record(out / "runs" / rid, f"sweep-{rid}")
        assert segments[0]["runs"][0]["display_name"] == rid
        assert len(segments) == 1
        assert segments[0]["runs"][0]["run_group"] == "sweep"   # grouped by the sweep
        assert_history_is_the_run(out / "runs" / rid, segments)
