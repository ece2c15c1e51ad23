"""RunConfig: seed defaults, stable run ids, and one clear error per bad value."""

import json
import math

import pytest

from grokhpc.config import ConfigError, RunConfig, from_dict, is_prime, load_json, parse_overrides


def test_defaults_are_the_seed_notebook():
    c = RunConfig()
    assert (c.p, c.op, c.train_frac, c.data_seed, c.model_seed) == (113, "sub", 0.3, 598, 999)
    assert (c.n_heads, c.d_model, c.d_head, c.d_mlp) == (4, 128, 32, 512)
    assert (c.lr, c.weight_decay, c.betas, c.n_epochs) == (1e-3, 1.0, (0.9, 0.98), 25_000)
    assert (c.checkpoint_every, c.loss_dtype, c.d_vocab) == (100, "float64", 114)


def test_run_id_is_stable_and_follows_the_science_not_the_device():
    a, b = RunConfig(), RunConfig()
    assert a.run_id == b.run_id and len(a.run_id) == 12
    int(a.run_id, 16)  # hex
    assert RunConfig(device="cpu").run_id == a.run_id
    ids = {RunConfig(weight_decay=w).run_id for w in (0.1, 0.3, 1.0)}
    assert len(ids) == 3
    # the id survives a round trip through config.json
    again = from_dict(json.loads(json.dumps({k: v for k, v in a.identity().items()})))
    assert again.run_id == a.run_id


def test_is_prime_matches_trial_division():
    primes = [n for n in range(200) if n > 1 and all(n % d for d in range(2, n))]
    assert [n for n in range(200) if is_prime(n)] == primes


@pytest.mark.parametrize("field,value,words", [
    ("p", 100, "prime"), ("p", 2, "prime"), ("p", 1, "prime"),
    ("train_frac", 0.0, "(0, 1)"), ("train_frac", 1.0, "(0, 1)"), ("train_frac", 1.5, "(0, 1)"),
    ("train_frac", -0.2, "(0, 1)"), ("weight_decay", -1e-3, "non-negative"),
    ("lr", 0.0, "positive"), ("n_epochs", 0, ">= 1"), ("op", "pow", "one of"),
    ("betas", [0.9, 1.0], "[0, 1)"), ("checkpoint_every", 0, ">= 1"),
])
def test_bad_values_name_the_source_and_field(field, value, words):
    with pytest.raises(ConfigError) as e:
        from_dict({field: value}, source="spec.yaml")
    msg = str(e.value)
    assert msg.startswith(f"spec.yaml: {field}: expected") and words in msg
    assert "\n" not in msg


@pytest.mark.parametrize("field,value", [("p", "113x"), ("p", 11.5), ("n_epochs", True),
                                         ("op", 3), ("betas", [0.9]), ("lr", "fast")])
def test_bad_types_are_rejected(field, value):
    with pytest.raises(ConfigError, match=f"spec.yaml: {field}: expected"):
        from_dict({field: value}, source="spec.yaml")


def test_unknown_field_lists_known_ones():
    with pytest.raises(ConfigError, match=r"spec.yaml: wieght_decay: unknown field \(known: .*weight_decay"):
        from_dict({"wieght_decay": 1.0}, source="spec.yaml")


def test_yaml_style_values_are_coerced():
    c = from_dict({"lr": "1e-3", "p": 97.0, "betas": [0.9, 0.99]})
    assert c.lr == 1e-3 and c.p == 97 and isinstance(c.p, int) and c.betas == (0.9, 0.99)


def test_overrides_parse_as_yaml_scalars():
    assert parse_overrides(["lr=3e-3", "p=97", "betas=[0.9, 0.99]", "op=add"]) == {
        "lr": 3e-3, "p": 97, "betas": [0.9, 0.99], "op": "add"}
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["lr"])


def test_load_json_reports_corrupt_file(tmp_path):
    f = tmp_path / "config.json"
    f.write_text('{"p": 113,')
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        load_json(f)


def test_frozen():
    with pytest.raises(Exception):
        RunConfig().p = 7  # type: ignore[misc]
    assert math.isclose(RunConfig().replace(p=7).p, 7)


def test_load_json_reads_a_run_directory_config_and_checks_its_run_id(tmp_path):
    cfg = RunConfig(p=13, weight_decay=0.3)
    f = tmp_path / "config.json"
    f.write_text(json.dumps({**cfg.identity(), "device": "cpu", "run_id": cfg.run_id}))
    assert load_json(f) == cfg.replace(device="cpu")
    f.write_text(json.dumps({**cfg.identity(), "run_id": "0123456789ab"}))
    with pytest.raises(ConfigError, match=rf"config.json: run_id: expected {cfg.run_id}"):
        load_json(f)
    f.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_json(f)


