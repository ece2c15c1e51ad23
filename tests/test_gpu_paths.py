"""The GPU paths of training, held on a CPU: a resume placed as a GPU job places it, process-wide
settings left as found, a dropped stack freed at once, a group sized at its padded rows, the
query tokens found once, the lr schedule computed on the device, a config naming cuda:N in a
process that sees one GPU."""

from __future__ import annotations

import gc
import math
import os
import signal
import weakref
from pathlib import Path

import pytest
import torch

from grokhpc import lastpos
from grokhpc.config import RunConfig
from grokhpc.model import build_model
from grokhpc.optim import lr_factor
from grokhpc.runtime import JobSettings
from grokhpc.store import STATE, RunDir
from grokhpc.train import Trainer
from grokhpc.stack import Stack
from grokhpc.train_batched import train_group

TINY = RunConfig(p=11, train_frac=0.5, d_model=32, n_heads=4, d_head=8, d_mlp=64, n_epochs=20,
                 checkpoint_every=10, eval_every=5, lr=3e-3, device="cpu")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---- a resume as a GPU job makes it ------------------------------------------------------------
def _half_trained(cfg, d: Path, epochs: int) -> dict:
    """``cfg`` trained ``epochs`` epochs into ``d`` (state.pt written there); the saved state."""
    t = Trainer.open(cfg, d, settings=JobSettings(state_every_s=0))
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


# ---- process-wide settings ---------------------------------------------------------------------
class _FlagAtIndexPut(torch.utils._python_dispatch.TorchDispatchMode):
    """torch's deterministic setting as each backward of an index (index_put) sees it."""

    def __init__(self):
        super().__init__()
        self.seen: list[bool] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__.startswith("index_put"):
            self.seen.append(torch.are_deterministic_algorithms_enabled())
        return func(*args, **(kwargs or {}))


def test_training_leaves_the_process_settings_as_it_found_them(tmp_path, monkeypatch):
    """On a CPU each step runs with deterministic algorithms (a resume is bit-identical only
    so), and the attempt says so; before and after, and between steps, the process has its own
    setting, and no CUBLAS_WORKSPACE_CONFIG is added to its environment."""
    from grokhpc.runtime import deterministic_for

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    assert not torch.are_deterministic_algorithms_enabled()
    t = Trainer.open(TINY, tmp_path / "solo")
    stack = Stack([t], torch.device("cpu"), exact=True)   # the run's own training: its stack
    spy = _FlagAtIndexPut()
    with spy:
        stack.step()
    t.close()
    assert spy.seen and all(spy.seen)
    train_group([TINY.replace(model_seed=2), TINY.replace(model_seed=3)],
                [tmp_path / "a", tmp_path / "b"], progress_bar=False, log=lambda *a: None)
    assert not torch.are_deterministic_algorithms_enabled()
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    attempt = RunDir(tmp_path / "a").read_progress()["attempts"][-1]
    assert attempt["deterministic_algorithms"] is True
    assert deterministic_for(torch.device("cuda", 1)) is False   # no slower kernels on CUDA


