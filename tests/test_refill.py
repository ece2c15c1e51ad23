"""Refill: a packed job whose runs stop early trains waiting runs of its sweep (grokhpc.refill).

Which runs grok, and when, is set by a hook on ``Stack.evaluate`` (the runs named in GROKS log
100% test accuracy from epoch GROK_AT on), in packed and solo training alike: the moment is
chosen, never raced. Every expectation about a run's files is the same run trained alone
(``run_training``) under the same hook, bit for bit (exact mode on the CPU).
"""

from __future__ import annotations

import contextlib
import io
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from grokhpc import job as job_mod
from grokhpc.config import ConfigError, RunConfig, from_dict, to_dict
from grokhpc.launch import main as launch_main
from grokhpc.runtime import JobSettings
from grokhpc.scheduler import write_manifest
from grokhpc.stack import Stack
from grokhpc.store import RunDir
from grokhpc.sweep import parse_launcher
from grokhpc.train import Trainer, run_training
from test_train_batched import compare_runs

TINY = dict(p=11, train_frac=0.5, d_model=32, n_heads=4, d_head=8, d_mlp=64, n_epochs=60,
            checkpoint_every=20, eval_every=10, lr=3e-3, device="cpu", stop_after_grok=5)
GROK_AT = 20   # a run of GROKS groks here and stops at 25, of n_epochs 60
SETTINGS = JobSettings(threads=1, refill=True)
QUIET = dict(progress_bar=False, log=lambda *a: None)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def sweep_runs(root: Path, n: int) -> list[RunConfig]:
    """A sweep of ``n`` runs of one shape as a launch leaves it: manifest.json and each run's
    config.json in ``root/runs/<run_id>``."""
    cfgs = [from_dict({**TINY, "model_seed": i, "data_seed": 10 + i}) for i in range(n)]
    for c in cfgs:
        RunDir(root / "runs" / c.run_id).create({**to_dict(c), "run_id": c.run_id})
    write_manifest(root, {"runs": [{"run_id": c.run_id, "dir": f"runs/{c.run_id}"}
                                   for c in cfgs], "launches": []})
    return cfgs


def job_of(root: Path, cfgs) -> list[tuple[dict, str]]:
    return [(to_dict(c), str(root / "runs" / c.run_id)) for c in cfgs]


@pytest.fixture
def groks(monkeypatch):
    """groks(*cfgs): those runs grok at GROK_AT, in any stack (packed or solo)."""
    ids: set[str] = set()
    original = Stack.evaluate

    def evaluate(self, runs=None, train_runs=(), collapse_runs=()):
        original(self, runs, train_runs, collapse_runs)
        for r, t in enumerate(self.trainers):
            if t.cfg.run_id in ids and self.epoch >= GROK_AT and (runs is None or r in runs):
                self.curves["test_acc"][r, self.epoch] = 1.0
                self.note_grok()
    monkeypatch.setattr(Stack, "evaluate", evaluate)
    return lambda *cfgs: ids.update(c.run_id for c in cfgs)


def solo(cfgs, root: Path) -> dict[str, Path]:
    """Each run trained alone (under the same grok hook): the reference."""
    for c in cfgs:
        run_training(c, root / c.run_id, **QUIET)
    return {c.run_id: root / c.run_id for c in cfgs}


def attempts(root: Path, c: RunConfig) -> int:
    return len(RunDir(root / "runs" / c.run_id).read_progress()["attempts"])


def test_a_job_whose_runs_stop_early_trains_the_waiting_runs_equal_to_solo(tmp_path, groks):
    """Job 1 of runs 0-3 (0 and 1 grok, stopping at 25) refills with the waiting runs 4 and 5
    of job 2 (4 groks too, freeing a slot again: none is left); all six end complete and equal
    to their solo runs, each trained once (one attempt). Job 2 then finds its runs complete
    and trains nothing: their files are unchanged."""
    root = tmp_path / "sweep"
    cfgs = sweep_runs(root, 6)
    groks(cfgs[0], cfgs[1], cfgs[4])
    said: list[str] = []
    results = job_mod.train_runs(job_of(root, cfgs[:4]), SETTINGS, log=said.append)
    assert [r["complete"] for r in results] == [True] * 4
    claimed = [s for s in said if s.startswith("refill:")]
    assert len(claimed) == 1 and cfgs[4].run_id in claimed[0] and cfgs[5].run_id in claimed[0]
    for c in cfgs:
        assert attempts(root, c) == 1, c.run_id
    ref = solo(cfgs, tmp_path / "solo")
    for c in cfgs:
        assert compare_runs(root / "runs" / c.run_id, ref[c.run_id], rel=0.0) == \
            {"abs": 0.0, "rel": 0.0}
    epochs = [RunDir(root / "runs" / c.run_id).read_progress()["epoch"] for c in cfgs]
    assert epochs == [25, 25, 60, 60, 25, 60]
    before = {c.run_id: (root / "runs" / c.run_id / "progress.json").read_bytes()
              for c in cfgs[4:]}
    said.clear()
    results = job_mod.train_runs(job_of(root, cfgs[4:]), SETTINGS, log=said.append)
    assert [r["complete"] for r in results] == [True, True]
    assert not any("together" in s or s.startswith("run ") for s in said), said
    for c in cfgs[4:]:
        assert (root / "runs" / c.run_id / "progress.json").read_bytes() == before[c.run_id]


