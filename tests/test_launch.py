"""The launcher: dry runs (exact sbatch parameters, nothing written), the local executor end to
end on a tiny sweep (aggregated at the end), relaunch skipping finished runs, a job whose one run
fails, the SLURM aggregation job (its partition, its dependency, its replacement on relaunch,
through sbatch/squeue/scancel scripts), and ``python -m grokhpc.aggregate`` with no argument."""

import io
import json
import os
import shutil
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY_RUN
from grokhpc import job as job_mod
from grokhpc import launch as launch_mod
from grokhpc import submit as submit_mod
from grokhpc.config import ConfigError, RunConfig, to_dict
from grokhpc.runtime import JobSettings
from grokhpc.store import RunDir
from grokhpc.sweep import load_sweep


def test_entry_points_import_no_torch():
    code = ("import sys, grokhpc.launch, grokhpc.status, grokhpc.sweep; "
            "print(sorted(m for m in ('torch', 'transformer_lens') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]"
    for mod in ("grokhpc.launch", "grokhpc.status"):
        r = subprocess.run([sys.executable, "-m", mod, "--help"], capture_output=True, text=True)
        assert r.returncode == 0 and "usage:" in r.stdout


def test_dry_run_bouchet_prints_sbatch_parameters_and_writes_nothing(write_spec, tmp_path):
    spec = write_spec({"base": {"p": 113}, "grid": {"weight_decay": [0.3, 1.0],
                                                     "model_seed": [1, 2, 3]},
                       "out": str(tmp_path / "sweep"),
                       "launcher": {"partition": "gpu_h200", "gpu_type": "h200", "gpus": 1,
                                    "time": "1-00:00:00", "array_parallelism": 4,
                                    "extra": {"account": "lab"}}})
    buf = io.StringIO()
    plan = launch_mod.launch(str(spec), cluster="bouchet", dry_run=True, out=buf)
    text = buf.getvalue()
    assert not (tmp_path / "sweep").exists()
    assert plan["executor"] == "slurm" and len(plan["groups"]) == 6
    lines = set(text.splitlines())
    for flag in ("--partition=gpu_h200", "--gpus=h200:1", "--time=1440", "--requeue",
                 "--array=0-5%4", "--account=lab", "--cpus-per-task=2", "--mem=16GB",
                 "--signal=USR2@90", "--open-mode=append"):
        assert f"#SBATCH {flag}" in lines, flag
    assert any(f"--output={tmp_path / 'sweep' / 'jobs'}" in ln for ln in lines)
    assert "preemptable" not in text
    # six runs listed with their ids and axis values
    rows = [ln.split() for ln in text.splitlines() if re.match(r"^\d+\s+[0-9a-f]{12}\s", ln)]
    assert sorted((r[2], r[3]) for r in rows) == sorted(
        (wd, s) for wd in ("0.3", "1") for s in ("1", "2", "3"))
    assert {r[1] for r in rows} == {r.run_id for r in plan["sweep"].runs}
    assert all(r[4:] == ["pending", "submit"] for r in rows)
    # a preemptable partition says so; time beyond the partition's limit is refused
    buf = io.StringIO()
    launch_mod.launch(str(spec), cluster="bouchet", dry_run=True, out=buf,
                      overrides=["launcher.partition=scavenge_gpu", "launcher.gpu_type=h100",
                                 "launcher.time=60"])
    assert "preemptable" in buf.getvalue()
    assert launch_mod.main([str(spec), "--cluster", "bouchet", "--dry-run",
                            "--set", "launcher.time=3000"]) == 2


def test_cli_errors_are_one_line(write_spec, capsys):
    spec = write_spec("grid: {p: [11, 12]}\n")
    assert launch_mod.main([str(spec), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(spec) in err and "p" in err and "prime" in err


def test_damaged_run_directories_are_left_alone_or_refused(write_spec, tmp_path, capsys):
    """An unreadable progress.json: the run is corrupt, listed and not submitted; an unreadable
    config.json (whose run is it?): the launch stops with one line naming it."""
    spec = write_spec({"base": {"p": 11, "n_epochs": 10}, "grid": {"model_seed": [1, 2]},
                       "out": str(tmp_path / "sweep"), "launcher": {"executor": "local"}})
    ok, bad = load_sweep(spec).runs
    RunDir(bad.dir).create({**to_dict(bad.config), "run_id": bad.run_id})
    RunDir(bad.dir).file("progress.json").write_bytes(b"\xff\xfe\x00\x01")
    buf = io.StringIO()
    plan = launch_mod.launch(str(spec), dry_run=True, out=buf)
    assert plan["state"] == {ok.run_id: "pending", bad.run_id: "corrupt"}
    assert [[r.run_id for r in g] for g in plan["groups"]] == [[ok.run_id]]
    text = buf.getvalue()
    assert "1 to run in 1 job(s) of up to 1 run(s); 1 corrupt, left alone" in text
    assert f"{bad.run_id} is corrupt: progress.json: corrupt JSON" in text
    RunDir(bad.dir).file("config.json").write_bytes(b"\xff\xfe\x00\x01")
    assert launch_mod.main([str(spec), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {RunDir(bad.dir).file('config.json')}")


def test_local_executor_end_to_end(write_spec, tmp_path, capsys):
    out = tmp_path / "sweep"
    spec = write_spec({"base": TINY_RUN, "grid": {"model_seed": [1, 2]}, "out": str(out),
                       "launcher": {"executor": "local", "runs_per_job": 2, "time": 10},
                       "published": {"source": "a paper", "metric": "grokking_epoch",
                                     "values": 150}})
    assert launch_mod.main([str(spec)]) == 0
    printed = capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["axes"] == ["model_seed"]
    assert [r["swept"] for r in manifest["runs"]] == [{"model_seed": 1}, {"model_seed": 2}]
    ids = [RunConfig(**{**TINY_RUN, "model_seed": s}).run_id for s in (1, 2)]
    assert [r["run_id"] for r in manifest["runs"]] == ids
    (launch,) = manifest["launches"]
    assert launch["executor"] == "local" and len(launch["jobs"]) == 1
    assert launch["jobs"][0]["runs"] == ids          # both runs packed into one job
    for rid in ids:
        run = RunDir(out / "runs" / rid)
        assert run.is_complete()
        curves = run.read_curves()
        assert list(curves["epoch"]) == list(range(TINY_RUN["n_epochs"] + 1))
        # the initial model is near chance: ln 11
        assert abs(curves["test_loss"].iloc[0] - np.log(11)) < 0.5
    n_grokked = sum(bool(RunDir(out / "runs" / r).read_summary()["grokked"]) for r in ids)
    assert f"2/2 runs complete, {n_grokked} grokked" in printed
    # the job's log names both runs
    logs = list((out / "jobs").glob("*/*_log.out"))
    assert len(logs) == 1 and all(r in logs[0].read_text() for r in ids)
    # and the launch aggregated the sweep: tables and figures, a line saying where
    import pandas as pd

    agg = out / "aggregate"
    assert f"aggregated 2 runs: tables in {agg}, figures in {agg / 'figures'}" in printed
    runs = pd.read_parquet(agg / "runs.parquet")
    assert sorted(zip(runs["run_id"], runs["state"])) == sorted((r, "done") for r in ids)
    assert any((agg / "figures").glob("*.html"))
    # the spec's published number (never in the run ids above): the table, written and printed
    assert manifest["published"] == [{"source": "a paper", "metric": "grokking_epoch",
                                      "unit": "epoch", "values": 150.0}]
    assert "measured vs published: grokking_epoch in epochs; a paper" in printed
    ref = pd.read_csv(agg / "reference.csv")
    assert (list(ref["arm"]), list(ref["n_seeds"]), list(ref["published"])) == (["all"], [2], [150])

    # relaunch: nothing to do, nothing submitted, results untouched
    before = (out / "runs" / ids[0] / "curves.parquet").read_bytes()
    tables = (agg / "runs.parquet").read_bytes()
    assert launch_mod.main([str(spec)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "nothing to submit"
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["launches"]) == 1
    assert (out / "runs" / ids[0] / "curves.parquet").read_bytes() == before
    assert (agg / "runs.parquet").read_bytes() == tables         # up to date: left alone

    # a finished sweep never aggregated (tables gone), or changed since: the relaunch aggregates
    for change, why in ((lambda: shutil.rmtree(agg), "missing"),
                        (lambda: os.utime(out / "runs" / ids[1] / "summary.json"),
                         "out of date (1 run changed)")):
        change()
        assert launch_mod.main([str(spec), "--dry-run"]) == 0
        assert (f"nothing to train; the sweep's tables are {why}: a launch aggregates it"
                in capsys.readouterr().out.splitlines())
        assert launch_mod.main([str(spec)]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines[2:4] == ["nothing to submit",
                              f"the sweep's tables are {why}: aggregating"], lines
        assert f"aggregated 2 runs: tables in {agg}, figures in {agg / 'figures'}" in lines
        runs = pd.read_parquet(agg / "runs.parquet")
        assert sorted(zip(runs["run_id"], runs["state"])) == sorted((r, "done") for r in ids)
    assert len(json.loads((out / "manifest.json").read_text())["launches"]) == 1

    # a sweep copied elsewhere (cluster -> laptop) reads its own copies, not the originals
    assert [r["dir"] for r in manifest["runs"]] == [f"runs/{r}" for r in ids]
    from grokhpc import status as status_mod

    copy = tmp_path / "copied"
    shutil.copytree(out, copy)
    shutil.rmtree(out)
    states = status_mod.collect(copy, use_scheduler=False)
    assert [s.state for s in states] == ["done", "done"]
    assert all(str(copy) in s.dir for s in states)


def test_a_failing_run_does_not_stop_its_job_mates(tmp_path):
    good = RunConfig(**{**TINY_RUN, "n_epochs": 30})
    bad = RunConfig(**{**TINY_RUN, "n_epochs": 30, "p": 13, "device": "cuda:7"})
    runs = [(to_dict(bad), str(tmp_path / "bad")), (to_dict(good), str(tmp_path / "good"))]
    logged = []
    import torch

    threads = torch.get_num_threads()
    try:
        with pytest.raises(RuntimeError) as e:
            job_mod.train_runs(runs, JobSettings(threads=1), log=logged.append)
    finally:
        torch.set_num_threads(threads)
    assert "1 of 2 runs failed" in str(e.value) and bad.run_id in str(e.value)
    assert RunDir(tmp_path / "good").is_complete()
    err = RunDir(tmp_path / "bad").read_error()
    assert err and "Traceback" in err and ("CUDA" in err or "cuda" in err)
    assert any("failed" in m for m in logged)


def test_chunks_and_max_array_size():
    assert [len(c) for c in launch_mod.chunks(list(range(2500)), 1000)] == [1000, 1000, 500]
    assert launch_mod.chunks([], 1000) == []


def test_runs_per_job_auto_packs_by_gpu_memory(write_spec, tmp_path):
    from grokhpc.plan import bytes_per_run, runs_per_job_for

    spec = write_spec({"grid": {"weight_decay": [0.3, 1.0], "model_seed": [1, 2, 3]},
                       "zip": {"p": [53, 113], "n_epochs": [100, 200]},
                       "out": str(tmp_path / "s"),
                       "launcher": {"runs_per_job": "auto", "partition": "gpu_h100",
                                    "gpu_type": "h100"}})
    plan = launch_mod.launch(str(spec), cluster="bouchet", dry_run=True, out=io.StringIO())
    # far fewer bytes per run than an H100 holds: one job per shape (p), six runs each
    assert sorted(len(g) for g in plan["groups"]) == [6, 6]
    assert 80e9 * 0.7 // bytes_per_run(RunConfig()) >= 6
    assert all(len({r.config.p for r in g}) == 1 for g in plan["groups"])
    # a number caps the jobs
    plan = launch_mod.launch(str(spec), cluster="bouchet", dry_run=True, out=io.StringIO(),
                             overrides=["launcher.runs_per_job=4"])
    assert sorted(len(g) for g in plan["groups"]) == [2, 2, 4, 4]
    # a GPU of unknown memory, planned on a machine without it: one run per job, and a warning
    warnings = []
    size = runs_per_job_for(plan["launcher"].replace(runs_per_job="auto", gpu_type=None,
                                                     gpus=1), log=warnings.append)
    assert size(RunConfig()) == 1 and "gpu_type" in warnings[0]


# ---- the aggregation job ----------------------------------------------------------------------
def test_dry_run_shows_the_aggregation_job_on_a_cpu_partition(write_spec, tmp_path):
    spec = write_spec({"base": {"p": 113}, "grid": {"model_seed": [1, 2, 3]},
                       "out": str(tmp_path / "sweep"),
                       "launcher": {"partition": "gpu_h200", "gpu_type": "h200", "gpus": 1,
                                    "extra": {"account": "lab"}}})
    buf = io.StringIO()
    plan = launch_mod.launch(str(spec), cluster="bouchet", dry_run=True, out=buf)
    arrays, agg = buf.getvalue().split("aggregation job, once", 1)
    assert f"python -m grokhpc.aggregate {tmp_path / 'sweep'}" in agg.splitlines()[0]
    lines = set(agg.splitlines())
    # one CPU on bouchet's CPU partition (the launch's is a GPU one), after this launch's arrays
    for flag in ("--partition=day", "--dependency=afterany:ARRAY_IDS", "--cpus-per-task=1",
                 "--mem=4GB", "--time=60", "--account=lab",
                 f"--job-name=grokhpc-{plan['sweep'].name}-aggregate"):
        assert f"#SBATCH {flag}" in lines, flag
    assert not any("--gpus" in ln or "--array" in ln for ln in lines)
    assert "#SBATCH --partition=gpu_h200" in arrays and "#SBATCH --array=0-2%" in arrays
    assert not (tmp_path / "sweep").exists()


def test_aggregation_partition_and_time(write_spec, tmp_path):
    from grokhpc.clusters import ClusterProfile, Partition, load_profile
    from grokhpc.sweep import LauncherSettings

    bouchet = load_profile("bouchet")
    cpu = LauncherSettings(partition="week")
    assert submit_mod.aggregation_partition(cpu, bouchet, 5) == "week"      # a CPU launch's own
    # devel takes 2 jobs per user: with 2 training jobs there, the aggregation goes to day
    devel = LauncherSettings(partition="devel")
    assert submit_mod.aggregation_partition(devel, bouchet, 1) == "devel"
    assert submit_mod.aggregation_partition(devel, bouchet, 2) == "day"
    assert submit_mod.aggregation_partition(LauncherSettings(partition="scavenge"), bouchet,
                                            1) == "day"                     # preemptable GPU
    # without a profile: a GPU launch's partition is left for the cluster's default
    assert submit_mod.aggregation_partition(LauncherSettings(partition="gpu", gpus=1), None,
                                            1) is None
    assert submit_mod.aggregation_partition(LauncherSettings(partition="short"), None,
                                            1) == "short"
    # a CPU partition shorter than the aggregation's hour caps its time
    tiny = ClusterProfile(name="t", path=tmp_path, cpu_partition="quick",
                          partitions=(Partition("quick", max_time=20),
                                      Partition("g", gpus=True)))
    plan = {"sweep": load_sweep(write_spec({"grid": {"model_seed": [1]}})), "groups": [[1]],
            "launcher": LauncherSettings(partition="g", gpus=1), "profile": tiny}
    p = submit_mod.aggregation_parameters(plan, ["7", "9"])
    assert (p["slurm_partition"], p["timeout_min"], p["slurm_dependency"]) == \
        ("quick", 20, "afterany:7:9")
    assert "slurm_additional_parameters" not in p


FAKE_SLURM = {
    # each submission gets the next id; its script is kept; a job name matching
    # $FAKE_REFUSE is refused as sbatch refuses a bad dependency
    "sbatch": """n=$(( $(cat "$FAKE/next") )); echo $((n + 1)) > "$FAKE/next"
if [ -n "$FAKE_REFUSE" ] && grep -q -- "$FAKE_REFUSE" "$1"; then
  echo "sbatch: error: Batch job submission failed: Job dependency problem" >&2; exit 1; fi
cp "$1" "$FAKE/sbatch_$n.sh"; echo "Submitted batch job $n"
""",
    # the lines of ``queue`` whose job is one of -j's (squeue -h -r -o "%i %T" -j A,B)
    "squeue": """ids=$(echo "${@: -1}" | tr ',' ' ')
for id in $ids; do grep -E "^${id}(_[0-9]+)? " "$FAKE/queue"; done; true
""",
    "scancel": 'echo "$@" >> "$FAKE/scancelled"\n',
    "sacct": "true\n",
    # ping answers from the file ``controller`` (UP unless a test writes DOWN)
    # (show config: the file ``config``, where a test writes one; every call is logged)
    "scontrol": """echo "$@" >> "$FAKE/scontrol_calls"
if [ "$1" = ping ]; then s=$(cat "$FAKE/controller")
  echo "Slurmctld(primary) at fake is $s"; [ "$s" = UP ]; exit; fi
if [ "$1" = show ] && [ -f "$FAKE/config" ]; then cat "$FAKE/config"; fi
""",
    # submitit's SlurmExecutor only looks for srun on PATH; the jobs never run
    "srun": 'echo "srun: a fake, jobs never run here" >&2; exit 1\n',
}
FAKE_TOOLS = ("bash", "cat", "cp", "grep", "tr")   # what the fake commands call


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """sbatch, squeue, scancel, sacct, scontrol and srun as small scripts over files in a
    folder: ``queue`` is what squeue prints, ``sbatch_N.sh`` each script submitted as job N.
    PATH holds them and the few tools they call, nothing else: a real SLURM on this machine
    (or its absence) changes nothing."""
    fake, tools = tmp_path / "fake_slurm", tmp_path / "fake_tools"
    fake.mkdir()
    tools.mkdir()
    for name, body in FAKE_SLURM.items():
        (fake / name).write_text("#!/bin/bash\n" + body)
        (fake / name).chmod(0o755)
    for tool in FAKE_TOOLS:
        (tools / tool).symlink_to(shutil.which(tool) or pytest.fail(f"{tool} not on PATH"))
    (fake / "next").write_text("100\n")
    (fake / "controller").write_text("UP\n")
    (fake / "queue").write_text("")
    monkeypatch.setenv("FAKE", str(fake))
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{tools}")
    for name in FAKE_SLURM:
        assert shutil.which(name) == str(fake / name), name
    return fake


def test_auto_executor_is_slurm_only_when_a_controller_answers(fake_slurm, capsys):
    """sbatch on PATH with its controller down (SLURM's commands installed, no cluster behind
    them) is the local executor, said on stderr; a named cluster's dry run is SLURM's."""
    assert launch_mod.resolve_executor("auto") == "slurm"
    assert capsys.readouterr().err == ""
    (fake_slurm / "controller").write_text("DOWN\n")
    assert launch_mod.resolve_executor("auto") == "local"
    assert "no SLURM controller answers" in capsys.readouterr().err
    assert launch_mod.resolve_executor("auto", dry_run=True, cluster="bouchet") == "slurm"
    assert launch_mod.resolve_executor("slurm") == "slurm"
    (fake_slurm / "sbatch").unlink()
    assert launch_mod.resolve_executor("auto") == "local"
    assert capsys.readouterr().err == ""


def test_max_array_size_asks_only_a_controller_that_answers(fake_slurm):
    """MaxArraySize from scontrol show config, less one; where the controller is down the
    default, without asking for the config (each such call waits on the controller)."""
    from grokhpc.scheduler import DEFAULT_MAX_ARRAY

    (fake_slurm / "config").write_text("ClusterName = fake\nMaxArraySize            = 51\n")
    assert launch_mod.max_array_size() == 50
    (fake_slurm / "controller").write_text("DOWN\n")
    (fake_slurm / "scontrol_calls").unlink()
    assert launch_mod.max_array_size() == DEFAULT_MAX_ARRAY
    assert (fake_slurm / "scontrol_calls").read_text().split("\n")[:-1] == ["ping"]


def earlier_launch(spec, out, job: str, agg: str) -> list:
    """A manifest whose one SLURM launch gave the sweep's first run to array task ``job``
    and submitted aggregation job ``agg``; the runs."""
    from grokhpc.scheduler import new_manifest, write_manifest

    sweep = load_sweep(spec)
    first = sweep.runs[0]
    manifest = new_manifest(sweep, sweep.launcher, None)
    manifest["launches"] = [{"executor": "slurm", "jobs": [{"job_id": job,
                                                            "runs": [first.run_id]}],
                             "aggregation": {"job_id": agg, "after": [job.split("_")[0]]}}]
    out.mkdir()
    write_manifest(out, manifest)
    RunDir(first.dir).create({**to_dict(first.config), "run_id": first.run_id})
    return sweep.runs


@pytest.mark.parametrize("agg_state, replaced", [("PENDING", True), ("RUNNING", False)])
def test_relaunch_replaces_a_queued_aggregation_job(write_spec, tmp_path, fake_slurm,
                                                    agg_state, replaced):
    out = tmp_path / "sweep"
    spec = write_spec({"base": TINY_RUN, "grid": {"model_seed": [1, 2]}, "out": str(out),
                       "launcher": {"time": 10}})
    first, second = earlier_launch(spec, out, "41_0", "42")
    (fake_slurm / "queue").write_text(f"41_0 RUNNING\n42 {agg_state}\n")
    buf = io.StringIO()
    plan = launch_mod.launch(str(spec), executor="slurm", out=buf)
    assert [[r.run_id for r in g] for g in plan["groups"]] == [[second.run_id]]
    # job 100: the second run's (a single job); job 101: the aggregation, after 41 and 100
    train = (fake_slurm / "sbatch_100.sh").read_text().splitlines()
    assert "#SBATCH --time=10" in train and "-aggregate" not in "".join(train)
    script = (fake_slurm / "sbatch_101.sh").read_text()
    assert "#SBATCH --dependency=afterany:41:100" in script.splitlines()
    assert "#SBATCH --cpus-per-task=1" in script.splitlines()
    cancelled = (fake_slurm / "scancelled").read_text().split() \
        if (fake_slurm / "scancelled").exists() else []
    assert cancelled == (["42"] if replaced else [])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["launches"][0]["aggregation"]["job_id"] == "42"     # the record is kept
    agg = manifest["launches"][-1]["aggregation"]
    assert (agg["job_id"], agg["after"], agg["replaces"]) == \
        ("101", ["41", "100"], "42" if replaced else None)
    assert plan["aggregation"] == agg
    text = buf.getvalue()
    assert "aggregation job 101 (default partition) aggregates the sweep and draws its " \
           "figures once job(s) 41, 100 end" in text
    assert ("replaces queued aggregation job 42, cancelled" in text) == replaced


def test_a_refused_aggregation_job_is_a_warning(write_spec, tmp_path, fake_slurm, monkeypatch):
    out = tmp_path / "sweep"
    spec = write_spec({"base": TINY_RUN, "grid": {"model_seed": [1]}, "out": str(out)})
    monkeypatch.setenv("FAKE_REFUSE", "-aggregate")
    buf = io.StringIO()
    plan = launch_mod.launch(str(spec), executor="slurm", out=buf)
    assert len(plan["jobs"]) == 1 and "aggregation" not in plan
    warning = [ln for ln in buf.getvalue().splitlines() if ln.startswith(("warning", "aggr"))]
    assert warning == [f"warning: aggregation job not submitted (sbatch: error: Batch job "
                       f"submission failed: Job dependency problem); aggregate by hand once "
                       f"the jobs end: python -m grokhpc.aggregate {out}"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert [j["job_id"] for j in manifest["launches"][-1]["jobs"]] == ["100"] \
        and "aggregation" not in manifest["launches"][-1]


def test_a_finished_sweep_never_aggregated_gets_its_aggregation_job(write_spec, tmp_path,
                                                                    fake_slurm):
    """Every run done (trained here), no tables: a relaunch on SLURM submits the aggregation job
    alone, with no dependency, and records it; while it is queued a relaunch submits no other;
    once the tables are there, nothing."""
    from grokhpc.aggregate import aggregate
    from grokhpc.train import run_training

    out = tmp_path / "sweep"
    spec = write_spec({"base": {**TINY_RUN, "n_epochs": 20}, "grid": {"model_seed": [1]},
                       "out": str(out)})
    (run,) = load_sweep(spec).runs
    run_training(run.config, run.dir, progress_bar=False, log=lambda *a: None)

    def relaunch() -> list[str]:
        buf = io.StringIO()
        plan = launch_mod.launch(str(spec), executor="slurm", out=buf)
        assert plan["groups"] == [] and plan["jobs"] == []
        return buf.getvalue().splitlines()[2:]

    assert relaunch() == ["nothing to submit",
                          "the sweep's tables are missing: submitting its aggregation job",
                          "aggregation job 100 (default partition) aggregates the sweep and "
                          "draws its figures as soon as it starts"]
    script = (fake_slurm / "sbatch_100.sh").read_text().splitlines()
    assert "#SBATCH --cpus-per-task=1" in script and not any("--dependency" in ln
                                                             for ln in script)
    (launch,) = json.loads((out / "manifest.json").read_text())["launches"]
    assert (launch["jobs"], launch["aggregation"]["job_id"], launch["aggregation"]["after"]) == \
        ([], "100", [])
    (fake_slurm / "queue").write_text("100 PENDING\n")
    assert relaunch() == ["nothing to submit", "the sweep's tables are missing; aggregation "
                                               "job 100 (PENDING) aggregates it"]
    (fake_slurm / "queue").write_text("")
    aggregate([out], formats=None, log=None)      # what job 100 does
    assert relaunch() == ["nothing to submit"]
    assert not (fake_slurm / "sbatch_101.sh").exists()


def test_bare_aggregate_takes_every_sweep_under_runs(write_spec, tmp_path):
    """``python -m grokhpc.aggregate`` with no argument, in a project directory: each sweep
    under ./runs (a directory with manifest.json) is aggregated into its own aggregate/, and
    named; a directory without a manifest is no sweep. With no sweep: one line, exit 2."""
    import pandas as pd

    from grokhpc.scheduler import new_manifest, write_manifest

    project = tmp_path / "project"
    expected = {}
    for name, seeds in (("wd", [1, 2]), ("deep/lr", [3])):
        out = project / "runs" / name
        sweep = load_sweep(write_spec({"base": TINY_RUN, "grid": {"model_seed": seeds},
                                       "out": str(out)}, name=f"{name.replace('/', '_')}.yaml"))
        out.mkdir(parents=True)
        write_manifest(out, new_manifest(sweep, sweep.launcher, None))
        for r in sweep.runs:   # launched, never started
            RunDir(r.dir).create({**to_dict(r.config), "run_id": r.run_id})
        expected[f"runs/{name}"] = sorted(r.run_id for r in sweep.runs)
    (project / "runs" / "notes").mkdir()
    cmd = [sys.executable, "-m", "grokhpc.aggregate"]
    r = subprocess.run(cmd, cwd=project, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    named = [ln for ln in r.stdout.splitlines() if ln.startswith("sweep ")]
    assert named == ["sweep runs/deep/lr (1 of 2)", "sweep runs/wd (2 of 2)"]
    for d, ids in expected.items():
        runs = pd.read_parquet(project / d / "aggregate" / "runs.parquet")
        assert sorted(runs["run_id"]) == ids and set(runs["state"]) == {"pending"}
    assert not (project / "runs" / "notes" / "aggregate").exists()

    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == (f"aggregate: no sweeps under {tmp_path / 'runs'} (directories with "
                        "manifest.json); give SWEEP_DIR\n")
# ---- packing for time to result: the dry run's plan (numbers from the H200 table by hand) ----
# run-epochs/s of R seed-config runs on one H200 (benchmarks/gpu_batched_table.md)
R32, R64, R128, R256, R512 = 3193.8, 3576.3, 3811.2, 3982.5, 4071.8
H100 = 3.35 / 4.8    # H100 SXM vs H200 memory bandwidth (3.35 vs 4.8 TB/s; both 67 TFLOPS FP32)


def seed_1000_spec(write_spec, tmp_path, launcher):
    """1,000 seed-config runs: 10 weight decays x 10 data seeds x 10 model seeds."""
    return write_spec({"grid": {"weight_decay": [0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0,
                                                 5.0],
                                "data_seed": list(range(10)), "model_seed": list(range(10))},
                       "out": str(tmp_path / "s"),
                       "launcher": {"partition": "gpu_h100", "gpu_type": "h100",
                                    "array_parallelism": 12, **launcher}})


def minutes_and_gpu_hours(job_s: dict, counts: dict, wall_s: float, gpus: int = 1) -> str:
    gpu_h = gpus * sum(job_s[n] * k for n, k in counts.items()) / 3600
    return f"predicted {wall_s / 60:.1f} min to the last job's end, {gpu_h:.2f} GPU-hours"


def test_dry_run_plans_1000_seed_runs_for_the_soonest_finish(write_spec, tmp_path):
    """gpu_h100 runs 12 jobs per user at once: 12 jobs (11 x 84 + 76 runs), one wave, instead
    of the memory-sized 2 jobs of 610 + 390."""
    t64, t128 = 64 / R64, 128 / R128
    job = {n: 120 + 25_000 * (t64 + (n - 64) / 64 * (t128 - t64)) / H100 for n in (76, 84)}
    spec = seed_1000_spec(write_spec, tmp_path, {"runs_per_job": "auto"})
    buf = io.StringIO()
    plan = launch_mod.launch(str(spec), cluster="bouchet", dry_run=True, out=buf)
    lines = buf.getvalue().splitlines()
    assert sorted(len(g) for g in plan["groups"]) == [76] + [84] * 11
    assert ("plan: 12 job(s) of 76-84 run(s), 1 GPU(s) each (up to 84 runs per GPU), 12 at "
            "once: " + minutes_and_gpu_hours(job, {84: 11, 76: 1}, job[84])) in lines
    assert any(ln.startswith("  model: h100: estimated, the H200's measured rates x 0.70")
               and "knee R = 128" in ln and "120 s per job" in ln for ln in lines)
    assert ("  note: 12 jobs x 1 GPU(s) hold 12 of the 16 GPUs per user on gpu_h100; "
            "launcher.gpus: 2 would hold 16") in lines
    assert "#SBATCH --array=0-11%12" in lines
    # the memory-sized plan, as the same model predicts it (610 beyond R = 512, at its rate)
    buf = io.StringIO()
    launch_mod.launch(str(spec), cluster="bouchet", dry_run=True, out=buf,
                      overrides=["launcher.runs_per_job=610"])
    t256, t512 = 256 / R256, 512 / R512
    before = {610: 120 + 25_000 * 610 / R512 / H100,
              390: 120 + 25_000 * (t256 + (390 - 256) / 256 * (t512 - t256)) / H100}
    assert ("plan: 2 job(s) of 390-610 run(s), 1 GPU(s) each (up to 610 runs per GPU), 2 at "
            "once: " + minutes_and_gpu_hours(before, {610: 1, 390: 1}, before[610])
            ) in buf.getvalue().splitlines()


def test_dry_run_with_two_gpus_per_job_holds_every_gpu_a_user_may(write_spec, tmp_path):
    """gpus 2 on gpu_h100: 16 GPUs per user make 8 jobs at once; a job of 126 runs trains 63
    on each GPU: 7 x 126 + 118 (59 + 59). 7 jobs would put 72 on a GPU, 10% slower."""
    t32, t64 = 32 / R32, 64 / R64
    job = {n: 120 + 25_000 * (t32 + (n - 32) / 32 * (t64 - t32)) / H100 for n in (59, 63, 72)}
    assert job[72] / job[63] > 1.05
    spec = seed_1000_spec(write_spec, tmp_path, {"runs_per_job": "auto", "gpus": 2})
    buf = io.StringIO()
    plan = launch_mod.launch(str(spec), cluster="bouchet", dry_run=True, out=buf)
    lines = buf.getvalue().splitlines()
    assert sorted(len(g) for g in plan["groups"]) == [118] + [126] * 7
    assert ("plan: 8 job(s) of 118-126 run(s), 2 GPU(s) each (up to 63 runs per GPU), 8 at "
            "once: " + minutes_and_gpu_hours(job, {63: 7, 59: 1}, job[63], gpus=2)) in lines
    assert "#SBATCH --gpus=h100:2" in lines and "#SBATCH --array=0-7%8" in lines
    assert not any("note:" in ln for ln in lines)


def test_bad_gpus_are_one_line_errors(write_spec, tmp_path, capsys):
    def error(spec_launcher, *sets):
        spec = write_spec({"base": {"p": 11, "n_epochs": 10}, "grid": {"model_seed": [1, 2]},
                           "out": str(tmp_path / "s"),
                           "launcher": {"partition": "gpu_h100", **spec_launcher}})
        argv = [str(spec), "--cluster", "bouchet", "--dry-run"]
        assert launch_mod.main(argv + [a for s in sets for a in ("--set", s)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1
        return err.strip(), spec

    err, spec = error({"gpus": "two"})
    assert err == f"error: {spec}: launcher.gpus: expected an integer >= 0, got 'two'"
    err, spec = error({"gpus": 4, "runs_per_job": 2})
    assert err == (f"error: {spec}: launcher.gpus: expected at most launcher.runs_per_job (2) "
                   "GPUs per job (each GPU trains a group of the job's runs), got 4")
    err, spec = error({}, "launcher.gpus=4")
    assert err == ("error: --set: launcher.gpus: expected at most launcher.runs_per_job (1) "
                   "GPUs per job (each GPU trains a group of the job's runs), got 4")
    err, spec = error({"gpus": 4, "runs_per_job": 8}, "launcher.runs_per_job=2")
    assert err == ("error: --set: launcher.runs_per_job: expected at least launcher.gpus (4) "
                   "runs per job (each GPU trains a group of the job's runs), got 2")
    err, spec = error({"gpus": 32, "runs_per_job": "auto"})
    assert err == (f"error: {spec}: launcher.gpus: expected at most 16 GPUs per job on bouchet "
                   "gpu_h100 (its limit per user), got 32")
    err, spec = error({"gpus": 2, "runs_per_job": "auto", "partition": "day"})
    assert err.startswith(f"error: {spec}: launcher.partition: expected a GPU partition for "
                          "gpus=2")
    # the pair is checked after the overrides: --set can mend the spec
    err, spec = error({"gpus": 4, "runs_per_job": 2, "gpu_type": "h100"})
    assert launch_mod.main([str(spec), "--cluster", "bouchet", "--dry-run",
                            "--set", "launcher.runs_per_job=auto"]) == 0


# ---- several GPUs per job: one group per device, each in its own process ------------------
# Addition mod 17, small enough for a shared 2-core machine
SMALL = {"p": 17, "op": "add", "d_model": 32, "n_heads": 4, "d_head": 8, "d_mlp": 64,
         "n_epochs": 80, "checkpoint_every": 40, "eval_every": 10, "train_frac": 0.8,
         "lr": 1e-2}


def small_runs(tmp_path, name, n=4, **changes):
    """A job's runs, their directories made as a launch makes them (config.json only)."""
    cfgs = [RunConfig(**{**SMALL, "model_seed": i, "data_seed": 10 + i, **changes})
            for i in range(n)]
    for c in cfgs:
        RunDir(tmp_path / name / c.run_id).create({**to_dict(c), "run_id": c.run_id})
    return [(to_dict(c), str(tmp_path / name / c.run_id)) for c in cfgs]


def solo_reference(runs, tmp_path):
    """Each run trained alone, in this process, on one thread (bit-reproducible)."""
    import torch

    from grokhpc.train import run_training

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for c, d in runs:
            cfg = RunConfig(**{k: tuple(v) if k == "betas" else v for k, v in c.items()})
            run_training(cfg, tmp_path / "solo" / cfg.run_id, progress_bar=False,
                         log=lambda *a: None)
    finally:
        torch.set_num_threads(n)
    return {Path(d).name: tmp_path / "solo" / Path(d).name for _, d in runs}


def assert_same_run(a, b):
    ra, rb = RunDir(a), RunDir(b)
    assert ra.is_complete() and rb.is_complete() and ra.read_error() is None
    ea, wa = ra.checkpoints(mmap=False)
    eb, wb = rb.checkpoints(mmap=False)
    assert ea == eb and np.array_equal(wa, wb)
    ca, cb = ra.read_curves(), rb.read_curves()
    for col in ("train_loss", "train_acc", "test_loss", "test_acc"):
        assert np.array_equal(ca[col].to_numpy(), cb[col].to_numpy(), equal_nan=True), col
    sa, sb = ra.read_summary(), rb.read_summary()
    assert (sa["grokked"], sa["grokking_epoch"]) == (sb["grokked"], sb["grokking_epoch"])


def test_job_devices_are_the_visible_gpus(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    assert job_mod.job_devices(2) == ["2", "5"]
    assert job_mod.job_devices(1) == ["2"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    assert job_mod.job_devices(2) == ["3"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert job_mod.job_devices(3) == ["0", "1", "2"]


def test_a_two_gpu_job_trains_one_group_per_device_equal_to_solo_runs(tmp_path, monkeypatch,
                                                                     capfd):
    """SLURM makes the job's two GPUs visible as 0,1; here (no GPU) each group's process sees
    its one "GPU" and trains on the CPU. Packed groups on CPU run the solo arithmetic, so every
    run equals the same run trained alone, bit for bit."""
    runs = small_runs(tmp_path, "job")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    results = job_mod.SweepJob(runs, JobSettings(threads=2), gpus=2)()
    out = capfd.readouterr().out
    assert "device 0: 2 run(s)" in out and "device 1: 2 run(s)" in out
    assert out.count("[device 0] training 2 runs together") == 1
    assert out.count("[device 1] training 2 runs together") == 1
    assert [r["complete"] for r in results] == [True] * 4
    solo = solo_reference(runs, tmp_path)
    for _, d in runs:
        assert_same_run(d, solo[Path(d).name])


def _end_some_devices(runs, device, settings):
    """A group process that dies at once on device cpu:1 (killed: a failure) and cpu:2
    (SIGTERM: SLURM's preemption or time-out), and trains elsewhere."""
    if device in ("cpu:1", "cpu:2"):
        os.kill(os.getpid(), signal.SIGKILL if device == "cpu:1" else signal.SIGTERM)
    job_mod._train_on_device(runs, device, settings)


def test_a_failing_group_does_not_stop_the_others(tmp_path):
    """Four groups of one run: cpu:0 trains; cpu:1 dies (error.txt written for its runs); cpu:2 is
    interrupted (no error.txt: its run resumes on the requeue); cpu:3's run asks for a GPU
    that is not there and fails (its own error.txt). Relaunched, every run completes and
    equals the same run trained alone."""
    good = small_runs(tmp_path, "g", n=3)
    bad = small_runs(tmp_path, "b", n=1, device="cuda")
    logged = []
    with pytest.raises(RuntimeError) as e:
        job_mod.train_on_devices(good + bad, ["cpu:0", "cpu:1", "cpu:2", "cpu:3"],
                                 JobSettings(threads=4), log=logged.append,
                                 worker=_end_some_devices)
    assert str(e.value).startswith("3 of 4 runs failed")
    trained, killed, stopped = good[:1], good[1:2], good[2:]
    assert all(RunDir(d).is_complete() for _, d in trained)
    for _, d in killed:
        assert not RunDir(d).is_complete()
        assert RunDir(d).read_error() == ("training process on device cpu:1 ended by signal 9 "
                                          "(SIGKILL) before the run was complete")
    assert all(RunDir(d).read_error() is None for _, d in stopped)
    assert "interrupted: device cpu:2 ended by signal 15 (SIGTERM)" in str(e.value)
    for _, d in bad:
        err = RunDir(d).read_error()
        assert err and "Traceback" in err and ("CUDA" in err or "cuda" in err)
    assert "device cpu:1: training process ended by signal 9 (SIGKILL)" in logged
    # the next launch takes up where this one stopped
    one_thread = JobSettings(threads=1)   # one thread: bitwise
    results = job_mod.train_on_devices(good, ["cpu:0"], one_thread)
    assert [r["complete"] for r in results] == [True] * 3
    solo = solo_reference(good, tmp_path)
    for _, d in good:
        assert_same_run(d, solo[Path(d).name])


def test_dry_run_says_when_a_job_outlasts_its_time_limit(write_spec, tmp_path):
    """gpu_devel takes one job: 16 seed runs in it, 120 + 25,000 x 16 / 1986.0 = 321 s on an
    H200, over a 3-minute limit."""
    spec = write_spec({"grid": {"model_seed": list(range(16))}, "out": str(tmp_path / "s"),
                       "launcher": {"runs_per_job": "auto", "partition": "gpu_devel",
                                    "gpu_type": "h200", "time": 3}})
    buf = io.StringIO()
    plan = launch_mod.launch(str(spec), cluster="bouchet", dry_run=True, out=buf)
    assert [len(g) for g in plan["groups"]] == [16]
    job_min = (120 + 25_000 * 16 / 1986.0) / 60
    assert ("  note: the longest job is predicted to take 5 min, over launcher.time (3 min): it "
            "times out and resumes, at most launcher.max_timeouts (3) times"
            ) in buf.getvalue().splitlines()
    assert f"predicted {job_min:.1f} min to the last job's end" in buf.getvalue()


def test_a_launch_gives_each_job_its_gpus(write_spec, tmp_path, monkeypatch):
    """The job function learns how many GPUs its job has (one group of runs on each)."""
    jobs = []
    monkeypatch.setattr(submit_mod, "run_locally", lambda ex, fns, *rest: jobs.extend(fns))
    spec = write_spec({"base": {"p": 11, "n_epochs": 10}, "grid": {"model_seed": [1, 2, 3, 4]},
                       "out": str(tmp_path / "s"),
                       "launcher": {"executor": "local", "gpus": 2, "runs_per_job": 4}})
    launch_mod.launch(str(spec), out=io.StringIO())
    assert [(job.gpus, len(job.runs)) for job in jobs] == [(2, 4)]


def test_a_launch_gives_each_job_one_settings_object_from_the_spec(write_spec, tmp_path,
                                                                   monkeypatch):
    """launcher.state_every (minutes), step_mode and cpus_per_task reach every job as one
    JobSettings: seconds, the mode, the local job's torch threads."""
    jobs = []
    monkeypatch.setattr(submit_mod, "run_locally", lambda ex, fns, *rest: jobs.extend(fns))
    spec = write_spec({"base": {"p": 11, "n_epochs": 10}, "grid": {"model_seed": [1, 2, 3, 4]},
                       "out": str(tmp_path / "s"),
                       "launcher": {"executor": "local", "runs_per_job": 2, "state_every": 0.5,
                                    "step_mode": "fused", "cpus_per_task": 2}})
    launch_mod.launch(str(spec), out=io.StringIO())
    assert [job.settings for job in jobs] == \
        [JobSettings(state_every_s=30.0, step_mode="fused", threads=2)] * 2


def test_a_job_hands_its_settings_to_the_trainers_and_says_what_the_environment_overrides(
        tmp_path, monkeypatch, capsys):
    """A packed job's group trains at the settings' state interval and step mode, with W&B in
    the settings (never the environment); $GROKHPC_STEP_MODE, where set, replaces the mode with one line
    in the job's log; a word that is no mode fails the job in one line before anything is
    trained or written."""
    runs = small_runs(tmp_path, "job", n=2)
    group, solo = [], []
    monkeypatch.setattr(job_mod, "train_group", lambda cfgs, dirs, settings, **kw: group.append(
        ((settings.state_every_s, settings.step_mode), dict(settings.wandb))))
    monkeypatch.setattr(job_mod, "run_training", lambda cfg, d, settings, **kw: solo.append(
        settings.state_every_s))
    monkeypatch.delenv("GROKHPC_STEP_MODE", raising=False)
    monkeypatch.delenv("GROKHPC_WANDB", raising=False)
    wandb = {"project": "grok", "mode": "offline", "entity": None, "group": "s", "tags": []}
    job = job_mod.SweepJob(runs, JobSettings(state_every_s=30.0, step_mode="fused", threads=1,
                                             wandb=wandb))
    job()
    assert group == [((30.0, "fused"), wandb)] and solo == [30.0, 30.0]
    assert "GROKHPC_WANDB" not in os.environ   # W&B travels in the settings, not the environment
    assert "GROKHPC_STEP_MODE" not in capsys.readouterr().out
    monkeypatch.setenv("GROKHPC_STEP_MODE", "graph")
    job()
    assert group[-1][0] == (30.0, "graph")
    assert ("$GROKHPC_STEP_MODE=graph overrides the spec's launcher.step_mode (fused)"
            in capsys.readouterr().out.splitlines())
    monkeypatch.setenv("GROKHPC_STEP_MODE", "grpah")
    with pytest.raises(ConfigError) as e:
        job()
    assert str(e.value) == ("$GROKHPC_STEP_MODE: expected one of eager, fused, graph, compile, "
                            "got 'grpah'")
    assert len(group) == 2 and len(solo) == 4
    assert all(sorted(p.name for p in Path(d).iterdir()) == ["config.json"] for _, d in runs)


# ---- SLURM's warning (USR2): state written, then the requeue ---------------------------------
JOB_HOLD = Path(__file__).resolve().parent / "job_hold"
LONGER = {**SMALL, "n_epochs": 200, "checkpoint_every": 20}


def _wait_for(path: Path, what: str, alive=lambda: True, timeout_s: float = 600) -> dict:
    """A failure guard for a hung process, never a race: the file appears when it holds."""
    import time

    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert time.monotonic() < deadline, f"{what} did not happen"
        assert alive(), f"{what}: the job ended first"
        time.sleep(0.05)
    return json.loads(path.read_text())


def test_usr2_to_a_submitit_job_writes_the_state_then_submitit_requeues_it(tmp_path,
                                                                          monkeypatch):
    """A real submitit job (local executor) of two packed runs holds after its commit of epoch
    40 (tests/job_hold); the test sends it USR2, as SLURM warns before a preemption, and lets
    it go. The state is written at the next epoch, submitit's own handler requeues the job,
    and the second attempt resumes there (not at 0: state by time would come after 10
    minutes) and ends equal to runs trained alone."""
    import submitit

    runs = small_runs(tmp_path, "job", n=2, **{k: v for k, v in LONGER.items()
                                              if k not in ("model_seed", "data_seed")})
    hold = tmp_path / "hold"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(JOB_HOLD), os.environ.get(
        "PYTHONPATH", "")]))
    monkeypatch.setenv("GROKHPC_TEST_HOLD_DIR", str(hold))
    monkeypatch.setenv("GROKHPC_TEST_HOLD_EPOCH", "40")
    hold.mkdir()
    ex = submitit.AutoExecutor(folder=tmp_path / "jobs", cluster="local")
    ex.update_parameters(timeout_min=30)
    job = ex.submit(job_mod.SweepJob(runs, JobSettings(threads=1)))
    reached = _wait_for(hold / "reached", "the job holding at epoch 40",
                        alive=lambda: not job.done())
    os.kill(reached["pid"], signal.SIGUSR2)
    (hold / "release").touch()
    results = job.result()
    assert [r["complete"] for r in results] == [True, True]
    log = "".join(f.read_text() for f in (tmp_path / "jobs").rglob("*_log.out"))
    resumed = sorted(set(int(e) for e in re.findall(r"resuming at epoch (\d+)/200", log)))
    assert resumed == [41], log    # the epoch after the signal, for both runs
    assert "checkpoint: requeueing" in log
    for _, d in runs:
        assert [a["epoch"] for a in RunDir(d).read_progress()["attempts"]] == [0, 41]
    solo = solo_reference(runs, tmp_path)
    for _, d in runs:
        assert_same_run(d, solo[Path(d).name])


def _held_on_device(runs, device, settings):
    """A device's training process that holds after its commit of epoch 40 until released
    (marker files in $GROKHPC_TEST_DEVICE_HOLDS/<device>)."""
    import importlib.util

    import grokhpc.train

    spec = importlib.util.spec_from_file_location("job_hold", JOB_HOLD / "sitecustomize.py")
    hold = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hold)
    hold.hold_commits(grokhpc.train, os.path.join(os.environ["GROKHPC_TEST_DEVICE_HOLDS"],
                                                  device.replace(":", "_")), 40)
    job_mod._train_on_device(runs, device, settings)


def test_checkpoint_passes_the_warning_to_the_device_processes(monkeypatch):
    called = []
    monkeypatch.setattr(job_mod, "stop_groups", lambda: called.append(True))
    job = job_mod.SweepJob([], gpus=2)
    again = job.checkpoint()
    assert called == [True] and again.function is job


def test_a_several_device_job_warned_has_each_process_write_its_state(tmp_path, monkeypatch):
    """SLURM's warning passed to a job's two device processes (``stop_groups``, as
    submitit's checkpoint() does), each held at epoch 40 then let go: each writes its run's
    state at epoch 41 and ends, with no error.txt; the next launch resumes there and the
    runs end equal to runs trained alone."""
    import threading

    runs = small_runs(tmp_path, "job", n=2, **{k: v for k, v in LONGER.items()
                                              if k not in ("model_seed", "data_seed")})
    monkeypatch.setenv("GROKHPC_TEST_DEVICE_HOLDS", str(tmp_path / "hold"))
    holds = [tmp_path / "hold" / f"cpu_{i}" for i in range(2)]
    for h in holds:
        h.mkdir(parents=True)
    ended = {}

    def job():
        try:
            job_mod.train_on_devices(runs, ["cpu:0", "cpu:1"], JobSettings(threads=2),
                                        worker=_held_on_device)
        except RuntimeError as e:
            ended["error"] = str(e)

    thread = threading.Thread(target=job)
    thread.start()
    for h in holds:
        _wait_for(h / "reached", f"{h.name} holding at epoch 40", alive=thread.is_alive)
    job_mod.stop_groups(timeout_s=0)   # the signal goes out while both processes hold
    for h in holds:
        (h / "release").touch()
    thread.join(timeout=600)
    assert "interrupted: device cpu:0 ended by signal 12 (SIGUSR2)" in ended["error"]
    for _, d in runs:
        prog = RunDir(d).read_progress()
        assert prog["state_epoch"] == prog["epoch"] == 41 and RunDir(d).read_error() is None
    results = job_mod.train_on_devices(runs, ["cpu:0"], JobSettings(threads=1))
    assert [r["complete"] for r in results] == [True, True]
    solo = solo_reference(runs, tmp_path)
    for _, d in runs:
        assert_same_run(d, solo[Path(d).name])


# ---- a local launch's jobs end with it ----------------------------------------------------------
def _gone(pid: int) -> bool:
    """Whether process ``pid`` has ended (a zombie nobody reaps has ended too)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _wait_until(cond, what: str, timeout_s: float = 600) -> None:
    """A failure guard for a hung process, never a race: ``cond`` comes true when it works."""
    import time

    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"{what} did not happen"
        time.sleep(0.1)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL],
                         ids=["SIGTERM", "SIGINT", "SIGKILL"])
def test_local_jobs_end_with_their_launcher(write_spec, tmp_path, capsys, sig):
    """A real local launch whose job holds after its commit of epoch 40 (tests/job_hold). The
    test signals the launch's process, waits for the job to say its launch has ended, then
    lets it go: the job writes its run's state at epoch 41 and ends, with no error.txt. A
    relaunch counts nothing in flight, resumes the run at 41 and completes it."""
    out = tmp_path / "sweep"
    spec = write_spec({"base": {**LONGER, "n_epochs": 400}, "grid": {"model_seed": [1]},
                       "out": str(out), "launcher": {"executor": "local"}})
    (run,) = load_sweep(spec).runs
    hold = tmp_path / "hold"
    hold.mkdir()
    env = {**os.environ, "GROKHPC_TEST_HOLD_DIR": str(hold), "GROKHPC_TEST_HOLD_EPOCH": "40",
           "PYTHONPATH": os.pathsep.join([str(JOB_HOLD), os.environ.get("PYTHONPATH", "")])}
    launcher = subprocess.Popen([sys.executable, "-m", "grokhpc.launch", str(spec)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        worker = _wait_for(hold / "reached", "the job holding at epoch 40",
                           alive=lambda: launcher.poll() is None)["pid"]
        (controller,) = [int(j["job_id"]) for j in json.loads(
            (out / "manifest.json").read_text())["launches"][-1]["jobs"]]
        launcher.send_signal(sig)
        logs = lambda: "".join(f.read_text() for f in (out / "jobs").glob("*/*_log.out"))  # noqa
        _wait_until(lambda: "the launch that started this job has ended" in logs(),
                    "the job noticing its launch's end")
        (hold / "release").touch()
        _wait_until(lambda: _gone(worker) and _gone(controller), "the job's end")
        stdout, stderr = launcher.communicate(timeout=600)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == (130 if sig == signal.SIGINT else -sig)
    if sig == signal.SIGINT:
        assert stderr.splitlines()[-1] == "interrupted: launch the same command again to resume"
    assert "the runs' state is written; launch again to resume them" in logs()
    prog = RunDir(run.dir).read_progress()
    assert (prog["epoch"], prog["state_epoch"], prog["done"]) == (41, 41, False)
    assert RunDir(run.dir).read_error() is None
    # the launch's lifeline file: removed by an interrupted launch, left by a killed one
    assert bool(list((out / "jobs").glob("launch.*.lifeline"))) == (sig != signal.SIGINT)

    assert launch_mod.main([str(spec), "--dry-run"]) == 0
    assert ("1 runs over model_seed: 0 complete, 0 in flight, 1 to run in 1 job(s) of up to 1 "
            "run(s)") in capsys.readouterr().out.splitlines()
    assert launch_mod.main([str(spec)]) == 0
    assert RunDir(run.dir).is_complete() and "resuming at epoch 41/400" in logs()
    assert not list((out / "jobs").glob("launch.*.lifeline"))   # a dead launch's is cleared
