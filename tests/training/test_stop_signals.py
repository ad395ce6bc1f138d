"""SIGTERM / SIGUSR1 during a stage's start-up (megatron_conan/stop_signals.py): handled before the
heavy imports, a clean exit 0 even while the rendezvous blocks in C++, and a signal after the process
group exists stops the run before its first step with nothing saved. No SLURM here: the cluster test
(tests/cluster/) sends the same signals through sbatch, srun and the requeue wrapper."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

from megatron_conan import stop_signals
from megatron_conan.stop_signals import StopSignals
from megatron_conan.testing.distributed import run_distributed
from megatron_conan.testing.ports import free_port
from tests.training.conftest import communicate_or_kill

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_PRETRAIN = os.path.join(REPO, "examples", "tiny", "pretrain.yaml")


def _wait(condition, limit_s=30.0):
    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_starting_phase_acts_at_once_then_only_records():
    """Starting: the watcher thread answers a signal although the main thread never returns to Python
    code that would run a handler (here it sleeps in C). Together: recorded only. Uninstall restores."""
    seen = []
    before = signal.getsignal(signal.SIGTERM)
    signals = StopSignals(on_starting_signal=seen.append).install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        _wait(lambda: seen)
        assert seen == [signal.SIGTERM] and signals.received == signal.SIGTERM
        signals.stop_together()
        os.kill(os.getpid(), signal.SIGUSR1)
        _wait(lambda: signals.received == signal.SIGUSR1)
        assert seen == [signal.SIGTERM]
    finally:
        signals.uninstall()
    assert signal.getsignal(signal.SIGTERM) is before


# Run in a fresh interpreter: imports a stage entry module, then calls its main() with the training
# part replaced, reporting what was loaded and handled at each point.
ENTRY_PROBE = textwrap.dedent("""
    import json, signal, sys
    HEAVY = ("torch", "megatron.core", "pydantic", "numpy")
    import megatron_conan.training.embed_sup as entry
    from megatron_conan import stop_signals
    from megatron_conan.training import stage_main
    report = {"heavy_at_import": [m for m in HEAVY if m in sys.modules]}
    def probe(description, stage, prog, argv):
        report["installed"] = stop_signals.installed() is not None
        report["handler"] = signal.getsignal(signal.SIGUSR1) not in (signal.SIG_DFL, signal.SIG_IGN, None)
        report["heavy_at_start"] = [m for m in HEAVY if m in sys.modules]
        return 0
    stage_main._run_stage = probe
    report["status"] = entry.main([])
    report["restored"] = signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL
    entry.main()  # as the command line runs it: the process is the command
    report["ignored_until_exit"] = signal.getsignal(signal.SIGUSR1) is signal.SIG_IGN
    print(json.dumps(report))
""")


def test_entry_point_handles_signals_before_heavy_imports():
    result = subprocess.run([sys.executable, "-c", ENTRY_PROBE], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"heavy_at_import": [], "installed": True, "handler": True, "heavy_at_start": [],
                      "status": 0, "restored": True, "ignored_until_exit": True}


def _listening(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def test_signal_during_rendezvous_exits_cleanly(tmp_path):
    """Rank 0 of a world of two whose rank 1 never comes: it blocks in the rendezvous (C++, up to
    parallel.timeout_s). SIGUSR1 then ends it at once with status 0, one line, nothing written."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
               CUDA_VISIBLE_DEVICES="")
    process = subprocess.Popen(
        [sys.executable, "-m", "megatron_conan.training.pretrain", "--config", TINY_PRETRAIN,
         f"run_dir={tmp_path / 'run'}", "parallel.timeout_s=300", "train.progress_bar=false"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _wait(lambda: _listening(port) or process.poll() is not None, limit_s=240)
        assert process.poll() is None, process.communicate()
        time.sleep(0.5)  # inside the store's wait for rank 1
        process.send_signal(signal.SIGUSR1)
        _, err = communicate_or_kill(process, 120)  # not the 300 s of the rendezvous timeout
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 0, err
    assert "SIGUSR1 during start-up: exiting before training" in err
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


def _signalled_before_first_step(rank, world_size, run_dir):
    from megatron_conan import stop_signals
    from megatron_conan.training.stage_main import parse_run_config
    from megatron_conan.training.trainer import train

    _, cfg = parse_run_config("pretrain", ["--config", TINY_PRETRAIN, f"run_dir={run_dir}", "train.train_steps=2",
                                           "train.eval_interval=0", "train.progress_bar=false"])
    with stop_signals.stop_signals_installed() as signals:
        signals.stop_together()  # as the entry point does once the process group exists
        os.kill(os.getpid(), signal.SIGUSR1)  # "during the model build": before train() starts
        result = train(cfg, "pretrain")
    return {"steps": result.steps_done, "preempted": result.preempted}


def test_signal_after_the_process_group_stops_before_the_first_step(tmp_path):
    results = run_distributed(_signalled_before_first_step, 1, args=(str(tmp_path / "run"),))
    assert results == [{"steps": 0, "preempted": True}]
    assert not os.path.exists(tmp_path / "run" / "checkpoints")
    assert not os.path.exists(tmp_path / "run" / "metrics.jsonl")


MASK_PROBE = "import signal; print(sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, [])))"


def test_held_signals_are_not_lost_and_children_never_see_them():
    """What a checkpoint save starts (megatron-core's writer helper) inherits the held signals: SLURM
    sends them to every process of the step, and a dead helper fails the save."""
    signals = StopSignals(exit_at_once=False).install()
    try:
        with stop_signals.held():
            child = subprocess.run([sys.executable, "-c", MASK_PROBE], capture_output=True, text=True, timeout=60)
            os.kill(os.getpid(), signal.SIGUSR1)  # held here; another thread may take it: handled either way
        _wait(lambda: signals.received == signal.SIGUSR1)
    finally:
        signals.uninstall()
    assert {int(signal.SIGUSR1), int(signal.SIGTERM)} <= set(json.loads(child.stdout))
    assert int(signal.SIGUSR1) not in signal.pthread_sigmask(signal.SIG_BLOCK, [])
