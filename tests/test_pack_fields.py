"""Packed training (grokhpc.train_batched) with the optional run fields, against solo runs.

Every expectation is the same run trained alone by ``grokhpc.train`` (torch's own optimisers,
the solo minibatch loop, ``Transformer.last_logits``): exact mode must give its files bit for
bit, batched mode the same files with curves equal up to float32 rounding in the first epochs.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest
import torch

from conftest import step_solo_and_stacked

from grokhpc import stack as stack_mod
from grokhpc import train_batched
from grokhpc.config import from_dict
from grokhpc.loop import fit_stack
from grokhpc.model import Transformer, build_model
from grokhpc.store import RunDir
from grokhpc.runtime import JobSettings
from grokhpc.train import Trainer, run_training
from grokhpc.stack import Stack, hooked_last_logits
from grokhpc.stacked_optim import StackedAdamW, StackedSGD
from grokhpc.train_batched import GroupError, train_group
from test_train_batched import compare_runs, files_of

TINY = dict(p=11, train_frac=0.5, d_model=32, n_heads=4, d_head=8, d_mlp=64, n_epochs=60,
            checkpoint_every=20, eval_every=10, lr=3e-3, device="cpu")


def cfg_of(**kw):
    return from_dict({**TINY, **kw})


# Groups that share the shape fields and differ in everything a run may vary.
GROUPS = {
    "adamw_minibatch": [
        cfg_of(batch_size=16, model_seed=1, data_seed=2, warmup_epochs=10, lr_schedule="cosine"),
        cfg_of(batch_size=16, model_seed=3, data_seed=4, init_scale=2.0, fixed_weight_norm=True,
               weight_decay=0.0),
        cfg_of(batch_size=16, model_seed=5, data_seed=6, label_noise=0.2, lr=5e-3,
               betas=[0.8, 0.99]),
    ],
    "adam_full": [
        cfg_of(optimizer="adam", weight_decay=0.0, model_seed=1, data_seed=2, train_frac=0.6),
        cfg_of(optimizer="adam", weight_decay=0.1, model_seed=3, data_seed=4, warmup_epochs=7),
        cfg_of(optimizer="adam", model_seed=5, data_seed=6, train_frac=0.4, init_scale=0.5,
               lr_schedule="cosine"),
    ],
    "sgd_minibatch": [
        cfg_of(optimizer="sgd", momentum=0.9, lr=0.05, batch_size=7, model_seed=1, data_seed=2),
        cfg_of(optimizer="sgd", momentum=0.0, lr=0.1, batch_size=7, model_seed=3, data_seed=4,
               weight_decay=0.0, fixed_weight_norm=True),
        cfg_of(optimizer="sgd", momentum=0.5, lr=0.05, batch_size=7, model_seed=5, data_seed=6,
               warmup_epochs=5, label_noise=0.1),
    ],
}
QUIET = dict(progress_bar=False, log=lambda *a: None)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def train_alone(groups: dict, root) -> dict:
    """Each run of every group trained alone under ``root``: {group: its run directories}."""
    out = {}
    for name, cfgs in groups.items():
        out[name] = [root / name / f"r{i}" for i in range(len(cfgs))]
        for cfg, d in zip(cfgs, out[name]):
            run_training(cfg, d, **QUIET)
    return out


@pytest.fixture(scope="module")
def solo(tmp_path_factory):
    """Each run of every group trained alone: the reference."""
    return train_alone(GROUPS, tmp_path_factory.mktemp("solo"))


def early_rel(a, b, horizon: int) -> float:
    """The largest relative difference of two runs' loss curves over epochs 0..horizon."""
    ca, cb = RunDir(a).read_curves(), RunDir(b).read_curves()
    worst = 0.0
    for col in ("train_loss", "test_loss"):
        x, y = ca[col].to_numpy()[: horizon + 1], cb[col].to_numpy()[: horizon + 1]
        assert np.array_equal(np.isnan(x), np.isnan(y))
        m = ~np.isnan(y)
        worst = max(worst, float((np.abs(x[m] - y[m]) / np.abs(y[m])).max()))
    return worst


# ---- the stacked optimisers --------------------------------------------------------------------
def _torch_opts(kind, solo, lrs, wds, extra):
    if kind == "adam":
        return [torch.optim.Adam(solo[r], lr=lrs[r], weight_decay=wds[r], betas=extra[r])
                for r in range(3)]
    return [torch.optim.SGD(solo[r], lr=lrs[r], weight_decay=wds[r], momentum=extra[r])
            for r in range(3)]