def test_a_grid_too_large_for_memory_is_refused_with_what_it_needs():
    # p = 1,000,003 is prime; its p^3 logits alone are ~2e19 bytes
    with pytest.raises(ConfigError) as e:
        RunConfig(p=1_000_003)
    msg = str(e.value)
    assert msg.startswith("run config: p: expected a prime whose p x p grid fits in memory")
    assert "1000003" in msg and "GiB" in msg and "\n" not in msg
    # the bound is p^2 * (... + 20 p) bytes: at p = 3,001 that is > 1 TiB, at 113 a few MiB
    with pytest.raises(ConfigError, match="grid fits in memory"):
        RunConfig(p=4_001)
    assert RunConfig(p=1_009).p == 1_009


NEW_FIELDS = {"optimizer": "adam", "momentum": 0.0, "warmup_epochs": 50, "lr_schedule": "cosine",
              "batch_size": 64, "n_layers": 2, "act_fn": "gelu", "normalization": "LN",
              "init_scale": 3.0, "fixed_weight_norm": True, "label_noise": 0.1,
              "stop_after_grok": 100}


def test_new_fields_at_their_defaults_leave_run_ids_unchanged():
    # run ids from before these fields existed (the seed's and two others)
    assert RunConfig().run_id == "2c3d4cea9af7"
    explicit = from_dict({"optimizer": "adamw", "momentum": 0, "warmup_epochs": 0,
                          "lr_schedule": "constant", "batch_size": "full", "n_layers": 1,
                          "act_fn": "relu", "normalization": "none", "init_scale": 1,
                          "fixed_weight_norm": False, "label_noise": 0,
                          "stop_after_grok": None})
    assert explicit.run_id == "2c3d4cea9af7"
    # and any new field away from its default gives a new id
    ids = {RunConfig().run_id}
    for k, v in NEW_FIELDS.items():
        if k == "momentum":
            cfg = RunConfig(optimizer="sgd", momentum=0.9)
        else:
            cfg = from_dict({k: v})
        ids.add(cfg.run_id)
    assert len(ids) == len(NEW_FIELDS) + 1


def test_shipped_sweeps_keep_their_run_ids():
    from pathlib import Path

    from grokhpc.sweep import load_sweep

    # the quickstart's base and grid, written out: these four ids must not move
    quick = RunConfig(p=37, op="add", d_model=64, d_head=16, n_heads=4, d_mlp=256, lr=1e-2,
                      weight_decay=1.0, n_epochs=1000, stop_after_grok=200,
                      checkpoint_every=50, eval_every=10)
    quick_ids = {"0173c7586822", "2b1f2eb245fa", "1dd87fedfdb7", "d06f9fbe7d9e"}
    assert {quick.replace(train_frac=f, model_seed=s).run_id
            for f in (0.3, 0.6) for s in (1, 2)} == quick_ids
    expected = {"quickstart.yaml": quick_ids}
    sweeps = Path(__file__).resolve().parent.parent / "sweeps"
    for name, ids in expected.items():
        assert {r.run_id for r in load_sweep(sweeps / name).runs} == ids
    wd = load_sweep(sweeps / "wd_sweep.yaml")
    assert "2c3d4cea9af7" in {r.run_id for r in wd.runs}


@pytest.mark.parametrize("changes,field,words", [
    ({"optimizer": "rmsprop"}, "optimizer", "one of adamw, adam, sgd"),
    ({"momentum": 0.9}, "momentum", "0 unless optimizer is sgd"),
    ({"optimizer": "sgd", "momentum": 1.0}, "momentum", "[0, 1)"),
    ({"warmup_epochs": -1}, "warmup_epochs", ">= 0"),
    ({"lr_schedule": "step"}, "lr_schedule", "constant, cosine"),
    ({"batch_size": 0}, "batch_size", "full or an integer in 1..3830"),
    ({"batch_size": 5000}, "batch_size", "1..3830"),
    ({"batch_size": "half"}, "batch_size", "full or an integer"),
    ({"n_layers": 0}, "n_layers", "1..4"), ({"n_layers": 5}, "n_layers", "1..4"),
    ({"act_fn": "tanh"}, "act_fn", "relu, gelu"),
    ({"normalization": "RMS"}, "normalization", "none, LN"),
    ({"init_scale": 0}, "init_scale", "positive"),
    ({"fixed_weight_norm": "yes"}, "fixed_weight_norm", "true or false"),
    ({"label_noise": 1.0}, "label_noise", "[0, 1)"),
    ({"stop_after_grok": -5}, "stop_after_grok", ">= 0"),
    ({"op": "s5", "p": 7}, "p", "does not apply to op s5"),
    ({"op": "quad9"}, "op", "quad1"),
])
def test_new_fields_refuse_impossible_values_in_one_line(changes, field, words):
    with pytest.raises(ConfigError) as e:
        from_dict(changes, source="spec.yaml: base")
    msg = str(e.value)
    assert msg.startswith(f"spec.yaml: base: {field}: ") and words in msg and "\n" not in msg


