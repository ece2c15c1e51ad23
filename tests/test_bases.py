"""Task bases: each construction against an independent expectation (sympy's primitive roots,
the data module's labels, the textbook character table of S5 by cycle type, the seed's Fourier
formulation and the literal logit cube), and key choice on synthetic models built from chosen
characters."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sympy.ntheory import primitive_root as sympy_primitive_root

from grokhpc import bases
from grokhpc.data import apply_op
from grokhpc.tasks import s5_elements, s5_table

import seed_fourier

torch.set_num_threads(1)
PRIMES = (3, 5, 7, 11, 13, 23, 31, 41, 113)
S5_OPS = ("s5", "s5conj", "s5aba")
BASIS_OPS = ("sub", "add", "mul", "div") + S5_OPS
DIMS = (1, 1, 4, 4, 5, 5, 6)

# The character table of S5 (e.g. Fulton & Harris, section 3.1) by cycle type, rows in
# bases.S5_IRREP_NAMES order: (5), (1^5), (4,1), (2,1^3), (3,2), (2^2,1), (3,1^2).
CLASSES = ((1, 1, 1, 1, 1), (1, 1, 1, 2), (1, 2, 2), (1, 1, 3), (2, 3), (1, 4), (5,))
CHARACTER_TABLE = np.array([
    [1, 1, 1, 1, 1, 1, 1],
    [1, -1, 1, 1, -1, -1, 1],
    [4, 2, 0, 1, -1, 0, -1],
    [4, -2, 0, 1, 1, 0, -1],
    [5, 1, 1, -1, 1, -1, 0],
    [5, -1, 1, -1, -1, 1, 0],
    [6, 0, -2, 0, 0, 0, 1],
])


def cycle_type(perm) -> tuple[int, ...]:
    seen, lengths = set(), []
    for start in range(len(perm)):
        n, i = 0, start
        while i not in seen:
            seen.add(i)
            i, n = perm[i], n + 1
        if n:
            lengths.append(n)
    return tuple(sorted(lengths))


def textbook_characters() -> np.ndarray:
    """(7, 120) the characters of S5 over tasks.s5_elements() from the table above."""
    cls = [CLASSES.index(cycle_type(x)) for x in s5_elements()]
    return CHARACTER_TABLE[:, cls].astype(float)


def n_classes(op: str, p: int = 31) -> int:
    return 120 if op in S5_OPS else p


# ---- Z_p^* and the discrete log -------------------------------------------------------------
@pytest.mark.parametrize("p", PRIMES)
def test_primitive_root_is_sympys_smallest_and_generates(p):
    g = bases.primitive_root(p)
    assert g == sympy_primitive_root(p)
    assert sorted(pow(g, k, p) for k in range(p - 1)) == list(range(1, p))


@pytest.mark.parametrize("bad", [1, 2, 9, 91])
def test_primitive_root_refuses_non_odd_primes(bad):
    with pytest.raises(ValueError, match="p: expected an odd prime"):
        bases.primitive_root(bad)


@pytest.mark.parametrize("p", PRIMES)
def test_discrete_log_inverts_powers(p):
    g = bases.primitive_root(p)
    log = bases.discrete_log(p)
    assert log[0] == -1
    assert all(pow(g, int(log[x]), p) == x for x in range(1, p))
    assert sorted(log[1:]) == list(range(p - 1))


@pytest.mark.parametrize("p", (5, 23, 31, 113))
@pytest.mark.parametrize("op, group_op", [("mul", "add"), ("div", "sub")])
def test_log_relabelling_turns_mul_into_add_and_div_into_sub(p, op, group_op):
    """log(apply_op(mul)) = apply_op(add) over Z_{p-1}, on every pair of nonzero operands."""
    log = torch.as_tensor(bases.discrete_log(p))
    a = torch.arange(1, p).repeat_interleave(p - 1)
    b = torch.arange(1, p).repeat(p - 1)
    assert torch.equal(log[apply_op(op, a, b, p)], apply_op(group_op, log[a], log[b], p - 1))


# ---- Fourier basis of Z_n -------------------------------------------------------------------
@pytest.mark.parametrize("n", (2, 3, 4, 10, 22, 23, 30, 112, 113))
def test_fourier_basis_is_orthonormal_with_named_rows(n):
    B, keys = bases.fourier_basis(n)
    assert B.shape == (n, n) and np.allclose(B @ B.T, np.eye(n), atol=1e-12)
    names = bases.fourier_names(n)
    assert len(names) == n and names[0] == "Constant"
    assert [int(s.split()[-1]) if s != "Constant" else 0 for s in names] == list(keys)
    if n % 2 == 0:     # the Nyquist row is the alternating sign
        assert names[-1] == f"Cos {n // 2}"
        assert np.allclose(B[-1], (-1.0) ** np.arange(n) / math.sqrt(n))


@pytest.mark.parametrize("p", (3, 11, 31, 113))
def test_fourier_basis_of_odd_n_is_the_seeds(p):
    assert np.allclose(bases.fourier_basis(p)[0], seed_fourier.fourier_basis(p), atol=1e-12)
    assert bases.fourier_names(p) == seed_fourier.fourier_names(p)


@pytest.mark.parametrize("p", (11, 31))
def test_component_norms_over_z_p_are_the_seeds_fourier_norms(p):
    rng = np.random.default_rng(p)
    W_E, W_logit = rng.normal(size=(p + 1, 8)), rng.normal(size=(24, p))
    basis = bases.task_basis("sub", p)
    assert np.allclose(bases.component_norms(basis, W_E[:p]),
                       seed_fourier.embed_fourier_norms(W_E, p), atol=1e-12)
    assert np.allclose(bases.component_norms(basis, W_logit.T),
                       seed_fourier.logit_fourier_norms(W_logit, np.eye(p)), atol=1e-12)
    energy = bases.embedding_energy(basis, W_E)
    assert np.allclose(energy[1:], seed_fourier.frequency_energy(W_E, p), atol=1e-10)
    assert np.allclose(bases.unembedding_energy(basis, W_logit),
                       np.bincount(basis.components()[1],
                                   seed_fourier.logit_fourier_norms(W_logit, np.eye(p)) ** 2))


# ---- S5 -------------------------------------------------------------------------------------
def test_irreps_are_homomorphisms_for_every_pair():
    """rho(x then y) = rho(x) rho(y) for all 120^2 pairs, products from tasks.s5_table."""
    table = s5_table("s5").numpy()
    for r in bases.s5_irreps():
        m = r.matrices
        assert np.abs(m[table] - np.einsum("xij,yjk->xyik", m, m)).max() < 1e-12, r.name


def test_irreps_are_orthogonal_with_the_known_dimensions():
    irreps = bases.s5_irreps()
    assert tuple(r.matrices.shape[1] for r in irreps) == DIMS
    assert sum(d * d for d in DIMS) == 120
    for r in irreps:
        d = r.matrices.shape[1]
        assert r.matrices.shape == (120, d, d)
        eye = np.broadcast_to(np.eye(d), (120, d, d))
        assert np.allclose(np.einsum("gji,gjk->gik", r.matrices, r.matrices), eye, atol=1e-12)
        assert np.allclose(r.matrices[0], np.eye(d))          # element 0 is the identity


def test_characters_are_the_textbook_table():
    assert np.allclose(bases.s5_characters(), textbook_characters(), atol=1e-12)


def test_character_orthogonality_irreducible_and_inequivalent():
    """sum_g chi_i(g) chi_j(g) = 120 delta_ij: each irreducible (<chi, chi> = 1), no two
    equivalent (equivalent representations have equal characters, <chi_i, chi_j> = 1)."""
    chi = bases.s5_characters()
    assert np.allclose(chi @ chi.T, 120 * np.eye(7), atol=1e-9)
    assert len({tuple(np.round(c, 6)) for c in chi}) == 7


def test_s5_basis_is_orthonormal_and_grouped_by_irrep():
    B, keys = bases.s5_basis()
    assert np.allclose(B @ B.T, np.eye(120), atol=1e-12)
    assert list(np.bincount(keys)) == [d * d for d in DIMS]


# ---- task bases -----------------------------------------------------------------------------
@pytest.mark.parametrize("op", BASIS_OPS)
def test_answer_index_is_the_datasets_label(op):
    """The answer of each pair in the group, mapped back to a token, is data.apply_op's label."""
    p = n_classes(op)
    basis = bases.task_basis(op, p)
    pairs = basis.pairs()
    a, b = np.divmod(pairs.rows, p)
    elements = basis.elements()
    assert np.array_equal(elements[pairs.i], a) and np.array_equal(elements[pairs.j], b)
    labels = apply_op(op, torch.as_tensor(a), torch.as_tensor(b), p).numpy()
    assert np.array_equal(elements[pairs.answer], labels)


