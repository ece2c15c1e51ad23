"""The LLC estimator: on a regular quadratic minimum, where the learning coefficient is d/2 and
the SGLD chain's law is known in closed form; its settings' checks; and the run-model wrapper
against the run's own training loss."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from grokhpc.config import RunConfig
from grokhpc.data import make_dataset
from grokhpc.llc import LLCError, LLCSettings, checkpoint_llc, estimate_llc
from grokhpc.model import build_model, flat_weights

torch.set_num_threads(1)


def regression(d: int = 10, n: int = 200, seed: int = 0):
    """Least squares y ~ X w with its optimum w* set exactly: residuals orthogonal to X's
    columns, so the loss is L* + (w - w*)^T H (w - w*) / 2 with H = X^T X / n."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    w_star = torch.randn(d, generator=g, dtype=torch.float64)
    r = torch.randn(n, generator=g, dtype=torch.float64)
    Q, _ = torch.linalg.qr(X)
    r = r - Q @ (Q.T @ r)
    y = X @ w_star + r
    model = torch.nn.Linear(d, 1, bias=False, dtype=torch.float64)
    with torch.no_grad():
        model.weight.copy_(w_star[None])

    def row_loss(m, rows):
        return 0.5 * (m(X[rows]).squeeze(-1) - y[rows]) ** 2

    H = (X.T @ X / n).numpy()
    return model, row_loss, H, float((r ** 2).mean() / 2)


def sgld_law(h: np.ndarray, s: LLCSettings) -> tuple[float, float]:
    """(E, sd) of the estimate nbeta * mean_t (L(w_t) - L*) over draws t = burn_in..+draws,
    chains started at w*, full batch. Along an eigenvector of H (eigenvalue h) the update is
    u <- rho u + sqrt(eps) xi with a = nbeta h + gamma, rho = 1 - eps a / 2: Var u_t =
    v (1 - rho^(2t)), v = 1 / (a (1 - eps a / 4)) (-> 1 / (nbeta h) as eps, gamma -> 0, so
    E -> d / 2). sd: u_t^2 has variance 2 v^2 and autocorrelation rho^(2|t - s|), so a mean
    over T draws has variance 2 v^2 (1 + rho^2) / ((1 - rho^2) T), over independent chains."""
    a = s.nbeta * h + s.gamma
    rho = 1 - s.epsilon * a / 2
    v = 1 / (a * (1 - s.epsilon * a / 4))
    t = np.arange(s.burn_in, s.burn_in + s.draws)
    var_t = v[:, None] * (1 - rho[:, None] ** (2 * t[None]))
    mean = s.nbeta * 0.5 * (h[:, None] * var_t).mean(axis=1).sum()
    var = ((s.nbeta * h / 2) ** 2 * 2 * v ** 2 * (1 + rho ** 2) / (1 - rho ** 2)).sum()
    return float(mean), math.sqrt(var / s.draws / s.chains)


def test_llc_of_a_regular_quadratic_minimum_is_half_its_dimension():
    """d = 10 parameters: the estimate lies within 4 sd of the chain's exact expectation, and
    that expectation within 6% of d/2 (the step size's and localization's bias, both exact)."""
    model, row_loss, H, L_star = regression()
    s = LLCSettings(chains=4, draws=1000, burn_in=100, epsilon=2e-3, gamma=1.0, nbeta=100.0)
    mean, sd = sgld_law(np.linalg.eigvalsh(H), s)
    assert abs(mean - 5.0) < 0.06 * 5.0
    est = estimate_llc(model, row_loss, 200, s)
    assert est.init_loss == pytest.approx(L_star, rel=1e-12)
    assert abs(est.llc_mean - mean) < 4 * sd, (est.llc_mean, mean, sd)
    assert est.loss_trace.shape == (4, 1100)
    assert np.allclose(est.llc_over(0, 1000), est.llc_per_chain)
    assert est.llc_std == pytest.approx(np.std(est.llc_per_chain))


