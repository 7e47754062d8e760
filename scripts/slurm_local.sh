#!/usr/bin/env bash
# A one-node SLURM cluster on localhost for tests and trials of the slurm profile.
#   scripts/slurm_local.sh install        apt-get install slurm-wlm + munge (root, Debian)
#   scripts/slurm_local.sh start DIR      write DIR/slurm.conf, start munged, slurmctld, slurmd
#   scripts/slurm_local.sh stop DIR       stop the daemons started from DIR
# After `start`, export SLURM_CONF=DIR/slurm.conf so sbatch/squeue find the cluster.
# The node declares one fake GPU (gres on /dev/null) so GPU rules schedule, and the size of
# a cluster node (SLURM_LOCAL_CPUS, default 16; SLURM_LOCAL_MEM_MB, default 131072) whatever
# the machine has, so profiles/slurm's own requests (8 CPUs for prepare, 64 GB for
# sample) are accepted unchanged; nothing enforces them here (no cgroups), and
# SlurmdParameters=config_overrides keeps the node up. slurmctld and slurmd listen on free
# ports, so the cluster starts next to other services (or another test's cluster).
# /etc/slurm/slurm.conf (and gres.conf) become links to DIR's files when absent, because
# the Snakemake jobstep plugin drops SLURM_CONF before its inner `srun`; `stop` removes
# the links again. A machine with its own /etc/slurm/slurm.conf is refused.
set -euo pipefail

cmd=${1:?usage: slurm_local.sh install|start DIR|stop DIR}

if [ "$cmd" = install ]; then
  command -v slurmctld >/dev/null && command -v munged >/dev/null && exit 0
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq slurm-wlm munge >/dev/null
  exit 0
fi

dir=$(realpath -m "${2:?need a state directory}")

if [ "$cmd" = stop ]; then
  for conf in slurm.conf gres.conf; do
    if [ "$(readlink "/etc/slurm/$conf" 2>/dev/null)" = "$dir/$conf" ]; then
      rm -f "/etc/slurm/$conf"
    fi
  done
  for daemon in slurmd slurmctld munged; do
    pidfile="$dir/$daemon.pid"
    if [ -f "$pidfile" ]; then
      kill "$(cat "$pidfile")" 2>/dev/null || true
      rm -f "$pidfile"
    fi
  done
  exit 0
fi

[ "$cmd" = start ] || { echo "unknown command $cmd" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "slurm_local.sh start needs root (daemons, /etc/slurm links)" >&2; exit 1; }

mkdir -p "$dir"/{state,spool,munge,log}
cpus=${SLURM_LOCAL_CPUS:-16}
mem_mb=${SLURM_LOCAL_MEM_MB:-131072}
# two free TCP ports on loopback (held together, so they differ), for slurmctld and slurmd
read -r ctld_port slurmd_port < <(python3 -c '
import socket
held = [socket.socket() for _ in range(2)]
for s in held:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in held))')

# munge: a private key and socket for this cluster
[ -f "$dir/munge/munge.key" ] || dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
chmod 700 "$dir/munge"; chmod 400 "$dir/munge/munge.key"
munged --force --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket" \
  --pid-file="$dir/munged.pid" --log-file="$dir/log/munged.log" --seed-file="$dir/munge/seed"

cat > "$dir/gres.conf" <<GRES
AutoDetect=off
NodeName=localnode Name=gpu File=/dev/null
GRES

cat > "$dir/slurm.conf" <<CONF
ClusterName=idcdiffusion
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$dir/log/jobcomp.log
MinJobAge=300
GresTypes=gpu
NodeName=localnode NodeHostname=$(hostname) NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb Gres=gpu:1 State=UNKNOWN
PartitionName=debug Nodes=localnode Default=YES MaxTime=INFINITE State=UP
CONF
mkdir -p /etc/slurm
for conf in slurm.conf gres.conf; do
  if [ -e "/etc/slurm/$conf" ] && [ "$(readlink "/etc/slurm/$conf")" != "$dir/$conf" ]; then
    echo "/etc/slurm/$conf exists and is not this test cluster's: refusing to replace it" >&2
    exit 1
  fi
  ln -sfn "$dir/$conf" "/etc/slurm/$conf"
done

export SLURM_CONF="$dir/slurm.conf"
slurmctld -f "$SLURM_CONF"
slurmd -f "$SLURM_CONF" -N localnode
for _ in $(seq 60); do
  if sinfo -h -o %t 2>/dev/null | grep -qE '^(idle|mix|alloc)'; then
    echo "SLURM cluster up: export SLURM_CONF=$SLURM_CONF"
    exit 0
  fi
  sleep 1
done
echo "SLURM cluster did not come up; logs in $dir/log" >&2
sinfo >&2 || true
exit 1
