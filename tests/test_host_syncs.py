"""Host syncs per epoch of the default training paths, counted on a CPU.

On a GPU the host waits for the device whenever it reads a value back (``.item()``,
``.tolist()``, ``bool(t)``, ``.cpu()``), when an output's size depends on the data
(``nonzero``, a boolean-mask index, ``unique``) and when it copies host data made on the fly
into a device tensor (``torch.tensor(list, device=...)``, indexing with a Python list: a
blocking copy from pageable memory). None of that costs anything on a CPU, so these tests count
the operations themselves, whatever the device: torch's dispatcher sees the op kinds
(``_local_scalar_dense``, ``nonzero``, ``_unique2``, ``index`` with a boolean index,
``lift_fresh`` for a tensor made from host data) and the reads back that never reach it on a
CPU (``tolist``, ``cpu``, ``numpy``) are counted by wrapping those methods. Reads of the
optimiser's step counters are left out: torch keeps them on the host (test_train.py's resume
test holds them there), so reading them costs no sync.

What is not seen here: ``.to(device)`` of a host tensor (a no-op on a CPU). The default paths
hold their rows and index tensors on the device from the start.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from grokhpc.config import RunConfig
from grokhpc.runtime import JobSettings
from grokhpc.train import Trainer
from grokhpc.stack import Stack

BASE = RunConfig(p=11, train_frac=0.5, d_model=32, n_heads=4, d_head=8, d_mlp=64, n_epochs=40,
                 checkpoint_every=20, eval_every=5, lr=3e-3, device="cpu")
SYNC_OPS = {"_local_scalar_dense", "nonzero", "_unique2", "unique_dim", "unique_consecutive",
            "masked_select", "lift_fresh"}
READS = ("tolist", "cpu", "numpy")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class HostSyncs(TorchDispatchMode):
    """Counts the operations that would make the host wait for a GPU, per epoch of ``clock()``
    (a function giving the current epoch), as {epoch: Counter(kind)}."""

    def __init__(self, clock, exempt=lambda: ()):
        super().__init__()
        self.clock, self.exempt = clock, exempt
        self.by_epoch: dict[int, Counter] = {}

    def note(self, kind: str) -> None:
        self.by_epoch.setdefault(self.clock(), Counter())[kind] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name == "_local_scalar_dense" and any(args[0] is t for t in self.exempt()):
            pass
        elif name in SYNC_OPS:
            self.note(name)
        elif name in ("index", "index_put", "index_put_") and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]):
            self.note("boolean mask")
        return func(*args, **(kwargs or {}))


@pytest.fixture
def count_reads(monkeypatch):
    """count_reads(mode): Tensor.tolist/cpu/numpy noted in ``mode`` while the test runs."""
    modes = []
    for name in READS:
        real = getattr(torch.Tensor, name)

        def wrapped(self, *a, _real=real, _name=name, **kw):
            for m in modes:
                m.note(_name)
            return _real(self, *a, **kw)
        monkeypatch.setattr(torch.Tensor, name, wrapped)
    return modes.append


def step_counters(opt):
    """The solo optimiser's per-parameter step counters (kept on the host by torch; so are
    those a stack's optimiser hands to torch's own step in exact mode, ``_step_ts``)."""
    return [s["step"] for s in opt.state.values() if "step" in s]


def per_epoch(counter: HostSyncs, epochs) -> dict[int, int]:
    return {e: sum(counter.by_epoch.get(e, Counter()).values()) for e in epochs}


def test_solo_default_path_syncs_only_at_commits(tmp_path, count_reads, monkeypatch):
    """A solo run (full batch, test scored every 5 epochs, a row every 20): no host sync in
    any epoch without a commit (epoch 0 finds the train split's query tokens, once; the test
    split's were found when the run was opened), and the progress bar's postfix at a commit
    reads the device once and the divergence check once (grokhpc.divergence), beside the
    commit's own copies."""
    trainer = Trainer.open(BASE, tmp_path / "solo", settings=JobSettings(state_every_s=1e9))
    stacks = []   # the run's stack of one, whose epoch is the loop's
    init = Stack.__init__

    def spy(self, *a, **kw):
        init(self, *a, **kw)
        stacks.append(self)
    monkeypatch.setattr(Stack, "__init__", spy)
    counter = HostSyncs(lambda: stacks[0].epoch if stacks else trainer.epoch,
                        lambda: step_counters(trainer.optimizer) + (
                            [t for ts in stacks[0].opt._step_ts for t in ts] if stacks else []))
    count_reads(counter)
    commits = []
    commit = trainer.commit
    trainer.commit = lambda *a, **kw: (commits.append(trainer.epoch), commit(*a, **kw))
    with counter:
        trainer.fit(progress_bar=False, until=40)
    quiet = [e for e in range(1, 41) if e not in commits]
    assert commits == [20, 40]
    assert per_epoch(counter, quiet) == {e: 0 for e in quiet}, counter.by_epoch
    assert counter.by_epoch[0]["_unique2"] == 1   # the train split's queries
    for e in commits:   # beside the commit's copies, the postfix's and the check's reads
        c = counter.by_epoch[e]
        assert c["tolist"] == 1 and c["_local_scalar_dense"] == 1, c
        assert c["boolean mask"] == 0, c


def _packed(tmp_path, schedule: bool):
    """A batched group of 3 runs with the GPU's defaults (batched forward, Adam's corrections on
    the device), one of them on a warmup and cosine lr schedule when ``schedule``."""
    cfgs = [BASE.replace(model_seed=1 + i, train_frac=0.5 + 0.1 * i, weight_decay=1.0 - 0.2 * i)
            for i in range(3)]
    if schedule:
        cfgs[1] = cfgs[1].replace(warmup_epochs=6, lr_schedule="cosine")
    trainers = [Trainer.open(c, tmp_path / str(i), torch.device("cpu"),
                             JobSettings(state_every_s=1e9)) for i, c in enumerate(cfgs)]
    stack = Stack(trainers, torch.device("cpu"), exact=False)
    stack.opt.host_scalars = False
    return stack


@pytest.mark.parametrize("schedule", [False, True])
def test_packed_default_path_syncs_only_at_commits(tmp_path, count_reads, monkeypatch,
                                                   schedule):
    """A batched group trained by the loop (fit_stack): no host sync in an epoch without a commit
    (epoch 0 sets up the device-side step counts and schedule), whether or not an lr schedule
    changes a run's lr every epoch; a commit's divergence check reads the device once for
    all runs."""
    import grokhpc.loop as loop

    stack = _packed(tmp_path, schedule)
    counter = HostSyncs(lambda: stack.epoch)
    count_reads(counter)
    commits, checks = [], []
    commit_all, diverged = loop.commit_all, stack.diverged
    monkeypatch.setattr(loop, "commit_all",
                        lambda runs, **kw: (commits.append(stack.epoch), commit_all(runs, **kw)))

    def counted(runs, last):
        before = sum(counter.by_epoch.get(stack.epoch, Counter()).values())
        out = diverged(runs, last)
        checks.append(sum(counter.by_epoch[stack.epoch].values()) - before)
        return out
    stack.diverged = counted
    with counter:
        loop.fit_stack(stack, 40, None, lambda *a: None)
    quiet = [e for e in range(1, 41) if e not in commits]
    assert commits == [20, 40]
    assert per_epoch(counter, quiet) == {e: 0 for e in quiet}, counter.by_epoch
    assert checks == [1, 1]   # R = 3 runs, one read each time
