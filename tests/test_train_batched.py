"""Batched training (grokhpc.train_batched) against solo training (grokhpc.train).

The expectation for every packed run is the same run trained alone by ``run_training`` (a
second, independent implementation: module-by-module ``Transformer.last_logits`` and
``torch.optim.AdamW``). Torch runs on one thread here: with two threads the solo trainer's own
gradients are not bit-reproducible at larger shapes (a parallel accumulating gather), and one
thread also keeps the shared machine responsive.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from conftest import step_solo_and_stacked

from grokhpc.config import RunConfig, to_dict
from grokhpc.data import make_dataset
from grokhpc.model import build_model
from grokhpc.store import RunDir
from grokhpc.train import Trainer, loss_fn, run_training
from grokhpc.lastpos import accuracy, cross_entropy, last_logits
from grokhpc.stack import Stack
from grokhpc.stacked_optim import StackedAdamW
from grokhpc.train_batched import GroupError, train_group

REPO = Path(__file__).resolve().parent.parent

# Addition mod 17 groks within a few hundred epochs at this size, so "same grokking epoch"
# compares a real grokking epoch, not two censored ones.
BASE = RunConfig(p=17, op="add", d_model=32, n_heads=4, d_head=8, d_mlp=64, n_epochs=300,
                 checkpoint_every=50, eval_every=10, device="cpu")
CFGS = [
    BASE.replace(model_seed=1, data_seed=2, train_frac=0.9, lr=1e-2, weight_decay=1.0),
    BASE.replace(model_seed=3, data_seed=4, train_frac=0.7, lr=5e-3, weight_decay=0.3,
                 betas=(0.85, 0.99)),
    BASE.replace(model_seed=5, data_seed=6, train_frac=0.8, lr=1e-2, weight_decay=2.0),
]
TIME_KEYS = ("updated", "wall_time_s", "measures_time_s")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def solo(tmp_path_factory):
    """Each run of CFGS trained alone: the reference."""
    root = tmp_path_factory.mktemp("solo")
    for i, cfg in enumerate(CFGS):
        run_training(cfg, root / f"r{i}", progress_bar=False, log=lambda *a: None)
    return [root / f"r{i}" for i in range(len(CFGS))]


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    root = tmp_path_factory.mktemp("packed")
    dirs = [root / f"r{i}" for i in range(len(CFGS))]
    train_group(CFGS, dirs, device="cpu", progress_bar=False, log=lambda *a: None)
    return dirs


# ---- comparison of two run directories -----------------------------------------------------
def files_of(d: Path) -> set[str]:
    """The run's files; a SIGKILL during an atomic write can leave its hidden temporary
    (``.curves.parquet.XXXX.tmp``) behind, which is not part of the run."""
    return {f.name for f in Path(d).iterdir() if not f.name.startswith(".")}


def compare_runs(a: Path, b: Path, rel: float = 1e-13) -> dict[str, float]:
    """Assert run directories ``a`` and ``b`` hold the same run; returns the largest curve
    differences (absolute, relative) found."""
    ra, rb = RunDir(a), RunDir(b)
    assert files_of(a) == files_of(b)
    assert ra.read_config() == rb.read_config()
    pa, pb = ra.read_progress(), rb.read_progress()
    assert {k: v for k, v in pa.items() if k not in TIME_KEYS + ("attempts",)} == \
        {k: v for k, v in pb.items() if k not in TIME_KEYS + ("attempts",)}
    # attempts: a kill adds one, but every attempt of both ran in the same environment
    from grokhpc.runtime import result_environment

    def environments(prog):
        return {repr(result_environment(a)) for a in prog["attempts"]}
    assert environments(pa) == environments(pb) and len(environments(pa)) == 1
    # curves: read with pyarrow and with pandas; same NaN pattern, values to ``rel``
    ta, tb = pq.read_table(ra.file("curves.parquet")), pq.read_table(rb.file("curves.parquet"))
    assert ta.schema == tb.schema
    ca, cb = ra.read_curves(), rb.read_curves()
    assert ca["epoch"].tolist() == cb["epoch"].tolist()
    worst = {"abs": 0.0, "rel": 0.0}
    for col in ("train_loss", "train_acc", "test_loss", "test_acc"):
        x, y = ca[col].to_numpy(), cb[col].to_numpy()
        assert np.array_equal(np.isnan(x), np.isnan(y)), col
        assert ta.column(col).null_count == tb.column(col).null_count
        m = ~np.isnan(y)
        d = np.abs(x[m] - y[m])
        r = d / np.maximum(np.abs(y[m]), 1e-300)
        worst["abs"] = max(worst["abs"], float(d.max()))
        worst["rel"] = max(worst["rel"], float(r.max()))
        assert r.max() <= rel, (col, float(r.max()))
    # checkpoints: the same epochs, the same float32 weights bit for bit
    ea, wa = ra.checkpoints(mmap=False)
    eb, wb = rb.checkpoints(mmap=False)
    assert ea == eb and np.array_equal(wa, wb)
    # state.pt: the same resumable state (model, optimiser incl. param groups, curves)
    sa = torch.load(ra.file("state.pt"), weights_only=True)
    sb = torch.load(rb.file("state.pt"), weights_only=True)
    assert set(sa) == set(sb)
    assert (sa["run_id"], sa["epoch"], sa["checkpoint_epochs"]) == \
        (sb["run_id"], sb["epoch"], sb["checkpoint_epochs"])
    assert list(sa["model"]) == list(sb["model"])
    for k in sa["model"]:
        assert torch.equal(sa["model"][k], sb["model"][k]), k
    assert sa["optimizer"]["param_groups"] == sb["optimizer"]["param_groups"]
    assert set(sa["optimizer"]["state"]) == set(sb["optimizer"]["state"])
    for i, st in sa["optimizer"]["state"].items():
        other = sb["optimizer"]["state"][i]
        assert set(st) == set(other)
        for k in st:
            assert st[k].dtype == other[k].dtype and st[k].device == other[k].device
            assert torch.equal(st[k], other[k]), (i, k)
    for k in sa["curves"]:
        assert torch.allclose(sa["curves"][k], sb["curves"][k], rtol=rel, atol=0,
                              equal_nan=True), k
    # summary (grokking epoch, phases, key frequencies) and measures
    ya, yb = ra.read_summary(), rb.read_summary()
    assert (ya is None) == (yb is None)
    if ya is not None:
        assert ya["grokking_epoch"] == yb["grokking_epoch"]
        assert ya["grokked"] == yb["grokked"]
        for k in ya:
            if k in TIME_KEYS + ("n_attempts",):   # a kill adds an attempt, not a difference
                continue
            if isinstance(ya[k], float):
                assert ya[k] == pytest.approx(yb[k], rel=1e-9, abs=1e-12), k
            else:
                assert ya[k] == yb[k], k
    if ra.file("measures.parquet").exists():
        ma = pq.read_table(ra.file("measures.parquet")).to_pandas()
        mb = pq.read_table(rb.file("measures.parquet")).to_pandas()
        assert list(ma.columns) == list(mb.columns) and len(ma) == len(mb)
    return worst


# ---- building blocks ---------------------------------------------------------------------------
@pytest.mark.parametrize("host_scalars,per_run_torch", [(True, False), (False, False),
                                                       (None, True)])
def test_stacked_adamw_is_torch_adamw_bit_for_bit(host_scalars, per_run_torch):
    """Per-run lr, weight decay and betas; gradients over 9 orders of magnitude; odd sizes.
    Both ways of computing the bias corrections (Python floats; float64 tensors, the GPU
    default) give torch's bits here, as does the exact mode's per-run call of torch's own
    functional step on views of the stacks."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(5, 7, 3), (13,), (4, 32, 8), (33, 17)]
    lrs, wds = [1e-3, 3e-3, 0.7], [1.0, 0.0, 0.3]
    betas = [(0.9, 0.98), (0.8, 0.999), (0.95, 0.9)]
    solo = [[torch.randn(s, generator=gen).requires_grad_() for s in shapes] for _ in range(3)]
    opts = [torch.optim.AdamW(solo[r], lr=lrs[r], weight_decay=wds[r], betas=betas[r])
            for r in range(3)]
    P = [torch.stack([solo[r][i].detach() for r in range(3)]).clone().requires_grad_()
         for i in range(len(shapes))]
    opt = StackedAdamW(P, lrs, wds, betas, [0, 0, 0], [torch.zeros_like(p) for p in P],
                       [torch.zeros_like(p) for p in P], host_scalars=host_scalars,
                       per_run_torch=per_run_torch)
    for it in range(20):
        scale = 10.0 ** (it % 9 - 6)
        grads = [torch.randn((3,) + s, generator=gen) * scale for s in shapes]
        step_solo_and_stacked(opts, solo, opt, P, grads, it)
        for r in range(3):
            for i in range(len(shapes)):
                st = opts[r].state[solo[r][i]]
                assert torch.equal(opt.exp_avgs[i][r], st["exp_avg"])
                assert torch.equal(opt.exp_avg_sqs[i][r], st["exp_avg_sq"])
    assert opt.steps == [20, 20, 20]


