"""The last position's logits from per-(position, token, head) tables, and their loss.

Training and the progress measures read only the logits of the last position. Two facts make
them cheap to compute without the all-positions forward:

* up to the softmax, queries, keys and values are linear in a one-hot token: the score a query
  token gives each (key position, key token, head) is one small table, and so is each value;
* after the softmax and up to the MLP's activation everything is linear again: the last position's
  residual stream is its own embedding plus ``b_O`` plus, per key position and head, the
  pattern weight times a value row read through ``W_O``.

What is left per row is a look-up of its scores and values, the softmax, the pattern-weighted
sum, the read-out ``resid_mid @ [W_in | W_U]``, the activation (ReLU or GELU) and
``post @ (W_out @ W_U)``. The algebra needs one block and no LayerNorm (which is not linear);
other shapes train through the hooked forward.

Weights are a mapping of TransformerLens parameter names to tensors: one run's ``(*shape)``,
or R runs' stacked ``(R, *shape)`` with tokens ``(R, b, n)`` (run r only meets its own weights
and rows). One code path serves the solo trainer (``Transformer.last_logits``), the packed
trainer (``grokhpc.train_batched``) and the full-grid measures (:func:`grid_terms`); the
readable hooked ``Transformer.forward`` is the reference they are all tested against. A bias
missing from the mapping counts as zero. One run's rows on a CPU go through
:mod:`grokhpc.kernels` (the same algebra carried into the MLP's input space, with a backward
written by hand) when its tables are smaller than the rows, as for every train and test set.

The cross-entropy and accuracy of such logits (with an optional padding mask) live here too,
and the rule of which shapes take this path (:func:`uses_fast_path`); one run's unmasked loss
on a CPU is :func:`grokhpc.kernels.cross_entropy`.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, NamedTuple

WEIGHT_NAMES = {"W_E": "embed.W_E", "W_pos": "pos_embed.W_pos", "W_Q": "blocks.0.attn.W_Q",
                "W_K": "blocks.0.attn.W_K", "W_V": "blocks.0.attn.W_V",
                "W_O": "blocks.0.attn.W_O", "W_in": "blocks.0.mlp.W_in",
                "W_out": "blocks.0.mlp.W_out", "W_U": "unembed.W_U"}
BIAS_NAMES = {"b_Q": "blocks.0.attn.b_Q", "b_K": "blocks.0.attn.b_K",
              "b_V": "blocks.0.attn.b_V", "b_O": "blocks.0.attn.b_O",
              "b_in": "blocks.0.mlp.b_in", "b_out": "blocks.0.mlp.b_out", "b_U": "unembed.b_U"}


def uses_fast_path(cfg) -> bool:
    """Whether a run shaped like ``cfg`` (a RunConfig, or a model's shape) computes its
    last-position logits from this module's tables rather than the hooked forward. Two
    forwards ask, and their answers differ by the activation:

    * a run's own forward (``Transformer.last_logits``: solo runs, and packed groups in exact
      mode, which call it run by run): one block without LayerNorm, whatever the MLP's
      elementwise activation (the read-out applies it);
    * the batched forward of a packed group (:func:`batched_fast_path`): the same shapes with
      a ReLU MLP only; its stacked loss, its compiled and CUDA-graph steps and the memory
      estimate of a group are ReLU's, and a GELU group is ``torch.func.vmap`` over the hooked
      forward instead.
    """
    return getattr(cfg, "model", "transformer") == "transformer" and cfg.n_layers == 1 \
        and cfg.normalization == "none"


def batched_fast_path(cfg) -> bool:
    """Whether a packed group's batched forward takes the tables (see :func:`uses_fast_path`)."""
    return uses_fast_path(cfg) and cfg.act_fn == "relu"


class Weights(NamedTuple):
    """Every weight with a leading run axis (R = 1 for one run)."""

    W_E: Any
    W_pos: Any
    W_Q: Any
    W_K: Any
    W_V: Any
    W_O: Any
    W_in: Any
    W_out: Any
    W_U: Any
    b_Q: Any
    b_K: Any
    b_V: Any
    b_O: Any
    b_in: Any
    b_out: Any
    b_U: Any


