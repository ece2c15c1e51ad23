#!/usr/bin/env bash
# slurm/start_slurm.sh - a single-node SLURM on localhost for grokhpc's tests.
#
# Installs Debian's Slurm 22.05 (slurmctld, slurmd, slurm-client, munge, and slurmdbd with a
# private MariaDB so that `sacct` works), renders slurm.conf / slurmdbd.conf / my.cnf from the
# templates next to this script, starts the daemons without systemd or cgroups and waits until
# the node takes jobs. Idempotent: when everything it started is still up with the same
# configuration it says so and exits 0 at once. Must run as root.
#
# Why the configuration looks the way it does (each point was a failure first):
#   * submitit polls sacct: without slurmdbd a cancelled or killed job never resolves.
#   * DefMemPerCPU: otherwise every job asks for the whole node and jobs run one at a time.
#   * AuthInfo=cred_expire=10, sched_interval=5: a requeued job would wait 120 s to restart.
#   * MailProg=/bin/true: the default mail program is missing.
#   * policy-rc.d during apt: keeps the packages from starting the distribution's services.
#
# Environment:
#   GROKHPC_SLURM_PREFIX  state, logs and pidfiles          (default /tmp/grokhpc-slurm)
#   WITH_SLURMDBD=1|0     accounting through slurmdbd+MariaDB (default 1)
#   FRESH=1               wipe the controller state and accounting DB first (daemons stopped)
#   DB_PORT               MariaDB port on 127.0.0.1           (default 3306)
#   CLUSTER_NAME          (default grokhpc)
#   WAIT_S                seconds to wait for the node        (default 90)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PREFIX=${GROKHPC_SLURM_PREFIX:-/tmp/grokhpc-slurm}
WITH_SLURMDBD=${WITH_SLURMDBD:-1}
FRESH=${FRESH:-0}
DB_PORT=${DB_PORT:-3306}
DB_PASS=grokhpc-slurm
CLUSTER_NAME=${CLUSTER_NAME:-grokhpc}
WAIT_S=${WAIT_S:-90}
NODE=$(hostname -s 2>/dev/null || uname -n | cut -d. -f1)
ETC=$PREFIX/etc RUN=$PREFIX/run LOG=$PREFIX/log STATE=$PREFIX/state
MYSQL_DATA=$PREFIX/mysql MYSQL_RUN=$PREFIX/mysql-run
T0=$SECONDS

