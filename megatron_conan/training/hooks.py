"""The callback interface of the Trainer: what a callback is handed and what it may use of the run.

It sits below both ``training/trainer.py`` (which calls the hooks) and ``training/callbacks.py``
(which implements them), so neither imports the other (docs/DESIGN.md section 13: no import cycle,
type-only imports included).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Protocol

from megatron_conan.training.stage import Stage, StageContext


@dataclass
class StepRecord:
    """What one optimizer step reports to the callbacks (identical on every rank)."""

    step: int
    """Steps done, this one included (1-based)."""
    loss: float
    skipped: bool
    """The loss was not finite: no update was applied."""
    grad_norm: Optional[float]
    """Before clipping; None on a skipped step."""
    record: Dict[str, Any] = field(default_factory=dict)
    """The metrics record of the step (one line of ``metrics.jsonl``; fields in training/README.md)."""


class TrainerView(Protocol):
    """What a callback may use of the :class:`~megatron_conan.training.trainer.Trainer` running it."""

    stage: Stage
    ctx: StageContext
    step_count: int
    """Optimizer steps done (skipped ones included)."""
    last_steps: int
    """The step this run stops after."""
    preempted: bool
    """Set by a callback to stop after the current step (SIGTERM / SIGUSR1)."""

    def save(self) -> None:
        """Checkpoint the run at the current step (collective)."""


class Callback:
    """A hook into :meth:`Trainer.fit`; every method is optional."""

    def on_fit_start(self, trainer: TrainerView) -> None:
        pass

    def on_step_end(self, trainer: TrainerView, step: StepRecord) -> None:
        pass

    def on_fit_end(self, trainer: TrainerView) -> None:
        pass

    def on_error(self, trainer: TrainerView, error: BaseException) -> None:
        """The resume, a step or a hook raised `error` on this rank; called before it propagates (and
        before :meth:`close`). Rank-local: no collectives here, the other ranks may not have failed."""

    def close(self) -> None:
        pass
