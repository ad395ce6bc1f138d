"""`make cluster-test`'s checks, on the running two-node cluster of DIR (tests/cluster/cluster.sh):

    python -m tests.cluster.checks DIR

Every stage runs through its shipped sbatch file, unchanged, on both nodes (one task per node, gloo
on CPU, the tiny recipes through CONFIG= and overrides). Then, each against the uninterrupted run of
the same job: the time-limit signal mid-run (save, requeue, identical resume), a preemption, a lost
node, the signal during start-up at 1, 3, 5 and 10 s and mid-step, and scancel. Each check logs
what it saw; the first that fails ends the run with status 1. Format of the log: tests/cluster/README.md.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from typing import Dict, List, Optional

from tests.cluster.slurm import (REPO, CheckFailed, Cluster, Job, Log, compare_runs, read_metrics,
                                 wait_for)

TINY = os.path.join("examples", "tiny")
# DHNM thresholds that act on a briefly trained tiny model (as tests/training/test_embed_sup.py)
ACTIVE_DHNM = "embedding.dhnm={enabled: true, min_first_score: 0.95, drop_ratio: 1.2, max_score: 0.7}"
JOB_LIMIT_S = 300.0
"""The longest any one job may take here, from submission to its end, requeues included."""
REQUEUE_TIME_LIMIT_MIN = 10
"""The time limit a requeued time-limit job gets while pending: its restart must not be warned again
within the test, as a real job's next warning is a whole --time away."""
RESUME_LEAD_S = 3.0
"""How long before slurmctld's next time-limit test a suspended time-limit job is resumed: the test
then finds it training (a run has about 10 s of steps left) and slurmctld's loop is late by a second
at most."""
PG_TIMEOUT_S = 20
"""parallel.timeout_s of the lost-node run: how long the surviving rank waits in a collective."""
LOST_NODE_BOUND_S = PG_TIMEOUT_S + 30 + 30 + 20
"""How soon a job must end after losing a node: the collective's timeout, SlurmdTimeout (the
controller declares the node down) and KillWait (30 s each in cluster.sh), and 20 s for a loaded
machine; without the timeout the surviving rank would wait in its collective (megatron-core's
default: 30 minutes)."""


class Stages:
    """The four stages' sbatch file, recipe and overrides; runs under DIR/runs/<name>. The embedding
    stages train long enough (tens of steps) for a time-limit signal to land mid-run."""

    def __init__(self, directory: str):
        self.runs = os.path.join(directory, "runs")
        self.spec = {"pretrain": ("pretrain.sbatch", "pretrain.yaml", ["parallel.tensor_parallel=2"])}

    def add_data(self, data: Dict[str, str]) -> None:
        """The stages after pretraining, once their data exists (prepare_data)."""
        tokenizer = f"data.tokenizer={data['tokenizer']}"
        self.spec.update({
            "sft": ("sft.sbatch", "sft.yaml", [tokenizer, f"data.sft_prefix={data['sft']}",
                                                f"checkpoint.load_dir={self.run_dir('pretrain')}/checkpoints"]),
            "embed-weak": ("embed_weak.sbatch", "embed_weak.yaml", [
                tokenizer, f"data.contrastive_prefix={data['pairs']}", "train.train_steps=60",
                "checkpoint.save_interval=30", f"checkpoint.load_dir={self.run_dir('sft')}/checkpoints"]),
            "embed-sup": ("embed_sup.sbatch", "embed_sup.yaml", [
                tokenizer, f"data.contrastive_prefix={data['supervised']}", ACTIVE_DHNM, "train.train_steps=40",
                "checkpoint.save_interval=20", f"checkpoint.load_dir={self.run_dir('embed-weak')}/checkpoints"]),
        })

    def run_dir(self, name: str) -> str:
        return os.path.join(self.runs, name)

    def submit(self, cluster: Cluster, stage: str, name: Optional[str] = None, overrides=(), options=()) -> Job:
        sbatch_file, recipe, stage_overrides = self.spec[stage]
        return cluster.submit(sbatch_file, os.path.join(TINY, recipe), self.run_dir(name or stage),
                              [*stage_overrides, *overrides], options, name=name or stage)


