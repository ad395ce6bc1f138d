"""Each rank's random-number state (Python, NumPy, torch, CUDA, megatron-core's tracker), saved in
``iter_N/rng/rank_<r>.pt`` and restored only under the layout that wrote it.

The file holds tensors, numbers and tuples only, so it loads with ``torch.load(weights_only=True)``
(:mod:`~megatron_conan.checkpoint.safe_load`): NumPy's state is kept as its key tensor and numbers,
not as a pickled array. Files written before that (the NumPy state as NumPy's own tuple) still load.
"""

from __future__ import annotations

import random
from typing import Any, Dict

import numpy
import torch
from megatron.core import tensor_parallel


def _numpy_state() -> Dict[str, Any]:
    kind, keys, position, has_gauss, cached_gaussian = numpy.random.get_state()
    return {"kind": kind, "keys": torch.from_numpy(keys.astype(numpy.int64)), "position": int(position),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)}


def _set_numpy_state(state: Any) -> None:
    if isinstance(state, dict):
        state = (state["kind"], state["keys"].numpy().astype(numpy.uint32), state["position"],
                 state["has_gauss"], state["cached_gaussian"])
    numpy.random.set_state(state)  # a tuple: an RNG file of the earlier format


def rng_state() -> Dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": _numpy_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    _set_numpy_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
