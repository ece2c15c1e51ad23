"""The run fields of the methods that change grokking -- Grokfast's gradient filters, StableMax,
⊥AdamW -- and the softmax-collapse measure.

Each formula is held by a second implementation written from the papers' definitions (a plain
torch loop: the model's own ``last_logits``, torch's own AdamW, a hand-written filter / loss /
projection), over the first epochs; packing and resuming against solo runs as
tests/test_pack_fields.py does for the other fields.
"""

from __future__ import annotations

import subprocess
import sys
from collections import deque

import numpy as np
import pytest
import torch

from grokhpc.config import ConfigError, RunConfig, from_dict
from grokhpc.loop import fit_stack
from grokhpc.losses import softmax_collapse, stablemax_row_losses
from grokhpc.runtime import JobSettings
from grokhpc.stack import Stack
from grokhpc.store import RunDir
from grokhpc.train import Trainer, run_training
from grokhpc.train_batched import train_group
from test_pack_fields import early_rel, train_alone
from test_train_batched import compare_runs, files_of

TINY = dict(p=11, train_frac=0.5, d_model=32, n_heads=4, d_head=8, d_mlp=64, n_epochs=30,
            checkpoint_every=10, eval_every=5, lr=3e-3, device="cpu")
QUIET = dict(progress_bar=False, log=lambda *a: None)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def cfg_of(**kw) -> RunConfig:
    return from_dict({**TINY, **kw})


# ---- the second implementation ---------------------------------------------------------------
def ref_stablemax_nll(logits, labels):
    """-log(s(x_y) / sum s(x)), s(x) = x + 1 (x >= 0), 1 / (1 - x) (x < 0), in float64."""
    x = logits.double()
    s = torch.empty_like(x)
    pos = x >= 0
    s[pos] = x[pos] + 1
    s[~pos] = 1 / (1 - x[~pos])
    return -(torch.log(s[torch.arange(len(labels)), labels] / s.sum(dim=1))).mean()


def ref_filter(cfg, named, state):
    """Grokfast as its authors' gradfilter_ema / gradfilter_ma, per named parameter."""
    if cfg.grad_filter == "ema":
        if not state:
            state.update({n: p.grad.detach().clone() for n, p in named})
        for n, p in named:
            state[n] = state[n] * cfg.grokfast_alpha + p.grad.detach() * (1 - cfg.grokfast_alpha)
            p.grad = p.grad + state[n] * cfg.grokfast_lamb
    elif cfg.grad_filter == "ma":
        for n, p in named:
            window = state.setdefault(n, deque(maxlen=cfg.grokfast_window))
            window.append(p.grad.detach().clone())
            if len(window) == cfg.grokfast_window:
                p.grad = p.grad + sum(window) / len(window) * cfg.grokfast_lamb


def ref_perp(named):
    """⊥Grad per weight tensor: g - (w.g / w.w) w, rescaled to |g|."""
    for _, p in named:
        w, g = p.detach().reshape(-1), p.grad.reshape(-1)
        g_perp = g - torch.dot(w, g) / torch.dot(w, w) * w
        p.grad = (g_perp * (g.norm() / g_perp.norm())).view_as(p.grad)


def plain_loop(cfg, n_epochs: int) -> list[float]:
    """The train loss of epochs 0..n_epochs-1 of ``cfg`` (full batch) trained by hand."""
    from grokhpc.data import make_dataset
    from grokhpc.model import build_model

    model, data = build_model(cfg), make_dataset(cfg)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW([p for _, p in named], lr=cfg.lr, weight_decay=cfg.weight_decay,
                            betas=cfg.betas)
    state, losses = {}, []
    for _ in range(n_epochs):
        logits = model.last_logits(data.train_tokens)
        if cfg.loss_fn == "stablemax":
            loss = ref_stablemax_nll(logits, data.train_labels)
        else:
            loss = torch.nn.functional.cross_entropy(logits.double(), data.train_labels)
        loss.backward()
        ref_filter(cfg, named, state)
        if cfg.optimizer == "perp_adamw":
            ref_perp(named)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("fields", [
    dict(grad_filter="ema"),
    dict(grad_filter="ema", grokfast_alpha=0.9, grokfast_lamb=5.0),
    dict(grad_filter="ma", grokfast_window=7, grokfast_lamb=3.0),
    dict(loss_fn="stablemax"),
    dict(optimizer="perp_adamw", weight_decay=0.0),
    dict(optimizer="perp_adamw", loss_fn="stablemax", weight_decay=0.3),
])
def test_each_method_is_its_formula(tmp_path, fields):
    """A run's train losses over its first 30 epochs against the hand-written loop, 1e-6
    relative; and the method changes the losses (the comparison could fail)."""
    cfg = cfg_of(**fields)
    want = plain_loop(cfg, 30)
    run_training(cfg, tmp_path / "run", **QUIET)
    got = RunDir(tmp_path / "run").read_curves()["train_loss"].to_numpy()[:30]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
    plain = plain_loop(cfg_of(), 30)
    assert np.abs(np.array(want) / np.array(plain) - 1).max() > 1e-3


