"""The optional training fields in a real training loop: minibatches resume bit for bit,
schedules and optimisers reach the optimiser, fixed weight norm holds, early stop ends a run."""

import numpy as np
import pytest
import torch

from grokhpc.config import from_dict
from grokhpc.stack import Stack
from grokhpc.stacked_optim import StackedAdamW
from grokhpc.store import RunDir
from grokhpc.train import Trainer, run_training

TINY = dict(p=11, train_frac=0.5, d_model=32, n_heads=4, d_head=8, d_mlp=64, n_epochs=60,
            checkpoint_every=20, eval_every=10, lr=3e-3, device="cpu")


def _train(cfg, out):
    run_training(cfg, out, progress_bar=False, log=lambda *_: None)
    return RunDir(out)


def _same_run(a: RunDir, b: RunDir) -> None:
    ea, wa = a.checkpoints(mmap=False)
    eb, wb = b.checkpoints(mmap=False)
    assert ea == eb and np.array_equal(wa, wb)
    assert a.read_curves().equals(b.read_curves())


@pytest.mark.parametrize("extra", [{"batch_size": 16}, {"batch_size": 7, "optimizer": "sgd",
                                                        "momentum": 0.9, "lr": 0.05}])
def test_minibatch_run_resumed_from_its_last_commit_is_bit_identical(tmp_path, extra):
    cfg = from_dict({**TINY, **extra})
    ref = _train(cfg, tmp_path / "ref")
    # a run that dies 5 epochs after its commit at epoch 20 (those epochs are lost) ...
    t = Trainer.open(cfg, tmp_path / "cut", torch.device("cpu"))
    t.fit(progress_bar=False, until=25)
    del t
    # ... and the same command again: it resumes from epoch 20's state, generator included
    _train(cfg, tmp_path / "cut")
    _same_run(ref, RunDir(tmp_path / "cut"))
    # minibatches really are drawn: n_train / batch_size steps per epoch change the result
    full = _train(from_dict({**TINY, **{k: v for k, v in extra.items() if k != "batch_size"}}),
                  tmp_path / "full")
    assert not np.array_equal(full.checkpoints()[1][-1], ref.checkpoints()[1][-1])


def test_schedule_sets_the_lr_of_every_epoch(tmp_path, monkeypatch):
    cfg = from_dict({**TINY, "warmup_epochs": 10, "lr_schedule": "cosine"})
    t = Trainer.open(cfg, tmp_path / "run", torch.device("cpu"))
    seen = []
    step = StackedAdamW.step

    def spy(self, *a, **k):   # the optimiser that steps the run (its stack of one)
        seen.append(self.lrs[0])
        return step(self, *a, **k)

    monkeypatch.setattr(StackedAdamW, "step", spy)
    t.fit(progress_bar=False, until=40)
    import math
    expect = [3e-3 * (e + 1) / 10 for e in range(10)] + \
             [3e-3 * 0.5 * (1 + math.cos(math.pi * (e - 10) / 50)) for e in range(10, 40)]
    assert seen == pytest.approx(expect, rel=1e-12)


def test_fixed_weight_norm_holds_the_initial_norm(tmp_path):
    cfg = from_dict({**TINY, "fixed_weight_norm": True, "weight_decay": 0.0})
    run = _train(cfg, tmp_path / "run")
    epochs, rows = run.checkpoints(mmap=False)
    norms = np.sqrt((rows.astype(np.float64) ** 2).sum(axis=1))   # biases are zero throughout
    assert norms == pytest.approx(np.full(len(epochs), norms[0]), rel=1e-5)
    free = _train(from_dict({**TINY, "weight_decay": 0.0}), tmp_path / "free")
    free_norms = np.sqrt((free.checkpoints(mmap=False)[1].astype(np.float64) ** 2).sum(axis=1))
    assert abs(free_norms[-1] / free_norms[0] - 1) > 1e-3       # without it the norm moves


def _grok_at_30(monkeypatch) -> None:
    """The training's scoring with the logged test accuracy 100% from epoch 30 on (the moment
    is the test's); everything else is the real training, commit and finish."""
    original = Stack.evaluate

    def evaluate(self, runs=None, train_runs=(), collapse_runs=()):
        original(self, runs, train_runs, collapse_runs)
        if self.epoch >= 30:
            for r in range(self.R) if runs is None else runs:
                self.curves["test_acc"][r, self.epoch] = 1.0
            self.note_grok()
    monkeypatch.setattr(Stack, "evaluate", evaluate)


def test_stop_after_grok_ends_the_run_as_complete_at_its_own_epoch(tmp_path, monkeypatch):
    cfg = from_dict({**TINY, "n_epochs": 200, "stop_after_grok": 15})
    _grok_at_30(monkeypatch)
    t = Trainer.open(cfg, tmp_path / "run", torch.device("cpu"))
    t.fit(progress_bar=False)
    t.finish()
    run = RunDir(tmp_path / "run")
    prog, summary = run.read_progress(), run.read_summary()
    assert (prog["epoch"], prog["n_epochs"], prog["done"], prog["stopped_early"]) == \
        (45, 200, True, True)
    assert run.is_complete() and summary["stopped_early"] is True
    assert summary["grokking_epoch"] == 30 and summary["final_epoch"] == 45
    epochs, _ = run.checkpoints()
    assert epochs == [0, 20, 40, 45]                   # the stop epoch is committed
    curves = run.read_curves()
    assert len(curves) == 46 and not np.isnan(curves["train_acc"].iloc[-1])
    # the same command again leaves the finished run alone
    again = _train(cfg, tmp_path / "run")
    assert again.read_progress()["epoch"] == 45


def test_init_scale_multiplies_every_initial_weight():
    from grokhpc.model import build_model, flat_weights

    base = flat_weights(build_model(from_dict({**TINY})))
    scaled = flat_weights(build_model(from_dict({**TINY, "init_scale": 3.0})))
    assert torch.equal(scaled, base * 3.0)
