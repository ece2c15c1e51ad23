"""The run's dataset: every pair of its task in the seed's ``a b =`` token format, its labels,
and the seed's train/test split.

Stage: model & data (the trainers and the measures build it from the run's config). The
tasks themselves -- operands, labels, excluded pairs -- are declared in ``grokhpc.tasks``.
Rows are the pairs (a, b) in row-major order over the n x n grid of operand tokens (``b``
runs fastest, n = ``RunConfig.n_classes``), less a task's excluded pairs (div: b = 0); the
third token is ``=`` (id n). The split is the seed's: ``torch.manual_seed(data_seed);
torch.randperm(n_pairs)``, the first ``int(n_pairs * train_frac)`` indices train, the rest
test. :func:`make_dataset` dispatches on the task's ``kind`` (``DATASETS``), so that datasets
that are no binary operation can join.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .config import RunConfig
from .datasets import split_indices
from .tasks import task


def apply_op(op: str, a: torch.Tensor, b: torch.Tensor, p: int) -> torch.Tensor:
    """Label of each pair (a, b) under task ``op`` (``grokhpc.tasks``); ValueError for an
    unknown op."""
    return task(op).label(a, b, p)


def grid_tokens(n: int) -> torch.Tensor:
    """Every input row ``[a, b, =]`` of the n x n grid (long, n^2 x 3), a-major; ``=`` is
    token n."""
    a = torch.arange(n).repeat_interleave(n)
    b = torch.arange(n).repeat(n)
    return torch.stack([a, b, torch.full_like(a, n)], dim=1)


def all_pairs(p: int, op: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Every input row ``[a, b, =]`` of task ``op`` (long, n_pairs x 3) and its label, in the
    seed's order; ``p`` is the number of operands (120 for the S5 tasks)."""
    excluded = task(op).excluded_b
    tokens = grid_tokens(p)
    if excluded:
        tokens = tokens[~torch.isin(tokens[:, 1], torch.tensor(excluded))]
    return tokens, apply_op(op, tokens[:, 0], tokens[:, 1], p)


@dataclass(frozen=True)
class Dataset:
    """All pairs, their true labels, the train/test split of one run, and the labels the
    model is trained on (the true ones, less the ones ``label_noise`` replaced)."""

    tokens: torch.Tensor        # (n, 3) long; a dataset's (n, features) float
    labels: torch.Tensor        # (n,) long, the true labels
    train_idx: torch.Tensor     # (n_train,) long
    test_idx: torch.Tensor      # (n_test,) long
    train_targets: torch.Tensor  # (n_train,) long, labels[train_idx] with noise

    @property
    def train_tokens(self) -> torch.Tensor:
        return self.tokens[self.train_idx]

    @property
    def train_labels(self) -> torch.Tensor:
        return self.train_targets

    @property
    def test_tokens(self) -> torch.Tensor:
        return self.tokens[self.test_idx]

    @property
    def test_labels(self) -> torch.Tensor:
        return self.labels[self.test_idx]

    def to(self, device) -> "Dataset":
        return Dataset(*(t.to(device) for t in (self.tokens, self.labels, self.train_idx,
                                                  self.test_idx, self.train_targets)))


def noisy_targets(labels: torch.Tensor, frac: float, n_classes: int,
                  gen: torch.Generator) -> torch.Tensor:
    """``labels`` with ``round(frac * n)`` of them, chosen by ``gen``, replaced by labels drawn
    uniformly from the ``n_classes`` (a draw may repeat the true label)."""
    out = labels.clone()
    k = round(frac * len(labels))
    if k:
        which = torch.randperm(len(labels), generator=gen)[:k]
        out[which] = torch.randint(n_classes, (k,), generator=gen)
    return out


def binary_op_dataset(cfg: RunConfig) -> Dataset:
    """The pairs and split of a binary operation; label noise, if any, is drawn after the split
    from the same seeded generator, so a run without noise has the seed's split exactly."""
    tokens, labels = all_pairs(cfg.n_classes, cfg.op)
    gen = torch.Generator().manual_seed(cfg.data_seed)
    train_idx, test_idx = split_indices(len(tokens), cfg.train_frac, cfg.data_seed, gen)
    targets = noisy_targets(labels[train_idx], cfg.label_noise, cfg.n_classes, gen)
    return Dataset(tokens, labels, train_idx, test_idx, targets)


def features_dataset(cfg: RunConfig) -> Dataset:
    """A dataset that is no binary operation (``grokhpc.datasets``): its float features stand
    in the place of the tokens; label noise, if any, drawn after the split as above."""
    from . import datasets

    make = datasets.sparse_parity if cfg.op == "sparse_parity" else datasets.images
    inputs, labels, train_idx, test_idx, gen = make(cfg)
    targets = noisy_targets(labels[train_idx], cfg.label_noise, cfg.n_classes, gen)
    return Dataset(inputs, labels, train_idx, test_idx, targets)


# How each kind of task (grokhpc.tasks.Task.kind) builds its dataset.
DATASETS: dict[str, Callable[[RunConfig], Dataset]] = {
    "binary_op": binary_op_dataset, "sparse_parity": features_dataset, "image": features_dataset}


def make_dataset(cfg: RunConfig) -> Dataset:
    """The run's rows, labels and split, built as its task's kind says."""
    return DATASETS[task(cfg.op).kind](cfg)