say() { printf '[start_slurm +%ss] %s\n' $((SECONDS - T0)) "$*"; }
die() {
  say "ERROR: $*"
  for f in "$LOG"/*.log "$MYSQL_RUN"/mysqld.log; do
    [[ -f $f ]] && { echo "--- last lines of $f"; tail -n 15 "$f"; }
  done
  exit 1
}
# ours PIDFILE NAME: the pidfile names a live process whose command starts with NAME
ours() {
  local pid
  [[ -s $1 ]] || return 1
  pid=$(<"$1")
  [[ $pid =~ ^[0-9]+$ && -r /proc/$pid/comm ]] || return 1
  [[ $(</proc/$pid/comm) == "$2"* ]]
}
# wait_until WHAT SECONDS CMD...: poll CMD every quarter second
wait_until() {
  local what=$1 end=$((SECONDS + $2)); shift 2
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < end)) || die "timed out waiting for $what"
    sleep 0.25
  done
}
stop_one() {  # PIDFILE NAME
  ours "$1" "$2" || { rm -f "$1"; return 0; }
  local pid; pid=$(<"$1"); kill "$pid"
  for _ in $(seq 80); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
  kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
  rm -f "$1"
}
node_ready() {
  case $(sinfo -h -n "$NODE" -o %T 2>/dev/null) in
    idle|mixed|allocated|completing) return 0 ;;
  esac
  return 1
}

[[ $(id -u) -eq 0 ]] || die "must run as root (apt-get, munge, /etc/slurm)"
mkdir -p "$ETC" "$RUN" "$LOG" "$STATE"

# ------------------------------------------------------------------------------ packages
PKGS=(slurmctld slurmd slurm-client munge)
[[ $WITH_SLURMDBD == 1 ]] && PKGS+=(slurmdbd mariadb-server)
missing=()
for p in "${PKGS[@]}"; do
  [[ $(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true) == "install ok installed" ]] \
    || missing+=("$p")
done
if ((${#missing[@]})); then
  say "installing ${missing[*]}"
  policy=0
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then  # no auto-started distribution services
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    policy=1
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=600 update -qq >"$LOG/apt.log" 2>&1 \
    || die "apt-get update failed (see $LOG/apt.log)"
  apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing[@]}" \
    >>"$LOG/apt.log" 2>&1 || die "apt-get install failed (see $LOG/apt.log)"
  if ((policy)); then rm -f /usr/sbin/policy-rc.d; trap - EXIT; fi
  say "installed $(dpkg-query -W -f='${Package}=${Version} ' "${missing[@]}")"
fi

# ------------------------------------------------------------------------------ configuration
CPUS=$(nproc)
MEM_MB=$(($(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 80 / 100))
# the socket/core/thread layout slurmd detects (its RealMemory is replaced by 80% of RAM)
HWLINE=$(/usr/sbin/slurmd -C | head -1 | tr ' ' '\n' \
  | grep -E '^(CPUs|Boards|SocketsPerBoard|CoresPerSocket|ThreadsPerCore)=' | tr '\n' ' ' || true)
[[ -n $HWLINE ]] || HWLINE="CPUs=$CPUS"
if [[ $WITH_SLURMDBD == 1 ]]; then
  ACCOUNTING="AccountingStorageType=accounting_storage/slurmdbd\nAccountingStorageHost=localhost\nAccountingStoragePort=6819\nJobAcctGatherType=jobacct_gather/linux\nJobAcctGatherFrequency=30"
else
  ACCOUNTING="AccountingStorageType=accounting_storage/none\nJobAcctGatherType=jobacct_gather/none"
fi
render() {  # TEMPLATE OUT
  sed -e "s|@CLUSTER_NAME@|$CLUSTER_NAME|g" -e "s|@NODE@|$NODE|g" -e "s|@STATE@|$STATE|g" \
      -e "s|@RUN@|$RUN|g" -e "s|@LOG@|$LOG|g" -e "s|@HWLINE@|${HWLINE% }|g" \
      -e "s|@MEM_MB@|$MEM_MB|g" -e "s|@DB_PORT@|$DB_PORT|g" -e "s|@DB_PASS@|$DB_PASS|g" \
      -e "s|@MYSQL_DATA@|$MYSQL_DATA|g" -e "s|@MYSQL_RUN@|$MYSQL_RUN|g" \
      -e "s|@ACCOUNTING@|$ACCOUNTING|g" "$1" >"$2"
}
render "$HERE/slurm.conf.in" "$ETC/slurm.conf"
conf_changed=0
if ! cmp -s "$ETC/slurm.conf" /etc/slurm/slurm.conf; then
  conf_changed=1
  if [[ -f /etc/slurm/slurm.conf ]] && ! grep -q 'slurm/start_slurm.sh (grokhpc' /etc/slurm/slurm.conf; then
    cp -p /etc/slurm/slurm.conf "/etc/slurm/slurm.conf.bak.$(date +%s)"
    say "kept a copy of the existing /etc/slurm/slurm.conf"
  fi
  mkdir -p /etc/slurm
  install -m 644 "$ETC/slurm.conf" /etc/slurm/slurm.conf
fi
if [[ $WITH_SLURMDBD == 1 ]]; then
  render "$HERE/slurmdbd.conf.in" "$ETC/slurmdbd.conf"
  install -m 600 -o root -g root "$ETC/slurmdbd.conf" /etc/slurm/slurmdbd.conf
  render "$HERE/my.cnf.in" "$ETC/my.cnf"
fi

# already up with this configuration? then there is nothing to do
if ((!conf_changed)) && [[ $FRESH != 1 ]] && ours "$RUN/slurmctld.pid" slurmctld \
   && ours "$RUN/slurmd.pid" slurmd \
   && { [[ $WITH_SLURMDBD != 1 ]] || ours "$RUN/slurmdbd.pid" slurmdbd; } && node_ready; then
  say "already up (node $NODE $(sinfo -h -n "$NODE" -o %T))"
  exit 0
fi

if [[ $FRESH == 1 ]]; then
  for d in slurmd slurmctld slurmdbd mariadbd; do
    ours "$RUN/$d.pid" "$d" && die "FRESH=1 while $d runs: run slurm/stop_slurm.sh first"
  done
  say "FRESH=1: wiping $STATE and $MYSQL_DATA"
  rm -rf "$STATE" "$MYSQL_DATA" "$MYSQL_RUN"
fi
mkdir -p "$STATE/ctld" "$STATE/d"

# ------------------------------------------------------------------------------ munge
[[ -s /etc/munge/munge.key ]] || {
  say "creating a munge key"
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
}
chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge && chmod 755 /run/munge
if ours "$RUN/munged.pid" munged; then
  say "munged running (pid $(<"$RUN/munged.pid"))"
elif munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  say "a munged not started here answers; using it"
else
  runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid || die "munged did not start"
  wait_until munged 20 bash -c 'munge -n | unmunge'
  cp /run/munge/munged.pid "$RUN/munged.pid"
  say "munged started (pid $(<"$RUN/munged.pid"))"
fi

# ------------------------------------------------------------------------------ accounting
if [[ $WITH_SLURMDBD == 1 ]]; then
  mkdir -p "$MYSQL_DATA" "$MYSQL_RUN" && chown mysql:mysql "$MYSQL_DATA" "$MYSQL_RUN"
  if [[ ! -d $MYSQL_DATA/mysql ]]; then
    say "initialising the MariaDB data directory"
    mariadb-install-db --defaults-file="$ETC/my.cnf" --auth-root-authentication-method=socket \
      --skip-test-db >"$LOG/mariadb-install-db.log" 2>&1 \
      || die "mariadb-install-db failed (see $LOG/mariadb-install-db.log)"
  fi
  if ours "$RUN/mariadbd.pid" mariadbd; then
    say "mariadbd running (pid $(<"$RUN/mariadbd.pid"))"
  else
    if (exec 3<>"/dev/tcp/127.0.0.1/$DB_PORT") 2>/dev/null; then
      die "port $DB_PORT is taken (set DB_PORT)"
    fi
    setsid /usr/sbin/mariadbd --defaults-file="$ETC/my.cnf" >>"$LOG/mariadbd.out" 2>&1 </dev/null &
    echo $! >"$RUN/mariadbd.pid"
    wait_until mariadbd 60 mariadb-admin --defaults-file="$ETC/my.cnf" -uroot ping
    say "mariadbd started (pid $(<"$RUN/mariadbd.pid"))"
  fi
  mariadb --defaults-file="$ETC/my.cnf" -uroot <<SQL || die "could not grant slurmdbd its database"
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
SQL
  if ours "$RUN/slurmdbd.pid" slurmdbd; then
    say "slurmdbd running (pid $(<"$RUN/slurmdbd.pid"))"
  else
    /usr/sbin/slurmdbd || die "slurmdbd did not start"
    wait_until slurmdbd 60 sacctmgr -n list cluster
    say "slurmdbd started (pid $(<"$RUN/slurmdbd.pid"))"
  fi
  sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER_NAME" \
    || sacctmgr -i add cluster "$CLUSTER_NAME" >/dev/null || die "sacctmgr add cluster failed"
fi

# ------------------------------------------------------------------------------ slurmctld, slurmd
if ((conf_changed)) && { ours "$RUN/slurmctld.pid" slurmctld || ours "$RUN/slurmd.pid" slurmd; }; then
  say "slurm.conf changed: restarting slurmctld and slurmd"
  stop_one "$RUN/slurmd.pid" slurmd
  stop_one "$RUN/slurmctld.pid" slurmctld
fi
if ours "$RUN/slurmctld.pid" slurmctld; then
  say "slurmctld running (pid $(<"$RUN/slurmctld.pid"))"
else
  /usr/sbin/slurmctld || die "slurmctld did not start"
  wait_until slurmctld 60 sinfo -h
  say "slurmctld started (pid $(<"$RUN/slurmctld.pid"))"
fi
if ours "$RUN/slurmd.pid" slurmd; then
  say "slurmd running (pid $(<"$RUN/slurmd.pid"))"
else
  /usr/sbin/slurmd || die "slurmd did not start"
  wait_until slurmd.pid 30 test -s "$RUN/slurmd.pid"
  say "slurmd started (pid $(<"$RUN/slurmd.pid"))"
fi

# ------------------------------------------------------------------------------ wait for the node
end=$((SECONDS + WAIT_S))
until node_ready; do
  case $(sinfo -h -n "$NODE" -o %T 2>/dev/null || true) in
    down*|drain*|fail*) scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true ;;
  esac
  ((SECONDS < end)) || die "node $NODE not ready after ${WAIT_S}s"
  sleep 0.25
done
say "node $NODE is $(sinfo -h -n "$NODE" -o %T): ready"
