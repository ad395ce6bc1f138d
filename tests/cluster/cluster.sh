#!/usr/bin/env bash
# A real two-node SLURM cluster on this one machine, for `make cluster-test` (tests/cluster/README.md).
#   bash tests/cluster/cluster.sh start DIR     configure and start everything under DIR (new, empty)
#   bash tests/cluster/cluster.sh node DIR N    (re)start node N's slurmd (after a lost-node check)
#   bash tests/cluster/cluster.sh stop DIR      stop everything started under DIR and remove its network
#   bash tests/cluster/cluster.sh leftovers DIR what a stop left behind (empty: nothing)
# Every file (configuration, state, spool, logs, the database) is under DIR; DIR/cluster.env holds the
# names of what was made (bridge, namespaces, /etc/hosts marker, ports) for `stop` and the checks.
# Run as root: network namespaces, a bridge and /etc/hosts lines.
set -euo pipefail

die() { echo "cluster.sh: $*" >&2; exit 2; }

# A TCP port nothing on the host listens on (the daemons below bind to the bridge or loopback).
free_port() {
    local port
    for _ in $(seq 200); do
        port=$((20000 + RANDOM % 20000))
        if ! ss -Htln "sport = :${port}" | grep -q .; then echo "${port}"; return; fi
    done
    die "no free TCP port found"
}

# A /24 in 10.200-10.254 that no interface or route of this machine uses yet.
free_subnet() {
    local used
    used="$(ip -4 route show table all; ip -4 addr show)"
    for second in $(seq 200 254); do
        if ! grep -q "10\.${second}\.0\." <<< "${used}"; then echo "10.${second}.0"; return; fi
    done
    die "no free 10.2xx.0.0/24 subnet found"
}

# Wait up to $1 seconds for the command after it to succeed.
wait_for() {
    local limit="$1"; shift
    local deadline=$((SECONDS + limit))
    until "$@" >/dev/null 2>&1; do
        [[ ${SECONDS} -lt ${deadline} ]] || return 1
        sleep 0.5
    done
}

# Start a daemon in the foreground, in the background; its pid goes to DIR/pids/NAME.
spawn() {
    local name="$1"; shift
    "$@" >"${DIR}/log/${name}.out" 2>&1 &
    echo $! >"${DIR}/pids/${name}"
}

alive() { [[ -f "${DIR}/pids/$1" ]] && kill -0 "$(cat "${DIR}/pids/$1")" 2>/dev/null; }

write_configs() {
    cat >"${DIR}/etc/slurm.conf" <<CONF
# Written by tests/cluster/cluster.sh for one cluster test; everything lives under ${DIR}.
ClusterName=${CLUSTER}
SlurmctldHost=${CTLD_HOST}(${SUBNET}.1)
SlurmctldPort=${CTLD_PORT}
SlurmdPort=${SLURMD_PORT}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire=10: a requeued job may start again 10 s after it ended (the default is 120 s)
AuthInfo=socket=${DIR}/munge/munge.socket,cred_expire=10
# Nothing listens on the host's other addresses: every daemon binds to the address its host name
# resolves to (slurmctld's namespace is named CTLD_HOST = the bridge address, the nodes' their own)
CommunicationParameters=NoInAddrAny,NoCtldInAddrAny
StateSaveLocation=${DIR}/state
SlurmdSpoolDir=${DIR}/spool/%n
SlurmctldPidFile=${DIR}/pids/slurmctld.file
SlurmdPidFile=${DIR}/pids/slurmd-%n.file
SlurmctldLogFile=${DIR}/log/slurmctld.log
SlurmdLogFile=${DIR}/log/slurmd-%n.log
# debug2: the checks read when slurmctld tests time limits ("Testing job time limits")
SlurmctldDebug=debug2
SlurmdDebug=info
# No cgroups: the namespaces' /sys has none mounted (cgroup.conf beside this file)
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=5,sched_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=${DBD_PORT}
# slurmctld takes the munge socket of its slurmdbd connection from here, not from AuthInfo
AccountingStoragePass=${DIR}/munge/munge.socket
MailProg=/bin/true
ReturnToService=2
SlurmdTimeout=30
KillWait=30
MinJobAge=600
InactiveLimit=0
MessageTimeout=10
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
NodeName=${NODE1} NodeAddr=${SUBNET}.11 CPUs=2 State=UNKNOWN
NodeName=${NODE2} NodeAddr=${SUBNET}.12 CPUs=2 State=UNKNOWN
# main: every stage job; low: jobs a high job may preempt. Preemption requeues at once and signals
# every step, the batch shell included, SIGTERM then SIGKILL after KillWait (the save's window). No
# GraceTime: with one, SLURM signals only the tasks, and a job that saves and exits within it ends
# COMPLETED, not requeued (seen with 22.05), its run cut short.
PartitionName=main Nodes=${NODE1},${NODE2} Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=OFF
PartitionName=low Nodes=${NODE1},${NODE2} MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE
PartitionName=high Nodes=${NODE1},${NODE2} MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
CONF
    cat >"${DIR}/etc/cgroup.conf" <<CONF
CgroupPlugin=cgroup/v1
IgnoreSystemd=yes
CONF
    cat >"${DIR}/etc/slurmdbd.conf" <<CONF
AuthType=auth/munge
AuthInfo=socket=${DIR}/munge/munge.socket
# slurmdbd runs with the host name localhost (its own UTS namespace) and binds to 127.0.0.1 only
DbdHost=localhost
DbdAddr=127.0.0.1
CommunicationParameters=NoInAddrAny
DbdPort=${DBD_PORT}
SlurmUser=root
PidFile=${DIR}/pids/slurmdbd.file
LogFile=${DIR}/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=${DB_PORT}
StorageUser=slurm
StoragePass=${DB_PASS}
StorageLoc=slurm_acct_db
CONF
    chmod 600 "${DIR}/etc/slurmdbd.conf"
}

