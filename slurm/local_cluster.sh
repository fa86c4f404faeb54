#!/usr/bin/env bash
# A real SLURM cluster on this one machine, for tests and CI (Debian/Ubuntu, root, no systemd needed).
#
#   slurm/local_cluster.sh up   [BASE]   install the Debian packages if missing, write the config, start
#                                        munged + slurmctld + one slurmd per simulated node (n1..nN, all
#                                        on 127.0.0.1); a no-op when that cluster already runs. Exit code 3:
#                                        the packages are missing and cannot be installed (no root/apt)
#   slurm/local_cluster.sh down [BASE]   cancel its jobs, stop exactly the daemons `up` started
#   slurm/local_cluster.sh env  [BASE]   print the line that points SLURM clients at it:
#                                        eval "$(slurm/local_cluster.sh env BASE)"; sinfo
#
# Everything lives under BASE (default ./outputs/slurm_cluster): config, munge key and socket, spool, logs and
# one pidfile per daemon started. Nothing is written to /etc, so a real SLURM install is left alone;
# clients find this cluster through SLURM_CONF=BASE/etc/slurm.conf (jobs inherit it).
#   SGM_SLURM_NODES  simulated nodes (default 2)      SGM_SLURM_PORT  slurmctld port (default 16817;
#                                                     slurmd of node i listens on PORT+i)
set -euo pipefail

CMD=${1:-}
BASE=$(realpath -m "${2:-${SGM_SLURM_BASE:-$PWD/outputs/slurm_cluster}}")
NODES=${SGM_SLURM_NODES:-2}
PORT=${SGM_SLURM_PORT:-16817}
CONF=$BASE/etc/slurm.conf
SOCKET=$BASE/munge/munge.socket.2
PIDS=$BASE/pids
LOGS=$BASE/logs
PACKAGES="munge slurmctld slurmd slurm-client"

say() { echo "[local_cluster $(date +%T)] $*"; }
die() { echo "[local_cluster] error: $*" >&2; exit 1; }
cannot_install() { echo "[local_cluster] cannot install SLURM: $*" >&2; exit 3; }  # exit 3: tests skip

# ours NAME: the pid recorded for NAME when that process is alive and was started for this BASE
ours() {
  local pidfile=$PIDS/$1.pid pid
  [ -s "$pidfile" ] || return 1
  pid=$(cat "$pidfile")
  [ -r "/proc/$pid/cmdline" ] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$BASE/" || return 1
  echo "$pid"
}

# start NAME COMMAND...: run a foreground daemon in the background and record its pid
start() {
  local name=$1; shift
  "$@" </dev/null >"$LOGS/$name.out" 2>&1 &
  echo $! >"$PIDS/$name.pid"
  say "started $name (pid $!)"
}

# stop NAME...: TERM the recorded processes that are still ours, together; KILL any left after 15 s
stop() {
  local name pid pids=()
  for name in "$@"; do
    if pid=$(ours "$name"); then kill -TERM "$pid" 2>/dev/null || true; pids+=("$pid"); say "stopping $name (pid $pid)"; fi
    rm -f "$PIDS/$name.pid"
  done
  for pid in "${pids[@]}"; do
    for _ in $(seq 150); do [ -d "/proc/$pid" ] || break; sleep 0.1; done
    if [ -d "/proc/$pid" ]; then kill -KILL "$pid" 2>/dev/null || true; say "pid $pid ignored TERM: killed"; fi
  done
}

node_names() { seq -f 'n%g' 1 "$NODES"; }

install_packages() {
  local missing="" p
  for p in $PACKAGES; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
  done
  [ -z "$missing" ] && return 0
  [ "$(id -u)" = 0 ] || cannot_install "packages missing ($missing) and not root: install them or run as root"
  command -v apt-get >/dev/null || cannot_install "packages missing ($missing) and no apt-get here"
  say "installing$missing"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >"$LOGS/apt.log" 2>&1 || cannot_install "apt-get update failed, see $LOGS/apt.log"
  # No recommends: 8 packages. Package scripts may not start daemons where policy-rc.d forbids it;
  # either way we start our own, with our own config.
  apt-get install -y -q --no-install-recommends $missing >>"$LOGS/apt.log" 2>&1 \
    || cannot_install "apt-get install failed, see $LOGS/apt.log"
}

