"""The one-run CPU kernels (grokhpc.kernels) against the readable hooked forward and against
torch's own cross-entropy: logits and every gradient, the rows that take the kernel, the plans it
keeps, bit-reproducible steps."""

from __future__ import annotations

import gc

import pytest
import torch
import torch.nn.functional as F

from grokhpc import kernels, lastpos
from grokhpc.config import RunConfig
from grokhpc.data import make_dataset
from grokhpc.model import build_model
from grokhpc.runtime import deterministic_kernels
from test_lastpos import randomised

torch.set_num_threads(1)


def rows(p, n_rows, seed, other_query=0):
    """Training-format rows (a, b, '='), the first ``other_query`` ending in token 3 instead."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, p, (n_rows, 3), generator=g)
    tokens[:, 2] = p
    tokens[:other_query, 2] = 3
    return tokens, torch.randint(0, p, (n_rows,), generator=g)


def spy(monkeypatch):
    calls = []
    real = kernels.last_logits
    monkeypatch.setattr(kernels, "last_logits", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def logits_and_grads(model, fn, labels):
    model.zero_grad(set_to_none=True)
    out = fn()
    torch.nn.functional.cross_entropy(out.double(), labels).backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("p,d_model,d_head,act_fn,other_query", [
    (113, 128, 32, "relu", 0),      # the seed's shape, every row's query '='
    (13, 64, 16, "relu", 40),       # two distinct queries
    (13, 64, 16, "gelu", 0)])
def test_kernel_equals_hooked_forward(monkeypatch, p, d_model, d_head, act_fn, other_query):
    """Logits to 1e-5 of the largest, each gradient to 1e-6 of the largest of all plus 1e-4 of
    its own largest (the tolerances of test_model.py), with the kernel taken."""
    cfg = RunConfig(p=p, d_model=d_model, d_head=d_head, act_fn=act_fn)
    model = randomised(cfg, 0)
    tokens, labels = rows(p, 2000 if p == 113 else 300, seed=1, other_query=other_query)
    want, want_g = logits_and_grads(model, lambda: model(tokens)[:, -1], labels)
    calls = spy(monkeypatch)
    got, got_g = logits_and_grads(model, lambda: model.last_logits(tokens), labels)
    assert calls == [1]
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    overall = max(g.abs().max().item() for g in want_g.values())
    for name, a in want_g.items():
        assert (a - got_g[name]).abs().max().item() <= 1e-6 * overall + 1e-4 * a.abs().max(), \
            name
    assert want_g["blocks.0.mlp.W_in"].abs().max() > 1e-3   # not vacuous


def test_train_and_test_rows_take_the_kernel_and_many_queries_do_not():
    """Every train and test set ends in '=': tables far smaller than the rows. Rows with every
    token as a query would need tables larger than themselves: the general path serves them."""
    for cfg in (RunConfig(), RunConfig(p=37, d_model=64, d_head=16, d_mlp=256)):
        d = make_dataset(cfg)
        V, h = cfg.d_vocab, cfg.n_heads
        for tokens in (d.train_tokens, d.test_tokens):
            assert kernels.applies(tokens, 1, V, h)
    tokens = torch.randint(0, 114, (600, 3))
    assert not kernels.applies(tokens, len(tokens[:, -1].unique()), 114, 4)


def test_scoring_and_training_give_the_same_logits_bit_for_bit():
    cfg = RunConfig(p=31, d_model=64, d_head=16, d_mlp=256)
    model, tokens = build_model(cfg), make_dataset(cfg).train_tokens
    with torch.inference_mode():
        scored = model.last_logits(tokens)
    trained = model.last_logits(tokens)
    assert trained.requires_grad and torch.equal(scored, trained.detach())


def test_a_plan_is_kept_while_its_rows_live_unchanged():
    model = build_model(RunConfig(p=13, d_model=64, d_head=16))
    tokens, _ = rows(13, 200, seed=2)

    def kept():
        return [e[3] for e in kernels.plans.entries.values()]
    before = kept()
    first = model.last_logits(tokens)
    new = [p for p in kept() if not any(p is b for b in before)]
    assert len(new) == 1
    model.last_logits(tokens)
    assert [p for p in kept() if not any(p is b for b in before)] == new   # found once
    tokens[:, 0] = (tokens[:, 0] + 1) % 13                  # changed in place: planned again
    changed = model.last_logits(tokens)
    now = [p for p in kept() if not any(p is b for b in before)]
    assert len(now) == 1 and now[0] is not new[0]
    with torch.no_grad():
        ref = model(tokens)[:, -1]
    assert not torch.equal(first, changed)
    torch.testing.assert_close(changed.detach(), ref, rtol=1e-5, atol=1e-6)
    del tokens, first, changed, ref, new, now
    gc.collect()
    assert len(kept()) == len(before)                         # nothing kept for rows gone


def test_steps_are_bit_reproducible_and_deterministic_mode_changes_nothing():
    """Two trainings from the same weights at 2 threads, one under torch's deterministic mode
    (which fills new buffers with NaN unless a kernel opts out): the same weights bit for bit,
    and the mode's setting is back afterwards."""
    cfg = RunConfig(p=31, d_model=64, d_head=16, d_mlp=256, lr=1e-2)
    d = make_dataset(cfg)
    results = []
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for deterministic in (True, False):
            model = randomised(cfg, seed=4)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1.0)
            for _ in range(3):
                with deterministic_kernels(deterministic):
                    lastpos.cross_entropy(model.last_logits(d.train_tokens),
                                          d.train_labels).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            results.append([p.detach().clone() for p in model.parameters()])
            assert torch.utils.deterministic.fill_uninitialized_memory
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*results))


# ---- the loss ----------------------------------------------------------------------------------
@pytest.mark.parametrize("margin", [0.0, 20.0])
def test_cross_entropy_gradient_is_torchs_in_float64(margin):
    """The fused loss's value and gradient against torch's own cross-entropy of the float64
    logits (its gradient rounded to float32 as autograd would): at random logits and at
    margins of ~20, where each row's loss is ~1e-7 and its gradient at the label ~-1e-7/b."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(500, 113, generator=g)
    labels = torch.randint(0, 113, (500,), generator=g)
    logits[torch.arange(500), labels] += margin
    x = logits.clone().requires_grad_(True)
    loss = lastpos.cross_entropy(x, labels)
    loss.backward()
    ref_x = logits.double().requires_grad_(True)
    ref = F.cross_entropy(ref_x, labels)
    ref.backward()
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
    want = ref_x.grad.float()
    assert x.grad.dtype == torch.float32
    torch.testing.assert_close(x.grad, want, rtol=1e-6, atol=0)
    assert (x.grad[torch.arange(500), labels] < 0).all()   # none rounded away, tiny or not


def test_cross_entropy_in_float32_as_asked():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(50, 7, generator=g, requires_grad=True)
    labels = torch.randint(0, 7, (50,), generator=g)
    loss = lastpos.cross_entropy(logits, labels, "float32")
    assert loss.dtype == torch.float32
    loss.backward()
    ref_x = logits.detach().clone().requires_grad_(True)
    F.cross_entropy(ref_x, labels).backward()
    torch.testing.assert_close(logits.grad, ref_x.grad, rtol=1e-5, atol=1e-7)
