"""Soft-mask schedule: a(t) and the per-row weights m_i of docs/DESIGN.md section 4.

For training step t of T steps the progress a(t) is

    linear        t / T
    quadratic     (t / T)^2
    decelerating  1 - (1 - t / T)^2

and row i (0-based) of a sequence of true length L gets the weight m_i of its future keys:

    len_over_pos  min(1, a * L / (i + 1))   (default: every row is fully open at a = 1)
    pos_over_len  min(1, a * (i + 1) / L)
    none          a

Padded rows (i >= L) get m_i = 0. The kernels only ever see m (float32 [b, s]) and the lengths, so
any other schedule can be fed to them directly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch

SCHEDULES = ("linear", "quadratic", "decelerating")
POSITION_SCALES = ("len_over_pos", "pos_over_len", "none")
BACKENDS = ("auto", "cuda", "triton", "sdpa", "reference")


@dataclass
class SoftMaskConfig:
    """How attention moves from causal to bidirectional during the weakly-supervised stage."""

    schedule: str = "linear"
    """Progress a(t): one of `linear`, `quadratic`, `decelerating`."""

    position_scale: str = "len_over_pos"
    """How m_i depends on the row: `len_over_pos` (default), `pos_over_len` or `none`."""

    total_steps: Optional[int] = None
    """T: a(t) goes from 0 at step t = 0 to 1 at step t = T (and stays 1). None: the embed-weak stage
    fills in its steps minus one, so that its first step is causal and its last bidirectional."""

    fixed_a: Optional[float] = None
    """If set, a is this constant whatever the step: 0.0 is causal, 1.0 bidirectional (stage 4)."""

    backend: str = "auto"
    """Kernel: `auto` (on GPUs Triton, then the CUDA extension where it is built for the GPU; torch
    SDPA on CPU; see `function.choose_backend`), `cuda`, `triton`, `sdpa` or `reference`."""

    deterministic: bool = False
    """Deterministic backward (no atomic accumulation of dq; the CUDA kernel always is)."""

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"SoftMaskConfig.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.position_scale not in POSITION_SCALES:
            raise ValueError(f"SoftMaskConfig.position_scale must be one of {POSITION_SCALES}, "
                             f"got {self.position_scale!r}")
        if self.total_steps is not None and (not isinstance(self.total_steps, int)
                                             or isinstance(self.total_steps, bool) or self.total_steps < 1):
            raise ValueError(f"SoftMaskConfig.total_steps must be None or an int >= 1, got {self.total_steps!r}")
        if self.fixed_a is not None and not 0.0 <= float(self.fixed_a) <= 1.0:
            raise ValueError(f"SoftMaskConfig.fixed_a must be None or in [0, 1], got {self.fixed_a!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"SoftMaskConfig.backend must be one of {BACKENDS}, got {self.backend!r}")
        if not isinstance(self.deterministic, bool):
            raise ValueError(f"SoftMaskConfig.deterministic must be a bool, got {self.deterministic!r}")

    @classmethod
    def causal(cls, **kwargs) -> "SoftMaskConfig":
        """Plain causal attention (stages 1 and 2)."""
        return cls(fixed_a=0.0, **kwargs)

    @classmethod
    def bidirectional(cls, **kwargs) -> "SoftMaskConfig":
        """Plain bidirectional attention (stage 4)."""
        return cls(fixed_a=1.0, **kwargs)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def schedule_progress(schedule: str, step: int, total_steps: int) -> float:
    """a(t) in [0, 1] for step t of T (clamped to [0, T])."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    x = min(max(float(step), 0.0), float(total_steps)) / float(total_steps)
    if schedule == "linear":
        return x
    if schedule == "quadratic":
        return x * x
    return 1.0 - (1.0 - x) * (1.0 - x)


def row_mask_weights(a: float, lengths: torch.Tensor, seq_len: int,
                     position_scale: str = "len_over_pos") -> torch.Tensor:
    """m_i per row: float32 [b, seq_len], 0 on padded rows (i >= length).

    Computed in float64 and rounded once, so that a = 1 with `len_over_pos` gives exactly 1.0 and
    a = 0 exactly 0.0 on every valid row.
    """
    lengths64 = lengths.to(torch.float64).reshape(-1, 1)  # [b, 1]
    pos = torch.arange(1, seq_len + 1, dtype=torch.float64, device=lengths.device).reshape(1, -1)
    return _weights(a, pos.expand(lengths64.shape[0], -1), lengths64.expand(-1, seq_len), position_scale)


def windowed_row_mask_weights(a: float, lo: torch.Tensor, hi: torch.Tensor,
                              position_scale: str = "len_over_pos") -> torch.Tensor:
    """m_i of packed rows, float32 [b, s]: each text's rows weighted by their position in that text
    and its length (key windows [lo_i, hi_i), see reference.py), exactly as the text alone."""
    pos = torch.arange(1, lo.shape[-1] + 1, dtype=torch.float64, device=lo.device) - lo.to(torch.float64)
    return _weights(a, pos, (hi - lo).to(torch.float64), position_scale)


def _weights(a: float, pos: torch.Tensor, length: torch.Tensor, position_scale: str) -> torch.Tensor:
    """m from 1-based positions in the text and text lengths (float64, [b, s] each); 0 outside."""
    if position_scale not in POSITION_SCALES:
        raise ValueError(f"position_scale must be one of {POSITION_SCALES}, got {position_scale!r}")
    if not 0.0 <= a <= 1.0:
        raise ValueError(f"a must be in [0, 1], got {a}")
    if position_scale == "len_over_pos":
        m = torch.clamp(a * length / pos, max=1.0)
    elif position_scale == "pos_over_len":
        m = torch.clamp(a * pos / length.clamp(min=1.0), max=1.0)
    else:
        m = torch.full_like(pos, float(a))
    valid = (pos >= 1) & (pos <= length)  # row i is valid when it lies in its text
    return torch.where(valid, m, torch.zeros_like(m)).to(torch.float32)  # [b, s]


class SoftMaskSchedule:
    """The progress of one run: config plus the current step, saved in checkpoints."""

    def __init__(self, config: Optional[SoftMaskConfig] = None, step: int = 0):
        self.config = config if config is not None else SoftMaskConfig()
        self.step = int(step)

    @property
    def a(self) -> float:
        if self.config.fixed_a is not None:
            return float(self.config.fixed_a)
        if self.config.total_steps is None:
            raise ValueError("SoftMaskConfig.total_steps is unset: give it, or fixed_a")
        return schedule_progress(self.config.schedule, self.step, self.config.total_steps)

    def set_step(self, step: int) -> None:
        self.step = int(step)

    def row_weights(self, lengths: torch.Tensor, seq_len: int, windows=None) -> torch.Tensor:
        """m [b, s] for right-padded rows, or for packed rows when their key `windows` are given."""
        if windows is not None:
            return windowed_row_mask_weights(self.a, windows[0], windows[1], self.config.position_scale)
        return row_mask_weights(self.a, lengths, seq_len, self.config.position_scale)

    def state_dict(self) -> Dict[str, Any]:
        return {"step": self.step, "config": self.config.to_dict()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restores the step; the schedule itself must match the run's (a resumed run may change
        only `backend` and `deterministic`)."""
        saved = dict(state.get("config", {}))
        for name in ("schedule", "position_scale", "total_steps", "fixed_a"):
            if name in saved and saved[name] != getattr(self.config, name):
                raise ValueError(f"soft-mask checkpoint has {name}={saved[name]!r} but this run has "
                                 f"{name}={getattr(self.config, name)!r}")
        self.step = int(state["step"])
