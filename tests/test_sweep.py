"""Sweep specs: every validation failure is one line naming the file and the key; expansion
gives the Cartesian product (with zip groups) and each run its RunConfig, run_id and directory."""

import itertools
from pathlib import Path

import pytest

from grokhpc.config import ConfigError, RunConfig
from grokhpc.clusters import fit_partition, load_profile, parse_profile, resolve_launcher
from grokhpc.plan import pack, shape_key
from grokhpc.sweep import LauncherSettings, load_sweep, parse_minutes

GOOD = """\
base:
  p: 11
  n_epochs: 100
grid:
  weight_decay: [0.1, 1.0]
  model_seed: [1, 2, 3]
zip:
  - train_frac: [0.3, 0.5]
    lr: [1.0e-3, 3.0e-3]
out: runs/good
launcher:
  executor: local
  runs_per_job: 2
"""


def fails(write_spec, text, *needles):
    """Load the spec and return its one-line error, checking it names the file and the key."""
    path = write_spec(text)
    with pytest.raises(ConfigError) as e:
        load_sweep(path)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(str(path) + ":"), msg
    for n in needles:
        assert n in msg, (n, msg)
    return msg


# ---- expansion ------------------------------------------------------------------------------
def test_expansion_is_the_product_with_zip_groups(write_spec, tmp_path, monkeypatch):
    work = tmp_path / "elsewhere"
    work.mkdir()
    monkeypatch.chdir(work)
    sweep = load_sweep(write_spec(GOOD))
    assert sweep.axes == ("weight_decay", "model_seed", "train_frac", "lr")
    assert sweep.zip_groups == (("train_frac", "lr"),)
    expected = [
        {"weight_decay": wd, "model_seed": s, "train_frac": tf, "lr": lr}
        for wd, s, (tf, lr) in itertools.product([0.1, 1.0], [1, 2, 3],
                                                 [(0.3, 1e-3), (0.5, 3e-3)])]
    assert [r.swept for r in sweep.runs] == expected
    # each run: the base, its axis values, the seed's defaults elsewhere
    for r, sw in zip(sweep.runs, expected):
        cfg = RunConfig(p=11, n_epochs=100, **sw)
        assert r.config == cfg
        assert r.run_id == cfg.run_id
        # out is relative to the current directory, not to the spec's
        assert r.dir == work / "runs" / "good" / "runs" / cfg.run_id
    assert len({r.run_id for r in sweep.runs}) == 12
    assert sweep.launcher.executor == "local" and sweep.launcher.runs_per_job == 2


def test_set_overrides_base_launcher_and_out(write_spec, tmp_path):
    sweep = load_sweep(write_spec(GOOD), ["n_epochs=50", "launcher.time=30",
                                          f"out={tmp_path / 'o'}", "launcher.runs_per_job=auto"])
    assert all(r.config.n_epochs == 50 for r in sweep.runs)
    assert sweep.launcher.time == 30 and sweep.launcher.runs_per_job == "auto"
    assert sweep.out == tmp_path / "o"
    with pytest.raises(ConfigError, match=r"--set: weight_decay: .*swept"):
        load_sweep(write_spec(GOOD), ["weight_decay=0.5"])
    with pytest.raises(ConfigError, match=r"--set: launcher.gpus: expected an integer >= 0"):
        load_sweep(write_spec(GOOD), ["launcher.gpus=-1"])


