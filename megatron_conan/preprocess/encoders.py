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
from megatron_conan.errors import ConfigError
from megatron_conan.preprocess.parallel_encode import LineEncoder

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

CONTRASTIVE_TASKS = ("pair", "retrieval", "clr", "classification", "sts")
"""Task names, in the order of their codes in the examples index."""
INSTRUCTION_TEMPLATE = "Instruct: {instruction}\nQuery: "
"""The prompt written in front of an instructed query (docs/DESIGN.md section 5); exported as the
sentence-transformers prompt, so prompt + text is what the model sees at inference."""

# Per task: the two leading text fields, then the list fields (negatives, candidates) if any.
_TASK_FIELDS: Dict[str, Tuple[Tuple[str, str], Tuple[str, ...]]] = {
    "pair": (("query", "positive"), ()),
    "retrieval": (("query", "positive"), ("negatives", "candidates")),
    "clr": (("query", "positive"), ("negatives", "candidates")),
    "classification": (("text", "label"), ("negative_labels",)),
    "sts": (("text1", "text2"), ()),
}


def format_instruction(instruction: str) -> str:
    """The prompt string of `instruction` (what sentence-transformers prepends to the text)."""
    return INSTRUCTION_TEMPLATE.format(instruction=instruction)


def format_query(instruction: str, text: str) -> str:
    """`Instruct: {instruction}\nQuery: {text}`: tokenized as this one string, never as prompt
    and text apart (SentencePiece attaches the space before the text to the next word)."""
    return format_instruction(instruction) + text


def check_instructions(instructions: Optional[Dict[str, str]]) -> Dict[str, str]:
    """Per-task default instructions, validated: known task names, non-empty strings."""
    checked: Dict[str, str] = {}
    for task, instruction in (instructions or {}).items():
        if task not in CONTRASTIVE_TASKS:
            raise ConfigError(f"instructions: unknown task {task!r}; tasks are "
                              f"{', '.join(CONTRASTIVE_TASKS)}")
        if not isinstance(instruction, str) or not instruction.strip():
            raise ConfigError(f"instructions: the instruction of task {task!r} must be a "
                              f"non-empty string")
        checked[task] = instruction
    return checked


def parse_contrastive_record(record: dict, instructions: Optional[Dict[str, str]] = None
                             ) -> Tuple[List[str], Dict[str, Any]]:
    """Validates one contrastive record. Returns its texts in stored order (anchor, positive,
    negatives, candidates) and its metadata: task, num_negatives, num_candidates, instructed,
    instruction (the text, or None), score, language.

    The instruction is the record's own `instruction`, else `instructions[task]`; when there is
    one, the anchor (sts: both texts) is the one formatted string `format_query(instruction,
    text)`, so its ids are exactly what a sentence-transformers prompt gives at inference."""
    task = record.get("task")
    if task is None:
        raise BadLineError(BadLineKind.MISSING_FIELD, "field 'task' missing")
    if not isinstance(task, str):
        raise BadLineError(BadLineKind.NON_STRING_FIELD, "field 'task' is not a string")
    if task not in _TASK_FIELDS:
        raise BadLineError(BadLineKind.INVALID_VALUE,
                           f"unknown task {task!r}; expected one of {CONTRASTIVE_TASKS}")
    (first, second), list_fields = _TASK_FIELDS[task]
    texts = [require_text(record, first), require_text(record, second)]
    negatives: List[str] = []
    candidates: List[str] = []
    if task in ("retrieval", "clr"):
        negatives = require_text_list(record, "negatives")
        candidates = require_text_list(record, "candidates")
    elif task == "classification":
        negatives = require_text_list(record, "negative_labels", required=True)
        if not negatives:
            raise BadLineError(BadLineKind.EMPTY_TEXT, "field 'negative_labels' is empty")
    score = float("nan")
    if task == "sts":
        value = record.get("score")
        if value is None:
            raise BadLineError(BadLineKind.MISSING_FIELD, "field 'score' missing")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise BadLineError(BadLineKind.NON_STRING_FIELD,
                               f"field 'score' is a {type(value).__name__}, not a number")
        score = float(value)
        if not math.isfinite(score):  # json reads NaN, Infinity and -Infinity
            raise BadLineError(BadLineKind.INVALID_VALUE, f"field 'score' is {value!r}, not finite")
    language = record.get("language")
    if language is not None and not isinstance(language, str):
        raise BadLineError(BadLineKind.NON_STRING_FIELD, "field 'language' is not a string")
    instruction = (require_text(record, "instruction") if record.get("instruction") is not None
                   else (instructions or {}).get(task))
    if instruction is not None:
        texts[0] = format_query(instruction, texts[0])
        if task == "sts":  # symmetric: both texts are queries
            texts[1] = format_query(instruction, texts[1])
    texts += negatives + candidates
    for position, text in enumerate(texts):
        check_encodable(text, f"text #{position}")
    if len(negatives) > 65535 or len(candidates) > 65535:
        raise BadLineError(BadLineKind.INVALID_VALUE, "more than 65535 negatives or candidates")
    return texts, {"task": task, "num_negatives": len(negatives),
                   "num_candidates": len(candidates), "instructed": instruction is not None,
                   "instruction": instruction, "score": score, "language": language}


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
