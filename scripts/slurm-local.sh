#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for the `slurm` tests and for trying examples/*.sbatch.
#
#   scripts/slurm-local.sh start    install the Debian packages if missing, configure, start
#                                   munged, slurmctld and slurmd; waits until the node is idle
#   scripts/slurm-local.sh status   which daemons run (by their pid files); exit 0 when all do
#   scripts/slurm-local.sh stop     cancel this cluster's jobs, stop the daemons by their pids
#
# Everything (config, munge key and socket, state, spool, logs, pid files) lives in
# $UNISEG_SLURM_DIR (default /tmp/uniseg-slurm), so several clusters can coexist with each other
# and with a real Slurm: they use their own munge socket and key and the ports
# $UNISEG_SLURMCTLD_PORT / $UNISEG_SLURMD_PORT (default 16817 / 16818). Point the clients at it:
#
#   export SLURM_CONF=$UNISEG_SLURM_DIR/slurm.conf   # `start` prints this line
#   sbatch --wait --array=0-2 --export=ALL,INPUT_LIST=cases.txt,OUT=out examples/slurm_array.sbatch
#   cat $UNISEG_SLURM_DIR/log/jobcomp.log            # state and exit code of every finished task
#
# Needs root (Slurm's SlurmUser=root keeps the setup to one user); installs slurmctld, slurmd,
# slurm-client and munge with apt-get when they are missing. Exit codes: 0 done, 1 the cluster
# did not come up (see the logs it names), 77 it cannot be set up here (not root, no apt-get,
# the install failed): the tests skip on 77 and fail on 1.
set -euo pipefail

DIR=${UNISEG_SLURM_DIR:-/tmp/uniseg-slurm}
CONF=$DIR/slurm.conf
CTLD_PORT=${UNISEG_SLURMCTLD_PORT:-16817}
SLURMD_PORT=${UNISEG_SLURMD_PORT:-16818}
NODE=$(hostname -s)
PACKAGES=(slurmctld slurmd slurm-client munge)
# daemon name -> pid file; stopped in this order (reverse of start)
DAEMONS=(slurmd slurmctld munged)

say() { echo "slurm-local: $*" >&2; }
cannot() { say "cannot set up Slurm here: $*"; exit 77; }
fail() { say "$*"; exit 1; }

pid_of() {  # the live pid of daemon $1 from its pid file, or nothing
    local file=$DIR/$1.pid pid
    [[ -s $file ]] || return 0
    pid=$(<"$file")
    # the pid must still belong to that daemon (pids are reused)
    if [[ $pid =~ ^[0-9]+$ ]] && [[ -r /proc/$pid/comm ]] && [[ $(</proc/"$pid"/comm) == "$1" ]]; then
        echo "$pid"
    fi
}

wait_until() {  # wait_until SECONDS COMMAND...: poll COMMAND every 0.2 s until it succeeds
    local deadline=$((SECONDS + $1))
    shift
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || return 1
        sleep 0.2
    done
}

