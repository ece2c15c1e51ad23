"""How runs are executed, and the record of it: a job's settings, the device, the process's
torch settings for training, and each attempt's provenance.

``JobSettings`` is the one typed object for what a job needs beyond its runs' configs (how
often state.pt is written, how a packed step is issued, torch threads, W&B). It comes from a
sweep spec's ``launcher:`` section (or the training commands' flags), travels with the job, and
is recorded in each attempt's provenance (progress.json ``attempts``). None of it is part of a
run's identity.

Provenance: who trained a run, where and with what, once per attempt (process); the fields
that change a run's numbers (device type, torch threads on a CPU, versions) are compared
between attempts, so a resume under another environment is said out loud.

Imports no torch at module level.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from .config import ConfigError, shown

DEFAULT_STATE_EVERY_S = 600.0   # state.pt at most this often; 0: with every checkpoint row
STEP_MODES = ("eager", "fused", "graph", "compile")


@dataclass(frozen=True)
class JobSettings:
    """A job's settings beyond its runs' configs (none changes a run's id).

    * ``state_every_s``: seconds between a run's state.pt writes (0: with every checkpoint row);
    * ``step_mode``: how a packed batched group issues its step (see grokhpc.step_mode);
    * ``threads``: torch threads for the job's training (None: SLURM's cpus-per-task, else
      torch's default);
    * ``wandb``: W&B tracking settings as a plain mapping (grokhpc.tracking), None when off;
    * ``refill``: a packed group whose runs stop early takes waiting runs of the same shape
      from its sweep (grokhpc.refill); off by default.
    """

    state_every_s: float = DEFAULT_STATE_EVERY_S
    step_mode: str = "eager"
    threads: int | None = None
    wandb: Mapping[str, Any] | None = None
    refill: bool = False

    def __post_init__(self) -> None:
        self.check()

    def check(self, source: str = "job settings") -> None:
        """ConfigError (one line) on a value that makes no sense."""
        s = self.state_every_s
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 <= s < float("inf"):
            raise ConfigError(f"{source}: state_every_s: expected seconds >= 0, got {shown(s)}")
        if self.step_mode not in STEP_MODES:
            raise ConfigError(f"{source}: step_mode: expected one of {', '.join(STEP_MODES)}, "
                              f"got {shown(self.step_mode)}")
        t = self.threads
        if t is not None and (isinstance(t, bool) or not isinstance(t, int) or t < 1):
            raise ConfigError(f"{source}: threads: expected an integer >= 1, got {shown(t)}")
        if not isinstance(self.refill, bool):
            raise ConfigError(f"{source}: refill: expected true or false, got {shown(self.refill)}")

    def replace(self, **changes: Any) -> "JobSettings":
        return dataclasses.replace(self, **changes)

    def provenance(self) -> dict[str, Any]:
        """What an attempt records of these settings."""
        return {"state_every_s": self.state_every_s, "step_mode": self.step_mode,
                "wandb": bool(self.wandb)}



def resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


MAX_ATTEMPTS_KEPT = 20   # progress.json keeps the first attempt and the latest ones


def slurm_job_id() -> str | None:
    """``ARRAYJOB_TASK`` for an array task, else the job id; None outside SLURM."""
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID") or None


def device_name(device) -> str | None:
    """The GPU's name, or the CPU model from /proc/cpuinfo (the platform's word elsewhere)."""
    import platform

    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.lower().startswith(("model name", "hardware", "cpu model")):
                        return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return platform.processor() or platform.machine() or None
    return device.type


def git_commit(root: Path) -> str | None:
    """The commit checked out at ``root`` (a checkout or worktree), read from .git without
    running git; None when there is none or it cannot be read."""
    try:
        dot = root / ".git"
        if dot.is_file():   # a worktree or submodule: "gitdir: PATH"
            gitdir = (root / dot.read_text().split("gitdir:", 1)[1].strip()).resolve()
        elif dot.is_dir():
            gitdir = dot
        else:
            return None
        head = (gitdir / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head or None
        ref = head[5:].strip()
        common = gitdir
        if (gitdir / "commondir").exists():
            common = (gitdir / (gitdir / "commondir").read_text().strip()).resolve()
        for base in (gitdir, common):
            if (base / ref).is_file():
                return (base / ref).read_text().strip() or None
        for line in (common / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return line.split()[0]
    except (OSError, IndexError, ValueError):
        pass
    return None


def provenance(device, settings: "JobSettings | None" = None) -> dict[str, Any]:
    """Who trains, where, with what: recorded once per attempt (process) in progress.json,
    with the job settings it trained under."""
    import platform
    import socket
    from importlib import metadata

    import numpy
    import torch

    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    return {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": socket.gethostname(),
            "pid": os.getpid(), "slurm_job": slurm_job_id(), "device": str(device),
            "device_name": device_name(device), "torch_threads": torch.get_num_threads(),
            "matmul_precision": torch.get_float32_matmul_precision(),
            "deterministic_algorithms": deterministic_for(device),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformer_lens": version("transformer_lens"), "numpy": numpy.__version__,
            "grokhpc": version("grokhpc"),
            "grokhpc_commit": git_commit(Path(__file__).resolve().parent.parent),
            **(settings.provenance() if settings is not None else {})}


@contextlib.contextmanager
def matmul_precision(precision: str):
    """torch's float32 matmul precision set to ``precision`` (a run's ``matmul_precision``:
    highest, or high for TF32 on GPUs that have it) for the block, the process's own restored
    afterwards."""
    import torch

    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def deterministic_for(device) -> bool:
    """Whether training steps on ``device`` run with torch's deterministic algorithms: on a CPU,
    where the backward of an index with repeated rows otherwise adds with atomics across
    threads (a resume would not be bit-identical); not on CUDA, whose index backward sorts
    anyway and where the setting would send scatter and index_put through slower paths and
    fill every ``torch.empty`` with NaN."""
    import torch

    return torch.device(device).type == "cpu"


@contextlib.contextmanager
def deterministic_kernels(on: bool):
    """torch's deterministic algorithms (warn only) for the block when ``on``, the process's
    own setting restored afterwards; nothing is touched when not ``on``."""
    if not on:
        yield
        return
    import torch

    before = torch.are_deterministic_algorithms_enabled()
    warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn)


# The environment a result depends on (device type and, on CPU, torch's thread count among it):
# per attempt in progress.json, flattened into summary.json and runs.parquet as these columns.
PROVENANCE_COLUMNS = {"host": "host", "slurm_job": "slurm_job", "device_name": "device_name",
                      "torch_threads": "torch_threads", "python": "python_version",
                      "torch": "torch_version", "transformer_lens": "transformer_lens_version",
                      "numpy": "numpy_version", "grokhpc": "grokhpc_version",
                      "grokhpc_commit": "grokhpc_commit"}
# Attempt fields that change the numbers: a run trained under more than one is not one that
# ran uninterrupted in any of them. The device counts by type (cuda:0 and cuda:1 alike), the
# thread count on CPU only.
RESULT_FIELDS = ("device", "device_name", "torch_threads", "python", "torch", "numpy",
                 "transformer_lens", "grokhpc", "grokhpc_commit")


def result_environment(attempt: dict[str, Any]) -> dict[str, Any]:
    """The fields of an attempt that change a run's numbers, as compared between attempts."""
    env = {k: attempt.get(k) for k in RESULT_FIELDS}
    env["device"] = str(env["device"] or "").split(":")[0] or None
    if env["device"] != "cpu":
        env["torch_threads"] = None
    return env


