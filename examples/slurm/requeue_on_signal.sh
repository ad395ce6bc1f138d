#!/usr/bin/env bash
# Runs the srun command of an sbatch file and requeues the job when SLURM announces the time limit.
#   exec bash examples/slurm/requeue_on_signal.sh srun ... launch_rank.sh MODULE ARGS...
# With `#SBATCH --signal=B:USR1@300` SLURM sends SIGUSR1 to the batch shell (this script, after
# `exec`) 300 s before the limit. It is passed to srun, which forwards it to every task: the trainer
# saves a checkpoint and exits 0. Then `scontrol requeue` puts the job back in the queue (same job
# id, log appended with --open-mode=append) and the next run resumes from `latest`.
# A SIGTERM (preemption, scancel) is passed on too, without requeueing: `--requeue` lets SLURM
# itself requeue preempted jobs. Exits with the command's status.
set -uo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: requeue_on_signal.sh COMMAND [ARGS...]" >&2
    exit 2
fi

requeue=0
interrupted=0
child=""
trap 'requeue=1; interrupted=1; [[ -n "${child}" ]] && kill -USR1 "${child}" 2>/dev/null' USR1
trap 'interrupted=1; [[ -n "${child}" ]] && kill -TERM "${child}" 2>/dev/null' TERM
"$@" &
child=$!

# A trapped signal makes `wait` return early (status > 128): wait again until the command ends.
while true; do
    interrupted=0
    wait "${child}"
    status=$?
    [[ "${interrupted}" -eq 1 && "${status}" -gt 128 ]] || break
done

if [[ "${requeue}" -eq 1 && "${status}" -eq 0 ]]; then
    if [[ -z "${SLURM_JOB_ID:-}" ]]; then
        echo "requeue_on_signal.sh: SIGUSR1 received outside a SLURM job: not requeueing" >&2
    else
        echo "requeue_on_signal.sh: time limit near, checkpoint saved: requeueing job ${SLURM_JOB_ID}" >&2
        scontrol requeue "${SLURM_JOB_ID}"
    fi
fi
exit "${status}"
