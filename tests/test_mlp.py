"""The MLP family, the mse loss and the datasets beyond the binary operations: the model against
an independent second implementation, packed against solo, the datasets against numpy, and
each bad field's one-line error."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from grokhpc.config import ConfigError, RunConfig, from_dict
from grokhpc.data import make_dataset
from grokhpc.losses import loss
from grokhpc.models import build_model
from grokhpc.store import RunDir
from grokhpc.train import Trainer, run_training
from grokhpc.train_batched import train_group

QUIET = dict(progress_bar=False, log=lambda *a: None)
MLP = dict(model="mlp", p=11, train_frac=0.5, depth=3, width=24, n_epochs=40,
           checkpoint_every=20, eval_every=10, lr=3e-3, device="cpu")


def mlp_cfg(**kw):
    return from_dict({**MLP, **kw})


def sequential_of(model, n_in):
    """A plain nn.Sequential holding copies of ``model``'s weights: the second implementation."""
    layers = []
    for i, lin in enumerate(model.layers):
        new = torch.nn.Linear(lin.in_features, lin.out_features).double()
        with torch.no_grad():
            new.weight.copy_(lin.weight)
            new.bias.copy_(lin.bias)
        layers += [new] + ([torch.nn.ReLU()] if i < len(model.layers) - 1 else [])
    return torch.nn.Sequential(*layers)


def explicit_inputs(cfg, tokens):
    """The encoding written out: one-hot(a) ++ one-hot(b), or one-hot(a) + one-hot(b)."""
    n = cfg.n_classes
    a, b = F.one_hot(tokens[:, 0], n).double(), F.one_hot(tokens[:, 1], n).double()
    return torch.cat([a, b], dim=1) if cfg.encoding == "onehot" else a + b


# ---- the model ---------------------------------------------------------------------------------
@pytest.mark.parametrize("encoding", ["onehot", "twohot"])
def test_mlp_logits_and_gradients_equal_a_plain_sequential(encoding):
    cfg = mlp_cfg(encoding=encoding, init_scale=3.0)
    model = build_model(cfg).double()
    data = make_dataset(cfg)
    x = explicit_inputs(cfg, data.tokens)
    assert x.shape[1] == (2 if encoding == "onehot" else 1) * 11
    ref = sequential_of(model, x.shape[1])
    got, want = model.last_logits(data.tokens), ref(x)
    assert got.shape == (121, 11)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    got.square().sum().backward()
    want.square().sum().backward()
    for mine, theirs in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-10, atol=1e-10)


def test_init_is_torch_linear_default_range_times_init_scale():
    cfg = mlp_cfg(width=500, init_scale=8.0)
    model = build_model(cfg)
    for lin in model.layers:
        bound = 8.0 / lin.in_features ** 0.5
        for p in (lin.weight, lin.bias):
            assert p.abs().max() <= bound and p.abs().max() > 0.9 * bound
    from grokhpc.plan import param_count   # the packing plan's count, by its formula

    assert param_count(cfg) == sum(p.numel() for p in model.parameters()) == \
        (22 * 500 + 500) + (500 * 500 + 500) + (500 * 11 + 11)
    same = build_model(cfg)
    other = build_model(cfg.replace(model_seed=1))
    assert torch.equal(model.layers[0].weight, same.layers[0].weight)
    assert not torch.equal(model.layers[0].weight, other.layers[0].weight)


def test_stacked_form_equals_the_solo_form():
    cfgs = [mlp_cfg(model_seed=s, data_seed=s, encoding="twohot") for s in (1, 2, 3)]
    models = [build_model(c) for c in cfgs]
    rows = torch.stack([make_dataset(c).train_tokens for c in cfgs])
    P = {n: torch.stack([m.get_parameter(n).detach() for m in models]).requires_grad_(True)
         for n, _ in models[0].named_parameters()}
    stacked = models[0].stacked_last_logits(P, rows)
    stacked.square().sum().backward()
    for r, m in enumerate(models):
        solo = m.last_logits(rows[r])
        solo.square().sum().backward()
        torch.testing.assert_close(stacked[r], solo, rtol=1e-5, atol=1e-6)
        for n, p in m.named_parameters():
            torch.testing.assert_close(P[n].grad[r], p.grad, rtol=1e-4, atol=1e-5)


