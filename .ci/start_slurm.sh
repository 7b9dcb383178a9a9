#!/usr/bin/env bash
# Install Debian's slurm-wlm and munge and start a one-node SLURM on this machine (CPU only, as
# root), for the cluster test (tests/test_cluster.py). Idempotent: a running cluster is kept.
#
# Node: this host, with the CPUs it has; memory is not a consumable (SelectTypeParameters=CR_CPU)
# and SlurmdParameters=config_overrides lets jobs ask for more memory than the host has (no
# cgroups: TaskPlugin=task/none, ProctrackType=proctrack/linuxproc). There is no slurmdbd, so
# `sacct` is disabled; MinJobAge=3600 keeps finished jobs in `squeue` long enough for Snakemake's
# SLURM executor to follow them with `squeue`.
set -euo pipefail

log() { echo "[start_slurm $(date -u +%H:%M:%S)] $*"; }
start=$(date +%s)

if [ "$(id -u)" != 0 ]; then
    echo "start_slurm.sh: must run as root (it installs packages and starts daemons)" >&2
    exit 1
fi

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    log "installing slurm-wlm and munge (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
fi

host=$(hostname -s)
cpus=$(nproc)
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge \
    /var/lib/munge /var/log/munge /etc/munge

# munge: a key, then the daemon (as root: the CI runs as root, no systemd)
if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
fi
chmod 400 /etc/munge/munge.key
if ! munge -n >/dev/null 2>&1; then
    log "starting munged"
    munged --force
    for _ in $(seq 50); do munge -n >/dev/null 2>&1 && break; sleep 0.1; done
fi
munge -n | unmunge >/dev/null

cat > /etc/slurm/slurm.conf <<CONF
ClusterName=quari-ci
SlurmctldHost=${host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
MinJobAge=3600
KillWait=5
InactiveLimit=0
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
NodeName=${host} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=512000 State=UNKNOWN
PartitionName=ci Nodes=${host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF

if ! scontrol ping 2>/dev/null | grep -q "is UP"; then
    log "starting slurmctld and slurmd"
    slurmctld -c 2>/dev/null || slurmctld
    slurmd -c 2>/dev/null || slurmd
fi
for _ in $(seq 100); do
    state=$(sinfo -h -N -o "%T" 2>/dev/null | head -1 || true)
    case "$state" in idle*|mixed*|allocated*) break ;; esac
    sleep 0.2
done
state=$(sinfo -h -N -o "%T" | head -1)
case "$state" in
    idle*|mixed*|allocated*) ;;
    *) scontrol update nodename="${host}" state=resume 2>/dev/null || true; sleep 1
       state=$(sinfo -h -N -o "%T" | head -1) ;;
esac
sinfo
case "$state" in
    idle*|mixed*|allocated*) ;;
    *) echo "start_slurm.sh: node ${host} is ${state}" >&2; tail -20 /var/log/slurm/*.log >&2; exit 1 ;;
esac
# one job through the queue proves the whole path (munge, controller, node)
out=$(srun -N1 -n1 --time=1 hostname)
log "SLURM up on ${host} (${cpus} CPUs): test job ran on ${out}; took $(( $(date +%s) - start )) s"
