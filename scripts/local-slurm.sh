#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, for testing the SLURM profile end to end.
#
#   scripts/local-slurm.sh start    install (apt) if needed, configure, start, wait until idle
#   scripts/local-slurm.sh status   daemons and node state
#   scripts/local-slurm.sh stop     cancel its jobs, stop the daemons this script started
#
# Needs root (it installs packages and runs the daemons) and no systemd or cgroups: a job's
# processes are tracked by process group (proctrack/pgid; with proctrack/linuxproc a cancelled
# job's Snakemake escaped once its parent shell died), tasks are not confined (task/none).
# No accounting daemon: job states come from slurmctld (`squeue`), which keeps finished jobs
# for MinJobAge seconds, and every finished job is also appended to a job-completion log
# ($LOCAL_SLURM_DIR/jobcomp.log), the record tests use to prove a job ran under SLURM.
# State (spool, logs, pid files) lives in $LOCAL_SLURM_DIR (default /tmp/local-slurm);
# `stop` kills only the daemons whose pid files are there and deletes nothing but those files.
set -euo pipefail

STATE=${LOCAL_SLURM_DIR:-/tmp/local-slurm}
CONF=/etc/slurm/slurm.conf
MARKER="# written by scripts/local-slurm.sh"
PARTITION=${LOCAL_SLURM_PARTITION:-debug}
# Finished jobs stay visible to `squeue` this long; the Snakemake plugin needs at least
# three times its first status-check delay, or it falls back to `sacct` and never returns.
MIN_JOB_AGE=${LOCAL_SLURM_MIN_JOB_AGE:-3600}
START_TIMEOUT=${LOCAL_SLURM_START_TIMEOUT:-60}

log() { echo "local-slurm: $*" >&2; }
die() { log "error: $*"; exit 1; }

pid_alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

install_packages() {
    local missing=()
    for cmd in slurmctld slurmd sinfo munged; do
        command -v "$cmd" >/dev/null || missing+=("$cmd")
    done
    ((${#missing[@]} == 0)) && return
    command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get to install them"
    log "installing slurmctld slurmd slurm-client munge (missing: ${missing[*]})"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
}

write_config() {
    if [[ -e $CONF ]] && ! grep -qxF "$MARKER" "$CONF"; then
        die "$CONF exists and was not written by this script; refusing to replace a real cluster's config"
    fi
    local host cpus mem_mb
    host=$(hostname -s)
    cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)  # nproc obeys OpenMP limits
    # Leave 10% of memory to the system, as a site would, so jobs that ask too much are rejected.
    mem_mb=$(awk '/^MemTotal:/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
    mkdir -p "$STATE/ctld" "$STATE/d" /etc/slurm
    cat >"$CONF" <<EOF
$MARKER
# Single-node test cluster; regenerated on every start. State in $STATE.
ClusterName=localcluster
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/pgid
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
MinJobAge=$MIN_JOB_AGE
KillWait=5
InactiveLimit=0
JobCompType=jobcomp/filetxt
JobCompLoc=$STATE/jobcomp.log
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=$PARTITION Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
    if pid_alive "$STATE/munged.pid" || munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
        return  # a munged already answers (ours or the system's)
    fi
    [[ -s /etc/munge/munge.key ]] || mungekey --create --keyfile=/etc/munge/munge.key
    mkdir -p /run/munge
    chown munge:munge /run/munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
    runuser -u munge -- munged
    cp /run/munge/munged.pid "$STATE/munged.pid"
}

start() {
    [[ $(id -u) == 0 ]] || die "must run as root (it installs packages and starts daemons)"
    install_packages
    local t0=$SECONDS
    mkdir -p "$STATE"
    if ! pid_alive "$STATE/slurmctld.pid"; then
        ! scontrol ping 2>/dev/null | grep -q UP || die "a slurmctld not started from $STATE is already running"
        write_config
    fi
    start_munge
    pid_alive "$STATE/slurmctld.pid" || slurmctld
    pid_alive "$STATE/slurmd.pid" || slurmd
    until sinfo -h -N -o %t 2>/dev/null | grep -qx idle; do
        ((SECONDS - t0 < START_TIMEOUT)) || die "node not idle after ${START_TIMEOUT}s; see $STATE/slurmctld.log and $STATE/slurmd.log"
        sleep 0.5
    done
    log "cluster up in $((SECONDS - t0))s: partition $PARTITION, $(sinfo -h -o %c) CPUs; logs in $STATE"
}

stop() {
    if pid_alive "$STATE/slurmctld.pid"; then
        # Jobs' processes (slurmstepd) outlive slurmd; cancel them while the controller listens.
        scancel --full --quiet --partition "$PARTITION" 2>/dev/null || true
        local t0=$SECONDS
        while [[ -n $(squeue -h -t running,completing -o %i 2>/dev/null) ]] && ((SECONDS - t0 < 30)); do
            sleep 0.5
        done
    fi
    for daemon in slurmd slurmctld munged; do
        local pidfile=$STATE/$daemon.pid
        pid_alive "$pidfile" || continue
        local pid
        pid=$(cat "$pidfile")
        kill "$pid"
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
        rm -f "$pidfile"  # a stale pid could name another process later
        log "stopped $daemon ($pid)"
    done
}

status() {
    local running=0
    for daemon in munged slurmctld slurmd; do
        if pid_alive "$STATE/$daemon.pid"; then
            echo "$daemon running (pid $(cat "$STATE/$daemon.pid"))"
            running=$((running + 1))
        else
            echo "$daemon not running"
        fi
    done
    ((running == 0)) || sinfo -N -l 2>/dev/null || true
    ((running == 3))
}

case ${1:-} in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