def prepare_data(directory: str, log: Log) -> Dict[str, str]:
    """The tiny recipes' inputs from the repository's synthetic text generator (seconds): a tokenizer,
    an indexed SFT set, a store of pairs and a store of the four stage-4 tasks. The tools run in
    this process (one import of the stack, not one per tool)."""
    from megatron_conan.cli import preprocess, tokenize_contrastive
    from megatron_conan.datagen import synthetic
    from megatron_conan.testing.fixtures import train_tiny_tokenizer

    data_dir = os.path.join(directory, "data")
    tokenizer = train_tiny_tokenizer(os.path.join(data_dir, "tokenizer"))
    paths = {name: os.path.join(data_dir, name) for name in ("sft", "pairs", "supervised")}
    synthetic.write_sft_jsonl(paths["sft"] + ".jsonl", num_examples=80)
    _tool(preprocess.main, "--format", "sft", "--input", paths["sft"] + ".jsonl", "--output-prefix", paths["sft"],
          "--tokenizer-model", tokenizer, "--workers", "1", "--no-progress")
    synthetic.write_contrastive_jsonl(paths["pairs"] + ".jsonl", examples_per_task=96, tasks=("pair",), seed=4)
    synthetic.write_contrastive_jsonl(paths["supervised"] + ".jsonl", examples_per_task=48,
                                      tasks=("retrieval", "clr", "classification", "sts"), seed=6)
    for name in ("pairs", "supervised"):
        _tool(tokenize_contrastive.main, "--input", paths[name] + ".jsonl", "--output-prefix", paths[name],
              "--tokenizer-model", tokenizer, "--no-progress")
    log(f"data: tokenizer, sft, pairs and supervised stores under {data_dir}")
    return dict(paths, tokenizer=tokenizer)


def _tool(main, *argv: str) -> None:
    if main(list(argv)) != 0:
        raise CheckFailed(f"{main.__module__} {' '.join(argv)} failed")


# --- what a job's log shows ---------------------------------------------------------------------

RANK_LINE = re.compile(r"launch_rank\.sh: rank (\d+)/(\d+) on (\S+), rendezvous (\S+):(\d+) \((\S*)\), restart (\d+)")
EARLY_LINE = re.compile(r"requeue_on_signal\.sh: SIG\w+ before the command started \(restart (\d+)\)")
"""A run whose batch shell got its stop signal before starting srun: it has no task lines."""


def rank_lines(text: str) -> List[tuple]:
    """(rank, world, host, master, port, master address, restart) of every task start in a log."""
    return [match.groups() for match in RANK_LINE.finditer(text)]


def check_placement(cluster: Cluster, job: Job) -> str:
    """Two ranks on two different hosts, the rendezvous at node 1's bridge address (first run)."""
    starts = [line for line in rank_lines(cluster.log_text(job)) if line[6] == "0"]
    hosts = sorted({line[2] for line in starts})
    if hosts != sorted(cluster.nodes):
        raise CheckFailed(f"job {job.id}: ranks ran on {hosts}, not on the two nodes {list(cluster.nodes)}")
    addresses = {line[5] for line in starts}
    if addresses != {cluster.addresses[0]}:
        raise CheckFailed(f"job {job.id}: rendezvous at {addresses}, not node 1's {cluster.addresses[0]}")
    master, port = starts[0][3], starts[0][4]
    return f"ranks on {' and '.join(hosts)}, rendezvous {master}:{port} = {cluster.addresses[0]} (node 1's bridge address)"


