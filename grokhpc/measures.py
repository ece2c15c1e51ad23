"""Progress measures per checkpoint of one run (Nanda et al. 2023).

``python -m grokhpc.measures RUN_DIR [--key-freqs 1,5,34]`` recomputes ``measures.parquet`` and
``summary.json`` of a trained run (e.g. with hand-picked key frequencies, or irreps for s5).

Stage: right after training (``grokhpc.train`` calls :func:`finalize_run` after the last epoch):
every checkpoint row of checkpoints.npy is measured into measures.parquet, then
``grokhpc.phases`` reads the run's phases off its curves and writes summary.json.

Definitions
-----------
Throughout, p is the run's number of classes (``RunConfig.n_classes``: the prime for the tasks
over Z_p, 120 for the S5 tasks). "The MLP" is the MLP of the last block: its neuron activations
at the last position (``blocks.{n_layers-1}.mlp.hook_post``) and its neuron-to-logit map
``W_logit = W_out @ W_U`` with that block's ``W_out`` (the only MLP for the seed's one block).

The group measures are read in the task's own basis (``grokhpc.task_measures``, over the bases
of ``grokhpc.bases``: Z_p for sub/add, Z_p^* through the discrete log for mul/div, the irreps
of S5 for s5). Over Z_p they are the seed's, as follows:

* **Fourier basis** of Z_p (``bases.fourier_basis``): row 0 the constant, then for
  k = 1..(p-1)/2 ``Sin k`` before ``Cos k`` (the seed's order), each row of unit norm.
* **Gini** (``task_measures.gini``): the Gini coefficient of the p Fourier-component norms of
  the embedding, ``|| F @ W_E[:p] ||`` per row, and of the neuron-to-logit map,
  ``|| (W_out @ W_U) @ F.T ||`` per column. 0 = all components equal, -> 1 = one component.
* **Key frequencies** (``bases.choose_keys``), chosen at the final checkpoint and held fixed
  for every checkpoint of the run: the energy of frequency k in the embedding is
  ``e_k = ||Sin_k @ W_E[:p]||^2 + ||Cos_k @ W_E[:p]||^2``; sorted in decreasing order, the key
  frequencies are those above the largest ratio e_(m) / e_(m+1), 1 <= m <= 8 (the seed reads
  {1, 5, 34} off the same spectrum).
* **Restricted loss** (the seed's ``get_restricted_loss``): the last-position neuron activations
  on the full p x p grid, projected onto the unit vectors ``cos(w_k d)``, ``sin(w_k d)`` over the
  grid for each key frequency k (``bases.answer_directions``), where w_k = 2 pi k / p and
  d = a - b (sub) or a + b (add); mapped through ``W_out @ W_U``; the mean logit (over the grid)
  re-centred to the model's; cross-entropy on the test pairs.
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
  k = 1..(p-1)/2, and the residual fraction of ||L|| (``bases.logit_attribution``), from the
  answer sums ``G[d, c]`` (formed on the device) without building the cube.
* losses and accuracies on the train, test and all pairs (cross-entropy in float64, as the
  seed's ``loss_fn``); **weight_norm_sq**: the sum of squares of every parameter.

For mul and div the same measures run over the discrete-log index (Z_{p-1}), on the pairs
without a zero operand; for s5 over the irreps (key irreps, per-irrep logit attribution). Every
other task (s5conj, s5aba, quad1-3, cube1-2, mix1) has null group columns and null key
elements (``task_measures.no_lens_reason`` says why); the op-independent measures (losses,
accuracies, weight_norm_sq) are still written. A run of another model family (the MLP) has
only those (``grokhpc.output_measures``), its group columns null.

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
gini_embed         float64 / null  Gini of the component norms of W_E (the group's elements)
gini_logit         float64 / null  Gini of the component norms of W_out @ W_U (last block)
restricted_loss    float64 / null  on test pairs in the group, key elements only
excluded_loss      float64 / null  on train pairs in the group, key elements removed
cos_residual       float64 / null  residual fraction of the logit cube's norm
cos_sim            list<float64>   one value per non-trivial key, element k-1 for key k
                                   (frequency, or irrep); null without a group basis
llc, llc_std       float64 / null  the LLC and its spread over chains where estimated
                                   (``grokhpc.llc_run``; absent until then)
=================  ==============  ==========================================================

The table's schema metadata holds the JSON of ``task_measures.basis_summary`` (``basis``,
``generator``, ``key_freqs``, ``key_elements``, ``key_names``) and ``op``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Mapping, Sequence

import numpy as np

from . import lastpos, llc_run, task_measures
from .checkpoints import RERUN_TRAINING
from .config import RunConfig
from .output_measures import OutputEvaluator, load_weights, split_scores, weight_norm_sq
from .phases import build_summary
from .store import MEASURES, SUMMARY, RunDir, RunDirError, atomic_write_json, atomic_write_table
from .task_measures import GROUP_COLUMNS

SCALAR_COLUMNS = ("train_loss", "train_acc", "test_loss", "test_acc", "all_loss", "all_acc",
                  "weight_norm_sq", "gini_embed", "gini_logit", "restricted_loss",
                  "excluded_loss", "cos_residual")


# ---- the per-checkpoint evaluator (torch) ---------------------------------------------------
class Evaluator:
    """Everything that does not change between checkpoints of one run, on one device: the
    dataset's rows on the grid, the group lens (``task_measures.GroupLens``), and the table
    rows each pair of the grid sums."""

    def __init__(self, cfg: RunConfig, keys: Sequence[int] | None, device=None):
        import torch

        from .data import make_dataset

        self.cfg = cfg
        p = self.p = cfg.n_classes
        self.op = cfg.op
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
        self._mix_index = None     # the table rows each pair of the grid sums (:meth:`_mix`)
        basis = task_measures.lens_of(cfg.op, p)
        self.lens = None if basis is None else task_measures.GroupLens(
            basis, keys, self.rows, self.labels, data.train_idx.to(dev), data.test_idx.to(dev),
            dev)

    # -- the fast forward on the full grid
    def _mix(self, pa, pbT, T0, T1):
        """out[a, b] = sum_j pa[a, b, j] T0[a, j] + sum_h pb[a, b, h] T1[b, h] (pbT is pb with
        a and b swapped): one weighted sum of table rows per pair (``F.embedding_bag``), so the
        (p^2, n) result is written in one pass."""
        import torch
        import torch.nn.functional as F

        n = T0.shape[-1]
        idx, weights = self._mix_rows(pa, pbT)
        table = torch.cat([T0.reshape(-1, n), T1.reshape(-1, n)])
        return F.embedding_bag(idx, table, mode="sum", per_sample_weights=weights)

    def _mix_rows(self, pa, pbT):
        """(the table rows each pair sums, their weights): pair (a, b) reads T0's rows of a,
        then T1's rows of b."""
        import torch

        p, j, h = self.p, pa.shape[-1], pbT.shape[-1]
        if self._mix_index is None or self._mix_index.shape[1] != j + h:
            a = torch.arange(p, device=self.device)
            self._mix_index = torch.cat(
                [(a[:, None, None] * j + torch.arange(j, device=self.device)).expand(p, p, j),
                 (p * j + a[None, :, None] * h + torch.arange(h, device=self.device))
                 .expand(p, p, h)], dim=-1).reshape(p * p, j + h)
        weights = torch.cat([pa, pbT.transpose(0, 1)], dim=-1)
        return self._mix_index, weights.view(p * p, j + h)

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
        return load_weights(self.model, W)

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
        """The last position on the grid of a one-block model without LayerNorm.

        The algebra is ``grokhpc.lastpos``'s (:func:`~grokhpc.lastpos.grid_terms`,
        :func:`~grokhpc.lastpos.read_out`): the residual stream is never formed per pair; its
        linear maps ``W_in`` and ``W_U`` (side by side) read the table rows, and each pair's
        pre-activation and direct logits are one pattern-weighted sum of them (:meth:`_mix`).
        ``W_U``'s p columns are padded to a multiple of 16, on which the BLAS kernels run
        faster; the padding stays zero."""
        import torch
        import torch.nn.functional as F

        t = {k: torch.as_tensor(np.require(v, np.float32, ["W"]), device=self.device)
             for k, v in W.items()}
        w, _ = lastpos.stacked(t)
        g = lastpos.grid_terms(w, self.p)
        maps = lastpos.read_out_maps(w)
        d_mlp, n_out = maps.W_in.shape[-1], maps.W_U.shape[-1]
        pad = -n_out % 16
        M = torch.cat([maps.W_in[0], F.pad(maps.W_U[0], (0, pad))], dim=1)   # both maps
        T0 = g.T0 @ M
        T0[:, -1] += torch.cat([maps.b_in[0], F.pad(maps.b_direct[0], (0, pad))])  # weight 1
        T1 = (g.T1.reshape(-1, M.shape[0]) @ M).view(*g.T1.shape[:2], -1)
        mixed = self._mix(g.pa, g.pbT, T0, T1)
        post, logits = mixed[:, :d_mlp], mixed[:, d_mlp:]                # pre-activation
        W_logit = maps.W_logit[0]
        lastpos.read_out(post[None], logits[None], F.pad(W_logit, (0, pad))[None], inplace=True,
                         act_fn=self.cfg.act_fn)
        logits = logits[:, :n_out].contiguous()
        if resid:
            return post, logits, W_logit, maps.b_direct[0], self._mix(g.pa, g.pbT, g.T0, g.T1)
        return post, logits, W_logit, maps.b_direct[0]

    def measure(self, W: Mapping[str, Any]) -> dict[str, Any]:
        """Every measure of one model state ({parameter name: array}); see the module doc."""
        import torch

        from .runtime import numpy_blas_one_thread

        with torch.inference_mode(), numpy_blas_one_thread():
            return self._measure(W)

    def _measure(self, W):
        grid = self._grid(W, resid=self.layer_norm)
        logits = grid[1]
        by_pair = logits if self.identity_rows else logits[self.rows]   # dataset order
        out: dict[str, Any] = split_scores(by_pair, self.labels, self.train_idx, self.test_idx)
        out["weight_norm_sq"] = weight_norm_sq(W)
        if self.lens is None:
            out.update({k: None for k in GROUP_COLUMNS})
            return out
        out.update(self.lens.measure(W, grid, self.last, self.model if self.layer_norm else None))
        return out


