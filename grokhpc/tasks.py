"""The tasks, each declared once: its operands, its label, the pairs it leaves out, its group.

Stage: foundations. ``config`` validates ``op`` against :data:`TASKS` and derives from it the
task lists (``OPS``, ``MODULAR_OPS``, ``GROUP_OPS``), ``RunConfig.n_classes`` and ``n_pairs``;
``data`` builds each task's rows and labels from it (:func:`task`'s ``kind`` says how);
``bases`` reads each task's group from it, the basis its progress measures are read in, and
``measures`` which tasks have the Fourier measures of Z_p (group ``Z_p``).

=================  ========  ===========================================  =====================
task               operands  label of (a, b)                              group (``bases``)
=================  ========  ===========================================  =====================
sub, add           Z_p       a - b, a + b                                 Z_p: i - j, i + j
mul, div           Z_p       a b, a / b (div leaves out b = 0)            Z_p^* by discrete log
quad1, 2, 3        Z_p       a^2 + b^2 (+ a b (+ a))                      none: a polynomial
cube1, cube2       Z_p       a^3 + a b, a^3 + a b^2 + b                   none: a polynomial
mix1               Z_p       a / b for odd b, a - b for even b            none: two groups
s5, s5conj, s5aba  S5        the words a b, a b a^-1, a b a               S5
=================  ========  ===========================================  =====================

Labels over Z_p are taken mod p (names of the polynomial and mixed tasks as in Power et al.
2022). Over S5 the operands are the 120 permutations of {0..4} in lexicographic order
(:func:`s5_elements`), p does not apply, and a word is composed left to right: a permutation
maps i to x[i], and "x then y" maps i to y[x[i]].

Three datasets are no binary operation (``kind`` other than ``binary_op``, built by
``grokhpc.datasets``): ``sparse_parity`` (n_bits random bits, the label the parity of the
first k_bits), ``digits`` (scikit-learn's 8x8 digits) and ``mnist`` (MNIST-1k as Omnigrok
uses it). They need ``model: mlp`` and have no group basis.

Adding a task is one entry of :data:`TASKS` here (and its line in docs/run_fields.md); a task
over a group bases.py does not know yet needs that group's basis there too. A new dataset that is
no binary operation comes as an entry with a new ``kind``, which ``data.make_dataset``
dispatches on.

torch is imported inside the label functions only: config imports this module.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import lru_cache, partial
from typing import Any, Callable

S5_ORDER = 120
_POLY = ("the label is a polynomial in the operands, not a group product: over the answer's "
         "group Z_p its characters exp(2 pi i k f(a, b) / p) are chirps in a, with flat Fourier "
         "spectra (Gauss sums), so no basis of the operands makes the solution sparse")
_MIXED = ("the label mixes two groups by the parity of b (a / b over Z_p^* for odd b, "
          "a - b over Z_p for even b): no single group's basis reads it")


@dataclass(frozen=True)
class Task:
    """One task: a binary operation on operand tokens, and the group its measures read."""

    name: str
    label: Callable[[Any, Any, int], Any]   # (a, b, p) operand tensors -> label tensor
    operands: str = "Z_p"            # "Z_p": the p residues; "S5": its 120 permutations
    excluded_b: tuple[int, ...] = ()  # values of b whose pairs are left out (div: 0)
    group: str | None = None         # what bases reads it in: "Z_p", "Z_p^*", "S5"; None: none
    sign: int = 0                    # Z_p, Z_p^*: the answer's group index is i + sign * j
    word: str = ""                   # S5: the label as a word in a and b ("a b a^-1")
    no_basis: str = ""               # group None: why no group's basis reads the label
    kind: str = "binary_op"          # how data.make_dataset builds its rows
    classes: int = 0                 # a dataset's fixed number of classes (0: the operands')
    pool: tuple[int, int] = (0, 0)   # an image dataset's (train, test) rows in its source
    inputs: int = 0                  # an image dataset's features (pixels)

    def n_classes(self, p: int) -> int:
        """Operand tokens, and classes: p residues, or the 120 permutations of S5 (a dataset
        that is no binary operation: its own classes)."""
        if self.classes:
            return self.classes
        return S5_ORDER if self.operands == "S5" else p

    def n_pairs(self, p: int) -> int:
        """Rows of the dataset: every (a, b), less the pairs of the excluded values of b."""
        n = self.n_classes(p)
        return n * (n - len(self.excluded_b))


# ---- label functions ------------------------------------------------------------------------
def _inverse_mod(b, p: int):
    """b^(p-2) = b^-1 mod p (Fermat) for each nonzero b."""
    import torch

    inv = torch.tensor([pow(int(x), p - 2, p) for x in range(p)])
    return inv[b]


def _mix1(a, b, p: int):
    """b odd (so nonzero): a / b; b even: a - b."""
    import torch

    return torch.where(b % 2 == 1, a * _inverse_mod(b, p), a - b) % p


def s5_elements() -> list[tuple[int, ...]]:
    """The 120 permutations of {0..4} in lexicographic order: token i is element i."""
    return list(itertools.permutations(range(5)))


def _then(*perms: tuple[int, ...]) -> tuple[int, ...]:
    """The permutation that applies ``perms`` in order (x then y maps i to y[x[i]])."""
    out = tuple(range(5))
    for q in perms:
        out = tuple(q[i] for i in out)
    return out


def _inverse(x: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(sorted(range(5), key=lambda i: x[i]))


@lru_cache(maxsize=None)
def _s5_word_table(word: str) -> tuple[tuple[int, ...], ...]:
    """The label of every (x, y) of S5 x S5 under ``word``, as element indices."""
    elems = s5_elements()
    index = {e: i for i, e in enumerate(elems)}
    letters = word.split()

    def label(x, y):
        perms = [{"a": x, "b": y}[w[0]] for w in letters]
        return _then(*(_inverse(q) if w.endswith("^-1") else q for q, w in zip(perms, letters)))
    return tuple(tuple(index[label(x, y)] for y in elems) for x in elems)


def s5_table(name: str):
    """(120, 120) labels of the S5 task ``name``: ``table[x, y]`` is its word at a = x, b = y."""
    import torch

    return torch.tensor(_s5_word_table(TASKS[name].word))


def _s5_label(name: str, a, b, p: int):
    return s5_table(name)[a, b]


def _modular(name: str, f: Callable, **group: Any) -> Task:
    """A task over Z_p whose label is ``f(a, b, p) mod p``."""
    return Task(name, lambda a, b, p: f(a, b, p) % p, **group)


def _s5(name: str, word: str) -> Task:
    return Task(name, partial(_s5_label, name), operands="S5", group="S5", word=word)


_NOT_BINARY = ("the rows are no pairs of a group's elements (a dataset, not a binary "
               "operation): no group basis reads them")


def _dataset(name: str, kind: str, classes: int, pool: tuple[int, int] = (0, 0),
             inputs: int = 0) -> Task:
    """A dataset that is no binary operation: rows and labels from ``grokhpc.datasets``."""
    return Task(name, label=None, operands=kind, no_basis=_NOT_BINARY, kind=kind,
                classes=classes, pool=pool, inputs=inputs)


TASKS: dict[str, Task] = {t.name: t for t in (
    _modular("sub", lambda a, b, p: a - b, group="Z_p", sign=-1),
    _modular("add", lambda a, b, p: a + b, group="Z_p", sign=1),
    _modular("mul", lambda a, b, p: a * b, group="Z_p^*", sign=1),
    _modular("div", lambda a, b, p: a * _inverse_mod(b, p), excluded_b=(0,), group="Z_p^*",
             sign=-1),
    _modular("quad1", lambda a, b, p: a ** 2 + b ** 2, no_basis=_POLY),
    _modular("quad2", lambda a, b, p: a ** 2 + b ** 2 + a * b, no_basis=_POLY),
    _modular("quad3", lambda a, b, p: a ** 2 + b ** 2 + a * b + a, no_basis=_POLY),
    _modular("cube1", lambda a, b, p: a ** 3 + a * b, no_basis=_POLY),
    _modular("cube2", lambda a, b, p: a ** 3 + a * b ** 2 + b, no_basis=_POLY),
    Task("mix1", _mix1, no_basis=_MIXED),
    _s5("s5", "a b"),
    _s5("s5conj", "a b a^-1"),
    _s5("s5aba", "a b a"),
    _dataset("sparse_parity", "sparse_parity", 2),
    _dataset("digits", "image", 10, (1297, 500), 64),     # 1,797 images: the last 500 test
    _dataset("mnist", "image", 10, (60000, 10000), 784),  # MNIST's own train and test sets
)}


def task(op: str) -> Task:
    """The task named ``op``; ValueError naming it when there is none."""
    if op not in TASKS:
        raise ValueError(f"unknown op {op!r} (known: {', '.join(TASKS)})")
    return TASKS[op]
