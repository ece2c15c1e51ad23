"""Progress measures per checkpoint of one run (Nanda et al. 2023).

``python -m grokhpc.measures RUN_DIR [--key-freqs 1,5,34]`` recomputes ``measures.parquet`` and
``summary.json`` of a trained run (e.g. with hand-picked key frequencies).

Stage: right after training (``grokhpc.train`` calls :func:`finalize_run` after the last epoch):
every checkpoint row of checkpoints.npy is measured into measures.parquet, then
``grokhpc.phases`` reads the run's phases off its curves and writes summary.json.

Definitions
-----------
Throughout, p is the run's number of classes (``RunConfig.n_classes``: the prime for the tasks
over Z_p, 120 for the S5 tasks). "The MLP" is the MLP of the last block: its neuron activations
at the last position (``blocks.{n_layers-1}.mlp.hook_post``) and its neuron-to-logit map
``W_logit = W_out @ W_U`` with that block's ``W_out`` (the only MLP for the seed's one block).

* **Fourier basis** of Z_p (:func:`fourier_basis`): row 0 the constant, then for k = 1..(p-1)/2
  ``Sin k`` before ``Cos k`` (the seed's order), each row of unit norm; an orthonormal p x p
  matrix.
* **Gini** (:func:`gini`): the Gini coefficient of the p Fourier-component norms of the
  embedding, ``|| F @ W_E[:p] ||`` per row, and of the neuron-to-logit map,
  ``|| (W_out @ W_U) @ F.T ||`` per column (the seed's "Norms of Embedding in Fourier Basis" and
  "W_logit in the Fourier Basis" plots). 0 = all components equal, -> 1 = one component.
* **Key frequencies** (:func:`choose_key_freqs`), chosen at the final checkpoint and held fixed
  for every checkpoint of the run. Rule: the energy of frequency k in the embedding is
  ``e_k = ||Sin_k @ W_E[:p]||^2 + ||Cos_k @ W_E[:p]||^2``. Sort the e_k in decreasing order and
  cut after the m-th, where m (1 <= m <= 8) maximises the ratio e_(m) / e_(m+1): the key
  frequencies are the ones standing above the largest drop in the embedding's Fourier spectrum
  (a trained model's embedding is sparse in the Fourier basis; the seed reads {1, 5, 34} off the
  same spectrum).
* **Restricted loss** (the seed's ``get_restricted_loss``): the last-position neuron activations
  on the full p x p grid, projected onto the unit vectors ``cos(w_k d)``, ``sin(w_k d)`` over the
  grid for each key frequency k, where w_k = 2 pi k / p and d = a - b (sub) or a + b (add);
  mapped through ``W_out @ W_U``; the mean logit (over the grid) re-centred to the model's;
  cross-entropy on the test pairs.
* **Excluded loss** (the seed's ``get_excluded_loss``): those components removed from the neuron
  activations instead, ``(post - approx) @ W_out + resid_mid`` (the last block's) through
  ``W_U``; cross-entropy on the train pairs.
* With **LayerNorm** both go through ``ln_final`` as the model does: the restricted residual
  stream is ``approx @ W_out`` shifted so its grid mean is the model's ``resid_post``'s (the
  same re-centring, done before ``ln_final`` instead of on the logits), the excluded one is
  ``(post - approx) @ W_out + resid_mid``; each is read through ``ln_final``, then ``W_U``
  (plus ``b_U`` for the restricted loss, as the re-centred mean logit includes it). Without
  LayerNorm this is exactly the linear formulation above.
* **Cosine similarity** with ``cos(w_k (d - c))`` over the logit cube L[a, b, c], for every
  k = 1..(p-1)/2: ``<L, C_k> / (||L|| ||C_k||)``, and the residual fraction
  ``||L - sum_k <L, C_k/||C_k||> C_k/||C_k||| / ||L||``. No (p-1)/2 x p^3 tensor is built:
  ``cos(w (d - c)) = cos(w d) cos(w c) + sin(w d) sin(w c)``, so
  ``<L, C_k> = sum_ab cos(w_k d_ab) (L @ cos)[ab, k] + sin(w_k d_ab) (L @ sin)[ab, k]`` -- one
  (p^2 x p) @ (p x (p-1)) product -- and, the C_k being mutually orthogonal,
  ``||residual||^2 = ||L||^2 - sum_k <L, C_k/||C_k||>^2``.
* losses and accuracies on the train, test and all pairs (cross-entropy in float64, as the
  seed's ``loss_fn``); **weight_norm_sq**: the sum of squares of every parameter.

The Fourier measures (Gini, key frequencies, restricted/excluded loss, cosine similarities) are
defined for ``sub`` and ``add`` over Z_p only, whatever the model's shape. For every other task
(``mul``, ``div``, ``quad1-3``, ``cube1-2``, ``mix1`` and the S5 tasks) the answer is not a
frequency of a +- b, so those columns are null and ``key_freqs`` is null; the op-independent
measures (losses, accuracies, weight_norm_sq) are still written.

Fast path
---------
For one block without LayerNorm: the query of the only position the loss reads is always the
``=`` token, so each head's attention score of ``a`` depends on a alone and that of ``b`` on b
alone. The last position's pattern, MLP input and logits on the whole grid therefore come from
per-token tables (``grokhpc.lastpos``, the algebra the trainers use) in O(p^2 h d) plus
``act(pre) @ (W_out @ W_U)``, instead of a full forward. Other shapes (more blocks, LayerNorm)
read the same quantities from the hooked forward (``Transformer.run_with_cache``) over every
pair, in chunks. Tests hold the fast path to the hooked forward and to the seed's formulation.

``measures.parquet`` schema (one row per checkpoint, sorted by epoch)
--------------------------------------------------------------------
=================  ==============  ==========================================================
epoch              int64           the checkpoint's epoch (weights after ``epoch`` steps)
train_loss         float64         cross-entropy on the train pairs
train_acc          float64         accuracy on the train pairs
test_loss          float64         cross-entropy on the test pairs
test_acc           float64
all_loss           float64         over every pair of the grid (div: b != 0)
all_acc            float64
weight_norm_sq     float64         sum of squared weights
gini_embed         float64 / null  Gini of the Fourier norms of W_E[:p]
gini_logit         float64 / null  Gini of the Fourier norms of W_out @ W_U (last block)
restricted_loss    float64 / null  on test pairs, key frequencies only
excluded_loss      float64 / null  on train pairs, key frequencies removed
cos_residual       float64 / null  residual fraction of the logit cube's norm
cos_sim            list<float64>   (p-1)/2 values, element k-1 for frequency k; null off sub/add
=================  ==============  ==========================================================

The table's schema metadata holds ``key_freqs`` (JSON list, or null) and ``op``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Any, Mapping, Sequence

import numpy as np

from . import lastpos
from .checkpoints import RERUN_TRAINING
from .config import RunConfig, shown
from .lastpos import cross_entropy, row_hits, row_losses
from .phases import build_summary
from .store import MEASURES, SUMMARY, RunDir, RunDirError, atomic_write_json, atomic_write_table
from .tasks import TASKS

# The tasks whose answer is i +- j over Z_p: the Fourier measures read them.
FOURIER_OPS = tuple(name for name, t in TASKS.items() if t.group == "Z_p")
MAX_KEY_FREQS = 8
SCALAR_COLUMNS = ("train_loss", "train_acc", "test_loss", "test_acc", "all_loss", "all_acc",
                  "weight_norm_sq", "gini_embed", "gini_logit", "restricted_loss",
                  "excluded_loss", "cos_residual")
FOURIER_COLUMNS = ("gini_embed", "gini_logit", "restricted_loss", "excluded_loss",
                   "cos_residual", "cos_sim")


# ---- Fourier basis and the weight measures (numpy) ------------------------------------------
def fourier_names(p: int) -> list[str]:
    names = ["Constant"]
    for k in range(1, p // 2 + 1):
        names += [f"Sin {k}", f"Cos {k}"]
    return names


def fourier_basis(p: int) -> np.ndarray:
    """The seed's Fourier basis of Z_p: (p, p) float64, orthonormal rows (see module doc)."""
    x = np.arange(p)
    rows = [np.ones(p)]
    for k in range(1, p // 2 + 1):
        rows += [np.sin(2 * np.pi * k * x / p), np.cos(2 * np.pi * k * x / p)]
    basis = np.stack(rows)
    return basis / np.linalg.norm(basis, axis=1, keepdims=True)


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


def embed_fourier_norms(W_E, p: int) -> np.ndarray:
    """|| F @ W_E[:p] || per Fourier component (p values, the seed's embedding-norm plot)."""
    return np.linalg.norm(fourier_basis(p) @ np.asarray(W_E, np.float64)[:p], axis=1)


def logit_fourier_norms(W_out, W_U) -> np.ndarray:
    """|| (W_out @ W_U) @ F.T || per Fourier component (the seed's W_logit plot)."""
    W_logit = np.asarray(W_out, np.float64) @ np.asarray(W_U, np.float64)
    return np.linalg.norm(W_logit @ fourier_basis(W_logit.shape[1]).T, axis=0)


def frequency_energy(W_E, p: int) -> np.ndarray:
    """e_k = ||Sin_k W_E||^2 + ||Cos_k W_E||^2 for k = 1..(p-1)/2 (index k - 1)."""
    sq = embed_fourier_norms(W_E, p) ** 2
    return sq[1::2] + sq[2::2]


def choose_key_freqs(W_E, p: int, max_freqs: int = MAX_KEY_FREQS) -> list[int]:
    """The key frequencies of an embedding: those above the largest drop of the sorted
    frequency energies, at most ``max_freqs`` (module docstring). Sorted ascending."""
    e = frequency_energy(W_E, p)
    order = np.argsort(-e, kind="stable")
    if len(e) <= 1:
        return [int(k) + 1 for k in order]
    top = e[order]
    m_max = min(max_freqs, len(e) - 1)
    ratios = top[:m_max] / np.maximum(top[1:m_max + 1], np.finfo(float).tiny)
    m = int(np.argmax(ratios)) + 1
    return sorted(int(k) + 1 for k in order[:m])


def parse_key_freqs(text: str, p: int) -> list[int]:
    """``"1,5,34"`` -> [1, 5, 34]; ValueError naming the bad item."""
    out = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            k = int(item)
        except ValueError:
            raise ValueError(
                f"--key-freqs: expected comma-separated integers, got {shown(item)}") from None
        if not 1 <= k <= p // 2:
            raise ValueError(f"--key-freqs: expected frequencies in 1..{p // 2}, got {k}")
        if k not in out:
            out.append(k)
    if not out:
        raise ValueError("--key-freqs: expected at least one frequency, got nothing")
    return sorted(out)


def answer_sign(op: str) -> int:
    """d = a + sign * b: the direction of the answer on the grid (a - b for sub)."""
    return TASKS[op].sign


# ---- the per-checkpoint evaluator (torch) ---------------------------------------------------
class Evaluator:
    """Everything that does not change between checkpoints of one run, on one device: the
    dataset's rows on the grid, the Fourier directions, and reusable output buffers."""

    def __init__(self, cfg: RunConfig, key_freqs: Sequence[int] | None, device=None):
        import torch

        from .data import make_dataset

        self.cfg = cfg
        p = self.p = cfg.n_classes
        self.op = cfg.op
        self.fourier = self.op in FOURIER_OPS
        self.last = f"blocks.{cfg.n_layers - 1}"        # the block whose MLP is measured
        self.layer_norm = cfg.normalization == "LN"
        self.device = dev = torch.device(device or "cpu")
        self.model = None if cfg.n_layers == 1 and not self.layer_norm else self._hooked_model()
        data = make_dataset(cfg)
        self.rows = (data.tokens[:, 0] * p + data.tokens[:, 1]).to(dev)   # grid row of each pair
        self.labels = data.labels.to(dev)
        self.train_idx, self.test_idx = data.train_idx.to(dev), data.test_idx.to(dev)
        self.train_rows, self.test_rows = self.rows[self.train_idx], self.rows[self.test_idx]
        self.identity_rows = bool(len(self.rows) == p * p
                                  and torch.equal(self.rows.cpu(), torch.arange(p * p)))
        self.train_labels = self.labels[self.train_idx]
        self.test_labels = self.labels[self.test_idx]
        self._buffers: dict[str, Any] = {}
        self.key_freqs = (sorted(int(k) for k in key_freqs) if key_freqs and self.fourier
                          else None)
        if not self.fourier:
            return
        f64 = torch.float64
        K = self.K = p // 2
        w = 2 * math.pi * torch.arange(1, K + 1, dtype=f64, device=dev) / p
        x = torch.arange(p, dtype=f64, device=dev)
        self.cos_x, self.sin_x = torch.cos(x[:, None] * w), torch.sin(x[:, None] * w)  # (p, K)
        a = torch.arange(p, device=dev).repeat_interleave(p)
        b = torch.arange(p, device=dev).repeat(p)
        self.d = (a + answer_sign(self.op) * b) % p                         # answer direction
        self.cube_norm = math.sqrt(p ** 3 / 2)                               # ||cos(w (d - c))||
        if self.key_freqs is not None:
            kw = 2 * math.pi * torch.tensor(self.key_freqs, dtype=f64, device=dev) / p
            dk = self.d.double()[:, None] * kw
            U = torch.stack([torch.cos(dk), torch.sin(dk)], 2).reshape(p * p, -1)
            U = (U / U.norm(dim=0, keepdim=True)).float()                   # (p^2, 2 n_key)
            self.U, self.U_mean = U, U.mean(0)
            self.U_train, self.U_test = U[self.train_rows], U[self.test_rows]

    def _buf(self, name, *shape):
        import torch

        buf = self._buffers.get(name)
        if buf is None or tuple(buf.shape) != shape:
            buf = self._buffers[name] = torch.empty(*shape, device=self.device)
        return buf

    # -- the fast forward on the full grid
    def _mix(self, pa, pbT, T0, T1, name):
        """out[a, b] = sum_j pa[a, b, j] T0[a, j] + sum_h pb[a, b, h] T1[b, h], as two batched
        products over a and over b (pbT is pb with a and b swapped); a reused (p^2, n) buffer."""
        import torch

        p, n = self.p, T0.shape[-1]
        out = self._buf(name, p * p, n)
        tmp = self._buf(name + "_tmp", p * p, n)
        o3, t3 = out.view(p, p, n), tmp.view(p, p, n)
        torch.bmm(pa, T0, out=o3)
        torch.bmm(pbT, T1, out=t3)
        o3.add_(t3.transpose(0, 1))
        return out

    def grid(self, W: Mapping[str, Any], resid: bool = False):
        """See :meth:`_grid`; runs in inference mode."""
        import torch

        with torch.inference_mode():
            return self._grid(W, resid)

    def _grid(self, W: Mapping[str, Any], resid: bool = False):
        """(post, logits, W_logit, logit_const[, resid_mid]) at the last position for every
        (a, b) of the grid, rows a-major: the last block's MLP activations, the logits,
        ``W_out @ W_U`` and ``b_U + b_out @ W_U`` of the last block, and its ``resid_mid``.
        The fast grid where the model's shape allows it, else the hooked forward."""
        if self.model is not None:
            return self._hooked_grid(W, resid)
        return self._fast_grid(W, resid)

    def _hooked_model(self):
        from .data import grid_tokens
        from .model import Transformer, shape_of

        model = Transformer(shape_of(self.cfg)).to(self.device)
        model.requires_grad_(False)
        self.grid_tokens = grid_tokens(self.p).to(self.device)   # every (a, b, =)
        c = self.cfg
        per_row = 3 * (c.n_layers * (4 * c.d_model + 2 * c.d_mlp) + c.n_classes)
        self.chunk = max(64, (1 << 24) // per_row)         # rows per forward: ~64 MB of floats
        return model

    def _load(self, W: Mapping[str, Any]):
        """The hooked model holding the weights ``W``."""
        import torch

        for name, value in W.items():
            self.model.get_parameter(name).copy_(torch.as_tensor(np.asarray(value)))
        return self.model

    def _hooked_grid(self, W: Mapping[str, Any], resid: bool = False):
        """:meth:`_grid` through ``run_with_cache`` on every pair, ``self.chunk`` rows at a
        time."""
        import torch

        model = self._load(W)
        hooks = (f"{self.last}.mlp.hook_post", f"{self.last}.hook_resid_mid")
        parts = []
        for tokens in self.grid_tokens.split(self.chunk):
            logits, cache = model.run_with_cache(tokens, names_filter=lambda n: n in hooks)
            parts.append((cache[hooks[0]][:, -1], logits[:, -1], cache[hooks[1]][:, -1]))
        post, logits, resid_mid = (torch.cat(t) for t in zip(*parts))
        mlp, W_U = model.get_submodule(f"{self.last}.mlp"), model.unembed.W_U
        const = model.unembed.b_U + mlp.b_out @ W_U
        out = (post, logits, mlp.W_out @ W_U, const)
        return out + (resid_mid,) if resid else out

    def _fast_grid(self, W: Mapping[str, Any], resid: bool = False):
        """The last position on the grid of a one-block model without LayerNorm; ``post`` and
        ``logits`` are reused buffers.

        The algebra is ``grokhpc.lastpos``'s (:func:`~grokhpc.lastpos.grid_terms`,
        :func:`~grokhpc.lastpos.read_out`): the residual stream is never formed per pair; each
        linear map M of it (``W_in``, ``W_U``) is a pattern-weighted sum of table rows read
        through M, two batched products per map (:meth:`_mix`). ``W_U``'s p columns are padded
        to a multiple of 16, on which the BLAS kernels run faster; the padding stays zero."""
        import torch
        import torch.nn.functional as F

        t = {k: torch.as_tensor(np.require(v, np.float32, ["W"]), device=self.device)
             for k, v in W.items()}
        w, _ = lastpos.stacked(t)
        g = lastpos.grid_terms(w, self.p)
        maps = lastpos.read_out_maps(w)

        def mapped(M, name):
            return self._mix(g.pa, g.pbT, g.T0 @ M, g.T1 @ M, name)

        n_out = maps.W_U.shape[-1]
        pad = -n_out % 16
        post = mapped(maps.W_in[0], "post").add_(maps.b_in[0])             # pre-activation
        logits = mapped(F.pad(maps.W_U[0], (0, pad)), "logits")
        logits += F.pad(maps.b_direct[0], (0, pad))
        W_logit = maps.W_logit[0]
        lastpos.read_out(post[None], logits[None], F.pad(W_logit, (0, pad))[None], inplace=True,
                         act_fn=self.cfg.act_fn)
        logits = logits[:, :n_out].contiguous()
        if resid:
            eye = torch.eye(w.W_E.shape[-1], device=self.device)
            return post, logits, W_logit, maps.b_direct[0], mapped(eye, "resid").clone()
        return post, logits, W_logit, maps.b_direct[0]

    def cos_sims(self, L):
        """(cosine similarity of the logit grid ``L`` (p^2, p) with cos(w_k (d - c)) for
        k = 1..(p-1)/2, residual fraction), float64: sum the logits of the pairs sharing the
        answer direction d (G[d, c]), then sum_dc G[d, c] (cos w d cos w c + sin w d sin w c)."""
        import torch

        G = torch.zeros(self.p, self.p, dtype=L.dtype, device=self.device)
        G.index_add_(0, self.d, L)
        G = G.double()
        coef = ((self.cos_x * (G @ self.cos_x)).sum(0)
                + (self.sin_x * (G @ self.sin_x)).sum(0)) / self.cube_norm   # <L, C_k/||C_k||>
        norm_sq = (L * L).sum().double()                            # cascade sum: accurate
        norm = norm_sq.sqrt()
        return coef / norm, (norm_sq - (coef ** 2).sum()).clamp_min(0).sqrt() / norm

    def measure(self, W: Mapping[str, Any]) -> dict[str, Any]:
        """Every measure of one model state ({parameter name: array}); see the module doc."""
        import torch

        with torch.inference_mode():
            return self._measure(W)

    def _measure(self, W):
        out: dict[str, Any] = {}
        post, logits, W_logit, const, *resid_mid = self._grid(W, resid=self.layer_norm)
        by_pair = logits if self.identity_rows else logits[self.rows]   # dataset order
        row_loss = row_losses(by_pair, self.labels)             # once for all three splits
        row_hit = row_hits(by_pair, self.labels)
        for split, idx in (("train", self.train_idx), ("test", self.test_idx), ("all", None)):
            rows = slice(None) if idx is None else idx
            out[f"{split}_loss"] = float(row_loss[rows].mean())
            out[f"{split}_acc"] = float(row_hit[rows].mean())
        out["weight_norm_sq"] = float(sum(float(np.square(np.asarray(v, np.float64)).sum())
                                          for v in W.values()))
        if not self.fourier:
            out.update({k: None for k in FOURIER_COLUMNS})
            return out
        out["gini_embed"] = gini(embed_fourier_norms(W["embed.W_E"], self.p))
        out["gini_logit"] = gini(logit_fourier_norms(W[f"{self.last}.mlp.W_out"],
                                                     W["unembed.W_U"]))
        sims, residual = self.cos_sims(logits)
        out["cos_sim"] = sims.cpu().tolist()
        out["cos_residual"] = float(residual)
        if self.key_freqs is None:
            out["restricted_loss"] = out["excluded_loss"] = None
        elif self.layer_norm:
            out.update(self._key_freq_losses_ln(post, resid_mid[0]))
        else:
            out.update(self._key_freq_losses(post, logits, W_logit, const))
        return out

    def _key_freq_losses(self, post, logits, W_logit, const) -> dict[str, float]:
        """Restricted and excluded loss of a model without LayerNorm, on the logits."""
        # approx_acts = U U^T post; approx_acts @ W_logit = U (U^T post W_logit) = U @ CW
        CW = (self.U.T @ post) @ W_logit                             # (2 n_key, p)
        shift = logits.mean(0) - self.U_mean @ CW                     # re-centre the mean logit
        excluded = logits[self.train_rows] - self.U_train @ CW - const
        return {"restricted_loss": float(cross_entropy(self.U_test @ CW + shift,
                                                       self.test_labels)),
                "excluded_loss": float(cross_entropy(excluded, self.train_labels))}

    def _key_freq_losses_ln(self, post, resid_mid) -> dict[str, float]:
        """Restricted and excluded loss with LayerNorm: the residual streams of the module
        docstring, read through the loaded model's own ``ln_final`` and ``W_U``."""
        model = self.model
        mlp = model.get_submodule(f"{self.last}.mlp")
        CW = (self.U.T @ post) @ mlp.W_out                            # (2 n_key, d)
        resid_post_mean = resid_mid.mean(0) + post.mean(0) @ mlp.W_out + mlp.b_out
        restricted = self.U_test @ CW + (resid_post_mean - self.U_mean @ CW)
        rows = self.train_rows
        excluded = resid_mid[rows] + post[rows] @ mlp.W_out - self.U_train @ CW
        return {"restricted_loss": float(cross_entropy(model.unembed(model.ln_final(restricted)),
                                                       self.test_labels)),
                "excluded_loss": float(cross_entropy(model.ln_final(excluded) @ model.unembed.W_U,
                                                     self.train_labels))}


# ---- a run ----------------------------------------------------------------------------------
def measures_table(rows: list[dict[str, Any]], epochs: Sequence[int], key_freqs, op: str):
    """The measures.parquet table (schema in the module docstring)."""
    import pyarrow as pa

    cols = [pa.array(np.asarray(epochs, dtype=np.int64), pa.int64())]
    names = ["epoch"]
    for name in SCALAR_COLUMNS:
        cols.append(pa.array([r.get(name) for r in rows], pa.float64()))
        names.append(name)
    cols.append(pa.array([r.get("cos_sim") for r in rows], pa.list_(pa.float64())))
    names.append("cos_sim")
    meta = {"key_freqs": json.dumps(key_freqs), "op": op}
    return pa.Table.from_arrays(cols, names=names).replace_schema_metadata(meta)


def compute_measures(run: RunDir, key_freqs: Sequence[int] | None = None, device=None,
                     progress: bool = False):
    """(table, key_freqs) for every checkpoint of a trained run; key frequencies from the last
    checkpoint unless given."""
    cfg = run.run_config()
    epochs, ckpts = run.checkpoints()
    if not epochs:
        raise RunDirError(f"{run.path}: no checkpoints to measure")
    p, op = cfg.n_classes, cfg.op
    if op in FOURIER_OPS:
        if key_freqs is None:
            key_freqs = choose_key_freqs(run.unflatten(ckpts[-1])["embed.W_E"], p)
        key_freqs = sorted(int(k) for k in key_freqs)
    else:
        key_freqs = None
    ev = Evaluator(cfg, key_freqs, device=device)
    rows = []
    it = range(len(epochs))
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="measures", unit="ckpt")
    for i in it:
        rows.append(ev.measure(run.unflatten(np.array(ckpts[i]))))
    return measures_table(rows, epochs, key_freqs, op), key_freqs


def finalize_run(run: RunDir, device=None, key_freqs: Sequence[int] | None = None) -> dict:
    """Measure every checkpoint of a trained run, write measures.parquet and summary.json
    (atomically), return the summary. Called by train.py after the last epoch."""
    t0 = time.perf_counter()
    table, key_freqs = compute_measures(run, key_freqs=key_freqs, device=device)
    atomic_write_table(run.file(MEASURES), table)
    summary = build_summary(run, table, key_freqs)
    summary["measures_time_s"] = round(time.perf_counter() - t0, 3)
    atomic_write_json(run.file(SUMMARY), summary)
    return summary


def _unfinished(run: RunDir) -> str:
    """'training is not finished (E/N epochs); run ...': what finishes it."""
    prog = run.read_progress() or {}
    return (f"training is not finished ({prog.get('epoch', 0)}/{prog.get('n_epochs', '?')} "
            f"epochs); run {RERUN_TRAINING} to finish it")


def read_measures(run: RunDir):
    """measures.parquet as a pandas DataFrame (cos_sim as arrays), and its key frequencies."""
    import pyarrow.parquet as pq

    f = run.file(MEASURES)
    if not f.exists():
        raise RunDirError(f"{run.path}: no {MEASURES} yet" + (
            f" (run `python -m grokhpc.measures {run.path}`)" if run.is_trained()
            else f": {_unfinished(run)} and write it"))
    t = pq.read_table(f)
    meta = t.schema.metadata or {}
    key = json.loads(meta.get(b"key_freqs", b"null"))
    return t.to_pandas(), key


# ---- CLI ------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m grokhpc.measures",
        description="Recompute measures.parquet and summary.json of a trained run.")
    ap.add_argument("run_dir", help="a run directory written by grokhpc.train")
    ap.add_argument("--key-freqs", default=None, metavar="K1,K2,...",
                    help="use these key frequencies instead of the automatic rule")
    ap.add_argument("--device", default="cpu", help="torch device (default cpu)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run = RunDir(args.run_dir)
    try:
        cfg = run.run_config()
        if not run.is_trained():
            raise RunDirError(f"{run.path}: {_unfinished(run)}")
        if args.key_freqs and cfg.op not in FOURIER_OPS:
            raise ValueError(f"--key-freqs: op {cfg.op!r} has no Fourier measures")
        key = parse_key_freqs(args.key_freqs, cfg.n_classes) if args.key_freqs else None
        summary = finalize_run(run, device=args.device, key_freqs=key)
    except (RunDirError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{run.path}: measures.parquet and summary.json written; key_freqs "
          f"{summary['key_freqs']}, grokking_epoch {summary['grokking_epoch']}"
          f"{'' if summary['grokked'] else ' (censored: never reached 99% test accuracy)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