install_packages() {
    local missing=() tool
    for tool in slurmctld slurmd sbatch munged; do
        command -v "$tool" >/dev/null || missing+=("$tool")
    done
    ((${#missing[@]} == 0)) && return 0
    ((EUID == 0)) || cannot "missing ${missing[*]} and not root to install them"
    command -v apt-get >/dev/null || cannot "missing ${missing[*]} and no apt-get to install them"
    say "installing ${PACKAGES[*]} (missing: ${missing[*]})"
    # Keep the packages' own services from starting with the default config (Docker images
    # ship such a policy; a bare Debian does not).
    local policy=/usr/sbin/policy-rc.d added=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && added=1
    fi
    local rc=0
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${PACKAGES[@]}"; } >"${TMPDIR:-/tmp}/uniseg-slurm-apt.log" 2>&1 || rc=$?
    if ((added)); then rm -f "$policy"; fi
    ((rc == 0)) || cannot "apt-get install ${PACKAGES[*]} failed (exit $rc; see ${TMPDIR:-/tmp}/uniseg-slurm-apt.log)"
}

write_config() {
    local cpus
    cpus=$(nproc)
    if ((cpus > 2)); then cpus=2; fi
    cat >"$CONF" <<EOF
# Written by scripts/slurm-local.sh: a one-node test cluster; do not use in production.
ClusterName=uniseg-local
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge.socket
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
# one line per finished job (array tasks included) with its state and exit code
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/log/jobcomp.log
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
# sbatch --wait polls every 2 s only while MinJobAge < 6 (else every 8, then 32 s); finished
# jobs then leave "scontrol show job" within a minute, their records stay in the jobcomp log
MinJobAge=5
KillWait=30
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=1000 State=UNKNOWN
PartitionName=local Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
}

node_idle() { [[ $(sinfo -h -n "$NODE" -o %T 2>/dev/null) == idle ]]; }

start() {
    if [[ -n $(pid_of slurmctld) && -n $(pid_of slurmd) && -n $(pid_of munged) ]]; then
        say "already running in $DIR"
        echo "export SLURM_CONF=$CONF"
        return 0
    fi
    install_packages
    ((EUID == 0)) || cannot "not root (SlurmUser=root)"
    stop_daemons  # leftovers of an earlier start that went wrong
    # whatever way start fails from here on, no daemon stays behind
    trap 'rc=$?; if ((rc != 0)); then say "start failed; stopping what was started"; stop_daemons; fi' EXIT
    mkdir -p "$DIR"
    chmod 700 "$DIR"
    rm -rf "$DIR/state" "$DIR/spool" "$DIR/log"
    mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
    [[ -s $DIR/munge.key ]] || { head -c 1024 /dev/urandom >"$DIR/munge.key" && chmod 400 "$DIR/munge.key"; }
    write_config
    export SLURM_CONF=$CONF

    munged --force --key-file="$DIR/munge.key" --socket="$DIR/munge.socket" --pid-file="$DIR/munged.pid" \
        --log-file="$DIR/log/munged.log" --seed-file="$DIR/munged.seed" \
        || fail "munged did not start (see $DIR/log/munged.log)"
    wait_until 10 test -S "$DIR/munge.socket" || fail "munged made no socket (see $DIR/log/munged.log)"

    slurmctld -c -f "$CONF" || fail "slurmctld did not start (see $DIR/log/slurmctld.log)"
    wait_until 20 scontrol ping || fail "slurmctld does not answer (see $DIR/log/slurmctld.log)"
    slurmd -c -f "$CONF" -N "$NODE" || fail "slurmd did not start (see $DIR/log/slurmd.log)"
    if ! wait_until 20 node_idle; then
        scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true
        wait_until 10 node_idle || fail "node $NODE is $(sinfo -h -n "$NODE" -o %T) (see $DIR/log/slurmd.log)"
    fi
    trap - EXIT
    say "one-node cluster up in $DIR (node $NODE, $(sinfo -h -n "$NODE" -o %c) CPUs)"
    echo "export SLURM_CONF=$CONF"
}

stop_daemons() {
    local name pid
    for name in "${DAEMONS[@]}"; do
        pid=$(pid_of "$name")
        if [[ -n $pid ]]; then
            kill -TERM "$pid" 2>/dev/null || true
            wait_until 15 test ! -d "/proc/$pid" || { say "$name ($pid) ignores SIGTERM; killing"; kill -KILL "$pid" 2>/dev/null || true; }
        fi
        rm -f "$DIR/$name.pid"
    done
}

no_jobs() { [[ -z $(squeue -h -o %i 2>/dev/null) ]]; }

stop() {
    if [[ -n $(pid_of slurmctld) ]]; then
        export SLURM_CONF=$CONF
        # jobs first, so no job step outlives the daemons
        scancel --quiet --user="$(id -un)" 2>/dev/null || true
        wait_until 60 no_jobs || say "jobs still listed after 60 s: $(squeue -h -o %i | tr '\n' ' ')"
    fi
    stop_daemons
    say "stopped ($DIR kept: logs in $DIR/log)"
}

status() {
    local name pid all=0
    for name in munged slurmctld slurmd; do
        pid=$(pid_of "$name")
        if [[ -n $pid ]]; then echo "$name: running (pid $pid)"; else echo "$name: stopped"; all=1; fi
    done
    if ((all == 0)); then
        SLURM_CONF=$CONF sinfo -N -n "$NODE" -o "%N %T %c" || all=1
        echo "export SLURM_CONF=$CONF"
    fi
    return $all
}

case ${1:-} in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status   (state in \$UNISEG_SLURM_DIR, default /tmp/uniseg-slurm)" >&2; exit 2 ;;
esac
