"""The one-run CPU kernel of the last position's logits: tables in the MLP's input space, one
weighted gather per row, and a backward written by hand.

The algebra is :mod:`grokhpc.lastpos`'s, carried one map further. A row's residual stream at the
last position is its query's own terms plus, per earlier position and head, the pattern weight
times a value row; everything up to the MLP's activation is linear in it. So every value row is
read through ``W_O`` and ``[W_in | W_U]`` once, into a table row of width ``d_mlp + p``, and the
pre-activation and the direct logits of a row are one sum of ``h (n - 1) + 1`` weighted table
rows (``F.embedding_bag``). The pattern to the query's own key is ``1 - the others``, so its
value is folded into a per-query base row and into the other rows as a difference (as
:func:`grokhpc.lastpos.grid_terms` does). What is left per row is the read-out
``act(pre) @ (W_out @ W_U)``: one 2-D GEMM forward, two backward.

Tables come from the weights through autograd (small products); the rows' part is a
``torch.autograd.Function`` whose backward is: the two read-out GEMMs, the activation's mask in
place, the tables' gradient as a weighted gather of gradient rows (the rows of each table row,
found once per row tensor), the pattern's gradient as sampled dot products
(``torch.sparse.sampled_addmm``), and the score tables' gradient from the softmax's. A sum over
every row of one query (its base row and own score) is a matmul, never a float32 running sum.
Every reduction has one fixed order: a step is bit-reproducible at a given thread count.

The readable hooked ``Transformer.forward`` is the reference (tests/test_kernels.py, and through
``Transformer.last_logits`` tests/test_model.py).
"""

from __future__ import annotations

import math
import warnings
import weakref
from contextlib import contextmanager
from typing import Any, NamedTuple


@contextmanager
def unfilled():
    """torch's deterministic mode fills every new buffer with NaN (a guard for kernels that
    might leave some of it unwritten); the kernels here write every element of theirs, so the
    passes are skipped for the block."""
    import torch.utils.deterministic as det

    before = det.fill_uninitialized_memory
    det.fill_uninitialized_memory = False
    try:
        yield
    finally:
        det.fill_uninitialized_memory = before


class Plan(NamedTuple):
    """Where each row reads and writes in the tables, for one row tensor; ``K = h (n - 1)``
    pattern columns, head-major, then the row's base."""

    idx: Any        # (b, K + 1) long: table rows, ascending within a row
    sidx: Any       # (n - 1, b, h) long: each row's entries of the score table
    qi: Any         # (b,) long: each row's query among the distinct ones
    onehot: Any     # (b, U) float: qi one-hot (sums over a query's rows as a matmul)
    csr: Any        # (b, U * rows_q) sparse CSR of the pattern columns (values unused)
    t_rows: Any     # (b K,) long: rows of each table row's bag, grouped by table row
    t_order: Any    # (b K,) long: where each bag entry's weight sits in the (b, K) weights
    t_offsets: Any  # (U * rows_q,) long: start of each table row's bag
    rows_q: int     # table rows per query: h (n - 1) V + 1


