#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, from Debian's packages, for trying hydra/launcher=slurm and for the
# tests marked `slurm` (docs/cluster.md). Everything it writes lies in one folder ($SEMVAE_SLURM_DIR, by default
# /tmp/semvae-slurm): configs, the munge key and socket, the daemons' state and pid files, the accounting database,
# and the logs (log/), which stay after `stop`. Runs as root: slurmd starts jobs as the user who submitted them.
#
#   tests/slurm/cluster.sh install   # apt-get the packages (retried); about 15 s
#   tests/slurm/cluster.sh start     # start what is not running; returns once the node takes jobs
#   eval "$(tests/slurm/cluster.sh env)"   # SLURM_CONF for sbatch, squeue, sacct and run.py in this shell
#   tests/slurm/cluster.sh status    # each daemon, then sinfo
#   tests/slurm/cluster.sh stop      # stop the daemons (state and logs are kept)
#
# The node is this machine (`hostname -s`) with the CPUs and memory `slurmd -C` finds, no GPUs, one partition
# (`debug`, the default). Accounting (slurmdbd, with a MariaDB server of its own) is part of it: without it submitit
# cannot tell that a job died without writing its result and waits for it forever. Ports: $SEMVAE_SLURM_PORT (6817)
# for slurmctld, +1 slurmd, +2 slurmdbd, +3 MariaDB (on 127.0.0.1 only).
set -euo pipefail

STATE=${SEMVAE_SLURM_DIR:-${TMPDIR:-/tmp}/semvae-slurm}
PORT=${SEMVAE_SLURM_PORT:-6817}
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
HOST=$(hostname -s)
CONF=$STATE/etc/slurm.conf
MYSQL_SOCKET=$STATE/mysql/mysqld.sock

say() { echo "cluster.sh: $*" >&2; }
die() { say "$*"; exit 1; }
need_root() { [ "$(id -u)" = 0 ] || die "$1 needs root (slurmd starts jobs as their users): sudo $0 $1"; }

install_packages() {
  need_root install
  command -v apt-get >/dev/null || die "no apt-get: install SLURM ${PACKAGES[*]} with this system's package manager"
  local attempt
  for attempt in 1 2 3 4 5; do
    if DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" \
      >"${TMPDIR:-/tmp}/semvae-slurm-apt.log" 2>&1; then
      return 0
    fi
    say "apt-get install failed (attempt $attempt of 5; ${TMPDIR:-/tmp}/semvae-slurm-apt.log); updating the lists"
    apt-get update -q >>"${TMPDIR:-/tmp}/semvae-slurm-apt.log" 2>&1 || true
    sleep $((attempt * 5))
  done
  tail -5 "${TMPDIR:-/tmp}/semvae-slurm-apt.log" >&2
  die "could not install ${PACKAGES[*]}"
}

running() {  # running NAME: its pid file names a live process
  local pid_file=$STATE/run/$1.pid
  [ -s "$pid_file" ] && kill -0 "$(cat "$pid_file")" 2>/dev/null
}

accounting() { command -v slurmdbd >/dev/null && command -v mariadbd >/dev/null; }