@pytest.mark.parametrize("kind", ["adam", "sgd"])
@pytest.mark.parametrize("per_run_torch", [False, True])
def test_stacked_adam_and_sgd_are_torch_bit_for_bit(kind, per_run_torch):
    """Per-run lr (changed half way, as a schedule does), weight decay (0 for one run) and
    betas or momentum (0 for one run); gradients over 9 orders of magnitude; odd sizes."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(5, 7, 3), (13,), (33, 17)]
    lrs, wds = [1e-3, 3e-2, 0.7], [1.0, 0.0, 0.3]
    extra = [(0.9, 0.98), (0.8, 0.999), (0.95, 0.9)] if kind == "adam" else [0.9, 0.0, 0.5]
    solo = [[torch.randn(s, generator=gen).requires_grad_() for s in shapes] for _ in range(3)]
    opts = _torch_opts(kind, solo, lrs, wds, extra)
    P = [torch.stack([solo[r][i].detach() for r in range(3)]).clone().requires_grad_()
         for i in range(len(shapes))]
    zeros = [torch.zeros_like(p) for p in P]
    if kind == "adam":
        opt = StackedAdamW(P, lrs, wds, extra, [0, 0, 0], zeros, [z.clone() for z in zeros],
                           per_run_torch=per_run_torch, decoupled=False)
    else:
        opt = StackedSGD(P, lrs, wds, extra, zeros, [False] * 3, per_run_torch=per_run_torch)
    for it in range(20):
        if it == 10:
            lrs = [lr * 0.37 for lr in lrs]
            for o, lr in zip(opts, lrs):
                o.param_groups[0]["lr"] = lr
            opt.set_lrs(lrs)
        scale = 10.0 ** (it % 9 - 6)
        grads = [torch.randn((3,) + s, generator=gen) * scale for s in shapes]
        step_solo_and_stacked(opts, solo, opt, P, grads, it)
        for r in range(3):
            for i in range(len(shapes)):
                states = defaultdict(dict)   # as torch.optim.Optimizer.state
                key = P[i][r]
                opt.store(r, i, states, key)
                st = states.get(key, {})
                assert set(st) == set(opts[r].state.get(solo[r][i], {})), (r, i)
                for k, v in st.items():
                    assert torch.equal(v, opts[r].state[solo[r][i]][k]), (it, r, i, k)


# ---- packed == solo, every field ---------------------------------------------------------------
@pytest.mark.parametrize("group", list(GROUPS))
def test_packed_group_equals_solo_runs_bit_for_bit(tmp_path, solo, group):
    dirs = [tmp_path / f"r{i}" for i in range(3)]
    train_group(GROUPS[group], dirs, device="cpu", exact=True, **QUIET)
    for d, s in zip(dirs, solo[group]):
        assert compare_runs(d, s, rel=0.0) == {"abs": 0.0, "rel": 0.0}


@pytest.mark.parametrize("group", list(GROUPS))
def test_batched_group_tracks_solo_runs(tmp_path, solo, group):
    """The batched way (stacked optimiser, minibatches gathered across runs, one stacked
    fixed-norm rescale): same files and checkpoint epochs, the same initial weights, and losses
    within float32 rounding over the first 10 epochs (later the tiny runs' chaos amplifies any
    rounding difference; test_train_batched says by how much)."""
    dirs = [tmp_path / f"r{i}" for i in range(3)]
    train_group(GROUPS[group], dirs, device="cpu", exact=False, **QUIET)
    for d, s in zip(dirs, solo[group]):
        assert files_of(d) == files_of(s)
        ea, wa = RunDir(d).checkpoints(mmap=False)
        eb, wb = RunDir(s).checkpoints(mmap=False)
        assert ea == eb and np.array_equal(wa[0], wb[0])
        assert early_rel(d, s, 10) < 1e-4


@pytest.mark.parametrize("group", list(GROUPS))
def test_fused_step_equals_the_eager_step_bit_for_bit(tmp_path, group):
    """Batched mode with the flat Adam(W) (step_mode fused; SGD keeps its per-weight step) and
    with graph, which on a CPU falls back to fused saying so in one line: every file of every
    run is the eager step's, bit for bit (state.pt's moments included)."""
    dirs, said = {}, []
    for mode in ("eager", "fused", "graph"):
        dirs[mode] = [tmp_path / mode / f"r{i}" for i in range(3)]
        train_group(GROUPS[group], dirs[mode], JobSettings(step_mode=mode), device="cpu",
                    exact=False, progress_bar=False, log=said.append)
    for eager, fused, graph in zip(*dirs.values()):
        assert compare_runs(fused, eager, rel=0.0) == {"abs": 0.0, "rel": 0.0}
        assert compare_runs(graph, eager, rel=0.0) == {"abs": 0.0, "rel": 0.0}
    assert said == ["step_mode graph: CUDA graphs need a CUDA device, this group trains on cpu; "
                    "the fused step is used"]


def test_fused_step_off_the_fast_path_equals_the_eager_step(tmp_path):
    """Two layers with LayerNorm (the hooked forward under vmap, on views of the flat buffer):
    fused == eager bit for bit."""
    cfgs = [cfg_of(n_layers=2, normalization="LN", act_fn="gelu", n_epochs=20, model_seed=s,
                   weight_decay=w) for s, w in ((1, 1.0), (2, 0.3))]
    dirs = {m: [tmp_path / m / f"r{i}" for i in range(2)] for m in ("eager", "fused")}
    for mode, ds in dirs.items():
        train_group(cfgs, ds, JobSettings(step_mode=mode), device="cpu", exact=False, **QUIET)
    for fused, eager in zip(dirs["fused"], dirs["eager"]):
        assert compare_runs(fused, eager, rel=0.0) == {"abs": 0.0, "rel": 0.0}


def test_fused_group_killed_after_a_commit_resumes_bit_identical(tmp_path):
    """A fused group that dies 5 epochs after its commit at epoch 20 resumes from the runs'
    state.pt -- once fused, once eager -- and ends as the uninterrupted fused group."""
    cfgs = GROUPS["adam_full"]
    ref = [tmp_path / "ref" / f"r{i}" for i in range(3)]
    train_group(cfgs, ref, JobSettings(step_mode="fused"), device="cpu", exact=False, **QUIET)
    for resume_mode in ("fused", "eager"):
        dirs = [tmp_path / resume_mode / f"r{i}" for i in range(3)]
        trainers = [Trainer.open(c, d, torch.device("cpu")) for c, d in zip(cfgs, dirs)]
        stack = Stack(trainers, torch.device("cpu"), exact=False, step_mode="fused")
        fit_stack(stack, 25, None, lambda *a: None)
        assert [RunDir(d).read_progress()["epoch"] for d in dirs] == [20, 20, 20]
        for t in trainers:
            t.close()
        del stack, trainers, t
        train_group(cfgs, dirs, JobSettings(step_mode=resume_mode), device="cpu", exact=False,
                    **QUIET)
        for d, s in zip(dirs, ref):
            assert compare_runs(d, s, rel=0.0) == {"abs": 0.0, "rel": 0.0}


# ---- the hooked forward off the fast path ------------------------------------------------------
def _hooked_last_logits(self, tokens):
    return self.forward(tokens)[:, -1]


def test_hooked_forward_over_stacked_weights_matches_each_run():
    """``hooked_last_logits`` (vmap over the hooked forward) against each run's own fast path:
    logits and every weight gradient, to float32 rounding."""
    cfgs = GROUPS["adam_full"]
    models = [build_model(c) for c in cfgs]
    names = [n for n, _ in models[0].named_parameters()]
    P = {n: torch.stack([m.get_parameter(n).detach() for m in models]).clone()
         .requires_grad_(models[0].get_parameter(n).requires_grad) for n in names}
    tokens = torch.randint(0, 11, (3, 40, 3))
    tokens[..., -1] = 11
    logits = hooked_last_logits(build_model(cfgs[0]), P, tokens)
    (logits ** 2).sum().backward()
    for r, m in enumerate(models):
        ref = m.last_logits(tokens[r])
        (ref ** 2).sum().backward()
        torch.testing.assert_close(logits[r], ref, rtol=1e-5, atol=1e-5)
        for n in names:
            if P[n].requires_grad:
                g, want = P[n].grad[r], m.get_parameter(n).grad
                assert (g - want).abs().max() <= 1e-4 * want.abs().max(), n


def test_packed_off_the_fast_path_equals_solo(tmp_path, monkeypatch):
    """With the model's training forward switched to the hooked ``forward(tokens)[:, -1]`` (the
    path of deeper or LayerNorm models), exact mode is the solo run bit for bit; batched mode,
    forced off the fast path onto vmap over the hooked forward, tracks it."""
    monkeypatch.setattr(Transformer, "last_logits", _hooked_last_logits)
    cfgs = GROUPS["adamw_minibatch"]
    ref = [tmp_path / f"solo{i}" for i in range(3)]
    for c, d in zip(cfgs, ref):
        run_training(c.replace(n_epochs=20), d, **QUIET)
    short = [c.replace(n_epochs=20) for c in cfgs]
    exact = [tmp_path / f"exact{i}" for i in range(3)]
    train_group(short, exact, device="cpu", exact=True, **QUIET)
    for d, s in zip(exact, ref):
        assert compare_runs(d, s, rel=0.0) == {"abs": 0.0, "rel": 0.0}
    monkeypatch.setattr(stack_mod, "batched_fast_path", lambda cfg: False)
    batched = [tmp_path / f"batched{i}" for i in range(3)]
    train_group(short, batched, device="cpu", exact=False, **QUIET)
    for d, s in zip(batched, ref):
        assert files_of(d) == files_of(s)
        assert early_rel(d, s, 10) < 1e-4


# ---- early stop in a group ---------------------------------------------------------------------
GROK_AT = 30


def _grok_in_stack(run_id):
    """Stack.evaluate with run ``run_id``'s logged test accuracy 100% from epoch 30 on."""
    original = Stack.evaluate

    def evaluate(self, runs=None, train_runs=(), collapse_runs=()):
        original(self, runs, train_runs, collapse_runs)
        ids = [t.cfg.run_id for t in self.trainers]
        if run_id in ids and self.epoch >= GROK_AT:
            r = ids.index(run_id)
            if runs is None or r in list(runs):
                self.curves["test_acc"][r, self.epoch] = 1.0
                self.note_grok()
    return evaluate


