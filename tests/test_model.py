"""The hooked model: seed initialisation, TransformerLens names, and fast == readable path."""

import math

import pytest
import torch
from transformer_lens import ActivationCache

from grokhpc.config import RunConfig
from grokhpc.data import make_dataset
from grokhpc.model import build_model, flat_weights, load_flat, param_layout
from grokhpc.train import loss_fn

SEED_TRAIN_LOSS = 4.732243928451223   # printed by the seed notebook
SEED_TEST_LOSS = 4.7345742216589235

# Keys and shapes of the seed's HookedTransformer(cfg).state_dict() for its config.
SEED_STATE_DICT = {
    "embed.W_E": (114, 128), "pos_embed.W_pos": (3, 128),
    "blocks.0.attn.W_Q": (4, 128, 32), "blocks.0.attn.W_K": (4, 128, 32),
    "blocks.0.attn.W_V": (4, 128, 32), "blocks.0.attn.W_O": (4, 32, 128),
    "blocks.0.attn.b_Q": (4, 32), "blocks.0.attn.b_K": (4, 32), "blocks.0.attn.b_V": (4, 32),
    "blocks.0.attn.b_O": (128,), "blocks.0.attn.mask": (3, 3), "blocks.0.attn.IGNORE": (),
    "blocks.0.mlp.W_in": (128, 512), "blocks.0.mlp.b_in": (512,),
    "blocks.0.mlp.W_out": (512, 128), "blocks.0.mlp.b_out": (128,),
    "unembed.W_U": (128, 113), "unembed.b_U": (113,),
}

# The cache the seed printed for run_with_cache(dataset), batch 12769.
SEED_CACHE_SHAPES = {
    "hook_embed": (3, 128), "hook_pos_embed": (3, 128), "blocks.0.hook_resid_pre": (3, 128),
    "blocks.0.attn.hook_q": (3, 4, 32), "blocks.0.attn.hook_k": (3, 4, 32),
    "blocks.0.attn.hook_v": (3, 4, 32), "blocks.0.attn.hook_attn_scores": (4, 3, 3),
    "blocks.0.attn.hook_pattern": (4, 3, 3), "blocks.0.attn.hook_z": (3, 4, 32),
    "blocks.0.hook_attn_out": (3, 128), "blocks.0.hook_resid_mid": (3, 128),
    "blocks.0.mlp.hook_pre": (3, 512), "blocks.0.mlp.hook_post": (3, 512),
    "blocks.0.hook_mlp_out": (3, 128), "blocks.0.hook_resid_post": (3, 128),
}


@pytest.fixture(scope="module")
def seed():
    cfg = RunConfig()
    return cfg, make_dataset(cfg), build_model(cfg)


def test_initial_losses_match_the_seed(seed):
    cfg, d, model = seed
    with torch.no_grad():
        for fwd in (lambda t: model(t)[:, -1], model.last_logits):
            train = loss_fn(fwd(d.train_tokens), d.train_labels).item()
            test = loss_fn(fwd(d.test_tokens), d.test_labels).item()
            assert abs(train - SEED_TRAIN_LOSS) < 2e-9
            assert abs(test - SEED_TEST_LOSS) < 2e-9
    # and both are close to, but not at, the uniform loss ln p
    assert 0 < train - math.log(113) < 0.01


def test_init_statistics_are_gpt2_style(seed):
    _, _, model = seed
    w = model.blocks[0].mlp.W_in.detach()
    assert abs(w.std().item() - 0.8 / math.sqrt(128)) < 0.002
    for name, p in model.named_parameters():
        if ".b_" in name:
            assert not p.requires_grad and torch.count_nonzero(p) == 0
        else:
            assert p.requires_grad


def test_state_dict_has_the_seed_hookedtransformer_keys_and_shapes(seed):
    sd = seed[2].state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == SEED_STATE_DICT


