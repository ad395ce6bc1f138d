"""Each rank's random-number state (Python, NumPy, torch, CUDA, megatron-core's tracker), saved in
``iter_N/rng/rank_<r>.pt`` and restored only under the layout that wrote it."""

from __future__ import annotations

import random
from typing import Any, Dict

import numpy
import torch
from megatron.core import tensor_parallel


def rng_state() -> Dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": numpy.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    numpy.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