def test_run_that_groks_stops_at_its_own_epoch_and_the_others_go_on(tmp_path, monkeypatch,
                                                                     capsys):
    cfgs = [c.replace(n_epochs=200, stop_after_grok=15) for c in GROUPS["adamw_minibatch"]]
    early = cfgs[1]
    monkeypatch.setattr(Stack, "evaluate", _grok_in_stack(early.run_id))
    ref = [tmp_path / f"solo{i}" for i in range(3)]
    for c, d in zip(cfgs, ref):   # trained alone: run 1 groks at 30 there too
        run_training(c, d, **QUIET)
    dirs = [tmp_path / f"r{i}" for i in range(3)]
    said = []
    train_group(cfgs, dirs, device="cpu", exact=True, progress_bar=False, log=said.append)
    for d, s in zip(dirs, ref):
        assert compare_runs(d, s, rel=0.0) == {"abs": 0.0, "rel": 0.0}
    run = RunDir(dirs[1])
    prog = run.read_progress()
    assert (prog["epoch"], prog["done"], prog["stopped_early"]) == (45, True, True)
    assert run.checkpoints()[0] == [0, 20, 40, 45]
    assert run.read_summary()["stopped_early"] is True
    assert any(f"stopped at epoch 45" in s for s in said)
    epochs = [RunDir(d).read_progress()["epoch"] for d in dirs]
    assert epochs[0] > 45 and epochs[2] > 45 and all(RunDir(d).is_complete() for d in dirs)
    with capsys.disabled():
        print(f"\nstop_after_grok group: final epochs {epochs}, {sum(epochs)} run-epochs "
              f"trained; without it {sum(c.n_epochs for c in cfgs)}")