def test_cpu_steps_are_bit_reproducible_on_two_threads_where_index_backward_is_parallel(
        tmp_path):
    """At 60% of p = 113 a step's index backward is large enough for torch's CPU kernel to add
    in parallel with atomics (below about 32k values it adds in order): two trainers from the
    same state must still take bit-identical steps on two threads."""
    cfg = RunConfig(n_epochs=3, device="cpu", train_frac=0.6)
    cpu = torch.device("cpu")
    a, b = Trainer(cfg, RunDir(tmp_path / "a"), cpu), Trainer(cfg, RunDir(tmp_path / "b"), cpu)
    stacks = [Stack([a], cpu, exact=True), Stack([b], cpu, exact=True)]   # each run's training
    torch.set_num_threads(2)   # the module's fixture restores the count
    for _ in range(2):
        for s in stacks:
            s.step()
    for s in stacks:
        s.sync(0)
    for (name, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert torch.equal(p, q), name


# ---- a stack that leaves ----------------------------------------------------------------------
def test_a_dropped_stack_is_freed_at_once_without_the_garbage_collector(tmp_path):
    """A stack in graph mode (its CUDA graphs' memory pool lives as long as it does) is freed
    the moment the group lets it go: no reference cycle waits for the collector."""
    trainers = [Trainer(c, RunDir(tmp_path / str(i)), torch.device("cpu"))
                for i, c in enumerate([TINY, TINY.replace(model_seed=2)])]
    stack = Stack(trainers, torch.device("cpu"), exact=False, step_mode="graph")
    assert stack.capture is not None
    gone = weakref.ref(stack)
    gc.disable()
    try:
        del stack
        assert gone() is None
    finally:
        gc.enable()


# ---- sizing a group ---------------------------------------------------------------------------
def _saved_bytes(cfgs, tmp: Path) -> tuple[int, int]:
    """(bytes autograd keeps for the backward of one batched training step of ``cfgs``, the
    padded train rows of that step): measured, every saved tensor's storage counted once."""
    trainers = [Trainer(c, RunDir(tmp / str(i)), torch.device("cpu")) for i, c in enumerate(cfgs)]
    stack = Stack(trainers, torch.device("cpu"), exact=False)
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        stack._losses(stack.train)
    return sum(seen.values()), stack.train.tokens.shape[1]


def test_a_mixed_train_frac_group_is_sized_at_its_padded_rows(tmp_path):
    """A batched group pads every run's train rows to its longest split, whichever run comes
    first. The estimate must cover R x the padded rows x the bytes each row keeps for the
    backward (measured: the saved bytes of two groups of different row counts, per row)."""
    from grokhpc.plan import bytes_per_run, group_bytes, padded_rows

    base = TINY.replace(p=31)
    small = [base.replace(train_frac=0.2, model_seed=s) for s in (1, 2)]
    large = [base.replace(train_frac=0.7, model_seed=s) for s in (1, 2)]
    (s_bytes, s_rows), (l_bytes, l_rows) = (_saved_bytes(small, tmp_path / "s"),
                                            _saved_bytes(large, tmp_path / "l"))
    per_row = (l_bytes - s_bytes) / (2 * (l_rows - s_rows))   # per run and row
    mixed = [small[0], large[1]]   # the small run first
    m_bytes, padded = _saved_bytes(mixed, tmp_path / "m")
    assert padded == l_rows == math.floor(31 * 31 * 0.7)
    assert padded_rows(mixed)[0] >= padded
    assert group_bytes(mixed) >= 2 * padded * per_row
    assert group_bytes(mixed) >= m_bytes   # and what the mixed group keeps, all of it
    # sized by its first run's own rows, the rows' part would be 3.5 times too small
    fixed = bytes_per_run(mixed[0], (0, 0))
    rows_part = (bytes_per_run(mixed[0], padded_rows(mixed)) - fixed,
                 bytes_per_run(mixed[0]) - fixed)
    assert rows_part[0] / rows_part[1] == pytest.approx(padded / s_rows, rel=0.01)


def test_the_launchers_memory_cap_holds_a_mixed_group_at_its_padded_rows():
    """runs_per_job auto: the runs one GPU holds of a shape's configs (train fractions listed
    smallest first) fit AUTO_SAFETY of its memory at the group's padded rows, one more would
    not."""
    from grokhpc import plan as plan_mod
    from grokhpc.plan import bytes_per_run, padded_rows
    from grokhpc.sweep import LauncherSettings

    launcher = LauncherSettings(runs_per_job="auto", gpu_type="rtx2080", gpus=1)
    cfgs = [RunConfig(d_mlp=4096, train_frac=f) for f in (0.2, 0.45, 0.7)]
    n = plan_mod.gpu_memory_cap(launcher)(cfgs)
    per_run = bytes_per_run(cfgs[0], padded_rows(cfgs))
    memory = plan_mod.AUTO_SAFETY * plan_mod.GPUS["rtx2080"].memory_gb * 1e9
    assert n * per_run <= memory < (n + 1) * per_run


# ---- the query tokens, found once --------------------------------------------------------------
def test_the_model_finds_the_query_tokens_of_a_row_tensor_once(monkeypatch):
    """``torch.unique`` waits for the device: the model keeps each row tensor's queries while
    the tensor lives unchanged, and its logits equal those computed afresh."""
    from grokhpc.data import make_dataset

    calls = []
    real = lastpos.queries_of
    monkeypatch.setattr(lastpos, "queries_of", lambda *a: calls.append(1) or real(*a))
    model = build_model(TINY)
    tokens = make_dataset(TINY).train_tokens.clone()
    params = dict(model.named_parameters())
    with torch.inference_mode():   # found while scoring, then used for training
        first = model.last_logits(tokens)
    again = model.last_logits(tokens)
    again.sum().backward()   # kept queries may be saved for a backward
    assert len(calls) == 1
    assert torch.equal(first, again.detach())
    assert torch.equal(again, lastpos.last_logits(params, tokens))
    tokens[:, 0] = tokens[:, 1]   # changed in place: found again
    assert torch.equal(model.last_logits(tokens), lastpos.last_logits(params, tokens))
    assert len(calls) == 4   # 2 by the model, 2 by the references computed afresh
    import copy
    assert copy.deepcopy(model)._queries.entries == {}
    del tokens
    assert model._queries.entries == {}   # nothing kept for rows that are gone


# ---- the lr schedule on the device ------------------------------------------------------------
def test_the_lr_schedule_computed_on_the_device_is_the_hosts():
    """Warmup and constant phases exactly, the cosine within float64 rounding of cos."""
    from grokhpc.stacked_optim import LrSchedules

    cfgs = [TINY.replace(n_epochs=50, warmup_epochs=7, lr_schedule="cosine"),
            TINY.replace(n_epochs=50, warmup_epochs=5), TINY.replace(n_epochs=50, lr=1e-3)]
    sched = LrSchedules(cfgs, 3, torch.device("cpu"))
    for e in range(3, 50):
        got = sched.next().tolist()
        want = [c.lr * lr_factor(e, c) for c in cfgs]
        assert got[1:] == want[1:], e
        assert got[0] == want[0] if e < 7 else math.isclose(got[0], want[0], rel_tol=1e-14)


def test_device_lrs_give_the_hosts_decay_column_bit_for_bit(tmp_path):
    """An optimiser's per-run decay column from lrs on the device equals the one from Python
    floats (1 - lr * wd in float64, rounded once)."""
    cfgs = [TINY.replace(warmup_epochs=6, weight_decay=w, model_seed=i)
            for i, w in enumerate((1.0, 0.3))]
    stacks = [Stack([Trainer(c, RunDir(tmp_path / f"{k}{i}"), torch.device("cpu"))
                     for i, c in enumerate(cfgs)], torch.device("cpu"), exact=False)
              for k in "hd"]
    stacks[1].opt.host_scalars = False   # as on a GPU: the schedule runs on the device
    for _ in range(4):
        for s in stacks:
            s._set_lrs()
            s.epoch += 1
        assert torch.equal(stacks[0].opt._decay, stacks[1].opt._decay)
    assert stacks[0].opt.lrs == stacks[1].opt.lrs


# ---- a several-GPU job's device process --------------------------------------------------------
def test_a_device_process_trains_a_config_naming_cuda_n_on_the_gpu_it_sees(monkeypatch):
    """Each device process of a several-GPU job sees one GPU (CUDA_VISIBLE_DEVICES narrowed),
    which is cuda:0 there whatever a run's config names; other devices are left alone."""
    from grokhpc import job as job_mod
    from grokhpc.runtime import JobSettings

    got = []
    monkeypatch.setattr(job_mod, "train_runs", lambda runs, **kw: got.extend(runs))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    handler = signal.getsignal(signal.SIGUSR2)
    try:
        runs = [({"device": d}, f"r{i}") for i, d in enumerate(["cuda:1", "cuda", "auto"])]
        job_mod._train_on_device(runs, "1", JobSettings(threads=1))
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "1"
        assert got == [({"device": "cuda"}, "r0"), ({"device": "cuda"}, "r1"),
                       ({"device": "auto"}, "r2")]
        got.clear()
        job_mod._train_on_device([({"device": "cuda:1"}, "r0")], "cpu:1", JobSettings(threads=1))
        assert got == [({"device": "cuda:1"}, "r0")]   # a CPU process: the run's own error
    finally:
        signal.signal(signal.SIGUSR2, handler)
