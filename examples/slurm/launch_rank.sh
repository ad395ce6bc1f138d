#!/usr/bin/env bash
# One training process per SLURM task: map SLURM's task variables to torch.distributed's env://
# variables and exec `python -m MODULE ARGS...`. Run by srun from the sbatch files:
#   srun ... bash examples/slurm/launch_rank.sh megatron_conan.training.pretrain --config x.yaml
# Inputs: SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_JOB_NODELIST, SLURM_JOB_ID (from srun);
# optional MASTER_ADDR, MASTER_PORT, PYTHON (interpreter, default `python`).
set -euo pipefail
# A time-limit signal (or SIGTERM) before Python starts: nothing has run yet, so stop cleanly. From
# the exec on, the entry point handles them itself (megatron_conan/stop_signals.py).
trap 'echo "launch_rank.sh: stop signal before the trainer started: exiting" >&2; exit 0' USR1 TERM

if [[ $# -lt 1 ]]; then
    echo "usage: launch_rank.sh MODULE [ARGS...]" >&2
    exit 2
fi
module="$1"
shift

export RANK="${SLURM_PROCID:?SLURM_PROCID is unset: run this under srun}"
export WORLD_SIZE="${SLURM_NTASKS:?SLURM_NTASKS is unset: run this under srun}"
export LOCAL_RANK="${SLURM_LOCALID:?SLURM_LOCALID is unset: run this under srun}"

# Rendezvous host: the job's first node as scontrol expands the node list (the same on every
# task); without scontrol, MASTER_ADDR as given, else this host.
first_host=""
if [[ -n "${SLURM_JOB_NODELIST:-}" ]] && command -v scontrol >/dev/null 2>&1; then
    first_host="$(scontrol show hostnames "${SLURM_JOB_NODELIST}" 2>/dev/null | head -n 1 || true)"
fi
if [[ -n "${first_host}" ]]; then
    export MASTER_ADDR="${first_host}"
elif [[ -z "${MASTER_ADDR:-}" ]]; then
    if [[ "${SLURM_JOB_NUM_NODES:-1}" -gt 1 ]]; then
        echo "launch_rank.sh: scontrol cannot expand SLURM_JOB_NODELIST and MASTER_ADDR is unset;" \
             "set MASTER_ADDR to the first node of a multi-node job" >&2
        exit 2
    fi
    export MASTER_ADDR="127.0.0.1"
fi
# A port per job (so two jobs sharing a node do not collide), unless one is given.
if [[ -z "${MASTER_PORT:-}" ]]; then
    if [[ -n "${SLURM_JOB_ID:-}" ]]; then
        export MASTER_PORT="$((20000 + SLURM_JOB_ID % 20000))"
    else
        export MASTER_PORT="29500"
    fi
fi
# One line per task: where it runs, the rendezvous it uses (the first node's address) and how many
# times the job was requeued before (SLURM_RESTART_COUNT).
echo "launch_rank.sh: rank ${RANK}/${WORLD_SIZE} on $(hostname), rendezvous ${MASTER_ADDR}:${MASTER_PORT}" \
     "($(getent hosts "${MASTER_ADDR}" 2>/dev/null | awk '{print $1; exit}')), restart ${SLURM_RESTART_COUNT:-0}" >&2
# Megatron-core's TP/SP communication overlap relies on one CUDA hardware queue.
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"

exec "${PYTHON:-python}" -m "${module}" "$@"
