"""What `make cluster-test` needs that runs without a cluster: its scripts parse, it refuses in one
line where it cannot run, and the comparison behind every "identical" fails on a difference."""

import json
import os
import shutil
import subprocess

import pytest

from tests.cluster.checks import outcome, segments
from tests.cluster.slurm import REPO, CheckFailed, compare_runs

CLUSTER_DIR = os.path.join(REPO, "tests", "cluster")


@pytest.mark.parametrize("name", ["cluster.sh", "run.sh"])
def test_bash_syntax(name):
    subprocess.run(["bash", "-n", os.path.join(CLUSTER_DIR, name)], check=True)


def test_without_root_it_refuses_in_one_line():
    command = ["bash", os.path.join(CLUSTER_DIR, "run.sh"), "--check-only"]
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("root without setpriv: no way to run as another user here")
        command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *command]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd="/")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        "cluster-test: cannot run here: it needs root (network namespaces, a bridge, /etc/hosts lines, "
        "the SLURM daemons)"]


def _metrics(path, records):
    path.mkdir()
    with open(path / "metrics.jsonl", "w") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")


def _run(losses, tasks, dhnm):
    return [{"step": step, "loss": loss, "task": task, "dhnm_replacements": value}
            for step, (loss, task, value) in enumerate(zip(losses, tasks, dhnm), start=1)]


def test_compare_runs_says_identical_and_names_the_first_difference(tmp_path):
    reference = _run([3.0, 2.5, 2.0], ["retrieval", "sts", "clr"], [0.0, 1.0, 1.0])
    _metrics(tmp_path / "reference", reference)
    # a resumed run: step 2 written twice, the later line (after the resume) wins
    _metrics(tmp_path / "resumed", reference[:2] + [dict(reference[1], loss=9.9)] + reference[1:])
    assert compare_runs(str(tmp_path / "resumed"), str(tmp_path / "reference")) == [
        "loss: identical over steps 1-3", "task: identical over steps 1-3",
        "dhnm_replacements: identical over steps 1-3"]
    _metrics(tmp_path / "other", reference[:2] + [dict(reference[2], task="sts")])
    with pytest.raises(CheckFailed, match="task differs at step 3"):
        compare_runs(str(tmp_path / "other"), str(tmp_path / "reference"))
    with pytest.raises(CheckFailed, match="task differs at step 3"):
        compare_runs(str(tmp_path / "other"), str(tmp_path / "reference"), first_step=3)


LOG = """requeue_on_signal.sh: SIGUSR1 before the command started (restart 0): not starting it
requeue_on_signal.sh: time limit near (status 0): requeueing job 5
launch_rank.sh: rank 0/2 on n1, rendezvous n1:20005 (10.200.0.11), restart 1
[rank 0] megatron_conan.stop_signals: SIGUSR1 during start-up: exiting before training; nothing was written
requeue_on_signal.sh: time limit near (status 0): requeueing job 5
launch_rank.sh: rank 1/2 on n2, rendezvous n1:20005 (10.200.0.11), restart 2
[rank 0] megatron_conan.training.callbacks: preemption signal received: saving at step 7 and exiting
"""


def test_a_jobs_log_splits_into_its_runs():
    runs = segments(LOG)
    assert len(runs) == 3 and runs[2].startswith("launch_rank.sh: rank 1/2 on n2")
    assert outcome(runs[0]) == "the batch shell had it before starting srun: nothing run"
    assert outcome(runs[1]) == "exited during start-up (before the process group), nothing written"
    assert outcome(runs[2]) == "saved at step 7 and exited"