def _stack_inputs():
    models = [build_model(c) for c in CFGS]
    data = [make_dataset(c) for c in CFGS]
    names = [n for n, _ in models[0].named_parameters()]
    P = {n: torch.stack([m.get_parameter(n).detach() for m in models]).clone()
         .requires_grad_(models[0].get_parameter(n).requires_grad) for n in names}
    return models, data, names, P


def test_batched_forward_and_gradients_match_solo():
    """The batched forward (the GPU path) against each run's own ``Transformer.last_logits``
    + ``loss_fn``, with different train sizes (padded, masked rows): logits, per-run losses
    and every weight gradient, to float32 rounding."""
    models, data, names, P = _stack_inputs()
    sizes = [len(d.train_idx) for d in data]
    assert len(set(sizes)) == 3  # the padded path is exercised
    b = max(sizes)
    idx = torch.zeros((3, b), dtype=torch.long)
    for r, d in enumerate(data):
        idx[r, : sizes[r]] = d.train_idx
    mask = torch.arange(b)[None] < torch.tensor(sizes)[:, None]
    tokens, labels = data[0].tokens[idx], data[0].labels[idx]
    logits = last_logits(P, tokens)
    losses = cross_entropy(logits, labels, "float64", mask)
    losses.sum().backward()
    for r, (m, d) in enumerate(zip(models, data)):
        solo_logits = m.last_logits(d.train_tokens)
        solo_loss = loss_fn(solo_logits, d.train_labels, "float64")
        solo_loss.backward()
        torch.testing.assert_close(logits[r, : sizes[r]], solo_logits, rtol=1e-5, atol=1e-6)
        assert losses[r].item() == pytest.approx(solo_loss.item(), rel=1e-6)
        for n in names:
            if P[n].requires_grad:
                g, ref = P[n].grad[r], m.get_parameter(n).grad
                assert (g - ref).abs().max() <= 1e-5 * ref.abs().max(), n
            else:
                assert P[n].grad is None
        # the padded rows of run r got no gradient: changing their tokens changes nothing
    other = tokens.clone()
    other[~mask] = (other[~mask] + 1) % CFGS[0].p
    other[..., -1] = CFGS[0].p
    relogits = last_logits({k: v.detach() for k, v in P.items()}, other)
    assert torch.equal(cross_entropy(relogits, labels, "float64", mask), losses.detach())
    assert torch.equal(accuracy(relogits, labels, mask), accuracy(logits.detach(), labels, mask))


