"""Progress measures and phase detection: each fast measure against a slow, obviously-correct
computation (explicit loops, the literal p^3 cube) on a small p, the fast path against the seed
notebook's formulation on the seed config, and the phase rules on curves built to known answers."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from grokhpc import bases, measures, phases, runtime, task_measures
from grokhpc.config import RunConfig
from grokhpc.data import all_pairs, make_dataset
from grokhpc.model import build_model
from grokhpc.store import RunDir

import seed_fourier

SMALL = dict(n_heads=2, d_model=16, d_head=8, d_mlp=24, device="cpu")

# tiny tensors on two shared cores: one intra-op thread avoids OpenMP spin-waits
torch.set_num_threads(1)
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


def weights_of(model) -> dict[str, np.ndarray]:
    return {n: p.detach().numpy().copy() for n, p in model.named_parameters()}


def small_model(p: int, op: str = "sub", bias: bool = True, seed: int = 0):
    """A small model with non-zero biases (so every bias term of the fast path is exercised)."""
    cfg = RunConfig(p=p, op=op, model_seed=seed, **SMALL)
    model = build_model(cfg)
    if bias:
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for n, par in model.named_parameters():
                if ".b_" in n:
                    par.copy_(torch.randn(par.shape, generator=gen) * 0.3)
    return cfg, model


def slow_ce(logit_rows, labels) -> float:
    """Cross-entropy with Python floats, one row at a time."""
    total = 0.0
    for row, y in zip(logit_rows, labels):
        m = max(row)
        lse = m + math.log(sum(math.exp(v - m) for v in row))
        total += lse - row[int(y)]
    return total / len(labels)



# ---- Fourier basis, Gini, key frequencies ---------------------------------------------------
def test_fourier_basis_order_values_and_orthonormality():
    p = 7
    F = bases.fourier_basis(p)[0]
    names = bases.fourier_names(p)
    assert names == ["Constant", "Sin 1", "Cos 1", "Sin 2", "Cos 2", "Sin 3", "Cos 3"]
    for x in range(p):
        assert F[0, x] == pytest.approx(1 / math.sqrt(p))
        for k in range(1, 4):
            # sum_x sin^2 = sum_x cos^2 = p/2 for 0 < k < p/2
            assert F[2 * k - 1, x] == pytest.approx(math.sin(2 * math.pi * k * x / p) / math.sqrt(p / 2))
            assert F[2 * k, x] == pytest.approx(math.cos(2 * math.pi * k * x / p) / math.sqrt(p / 2))
    np.testing.assert_allclose(F @ F.T, np.eye(p), atol=1e-12)


def test_gini_against_mean_absolute_difference():
    rng = np.random.default_rng(0)
    for x in (rng.random(9), rng.exponential(size=30), np.array([0.0, 0, 0, 5.0])):
        n = len(x)
        slow = sum(abs(a - b) for a in x for b in x) / (2 * n * n * x.mean())
        assert task_measures.gini(x) == pytest.approx(slow, rel=1e-12)
    assert task_measures.gini(np.ones(10)) == pytest.approx(0.0, abs=1e-15)
    assert task_measures.gini([0, 0, 0, 1]) == pytest.approx(3 / 4)   # (n - 1) / n for one nonzero


def test_fourier_norm_ginis_match_explicit_loops():
    p = 11
    cfg, model = small_model(p)
    W = weights_of(model)
    # Fourier norms of W_E with explicit sums over x
    norms = []
    for comp in range(p):
        k = (comp + 1) // 2
        fn = ((lambda x: 1.0) if comp == 0 else
              (lambda x, k=k: math.sin(2 * math.pi * k * x / p)) if comp % 2 else
              (lambda x, k=k: math.cos(2 * math.pi * k * x / p)))
        vec = np.array([fn(x) for x in range(p)])
        vec /= np.linalg.norm(vec)
        proj = sum(vec[x] * W["embed.W_E"][x].astype(float) for x in range(p))
        norms.append(np.linalg.norm(proj))
    np.testing.assert_allclose(bases.component_norms(bases.task_basis("sub", p),
                                                     W["embed.W_E"][:p]), norms, rtol=1e-9)
    ev = measures.Evaluator(cfg, [1, 3])
    got = ev.measure(W)
    assert got["gini_embed"] == pytest.approx(task_measures.gini(norms), rel=1e-9)
    W_logit = W["blocks.0.mlp.W_out"].astype(float) @ W["unembed.W_U"].astype(float)
    F = seed_fourier.fourier_basis(p)
    lnorms = [np.linalg.norm([W_logit[n] @ F[c] for n in range(W_logit.shape[0])]) for c in range(p)]
    assert got["gini_logit"] == pytest.approx(task_measures.gini(lnorms), rel=1e-6)
    total = sum(float((v.astype(float) ** 2).sum()) for v in W.values())
    assert got["weight_norm_sq"] == pytest.approx(total, rel=1e-12)


def test_key_freqs_found_in_a_constructed_embedding():
    p, d = 23, 40
    rng = np.random.default_rng(1)
    x = np.arange(p)[:, None]
    for key, amps in (([2, 7, 9], [1.0, 0.6, 1.5]), ([4], [1.0]), ([1, 5, 11], [1, 1, 1])):
        W = rng.normal(0, 0.02, size=(p + 1, d))
        for k, amp in zip(key, amps):
            W[:p] += amp * np.cos(2 * np.pi * k * x / p + rng.random()) * rng.normal(size=(1, d))
        assert task_measures.choose_keys(bases.task_basis("sub", p), W) == key
    basis = bases.task_basis("sub", 113)
    assert task_measures.parse_keys("34, 1,5", basis) == [1, 5, 34]
    with pytest.raises(ValueError, match="1..56"):
        task_measures.parse_keys("57", basis)


# ---- the fast forward and the losses ---------------------------------------------------------
def test_numpy_blas_runs_on_one_thread_while_measuring(monkeypatch):
    """The measures keep numpy's BLAS to one thread (left alone it starts one per core, which
    spin beside torch's), also with two torch threads and for a BLAS loaded after the first
    measure; the process's own BLAS setting is back afterwards."""
    from threadpoolctl import threadpool_info

    def blas_threads():
        return {i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}

    cfg, model = small_model(7, "sub")
    ev = measures.Evaluator(cfg, [1])
    with runtime.torch_threads(2):
        ev.measure(weights_of(model))
    import scipy.linalg  # noqa: F401  (its own OpenBLAS, loaded after a first measure)
    seen, inner = [], ev._measure
    monkeypatch.setattr(ev, "_measure", lambda W: seen.append(blas_threads()) or inner(W))
    before = blas_threads()
    with runtime.torch_threads(2):
        ev.measure(weights_of(model))
    assert seen == [{1}]
    assert blas_threads() == before