def test_mse_loss_is_torch_mse_on_one_hot_targets():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 7, 5, generator=gen)
    labels = torch.randint(5, (2, 7), generator=gen)
    target = F.one_hot(labels, 5).double()
    got = loss(logits, labels, "float64", loss_fn="mse")
    want = torch.stack([F.mse_loss(logits[r].double(), target[r]) for r in range(2)])
    torch.testing.assert_close(got, want, rtol=1e-14, atol=0)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 4:] = False                     # run 1 has 4 real rows
    got = loss(logits, labels, "float64", mask, loss_fn="mse")
    torch.testing.assert_close(got[1], F.mse_loss(logits[1, :4].double(), target[1, :4]))


# ---- training ----------------------------------------------------------------------------------
def test_mlp_run_resumed_from_its_last_commit_is_bit_identical(tmp_path):
    cfg = mlp_cfg(loss_fn="mse", batch_size=16, grad_filter="ema")
    run_training(cfg, tmp_path / "ref", **QUIET)
    t = Trainer.open(cfg, tmp_path / "cut", torch.device("cpu"))
    t.fit(progress_bar=False, until=25)     # dies 5 epochs after its commit at epoch 20
    del t
    run_training(cfg, tmp_path / "cut", **QUIET)
    a, b = RunDir(tmp_path / "ref"), RunDir(tmp_path / "cut")
    (ea, wa), (eb, wb) = a.checkpoints(mmap=False), b.checkpoints(mmap=False)
    assert ea == eb == [0, 20, 40] and np.array_equal(wa, wb)
    assert a.read_curves().equals(b.read_curves())
    summary = a.read_summary()
    assert summary["basis"] is None and summary["final_gini_embed"] is None
    assert summary["final_train_loss"] is not None
    # analyze draws the curves and says in one line why the transformer's figures are left out
    from grokhpc.analyze import build_figures

    said = []
    assert list(build_figures(a, log=said.append)) == ["training_curves"]
    assert len(said) == 1 and "model mlp" in said[0] and "\n" not in said[0]


PACKED = {
    "add": [mlp_cfg(model_seed=1, data_seed=2, n_epochs=20),
            mlp_cfg(model_seed=3, data_seed=4, n_epochs=20, lr=1e-2, weight_decay=0.1,
                    train_frac=0.6)],
    "parity": [mlp_cfg(p=113, op="sparse_parity", n_bits=10, n_samples=100, n_epochs=20,
                       loss_fn="mse"),
               mlp_cfg(p=113, op="sparse_parity", n_bits=10, k_bits=2, n_samples=80,
                       n_epochs=20, loss_fn="mse", model_seed=5, init_scale=2.0)],
}


@pytest.mark.parametrize("group", list(PACKED))
def test_packed_mlps_exact_equal_solo_and_batched_track_them(tmp_path, group):
    """Runs that differ in lr, weight decay, split (and for parity in k_bits, n_samples and
    init_scale): packed exact is the solo runs bit for bit; batched is one vmapped computation
    equal to them up to float32 rounding over the first epochs."""
    cfgs = PACKED[group]
    solo = [tmp_path / "solo" / f"r{i}" for i in range(2)]
    for c, d in zip(cfgs, solo):
        run_training(c, d, **QUIET)
    for exact in (True, False):
        dirs = [tmp_path / f"exact{exact}" / f"r{i}" for i in range(2)]
        train_group(cfgs, dirs, device="cpu", exact=exact, **QUIET)
        for d, s in zip(dirs, solo):
            (ea, wa), (eb, wb) = RunDir(d).checkpoints(mmap=False), RunDir(s).checkpoints()
            ca, cb = RunDir(d).read_curves(), RunDir(s).read_curves()
            if exact:
                assert np.array_equal(wa, wb) and ca.equals(cb)
            else:
                assert np.array_equal(wa[0], wb[0])
                x, y = ca["train_loss"].to_numpy()[:6], cb["train_loss"].to_numpy()[:6]
                assert np.abs(x - y).max() <= 1e-5 * np.abs(y).max()