def check_clean_log(cluster: Cluster, job: Job) -> None:
    text = cluster.log_text(job)
    # a failed or signal-killed task (srun's report) or a Python error; slurmstepd's "error: *** JOB n
    # CANCELLED ... DUE TO PREEMPTION / JOB REQUEUE ***" notices are expected
    for bad in ("Traceback", "User defined signal", "srun: error:"):
        if bad in text:
            line = next(line for line in text.splitlines() if bad in line)
            raise CheckFailed(f"job {job.id}: its log has {line.strip()!r} ({job.log_path})")


def segments(text: str) -> List[str]:
    """The log split at each run of the job (the first task start of each restart count)."""
    starts = sorted([(match.start(), match.group(7)) for match in RANK_LINE.finditer(text)]
                    + [(match.start(), match.group(1)) for match in EARLY_LINE.finditer(text)])
    cuts, seen = [], set()
    for start, restart in starts:
        if restart not in seen:
            seen.add(restart)
            cuts.append(text.rfind("\n", 0, start) + 1)
    cuts.append(len(text))
    return [text[cuts[i]:cuts[i + 1]] for i in range(len(cuts) - 1)]


def outcome(segment: str) -> str:
    """What a run of a job did with its stop signal, from its log."""
    saved = re.search(r"saving at step (\d+)", segment)
    if saved:
        return f"saved at step {saved.group(1)} and exited"
    if "stop signal received during start-up" in segment:
        return "stopped before the first step (process group up), nothing saved"
    if "during start-up: exiting before training" in segment:
        return "exited during start-up (before the process group), nothing written"
    if EARLY_LINE.search(segment):
        return "the batch shell had it before starting srun: nothing run"
    if "stop signal before the trainer started" in segment:
        return "exited before Python started (launch_rank.sh)"
    return "ran to its end"


def epoch(slurm_time: str) -> float:
    """A SLURM time stamp (the controller's local time, this machine's) as seconds since the epoch."""
    return time.mktime(time.strptime(slurm_time.split(".")[0], "%Y-%m-%dT%H:%M:%S"))


def wait_steps(run_dir: str, steps: int, limit_s: float = JOB_LIMIT_S) -> int:
    return wait_for(lambda: max(read_metrics(run_dir), default=0) >= steps and max(read_metrics(run_dir)),
                    limit_s, f"{run_dir} to reach step {steps}", every_s=0.1)


def latest_step(run_dir: str) -> int:
    """The step `latest` names, after checking that checkpoint is complete (every file a resume reads)."""
    checkpoints = os.path.join(run_dir, "checkpoints")
    with open(os.path.join(checkpoints, "latest"), encoding="utf-8") as handle:
        name = handle.read().strip()
    path = os.path.join(checkpoints, name)
    needed = ["common.pt", "layout.json", os.path.join("model_optim", "metadata.json"),
              os.path.join("rng", "rank_00000.pt"), os.path.join("rng", "rank_00001.pt")]
    absent = [part for part in needed if not os.path.exists(os.path.join(path, part))]
    if absent:
        raise CheckFailed(f"{path}, which latest names, lacks {absent}")
    return int(name.split("_")[1])


def final(cluster: Cluster, job: Job, expected: List[str], log: Log) -> List[str]:
    states = cluster.wait_end(job, JOB_LIMIT_S)
    if states != expected:
        raise CheckFailed(f"job {job.id} ({job.name}): sacct states {states}, expected {expected} ({job.log_path})")
    return states


# --- the checks ---------------------------------------------------------------------------------

