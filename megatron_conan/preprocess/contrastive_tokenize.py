"""Contrastive JSONL -> the tokenized contrastive store (what tools/tokenize_contrastive.py runs).

The store's layout is described in `megatron_conan.data.contrastive` (which reads it) and in
data/README.md; its format constants live here, with the writer, so that reading imports writing
and not the other way round: this module builds on `jsonl_to_indexed.run_to_indexed` and, like the
rest of the preprocessing path, imports neither torch nor megatron-core.
"""

import dataclasses
from collections import Counter
from typing import Any, Dict, List

import numpy

from megatron_conan.data.provenance import META_SUFFIX, tokenizer_record
from megatron_conan.data.tokenizer import ConanTokenizer
from megatron_conan.preprocess.encoders import (
    CONTRASTIVE_TASKS,
    INSTRUCTION_TEMPLATE,
    check_instructions,
    format_instruction,
)
from megatron_conan.preprocess.jsonl_to_indexed import PreprocessConfig, PreprocessResult, run_to_indexed
from megatron_conan.preprocess.parallel_encode import EncodedBatch

STORE_FORMAT = "megatron_conan.contrastive"
STORE_VERSION = 3
"""Version 3: rows record their prompt's token count (`prompt_length`), so pooling can leave the
instruction out. Version 2 (still read): instructed queries tokenized as one string with their
instruction (version 1 stored the instruction apart and concatenated ids, which differ); rows
locate their input line."""
READABLE_STORE_VERSIONS = (2, 3)
EXAMPLES_SUFFIX = ".examples.npy"
TASK_CODES = {task: code for code, task in enumerate(CONTRASTIVE_TASKS)}
EXAMPLE_DTYPE = numpy.dtype([
    ("first_sequence", "<i8"),   # index of the example's anchor sequence in the indexed dataset
    ("task", "u1"),              # code into CONTRASTIVE_TASKS
    ("instructed", "u1"),        # 1 when the anchor (sts: both texts) has its instruction
    ("num_negatives", "<u2"),    # negatives (classification: negative labels)
    ("num_candidates", "<u2"),   # ranked DHNM candidate pool beyond the negatives
    ("language", "<i2"),         # code into meta["languages"], -1 when absent
    ("score", "<f4"),            # STS gold score, NaN for other tasks
    ("input", "<u4"),            # index into meta["inputs"] of the example's input file
    ("line", "<u8"),             # 1-based line of the example in that file
    ("prompt_length", "<u2"),    # tokens of the instruction prompt alone (0: not instructed)
])


def prompt_token_count(tokenizer, instruction: str) -> int:
    """Tokens of the prompt `format_instruction(instruction)` tokenized alone: the leading tokens
    of an instructed anchor that pooling may leave out. This is how sentence-transformers counts a
    prompt (`include_prompt=False`), so training and the export exclude the same tokens."""
    return len(tokenizer.encode(format_instruction(instruction)))


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
        counts = Counter(int(code) for code in examples["task"])
        return {
            "format": STORE_FORMAT, "version": STORE_VERSION,
            "tasks": list(CONTRASTIVE_TASKS),
            "languages": sorted(languages, key=languages.get),
            "num_examples": int(len(examples)), "num_sequences": writer.num_sequences,
            "examples_per_task": {task: counts.get(code, 0) for task, code in TASK_CODES.items()},
            "instruction_template": INSTRUCTION_TEMPLATE,
            "instructions": dict(config.instructions),
            # what ContrastiveLoader checks; the record's "tokenizer" holds it too
            "tokenizer_sha256": tokenizer_record(config.tokenizer_model)["sha256"],
        }

    return run_to_indexed(config, (EXAMPLES_SUFFIX, META_SUFFIX), collect, write_examples)
