"""The progress measures read in a task's own basis: the group part of ``grokhpc.measures``.

Nanda et al.'s mechanistic measures (Gini of the Fourier norms, key frequencies, restricted
and excluded loss, cosine similarity with the answer's logit patterns) read sub/add in the
Fourier basis of Z_p. Here they are read in the basis ``grokhpc.bases`` gives each task:

* sub, add: Z_p itself, the seed's measures unchanged (key frequencies 1..(p-1)/2);
* mul, div: Z_p^* indexed by the discrete log of its smallest generator g, over which mul is
  add and div is sub mod p - 1 (key frequencies 1..(p-1)/2 of Z_{p-1}); the pairs with a zero
  operand are not in the group and are left out of these measures (``TaskBasis.pairs``);
* s5: the 7 irreps of S5 (key irreps 1..6, 0 the trivial one): the GCR algorithm of Chughtai,
  Chan & Nanda (2023).

Every other task has no lens (:func:`no_lens_reason` says why): s5conj and s5aba are words in
S5 but not its product, so a key irrep would say which irreps carry the answer, not the
network's circuit; the polynomial tasks and mix1 have no group basis at all.

The measures, for a lens with key elements K (chosen on the final checkpoint's embedding by
``bases.embedding_keys`` unless given):

* gini_embed / gini_logit: Gini of the component norms of the embedding rows of the group's
  elements, and of ``W_out @ W_U``'s columns of the group's elements;
* restricted_loss: the last block's MLP activations over the group's pairs projected onto the
  answer directions of K (``bases.answer_directions``), through ``W_out @ W_U``, the mean
  logit re-centred to the model's; cross-entropy over all classes on the test pairs in the
  group. excluded_loss: those components removed instead; on the train pairs in the group.
  With LayerNorm both go through ``ln_final`` as in ``grokhpc.measures``;
* cos_sim[k - 1]: the logits' cosine with the pattern chi_k(answer c^-1) for key k >= 1 over
  the pairs and classes in the group (``bases.logit_attribution``); cos_residual: the fraction
  of the logits' norm left after every non-trivial pattern is removed.

Stage: the per-checkpoint measures (torch, imported inside the methods); the basis math is
``grokhpc.bases``'s alone.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import numpy as np

from . import bases
from .bases import TaskBasis
from .runtime import torch_threads

GROUP_COLUMNS = ("gini_embed", "gini_logit", "restricted_loss", "excluded_loss",
                 "cos_residual", "cos_sim")
_NOT_THE_PRODUCT = ("the label is the word {word!r} of S5, not its product: an irrep carrying "
                    "it says which irreps the answer lives in, not the network's circuit")


def gini(x) -> float:
    """Gini coefficient of non-negative values: sum_i (2i - n - 1) x_(i) / (n sum x), i = 1..n
    over the sorted values."""
    x = np.sort(np.abs(np.asarray(x, dtype=np.float64)).ravel())
    n = x.size
    total = x.sum()
    if n == 0 or total == 0:
        return 0.0
    i = np.arange(1, n + 1)
    return float(((2 * i - n - 1) * x).sum() / (n * total))


def no_lens_reason(basis: TaskBasis) -> str | None:
    """Why the task of ``basis`` has no group measures, or None when it has them."""
    if not basis.defined:
        return basis.reason
    if basis.group == "S5" and bases.S5_WORDS[basis.op] != "a b":
        return _NOT_THE_PRODUCT.format(word=bases.S5_WORDS[basis.op])
    return None


_NOT_TRANSFORMER = ("the group measures read a transformer's embedding and its last block's "
                    "MLP; model {model} has neither")


def run_no_lens_reason(cfg) -> str | None:
    """Why a run has no group measures (its model family, or its task), or None."""
    if cfg.model != "transformer":
        return _NOT_TRANSFORMER.format(model=cfg.model)
    return no_lens_reason(bases.task_basis(cfg.op, cfg.n_classes))


def lens_of(op: str, n_classes: int, model: str = "transformer") -> TaskBasis | None:
    """The basis the group measures of ``op`` read (in a ``model`` run), or None where it has
    none."""
    if model != "transformer":
        return None
    basis = bases.task_basis(op, n_classes)
    return None if no_lens_reason(basis) else basis


def key_names(basis: TaskBasis, keys: Sequence[int]) -> list[str]:
    """Each key's name: the frequency ("5") over Z_n, the irrep's partition over S5."""
    names = basis.key_names()
    return [names[k] for k in keys]


def basis_summary(op: str, n_classes: int, keys: Sequence[int] | None,
                  model: str = "transformer") -> dict[str, Any]:
    """summary.json's basis fields: ``basis`` (the group, or None), ``generator`` (g of
    Z_p^*), ``key_elements`` and ``key_names``, and ``key_freqs`` (the key elements of a
    cyclic basis, the frequencies over Z_p or over log_g's Z_{p-1}; None over S5)."""
    basis = lens_of(op, n_classes, model)
    if basis is None or keys is None:
        return {"basis": basis and basis.group, "generator": basis and basis.generator,
                "key_freqs": None, "key_elements": None, "key_names": None}
    keys = [int(k) for k in keys]
    return {"basis": basis.group, "generator": basis.generator,
            "key_freqs": None if basis.group == "S5" else keys, "key_elements": keys,
            "key_names": key_names(basis, keys)}


def parse_keys(text: str, basis: TaskBasis, flag: str = "--key-freqs") -> list[int]:
    """``"1,5,34"`` -> [1, 5, 34]: key frequencies in 1..n/2, or irreps in 1..6 (by index or
    partition name) over S5; ValueError naming ``flag`` and the bad item."""
    names = basis.key_names()
    out: list[int] = []
    for item in (s.strip() for s in re.findall(r"\([^)]*\)|[^,]+", text)):
        if not item:
            continue
        if item in names[1:]:
            k = names.index(item)
        else:
            try:
                k = int(item)
            except ValueError:
                raise ValueError(f"{flag}: expected comma-separated integers, got "
                                 f"{item!r}") from None
        if not 1 <= k < len(names):
            raise ValueError(f"{flag}: expected keys in 1..{len(names) - 1}, got {k}")
        if k not in out:
            out.append(k)
    if not out:
        raise ValueError(f"{flag}: expected at least one key, got nothing")
    return sorted(out)


class GroupLens:
    """The group measures of one run's checkpoints in its task's basis (module docstring):
    the pairs of the group, the answer directions of the key elements, on one device."""

    def __init__(self, basis: TaskBasis, keys: Sequence[int] | None, rows, labels, train_idx,
                 test_idx, device):
        import torch

        self.basis, self.device = basis, device
        pairs = basis.pairs()
        p = basis.p
        self.all_pairs = len(pairs.rows) == p * p
        self.pair_rows = torch.as_tensor(pairs.rows, device=device)
        self.answer = torch.as_tensor(pairs.answer, device=device)
        self.elements = torch.as_tensor(basis.elements(), device=device)
        pos = torch.full((p * p,), -1, dtype=torch.long, device=device)
        pos[self.pair_rows] = torch.arange(len(pairs.rows), device=device)
        self.keys = sorted(int(k) for k in keys) if keys else None
        if self.keys is None:
            return
        U = torch.as_tensor(bases.answer_directions(basis, self.keys), device=device)
        U = (U / U.norm(dim=0, keepdim=True)).float()                 # (n_pairs, m)
        self.U, self.U_mean = U, U.mean(0)
        for split, idx in (("train", train_idx), ("test", test_idx)):
            at = pos[rows[idx]]
            inside = at >= 0
            setattr(self, f"{split}_rows", rows[idx][inside])          # grid row
            setattr(self, f"{split}_labels", labels[idx][inside])
            setattr(self, f"U_{split}", U[at[inside]])                  # its answer directions
        at = pos[rows[test_idx]]
        self.restricted = self._distinct(self.answer[at[at >= 0]])

    def _distinct(self, answer):
        """(answer directions, labels, weights) of the distinct (answer, label) pairs among the
        test pairs, each weighted by its share of them: a test pair's restricted logits depend
        on its answer alone, so the restricted loss is a weighted mean over at most p rows."""
        import torch

        if not len(answer):
            return self.U_test, self.test_labels, torch.zeros(0, dtype=torch.float64)
        key = answer * (int(self.test_labels.max()) + 1) + self.test_labels
        uniq, inverse, counts = torch.unique(key, return_inverse=True, return_counts=True)
        first = torch.full((len(uniq),), len(key), dtype=torch.long, device=self.device)
        first.scatter_reduce_(0, inverse, torch.arange(len(key), device=self.device), "amin")
        return self.U_test[first], self.test_labels[first], counts.double() / len(key)

    def on_pairs(self, x):
        """The rows of a grid tensor (p * p, ...) for the group's pairs."""
        return x if self.all_pairs else x[self.pair_rows]

    def weight_measures(self, W_E, W_logit) -> dict[str, float]:
        """Gini of the embedding's and of W_logit's component norms."""
        el = self.basis.elements()
        W_logit = np.asarray(W_logit, np.float64)
        return {"gini_embed": gini(bases.component_norms(self.basis, np.asarray(W_E)[el])),
                "gini_logit": gini(bases.component_norms(self.basis, W_logit[:, el].T))}

    def attribution(self, logits) -> dict[str, Any]:
        """cos_sim (keys 1..) and cos_residual of the grid's logits; the answer sums are formed
        on the device, the characters read by ``bases``."""
        import torch

        L = self.on_pairs(logits)
        if len(self.elements) != L.shape[1]:
            L = L[:, self.elements]
        G = torch.zeros(self.basis.order, self.basis.order, dtype=L.dtype, device=self.device)
        with torch_threads(1):   # torch's CPU index_add_ stalls with more threads on a busy machine
            G.index_add_(0, self.answer, L)
        norm_sq = float((L * L).sum().double())
        cos, residual = bases.attribution_from_sums(self.basis, G.double().cpu().numpy(),
                                                    norm_sq)
        return {"cos_sim": cos[1:].tolist(), "cos_residual": residual}

    def losses(self, post, logits, W_logit, const) -> dict[str, float]:
        """Restricted and excluded loss of a model without LayerNorm, on the logits."""
        from .lastpos import eval_row_losses

        CW = (self.U.T @ self.on_pairs(post)) @ W_logit              # (m, n_classes)
        shift = self.on_pairs(logits).mean(0) - self.U_mean @ CW      # re-centre the mean logit
        excluded = logits[self.train_rows] - self.U_train @ CW - const
        U_r, labels_r, weight_r = self.restricted
        restricted = eval_row_losses(U_r @ CW + shift, labels_r) @ weight_r if len(weight_r) \
            else float("nan")     # no test pair in the group: the mean of none
        return {"restricted_loss": float(restricted),
                "excluded_loss": float(eval_row_losses(excluded, self.train_labels).mean())}

    def losses_ln(self, post, resid_mid, model, last: str) -> dict[str, float]:
        """Restricted and excluded loss with LayerNorm, read through the loaded model's own
        ``ln_final`` and ``W_U`` (``grokhpc.measures`` module docstring)."""
        from .lastpos import cross_entropy

        mlp = model.get_submodule(f"{last}.mlp")
        post_g, resid_g = self.on_pairs(post), self.on_pairs(resid_mid)
        CW = (self.U.T @ post_g) @ mlp.W_out                           # (m, d)
        resid_post_mean = resid_g.mean(0) + post_g.mean(0) @ mlp.W_out + mlp.b_out
        restricted = self.U_test @ CW + (resid_post_mean - self.U_mean @ CW)
        rows = self.train_rows
        excluded = resid_mid[rows] + post[rows] @ mlp.W_out - self.U_train @ CW
        return {"restricted_loss": float(cross_entropy(model.unembed(model.ln_final(restricted)),
                                                       self.test_labels)),
                "excluded_loss": float(cross_entropy(model.ln_final(excluded) @ model.unembed.W_U,
                                                     self.train_labels))}

    def measure(self, W: Mapping[str, Any], grid, last: str, model=None) -> dict[str, Any]:
        """Every group measure of one state: ``grid`` is the evaluator's (post, logits,
        W_logit, const[, resid_mid]); ``model`` the loaded hooked model with LayerNorm."""
        post, logits, W_logit, const, *resid_mid = grid
        out: dict[str, Any] = self.weight_measures(
            W["embed.W_E"], np.asarray(W[f"{last}.mlp.W_out"], np.float64)
            @ np.asarray(W["unembed.W_U"], np.float64))
        out.update(self.attribution(logits))
        if self.keys is None:
            out["restricted_loss"] = out["excluded_loss"] = None
        elif model is not None:
            out.update(self.losses_ln(post, resid_mid[0], model, last))
        else:
            out.update(self.losses(post, logits, W_logit, const))
        return out


def choose_keys(basis: TaskBasis, W_E) -> list[int]:
    """The key elements of a final embedding (``bases.embedding_keys``)."""
    return bases.embedding_keys(basis, W_E)