def test_stablemax_loss_is_its_formula_at_extreme_logits():
    """Logits across both branches, exactly 0 and 1 (where a careless where() gives NaN
    gradients), large magnitudes; float64 and float32."""
    x = torch.tensor([[0.0, 1.0, -1.0, 30.0, -1e6], [5.0, -3.0, 1e4, 0.5, -0.5]],
                     dtype=torch.float64, requires_grad=True)
    y = torch.tensor([1, 2])
    got = stablemax_row_losses(x, y, "float64").mean()
    assert got.item() == pytest.approx(ref_stablemax_nll(x.detach(), y).item(), rel=1e-15)
    got.backward()
    assert torch.isfinite(x.grad).all()
    f32 = stablemax_row_losses(x.detach().float(), y, "float32")
    assert f32.dtype == torch.float32
    assert f32.mean().item() == pytest.approx(got.item(), rel=1e-6)


# ---- softmax collapse ------------------------------------------------------------------------
def ref_collapse(logits: np.ndarray) -> float:
    """Prieto et al.'s SC: the float32 sum of exp(x - max) is exactly 1."""
    x = logits.astype(np.float32)
    total = np.exp(x - x.max(axis=1, keepdims=True)).sum(axis=1, dtype=np.float32)
    return float((total == np.float32(1.0)).mean())


def collapse_bounds(logits: np.ndarray) -> tuple[float, float]:
    """The SC any float32 summation order gives, bounded from float64: a row whose other terms
    sum below 2^-25 (a quarter of float32's spacing at 1) is absorbed in any order, one above
    2^-23 in none; between them the order decides."""
    x = logits.astype(np.float64)
    terms = np.sort(np.exp(x - x.max(axis=1, keepdims=True)), axis=1)[:, :-1]
    other = terms.sum(axis=1)
    return float((other < 2.0 ** -25).mean()), float((other <= 2.0 ** -23).mean())


def test_softmax_collapse_counts_rows_whose_other_terms_vanish():
    x = torch.tensor([[0.0, -200.0, -150.0], [0.0, -5.0, -9.0], [40.0, 0.0, -1.0],
                      [3.0, 3.0, -500.0]])
    assert softmax_collapse(x).item() == 0.5 == ref_collapse(x.numpy())
    mask = torch.tensor([True, False, True, True])
    assert softmax_collapse(x, mask).item() == pytest.approx(2 / 3)


def test_the_collapse_column_is_the_measure_of_the_logged_weights(tmp_path):
    """At every evaluation epoch (and only there) the curve holds the SC of that epoch's
    weights, recomputed from the checkpoint rows by numpy (within the rows whose collapse
    depends on float32's summation order); a run without weight decay, long enough for its
    train rows to collapse."""
    from grokhpc.data import make_dataset
    from grokhpc.model import build_model, load_flat

    cfg = cfg_of(weight_decay=0.0, lr=3e-2, n_epochs=200, checkpoint_every=50, eval_every=10)
    run = run_training(cfg, tmp_path / "run", **QUIET)
    curves = run.read_curves().set_index("epoch")
    sc = curves["softmax_collapse"]
    assert sc.notna().to_numpy().nonzero()[0].tolist() == list(range(0, 201, 10))
    model, data = build_model(cfg), make_dataset(cfg)
    epochs, weights = run.checkpoints(mmap=False)
    for e, row in zip(epochs, weights):
        load_flat(model, torch.from_numpy(np.array(row)))
        with torch.no_grad():
            logits = model.last_logits(data.train_tokens).numpy()
        low, high = collapse_bounds(logits)
        assert low <= sc.loc[e] <= high, e
    assert sc.loc[200] > 0.5