def changed_environment(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """The result-changing fields that differ between two attempts (thread counts only
    between two CPU attempts)."""
    a, b = result_environment(before), result_environment(after)
    both_cpu = a["device"] == b["device"] == "cpu"
    return [k for k in RESULT_FIELDS if a[k] != b[k] and (k != "torch_threads" or both_cpu)]


def provenance_columns(progress: dict[str, Any] | None) -> dict[str, Any]:
    """Flat provenance of a run from progress.json's ``attempts``: the latest attempt's
    environment, ``n_attempts``, and ``attempts_differ`` (the result-changing fields that
    differ between attempts, comma-separated; None when every attempt ran alike)."""
    attempts = [a for a in ((progress or {}).get("attempts") or []) if isinstance(a, dict)]
    if not attempts:
        return {}
    last = attempts[-1]
    out = {col: last.get(field) for field, col in PROVENANCE_COLUMNS.items()}
    out["n_attempts"] = int(last.get("attempt") or len(attempts))
    differ = {k for a in attempts[:-1] for k in changed_environment(a, last)}
    out["attempts_differ"] = ", ".join(k for k in RESULT_FIELDS if k in differ) or None
    return out


@contextlib.contextmanager
def torch_threads(n: int | None):
    """torch's intra-op threads set to ``n`` for the block (None: left as they are), the
    process's own restored afterwards."""
    if not n:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def numpy_blas_one_thread():
    """numpy's BLAS held to one thread for the block (every BLAS loaded by then: scipy's too).
    The measures' numpy products are small, and OpenBLAS's own threads, one per core by
    default, spin after each call and take the cores torch's threads need next."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")