@pytest.mark.parametrize("op, n_pairs", [("sub", 31 * 31), ("add", 31 * 31), ("mul", 30 * 30),
                                         ("div", 30 * 30), ("s5", 120 * 120)])
def test_pairs_leave_out_exactly_the_zero_operands(op, n_pairs):
    p = n_classes(op)
    pairs = bases.task_basis(op, p).pairs()
    a, b = np.divmod(pairs.rows, p)
    assert len(pairs.rows) == n_pairs
    if op in ("mul", "div"):
        assert (a != 0).all() and (b != 0).all()


@pytest.mark.parametrize("op", BASIS_OPS)
def test_answer_directions_are_orthonormal(op):
    basis = bases.task_basis(op, n_classes(op))
    keys = [1, 2, 5] if basis.group == "S5" else [1, 3, 7]
    U = bases.answer_directions(basis, keys)
    dims = basis.key_dims()
    assert U.shape == (len(basis.pairs().rows), sum(dims[k] for k in keys))
    assert np.allclose(U.T @ U, np.eye(U.shape[1]), atol=1e-10)


@pytest.mark.parametrize("op", ["sub", "add"])
def test_answer_directions_span_the_seeds_restricted_directions(op):
    """Over Z_p the span is the seed's cos(w_k d), sin(w_k d) of get_restricted_loss."""
    p, keys = 23, [2, 5, 9]
    U = bases.answer_directions(bases.task_basis(op, p), keys)
    a, b = np.divmod(np.arange(p * p), p)
    d = (a + seed_fourier.answer_sign(op) * b) % p
    w = 2 * np.pi * np.array(keys) / p
    V = np.concatenate([np.cos(np.outer(d, w)), np.sin(np.outer(d, w))], axis=1)
    V /= np.linalg.norm(V, axis=0)
    assert np.allclose(U @ U.T, V @ V.T, atol=1e-10)


