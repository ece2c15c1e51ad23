"""The one-layer transformer of the seed, as a TransformerLens ``HookedRootModule``.

Parameter and hook names are TransformerLens's (``embed.W_E``, ``blocks.0.attn.W_Q``,
``blocks.0.attn.hook_pattern``, ``blocks.0.mlp.hook_post``, ...), so ``run_with_cache`` gives an
``ActivationCache`` where ``cache["pattern", 0]`` works, and a state_dict has the keys and shapes
of the seed's ``HookedTransformer``. There is no LayerNorm, the MLP is ReLU, and the biases exist
but are frozen at zero.

Two forward paths share the weights:

* ``forward(tokens)`` -- the readable, hooked, all-positions forward (analysis, tests);
* ``last_logits(tokens)`` -- the training path: the last position only, from
  per-(position, token, head) tables (``grokhpc.lastpos``, shared with packed training and the
  progress measures). Tests hold it to ``forward`` (logits and gradients).
"""

from __future__ import annotations

import math
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
    normalization_type: None = None
    device: str = "cpu"

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


class MLP(nn.Module):
    def __init__(self, s: ModelShape):
        super().__init__()
        self.W_in = nn.Parameter(torch.empty(s.d_model, s.d_mlp))
        self.b_in = nn.Parameter(torch.zeros(s.d_mlp))
        self.W_out = nn.Parameter(torch.empty(s.d_mlp, s.d_model))
        self.b_out = nn.Parameter(torch.zeros(s.d_model))
        self.hook_pre = HookPoint()
        self.hook_post = HookPoint()

    def forward(self, x):
        pre = self.hook_pre(x @ self.W_in + self.b_in)
        post = self.hook_post(F.relu(pre))
        return post @ self.W_out + self.b_out


class TransformerBlock(nn.Module):
    def __init__(self, s: ModelShape):
        super().__init__()
        self.attn = Attention(s)
        self.mlp = MLP(s)
        self.hook_resid_pre = HookPoint()
        self.hook_attn_out = HookPoint()
        self.hook_resid_mid = HookPoint()
        self.hook_mlp_out = HookPoint()
        self.hook_resid_post = HookPoint()

    def forward(self, resid):
        resid = self.hook_resid_pre(resid)
        resid = self.hook_resid_mid(resid + self.hook_attn_out(self.attn(resid)))
        return self.hook_resid_post(resid + self.hook_mlp_out(self.mlp(resid)))


class Unembed(nn.Module):
    def __init__(self, s: ModelShape):
        super().__init__()
        self.W_U = nn.Parameter(torch.empty(s.d_model, s.d_vocab_out))
        self.b_U = nn.Parameter(torch.zeros(s.d_vocab_out))

    def forward(self, x):
        return x @ self.W_U + self.b_U


class Transformer(HookedRootModule):
    """One attention layer + one MLP, hooked like TransformerLens's HookedTransformer."""

    def __init__(self, shape: ModelShape):
        super().__init__()
        self.cfg = shape
        self.embed = Embed(shape)
        self.hook_embed = HookPoint()
        self.pos_embed = PosEmbed(shape)
        self.hook_pos_embed = HookPoint()
        self.blocks = nn.ModuleList([TransformerBlock(shape)])
        self.unembed = Unembed(shape)
        self.setup()

    # ---- the readable path ----------------------------------------------------------------
    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits at every position, (batch, n_ctx, d_vocab_out), through every hook."""
        resid = self.hook_embed(self.embed(tokens)) + self.hook_pos_embed(self.pos_embed(tokens))
        for block in self.blocks:
            resid = block(resid)
        return self.unembed(resid)

    def run_with_cache(self, *args, **kwargs):
        """As HookedRootModule's, but the cache is an ``ActivationCache``."""
        out, cache = super().run_with_cache(*args, **kwargs)
        return out, ActivationCache(cache, self)

    # ---- the training path ----------------------------------------------------------------
    def last_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits at the last position only, (batch, d_vocab_out); no hooks. Equal to
        ``forward(tokens)[:, -1]``, computed from per-(position, token, head) tables
        (``grokhpc.lastpos``)."""
        return lastpos.last_logits(dict(self.named_parameters()), tokens)


def shape_of(cfg: RunConfig) -> ModelShape:
    return ModelShape(n_layers=1, n_heads=cfg.n_heads, d_model=cfg.d_model, d_head=cfg.d_head,
                      d_mlp=cfg.d_mlp, d_vocab=cfg.d_vocab, d_vocab_out=cfg.n_classes,
                      n_ctx=cfg.n_ctx)


def init_weights(model: Transformer, seed: int) -> None:
    """TransformerLens "gpt2" init under ``seed``: every ``W_*`` ~ N(0, 0.8/sqrt(d_model)) in
    parameter order, biases zero. Reproduces the seed's initial losses."""
    gen = torch.Generator().manual_seed(seed)
    std = model.cfg.initializer_range
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "W_" in name:
                param.copy_(torch.normal(0.0, std, size=param.shape, generator=gen))
            else:
                param.zero_()


def freeze_biases(model: Transformer) -> None:
    """The seed trains with every bias frozen at zero."""
    for name, param in model.named_parameters():
        if ".b_" in name or name.startswith("b_"):
            param.requires_grad_(False)


def build_model(cfg: RunConfig, device: str | torch.device = "cpu") -> Transformer:
    """A freshly initialised model for ``cfg`` (on CPU, then moved: init is device-independent)."""
    model = Transformer(shape_of(cfg))
    init_weights(model, cfg.model_seed)
    if cfg.init_scale != 1.0:   # Omnigrok's alpha: every weight scaled at initialisation
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(cfg.init_scale)
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
