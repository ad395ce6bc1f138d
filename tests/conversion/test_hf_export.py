"""Megatron checkpoints (TP1, TP2, TP2xPP2) -> Hugging Face LlamaForCausalLM, and back."""

import json
import os
import subprocess
import sys

import pytest
import torch

from megatron_conan.conversion import hf_io
from megatron_conan.testing.fixtures import REFERENCE_BATCH

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = [sys.executable, "-m", "megatron_conan.cli.convert"]


@pytest.mark.parametrize("layout", ["tp1", "tp2", "tp2pp2"])
def test_hf_logits_equal_ours(artifacts, layout):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(artifacts["hf"][layout], local_files_only=True).eval()
    with torch.no_grad():
        logits = model(input_ids=REFERENCE_BATCH).logits  # [2, 8, vocab]
    assert logits.dtype == torch.float32
    assert (logits - artifacts["logits"]).abs().max().item() < 1e-5


def test_every_layout_exports_the_same_bits(artifacts):
    exports = {name: hf_io.read_safetensors(path) for name, path in artifacts["hf"].items()}
    reference = exports.pop("tp1")
    assert len(reference) == 2 + 9 * 4  # embeddings, final norm, 9 tensors per layer; lm_head tied
    for state in exports.values():
        assert state.keys() == reference.keys()
        assert all(torch.equal(state[key], reference[key]) for key in reference)


def test_config_says_what_the_model_is(artifacts):
    with open(os.path.join(artifacts["hf"]["tp1"], "config.json")) as handle:
        config = json.load(handle)
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["head_dim"], config["num_attention_heads"], config["num_key_value_heads"]) == (8, 8, 4)
    assert config["tie_word_embeddings"] is True and config["attention_bias"] is False and config["mlp_bias"] is False
    assert config["rope_theta"] == 1e6 and config["rope_parameters"] == {"rope_type": "default", "rope_theta": 1e6}
    assert "is_causal" not in config  # a causal checkpoint: the default
    with open(os.path.join(artifacts["hf"]["tp1"], "tokenizer_config.json")) as handle:
        assert json.load(handle)["tokenizer_class"] == "PreTrainedTokenizerFast"


def test_megatron_hf_megatron_is_bit_exact(artifacts):
    original, back = artifacts["full_state_dict"], artifacts["reimported_state_dict"]
    assert back.keys() == original.keys()
    assert all(torch.equal(back[key], original[key]) for key in original)


def test_an_imported_checkpoint_has_the_training_layout(artifacts):
    from megatron_conan.checkpoint.layout import read_latest

    imported = artifacts["imported_tp1"]
    latest = read_latest(imported)
    assert os.path.basename(latest) == "iter_0000000"
    common = torch.load(os.path.join(latest, "common.pt"), weights_only=False)
    assert common["model_config"]["num_query_groups"] == 4 and common["step"] == 0
    assert common["extra"]["tokenizer"] == os.path.join(imported, "tokenizer.model")
    assert os.path.isfile(common["extra"]["tokenizer"])


def _tool(*args, **kwargs):
    return subprocess.run([*TOOL, *args], capture_output=True, text=True, timeout=600, **kwargs)


@pytest.mark.slow
def test_import_at_tp2xpp2_then_train_and_export_again(artifacts, tmp_path):
    """HF -> Megatron at TP2xPP2 (4 spawned ranks) -> a pretraining run starts from it (load_dir)
    -> its weights export to the same bits."""
    imported = tmp_path / "imported"
    result = _tool("from-hf", artifacts["hf"]["tp1"], str(imported), "--tensor-parallel", "2",
                   "--pipeline-parallel", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    with open(os.path.join(imported, "iter_0000000", "layout.json")) as handle:
        assert json.load(handle)["tensor_parallel"] == 2
    run = subprocess.run(
        [sys.executable, "-m", "megatron_conan.training.pretrain", "--config", os.path.join(REPO, "examples/tiny/pretrain.yaml"),
         f"run_dir={tmp_path / 'run'}", "train.train_steps=1", "train.eval_interval=0", f"checkpoint.load_dir={imported}"],
        capture_output=True, text=True, timeout=600, cwd=REPO)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "initialised weights from" in run.stderr
    again = tmp_path / "again"
    result = _tool("to-hf", str(imported), str(again))
    assert result.returncode == 0, result.stderr[-3000:]
    first, second = hf_io.read_safetensors(artifacts["hf"]["tp1"]), hf_io.read_safetensors(str(again))
    assert second.keys() == first.keys() and all(torch.equal(first[key], second[key]) for key in first)
