"""The model's shape fields (n_layers, act_fn, normalization): TransformerLens's names and
numbers, the training path equal to the readable forward for every combination, and the fast
path taken exactly where its algebra holds."""

import itertools
import json
import math
from pathlib import Path

import pytest
import torch

from grokhpc import lastpos
from grokhpc.config import RunConfig
from grokhpc.model import build_model
from grokhpc.train import loss_fn

torch.set_num_threads(1)   # tiny tensors on shared cores

REFERENCE = Path(__file__).parent / "data" / "tl2_ln_gelu_2layer.json"
SMALL = dict(p=13, d_model=32, n_heads=4, d_head=8, d_mlp=48, device="cpu")
COMBINATIONS = list(itertools.product((1, 2), ("relu", "gelu"), ("none", "LN")))


def _cfg(n_layers=1, act_fn="relu", normalization="none", **kw):
    return RunConfig(**{**SMALL, **kw}, n_layers=n_layers, act_fn=act_fn,
                     normalization=normalization)


# ---- TransformerLens ------------------------------------------------------------------------
def test_state_dict_and_logits_match_a_transformerlens_hookedtransformer():
    """tests/data/tl2_reference.py recorded a TransformerLens 2.x HookedTransformer (2 blocks,
    LN, gelu) on seeded weights: our model has its state_dict keys in its order, loads the same
    weights strictly and gives its logits and LayerNorm scales."""
    ref = json.loads(REFERENCE.read_text())
    s = ref["shape"]
    cfg = RunConfig(p=s["d_vocab_out"], d_model=s["d_model"], n_heads=s["n_heads"],
                    d_head=s["d_head"], d_mlp=s["d_mlp"], n_layers=s["n_layers"],
                    act_fn=s["act_fn"], normalization=s["normalization_type"])
    model = build_model(cfg)
    ours = [[k, list(v.shape)] for k, v in model.state_dict().items()]
    assert ours == ref["state_dict"]
    gen = torch.Generator().manual_seed(0)       # the reference's seeded_weights
    weights = {}
    for name, shape in ref["parameters"]:
        w = torch.randn(shape, generator=gen) * 0.5
        weights[name] = 1.0 + 0.4 * w if name.endswith(".w") else w
    model.load_state_dict({**model.state_dict(), **weights}, strict=True)
    tokens = torch.tensor(ref["tokens"])
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
    want = torch.tensor(ref["logits"])
    assert (logits - want).abs().max() <= 1e-5 * want.abs().max()
    torch.testing.assert_close(cache["ln_final.hook_scale"][..., 0],
                               torch.tensor(ref["ln_final_scale"]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cache["scale", 1, "ln2"][..., 0],
                               torch.tensor(ref["ln2_scale_block1"]), rtol=1e-5, atol=1e-6)


def test_layer_norm_and_gelu_agree_with_torch():
    """ln1 is torch's layer_norm (eps 1e-5) of the residual; the MLP's activation is the exact
    GELU 0.5 x (1 + erf(x / sqrt 2)); every block and hook is in the cache."""
    model = build_model(_cfg(2, "gelu", "LN"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))) * 0.3)
        _, cache = model.run_with_cache(torch.randint(0, 14, (20, 3)))
    ln1 = model.blocks[1].ln1
    want = torch.nn.functional.layer_norm(cache["resid_pre", 1], (32,), ln1.w, ln1.b, eps=1e-5)
    torch.testing.assert_close(cache["normalized", 1, "ln1"], want, rtol=1e-5, atol=1e-5)
    pre = cache["pre", 1, "mlp"].double()
    gelu = 0.5 * pre * (1 + torch.erf(pre / math.sqrt(2)))
    torch.testing.assert_close(cache["post", 1, "mlp"].double(), gelu, rtol=1e-6, atol=1e-6)
    for name in ("blocks.0.ln1.hook_scale", "blocks.1.ln2.hook_normalized",
                 "ln_final.hook_scale", "ln_final.hook_normalized", "blocks.1.mlp.hook_post"):
        assert name in cache, name


@pytest.mark.parametrize("n_layers,act_fn,normalization", COMBINATIONS)
def test_shape_init_and_trainable_parameters(n_layers, act_fn, normalization):
    model = build_model(_cfg(n_layers, act_fn, normalization))
    s = model.cfg
    assert (s.n_layers, s.act_fn, s.normalization_type) == \
        (n_layers, act_fn, None if normalization == "none" else "LN")
    assert len(model.blocks) == n_layers
    names = dict(model.named_parameters())
    ln = [n for n in names if ".ln" in n or n.startswith("ln_final")]
    assert len(ln) == (0 if normalization == "none" else 4 * n_layers + 2)
    for n, p in names.items():
        if n in ln:   # LayerNorm: weight 1, bias 0, trained
            assert p.requires_grad and torch.equal(p, torch.full_like(p, float(n.endswith(".w"))))
        elif ".b_" in n:
            assert not p.requires_grad and torch.count_nonzero(p) == 0
        else:
            assert p.requires_grad and abs(p.std().item() - 0.8 / math.sqrt(32)) < 0.05


def test_default_shape_builds_the_seed_model_exactly():
    """The default fields leave the seed's model: the same weights as the first block of a
    2-block model drawn under the same seed (draws follow parameter order)."""
    one, two = build_model(RunConfig(**SMALL)), build_model(_cfg(2))
    assert one.fast_path and not two.fast_path
    for n, p in one.blocks[0].named_parameters():
        assert torch.equal(p, two.blocks[0].get_parameter(n)), n


# ---- the training path against the readable forward ------------------------------------------
def _randomised(cfg):
    """Every parameter random (biases nonzero, LayerNorm weights around 1) and trainable."""
    model = build_model(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.2 * r if n.endswith(".w") else 0.3 * r)
            p.requires_grad_(True)
    return model


@pytest.mark.parametrize("n_layers,act_fn,normalization", COMBINATIONS)
def test_last_logits_equals_hooked_forward_and_takes_the_fast_path_where_it_holds(
        monkeypatch, n_layers, act_fn, normalization):
    cfg = _cfg(n_layers, act_fn, normalization)
    model = _randomised(cfg)
    p = cfg.p
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, p + 1, (300, 3), generator=g)   # any token anywhere
    tokens[:150, 2] = p                                          # and the training format
    labels = torch.randint(0, p, (300,), generator=g)

    calls = []
    real = lastpos.last_logits
    monkeypatch.setattr(lastpos, "last_logits",
                        lambda *a, **k: calls.append(k.get("act_fn")) or real(*a, **k))
    grads, logits = [], []
    for fn in (lambda: model(tokens)[:, -1], lambda: model.last_logits(tokens)):
        model.zero_grad()
        out = fn()
        loss_fn(out, labels).backward()
        logits.append(out.detach())
        grads.append({k: v.grad.clone() for k, v in model.named_parameters()})
    fast = n_layers == 1 and normalization == "none"
    assert calls == ([act_fn] if fast else [])
    full, got = logits
    assert (got - full).abs().max() <= 1e-5 * full.abs().max()
    overall = max(v.abs().max().item() for v in grads[0].values())
    for name in grads[0]:
        a, b = grads[0][name], grads[1][name]
        assert (a - b).abs().max().item() <= 1e-6 * overall + 1e-4 * a.abs().max().item(), name
    assert grads[0][f"blocks.{n_layers - 1}.mlp.W_in"].abs().max() > 1e-3   # not vacuous