def test_logit_attribution_over_z_p_is_the_seeds_cos_sim_on_the_literal_cube():
    """cos_sim[k] = <L, C_k> / (||L|| ||C_k||), C_k[a, b, c] = cos(w_k (a - b - c)) built as
    the literal p^3 cube, and the residual after removing every C_k."""
    p = 13
    rng = np.random.default_rng(0)
    L = rng.normal(size=(p * p, p))
    cos, residual = bases.logit_attribution(bases.task_basis("sub", p), L)
    a, b = np.divmod(np.arange(p * p), p)
    cube, left = L.ravel(), L.ravel().copy()
    for k in range(1, p // 2 + 1):
        C = np.cos(2 * np.pi * k * np.subtract.outer(a - b, np.arange(p)) / p).ravel()
        want = cube @ C / (np.linalg.norm(cube) * np.linalg.norm(C))
        assert cos[k] == pytest.approx(want, abs=1e-12)
        left -= (cube @ C) / (C @ C) * C
    assert residual == pytest.approx(np.linalg.norm(left) / np.linalg.norm(cube), abs=1e-12)


@pytest.mark.parametrize("op", S5_OPS)
def test_logit_attribution_over_s5_on_the_literal_cube(op):
    """cos[k] = <L, P_k> / (||L|| ||P_k||) with P_k[a, b, c] = chi_k(label(a, b) c^-1) built as
    the literal 120^3 cube from tasks.s5_table and the textbook characters."""
    rng = np.random.default_rng(1)
    L = rng.normal(size=(120 * 120, 120))
    cos, residual = bases.logit_attribution(bases.task_basis(op, 120), L)
    table, label = s5_table("s5").numpy(), s5_table(op).numpy().ravel()
    inverse = np.argmax(table == 0, axis=1)
    quotient = table[label[:, None], inverse[None, :]]            # (pairs, c): label c^-1
    chi = textbook_characters()
    cube = L.ravel()
    expect = []
    for k in range(7):
        P = chi[k][quotient].ravel()
        expect.append(cube @ P / (np.linalg.norm(cube) * np.linalg.norm(P)))
    assert np.allclose(cos, expect, atol=1e-12)
    left = cube - sum(e * np.linalg.norm(cube) * chi[k][quotient].ravel()
                      / np.linalg.norm(chi[k][quotient]) for k, e in enumerate(expect) if k)
    assert residual == pytest.approx(np.linalg.norm(left) / np.linalg.norm(cube), abs=1e-10)


# ---- key choice on synthetic models ---------------------------------------------------------
@pytest.mark.parametrize("op, keys", [("mul", [4, 11]), ("div", [2, 7, 13]), ("mul", [15])])
def test_log_basis_recovers_planted_frequencies(op, keys):
    """mul/div over p = 31 (Z_30, so frequency 15 is the lone Nyquist cosine): logits
    sum_k cos(w_k (log a +- log b - log c)) and an embedding of cos/sin(w_k log x) give back
    the keys; the zero operand's rows and column hold large noise the basis must ignore."""
    p, n = 31, 30
    log = bases.discrete_log(p)
    sign = 1 if op == "mul" else -1
    rng = np.random.default_rng(2)
    a, b = np.divmod(np.arange(p * p), p)
    d = log[a] + sign * log[b]
    w = 2 * np.pi * np.array(keys) / n
    L = np.cos(np.subtract.outer(d, log)[..., None] * w).sum(-1)
    zero = (a == 0) | (b == 0)
    L[zero] = 50 * rng.normal(size=(zero.sum(), p))
    L[:, 0] = 50 * rng.normal(size=p * p)
    basis = bases.task_basis(op, p)
    assert bases.logit_keys(basis, L) == sorted(keys)
    W_E = np.concatenate([np.cos(np.outer(log, w)), np.sin(np.outer(log, w))], axis=1)
    W_E = np.concatenate([W_E, 0.01 * rng.normal(size=(p, 3))], axis=1)
    W_E = np.concatenate([W_E, 50 * rng.normal(size=(1, W_E.shape[1]))])   # the '=' token
    W_E[0] = 50 * rng.normal(size=W_E.shape[1])                             # x = 0
    assert bases.embedding_keys(basis, W_E) == sorted(keys)


@pytest.mark.parametrize("op, keys", [("s5", [2]), ("s5", [3, 6]), ("s5conj", [4]),
                                      ("s5aba", [1, 5, 6])])
def test_s5_basis_recovers_planted_irreps(op, keys):
    """Logits sum_rho chi_rho(label(a, b) c^-1) and an embedding of translates
    x -> chi_rho(x z) (functions in rho's matrix coefficients), both from the textbook
    characters, give back the irreps."""
    rng = np.random.default_rng(3)
    chi = textbook_characters()
    table, label = s5_table("s5").numpy(), s5_table(op).numpy().ravel()
    inverse = np.argmax(table == 0, axis=1)
    quotient = table[label[:, None], inverse[None, :]]
    L = sum(chi[k][quotient] for k in keys) + 0.01 * rng.normal(size=(14400, 120))
    basis = bases.task_basis(op, 120)
    assert bases.logit_keys(basis, L) == sorted(keys)
    z = rng.integers(120, size=12)
    W_E = np.concatenate([chi[k][table[:, z]] for k in keys], axis=1)
    W_E = np.concatenate([W_E, 50 * rng.normal(size=(1, W_E.shape[1]))])   # the '=' token
    assert bases.embedding_keys(basis, W_E) == sorted(keys)


@pytest.mark.parametrize("seed", range(6))
def test_choose_keys_over_odd_p_is_the_seeds_rule(seed):
    rng = np.random.default_rng(seed)
    p = 31
    W_E = rng.normal(size=(p + 1, 16))
    F = seed_fourier.fourier_basis(p)
    planted = rng.choice(np.arange(1, p // 2 + 1), size=seed % 4 + 1, replace=False)
    for k in planted:   # boost the planted frequencies by different amounts
        W_E[:p] += rng.uniform(2, 6) * np.outer(F[2 * k], rng.normal(size=16))
    assert bases.embedding_keys(bases.task_basis("sub", p), W_E) == \
        seed_fourier.choose_key_freqs(W_E, p)


# ---- tasks without a basis ------------------------------------------------------------------
@pytest.mark.parametrize("op", ["quad1", "quad2", "quad3", "cube1", "cube2", "mix1"])
def test_tasks_without_a_group_say_why(op):
    basis = bases.task_basis(op, 31)
    assert not basis.defined and basis.reason
    with pytest.raises(ValueError, match=f"op '{op}' has no group basis: "):
        basis.pairs()


def test_task_basis_refuses_bad_input():
    with pytest.raises(ValueError, match="op: unknown task 'pow'"):
        bases.task_basis("pow", 31)
    with pytest.raises(ValueError, match="n_classes: expected 120 for s5, got 31"):
        bases.task_basis("s5", 31)


def test_logits_that_vanish_have_no_attribution_rather_than_an_error():
    """A model whose logits underflow to zero (its squared norm is 0.0) reads NaN, as 0 / 0
    does, instead of stopping the measures of the whole run."""
    basis = bases.task_basis("sub", 7)
    cos, residual = bases.logit_attribution(basis, np.zeros((49, 7)))
    assert np.isnan(cos).all() and math.isnan(residual)
    G, _ = bases.answer_sums(basis, np.full((49, 7), 1e-30))
    cos, residual = bases.attribution_from_sums(basis, G, 0.0)   # float32 squares underflowed
    assert np.isnan(cos).all() and math.isnan(residual)
