"""grokhpc: grokking experiments (Nanda et al. 2023) as sweeps on SLURM clusters.

``grokhpc.open_run(dir)`` and ``grokhpc.open_sweep(dir)`` (grokhpc.api) are imported on first
use, so ``import grokhpc`` and every ``python -m grokhpc.<module> --help`` stay fast.
"""

_LAZY = {"open_run": "api", "open_sweep": "api", "Run": "api", "Sweep": "api"}
__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
