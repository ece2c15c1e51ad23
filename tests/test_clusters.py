"""Specs state their GPU needs, cluster profiles choose: every shipped sweep dry-runs on every
shipped cluster with ``--cluster`` alone; GPU type preferences against each profile's type
order; a type or partition named explicitly still wins (or fails in one line); closed clusters
and reserved partitions are said in one line with the alternative."""

import io
import re
from pathlib import Path

import pytest

from grokhpc import launch as launch_mod
from grokhpc.clusters import access_notes, load_profile, resolve_launcher
from grokhpc.config import ConfigError
from grokhpc.plan import GPUS
from grokhpc.sweep import LauncherSettings, load_sweep, parse_launcher

ROOT = Path(__file__).resolve().parent.parent
SHIPPED_SWEEPS = sorted(str(p.relative_to(ROOT / "sweeps"))   # sweeps/repro/ too
                        for p in (ROOT / "sweeps").rglob("*.yaml"))
CLUSTERS = ("bouchet", "mccleary", "grace")


@pytest.mark.parametrize("cluster", CLUSTERS)
@pytest.mark.parametrize("spec", SHIPPED_SWEEPS)
def test_every_shipped_sweep_dry_runs_on_every_cluster(spec, cluster, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)   # the sweep's out dir resolves here; nothing may be written
    path = ROOT / "sweeps" / spec
    buf = io.StringIO()
    plan = launch_mod.launch(str(path), cluster=cluster, dry_run=True, out=buf)
    text = buf.getvalue()
    profile, launcher = plan["profile"], plan["launcher"]
    assert plan["executor"] == "slurm" and profile.name == cluster
    assert not any(tmp_path.iterdir())
    part = profile.partition(launcher.partition)
    assert part is not None and f"#SBATCH --partition={part.name}" in text
    if (launcher.gpus or 0) > 0:
        assert part.gpus and launcher.gpu_type in part.gpu_types
        assert f"#SBATCH --gpus={launcher.gpu_type}:{launcher.gpus}" in text
    # every run is planned into exactly one job, and the ids are the spec's own
    planned = sorted(r.run_id for g in plan["groups"] for r in g)
    assert planned == sorted(r.run_id for r in load_sweep(path).runs)
    if launcher.runs_per_job == "auto" and (launcher.gpus or 0) > 0:
        assert any(ln.startswith("plan: ") for ln in text.splitlines())


def test_shipped_gpu_sweeps_name_preferences_not_a_partition():
    for spec in SHIPPED_SWEEPS:
        launcher = load_sweep(ROOT / "sweeps" / spec).launcher
        assert launcher.partition is None, spec
        if launcher.gpus:
            assert launcher.gpu_type == ("h100", "a100", "any"), spec


def test_preferences_pick_the_first_type_the_cluster_has():
    want = {"bouchet": ("h100", "gpu_h100"), "mccleary": ("a100", "gpu"), "grace": ("a100", "gpu")}
    for name, (gpu_type, partition) in want.items():
        got = resolve_launcher(LauncherSettings(gpus=1, gpu_type=("h100", "a100", "any")),
                               load_profile(name), "s.yaml")
        assert (got.gpu_type, got.partition) == (gpu_type, partition), name
    b = load_profile("bouchet")
    got = resolve_launcher(LauncherSettings(gpus=1, gpu_type=("v100", "h200")), b, "s.yaml")
    assert (got.gpu_type, got.partition) == ("h200", "gpu_h200")
    got = resolve_launcher(LauncherSettings(gpus=1, gpu_type=("v100", "any")),
                           load_profile("grace"), "s.yaml")
    assert (got.gpu_type, got.partition) == ("v100", "gpu")


def test_no_gpu_type_or_any_takes_the_profile_default_partition_and_first_type():
    for name in CLUSTERS:
        pr = load_profile(name)
        first_type, first_part = pr.type_order()[0]
        assert first_part == pr.gpu_partition   # the order starts on the default partition
        for gpu_type in (None, "any", ("any",)):
            got = resolve_launcher(LauncherSettings(gpus=1, gpu_type=gpu_type), pr, "s.yaml")
            assert (got.gpu_type, got.partition) == (first_type, pr.gpu_partition)


def test_every_profile_type_order_names_known_gpus_on_their_partitions():
    for name in CLUSTERS:
        pr = load_profile(name)
        assert pr.gpu_types, name
        for t, pname in pr.type_order():
            assert t in GPUS and t in pr.partition(pname).gpu_types


