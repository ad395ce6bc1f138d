"""The stages by id: the one place that maps ``pretrain``, ``sft``, ``embed-weak`` and ``embed-sup`` to
their plug-ins (entry points, the dry run, the quickstart and the checkpoints' ``stage_name`` all use
these ids)."""

from __future__ import annotations

from functools import partial
from typing import Callable, Dict

from megatron_conan.training.embedding_stage import SupervisedStage, WeaklySupervisedStage
from megatron_conan.training.lm_stage import LanguageModelStage
from megatron_conan.training.stage import Stage

STAGES: Dict[str, Callable[[], Stage]] = {
    "pretrain": partial(LanguageModelStage, "pretrain"),
    "sft": partial(LanguageModelStage, "sft"),
    "embed-weak": WeaklySupervisedStage,
    "embed-sup": SupervisedStage,
}


def build_stage(stage_id: str) -> Stage:
    """A new plug-in of the stage `stage_id`."""
    if stage_id not in STAGES:
        raise ValueError(f"unknown stage {stage_id!r}; known: {', '.join(STAGES)}")
    return STAGES[stage_id]()
