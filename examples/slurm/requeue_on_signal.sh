#!/usr/bin/env bash
# Runs the srun command of an sbatch file and requeues the job when SLURM announces the time limit.
#   source examples/slurm/requeue_on_signal.sh srun ... launch_rank.sh MODULE ARGS...
# (`bash examples/slurm/requeue_on_signal.sh ...` works too.) It is sourced by the batch shell, whose
# first command traps SIGUSR1 and SIGTERM into `early_signal` (a new bash started by `exec` would
# have no trap until its own, and bash's default action for either ends the job FAILED): a signal
# before the command starts skips the command, and USR1 then requeues.
# With `#SBATCH --signal=B:USR1@300` SLURM sends SIGUSR1 to the batch shell up to a minute before
# 300 s ahead of the limit. It is passed to srun, which forwards it to
# every task: mid-run the trainer saves a checkpoint and exits 0; during start-up a task exits 0 at
# once, having written nothing. Then `scontrol requeue` puts the job back in the queue (same job id,
# log appended with --open-mode=append) and the next run resumes from `latest`. The job is requeued
# when the command ended with status 0 or by the signal itself (a task it reached before Python had
# started, status 128+10).
# srun forwards a signal only to the tasks it has launched: one that arrives while srun is still
# starting them can miss some. So while the command runs on after a signal, the signal is sent
# again every SIGNAL_RESEND_S seconds (default 10); the tasks treat a repeat like the first.
# A SIGTERM (preemption, scancel) is passed on too, without requeueing: `--requeue` lets SLURM itself
# requeue preempted jobs, and scancel ends the run for good. Exits with the command's status.
set -uo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: requeue_on_signal.sh COMMAND [ARGS...]" >&2
    exit 2
fi
resend_s="${SIGNAL_RESEND_S:-10}"

requeue=0
stop=""
child=""
forward() { [[ -n "${child}" ]] && kill "-$1" "${child}" 2>/dev/null; }
trap 'requeue=1; stop=USR1; forward USR1' USR1
trap 'stop=TERM; forward TERM' TERM
case "${early_signal:-}" in  # received by the batch shell before the traps above
    USR1) requeue=1; stop=USR1 ;;
    TERM) stop=TERM ;;
esac
if [[ -n "${stop}" ]]; then
    echo "requeue_on_signal.sh: SIG${stop} before the command started (restart ${SLURM_RESTART_COUNT:-0}): not starting it" >&2
    status=$(( ${requeue} == 1 ? 0 : 128 + 15 ))
else
    "$@" &
    child=$!
fi

# A trapped signal makes `wait` return early: wait again until the command ends. After a signal,
# wait in steps of a second (a trapped signal interrupts `wait`, not a foreground `sleep`).
waited=0
while [[ -n "${child}" ]] && kill -0 "${child}" 2>/dev/null; do
    if [[ -z "${stop}" ]]; then
        wait "${child}"
        continue
    fi
    sleep 1 &
    wait $! 2>/dev/null
    waited=$((waited + 1))
    if [[ "${waited}" -ge "${resend_s}" ]]; then
        waited=0
        forward "${stop}"
    fi
done
if [[ -n "${child}" ]]; then
    wait "${child}"
    status=$?
fi

if [[ "${requeue}" -eq 1 && ( "${status}" -eq 0 || "${status}" -eq $((128 + 10)) ) ]]; then
    if [[ -z "${SLURM_JOB_ID:-}" ]]; then
        echo "requeue_on_signal.sh: SIGUSR1 received outside a SLURM job: not requeueing" >&2
    else
        echo "requeue_on_signal.sh: time limit near (status ${status}): requeueing job ${SLURM_JOB_ID}" >&2
        scontrol requeue "${SLURM_JOB_ID}"
    fi
fi
exit "${status}"