def stacked(P: Mapping[str, Any]) -> tuple[Weights, bool]:
    """(the weights of ``P`` with a run axis, whether ``P`` was one run's); zeros for biases
    that ``P`` lacks."""
    W = {k: P[name] for k, name in WEIGHT_NAMES.items()}
    solo = W["W_E"].dim() == 2
    if solo:
        W = {k: v[None] for k, v in W.items()}
    R, h, d, e = W["W_Q"].shape
    shapes = {"b_Q": (h, e), "b_K": (h, e), "b_V": (h, e), "b_O": (d,),
              "b_in": (W["W_in"].shape[-1],), "b_out": (d,), "b_U": (W["W_U"].shape[-1],)}
    for k, shape in shapes.items():
        b = P.get(BIAS_NAMES[k])
        W[k] = W["W_E"].new_zeros((R, *shape)) if b is None else (b[None] if solo else b)
    return Weights(**W), solo


class Tables(NamedTuple):
    """Per-(position, token, head) tables for queries at the last position, run axis first.
    ``U`` query tokens; keys at the ``n - 1`` earlier positions or the query's own."""

    scores: Any        # (R, U, n-1, V, h) score of key (position, token), scaled by 1/sqrt(e)
    values: Any        # (R, n-1, V, h, e) value of key (position, token)
    own_scores: Any    # (R, U, h) the query's score of its own key
    own_values: Any    # (R, U, h, e) the query's own value
    x_last: Any        # (R, U, d) the query's embedding (token + position)


def tables(w: Weights, n: int, query_tokens) -> Tables:
    """The attention tables of ``w`` for ``n`` positions, the last holding ``query_tokens``."""
    import torch

    x = w.W_E[:, None] + w.W_pos[:, :n, None]                               # (R, n, V, d)
    early, x_last = x[:, :-1], x[:, -1][:, query_tokens]
    scale = math.sqrt(w.W_Q.shape[-1])
    q = torch.einsum("rud,rhde->ruhe", x_last, w.W_Q) + w.b_Q[:, None]
    k = torch.einsum("rpvd,rhde->rpvhe", early, w.W_K) + w.b_K[:, None, None]
    own_k = torch.einsum("rud,rhde->ruhe", x_last, w.W_K) + w.b_K[:, None]
    return Tables(
        scores=torch.einsum("ruhe,rpvhe->rupvh", q, k) / scale,
        values=torch.einsum("rpvd,rhde->rpvhe", early, w.W_V) + w.b_V[:, None, None],
        own_scores=(q * own_k).sum(-1) / scale,
        own_values=torch.einsum("rud,rhde->ruhe", x_last, w.W_V) + w.b_V[:, None],
        x_last=x_last)


class ReadOut(NamedTuple):
    """The linear maps after attention, run axis first."""

    W_in: Any       # (R, d, d_mlp): the residual stream to the MLP
    b_in: Any       # (R, d_mlp)
    W_U: Any        # (R, d, p): the residual stream's direct path to the logits
    b_direct: Any   # (R, p) = b_U + b_out @ W_U
    W_logit: Any    # (R, d_mlp, p) = W_out @ W_U: the activation's output to the logits


def read_out_maps(w: Weights) -> ReadOut:
    """The maps of :class:`ReadOut` for ``w``: the MLP's output folded into the logits."""
    import torch

    return ReadOut(w.W_in, w.b_in, w.W_U, w.b_U + torch.bmm(w.b_out[:, None], w.W_U)[:, 0],
                   torch.bmm(w.W_out, w.W_U))


def activation(act_fn: str):
    """The MLP's elementwise activation by its run-config name (gelu: exact, erf form)."""
    import torch.nn.functional as F

    return {"relu": F.relu, "gelu": F.gelu}[act_fn]


def read_out(pre, direct, W_logit, inplace: bool = False, act_fn: str = "relu"):
    """Logits ``direct + act(pre) @ W_logit`` of (R, rows, .) tensors: ``pre`` the MLP's
    pre-activation, ``direct`` the residual stream read through ``W_U`` (biases included),
    ``act_fn`` relu or gelu. In place (``pre`` overwritten by ``act(pre)``, ``direct`` by the
    logits) for callers that reuse buffers."""
    import torch

    if inplace:
        post = pre.relu_() if act_fn == "relu" else pre.copy_(activation(act_fn)(pre))
        return direct.baddbmm_(post, W_logit)
    return torch.baddbmm(direct, activation(act_fn)(pre), W_logit)


# ---- rows: any tokens --------------------------------------------------------------------------
class Queries(NamedTuple):
    """The distinct last tokens of a set of rows and where each row's is among them."""

    tokens: Any    # (U,)
    index: Any     # (R, b) long
    onehot: Any    # (R, b, U) in the weights' dtype


