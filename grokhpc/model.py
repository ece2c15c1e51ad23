"""The seed's transformer, as a TransformerLens ``HookedRootModule``.

Parameter and hook names are TransformerLens's (``embed.W_E``, ``blocks.0.attn.W_Q``,
``blocks.0.attn.hook_pattern``, ``blocks.0.mlp.hook_post``, ``blocks.0.ln1.hook_scale``, ...),
so ``run_with_cache`` gives an ``ActivationCache`` where ``cache["pattern", 0]`` works, and a
state_dict has the keys and shapes of a ``HookedTransformer`` of the same shape (TransformerLens
2.x; 4.x dropped that class).

The seed's model is one block, no LayerNorm, a ReLU MLP, biases present but frozen at zero. A
run may ask for ``n_layers`` blocks, ``act_fn`` gelu (torch's exact GELU, TransformerLens's
``act_fn="gelu"``; not GPT-2's tanh ``gelu_new``) and ``normalization`` LN: TransformerLens's
``LayerNorm`` (``ln1`` before attention, ``ln2`` before the MLP, ``ln_final`` before the
unembedding; weight ``w`` initialised to 1, bias ``b`` to 0, both trained).

Two forward paths share the weights:

* ``forward(tokens)`` -- the readable, hooked, all-positions forward (analysis, tests);
* ``last_logits(tokens)`` -- the training path: the last position only. Where the algebra of
  ``grokhpc.lastpos`` holds (one block, no LayerNorm, any elementwise activation) it is
  computed from per-(position, token, head) tables, shared with packed training and the
  progress measures; elsewhere it is ``forward(tokens)[:, -1]``. Tests hold it to ``forward``
  (logits and gradients) for every shape. The distinct query tokens of a row tensor are found
  once while the tensor lives (``QueryCache``: ``torch.unique`` waits for a GPU).
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformer_lens import ActivationCache, HookedRootModule
from transformer_lens.hook_points import HookPoint

from . import lastpos
from .config import RunConfig


@dataclass(frozen=True)
class ModelShape:
    """The sizes ActivationCache and callers read as ``model.cfg``."""

    n_layers: int
    n_heads: int
    d_model: int
    d_head: int
    d_mlp: int
    d_vocab: int
    d_vocab_out: int
    n_ctx: int
    act_fn: str = "relu"
    normalization_type: str | None = None     # None or "LN", TransformerLens's values
    device: str = "cpu"
    eps: float = 1e-5                         # TransformerLens's LayerNorm epsilon

    @property
    def normalization(self) -> str:
        """The run field's value ("none" or "LN"), for ``lastpos.uses_fast_path``."""
        return "none" if self.normalization_type is None else self.normalization_type

    @property
    def initializer_range(self) -> float:
        """TransformerLens's "gpt2" init: std 0.8 / sqrt(d_model)."""
        return 0.8 / math.sqrt(self.d_model)


class Embed(nn.Module):
    def __init__(self, s: ModelShape):
        super().__init__()
        self.W_E = nn.Parameter(torch.empty(s.d_vocab, s.d_model))

    def forward(self, tokens):
        return self.W_E[tokens]


class PosEmbed(nn.Module):
    def __init__(self, s: ModelShape):
        super().__init__()
        self.W_pos = nn.Parameter(torch.empty(s.n_ctx, s.d_model))

    def forward(self, tokens):
        return self.W_pos[: tokens.shape[-1]].expand(tokens.shape[0], -1, -1)