def test_batched_scoring_in_run_chunks_equals_solo_scoring(tmp_path):
    """Small train fractions make the test split larger than the train split, so the batched
    way scores it a chunk of runs at a time; the scores are the solo ones."""
    cfgs = [BASE.replace(model_seed=11 + i, data_seed=21 + i, train_frac=f)
            for i, f in enumerate((0.2, 0.3, 0.25))]
    trainers = [Trainer(c, RunDir(tmp_path / f"r{i}"), torch.device("cpu"))
                for i, c in enumerate(cfgs)]
    stack = Stack(trainers, torch.device("cpu"), exact=False)
    n_train, n_test = stack.train.tokens.shape[1], stack.test.tokens.shape[1]
    assert (3 * n_train) // n_test < 3  # chunked
    stack.evaluate(None, range(3))   # test and train of every run
    for r, t in enumerate(trainers):
        t.evaluate(train_too=True)  # the solo Trainer's own scoring
        for k in ("test_loss", "train_loss"):
            assert stack.curves[k][r, 0].item() == pytest.approx(t.curves[k][0].item(), rel=1e-6)
        for k in ("test_acc", "train_acc"):
            assert stack.curves[k][r, 0].item() == t.curves[k][0].item()


def test_group_of_different_shapes_is_refused(tmp_path):
    with pytest.raises(GroupError, match=r"d_mlp: expected the same value"):
        train_group([CFGS[0], CFGS[1].replace(d_mlp=32)], [tmp_path / "a", tmp_path / "b"],
                    progress_bar=False)
    with pytest.raises(GroupError, match="appears twice"):
        train_group([CFGS[0], CFGS[0]], [tmp_path / "a", tmp_path / "b"], progress_bar=False)
    with pytest.raises(GroupError, match="given to two runs"):
        train_group(CFGS[:2], [tmp_path / "a", tmp_path / "a"], progress_bar=False)
    assert not (tmp_path / "a").exists()  # nothing written for a refused group


