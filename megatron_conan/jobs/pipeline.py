"""The main job's pipeline over one work directory: its steps in order (``make quickstart`` runs them
all; the studies in benchmarks/ re-run some of them over a finished job's data)."""

from __future__ import annotations

from megatron_conan.jobs.data_steps import DataSteps
from megatron_conan.jobs.evaluation_steps import EvaluationSteps
from megatron_conan.jobs.training_steps import TrainingSteps

STEPS = ("corpus", "tokenizer", "preprocess", "pretrain", "sft", "embed_weak", "mine", "embed_sup", "export",
         "evaluate", "report")
"""The steps in the order they run, as method names of `Pipeline` (each returns its one-line summary)."""


class Pipeline(DataSteps, TrainingSteps, EvaluationSteps):
    """Every step of the main job over one work directory (`Workspace` holds what they share):
    data building (`DataSteps`), the four training stages (`TrainingSteps`), export, evaluation and
    the report (`EvaluationSteps`)."""