# ---- resume ------------------------------------------------------------------------------------
def test_killed_minibatch_group_resumes_bit_identical(tmp_path, solo):
    """A packed minibatch group that dies 5 epochs after its commit at epoch 20 (those epochs
    are lost with the process's objects): run 0 is resumed alone, runs 1 and 2 as a group;
    all three end as the uninterrupted solo runs, minibatch generators included."""
    cfgs = GROUPS["adamw_minibatch"]
    dirs = [tmp_path / f"r{i}" for i in range(3)]
    every_row = JobSettings(state_every_s=0.0)   # state.pt with every row: 20 is a resume point
    trainers = [Trainer.open(c, d, torch.device("cpu"), every_row) for c, d in zip(cfgs, dirs)]
    stack = Stack(trainers, torch.device("cpu"), exact=True)
    fit_stack(stack, 25, None, lambda *a: None)
    assert stack.epoch == 25
    assert [RunDir(d).read_progress()["epoch"] for d in dirs] == [20, 20, 20]
    for t in trainers:
        t.close()
    del stack, trainers, t
    said = []
    run_training(cfgs[0], dirs[0], progress_bar=False, log=said.append)
    train_group(cfgs[1:], dirs[1:], device="cpu", progress_bar=False, log=said.append)
    assert sum("resuming at epoch 20" in s for s in said) == 3
    for d, s in zip(dirs, solo["adamw_minibatch"]):
        assert compare_runs(d, s, rel=0.0) == {"abs": 0.0, "rel": 0.0}


