"""conan-convert on bad input: one stderr line, exit status 2, nothing written."""

import json
import os
import shutil

import pytest

from megatron_conan.cli import convert as convert_command
from megatron_conan import outputs
from megatron_conan.testing.fixtures import copy_checkpoint_with_extra, embedding_run_config, soft_mask_state


@pytest.fixture(scope="module")
def tool():
    return convert_command


def _fails_cleanly(tool, capsys, argv, message, output):
    assert tool.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("conan-convert: error: "), err
    assert message in err, err
    parent = os.path.dirname(os.path.abspath(output))
    assert not [name for name in os.listdir(parent) if name.startswith(f".{os.path.basename(output)}.")]
    return err


def test_a_directory_without_latest_is_refused(tool, capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    _fails_cleanly(tool, capsys, ["to-hf", str(tmp_path / "empty"), str(tmp_path / "out")],
                   "is not a checkpoint: no 'latest' marker", str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_an_existing_output_is_refused_unless_overwrite(tool, capsys, artifacts, tmp_path):
    existing = tmp_path / "out"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    _fails_cleanly(tool, capsys, ["to-hf", artifacts["checkpoints"]["tp1"], str(existing)],
                   "exists (pass --overwrite to replace it)", str(existing))
    assert (existing / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("soft_mask,words", [
    (soft_mask_state(step=5, total_steps=10), "soft mask a=0.5 (len_over_pos)"),  # stage 3, mid-schedule
    (soft_mask_state(fixed_a=1.0, position_scale="pos_over_len"), "soft mask a=1 (pos_over_len)"),
])
def test_an_attention_between_causal_and_bidirectional_is_refused(tool, capsys, artifacts, tmp_path, soft_mask, words):
    checkpoint = copy_checkpoint_with_extra(artifacts["checkpoints"]["tp1"], str(tmp_path / "ckpt"), soft_mask=soft_mask,
                                            run_config=embedding_run_config(artifacts["tokenizer"]))
    output = str(tmp_path / "st")
    err = _fails_cleanly(tool, capsys, ["to-sentence-transformers", checkpoint, output], words, output)
    assert "cannot express" in err and not os.path.exists(output)


def _hf_copy(artifacts, tmp_path, edit):
    directory = tmp_path / "hf"
    shutil.copytree(artifacts["hf"]["tp1"], directory)
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    edit(config)
    config_path.write_text(json.dumps(config))
    return str(directory)


def test_an_unknown_architecture_is_refused(tool, capsys, artifacts, tmp_path):
    hf_dir = _hf_copy(artifacts, tmp_path, lambda config: config.update(architectures=["BertModel"], model_type="bert"))
    output = str(tmp_path / "imported")
    _fails_cleanly(tool, capsys, ["from-hf", hf_dir, output], "unknown architecture ['BertModel']", output)
    assert not os.path.exists(output)


def test_weights_of_another_shape_are_refused(tool, capsys, artifacts, tmp_path):
    hf_dir = _hf_copy(artifacts, tmp_path, lambda config: config.update(intermediate_size=128))
    output = str(tmp_path / "imported")
    _fails_cleanly(tool, capsys, ["from-hf", hf_dir, output],
                   "tensor model.layers.0.mlp.down_proj.weight has shape (64, 160), the model config needs (64, 128)",
                   output)
    assert not os.path.exists(output)


def test_a_layout_the_model_cannot_split_is_refused(tool, capsys, artifacts, tmp_path):
    output = str(tmp_path / "imported")
    _fails_cleanly(tool, capsys, ["from-hf", artifacts["hf"]["tp1"], output, "--tensor-parallel", "8"],
                   "model.num_query_groups (4) is not divisible by parallel.tensor_parallel (8)", output)


def test_a_failed_write_leaves_the_old_output_whole(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    (target / "record.json").write_text("{}")  # the tool's own output: replaced on request
    with pytest.raises(RuntimeError):
        with outputs.atomic_output_dir(str(target), overwrite=True, record="record.json") as tmp:
            open(os.path.join(tmp, "half.txt"), "w").close()
            raise RuntimeError("killed half-way")
    assert sorted(os.listdir(tmp_path)) == ["out"] and sorted(os.listdir(target)) == ["old.txt", "record.json"]
    with outputs.atomic_output_dir(str(target), overwrite=True, record="record.json") as tmp:
        (tmp_path / "out" / "old.txt").read_text()  # the old copy stays readable until the rename
        open(os.path.join(tmp, "new.txt"), "w").close()
    assert sorted(os.listdir(tmp_path)) == ["out"] and sorted(os.listdir(target)) == ["new.txt"]


def _tree(path):
    return sorted(os.path.relpath(os.path.join(directory, name), path)
                  for directory, _, files in os.walk(path) for name in files)


def test_overwrite_never_replaces_a_directory_holding_the_input(tool, capsys, artifacts, tmp_path):
    """`to-sentence-transformers RUN/checkpoints RUN --overwrite` would export, then replace the
    whole run directory (checkpoints, config, metrics) with the export."""
    run = tmp_path / "run"
    shutil.copytree(artifacts["embed_checkpoint"], run / "checkpoints")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    before = _tree(run)
    for output in (run, run / "checkpoints"):
        _fails_cleanly(tool, capsys, ["to-sentence-transformers", str(run / "checkpoints"), str(output), "--overwrite"],
                       "--overwrite would delete the input", str(output))
    _fails_cleanly(tool, capsys, ["to-hf", str(run / "checkpoints" / "iter_0000001"), str(run / "checkpoints"),
                                  "--overwrite"], "contains input", str(run / "checkpoints"))
    assert _tree(run) == before
    hf = tmp_path / "hf"
    shutil.copytree(artifacts["hf"]["tp1"], hf)
    _fails_cleanly(tool, capsys, ["from-hf", str(hf), str(hf), "--overwrite"], "is input", str(hf))
    assert (hf / "model.safetensors").is_file()


def test_overwrite_replaces_only_the_tools_own_output(tool, capsys, artifacts, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    _fails_cleanly(tool, capsys, ["to-hf", artifacts["checkpoints"]["tp1"], str(mine), "--overwrite"],
                   "was not written by this tool (it has no conan_export.json)", str(mine))
    _fails_cleanly(tool, capsys, ["from-hf", artifacts["hf"]["tp1"], str(mine), "--overwrite"],
                   "it has no conan_import.json", str(mine))
    assert _tree(mine) == ["thesis.tex"]
    imported = tmp_path / "imported"
    for _ in range(2):  # the second run replaces the first's output: it has the import record
        assert tool.main(["from-hf", artifacts["hf"]["tp1"], str(imported), "--overwrite"]) == 0
    assert (imported / "conan_import.json").is_file() and (imported / "latest").is_file()
