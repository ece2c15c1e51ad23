"""The basis a task's progress measures are read in: each task's group, and its Fourier basis.

The mechanistic measures of Nanda et al. (2023) read a model in the Fourier basis of Z_p because
the label of ``sub``/``add`` is a group product of the operands. Every task whose label is a
word in the operands of a finite group gets the same lens through that group's irreducible
representations (Chughtai, Chan & Nanda 2023: the network learns a few key irreps rho, and the
logit of c follows the character chi_rho(answer * c^-1)). Each task's group is declared with
the task in ``grokhpc.tasks`` (its sign, or its word over S5); here is what it means:

==============  ============  =========================================================
task            group         index of operand x; answer index of a pair (i, j)
==============  ============  =========================================================
sub, add        Z_p           x itself; i - j, i + j (mod p)
mul, div        Z_p^*         log_g x for the smallest primitive root g (an index over
                              Z_{p-1}); i + j, i - j (mod p - 1): mul is add, div is sub
s5              S5            x itself (the order of ``tasks.s5_elements``); i j
s5conj          S5            x itself; i j i^-1
s5aba           S5            x itself; i j i
==============  ============  =========================================================

Products are ``tasks.s5_table``'s "x then y". A task's **components** are an orthonormal basis
of the functions on its group, each row labelled by its **key**: over Z_n (:func:`fourier_basis`)
the constant (key 0), ``Sin k`` and ``Cos k`` (key k), and for even n a lone ``Cos n/2``; over
S5 the d^2 matrix coefficients ``sqrt(d/120) rho(g)[i, j]`` of each of the 7 real orthogonal
irreps (:func:`s5_irreps`, key = the irrep's index, 0 = trivial). Key 0 is never a key choice.

**Zero operands (mul, div).** 0 is not in Z_p^*: every group-basis measure of mul and div is
taken over the pairs with both operands nonzero ((p-1)^2 pairs; div has no b = 0 rows anyway,
so for div this drops a = 0), reading the logits of the p-1 nonzero classes. The pairs with a
zero operand (label 0 always) stay in the op-independent losses and accuracies only.
:meth:`TaskBasis.pairs` is the one place that says which grid rows are in.

**s5conj and s5aba.** Their answer is a group word, and for a fixed a the map b -> answer is a
bijection of S5, so every construction here stays orthonormal and well defined: the embedding's
energy per irrep, the answer directions rho(answer(a, b)) of the restricted/excluded loss, and
the logit patterns chi_rho(answer * c^-1). What they mean differs from s5: for s5 they are the
GCR algorithm's own quantities; for s5aba (rho(a) rho(b) rho(a)) and s5conj
(rho(a) rho(b) rho(a)^T) they say which irreps carry the answer, not that the network computes
it that way. For s5conj, chi_rho(a b a^-1) = chi_rho(b) for every a: the label's conjugacy
class, and so the whole sign-irrep component and the trace part of every irrep's component,
is a function of b alone; a large attribution to the sign irrep says nothing about a.

**No basis** (measures null): quad1-3, cube1-2 and mix1 (reasons in :data:`NO_BASIS`).

Stage: the measures' lens (numpy only); the tasks and their groups come from ``grokhpc.tasks``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple, Sequence

import numpy as np

from .tasks import TASKS, s5_elements, s5_table

MAX_KEYS = 8
# Each task's group, as grokhpc.tasks declares it.
CYCLIC_SIGN = {n: t.sign for n, t in TASKS.items() if t.group == "Z_p"}    # i + sign * j
LOG_SIGN = {n: t.sign for n, t in TASKS.items() if t.group == "Z_p^*"}     # over Z_{p-1}
S5_WORDS = {n: t.word for n, t in TASKS.items() if t.group == "S5"}
NO_BASIS = {n: t.no_basis for n, t in TASKS.items() if t.group is None}
S5_IRREP_NAMES = ("(5)", "(1^5)", "(4,1)", "(2,1^3)", "(3,2)", "(2^2,1)", "(3,1^2)")


# ---- Z_p^* through the discrete log ---------------------------------------------------------
def _prime_factors(n: int) -> list[int]:
    out, f = [], 2
    while f * f <= n:
        if n % f == 0:
            out.append(f)
            while n % f == 0:
                n //= f
        f += 1
    return out + ([n] if n > 1 else [])


def primitive_root(p: int) -> int:
    """The smallest generator g of Z_p^* (p an odd prime): g^((p-1)/q) != 1 for each prime
    q | p - 1."""
    if p < 3 or any(p % f == 0 for f in range(2, math.isqrt(p) + 1)):
        raise ValueError(f"primitive_root: p: expected an odd prime, got {p}")
    qs = _prime_factors(p - 1)
    return next(g for g in range(2, p) if all(pow(g, (p - 1) // q, p) != 1 for q in qs))


def discrete_log(p: int, g: int | None = None) -> np.ndarray:
    """(p,) int64: log_g x for x = 1..p-1 (in 0..p-2), -1 at x = 0 (not in Z_p^*)."""
    g = primitive_root(p) if g is None else g
    log = np.full(p, -1, dtype=np.int64)
    x = 1
    for k in range(p - 1):
        if log[x] >= 0:
            raise ValueError(f"discrete_log: g: {g} does not generate Z_{p}^*")
        log[x] = k
        x = x * g % p
    return log


# ---- Fourier basis of Z_n -------------------------------------------------------------------
def fourier_names(n: int) -> list[str]:
    names = ["Constant"]
    for k in range(1, (n - 1) // 2 + 1):
        names += [f"Sin {k}", f"Cos {k}"]
    return names + ([f"Cos {n // 2}"] if n % 2 == 0 else [])


def fourier_basis(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(B, keys): the orthonormal (n, n) Fourier basis of Z_n in the seed's row order (constant,
    then Sin k before Cos k for k = 1..(n-1)/2, and for even n a last ``Cos n/2``, whose sine
    vanishes), and the frequency of each row. For odd n, the seed's basis."""
    x = np.arange(n)
    rows, keys = [np.ones(n)], [0]
    for k in range(1, (n - 1) // 2 + 1):
        rows += [np.sin(2 * np.pi * k * x / n), np.cos(2 * np.pi * k * x / n)]
        keys += [k, k]
    if n % 2 == 0:
        rows.append(np.cos(np.pi * x))
        keys.append(n // 2)
    B = np.stack(rows)
    return B / np.linalg.norm(B, axis=1, keepdims=True), np.array(keys)


# ---- S5 and its irreps ----------------------------------------------------------------------
class Irrep(NamedTuple):
    name: str               # the partition of 5
    matrices: np.ndarray    # (120, d, d) real orthogonal, rho(x y) = rho(x) rho(y)


def _complement(A: np.ndarray) -> np.ndarray:
    """Orthonormal columns spanning the orthogonal complement of the columns of A (full column
    rank): Gram-Schmidt over the standard basis, so the columns are the same on every machine."""
    m = A.shape[0]
    Q, _ = np.linalg.qr(A)
    out = []
    for e in np.eye(m):
        v = e - Q @ (Q.T @ e)
        for u in out:
            v -= u * (u @ v)
        if np.linalg.norm(v) > 1e-6:
            out.append(v / np.linalg.norm(v))
    return np.stack(out, axis=1)


def _restrict(R: np.ndarray, A: np.ndarray) -> np.ndarray:
    """The representation R (g, m, m) on the complement of the invariant subspace col(A)."""
    Q = _complement(A)
    return np.einsum("mi,gmn,nj->gij", Q, R, Q)


def _wedge2(R: np.ndarray) -> np.ndarray:
    """The second exterior power: 2 x 2 minors over index pairs i < j (Cauchy-Binet makes it
    a representation; it is orthogonal when R is)."""
    I, J = np.triu_indices(R.shape[-1], 1)
    return (R[:, I[:, None], I[None, :]] * R[:, J[:, None], J[None, :]]
            - R[:, I[:, None], J[None, :]] * R[:, J[:, None], I[None, :]])


def _permutation_reps(elems: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(M on points, M2 on 2-subsets, incidence of points in 2-subsets). ``M(x)[i, j] = 1`` iff
    x maps i to j, so that M(x then y) = M(x) M(y)."""
    g = len(elems)
    M = np.zeros((g, 5, 5))
    M[np.arange(g)[:, None], np.arange(5)[None, :], elems] = 1.0
    subsets = [tuple(s) for s in zip(*np.triu_indices(5, 1))]
    where = {s: k for k, s in enumerate(subsets)}
    M2 = np.zeros((g, 10, 10))
    for x in range(g):
        for k, (i, j) in enumerate(subsets):
            M2[x, k, where[tuple(sorted((elems[x, i], elems[x, j])))]] = 1.0
    A = np.zeros((10, 5))
    for k, (i, j) in enumerate(subsets):
        A[k, [i, j]] = 1.0
    return M, M2, A


@lru_cache(maxsize=1)
def s5_irreps() -> tuple[Irrep, ...]:
    """The 7 irreps of S5 as real orthogonal matrices over ``tasks.s5_elements()``, in the order
    of :data:`S5_IRREP_NAMES` (dimensions 1, 1, 4, 4, 5, 5, 6): trivial; sign; standard (the
    permutation representation less the trivial); standard x sign; the action on 2-subsets less
    trivial and standard; that x sign; the exterior square of the standard."""
    elems = np.array(s5_elements())
    M, M2, A = _permutation_reps(elems)
    sign = np.round(np.linalg.det(M))[:, None, None]
    standard = _restrict(M, np.ones((5, 1)))
    s32 = _restrict(M2, A)
    mats = (np.ones((120, 1, 1)), sign, standard, standard * sign, s32, s32 * sign,
            _wedge2(standard))
    out = []
    for name, m in zip(S5_IRREP_NAMES, mats):
        m = np.ascontiguousarray(m)
        m.setflags(write=False)
        out.append(Irrep(name, m))
    return tuple(out)


@lru_cache(maxsize=1)
def s5_tables() -> tuple[np.ndarray, np.ndarray]:
    """(product table (120, 120) with ``table[x, y]`` = x then y, inverse of each element)."""
    table = s5_table("s5").numpy()
    inverse = np.argmax(table == 0, axis=1)          # element 0 is the identity
    for t in (table, inverse):
        t.setflags(write=False)
    return table, inverse


def s5_characters() -> np.ndarray:
    """(7, 120) the characters chi_rho(g) = tr rho(g), rows in :data:`S5_IRREP_NAMES` order."""
    return np.stack([np.trace(r.matrices, axis1=1, axis2=2) for r in s5_irreps()])


def s5_basis() -> tuple[np.ndarray, np.ndarray]:
    """(B, keys): the orthonormal (120, 120) basis of functions on S5, rows
    ``sqrt(d/120) rho(g)[i, j]`` grouped by irrep (Schur orthogonality), and each row's irrep."""
    rows, keys = [], []
    for k, r in enumerate(s5_irreps()):
        d = r.matrices.shape[1]
        rows.append(math.sqrt(d / 120) * r.matrices.reshape(120, d * d).T)
        keys += [k] * (d * d)
    return np.concatenate(rows), np.array(keys)


# ---- a task's basis -------------------------------------------------------------------------
class Pairs(NamedTuple):
    """The pairs of the p x p grid that the group-basis measures read, in grid order."""

    rows: np.ndarray     # grid row a * p + b (a-major, the measures' grid)
    i: np.ndarray        # group index of a
    j: np.ndarray        # group index of b
    answer: np.ndarray   # group index of the label


@dataclass(frozen=True)
class TaskBasis:
    """A task's group (module docstring); ``group`` None with the ``reason`` where it has none."""

    op: str
    p: int                      # operand tokens: RunConfig.n_classes (p, or 120 for S5)
    group: str | None           # "Z_p", "Z_p^*" (indexed over Z_{p-1}) or "S5"
    order: int                  # n, the group's order (0 without a group)
    generator: int | None = None
    reason: str | None = None

    @property
    def defined(self) -> bool:
        return self.group is not None

    def _need(self) -> None:
        if not self.defined:
            raise ValueError(f"op {self.op!r} has no group basis: {self.reason}")

    def index(self) -> np.ndarray:
        """(p,) the group index of each operand token, -1 for a token outside the group."""
        self._need()
        if self.group == "Z_p^*":
            return discrete_log(self.p, self.generator)
        return np.arange(self.p)

    def elements(self) -> np.ndarray:
        """(n,) the operand token at each group index (g^k for Z_p^*)."""
        self._need()
        if self.group == "Z_p^*":
            return np.array([pow(self.generator, k, self.p) for k in range(self.order)])
        return np.arange(self.order)

    def product(self, i, j) -> np.ndarray:
        """The group index of i j (indices, broadcast)."""
        self._need()
        if self.group == "S5":
            return s5_tables()[0][i, j]
        return (np.asarray(i) + np.asarray(j)) % self.order

    def inverse(self, i) -> np.ndarray:
        self._need()
        if self.group == "S5":
            return s5_tables()[1][i]
        return -np.asarray(i) % self.order

    def answer(self, i, j) -> np.ndarray:
        """The group index of the label of operands with group indices i, j."""
        self._need()
        if self.op in CYCLIC_SIGN or self.op in LOG_SIGN:
            sign = {**CYCLIC_SIGN, **LOG_SIGN}[self.op]
            return (np.asarray(i) + sign * np.asarray(j)) % self.order
        out = None
        for letter in S5_WORDS[self.op].split():   # the task's word, left to right
            x = i if letter[0] == "a" else j
            x = self.inverse(x) if letter.endswith("^-1") else x
            out = x if out is None else self.product(out, x)
        return out

    def pairs(self) -> Pairs:
        """The grid's pairs with both operands in the group (all of them but for mul and div,
        which lose the pairs with a zero operand: the one place that rule lives)."""
        index = self.index()
        a, b = np.divmod(np.arange(self.p * self.p), self.p)
        rows = np.nonzero((index[a] >= 0) & (index[b] >= 0))[0]
        i, j = index[a[rows]], index[b[rows]]
        return Pairs(rows, i, j, self.answer(i, j))

    def components(self) -> tuple[np.ndarray, np.ndarray]:
        """(B, keys): the orthonormal (n, n) basis of functions on the group (rows indexed by
        group index) and each row's key (frequency, or irrep index)."""
        self._need()
        return s5_basis() if self.group == "S5" else fourier_basis(self.order)

    def key_dims(self) -> np.ndarray:
        """Rows of :meth:`components` per key: 1 or 2 over Z_n, d^2 over S5."""
        return np.bincount(self.components()[1])

    def key_names(self) -> list[str]:
        self._need()
        return list(S5_IRREP_NAMES) if self.group == "S5" else [
            str(k) for k in range(self.order // 2 + 1)]

    def characters(self) -> np.ndarray:
        """(n_keys, n) a real character per key, chi(x) at group index x: cos(2 pi k x / n)
        over Z_n (the character of the real irrep of frequency k, up to a factor), tr rho(x)
        over S5."""
        self._need()
        if self.group == "S5":
            return s5_characters()
        k = np.arange(self.order // 2 + 1)
        return np.cos(2 * np.pi * np.outer(k, np.arange(self.order)) / self.order)


def task_basis(op: str, n_classes: int) -> TaskBasis:
    """The basis of task ``op`` with ``n_classes`` operands (``RunConfig.n_classes``)."""
    if op in CYCLIC_SIGN:
        return TaskBasis(op, n_classes, "Z_p", n_classes)
    if op in LOG_SIGN:
        return TaskBasis(op, n_classes, "Z_p^*", n_classes - 1, primitive_root(n_classes))
    if op in S5_WORDS:
        if n_classes != 120:
            raise ValueError(f"task_basis: n_classes: expected 120 for {op}, got {n_classes}")
        return TaskBasis(op, 120, "S5", 120)
    if op in NO_BASIS:
        return TaskBasis(op, n_classes, None, 0, reason=NO_BASIS[op])
    raise ValueError(f"task_basis: op: unknown task {op!r}")


# ---- measures read in a basis ---------------------------------------------------------------
def component_norms(basis: TaskBasis, X) -> np.ndarray:
    """(n,) ||b @ X|| for each basis row b, X (n, m) holding functions' values at the group's
    elements in index order (the norms the Gini measures read; over Z_p, with X = W_E[:p],
    the seed's "Norms of Embedding in Fourier Basis")."""
    return np.linalg.norm(basis.components()[0] @ np.asarray(X, np.float64), axis=1)


def component_energy(basis: TaskBasis, X) -> np.ndarray:
    """(n_keys,) the energy of each key in X (as :func:`component_norms`): the sum of the
    squared norms of the key's rows."""
    return np.bincount(basis.components()[1], weights=component_norms(basis, X) ** 2)


def embedding_energy(basis: TaskBasis, W_E) -> np.ndarray:
    """Energy per key of the embedding's rows for the group's elements (W_E (d_vocab, d))."""
    return component_energy(basis, np.asarray(W_E)[basis.elements()])


def unembedding_energy(basis: TaskBasis, W_logit) -> np.ndarray:
    """Energy per key of a map to the logits (W_logit (m, p), e.g. W_out @ W_U), over the
    columns of the group's elements."""
    return component_energy(basis, np.asarray(W_logit)[:, basis.elements()].T)


def choose_keys(energy, dims, max_keys: int = MAX_KEYS) -> list[int]:
    """The keys above the largest drop of the energies per basis row, energy / dims, sorted in
    decreasing order (at most ``max_keys``; key 0, the constant or trivial irrep, never): over
    Z_p the seed's key frequencies, those above the largest drop of its embedding's spectrum.
    Per row, so that an embedding of noise gives every irrep the same share whatever its
    dimension. Energies below 1e-12 of the largest count as that floor (numerically zero: an
    exactly sparse model keeps its whole support). Sorted ascending."""
    density = np.asarray(energy, np.float64)[1:] / np.asarray(dims, np.float64)[1:]
    order = np.argsort(-density, kind="stable")
    if len(density) <= 1:
        return [int(k) + 1 for k in order]
    top = density[order]
    m_max = min(max_keys, len(density) - 1)
    floor = max(1e-12 * float(top[0]), np.finfo(float).tiny)
    ratios = top[:m_max] / np.maximum(top[1:m_max + 1], floor)
    m = int(np.argmax(ratios)) + 1
    return sorted(int(k) + 1 for k in order[:m])


def embedding_keys(basis: TaskBasis, W_E, max_keys: int = MAX_KEYS) -> list[int]:
    """The key frequencies / irreps of an embedding (its sparse components)."""
    return choose_keys(embedding_energy(basis, W_E), basis.key_dims(), max_keys)


def answer_directions(basis: TaskBasis, keys: Sequence[int]) -> np.ndarray:
    """(len(pairs), m) orthonormal columns over :meth:`TaskBasis.pairs`: the key components
    as functions of the answer, b(answer(a, b)) / sqrt(n) for each row b of a key (cos and sin
    of w_k d over Z_n as in the seed's restricted loss; rho(answer)[i, j] over S5). Orthonormal
    because b -> answer(a, b) is a bijection of the group for each a. Columns by key, each
    key's rows last first: cos before sin, the seed's order, which its float32 sums follow."""
    B, row_keys = basis.components()
    rows = np.nonzero(np.isin(row_keys, list(keys)))[0]
    chosen = B[rows[np.lexsort((-rows, row_keys[rows]))]]
    return chosen[:, basis.pairs().answer].T / math.sqrt(basis.order)


def answer_sums(basis: TaskBasis, logits) -> tuple[np.ndarray, float]:
    """(G, ||L||^2) of the grid's logits (p * p, p) read on the pairs and classes in the group:
    G[d, c] the logits of class c summed over the pairs whose answer is d (float64)."""
    pairs = basis.pairs()
    L = np.asarray(logits, np.float64)[pairs.rows][:, basis.elements()]
    G = np.zeros((basis.order, basis.order))
    np.add.at(G, pairs.answer, L)
    return G, float((L * L).sum())


def attribution_from_sums(basis: TaskBasis, G, norm_sq: float) -> tuple[np.ndarray, float]:
    """:func:`logit_attribution` from the answer sums G and ||L||^2 of :func:`answer_sums`
    (which a caller may form on its own device)."""
    n = basis.order
    idx = np.arange(n)
    quotient = basis.product(idx[:, None], basis.inverse(idx)[None, :])    # d c^-1
    chi = basis.characters()
    coef = np.einsum("kdc,dc->k", chi[:, quotient], np.asarray(G, np.float64))
    coef /= n * np.linalg.norm(chi, axis=1)
    if not norm_sq > 0:      # logits that vanish (underflow): no direction to attribute
        return np.full_like(coef, np.nan), math.nan
    residual = math.sqrt(max(norm_sq - float((coef[1:] ** 2).sum()), 0.0) / norm_sq)
    return coef / math.sqrt(norm_sq), residual


def logit_attribution(basis: TaskBasis, logits) -> tuple[np.ndarray, float]:
    """(cos, residual) of the grid's logits (p * p, p), read on the pairs and classes in the
    group: ``cos[k] = <L, P_k> / (||L|| ||P_k||)`` with the pattern
    P_k[a, b, c] = chi_k(answer(a, b) c^-1) for every key k (cos(w_k (d - c)) over Z_n, as the
    seed's cos_sim), and the fraction of ||L|| left after removing every pattern but the
    trivial one (the P_k are mutually orthogonal by character orthogonality)."""
    return attribution_from_sums(basis, *answer_sums(basis, logits))


def logit_keys(basis: TaskBasis, logits, max_keys: int = MAX_KEYS) -> list[int]:
    """The keys whose character patterns carry the logits (squared cos of
    :func:`logit_attribution` under the rule of :func:`choose_keys`)."""
    cos, _ = logit_attribution(basis, logits)
    return choose_keys(cos ** 2, np.ones(len(cos)), max_keys)
