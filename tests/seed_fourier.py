"""The seed notebook's Fourier formulation over Z_p, written out once for the tests: the
independent expectation that grokhpc.bases and grokhpc.task_measures are held to (basis rows,
norms, frequency energies, the key-frequency rule, the answer direction of sub/add)."""

from __future__ import annotations

import numpy as np

MAX_KEY_FREQS = 8


def fourier_names(p: int) -> list[str]:
    names = ["Constant"]
    for k in range(1, p // 2 + 1):
        names += [f"Sin {k}", f"Cos {k}"]
    return names


def fourier_basis(p: int) -> np.ndarray:
    """(p, p): the constant, then Sin k before Cos k for k = 1..(p-1)/2, rows of unit norm."""
    x = np.arange(p)
    rows = [np.ones(p)]
    for k in range(1, p // 2 + 1):
        rows += [np.sin(2 * np.pi * k * x / p), np.cos(2 * np.pi * k * x / p)]
    basis = np.stack(rows)
    return basis / np.linalg.norm(basis, axis=1, keepdims=True)


def embed_fourier_norms(W_E, p: int) -> np.ndarray:
    return np.linalg.norm(fourier_basis(p) @ np.asarray(W_E, np.float64)[:p], axis=1)


def logit_fourier_norms(W_out, W_U) -> np.ndarray:
    W_logit = np.asarray(W_out, np.float64) @ np.asarray(W_U, np.float64)
    return np.linalg.norm(W_logit @ fourier_basis(W_logit.shape[1]).T, axis=0)


def frequency_energy(W_E, p: int) -> np.ndarray:
    sq = embed_fourier_norms(W_E, p) ** 2
    return sq[1::2] + sq[2::2]


def choose_key_freqs(W_E, p: int, max_freqs: int = MAX_KEY_FREQS) -> list[int]:
    """The frequencies above the largest drop of the sorted energies."""
    e = frequency_energy(W_E, p)
    order = np.argsort(-e, kind="stable")
    top = e[order]
    m_max = min(max_freqs, len(e) - 1)
    ratios = top[:m_max] / np.maximum(top[1:m_max + 1], np.finfo(float).tiny)
    m = int(np.argmax(ratios)) + 1
    return sorted(int(k) + 1 for k in order[:m])


def answer_sign(op: str) -> int:
    return {"sub": -1, "add": 1}[op]