def test_packed_rows_past_the_state_are_recomputed_bit_identical(tmp_path, solo):
    """State by time in a packed group: the test makes state.pt due once (at the commit of
    epoch 20), so a group killed at epoch 45 has its row of epoch 40 past its state. The resume
    starts at 20 and recomputes epochs and rows bit for bit."""
    cfgs = GROUPS["adamw_minibatch"]
    dirs = [tmp_path / f"r{i}" for i in range(3)]
    trainers = [Trainer.open(c, d, torch.device("cpu")) for c, d in zip(cfgs, dirs)]
    stack = Stack(trainers, torch.device("cpu"), exact=True)
    fit_stack(stack, 10, None, lambda *a: None)
    for t in trainers:
        t.state_written_at = float("-inf")   # the interval has passed: due at the next row
    fit_stack(stack, 45, None, lambda *a: None)
    progress = [RunDir(d).read_progress() for d in dirs]
    assert [(p["epoch"], p["state_epoch"]) for p in progress] == [(40, 20)] * 3
    assert progress[0]["checkpoint_epochs"] == [0, 20, 40]
    for t in trainers:
        t.close()
    del stack, trainers, t
    said = []
    train_group(cfgs, dirs, device="cpu", progress_bar=False, log=said.append)
    assert sum("resuming at epoch 20" in s for s in said) == 3
    for d, s in zip(dirs, solo["adamw_minibatch"]):
        assert compare_runs(d, s, rel=0.0) == {"abs": 0.0, "rel": 0.0}


# ---- what cannot be packed ---------------------------------------------------------------------
@pytest.mark.parametrize("a,b,field", [
    (dict(batch_size=16), dict(batch_size=16, train_frac=0.6), "train_frac"),
    (dict(batch_size=16), dict(batch_size=8), "batch_size"),
    (dict(), dict(optimizer="adam"), "optimizer"),
    (dict(), dict(act_fn="gelu"), "act_fn"),
    (dict(), dict(normalization="LN"), "normalization"),
    (dict(), dict(n_layers=2), "n_layers"),
    (dict(), dict(matmul_precision="high"), "matmul_precision"),
])
def test_groups_that_differ_in_a_shape_field_are_refused(tmp_path, a, b, field):
    ca, cb = cfg_of(**a), cfg_of(model_seed=7, **b)
    with pytest.raises(GroupError, match=rf"^train_group: {field}: expected the same value in "
                                         r"every run of a group, got"):
        train_group([ca, cb], [tmp_path / "a", tmp_path / "b"], progress_bar=False)
    assert not (tmp_path / "a").exists()


def test_a_packed_group_trains_at_its_matmul_precision(tmp_path, monkeypatch):
    """Each stacked step sees the group's precision (read from inside it), each run's attempt
    records it, and the process's own setting is back afterwards."""
    seen = set()
    update = Stack._update

    def spy(self, rows, *args):
        seen.add(torch.get_float32_matmul_precision())
        return update(self, rows, *args)

    monkeypatch.setattr(Stack, "_update", spy)
    cfgs = [cfg_of(model_seed=s, n_epochs=20, matmul_precision="high") for s in (1, 2)]
    dirs = [tmp_path / "a", tmp_path / "b"]
    before = torch.get_float32_matmul_precision()
    train_group(cfgs, dirs, device="cpu", **QUIET)
    assert seen == {"high"} and torch.get_float32_matmul_precision() == before
    for d in dirs:
        assert [a["matmul_precision"] for a in RunDir(d).read_progress()["attempts"]] == ["high"]


def test_the_launcher_never_packs_what_a_group_refuses():
    """plan.shape_key (which runs a job packs) splits on every field check_group requires."""
    from grokhpc.plan import shape_key

    base = cfg_of()
    for field, value in [("matmul_precision", "high"), ("optimizer", "adam"), ("n_layers", 2),
                         ("act_fn", "gelu"), ("batch_size", 16)]:
        assert shape_key(base) != shape_key(base.replace(**{field: value})), field
    mini = cfg_of(batch_size=16)
    assert shape_key(mini) != shape_key(mini.replace(train_frac=0.6))
    assert shape_key(base) == shape_key(base.replace(train_frac=0.6, model_seed=5, lr=1e-2))


def test_full_batch_runs_may_differ_in_train_frac(tmp_path):
    train_batched.check_group([cfg_of(), cfg_of(train_frac=0.6)], [tmp_path / "a",
                                                                    tmp_path / "b"])
