"""Datasets of binary operations in the seed's ``a b =`` token format, with the seed's split.

Rows are the pairs (a, b) in row-major order over the n x n grid (``b`` runs fastest), the
third token is ``=`` (id n), and the label is ``a op b``: over Z_p (n = p) for sub, add, mul,
div, the polynomial tasks quad1-3, cube1-2 and mix1 (names as in Power et al. 2022), over the
120 permutations of S5 (n = 120) for s5, s5conj and s5aba. Division leaves out b = 0.
The split is the seed's: ``torch.manual_seed(data_seed); torch.randperm(n)``, the first
``int(n * train_frac)`` indices train, the rest test.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from .config import GROUP_OPS, RunConfig


def _inverse_mod(b: torch.Tensor, p: int) -> torch.Tensor:
    """b^(p-2) = b^-1 mod p (Fermat) for each nonzero b."""
    inv = torch.tensor([pow(int(x), p - 2, p) for x in range(p)])
    return inv[b]


MODULAR_LABELS = {
    "sub": lambda a, b, p: a - b,
    "add": lambda a, b, p: a + b,
    "mul": lambda a, b, p: a * b,
    "div": lambda a, b, p: a * _inverse_mod(b, p),
    "quad1": lambda a, b, p: a ** 2 + b ** 2,
    "quad2": lambda a, b, p: a ** 2 + b ** 2 + a * b,
    "quad3": lambda a, b, p: a ** 2 + b ** 2 + a * b + a,
    "cube1": lambda a, b, p: a ** 3 + a * b,
    "cube2": lambda a, b, p: a ** 3 + a * b ** 2 + b,
    # b odd (so nonzero): a / b; b even: a - b
    "mix1": lambda a, b, p: torch.where(b % 2 == 1, a * _inverse_mod(b, p), a - b),
}


def s5_elements() -> list[tuple[int, ...]]:
    """The 120 permutations of {0..4} in lexicographic order: token i is element i."""
    return list(itertools.permutations(range(5)))


def s5_table(op: str) -> torch.Tensor:
    """(120, 120) labels of an S5 task. A permutation maps i to x[i]; "x then y" maps i to
    y[x[i]]. s5: x then y; s5conj: x then y then x^-1; s5aba: x then y then x."""
    elems = s5_elements()
    index = {e: i for i, e in enumerate(elems)}

    def then(*perms):
        out = tuple(range(5))
        for q in perms:
            out = tuple(q[i] for i in out)
        return out

    def inverse(x):
        return tuple(sorted(range(5), key=lambda i: x[i]))

    label = {"s5": lambda x, y: then(x, y),
             "s5conj": lambda x, y: then(x, y, inverse(x)),
             "s5aba": lambda x, y: then(x, y, x)}[op]
    return torch.tensor([[index[label(x, y)] for y in elems] for x in elems])


def apply_op(op: str, a: torch.Tensor, b: torch.Tensor, p: int) -> torch.Tensor:
    """Label of each pair (a, b): over Z_p for the modular ops, over S5 for the group ops."""
    if op in MODULAR_LABELS:
        return MODULAR_LABELS[op](a, b, p) % p
    if op in GROUP_OPS:
        return s5_table(op)[a, b]
    raise ValueError(f"unknown op {op!r}")


def all_pairs(p: int, op: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Every input row ``[a, b, =]`` (long, n x 3) and its label, in the seed's order; ``p``
    is the number of operands (120 for the S5 tasks) and ``=`` is token ``p``."""
    a = torch.arange(p).repeat_interleave(p)
    b = torch.arange(p).repeat(p)
    if op == "div":
        keep = b != 0
        a, b = a[keep], b[keep]
    tokens = torch.stack([a, b, torch.full_like(a, p)], dim=1)
    return tokens, apply_op(op, a, b, p)


def split_indices(n: int, train_frac: float, data_seed: int,
                  gen: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The seed's split: a seeded permutation, the first ``int(n * train_frac)`` train."""
    gen = gen if gen is not None else torch.Generator().manual_seed(data_seed)
    perm = torch.randperm(n, generator=gen)
    cut = int(n * train_frac)
    return perm[:cut], perm[cut:]


@dataclass(frozen=True)
class Dataset:
    """All pairs, their true labels, the train/test split of one run, and the labels the
    model is trained on (the true ones, less the ones ``label_noise`` replaced)."""

    tokens: torch.Tensor        # (n, 3) long
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


def make_dataset(cfg: RunConfig) -> Dataset:
    """The run's pairs and split; label noise, if any, is drawn after the split from the same
    seeded generator, so a run without noise has the seed's split exactly."""
    tokens, labels = all_pairs(cfg.n_classes, cfg.op)
    gen = torch.Generator().manual_seed(cfg.data_seed)
    train_idx, test_idx = split_indices(len(tokens), cfg.train_frac, cfg.data_seed, gen)
    targets = noisy_targets(labels[train_idx], cfg.label_noise, cfg.n_classes, gen)
    return Dataset(tokens, labels, train_idx, test_idx, targets)
