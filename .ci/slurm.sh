#!/usr/bin/env bash
# A two-node SLURM cluster on this one machine, for the tests that launch jobs through
# hydra-submitit-launcher: installs Debian's slurmctld, slurmd, slurm-client and munge
# if missing, writes a slurm.conf for nodes n1 and n2 (both 127.0.0.1, ports 17001-17002,
# one CPU each so that two jobs land on two nodes; partition "debug", no accounting), starts munged, slurmctld and one slurmd per node,
# and waits until sinfo shows both idle. Prints the slurm.conf path (use it as
# SLURM_CONF and KD_TEST_SLURM_CONF).
#   bash .ci/slurm.sh            # start; last line: the slurm.conf path
#   bash .ci/slurm.sh stop CONF  # stop the cluster CONF describes
set -euo pipefail
if [ "${1:-start}" = stop ]; then
  SLURM_CONF="$2" scontrol shutdown >/dev/null 2>&1 || true
  exit 0
fi
if ! command -v slurmctld >/dev/null 2>&1 || ! command -v slurmd >/dev/null 2>&1 || ! command -v munged >/dev/null 2>&1; then
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null
fi
dir=$(mktemp -d /tmp/kd-slurm.XXXXXX)
mkdir -p "$dir/state" "$dir/spool"
cat > "$dir/slurm.conf" <<CONF
ClusterName=kdtest
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job may start again after this many seconds (SLURM's default, 120, makes a
# preempted trial wait two minutes).
AuthInfo=cred_expire=10
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.%n.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.%n.log
SlurmctldPort=16817
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
NodeName=n[1-2] NodeHostname=localhost NodeAddr=127.0.0.1 Port=17001-17002 CPUs=1 RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP
CONF
export SLURM_CONF="$dir/slurm.conf"
if ! pgrep -x munged >/dev/null; then
  mkdir -p /run/munge && chown munge:munge /run/munge
  su -s /bin/sh munge -c /usr/sbin/munged
fi
slurmctld -c
slurmd -N n1
slurmd -N n2
for _ in $(seq 60); do
  [ "$(sinfo -h -o '%T' -p debug 2>/dev/null | sort -u)" = idle ] && [ "$(sinfo -h -o '%D' -p debug)" = 2 ] && break
  sleep 1
done
sinfo -h -o '%T %D' -p debug | grep -q '^idle 2$' || { echo "SLURM nodes did not come up: see $dir/*.log" >&2; exit 1; }
echo "$SLURM_CONF"
