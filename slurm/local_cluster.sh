#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine, for the tests and for trying the sbatch scripts.
#
#   slurm/local_cluster.sh start    install (Debian, as root) if absent, write slurm.conf, start
#                                   munged/slurmctld/slurmd, wait for an idle node
#   slurm/local_cluster.sh stop [NAME...]  stop the daemons this script started (pid files in the
#                                   state dir), or only the ones named (munged slurmctld slurmd)
#   slurm/local_cluster.sh status   show what runs and the node state
#
# Everything lives in one state folder (ALBEF_SLURM_DIR, default /tmp/albef-slurm): slurm.conf,
# spool, state, logs, munge key and the pid files of the daemons started here. /etc is not touched.
# Client commands need `export SLURM_CONF=$ALBEF_SLURM_DIR/slurm.conf`; `start` prints that line
# last on stdout, after a line "started: NAMES" (the daemons this call launched). A daemon already running (a system munged, or our own from an earlier `start`)
# is reused and not recorded, so `stop` never stops what it did not start.
#
# Settings (env): ALBEF_SLURM_DIR, ALBEF_SLURM_CTLD_PORT (6817), ALBEF_SLURM_SLURMD_PORT (6818),
# ALBEF_SLURM_NODE (short hostname), ALBEF_SLURM_NO_INSTALL=1 to fail instead of apt-get installing.
set -euo pipefail

STATE_DIR=${ALBEF_SLURM_DIR:-/tmp/albef-slurm}
CTLD_PORT=${ALBEF_SLURM_CTLD_PORT:-6817}
SLURMD_PORT=${ALBEF_SLURM_SLURMD_PORT:-6818}
NODE=${ALBEF_SLURM_NODE:-$(hostname -s)}
CONF=$STATE_DIR/slurm.conf
PIDS=$STATE_DIR/pids          # one file per daemon started by this script
STARTED=()                    # daemons launched by this call
MUNGE_SOCKET=/run/munge/munge.socket.2