def test_estimate_leaves_the_model_and_the_callers_rngs_as_they_were():
    model, row_loss, _, _ = regression(d=3, n=20)
    before = model.weight.detach().clone()
    torch.manual_seed(7)
    np.random.seed(7)
    random.seed(7)
    expect = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(7)
    np.random.seed(7)
    random.seed(7)
    estimate_llc(model, row_loss, 20, LLCSettings(chains=2, draws=5, burn_in=0, nbeta=10.0))
    assert torch.equal(model.weight, before)
    assert torch.equal(torch.rand(3), expect[0])
    assert np.array_equal(np.random.rand(3), expect[1]) and random.random() == expect[2]


def test_same_seed_same_estimate_and_seed_changes_it():
    model, row_loss, _, _ = regression(d=3, n=20)
    s = LLCSettings(chains=1, draws=20, burn_in=0, nbeta=10.0, seed=3)
    a, b = (estimate_llc(model, row_loss, 20, s) for _ in range(2))
    c = estimate_llc(model, row_loss, 20, LLCSettings(**{**s.__dict__, "seed": 4}))
    assert np.array_equal(a.loss_trace, b.loss_trace)
    assert not np.array_equal(a.loss_trace, c.loss_trace)


def test_a_diverging_chain_is_an_error():
    model, row_loss, _, _ = regression(d=3, n=20)
    with pytest.raises(LLCError, match="llc: an SGLD chain diverged .*lower epsilon"):
        estimate_llc(model, row_loss, 20, LLCSettings(chains=1, draws=50, burn_in=0,
                                                      epsilon=1.0, nbeta=1e3))


@pytest.mark.parametrize("field, value, expected", [
    ("chains", 0, "an integer >= 1"), ("draws", 1, "an integer >= 2"),
    ("burn_in", -1, "an integer >= 0"), ("epsilon", 0.0, "a positive step size"),
    ("epsilon", float("nan"), "a positive step size"),
    ("gamma", -1.0, "a non-negative localization strength"),
    ("nbeta", 0, "a positive inverse temperature"), ("batch_size", 0, "full or an integer"),
    ("batch_size", "half", "full or an integer"), ("seed", True, "an integer >= 0"),
    ("draws", 10.0, "an integer >= 2"),
])
def test_bad_settings_are_one_line_errors_naming_the_field(field, value, expected):
    with pytest.raises(LLCError, match=f"^llc settings: {field}: expected {expected}") as e:
        LLCSettings(**{field: value})
    assert "\n" not in str(e.value)
    with pytest.raises(LLCError, match=f"^spec.yaml: llc: {field}: expected {expected}"):
        LLCSettings.from_mapping({field: value}, source="spec.yaml: llc")


def test_settings_from_a_mapping():
    assert LLCSettings.from_mapping({"draws": 100, "batch_size": 64}) == \
        LLCSettings(draws=100, batch_size=64)
    with pytest.raises(LLCError, match="^spec.yaml: llc: chain: unknown LLC setting"):
        LLCSettings.from_mapping({"chain": 2}, source="spec.yaml: llc")


def test_batch_larger_than_the_data_is_refused():
    model, row_loss, _, _ = regression(d=3, n=20)
    with pytest.raises(LLCError, match="batch_size: expected full or at most the 20 rows, got 32"):
        estimate_llc(model, row_loss, 20, LLCSettings(batch_size=32))


def test_checkpoint_llc_samples_the_runs_training_loss():
    """init_loss is the run's training loss at the row (the hooked forward's last position,
    float64 cross-entropy on the train pairs); minibatches cover the same loss."""
    cfg = RunConfig(p=11, d_model=16, d_head=8, n_heads=2, d_mlp=32, train_frac=0.5,
                    device="cpu")
    model = build_model(cfg)
    data = make_dataset(cfg)
    with torch.no_grad():
        logits = model(data.train_tokens)[:, -1].double()
    expect = float(torch.nn.functional.cross_entropy(logits, data.train_labels))
    s = LLCSettings(chains=2, draws=10, burn_in=2, batch_size=20)
    est = checkpoint_llc(cfg, flat_weights(model).numpy(), s)
    assert est.init_loss == pytest.approx(expect, rel=1e-6)   # float32 logits
    assert est.loss_trace.shape == (2, 12) and np.isfinite(est.llc_mean)
    assert abs(est.loss_trace[:, 0].mean() - expect) < 0.5    # step 0 is w* on a minibatch
