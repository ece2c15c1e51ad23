"""The flat AdamW of a packed group (grokhpc.stacked_optim.FlatStackedAdamW) against the
per-weight StackedAdamW and against torch.optim.AdamW / Adam run by run: bit for bit on CPU."""

from __future__ import annotations

import pytest
import torch

from conftest import step_solo_and_stacked

from grokhpc.stacked_optim import FlatStackedAdamW, StackedAdamW, flat_stack

SHAPES = [(5, 7, 3), (13,), (4, 32, 8), (33, 17)]
LRS, WDS = [1e-3, 3e-3, 0.7], [1.0, 0.0, 0.3]
BETAS = [(0.9, 0.98), (0.8, 0.999), (0.95, 0.9)]


def _setup(kind: str, host_scalars, gen):
    solo = [[torch.randn(s, generator=gen).requires_grad_() for s in SHAPES] for _ in range(3)]
    torch_opt = torch.optim.AdamW if kind == "adamw" else torch.optim.Adam
    opts = [torch_opt(solo[r], lr=LRS[r], weight_decay=WDS[r], betas=BETAS[r])
            for r in range(3)]

    def stacked(cls):
        P = [torch.stack([solo[r][i].detach() for r in range(3)]).clone().requires_grad_()
             for i in range(len(SHAPES))]
        zeros = [torch.zeros_like(p) for p in P]
        return cls(P, LRS, WDS, BETAS, [0, 0, 0], zeros, [z.clone() for z in zeros],
                   host_scalars=host_scalars, decoupled=kind == "adamw")

    return solo, opts, stacked(FlatStackedAdamW), stacked(StackedAdamW)


@pytest.mark.parametrize("kind", ["adamw", "adam"])
@pytest.mark.parametrize("host_scalars", [True, False])
def test_flat_adamw_is_per_weight_and_torch_bit_for_bit(kind, host_scalars):
    """Per-run lr (changed half way, as a schedule does), weight decay (0 for one run) and
    betas; gradients over 9 orders of magnitude; odd sizes; both ways of computing the bias
    corrections. Weights and moments equal the per-weight optimiser's and each run's torch
    optimiser's bit for bit after every step."""
    gen = torch.Generator().manual_seed(1)
    solo, opts, flat, per_weight = _setup(kind, host_scalars, gen)
    for it in range(20):
        if it == 10:
            lrs = [lr * 0.37 for lr in LRS]
            for o, lr in zip(opts, lrs):
                o.param_groups[0]["lr"] = lr
            flat.set_lrs(lrs)
            per_weight.set_lrs(lrs)
        grads = [torch.randn((3,) + s, generator=gen) * 10.0 ** (it % 9 - 6) for s in SHAPES]
        step_solo_and_stacked(opts, solo, flat, flat.params, grads, it)
        for i, g in enumerate(grads):
            per_weight.params[i].grad = g.clone()
        per_weight.step()
        for i in range(len(SHAPES)):
            assert torch.equal(flat.params[i], per_weight.params[i]), (it, i)
            assert torch.equal(flat.exp_avgs[i], per_weight.exp_avgs[i]), (it, i)
            assert torch.equal(flat.exp_avg_sqs[i], per_weight.exp_avg_sqs[i]), (it, i)
            for r in range(3):
                st = opts[r].state[solo[r][i]]
                assert torch.equal(flat.exp_avg_sqs[i][r], st["exp_avg_sq"]), (it, r, i)
        flat.zero_grad()
        per_weight.zero_grad()
    assert flat.steps == per_weight.steps == [20, 20, 20]


def test_flat_buffers_hold_every_weight_run_by_run():
    """Each stacked tensor is a view of one (R, N) buffer, run r's values of all of them in
    row r; the views are leaves that take gradients; writing the buffer writes the views."""
    gen = torch.Generator().manual_seed(2)
    tensors = [torch.randn((3,) + s, generator=gen) for s in SHAPES]
    flat, views = flat_stack(tensors)
    n = sum(t[0].numel() for t in tensors)
    assert flat.shape == (3, n) and flat.is_contiguous()
    for r in range(3):
        assert torch.equal(flat[r], torch.cat([t[r].reshape(-1) for t in tensors]))
    for t, v in zip(tensors, views):
        assert torch.equal(v, t) and v._base is flat
    opt = FlatStackedAdamW([t.clone() for t in tensors], LRS, WDS, BETAS, [0] * 3,
                           [torch.zeros_like(t) for t in tensors],
                           [torch.zeros_like(t) for t in tensors])
    assert all(p.is_leaf and p.requires_grad and p._base is opt.flat for p in opt.params)
    sum((p * p).sum() for p in opt.params).backward()
    assert all(torch.equal(p.grad, 2 * t) for p, t in zip(opt.params, tensors))
    with torch.no_grad():
        opt.flat.zero_()
    assert all(not p.any() for p in opt.params)
