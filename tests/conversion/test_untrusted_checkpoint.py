"""A checkpoint from someone else runs none of its code: its common.pt, its RNG files and torch's
distributed-checkpoint .metadata are pickles, each read under an allow-list. A pickle whose object's
__reduce__ would create a marker file is refused by resume, conan-convert (to-hf and
to-sentence-transformers), conan-encode and conan-eval, each with one line and exit status 2, and
the marker never appears."""

import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch

from megatron_conan.checkpoint.safe_load import load_file
from megatron_conan.cli import convert
from megatron_conan.eval import encode, retrieval_cli

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OLD_RUN = os.path.join(REPO, "tests", "checkpoint", "fixtures", "run_0_1_0")
BEIR_TINY = os.path.join(REPO, "tests", "data", "beir_tiny")
REFUSAL = "its pickle would run code on load"


class WritesMarker:
    """Unpickling this object calls ``open(marker, "w")``: the file appearing means code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _poison_file(path, marker):
    state = load_file(path)  # the old fixture's RNG file holds NumPy arrays
    torch.save({**state, "payload": WritesMarker(marker)}, path)


def _poisoned_copy(checkpoints_dir, destination, marker, files=("common", "rng")):
    """A copy of a checkpoints directory whose newest checkpoint carries the payload in `files`."""
    shutil.copytree(checkpoints_dir, destination)
    with open(os.path.join(destination, "latest"), encoding="utf-8") as handle:
        iteration = os.path.join(destination, handle.read().strip())
    if "common" in files:
        _poison_file(os.path.join(iteration, "common.pt"), marker)
    if "rng" in files:
        _poison_file(os.path.join(iteration, "rng", "rank_00000.pt"), marker)
    if "metadata" in files:
        with open(os.path.join(iteration, "model_optim", ".metadata"), "wb") as handle:
            pickle.dump(WritesMarker(marker), handle)
    return str(destination)


def _refused_in_one_line(tool, capsys, argv, prog):
    assert tool.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"{prog}: error: "), err
    assert REFUSAL in err, err
    return err


@pytest.mark.parametrize("command", ["to-hf", "to-sentence-transformers"])
def test_export_refuses_a_poisoned_common_state(artifacts, tmp_path, capsys, command):
    marker = tmp_path / "marker"
    checkpoint = _poisoned_copy(artifacts["embed_checkpoint"], tmp_path / "ckpt", marker)
    err = _refused_in_one_line(convert, capsys, [command, checkpoint, str(tmp_path / "out")], "conan-convert")
    assert "common.pt" in err and "open" in err  # names the callable it refused
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_export_refuses_poisoned_distributed_checkpoint_metadata(artifacts, tmp_path, capsys):
    marker = tmp_path / "marker"
    checkpoint = _poisoned_copy(artifacts["embed_checkpoint"], tmp_path / "ckpt", marker, files=("metadata",))
    err = _refused_in_one_line(convert, capsys, ["to-hf", checkpoint, str(tmp_path / "out")], "conan-convert")
    assert ".metadata" in err
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_encode_and_eval_refuse_a_poisoned_checkpoint(artifacts, tmp_path, capsys):
    marker = tmp_path / "marker"
    checkpoint = _poisoned_copy(artifacts["embed_checkpoint"], tmp_path / "ckpt", marker)
    (tmp_path / "texts.txt").write_text("sort a list\n")
    _refused_in_one_line(encode, capsys, [checkpoint, "--input", str(tmp_path / "texts.txt"), "--output",
                                          str(tmp_path / "vectors.npy"), "--no-progress"], "conan-encode")
    _refused_in_one_line(retrieval_cli, capsys, [BEIR_TINY, "--model", checkpoint, "--no-progress"], "conan-eval")
    assert not marker.exists() and not (tmp_path / "vectors.npy").exists()


def _resume(run_dir):
    import json

    with open(os.path.join(OLD_RUN, "expected.json"), encoding="utf-8") as handle:
        overrides = json.load(handle)["overrides"]
    env = {key: value for key, value in os.environ.items() if key not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    return subprocess.run([sys.executable, "-m", "megatron_conan.training.pretrain", "--config",
                           "examples/tiny/pretrain.yaml", f"run_dir={run_dir}", *overrides],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("files", [("common", "rng"), ("rng",)], ids=["common-and-rng", "rng-only"])
def test_resume_refuses_a_poisoned_checkpoint(tmp_path, files):
    marker = tmp_path / "marker"
    run_dir = tmp_path / "run"
    _poisoned_copy(os.path.join(OLD_RUN, "checkpoints"), run_dir / "checkpoints", marker, files)
    result = _resume(run_dir)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1 and REFUSAL in errors[0], result.stderr[-3000:]
    assert ("rank_00000.pt" if files == ("rng",) else "common.pt") in errors[0]
    assert "Traceback" not in result.stderr and not marker.exists()
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["iter_0000002", "latest",
                                                           "latest_checkpointed_iteration.txt"]
