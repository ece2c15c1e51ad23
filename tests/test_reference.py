"""grokhpc.reference: a spec's published numbers, checked in one line each; the measured-vs-
published table from a hand-built runs table (medians, spreads and ratios worked out by hand,
censored runs as lower bounds); and the table written by aggregate from a sweep's manifest."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from grokhpc import aggregate as agg
from grokhpc.config import ConfigError
from grokhpc.reference import Published, measured_vs_published, summary_lines
from grokhpc.store import atomic_write_json
from grokhpc.sweep import parse_sweep

from test_aggregate import make_sweep


def row(tf, seed, grok, *, epoch=1000, state="done", **kw):
    """A runs.parquet row: ``grok`` None is a run that never grokked (censored at ``epoch``)."""
    return {"run_id": f"{tf}-{seed}", "state": state, "p": 31, "op": "add", "train_frac": tf,
            "model_seed": seed, "batch_size": "full", "epoch": epoch,
            "grokked": None if state != "done" else grok is not None,
            "grokking_epoch": float(grok if grok is not None else epoch), **kw}


def by_arm(table) -> dict[str, dict]:
    return {r["arm"]: r for r in table.to_dict("records")}


def test_medians_spreads_and_ratios_worked_by_hand():
    runs = pd.DataFrame([
        row(0.5, 1, 100), row(0.5, 2, 400), row(0.5, 3, 200),          # all grokked
        row(0.3, 1, 500), row(0.3, 2, None), row(0.3, 3, None),        # two never did
        row(0.3, 4, None, epoch=40, state="running"),                  # not finished
    ])
    pub = Published("paper, Fig. 1", "grokking_epoch", by=("train_frac",),
                    values=(((0.5,), 400.0), ((0.3,), 800.0)))
    t = by_arm(measured_vs_published(runs, [pub], ["train_frac", "model_seed"]))
    assert list(t) == ["train_frac=0.3", "train_frac=0.5"]   # arms ordered by value
    a = t["train_frac=0.5"]
    # sorted 100, 200, 400: median 200; quartiles at positions 0.5 and 1.5 -> 150 and 300
    assert (a["n_runs"], a["n_seeds"], a["n_reached"], a["n_censored"]) == (3, 3, 3, 0)
    assert (a["median"], a["q25"], a["q75"], a["min"], a["max"]) == (200, 150, 300, 100, 400)
    assert not any(a[f"{s}_lower"] for s in ("median", "q25", "q75", "min", "max"))
    assert (a["published"], a["ratio"], a["ratio_lower"]) == (400, 0.5, False)
    b = t["train_frac=0.3"]
    # 500, then two runs known only to take more than 1000 epochs: the median and the upper
    # quartile are lower bounds (1000: the censored runs at their last epoch), the lower
    # quartile lies between 500 and a censored run (>= 500 + 0.5 * 500), the minimum is exact
    assert (b["n_runs"], b["n_seeds"], b["n_reached"], b["n_censored"]) == (4, 3, 1, 2)
    assert (b["median"], b["median_lower"]) == (1000, True)
    assert (b["q25"], b["q25_lower"], b["q75"], b["q75_lower"]) == (750, True, 1000, True)
    assert (b["min"], b["min_lower"], b["max"], b["max_lower"]) == (500, False, 1000, True)
    assert (b["published"], b["ratio"], b["ratio_lower"]) == (800, 1.25, True)
    text = "\n".join(summary_lines(measured_vs_published(runs, [pub], ["train_frac"])))
    assert "train_frac=0.3      3        1  >=1,000" in text and ">=1.25" in text


def test_steps_count_minibatches_and_an_unreached_phase_is_censored():
    # p 31, add: 961 pairs, 480 for training at 0.5; minibatches of 64 -> 8 steps per epoch
    runs = pd.DataFrame([
        row(0.5, 1, 100, batch_size="64", cleanup_end=120.0),
        row(0.5, 2, 300, batch_size="64", cleanup_end=None, epoch=600),
    ])
    steps = Published("paper", "grokking_epoch", unit="step", values=(((), 1600.0),))
    t = measured_vs_published(runs, [steps], ["model_seed"]).iloc[0]
    assert (t["arm"], t["median"], t["min"], t["max"]) == ("all", 1600, 800, 2400)
    assert (t["published"], t["ratio"]) == (1600, 1.0)
    phase = Published("paper", "cleanup_end")   # no number: measured values only
    t = measured_vs_published(runs, [phase], ["model_seed"]).iloc[0]
    assert (t["n_reached"], t["n_censored"], t["min"], t["max"], t["max_lower"]) == \
        (1, 1, 120, 600, True)
    assert t["published"] is None and t["ratio"] is None


SPEC = """\
grid: {train_frac: [0.3, 0.5], model_seed: [1, 2]}
base: {p: 11, n_epochs: 10}
published:
  source: Power et al. 2022, Fig. 1
  metric: grokking_epoch
  by: train_frac
  values: {0.5: 1000}
