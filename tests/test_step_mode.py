"""How a packed group's batched step is issued (grokhpc.step_mode): choosing the mode, its
fallbacks, and the compiled step against the fused one. (fused == eager bit for bit, and graph
falling back to fused on a CPU, are tested run by run in test_pack_fields.)"""

from __future__ import annotations

import pytest
import torch

from grokhpc.config import RunConfig
from grokhpc.stacked_optim import FlatStackedAdamW, StackedAdamW
from grokhpc.store import RunDir
from grokhpc.train import Trainer
from grokhpc.train_batched import GroupError, Stack, train_group

BASE = RunConfig(p=11, train_frac=0.5, d_model=32, n_heads=4, d_head=8, d_mlp=64, n_epochs=20,
                 checkpoint_every=10, eval_every=10, lr=3e-3, device="cpu")
CFGS = [BASE.replace(model_seed=1, data_seed=2),
        BASE.replace(model_seed=3, data_seed=4, train_frac=0.6, weight_decay=0.3)]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def modes(monkeypatch):
    """The step mode and optimiser of every Stack built while the test runs."""
    seen = []
    init = Stack.__init__

    def spy(self, *a, **kw):
        init(self, *a, **kw)
        seen.append((self.step_mode, type(self.opt)))

    monkeypatch.setattr(Stack, "__init__", spy)
    return seen


def test_environment_chooses_the_mode_and_the_argument_wins(tmp_path, monkeypatch, modes):
    monkeypatch.setenv("GROKHPC_STEP_MODE", "fused")
    said = []
    train_group(CFGS, [tmp_path / "a", tmp_path / "b"], device="cpu", exact=False,
                progress_bar=False, log=said.append)
    train_group(CFGS, [tmp_path / "c", tmp_path / "d"], device="cpu", exact=False,
                step_mode="eager", progress_bar=False, log=said.append)
    assert modes == [("fused", FlatStackedAdamW), ("eager", StackedAdamW)]
    assert said == []


@pytest.mark.parametrize("env,arg,named", [("grpah", None, "GROKHPC_STEP_MODE"),
                                           ("fused", "fast", "step_mode")])
def test_an_unknown_mode_is_one_line_before_anything_is_written(tmp_path, monkeypatch, env, arg,
                                                                named):
    monkeypatch.setenv("GROKHPC_STEP_MODE", env)
    with pytest.raises(GroupError) as e:
        train_group(CFGS, [tmp_path / "a", tmp_path / "b"], device="cpu", exact=False,
                    step_mode=arg, progress_bar=False)
    bad = arg or env
    assert str(e.value) == (f"train_group: {named}: expected one of eager, fused, graph, "
                            f"compile, got {bad!r}")
    assert not (tmp_path / "a").exists()


def test_exact_mode_steps_as_before_whatever_mode_is_asked(tmp_path, modes):
    said = []
    train_group(CFGS, [tmp_path / "a", tmp_path / "b"], device="cpu", exact=True,
                step_mode="graph", progress_bar=False, log=said.append)
    assert said == ["step_mode graph: exact mode steps each run with the solo code; eager used"]
    assert modes == [("eager", StackedAdamW)]
    assert all(RunDir(tmp_path / d).is_complete() for d in ("a", "b"))


def test_compiled_step_tracks_the_fused_step(tmp_path):
    """torch.compile (inductor's generated CPU kernels) of the batched loss and the Adam(W)
    update, 5 steps from the same start as the fused step: per-run losses within 1e-5 relative
    and weights within 1e-5 of their largest magnitude -- float32 rounding of fused kernels,
    not a different computation."""
    stacks = {}
    for mode in ("fused", "compile"):
        trainers = [Trainer(c, RunDir(tmp_path / mode / str(i)), torch.device("cpu"))
                    for i, c in enumerate(CFGS)]
        stacks[mode] = stack = Stack(trainers, torch.device("cpu"), exact=False, step_mode=mode)
        for _ in range(5):
            stack.step()
    fused, comp = stacks["fused"], stacks["compile"]
    a, b = fused.curves["train_loss"][:, :5], comp.curves["train_loss"][:, :5]
    assert torch.isfinite(a).all() and a[:, 4].lt(a[:, 0]).all()   # it trains
    assert ((a - b).abs() / a.abs()).max() < 1e-5
    for n in fused.trainable:
        scale = fused.P[n].abs().max()
        assert (fused.P[n] - comp.P[n]).abs().max() <= 1e-5 * scale, n
    assert comp.opt.steps == fused.opt.steps == [5, 5]


class _FailingCapture:
    """torch.cuda.graph as a capture that breaks (a host sync inside the step, say): the
    block's Python runs, its kernels do not (the stack's tensors are put back as they were),
    and leaving the block raises."""

    def __init__(self, tensors):
        self.tensors = tensors

    def __call__(self, graph, pool=None, capture_error_mode="global"):
        assert capture_error_mode == "thread_local"   # commits may copy from other threads
        return self

    def __enter__(self):
        self.saved = [t.clone() for t in self.tensors]

    def __exit__(self, *exc):
        with torch.no_grad():
            for t, s in zip(self.tensors, self.saved):
                t.copy_(s)
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing")


def test_a_failed_capture_says_so_once_and_the_step_runs_eagerly(tmp_path, monkeypatch):
    """graph mode on stand-ins for CUDA's streams and graphs whose captures fail: the first
    calls run eagerly, each kind's capture fails once with one line, and the group goes on
    exactly as the fused step does (weights, moments, step counts, curves)."""
    from contextlib import nullcontext
    from types import SimpleNamespace

    stacks, said = {}, []
    for mode in ("fused", "graph"):
        trainers = [Trainer(c, RunDir(tmp_path / mode / str(i)), torch.device("cpu"))
                    for i, c in enumerate(CFGS)]
        stacks[mode] = Stack(trainers, torch.device("cpu"), exact=False, step_mode=mode,
                             log=said.append)
    graph = stacks["graph"]
    stream = SimpleNamespace(wait_stream=lambda s: None)
    for name, fake in {"Stream": lambda: stream, "stream": lambda s: nullcontext(),
                       "current_stream": lambda: stream, "CUDAGraph": lambda: None,
                       "synchronize": lambda: None,
                       "graph": _FailingCapture([graph.opt.flat, graph.opt.flat_m,
                                                 graph.opt.flat_v])}.items():
        monkeypatch.setattr(torch.cuda, name, fake)
    for stack in stacks.values():
        for _ in range(8):
            stack.step()
            stack.evaluate()
    assert said == [f"step_mode graph: capturing the {key} step failed (RuntimeError: CUDA "
                    "error: operation not permitted when stream is capturing); it runs eagerly"
                    for key in ("train", "test")]
    fused = stacks["fused"]
    assert graph.opt.steps == fused.opt.steps == [8, 8]
    for a, b in ((graph.opt.flat, fused.opt.flat), (graph.opt.flat_m, fused.opt.flat_m),
                 (graph.opt.flat_v, fused.opt.flat_v)):
        assert torch.equal(a, b)
    for k in ("train_loss", "test_loss", "test_acc"):
        assert torch.equal(graph.curves[k][:, :9].nan_to_num(), fused.curves[k][:, :9]
                           .nan_to_num()), k