def test_default_out_is_runs_slash_spec_name(write_spec, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sweep = load_sweep(write_spec("grid: {model_seed: [1]}\n", name="mine.yaml"))
    assert sweep.out == tmp_path / "runs" / "mine"
    assert sweep.runs[0].config == RunConfig(model_seed=1)


def test_spec_hash_follows_the_text(write_spec):
    a = load_sweep(write_spec(GOOD, "a.yaml"))
    b = load_sweep(write_spec(GOOD + "\n# comment\n", "b.yaml"))
    c = load_sweep(write_spec(GOOD, "c.yaml"))
    assert a.spec_hash == c.spec_hash != b.spec_hash


# ---- validation: one line naming file + key ------------------------------------------------
def test_unknown_keys_at_every_level(write_spec):
    fails(write_spec, GOOD + "seeds: [1]\n", "seeds", "unknown key")
    fails(write_spec, GOOD.replace("  runs_per_job: 2", "  runs_per_jobs: 2"),
          "launcher.runs_per_jobs", "unknown key")
    fails(write_spec, GOOD.replace("  n_epochs: 100", "  n_epoch: 100"), "base", "n_epoch",
          "unknown field")
    fails(write_spec, GOOD.replace("  model_seed: [1, 2, 3]", "  seed: [1, 2, 3]"), "grid.seed",
          "a run field")
    fails(write_spec, GOOD + "  extra: {array: 1-3}\n", "launcher.extra.array")


def test_bad_types(write_spec):
    fails(write_spec, GOOD.replace("n_epochs: 100", "n_epochs: many"), "base: n_epochs",
          "expected int")
    fails(write_spec, GOOD.replace("[0.1, 1.0]", "[0.1, heavy]"), "grid: weight_decay",
          "expected float")
    fails(write_spec, GOOD.replace("runs_per_job: 2", "runs_per_job: 0"),
          "launcher.runs_per_job", '"auto"')
    fails(write_spec, GOOD.replace("executor: local", "executor: cloud"), "launcher.executor",
          "auto | slurm | local | debug")
    fails(write_spec, GOOD + "  gpus: two\n", "launcher.gpus", "integer >= 0")
    fails(write_spec, GOOD + "  time: soon\n", "launcher.time", "minutes")
    fails(write_spec, GOOD.replace("out: runs/good", "out: [a, b]"), "out: expected a directory")
    fails(write_spec, GOOD.replace("weight_decay: [0.1, 1.0]", "weight_decay: 0.1"),
          "grid.weight_decay", "non-empty list")
    fails(write_spec, "- just\n- a list\n", "(top level)", "mapping")


def test_the_job_settings_come_from_the_launcher_section(write_spec):
    """launcher.step_mode (default eager, one of the four modes) and state_every (minutes,
    default 10) become each job's JobSettings: seconds, the mode, torch threads (a local job:
    cpus_per_task, else 1; on SLURM left to the job's cpus-per-task) and W&B grouped under the
    sweep's name."""
    from grokhpc.runtime import JobSettings

    plain = load_sweep(write_spec(GOOD)).launcher
    assert (plain.step_mode, plain.state_every) == ("eager", 10.0)
    assert plain.job_settings("local", "good") == JobSettings(state_every_s=600.0,
                                                              step_mode="eager", threads=1)
    spec = GOOD + "  step_mode: fused\n  state_every: 2.5\n  cpus_per_task: 3\n" \
        "  wandb: {project: grok}\n"
    launcher = load_sweep(write_spec(spec)).launcher
    wandb = {"project": "grok", "mode": "offline", "entity": None, "group": "good", "tags": []}
    assert launcher.job_settings("local", "good") == JobSettings(
        state_every_s=150.0, step_mode="fused", threads=3, wandb=wandb)
    assert launcher.job_settings("slurm", "good") == JobSettings(
        state_every_s=150.0, step_mode="fused", threads=None, wandb=wandb)
    over = load_sweep(write_spec(spec), ["launcher.step_mode=graph"]).launcher
    assert over.step_mode == "graph" and over.to_dict()["step_mode"] == "graph"
    for bad in ("fast", "null", "1"):
        fails(write_spec, GOOD + f"  step_mode: {bad}\n", "launcher.step_mode",
              "expected eager | fused | graph | compile")
    with pytest.raises(ConfigError) as e:
        load_sweep(write_spec(GOOD), ["launcher.step_mode=grpah"])
    assert str(e.value) == ("--set: launcher.step_mode: expected eager | fused | graph | "
                            "compile, got 'grpah'")


def test_values_out_of_range(write_spec):
    fails(write_spec, GOOD.replace("p: 11", "p: 12"), "base: p", "prime")
    fails(write_spec, GOOD.replace("model_seed: [1, 2, 3]", "p: [11, 15]"), "grid: p", "prime",
          "15")
    fails(write_spec, GOOD.replace("[0.3, 0.5]", "[0.3, 1.5]"), "zip[0]: train_frac",
          "fraction in (0, 1)")
    fails(write_spec, GOOD.replace("[0.3, 0.5]", "[0.0, 0.5]"), "zip[0]: train_frac",
          "fraction in (0, 1)")
    fails(write_spec, GOOD.replace("[0.1, 1.0]", "[-0.1, 1.0]"), "grid: weight_decay",
          "non-negative")
    # valid alone, invalid together: p=3 with 10% train data leaves no training pair
    msg = fails(write_spec, "grid: {p: [3, 11], train_frac: [0.1, 0.5]}\n", "run 0", "p=3",
                "train_frac=0.1")
    assert "at least one training pair" in msg


def test_empty_grid_and_duplicate_axes(write_spec):
    fails(write_spec, "base: {p: 11}\ngrid: {}\n", "grid", "at least one axis")
    fails(write_spec, "base: {p: 11}\n", "grid", "at least one axis")
    fails(write_spec, "grid: {p: []}\n", "grid.p", "non-empty list")
    fails(write_spec, GOOD.replace("model_seed: [1, 2, 3]", "lr: [1.0e-3]"), "zip[0].lr",
          "duplicate axis", "grid")
    fails(write_spec, "grid:\n  p: [11]\n  p: [13]\n", "line 3", "duplicate key 'p'")
    fails(write_spec, "grid: {p: [11, 11]}\n", "grid.p", "distinct values")
    fails(write_spec, GOOD.replace("lr: [1.0e-3, 3.0e-3]", "lr: [1.0e-3]"), "zip[0]",
          "equal length", "train_frac=2", "lr=1")
    # device is not part of a run's identity: an axis over it alone would repeat runs
    fails(write_spec, "grid: {device: [cpu, auto]}\n", "grid", "same run")


def test_malformed_yaml_names_its_line(write_spec):
    msg = fails(write_spec, "base:\n  p: 11\ngrid: {p: [11, 13]\nout: x\n", "invalid YAML")
    assert "line 4" in msg or "line 3" in msg
    fails(write_spec, "base:\n  p: 11\n   bad indent: 1\n", "line 3", "invalid YAML")


def test_missing_spec_file(tmp_path):
    with pytest.raises(ConfigError, match="no such sweep spec"):
        load_sweep(tmp_path / "nope.yaml")


@pytest.mark.parametrize("content, needle", [
    (b"\xff\xfe\x00\x01", "not UTF-8 text (byte 0xff at offset 0)"),      # binary
    ("grid: {p: [11]}\n".encode("utf-16"), "not UTF-8 text (byte 0xff at offset 0)"),
    (b"grid: {p: [11]}\n# caf\xe9\n", "not UTF-8 text (byte 0xe9 at offset 21)"),  # latin-1
    (b"grid: {p: [11]}\x00\x01\n", "invalid YAML (unacceptable character #x0000"),
])
def test_a_file_that_is_not_utf8_text_is_one_line(tmp_path, content, needle):
    path = tmp_path / "spec.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as e:
        load_sweep(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: ") and needle in msg and "\n" not in msg, msg


def test_a_binary_spec_on_the_command_line(tmp_path, capsys):
    from grokhpc import launch

    path = tmp_path / "spec.yaml"
    path.write_bytes(b"\xff\xfe\x00\x01")
    assert launch.main([str(path), "--dry-run"]) == 2
    captured = capsys.readouterr()
    assert captured.err == (f"error: {path}: not UTF-8 text (byte 0xff at offset 0); "
                            "a sweep spec is a YAML text file\n")
    assert captured.out == ""


def test_a_binary_cluster_profile_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "lab.yaml").write_bytes(b"name: lab\n\xff\xfe\x00\x01")
    monkeypatch.setenv("GROKHPC_CLUSTERS", str(tmp_path))
    with pytest.raises(ConfigError) as e:
        load_profile("lab")
    assert str(e.value) == (f"{tmp_path / 'lab.yaml'}: not UTF-8 text (byte 0xff at offset 10);"
                            " a cluster profile is a YAML text file")


# ---- time strings, profiles, packing --------------------------------------------------------
@pytest.mark.parametrize("text,minutes", [(90, 90), ("90", 90), ("1:30:00", 90),
                                          ("2-00:00:00", 2880), ("1-12", 2160),
                                          ("00:00:30", 1), ("10:00", 10)])
def test_time_strings_in_minutes(text, minutes):
    assert parse_minutes(text, "f", "launcher.time") == minutes


def test_cluster_profiles_load_and_check_limits():
    b = load_profile("bouchet")
    assert {"gpu", "gpu_h100", "gpu_h200", "scavenge_gpu", "day"} <= {p.name for p in b.partitions}
    assert b.partition("gpu_h200").max_time == 2 * 24 * 60
    assert b.partition("scavenge_gpu").preemptable and b.gpu_request == "gpus"
    for name in ("mccleary", "grace"):
        pr = load_profile(name)
        assert pr.partition("scavenge_gpu").preemptable and pr.partition("day").max_time == 1440
    filled = resolve_launcher(LauncherSettings(), b, "s.yaml")
    assert filled.partition == b.gpu_partition and filled.gpus == b.default("gpus")
    cpu = resolve_launcher(LauncherSettings(gpus=0), b, "s.yaml")
    assert cpu.partition == "day"
    with pytest.raises(ConfigError, match=r"s.yaml: launcher.time: expected at most 2880"):
        resolve_launcher(LauncherSettings(partition="gpu_h200", time=3000), b, "s.yaml")
    with pytest.raises(ConfigError, match=r"s.yaml: launcher.partition: expected a partition of"):
        resolve_launcher(LauncherSettings(partition="gpu_a100"), b, "s.yaml")
    with pytest.raises(ConfigError, match=r"launcher.partition: expected a GPU partition"):
        resolve_launcher(LauncherSettings(partition="day", gpus=1), b, "s.yaml")
    with pytest.raises(ConfigError, match=r"launcher.gpu_type: expected one of h200"):
        resolve_launcher(LauncherSettings(partition="gpu_h200", gpu_type="h100"), b, "s.yaml")
    with pytest.raises(ConfigError, match=r"--cluster: cluster: expected a cluster profile"):
        load_profile("frontier")


# ---- the profiles against YCRC's published pages (expected values read off those pages) -----
def test_bouchet_profile_holds_the_published_limits():
    # docs.ycrc.yale.edu/clusters/bouchet/ partition tables (August 2026)
    b = load_profile("bouchet")
    got = {p.name: (p.max_time, p.max_running, p.max_submitted, p.max_gpus) for p in b.partitions}
    assert got["gpu"] == (2 * 1440, 12, None, 16)
    assert got["gpu_rtx6000"] == (2 * 1440, 16, None, 16)
    assert got["gpu_h100"] == (2 * 1440, 12, None, 16)
    assert got["gpu_h200"] == (2 * 1440, 6, None, 16)
    assert got["gpu_b200"] == (2 * 1440, 6, None, 16)
    assert got["gpu_devel"] == (6 * 60, 1, 1, 2)
    assert got["devel"] == (6 * 60, None, 2, None)
    assert got["mpi"] == (2 * 1440, 10, None, None)
    assert (got["day"][0], got["week"][0], got["scavenge_gpu"][0]) == (1440, 7 * 1440, 1440)
    assert set(b.partition("gpu").gpu_types) == {"rtx_5000_ada", "a40", "l40s"}
    assert b.partition("gpu_rtx6000").gpu_types == ("rtx_pro_6000_blackwell",)
    assert b.partition("gpu_b200").gpu_types == ("b200",)
    assert set(b.partition("gpu_devel").gpu_types) == {"b200", "rtx_pro_6000_blackwell", "h200",
                                                       "rtx_5000_ada"}
    # common-job-failures#rate-limits: 200 submissions per hour on each cluster
    assert b.submissions_per_hour == 200


def test_grace_and_mccleary_profiles_hold_the_published_limits():
    g = load_profile("grace")          # docs.ycrc.yale.edu/clusters/grace/ (July 2026)
    gpu = g.partition("gpu")
    assert (gpu.max_time, gpu.max_running, gpu.max_gpus) == (2 * 1440, None, 24)
    assert set(gpu.gpu_types) == {"a100", "a5000", "v100"}
    assert "rtx3090" in g.partition("gpu_devel").gpu_types
    assert g.partition("mpi").max_time == 1440
    assert (g.partition("gpu_devel").max_submitted, g.partition("gpu_devel").max_gpus) == (2, 3)
    m = load_profile("mccleary")       # docs.ycrc.yale.edu/clusters/mccleary/ (July 2026)
    assert (m.partition("gpu").max_time, m.partition("gpu").max_gpus) == (2 * 1440, 12)
    assert m.partition("ycga").max_time == 2 * 1440
    assert m.partition("long").max_time == 28 * 1440
    assert g.submissions_per_hour == m.submissions_per_hour == 200


def test_every_gpu_type_a_profile_names_has_a_memory_size():
    from grokhpc.plan import GPUS

    named = {t for n in ("bouchet", "grace", "mccleary")
             for p in load_profile(n).partitions for t in p.gpu_types}
    assert {"b200", "rtx_pro_6000_blackwell", "l40s", "a40", "rtx_5000_ada"} <= named
    assert named <= set(GPUS), named - set(GPUS)
    # the pages' vRAM/GPU column (GB)
    assert [GPUS[t].memory_gb for t in ("h200", "rtx_pro_6000_blackwell", "h100", "l40s", "a40",
                                       "rtx_5000_ada", "a5000", "v100")] == \
        [141, 96, 80, 48, 48, 32, 24, 16]


def test_profile_caps_are_validated(tmp_path):
    text = "partitions:\n  gpu: {max_time: 60, gpus: true, max_running: %s}\n"
    f = tmp_path / "c.yaml"
    with pytest.raises(ConfigError) as e:
        parse_profile(text % "0", str(f), "c", f)
    assert str(e.value) == f"{f}: partitions.gpu.max_running: expected an integer >= 1, got 0"
    with pytest.raises(ConfigError, match=r"c.yaml: submissions_per_hour: expected an integer"):
        parse_profile("submissions_per_hour: lots\n" + text % "2", str(f), "c", f)
    with pytest.raises(ConfigError, match=r"partitions.gpu.gpu_types: expected a list"):
        parse_profile("partitions:\n  gpu: {gpu_types: h100}\n", str(f), "c", f)
    assert parse_profile(text % "2", str(f), "c", f).partition("gpu").max_running == 2


def test_a_limit_broken_by_a_profile_default_names_the_profile_field():
    b = load_profile("bouchet")
    # the profile's 12 h default is above gpu_devel's 6 h: the error names defaults.time
    with pytest.raises(ConfigError) as e:
        resolve_launcher(LauncherSettings(partition="gpu_devel"), b, "s.yaml")
    assert str(e.value) == (f"{b.path}: defaults.time: expected at most 360 minutes on bouchet "
                            "gpu_devel, got 720; set launcher.time in s.yaml")
    with pytest.raises(ConfigError) as e:
        resolve_launcher(LauncherSettings(partition="gpu_devel", time=60, gpus=4), b, "s.yaml")
    assert str(e.value) == ("s.yaml: launcher.gpus: expected at most 2 GPUs per job on bouchet "
                            "gpu_devel (its limit per user), got 4")
    ok = resolve_launcher(LauncherSettings(partition="gpu_devel", time=60, gpus=2,
                                           runs_per_job=2), b, "s.yaml")
    assert (ok.time, ok.gpus) == (60, 2)


def test_fit_partition_cuts_parallelism_refuses_arrays_and_defers_past_the_hourly_limit():
    b = load_profile("bouchet")
    h200 = resolve_launcher(LauncherSettings(partition="gpu_h200", array_parallelism=12), b, "s")
    fit = fit_partition(h200, b, 30, 1000, "s")
    assert fit.launcher.array_parallelism == 6 and fit.jobs_now == 30
    assert fit.notes == ("bouchet gpu_h200: at most 6 running jobs per user: "
                         "array parallelism 12 -> 6",)
    # 16 GPUs per user at 4 GPUs a job: 4 jobs at once, below the 6-job cap
    fit = fit_partition(h200.replace(gpus=4), b, 30, 1000, "s")
    assert fit.launcher.array_parallelism == 4 and "16 GPUs per user at 4 per job" in fit.notes[-1]
    # unset: the cap, without a line; fewer jobs than the cap: nothing to say
    assert fit_partition(h200.replace(array_parallelism=None), b, 30, 1000, "s").notes == ()
    assert fit_partition(h200, b, 5, 1000, "s").notes == ()
    # gpu_devel takes one queued job: an array is refused, one job goes out
    devel = resolve_launcher(LauncherSettings(partition="gpu_devel", time=60), b, "s.yaml")
    with pytest.raises(ConfigError) as e:
        fit_partition(devel, b, 3, 1000, "s.yaml")
    assert str(e.value).startswith("s.yaml: launcher.partition: bouchet gpu_devel takes 1 job per "
                                   "user queued or running") and "\n" not in str(e.value)
    assert fit_partition(devel, b, 1, 1000, "s.yaml").jobs_now == 1
    # 200 submissions an hour, the aggregation job one of them: 450 jobs in arrays of 2 = 225
    # arrays; 199 go now (398 jobs), with the aggregation job the 200th submission
    fit = fit_partition(h200, b, 450, 2, "s")
    assert fit.jobs_now == 398
    assert ("submitting 199 of 225 arrays (398 of 450 jobs) now" in fit.notes[-1]
            and "2 hours in all" in fit.notes[-1])
    assert fit_partition(h200, b, 398, 2, "s").jobs_now == 398   # 199 arrays + 1: all now
    assert not any("per hour" in n for n in fit_partition(h200, b, 398, 2, "s").notes)
    fit = fit_partition(h200, b, 400, 2, "s")                    # 200 arrays + 1: one waits
    assert fit.jobs_now == 398 and "submitting 199 of 200 arrays" in fit.notes[-1]


def test_pack_groups_by_shape(write_spec):
    sweep = load_sweep(write_spec("base: {n_epochs: 10}\ngrid:\n  p: [11, 13]\n"
                                  "  model_seed: [1, 2, 3]\n"))
    jobs = pack(sweep.runs, lambda cfg: 2)
    # 3 runs of p=11 -> 2 + 1, same for p=13; never mixed
    assert [len(j) for j in jobs] == [2, 1, 2, 1]
    for j in jobs:
        assert len({shape_key(r.config) for r in j}) == 1
    assert sorted(r.run_id for j in jobs for r in j) == sorted(r.run_id for r in sweep.runs)
    assert [len(j) for j in pack(sweep.runs, lambda cfg: 1)] == [1] * 6


def test_shipped_specs_are_valid():
    root = Path(__file__).resolve().parent.parent / "sweeps"
    names = {f.name for f in root.glob("*.yaml")}
    assert {"quickstart.yaml", "wd_sweep.yaml", "frac_sweep.yaml", "prime_sweep.yaml"} <= names
    for f in root.rglob("*.yaml"):   # sweeps/repro/ too
        sweep = load_sweep(f)
        assert len(sweep.runs) >= 2, f
    wd = load_sweep(root / "wd_sweep.yaml")
    assert "weight_decay" in wd.axes and {"model_seed", "data_seed"} & set(wd.axes)
    # the seed configuration apart from the swept fields
    seed = RunConfig()
    for r in wd.runs:
        assert (r.config.p, r.config.d_model, r.config.n_epochs) == (seed.p, seed.d_model,
                                                                     seed.n_epochs)


# ---- launch dry runs inside the partitions' caps: the line printed, the submitit parameters --
def dry_run(write_spec, tmp_path, monkeypatch, overrides, n_seeds=12, array_size=1000):
    import io

    from grokhpc import launch as launch_mod

    monkeypatch.setattr(launch_mod, "array_size", lambda dry_run=False: array_size)
    spec = write_spec({"base": {"p": 11, "n_epochs": 10}, "grid": {"model_seed":
                                                                   list(range(n_seeds))},
                       "out": str(tmp_path / "sweep"),
                       "launcher": {"cluster": "bouchet", "partition": "gpu_h200",
                                    "gpu_type": "h200"}})
    buf = io.StringIO()
    plan = launch_mod.launch(str(spec), dry_run=True, overrides=overrides, out=buf)
    assert not (tmp_path / "sweep").exists()
    return buf.getvalue().splitlines(), plan


def test_dry_run_cuts_array_parallelism_to_the_running_job_cap(write_spec, tmp_path,
                                                                monkeypatch):
    lines, plan = dry_run(write_spec, tmp_path, monkeypatch, ["launcher.array_parallelism=12"])
    assert "bouchet gpu_h200: at most 6 running jobs per user: array parallelism 12 -> 6" in lines
    assert plan["parameters"]["slurm_array_parallelism"] == 6
    assert "#SBATCH --array=0-11%6" in lines
    assert "partition gpu_h200: limit 2880 min, per user at most 6 running, 16 GPUs" in lines
    # GPUs per user: 16 at 8 a job leaves 2 at once, the tighter cap: one line names it
    # (a job trains a group of runs on each of its GPUs: 8 runs on 8 GPUs, 12 jobs)
    lines, plan = dry_run(write_spec, tmp_path, monkeypatch,
                          ["launcher.gpus=8", "launcher.runs_per_job=8",
                           "launcher.array_parallelism=12"], n_seeds=96)
    assert [ln for ln in lines if "array parallelism" in ln] == [
        "bouchet gpu_h200: 16 GPUs per user at 8 per job: array parallelism 12 -> 2"]
    assert plan["parameters"]["slurm_array_parallelism"] == 2
    assert "#SBATCH --array=0-11%2" in lines and "#SBATCH --gpus=h200:8" in lines


def test_dry_run_on_gpu_devel_refuses_an_array_and_sends_one_job(write_spec, tmp_path,
                                                                  monkeypatch, capsys):
    from grokhpc import launch as launch_mod

    over = ["launcher.partition=gpu_devel", "launcher.time=60"]
    with pytest.raises(ConfigError, match=r"gpu_devel takes 1 job per user queued or running.*"
                                          r"this launch makes 12; set launcher.runs_per_job"):
        dry_run(write_spec, tmp_path, monkeypatch, over)
    spec = tmp_path / "spec.yaml"
    assert launch_mod.main([str(spec), "--dry-run", *sum([["--set", o] for o in over], [])]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {spec}: launcher.partition:")
    # all twelve runs trained together: one plain job, no array
    lines, plan = dry_run(write_spec, tmp_path, monkeypatch, over + ["launcher.runs_per_job=12"])
    assert len(plan["groups"]) == 1 and len(plan["groups"][0]) == 12
    assert "sbatch script header (a single job, no array):" in lines
    assert not any(ln.startswith("#SBATCH --array") for ln in lines)
    assert "#SBATCH --partition=gpu_devel" in lines and "#SBATCH --time=60" in lines


def test_dry_run_keeps_submissions_under_the_hourly_limit(write_spec, tmp_path, monkeypatch):
    # arrays of 2 tasks: 402 jobs make 201 arrays, with the aggregation job two more
    # submissions than bouchet's 200 an hour
    lines, plan = dry_run(write_spec, tmp_path, monkeypatch, [], n_seeds=402, array_size=2)
    assert ("bouchet: at most 200 submissions per hour, the aggregation job one of them: "
            "submitting 199 of 201 arrays (398 of 402 jobs) now; launch again in an hour for the "
            "rest (runs in flight are skipped), 2 hours in all") in lines
    assert len(plan["groups"]) == 398
    assert "sbatch script header (199 array(s), the first of 2 tasks):" in lines


def test_dry_run_time_above_the_partition_limit_is_one_line(write_spec, tmp_path, monkeypatch,
                                                            capsys):
    from grokhpc import launch as launch_mod

    with pytest.raises(ConfigError) as e:
        dry_run(write_spec, tmp_path, monkeypatch, ["launcher.time=2-00:01:00"])
    assert str(e.value) == (f"{tmp_path / 'spec.yaml'}: launcher.time: expected at most 2880 "
                            "minutes on bouchet gpu_h200, got 2881")
    spec = tmp_path / "spec.yaml"
    assert launch_mod.main([str(spec), "--dry-run", "--set", "launcher.partition=gpu_devel"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "slurm/bouchet.yaml: defaults.time: expected at most 360" in err


# ---- bad inputs that used to hang, flood or slip through ----------------------------------------
NINE_AXES = """\
base: {p: 11, n_epochs: 100}
grid:
  model_seed: &ten [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
  data_seed: *ten
  d_model: &wide [16, 32, 48, 64, 80, 96, 112, 128, 144, 160]
  d_mlp: *wide
  n_epochs: [10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
  eval_every: *ten
  checkpoint_every: *ten
  warmup_epochs: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
  lr: [0.001, 0.002, 0.003, 0.004, 0.005, 0.006, 0.007, 0.008, 0.009, 0.01]
"""


def test_a_grid_over_max_runs_is_refused_before_it_is_expanded(write_spec, monkeypatch,
                                                                 capsys):
    """9 axes x 10 values (anchors reused) are 10^9 runs: refused from the product of the axis
    lengths, never expanded (expanding would hang), in one line naming the key to raise."""
    import grokhpc.sweep as sweep_mod
    from grokhpc import launch as launch_mod

    monkeypatch.setattr(sweep_mod, "_expand", lambda *a: pytest.fail("the grid was expanded"))
    path = write_spec(NINE_AXES)
    assert launch_mod.main([str(path), "--dry-run", "--executor", "local"]) == 2
    n = 10 ** 9
    assert capsys.readouterr().err == (
        f"error: {path}: grid: expected at most launcher.max_runs (100,000) runs, got {n:,}; to "
        f"launch that many, set launcher.max_runs: {n} in the spec (or --set "
        f"launcher.max_runs={n})\n")


def test_max_runs_counts_grid_and_zip_and_can_be_raised_as_the_error_says(write_spec):
    """3 weight decays x 2 zipped (train_frac, lr) pairs = 6 runs, over a cap of 5; the
    advice (the spec's launcher.max_runs, or --set) lets the 6 through."""
    text = GOOD.replace("runs_per_job: 2", "runs_per_job: 2\n  max_runs: 5").replace(
        "model_seed: [1, 2, 3]", "model_seed: [1]").replace("[0.1, 1.0]", "[0.1, 0.3, 1.0]")
    msg = fails(write_spec, text, "grid: expected at most launcher.max_runs (5) runs, got 6")
    assert msg.endswith("set launcher.max_runs: 6 in the spec (or --set launcher.max_runs=6)")
    path = write_spec(text)
    assert len(load_sweep(path, ["launcher.max_runs=6"]).runs) == 6
    assert len(load_sweep(write_spec(text.replace("max_runs: 5", "max_runs: 6"))).runs) == 6
    with pytest.raises(ConfigError) as e:
        load_sweep(path, ["launcher.max_runs=0"])
    assert str(e.value) == ("--set: launcher.max_runs: expected an integer >= 1 (runs in a "
                            "sweep), got 0")
    assert LauncherSettings().max_runs == 100_000


def laughs(levels: int) -> str:
    """A list nested ``levels`` deep through YAML aliases: 9^levels strings from a few lines."""
    names = [f"l{i}" for i in range(levels)]
    items = ["&l0 [" + ", ".join(["lol"] * 9) + "]"]
    items += [f"&{b} [" + ", ".join([f"*{a}"] * 9) + "]" for a, b in zip(names, names[1:])]
    return "[" + ", ".join(items) + "]"


@pytest.mark.parametrize("where", ["description", "zip", "launcher.extra", "figures"])
def test_a_huge_value_is_echoed_in_at_most_about_200_characters(write_spec, where):
    """A value nested through aliases (9^7 strings, a 40 MB repr) or a 20,000-character key is
    cut with an ellipsis in the one error line."""
    bomb = laughs(7)
    text = {"description": f"description: {bomb}\ngrid: {{model_seed: [1, 2]}}\n",
            "zip": f"zip: [{bomb}]\n",
            "launcher.extra": f"grid: {{model_seed: [1]}}\nlauncher: {{extra: {{x: {bomb}}}}}\n",
            "figures": f"grid: {{model_seed: [1]}}\nfigures:\n  ? {'f' * 20_000}\n  : 1\n"
            }[where]
    msg = fails(write_spec, text)
    path = str(write_spec(text))
    assert len(msg) < len(path) + 400, len(msg)
    assert msg.endswith("\u2026") or "\u2026:" in msg, msg
    if where != "figures":
        assert "got [['lol', 'lol'" in msg


def test_huge_integers_are_one_short_line(write_spec):
    """Past Python's 4300 digits a decimal integer cannot be read (PyYAML's ValueError) and a
    hexadecimal one cannot be shown."""
    msg = fails(write_spec, "grid: {model_seed: [1]}\nlauncher: {gpus: -" + "9" * 5000 + "}\n")
    assert msg.endswith(": line 2: an integer of 5,001 characters, too long to read")
    msg = fails(write_spec, "grid: {model_seed: [1]}\nlauncher: {gpus: -0x" + "f" * 5000 + "}\n",
                "launcher.gpus: expected an integer >= 0, got <int too large to show>")
    assert len(msg) < 300, msg


MERGE_BOMB = """\
grid: {model_seed: [1]}
description: [&m0 {k0: 0}, MERGES]
"""


def test_yaml_merge_keys_cannot_blow_up_the_load(write_spec, tmp_path):
    """Each mapping merges the one before it twice: 2^40 entries if merges were copied. The load
    stays small (RLIMIT_AS of 1 GB, so a blow-up is a MemoryError, not a hang) and the spec is
    refused in one line: PyYAML >= 6.0.4 merges each key once (the description, a list of
    mappings, is no string); an older one meets grokhpc's cap on a mapping's keys."""
    import subprocess
    import sys

    merges = ", ".join(f"&m{i} {{<<: [*m{i - 1}, *m{i - 1}], k{i}: {i}}}" for i in range(1, 41))
    path = write_spec(MERGE_BOMB.replace("MERGES", merges))
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (2**30, 2**30)); "
            "from grokhpc import launch; sys.exit(launch.main([sys.argv[1], '--dry-run', "
            "'--executor', 'local']))")
    r = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.count("\n") == 1 and len(r.stderr) < len(str(path)) + 400
    assert (f"{path}: description: expected a string, got [{{'k0': 0}}, {{'k0': 0, 'k1': 1}}"
            in r.stderr) or "keys (merge keys << included), over 10,000" in r.stderr


def test_a_mapping_over_the_key_cap_is_one_line(write_spec):
    keys = ", ".join(f"k{i}: {i}" for i in range(10_001))
    msg = fails(write_spec, f"grid: {{model_seed: [1]}}\nbase: {{<<: {{{keys}}}}}\n")
    assert msg.endswith("line 2: a mapping of 10,001 keys (merge keys << included), over 10,000")


def test_out_through_an_existing_file_and_an_empty_out_are_refused(write_spec, tmp_path,
                                                                  capsys):
    """out naming a file passed the dry run and the launch raised FileExistsError; an empty
    --set out= was ignored. Both are one line, dry run or not, and the file is left as it was."""
    from grokhpc import launch as launch_mod

    f = tmp_path / "results.txt"
    f.write_text("keep me\n")
    spec = write_spec(GOOD.replace("out: runs/good", f"out: {f}"))
    for extra in (["--dry-run"], []):
        assert launch_mod.main([str(spec), *extra]) == 2
        assert capsys.readouterr().err == (f"error: {spec}: out: expected a directory path, got "
                                           f"'{f}': an existing file\n")
    assert launch_mod.main([str(spec), "--dry-run", "--set", f"out={f}/sweep"]) == 2
    assert capsys.readouterr().err == (f"error: --set: out: expected a directory path, got "
                                       f"'{f}/sweep': {f} is an existing file\n")
    assert f.read_text() == "keep me\n" and sorted(tmp_path.iterdir()) == [f, spec]
    for empty in ("out=", "out= "):
        assert launch_mod.main([str(spec), "--dry-run", "--set", empty]) == 2
        assert capsys.readouterr().err == (f"error: --set: out: expected a directory path, got "
                                           f"{empty[4:]!r}\n")
    # out is taken as typed: a directory named 2024, relative to the current directory
    assert load_sweep(spec, ["out=2024"], cwd=tmp_path).out == tmp_path / "2024"
