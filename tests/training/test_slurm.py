"""The SLURM launch scripts: syntax, the SLURM -> torch variable mapping (a real 2-process gloo
world through launch_rank.sh), the time-limit requeue wrapper, and the modules the sbatch files run."""

import importlib.util
import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_conan.testing.ports import free_port

REPO = Path(__file__).resolve().parents[2]
SLURM_DIR = REPO / "examples" / "slurm"
LAUNCH = SLURM_DIR / "launch_rank.sh"
REQUEUE = SLURM_DIR / "requeue_on_signal.sh"
SBATCH_MODULES = {
    "pretrain.sbatch": "megatron_conan.training.pretrain",
    "sft.sbatch": "megatron_conan.training.sft",
    "embed_weak.sbatch": "megatron_conan.training.embed_weak",
    "embed_sup.sbatch": "megatron_conan.training.embed_sup",
}
WRITTEN_MODULES = ("megatron_conan.training.pretrain", "megatron_conan.training.sft")


def _executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def _fake_bin(tmp_path: Path, scontrol_body: str) -> Path:
    """A directory with a stand-in `scontrol`, put first on PATH so the host's SLURM is not used."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    _executable(bin_dir / "scontrol", "#!/usr/bin/env bash\n" + scontrol_body + "\n")
    return bin_dir


def _slurm_env(tmp_path: Path, scontrol_body: str, **slurm) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SLURM_") and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                       "MASTER_ADDR", "MASTER_PORT")}
    env["PATH"] = f"{_fake_bin(tmp_path, scontrol_body)}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHON"] = sys.executable
    env.update({k: str(v) for k, v in slurm.items()})
    return env


@pytest.mark.parametrize("name", ["launch_rank.sh", "requeue_on_signal.sh", *SBATCH_MODULES])
def test_bash_syntax(name):
    subprocess.run(["bash", "-n", str(SLURM_DIR / name)], check=True)


def test_two_tasks_form_a_world(tmp_path):
    """Two concurrent launch_rank.sh tasks, as srun would start them on one node."""
    port = free_port()
    # `scontrol show hostnames LIST` prints one host per line.
    hostnames = 'if [[ "$1 $2" == "show hostnames" ]]; then tr "," "\\n" <<< "$3"; else exit 1; fi'
    processes = []
    for rank in (0, 1):
        env = _slurm_env(tmp_path, hostnames, SLURM_PROCID=rank, SLURM_NTASKS=2, SLURM_LOCALID=rank,
                         SLURM_JOB_NODELIST="localhost", SLURM_JOB_ID=4242, MASTER_PORT=port)
        processes.append(subprocess.Popen(
            ["bash", str(LAUNCH), "tests.training.slurm_probe"], cwd=REPO, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    reports = []
    for process in processes:
        try:
            out, err = process.communicate(timeout=60)
        finally:
            process.kill()
        assert process.returncode == 0, err
        reports.append(json.loads(out.strip().splitlines()[-1]))
    for rank, report in enumerate(reports):
        assert report == {"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
                          "MASTER_ADDR": "localhost", "MASTER_PORT": str(port), "rank_sum": 1}


def _launch_env_only(tmp_path, scontrol_body, *args, **slurm):
    """launch_rank.sh with a stand-in interpreter that prints what it was given."""
    fake_python = _executable(tmp_path / "python", (
        "#!/usr/bin/env bash\n"
        'for name in RANK WORLD_SIZE LOCAL_RANK MASTER_ADDR MASTER_PORT; do echo "$name=${!name}"; done\n'
        'printf "arg=%s\\n" "$@"\n'))
    env = _slurm_env(tmp_path, scontrol_body, **slurm)
    env["PYTHON"] = str(fake_python)
    result = subprocess.run(["bash", str(LAUNCH), *args], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=30)
    return result


def test_port_from_job_id_and_fallback_address(tmp_path):
    result = _launch_env_only(tmp_path, "exit 1", "some.module", "--config", "a b.yaml", "train.lr=1e-4",
                              SLURM_PROCID=3, SLURM_NTASKS=8, SLURM_LOCALID=3,
                              SLURM_JOB_NODELIST="node[01-02]", SLURM_JOB_ID=123456)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:5] == ["RANK=3", "WORLD_SIZE=8", "LOCAL_RANK=3", "MASTER_ADDR=127.0.0.1",
                         f"MASTER_PORT={20000 + 123456 % 20000}"]
    assert lines[5:] == ["arg=-m", "arg=some.module", "arg=--config", "arg=a b.yaml", "arg=train.lr=1e-4"]


def test_first_node_from_scontrol_wins_and_multinode_without_address_fails(tmp_path):
    hostnames = 'echo gpu-node-07; echo gpu-node-08'
    result = _launch_env_only(tmp_path, hostnames, "m", SLURM_PROCID=0, SLURM_NTASKS=16,
                              SLURM_LOCALID=0, SLURM_JOB_NODELIST="gpu-node-[07-08]",
                              MASTER_ADDR="stale-host", MASTER_PORT=12345)
    assert "MASTER_ADDR=gpu-node-07" in result.stdout and "MASTER_PORT=12345" in result.stdout

    result = _launch_env_only(tmp_path, "exit 1", "m", SLURM_PROCID=0, SLURM_NTASKS=16,
                              SLURM_LOCALID=0, SLURM_JOB_NODELIST="gpu-node-[07-08]",
                              SLURM_JOB_NUM_NODES=2)
    assert result.returncode == 2 and "set MASTER_ADDR" in result.stderr


def test_outside_srun_is_refused(tmp_path):
    result = _launch_env_only(tmp_path, "exit 1", "m")
    assert result.returncode != 0 and "run this under srun" in result.stderr


def _run_requeue_wrapper(tmp_path, child_script, send_usr1, **extra_env):
    calls = tmp_path / "scontrol_calls"
    env = _slurm_env(tmp_path, f'echo "$@" >> {calls}', SLURM_JOB_ID=777, **extra_env)
    ready = tmp_path / "ready"
    child = _executable(tmp_path / "trainer.sh", child_script.format(ready=ready, saved=tmp_path / "saved"))
    wrapper = subprocess.Popen(["bash", str(REQUEUE), "bash", str(child)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while not ready.exists():
            assert time.monotonic() < deadline and wrapper.poll() is None, "stand-in trainer did not start"
            time.sleep(0.05)
        if send_usr1:
            wrapper.send_signal(signal.SIGUSR1)
        _, err = wrapper.communicate(timeout=20)
    finally:
        wrapper.kill()
    return wrapper.returncode, err, calls.read_text() if calls.exists() else ""


# Like the trainer: saves on SIGUSR1 and exits 0; without a signal it ends after ~2 s with status 3.
TRAINER = """#!/usr/bin/env bash
trap 'echo saved > {saved}; exit 0' USR1
touch {ready}
for _ in $(seq 40); do sleep 0.05; done
exit 3
"""


def test_usr1_is_forwarded_and_the_job_requeued(tmp_path):
    returncode, err, calls = _run_requeue_wrapper(tmp_path, TRAINER, send_usr1=True)
    assert returncode == 0, err
    assert (tmp_path / "saved").read_text().strip() == "saved"
    assert calls.strip() == "requeue 777"


def test_no_signal_no_requeue_and_status_passed_on(tmp_path):
    returncode, _, calls = _run_requeue_wrapper(tmp_path, TRAINER, send_usr1=False)
    assert returncode == 3 and calls == ""
    assert not (tmp_path / "saved").exists()


@pytest.mark.parametrize("name,module", sorted(SBATCH_MODULES.items()))
def test_sbatch_runs_the_stage_module_through_the_wrappers(name, module):
    text = (SLURM_DIR / name).read_text()
    directives = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", text, flags=re.M))
    assert directives["ntasks-per-node"] == directives["gpus-per-node"] == "8"
    assert directives["signal"] == "B:USR1@300"
    for flag in ("nodes", "cpus-per-task", "time", "requeue", "open-mode"):
        assert flag in directives, flag
    commands = [line.rstrip("\\").strip() for line in text.splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    # the batch shell traps the stop signals before anything else (requeue_on_signal.sh says why)
    assert commands[:2] == list(EARLY_TRAPS)
    command = " ".join(commands[2:])
    assert command.startswith("source examples/slurm/requeue_on_signal.sh srun ")
    assert f"bash examples/slurm/launch_rank.sh {module} --config " in command
    assert command.endswith('"$@"')
    if module in WRITTEN_MODULES:
        assert importlib.util.find_spec(module) is not None, module


EARLY_TRAPS = ("trap 'early_signal=USR1' USR1", "trap 'early_signal=TERM' TERM")

# An sbatch file's shape, the stop signal arriving before the wrapper is sourced.
EARLY_SIGNAL_BATCH = """#!/usr/bin/env bash
{traps}
kill -{signal} $$
source {wrapper} touch {ran}
"""


@pytest.mark.parametrize("signal_name, status, requeued", [("USR1", 0, True), ("TERM", 128 + 15, False)])
def test_a_signal_before_the_command_starts_skips_it(tmp_path, signal_name, status, requeued):
    """A signal in the batch shell's first moments (before srun starts): the command is not started,
    the time-limit warning still requeues the job, and the job does not end FAILED by bash's default
    action (what a two-node cluster showed with the warning 0.3 s after the batch script started)."""
    calls = tmp_path / "scontrol_calls"
    env = _slurm_env(tmp_path, f'echo "$@" >> {calls}', SLURM_JOB_ID=777, SLURM_RESTART_COUNT=2)
    batch = _executable(tmp_path / "job.sbatch", EARLY_SIGNAL_BATCH.format(
        traps="\n".join(EARLY_TRAPS), signal=signal_name, wrapper=REQUEUE, ran=tmp_path / "ran"))
    result = subprocess.run(["bash", str(batch)], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == status, result.stderr
    assert not (tmp_path / "ran").exists()
    assert f"SIG{signal_name} before the command started (restart 2): not starting it" in result.stderr
    assert (calls.read_text().strip() if calls.exists() else "") == ("requeue 777" if requeued else "")


# Dies of SIGUSR1 (bash's default action), as a task the signal reached before Python started.
KILLED_BY_THE_SIGNAL = """#!/usr/bin/env bash
touch {ready}
for _ in $(seq 100); do sleep 0.05; done
exit 3
"""


def test_tasks_ended_by_the_signal_are_requeued_too(tmp_path):
    returncode, err, calls = _run_requeue_wrapper(tmp_path, KILLED_BY_THE_SIGNAL, send_usr1=True)
    assert returncode == 128 + signal.SIGUSR1, err
    assert calls.strip() == "requeue 777"


# Misses the first SIGUSR1 (as a task srun had not launched yet), saves on the second.
MISSES_THE_FIRST = """#!/usr/bin/env bash
seen=0
trap 'seen=$((seen + 1)); [[ $seen -ge 2 ]] && {{ echo saved > {saved}; exit 0; }}' USR1
touch {ready}
for _ in $(seq 200); do sleep 0.05; done
exit 3
"""


def test_the_signal_is_sent_again_while_the_command_runs_on(tmp_path):
    returncode, err, calls = _run_requeue_wrapper(tmp_path, MISSES_THE_FIRST, send_usr1=True, SIGNAL_RESEND_S=1)
    assert returncode == 0, err
    assert (tmp_path / "saved").read_text().strip() == "saved"
    assert calls.strip() == "requeue 777"
