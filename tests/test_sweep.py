"""Sweep specs: every validation failure is one line naming the file and the key; expansion
gives the Cartesian product (with zip groups) and each run its RunConfig, run_id and directory."""

import itertools
from pathlib import Path

import pytest

from grokhpc.config import ConfigError, RunConfig
from grokhpc.sweep import (LauncherSettings, load_profile, load_sweep, pack, parse_minutes,
                           resolve_launcher, shape_key)

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
    for f in root.glob("*.yaml"):
        sweep = load_sweep(f)
        assert len(sweep.runs) >= 2, f
    wd = load_sweep(root / "wd_sweep.yaml")
    assert "weight_decay" in wd.axes and {"model_seed", "data_seed"} & set(wd.axes)
    # the seed configuration apart from the swept fields
    seed = RunConfig()
    for r in wd.runs:
        assert (r.config.p, r.config.d_model, r.config.n_epochs) == (seed.p, seed.d_model,
                                                                     seed.n_epochs)