# ---- the datasets ------------------------------------------------------------------------------
def test_sparse_parity_labels_split_and_seeds():
    cfg = from_dict({"model": "mlp", "op": "sparse_parity", "n_bits": 12, "k_bits": 3,
                     "n_samples": 200, "train_frac": 0.7, "data_seed": 5})
    d = make_dataset(cfg)
    x = d.tokens.numpy()
    assert x.shape == (200, 12) and set(np.unique(x)) == {-1.0, 1.0}
    bits = (x > 0).astype(int)
    np.testing.assert_array_equal(d.labels.numpy(), bits[:, :3].sum(1) % 2)
    assert len(d.train_idx) == 140 == cfg.n_train and len(d.test_idx) == 60 == cfg.n_test
    assert sorted(torch.cat([d.train_idx, d.test_idx]).tolist()) == list(range(200))
    again = make_dataset(cfg)
    assert torch.equal(again.tokens, d.tokens) and torch.equal(again.train_idx, d.train_idx)
    other = make_dataset(cfg.replace(data_seed=6))
    assert not torch.equal(other.tokens, d.tokens)
    assert 0.3 < d.labels.float().mean() < 0.7


def test_digits_come_through_the_image_path():
    cfg = from_dict({"model": "mlp", "op": "digits", "n_samples": 300})
    d = make_dataset(cfg)
    from sklearn.datasets import load_digits

    ref = load_digits()
    assert d.tokens.shape == (800, 64) and d.tokens.dtype == torch.float32
    assert float(d.tokens.min()) == 0.0 and float(d.tokens.max()) == 1.0
    assert len(d.train_idx) == 300 == cfg.n_train and len(d.test_idx) == 500 == cfg.n_test
    test_rows = d.tokens[d.test_idx].numpy()      # the last 500 images, scaled by 1/16
    np.testing.assert_array_equal(test_rows * 16, ref.data[-500:])
    np.testing.assert_array_equal(d.labels[d.test_idx].numpy(), ref.target[-500:])
    train_rows = d.tokens[d.train_idx].numpy() * 16       # drawn from the first 1297
    pool = {tuple(r) for r in ref.data[:1297]}
    assert all(tuple(r) in pool for r in train_rows)
    other = make_dataset(cfg.replace(data_seed=1))
    assert not torch.equal(other.tokens[:300], d.tokens[:300])


def test_mnist_with_an_empty_cache_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("GROKHPC_DATA", str(tmp_path / "empty"))
    cfg = from_dict({"model": "mlp", "op": "mnist"})
    assert (cfg.n_train, cfg.n_test) == (1000, 10000)
    with pytest.raises(ConfigError) as e:
        make_dataset(cfg)
    msg = str(e.value)
    assert "\n" not in msg and "python -m grokhpc.datasets fetch mnist" in msg
    assert str(tmp_path / "empty") in msg
    # the launcher asks before it submits anything
    spec = tmp_path / "spec.yaml"
    spec.write_text("base: {model: mlp, op: mnist, n_epochs: 10}\ngrid: {model_seed: [1]}\n"
                    f"out: {tmp_path / 'runs'}\n")
    r = subprocess.run([sys.executable, "-m", "grokhpc.launch", str(spec), "--executor",
                        "local"], capture_output=True, text=True,
                       env={**os.environ, "GROKHPC_DATA": str(tmp_path / "empty")})
    assert r.returncode == 2 and not (tmp_path / "runs" / "runs").exists()
    assert r.stderr.count("\n") == 1 and "python -m grokhpc.datasets fetch mnist" in r.stderr