log() { echo "local_cluster: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

install_packages() {
    local missing=()
    for bin in slurmctld slurmd sbatch munged; do
        command -v "$bin" >/dev/null || missing+=("$bin")
    done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    [[ ${ALBEF_SLURM_NO_INSTALL:-0} == 1 ]] && die "missing ${missing[*]} and ALBEF_SLURM_NO_INSTALL=1"
    [[ $(id -u) -eq 0 ]] || die "missing ${missing[*]}; installing needs root (apt-get)"
    command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get to install them"
    log "installing slurmctld slurmd slurm-client munge (missing: ${missing[*]})"
    # The packages' postinst tries to start services; with no init system it just says it cannot.
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        slurmctld slurmd slurm-client munge >&2
}

# alive NAME: the daemon recorded in $PIDS/NAME.pid runs (and the pid was not recycled).
alive() {
    local file=$PIDS/$1.pid pid
    [[ -f $file ]] || return 1
    pid=$(cat "$file")
    [[ -d /proc/$pid ]] && [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$1" ]]
}

munge_works() { munge -n -S "$MUNGE_SOCKET" 2>/dev/null | unmunge -S "$MUNGE_SOCKET" >/dev/null 2>&1; }

start_munge() {
    if munge_works; then log "munged already answers on $MUNGE_SOCKET: reusing it"; return 0; fi
    # munged refuses to run as root and needs its run dir; /run is a tmpfs, so it is gone after boot.
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 "$STATE_DIR/munge"
    local key=$STATE_DIR/munge/munge.key
    if [[ ! -s $key ]]; then
        dd if=/dev/urandom of="$key" bs=1024 count=1 status=none
        chown munge:munge "$key"; chmod 0400 "$key"
    fi
    setsid setpriv --reuid=munge --regid=munge --init-groups \
        munged --foreground --key-file="$key" --socket="$MUNGE_SOCKET" \
        --pid-file="$STATE_DIR/munge/munged.pid" --log-file="$STATE_DIR/munge/munged.log" \
        --seed-file="$STATE_DIR/munge/munged.seed" </dev/null >"$STATE_DIR/log/munged.out" 2>&1 &
    echo $! >"$PIDS/munged.pid"
    STARTED+=(munged)
    for _ in $(seq 50); do munge_works && return 0; sleep 0.1; done
    cat "$STATE_DIR/log/munged.out" "$STATE_DIR/munge/munged.log" >&2 || true
    die "munged did not start"
}

write_conf() {
    # Hardware as slurmd sees it: "NodeName=x CPUs=2 Boards=1 SocketsPerBoard=1 ... RealMemory=24105".
    local hw cpus mem
    hw=$(slurmd -C | head -n1 | sed 's/^NodeName=[^ ]* //')
    cpus=$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$hw")
    mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$hw")
    mem=$((mem * 95 / 100))                  # a little under the measured size, or the node drains
    hw=$(sed "s/RealMemory=[0-9]*/RealMemory=$mem/" <<<"$hw")
    cat >"$CONF.tmp" <<EOF
# Written by slurm/local_cluster.sh: a one-node test cluster. See that script for the why of each line.
ClusterName=albeflocal
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job would wait for its old credential to expire (120 s by default).
AuthInfo=cred_expire=10
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/spool
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmdPidFile=$STATE_DIR/slurmd.pid
SlurmctldLogFile=$STATE_DIR/log/slurmctld.log
SlurmdLogFile=$STATE_DIR/log/slurmd.log
# No cgroups in containers/CI: plain process tracking, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
# Without a default each job is given all the memory and jobs run one at a time.
DefMemPerCPU=$((mem / cpus))
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_interval=2,bf_interval=1
# A dependent of a failed job is cancelled (reason DependencyNeverSatisfied) instead of pending forever.
DependencyParameters=kill_invalid_depend
# MinJobAge is left at SLURM's default (300 s): 'scontrol show job' forgets a job that long after
# it ended, as on a real cluster, and 'albef slurm status' must then ask sacct. There is no
# accounting database here; sacct reads the job completion log instead ('sacct --completion').
JobCompType=jobcomp/filetxt
JobCompLoc=$STATE_DIR/log/jobcomp.txt
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
# As many sites: one task exiting non-zero ends its step (srun --kill-on-bad-exit is the default).
KillOnBadExit=1
JobRequeue=1
KillWait=10
ReturnToService=2
NodeName=$NODE NodeAddr=127.0.0.1 NodeHostname=$NODE $hw State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
    mv "$CONF.tmp" "$CONF"
}

start_daemon() {  # start_daemon NAME ARGS...: run a daemon in the foreground, in the background
    local name=$1; shift
    if alive "$name"; then log "$name already running (pid $(cat "$PIDS/$name.pid")): reusing it"; return 0; fi
    setsid "$name" "$@" </dev/null >>"$STATE_DIR/log/$name.out" 2>&1 &
    echo $! >"$PIDS/$name.pid"
    STARTED+=("$name")
}

node_state() { SLURM_CONF=$CONF sinfo -h -N -n "$NODE" -o %T 2>/dev/null | head -n1; }

wait_idle() {
    local state=""
    for _ in $(seq 300); do
        state=$(node_state)
        [[ $state == idle ]] && return 0
        if [[ $state == drain* || $state == down* ]]; then
            SLURM_CONF=$CONF scontrol show node "$NODE" >&2 || true
            die "node $NODE is $state"
        fi
        sleep 0.2
    done
    tail -n 20 "$STATE_DIR/log/slurmctld.log" "$STATE_DIR/log/slurmd.log" >&2 || true
    die "node $NODE not idle after 60 s (state: '${state:-none}')"
}

cmd_start() {
    [[ $(id -u) -eq 0 ]] || die "must run as root (slurmd launches jobs as their users)"
    install_packages
    mkdir -p "$STATE_DIR"/{ctld,spool,log} "$PIDS"
    local t0=$SECONDS
    start_munge
    if ! alive slurmctld; then write_conf; fi
    start_daemon slurmctld -D -c -i -f "$CONF"
    for _ in $(seq 100); do SLURM_CONF=$CONF scontrol ping >/dev/null 2>&1 && break; sleep 0.1; done
    start_daemon slurmd -D -N "$NODE" -f "$CONF"
    wait_idle
    log "node $NODE idle after $((SECONDS - t0)) s; state in $STATE_DIR"
    echo "started: ${STARTED[*]}"
    echo "export SLURM_CONF=$CONF"
}

cmd_stop() {
    local name pid wanted=" ${*:-slurmd slurmctld munged} "
    for name in slurmd slurmctld munged; do   # reverse start order
        [[ $wanted == *" $name "* ]] || continue
        if alive "$name"; then
            pid=$(cat "$PIDS/$name.pid")
            log "stopping $name (pid $pid)"
            kill -TERM "$pid"
            for _ in $(seq 50); do [[ -d /proc/$pid ]] || break; sleep 0.1; done
            [[ -d /proc/$pid ]] && kill -KILL "$pid"
        fi
        rm -f "$PIDS/$name.pid"
    done
}

cmd_status() {
    local name
    for name in munged slurmctld slurmd; do
        if alive "$name"; then echo "$name: running (pid $(cat "$PIDS/$name.pid"))"; else echo "$name: not started here"; fi
    done
    echo "node $NODE: $(node_state || true)"
}

case ${1:-} in
    start) cmd_start ;;
    stop) shift; cmd_stop "$@" ;;
    status) cmd_status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