write_configs() {
  local node cpus_line password
  node=$(slurmd -C | head -1)  # NodeName=HOST CPUs=... RealMemory=...
  cpus_line=${node#NodeName=* }
  mkdir -p "$STATE"/{etc,run,log,spool/ctld,spool/d,munge}
  chmod 755 "$STATE" "$STATE/etc" "$STATE/log"
  cat >"$CONF" <<EOF
# written by tests/slurm/cluster.sh: one node, this machine
ClusterName=semvae
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
# the munge daemon of this cluster; credentials expire after 10 s, so a requeued job may start again ~13 s later
AuthInfo=socket=$STATE/munge/munge.socket,cred_expire=10
StateSaveLocation=$STATE/spool/ctld
SlurmdSpoolDir=$STATE/spool/d
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
# plain daemons without systemd or cgroups
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=sched_interval=5,bf_interval=5
ReturnToService=2
MpiDefault=none
EOF
  if accounting; then
    cat >>"$CONF" <<EOF
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$((PORT + 2))
# the munge socket for talking to slurmdbd (sacct, sacctmgr, slurmctld)
AccountingStoragePass=$STATE/munge/munge.socket
EOF
  fi
  cat >>"$CONF" <<EOF
NodeName=$HOST NodeAddr=127.0.0.1 $cpus_line State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
  if accounting; then
    [ -s "$STATE/etc/.dbpass" ] || (umask 077 && od -An -N12 -tx1 /dev/urandom | tr -d ' \n' >"$STATE/etc/.dbpass")
    password=$(cat "$STATE/etc/.dbpass")
    (umask 077 && cat >"$STATE/etc/slurmdbd.conf" <<EOF
# written by tests/slurm/cluster.sh
AuthType=auth/munge
AuthInfo=socket=$STATE/munge/munge.socket
DbdHost=localhost
DbdPort=$((PORT + 2))
SlurmUser=root
PidFile=$STATE/run/slurmdbd.pid
LogFile=$STATE/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$((PORT + 3))
StorageUser=slurm
StoragePass=$password
StorageLoc=slurm_acct_db
EOF
    )
  fi
}

start_munge() {
  running munged && return 0
  local key=$STATE/munge/munge.key
  chown munge:munge "$STATE/munge" && chmod 700 "$STATE/munge"
  if [ ! -s "$key" ]; then
    dd if=/dev/urandom of="$key" bs=1024 count=1 status=none
    chown munge:munge "$key" && chmod 400 "$key"
  fi
  chmod 711 "$STATE/munge"  # clients reach the socket; the key stays the daemon's
  rm -f "$STATE/munge/munge.socket"
  touch "$STATE/log/munged.log" && chown munge:munge "$STATE/log/munged.log"
  runuser -u munge -- /usr/sbin/munged --socket="$STATE/munge/munge.socket" --key-file="$key" \
    --pid-file="$STATE/munge/munged.pid" --log-file="$STATE/log/munged.log" --seed-file="$STATE/munge/munged.seed" \
    || die "munged did not start: $STATE/log/munged.log"
  cp "$STATE/munge/munged.pid" "$STATE/run/munged.pid"
}

start_mariadb() {
  running mariadbd && return 0
  local data=$STATE/mysql
  if [ ! -d "$data/mysql" ]; then
    mkdir -p "$data"
    mariadb-install-db --no-defaults --user=root --datadir="$data" --auth-root-authentication-method=socket \
      --skip-test-db >"$STATE/log/mariadb-install.log" 2>&1 || die "mariadb-install-db failed: $STATE/log/mariadb-install.log"
  fi
  setsid -f /usr/sbin/mariadbd --no-defaults --user=root --datadir="$data" --socket="$MYSQL_SOCKET" \
    --bind-address=127.0.0.1 --port=$((PORT + 3)) --pid-file="$STATE/run/mariadbd.pid" \
    --log-error="$STATE/log/mariadbd.log" </dev/null >/dev/null 2>&1
  wait_for 60 "MariaDB" mariadb --no-defaults --socket="$MYSQL_SOCKET" -uroot -e "select 1"
  local password
  password=$(cat "$STATE/etc/.dbpass")
  mariadb --no-defaults --socket="$MYSQL_SOCKET" -uroot -e "
    CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$password';
    CREATE DATABASE IF NOT EXISTS slurm_acct_db;
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
}

start_daemon() {  # start_daemon NAME COMMAND...
  running "$1" && return 0
  local name=$1
  shift
  SLURM_CONF=$CONF "$@" || die "$name did not start: $STATE/log/$name.log"
  wait_for 30 "$name's pid file" test -s "$STATE/run/$name.pid"
}

wait_for() {  # wait_for SECONDS WHAT COMMAND...: until COMMAND succeeds
  local seconds=$1 what=$2
  local deadline=$((SECONDS + seconds))
  shift 2
  local limit=(timeout 10)
  [ "$(type -t "$1")" = function ] && limit=()
  until "${limit[@]}" "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || die "$what not ready after ${seconds}s (logs: $STATE/log/)"
    sleep 0.25
  done
}

node_idle() {
  local state
  state=$(SLURM_CONF=$CONF timeout 10 sinfo -h -n "$HOST" -o %t 2>/dev/null) || return 1
  case $state in
    idle | mix | alloc) return 0 ;;
    down* | drain* | drng*) SLURM_CONF=$CONF scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 ;;
  esac
  return 1
}

start() {
  need_root start
  for exe in munged slurmctld slurmd sbatch; do
    command -v "$exe" >/dev/null || die "$exe not found: install the packages first ($0 install)"
  done
  write_configs
  start_munge
  if accounting; then
    start_mariadb
    running slurmdbd || SLURM_CONF=$CONF /usr/sbin/slurmdbd || die "slurmdbd did not start: $STATE/log/slurmdbd.log"
    wait_for 60 "slurmdbd" env SLURM_CONF="$CONF" sacctmgr -n list cluster  # slurmctld needs it answering
  else
    say "slurmdbd or mariadbd missing: no accounting (a job that dies without a result is not detected)"
  fi
  start_daemon slurmctld /usr/sbin/slurmctld -f "$CONF"
  start_daemon slurmd /usr/sbin/slurmd -f "$CONF" -N "$HOST"
  wait_for 60 "the node $HOST" node_idle
  if accounting; then
    wait_for 60 "accounting (sacct)" env SLURM_CONF="$CONF" sacct -n -X -S now
  fi
  say "up: node $HOST idle; export SLURM_CONF=$CONF (logs: $STATE/log/)"
}

stop() {
  local name pid i
  for name in slurmd slurmctld slurmdbd mariadbd munged; do
    running "$name" || continue
    pid=$(cat "$STATE/run/$name.pid")
    kill "$pid" 2>/dev/null || true
    for ((i = 0; i < 120 && $(kill -0 "$pid" 2>/dev/null && echo 1 || echo 0); i++)); do sleep 0.25; done
    if kill -0 "$pid" 2>/dev/null; then
      say "$name (pid $pid) still running 30 s after SIGTERM: SIGKILL"
      kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$STATE/run/$name.pid"
  done
  say "stopped (logs kept in $STATE/log/)"
}

status() {
  local name up=0
  for name in munged mariadbd slurmdbd slurmctld slurmd; do
    if running "$name"; then echo "$name: running (pid $(cat "$STATE/run/$name.pid"))"; else echo "$name: stopped"; up=1; fi
  done
  [ -f "$CONF" ] && SLURM_CONF=$CONF sinfo 2>&1 || true
  return $up
}

case ${1:-} in
  install) install_packages ;;
  start) start ;;
  stop) stop ;;
  status) status ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) echo "usage: $0 install|start|stop|status|env (state and logs in $STATE)" >&2; exit 2 ;;
esac