# ---- a run ----------------------------------------------------------------------------------
def measures_table(rows: list[dict[str, Any]], epochs: Sequence[int], keys, cfg: RunConfig):
    """The measures.parquet table (schema in the module docstring)."""
    import pyarrow as pa

    cols = [pa.array(np.asarray(epochs, dtype=np.int64), pa.int64())]
    names = ["epoch"]
    for name in SCALAR_COLUMNS:
        cols.append(pa.array([r.get(name) for r in rows], pa.float64()))
        names.append(name)
    cols.append(pa.array([r.get("cos_sim") for r in rows], pa.list_(pa.float64())))
    names.append("cos_sim")
    meta = {k: json.dumps(v) for k, v in
            task_measures.basis_summary(cfg.op, cfg.n_classes, keys, cfg.model).items()}
    meta["op"] = cfg.op
    return pa.Table.from_arrays(cols, names=names).replace_schema_metadata(meta)


def compute_measures(run: RunDir, keys: Sequence[int] | None = None, device=None,
                     progress: bool = False):
    """(table, keys) for every checkpoint of a trained run; the key elements of the task's
    basis (frequencies, irreps) from the last checkpoint unless given, None without a lens."""
    cfg = run.run_config()
    epochs, ckpts = run.checkpoints()
    if not epochs:
        raise RunDirError(f"{run.path}: no checkpoints to measure")
    basis = task_measures.lens_of(cfg.op, cfg.n_classes, cfg.model)
    if basis is None:
        keys = None
    elif keys is None:
        keys = task_measures.choose_keys(basis, run.unflatten(ckpts[-1])["embed.W_E"])
    else:
        keys = sorted(int(k) for k in keys)
    ev = Evaluator(cfg, keys, device=device) if cfg.model == "transformer" else \
        OutputEvaluator(cfg, device=device)
    rows = []
    it = range(len(epochs))
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="measures", unit="ckpt")
    for i in it:
        rows.append(ev.measure(run.unflatten(np.array(ckpts[i]))))
    return llc_run.with_llc_columns(run, measures_table(rows, epochs, keys, cfg)), keys


