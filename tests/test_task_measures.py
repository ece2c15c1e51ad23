"""The group measures of mul, div and s5 through the full measures path, against independent
expectations: the seed's add/sub formulation written out over the discrete-log index (mul is
add and div is sub there), and models whose embeddings are planted characters (known keys)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from grokhpc import bases, measures, task_measures
from grokhpc.config import RunConfig, from_dict
from grokhpc.data import all_pairs, make_dataset
from grokhpc.model import build_model
from grokhpc.store import RunDir

torch.set_num_threads(1)
SMALL = dict(n_heads=2, d_model=16, d_head=8, d_mlp=24, device="cpu")


def slow_ce(rows, labels) -> float:
    total = 0.0
    for row, y in zip(rows, labels):
        m = max(row)
        total += m + math.log(sum(math.exp(v - m) for v in row)) - row[int(y)]
    return total / len(labels)


def seed_over_log(model, cfg, keys):
    """The seed's restricted/excluded loss and cos_sim of add (sub) over Z_n, n = p - 1, on the
    grid relabelled by i = log_g a, j = log_g b, c = log_g class (pairs with a zero operand
    dropped): the directions cos/sin(w_k (i +- j)), the literal cube cos(w_k (i +- j - c))."""
    p, n = cfg.p, cfg.p - 1
    log = bases.discrete_log(p)
    g_pow = [pow(bases.primitive_root(p), k, p) for k in range(n)]
    sign = 1 if cfg.op == "mul" else -1
    tokens, labels = all_pairs(p, cfg.op)
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
    post = cache["post", 0, "mlp"][:, -1].double().numpy()
    resid_mid = cache["resid_mid", 0][:, -1].double().numpy()
    logits = logits[:, -1].double().numpy()
    W_out, W_U = (model.blocks[0].mlp.W_out.detach().double().numpy(),
                  model.unembed.W_U.detach().double().numpy())
    a, b = tokens[:, 0].numpy(), tokens[:, 1].numpy()
    inside = (a != 0) & (b != 0)
    d = (log[a] + sign * log[b]) % n
    dirs = []
    for k in keys:
        for fn in (np.cos, np.sin):
            v = np.where(inside, fn(2 * np.pi * k * d / n), 0.0)
            if np.linalg.norm(v) > 1e-9:                # sin of the Nyquist frequency is zero
                dirs.append(v / np.linalg.norm(v))
    V = np.stack(dirs, 1)
    approx = V @ (V.T @ post)
    restricted = approx @ W_out @ W_U
    restricted += logits[inside].mean(0) - restricted[inside].mean(0)
    excluded = ((post - approx) @ W_out + resid_mid) @ W_U
    data = make_dataset(cfg)
    lab = labels.numpy()
    test = [i for i in data.test_idx.tolist() if inside[i]]
    train = [i for i in data.train_idx.tolist() if inside[i]]
    cube = np.zeros((n, n, n))
    for row in np.nonzero(inside)[0]:
        cube[log[a[row]], log[b[row]]] = logits[row, g_pow]
    i3, j3, c3 = np.meshgrid(np.arange(n), np.arange(n), np.arange(n), indexing="ij")
    sims, left = [], cube.copy()
    for k in range(1, n // 2 + 1):
        C = np.cos(2 * np.pi * k * (i3 + sign * j3 - c3) / n)
        sims.append((cube * C).sum() / (np.linalg.norm(cube) * np.linalg.norm(C)))
        left -= (cube * C).sum() / (C * C).sum() * C
    return {"restricted_loss": slow_ce(restricted[test].tolist(), lab[test]),
            "excluded_loss": slow_ce(excluded[train].tolist(), lab[train]),
            "cos_sim": sims, "cos_residual": np.linalg.norm(left) / np.linalg.norm(cube)}


@pytest.mark.parametrize("op, keys", [("mul", [1, 3]), ("div", [2, 5]), ("mul", [5])])
def test_mul_and_div_measures_are_the_seeds_add_and_sub_over_the_discrete_log(op, keys):
    cfg = RunConfig(p=11, op=op, model_seed=4, **SMALL)
    model = build_model(cfg)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():                                # non-zero biases: every term counts
        for name, par in model.named_parameters():
            if ".b_" in name:
                par.copy_(torch.randn(par.shape, generator=gen) * 0.3)
    W = {n: p.detach().numpy().copy() for n, p in model.named_parameters()}
    got = measures.Evaluator(cfg, keys).measure(W)
    want = seed_over_log(model, cfg, keys)
    assert got["restricted_loss"] == pytest.approx(want["restricted_loss"], rel=1e-5)
    assert got["excluded_loss"] == pytest.approx(want["excluded_loss"], rel=1e-5)
    np.testing.assert_allclose(got["cos_sim"], want["cos_sim"], rtol=1e-5, atol=1e-7)
    assert got["cos_residual"] == pytest.approx(want["cos_residual"], rel=1e-5)


def planted_run(tmp_path, fields, plant):
    """A tiny trained run whose last checkpoint's embedding is replaced by ``plant(W_E)``
    (``RunDir.checkpoints`` answers with the changed rows)."""
    from grokhpc.train import run_training

    cfg = from_dict({**SMALL, "n_epochs": 2, "checkpoint_every": 2, "eval_every": 2, **fields})
    run_training(cfg, tmp_path / "run", progress_bar=False, log=lambda *_: None)
    run = RunDir(tmp_path / "run")
    epochs, rows = run.checkpoints(mmap=False)
    rows = np.array(rows)
    W_E = run.unflatten(rows[-1])["embed.W_E"]          # a view into the row
    W_E[...] = plant(W_E.shape)
    run.checkpoints = lambda *a, **k: (epochs, rows)
    return run


@pytest.mark.parametrize("op", ["mul", "div"])
def test_planted_log_characters_give_their_frequencies_through_finalize(tmp_path, op):
    """Embedding rows cos/sin(w_k log_2 x) for k = 2, 5 over Z_10 (p = 11, generator 2; 5 is
    the Nyquist frequency, a lone cosine) and large noise on x = 0 and '=': the summary's key
    elements are {2, 5}, named, with the generator."""
    p, keys = 11, [2, 5]
    log = bases.discrete_log(p)
    rng = np.random.default_rng(0)

    def plant(shape):
        W = 0.01 * rng.normal(size=shape)
        for k in keys:
            w = 2 * np.pi * k / (p - 1)
            W[1:p] += np.outer(np.cos(w * log[1:]), rng.normal(size=shape[1]))
            W[1:p] += np.outer(np.sin(w * log[1:]), rng.normal(size=shape[1]))
        W[0] = W[p] = 30 * rng.normal(size=shape[1])
        return W

    run = planted_run(tmp_path, {"p": p, "op": op}, plant)
    summary = measures.finalize_run(run)
    assert summary["basis"] == "Z_p^*" and summary["generator"] == 2
    assert summary["key_elements"] == keys and summary["key_freqs"] == keys
    assert summary["key_names"] == ["2", "5"]
    meta = __import__("pyarrow.parquet").parquet.read_schema(run.file("measures.parquet")).metadata
    assert json.loads(meta[b"key_elements"]) == keys and json.loads(meta[b"generator"]) == 2


def test_planted_irreps_give_their_key_irreps_through_finalize(tmp_path):
    """An s5 embedding of translates x -> chi_rho(x z) for rho = (4,1) and (3,1^2) (irreps 2
    and 6, from the textbook characters in test_bases): the key irreps are those two."""
    from test_bases import textbook_characters

    chi = textbook_characters()
    table = bases.s5_tables()[0]
    rng = np.random.default_rng(1)

    def plant(shape):
        z = rng.integers(120, size=shape[1])
        W = np.where(np.arange(shape[1]) % 2 == 0, chi[2][table[:, z]], chi[6][table[:, z]])
        return np.concatenate([W, 30 * rng.normal(size=(shape[0] - 120, shape[1]))])

    run = planted_run(tmp_path, {"op": "s5", "train_frac": 0.1}, plant)
    summary = measures.finalize_run(run)
    assert summary["basis"] == "S5" and summary["generator"] is None
    assert summary["key_elements"] == [2, 6] and summary["key_freqs"] is None
    assert summary["key_names"] == ["(4,1)", "(3,1^2)"]
    assert summary["final_restricted_loss"] is not None
    df = __import__("pandas").read_parquet(run.file("measures.parquet"))
    assert len(df["cos_sim"].iloc[-1]) == 6                  # irreps 1..6


@pytest.mark.parametrize("op", ["s5conj", "s5aba", "quad1", "mix1"])
def test_tasks_without_a_lens_say_why(op):
    basis = bases.task_basis(op, 120 if op.startswith("s5") else 31)
    why = task_measures.no_lens_reason(basis)
    assert why and task_measures.lens_of(op, basis.p) is None
    assert task_measures.basis_summary(op, basis.p, None)["key_elements"] is None


def test_parse_keys_reads_frequencies_and_irreps_and_refuses_in_one_line():
    s5 = bases.task_basis("s5", 120)
    assert task_measures.parse_keys("(3,1^2), 2", s5) == [2, 6]
    mul = bases.task_basis("mul", 31)
    assert task_measures.parse_keys("15,3", mul) == [3, 15]        # Z_30: 15 is Nyquist
    for bad, match in (("16", "1..15"), ("x", "integers, got 'x'"), (",", "at least one")):
        with pytest.raises(ValueError, match=match) as e:
            task_measures.parse_keys(bad, mul)
        assert "\n" not in str(e.value) and str(e.value).startswith("--key-freqs: ")


def test_runs_table_types_the_basis_columns_even_when_all_null():
    import pyarrow as pa

    from grokhpc.tables import build_runs_table

    t = build_runs_table([{"run_id": "a", "state": "done", "basis": "S5", "generator": None,
                           "key_elements": [2, 6], "key_names": ["(4,1)", "(3,1^2)"]},
                          {"run_id": "b", "state": "done"}])
    assert t.schema.field("basis").type == pa.string()
    assert t.schema.field("generator").type == pa.int64()
    assert t.schema.field("key_elements").type == pa.list_(pa.int64())
    assert t.schema.field("key_names").type == pa.list_(pa.string())
    assert t.column("key_names").to_pylist() == [["(4,1)", "(3,1^2)"], None]
    none = build_runs_table([{"run_id": "c", "state": "done"}])
    assert none.schema.field("key_elements").type == pa.list_(pa.int64())