def make_plan(tokens, q_index, n_queries: int, V: int, h: int, dtype) -> Plan:
    """The plan of rows ``tokens`` (b, n) whose queries are ``q_index`` (b,) among
    ``n_queries``, for a vocabulary of ``V`` and ``h`` heads."""
    import torch

    b, n = tokens.shape
    K, rows_q = h * (n - 1), h * (n - 1) * V + 1
    dev = tokens.device
    within = (torch.arange(h, device=dev)[:, None] * ((n - 1) * V)
              + torch.arange(n - 1, device=dev) * V)                           # (h, n-1)
    key = (within[None] + tokens[:, None, :-1]).reshape(b, K)
    idx = torch.cat([key + (q_index * rows_q)[:, None], (q_index * rows_q + rows_q - 1)[:, None]],
                    dim=1)
    flat = idx[:, :K].reshape(-1)
    t_order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=n_queries * rows_q)
    crow = torch.arange(0, b * K + 1, K, device=dev)
    with warnings.catch_warnings():   # CSR support is beta; the kernel uses one call of it
        warnings.simplefilter("ignore")
        csr = torch.sparse_csr_tensor(crow, flat, torch.zeros(b * K, dtype=dtype, device=dev),
                                      size=(b, n_queries * rows_q), check_invariants=False)
    sidx = (key + (q_index * (rows_q - 1))[:, None]).view(b, h, n - 1).permute(2, 0, 1)
    return Plan(idx=idx.contiguous(), sidx=sidx.contiguous(), qi=q_index,
                onehot=torch.nn.functional.one_hot(q_index, n_queries).to(dtype), csr=csr,
                t_rows=torch.div(t_order, K, rounding_mode="floor"), t_order=t_order,
                t_offsets=torch.cumsum(counts, 0) - counts, rows_q=rows_q)


class PlanCache:
    """Plans of the row tensors seen, kept while their queries' index tensor lives and the rows
    are unchanged (a trainer scores the same train and test rows every epoch, with the queries
    the model keeps for them; a plan takes a sort)."""

    def __init__(self):
        self.entries: dict[int, tuple] = {}

    def __call__(self, tokens, q_index, n_queries: int, V: int, h: int, dtype) -> Plan:
        """The plan of ``tokens`` (b, n) with queries ``q_index`` (1, b)."""
        import torch

        base = tokens._base if tokens._base is not None else tokens
        check = (tokens.data_ptr(), tuple(tokens.shape), tokens.stride(), base._version,
                 n_queries, V, h, dtype)
        hit = self.entries.get(id(q_index))
        if hit is not None and hit[0]() is q_index and hit[1]() is base and hit[2] == check:
            return hit[3]
        with torch.inference_mode(False):   # kept for training as well as scoring
            plan = make_plan(tokens, q_index[0].clone(), n_queries, V, h, dtype)
        entries, key = self.entries, id(q_index)
        ref = weakref.ref(q_index, lambda _: entries.pop(key, None))
        entries[key] = (ref, weakref.ref(base), check, plan)
        return plan


plans = PlanCache()


class Tables(NamedTuple):
    """The differentiable inputs of the rows' part, from one run's weights (autograd)."""

    scores: Any      # (U (rows_q - 1),) score of each (query, head, position, key token) / sqrt(e)
    own_scores: Any  # (U, h) each query's score of its own key
    VW: Any          # (h, (n-1) V, D) each value row read through W_O and [W_in | W_U]
    own: Any         # (U, h, D) each query's own value row, read alike
    base: Any        # (U, D) what a row of the query holds whatever its pattern
    W_logit: Any     # (d_mlp, p) = W_out @ W_U


def tables(w, n: int, query_tokens) -> Tables:
    """The tables of one run's weights ``w`` (``lastpos.Weights`` without a run axis) for
    ``n`` positions, the last holding ``query_tokens`` (U,); ``D = d_mlp + p``."""
    import torch

    h, d, e = w.W_Q.shape
    x = w.W_E + w.W_pos[:n, None]                                           # (n, V, d)
    early, x_last = x[:-1], x[-1][query_tokens]
    scale = math.sqrt(e)
    qv = torch.einsum("ud,hde->uhe", x_last, w.W_Q) + w.b_Q                    # (U, h, e)
    k = torch.einsum("pvd,hde->hpve", early, w.W_K) + w.b_K[:, None, None]    # (h, n-1, V, e)
    scores = torch.einsum("uhe,hpve->uhpv", qv, k) / scale
    own_k = torch.einsum("ud,hde->uhe", x_last, w.W_K) + w.b_K
    values = torch.einsum("pvd,hde->hpve", early, w.W_V) + w.b_V[:, None, None]
    own_v = torch.einsum("ud,hde->uhe", x_last, w.W_V) + w.b_V
    read = torch.cat([w.W_in, w.W_U], dim=1)                                  # (d, D)
    bias = torch.cat([w.b_in, w.b_U + w.b_out @ w.W_U])
    WOM = torch.matmul(w.W_O, read)                                           # (h, e, D)
    own = torch.einsum("uhe,hef->uhf", own_v, WOM)                            # (U, h, D)
    return Tables(scores=scores.reshape(-1), own_scores=(qv * own_k).sum(-1) / scale,
                  VW=torch.bmm(values.reshape(h, -1, e), WOM), own=own,
                  base=(x_last + w.b_O) @ read + bias + own.sum(1), W_logit=w.W_out @ w.W_U)


