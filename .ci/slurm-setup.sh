#!/usr/bin/env bash
# A real one-node Slurm cluster on loopback for the slurm runner's tests (Debian's slurm-wlm and munge, run
# as root): munged, slurmctld and slurmd on this host, its state, spool and logs under one directory.
# Accounting stays off (the runner never needs it). Each step is skipped when its result is already there,
# so running it again finds the cluster up and only prints the variables.
#
# Prints the variables the tests read as `export` lines on stdout (everything else goes to stderr):
#   eval "$(.ci/slurm-setup.sh)"
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

STATE=${TAKEOFF_SLURM_STATE:-/var/lib/takeoff-ci/slurm}
CONF=/etc/slurm/slurm.conf
NODE=$(hostname -s)
PARTITION=debug

say() { echo "slurm-setup: $*" >&2; }

wait_until() {  # wait_until SECONDS COMMAND...: true once COMMAND succeeds, false after SECONDS
  local deadline=$((SECONDS + $1))
  shift
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || return 1
    sleep 0.2
  done
}

node_idle() { [[ $(sinfo --noheader --nodes="$NODE" --format=%t 2>/dev/null) == idle ]]; }

missing=()
command -v slurmctld >/dev/null || missing+=(slurm-wlm)
command -v munged >/dev/null || missing+=(munge)
if ((${#missing[@]})); then
  say "installing ${missing[*]}"
  apt-get update -qq >&2
  apt-get install -y -qq "${missing[@]}" >&2
fi

# munge: the key the package made, a socket directory the munge user owns, the daemon as that user.
if [[ ! -s /etc/munge/munge.key ]]; then
  say "making a munge key"
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=128 status=none
fi
chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
install -d -o munge -g munge -m 0755 /run/munge
if ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
  say "starting munged"
  rm -f /run/munge/munged.pid
  runuser -u munge -- /usr/sbin/munged --force
  wait_until 10 sh -c 'munge -n | unmunge' || { say "munged did not start"; exit 1; }
fi

mkdir -p "$STATE/ctld" "$STATE/spool" "$STATE/log"
# Real memory as the node has it (Slurm's default of 1 MB would refuse any job asking for `mem`), less a
# margin for the system.
memory=$(($(awk '/^MemTotal/ {print int($2 / 1024)}' /proc/meminfo) * 9 / 10))
config=$(
  cat <<EOF
# Written by .ci/slurm-setup.sh: a one-node test cluster on loopback.
ClusterName=takeoff-ci
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# Jobs start as soon as they are submitted or resources free up (the tests and bench/slurm_latency.py
# time that): no batching of submissions, the main scheduler also every 2 s, backfill off on one node.
SchedulerType=sched/builtin
SchedulerParameters=sched_min_interval=0,sched_interval=2
# A cancelled job's processes get 5 s between SIGTERM and SIGKILL (default 30); ended jobs stay visible to
# scontrol for 5 minutes, the runner's only record of them without accounting.
KillWait=5
MinJobAge=300
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$(nproc) RealMemory=$memory State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
)
mkdir -p /etc/slurm
if [[ ! -f $CONF || $(cat "$CONF") != "$config" ]]; then
  say "writing $CONF"
  printf '%s\n' "$config" >"$CONF"
  # Daemons started with another configuration would not serve this one.
  for daemon in slurmd slurmctld; do
    if [[ -f $STATE/$daemon.pid ]] && kill -0 "$(cat "$STATE/$daemon.pid")" 2>/dev/null; then
      say "stopping $daemon (its configuration changed)"
      kill "$(cat "$STATE/$daemon.pid")"
      wait_until 20 sh -c "! kill -0 $(cat "$STATE/$daemon.pid")"
    fi
  done
fi

if ! scontrol ping 2>/dev/null | grep -q UP; then
  say "starting slurmctld (log: $STATE/log/slurmctld.log)"
  slurmctld
  wait_until 30 sh -c 'scontrol ping | grep -q UP' || {
    tail -n 20 "$STATE/log/slurmctld.log" >&2
    say "slurmctld did not start"
    exit 1
  }
fi
if ! { [[ -f $STATE/slurmd.pid ]] && kill -0 "$(cat "$STATE/slurmd.pid")" 2>/dev/null; }; then
  say "starting slurmd (log: $STATE/log/slurmd.log)"
  slurmd
fi
# A node that went down with its slurmd (a machine restarted) comes back once slurmd registers again.
if ! wait_until 30 node_idle; then
  scontrol update nodename="$NODE" state=resume >&2 2>&1 || true
  wait_until 30 node_idle || {
    sinfo >&2
    tail -n 20 "$STATE/log/slurmd.log" >&2
    say "the node $NODE is not idle"
    exit 1
  }
fi
say "node $NODE idle in partition $PARTITION"

echo "export TAKEOFF_TEST_SLURM=1"
echo "export TAKEOFF_TEST_SLURM_PARTITION=$PARTITION"