# ---- packed == solo ----------------------------------------------------------------------------
def test_packed_runs_equal_solo_runs(solo, packed, capsys):
    worst = [compare_runs(p, s) for p, s in zip(packed, solo)]
    groks = [RunDir(s).read_summary() for s in solo]
    assert any(g["grokked"] for g in groks)  # a real grokking epoch is compared
    with capsys.disabled():
        print("\npacked vs solo: max |d curve| =", max(w["abs"] for w in worst),
              " max rel =", max(w["rel"] for w in worst),
              " grokking epochs:", [g["grokking_epoch"] if g["grokked"] else None
                                    for g in groks])


def test_batched_mode_tracks_solo_runs(tmp_path, solo, capsys):
    """Batched mode (the GPU path) trained end to end on CPU: same files and checkpoint
    epochs; curves close while rounding differences are small. These tiny runs are chaotic
    (a few hundred train pairs, Adam), so float32 rounding differences grow during training
    -- the solo run itself in float64 differs from float32 by 2% of a loss within 50 epochs.
    The batched kernels round differently from one run's, so they are held to the first
    epochs; whole runs are compared bit for bit in exact mode (above)."""
    dirs = [tmp_path / f"r{i}" for i in range(3)]
    train_group(CFGS, dirs, device="cpu", progress_bar=False, log=lambda *a: None, exact=False)
    worst = {"abs": 0.0, "rel": 0.0}
    early = 0.0
    horizon = 10
    for d, s in zip(dirs, solo):
        assert files_of(d) == files_of(s)
        assert RunDir(d).checkpoints()[0] == RunDir(s).checkpoints()[0]
        a, b = RunDir(d).read_curves(), RunDir(s).read_curves()
        for col in ("train_loss", "test_loss"):
            x, y = a[col].to_numpy(), b[col].to_numpy()
            assert np.array_equal(np.isnan(x), np.isnan(y))
            m = ~np.isnan(y)
            rel = np.abs(x - y) / np.abs(y)
            worst["abs"] = max(worst["abs"], float(np.abs(x[m] - y[m]).max()))
            worst["rel"] = max(worst["rel"], float(rel[m].max()))
            early = max(early, float(np.nanmax(rel[: horizon + 1])))
    assert early < 1e-3
    with capsys.disabled():
        print(f"\nbatched vs solo: epochs 0-{horizon} max rel {early:.3g}; all "
              f"{BASE.n_epochs} epochs max |d loss| = {worst['abs']:.3g}, max rel = "
              f"{worst['rel']:.3g}")


