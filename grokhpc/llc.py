"""The local learning coefficient (LLC, Lau et al. 2023) of a model at given weights.

The LLC lambda(w*) measures the effective complexity of a model at a local minimum w* of the
training loss L_n: near w*, the volume of weights with L_n(w) - L_n(w*) < t scales as
t^lambda (d/2 for d parameters of a regular minimum, less where the minimum is degenerate).
Its estimator samples the localized tempered posterior

    p(w) ~ exp(-nbeta L_n(w) - gamma/2 ||w - w*||^2)

by SGLD, w <- w - (epsilon/2) (nbeta grad L_batch(w) + gamma (w - w*)) + N(0, epsilon), and
reads lambda_hat = nbeta (E_w[L_n(w)] - L_n(w*)): the mean loss over the draws after burn-in,
less the loss at w*. ``nbeta`` multiplies the *mean* loss (devinterp's convention; Lau et al.'s
n beta with beta = 1 / log n is n / log n).

The sampler is devinterp's (``pip install -e '.[slt]'``; imported only here, inside the
functions): its ``sample`` runs the chains and records every step's minibatch loss. The
estimate is taken here from that loss trace rather than with devinterp's ``compute_llc``,
which averages every step, burn-in included; and L_n(w*) is the exact mean over every row
rather than devinterp's estimate from a few minibatches. Parameters that do not require grad
(the seed's frozen biases) are not sampled.
"""

from __future__ import annotations

import math
import random
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any, Callable, Mapping

import numpy as np


class LLCError(ValueError):
    """A bad LLC setting, or a chain that diverged; the message is one line."""


@dataclass(frozen=True)
class LLCSettings:
    """SGLD settings of one LLC estimate.

    The defaults were calibrated on a CPU-sized run that groks (mul, p = 31, 70% train, the
    quickstart model): at every checkpoint from initialisation to the end the chains agree,
    the loss trace is flat after burn-in and doubling the draws moves the estimate little. A
    larger step size let chains at the sharpest checkpoints (just before grokking) take
    excursions far out of the basin; the weaker localization and temperature of devinterp's
    older grokking example (gamma 5, nbeta 2) let this transformer's chains drift away without
    settling. The estimate depends on gamma and nbeta (the localized posterior is not in its
    asymptotic regime): compare LLCs only at equal settings.
    """

    chains: int = 4
    draws: int = 400
    burn_in: int = 400
    epsilon: float = 1e-4         # SGLD step size
    gamma: float = 100.0          # localization strength
    nbeta: float = 100.0          # inverse temperature times n, on the mean loss
    batch_size: int | str = "full"
    seed: int = 0

    def __post_init__(self) -> None:
        validate_settings({f.name: getattr(self, f.name) for f in fields(self)})

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], source: str = "llc") -> "LLCSettings":
        """Settings from a spec's mapping (missing keys at their defaults); an unknown key or
        a bad value is an error naming ``source`` and the key."""
        known = [f.name for f in fields(cls)]
        for key in values:
            if key not in known:
                raise LLCError(f"{source}: {key}: unknown LLC setting (expected one of "
                               f"{', '.join(known)})")
        validate_settings(values, source)
        return cls(**values)


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


CHECKS = {
    "chains": (lambda v: _int(v) and v >= 1, "an integer >= 1"),
    "draws": (lambda v: _int(v) and v >= 2, "an integer >= 2"),
    "burn_in": (lambda v: _int(v) and v >= 0, "an integer >= 0"),
    "epsilon": (lambda v: _real(v) and v > 0, "a positive step size"),
    "gamma": (lambda v: _real(v) and v >= 0, "a non-negative localization strength"),
    "nbeta": (lambda v: _real(v) and v > 0, "a positive inverse temperature"),
    "batch_size": (lambda v: v == "full" or (_int(v) and v >= 1), "full or an integer >= 1"),
    "seed": (lambda v: _int(v) and v >= 0, "an integer >= 0"),
}


def validate_settings(values: Mapping[str, Any], source: str = "llc settings") -> None:
    """Raise LLCError on the first bad value among ``values`` (setting name -> value)."""
    for key, (ok, expected) in CHECKS.items():
        if key in values and not ok(values[key]):
            raise LLCError(f"{source}: {key}: expected {expected}, got {values[key]!r}")


DEFAULT_LOG_POINTS = 16


