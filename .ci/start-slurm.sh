#!/usr/bin/env bash
# Start a real one-node Slurm cluster on this machine (for tests/test_slurm.py and CI). Needs root.
#
#   sudo .ci/start-slurm.sh        # idempotent: a second run only checks that the node is idle
#
# What it sets up (facts from ../shared/DESIGN.md, "Slurm" under "Verified recipes"):
#   - packages slurm-wlm slurmctld slurmd slurm-client munge (apt, only when missing)
#   - munged with the package's key (a key is created when missing)
#   - /etc/slurm/slurm.conf: controller and compute node on this host, SlurmUser=root,
#     proctrack/linuxproc, task/none, select/cons_tres (CR_Core_Memory), no accounting, one node
#     with this machine's CPUs and memory and one *dummy* GPU (gres.conf: Name=gpu File=/dev/null),
#     so that jobs asking for `--gpus=1` / `--gres=gpu:1` are scheduled; partition `debug` (default)
#   - slurmctld and slurmd, then waits until `sinfo` shows the node idle
#
# Without accounting, `sacct` cannot report jobs: run Snakemake with the executor setting
# `--slurm-status-command squeue` (profile key `slurm-status-command: squeue`). MinJobAge is raised
# so that squeue still lists finished jobs when the executor polls (it needs MinJobAge >= 3 x
# --slurm-init-seconds-before-status-checks, else it falls back to sacct).
#
# Environment: SLURM_START_TIMEOUT (seconds to wait for an idle node, default 60).
set -euo pipefail

TIMEOUT=${SLURM_START_TIMEOUT:-60}
CONF_DIR=/etc/slurm
LOG_DIR=/var/log/slurm
NODE=$(hostname -s)

die() {
    echo "start-slurm: ERROR: $*" >&2
    for f in "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" /var/log/munge/munged.log; do
        [ -s "$f" ] && { echo "--- last lines of $f" >&2; tail -n 10 "$f" >&2; }
    done
    exit 1
}
log() { echo "start-slurm: $*"; }

[ "$(id -u)" -eq 0 ] || die "must run as root (it installs packages and starts daemons)"

# --- 1. packages -------------------------------------------------------------------------------
PKGS=(slurm-wlm slurmctld slurmd slurm-client munge)
missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    command -v apt-get >/dev/null || die "apt-get not found; cannot install ${missing[*]}"
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # a stale package list gives 404s: refresh it once if the first try fails
    apt-get install -y --no-install-recommends "${missing[@]}" >/tmp/start-slurm-apt.log 2>&1 \
        || { apt-get update >>/tmp/start-slurm-apt.log 2>&1 \
             && apt-get install -y --no-install-recommends "${missing[@]}" >>/tmp/start-slurm-apt.log 2>&1; } \
        || { tail -n 20 /tmp/start-slurm-apt.log >&2; die "apt-get install ${missing[*]} failed (log: /tmp/start-slurm-apt.log)"; }
else
    log "packages already installed"
fi
for b in munged slurmctld slurmd sinfo sbatch squeue scontrol; do
    command -v "$b" >/dev/null || die "$b not found after installing ${PKGS[*]}"
done

# --- 2. munge ------------------------------------------------------------------------------------
install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
install -d -o munge -g munge -m 0755 /run/munge
if [ ! -s /etc/munge/munge.key ]; then
    log "creating a munge key"
    if command -v mungekey >/dev/null; then
        mungekey --create --keyfile=/etc/munge/munge.key --force
    else
        dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
    fi
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key
if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    log "munged already running"
else
    log "starting munged"
    runuser -u munge -- /usr/sbin/munged || die "munged did not start"
    for _ in $(seq 1 20); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.5; done
    munge -n | unmunge >/dev/null || die "munge credentials do not round-trip (munged not answering)"
fi

