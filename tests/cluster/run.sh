#!/usr/bin/env bash
# `make cluster-test`: a real two-node SLURM cluster on this machine (tests/cluster/README.md), the
# project's sbatch files run on it (tests/cluster/checks.py), then everything stopped and removed,
# whether the checks passed or not.
#   bash tests/cluster/run.sh [PYTHON [CHECK...]]   (PYTHON: the interpreter with this package, default
#                                           .venv's; CHECK: some of tests/cluster/checks.py's, default all)
#   bash tests/cluster/run.sh --check-only  only whether it can run here (what make checks first)
# Needs root; where it cannot run, it says why in one line and exits 2.
set -uo pipefail
cd "$(dirname "$0")/../.."
python="${1:-.venv/bin/python}"
shift || true

cannot() { echo "cluster-test: cannot run here: $*" >&2; exit 2; }
[[ "$(id -u)" -eq 0 ]] || cannot "it needs root (network namespaces, a bridge, /etc/hosts lines, the SLURM daemons)"
for tool in ip unshare ss getent; do
    command -v "${tool}" >/dev/null 2>&1 || cannot "${tool} is not installed"
done
[[ "${python}" == "--check-only" ]] && exit 0
[[ -x "${python}" ]] || cannot "${python} not found (make install)"

# Debian's packages when any is missing. Their services must not start on installation (a daemon
# on a default port, outside the test's directory): a policy-rc.d says so unless the machine has one.
PACKAGES=(slurmctld slurmd slurmdbd slurm-client munge mariadb-server)
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v slurmdbd >/dev/null \
   || ! command -v sbatch >/dev/null || ! command -v munged >/dev/null || ! command -v mariadbd >/dev/null; then
    command -v apt-get >/dev/null || cannot "the SLURM packages are missing and there is no apt-get"
    policy=/usr/sbin/policy-rc.d
    made_policy=0
    if [[ ! -e "${policy}" ]]; then
        printf '#!/bin/sh\n# tests/cluster/run.sh: no service starts while it installs packages\nexit 101\n' >"${policy}"
        chmod 755 "${policy}"
        made_policy=1
    fi
    echo "cluster-test: installing ${PACKAGES[*]}"
    apt-get update -qq >/dev/null 2>&1
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null 2>&1
    installed=$?
    [[ "${made_policy}" -eq 1 ]] && rm -f "${policy}"
    [[ "${installed}" -eq 0 ]] || cannot "apt-get install ${PACKAGES[*]} failed"
fi

started=${SECONDS}
dir="$(mktemp -d /tmp/conan-cluster-test.XXXXXX)"
cleanup() {
    local status=$?
    trap - EXIT INT TERM
    bash tests/cluster/cluster.sh stop "${dir}"
    local left
    left="$(bash tests/cluster/cluster.sh leftovers "${dir}")"
    if [[ -n "${left}" ]]; then
        echo "cluster-test: left behind after stopping: ${left}" >&2
        status=1
    else
        echo "cluster-test: stopped; no daemon, namespace, bridge or /etc/hosts line left"
    fi
    if [[ "${status}" -eq 0 ]]; then
        rm -rf "${dir}"
        echo "cluster-test: passed in $((SECONDS - started)) s"
    else
        echo "cluster-test: FAILED after $((SECONDS - started)) s; configuration, state and logs kept in ${dir}" >&2
    fi
    exit "${status}"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

echo "cluster-test: starting a two-node cluster under ${dir}"
bash tests/cluster/cluster.sh start "${dir}" || exit 1
echo "cluster-test: two idle nodes after $((SECONDS - started)) s"
"${python}" -m tests.cluster.checks "${dir}" "$@"