@dataclass(frozen=True)
class LLCRequest:
    """Which checkpoints of a run get an LLC estimate, and the SGLD settings: every ``every``-th
    checkpoint row and the last, or the checkpoints nearest (in log epoch) to ``log_points``
    epochs log-spaced from the first positive checkpoint epoch to the last, and the first; at
    most one of the two, log-spaced by default."""

    settings: LLCSettings = LLCSettings()
    every: int | None = None
    log_points: int | None = None

    @classmethod
    def from_mapping(cls, values: Any, source: str = "llc") -> "LLCRequest":
        """A spec's ``llc:`` section (or the command line's values): ``every`` or
        ``log_points``, and any LLCSettings field; one-line LLCError naming ``source``."""
        if values is None:
            values = {}
        if not isinstance(values, Mapping):
            raise LLCError(f"{source}: expected a mapping of LLC settings, got "
                           f"{type(values).__name__}")
        values = dict(values)
        pick = {k: values.pop(k) for k in ("every", "log_points") if k in values}
        for k, v in pick.items():
            if v is not None and not (_int(v) and v >= (1 if k == "every" else 2)):
                least = 1 if k == "every" else 2
                raise LLCError(f"{source}: {k}: expected an integer >= {least}, got {v!r}")
        if pick.get("every") is not None and pick.get("log_points") is not None:
            raise LLCError(f"{source}: every, log_points: expected one of the two, got both")
        return cls(LLCSettings.from_mapping(values, source), **pick)

    def epochs(self, epochs: list[int]) -> list[int]:
        """The checkpoint epochs (of ``epochs``, ascending) this request estimates."""
        if not epochs:
            return []
        if self.every is not None:
            chosen = set(epochs[::self.every]) | {epochs[-1]}
        else:
            n = self.log_points or DEFAULT_LOG_POINTS
            ep = np.asarray(epochs, np.float64)
            lo = ep[ep > 0].min() if (ep > 0).any() else 1.0
            targets = np.geomspace(lo, max(ep[-1], lo), n)
            at = np.log(np.maximum(ep, 0.5 * lo))
            chosen = {epochs[int(np.argmin(np.abs(at - math.log(t))))] for t in targets}
            chosen |= {epochs[0], epochs[-1]}
        return sorted(chosen)

    def describe(self) -> str:
        which = (f"every {self.every}th checkpoint" if self.every is not None else
                 f"{self.log_points or DEFAULT_LOG_POINTS} log-spaced checkpoints")
        s = self.settings
        return (f"{which}; {s.chains} chains x {s.draws} draws after {s.burn_in} burn-in, "
                f"epsilon {s.epsilon:g}, gamma {s.gamma:g}, nbeta {s.nbeta:g}, "
                f"batch {s.batch_size}")


def checked_section(values: Any, source: str) -> Mapping[str, Any] | None:
    """A spec's ``llc:`` section, checked (``LLCRequest.from_mapping``); a bad one is a
    ConfigError naming the spec and the key."""
    from .config import ConfigError

    if values is None:
        return None
    try:
        LLCRequest.from_mapping(values, f"{source}: llc")
    except LLCError as e:
        raise ConfigError(str(e)) from None
    return dict(values)


@dataclass(frozen=True)
class LLCEstimate:
    """One LLC estimate: its mean and spread over chains, and the loss trace behind it."""

    llc_mean: float
    llc_std: float                      # over chains (population std, as devinterp's)
    llc_per_chain: tuple[float, ...]
    init_loss: float                    # L_n(w*), the mean over every row
    loss_trace: np.ndarray              # (chains, burn_in + draws) minibatch loss per step
    settings: LLCSettings

    def llc_over(self, start: int, stop: int) -> np.ndarray:
        """Per chain, the estimate from draws start..stop-1 only (stationarity checks)."""
        b = self.settings.burn_in
        trace = self.loss_trace[:, b + start:b + stop]
        return self.settings.nbeta * (trace.mean(axis=1) - self.init_loss)


@contextmanager
def _quiet_and_restored_rngs(progress: bool):
    """devinterp reseeds the global RNGs, draws a progress bar per chain and runs a full
    garbage collection before and after each: restore the caller's RNG states afterwards;
    unless ``progress``, hand its sampler a silenced ``trange`` (tqdm reads TQDM_DISABLE only
    when first imported); and freeze the objects alive now (``gc.freeze``) so that each
    collection skips the heap of imported modules instead of walking it."""
    import functools
    import gc

    import torch
    from devinterp.slt import sampler

    np_state, py_state, trange = np.random.get_state(), random.getstate(), sampler.trange
    if not progress:
        sampler.trange = functools.partial(trange, disable=True)
    gc.freeze()
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        gc.unfreeze()
        np.random.set_state(np_state)
        random.setstate(py_state)
        sampler.trange = trange