class Attention(nn.Module):
    def __init__(self, s: ModelShape):
        super().__init__()
        h, d, e = s.n_heads, s.d_model, s.d_head
        # Registration order is TransformerLens's (query/output first, then key/value): the
        # "gpt2" init draws in this order, so it decides the initial weights.
        self.W_Q = nn.Parameter(torch.empty(h, d, e))
        self.W_O = nn.Parameter(torch.empty(h, e, d))
        self.b_Q = nn.Parameter(torch.zeros(h, e))
        self.b_O = nn.Parameter(torch.zeros(d))
        self.W_K = nn.Parameter(torch.empty(h, d, e))
        self.W_V = nn.Parameter(torch.empty(h, d, e))
        self.b_K = nn.Parameter(torch.zeros(h, e))
        self.b_V = nn.Parameter(torch.zeros(h, e))
        # Buffers kept only so the state_dict matches HookedTransformer's.
        self.register_buffer("mask", torch.tril(torch.ones(s.n_ctx, s.n_ctx)).bool())
        self.register_buffer("IGNORE", torch.tensor(-torch.inf))
        self.attn_scale = math.sqrt(e)
        self.hook_k = HookPoint()
        self.hook_q = HookPoint()
        self.hook_v = HookPoint()
        self.hook_z = HookPoint()
        self.hook_attn_scores = HookPoint()
        self.hook_pattern = HookPoint()

    def forward(self, x):
        q = self.hook_q(torch.einsum("bpd,hde->bphe", x, self.W_Q) + self.b_Q)
        k = self.hook_k(torch.einsum("bpd,hde->bphe", x, self.W_K) + self.b_K)
        v = self.hook_v(torch.einsum("bpd,hde->bphe", x, self.W_V) + self.b_V)
        scores = torch.einsum("bqhe,bkhe->bhqk", q, k) / self.attn_scale
        n = x.shape[1]
        scores = torch.where(self.mask[:n, :n], scores, self.IGNORE)
        pattern = self.hook_pattern(F.softmax(self.hook_attn_scores(scores), dim=-1))
        z = self.hook_z(torch.einsum("bkhe,bhqk->bqhe", v, pattern))
        return torch.einsum("bqhe,hed->bqd", z, self.W_O) + self.b_O


