"""The contrastive tasks: one table that every consumer reads (docs/DESIGN.md sections 5 and 7).

Each task declares

- its **record** in contrastive JSONL: the two leading text fields, the list fields, a score
  (``preprocess/encoders.py`` checks records by it; ``datagen/mining.py`` reads the query and the
  positive by it);
- its **store layout**: an example's sequences are the anchor, the positive, then the texts of its
  negatives field and of its candidates field, and a symmetric task's positive is instructed and
  cut like a query (``data/contrastive_store.py`` writes and reads codes by the table's order;
  ``data/contrastive.py`` builds batches by it);
- how a batch fills its **hard-negative slots** (``NEGATIVES_*``);
- its **loss** (a :class:`LossSpec`; ``training/embedding_loss.py`` builds it with the config's
  hyper-parameters);
- the stage that trains it and its share of the paper's stage-4 mix.

Adding a task is one entry in :data:`TASKS` (appended: a task's position is its code in every
store written since, and seeds its permutation in the loader) plus its loss. This module imports
nothing of the project but its errors: the preprocessing path reads it without torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Tuple

from megatron_conan.errors import ConfigError

NEGATIVES_NONE = "none"
"""No hard negatives: the batch's other positives are the only negatives."""
NEGATIVES_MINED = "mined"
"""`num_negatives` slots filled from the example's ranked pool (its negatives, then candidates),
chosen by DHNM in stage 4; missing ones are masked padding slots."""
NEGATIVES_LABELS = "labels"
"""Every negative label of the example (the batch's widest count of slots, the rest masked)."""


@dataclass(frozen=True)
class LossSpec:
    """Which loss a task trains with; the hyper-parameters come from the config's embedding section."""

    name: str
    """``infonce`` or ``cosent`` (the keys of ``training/embedding_loss.py``'s builders)."""
    in_batch_negatives: bool = True
    """InfoNCE: every gathered positive (and hard negative) of the global batch is a candidate, and
    each distinct text counts once (content keys, ``embedding.mask_duplicate_positives``); False:
    a query against its own positive and own negatives only, nothing gathered."""
    symmetric: bool = False
    """InfoNCE: ``embedding.symmetric`` adds the passage -> query direction."""


@dataclass(frozen=True)
class Task:
    """One contrastive task (module docstring)."""

    name: str
    stage: int
    """The stage that trains it (3: weakly supervised pairs, 4: supervised multi-task)."""
    anchor: str
    """Record field of the anchor text (the query); stored first, instructed."""
    positive: str
    """Record field of the positive text; stored second."""
    loss: LossSpec
    negatives: str = NEGATIVES_NONE
    """How a batch fills the hard-negative slots (``NEGATIVES_*``)."""
    negatives_field: Optional[str] = None
    """Record field of a list of negative texts, stored after the positive."""
    negatives_required: bool = False
    """The negatives field must be present and non-empty."""
    candidates_field: Optional[str] = None
    """Record field of a ranked list of further pool texts (DHNM's candidates), stored last."""
    score_field: Optional[str] = None
    """Record field of a finite gold score, stored in the example row."""
    symmetric: bool = False
    """Both texts are queries: an instruction applies to both, and the positive is cut to the query length."""
    paper_weight: float = 0.0
    """Share of the paper's stage-4 mix, in millions of examples (the default task weights)."""
    mined_as: Optional[str] = None
    """The task a record of this task becomes once ``conan-mine`` adds hard negatives (None: not minable)."""


INFONCE = LossSpec("infonce")

TASKS: Tuple[Task, ...] = (
    Task("pair", stage=3, anchor="query", positive="positive", loss=LossSpec("infonce", symmetric=True),
         mined_as="retrieval"),
    Task("retrieval", stage=4, anchor="query", positive="positive", loss=INFONCE, negatives=NEGATIVES_MINED,
         negatives_field="negatives", candidates_field="candidates", paper_weight=3.0, mined_as="retrieval"),
    Task("clr", stage=4, anchor="query", positive="positive", loss=INFONCE, negatives=NEGATIVES_MINED,
         negatives_field="negatives", candidates_field="candidates", paper_weight=3.0, mined_as="clr"),
    Task("classification", stage=4, anchor="text", positive="label",
         loss=LossSpec("infonce", in_batch_negatives=False), negatives=NEGATIVES_LABELS,
         negatives_field="negative_labels", negatives_required=True, paper_weight=2.8),
    Task("sts", stage=4, anchor="text1", positive="text2", loss=LossSpec("cosent"), score_field="score",
         symmetric=True, paper_weight=1.8),
)
"""Every task, in the order of their codes (``TASK_NAMES.index``)."""

BY_NAME: Dict[str, Task] = {task.name: task for task in TASKS}
TASK_NAMES: Tuple[str, ...] = tuple(BY_NAME)


def task(name: str) -> Task:
    """The task called `name`; a ConfigError naming the known tasks otherwise."""
    found = BY_NAME.get(name)
    if found is None:
        raise ConfigError(f"unknown task {name!r}; tasks are {', '.join(TASK_NAMES)}")
    return found


def stage_tasks(stage: int) -> Tuple[str, ...]:
    """The names of the tasks `stage` trains, in table order."""
    return tuple(entry.name for entry in TASKS if entry.stage == stage)


def paper_task_weights(stage: int = 4) -> Dict[str, float]:
    """The paper's mix of `stage`'s tasks (docs/DESIGN.md section 5): the default task weights."""
    return {entry.name: entry.paper_weight for entry in TASKS if entry.stage == stage}


# -- instructions: the prompt in front of an instructed anchor -----------------------------------

INSTRUCTION_TEMPLATE = "Instruct: {instruction}\nQuery: "
"""The prompt written in front of an instructed query (docs/DESIGN.md section 5); exported as the
sentence-transformers prompt, so prompt + text is what the model sees at inference."""


def format_instruction(instruction: str) -> str:
    """The prompt string of `instruction` (what sentence-transformers prepends to the text)."""
    return INSTRUCTION_TEMPLATE.format(instruction=instruction)


def format_query(instruction: str, text: str) -> str:
    """`Instruct: {instruction}\nQuery: {text}`: tokenized as this one string, never as prompt
    and text apart (SentencePiece attaches the space before the text to the next word)."""
    return format_instruction(instruction) + text


def check_instructions(instructions: Optional[Mapping[str, str]]) -> Dict[str, str]:
    """Per-task default instructions, validated: known task names, non-empty strings."""
    checked: Dict[str, str] = {}
    for name, instruction in (instructions or {}).items():
        if name not in BY_NAME:
            raise ConfigError(f"instructions: unknown task {name!r}; tasks are {', '.join(TASK_NAMES)}")
        if not isinstance(instruction, str) or not instruction.strip():
            raise ConfigError(f"instructions: the instruction of task {name!r} must be a non-empty string")
        checked[name] = instruction
    return checked