def test_a_named_partition_takes_the_first_preference_it_has():
    b = load_profile("bouchet")
    got = resolve_launcher(LauncherSettings(gpus=1, partition="scavenge_gpu",
                                            gpu_type=("a100", "l40s", "any")), b, "s.yaml")
    assert (got.gpu_type, got.partition) == ("l40s", "scavenge_gpu")
    got = resolve_launcher(LauncherSettings(gpus=1, partition="gpu", gpu_type=("any",)), b, "s")
    assert (got.gpu_type, got.partition) == ("l40s", "gpu")   # the profile's order: l40s first
    with pytest.raises(ConfigError) as e:
        resolve_launcher(LauncherSettings(gpus=1, partition="gpu_h200",
                                          gpu_type=("h100", "a100")), b, "s.yaml")
    assert str(e.value) == ("s.yaml: launcher.gpu_type: expected one of h200 on gpu_h200 "
                            "(or any), got ['h100', 'a100']")


def test_a_single_type_named_still_wins_or_fails_in_one_line(write_spec, tmp_path):
    b = load_profile("bouchet")
    got = resolve_launcher(LauncherSettings(gpus=1, gpu_type="h200"), b, "s.yaml")
    assert (got.gpu_type, got.partition) == ("h200", "gpu_h200")
    with pytest.raises(ConfigError, match=r"^s.yaml: launcher.gpu_type: expected one of h200 "
                                          r"on gpu_h200, got 'h100'$"):
        resolve_launcher(LauncherSettings(gpus=1, partition="gpu_h200", gpu_type="h100"), b,
                         "s.yaml")
    spec = ROOT / "sweeps" / "wd_sweep.yaml"
    with pytest.raises(ConfigError) as e:
        launch_mod.launch(str(spec), cluster="mccleary", dry_run=True, out=io.StringIO(),
                          overrides=["launcher.gpu_type=h100"])
    assert str(e.value) == (f"{spec}: launcher.gpu_type: expected one of a100, a5000, rtx3090, "
                            "rtx5000 on mccleary (or any, or set launcher.partition), got 'h100'")
    with pytest.raises(ConfigError, match=r"launcher.partition: expected a partition of mccleary"):
        launch_mod.launch(str(spec), cluster="mccleary", dry_run=True, out=io.StringIO(),
                          overrides=["launcher.partition=gpu_h100"])
    plan = launch_mod.launch(str(spec), cluster="mccleary", dry_run=True, out=io.StringIO(),
                             overrides=["launcher.partition=scavenge_gpu"])
    assert (plan["launcher"].partition, plan["launcher"].gpu_type) == ("scavenge_gpu", "a100")


def test_gpu_type_lists_are_validated_in_one_line():
    assert parse_launcher({"gpu_type": ["H100", "any"]}, "s").gpu_type == ("h100", "any")
    for bad in ([], [""], ["h100", 3], {"a": 1}):
        with pytest.raises(ConfigError, match=r"^s: launcher.gpu_type: expected a GPU type or "
                                              r"a list of them"):
            parse_launcher({"gpu_type": bad}, "s")


def test_closed_clusters_and_reserved_partitions_are_said_in_one_line():
    m, g, b = (load_profile(n) for n in ("mccleary", "grace", "bouchet"))
    gpu = resolve_launcher(LauncherSettings(gpus=1), m, "s")
    assert access_notes(gpu, m) == ["note: mccleary: since June 1, 2026 only YCGA, CryoEM and "
                                    "dedicated-node groups may use it; others: --cluster bouchet"]
    assert access_notes(resolve_launcher(LauncherSettings(gpus=1), g, "s"), g)[0].endswith(
        "; others: --cluster bouchet")
    assert access_notes(resolve_launcher(LauncherSettings(gpus=1), b, "s"), b) == []
    ycga = resolve_launcher(LauncherSettings(gpus=0, partition="ycga"), m, "s")
    assert access_notes(ycga, m)[1] == ("note: mccleary ycga: reserved to YCGA (genomics) "
                                        "groups; others: launcher.partition=day")
    buf = io.StringIO()
    launch_mod.launch(str(ROOT / "sweeps" / "wd_sweep.yaml"), cluster="grace", dry_run=True,
                      out=buf)
    notes = [ln for ln in buf.getvalue().splitlines() if ln.startswith("note: grace")]
    assert len(notes) == 1 and "others: --cluster bouchet" in notes[0]


def test_a_profile_type_order_on_a_partition_without_that_type_is_one_line(tmp_path):
    from grokhpc.clusters import parse_profile
    f = tmp_path / "c.yaml"
    text = ("gpu_partition: g\ngpu_types: {h100: g}\n"
            "partitions:\n  g: {gpus: true, gpu_types: [a100]}\n")
    with pytest.raises(ConfigError, match=re.escape(f"{f}: gpu_types.h100: expected a GPU "
                                                    "partition with h100, got 'g'")):
        parse_profile(text, str(f), "c", f)