def finalize_run(run: RunDir, device=None, keys: Sequence[int] | None = None) -> dict:
    """Measure every checkpoint of a trained run, write measures.parquet and summary.json
    (atomically), return the summary. Called by train.py after the last epoch."""
    t0 = time.perf_counter()
    table, keys = compute_measures(run, keys=keys, device=device)
    atomic_write_table(run.file(MEASURES), table)
    summary = build_summary(run, table, keys)
    summary["measures_time_s"] = round(time.perf_counter() - t0, 3)
    atomic_write_json(run.file(SUMMARY), summary)
    return summary


def _unfinished(run: RunDir) -> str:
    """'training is not finished (E/N epochs); run ...': what finishes it."""
    prog = run.read_progress() or {}
    return (f"training is not finished ({prog.get('epoch', 0)}/{prog.get('n_epochs', '?')} "
            f"epochs); run {RERUN_TRAINING} to finish it")


def read_measures(run: RunDir):
    """measures.parquet as a pandas DataFrame (cos_sim as arrays), and its key elements."""
    import pyarrow.parquet as pq

    f = run.file(MEASURES)
    if not f.exists():
        raise RunDirError(f"{run.path}: no {MEASURES} yet" + (
            f" (run `python -m grokhpc.measures {run.path}`)" if run.is_trained()
            else f": {_unfinished(run)} and write it"))
    t = pq.read_table(f)
    meta = t.schema.metadata or {}
    key = json.loads(meta.get(b"key_elements", meta.get(b"key_freqs", b"null")))
    return t.to_pandas(), key


