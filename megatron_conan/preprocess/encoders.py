"""The three line encoders (pretraining text, SFT, contrastive) and the record schemas they check.

Worker-side code: imports neither torch nor megatron. The on-disk layouts these produce are
described in megatron_conan/data/README.md.
"""

import math
from typing import Any, Dict, List, Optional, Tuple, Type

import numpy

from megatron_conan.data.jsonl import (
    BadLineError,
    BadLineKind,
    check_encodable,
    require_text,
    require_text_list,
)
from megatron_conan.preprocess.parallel_encode import LineEncoder
from megatron_conan.tasks import BY_NAME, TASK_NAMES, Task, check_instructions, format_query

# -- pretraining ------------------------------------------------------------------------------


class TextDocumentEncoder(LineEncoder):
    """One document per line: the ids of `record[json_key]` followed by EOD, as one sequence."""

    def __init__(self, tokenizer_model: str, dtype: Type[numpy.number],
                 max_line_bytes: Optional[int] = None, json_key: str = "text",
                 append_eod: bool = True, **options):
        super().__init__(tokenizer_model, dtype, max_line_bytes, **options)
        self.json_key = json_key
        self.append_eod = append_eod

    def extract(self, record: dict) -> Tuple[List[str], Any]:
        text = require_text(record, self.json_key)
        check_encodable(text, self.json_key)
        return [text], None

    def assemble(self, token_ids, metadata):
        ids = token_ids[0]
        if self.append_eod:
            ids.append(self.eod_id)
        return [ids], None


# -- SFT --------------------------------------------------------------------------------------

SFT_PROMPT_TEMPLATE = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
"""Prompt of an SFT example with a non-empty `input`."""
SFT_PROMPT_TEMPLATE_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"
"""Prompt of an SFT example whose `input` is absent or empty."""


def format_sft_prompt(instruction: str, input_text: Optional[str] = None) -> str:
    """The prompt text the model conditions on; the loss covers only what follows it."""
    if input_text:
        return SFT_PROMPT_TEMPLATE.format(instruction=instruction, input=input_text)
    return SFT_PROMPT_TEMPLATE_NO_INPUT.format(instruction=instruction)


class SFTExampleEncoder(LineEncoder):
    """`{"instruction", "input"?, "output"}` -> one document of two sequences: the prompt ids, then
    the output ids followed by EOD."""

    def extract(self, record: dict) -> Tuple[List[str], Any]:
        instruction = require_text(record, "instruction")
        input_text = record.get("input")
        if input_text is not None:
            input_text = require_text(record, "input", allow_empty=True)
        output = require_text(record, "output")
        prompt = format_sft_prompt(instruction, input_text)
        check_encodable(prompt, "instruction/input")
        check_encodable(output, "output")
        return [prompt, output], None

    def assemble(self, token_ids, metadata):
        prompt_ids, output_ids = token_ids
        output_ids.append(self.eod_id)
        return [prompt_ids, output_ids], None


# -- contrastive ------------------------------------------------------------------------------

def parse_contrastive_record(record: dict, instructions: Optional[Dict[str, str]] = None
                             ) -> Tuple[List[str], Dict[str, Any]]:
    """Validates one contrastive record. Returns its texts in stored order (anchor, positive,
    negatives, candidates) and its metadata: task, num_negatives, num_candidates, instructed,
    instruction (the text, or None), score, language.

    The instruction is the record's own `instruction`, else `instructions[task]`; when there is
    one, the anchor (sts: both texts) is the one formatted string `format_query(instruction,
    text)`, so its ids are exactly what a sentence-transformers prompt gives at inference."""
    name = record.get("task")
    if name is None:
        raise BadLineError(BadLineKind.MISSING_FIELD, "field 'task' missing")
    if not isinstance(name, str):
        raise BadLineError(BadLineKind.NON_STRING_FIELD, "field 'task' is not a string")
    task = BY_NAME.get(name)
    if task is None:
        raise BadLineError(BadLineKind.INVALID_VALUE, f"unknown task {name!r}; expected one of {TASK_NAMES}")
    texts = [require_text(record, task.anchor), require_text(record, task.positive)]
    negatives = _negatives(record, task)
    candidates = require_text_list(record, task.candidates_field) if task.candidates_field else []
    score = _score(record, task.score_field) if task.score_field else float("nan")
    language = record.get("language")
    if language is not None and not isinstance(language, str):
        raise BadLineError(BadLineKind.NON_STRING_FIELD, "field 'language' is not a string")
    instruction = (require_text(record, "instruction") if record.get("instruction") is not None
                   else (instructions or {}).get(name))
    if instruction is not None:
        texts[0] = format_query(instruction, texts[0])
        if task.symmetric:  # both texts are queries
            texts[1] = format_query(instruction, texts[1])
    texts += negatives + candidates
    for position, text in enumerate(texts):
        check_encodable(text, f"text #{position}")
    if len(negatives) > 65535 or len(candidates) > 65535:
        raise BadLineError(BadLineKind.INVALID_VALUE, "more than 65535 negatives or candidates")
    return texts, {"task": name, "num_negatives": len(negatives),
                   "num_candidates": len(candidates), "instructed": instruction is not None,
                   "instruction": instruction, "score": score, "language": language}


def _negatives(record: dict, task: Task) -> List[str]:
    """The texts of the task's negatives field (none without one)."""
    if task.negatives_field is None:
        return []
    negatives = require_text_list(record, task.negatives_field, required=task.negatives_required)
    if task.negatives_required and not negatives:
        raise BadLineError(BadLineKind.EMPTY_TEXT, f"field {task.negatives_field!r} is empty")
    return negatives


def _score(record: dict, field: str) -> float:
    """The record's finite gold score."""
    value = record.get(field)
    if value is None:
        raise BadLineError(BadLineKind.MISSING_FIELD, f"field {field!r} missing")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadLineError(BadLineKind.NON_STRING_FIELD, f"field {field!r} is a {type(value).__name__}, not a number")
    score = float(value)
    if not math.isfinite(score):  # json reads NaN, Infinity and -Infinity
        raise BadLineError(BadLineKind.INVALID_VALUE, f"field {field!r} is {value!r}, not finite")
    return score


class ContrastiveExampleEncoder(LineEncoder):
    """A contrastive record -> one document whose sequences are its texts (raw ids, no EOD);
    `instructions`: per task, the instruction of records without their own."""

    def __init__(self, tokenizer_model: str, dtype: Type[numpy.number],
                 max_line_bytes: Optional[int] = None,
                 instructions: Optional[Dict[str, str]] = None, **options):
        super().__init__(tokenizer_model, dtype, max_line_bytes, **options)
        self.instructions = check_instructions(instructions)

    def extract(self, record: dict) -> Tuple[List[str], Any]:
        return parse_contrastive_record(record, self.instructions)
