"""Contrastive JSONL -> the tokenized contrastive store (what tools/tokenize_contrastive.py runs).

The store's format (layout, row dtype, meta fields) is `megatron_conan.data.contrastive_format`,
which the reader (`megatron_conan.data.contrastive`) shares; records are checked by the task table
(`megatron_conan.tasks`, through `encoders.parse_contrastive_record`). This module builds on
`jsonl_to_indexed.run_to_indexed` and, like the rest of the preprocessing path, imports neither
torch nor megatron-core.
"""

import dataclasses
from typing import Any, Dict, List

import numpy

from megatron_conan.data.contrastive_format import (
    EXAMPLE_DTYPE,
    EXAMPLES_SUFFIX,
    TASK_CODES,
    prompt_token_count,
    store_meta,
)
from megatron_conan.data.provenance import META_SUFFIX, tokenizer_record
from megatron_conan.data.tokenizer import ConanTokenizer
from megatron_conan.preprocess.jsonl_to_indexed import PreprocessConfig, PreprocessResult, run_to_indexed
from megatron_conan.preprocess.parallel_encode import EncodedBatch
from megatron_conan.tasks import check_instructions


def tokenize_contrastive(config: PreprocessConfig) -> PreprocessResult:
    """Tokenizes contrastive JSONL into the store at `config.output_prefix` (atomically; bad lines
    are counted and located, `strict` stops at the first). `config.instructions` gives per task
    the instruction of records without their own. The store's `.meta.json` is the dataset's
    tokenizer record (`provenance`) with the store's own fields."""
    config = dataclasses.replace(config, format="contrastive",
                                 instructions=check_instructions(config.instructions))
    languages: Dict[str, int] = {}
    inputs = {path: index for index, path in enumerate(config.inputs)}
    chunks: List[numpy.ndarray] = []
    prompt_lengths: Dict[str, int] = {}  # few distinct instructions: each is tokenized once
    tokenizers: List[Any] = []  # loaded on the first instruction

    def prompt_length(instruction) -> int:
        if instruction is None:
            return 0
        if instruction not in prompt_lengths:
            if not tokenizers:
                tokenizers.append(ConanTokenizer(config.tokenizer_model))
            prompt_lengths[instruction] = min(prompt_token_count(tokenizers[0], instruction), 65535)
        return prompt_lengths[instruction]

    def collect(batch: EncodedBatch, first_sequence: int) -> None:
        rows = numpy.zeros(len(batch.records), dtype=EXAMPLE_DTYPE)
        starts = numpy.concatenate([[0], numpy.cumsum(batch.sequences_per_document)[:-1]])
        rows["first_sequence"] = first_sequence + starts
        for row, record, (path, line) in zip(rows, batch.records, batch.line_numbers):
            row["task"] = TASK_CODES[record["task"]]
            row["instructed"] = record["instructed"]
            row["prompt_length"] = prompt_length(record.get("instruction"))
            row["num_negatives"] = record["num_negatives"]
            row["num_candidates"] = record["num_candidates"]
            language = record["language"]
            row["language"] = -1 if language is None else languages.setdefault(language,
                                                                               len(languages))
            row["score"] = record["score"]
            row["input"], row["line"] = inputs[path], line
        chunks.append(rows)

    def write_examples(writer) -> Dict[str, Any]:
        examples = (numpy.concatenate(chunks) if chunks
                    else numpy.zeros(0, dtype=EXAMPLE_DTYPE))
        with open(writer.tmp_path(EXAMPLES_SUFFIX), "wb") as stream:
            numpy.save(stream, examples)
        return store_meta(examples, writer.num_sequences, sorted(languages, key=languages.get),
                          config.instructions, tokenizer_record(config.tokenizer_model)["sha256"])

    return run_to_indexed(config, (EXAMPLES_SUFFIX, META_SUFFIX), collect, write_examples)