def test_fetch_without_a_network_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    import urllib.error

    import sklearn.datasets

    from grokhpc import datasets

    def offline(*a, **k):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setenv("GROKHPC_DATA", str(tmp_path))
    monkeypatch.setattr(sklearn.datasets, "fetch_openml", offline)
    assert datasets.main(["fetch", "mnist"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: fetch mnist: ") and err.count("\n") == 1
    assert not (tmp_path / datasets.MNIST_FILE).exists()


# ---- the fields --------------------------------------------------------------------------------
def test_the_new_fields_at_their_defaults_leave_run_ids_alone():
    explicit = from_dict({"model": "transformer", "depth": 3, "width": 200,
                          "encoding": "onehot", "n_bits": 40, "k_bits": 3, "n_samples": 1000,
                          "loss_fn": "softmax"})
    assert explicit.run_id == RunConfig().run_id == "2c3d4cea9af7"   # the seed's id
    ids = {RunConfig().run_id, from_dict({"model": "mlp"}).run_id,
           from_dict({"model": "mlp", "depth": 2}).run_id,
           from_dict({"model": "mlp", "encoding": "twohot"}).run_id,
           from_dict({"loss_fn": "mse"}).run_id,
           from_dict({"model": "mlp", "op": "sparse_parity"}).run_id,
           from_dict({"model": "mlp", "op": "sparse_parity", "k_bits": 4}).run_id,
           from_dict({"model": "mlp", "op": "digits"}).run_id}
    assert len(ids) == 8
    assert "p" not in from_dict({"model": "mlp", "op": "digits"}).identity()


@pytest.mark.parametrize("changes,field,words", [
    ({"model": "cnn"}, "model", "one of transformer, mlp"),
    ({"depth": 2}, "depth", "its default 3 unless model is mlp"),
    ({"encoding": "twohot"}, "encoding", "unless model is mlp"),
    ({"model": "mlp", "d_model": 64}, "d_model", "its default 128 unless model is transformer"),
    ({"model": "mlp", "n_layers": 2}, "n_layers", "unless model is transformer"),
    ({"model": "mlp", "depth": 0}, "depth", "an integer >= 1"),
    ({"model": "mlp", "encoding": "binary"}, "encoding", "one of onehot, twohot"),
    ({"op": "sparse_parity"}, "model", "mlp for op sparse_parity"),
    ({"model": "mlp", "op": "digits", "p": 97}, "p", "does not apply to op digits"),
    ({"model": "mlp", "op": "digits", "encoding": "twohot"}, "encoding", "onehot for op digits"),
    ({"model": "mlp", "n_bits": 20}, "n_bits", "40 unless op is sparse_parity"),
    ({"model": "mlp", "op": "sparse_parity", "k_bits": 41}, "k_bits", "1..n_bits"),
    ({"model": "mlp", "op": "sparse_parity", "n_bits": 0}, "n_bits", "1..4096"),
    ({"model": "mlp", "op": "sparse_parity", "n_samples": 1}, "n_samples", ">= 2"),
    ({"model": "mlp", "op": "sparse_parity", "n_samples": 3, "train_frac": 0.2}, "n_samples",
     "at least one training and one test row"),
    ({"model": "mlp", "op": "digits", "n_samples": 1298}, "n_samples", "at most 1297"),
    ({"model": "mlp", "op": "digits", "train_frac": 0.5}, "train_frac", "left out for op digits"),
    ({"loss_fn": "l1"}, "loss_fn", "softmax, stablemax, mse"),
])
def test_bad_fields_are_one_line_errors(changes, field, words):
    with pytest.raises(ConfigError) as e:
        from_dict(changes, source="spec.yaml")
    msg = str(e.value)
    assert msg.startswith(f"spec.yaml: {field}: ") and words in msg and "\n" not in msg


def test_the_command_line_refuses_a_bad_dataset_field_in_one_line(tmp_path):
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "grokhpc.train", "--out", str(out), "--no-progress",
                        "--set", "model=mlp", "--set", "op=sparse_parity", "--set", "k_bits=50"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and not out.exists()
    assert r.stderr == "error: --set: k_bits: expected an integer in 1..n_bits, got 50\n"


def test_the_llc_of_an_mlp_samples_its_own_loss():
    """checkpoint_llc's loss is the run's loss_fn: here mse, torch's mse_loss on one-hot
    targets at the row."""
    from grokhpc.llc import LLCSettings, checkpoint_llc
    from grokhpc.model import flat_weights

    cfg = mlp_cfg(loss_fn="mse", init_scale=2.0)
    model = build_model(cfg)
    data = make_dataset(cfg)
    with torch.no_grad():
        logits = model.last_logits(data.train_tokens).double()
    expect = float(F.mse_loss(logits, F.one_hot(data.train_labels, 11).double()))
    s = LLCSettings(chains=2, draws=8, burn_in=2, batch_size=20)
    est = checkpoint_llc(cfg, flat_weights(model).numpy(), s)
    assert est.init_loss == pytest.approx(expect, rel=1e-6)
    assert est.loss_trace.shape == (2, 10) and np.isfinite(est.llc_mean)