def queries_of(tokens, dtype) -> Queries:
    """The queries of ``tokens`` (R, b, n). The last position's own terms depend on its token
    alone (in training always '='): they are computed once per distinct token and spread with a
    one-hot product, so their gradients are sums taken by a matmul rather than float32
    accumulations of thousands of rows one after another."""
    import torch
    import torch.nn.functional as F

    uniq, index = torch.unique(tokens[..., -1], return_inverse=True)
    return Queries(uniq, index, F.one_hot(index, len(uniq)).to(dtype))


def resid_mid(w: Weights, t: Tables, tokens, q: Queries):
    """The residual stream after attention at the last position of each row, (R, b, d): each
    row's scores and values looked up in the tables, the softmax over positions, and the
    pattern-weighted sum of the value rows through ``W_O``."""
    import torch
    import torch.nn.functional as F

    R, b, n = tokens.shape
    U, (_, _, V, h, e), d = len(q.tokens), t.values.shape, t.x_last.shape[-1]
    runs = torch.arange(R, device=tokens.device)[:, None, None]
    key = tokens[..., :-1] + torch.arange(n - 1, device=tokens.device) * V    # (R, b, n-1)
    scores = t.scores.reshape(R * U, (n - 1) * V, h)[runs * U + q.index[..., None], key]
    values = F.embedding(key + runs * ((n - 1) * V), t.values.reshape(-1, h * e))
    own = torch.cat([t.x_last, t.own_values.flatten(2), t.own_scores], dim=2)
    x_own, v_own, s_own = torch.bmm(q.onehot, own).split([d, h * e, h], dim=2)
    pattern = torch.softmax(torch.cat([scores, s_own[:, :, None]], dim=2), dim=2)
    z = ((pattern[..., :-1, :, None] * values.view(R, b, n - 1, h, e)).sum(dim=2)
         + pattern[..., -1, :, None] * v_own.view(R, b, h, e))                # (R, b, h, e)
    return x_own + torch.baddbmm(w.b_O[:, None], z.flatten(2), w.W_O.flatten(1, 2))


def last_logits(P: Mapping[str, Any], tokens, queries: Queries | None = None,
                act_fn: str = "relu"):
    """Logits at the last position: ``Transformer.forward(tokens)[:, -1]`` of one run (tokens
    (b, n) -> (b, p)) or of R stacked runs (tokens (R, b, n) -> (R, b, p)) of a one-block
    model without LayerNorm whose MLP activation is ``act_fn``. ``queries``: from
    :func:`queries_of` for rows scored again and again (default: found here)."""
    import torch

    w, solo = stacked(P)
    rows = tokens
    if solo:
        tokens = tokens[None]
    q = queries_of(tokens, w.W_E.dtype) if queries is None else queries
    if solo and act_fn in ("relu", "gelu"):
        from . import kernels

        if kernels.applies(rows, len(q.tokens), w.W_E.shape[1], w.W_Q.shape[1]):
            return kernels.last_logits(Weights(*(v[0] for v in w)), rows, q, act_fn)
    resid = resid_mid(w, tables(w, tokens.shape[-1], q.tokens), tokens, q)
    m = read_out_maps(w)
    pre = torch.baddbmm(m.b_in[:, None], resid, m.W_in)
    logits = read_out(pre, torch.baddbmm(m.b_direct[:, None], resid, m.W_U), m.W_logit,
                      act_fn=act_fn)
    return logits[0] if solo else logits


# ---- the full grid: every pair (a, b) with '=' last ---------------------------------------------
class GridTerms(NamedTuple):
    """``resid_mid[a, b] = sum_k pa[a, b, k] T0[a, k] + sum_h pbT[b, a, h] T1[b, h]``."""

    pa: Any      # (p, p, h + 1) attention to a, and a column of ones
    pbT: Any     # (p, p, h) attention to b, b-major
    T0: Any      # (p, h + 1, d) head outputs of a, less those of '='; then the constant row
    T1: Any      # (p, h, d) head outputs of b, less those of '='