def test_refill_off_leaves_the_waiting_runs_to_their_own_job(tmp_path, groks):
    root = tmp_path / "sweep"
    cfgs = sweep_runs(root, 3)
    groks(cfgs[0])
    job_mod.train_runs(job_of(root, cfgs[:2]), SETTINGS.replace(refill=False), log=print)
    assert not RunDir(root / "runs" / cfgs[2].run_id).file("progress.json").exists()
    assert all(RunDir(root / "runs" / c.run_id).is_complete() for c in cfgs[:2])


def test_a_claimed_run_that_cannot_be_opened_fails_alone(tmp_path, groks, monkeypatch):
    """Waiting run 2's state cannot be read (Trainer.open raises for it): it gets its
    error.txt with the reason, is not claimed again, and the group trains on to the end."""
    root = tmp_path / "sweep"
    cfgs = sweep_runs(root, 3)
    groks(cfgs[0])
    opener = Trainer.open.__func__

    def open_(cls, cfg, out, *a, **kw):
        if cfg.run_id == cfgs[2].run_id:
            raise RuntimeError("state.pt: unreadable (test)")
        return opener(cls, cfg, out, *a, **kw)
    monkeypatch.setattr(Trainer, "open", classmethod(open_))
    said: list[str] = []
    results = job_mod.train_runs(job_of(root, cfgs[:2]), SETTINGS, log=said.append)
    assert [r["complete"] for r in results] == [True, True]
    error = RunDir(root / "runs" / cfgs[2].run_id).read_error()
    assert error is not None and error.strip().endswith("RuntimeError: state.pt: unreadable (test)")
    assert sum(s.startswith("refill:") for s in said) == 1


HOLD = ("import sys; from grokhpc.store import RunDir, lock_run; "
        "lock = lock_run(RunDir(sys.argv[1])); print('locked', flush=True); sys.stdin.read()")


def test_a_run_another_process_holds_is_never_claimed_nor_waited_for(tmp_path, groks):
    """Another process holds waiting run 3's lock (until the test closes its stdin): job 1
    (runs 0-1, run 0 groks) refills with run 2 only; job 2 (runs 2-3) finds run 2 complete and
    run 3 locked, skips both without waiting and fails nothing; run 3 is untouched."""
    root = tmp_path / "sweep"
    cfgs = sweep_runs(root, 4)
    groks(cfgs[0])
    held = root / "runs" / cfgs[3].run_id
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(held)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        said: list[str] = []
        job_mod.train_runs(job_of(root, cfgs[:2]), SETTINGS, log=said.append)
        assert RunDir(root / "runs" / cfgs[2].run_id).is_complete()
        assert sorted(p.name for p in held.iterdir()) == ["config.json"]
        said.clear()
        results = job_mod.train_runs(job_of(root, cfgs[2:]), SETTINGS, log=said.append)
        assert [r["complete"] for r in results] == [True, False]
        assert [r["error"] for r in results] == [None, None]
        assert any(f"run {cfgs[3].run_id} skipped" in s for s in said), said
        assert sorted(p.name for p in held.iterdir()) == ["config.json"]
        assert proc.poll() is None   # it held the run all along
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)
    assert attempts(root, cfgs[2]) == 1


class Requeued(SystemExit):
    """What submitit's USR2 handler does: end the job's attempt (it requeues the job)."""


