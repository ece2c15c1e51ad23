#!/usr/bin/env bash
# slurm/stop_slurm.sh - stop the daemons slurm/start_slurm.sh started, and nothing else:
# each pidfile under $GROKHPC_SLURM_PREFIX/run must name a live process of the expected
# command. Jobs still queued or running are cancelled first (CANCEL_JOBS=0 keeps them), so no
# job process outlives slurmd. Exits 0 when nothing is running.
set -uo pipefail
PREFIX=${GROKHPC_SLURM_PREFIX:-/tmp/grokhpc-slurm}
RUN=$PREFIX/run
CANCEL_JOBS=${CANCEL_JOBS:-1}
T0=$SECONDS

ours() {
  local pid
  [[ -s $1 ]] || return 1
  pid=$(<"$1")
  [[ $pid =~ ^[0-9]+$ && -r /proc/$pid/comm ]] || return 1
  [[ $(</proc/$pid/comm) == "$2"* ]]
}

if [[ $CANCEL_JOBS == 1 ]] && ours "$RUN/slurmctld.pid" slurmctld; then
  jobs=$(squeue -h -o %i 2>/dev/null)
  if [[ -n $jobs ]]; then
    echo "[stop_slurm] cancelling jobs: $(echo $jobs)"
    scancel $jobs 2>/dev/null || true
    for _ in $(seq 60); do [[ -z $(squeue -h -o %i 2>/dev/null) ]] && break; sleep 0.5; done
  fi
fi
for name in slurmd slurmctld slurmdbd mariadbd munged; do  # reverse start order
  pidf=$RUN/$name.pid
  if ! ours "$pidf" "$name"; then
    [[ -e $pidf ]] && { echo "[stop_slurm] $name not running; stale pidfile removed"; rm -f "$pidf"; }
    continue
  fi
  pid=$(<"$pidf"); t=$SECONDS
  kill -TERM "$pid"
  for _ in $(seq 120); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
  if kill -0 "$pid" 2>/dev/null; then
    echo "[stop_slurm] $name ($pid) still alive after 30 s: SIGKILL"
    kill -KILL "$pid"
  fi
  rm -f "$pidf"
  echo "[stop_slurm] stopped $name (pid $pid, $((SECONDS - t)) s)"
done
echo "[stop_slurm] done in $((SECONDS - T0)) s"
