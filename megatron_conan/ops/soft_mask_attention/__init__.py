"""Soft-mask attention (docs/DESIGN.md section 4): causal -> bidirectional with a per-row weight m_i.

See README.md beside this file for the contract and the maths. Importing this package does not import
triton (TRITON_INTERPRET must be set before triton's first import) nor megatron-core.
"""

from .function import resolve_backend, soft_mask_attention
from .reference import soft_mask_attention_identity, soft_mask_attention_reference
from .schedule import SoftMaskConfig, SoftMaskSchedule, row_mask_weights, schedule_progress

__all__ = [
    "SoftMaskConfig", "SoftMaskSchedule", "row_mask_weights", "schedule_progress",
    "soft_mask_attention", "soft_mask_attention_identity", "soft_mask_attention_reference",
    "resolve_backend",
]
