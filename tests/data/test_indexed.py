"""Our numpy .bin/.idx writer is byte for byte megatron-core's builder, without importing it."""

import subprocess
import sys

import numpy
import pytest

from megatron_conan.cli import preprocess as preprocess_command
from megatron_conan.data.indexed import IndexedDatasetWriter, read_index, token_dtype_for_vocab
from tests.data.adversarial import (  # noqa: F401  (fixtures)
    ADVERSARIAL,
    docs_texts,
    docs_tokenizer_model,
)

DOCUMENTS = [[[5, 6, 7]], [[1], [2, 3]], [[65000, 0, 4, 4]], [[9] * 300, [8], [7, 7]], [[3]]]


def _megatron_builder(prefix, dtype, documents):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for sequences in documents:
        flat = [token for sequence in sequences for token in sequence]
        builder.add_document(numpy.array(flat, dtype=numpy.int64),
                             [len(sequence) for sequence in sequences])
    builder.finalize(prefix + ".idx")


@pytest.mark.parametrize("dtype", [numpy.uint16, numpy.int32])
def test_bytes_equal_megatron_core_builder(tmp_path, dtype):
    ours, theirs = str(tmp_path / "ours"), str(tmp_path / "theirs")
    with IndexedDatasetWriter(ours, dtype) as writer:
        writer.add_document(DOCUMENTS[0])
        # the rest as one batch, as the workers send them
        sequences = [sequence for document in DOCUMENTS[1:] for sequence in document]
        writer.add_batch(numpy.array([t for s in sequences for t in s]),
                         numpy.array([len(s) for s in sequences]),
                         numpy.array([len(document) for document in DOCUMENTS[1:]]))
        writer.commit()
    _megatron_builder(theirs, dtype, DOCUMENTS)
    for suffix in (".bin", ".idx"):
        assert open(ours + suffix, "rb").read() == open(theirs + suffix, "rb").read(), suffix
    index = read_index(ours)
    assert index.dtype == dtype and index.document_indices.tolist() == [0, 1, 3, 4, 7, 8]
    assert index.sequence_lengths.tolist() == [3, 1, 2, 4, 300, 1, 2, 1]


@pytest.mark.parametrize("model", ["tokenizer_model", "docs_tokenizer_model"])
def test_tool_output_equals_megatron_core_builder_on_real_text(request, model, tmp_path):
    """The whole tool, on Python's documentation (with its indentation) and adversarial lines,
    against the builder fed plain SentencePiece ids."""
    tokenizer_model = request.getfixturevalue(model)
    import json

    import sentencepiece
    from pydoc_data.topics import topics

    texts = [topics[key] for key in sorted(topics)][:40] + [t for t in ADVERSARIAL if t.strip()]
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts),
                      encoding="utf-8")
    processor = sentencepiece.SentencePieceProcessor(model_file=tokenizer_model)
    documents = [[processor.encode(text, out_type=int) + [processor.eos_id()]] for text in texts]
    for dtype in ("uint16", "int32"):
        assert preprocess_command.main([
            "--input", str(source), "--output-prefix", str(tmp_path / dtype), "--tokenizer-model",
            tokenizer_model, "--dtype", dtype, "--workers", "2", "--batch-lines", "7",
            "--no-progress"]) == 0
        _megatron_builder(str(tmp_path / f"ref_{dtype}"), getattr(numpy, dtype), documents)
        for suffix in (".bin", ".idx"):
            assert (open(f"{tmp_path / dtype}{suffix}", "rb").read()
                    == open(f"{tmp_path / ('ref_' + dtype)}{suffix}", "rb").read()), suffix


def test_dtype_rule_is_megatron_cores():
    from megatron.core.datasets.indexed_dataset import DType

    for vocab in (1000, 65499, 65500, 150_000):
        assert token_dtype_for_vocab(vocab) == DType.optimal_dtype(vocab)


def test_read_index_refuses_other_files(tmp_path):
    from megatron_conan.errors import DataError

    (tmp_path / "x.idx").write_bytes(b"not an index at all, really")
    with pytest.raises(DataError, match="x.idx: not a megatron-core index"):
        read_index(str(tmp_path / "x"))


def test_preprocessing_path_imports_neither_torch_nor_megatron():
    """What the tool and its workers import (the workers unpickle an encoder from these modules)."""
    code = ("import sys\n"
            "import megatron_conan.preprocess.jsonl_to_indexed, megatron_conan.preprocess.encoders\n"
            "import megatron_conan.data.provenance, megatron_conan.data.indexed\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'megatron'))\n"
            "print(heavy)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]", out