start_network() {
    ip link add "${BRIDGE}" type bridge
    ip addr add "${SUBNET}.1/24" dev "${BRIDGE}"
    ip link set "${BRIDGE}" up
    local n
    for n in 1 2; do
        local ns="${NETNS_PREFIX}${n}" host_end="${VETH_PREFIX}${n}"
        ip netns add "${ns}"
        ip link add "${host_end}" type veth peer name eth0 netns "${ns}"
        ip link set "${host_end}" master "${BRIDGE}" up
        ip -n "${ns}" addr add "${SUBNET}.1${n}/24" dev eth0
        ip -n "${ns}" link set eth0 up
        ip -n "${ns}" link set lo up
    done
    # the node names resolve on every node and on the host (one file system): lines with our marker
    {
        echo "${SUBNET}.1 ${CTLD_HOST} ${MARKER}"
        echo "${SUBNET}.11 ${NODE1} ${MARKER}"
        echo "${SUBNET}.12 ${NODE2} ${MARKER}"
    } >>/etc/hosts
}

start_munge() {
    dd if=/dev/urandom of="${DIR}/munge/munge.key" bs=1024 count=1 status=none
    chmod 400 "${DIR}/munge/munge.key"
    spawn munged munged --foreground --force --socket="${DIR}/munge/munge.socket" \
        --key-file="${DIR}/munge/munge.key" --pid-file="${DIR}/munge/munged.pid" \
        --seed-file="${DIR}/munge/seed" --log-file="${DIR}/log/munged.log"
    wait_for 20 munge --socket="${DIR}/munge/munge.socket" -n || die "munged did not start (${DIR}/log/munged.out)"
}

start_database() {
    mysql_install_db --no-defaults --datadir="${DIR}/db" --user=root --skip-test-db \
        --auth-root-authentication-method=socket >"${DIR}/log/mysql_install_db.out" 2>&1 \
        || die "mysql_install_db failed (${DIR}/log/mysql_install_db.out)"
    spawn mariadb mariadbd --no-defaults --datadir="${DIR}/db" --socket="${DIR}/db/mysqld.sock" \
        --bind-address=127.0.0.1 --port="${DB_PORT}" --pid-file="${DIR}/db/mariadb.pid" --user=root \
        --skip-name-resolve --innodb-buffer-pool-size=16M --log-error="${DIR}/log/mariadb.log"
    wait_for 60 mariadb --no-defaults --socket="${DIR}/db/mysqld.sock" -e "select 1" \
        || die "mariadbd did not start (${DIR}/log/mariadb.log)"
    mariadb --no-defaults --socket="${DIR}/db/mysqld.sock" -e \
        "CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY '${DB_PASS}'; GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
}

# Node N's slurmd in its namespace, with the node name as its own hostname (UTS namespace).
start_node() {
    local n="$1" node
    node="$(eval echo "\${NODE${n}}")"
    mkdir -p "${DIR}/spool/${node}"
    spawn "slurmd-${n}" ip netns exec "${NETNS_PREFIX}${n}" unshare --uts \
        sh -c "hostname ${node} && exec slurmd -D -f ${DIR}/etc/slurm.conf -N ${node}"
}

start_slurm() {
    export SLURM_CONF="${DIR}/etc/slurm.conf"
    spawn slurmdbd unshare --uts sh -c "hostname localhost && exec slurmdbd -D"
    wait_for 60 sacctmgr -n list cluster || die "slurmdbd did not start (${DIR}/log/slurmdbd.log)"
    sacctmgr -i add cluster "${CLUSTER}" >/dev/null
    spawn slurmctld unshare --uts sh -c "hostname ${CTLD_HOST} && exec slurmctld -D -i -f ${SLURM_CONF}"
    wait_for 30 scontrol ping || die "slurmctld did not start (${DIR}/log/slurmctld.log)"
    start_node 1
    start_node 2
    wait_for 60 two_idle_nodes || die "the two nodes did not become idle (${DIR}/log/slurmd-*.log)"
}