def test_run_with_cache_gives_an_activation_cache_like_the_seed(seed):
    cfg, d, model = seed
    with torch.no_grad():
        logits, cache = model.run_with_cache(d.tokens)
    assert isinstance(cache, ActivationCache)
    n = len(d.tokens)
    assert logits.numel() == 4328691  # printed by the seed
    assert {k: tuple(v.shape[1:]) for k, v in cache.items()} == SEED_CACHE_SHAPES
    assert all(v.shape[0] == n for v in cache.values())
    assert cache["pattern", 0].shape == (n, 4, 3, 3)
    assert cache["post", 0, "mlp"].shape == (n, 3, 512)
    assert cache["resid_mid", 0].shape == (n, 3, 128)
    # the pattern is a causal softmax
    pat = cache["pattern", 0]
    assert torch.allclose(pat.sum(-1), torch.ones(()), atol=1e-6)
    assert torch.count_nonzero(pat[:, :, 0, 1:]) == 0
    # the MLP hook is the ReLU of the pre-activation, and the logits read the residual
    assert torch.equal(cache["post", 0, "mlp"], torch.relu(cache["pre", 0, "mlp"]))
    assert torch.allclose(cache["resid_post", 0] @ model.unembed.W_U, logits, atol=1e-5)


def _randomised(cfg):
    """A model with every parameter (biases too) random, so no term can hide behind a zero."""
    model = build_model(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            p.requires_grad_(True)
    return model


@pytest.mark.parametrize("p", [113, 13])
def test_fast_path_equals_hooked_forward_logits_and_gradients(p):
    cfg = RunConfig(p=p, d_model=64 if p == 13 else 128, d_head=16 if p == 13 else 32)
    model = _randomised(cfg)
    g = torch.Generator().manual_seed(1)
    n = 600
    tokens = torch.randint(0, p + 1, (n, 3), generator=g)   # any token anywhere, '=' included
    tokens[: n // 2, 2] = p                                 # and the training format
    labels = torch.randint(0, p, (n,), generator=g)

    full = model(tokens)[:, -1]
    fast = model.last_logits(tokens)
    assert (fast - full).abs().max() <= 1e-5 * full.abs().max()

    grads = []
    for logits_fn in (lambda: model(tokens)[:, -1], lambda: model.last_logits(tokens)):
        model.zero_grad()
        loss_fn(logits_fn(), labels).backward()
        grads.append({k: v.grad.clone() for k, v in model.named_parameters()})
    # b_K's gradient is zero in exact arithmetic (it shifts every score of a query equally), so
    # each tolerance is relative to the largest gradient of all plus that of the parameter.
    overall = max(g.abs().max().item() for g in grads[0].values())
    for name in grads[0]:
        a, b = grads[0][name], grads[1][name]
        tol = 1e-6 * overall + 1e-4 * a.abs().max().item()
        assert (a - b).abs().max().item() <= tol, name
    assert grads[0]["blocks.0.mlp.W_in"].abs().max() > 1e-3  # the comparison is not vacuous


def test_checkpoint_rows_round_trip(seed):
    cfg, _, model = seed
    row = flat_weights(model)
    assert row.numel() == sum(math.prod(s) for _, s in param_layout(model))
    other = build_model(cfg.replace(model_seed=1))
    assert not torch.equal(flat_weights(other), row)
    load_flat(other, row)
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), other.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)
    with pytest.raises(ValueError, match="checkpoint row"):
        load_flat(other, row[:-1])


def test_fast_path_gradients_match_float64_where_rows_share_the_query():
    """Every training row has '=' last: terms shared by all rows must not lose precision by
    float32 accumulation (a regression measured at 2.8e-3 of W_in's largest gradient)."""
    cfg = RunConfig(model_seed=1000, data_seed=599, train_frac=0.35)
    d = make_dataset(cfg)
    model = build_model(cfg)
    ref = build_model(cfg).double()
    grads = []
    for m, fwd in ((ref, lambda: ref(d.train_tokens)[:, -1]),
                   (model, lambda: model.last_logits(d.train_tokens))):
        loss_fn(fwd(), d.train_labels).backward()
        grads.append({k: p.grad for k, p in m.named_parameters() if p.grad is not None})
    for name, want in grads[0].items():
        err = (grads[1][name].double() - want).abs().max() / want.abs().max()
        assert err < 1e-5, (name, err.item())


def test_training_step_is_bit_reproducible_at_the_seed_shape(tmp_path):
    """Two trainers from the same state take bit-identical steps (2 threads, p = 113)."""
    from grokhpc.train import Trainer

    cfg = RunConfig(n_epochs=3, device="cpu")
    a, b = Trainer.open(cfg, tmp_path / "a"), Trainer.open(cfg, tmp_path / "b")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for t in (a, b):
            t.fit(progress_bar=False, until=2)
    finally:
        torch.set_num_threads(threads)
    for (name, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert torch.equal(p, q), name