def test_a_refilled_run_interrupted_resumes_in_the_requeued_job_equal_to_solo(
        tmp_path, groks, monkeypatch):
    """Job 1 (runs 0-1; run 0 groks) refills with run 3 (the sweep's last runs first). SLURM's
    warning (USR2) comes when run 3 commits its row at epoch 20 (while catching up to 25): its
    state is written at 21 and the attempt ends. The requeued job (the same runs) refills
    again and takes run 3 before run 2 (it has state), resuming it at 21; job 2 then trains
    run 2. Every run ends equal to its solo run, none twice."""
    root = tmp_path / "sweep"
    cfgs = sweep_runs(root, 4)
    groks(cfgs[0])
    commit = Trainer.commit

    def warned(self, checkpoint, state=None):
        commit(self, checkpoint, state)
        if self.cfg.run_id == cfgs[3].run_id and self.epoch == 20 and checkpoint:
            signal.raise_signal(signal.SIGUSR2)
    monkeypatch.setattr(Trainer, "commit", warned)

    def requeue(*_):
        raise Requeued()
    previous = signal.signal(signal.SIGUSR2, requeue)
    try:
        with pytest.raises(Requeued):
            job_mod.train_runs(job_of(root, cfgs[:2]), SETTINGS.replace(state_every_s=0.0),
                               log=lambda *a: None)
    finally:
        signal.signal(signal.SIGUSR2, previous)
    run3 = RunDir(root / "runs" / cfgs[3].run_id)
    assert run3.read_progress()["state_epoch"] == 21 and not run3.is_complete()
    assert not RunDir(root / "runs" / cfgs[2].run_id).file("progress.json").exists()
    monkeypatch.setattr(Trainer, "commit", commit)
    said: list[str] = []
    job_mod.train_runs(job_of(root, cfgs[:2]), SETTINGS.replace(state_every_s=0.0),
                       log=said.append)
    assert any(f"run {cfgs[3].run_id}: resuming at epoch 21/60" in s for s in said), said
    assert not RunDir(root / "runs" / cfgs[2].run_id).file("progress.json").exists(), said
    job_mod.train_runs(job_of(root, cfgs[2:]), SETTINGS, log=lambda *a: None)
    ref = solo(cfgs, tmp_path / "solo")
    for c in cfgs:
        d = root / "runs" / c.run_id
        assert RunDir(d).is_complete()
        assert compare_runs(d, ref[c.run_id], rel=0.0) == {"abs": 0.0, "rel": 0.0}


def test_refill_setting_is_checked_in_one_line():
    assert parse_launcher({"refill": True}, "s.yaml").refill is True
    assert parse_launcher({}, "s.yaml").refill is False and JobSettings().refill is False
    with pytest.raises(ConfigError) as e:
        parse_launcher({"refill": "yes"}, "s.yaml")
    assert str(e.value) == "s.yaml: launcher.refill: expected true or false, got 'yes'"
    with pytest.raises(ConfigError) as e:
        JobSettings(refill=1)
    assert str(e.value) == "job settings: refill: expected true or false, got 1"


# ---- the launcher: the plan says it; CPU runs ask for no GPU -------------------------------------
def spec_of(write_spec, tmp_path, **launcher):
    return write_spec({"base": dict(TINY), "grid": {"model_seed": [1, 2, 3, 4]},
                       "out": str(tmp_path / "out"),
                       "launcher": {"runs_per_job": 2, "refill": True, **launcher}})


def dry_run(spec, *args) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert launch_main([str(spec), "--dry-run", *args]) == 0
    return buf.getvalue()


def test_the_plan_says_refill_where_runs_wait_and_stop_after_grokking(write_spec, tmp_path):
    """Two packed jobs, one at a time: the second's runs wait, so the plan says the jobs take
    them; with refill off, with every job at once (nothing waits) or without stop_after_grok
    it says nothing."""
    line = "  refill: runs stop after grokking (stop_after_grok) and each packed job takes"
    one = ("--cluster", "bouchet", "--set", "launcher.array_parallelism=1")
    assert line in dry_run(spec_of(write_spec, tmp_path), *one)
    assert line not in dry_run(spec_of(write_spec, tmp_path, refill=False), *one)
    assert line not in dry_run(spec_of(write_spec, tmp_path), "--cluster", "bouchet", "--set",
                               "launcher.array_parallelism=2")
    assert line not in dry_run(spec_of(write_spec, tmp_path), *one, "--set",
                               "stop_after_grok=null")


def test_cpu_runs_ask_a_cluster_for_no_gpu_unless_the_spec_says_gpus(write_spec, tmp_path):
    """Runs on device cpu take the profile's CPU partition and no GPU; gpus set in the spec
    still wins."""
    out = dry_run(spec_of(write_spec, tmp_path), "--cluster", "bouchet")
    assert "#SBATCH --partition=day" in out and "gpus" not in out.split("sbatch script")[1]
    out = dry_run(spec_of(write_spec, tmp_path, gpus=1), "--cluster", "bouchet")
    assert "'gpus': 'h100:1'" in out
