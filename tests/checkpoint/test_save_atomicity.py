"""A checkpoint save can be killed at any moment and `latest` still names a complete checkpoint.

The protocol (rename into place, re-save by swap, prune by rename-then-delete, recovery at the next
save) is checked on plain directories at every named save point; then real training runs are
SIGKILLed (the whole process group) at each point and the next run resumes from where `latest`
says."""

import json
import os
import re
import subprocess
import sys

import pytest

from megatron_conan import atomic_write
from megatron_conan.checkpoint import save as saving
from megatron_conan.checkpoint.layout import checkpoint_name, read_latest, write_latest
from megatron_conan.checkpoint.save import SAVE_POINTS
from megatron_conan.errors import InputError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROBE = os.path.join(REPO, "tests", "checkpoint", "checkpoint_kill_probe.py")


class _Stop(Exception):
    """Stands for a kill at a save point (the in-process tests)."""


def _write(directory, step, content, run_id="run-a"):
    os.makedirs(directory)
    with open(os.path.join(directory, "content"), "w") as handle:
        handle.write(f"{step}:{content}")
    with open(os.path.join(directory, "layout.json"), "w") as handle:
        json.dump({"world_size": 1, "run_id": run_id}, handle)


def _content(path):
    with open(os.path.join(path, "content")) as handle:
        return handle.read()


def _fake_save(save_dir, step, content, keep_last, stop_at=None, monkeypatch=None):
    """save_checkpoint's filesystem protocol on rank 0, without a model."""
    def hook(point, directory):
        if point == stop_at:
            raise _Stop(point)

    monkeypatch.setattr(saving, "save_point_hook", hook)
    final = os.path.join(save_dir, checkpoint_name(step))
    os.makedirs(save_dir, exist_ok=True)
    saving.recover(save_dir)
    run_id = saving.current_run_id(save_dir)
    _write(final + ".partial", step, content, run_id)
    saving._reached("before_shards", final + ".partial")
    saving._reached("after_shards", final + ".partial")
    saving.publish(final + ".partial", final)
    write_latest(save_dir, step)
    saving._reached("after_latest", final)
    saving.prune(save_dir, step, keep_last, run_id)


@pytest.mark.parametrize("point", SAVE_POINTS)
@pytest.mark.parametrize("resave", [False, True], ids=["new-step", "re-save-of-latest"])
def test_a_save_stopped_at_any_point_leaves_latest_complete(tmp_path, monkeypatch, point, resave):
    save_dir = str(tmp_path)
    _fake_save(save_dir, 1, "old", keep_last=1, monkeypatch=monkeypatch)
    _fake_save(save_dir, 2, "old", keep_last=1, monkeypatch=monkeypatch)
    step = 2 if resave else 3
    try:
        _fake_save(save_dir, step, "new", keep_last=1, stop_at=point, monkeypatch=monkeypatch)
    except _Stop:
        pass
    latest = read_latest(save_dir)
    assert _content(latest) in ("2:old", f"{step}:new"), (point, os.listdir(save_dir))
    # the next save recovers whatever was left and everything ends clean
    _fake_save(save_dir, 4, "next", keep_last=1, monkeypatch=monkeypatch)
    assert sorted(os.listdir(save_dir)) == ["iter_0000004", "latest", "latest_checkpointed_iteration.txt"]
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text() == "4\n"


def test_a_re_save_stopped_mid_swap_is_read_from_next_then_finished(tmp_path, monkeypatch):
    save_dir = str(tmp_path)
    _fake_save(save_dir, 5, "old", keep_last=2, monkeypatch=monkeypatch)
    with pytest.raises(_Stop):
        _fake_save(save_dir, 5, "new", keep_last=2, stop_at="during_swap", monkeypatch=monkeypatch)
    assert sorted(os.listdir(save_dir)) == ["iter_0000005.next", "iter_0000005.old", "latest",
                                            "latest_checkpointed_iteration.txt"]
    assert read_latest(save_dir).endswith("iter_0000005.next") and _content(read_latest(save_dir)) == "5:new"
    saving.recover(save_dir)
    assert read_latest(save_dir).endswith("iter_0000005") and _content(read_latest(save_dir)) == "5:new"
    assert sorted(os.listdir(save_dir)) == ["iter_0000005", "latest", "latest_checkpointed_iteration.txt"]


def test_a_re_save_stopped_before_the_swap_keeps_the_old_copy(tmp_path, monkeypatch):
    save_dir = str(tmp_path)
    _fake_save(save_dir, 5, "old", keep_last=2, monkeypatch=monkeypatch)
    with pytest.raises(_Stop):
        _fake_save(save_dir, 5, "new", keep_last=2, stop_at="after_rename", monkeypatch=monkeypatch)
    saving.recover(save_dir)
    assert _content(read_latest(save_dir)) == "5:old"
    assert sorted(os.listdir(save_dir)) == ["iter_0000005", "latest", "latest_checkpointed_iteration.txt"]


