"""What a checkpoint says about itself, typed: its ``common.pt`` (step, model shape, extra state) and
``layout.json`` (the parallel layout that wrote it), and the shape check on load."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, Optional

import torch.distributed as dist
from megatron.core import parallel_state

from megatron_conan.checkpoint.layout import COMMON_FILE, LAYOUT_FILE, SHARDS_DIR, resolve_checkpoint
from megatron_conan.checkpoint.safe_load import load_file
from megatron_conan.config.model import ConanModelConfig
from megatron_conan.errors import CheckpointMismatchError, InputError


@dataclasses.dataclass
class CheckpointInfo:
    """What one checkpoint directory (``iter_N``) says about itself."""

    path: str
    """The ``iter_N`` directory."""
    step: int
    """Training step it was saved at."""
    model_config: ConanModelConfig
    """The model shape it holds."""
    extra: Dict[str, Any]
    """``common.pt["extra"]``: the loop's extra state (soft mask, run config, stage state)."""

    @property
    def run_config(self) -> Dict[str, Any]:
        """The resolved run config of the run that wrote it (empty when it did not record one)."""
        return dict(self.extra.get("run_config") or {})

    @property
    def soft_mask(self) -> Optional[Dict[str, Any]]:
        """``{"step", "config"}`` of the soft-mask schedule, or None (pretrain / SFT: causal)."""
        return self.extra.get("soft_mask")

    def tokenizer_path(self) -> Optional[str]:
        """The SentencePiece model the run trained with, if it recorded one."""
        return (self.run_config.get("data") or {}).get("tokenizer") or self.extra.get("tokenizer")

    def embedding_settings(self) -> Dict[str, Any]:
        """The run's ``embedding`` section (pooling, query_instruction, matryoshka_dims, ...)."""
        return dict(self.run_config.get("embedding") or {})


def read_common(checkpoint_dir: str) -> Dict[str, Any]:
    """The ``common.pt`` of an ``iter_N`` directory, read weights-only (no code runs; see
    :mod:`~megatron_conan.checkpoint.safe_load`)."""
    common = load_file(os.path.join(checkpoint_dir, COMMON_FILE))
    if not isinstance(common, dict):
        raise InputError(f"{checkpoint_dir}/{COMMON_FILE} is not a checkpoint's common state (a "
                         f"{type(common).__name__}, not a dict)")
    return common


def common_state(step: int, consumed_samples: int, scheduler, model_config: ConanModelConfig,
                 extra_state: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """The ``common.pt`` a save writes."""
    return {
        "step": step,
        "consumed_samples": consumed_samples,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "model_config": dataclasses.asdict(model_config),
        "extra": extra_state or {},
    }


def read_checkpoint_info(path: str) -> CheckpointInfo:
    """Resolve `path` (see :func:`~megatron_conan.checkpoint.layout.resolve_checkpoint`) and read its
    ``common.pt``."""
    resolved = resolve_checkpoint(path)
    try:
        common = read_common(resolved)
        model_config = ConanModelConfig(**common["model_config"])
    except (KeyError, TypeError, RuntimeError, EOFError) as error:
        raise InputError(f"{resolved}/{COMMON_FILE} is not a checkpoint's common state ({error})") from None
    if not os.path.isdir(os.path.join(resolved, SHARDS_DIR)):
        raise InputError(f"{resolved} has no {SHARDS_DIR} directory (an incomplete checkpoint)")
    return CheckpointInfo(path=resolved, step=int(common.get("step", 0)), model_config=model_config,
                          extra=dict(common.get("extra") or {}))


def parallel_layout() -> Dict[str, int]:
    """This run's layout as ``layout.json`` records it (process groups must exist)."""
    return {
        "world_size": dist.get_world_size(),
        "tensor_parallel": parallel_state.get_tensor_model_parallel_world_size(),
        "pipeline_parallel": parallel_state.get_pipeline_model_parallel_world_size(),
        "data_parallel": parallel_state.get_data_parallel_world_size(),
    }


RUN_ID = "run_id"
"""``layout.json``'s field naming the run that wrote the checkpoint (kept across resumes); pruning
deletes only checkpoints that name the pruning run's id."""


def write_layout(checkpoint_dir: str, run_id: Optional[str] = None) -> None:
    """``layout.json``: this run's layout, and the id of the run writing it."""
    record: Dict[str, Any] = dict(parallel_layout())
    if run_id is not None:
        record[RUN_ID] = run_id
    with open(os.path.join(checkpoint_dir, LAYOUT_FILE), "w", encoding="utf-8") as handle:
        json.dump(record, handle)


def read_layout(checkpoint_dir: str) -> Dict[str, int]:
    """The parallel layout that wrote the checkpoint (its ``layout.json`` without the run id)."""
    with open(os.path.join(checkpoint_dir, LAYOUT_FILE), encoding="utf-8") as handle:
        record = json.load(handle)
    if not isinstance(record, dict):
        raise InputError(f"{checkpoint_dir}/{LAYOUT_FILE} is not a layout record")
    return {key: value for key, value in record.items() if key != RUN_ID}


def checkpoint_owner(checkpoint_dir: str) -> Optional[str]:
    """The run id a checkpoint's ``layout.json`` records, or None (none recorded, or unreadable)."""
    try:
        with open(os.path.join(checkpoint_dir, LAYOUT_FILE), encoding="utf-8") as handle:
            record = json.load(handle)
    except (OSError, ValueError):
        return None
    owner = record.get(RUN_ID) if isinstance(record, dict) else None
    return owner if isinstance(owner, str) else None


_SHAPE_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "head_dim",
                 "ffn_hidden_size", "vocab_size", "tie_embeddings")


def check_model_config(saved: Dict[str, Any], current: ConanModelConfig, path: str) -> None:
    """Raise CheckpointMismatchError naming every shape field that differs."""
    differences = [
        f"{name}: checkpoint {saved.get(name)!r} vs model {getattr(current, name)!r}"
        for name in _SHAPE_FIELDS if saved.get(name) != getattr(current, name)
    ]
    if differences:
        raise CheckpointMismatchError(
            f"checkpoint {path} was written for a different model shape: " + "; ".join(differences)
        )
