#!/usr/bin/env bash
# Every GPU measurement of packed training in one call, under a time limit: the check of
# batched mode and the step modes against solo runs, the speed table (R = 1, 32, 128, 512;
# eager, fused, graph; TF32), the projection of 128 runs x 25,000 epochs, and the fidelity
# of 16 runs packed against the same runs alone.
#
#   bash benchmarks/gpu_day.sh                     # from anywhere; extra arguments go to
#   bash benchmarks/gpu_day.sh --only fidelity     # benchmarks/gpu_batched.py
#
# Writes gpu_batched_table.md and gpu_day.log into $OUT when set (else benchmarks/).
# GPU_DAY_LIMIT_S (default 570) bounds the whole run; PYTHON picks the interpreter.
# Where transformer_lens is not installed (a bare GPU image), a stand-in package with
# identity hook points is put on the path: the fast paths timed here call no hooks.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks}"
py="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if ! "$py" -c "import transformer_lens" 2>/dev/null; then
    shim="$(mktemp -d)/transformer_lens"
    mkdir -p "$shim"
    cat > "$shim/__init__.py" <<'PY'
"""Stand-in for transformer_lens: HookPoint an identity module, HookedRootModule a plain
torch module. Enough to build and train grokhpc's one-layer model; no hooks, no cache."""
import torch.nn as nn

from .hook_points import HookPoint  # noqa: F401


class HookedRootModule(nn.Module):
    def setup(self):
        pass


class ActivationCache(dict):
    pass
PY
    cat > "$shim/hook_points.py" <<'PY'
import torch.nn as nn


class HookPoint(nn.Module):
    def forward(self, x):
        return x
PY
    export PYTHONPATH="$PYTHONPATH:$(dirname "$shim")"
    echo "transformer_lens is not installed here: a stand-in with identity hook points is used"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
timeout "${GPU_DAY_LIMIT_S:-570}" "$py" benchmarks/gpu_batched.py \
    --out "$out/gpu_batched_table.md" "$@" 2>&1 | tee "$out/gpu_day.log"
