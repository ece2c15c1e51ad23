"""Writes tl2_ln_gelu_2layer.json: what TransformerLens 2.x's ``HookedTransformer`` computes for
a 2-block, LayerNorm, GELU model of grokhpc's shape, loaded from seeded weights.

    python tests/data/tl2_reference.py      # needs transformer_lens 2.x (HookedTransformer)

``tests/test_model_fields.py`` loads the same weights into ``grokhpc.model.Transformer`` and
compares keys, shapes, logits and LayerNorm scales with the file.
"""

from __future__ import annotations

import json
from importlib.metadata import version
from pathlib import Path

import torch

OUT = Path(__file__).with_name("tl2_ln_gelu_2layer.json")
SHAPE = dict(n_layers=2, d_model=16, n_ctx=3, d_head=8, n_heads=2, d_mlp=24, d_vocab=8,
             d_vocab_out=7, act_fn="gelu", normalization_type="LN")


def seeded_weights(layout):
    """One draw per parameter in state_dict order; LayerNorm weights around 1."""
    gen = torch.Generator().manual_seed(0)
    out = {}
    for name, shape in layout:
        w = torch.randn(shape, generator=gen) * 0.5
        out[name] = 1.0 + 0.4 * w if name.endswith(".w") else w
    return out


def tokens():
    p = SHAPE["d_vocab_out"]
    grid = [[a, b, p] for a in range(p) for b in range(p)]
    gen = torch.Generator().manual_seed(1)
    return torch.cat([torch.tensor(grid), torch.randint(0, p + 1, (16, 3), generator=gen)])


def main() -> None:
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    model = HookedTransformer(HookedTransformerConfig(**SHAPE))
    sd = model.state_dict()
    layout = [(k, list(v.shape)) for k, v in sd.items() if v.dtype.is_floating_point
              and k.split(".")[-1] not in ("mask", "IGNORE")]
    model.load_state_dict({**sd, **seeded_weights(layout)}, strict=True)
    toks = tokens()
    with torch.no_grad():
        logits, cache = model.run_with_cache(toks)
    OUT.write_text(json.dumps({
        "transformer_lens": version("transformer_lens"),
        "shape": SHAPE,
        "state_dict": [[k, list(v.shape)] for k, v in sd.items()],
        "parameters": layout,
        "tokens": toks.tolist(),
        "logits": logits.tolist(),
        "ln_final_scale": cache["ln_final.hook_scale"][..., 0].tolist(),
        "ln2_scale_block1": cache["blocks.1.ln2.hook_scale"][..., 0].tolist(),
    }))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