class LayerNorm(nn.Module):
    """TransformerLens's LayerNorm: centre, divide by sqrt(var + eps), then ``* w + b``."""

    def __init__(self, s: ModelShape):
        super().__init__()
        self.eps = s.eps
        self.w = nn.Parameter(torch.ones(s.d_model))
        self.b = nn.Parameter(torch.zeros(s.d_model))
        self.hook_scale = HookPoint()
        self.hook_normalized = HookPoint()

    def forward(self, x):
        x = x - x.mean(-1, keepdim=True)
        scale = self.hook_scale((x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
        return self.hook_normalized(x / scale * self.w + self.b)


def layer_norm(s: ModelShape) -> nn.Module:
    """A LayerNorm, or the identity where the model has none."""
    return LayerNorm(s) if s.normalization_type == "LN" else nn.Identity()


class MLP(nn.Module):
    def __init__(self, s: ModelShape):
        super().__init__()
        self.act = lastpos.activation(s.act_fn)
        self.W_in = nn.Parameter(torch.empty(s.d_model, s.d_mlp))
        self.b_in = nn.Parameter(torch.zeros(s.d_mlp))
        self.W_out = nn.Parameter(torch.empty(s.d_mlp, s.d_model))
        self.b_out = nn.Parameter(torch.zeros(s.d_model))
        self.hook_pre = HookPoint()
        self.hook_post = HookPoint()

    def forward(self, x):
        pre = self.hook_pre(x @ self.W_in + self.b_in)
        post = self.hook_post(self.act(pre))
        return post @ self.W_out + self.b_out


class TransformerBlock(nn.Module):
    def __init__(self, s: ModelShape):
        super().__init__()
        self.ln1, self.ln2 = layer_norm(s), layer_norm(s)   # registered first, as in TL
        self.attn = Attention(s)
        self.mlp = MLP(s)
        self.hook_resid_pre = HookPoint()
        self.hook_attn_out = HookPoint()
        self.hook_resid_mid = HookPoint()
        self.hook_mlp_out = HookPoint()
        self.hook_resid_post = HookPoint()

    def forward(self, resid):
        resid = self.hook_resid_pre(resid)
        resid = self.hook_resid_mid(resid + self.hook_attn_out(self.attn(self.ln1(resid))))
        return self.hook_resid_post(resid + self.hook_mlp_out(self.mlp(self.ln2(resid))))


class Unembed(nn.Module):
    def __init__(self, s: ModelShape):
        super().__init__()
        self.W_U = nn.Parameter(torch.empty(s.d_model, s.d_vocab_out))
        self.b_U = nn.Parameter(torch.zeros(s.d_vocab_out))

    def forward(self, x):
        return x @ self.W_U + self.b_U


class Transformer(HookedRootModule):
    """``n_layers`` blocks of attention + MLP, hooked like TransformerLens's HookedTransformer."""

    def __init__(self, shape: ModelShape):
        super().__init__()
        self.cfg = shape
        self.embed = Embed(shape)
        self.hook_embed = HookPoint()
        self.pos_embed = PosEmbed(shape)
        self.hook_pos_embed = HookPoint()
        self.blocks = nn.ModuleList([TransformerBlock(shape) for _ in range(shape.n_layers)])
        self.ln_final = layer_norm(shape)
        self.unembed = Unembed(shape)
        self.setup()

    # ---- the readable path ----------------------------------------------------------------
    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits at every position, (batch, n_ctx, d_vocab_out), through every hook."""
        resid = self.hook_embed(self.embed(tokens)) + self.hook_pos_embed(self.pos_embed(tokens))
        for block in self.blocks:
            resid = block(resid)
        return self.unembed(self.ln_final(resid))

    def run_with_cache(self, *args, **kwargs):
        """As HookedRootModule's, but the cache is an ``ActivationCache``."""
        out, cache = super().run_with_cache(*args, **kwargs)
        return out, ActivationCache(cache, self)

    # ---- the training path ----------------------------------------------------------------
    @property
    def fast_path(self) -> bool:
        """Whether ``last_logits`` uses ``grokhpc.lastpos`` (``lastpos.uses_fast_path``: one
        block and no LayerNorm, so the softmax is the only non-linearity before the MLP's
        elementwise activation)."""
        return lastpos.uses_fast_path(self.cfg)

    def last_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits at the last position only, (batch, d_vocab_out); equal to
        ``forward(tokens)[:, -1]``. On the fast path (see :attr:`fast_path`) computed from
        per-(position, token, head) tables without hooks; otherwise the hooked forward."""
        if self.fast_path:
            params = dict(self.named_parameters())
            queries = self._queries(tokens[None], params["embed.W_E"].dtype)
            return lastpos.last_logits(params, tokens, queries, act_fn=self.cfg.act_fn)
        return self.forward(tokens)[:, -1]

    def stacked_last_logits(self, P: dict, tokens: torch.Tensor) -> torch.Tensor:
        """``forward(tokens)[:, -1]`` of R stacked runs (weights ``P`` (R, *shape) by name,
        tokens (R, b, n) -> (R, b, p)): the hooked forward called with each run's weights under
        ``torch.func.vmap``."""
        from torch.func import functional_call, vmap

        def one(params, toks):
            return functional_call(self, params, (toks,))[:, -1]

        return vmap(one)(P, tokens)

    @property
    def _queries(self) -> "QueryCache":
        cache = self.__dict__.get("_query_cache")
        if cache is None:
            cache = self.__dict__["_query_cache"] = QueryCache()
        return cache


class QueryCache:
    """``lastpos.queries_of`` of the row tensors a model is called on, kept while each tensor
    lives and is unchanged: finding the distinct query tokens takes ``torch.unique``, which
    waits for the device on a GPU, so a trainer scoring the same train and test rows every
    epoch finds them once. A copy of the model starts with an empty cache."""

    def __init__(self):
        self.entries: dict[int, tuple] = {}

    def __call__(self, tokens: torch.Tensor, dtype) -> lastpos.Queries:
        base = tokens._base if tokens._base is not None else tokens
        key = (id(base), tokens.data_ptr(), tuple(tokens.shape), tokens.stride(), tokens.device,
               dtype)
        hit = self.entries.get(key)
        if hit is not None and hit[0]() is base and hit[1] == base._version:
            return hit[2]
        with torch.inference_mode(False):   # kept for training as well as scoring
            queries = lastpos.queries_of(tokens, dtype)
        entries = self.entries
        ref = weakref.ref(base, lambda _, k=key: entries.pop(k, None))
        entries[key] = (ref, base._version, queries)
        return queries

    def __deepcopy__(self, memo) -> "QueryCache":
        return QueryCache()


def shape_of(cfg: RunConfig) -> ModelShape:
    return ModelShape(n_layers=cfg.n_layers, n_heads=cfg.n_heads, d_model=cfg.d_model,
                      d_head=cfg.d_head, d_mlp=cfg.d_mlp, d_vocab=cfg.d_vocab,
                      d_vocab_out=cfg.n_classes, n_ctx=cfg.n_ctx, act_fn=cfg.act_fn,
                      normalization_type=None if cfg.normalization == "none" else "LN")


def init_weights(model: Transformer, seed: int) -> None:
    """TransformerLens "gpt2" init under ``seed``: every ``W_*`` ~ N(0, 0.8/sqrt(d_model)) in
    parameter order, biases zero, LayerNorm weights one. Reproduces the seed's initial
    losses."""
    gen = torch.Generator().manual_seed(seed)
    std = model.cfg.initializer_range
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "W_" in name:
                param.copy_(torch.normal(0.0, std, size=param.shape, generator=gen))
            elif is_layer_norm(name) and name.endswith(".w"):
                param.fill_(1.0)
            else:
                param.zero_()


def is_layer_norm(name: str) -> bool:
    return name.startswith("ln_final.") or ".ln1." in name or ".ln2." in name


def freeze_biases(model: Transformer) -> None:
    """The seed trains with every bias of attention, MLP and unembedding frozen at zero
    (LayerNorm weights and biases are trained)."""
    for name, param in model.named_parameters():
        if ".b_" in name or name.startswith("b_"):
            param.requires_grad_(False)


def scale_init(model: nn.Module, alpha: float) -> None:
    """Omnigrok's alpha: every parameter of a fresh model (LayerNorm's too) multiplied by it."""
    if alpha != 1.0:
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(alpha)


def build_model(cfg: RunConfig, device: str | torch.device = "cpu") -> Transformer:
    """A freshly initialised model for ``cfg`` (on CPU, then moved: init is device-independent)."""
    model = Transformer(shape_of(cfg))
    init_weights(model, cfg.model_seed)
    scale_init(model, cfg.init_scale)
    freeze_biases(model)
    return model.to(device)


def flat_weights(model: Transformer) -> torch.Tensor:
    """Every parameter, flattened and concatenated in state_dict order (a checkpoint row)."""
    return torch.cat([p.detach().reshape(-1).float() for _, p in model.named_parameters()])


def param_layout(model: Transformer) -> list[tuple[str, list[int]]]:
    """(name, shape) of each parameter, in the order ``flat_weights`` uses."""
    return [(n, list(p.shape)) for n, p in model.named_parameters()]


def load_flat(model: Transformer, row) -> Transformer:
    """Copy a checkpoint row (from ``flat_weights``) back into ``model``'s parameters."""
    row = torch.as_tensor(row)
    expected = sum(p.numel() for p in model.parameters())
    if row.numel() != expected:
        raise ValueError(f"checkpoint row has {row.numel()} values, model has {expected}")
    offset = 0
    with torch.no_grad():
        for _, p in model.named_parameters():
            n = p.numel()
            p.copy_(row[offset:offset + n].view_as(p))
            offset += n
    return model