def test_s5_runs_have_120_classes_and_no_p():
    cfg = from_dict({"op": "s5aba"})
    assert (cfg.n_classes, cfg.d_vocab, cfg.n_pairs) == (120, 121, 14400)
    assert "p" not in cfg.identity()
    assert from_dict({"stop_after_grok": "off"}).stop_after_grok is None


# ---- non-finite numbers, long values, a field given twice ---------------------------------------
# The float fields, from the defaults themselves: a float, or a pair of floats.
FLOAT_DEFAULTS = [f.name for f in __import__("dataclasses").fields(RunConfig)
                  if isinstance(f.default, float) or (isinstance(f.default, tuple)
                                                      and all(isinstance(x, float)
                                                              for x in f.default))]


def test_the_float_fields_are_the_ones_checked():
    assert set(FLOAT_DEFAULTS) == {"train_frac", "lr", "weight_decay", "betas", "momentum",
                                   "init_scale", "label_noise", "grokfast_alpha",
                                   "grokfast_lamb"}


@pytest.mark.parametrize("field", FLOAT_DEFAULTS)
@pytest.mark.parametrize("text", ["inf", "-inf", "nan", ".inf", "1e999"])
def test_non_finite_numbers_are_refused_in_every_float_field(field, text):
    value = f"[{text}, 0.9]" if field == "betas" else text
    with pytest.raises(ConfigError) as e:
        from_dict(parse_overrides([f"{field}={value}"]), source="--set")
    msg = str(e.value)
    expected = "two finite numbers in [0, 1)" if field == "betas" else "a finite number"
    assert msg.startswith(f"--set: {field}: expected {expected}, got ") and "\n" not in msg
    number = float(text.lstrip("."))
    with pytest.raises(ConfigError, match=f"{field}: expected"):   # the API alike
        RunConfig(**{field: (number, 0.9) if field == "betas" else number})


def billion_laughs(levels: int) -> str:
    """A YAML list whose aliases expand to 9**levels items (shared, so cheap to load)."""
    anchors = ["&a0 [x,x,x,x,x,x,x,x,x]"]
    anchors += [f"&a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "[" + ",".join(anchors) + "]"


def test_a_value_echoed_in_an_error_is_cut_to_a_short_line():
    import yaml

    laughs = billion_laughs(9)                       # 9**9 = 387 million leaves if expanded
    assert len(yaml.safe_load(laughs)[-1]) == 9       # YAML shares them: no expansion here
    with pytest.raises(ConfigError) as e:
        from_dict(parse_overrides([f"p={laughs}"]), source="--set")
    msg = str(e.value)
    assert msg.startswith("--set: p: expected int, got [['x', ") and msg.endswith("...")
    assert len(msg) <= len("--set: p: expected int, got ") + 200 and "\n" not in msg
    for bad in ({"op": "x" * 5000}, {"y" * 5000: 1}):
        with pytest.raises(ConfigError) as e:
            from_dict(bad, source="spec.yaml")
        got = str(e.value)
        assert "x" * 201 not in got and "y" * 201 not in got and ("x" * 150 in got
                                                                  or "y" * 150 in got)
    with pytest.raises(ConfigError) as e:
        parse_overrides(["z" * 5000])                 # no "=": the item itself is echoed
    assert len(str(e.value)) < 260 and str(e.value).endswith(": expected key=value")


def test_shown_and_clip_cut_with_an_ellipsis():
    from grokhpc.config import clip, shown

    assert shown("abc") == "'abc'" and shown(1.5) == "1.5" and clip("abc") == "abc"
    assert shown("a" * 500) == "'" + "a" * 196 + "..." and len(shown("a" * 500)) == 200
    assert clip("b" * 500, 20) == "b" * 17 + "..."
    assert len(shown(list(range(10**6)))) <= 200


def test_a_field_given_twice_is_refused_and_giving_it_once_works():
    with pytest.raises(ConfigError) as e:
        parse_overrides(["weight_decay=0.1", "lr=3e-3", " weight_decay =0.2"])
    assert str(e.value) == ("--set: weight_decay: given twice ('weight_decay=0.1' and "
                            "' weight_decay =0.2'); give each field once")
    once = from_dict(parse_overrides(["weight_decay=0.2", "lr=3e-3"]), source="--set")
    assert (once.weight_decay, once.lr) == (0.2, 3e-3)