# ---- packed and resumed ------------------------------------------------------------------------
GROUPS = {
    "ema": [cfg_of(grad_filter="ema", model_seed=1),
            cfg_of(grad_filter="ema", model_seed=2, grokfast_alpha=0.9, grokfast_lamb=5.0),
            cfg_of(grad_filter="ema", model_seed=3, train_frac=0.6, weight_decay=0.0)],
    "ma_minibatch": [cfg_of(grad_filter="ma", grokfast_window=4, batch_size=16, model_seed=1),
                     cfg_of(grad_filter="ma", grokfast_window=4, batch_size=16, model_seed=2,
                            grokfast_lamb=1.0, lr=1e-2)],
    "stablemax_perp": [cfg_of(loss_fn="stablemax", optimizer="perp_adamw", model_seed=1),
                       cfg_of(loss_fn="stablemax", optimizer="perp_adamw", model_seed=2,
                              weight_decay=0.0, train_frac=0.4)],
}


@pytest.fixture(scope="module")
def solo(tmp_path_factory):
    return train_alone(GROUPS, tmp_path_factory.mktemp("solo"))


@pytest.mark.parametrize("group", list(GROUPS))
def test_packed_exact_group_equals_solo_runs_bit_for_bit(tmp_path, solo, group):
    dirs = [tmp_path / f"r{i}" for i in range(len(GROUPS[group]))]
    train_group(GROUPS[group], dirs, device="cpu", exact=True, **QUIET)
    for d, s in zip(dirs, solo[group]):
        assert compare_runs(d, s, rel=0.0) == {"abs": 0.0, "rel": 0.0}


@pytest.mark.parametrize("mode", ["eager", "fused"])
@pytest.mark.parametrize("group", list(GROUPS))
def test_batched_group_tracks_solo_runs(tmp_path, solo, group, mode):
    dirs = [tmp_path / f"r{i}" for i in range(len(GROUPS[group]))]
    train_group(GROUPS[group], dirs, JobSettings(step_mode=mode), device="cpu", exact=False,
                **QUIET)
    for d, s in zip(dirs, solo[group]):
        assert files_of(d) == files_of(s)
        assert early_rel(d, s, 10) < 1e-4


@pytest.mark.parametrize("group", ["ema", "ma_minibatch"])
def test_a_filtered_run_killed_after_a_commit_resumes_bit_identical(tmp_path, solo, group):
    """Killed 5 epochs after its state.pt of epoch 20 (the filter's state past it is lost with
    the process): resumed, every file is the uninterrupted run's."""
    cfg = GROUPS[group][0]
    d = tmp_path / "run"
    t = Trainer.open(cfg, d, torch.device("cpu"), JobSettings(state_every_s=0.0))
    fit_stack(Stack([t], torch.device("cpu"), exact=True), 25, None, lambda *a: None)
    assert RunDir(d).read_progress()["state_epoch"] == 20
    t.close()
    del t
    said = []
    run_training(cfg, d, progress_bar=False, log=said.append)
    assert any("resuming at epoch 20" in s for s in said)
    assert compare_runs(d, solo[group][0], rel=0.0) == {"abs": 0.0, "rel": 0.0}


def test_groups_that_differ_in_filter_or_loss_are_refused(tmp_path):
    from grokhpc.train_batched import GroupError

    for a, b, field in [(dict(), dict(grad_filter="ema"), "grad_filter"),
                        (dict(grad_filter="ma"), dict(grad_filter="ma", grokfast_window=5),
                         "grokfast_window"),
                        (dict(), dict(loss_fn="stablemax"), "loss_fn")]:
        with pytest.raises(GroupError, match=rf"^train_group: {field}: expected the same"):
            train_group([cfg_of(**a), cfg_of(model_seed=7, **b)],
                        [tmp_path / "a", tmp_path / "b"], progress_bar=False)
        assert not (tmp_path / "a").exists()