write_config() {
  local host cpus nodes ports
  host=$(hostname -s)
  cpus=$(nproc)
  nodes="n[1-$NODES]"; [ "$NODES" = 1 ] && nodes=n1
  ports="[$((PORT + 1))-$((PORT + NODES))]"; [ "$NODES" = 1 ] && ports=$((PORT + 1))
  cat >"$CONF.new" <<EOF
# Written by slurm/local_cluster.sh: $NODES simulated node(s) on $host, state under $BASE
ClusterName=sgmlocal
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
# cred_expire is also how long a requeued job waits before it may run again (default 120 s)
AuthInfo=socket=$SOCKET,cred_expire=10
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
ReturnToService=2
SlurmctldPidFile=$BASE/run/slurmctld.pid
SlurmdPidFile=$BASE/run/slurmd-%n.pid
StateSaveLocation=$BASE/spool/ctld
SlurmdSpoolDir=$BASE/spool/%n
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
# the simulated nodes share the real cores: trust the node line below, not the hardware
SlurmdParameters=config_overrides
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
KillWait=5
MinJobAge=300
InactiveLimit=0
Waittime=0
NodeName=$nodes NodeHostname=$host NodeAddr=127.0.0.1 Port=$ports CPUs=$cpus Boards=1 SocketsPerBoard=1 CoresPerSocket=$cpus ThreadsPerCore=1 State=UNKNOWN
PartitionName=debug Nodes=$nodes Default=YES MaxTime=INFINITE State=UP
EOF
  if [ -f "$CONF" ] && cmp -s "$CONF" "$CONF.new"; then
    rm -f "$CONF.new"
  else
    if ours slurmctld >/dev/null; then
      say "config changed: restarting the cluster"
      down_cluster
    fi
    mv "$CONF.new" "$CONF"
  fi
}

munge_ok() { munge -n -S "$SOCKET" 2>/dev/null | unmunge -S "$SOCKET" >/dev/null 2>&1; }

start_munged() {
  ours munged >/dev/null && return 0
  [ -s "$BASE/munge/munge.key" ] || mungekey --create --keyfile="$BASE/munge/munge.key"
  chmod 600 "$BASE/munge/munge.key"
  # --force: munged wants every folder above its socket searchable by all (pytest's tmp dirs are not);
  # every client here runs as root, so that check does not matter
  start munged /usr/sbin/munged --foreground --force --socket="$SOCKET" --key-file="$BASE/munge/munge.key" \
    --pid-file="$BASE/run/munged.pid" --log-file="$LOGS/munged.log" --seed-file="$BASE/munge/munged.seed"
  for _ in $(seq 100); do munge_ok && return 0; sleep 0.1; done
  die "munged did not come up, see $LOGS/munged.out"
}

ctld_up() { SLURM_CONF=$CONF scontrol ping 2>/dev/null | grep -q UP; }

start_slurmctld() {
  ours slurmctld >/dev/null && return 0
  ctld_up && die "a slurmctld we did not start answers on port $PORT: stop it or set SGM_SLURM_PORT"
  # -c: a clean start, no jobs recovered from an earlier run
  start slurmctld /usr/sbin/slurmctld -D -c -f "$CONF"
  for _ in $(seq 150); do ctld_up && return 0; sleep 0.1; done
  die "slurmctld did not come up, see $LOGS/slurmctld.log"
}

start_slurmds() {
  local n
  for n in $(node_names); do
    mkdir -p "$BASE/spool/$n"
    ours "slurmd-$n" >/dev/null || start "slurmd-$n" /usr/sbin/slurmd -D -N "$n" -f "$CONF"
  done
}

wait_idle() {
  local states=""
  for _ in $(seq 200); do
    states=$(SLURM_CONF=$CONF sinfo -h -N -o '%T' 2>/dev/null | sort -u | tr '\n' ' ')
    [ "$states" = "idle " ] && return 0
    sleep 0.1
  done
  die "nodes are '$states', not idle: see $LOGS"
}

up_cluster() {
  mkdir -p "$BASE/etc" "$BASE/munge" "$BASE/run" "$BASE/spool/ctld" "$PIDS" "$LOGS"
  chmod 755 "$BASE/munge"  # munged wants its socket directory searchable by everyone
  install_packages
  write_config
  start_munged
  start_slurmctld
  start_slurmds
  wait_idle
  say "ready: $NODES node(s), partition debug; clients: export SLURM_CONF=$CONF"
}

down_cluster() {
  local jobs pidfile
  if ours slurmctld >/dev/null && ctld_up; then
    jobs=$(SLURM_CONF=$CONF squeue -h -o %A 2>/dev/null | tr '\n' ' ')
    if [ -n "${jobs// /}" ]; then
      say "cancelling jobs: $jobs"
      SLURM_CONF=$CONF scancel $jobs 2>/dev/null || true
      for _ in $(seq 300); do [ -z "$(SLURM_CONF=$CONF squeue -h -o %A 2>/dev/null)" ] && break; sleep 0.1; done
    fi
  fi
  local slurmds=()
  for pidfile in "$PIDS"/slurmd-*.pid; do [ -e "$pidfile" ] && slurmds+=("$(basename "$pidfile" .pid)"); done
  [ ${#slurmds[@]} -gt 0 ] && stop "${slurmds[@]}"
  stop slurmctld munged
}

case "$CMD" in
  up) up_cluster ;;
  down) [ -d "$BASE" ] && down_cluster; say "down" ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) echo "usage: $0 up|down|env [BASE]   (see the header of this script)" >&2; exit 2 ;;
esac