two_idle_nodes() {
    [[ "$(sinfo -h -p main -t idle -o '%D')" == "2" ]]
}

load_env() {
    [[ -f "${DIR}/cluster.env" ]] || die "${DIR}/cluster.env not found: no cluster was started there"
    # shellcheck disable=SC1091
    source "${DIR}/cluster.env"
}

cmd_start() {
    [[ -d "${DIR}" && -z "$(ls -A "${DIR}")" ]] || die "${DIR} must be an empty directory"
    local id="$$"
    mkdir -p "${DIR}"/{etc,log,pids,state,spool,munge,db}
    chmod 700 "${DIR}/munge"
    SUBNET="$(free_subnet)"
    cat >"${DIR}/cluster.env" <<ENV
CLUSTER=ct${id}
SUBNET=${SUBNET}
BRIDGE=ctbr${id}
VETH_PREFIX=ctv${id}n
NETNS_PREFIX=ct${id}n
CTLD_HOST=ct${id}ctl
NODE1=ct${id}n1
NODE2=ct${id}n2
MARKER="# conan-cluster-test ${DIR}"
CTLD_PORT=$(free_port)
SLURMD_PORT=$(free_port)
DBD_PORT=$(free_port)
DB_PORT=$(free_port)
DB_PASS=$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')
SLURM_CONF=${DIR}/etc/slurm.conf
ENV
    load_env
    write_configs
    start_network
    start_munge
    start_database
    start_slurm
}

stop_pid() {
    local file="$1" pid
    [[ -f "${file}" ]] || return 0
    pid="$(cat "${file}")"
    kill -TERM "${pid}" 2>/dev/null || return 0
    for _ in $(seq 50); do kill -0 "${pid}" 2>/dev/null || return 0; sleep 0.1; done
    kill -KILL "${pid}" 2>/dev/null || true
}

# Best effort throughout: every step runs even when an earlier one fails.
cmd_stop() {
    set +e
    load_env
    local n ns
    # the nodes first (their jobs, slurmstepd, slurmd), by pid: whatever runs in their namespaces
    for n in 1 2; do
        ns="${NETNS_PREFIX}${n}"
        if ip netns list | grep -qw "${ns}"; then
            ip netns pids "${ns}" | xargs -r kill -KILL 2>/dev/null || true
        fi
    done
    for name in slurmctld slurmdbd mariadb munged; do stop_pid "${DIR}/pids/${name}"; done
    for n in 1 2; do
        ns="${NETNS_PREFIX}${n}"
        ip netns list | grep -qw "${ns}" && ip netns del "${ns}"
        # deleting the namespace deletes its veth pair, not always at once
        ip link show "${VETH_PREFIX}${n}" >/dev/null 2>&1 && ip link del "${VETH_PREFIX}${n}" 2>/dev/null
    done
    ip link show "${BRIDGE}" >/dev/null 2>&1 && ip link del "${BRIDGE}"
    # our /etc/hosts lines, by their exact marker; the file is rewritten in place (it may be a mount)
    if grep -qF "${MARKER}" /etc/hosts; then
        local kept
        kept="$(grep -vF "${MARKER}" /etc/hosts || true)"
        printf '%s\n' "${kept}" >/etc/hosts
    fi
    return 0
}

# What a stop should have removed and has not (empty: nothing): daemons started under DIR, the
# namespaces, the bridge, our /etc/hosts lines.
cmd_leftovers() {
    load_env
    local left=()
    for file in "${DIR}"/pids/*; do
        [[ -f "${file}" ]] && kill -0 "$(cat "${file}")" 2>/dev/null && left+=("process $(cat "${file}") ($(basename "${file}"))")
    done
    ip netns list | grep -q "^${NETNS_PREFIX}" && left+=("namespaces ${NETNS_PREFIX}*")
    ip link show "${BRIDGE}" >/dev/null 2>&1 && left+=("bridge ${BRIDGE}")
    grep -qF "${MARKER}" /etc/hosts && left+=("/etc/hosts lines")
    echo "${left[*]:-}"
}

cmd_node() {
    load_env
    export SLURM_CONF
    start_node "$1"
}

[[ $# -ge 2 ]] || die "usage: cluster.sh start|stop|node DIR [N]"
command="$1"
DIR="$(cd "$2" && pwd)" || die "no directory $2"
case "${command}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    leftovers) cmd_leftovers ;;
    node) [[ $# -eq 3 ]] || die "usage: cluster.sh node DIR N"; cmd_node "$3" ;;
    *) die "unknown command ${command}: start, stop or node" ;;
esac
