"""The cluster test's view of its SLURM cluster (tests/cluster/cluster.sh): submit the shipped sbatch
files as a user would, read job states from ``sacct`` / ``scontrol``, find the job's log, and
compare a run's metrics with an uninterrupted run of the same job."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# What a CPU site adds on the sbatch command line (README, SLURM section): one task per node, no GPU.
CPU_SITE = ("--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", "--gpus-per-node=0")


class CheckFailed(Exception):
    """A check did not hold; the message says which and what was seen."""


def wait_for(condition: Callable[[], object], limit_s: float, what: str, every_s: float = 0.25):
    """`condition()`'s first true value within `limit_s` seconds, else CheckFailed naming `what`."""
    deadline = time.monotonic() + limit_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise CheckFailed(f"timed out after {limit_s:.0f} s waiting for {what}")
        time.sleep(every_s)


def read_env(path: str) -> Dict[str, str]:
    """cluster.env (shell assignments written by cluster.sh) as a dict."""
    values = {}
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            name, _, value = line.strip().partition("=")
            if name:
                values[name] = shlex.split(value)[0] if value else ""
    return values


class Log:
    """Lines with the seconds since the start, to stdout and to `path`."""

    def __init__(self, path: str):
        self.start = time.monotonic()
        self.handle = open(path, "a", encoding="utf-8")

    def __call__(self, text: str) -> None:
        line = f"[{time.monotonic() - self.start:6.1f}s] {text}"
        print(line, flush=True)
        self.handle.write(line + "\n")
        self.handle.flush()


@dataclass
class Job:
    id: str
    name: str
    run_dir: str
    log_path: str
    submitted: float = field(default_factory=time.monotonic)


class Cluster:
    """Commands against the cluster of `directory` (its cluster.env), run from the repository root."""

    def __init__(self, directory: str, python: str = sys.executable):
        self.dir = directory
        self.env_values = read_env(os.path.join(directory, "cluster.env"))
        self.env = dict(os.environ, SLURM_CONF=self.env_values["SLURM_CONF"], PYTHON=python,
                        CUDA_VISIBLE_DEVICES="")
        for name in [k for k in self.env if k.startswith(("SLURM_", "SBATCH_")) and k != "SLURM_CONF"]:
            del self.env[name]
        self.nodes = (self.env_values["NODE1"], self.env_values["NODE2"])
        self.addresses = (self.env_values["SUBNET"] + ".11", self.env_values["SUBNET"] + ".12")
        os.makedirs(os.path.join(directory, "jobs"), exist_ok=True)

    def run(self, *argv: str, env: Optional[dict] = None, check: bool = True) -> str:
        result = subprocess.run(list(argv), cwd=REPO, env=env or self.env, capture_output=True, text=True,
                                timeout=120)
        if check and result.returncode != 0:
            raise CheckFailed(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
        return result.stdout

    def submit(self, sbatch_file: str, config: str, run_dir: str, overrides: Sequence[str] = (),
               options: Sequence[str] = (), name: Optional[str] = None) -> Job:
        """sbatch the shipped `examples/slurm/<sbatch_file>` unchanged: the CPU site's options and
        `options` on the command line, the recipe through CONFIG, overrides after the script."""
        job_name = name or os.path.basename(run_dir)
        log_path = os.path.join(self.dir, "jobs", f"{job_name}-%j.out")
        argv = ["sbatch", "--parsable", *CPU_SITE, f"--job-name={job_name}", f"--output={log_path}", *options,
                os.path.join("examples", "slurm", sbatch_file), f"run_dir={run_dir}", "train.progress_bar=false",
                *overrides]
        job_id = self.run(*argv, env=dict(self.env, CONFIG=config)).strip().split(";")[0]
        return Job(job_id, job_name, run_dir, log_path.replace("%j", job_id))

    def states(self, job: Job) -> List[str]:
        """The job's states from sacct, one per run (a requeue starts another): e.g. REQUEUED COMPLETED."""
        out = self.run("sacct", "-j", job.id, "-D", "-X", "-n", "-P", "-o", "State", check=False)
        return [line.split()[0] for line in out.splitlines() if line.strip()]

    def show(self, job: Job) -> Dict[str, str]:
        """`scontrol show job` as a dict (empty once the controller has forgotten the job)."""
        out = self.run("scontrol", "-o", "show", "job", job.id, check=False)
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def live_state(self, job: Job) -> str:
        return self.show(job).get("JobState", "")

    def wait_running(self, job: Job, restarts: int, limit_s: float) -> Dict[str, str]:
        """Wait until the job runs its `restarts`-th restart (0: the first run)."""
        def running():
            info = self.show(job)
            return info if info.get("JobState") == "RUNNING" and int(info.get("Restarts", "0")) == restarts else None
        return wait_for(running, limit_s, f"job {job.id} ({job.name}) to run (restart {restarts})")

    def wait_end(self, job: Job, limit_s: float) -> List[str]:
        """Wait until the job has ended for good; its sacct states."""
        final = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
        def ended():
            if self.live_state(job) in ("PENDING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD",
                                        "REQUEUE_FED", "CONFIGURING", "PREEMPTED", "SUSPENDED"):
                return None
            states = self.states(job)
            return states if states and states[-1] in final else None
        return wait_for(ended, limit_s, f"job {job.id} ({job.name}) to end", every_s=0.5)

    def log_text(self, job: Job) -> str:
        if not os.path.exists(job.log_path):
            return ""
        with open(job.log_path, encoding="utf-8", errors="replace") as handle:
            return handle.read()


def read_metrics(run_dir: str) -> Dict[int, dict]:
    """{step: record} of metrics.jsonl; a resumed run appends, the last line of a step wins."""
    by_step: Dict[int, dict] = {}
    path = os.path.join(run_dir, "metrics.jsonl")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                record = json.loads(line)
                by_step[record["step"]] = record
    return by_step


def compared_fields(record: dict) -> List[str]:
    """What must be identical to the uninterrupted run: the loss, the task sequence, the DHNM
    counters and the soft-mask schedule (those the stage reports)."""
    names = ["loss"] + [name for name in ("task", "soft_mask_a") if name in record]
    return names + sorted(name for name in record if name.startswith("dhnm_"))


def compare_runs(run_dir: str, reference_dir: str, first_step: int = 1) -> List[str]:
    """One line per compared field, "identical" over steps first_step.. of the reference, or a
    CheckFailed naming the first step that differs."""
    ours, reference = read_metrics(run_dir), read_metrics(reference_dir)
    steps = [step for step in sorted(reference) if step >= first_step]
    if not steps:
        raise CheckFailed(f"{reference_dir} has no metrics from step {first_step}")
    missing = [step for step in steps if step not in ours]
    if missing:
        raise CheckFailed(f"{run_dir} has no metrics for steps {missing[:5]}...")
    lines = []
    names = []  # the union over the steps: a step reports only its own task's fields (DHNM on retrieval)
    for step in steps:
        names += [name for name in compared_fields(reference[step]) if name not in names]
    for name in names:
        for step in steps:
            if ours[step].get(name) != reference[step].get(name):
                raise CheckFailed(f"{name} differs at step {step}: {ours[step].get(name)!r} against "
                                  f"{reference[step].get(name)!r} of the uninterrupted run")
        lines.append(f"{name}: identical over steps {steps[0]}-{steps[-1]}")
    return lines
