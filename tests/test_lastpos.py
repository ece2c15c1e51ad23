"""The shared last-position math (grokhpc.lastpos) against the readable hooked forward, and the one
cross-entropy against Python arithmetic.

The one-run fast path (``Transformer.last_logits``) is held to ``forward`` in test_model.py and
the full grid in test_measures.py; here the stacked form: R runs with different weights."""

from __future__ import annotations

import math

import pytest
import torch

from grokhpc import lastpos
from grokhpc.config import RunConfig
from grokhpc.model import build_model

torch.set_num_threads(1)


def randomised(cfg, seed):
    """A model with every parameter (biases too) random and trainable, so no term can hide
    behind a zero or a frozen gradient."""
    model = build_model(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            p.requires_grad_(True)
    return model


def random_rows(p, R, n_rows, seed):
    """Tokens anywhere ('=' included, so several distinct last tokens), half the rows in the
    training format (a, b, '='); labels."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, p + 1, (R, n_rows, 3), generator=g)
    tokens[:, : n_rows // 2, 2] = p
    return tokens, torch.randint(0, p, (R, n_rows), generator=g)


def assert_grads_close(want: dict, got: dict):
    """Each gradient to 1e-6 of the largest gradient of all plus 1e-4 of its own largest (b_K's
    gradient is zero in exact arithmetic: it shifts all scores of a query alike)."""
    overall = max(g.abs().max().item() for g in want.values())
    for name, a in want.items():
        tol = 1e-6 * overall + 1e-4 * a.abs().max().item()
        assert (a - got[name]).abs().max().item() <= tol, name
    assert want["blocks.0.mlp.W_in"].abs().max() > 1e-3  # the comparison is not vacuous


@pytest.mark.parametrize("p,d_model,d_head", [(113, 128, 32), (13, 64, 16)])
def test_stacked_runs_equal_each_runs_hooked_forward(p, d_model, d_head):
    """Three runs with different weights (biases non-zero) stacked on a leading run axis: the
    logits and every gradient of every run are those of its own hooked forward."""
    cfg = RunConfig(p=p, d_model=d_model, d_head=d_head)
    models = [randomised(cfg, seed) for seed in (0, 1, 2)]
    names = [n for n, _ in models[0].named_parameters()]
    P = {n: torch.stack([m.get_parameter(n).detach() for m in models]).requires_grad_(True)
         for n in names}
    tokens, labels = random_rows(p, 3, 400, seed=7)

    logits = lastpos.last_logits(P, tokens)
    assert logits.shape == (3, 400, p)
    lastpos.cross_entropy(logits, labels).sum().backward()
    for r, model in enumerate(models):
        full = model(tokens[r])[:, -1]
        assert (logits[r] - full).abs().max() <= 1e-5 * full.abs().max()
        lastpos.cross_entropy(full, labels[r]).backward()
        assert_grads_close({n: model.get_parameter(n).grad for n in names},
                           {n: P[n].grad[r] for n in names})
    assert not torch.equal(P["embed.W_E"].grad[0], P["embed.W_E"].grad[1])


def test_one_run_is_the_stacked_form_with_one_run():
    """A run's weights alone, or on a run axis of length 1: the same logits bit for bit."""
    cfg = RunConfig(p=13, d_model=64, d_head=16)
    model = randomised(cfg, 3)
    P = dict(model.named_parameters())
    tokens, _ = random_rows(13, 1, 200, seed=8)
    one = lastpos.last_logits(P, tokens[0])
    stacked = lastpos.last_logits({n: v[None] for n, v in P.items()}, tokens)
    assert one.shape == (200, 13) and torch.equal(one, stacked[0])


def test_missing_biases_count_as_zero():
    cfg = RunConfig(p=13, d_model=64, d_head=16)
    model = build_model(cfg)          # biases zero, as the seed trains
    weights = {n: v for n, v in model.named_parameters() if ".b_" not in n}
    tokens, _ = random_rows(13, 1, 100, seed=9)
    with torch.no_grad():
        torch.testing.assert_close(lastpos.last_logits(weights, tokens[0]),
                                   model(tokens[0])[:, -1], rtol=1e-5, atol=1e-6)


# ---- cross-entropy and accuracy -------------------------------------------------------------
def python_ce(row, label) -> float:
    """-log softmax(row)[label] in Python floats: log1p of the other classes' weights relative
    to the label's, so a loss of 1e-9 keeps its digits."""
    rest = sum(math.exp(v - row[label]) for i, v in enumerate(row) if i != label)
    return math.log1p(rest) if row[label] == max(row) else \
        math.log(sum(math.exp(v - max(row)) for v in row)) + max(row) - row[label]


def test_cross_entropy_keeps_tiny_losses_of_float32_logits():
    """A grokked model's loss is ~1e-7: 1 + 1e-7 does not survive float32 arithmetic; the
    float64 loss of float32 logits does."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(300, 113, generator=gen)
    labels = torch.randint(0, 113, (300,), generator=gen)
    logits[torch.arange(300), labels] += 20.0                 # margins ~20: loss ~ 113 e^-20
    logits[0, (labels[0] + 1) % 113] = logits[0, labels[0]] + 3.0   # one wrong argmax
    rows = logits.double().tolist()
    want = [python_ce(r, int(y)) for r, y in zip(rows, labels)]
    got = lastpos.row_losses(logits, labels)
    assert got.dtype == torch.float64
    # float64 keeps ~16 digits of the log-sum-exp (~20), so ~8 of a loss of ~1e-7; float32
    # arithmetic would keep none
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-7, atol=0)
    assert lastpos.cross_entropy(logits, labels).item() == pytest.approx(sum(want) / 300,
                                                                        rel=1e-7)
    assert max(want[1:]) < 1e-5 and want[0] > math.log(2)
    assert lastpos.accuracy(logits, labels).item() == 299 / 300


def test_padding_rows_are_left_out_of_each_runs_mean():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 10, 7, generator=gen)
    labels = torch.randint(0, 7, (3, 10), generator=gen)
    sizes = [10, 4, 7]
    mask = torch.arange(10)[None] < torch.tensor(sizes)[:, None]
    rows = logits.double().tolist()
    for r, n in enumerate(sizes):
        want = sum(python_ce(rows[r][i], int(labels[r, i])) for i in range(n)) / n
        hits = sum(max(range(7), key=lambda c: rows[r][i][c]) == labels[r, i] for i in range(n))
        assert lastpos.cross_entropy(logits, labels, mask=mask)[r].item() == \
            pytest.approx(want, rel=1e-12)
        assert lastpos.accuracy(logits, labels, mask)[r].item() == hits / n
    # float32, as a run with loss_dtype float32 computes it
    f32 = lastpos.cross_entropy(logits, labels, "float32", mask)
    assert f32.dtype == torch.float32
    torch.testing.assert_close(f32.double(), lastpos.cross_entropy(logits, labels, mask=mask),
                               rtol=1e-6, atol=0)


def test_eval_row_hits_are_argmaxs_with_ties_and_nans():
    """Scoring's hits from the top and the label's logit against ``argmax == label``: rows
    with the label at the top alone, ties at the top before and after the label (argmax takes
    the first), a row of NaN and one with the label's logit NaN."""
    gen = torch.Generator().manual_seed(3)
    n, p = 600, 13
    logits = torch.randint(0, 4, (n, p), generator=gen).float()   # many ties by construction
    labels = torch.randint(p, (n,), generator=gen)
    logits[: n // 2][torch.arange(n // 2), labels[: n // 2]] += 10.0   # half: label alone on top
    logits[-1] = float("nan")
    logits[-2, labels[-2]] = float("nan")
    loss, hit = lastpos.eval_row_scores(logits, labels)
    want = (logits.argmax(dim=-1) == labels).double()
    assert torch.equal(hit, want)
    assert 0.5 < float(want.mean()) < 0.9                              # ties decided both ways
    ties = (logits == logits.amax(-1, keepdim=True)).sum(-1) > 1
    assert ties.sum() > 50 and want[ties].sum() > 5 and (1 - want[ties]).sum() > 5
    ref = torch.nn.functional.cross_entropy(logits[:-2].double(), labels[:-2], reduction="none")
    torch.testing.assert_close(loss[:-2], ref, rtol=1e-6, atol=1e-12)
    assert loss[-2:].isnan().all()


@pytest.mark.parametrize("margin", [0.0, 25.0])
def test_eval_row_losses_means_equal_float64_cross_entropy(margin):
    """Scoring's mixed-precision losses (float32 exponentials, float64 sums) against torch's
    float64 cross-entropy: split means to 1e-7 relative, also where most losses are below
    1e-7 (margin 25: the label's logit 25-35 above logits of spread 3)."""
    gen = torch.Generator().manual_seed(0)
    n, p = 4000, 113
    logits = torch.randn(n, p, generator=gen) * 3
    labels = torch.randint(p, (n,), generator=gen)
    logits[torch.arange(n), labels] += margin + 10 * torch.rand(n, generator=gen) * (margin > 0)
    want = torch.nn.functional.cross_entropy(logits.double(), labels, reduction="none")
    got = lastpos.eval_row_losses(logits, labels)
    assert got.dtype == torch.float64
    assert float(got.mean()) == pytest.approx(float(want.mean()), rel=1e-7)
    assert float(got[: n // 3].mean()) == pytest.approx(float(want[: n // 3].mean()), rel=1e-7)
    if margin:
        assert 0 < float(want.median()) < 1e-7    # below float32's 1 + eps: sums in float32 lose it