def test_pruning_keeps_the_newest_up_to_the_step_and_leaves_later_steps(tmp_path, monkeypatch):
    save_dir = str(tmp_path)
    for step in (2, 4, 6):
        _fake_save(save_dir, step, "a", keep_last=0, monkeypatch=monkeypatch)
    # a resumed run (latest moved back to 4 by hand here) saves 5 with keep_last=1: 2 and 4 go,
    # 6 (written by a run killed before its latest moved) stays for the swap when 6 is re-saved
    atomic_write.text(os.path.join(save_dir, "latest"), "iter_0000004\n")
    _fake_save(save_dir, 5, "b", keep_last=1, monkeypatch=monkeypatch)
    assert sorted(name for name in os.listdir(save_dir) if name.startswith("iter_")) == ["iter_0000005",
                                                                                          "iter_0000006"]
    assert read_latest(save_dir).endswith("iter_0000005")


def test_a_bad_latest_marker_is_an_input_error(tmp_path):
    assert read_latest(str(tmp_path)) is None
    (tmp_path / "latest").write_text("iter_0000009\n")
    with pytest.raises(InputError, match="names 'iter_0000009', which is not a complete checkpoint"):
        read_latest(str(tmp_path))
    (tmp_path / "latest").write_text("../../etc\n")
    with pytest.raises(InputError, match="not a complete checkpoint"):
        read_latest(str(tmp_path))


# -- real runs, SIGKILLed --------------------------------------------------------------------------

def _run(run_dir, steps, save_interval, kill=None):
    """One pretrain run (tiny, synthetic data); `kill` = (point, save number) SIGKILLs it there."""
    arguments = ["--config", os.path.join(REPO, "examples", "tiny", "pretrain.yaml"), f"run_dir={run_dir}",
                 "train.eval_interval=0", f"train.train_steps={steps}",
                 f"checkpoint.save_interval={save_interval}", "checkpoint.keep_last=1"]
    command = ([sys.executable, PROBE, kill[0], str(kill[1]), "--"] if kill
               else [sys.executable, "-m", "megatron_conan.training.pretrain"])
    env = {key: value for key, value in os.environ.items() if key not in ("RANK", "WORLD_SIZE")}
    result = subprocess.run(command + arguments, cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=600, start_new_session=True)  # its own process group, for killpg
    return result.returncode, result.stdout + result.stderr


def _resumed_from(output):
    """(checkpoint directory name, step) a run resumed from, from its log; None for a fresh start."""
    found = re.search(r"resumed from (\S+) at step (\d+)", output)
    return (os.path.basename(found.group(1)), int(found.group(2))) if found else None


@pytest.mark.slow
def test_sigkill_at_every_save_point_then_resume(tmp_path):
    """A chain of runs, each killed at one point of a save and resumed by the next; the resumed run
    starts right after the step `latest` names, which the killed run must not have lost."""
    run_dir = str(tmp_path)
    save_dir = os.path.join(run_dir, "checkpoints")
    chain = [  # (point, the save it kills in, train_steps, save_interval, latest afterwards)
        ("before_shards", 2, 7, 1, 1),   # saves 1; killed saving 2
        ("after_shards", 2, 7, 1, 2),    # resumes at 1, saves 2; killed with 3 complete in .partial
        ("after_rename", 2, 7, 1, 3),    # resumes at 2, saves 3; iter_4 complete, latest still 3
        ("after_latest", 2, 7, 1, 5),    # resumes at 3, re-saves 4 (swap), killed before pruning 4
        ("during_prune", 1, 7, 1, 6),    # resumes at 5, saves 6; killed deleting iter_4 (iter_4.old)
        ("during_swap", 1, 7, 0, 7),     # a finished run at 7, restarted, re-saves 7: killed mid-swap
    ]
    previous = None
    for point, save_number, steps, interval, latest_step in chain:
        if point == "during_swap":
            code, output = _run(run_dir, steps, interval)  # resumes at 6, finishes at 7
            assert code == 0 and _resumed_from(output)[1] == previous, output[-3000:]
            previous = 7
        code, output = _run(run_dir, steps, interval, kill=(point, save_number))
        assert code == -9 and f"probe: SIGKILL at {point}" in output, (point, code, output[-3000:])
        resumed = _resumed_from(output)
        assert (resumed and resumed[1]) == previous, (point, resumed, previous)
        latest = read_latest(save_dir)
        assert latest is not None and os.path.basename(latest).startswith(checkpoint_name(latest_step)), (
            point, latest, sorted(os.listdir(save_dir)))
        with open(os.path.join(save_dir, "latest_checkpointed_iteration.txt")) as handle:
            assert int(handle.read()) <= latest_step, point
        previous = latest_step
    code, output = _run(run_dir, 8, 1)
    assert code == 0, output[-3000:]
    assert _resumed_from(output) == ("iter_0000007.next", 7)  # the swap was cut short: its new copy
    assert sorted(os.listdir(save_dir)) == ["iter_0000008", "latest", "latest_checkpointed_iteration.txt"]
    with open(os.path.join(save_dir, "latest_checkpointed_iteration.txt")) as handle:
        assert handle.read() == "8\n"