class Checks:
    def __init__(self, cluster: Cluster, stages: Stages, log: Log):
        self.cluster, self.stages, self.log = cluster, stages, log
        self.startup_s: Dict[str, float] = {}
        """Seconds from a stage job's start to its first step (measured on the stage runs)."""
        self.training_s: Dict[str, float] = {}
        """Seconds from a stage run's first step to its last."""

    def stage_runs(self, directory: str) -> None:
        """Every stage through its sbatch file on both nodes, each after the one it starts from (the
        data of the later stages is made while pretraining runs)."""
        jobs = {"pretrain": self.stages.submit(self.cluster, "pretrain")}
        self.stages.add_data(prepare_data(directory, self.log))
        for stage, after in (("sft", "pretrain"), ("embed-weak", "sft"), ("embed-sup", "embed-weak")):
            jobs[stage] = self.stages.submit(self.cluster, stage, options=[f"--dependency=afterok:{jobs[after].id}"])
        for stage, job in jobs.items():
            timing = self._watch_steps(job)
            final(self.cluster, job, ["COMPLETED"], self.log)
            check_clean_log(self.cluster, job)
            metrics = read_metrics(job.run_dir)
            if timing:
                self.startup_s[stage] = timing - epoch(self.cluster.show(job)["StartTime"])
                self.training_s[stage] = os.path.getmtime(os.path.join(job.run_dir, "metrics.jsonl")) - timing
                timing_text = (f"; steps from {self.startup_s[stage]:.1f} s to "
                               f"{self.startup_s[stage] + self.training_s[stage]:.1f} s after the job started")
            layout = "TP=2" if stage == "pretrain" else "DP=2"
            self.log(f"{stage} ({layout}): job {job.id} COMPLETED (sacct); {check_placement(self.cluster, job)}; "
                     f"{len(metrics)} steps, loss {metrics[1]['loss']:.4f} -> {metrics[max(metrics)]['loss']:.4f}"
                     f"{timing_text if timing else ''}")

    def _watch_steps(self, job: Job) -> Optional[float]:
        """When the job's first step appeared (time.time()), or None when it had ended unwatched."""
        wait_for(lambda: self.cluster.live_state(job) not in ("PENDING", ""), JOB_LIMIT_S, f"job {job.id} to start")
        if self.cluster.live_state(job) != "RUNNING" or read_metrics(job.run_dir):
            return None
        wait_steps(job.run_dir, 1)
        return time.time()

    def _requeued_run(self, job: Job, reference: str, expected: List[str], first_restart: int = 1) -> None:
        states = final(self.cluster, job, expected, self.log)
        check_clean_log(self.cluster, job)
        restarts = sorted({int(line[6]) for line in rank_lines(self.cluster.log_text(job))})
        if restarts[-1] != len(expected) - 1:
            raise CheckFailed(f"job {job.id}: SLURM_RESTART_COUNT reached {restarts[-1]}, expected {len(expected) - 1}")
        self.log(f"  job {job.id}: sacct {' -> '.join(states)} under one job id; SLURM_RESTART_COUNT "
                 f"{', '.join(map(str, restarts))} in its log")
        for line in compare_runs(job.run_dir, self.stages.run_dir(reference)):
            self.log(f"  {line} (against the uninterrupted {reference} run)")

    def time_limit(self, stage: str) -> None:
        """SLURM's time-limit warning (--signal=B:USR1@30) mid-run: the trainer saves, exits 0, the
        wrapper requeues, the restart completes with identical metrics.

        slurmctld tests time limits every 30 s and warns at the first test that finds the job's end
        within --signal's 30 s plus that period; these runs train for about 10 s. So that the test
        falls on a training step whatever the start-up took (8-23 s on a busy machine), the job is
        suspended at its first step (`scontrol suspend`: SIGSTOP to its processes, a suspended job's
        time not counted), resumed a few seconds before slurmctld's next test, and its limit shortened
        so that this test finds its end 0-60 s ahead."""
        job = self.stages.submit(self.cluster, stage, name=f"{stage}-time-limit",
                                 options=[f"--time={REQUEUE_TIME_LIMIT_MIN}", "--signal=B:USR1@30"])
        wait_steps(job.run_dir, 1)
        self.cluster.run("scontrol", "suspend", job.id)
        suspended_s = time.time() - epoch(self.cluster.show(job)["StartTime"])
        suspended_at = max(read_metrics(job.run_dir))
        check = next_time_limit_check(self.cluster)
        while check < time.time() + RESUME_LEAD_S + 2:
            check += 30
        time.sleep(check - RESUME_LEAD_S - time.time())
        self.cluster.run("scontrol", "resume", job.id)
        end = self._end_just_after(job, check)
        self.log(f"{stage} with --signal=B:USR1@30: job {job.id} suspended at step {suspended_at}, "
                 f"{suspended_s:.1f} s after its start; resumed {RESUME_LEAD_S:.0f} s before slurmctld's "
                 f"next time-limit test with its limit cut to end {end - check:.0f} s after that test")
        wait_for(lambda: "REQUEUED" in self.cluster.states(job), JOB_LIMIT_S, f"job {job.id} to be requeued")
        self.cluster.run("scontrol", "update", f"JobId={job.id}", f"TimeLimit={REQUEUE_TIME_LIMIT_MIN}")
        first = segments(self.cluster.log_text(job))[0]
        saved = re.search(r"saving at step (\d+)", first)
        total = self.stages_total_steps(stage)
        if not saved or not 0 < int(saved.group(1)) < total:
            raise CheckFailed(f"job {job.id}: the time-limit signal did not arrive mid-run: {outcome(first)}")
        if "requeueing job" not in first:
            raise CheckFailed(f"job {job.id}: the wrapper did not requeue ({job.log_path})")
        self.log(f"  first run: {outcome(first)} of {total} (exit 0), the wrapper requeued "
                 f"({re.search(r'requeue_on_signal.sh: (.*)', first).group(1)}); limit back to "
                 f"{REQUEUE_TIME_LIMIT_MIN} min while it waits")
        self._requeued_run(job, stage, ["REQUEUED", "COMPLETED"])

    def _end_just_after(self, job: Job, check: float) -> float:
        """Cut the running job's limit so that its end (EndTime, as slurmctld computes it, suspended
        time excluded) falls 0-60 s after the time-limit test at `check`: the warning window of
        --signal=B:USR1@30. The end, read back."""
        info = self.cluster.show(job)
        base = epoch(info["EndTime"]) - limit_seconds(info["TimeLimit"])
        minutes = int((check - base) // 60) + 1
        self.cluster.run("scontrol", "update", f"JobId={job.id}", f"TimeLimit={minutes}")
        end = epoch(self.cluster.show(job)["EndTime"])
        if not check < end <= check + 60:
            raise CheckFailed(f"job {job.id}: its limit of {minutes} min ends it {end - check:.0f} s after the "
                              "next time-limit test, outside the warning window")
        return end

    def stages_total_steps(self, stage: str) -> int:
        return max(read_metrics(self.stages.run_dir(stage)))

    def preemption(self) -> None:
        """A job of partition low (PreemptMode=REQUEUE, GraceTime) preempted mid-run by a job of
        partition high: SIGTERM to the tasks, the trainer saves, SLURM requeues, the restart completes."""
        job = self.stages.submit(self.cluster, "embed-weak", name="embed-weak-preempted", options=["--partition=low"])
        step = wait_steps(job.run_dir, 5)
        high = self.cluster.run("sbatch", "--parsable", "--partition=high", "--nodes=2", "--exclusive",
                                f"--output={os.path.join(self.cluster.dir, 'jobs', 'preemptor-%j.out')}",
                                "--wrap=sleep 1").strip()
        self.log(f"embed-weak in partition low: job {job.id} at step {step}; job {high} of partition high submitted")
        wait_for(lambda: "PREEMPTED" in self.cluster.states(job) or "REQUEUED" in self.cluster.states(job),
                 JOB_LIMIT_S, f"job {job.id} to be preempted")
        self.cluster.wait_end(job, JOB_LIMIT_S)
        first = segments(self.cluster.log_text(job))[0]
        if "saving at step" not in first:
            raise CheckFailed(f"job {job.id}: preempted without a save: {outcome(first)}")
        self.log(f"  first run: {outcome(first)} (SIGTERM of the preemption)")
        self._requeued_run(job, "embed-weak", ["PREEMPTED", "COMPLETED"])

    def lost_node(self) -> None:
        """Node 2 lost mid-step: its network cut and every process in its namespace killed, as a
        crashed host. The surviving rank's collective times out (parallel.timeout_s), its task fails,
        srun --kill-on-bad-exit ends the step, the controller marks the node failed. latest stays
        complete; once the node is back, a resubmission resumes it."""
        overrides = ["checkpoint.save_interval=10", f"parallel.timeout_s={PG_TIMEOUT_S}"]
        # --no-requeue: SLURM would requeue a --requeue job on node failure, and when the node came
        # back, its kill of the failed run (same job id) hit the new run's task there (seen here)
        options = ["--no-requeue"]
        job = self.stages.submit(self.cluster, "embed-weak", name="embed-weak-lost-node", overrides=overrides,
                                 options=options)
        step = wait_steps(job.run_dir, 12)
        namespace = self.cluster.env_values["NETNS_PREFIX"] + "2"
        subprocess.run(["ip", "-n", namespace, "link", "set", "eth0", "down"], check=True)
        pids = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True).stdout.split()
        subprocess.run(["kill", "-KILL", *pids], check=False)
        lost_at = time.monotonic()
        self.log(f"embed-weak: job {job.id} at step {step}: node 2 cut off and its {len(pids)} processes killed")
        wait_for(lambda: self.cluster.live_state(job) not in ("RUNNING", "COMPLETING", "CONFIGURING"),
                 JOB_LIMIT_S, f"job {job.id} to end after the lost node")
        ended_s = time.monotonic() - lost_at
        states = self.cluster.states(job)
        saved = latest_step(job.run_dir)
        self.log(f"  job {job.id} ended {ended_s:.1f} s after the loss ({' -> '.join(states)}; bound "
                 f"{LOST_NODE_BOUND_S} s); latest is the complete checkpoint of step {saved}")
        if ended_s > LOST_NODE_BOUND_S:
            raise CheckFailed(f"job {job.id} took {ended_s:.0f} s to end after the lost node")
        subprocess.run(["ip", "-n", namespace, "link", "set", "eth0", "up"], check=True)
        subprocess.run(["bash", os.path.join(REPO, "tests", "cluster", "cluster.sh"), "node", self.cluster.dir, "2"],
                       check=True)
        node2 = self.cluster.nodes[1]
        self.cluster.run("scontrol", "update", f"NodeName={node2}", "State=RESUME", check=False)
        wait_for(lambda: "idle" in self.cluster.run("sinfo", "-h", "-n", node2, "-o", "%T", check=False),
                 120, "node 2 to come back")
        resumed = self.stages.submit(self.cluster, "embed-weak", name="embed-weak-lost-node", overrides=overrides,
                                     options=options)
        states = self.cluster.wait_end(resumed, JOB_LIMIT_S)
        if states[-1] != "COMPLETED" or "resumed from" not in self.cluster.log_text(resumed):
            raise CheckFailed(f"job {resumed.id}: the resubmission did not resume and complete: {states}")
        self.log(f"  resubmitted as job {resumed.id}: resumed from step {saved}, {' -> '.join(states)}")
        for line in compare_runs(job.run_dir, self.stages.run_dir("embed-weak"), first_step=saved + 1):
            self.log(f"  {line} (the resumed steps, against the uninterrupted embed-weak run)")

    def startup_signals(self, moments=(1, 3, 5, 10, "mid-step")) -> None:
        """The time-limit warning (`scancel --signal=USR1 --batch`, as SLURM sends it) at each moment
        after a start of one job: each run ends REQUEUED, the last COMPLETED, with identical losses."""
        job = self.stages.submit(self.cluster, "pretrain", name="pretrain-startup-signals")
        for restart, moment in enumerate(moments):
            info = self.cluster.wait_running(job, restart, JOB_LIMIT_S)
            if moment == "mid-step":
                resumed = max(read_metrics(job.run_dir), default=0)
                wait_steps(job.run_dir, resumed + 2)
            else:
                time.sleep(max(0.0, epoch(info["StartTime"]) + moment - time.time()))
            self.cluster.run("scancel", "--signal=USR1", "--batch", job.id)
            wait_for(lambda: self.cluster.states(job).count("REQUEUED") == restart + 1, JOB_LIMIT_S,
                     f"job {job.id} to be requeued after the signal {moment}")
            segment = segments(self.cluster.log_text(job))[restart]
            when = moment if moment == "mid-step" else f"{moment} s after the start"
            self.log(f"pretrain job {job.id}, USR1 {when}: {outcome(segment)}; REQUEUED")
        self._requeued_run(job, "pretrain", ["REQUEUED"] * len(moments) + ["COMPLETED"])

    def scancel(self) -> None:
        """scancel mid-run: SIGTERM everywhere, one clean save, CANCELLED, not requeued."""
        job = self.stages.submit(self.cluster, "embed-weak", name="embed-weak-scancel")
        step = wait_steps(job.run_dir, 5)
        self.cluster.run("scancel", job.id)
        states = final(self.cluster, job, ["CANCELLED"], self.log)
        text = self.cluster.log_text(job)
        saves = re.findall(r"\[rank 0\] \S+: preemption signal received: saving at step (\d+)", text)
        if len(saves) != 1 or latest_step(job.run_dir) != int(saves[0]) or "requeueing" in text:
            raise CheckFailed(f"job {job.id}: expected one save and no requeue after scancel ({job.log_path})")
        self.log(f"embed-weak: job {job.id} scancelled at step {step}: saved once at step {saves[0]} (latest, complete), "
                 f"sacct {' -> '.join(states)}, not requeued")


