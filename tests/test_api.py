"""grokhpc.open_run / open_sweep: the README's notebook example run as written, checkpoint weights
against the trainer's own losses and state, the nearest-checkpoint rule, one-line errors, and
that reading a run or a sweep never imports torch."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import grokhpc
from grokhpc.api import NearestCheckpointWarning, SweepError
from grokhpc.config import to_dict
from grokhpc.store import RunDir, RunDirError

REPO = Path(__file__).resolve().parent.parent
SECTION = "## In a notebook"


def readme_blocks() -> list[tuple[str, str]]:
    """The (language, code) blocks of the README's notebook section, in order."""
    text = (REPO / "README.md").read_text()
    assert SECTION in text, f"README.md has no '{SECTION}' section"
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(bash|python)\n(.*?)```", section, re.S)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    """Run the README example as written in an empty directory: (directory, python output)."""
    work = tmp_path_factory.mktemp("readme")
    blocks = readme_blocks()
    assert [lang for lang, _ in blocks] == ["bash", "python"]
    outputs = []
    for lang, code in blocks:
        cmd = ["bash", "-e", "-c", code] if lang == "bash" else [sys.executable, "-c", code]
        r = subprocess.run(cmd, cwd=work, env=_env(), capture_output=True, text=True)
        if r.returncode != 0:
            pytest.fail(f"README {lang} block failed (exit {r.returncode}):\n{r.stdout}\n"
                        f"{r.stderr}", pytrace=False)
        outputs.append(r.stdout)
    return work, outputs[1]


@pytest.fixture(scope="module")
def run(example):
    return grokhpc.open_run(example[0] / "runs" / "demo" / "tiny")


def test_readme_example_runs_as_written(example, run):
    _, out = example
    cfg = run.config
    n_train = int(cfg.p * cfg.p * cfg.train_frac)
    shapes = (f"torch.Size([{n_train}, {cfg.n_heads}, 3, 3]) "
              f"torch.Size([{n_train}, 3, {cfg.d_mlp}])")
    assert shapes in out.splitlines()
    summary = json.loads((run.path / "summary.json").read_text())
    said = "grokked at epoch" if summary["grokked"] else "not grokked by epoch"
    assert f"{said} {summary['grokking_epoch']}" in out.splitlines()
    assert run.run_id in out


def test_model_reproduces_the_trainers_train_loss_at_every_checkpoint(run):
    """Curves row e is the float64 loss of the trainer's float32 logits of the weights after e
    steps. The hooked forward computes the same float32 logits in another order: each differs
    by a few ulps of the largest logit, and the cross-entropy moves by at most twice the
    largest logit change (its gradient, softmax - one-hot, has L1 norm <= 2)."""
    import torch

    from grokhpc.train import accuracy, loss_fn

    curves = run.curves.set_index("epoch")
    data = run.dataset()
    epochs = run.checkpoint_epochs
    assert epochs == list(range(0, run.config.n_epochs + 1, run.config.checkpoint_every))
    losses, tols = [], []
    for e in epochs:
        with torch.inference_mode():
            logits = run.model(e)(data.train_tokens)[:, -1]
        loss = loss_fn(logits, data.train_labels).item()
        tol = 2 * 8 * float(np.finfo(np.float32).eps) * logits.abs().max().item()
        assert loss == pytest.approx(curves.loc[e, "train_loss"], rel=0, abs=tol), e
        assert accuracy(logits, data.train_labels).item() == curves.loc[e, "train_acc"], e
        losses.append(loss)
        tols.append(tol)
    # the tolerance tells checkpoints apart: every neighbour's loss is further away
    assert np.abs(np.diff(losses)).min() > max(tols)


def test_state_dict_has_the_models_parameter_names_shapes_and_the_trainers_weights(run):
    import torch

    from grokhpc.model import build_model

    fresh = build_model(run.config)
    buffers = {name for name, _ in fresh.named_buffers()}
    expected = {k: tuple(v.shape) for k, v in fresh.state_dict().items() if k not in buffers}
    last = run.state_dict()
    assert {k: tuple(v.shape) for k, v in last.items()} == expected
    assert all(v.dtype == torch.float32 for v in last.values())
    # the last checkpoint is the state the trainer saved at the end (state.pt)
    state = torch.load(run.path / "state.pt", weights_only=True)
    assert state["epoch"] == run.checkpoint_epochs[-1]
    for k, v in last.items():
        assert torch.equal(v, state["model"][k]), k
    # an earlier one loads into a fresh model and gives that model's parameters
    sd = run.state_dict(100)
    fresh.load_state_dict(sd, strict=False)
    model = run.model(100)
    for k, v in model.named_parameters():
        assert torch.equal(v, sd[k]) and torch.equal(v, dict(fresh.named_parameters())[k]), k
    assert not torch.equal(sd["embed.W_E"], last["embed.W_E"])
    assert set(run.weights(100)) == set(expected)


def test_epoch_without_checkpoint_uses_the_nearest_and_says_which(run):
    import torch

    every = run.config.checkpoint_every
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # an exact epoch warns about nothing
        exact = run.state_dict(2 * every)
    near = 2 * every + every // 2 + 1           # nearer 3 * every than 2 * every
    said = f"no checkpoint at epoch {near}; using the nearest, epoch {3 * every}$"
    with pytest.warns(NearestCheckpointWarning, match=said):
        after = run.state_dict(near)
    with pytest.warns(NearestCheckpointWarning, match=f"nearest, epoch {2 * every}$"):
        tie = run.model(2 * every + every // 2)   # halfway: the earlier one
    assert torch.equal(tie.embed.W_E, exact["embed.W_E"])
    assert torch.equal(after["embed.W_E"], run.state_dict(3 * every)["embed.W_E"])


def _one_line(exc: pytest.ExceptionInfo, path: Path) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and str(path) in msg, msg
    return msg


def test_errors_are_one_line_and_name_the_directory(run, tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(RunDirError) as e:
        grokhpc.open_run(missing)
    assert "no such directory" in _one_line(e, missing)
    with pytest.raises(RunDirError) as e:
        grokhpc.open_run(tmp_path)
    assert "not a run directory" in _one_line(e, tmp_path)

    pending = tmp_path / "pending"
    RunDir(pending).create({**to_dict(run.config), "run_id": run.run_id})
    fresh = grokhpc.open_run(pending)
    assert fresh.checkpoint_epochs == [] and "pending" in repr(fresh)
    with pytest.raises(RunDirError) as e:
        fresh.model(0)
    assert "no checkpoints yet" in _one_line(e, pending)
    with pytest.raises(RunDirError) as e:
        fresh.summary
    assert "no summary.json yet" in _one_line(e, pending)

    last = run.checkpoint_epochs[-1]
    for bad in (-1, last + 1):
        with pytest.raises(ValueError) as e:
            run.model(bad)
        assert f"epoch {bad} out of range: checkpoints span epochs 0..{last}" in \
            _one_line(e, run.path)
    with pytest.raises(TypeError) as e:
        run.state_dict(10.5)
    _one_line(e, run.path)


def test_a_run_directory_holding_two_runs_files_is_refused(run, tmp_path):
    """Another run's config.json copied over this run's: open_run names progress.json, which
    names the other run, instead of showing one run's config over another's curves; the
    advice (restore the directory from a copy) opens it again."""
    mixed = tmp_path / "mixed"
    shutil.copytree(run.path, mixed)
    other = run.config.replace(weight_decay=0.5)
    (mixed / "config.json").write_text(json.dumps({**to_dict(other), "run_id": other.run_id}))
    with pytest.raises(RunDirError) as e:
        grokhpc.open_run(mixed)
    assert _one_line(e, mixed) == (
        f"{mixed}/progress.json: belongs to run {run.run_id}, but config.json holds run "
        f"{other.run_id}; restore the run directory from a copy, or delete it to train the run "
        "again")
    shutil.copy(run.path / "config.json", mixed / "config.json")
    assert grokhpc.open_run(mixed).run_id == run.run_id


def _sweep_of(run, root: Path) -> Path:
    """A fresh sweep directory holding a copy of ``run`` (not aggregated)."""
    shutil.copytree(run.path, root / "runs" / run.run_id)
    return root


def test_open_sweep_writes_its_tables_once_and_opens_its_runs(run, tmp_path):
    root = _sweep_of(run, tmp_path / "sweep")
    said: list[str] = []
    sweep = grokhpc.open_sweep(root, log=said.append)
    assert len(said) == 1 and f"python -m grokhpc.aggregate {root}" in said[0]
    assert not (root / "aggregate" / "figures").exists()
    assert list(sweep.runs["run_id"]) == [run.run_id]
    assert sweep.runs["state"][0] in ("done", "censored")
    assert list(sweep.checkpoints["epoch"]) == run.checkpoint_epochs
    grokhpc.open_sweep(root, log=said.append)
    assert len(said) == 1                       # already aggregated: nothing said, nothing done
    assert sweep.run(run.run_id[:5]).path == root / "runs" / run.run_id

    # a copied sweep opens its own run directories, not the ones it was aggregated from
    moved = shutil.copytree(root, tmp_path / "moved")
    assert grokhpc.open_sweep(moved).run(run.run_id).path == moved / "runs" / run.run_id
    shutil.rmtree(moved / "runs")               # without its own copy: the recorded directory
    assert grokhpc.open_sweep(moved).run(run.run_id).path == root / "runs" / run.run_id
    with pytest.raises(SweepError) as e:
        sweep.run("ffffffffffff")
    assert "no run 'ffffffffffff'" in _one_line(e, root)

    # existing tables are read as they are: a run added since shows after `grokhpc.aggregate`
    other = run.config.replace(model_seed=run.config.model_seed + 1)
    RunDir(root / "runs" / other.run_id).create({**to_dict(other), "run_id": other.run_id})
    assert len(grokhpc.open_sweep(root).runs) == 1
    r = subprocess.run([sys.executable, "-m", "grokhpc.aggregate", str(root), "--no-figures"],
                       env=_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    runs = grokhpc.open_sweep(root).runs.set_index("run_id")
    assert runs.loc[other.run_id, "state"] == "pending" and len(runs) == 2

    shutil.rmtree(root / "runs" / run.run_id)   # neither copy left
    with pytest.raises(SweepError) as e:
        grokhpc.open_sweep(moved).run(run.run_id)
    assert "is gone" in _one_line(e, moved)


def test_open_sweep_errors_name_the_directory(run, tmp_path):
    with pytest.raises(SweepError) as e:
        grokhpc.open_sweep(tmp_path / "nowhere")
    _one_line(e, tmp_path / "nowhere")
    with pytest.raises(SweepError) as e:
        grokhpc.open_sweep(tmp_path)
    assert "no run directories" in _one_line(e, tmp_path)
    with pytest.raises(SweepError) as e:
        grokhpc.open_sweep(run.path)
    assert "grokhpc.open_run" in _one_line(e, run.path)
    assert not (tmp_path / "aggregate").exists()


def test_open_sweep_refuses_what_aggregate_refuses_in_its_words(run, tmp_path):
    """A run directory and an empty directory: SweepError with the very line that
    ``python -m grokhpc.aggregate`` prints, and nothing written into them, even where an older
    grokhpc left empty tables there. The advice for a run directory (open_run, analyze) works."""
    from grokhpc.aggregate import aggregate

    copy = shutil.copytree(run.path, tmp_path / "run")
    empty = tmp_path / "empty"
    empty.mkdir()
    for d in (copy, empty):
        before = sorted(os.listdir(d))
        r = subprocess.run([sys.executable, "-m", "grokhpc.aggregate", str(d)], env=_env(),
                           capture_output=True, text=True)
        assert r.returncode == 1 and r.stdout == ""
        with pytest.raises(SweepError) as e:
            grokhpc.open_sweep(d)
        assert r.stderr == f"aggregate: {_one_line(e, d)}\n"
        aggregate([d], formats=None, log=None)   # the empty tables older versions wrote
        left = sorted(os.listdir(d))
        assert left == sorted(before + ["aggregate"])
        with pytest.raises(SweepError) as again:
            grokhpc.open_sweep(d)
        assert str(again.value) == str(e.value) and sorted(os.listdir(d)) == left
    with pytest.raises(SweepError) as e:
        grokhpc.open_sweep(copy)
    assert str(e.value).endswith(f"; it is a run directory: open it with grokhpc.open_run, draw "
                                 f"its figures with python -m grokhpc.analyze {copy}")
    assert grokhpc.open_run(copy).run_id == run.run_id
    r = subprocess.run([sys.executable, "-m", "grokhpc.analyze", str(copy), "--format", "html"],
                       env=_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.endswith(f"files written to {copy / 'figures'}\n")
    assert (copy / "figures" / "training_curves.html").exists()


def test_reading_runs_and_sweeps_never_imports_torch(run, tmp_path):
    root = _sweep_of(run, tmp_path / "sweep")
    code = f"""
import json, sys
import grokhpc
grokhpc.open_run, grokhpc.open_sweep
assert "open_sweep" in dir(grokhpc)
try:
    grokhpc.no_such_name
except AttributeError:
    pass
run = grokhpc.open_run({str(run.path)!r})
sweep = grokhpc.open_sweep({str(root)!r}, log=None)
again = sweep.run(sweep.runs["run_id"][0])
out = {{"repr": repr(run), "curves": len(run.curves), "measures": len(run.measures),
        "grokking_epoch": run.summary["grokking_epoch"], "epochs": run.checkpoint_epochs,
        "W_E": run.weights(20)["embed.W_E"].shape, "runs": len(sweep.runs),
        "ckpts": len(sweep.checkpoints), "again": len(again.curves), "swept": sweep.swept,
        "heavy": sorted(m for m in ("torch", "transformer_lens", "plotly") if m in sys.modules)}}
print(json.dumps(out))
"""
    r = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.splitlines()[-1])
    cfg = run.config
    assert out["heavy"] == []
    assert out["curves"] == out["again"] == cfg.n_epochs + 1
    assert out["measures"] == out["ckpts"] == len(out["epochs"]) == \
        cfg.n_epochs // cfg.checkpoint_every + 1
    assert out["W_E"] == [cfg.p + 1, cfg.d_model] and out["runs"] == 1
    assert out["grokking_epoch"] == run.summary["grokking_epoch"]
    assert f"epoch {cfg.n_epochs}/{cfg.n_epochs}, done" in out["repr"]