def test_complete_group_is_left_alone(packed):
    before = {p: {f: (p / f).stat().st_mtime_ns for f in files_of(p)} for p in packed}
    said = []
    train_group(CFGS, packed, device="cpu", progress_bar=False, log=said.append)
    assert sum("already complete" in s for s in said) == len(CFGS)
    assert before == {p: {f: (p / f).stat().st_mtime_ns for f in files_of(p)} for p in packed}


# ---- kill and resume ---------------------------------------------------------------------------
def _start(args: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, *args], cwd=REPO, env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)


def _kill_when(proc: subprocess.Popen, dirs, min_epoch: int, log: Path) -> list[int]:
    """SIGKILL ``proc`` once any run in ``dirs`` has committed ``min_epoch``; the epochs then."""
    deadline = time.time() + 120
    while time.time() < deadline:
        epochs = []
        for d in dirs:
            try:
                epochs.append(json.loads((Path(d) / "progress.json").read_text())["epoch"])
            except (FileNotFoundError, json.JSONDecodeError):
                epochs.append(0)
        if max(epochs) >= min_epoch:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return epochs
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited early:\n{log.read_text()}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"no commit at epoch {min_epoch} in time:\n{log.read_text()}")


def test_sigkilled_group_resumes_solo_and_packed(tmp_path, solo):
    """A packed job killed with SIGKILL mid-training: run 0 is resumed by the solo trainer,
    runs 1 and 2 by train_group; all three end equal to the uninterrupted runs."""
    dirs = [tmp_path / f"r{i}" for i in range(3)]
    for c, d in zip(CFGS, dirs):  # as the launcher leaves them: config.json only
        RunDir(d).create({**to_dict(c), "run_id": c.run_id})
    log = tmp_path / "job.log"
    cmd = ["-m", "grokhpc.train_batched", *map(str, dirs), "--device", "cpu", "--no-progress",
           "--state-every", "0"]   # state.pt with every row: the kill finds a resume point
    at_kill = _kill_when(_start(cmd, log), dirs, 50, log)
    assert max(at_kill) < CFGS[0].n_epochs  # the kill interrupted training
    assert not any(RunDir(d).is_complete() for d in dirs)
    committed = [torch.load(d / "state.pt", weights_only=True)["epoch"]
                 if (d / "state.pt").exists() else 0 for d in dirs]
    assert max(committed) >= 50
    said = []
    run_training(CFGS[0], dirs[0], progress_bar=False, log=said.append)
    train_group(CFGS[1:], dirs[1:], device="cpu", progress_bar=False, log=said.append)
    assert sum("resuming at epoch" in s for s in said) == sum(e > 0 for e in committed)
    for d, s in zip(dirs, solo):
        compare_runs(d, s)