def grid_terms(w: Weights, p: int) -> GridTerms:
    """The tables of :func:`tables` for the p x p grid (a, b, '='), one run (R = 1). The query
    is always '=', so a's scores depend on a alone and b's on b alone: the pattern is a
    broadcast of two table rows, and with the pattern to '=' written as 1 - pa - pb the
    residual is a constant plus two pattern-weighted sums over the heads."""
    import torch

    t = tables(w, 3, torch.tensor([p], device=w.W_E.device))
    s = t.scores[0, 0, :, :p]                                                 # (2, p, h)
    s0, s1, s2 = torch.broadcast_tensors(s[0, :, None], s[1, None, :], t.own_scores[0, 0])
    pat = torch.softmax(torch.stack([s0, s1, s2]), dim=0)                    # (3, a, b, h)
    out = torch.einsum("pvhe,hef->pvhf", t.values[0, :, :p], w.W_O[0])       # (2, p, h, d)
    own = torch.einsum("he,hef->hf", t.own_values[0, 0], w.W_O[0])           # (h, d)
    base = t.x_last[0, 0] + w.b_O[0] + own.sum(0)                            # pa = pb = 0
    d = base.shape[-1]
    ones = pat.new_ones(p, p, 1)
    return GridTerms(pa=torch.cat([pat[0], ones], -1),
                     pbT=pat[1].transpose(0, 1).contiguous(),
                     T0=torch.cat([out[0] - own, base.expand(p, 1, d)], 1),
                     T1=out[1] - own)


# ---- loss and accuracy -------------------------------------------------------------------------
def row_losses(logits, labels, dtype: str = "float64"):
    """Each row's cross-entropy, (..., b), computed in ``dtype`` (the seed's float64: a
    loss of 1e-7 survives, which 1 + 1e-7 in float32 would not)."""
    import torch

    log_probs = logits.to(getattr(torch, dtype)).log_softmax(dim=-1)
    return -log_probs.gather(dim=-1, index=labels[..., None])[..., 0]


def eval_row_losses(logits, labels):
    """Each row's cross-entropy for scoring a state, (b,) float64 (:func:`eval_row_scores`)."""
    return eval_row_scores(logits, labels, hits=False)[0]


def eval_row_scores(logits, labels, hits: bool = True):
    """(each row's cross-entropy (b,) float64, whether its largest logit is the label (b,)
    float64, as :func:`row_hits`; None without ``hits``) for scoring a state.

    The loss is ``top - pick + log(sum exp(x - top))``, in the logits' own float32 up to the
    sum: the terms at the top (each exactly 1) are counted, the others summed in float32, and
    the log taken as ``log1p`` in float64, so a loss of 1e-7 survives as in :func:`row_losses`
    and each row carries float32's relative rounding (means over a split agree with the
    all-float64 form to ~1e-8). The top and the label's logit also give the hits; rows with a
    tie at the top, or no finite top, take ``argmax``'s first index. Not for training: the
    trainers' losses stay the seed's float64 exactly."""
    import torch

    top = logits.amax(dim=-1, keepdim=True)
    at_top = logits == top
    rest = (logits - top).exp_().masked_fill_(at_top, 0.0).sum(dim=-1)
    n_top = at_top.sum(dim=-1)
    pick = logits.gather(-1, labels[:, None])[:, 0]
    loss = (top[:, 0] - pick).double() + torch.log1p((n_top - 1).double() + rest.double())
    if not hits:
        return loss, None
    hit = (pick == top[:, 0]) & (n_top == 1)
    odd = (n_top != 1).nonzero()[:, 0]     # ties at the top, or a NaN row
    if len(odd):
        hit[odd] = logits[odd].argmax(dim=-1) == labels[odd]
    return loss, hit.double()


def cross_entropy(logits, labels, dtype: str = "float64", mask=None):
    """Mean cross-entropy over the rows of ``logits`` (..., b, p) against ``labels`` (..., b):
    a scalar for one run, (R,) for stacked runs. ``mask`` (..., b) marks real rows; padding
    rows are left out and each run's mean is over its own rows."""
    import torch

    if mask is None and logits.dim() == 2 and logits.device.type == "cpu":
        from . import kernels

        return kernels.cross_entropy(logits, labels, getattr(torch, dtype))
    nll = row_losses(logits, labels, dtype)
    if mask is None:
        return nll.mean(dim=-1)
    return torch.where(mask, nll, 0.0).sum(dim=-1) / mask.sum(dim=-1)


def row_hits(logits, labels):
    """Whether each row's largest logit is its label, (..., b) float64."""
    return (logits.argmax(dim=-1) == labels).double()


def accuracy(logits, labels, mask=None):
    """Fraction of rows whose largest logit is the label (float64), masked as
    :func:`cross_entropy`."""
    hit = row_hits(logits, labels)
    if mask is None:
        return hit.mean(dim=-1)
    return (hit * mask).sum(dim=-1) / mask.sum(dim=-1)
