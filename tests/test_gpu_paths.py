"""The GPU paths of training, held on a CPU: a resume placed as a GPU job places it, process-wide
settings left as found, a dropped stack freed at once, a group sized at its padded rows, the
query tokens found once, the lr schedule computed on the device, a config naming cuda:N in a
process that sees one GPU."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from grokhpc.config import RunConfig
from grokhpc.store import STATE, RunDir
from grokhpc.train import Trainer
from grokhpc.train_batched import Stack

TINY = RunConfig(p=11, train_frac=0.5, d_model=32, n_heads=4, d_head=8, d_mlp=64, n_epochs=20,
                 checkpoint_every=10, eval_every=5, lr=3e-3, device="cpu")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---- a resume as a GPU job makes it ------------------------------------------------------------
def _half_trained(cfg, d: Path, epochs: int) -> dict:
    """``cfg`` trained ``epochs`` epochs into ``d`` (state.pt written there); the saved state."""
    t = Trainer.open(cfg, d, state_every_s=0)
    t.fit(progress_bar=False, until=epochs)
    t.close()
    return torch.load(d / STATE, map_location="cpu", weights_only=True)


@pytest.mark.filterwarnings("ignore:.*meta parameter")   # loading weights into meta ones
def test_a_resume_on_another_device_keeps_generator_and_step_counters_on_the_host(tmp_path):
    """A GPU job resumes a minibatch run from a state.pt that holds CPU tensors. Emulated here
    with the 'meta' device in the GPU's place: a device other than the host, whose tensors the
    host cannot read (Generator.set_state refuses them, as it refuses CUDA tensors, and
    ``.item()`` fails where on a GPU it would wait for the device). The trainer and a packed
    stack built from such trainers must find the batch generator's state and the optimiser's
    step counters on the host, with the saved values, and the moments on the device."""
    cfgs = [TINY.replace(batch_size=8, model_seed=s) for s in (1, 2)]
    saved = [_half_trained(c, tmp_path / str(i), 7) for i, c in enumerate(cfgs)]
    meta = torch.device("meta")
    trainers = [Trainer(c, RunDir(tmp_path / str(i)), meta) for i, c in enumerate(cfgs)]
    for t, s in zip(trainers, saved):
        assert t.restore() and t.epoch == 7
        assert torch.equal(t.batch_gen.get_state(), s["batch_gen"])
        states = list(t.optimizer.state.values())
        assert len(states) == 9   # the trainable weights
        steps = 7 * math.ceil(int(11 * 11 * 0.5) / 8)   # 7 epochs of 8 minibatches
        for st in states:
            assert st["step"].device.type == "cpu" and st["step"].item() == steps
            assert st["exp_avg"].device == meta and st["exp_avg_sq"].device == meta
        assert all(p.device == meta for p in t.model.parameters())
    stack = Stack(trainers, meta, exact=True)   # the packed group built from them
    for g, s in zip(stack.gens, saved):
        assert torch.equal(g.get_state(), s["batch_gen"])
    assert stack.opt.steps == [steps, steps]