def test_group_resumes_runs_at_different_epochs(tmp_path, solo):
    """Run 1 was advanced alone by the solo Trainer to epoch 100; run 0 is already complete;
    run 2 is new. The group leaves run 0 alone, brings run 2 up to epoch 100, then trains runs
    1 and 2 stacked; both end equal to the uninterrupted runs."""
    dirs = [tmp_path / f"r{i}" for i in range(3)]
    shutil.copytree(solo[0], dirs[0])
    t = Trainer.open(CFGS[1], dirs[1], torch.device("cpu"))
    t.fit(progress_bar=False, until=100)
    assert RunDir(dirs[1]).read_progress()["epoch"] == 100
    said = []
    train_group(CFGS, dirs, device="cpu", progress_bar=False, log=said.append)
    assert any("already complete" in s for s in said)
    assert any("1 run(s) at epoch 0 catch up to epoch 100" in s for s in said), said
    assert compare_runs(dirs[0], solo[0]) == {"abs": 0.0, "rel": 0.0}
    for d, s in zip(dirs[1:], solo[1:]):
        compare_runs(d, s)


# ---- divergence --------------------------------------------------------------------------------
def test_diverged_run_is_marked_and_the_others_go_on(tmp_path, solo):
    """(With commits written in the background, the GPU default, so that path is checked
    against the solo runs too.)"""
    bad = BASE.replace(model_seed=7, data_seed=8, train_frac=0.8, lr=1e6, weight_decay=1.0)
    cfgs = [CFGS[0], bad, CFGS[2]]
    dirs = [tmp_path / f"r{i}" for i in range(3)]
    said = []
    train_group(cfgs, dirs, device="cpu", progress_bar=False, log=said.append,
                background_commits=True)
    compare_runs(dirs[0], solo[0])
    compare_runs(dirs[2], solo[2])
    err = RunDir(dirs[1]).read_error()
    assert err.startswith("diverged:") and bad.run_id in err
    prog = RunDir(dirs[1]).read_progress()
    assert prog["epoch"] == 0 and not prog["done"]  # keeps its last finite commit
    assert prog["diverged_epoch"] == int(err.split("first at epoch ")[1].split(" ")[0])
    summary = RunDir(dirs[1]).read_summary()     # says so, and reports no final values
    assert summary["diverged"] is True and not [k for k in summary if k.startswith("final_")]
    curves = RunDir(dirs[1]).read_curves()
    assert np.isfinite(curves["test_loss"].dropna()).all()
    # a later call leaves it alone (deterministic: it would diverge again)
    said.clear()
    train_group(cfgs, dirs, device="cpu", progress_bar=False, log=said.append)
    assert any("diverged before" in s for s in said)
    assert sum("already complete" in s for s in said) == 2
    # asked to retry, it trains again from its last finite commit and diverges again
    (dirs[1] / "error.txt").write_text("diverged: marker of the first attempt\n")
    said.clear()
    train_group(cfgs, dirs, device="cpu", progress_bar=False, log=said.append,
                retry_diverged=True)
    assert any("diverged (non-finite train loss)" in s for s in said)
    assert RunDir(dirs[1]).read_error().startswith(f"diverged: run {bad.run_id}")
    assert RunDir(dirs[1]).read_progress()["epoch"] == 0


# ---- command line ------------------------------------------------------------------------------
def test_cli_refuses_mixed_shapes_in_one_line(tmp_path):
    dirs = [tmp_path / "a", tmp_path / "b"]
    for c, d in zip([CFGS[0], CFGS[1].replace(d_model=16)], dirs):
        RunDir(d).create({**to_dict(c), "run_id": c.run_id})
    r = subprocess.run([sys.executable, "-m", "grokhpc.train_batched", *map(str, dirs)],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "error: train_group: d_model: expected the same value in every run of a group, got "
        f"32 (run 0, {CFGS[0].run_id}) and 16 (run 1, {CFGS[1].replace(d_model=16).run_id})"]
    assert sorted(p.name for p in dirs[0].iterdir()) == ["config.json"]  # nothing trained
    # importing the module (and so --help) pulls in neither torch nor transformer_lens
    r = subprocess.run([sys.executable, "-c", "import sys, grokhpc.train_batched; "
                        "print('torch' in sys.modules, 'transformer_lens' in sys.modules)"],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.stdout.split() == ["False", "False"]