def column_blocks(d_mlp: int, p: int, table_rows: int, itemsize: int) -> list[int]:
    """Widths of the table's column blocks: the MLP's columns cut so that one block of the
    table stays in a core's L2 cache while every row gathers from it (half a MiB), then the
    direct logits' ``p``."""
    n = max(1, -(-d_mlp * table_rows * itemsize // (512 * 1024)))
    width = -(-d_mlp // n)
    return [min(width, d_mlp - i) for i in range(0, d_mlp, width)] + [p]


def _table_blocks(t: Tables, rows_q: int, widths: list[int]) -> list:
    """Each column block of the table, contiguous (U rows_q, width): per query, its value rows
    less its own (the pattern to the own key is 1 - the others'), then its base."""
    import torch

    U, (h, L, _) = t.own.shape[0], t.VW.shape
    out, c = [], 0
    for width in widths:
        blk = torch.empty(U, rows_q, width, dtype=t.VW.dtype, device=t.VW.device)
        torch.sub(t.VW[None, :, :, c:c + width], t.own[:, :, None, c:c + width],
                  out=blk[:, :-1].view(U, h, L, width))
        blk[:, -1] = t.base[:, c:c + width]
        out.append(blk.view(U * rows_q, width))
        c += width
    return out


def _pattern(scores, own_scores, plan: Plan):
    """Each row's attention pattern, position first (n, b, h): its scores looked up, its own
    last, the softmax over positions."""
    import torch

    s = torch.cat([scores[plan.sidx], own_scores[plan.qi][None]], dim=0)
    return torch.softmax(s, dim=0)


class Saved(NamedTuple):
    """What the backward reads: the forward's pattern, gather weights, table blocks, and per
    MLP block its activation's output (and input, for GELU)."""

    pattern: Any
    weights: Any
    blocks: list
    posts: list
    pres: list


def _forward(t: Tables, plan: Plan, act_fn: str):
    """(logits (b, p), :class:`Saved`): each row's weighted sum of table rows, block by block;
    the activation in place on the MLP's blocks; the direct logits' block plus the read-out."""
    import torch
    import torch.nn.functional as F

    W_logit = t.W_logit.detach()
    widths = column_blocks(W_logit.shape[0], W_logit.shape[1], t.VW.shape[1] * t.VW.shape[0],
                           W_logit.element_size())
    blocks = _table_blocks(Tables(*(x.detach() for x in t)), plan.rows_q, widths)
    pattern = _pattern(t.scores.detach(), t.own_scores.detach(), plan)
    n, b, h = pattern.shape
    weights = torch.empty(b, plan.idx.shape[1], dtype=W_logit.dtype, device=W_logit.device)
    weights[:, :-1].view(b, h, n - 1).copy_(pattern[:-1].permute(1, 2, 0))
    weights[:, -1] = 1.0
    mixed = [F.embedding_bag(plan.idx, blk, per_sample_weights=weights, mode="sum")
             for blk in blocks]
    logits, posts, pres, r = mixed[-1], [], [], 0
    for pre in mixed[:-1]:
        post = pre.relu_() if act_fn == "relu" else F.gelu(pre)
        logits.addmm_(post, W_logit[r:r + pre.shape[1]])
        posts.append(post)
        pres.append(pre)
        r += pre.shape[1]
    return logits, Saved(pattern, weights, blocks, posts, pres if act_fn != "relu" else [])


def _rows_function():
    import torch

    class _Rows(torch.autograd.Function):
        @staticmethod
        def forward(ctx, scores, own_scores, VW, own, base, W_logit, plan, act_fn):
            with unfilled():
                logits, saved = _forward(Tables(scores, own_scores, VW, own, base, W_logit),
                                         plan, act_fn)
            ctx.saved, ctx.plan, ctx.act_fn = saved, plan, act_fn
            ctx.shapes = (VW.shape, own.shape)
            ctx.save_for_backward(W_logit)
            return logits

        @staticmethod
        def backward(ctx, grad):
            with unfilled():
                return _backward(ctx, grad) + (None, None)

    return _Rows


def _grad_mix(ctx, grad, W_logit) -> tuple[list, Any]:
    """(the gradient of each block's gathered sum, the gradient of W_logit): the read-out's
    two GEMMs per MLP block, the activation's derivative in place; the direct block's is
    ``grad`` itself."""
    import torch

    sv = ctx.saved
    g_logit = grad.new_empty(W_logit.shape) if ctx.needs_input_grad[5] else None
    gmix, r = [], 0
    for i, post in enumerate(sv.posts):
        rows = slice(r, r + post.shape[1])
        if g_logit is not None:
            torch.mm(post.t(), grad, out=g_logit[rows])
        g = torch.mm(grad, W_logit[rows].t())
        if ctx.act_fn == "relu":
            torch.ops.aten.threshold_backward.grad_input(g, post, 0, grad_input=g)
        else:
            g = torch.ops.aten.gelu_backward(g, sv.pres[i])
        gmix.append(g)
        r += post.shape[1]
    return gmix + [grad], g_logit


def _backward(ctx, grad):
    """Gradients of (scores, own_scores, VW, own, base, W_logit) from the logits' ``grad``."""
    import torch
    import torch.nn.functional as F

    (W_logit,), sv, plan, need = ctx.saved_tensors, ctx.saved, ctx.plan, ctx.needs_input_grad
    gmix, g_logit = _grad_mix(ctx, grad.contiguous(), W_logit)
    (h, L, D), U = ctx.shapes[0], ctx.shapes[1][0]
    g_VW = [] if need[2] else None
    g_own = grad.new_empty(U, h, D) if need[3] else None
    g_base = grad.new_empty(U, D) if need[4] else None
    n, b, _ = sv.pattern.shape
    K = sv.weights.shape[1] - 1
    bag_w = sv.weights[:, :K].reshape(-1)[plan.t_order]
    dots, c = 0, 0
    for g, blk in zip(gmix, sv.blocks):
        width = g.shape[1]
        cols = slice(c, c + width)
        if need[2] or need[3]:
            gt = F.embedding_bag(plan.t_rows, g, plan.t_offsets, mode="sum",
                                 per_sample_weights=bag_w).view(U, plan.rows_q, width)
            rel = gt[:, :-1].view(U, h, L, width)
            if g_VW is not None:
                g_VW.append(rel[0] if U == 1 else rel.sum(0))
            if g_own is not None:
                torch.sum(rel, dim=2, out=g_own[..., cols]).neg_()
        if g_base is not None:
            if U == 1:   # torch's sum adds in blocks (cascade), not one long float32 sum
                torch.sum(g, dim=0, keepdim=True, out=g_base[:, cols])
            else:
                torch.mm(plan.onehot.t(), g, out=g_base[:, cols])
        if need[0] or need[1]:
            dots = dots + torch.sparse.sampled_addmm(plan.csr, g, blk.t(), beta=0.0).values()
        c += width
    g_VW = None if g_VW is None else torch.cat(g_VW, dim=-1)
    g_scores = g_own_s = None
    if need[0] or need[1]:
        g_pat = sv.pattern.new_zeros(sv.pattern.shape)  # the pattern to the own key: no term
        g_pat[:-1] = dots.view(b, h, n - 1).permute(2, 0, 1)
        g_s = torch._softmax_backward_data(g_pat, sv.pattern, 0, sv.pattern.dtype)
        if need[0]:
            g_scores = torch.zeros(U * (plan.rows_q - 1), dtype=g_s.dtype, device=g_s.device)
            g_scores.index_add_(0, plan.sidx.view(-1), g_s[:-1].reshape(-1))
        if need[1]:
            g_own_s = g_s[-1].sum(0, keepdim=True) if U == 1 else plan.onehot.t() @ g_s[-1]
    return g_scores, g_own_s, g_VW, g_own, g_base, g_logit


def applies(tokens, n_queries: int, V: int, h: int) -> bool:
    """Whether the kernel serves rows ``tokens`` (b, n): one run's, on a CPU, with tables no
    larger than the rows (a few distinct queries, as every train and test set has)."""
    b, n = tokens.shape
    return tokens.device.type == "cpu" and n >= 2 and n_queries * h * (n - 1) * V <= max(b, 1)


class RowsFn:
    """The rows' autograd Function, built on first use (torch is imported lazily)."""

    fn = None


def last_logits(w, tokens, queries, act_fn: str = "relu"):
    """Logits (b, p) at the last position of one run (weights ``w``, ``lastpos.Weights``
    without a run axis) on rows ``tokens`` (b, n) with ``queries`` (``lastpos.Queries`` of
    ``tokens[None]``)."""
    import torch

    V, h = w.W_E.shape[0], w.W_Q.shape[0]
    U = len(queries.tokens)
    plan = plans(tokens, queries.index, U, V, h, w.W_E.dtype)
    t = tables(w, tokens.shape[1], queries.tokens)
    if not torch.is_grad_enabled() or not any(x.requires_grad for x in t):
        with unfilled():
            return _forward(t, plan, act_fn)[0]
    if RowsFn.fn is None:
        RowsFn.fn = _rows_function()
    return RowsFn.fn.apply(*t, plan, act_fn)


# ---- the loss ----------------------------------------------------------------------------------
def _row_losses(logits, labels, dtype):
    """(each row's cross-entropy in ``dtype``, exp(x - max) of each row, its row sums): one
    exponential per logit, kept for the backward."""
    x = logits.to(dtype, copy=True)
    top = logits.amax(dim=-1, keepdim=True).to(dtype)
    e = x.sub_(top).exp_()
    s = e.sum(dim=-1, keepdim=True)
    pick = logits.gather(-1, labels[:, None]).to(dtype)
    return ((top - pick) + s.log())[:, 0], e, s


class CrossEntropyFn:
    fn = None


def _cross_entropy_function():
    import torch

    class _CrossEntropy(torch.autograd.Function):
        @staticmethod
        def forward(ctx, logits, labels, dtype):
            with unfilled():
                nll, e, s = _row_losses(logits, labels, dtype)
            ctx.save_for_backward(e, s, labels)
            ctx.in_dtype = logits.dtype
            return nll.mean()

        @staticmethod
        def backward(ctx, grad):
            e, s, labels = ctx.saved_tensors
            with unfilled():
                scale = grad / len(labels)
                g = e * (scale / s)                    # softmax times the mean's weight
                g[torch.arange(len(labels), device=g.device), labels] -= scale
                return g.to(ctx.in_dtype), None, None

    return _CrossEntropy


def cross_entropy(logits, labels, dtype):
    """Mean cross-entropy of ``logits`` (b, p) against ``labels`` (b,), computed in ``dtype``
    (a torch dtype), with a backward that reuses the forward's exponentials."""
    import torch

    if not torch.is_grad_enabled() or not logits.requires_grad:
        with unfilled():
            return _row_losses(logits, labels, dtype)[0].mean()
    if CrossEntropyFn.fn is None:
        CrossEntropyFn.fn = _cross_entropy_function()
    return CrossEntropyFn.fn.apply(logits, labels, dtype)
