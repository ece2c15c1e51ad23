"""Modular-arithmetic datasets in the seed's ``a b =`` token format, with the seed's split.

Rows are the pairs (a, b) in row-major order over the p x p grid (``b`` runs fastest), the
third token is ``=`` (id p), and the label is ``a op b mod p``. Division leaves out b = 0.
The split is the seed's: ``torch.manual_seed(data_seed); torch.randperm(n)``, the first
``int(n * train_frac)`` indices train, the rest test.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import RunConfig


def apply_op(op: str, a: torch.Tensor, b: torch.Tensor, p: int) -> torch.Tensor:
    """Label of each pair; ``div`` uses b^(p-2) = b^-1 (Fermat), so b must be nonzero."""
    if op == "sub":
        return (a - b) % p
    if op == "add":
        return (a + b) % p
    if op == "mul":
        return (a * b) % p
    if op == "div":
        inv = torch.tensor([pow(int(x), p - 2, p) for x in range(p)])
        return (a * inv[b]) % p
    raise ValueError(f"unknown op {op!r}")


def all_pairs(p: int, op: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Every input row ``[a, b, p]`` (long, n x 3) and its label, in the seed's order."""
    a = torch.arange(p).repeat_interleave(p)
    b = torch.arange(p).repeat(p)
    if op == "div":
        keep = b != 0
        a, b = a[keep], b[keep]
    tokens = torch.stack([a, b, torch.full_like(a, p)], dim=1)
    return tokens, apply_op(op, a, b, p)


def split_indices(n: int, train_frac: float, data_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The seed's split: a seeded permutation, the first ``int(n * train_frac)`` train."""
    gen = torch.Generator().manual_seed(data_seed)
    perm = torch.randperm(n, generator=gen)
    cut = int(n * train_frac)
    return perm[:cut], perm[cut:]


@dataclass(frozen=True)
class Dataset:
    """All pairs, their labels, and the train/test index split of one run."""

    tokens: torch.Tensor        # (n, 3) long
    labels: torch.Tensor        # (n,) long
    train_idx: torch.Tensor     # (n_train,) long
    test_idx: torch.Tensor      # (n_test,) long

    @property
    def train_tokens(self) -> torch.Tensor:
        return self.tokens[self.train_idx]

    @property
    def train_labels(self) -> torch.Tensor:
        return self.labels[self.train_idx]

    @property
    def test_tokens(self) -> torch.Tensor:
        return self.tokens[self.test_idx]

    @property
    def test_labels(self) -> torch.Tensor:
        return self.labels[self.test_idx]

    def to(self, device) -> "Dataset":
        return Dataset(*(t.to(device) for t in (self.tokens, self.labels,
                                                  self.train_idx, self.test_idx)))


def make_dataset(cfg: RunConfig) -> Dataset:
    tokens, labels = all_pairs(cfg.p, cfg.op)
    train_idx, test_idx = split_indices(len(tokens), cfg.train_frac, cfg.data_seed)
    return Dataset(tokens, labels, train_idx, test_idx)