# ---- CLI ------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m grokhpc.measures",
        description="Recompute measures.parquet and summary.json of a trained run.")
    ap.add_argument("run_dir", help="a run directory written by grokhpc.train")
    ap.add_argument("--key-freqs", "--keys", dest="keys", default=None, metavar="K1,K2,...",
                    help="use these key elements (frequencies; irreps for s5, by index 1..6 "
                         "or partition) instead of the automatic rule")
    ap.add_argument("--device", default="cpu", help="torch device (default cpu)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run = RunDir(args.run_dir)
    try:
        cfg = run.run_config()
        if not run.is_trained():
            raise RunDirError(f"{run.path}: {_unfinished(run)}")
        basis = task_measures.lens_of(cfg.op, cfg.n_classes, cfg.model)
        if args.keys and basis is None:
            raise ValueError(f"--key-freqs: run has no group measures "
                             f"({task_measures.run_no_lens_reason(cfg)})")
        key = task_measures.parse_keys(args.keys, basis) if args.keys else None
        summary = finalize_run(run, device=args.device, keys=key)
    except (RunDirError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{run.path}: measures.parquet and summary.json written; basis {summary['basis']}, "
          f"key elements {summary['key_names']}, grokking_epoch {summary['grokking_epoch']}"
          f"{'' if summary['grokked'] else ' (censored: never reached 99% test accuracy)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
