"""The contrastive store's format: what its writer (``preprocess/contrastive_tokenize.py``) and its
reader (``data/contrastive.py``) share. Imports neither torch nor megatron-core (the preprocessing
path starts without them).

Store `<prefix>` (written by ``conan-tokenize-contrastive``), version 3 (version 2, without prompt
lengths, is still read); data/README.md has the full description:

    <prefix>.bin/.idx       megatron-core indexed dataset; one document per example whose sequences
                            are its texts, in order: anchor, positive, negatives..., candidates...
                            (which record fields these are is the task's, ``megatron_conan/tasks.py``).
                            An instructed anchor (a symmetric task's positive too) is stored as the ids
                            of the one string `Instruct: {instruction}\nQuery: {text}`. Raw ids, no EOD.
    <prefix>.examples.npy   one `EXAMPLE_DTYPE` row per example (task code, first sequence, counts,
                            language code, score, instructed flag, input file and line, prompt
                            token count), mmap-able.
    <prefix>.meta.json      task names, language table, counts, tokenize-time instructions,
                            tokenizer identity, inputs.

The .idx is renamed into place last: a store is complete when all four files exist.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping

import numpy

from megatron_conan.data.provenance import META_SUFFIX
from megatron_conan.errors import DataError
from megatron_conan.tasks import INSTRUCTION_TEMPLATE, TASK_NAMES, format_instruction

STORE_FORMAT = "megatron_conan.contrastive"
STORE_VERSION = 3
"""Version 3: rows record their prompt's token count (`prompt_length`), so pooling can leave the
instruction out. Version 2 (still read): instructed queries tokenized as one string with their
instruction (version 1 stored the instruction apart and concatenated ids, which differ); rows
locate their input line."""
READABLE_STORE_VERSIONS = (2, 3)
EXAMPLES_SUFFIX = ".examples.npy"
STORE_SUFFIXES = (".bin", ".idx", EXAMPLES_SUFFIX, META_SUFFIX)
"""The files of a complete store."""
TASK_CODES = {name: code for code, name in enumerate(TASK_NAMES)}
"""Task -> its code in the rows of stores written now (a store's own `tasks` list names its codes)."""
EXAMPLE_DTYPE = numpy.dtype([
    ("first_sequence", "<i8"),   # index of the example's anchor sequence in the indexed dataset
    ("task", "u1"),              # code into meta["tasks"]
    ("instructed", "u1"),        # 1 when the anchor (a symmetric task: both texts) has its instruction
    ("num_negatives", "<u2"),    # texts of the task's negatives field (classification: negative labels)
    ("num_candidates", "<u2"),   # ranked DHNM candidate pool beyond the negatives
    ("language", "<i2"),         # code into meta["languages"], -1 when absent
    ("score", "<f4"),            # the task's gold score (sts), NaN for the others
    ("input", "<u4"),            # index into meta["inputs"] of the example's input file
    ("line", "<u8"),             # 1-based line of the example in that file
    ("prompt_length", "<u2"),    # tokens of the instruction prompt alone (0: not instructed)
])


def prompt_token_count(tokenizer, instruction: str) -> int:
    """Tokens of the prompt `format_instruction(instruction)` tokenized alone: the leading tokens
    of an instructed anchor that pooling may leave out. This is how sentence-transformers counts a
    prompt (`include_prompt=False`), so training and the export exclude the same tokens."""
    return len(tokenizer.encode(format_instruction(instruction)))


def store_meta(examples: numpy.ndarray, num_sequences: int, languages: List[str],
               instructions: Mapping[str, str], tokenizer_sha256: str) -> Dict[str, Any]:
    """The store's own `.meta.json` fields (the writer adds them to the tokenizer record)."""
    counts = numpy.bincount(examples["task"].astype(numpy.int64), minlength=len(TASK_NAMES))
    return {
        "format": STORE_FORMAT, "version": STORE_VERSION,
        "tasks": list(TASK_NAMES),
        "languages": list(languages),
        "num_examples": int(len(examples)), "num_sequences": int(num_sequences),
        "examples_per_task": {name: int(counts[code]) for name, code in TASK_CODES.items()},
        "instruction_template": INSTRUCTION_TEMPLATE,
        "instructions": dict(instructions),
        # what ContrastiveLoader checks; the record's "tokenizer" holds it too
        "tokenizer_sha256": tokenizer_sha256,
    }


def check_store_meta(path_prefix: str, meta: Mapping[str, Any]) -> None:
    """Refuses a `.meta.json` of another format or of a version this code does not read."""
    if meta.get("format") != STORE_FORMAT:
        raise DataError(f"{path_prefix}{META_SUFFIX}: not a contrastive store")
    if meta.get("version") not in READABLE_STORE_VERSIONS:
        raise DataError(f"{path_prefix}: a version-{meta.get('version')} contrastive "
                        f"store; this code reads versions {list(READABLE_STORE_VERSIONS)} "
                        f"(instructed queries tokenized as one string): re-tokenize it with "
                        f"tools/tokenize_contrastive.py")
