"""Datasets: the seed's token format, labels and exact split."""

import pytest
import torch

from grokhpc.config import RunConfig
from grokhpc.data import all_pairs, make_dataset, split_indices


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