# ---- the fields ------------------------------------------------------------------------------
def test_the_new_fields_at_their_defaults_leave_run_ids_alone():
    base = RunConfig()
    assert not {"grad_filter", "grokfast_alpha", "grokfast_lamb", "grokfast_window",
                "loss_fn"} & set(base.identity())
    ids = {base.run_id, base.replace(grad_filter="ema").run_id,
           base.replace(loss_fn="stablemax").run_id, base.replace(optimizer="perp_adamw").run_id}
    assert len(ids) == 4


@pytest.mark.parametrize("fields,line", [
    (dict(grad_filter="lowpass"), "grad_filter: expected one of none, ema, ma, got 'lowpass'"),
    (dict(grad_filter="ema", grokfast_alpha=1.0),
     "grokfast_alpha: expected a number in [0, 1), got 1.0"),
    (dict(grad_filter="ema", grokfast_lamb=-1), "grokfast_lamb: expected a non-negative number"),
    (dict(grad_filter="ma", grokfast_window=0), "grokfast_window: expected an integer >= 1"),
    (dict(grokfast_alpha=0.9), "grokfast_alpha: expected 0.98 unless grad_filter is ema"),
    (dict(grad_filter="ma", grokfast_alpha=0.9),
     "grokfast_alpha: expected 0.98 unless grad_filter is ema"),
    (dict(grokfast_lamb=5), "grokfast_lamb: expected 2.0 unless grad_filter is ema or ma"),
    (dict(grad_filter="ema", grokfast_window=10),
     "grokfast_window: expected 100 unless grad_filter is ma"),
    (dict(loss_fn="hinge"), "loss_fn: expected one of softmax, stablemax, mse, got 'hinge'"),
    (dict(grokfast_alpha="fast"), "grokfast_alpha: expected float, got 'fast'"),
    (dict(optimizer="perp_sgd"), "optimizer: expected one of adamw, adam, sgd, perp_adamw"),
])
def test_bad_values_are_one_line_errors(fields, line):
    with pytest.raises(ConfigError) as e:
        from_dict(fields, source="spec.yaml")
    assert str(e.value).startswith(f"spec.yaml: {line}") and "\n" not in str(e.value)


def test_the_command_line_refuses_a_bad_value_in_one_line(tmp_path):
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "grokhpc.train", "--out", str(out), "--set",
                        "grad_filter=ema", "--set", "grokfast_window=5"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and not out.exists()
    assert r.stderr == ("error: --set: grokfast_window: expected 100 unless grad_filter is ma, "
                        "got 5\n")


def test_the_single_run_figures_show_the_collapse_only_where_there_is_some():
    import pandas as pd

    from grokhpc.analyze import training_figures

    epochs = np.arange(0, 50)
    curves = pd.DataFrame({"epoch": epochs, "train_loss": 1.0 / (1 + epochs),
                           "train_acc": np.minimum(1, epochs / 20), "test_loss": 2.0,
                           "test_acc": 0.1, "softmax_collapse": np.where(epochs % 10, np.nan, 0.0)})
    assert "softmax_collapse" not in training_figures(curves, None, {}, "div", "div")
    curves.loc[40, "softmax_collapse"] = 0.25
    fig = training_figures(curves, None, {}, "div", "div")["softmax_collapse"]
    sc = next(t for t in fig.data if t.name == "softmax collapse")
    assert list(sc.x) == list(range(0, 50, 10)) and list(sc.y) == [0, 0, 0, 0, 0.25]


def test_a_filtered_group_is_never_captured_in_a_graph(tmp_path):
    """The filter's step reads the host's step count (its first step, the MA window's slot),
    which a replayed graph would freeze: graph falls back to fused, saying so."""
    said = []
    t = Trainer.open(GROUPS["ema"][0], tmp_path / "run", torch.device("cpu"))
    stack = Stack([t], torch.device("cpu"), exact=False, step_mode="graph", log=said.append)
    assert stack.step_mode == "fused" and stack.capture is None
    assert said == ["step_mode graph: a grad_filter's step depends on the host's step count; "
                    "the fused step is used"]
    t.close()