# --- 3. configuration -----------------------------------------------------------------------------
# `slurmd -C` prints this node's real layout: NodeName=... CPUs=... Boards=... SocketsPerBoard=...
# CoresPerSocket=... ThreadsPerCore=... RealMemory=...; keep those fields (not UpTime).
HW=$(slurmd -C | head -n 1 | tr ' ' '\n' | grep -E '^(CPUs|Boards|SocketsPerBoard|CoresPerSocket|ThreadsPerCore|RealMemory)=' | tr '\n' ' ')
[ -n "$HW" ] || die "slurmd -C did not report this node's hardware"
install -d -m 0755 "$CONF_DIR" "$LOG_DIR" /var/spool/slurmctld /var/spool/slurmd

conf=$(mktemp)
cat >"$conf" <<EOF
# Written by .ci/start-slurm.sh: a one-node test cluster (controller and compute node on $NODE).
ClusterName=kvsharer-ci
# both daemons on this host, reached over loopback (no DNS needed for the host name)
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
# scheduling: cores and memory are consumable, so jobs' --cpus-per-task / --mem are honoured
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# no accounting: sacct has nothing to report, use squeue for job status (see header)
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# finished jobs stay visible to squeue for 10 minutes (the executor polls every 10-180 s)
MinJobAge=600
# one dummy GPU, described in gres.conf
GresTypes=gpu
NodeName=$NODE NodeAddr=127.0.0.1 $HW Gres=gpu:1 State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
gres=$(mktemp)
cat >"$gres" <<EOF
# Written by .ci/start-slurm.sh: a dummy GPU (there is no real device; jobs only get the allocation)
NodeName=$NODE Name=gpu Count=1 File=/dev/null
EOF

changed=0
for pair in "$conf:$CONF_DIR/slurm.conf" "$gres:$CONF_DIR/gres.conf"; do
    src=${pair%%:*}; dst=${pair#*:}
    if ! cmp -s "$src" "$dst"; then install -m 0644 "$src" "$dst"; changed=1; log "wrote $dst"; fi
    rm -f "$src"
done

# --- 4. daemons -------------------------------------------------------------------------------------
running() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
stop() {  # stop one of our daemons by its pid file (never by name)
    if running "$1"; then
        local pid; pid=$(cat "$1"); kill "$pid"
        for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.5; done
        die "could not stop pid $pid ($1)"
    fi
}
if [ "$changed" -eq 1 ]; then  # a new configuration: restart whatever runs with the old one
    stop /run/slurmd.pid
    stop /run/slurmctld.pid
fi
if running /run/slurmctld.pid; then
    log "slurmctld already running"
else
    log "starting slurmctld"
    slurmctld || die "slurmctld did not start"
fi
for _ in $(seq 1 30); do scontrol ping 2>/dev/null | grep -q "is UP" && break; sleep 1; done
scontrol ping 2>/dev/null | grep -q "is UP" || die "slurmctld does not answer (scontrol ping)"
if running /run/slurmd.pid; then
    log "slurmd already running"
else
    log "starting slurmd"
    slurmd || die "slurmd did not start"
fi

# --- 5. wait for the node ----------------------------------------------------------------------------
state=""
for i in $(seq 1 "$TIMEOUT"); do
    state=$(sinfo -h -N -n "$NODE" -o '%T' 2>/dev/null | head -n 1)
    case "$state" in
        idle|mixed|allocated) break ;;
        drain*|down*|fail*)  # e.g. left drained by an earlier run
            [ "$i" -eq 5 ] && scontrol update NodeName="$NODE" State=RESUME 2>/dev/null || true ;;
    esac
    sleep 1
done
case "$state" in
    idle|mixed|allocated) ;;
    *) die "node $NODE is '${state:-unknown}' after ${TIMEOUT}s, not idle (reason: $(sinfo -h -N -n "$NODE" -o '%E' 2>/dev/null))" ;;
esac
log "Slurm is up:"
sinfo
sinfo -h -N -o 'node %N: %T, CPUs %c, memory %m MB, gres %G'