def limit_seconds(text: str) -> int:
    """A SLURM time limit as `scontrol show job` prints it ([D-]HH:MM:SS or MM:SS) in seconds."""
    days, _, clock = text.rpartition("-")
    seconds = 0
    for part in clock.split(":"):
        seconds = 60 * seconds + int(part)
    return seconds + 86400 * int(days or 0)


def next_time_limit_check(cluster: Cluster) -> float:
    """When slurmctld next tests time limits (and sends --signal warnings): 30 s after its last test,
    read from its log (SlurmctldDebug=debug2)."""
    path = os.path.join(cluster.dir, "log", "slurmctld.log")

    def last_check():
        with open(path, encoding="utf-8", errors="replace") as handle:
            stamps = re.findall(r"^\[(\S+)\] debug2: Testing job time limits", handle.read(), flags=re.M)
        return stamps[-1] if stamps else None
    return epoch(wait_for(last_check, 40, "slurmctld's first time-limit check")) + 30


CHECKS = {
    "time-limit": lambda checks: (checks.time_limit("embed-weak"), checks.time_limit("embed-sup")),
    "preemption": lambda checks: checks.preemption(),
    "lost-node": lambda checks: checks.lost_node(),
    "startup-signals": lambda checks: checks.startup_signals(),
    "scancel": lambda checks: checks.scancel(),
}
"""The checks after the stage runs (their references), in order; the command line may name some."""


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or any(name not in CHECKS for name in args[1:]):
        print(f"usage: python -m tests.cluster.checks DIR [{' '.join(CHECKS)}] (default: all)", file=sys.stderr)
        return 2
    directory = os.path.abspath(args[0])
    log = Log(os.path.join(directory, "cluster-test.log"))
    checks = Checks(Cluster(directory), Stages(directory), log)
    try:
        checks.stage_runs(directory)
        for name in args[1:] or CHECKS:
            CHECKS[name](checks)
    except CheckFailed as failure:
        log(f"FAILED: {failure}")
        return 1
    log("all cluster checks passed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