def exact_loss(model, row_loss: Callable, n_rows: int, chunk: int = 4096) -> float:
    """The mean of ``row_loss(model, rows)`` over every row, without gradients."""
    import torch

    total = 0.0
    with torch.no_grad():
        for start in range(0, n_rows, chunk):
            rows = torch.arange(start, min(start + chunk, n_rows))
            total += float(row_loss(model, rows).double().sum())
    return total / n_rows


def _plain(model):
    """``model`` as the submodule ``inner`` of a plain module: devinterp takes any module with
    ``cfg.n_heads`` for a TransformerLens HookedTransformer and calls its ``to`` with
    arguments torch's does not take."""
    import torch

    wrapper = torch.nn.Module()
    wrapper.inner = model
    return wrapper


def estimate_llc(model, row_loss: Callable, n_rows: int, settings: LLCSettings = LLCSettings(),
                 device: str = "cpu", progress: bool = False) -> LLCEstimate:
    """The LLC of ``model`` at its current weights, for the loss L_n = the mean over rows
    0..n_rows-1 of ``row_loss(model, rows) -> (len(rows),)`` (rows a long tensor of indices:
    the function reads its own data). ``model`` is left as it was."""
    from datasets import Dataset
    from devinterp.slt.sampling import sample

    s = settings
    batch = n_rows if s.batch_size == "full" else s.batch_size
    if batch > n_rows:
        raise LLCError(f"llc settings: batch_size: expected full or at most the {n_rows} rows, "
                       f"got {batch}")
    ids = np.stack([np.arange(n_rows), np.zeros(n_rows, np.int64)], axis=1)
    data = Dataset.from_dict({"input_ids": ids}).with_format("torch")

    def loss_fn(m, input_ids):                 # devinterp's per-token shape (batch, 1)
        return row_loss(m.inner, input_ids[:, 0].cpu())[:, None]

    init_loss = exact_loss(model, row_loss, n_rows)
    with tempfile.TemporaryDirectory() as tmp, _quiet_and_restored_rngs(progress), \
            warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tree = sample(_plain(model), data, {}, lr=s.epsilon, n_beta=s.nbeta, localization=s.gamma,
                      num_chains=s.chains, num_draws=s.draws, num_burnin_steps=s.burn_in,
                      batch_size=batch, num_init_loss_batches=1, init_seed=s.seed,
                      device=device, loss_fn=loss_fn, output_path=f"{tmp}/samples.zarr")
        trace = tree.dataset.sampling_loss_micro.mean(dim=["batch_sampling", "token_pos"])
        trace = np.asarray(trace.values, np.float64)
    failed = [str(w.message) for w in caught if "Chain failed" in str(w.message)]
    for w in caught:                            # pass on every other warning
        if "Chain failed" not in str(w.message):
            warnings.warn(w.message, w.category, stacklevel=2)
    if failed or not np.isfinite(trace).all():
        why = failed[0] if failed else "non-finite loss"
        raise LLCError(f"llc: an SGLD chain diverged ({why}); lower epsilon or raise gamma")
    per_chain = s.nbeta * (trace[:, s.burn_in:].mean(axis=1) - init_loss)
    return LLCEstimate(float(per_chain.mean()), float(per_chain.std()),
                       tuple(float(x) for x in per_chain), init_loss, trace, s)


def checkpoint_llc(cfg, row, settings: LLCSettings = LLCSettings(), device: str = "cpu",
                   progress: bool = False) -> LLCEstimate:
    """The LLC of a run's model at a checkpoint row (``RunDir.checkpoints``) on the run's
    training pairs and the labels it was trained on, the loss the run's training loss
    (its ``loss_fn`` of the model's logits in the run's ``loss_dtype``)."""
    from .data import make_dataset
    from .losses import row_losses
    from .model import load_flat
    from .models import build_model

    model = load_flat(build_model(cfg, device), np.array(row, dtype=np.float32))
    data = make_dataset(cfg)
    tokens, labels = data.train_tokens.to(device), data.train_labels.to(device)

    def row_loss(m, rows):
        rows = rows.to(device)
        return row_losses(m.last_logits(tokens[rows]), labels[rows], cfg.loss_dtype,
                          cfg.loss_fn)

    return estimate_llc(model, row_loss, len(labels), settings, device, progress)
