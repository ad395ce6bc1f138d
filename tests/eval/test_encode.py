"""conan-encode from a checkpoint (its own process) and from an exported directory."""

import json
import os
import subprocess
import sys

import numpy
import pytest

from megatron_conan.eval import encode
from megatron_conan.testing.fixtures import EMBEDDING_TEXTS

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _write_jsonl(path, texts, field="text"):
    with open(path, "w", encoding="utf-8") as handle:
        for text in texts:
            handle.write(json.dumps({field: text, "id": len(text)}, ensure_ascii=False) + "\n")


@pytest.mark.parametrize("packing", [(), ("--max-tokens-per-row", "12")], ids=["padded", "packed"])
def test_encode_a_checkpoint_from_the_command_line(artifacts, tmp_path, packing):
    """Run dir of an embedding checkpoint -> .npy equal to the library's vectors (same process type
    as a user's: the console script's module, its own world of one), padded or packed."""
    texts = list(EMBEDDING_TEXTS)
    _write_jsonl(tmp_path / "texts.jsonl", texts, field="body")
    output = tmp_path / "vectors.npy"
    result = subprocess.run([sys.executable, "-m", "megatron_conan.eval.encode", artifacts["embed_checkpoint"],
                             "--input", str(tmp_path / "texts.jsonl"), "--text-field", "body", "--output", str(output),
                             "--prompt", "query", "--dim", "16", "--batch-size", "2", *packing],
                            capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "5 x 16 float32" in result.stdout
    vectors = numpy.load(output)
    assert numpy.abs(vectors - artifacts["embeddings"][("query", 16)]).max() < 1e-5
    assert numpy.allclose(numpy.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_encode_an_export_in_length_order_restores_the_input_order(artifacts, tmp_path, capsys):
    texts = [text for text in EMBEDDING_TEXTS if "\n" not in text]  # one text per line
    (tmp_path / "texts.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    output = tmp_path / "vectors.npy"
    assert encode.main([artifacts["sentence_transformer"], "--input", str(tmp_path / "texts.txt"),
                        "--output", str(output), "--batch-size", "2", "--no-progress"]) == 0
    vectors = numpy.load(output)
    expected = artifacts["embeddings"][("none", None)][[EMBEDDING_TEXTS.index(text) for text in texts]]
    cosines = (vectors * expected).sum(axis=1)
    assert vectors.shape == (len(texts), 64) and cosines.min() > 0.99999


@pytest.mark.parametrize("content,message", [
    ('{"text": "fine"}\n{"text": 3}\n', "texts.jsonl:2: non_string_field: field 'text' is a int, not a string"),
    ('{"text": "fine"}\n{"text": "unterminated\n', "texts.jsonl:2: malformed_json"),
    ('{"text": "fine"}\n\n', "texts.jsonl:2: blank_line"),
])
def test_malformed_input_names_file_and_line(artifacts, tmp_path, capsys, content, message):
    (tmp_path / "texts.jsonl").write_text(content)
    output = tmp_path / "vectors.npy"
    assert encode.main([artifacts["sentence_transformer"], "--input", str(tmp_path / "texts.jsonl"),
                        "--output", str(output)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not output.exists()


def test_a_dim_wider_than_the_model_is_refused(artifacts, tmp_path, capsys):
    (tmp_path / "texts.txt").write_text("one\n")
    assert encode.main([artifacts["sentence_transformer"], "--input", str(tmp_path / "texts.txt"),
                        "--output", str(tmp_path / "v.npy"), "--dim", "65"]) == 2
    assert "dim must be in [1, 64]" in capsys.readouterr().err


def test_an_embedder_left_open_tears_its_world_down_quietly(artifacts):
    """A script that never closes its CheckpointEmbedder exits cleanly: its world is torn down
    while the modules it needs are still loaded (interpreter shutdown printed 'Exception ignored
    in: <generator object model_parallel_world>' before)."""
    script = ("import sys\nfrom megatron_conan.eval.embedders import CheckpointEmbedder\n"
              "embedder = CheckpointEmbedder(sys.argv[1])\nprint(embedder.encode(['x']).shape)\n")
    result = subprocess.run([sys.executable, "-c", script, artifacts["embed_checkpoint"]],
                            capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Exception ignored" not in result.stderr, result.stderr[-3000:]
