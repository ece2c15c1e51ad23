"""How a packed group's batched step is issued (grokhpc.step_mode): choosing the mode, its
fallbacks, and the compiled step against the fused one. (fused == eager bit for bit, and graph
falling back to fused on a CPU, are tested run by run in test_pack_fields.)"""

from __future__ import annotations

import pytest
import torch

from grokhpc.config import ConfigError, RunConfig
from grokhpc.runtime import JobSettings
from grokhpc.stacked_optim import FlatStackedAdamW, StackedAdamW
from grokhpc.store import RunDir
from grokhpc.train import Trainer
from grokhpc.stack import Stack
from grokhpc.train_batched import GroupError, train_group

BASE = RunConfig(p=11, train_frac=0.5, d_model=32, n_heads=4, d_head=8, d_mlp=64, n_epochs=20,
                 checkpoint_every=10, eval_every=10, lr=3e-3, device="cpu")
CFGS = [BASE.replace(model_seed=1, data_seed=2),
        BASE.replace(model_seed=3, data_seed=4, train_frac=0.6, weight_decay=0.3,
                     warmup_epochs=6, lr_schedule="cosine")]   # lr changes every epoch

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


def test_the_settings_choose_the_mode_and_the_environment_overrides_them_out_loud(
        tmp_path, monkeypatch, modes):
    said = []
    train_group(CFGS, [tmp_path / "a", tmp_path / "b"], JobSettings(step_mode="fused"),
                device="cpu", exact=False, progress_bar=False, log=said.append)
    train_group(CFGS, [tmp_path / "c", tmp_path / "d"], device="cpu", exact=False,
                progress_bar=False, log=said.append)
    assert said == []
    monkeypatch.setenv("GROKHPC_STEP_MODE", "fused")
    train_group(CFGS, [tmp_path / "e", tmp_path / "f"], JobSettings(step_mode="eager"),
                device="cpu", exact=False, progress_bar=False, log=said.append)
    train_group(CFGS, [tmp_path / "g", tmp_path / "h"], JobSettings(step_mode="fused"),
                device="cpu", exact=False, progress_bar=False, log=said.append)
    assert modes == [("fused", FlatStackedAdamW), ("eager", StackedAdamW),
                     ("fused", FlatStackedAdamW), ("fused", FlatStackedAdamW)]
    assert said == ["$GROKHPC_STEP_MODE=fused overrides the job's step_mode (eager)"]
    attempt = RunDir(tmp_path / "e").read_progress()["attempts"][-1]
    assert attempt["step_mode"] == "fused"   # the mode it trained with


def test_an_unknown_mode_is_one_line_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.setenv("GROKHPC_STEP_MODE", "grpah")
    with pytest.raises(GroupError) as e:
        train_group(CFGS, [tmp_path / "a", tmp_path / "b"], device="cpu", exact=False,
                    progress_bar=False)
    assert str(e.value) == ("train_group: $GROKHPC_STEP_MODE: expected one of eager, fused, "
                            "graph, compile, got 'grpah'")
    assert not (tmp_path / "a").exists()
    monkeypatch.setenv("GROKHPC_STEP_MODE", "fused")
    with pytest.raises(ConfigError) as e:   # the job's own setting: refused where it is made
        JobSettings(step_mode="fast")
    assert str(e.value) == ("job settings: step_mode: expected one of eager, fused, graph, "
                            "compile, got 'fast'")


def test_exact_mode_steps_as_before_whatever_mode_is_asked(tmp_path, modes):
    said = []
    train_group(CFGS, [tmp_path / "a", tmp_path / "b"], JobSettings(step_mode="graph"),
                device="cpu", exact=True, progress_bar=False, log=said.append)
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


class _Capture:
    """torch.cuda.graph on a CPU with CUDA's semantics for what matters here: the block's
    Python runs but none of its kernels (the stack's tensors are put back as they were on
    leaving it); with ``fail``, leaving the block raises (a host sync inside the step, say)."""

    def __init__(self, tensors, fail: bool):
        self.tensors, self.fail = tensors, fail   # tensors(): those a step writes in place

    def __call__(self, graph, pool=None, capture_error_mode="global"):
        assert capture_error_mode == "thread_local"   # commits may copy from other threads
        return self

    def __enter__(self):
        self.saved = [(t, t.clone()) for t in self.tensors()]

    def __exit__(self, *exc):
        with torch.no_grad():
            for t, s in self.saved:
                t.copy_(s)
        if self.fail:
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")


