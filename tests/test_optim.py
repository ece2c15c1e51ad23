"""Optimisers, schedules and minibatch order, against torch's own optimisers and the formulas."""

import math

import pytest
import torch

from grokhpc.config import RunConfig, from_dict
from grokhpc.optim import (epoch_batches, batch_generator, lr_factor, make_optimizer,
                           rescale_to_norm, set_lr, weight_norm)


def test_adamw_is_the_seed_optimiser_exactly():
    cfg = RunConfig(p=11)
    w = torch.nn.Parameter(torch.randn(5, 3))
    opt = make_optimizer([w], cfg)
    assert isinstance(opt, torch.optim.AdamW)
    g = opt.param_groups[0]
    assert (g["lr"], g["weight_decay"], g["betas"]) == (1e-3, 1.0, (0.9, 0.98))


def test_adam_and_sgd_follow_their_definitions_for_one_step():
    torch.manual_seed(0)
    w0, grad = torch.randn(4, 4), torch.randn(4, 4)
    # Adam, step 1: m = (1-b1) g', v = (1-b2) g'^2 with g' = g + wd w; update lr * m^/(sqrt(v^)+eps)
    cfg = RunConfig(p=11, optimizer="adam", weight_decay=0.1, lr=0.01)
    w = torch.nn.Parameter(w0.clone())
    opt = make_optimizer([w], cfg)
    w.grad = grad.clone()
    opt.step()
    g2 = grad + 0.1 * w0
    expect = w0 - 0.01 * g2 / (g2.abs() + 1e-8)
    assert torch.allclose(w.detach(), expect, atol=1e-6)
    # SGD with momentum, two steps: buf = g; then buf = mu buf + g
    cfg = RunConfig(p=11, optimizer="sgd", momentum=0.9, weight_decay=0.0, lr=0.1)
    w = torch.nn.Parameter(w0.clone())
    opt = make_optimizer([w], cfg)
    for _ in range(2):
        w.grad = grad.clone()
        opt.step()
    assert torch.allclose(w.detach(), w0 - 0.1 * grad - 0.1 * (0.9 * grad + grad), atol=1e-6)


def test_lr_factor_warmup_then_cosine():
    cfg = RunConfig(p=11, n_epochs=110, warmup_epochs=10, lr_schedule="cosine")
    assert [lr_factor(e, cfg) for e in (0, 4, 9)] == [0.1, 0.5, 1.0]
    assert lr_factor(10, cfg) == 1.0
    assert lr_factor(60, cfg) == pytest.approx(0.5)
    assert lr_factor(110, cfg) == pytest.approx(0.0, abs=1e-12)
    flat = RunConfig(p=11, warmup_epochs=4)
    assert [lr_factor(e, flat) for e in (0, 3, 4, 1000)] == [0.25, 1.0, 1.0, 1.0]


def test_set_lr_leaves_the_default_path_untouched():
    w = torch.nn.Parameter(torch.zeros(2))
    cfg = RunConfig(p=11, lr=3e-3)
    opt = make_optimizer([w], cfg)
    opt.param_groups[0]["lr"] = 123.0        # would be overwritten if a schedule applied
    set_lr(opt, 5, cfg)
    assert opt.param_groups[0]["lr"] == 123.0
    warm = RunConfig(p=11, lr=3e-3, warmup_epochs=10)
    set_lr(opt, 4, warm)
    assert opt.param_groups[0]["lr"] == pytest.approx(3e-3 * 0.5)


def test_minibatches_cover_the_train_set_once_per_epoch_and_resume_from_the_generator():
    cfg = from_dict({"p": 11, "train_frac": 0.5, "batch_size": 16})
    n = 60
    gen = batch_generator(cfg)
    first = epoch_batches(n, cfg, gen)
    assert [len(b) for b in first] == [16, 16, 16, 12]
    assert sorted(torch.cat(first).tolist()) == list(range(n))
    state = gen.get_state()
    second = epoch_batches(n, cfg, gen)
    assert not torch.equal(torch.cat(first), torch.cat(second))   # a new order each epoch
    resumed = torch.Generator()
    resumed.set_state(state)
    again = epoch_batches(n, cfg, resumed)
    assert all(torch.equal(a, b) for a, b in zip(second, again))
    assert epoch_batches(n, RunConfig(p=11), gen) == [None]


def test_rescale_to_norm_hits_the_target():
    params = [torch.randn(3, 4), torch.randn(7)]
    rescale_to_norm(params, torch.tensor(2.5, dtype=torch.float64))
    assert weight_norm(params).item() == pytest.approx(2.5, rel=1e-6)
    assert math.isclose(math.sqrt(sum((p.double() ** 2).sum().item() for p in params)), 2.5,
                        rel_tol=1e-6)


# ---- the registry -------------------------------------------------------------------------------
def test_every_optimizer_a_run_may_name_has_a_solo_and_a_stacked_builder():
    from grokhpc import config
    from grokhpc.optim import OPTIMIZERS
    from grokhpc.stacked_optim import STACKED

    assert config.OPTIMIZERS == ("adamw", "adam", "sgd", "perp_adamw") == tuple(OPTIMIZERS)
    assert set(STACKED) == set(OPTIMIZERS)
    w = torch.nn.Parameter(torch.randn(2))
    kinds = {name: type(make_optimizer([w], RunConfig(p=11, optimizer=name)))
             for name in OPTIMIZERS}
    perp = kinds.pop("perp_adamw")
    assert kinds == {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam,
                     "sgd": torch.optim.SGD}
    assert perp.__name__ == "PerpAdamW" and issubclass(perp, torch.optim.AdamW)


def test_an_unknown_optimizer_is_one_line_solo_and_stacked():
    """A name that reaches the builders unchecked (a RunConfig refuses it at once) is an error
    at both levels, never another optimiser."""
    from types import SimpleNamespace

    from grokhpc.stacked_optim import stacked_optimizer

    cfg = SimpleNamespace(optimizer="lion", lr=1e-3, weight_decay=1.0, betas=(0.9, 0.98),
                          momentum=0.0)
    with pytest.raises(ValueError) as e:
        make_optimizer([torch.nn.Parameter(torch.randn(2))], cfg)
    assert str(e.value) == "optimizer: expected one of adamw, adam, sgd, perp_adamw, got 'lion'"
    with pytest.raises(ValueError) as e:
        stacked_optimizer([SimpleNamespace(cfg=cfg)], {}, [], "cpu", per_run_torch=True)
    assert str(e.value) == ("optimizer: no stacked step for 'lion' (grokhpc.stacked_optim "
                            "knows adamw, adam, sgd, perp_adamw)")