"""


def test_a_published_section_is_parsed_and_never_changes_run_ids():
    s = parse_sweep(SPEC, "p.yaml")
    assert s.published == (Published("Power et al. 2022, Fig. 1", "grokking_epoch",
                                     by=("train_frac",), values=(((0.5,), 1000.0),)),)
    # as the manifest records it (JSON: a mapping's number keys would come back as text)
    from grokhpc.reference import manifest_published
    man = json.loads(json.dumps({"published": [e.to_dict() for e in s.published],
                                 "runs": [{"swept": r.swept} for r in s.runs]}))
    assert manifest_published(man, "manifest.json") == (s.published, None)
    bare = parse_sweep(SPEC.split("published:")[0], "p.yaml")
    assert [r.run_id for r in s.runs] == [r.run_id for r in bare.runs]
    many = parse_sweep(SPEC.split("published:")[0] + "published:\n"
                       "- {source: a, metric: grokking_epoch, unit: step, values: 10}\n"
                       "- {source: b, metric: cleanup_end}\n", "p.yaml")
    assert many.published == (Published("a", "grokking_epoch", "step", values=(((), 10.0),)),
                              Published("b", "cleanup_end"))


@pytest.mark.parametrize("change, error", [
    (("  by: train_frac", "  by: train_frac\n  colour: red"),
     "p.yaml: published.colour: unknown key (expected one of source, metric, threshold, "
     "unit, by, values, note)"),
    (("metric: grokking_epoch", "metric: test_acc"),
     "p.yaml: published.metric: expected a column of runs.parquet (grokking_epoch, "),
    (("  metric", "  unit: iterations\n  metric"), "p.yaml: published.unit: expected epoch | step"),
    (("metric: grokking_epoch", "metric: final_test_acc\n  unit: step"),
     "p.yaml: published.unit: expected no unit for final_test_acc (a unit is for grokking_epoch"),
    (("source: Power et al. 2022, Fig. 1", "source: ''"), "p.yaml: published.source: expected"),
    (("by: train_frac", "by: lr"),
     "p.yaml: published.by: expected a swept axis other than the seeds (train_frac), got 'lr'"),
    (("by: train_frac", "by: model_seed"), "p.yaml: published.by: expected a swept axis"),
    (("{0.5: 1000}", "{0.4: 1000}"),
     "p.yaml: published.values[0].train_frac: expected a value the sweep gives train_frac "
     "(0.3, 0.5), got 0.4"),
    (("{0.5: 1000}", "{0.5: -3}"), "p.yaml: published.values[0]: expected a positive number"),
    (("{0.5: 1000}", "7"), "p.yaml: published.values: expected a mapping of train_frac"),
    (("{0.5: 1000}", "[1000]"), "p.yaml: published.values: expected a list of [train_frac, "),
    ((SPEC[SPEC.index("published:"):], "published: 7\n"),
     "p.yaml: published: expected a mapping (source"),
])
def test_bad_published_sections_are_one_line_errors(change, error):
    with pytest.raises(ConfigError) as e:
        parse_sweep(SPEC.replace(*change), "p.yaml")
    assert str(e.value).startswith(error) and "\n" not in str(e.value), str(e.value)


def test_aggregate_writes_the_table_from_the_manifest_and_prints_it(tmp_path, capsys):
    root = tmp_path / "sweep"
    truth = make_sweep(root)   # wd x train_frac x data_seed; wd 0.3, tf 0.3: 2 of 3 censored
    man = json.loads((root / "manifest.json").read_text())
    man["published"] = [{"source": "a paper", "metric": "grokking_epoch",
                         "by": ["weight_decay", "train_frac"], "values": [[1.0, 0.5, 10]]}]
    atomic_write_json(root / "manifest.json", man)
    assert agg.main([str(root), "--no-figures"]) == 0
    out = capsys.readouterr().out
    assert "measured vs published: grokking_epoch in epochs; a paper" in out
    t = by_arm(pd.read_parquet(root / "aggregate" / "reference.parquet"))
    csv = pd.read_csv(root / "aggregate" / "reference.csv")
    assert list(csv["arm"]) == list(t) and list(csv["median"]) == [r["median"] for r in t.values()]
    assert len(t) == 4   # the arms: weight_decay x train_frac, over the three data seeds
    for (wd, tf), arm in {(1.0, 0.5): "weight_decay=1.0, train_frac=0.5",
                          (0.3, 0.3): "weight_decay=0.3, train_frac=0.3"}.items():
        groks = sorted(g for w, f, _, g in truth.values() if (w, f) == (wd, tf) and g)
        r = t[arm]
        assert (r["n_seeds"], r["n_reached"]) == (3, len(groks))
        if len(groks) == 3:
            assert r["median"] == groks[1] and not r["median_lower"]
            assert r["ratio"] == pytest.approx(groks[1] / 10) and r["published"] == 10
        else:   # one grokked, two ran their 100 epochs without: the median is >= 100
            assert (r["median"], r["median_lower"], r["min"]) == (100, True, groks[0])
            assert pd.isna(r["published"])
    # a manifest whose section is no longer valid: one note, no table, the runs still tabled
    man["published"][0]["metric"] = "accuracy"
    atomic_write_json(root / "manifest.json", man)
    res = agg.aggregate([root], formats=None, log=None)
    assert any("published[0].metric: expected a column" in n for n in res.notes)
    assert not (root / "aggregate" / "reference.parquet").exists() and res.n_runs == 12


def test_launch_help_stays_light():
    code = ("import sys, grokhpc.sweep, grokhpc.reference; print(sorted(m for m in ('torch', "
            "'pyarrow', 'pandas') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_a_zip_may_repeat_a_value_but_not_a_row():
    # the Grokfast table's arms: a filter off at three weight decays, on at one each
    zipped = ("base: {p: 11, grad_filter: ma}\nzip:\n  grad_filter: [none, ema, ma, none]\n"
              "  grokfast_lamb: [2.0, 2.0, 5.0, 2.0]\n  weight_decay: [0.0, 0.005, 0.01, 0.01]\n")
    s = parse_sweep(zipped, "z.yaml")
    assert [(r.config.grad_filter, r.config.grokfast_lamb, r.config.weight_decay)
            for r in s.runs] == [("none", 2.0, 0.0), ("ema", 2.0, 0.005), ("ma", 5.0, 0.01),
                                 ("none", 2.0, 0.01)]
    with pytest.raises(ConfigError, match=r"z.yaml: grid: runs 0 and 3 are the same run"):
        parse_sweep(zipped.replace("0.01, 0.01]", "0.01, 0.0]"), "z.yaml")


def test_every_reproduction_preset_has_published_numbers_and_a_cpu_twin():
    from grokhpc.sweep import load_sweep

    repro = Path(__file__).resolve().parent.parent / "sweeps" / "repro"
    specs = sorted(repro.glob("*.yaml"))
    full = [p for p in specs if not p.stem.endswith("_cpu")]
    assert len(full) >= 3 and {p.stem + "_cpu" for p in full} <= {p.stem for p in specs}
    for p in specs:
        s = load_sweep(p)
        assert s.published and all(e.source for e in s.published), p.name
        assert s.out.parts[-2:] == ("repro", p.stem), p.name


def test_a_threshold_reads_the_first_epoch_at_that_accuracy_from_the_curves(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    # run a: test accuracy 0.5, 0.96 at epoch 20, 0.995 at 40; run b: 0.97 from 30, never 0.99
    for rid, accs in {"a": [0.1, 0.5, 0.96, 0.98, 0.995], "b": [0.1, 0.5, 0.6, 0.97, 0.98]}.items():
        pq.write_table(pa.table({"epoch": [0, 10, 20, 30, 40], "test_acc": accs}),
                       tmp_path / f"{rid}.parquet")
    runs = pd.DataFrame([{**row(0.5, 1, 40, epoch=40), "run_id": "a"},
                         {**row(0.5, 2, None, epoch=40), "run_id": "b"}])
    at95 = Published("paper", "grokking_epoch", threshold=0.95)
    t = measured_vs_published(runs, [at95, Published("paper", "grokking_epoch")], ["model_seed"],
                              tmp_path)
    a, b = t.to_dict("records")
    assert (a["threshold"], a["n_reached"], a["median"], a["min"], a["max"]) == \
        (0.95, 2, 25, 20, 30)
    assert (b["n_reached"], b["min"], b["max"], b["max_lower"]) == (1, 40, 40, True)  # 0.99
    assert "grokking_epoch (test accuracy >= 0.95) in epochs" in "\n".join(summary_lines(t))
    with pytest.raises(ConfigError, match=r"p.yaml: published.threshold: expected a test "
                                          r"accuracy in \(0, 1\], with metric grokking_epoch"):
        parse_sweep(SPEC.replace("  by:", "  threshold: 95\n  by:"), "p.yaml")


def test_an_accuracy_is_compared_without_a_unit_and_survives_the_manifest():
    """final_test_acc is no count of epochs: parsed with no unit, printed with none, and the
    manifest's copy parses back the same."""
    from grokhpc.reference import manifest_published

    s = parse_sweep(SPEC.replace("metric: grokking_epoch", "metric: final_test_acc")
                    .replace("{0.5: 1000}", "{0.5: 0.9}"), "p.yaml")
    (pub,) = s.published
    assert (pub.metric, pub.unit) == ("final_test_acc", "")
    runs = pd.DataFrame([row(0.5, 1, 100, final_test_acc=0.8), row(0.5, 2, 100, final_test_acc=0.6)])
    text = "\n".join(summary_lines(measured_vs_published(runs, [pub], ["train_frac"])))
    assert "measured vs published: final_test_acc; " in text and " in epochs" not in text
    man = json.loads(json.dumps({"published": [p.to_dict() for p in s.published],
                                 "runs": [{"swept": r.swept} for r in s.runs]}))
    assert manifest_published(man, "manifest.json") == (s.published, None)


def test_steps_per_epoch_of_a_dataset_run_count_its_own_training_rows():
    """An image dataset trains on n_samples images, sparse parity on its share of n_samples."""
    from grokhpc.reference import steps_per_epoch

    digits = {"p": 113, "op": "digits", "train_frac": 0.3, "model": "mlp", "n_samples": 1000,
              "batch_size": "200"}
    parity = {"p": 113, "op": "sparse_parity", "train_frac": 0.5, "model": "mlp",
              "n_samples": 2000, "n_bits": 20, "k_bits": 3, "batch_size": "64"}
    assert steps_per_epoch(digits) == 5                      # 1000 / 200
    assert steps_per_epoch(parity) == 16                     # ceil(1000 / 64)