@pytest.mark.parametrize("op", ["sub", "add", "div"])
def test_grid_matches_hooked_forward_and_losses_match_loops(op):
    p = 7
    cfg, model = small_model(p, op)
    W = weights_of(model)
    ev = measures.Evaluator(cfg, [1])
    post, logits, _, _, resid_mid = ev.grid(W, resid=True)
    tokens, labels = all_pairs(p, "sub")                       # the whole grid, a-major
    with torch.no_grad():
        full, cache = model.run_with_cache(tokens)
    torch.testing.assert_close(logits, full[:, -1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(resid_mid, cache["resid_mid", 0][:, -1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(post, cache["post", 0, "mlp"][:, -1], rtol=1e-5, atol=1e-5)

    data = make_dataset(cfg)
    with torch.no_grad():
        rows = model(data.tokens)[:, -1].double().tolist()
    lab = data.labels.tolist()
    got = ev.measure(W)
    for split, idx in (("train", data.train_idx), ("test", data.test_idx),
                       ("all", range(len(lab)))):
        idx = list(map(int, idx))
        assert got[f"{split}_loss"] == pytest.approx(
            slow_ce([rows[i] for i in idx], [lab[i] for i in idx]), rel=1e-5)
        hits = [max(range(p), key=lambda c: rows[i][c]) == lab[i] for i in idx]
        assert got[f"{split}_acc"] == pytest.approx(sum(hits) / len(idx))
    # one value per non-trivial key: frequencies 1..3 of Z_7, and of Z_6 over log_3 for div
    assert len(got["cos_sim"]) == 3
    assert all(got[k] is not None for k in task_measures.GROUP_COLUMNS)


# ---- restricted and excluded loss -----------------------------------------------------------
@pytest.mark.parametrize("op,key", [("sub", [1, 4]), ("add", [2])])
def test_restricted_and_excluded_loss_match_loops(op, key):
    p = 11
    cfg, model = small_model(p, op, seed=3)
    W = weights_of(model)
    tokens, labels = all_pairs(p, op)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    post = cache["post", 0, "mlp"][:, -1].double().numpy()
    resid_mid = cache["resid_mid", 0][:, -1].double().numpy()
    W_out = W["blocks.0.mlp.W_out"].astype(float)
    W_U = W["unembed.W_U"].astype(float)
    sign = -1 if op == "sub" else 1
    # directions over the grid, built pair by pair
    dirs = []
    for k in key:
        for fn in (math.cos, math.sin):
            v = np.array([fn(2 * math.pi * k * (a + sign * b) / p) for a in range(p) for b in range(p)])
            dirs.append(v / math.sqrt(sum(x * x for x in v)))
    n_pairs, n_neur = post.shape
    approx = np.zeros_like(post)
    for n in range(n_neur):
        for v in dirs:
            coef = sum(post[i, n] * v[i] for i in range(n_pairs))
            approx[:, n] += coef * v
    logits = (resid_mid + post @ W_out) @ W_U + W["unembed.b_U"] + W["blocks.0.mlp.b_out"] @ W_U
    restricted = approx @ W_out @ W_U
    restricted = restricted + logits.mean(0) - restricted.mean(0)
    excluded = ((post - approx) @ W_out + resid_mid) @ W_U
    data = make_dataset(cfg)
    lab = labels.numpy()
    test_i, train_i = data.test_idx.numpy(), data.train_idx.numpy()
    want_r = slow_ce(restricted[test_i].tolist(), lab[test_i])
    want_e = slow_ce(excluded[train_i].tolist(), lab[train_i])
    got = measures.Evaluator(cfg, key).measure(W)
    assert got["restricted_loss"] == pytest.approx(want_r, rel=1e-5)
    assert got["excluded_loss"] == pytest.approx(want_e, rel=1e-5)


# ---- cosine similarity with cos(w_k (a -+ b - c)) ---------------------------------------------
@pytest.mark.parametrize("op", ["sub", "add"])
def test_cos_sim_and_residual_match_the_literal_cube(op):
    p = 7
    cfg, model = small_model(p, op, seed=5)
    W = weights_of(model)
    tokens, _ = all_pairs(p, op)
    with torch.no_grad():
        L = model(tokens)[:, -1].double().numpy().reshape(p, p, p)
    sign = -1 if op == "sub" else 1
    cube = np.zeros((p // 2, p, p, p))
    for k in range(1, p // 2 + 1):
        for a in range(p):
            for b in range(p):
                for c in range(p):
                    cube[k - 1, a, b, c] = math.cos(2 * math.pi * k * (a + sign * b - c) / p)
        cube[k - 1] /= np.sqrt((cube[k - 1] ** 2).sum())
    vals = np.array([(cube[i] * L).sum() for i in range(p // 2)])
    residual = L - sum(vals[i] * cube[i] for i in range(p // 2))
    got = measures.Evaluator(cfg, [1]).measure(W)
    np.testing.assert_allclose(got["cos_sim"], vals / np.linalg.norm(L), rtol=1e-5, atol=1e-7)
    assert got["cos_residual"] == pytest.approx(np.linalg.norm(residual) / np.linalg.norm(L),
                                                rel=1e-6)


def test_cos_sim_of_a_pure_cosine_logit_cube():
    """Logits that ARE 3 cos(w_2 (a - b - c)): cos_sim for k=2 is 1, every other 0, residual 0."""
    p = 11
    ev = measures.Evaluator(RunConfig(p=p, **SMALL), [2])
    a, b, c = np.meshgrid(np.arange(p), np.arange(p), np.arange(p), indexing="ij")
    L = torch.tensor(3 * np.cos(2 * np.pi * 2 * (a - b - c) / p).reshape(p * p, p))
    got = ev.lens.attribution(L)
    want = np.zeros(p // 2)
    want[1] = 1.0
    np.testing.assert_allclose(got["cos_sim"], want, atol=1e-12)
    assert got["cos_residual"] == pytest.approx(0.0, abs=1e-6)


# ---- the fast path against the seed notebook's formulation, seed config --------------------------
def seed_measures(model, key_freqs, p, dataset, labels, train_indices, test_indices):
    """The notebook's get_restricted_loss / get_excluded_loss / get_cos_sim /
    get_residual_cos_sim, as written there (cos_cube built one frequency at a time)."""
    def loss_fn(logits, labels):
        if len(logits.shape) == 3:
            logits = logits[:, -1]
        logits = logits.to(torch.float64)
        log_probs = logits.log_softmax(dim=-1)
        correct_log_probs = log_probs.gather(dim=-1, index=labels[:, None])[:, 0]
        return -correct_log_probs.mean()

    out = {}
    logits, cache = model.run_with_cache(dataset)
    logits = logits[:, -1, :]
    neuron_acts = cache["post", 0, "mlp"][:, -1, :]
    approx_neuron_acts = torch.zeros_like(neuron_acts)
    a = torch.arange(p)[:, None]
    b = torch.arange(p)[None, :]
    for freq in key_freqs:
        cos_apb_vec = torch.cos(freq * 2 * torch.pi / p * (a - b))
        cos_apb_vec /= cos_apb_vec.norm()
        cos_apb_vec = cos_apb_vec.reshape(p * p, 1)
        approx_neuron_acts += (neuron_acts * cos_apb_vec).sum(dim=0) * cos_apb_vec
        sin_apb_vec = torch.sin(freq * 2 * torch.pi / p * (a - b))
        sin_apb_vec /= sin_apb_vec.norm()
        sin_apb_vec = sin_apb_vec.reshape(p * p, 1)
        approx_neuron_acts += (neuron_acts * sin_apb_vec).sum(dim=0) * sin_apb_vec
    restricted_logits = approx_neuron_acts @ model.blocks[0].mlp.W_out @ model.unembed.W_U
    restricted_logits += logits.mean(dim=0, keepdim=True) - restricted_logits.mean(dim=0, keepdim=True)
    out["restricted_loss"] = loss_fn(restricted_logits[test_indices], labels[test_indices]).item()
    excluded_neuron_acts = neuron_acts - approx_neuron_acts
    residual_stream_final = excluded_neuron_acts @ model.blocks[0].mlp.W_out + cache["resid_mid", 0][:, -1, :]
    excluded_logits = residual_stream_final @ model.unembed.W_U
    out["excluded_loss"] = loss_fn(excluded_logits[train_indices], labels[train_indices]).item()

    # float64 here: the notebook's float32 sums over p^3 terms are off by ~1e-4 (its residual
    # fraction of a random model comes out 1.0001)
    cube_logits = logits.double().reshape(p, p, p)
    vals, approx = [], torch.zeros_like(cube_logits)
    for freq in range(1, p // 2 + 1):
        a3 = torch.arange(p, dtype=torch.float64)[:, None, None]
        b3 = torch.arange(p, dtype=torch.float64)[None, :, None]
        c3 = torch.arange(p, dtype=torch.float64)[None, None, :]
        cube_predicted_logits = torch.cos(freq * 2 * torch.pi / p * (a3 - b3 - c3))
        cube_predicted_logits /= cube_predicted_logits.norm()
        val = (cube_predicted_logits * cube_logits).sum()
        vals.append(val)
        approx += val * cube_predicted_logits
    vals = torch.stack(vals)
    out["cos_sim"] = (vals / cube_logits.norm()).tolist()
    out["cos_residual"] = ((cube_logits - approx).norm() / cube_logits.norm()).item()
    out["all_loss"] = loss_fn(logits, labels).item()
    out["train_loss"] = loss_fn(logits[train_indices], labels[train_indices]).item()
    out["test_loss"] = loss_fn(logits[test_indices], labels[test_indices]).item()
    return out


def test_fast_path_matches_seed_formulation_on_seed_config():
    cfg = RunConfig(device="cpu")                        # p = 113, the seed's model and split
    model = build_model(cfg)
    data = make_dataset(cfg)
    key = [1, 5, 34]
    with torch.no_grad():
        want = seed_measures(model, key, cfg.p, data.tokens, data.labels, data.train_idx,
                             data.test_idx)
    got = measures.Evaluator(cfg, key).measure(weights_of(model))
    # the seed notebook's initial losses (train 4.732243929, test 4.734574222)
    assert got["train_loss"] == pytest.approx(4.732243929, abs=2e-6)
    assert got["test_loss"] == pytest.approx(4.734574222, abs=2e-6)
    for k in ("train_loss", "test_loss", "all_loss", "restricted_loss", "excluded_loss",
              "cos_residual"):
        assert got[k] == pytest.approx(want[k], rel=1e-5), k
    np.testing.assert_allclose(got["cos_sim"], want["cos_sim"], rtol=1e-3, atol=2e-6)


# ---- phase detection on constructed curves --------------------------------------------------
def make_curves(n=1000, every=10, peak=200, below=500, clean=700, grok=650, memorised_at=150):
    """Curves with known phase epochs: test loss rises to 30 at ``peak``, crosses ln p at
    ``below``, reaches 10 x train loss at ``clean``; test accuracy 0.99 at ``grok``."""
    p = 113
    ep = np.arange(n + 1)
    train_loss = np.where(ep < memorised_at, 4.0, 1e-3)
    train_acc = np.where(ep < memorised_at, 0.5, 1.0)
    test_loss = np.full(n + 1, np.nan)
    test_acc = np.full(n + 1, np.nan)
    for e in ep[::every]:
        if e <= peak:
            tl = 4.7 + (30 - 4.7) * e / peak
        elif e < below:
            tl = 30 - (30 - 4.0) * (e - peak) / (below - peak)   # still above ln p = 4.727
            tl = max(tl, math.log(p) + 0.01)
        elif e < clean:
            tl = 1.0
        else:
            tl = 5e-3
        test_loss[e] = tl
        test_acc[e] = 0.995 if e >= grok else 0.5
    return p, pd.DataFrame({"epoch": ep, "train_loss": train_loss, "train_acc": train_acc,
                            "test_loss": test_loss, "test_acc": test_acc})


def test_phases_on_constructed_curves():
    p, c = make_curves()
    ph = phases.detect_phases(c, p)
    assert ph["memorisation_end"] == ph["test_loss_peak_epoch"] == 200
    assert ph["test_loss_peak"] == pytest.approx(30.0)
    assert ph["memorised"] is True
    assert ph["circuit_formation_end"] == 500
    assert ph["cleanup_end"] == 700
    assert ph["grokking_epoch"] == 650 and ph["grokked"] is True


def test_phases_flags_censored_and_unmemorised_runs():
    p, c = make_curves(memorised_at=400, grok=10**9, clean=10**9, below=10**9)
    ph = phases.detect_phases(c, p)
    assert ph["memorised"] is False                 # train accuracy 50% at the peak
    assert ph["circuit_formation_end"] is None and ph["cleanup_end"] is None
    assert ph["grokked"] is False and ph["grokking_epoch"] == 1000   # censored at the last epoch


def test_cleanup_by_test_accuracy_and_not_before_circuit_formation():
    p, c = make_curves(clean=10**9)
    c.loc[c["epoch"] >= 800, "test_acc"] = 1.0
    # a test loss within 10x of train loss before the peak does not count
    c.loc[c["epoch"] == 0, "test_loss"] = 4.0
    c.loc[c["epoch"] == 0, "train_loss"] = 4.0
    ph = phases.detect_phases(c, p)
    assert ph["cleanup_end"] == 800


def shaped_curves(n_epochs, p, peak, circuit, grok, clean, every=10, spikes=()):
    """Curves shaped like a real run with known phase epochs (the rules' definitions applied by
    construction): train loss falls log-linearly to 1e-2 at ``peak`` (train accuracy 100% from
    there) and on to 1e-6 at the end; test loss rises to 20 at ``peak``, falls linearly to just
    above ln p, is below ln p from ``circuit`` on, stays above 10 x train loss until ``clean``
    and is 5 x train loss from then on; test accuracy 0.995 from ``grok``, 1.0 from ``clean``.
    ``spikes``: (first, last, train_loss) stretches where train loss jumps to that value."""
    ep = np.arange(n_epochs + 1)
    log_tr = np.where(ep <= peak, np.log10(4.7) + (-2 - np.log10(4.7)) * ep / peak,
                      -2 - 4 * (ep - peak) / (n_epochs - peak))
    train_loss = 10.0 ** log_tr
    test_loss = np.where(ep <= peak, 4.7 + (20 - 4.7) * ep / peak,
                         20 - (20 - math.log(p) - 0.05) * (ep - peak) / (circuit - peak))
    late = (ep >= circuit) & (ep < clean)      # log-linear from ln p - 0.05 to 20 x train loss
    end = 20 * train_loss[clean - every]
    frac = (ep - circuit) / max(1, clean - every - circuit)
    test_loss = np.where(late, np.exp(np.log(math.log(p) - 0.05)
                                      + (np.log(end) - np.log(math.log(p) - 0.05)) * frac),
                         test_loss)
    test_loss = np.where(ep >= clean, 5 * train_loss, test_loss)
    test_acc = np.where(ep >= clean, 1.0, np.where(ep >= grok, 0.995, 0.01))
    for first, last, value in spikes:
        train_loss = np.where((ep >= first) & (ep <= last), value, train_loss)
    evaluated = ep % every == 0
    return pd.DataFrame({"epoch": ep, "train_loss": train_loss,
                         "train_acc": np.where(ep >= peak, 1.0, 0.5),
                         "test_loss": np.where(evaluated, test_loss, np.nan),
                         "test_acc": np.where(evaluated, test_acc, np.nan)})


# the seed run's phase epochs (25,000 epochs, p = 113) and a quick CPU run's (1,500, p = 31)
SEED_PHASES = dict(n_epochs=25_000, p=113, peak=1_460, circuit=22_080, grok=22_560, clean=22_760)
QUICK_PHASES = dict(n_epochs=1_500, p=31, peak=150, circuit=600, grok=700, clean=760)


@pytest.mark.parametrize("shape", [SEED_PHASES, QUICK_PHASES], ids=["seed", "quick"])
def test_phases_of_seed_and_quick_shaped_curves(shape):
    ph = phases.detect_phases(shaped_curves(**shape), shape["p"])
    assert (ph["memorisation_end"], ph["circuit_formation_end"], ph["cleanup_end"],
            ph["grokking_epoch"]) == (shape["peak"], shape["circuit"], shape["clean"],
                                      shape["grok"])
    assert ph["memorised"] is True and ph["grokked"] is True


@pytest.mark.parametrize("shape, spikes", [
    # seed: train loss jumps to 1.0 for 100 epochs during circuit formation (test loss ~ 1e-1
    # there, so test <= 10 x train for the length of the spike), and later, after cleanup,
    # to 1e-9 for 40 epochs (test then 5,000 x train)
    (SEED_PHASES, [(22_300, 22_400, 1.0), (23_500, 23_540, 1e-9)]),
    # quick run: three evaluations of a spike between grokking and the end of cleanup
    (QUICK_PHASES, [(650, 670, 1.0)]),
], ids=["seed", "quick"])
def test_cleanup_end_ignores_late_train_loss_spikes(shape, spikes):
    c = shaped_curves(**shape, spikes=spikes)
    first = spikes[0][0]
    spiked = c[(c["epoch"] == first)].iloc[0]
    assert spiked["test_loss"] <= 10 * spiked["train_loss"]   # the spike meets the condition
    ph = phases.detect_phases(c, shape["p"])
    assert ph["cleanup_end"] == shape["clean"]
    assert ph["circuit_formation_end"] == shape["circuit"]
    assert ph["grokking_epoch"] == shape["grok"]


def test_cleanup_end_ignores_one_evaluation_at_full_test_accuracy():
    # seen on a quick CPU run (p = 31, 70% train): test accuracy 99.65% (one pair wrong),
    # once 100% at a single evaluation, then 99.65% again
    c = shaped_curves(**QUICK_PHASES)
    c.loc[c["epoch"] == 710, "test_acc"] = 1.0
    assert phases.detect_phases(c, QUICK_PHASES["p"])["cleanup_end"] == QUICK_PHASES["clean"]
    # a blip within half a window (30 epochs) of the lasting switch moves it by at most the
    # blip's own length (one evaluation, 10 epochs) -- a running median's bound
    c.loc[c["epoch"] == 710, "test_acc"] = 0.995
    c.loc[c["epoch"] == 740, "test_acc"] = 1.0
    got = phases.detect_phases(c, QUICK_PHASES["p"])["cleanup_end"]
    assert QUICK_PHASES["clean"] - 10 <= got <= QUICK_PHASES["clean"]


def test_running_median_keeps_a_falling_curve_and_drops_a_spike():
    clean = shaped_curves(**QUICK_PHASES)
    spiked = shaped_curves(**QUICK_PHASES, spikes=[(650, 670, 1.0)])
    ep = np.arange(0, 1501, 10)
    train = clean.set_index("epoch")["train_loss"]
    # away from the ends, the running median of a falling curve is the curve itself
    got = phases.running_median(clean, "train_loss", ep)
    inner = (ep > 60) & (ep < 1440)
    np.testing.assert_allclose(got[inner], train.loc[ep[inner]].to_numpy(), rtol=1e-12)
    # a 21-epoch spike to 1.0 is replaced by the train loss of epochs near it: the median of
    # a window holding 21 spiked values can move at most 21 places along the falling curve
    at = phases.running_median(spiked, "train_loss", np.array([650, 660, 670]))
    for e, v in zip((650, 660, 670), at):
        assert train.loc[e + 21] <= v <= train.loc[e - 21]


# ---- a whole run: measures.parquet, summary.json, the CLI -----------------------------------
TINY = dict(p=13, d_model=32, d_head=8, n_heads=4, d_mlp=64, n_epochs=300, checkpoint_every=50,
            eval_every=10, device="cpu")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from grokhpc.train import run_training

    out = tmp_path_factory.mktemp("run")
    run_training(RunConfig(**TINY), out, progress_bar=False, log=lambda *_: None)
    return RunDir(out)


def test_training_writes_measures_and_summary(tiny_run):
    run = tiny_run
    epochs, ckpts = run.checkpoints()
    assert epochs == [0, 50, 100, 150, 200, 250, 300]
    t = pq.read_table(run.file("measures.parquet"))
    df = pd.read_parquet(run.file("measures.parquet"))
    assert t.schema.field("epoch").type == "int64"
    assert str(t.schema.field("cos_sim").type) == "list<element: double>"
    assert df["epoch"].tolist() == epochs
    assert all(len(v) == 6 for v in df["cos_sim"])
    summary = json.loads(run.file("summary.json").read_text())
    key = json.loads(t.schema.metadata[b"key_freqs"])
    assert summary["key_freqs"] == key and 1 <= len(key) <= 8
    # the trainer's own losses at the checkpoint epochs (curves.parquet) match the measures'
    curves = run.read_curves().set_index("epoch")
    for e in (0, 300):
        row = df[df["epoch"] == e].iloc[0]
        assert row["train_loss"] == pytest.approx(curves.loc[e, "train_loss"], rel=1e-5)
        assert row["test_loss"] == pytest.approx(curves.loc[e, "test_loss"], rel=1e-5)
        assert row["test_acc"] == pytest.approx(curves.loc[e, "test_acc"])
    # the summary holds the phase epochs the rules give on the curves, and the final values
    want = phases.detect_phases(run.read_curves(), 13)
    for k, v in want.items():
        assert summary[k] == v, k
    assert summary["final_restricted_loss"] == pytest.approx(df["restricted_loss"].iloc[-1])
    assert summary["final_test_loss"] == pytest.approx(curves.loc[300, "test_loss"])
    assert summary["run_id"] == run.read_config()["run_id"]
    assert summary["wall_time_s"] > 0


def test_cli_recomputes_with_given_key_freqs(tiny_run):
    before = pd.read_parquet(tiny_run.file("measures.parquet"))
    r = subprocess.run([sys.executable, "-m", "grokhpc.measures", str(tiny_run.path),
                        "--key-freqs", "2,6"], capture_output=True, text=True,
                       env=ONE_THREAD, timeout=120)
    assert r.returncode == 0, r.stderr
    after = pd.read_parquet(tiny_run.file("measures.parquet"))
    summary = json.loads(tiny_run.file("summary.json").read_text())
    assert summary["key_freqs"] == [2, 6]
    assert json.loads(pq.read_table(tiny_run.file("measures.parquet")).schema.metadata[b"key_freqs"]) == [2, 6]
    np.testing.assert_allclose(after["train_loss"], before["train_loss"])     # op-independent
    # the restricted loss with key frequencies {2, 6}, recomputed by hand at the last checkpoint
    cfg = RunConfig(**TINY)
    epochs, ckpts = tiny_run.checkpoints()
    want = measures.Evaluator(cfg, [2, 6]).measure(tiny_run.unflatten(ckpts[-1]))
    assert after["restricted_loss"].iloc[-1] == pytest.approx(want["restricted_loss"], rel=1e-9)
    bad = subprocess.run([sys.executable, "-m", "grokhpc.measures", str(tiny_run.path),
                          "--key-freqs", "9"], capture_output=True, text=True,
                         env=ONE_THREAD, timeout=60)
    assert bad.returncode == 2 and "1..6" in bad.stderr
    assert json.loads(tiny_run.file("summary.json").read_text())["key_freqs"] == [2, 6]


# ---- other model shapes and tasks -------------------------------------------------------------
def shaped_model(p: int, n_layers: int, act_fn: str, normalization: str, seed: int = 7):
    """A random model of the given shape; attention/MLP/unembed biases zero (as trained),
    LayerNorm weights and biases random."""
    cfg = RunConfig(p=p, model_seed=seed, n_layers=n_layers, act_fn=act_fn,
                    normalization=normalization, **SMALL)
    model = build_model(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, par in model.named_parameters():
            r = torch.randn(par.shape, generator=gen)
            if n.endswith(".w"):
                par.copy_(1 + 0.3 * r)
            elif n.endswith(".b"):
                par.copy_(0.3 * r)
            elif "W_" in n:
                par.mul_(3.0)      # larger than at init: activations and LN scales away from 1
    return cfg, model


SHAPES = [(2, "relu", "none"), (2, "gelu", "LN"), (1, "relu", "LN"), (1, "gelu", "none")]


@pytest.mark.parametrize("n_layers,act_fn,normalization", SHAPES)
def test_measures_of_other_shapes_match_the_hooked_forward_with_patched_activations(
        n_layers, act_fn, normalization):
    """The grid quantities are the last block's, and the restricted / excluded losses are the
    hooked forward's logits with the last block's neuron activations (and, for the restricted
    loss, its resid_mid) replaced at the last position -- so with LayerNorm they go through
    ln_final as the model does."""
    p, key = 11, [1, 3]
    cfg, model = shaped_model(p, n_layers, act_fn, normalization)
    W = weights_of(model)
    ev = measures.Evaluator(cfg, key)
    assert (ev.model is None) == (n_layers == 1 and normalization == "none")
    tokens, labels = all_pairs(p, "sub")
    last = f"blocks.{n_layers - 1}"
    with torch.no_grad():
        full, cache = model.run_with_cache(tokens)
    post, logits, _, _, resid_mid = ev.grid(W, resid=True)
    for got, want in ((logits, full[:, -1]), (post, cache[f"{last}.mlp.hook_post"][:, -1]),
                      (resid_mid, cache[f"{last}.hook_resid_mid"][:, -1])):
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()

    post = post.double()
    d = (tokens[:, 0] - tokens[:, 1]).double() % p
    U = torch.stack([f(2 * math.pi * k * d / p) for k in key for f in (torch.cos, torch.sin)], 1)
    U = U / U.norm(dim=0)
    approx = (U @ (U.T @ post)).float()

    def patched(**last_position):
        def hook(name):
            return lambda act, hook: torch.cat([act[:, :-1], last_position[name][:, None]], 1)
        hooks = [(f"{last}.{name.replace('__', '.')}", hook(name)) for name in last_position]
        with torch.no_grad():
            return model.run_with_hooks(tokens, fwd_hooks=hooks)[:, -1]

    W_out = model.get_submodule(f"{last}.mlp").W_out
    resid_post = cache[f"{last}.hook_resid_post"][:, -1]
    centre = (resid_post.mean(0) - approx.mean(0) @ W_out).expand(len(tokens), -1)
    restricted = patched(mlp__hook_post=approx, hook_resid_mid=centre)
    excluded = patched(mlp__hook_post=post.float() - approx)
    data = make_dataset(cfg)
    te, tr = data.test_idx, data.train_idx
    got = ev.measure(W)
    assert got["restricted_loss"] == pytest.approx(
        slow_ce(restricted[te].double().tolist(), labels[te]), rel=1e-5)
    assert got["excluded_loss"] == pytest.approx(
        slow_ce(excluded[tr].double().tolist(), labels[tr]), rel=1e-5)
    W_logit = W[f"{last}.mlp.W_out"].astype(float) @ W["unembed.W_U"].astype(float)
    F = seed_fourier.fourier_basis(p)
    assert got["gini_logit"] == pytest.approx(
        task_measures.gini(np.linalg.norm(W_logit @ F.T, axis=0)), rel=1e-6)


def test_phase_rule_reads_ln_of_the_number_of_classes():
    """A test loss between ln 113 and ln 120 ends circuit formation for S5, not for p = 113."""
    c = pd.DataFrame({"epoch": [0, 10, 20], "train_loss": [4.0, 1e-3, 1e-4],
                      "train_acc": [0.0, 1.0, 1.0], "test_loss": [4.8, 6.0, 4.75],
                      "test_acc": [0.0, 0.0, 0.1]})
    assert phases.detect_phases(c, 120)["circuit_formation_end"] == 20
    assert phases.detect_phases(c, 113)["circuit_formation_end"] is None


@pytest.mark.parametrize("task", [{"op": "s5", "train_frac": 0.2}, {"op": "quad1", "p": 7},
                                  {"op": "sub", "p": 7, "n_layers": 2, "normalization": "LN"}])
def test_runs_of_new_tasks_and_shapes_finalize(tmp_path, task):
    """A run finalizes: measures.parquet and summary.json, the measures' losses at epoch 0 the
    trainer's, group columns null where the task has no basis (S5: no p either)."""
    from grokhpc.config import from_dict
    from grokhpc.train import run_training

    cfg = from_dict({"d_model": 16, "d_head": 8, "n_heads": 2, "d_mlp": 24, "n_epochs": 4,
                     "checkpoint_every": 2, "eval_every": 2, "device": "cpu", **task})
    run_training(cfg, tmp_path / "run", progress_bar=False, log=lambda *_: None)
    run = RunDir(tmp_path / "run")
    df = pd.read_parquet(run.file("measures.parquet"))
    summary = json.loads(run.file("summary.json").read_text())
    assert df["epoch"].tolist() == [0, 2, 4]
    curves = run.read_curves().set_index("epoch")
    assert df["train_loss"].iloc[0] == pytest.approx(curves.loc[0, "train_loss"], rel=1e-5)
    assert df["test_loss"].iloc[-1] == pytest.approx(curves.loc[4, "test_loss"], rel=1e-5)
    group = cfg.op in ("sub", "s5")      # quad1: no group basis
    for col in task_measures.GROUP_COLUMNS:
        assert df[col].notna().all() if group else df[col].isna().all(), col
    assert (summary["key_freqs"] is not None) == (cfg.op == "sub")   # S5: irreps, not freqs
    assert summary["basis"] == {"sub": "Z_p", "s5": "S5", "quad1": None}[cfg.op]
    assert (summary["key_elements"] is not None) == group
    assert summary["p"] == (None if cfg.op == "s5" else 7)
    assert summary["final_epoch"] == 4 and summary["final_all_loss"] > 0


# ---- advice that works -------------------------------------------------------------------------
HALF = dict(p=13, train_frac=0.5, d_model=32, n_heads=4, d_head=8, d_mlp=64, n_epochs=40,
            checkpoint_every=20, eval_every=10, lr=3e-3, device="cpu")


def test_a_half_finished_run_says_what_writes_its_measures_and_that_works(tmp_path, capsys):
    """open_run(...).measures and ``python -m grokhpc.measures`` on a run trained 20 of 40
    epochs: both say training is not finished and to run its training command again; doing
    so writes the measures, and the measures command then works too."""
    import grokhpc
    from grokhpc.store import RunDirError
    from grokhpc.train import Trainer

    out = tmp_path / "half"
    t = Trainer.open(RunConfig(**HALF), out)
    t.fit(progress_bar=False, until=20)
    t.close()
    advice = ("training is not finished (20/40 epochs); run its python -m grokhpc.train command "
              "again (or the sweep's launch) to finish it")
    with pytest.raises(RunDirError) as e:
        grokhpc.open_run(out).measures
    assert str(e.value) == f"{out}: no measures.parquet yet: {advice} and write it"
    assert measures.main([str(out)]) == 2
    assert capsys.readouterr().err == f"error: {out}: {advice}\n"
    cmd = [sys.executable, "-m", "grokhpc.train", "--out", str(out), "--no-progress",
           *[f"--set={k}={v}" for k, v in HALF.items()]]
    r = subprocess.run(cmd, capture_output=True, text=True, env=ONE_THREAD, timeout=300)
    assert r.returncode == 0 and "resuming at epoch 20/40" in r.stdout, r.stderr
    assert grokhpc.open_run(out).measures["epoch"].tolist() == [0, 20, 40]
    assert measures.main([str(out)]) == 0


def test_a_trained_run_without_measures_says_to_run_the_measures_command_and_that_works(
        tiny_run, tmp_path):
    import shutil

    import grokhpc
    from grokhpc.store import RunDirError

    out = tmp_path / "run"
    shutil.copytree(tiny_run.path, out)
    (out / "measures.parquet").unlink()
    with pytest.raises(RunDirError) as e:
        grokhpc.open_run(out).measures
    assert str(e.value) == (f"{out}: no measures.parquet yet (run `python -m grokhpc.measures "
                            f"{out}`)")
    r = subprocess.run([sys.executable, "-m", "grokhpc.measures", str(out)], capture_output=True,
                       text=True, env=ONE_THREAD, timeout=300)
    assert r.returncode == 0, r.stderr
    assert grokhpc.open_run(out).measures["epoch"].tolist() == tiny_run.checkpoints()[0]