# -- what a save may delete ------------------------------------------------------------------------

def test_recovery_leaves_entries_a_save_did_not_make(tmp_path, monkeypatch):
    save_dir = tmp_path
    (save_dir / "photos.old").mkdir()
    (save_dir / "photos.old" / "cat.jpg").write_text("cat")
    (save_dir / "notes").write_text("mine")
    (save_dir / "notes.next").write_text("my next notes")
    (save_dir / "draft.partial").write_text("a draft")
    (save_dir / "iter_12.old").mkdir()  # not a checkpoint name (seven digits or more)
    user_entries = ["draft.partial", "iter_12.old", "notes", "notes.next", "photos.old"]
    for step in (1, 2, 3):
        _fake_save(str(save_dir), step, "run", keep_last=1, monkeypatch=monkeypatch)
    assert sorted(os.listdir(save_dir)) == sorted(user_entries + ["iter_0000003", "latest",
                                                                   "latest_checkpointed_iteration.txt"])
    assert (save_dir / "notes").read_text() == "mine" and (save_dir / "notes.next").read_text() == "my next notes"
    assert (save_dir / "photos.old" / "cat.jpg").read_text() == "cat"


def test_pruning_deletes_only_the_runs_own_checkpoints(tmp_path, monkeypatch):
    save_dir = str(tmp_path)
    _write(os.path.join(save_dir, "iter_0000001"), 1, "another run's", run_id="run-b")
    os.makedirs(os.path.join(save_dir, "iter_0000002"))  # copied in by hand: no layout.json
    for step in (3, 4, 5):
        _fake_save(save_dir, step, "ours", keep_last=1, monkeypatch=monkeypatch)
    assert sorted(name for name in os.listdir(save_dir) if name.startswith("iter_")) == [
        "iter_0000001", "iter_0000002", "iter_0000005"]
    assert _content(os.path.join(save_dir, "iter_0000001")) == "1:another run's"


def test_a_save_over_another_runs_checkpoint_of_the_same_step_is_refused(tmp_path, monkeypatch):
    save_dir = str(tmp_path)
    _fake_save(save_dir, 4, "ours", keep_last=0, monkeypatch=monkeypatch)
    _write(os.path.join(save_dir, "iter_0000005"), 5, "another run's", run_id="run-b")
    run_id, problem = saving._prepare(save_dir, os.path.join(save_dir, "iter_0000005"))
    assert run_id is None and "was written by another run" in problem
    assert not os.path.exists(os.path.join(save_dir, "iter_0000005.partial"))
    assert saving._prepare(save_dir, os.path.join(save_dir, "iter_0000006"))[1] is None  # a new step is fine


# -- durability ------------------------------------------------------------------------------------

def test_every_file_and_directory_is_synced_before_latest_moves(tmp_path, monkeypatch):
    """os.fsync and os.replace recorded during a real save (a world of one, in this process): every
    file and directory of the checkpoint is fsynced before `latest` is replaced."""
    from megatron_conan.checkpoint.save import save_checkpoint
    from megatron_conan.checkpoint.standalone import build_model, model_parallel_world
    from megatron_conan.config.model import tiny

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(descriptor):
        events.append(("fsync", os.path.realpath(os.readlink(f"/proc/self/fd/{descriptor}"))))
        return real_fsync(descriptor)

    def replace(source, destination, **kwargs):
        events.append(("replace", os.path.realpath(os.fspath(destination))))
        return real_replace(source, destination, **kwargs)

    save_dir = os.path.realpath(tmp_path / "checkpoints")
    with model_parallel_world():
        chunks = build_model(tiny())
        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)
        final = save_checkpoint(save_dir, 3, chunks, None, None, tiny(), consumed_samples=0, keep_last=2)
    latest_moved = events.index(("replace", os.path.join(save_dir, "latest")))
    synced = {path.replace(".partial", "") for kind, path in events[:latest_moved] if kind == "fsync"}
    on_disk = {final} | {os.path.join(directory, name) for directory, dirs, files in os.walk(final)
                         for name in dirs + files}
    assert on_disk - synced == set(), sorted(on_disk - synced)
    assert save_dir in synced  # the rename of iter_3.partial into place
    assert len(on_disk) > 8, sorted(on_disk)  # shards, metadata, common, RNG, layout and their directories
