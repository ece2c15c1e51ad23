"""Datasets: the seed's token format, labels and exact split."""

import pytest
import torch

from grokhpc import config
from grokhpc.config import GROUP_OPS, OPS, RunConfig
from grokhpc.data import all_pairs, make_dataset, split_indices
from grokhpc.tasks import TASKS, s5_elements


def test_seed_split_first_rows_match_the_notebook():
    d = make_dataset(RunConfig())
    # printed by the seed notebook
    assert d.train_tokens[:5].tolist() == [[21, 31, 113], [30, 98, 113], [47, 10, 113],
                                           [86, 21, 113], [99, 83, 113]]
    assert d.train_labels[:5].tolist() == [103, 45, 37, 65, 16]
    assert d.test_tokens[:5].tolist() == [[43, 40, 113], [31, 42, 113], [39, 63, 113],
                                          [35, 61, 113], [112, 102, 113]]
    assert d.test_labels[:5].tolist() == [3, 102, 89, 87, 10]
    assert (len(d.train_idx), len(d.test_idx)) == (3830, 8939)


def test_grid_order_and_labels_as_the_seed():
    tokens, labels = all_pairs(113, "sub")
    assert tokens[:5].tolist() == [[0, 0, 113], [0, 1, 113], [0, 2, 113], [0, 3, 113], [0, 4, 113]]
    assert labels[:5].tolist() == [0, 112, 111, 110, 109]
    assert labels[-5:].tolist() == [4, 3, 2, 1, 0]


@pytest.mark.parametrize("op", ["sub", "add", "mul", "div"])
def test_labels_match_python_arithmetic(op):
    p = 11
    tokens, labels = all_pairs(p, op)
    for (a, b, eq), y in zip(tokens.tolist(), labels.tolist()):
        assert eq == p
        if op == "sub":
            want = (a - b) % p
        elif op == "add":
            want = (a + b) % p
        elif op == "mul":
            want = (a * b) % p
        else:
            want = next(c for c in range(p) if (c * b) % p == a)
        assert y == want
    assert len(tokens) == (p * (p - 1) if op == "div" else p * p)


def test_split_is_a_partition_and_deterministic():
    tr, te = split_indices(121, 0.5, 7)
    assert sorted(torch.cat([tr, te]).tolist()) == list(range(121))
    assert len(tr) == 60
    tr2, _ = split_indices(121, 0.5, 7)
    assert torch.equal(tr, tr2)
    tr3, _ = split_indices(121, 0.5, 8)
    assert not torch.equal(tr, tr3)


@pytest.mark.parametrize("op,formula", [
    ("quad1", lambda x, y, p: (x * x + y * y) % p),
    ("quad2", lambda x, y, p: (x * x + y * y + x * y) % p),
    ("quad3", lambda x, y, p: (x * x + y * y + x * y + x) % p),
    ("cube1", lambda x, y, p: (x ** 3 + x * y) % p),
    ("cube2", lambda x, y, p: (x ** 3 + x * y * y + y) % p),
    # y odd: the x with x = label * y (mod p); y even: x - y
    ("mix1", lambda x, y, p: next(c for c in range(p) if (c * y) % p == x) if y % 2
     else (x - y) % p),
])
def test_polynomial_and_mixed_tasks_match_their_formulas(op, formula):
    p = 13
    tokens, labels = all_pairs(p, op)
    assert tokens.shape == (p * p, 3) and bool((tokens[:, 2] == p).all())
    for (a, b, _), c in zip(tokens.tolist(), labels.tolist()):
        assert c == formula(a, b, p), (op, a, b)


def test_s5_tasks_are_the_group_laws_of_s5():
    import itertools

    elems = list(itertools.permutations(range(5)))
    assert s5_elements() == elems and len(elems) == 120
    tokens, labels = all_pairs(120, "s5")
    assert tokens.shape == (120 * 120, 3) and bool((tokens[:, 2] == 120).all())
    table = labels.view(120, 120)
    # x then y: i -> y[x[i]], checked on a few pairs by hand-composed permutations
    x, y = elems[7], elems[99]
    assert elems[table[7, 99]] == tuple(y[x[i]] for i in range(5))
    # a group: every row and column of the table is a permutation of the 120 elements
    assert all(sorted(r.tolist()) == list(range(120)) for r in table)
    assert all(sorted(c.tolist()) == list(range(120)) for c in table.T)
    # non-abelian, with the identity (element 0) neutral on both sides
    assert not torch.equal(table, table.T)
    assert torch.equal(table[0], torch.arange(120)) and torch.equal(table[:, 0], torch.arange(120))
    conj = all_pairs(120, "s5conj")[1].view(120, 120)
    aba = all_pairs(120, "s5aba")[1].view(120, 120)
    inv = [elems.index(tuple(sorted(range(5), key=lambda i: e[i]))) for e in elems]
    for a, b in [(3, 50), (119, 1), (64, 64)]:
        assert conj[a, b] == table[table[a, b], inv[a]]   # x then y then x^-1
        assert aba[a, b] == table[table[a, b], a]         # x then y then x
    # conjugation by x fixes the identity and preserves cycle type (order) of y
    assert bool((conj[:, 0] == 0).all())


def test_label_noise_replaces_the_asked_fraction_of_train_labels_only():
    clean = make_dataset(RunConfig(p=31, train_frac=0.5))
    noisy = make_dataset(RunConfig(p=31, train_frac=0.5, label_noise=0.2))
    assert torch.equal(clean.train_idx, noisy.train_idx)          # same split
    assert torch.equal(clean.test_labels, noisy.test_labels)      # test labels untouched
    changed = (clean.train_labels != noisy.train_labels).sum().item()
    k = round(0.2 * len(clean.train_idx))
    # k labels redrawn uniformly over 31 classes: about k * 30/31 of them differ
    assert 0.8 * k <= changed <= k
    again = make_dataset(RunConfig(p=31, train_frac=0.5, label_noise=0.2))
    assert torch.equal(again.train_labels, noisy.train_labels)     # seeded


@pytest.mark.parametrize("op", [op for op in OPS if op not in config.DATA_OPS])
def test_each_task_counts_the_rows_data_builds_and_labels_within_its_classes(op):
    """config's n_classes and n_pairs (from grokhpc.tasks) are the rows data builds: every
    (a, b) of 7 residues (div: b = 0 left out) or of the 120 permutations of S5."""
    cfg = RunConfig(op=op) if op in GROUP_OPS else RunConfig(op=op, p=7)
    want_classes = 120 if op in ("s5", "s5conj", "s5aba") else 7
    want_pairs = {"div": 7 * 6}.get(op, want_classes ** 2)
    tokens, labels = all_pairs(cfg.n_classes, op)
    assert (cfg.n_classes, cfg.n_pairs, len(tokens), len(labels)) == \
        (want_classes, want_pairs, want_pairs, want_pairs)
    assert 0 <= int(labels.min()) and int(labels.max()) < want_classes
    assert config.OPS == tuple(TASKS)
    assert set(config.DATA_OPS) == {"sparse_parity", "digits", "mnist"}   # tests/test_mlp.py


def test_an_unknown_op_is_one_line_naming_it():
    with pytest.raises(ValueError, match=r"^unknown op 'nope' \(known: sub, add, "):
        all_pairs(7, "nope")