class _Graph:
    """A CUDA graph's replay on a CPU: the recorded work (``works``, in the order the graphs
    are captured) runs again on the current tensors and writes the capture's output tensors;
    Python's own side effects (the host step count) are not part of a replay."""

    def __init__(self, stack, works: list):
        self.stack, self.key = stack, works.pop(0)

    def pool(self):
        return "pool"

    def replay(self):
        stack, opt = self.stack, self.stack.opt
        steps = list(opt.steps)
        if self.key == "train":   # a captured step measures the softmax collapse every epoch
            new = stack._update(stack.train, True)
        else:
            new = stack._scored_all(stack.test)
        opt.steps = steps
        for static, value in zip(stack.capture.outputs[self.key], new):
            if static is not None:
                static.copy_(value)


def _graph_and_fused(tmp_path, monkeypatch, fail: bool):
    """A fused stack and a graph stack on stand-ins for CUDA's streams and graphs, each
    trained 8 epochs with its test set scored after each; (graph, fused, log lines)."""
    from contextlib import nullcontext
    from types import SimpleNamespace

    stacks, said = {}, []
    for mode in ("fused", "graph"):
        trainers = [Trainer(c, RunDir(tmp_path / mode / str(i)), torch.device("cpu"))
                    for i, c in enumerate(CFGS)]
        stacks[mode] = Stack(trainers, torch.device("cpu"), exact=False, step_mode=mode,
                             log=said.append)
    graph, works = stacks["graph"], ["train", "test"]
    assert graph.opt.host_scalars is False   # a captured step's corrections are computed on
    stacks["fused"].opt.host_scalars = False  # the device: the same way for the reference
    stream = SimpleNamespace(wait_stream=lambda s: None)
    opt = graph.opt

    def tensors():   # what a step writes in place: weights, moments, the step counters
        return [opt.flat, opt.flat_m, opt.flat_v, *getattr(opt, "_dev64", {}).values()]

    for name, fake in {"Stream": lambda: stream, "stream": lambda s: nullcontext(),
                       "current_stream": lambda: stream, "synchronize": lambda: None,
                       "CUDAGraph": lambda: _Graph(graph, works),
                       "graph": _Capture(tensors, fail)}.items():
        monkeypatch.setattr(torch.cuda, name, fake)
    for stack in stacks.values():
        for _ in range(8):
            stack.step()
            stack.evaluate()
    return graph, stacks["fused"], said


def _assert_same_training(graph, fused) -> None:
    assert graph.opt.steps == fused.opt.steps == [8, 8]
    for a, b in ((graph.opt.flat, fused.opt.flat), (graph.opt.flat_m, fused.opt.flat_m),
                 (graph.opt.flat_v, fused.opt.flat_v)):
        assert torch.equal(a, b)
    for k in ("train_loss", "train_acc", "test_loss", "test_acc", "softmax_collapse"):
        assert torch.equal(graph.curves[k][:, :9].nan_to_num(), fused.curves[k][:, :9]
                           .nan_to_num()), k


def test_captured_steps_replay_as_the_fused_step(tmp_path, monkeypatch):
    """graph mode's bookkeeping against CUDA's semantics emulated on a CPU: 3 eager calls of
    each kind, one capture, replays after (the host step count advanced once per step); the
    group trains exactly as the fused step does, silently."""
    graph, fused, said = _graph_and_fused(tmp_path, monkeypatch, fail=False)
    assert set(graph.capture.graphs) == {"train", "test"} and said == []
    assert graph.capture.calls == {"train": 4, "test": 4}   # the 4th call is captured
    _assert_same_training(graph, fused)


def test_a_failed_capture_says_so_once_and_the_step_runs_eagerly(tmp_path, monkeypatch):
    """Captures that fail: each kind's failure is one line, and the group goes on exactly as
    the fused step does (weights, moments, step counts, curves)."""
    graph, fused, said = _graph_and_fused(tmp_path, monkeypatch, fail=True)
    assert said == [f"step_mode graph: capturing the {key} step failed (RuntimeError: CUDA "
                    "error: operation not permitted when stream is capturing); it runs eagerly"
                    for key in ("train", "test")]
    assert graph.capture.graphs == {}
    _assert_same_training(graph, fused)
